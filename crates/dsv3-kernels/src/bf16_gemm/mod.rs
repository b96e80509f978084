//! GEMM against a high-precision (bf16) weight: `out[M, N] = a[M, K] · W[N, K]ᵀ`.
//!
//! The tensors DeepSeek-V3 keeps in BF16 are multiplied here: the MoE router
//! (`mlp.gate.weight`, run in f32 on every backend, docs/model.md §3.9: bf16 → f32 is exact), `lm_head`,
//! the MTP `eh_proj` and `shared_head.head`. The weight stays bf16 in memory (half the bytes of
//! f32: decode is memory-bound) and is widened exactly in registers; accumulation is f32.

use crate::cpu::{IsaLevel, dispatch, isa_level};
use crate::error::{Result, check_len, checked_mul, shape_err};
use crate::gemm::GemmShape;
use crate::mmap::Storage;
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

mod screen;
pub use screen::{Int8Screen, gemm_bf16_screened};

/// A borrowed, validated bf16 weight `[rows, cols]`.
#[derive(Debug, Clone, Copy)]
pub struct Bf16WeightRef<'a> {
    rows: usize,
    cols: usize,
    data: &'a [bf16],
    /// The owned weight this is the view of ([`Bf16Weight::view`]), if any.
    source: Option<&'a Bf16Weight>,
}

impl<'a> Bf16WeightRef<'a> {
    pub fn new(rows: usize, cols: usize, data: &'a [bf16]) -> Result<Self> {
        const OP: &str = "Bf16Weight";
        if rows == 0 || cols == 0 {
            return Err(shape_err(OP, format!("empty weight [{rows}, {cols}]")));
        }
        check_len(OP, "data", data.len(), checked_mul(OP, "data", rows, cols)?)?;
        Ok(Bf16WeightRef { rows, cols, data, source: None })
    }
    /// The owned weight this view shows in full, when it was made by [`Bf16Weight::view`]
    /// (see [`crate::fp8::Fp8WeightRef::source`]).
    pub fn source(&self) -> Option<&'a Bf16Weight> {
        self.source
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &'a [bf16] {
        self.data
    }
}

/// An owned bf16 weight: its values are a [`Storage`], an owned `Vec` or a range of a
/// memory-mapped checkpoint read in place (cloning a mapped weight shares the map).
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16Weight {
    rows: usize,
    cols: usize,
    data: Storage<bf16>,
    /// An int8 copy for screened products ([`screen`]), when one was made.
    screen: Option<Arc<Int8Screen>>,
}

impl Bf16Weight {
    pub fn new(rows: usize, cols: usize, data: Vec<bf16>) -> Result<Self> {
        Self::from_storage(rows, cols, Storage::from(data))
    }
    /// Checks the shape and takes ownership of values that may live in a map.
    pub fn from_storage(rows: usize, cols: usize, data: Storage<bf16>) -> Result<Self> {
        Bf16WeightRef::new(rows, cols, &data)?;
        Ok(Bf16Weight { rows, cols, data, screen: None })
    }
    /// This weight with an int8 copy for [`gemm_bf16_screened`] (the values are shared, not
    /// copied, when they live in a map).
    pub fn with_int8_screen(mut self) -> Self {
        self.screen = Some(Arc::new(Int8Screen::quantize(self.view())));
        self
    }
    /// The int8 copy, when [`Bf16Weight::with_int8_screen`] made one.
    pub fn int8_screen(&self) -> Option<&Int8Screen> {
        self.screen.as_deref()
    }
    /// Rounds an f32 matrix to bf16 (round to nearest even).
    pub fn from_f32(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        Bf16Weight::new(rows, cols, w.iter().map(|&v| bf16::from_f32(v)).collect())
    }
    pub fn view(&self) -> Bf16WeightRef<'_> {
        Bf16WeightRef { rows: self.rows, cols: self.cols, data: &self.data, source: Some(self) }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The values: owned, or read in place from a map.
    pub fn storage(&self) -> &Storage<bf16> {
        &self.data
    }
    /// Whether the values are read in place from a memory map.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }
}

