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

/// Pollers of [`with_busy_pool`] running now (for the tests).
static POLLERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` (a model step) while the pool's other workers poll for work instead of going to
/// sleep between its kernels.
///
/// A decode step is a hundred or more short parallel kernels with a little serial work between
/// them. A rayon worker that finds no work yields a few dozen times and then sleeps, so the
/// next kernel's fork first has to wake it through the OS: on a VM several microseconds per
/// kernel, and the decode profile showed about a tenth of the samples in the scheduler. Here
/// each other worker runs a job that keeps taking the pool's work (`rayon::yield_now`) until
/// `f` returns. Called from outside the pool, or with one thread, it just runs `f`.
///
/// The workers are busy for the whole of `f`, so use it for steps, not for idle waits.
pub fn with_busy_pool<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (Some(me), n) = (rayon::current_thread_index(), rayon::current_num_threads()) else {
        return f();
    };
    thread_local! {
        /// Whether this thread is inside `with_busy_pool` already (a decode step's forward).
        static ACTIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if n < 2 || ACTIVE.get() {
        return f();
    }
    /// Ends the pollers, and the thread's scope, when `f` returns or unwinds.
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            ACTIVE.set(false);
        }
    }
    ACTIVE.set(true);
    let done = Done(Arc::new(AtomicBool::new(false)));
    for _ in 1..n {
        let flag = Arc::clone(&done.0);
        rayon::spawn(move || {
            // This thread itself may pick the job up while it waits inside `f`: polling there
            // would never return to `f`.
            if rayon::current_thread_index() == Some(me) {
                return;
            }
            POLLERS.fetch_add(1, Ordering::Relaxed);
            while !flag.load(Ordering::Acquire) {
                if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                    std::hint::spin_loop();
                }
            }
            POLLERS.fetch_sub(1, Ordering::Relaxed);
        });
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::with_busy_pool;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("a thread pool")
    }

    /// Waits (up to 10 s) until no poller runs: every one ended with its step.
    fn all_workers_free() -> bool {
        let t = Instant::now();
        while super::POLLERS.load(std::sync::atomic::Ordering::Relaxed) != 0 {
            if t.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn a_busy_step_computes_what_it_would_alone_and_frees_the_workers() {
        let p = pool(3);
        let want: u64 = (0..100_000u64).map(|x| x * x % 7).sum();
        for _ in 0..20 {
            // Parallel work inside, a nested scope, serial gaps between the kernels.
            let got = p.install(|| {
                with_busy_pool(|| {
                    let a: u64 = (0..50_000u64).into_par_iter().map(|x| x * x % 7).sum();
                    std::thread::sleep(Duration::from_micros(200));
                    let b = with_busy_pool(|| (50_000..100_000u64).into_par_iter().map(|x| x * x % 7).sum::<u64>());
                    a + b
                })
            });
            assert_eq!(got, want);
        }
        assert!(all_workers_free(), "a poller outlived its step");
    }

    #[test]
    fn a_panicking_step_still_frees_the_workers() {
        let p = pool(2);
        let r = p.install(|| std::panic::catch_unwind(|| with_busy_pool(|| panic!("a failing step"))));
        assert!(r.is_err());
        assert!(all_workers_free(), "a poller outlived its step");
        assert_eq!(p.install(|| with_busy_pool(|| (0..10u32).into_par_iter().sum::<u32>())), 45);
    }

    #[test]
    fn outside_a_pool_or_with_one_thread_it_just_runs() {
        assert_eq!(with_busy_pool(|| 7), 7);
        assert_eq!(pool(1).install(|| with_busy_pool(|| (0..10u32).into_par_iter().sum::<u32>())), 45);
    }
}
