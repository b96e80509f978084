//! Run-time CPU feature dispatch for the fast CPU kernels.
//!
//! Kernels are written once in plain, auto-vectorisable Rust as `#[inline(always)]` bodies.
//! `dispatch!` compiles each body twice: for the baseline target and for AVX2 + FMA + F16C,
//! and picks at run time. Binaries built here therefore run on any x86-64 machine (the GPU
//! machine included) and still use the wide units where the CPU has them.

use std::sync::OnceLock;

/// The instruction-set level the fast kernels run at on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaLevel {
    /// Whatever the compilation target guarantees (SSE2 on x86-64, NEON on aarch64).
    Baseline,
    /// x86-64 with AVX2, FMA and F16C: 8 f32 lanes, 2 FMA units per core on most parts.
    Avx2Fma,
    /// Also AVX-512 F + BW: 16 f32 lanes. Used where it pays (the FP8 matrix-vector path,
    /// whose decode costs half the instructions at this width).
    Avx512,
}

impl IsaLevel {
    /// f32 lanes of one vector register at this level.
    pub fn f32_lanes(self) -> usize {
        match self {
            IsaLevel::Baseline => 4,
            IsaLevel::Avx2Fma => 8,
            IsaLevel::Avx512 => 16,
        }
    }
}

/// The level used by this process: the best the CPU has, lowered by the environment variable
/// `DSV3_ISA=baseline|avx2` (so that tests can run every code path on one machine). Decided
/// once per process.
pub fn isa_level() -> IsaLevel {
    static LEVEL: OnceLock<IsaLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("DSV3_ISA").as_deref() {
            Ok("baseline") => IsaLevel::Baseline,
            Ok("avx2") => IsaLevel::Avx2Fma,
            _ => IsaLevel::Avx512,
        };
        detect().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> IsaLevel {
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
    if avx2 && std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
        IsaLevel::Avx512
    } else if avx2 {
        IsaLevel::Avx2Fma
    } else {
        IsaLevel::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> IsaLevel {
    IsaLevel::Baseline
}

/// `dispatch!(pub fn name(a: A, b: B) -> R = body_fn);` defines `name`, which calls the
/// `#[inline(always)]` function `body_fn` compiled for AVX2+FMA+F16C when the CPU has them,
/// and the baseline build otherwise. Call it per chunk of work (not per element): the check
/// is one cached load.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident$(<$($lt:lifetime),*>)?($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$m])*
        $vis fn $name$(<$($lt),*>)?($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                fn wide$(<$($lt),*>)?($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                if $crate::cpu::isa_level() >= $crate::cpu::IsaLevel::Avx2Fma {
                    // SAFETY: `wide` only differs from the body in the target features it is
                    // compiled with, and the CPU was checked at run time to have all of them.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// Worker threads the fast kernels use (rayon's pool: `RAYON_NUM_THREADS` or the core count).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