fn validate(op: &'static str, a: usize, w: &Bf16WeightRef<'_>, s: GemmShape, out: usize) -> Result<()> {
    if w.rows != s.n || w.cols != s.k {
        return Err(shape_err(op, format!("weight is [{}, {}], shape wants [n={}, k={}]", w.rows, w.cols, s.n, s.k)));
    }
    check_len(op, "a", a, checked_mul(op, "a", s.m, s.k)?)?;
    check_len(op, "out", out, checked_mul(op, "out", s.m, s.n)?)
}

/// Plain-loop reference.
pub mod reference {
    use super::*;

    pub fn gemm_bf16(a: &[f32], w: Bf16WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
        validate("gemm_bf16 (reference)", a.len(), &w, s, out.len())?;
        for m in 0..s.m {
            for n in 0..s.n {
                let mut acc = 0f32;
                for k in 0..s.k {
                    acc += a[m * s.k + k] * w.data[n * s.k + k].to_f32();
                }
                out[m * s.n + n] = acc;
            }
        }
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Weight rows per task: long runs so each thread streams contiguous memory.
const ROWS_PER_TASK: usize = 64;

/// Fast bf16 GEMM: weight rows in parallel chunks; each weight row is read once per group of
/// 4 activation rows and widened in registers.
pub fn gemm_bf16(a: &[f32], w: Bf16WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
    validate("gemm_bf16", a.len(), &w, s, out.len())?;
    if s.m == 0 {
        return Ok(());
    }
    // Work on out^T chunks ([n rows of the weight] x m) so each task owns a contiguous slice,
    // then transpose (cheap next to reading the weight).
    let mut out_t = vec![0f32; s.n * s.m];
    #[cfg(target_arch = "x86_64")]
    if s.k.is_multiple_of(32) && isa_level() == IsaLevel::Avx512 {
        // Groups of <= 4 activation rows against streamed weight rows (decode: lm_head,
        // router). Each row's sums do not depend on the other rows of the batch, so any split
        // of a batch (a 2-token MTP step, the tokens of one expert-parallel rank) gives the
        // bits of the whole.
        let rows: Vec<&[f32]> = a.chunks_exact(s.k).collect();
        out_t.par_chunks_mut(ROWS_PER_TASK * s.m).enumerate().for_each(|(c, chunk)| {
            let (n0, nr) = (c * ROWS_PER_TASK, chunk.len() / s.m);
            for (g, r) in rows.chunks(4).enumerate() {
                let o = &mut chunk[4 * g..];
                // SAFETY: the CPU was checked at run time to have avx512f and avx512bw.
                unsafe { avx512::matvec_rows(r, w.data, s.k, n0, nr, s.m, o) };
            }
        });
        transpose_into(&out_t, s, out);
        return Ok(());
    }
    out_t.par_chunks_mut(ROWS_PER_TASK * s.m).enumerate().for_each(|(c, chunk)| {
        let n0 = c * ROWS_PER_TASK;
        for (i, o) in chunk.chunks_exact_mut(s.m).enumerate() {
            let wrow = &w.data[(n0 + i) * s.k..(n0 + i + 1) * s.k];
            let mut m = 0;
            while m < s.m {
                let mr = (s.m - m).min(4);
                let dots = row_dots(a, s.k, m, mr, wrow);
                o[m..m + mr].copy_from_slice(&dots[..mr]);
                m += mr;
            }
        }
    });
    transpose_into(&out_t, s, out);
    Ok(())
}

/// Single-threaded AVX-512 products of a few activation rows with a small bf16 block, for
/// kernels that parallelise over blocks themselves (the per-head products of the absorbed
/// attention). Each returns `false`, writing nothing, when the CPU lacks AVX-512 or the block's
/// width does not fit the kernel; the caller then uses its portable body. Every row's result
/// is independent of the other rows passed with it.
pub(crate) mod rows {
    use super::*;

    /// `out[r·n + i] = a[r] · w[i]` for the `n = w.len() / k` rows of `w` (`[n, k]`, every
    /// `a[r]` `k` long, `k % 32 == 0`); `out` is `[a.len(), n]`.
    pub(crate) fn dots(a: &[&[f32]], w: &[bf16], k: usize, out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if k > 0 && k.is_multiple_of(32) && isa_level() == IsaLevel::Avx512 && a.iter().all(|r| r.len() == k) {
            let n = w.len() / k;
            let mut t = vec![0f32; 4 * n];
            for (g, r) in a.chunks(4).enumerate() {
                let mr = r.len();
                let o = &mut t[..n * mr];
                // SAFETY: the CPU was checked at run time to have avx512f and avx512bw.
                unsafe { avx512::matvec_rows(r, w, k, 0, n, mr, o) };
                for (i, col) in o.chunks_exact(mr).enumerate() {
                    for (j, &v) in col.iter().enumerate() {
                        out[(4 * g + j) * n + i] = v;
                    }
                }
            }
            return true;
        }
        let _ = (a, w, k, out);
        false
    }

    /// `out[r][c] = Σ_e a[r][e] · w[e·cols + c]`: the transposed product `aᵀ W` with `w`
    /// `[a[r].len(), cols]`, `cols % 64 == 0`, every `out[r]` `cols` long.
    pub(crate) fn vecmat(a: &[&[f32]], w: &[bf16], cols: usize, out: &mut [&mut [f32]]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if cols > 0
            && cols.is_multiple_of(avx512::VECMAT_COLS)
            && isa_level() == IsaLevel::Avx512
            && a.len() == out.len()
            && a.iter().all(|r| r.len() * cols == w.len())
            && out.iter().all(|o| o.len() == cols)
        {
            for (r, o) in a.chunks(4).zip(out.chunks_mut(4)) {
                // SAFETY: the CPU was checked at run time to have avx512f and avx512bw; the
                // lengths `vecmat` reads and writes were checked above.
                unsafe {
                    match o {
                        [o0] => avx512::vecmat::<1, 16>([r[0]], w, cols, [o0]),
                        [o0, o1] => avx512::vecmat::<2, 8>([r[0], r[1]], w, cols, [o0, o1]),
                        [o0, o1, o2] => avx512::vecmat::<3, 4>([r[0], r[1], r[2]], w, cols, [o0, o1, o2]),
                        [o0, o1, o2, o3] => avx512::vecmat::<4, 4>([r[0], r[1], r[2], r[3]], w, cols, [o0, o1, o2, o3]),
                        _ => unreachable!("chunks of 1 to 4"),
                    }
                }
            }
            return true;
        }
        let _ = (a, w, cols, out);
        false
    }
}

/// `out[m, n] = out_t[n, m]`.
fn transpose_into(out_t: &[f32], s: GemmShape, out: &mut [f32]) {
    for m in 0..s.m {
        for n in 0..s.n {
            out[m * s.n + n] = out_t[n * s.m + m];
        }
    }
}

dispatch! {
    /// Dot products of activation rows `m..m+mr` (mr <= 4) with one bf16 weight row.
    fn row_dots(a: &[f32], k: usize, m: usize, mr: usize, wrow: &[bf16]) -> [f32; 4] = row_dots_body;
}

#[inline(always)]
fn row_dots_body(a: &[f32], k: usize, m: usize, mr: usize, wrow: &[bf16]) -> [f32; 4] {
    const L: usize = 16;
    let mut out = [0f32; 4];
    for r in 0..mr {
        let arow = &a[(m + r) * k..(m + r + 1) * k];
        let mut acc = [0f32; L];
        let mut wc = wrow.chunks_exact(L);
        let mut ac = arow.chunks_exact(L);
        for (w, x) in (&mut wc).zip(&mut ac) {
            for l in 0..L {
                acc[l] += x[l] * f32::from_bits((w[l].to_bits() as u32) << 16);
            }
        }
        let mut s: f32 = wc.remainder().iter().zip(ac.remainder()).map(|(w, x)| x * w.to_f32()).sum();
        for v in acc {
            s += v;
        }
        out[r] = s;
    }
    out
}
