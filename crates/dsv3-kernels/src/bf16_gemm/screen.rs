//! The screened product against a bf16 weight: an int8 copy of the weight (one scale per row,
//! as llama.cpp's Q8_0 keeps `output.weight`, but per row) is read in full, and only the rows
//! whose exact value could be the row maximum are recomputed from the bf16 weight.
//!
//! This is what the opt-in `--lm-head int8` runs at decode: `lm_head` is most of the bytes a
//! decode step reads on a small model with a large vocabulary (265 MB of 347 MB on the `small`
//! preset), and the int8 copy halves them. **Greedy decoding stays bitwise exact**:
//!
//! * `q[n][i] = round(w[n][i] / s[n])` with `s[n] = max_i |w[n][i]| / 127`, so
//!   `|w[n][i] - s[n]·q[n][i]| <= s[n]/2` (plus rounding slack);
//! * the screen value `l[n] = s[n] · Σ_i a[i]·q[n][i]` is then within
//!   `b[n] = s[n] · ‖a‖₁ · (1/2 + ε(k))` of the value the exact kernel ([`gemm_bf16`](super::gemm_bf16))
//!   computes, where `ε(k)` covers the f32 rounding of both sums (any order: `γ(k) = k·u/(1-k·u)`);
//! * with `M = max_n (l[n] - b[n])`, every row with `l[n] + b[n] >= M` is a *candidate* and is
//!   recomputed by the exact kernel itself, giving the same bits as the unscreened product;
//! * every other row's exact value is below `M`, which is at most the exact maximum, and its
//!   screen value is below `M` too.
//!
//! So the arg-max of each output row, and the values of all rows that can win it, are those of
//! the exact product; the other values are the int8 estimates (within `b[n]`). Sampling at a
//! temperature therefore sees the exact logits of the likely tokens and estimates for the tail.
//! On random weights about 1 row in 10⁴ is a candidate; a row of `a` with a non-finite value
//! makes every row a candidate (the exact product, slowly).

use super::{Bf16WeightRef, gemm_bf16, validate};
use crate::cpu::dispatch;
use crate::error::{Result, shape_err};
use crate::gemm::GemmShape;
use half::bf16;
use rayon::prelude::*;

/// An int8 copy of a bf16 weight `[rows, cols]` with one f32 scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Screen {
    rows: usize,
    cols: usize,
    codes: Vec<i8>,
    /// `max |w| / 127` per row; NaN for a row with a non-finite value (always a candidate).
    scales: Vec<f32>,
}

/// Weight rows per parallel task of the screen pass.
const ROWS_PER_TASK: usize = 64;

impl Int8Screen {
    /// Quantises every row of `w` to int8 with its own scale (round to nearest).
    pub fn quantize(w: Bf16WeightRef<'_>) -> Int8Screen {
        let (rows, cols) = (w.rows(), w.cols());
        let mut codes = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        codes.par_chunks_mut(cols.max(1)).zip(scales.par_iter_mut()).enumerate().for_each(|(n, (q, s))| {
            let row = &w.data()[n * cols..(n + 1) * cols];
            let mut max = 0f32;
            let mut finite = true;
            for v in row {
                let v = v.to_f32();
                finite &= v.is_finite();
                max = max.max(v.abs());
            }
            if !finite {
                *s = f32::NAN;
                return;
            }
            *s = max / 127.0;
            if max > 0.0 {
                for (c, v) in q.iter_mut().zip(row) {
                    *c = (v.to_f32() / *s).round().clamp(-127.0, 127.0) as i8;
                }
            }
        });
        Int8Screen { rows, cols, codes, scales }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes read per product: the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

/// Bound factor `1/2 + ε(k)`: the half-step of rounding to the int8 grid, the f32 rounding of
/// the two dot products (`|q| <= 127` and `|w| <= 127·s·(1+u)`), of the final scaling and of
/// the scale itself, generously rounded up.
fn bound_factor(k: usize) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    let n = k as f64 + 2.0;
    let gamma = n * u / (1.0 - n * u).max(f64::MIN_POSITIVE);
    0.5 + 1e-3 + 300.0 * gamma
}

/// `out = a · wᵀ` screened by `q` (module docs): per row of `a`, the exact values of every
/// weight row that can hold the row's maximum, int8 estimates for the others.
pub fn gemm_bf16_screened(a: &[f32], w: Bf16WeightRef<'_>, q: &Int8Screen, s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm_bf16_screened";
    validate(OP, a.len(), &w, s, out.len())?;
    if q.rows != w.rows() || q.cols != w.cols() {
        return Err(shape_err(OP, format!("int8 screen is [{}, {}], weight is [{}, {}]", q.rows, q.cols, w.rows(), w.cols())));
    }
    if s.k == 0 {
        return gemm_bf16(a, w, s, out);
    }
    let factor = bound_factor(s.k);
    let mut picked: Vec<bf16> = Vec::new();
    let mut exact: Vec<f32> = Vec::new();
    for (x, o) in a.chunks_exact(s.k).zip(out.chunks_exact_mut(s.n)) {
        screen_row(x, q, o);
        let l1: f64 = x.iter().map(|v| f64::from(v.abs())).sum();
        let bound = |n: usize| f64::from(q.scales[n]) * l1 * factor;
        // M = max (l - b); a NaN (non-finite scale or activation) never raises it.
        let m = (0..s.n).map(|n| f64::from(o[n]) - bound(n)).fold(f64::NEG_INFINITY, f64::max);
        // Candidates: `l + b >= M`, and every NaN (no ordering with M).
        let cand: Vec<usize> =
            (0..s.n).filter(|&n| (f64::from(o[n]) + bound(n)).partial_cmp(&m) != Some(std::cmp::Ordering::Less)).collect();
        picked.clear();
        for &n in &cand {
            picked.extend_from_slice(&w.data()[n * s.k..(n + 1) * s.k]);
        }
        exact.clear();
        exact.resize(cand.len(), 0.0);
        // The exact kernel itself on the gathered rows: each of its values depends only on its
        // activation row and weight row, so these are the bits of the unscreened product.
        let sub = Bf16WeightRef::new(cand.len(), s.k, &picked)?;
        gemm_bf16(x, sub, GemmShape { m: 1, n: cand.len(), k: s.k }, &mut exact)?;
        for (&n, &v) in cand.iter().zip(&exact) {
            o[n] = v;
        }
    }
    Ok(())
}

/// `o[n] = s[n] · (x · q[n])` for every row of the screen.
fn screen_row(x: &[f32], q: &Int8Screen, o: &mut [f32]) {
    let k = q.cols;
    o.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, chunk)| {
        let n0 = c * ROWS_PER_TASK;
        #[cfg(target_arch = "x86_64")]
        if k.is_multiple_of(64) && crate::cpu::isa_level() == crate::cpu::IsaLevel::Avx512 {
            // SAFETY: the CPU was checked at run time to have avx512f and avx512bw.
            unsafe { avx512::dots(x, &q.codes[n0 * k..(n0 + chunk.len()) * k], k, chunk) };
            for (i, v) in chunk.iter_mut().enumerate() {
                *v *= q.scales[n0 + i];
            }
            return;
        }
        for (i, v) in chunk.iter_mut().enumerate() {
            let n = n0 + i;
            *v = q.scales[n] * int8_dot(x, &q.codes[n * k..(n + 1) * k]);
        }
    });
}

dispatch! {
    /// `x · q` with the int8 codes widened to f32.
    fn int8_dot(x: &[f32], q: &[i8]) -> f32 = int8_dot_body;
}

#[inline(always)]
fn int8_dot_body(x: &[f32], q: &[i8]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (mut xc, mut qc) = (x.chunks_exact(L), q.chunks_exact(L));
    for (xs, qs) in (&mut xc).zip(&mut qc) {
        for l in 0..L {
            acc[l] += xs[l] * f32::from(qs[l]);
        }
    }
    let tail: f32 = xc.remainder().iter().zip(qc.remainder()).map(|(x, &q)| x * f32::from(q)).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::simd::avx512::load16;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current position that each code stream prefetches.
    const PREFETCH_AHEAD: usize = 1024;

    /// `out[i] = x · codes[i]` for the `out.len()` rows of `codes` (`[rows, k]`, `k % 64 == 0`),
    /// two rows at a time from the two halves of the block (two streams in flight).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn dots(x: &[f32], codes: &[i8], k: usize, out: &mut [f32]) {
        let rows = out.len();
        let half = rows.div_ceil(2);
        for i in 0..half {
            let j = i + half;
            if j < rows {
                let (s0, s1) = dot2(x, &codes[i * k..(i + 1) * k], &codes[j * k..(j + 1) * k]);
                out[i] = s0;
                out[j] = s1;
            } else {
                let (s0, _) = dot2(x, &codes[i * k..(i + 1) * k], &codes[i * k..(i + 1) * k]);
                out[i] = s0;
            }
        }
    }

    /// 64 codes (one line) widened to four vectors of 16 f32: one sign-extending load per 16
    /// codes (no shuffles), then the conversion.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn widen64(q: &[i8]) -> [__m512; 4] {
        let line: &[i8; 64] = match q.first_chunk() {
            Some(l) => l,
            None => unreachable!("64 codes"),
        };
        let f = |i: usize| {
            // SAFETY: bytes 16i..16i+16 of `line` are readable; loadu has no alignment requirement.
            let v = unsafe { _mm_loadu_si128(line.as_ptr().add(16 * i).cast()) };
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
        };
        [f(0), f(1), f(2), f(3)]
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    fn dot2(x: &[f32], p: &[i8], q: &[i8]) -> (f32, f32) {
        let mut a = [_mm512_setzero_ps(); 4];
        let mut b = [_mm512_setzero_ps(); 4];
        for j in (0..p.len()).step_by(64) {
            // The prefetches may point past the end of the codes: prefetches never fault.
            _mm_prefetch::<_MM_HINT_T0>(p.as_ptr().wrapping_add(j + PREFETCH_AHEAD).cast());
            _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add(j + PREFETCH_AHEAD).cast());
            let (wp, wq) = (widen64(&p[j..]), widen64(&q[j..]));
            for v in 0..4 {
                let xv = load16(&x[j + 16 * v..]);
                a[v] = _mm512_fmadd_ps(xv, wp[v], a[v]);
                b[v] = _mm512_fmadd_ps(xv, wq[v], b[v]);
            }
        }
        let sum = |s: [__m512; 4]| _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
        (sum(a), sum(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16_gemm::Bf16Weight;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn argmax(v: &[f32]) -> usize {
        (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
    }

    /// Shapes of the vocabulary projection in miniature: every row of the screened product has
    /// the exact product's arg-max, and every value is either those exact bits or within the
    /// bound of them.
    #[test]
    fn screened_rows_keep_the_exact_argmax_and_values() {
        for (m, n, k) in [(1, 4096, 1024), (3, 1000, 256), (5, 333, 96), (2, 64, 40)] {
            let mut seed = (m * n * k) as u64;
            let w = Bf16Weight::from_f32(n, k, &(0..n * k).map(|_| lcg(&mut seed) * 0.05).collect::<Vec<_>>()).unwrap();
            let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let q = Int8Screen::quantize(w.view());
            let s = GemmShape { m, n, k };
            let (mut exact, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
            gemm_bf16(&a, w.view(), s, &mut exact).unwrap();
            gemm_bf16_screened(&a, w.view(), &q, s, &mut got).unwrap();
            for r in 0..m {
                let (e, g) = (&exact[r * n..(r + 1) * n], &got[r * n..(r + 1) * n]);
                assert_eq!(argmax(e), argmax(g), "m={m} n={n} k={k} row {r}");
                let best = argmax(e);
                assert_eq!(e[best].to_bits(), g[best].to_bits());
                let l1: f64 = a[r * k..(r + 1) * k].iter().map(|v| f64::from(v.abs())).sum();
                let exact_rows = (0..n).filter(|&i| e[i].to_bits() == g[i].to_bits()).count();
                assert!(exact_rows < n || n <= 64, "m={m} n={n} k={k}: the screen recomputed every row");
                for i in 0..n {
                    let b = f64::from(q.scales[i]) * l1 * bound_factor(k);
                    assert!((f64::from(e[i]) - f64::from(g[i])).abs() <= b, "row {r} col {i}: {} vs {}", e[i], g[i]);
                }
            }
        }
    }

    /// A near-tie that int8 cannot resolve: both rows are candidates and recomputed exactly.
    #[test]
    fn near_ties_are_resolved_by_the_exact_rows() {
        let k = 128;
        let mut rows = vec![0f32; 3 * k];
        for i in 0..k {
            rows[i] = 0.01 * (i % 7) as f32;
            rows[k + i] = rows[i] + if i == 5 { 0.0078125 } else { 0.0 };
            rows[2 * k + i] = -0.02;
        }
        let w = Bf16Weight::from_f32(3, k, &rows).unwrap();
        let a = vec![1.0f32; k];
        let q = Int8Screen::quantize(w.view());
        let s = GemmShape { m: 1, n: 3, k };
        let (mut exact, mut got) = (vec![0f32; 3], vec![0f32; 3]);
        gemm_bf16(&a, w.view(), s, &mut exact).unwrap();
        gemm_bf16_screened(&a, w.view(), &q, s, &mut got).unwrap();
        assert_eq!(argmax(&exact), 1);
        assert_eq!(exact[..2], got[..2]);
    }

    /// A non-finite weight row is always recomputed; a non-finite activation makes every row a
    /// candidate: the exact product.
    #[test]
    fn non_finite_inputs_are_recomputed_exactly() {
        let (n, k) = (70, 64);
        let mut seed = 7;
        let mut v: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        v[3 * k + 1] = f32::INFINITY;
        let w = Bf16Weight::from_f32(n, k, &v).unwrap();
        let q = Int8Screen::quantize(w.view());
        assert!(q.scales[3].is_nan());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let run = |a: &[f32]| {
            let s = GemmShape { m: 1, n, k };
            let (mut exact, mut got) = (vec![0f32; n], vec![0f32; n]);
            gemm_bf16(a, w.view(), s, &mut exact).unwrap();
            gemm_bf16_screened(a, w.view(), &q, s, &mut got).unwrap();
            (exact, got)
        };
        let (exact, got) = run(&[0.5f32; 64]);
        assert_eq!((argmax(&exact), got[3].to_bits()), (3, exact[3].to_bits()));
        let (exact, got) = run(&(0..k).map(|i| if i == 9 { f32::NAN } else { 1.0 }).collect::<Vec<_>>());
        assert_eq!(bits(&exact), bits(&got));
    }

    #[test]
    fn a_screen_of_another_shape_is_a_typed_error() {
        let w = Bf16Weight::from_f32(4, 64, &[0.1; 256]).unwrap();
        let other = Bf16Weight::from_f32(2, 64, &[0.1; 128]).unwrap();
        let q = Int8Screen::quantize(other.view());
        let mut out = vec![0f32; 4];
        let err = gemm_bf16_screened(&[1.0; 64], w.view(), &q, GemmShape { m: 1, n: 4, k: 64 }, &mut out).unwrap_err();
        assert!(err.to_string().contains("int8 screen is [2, 64]"), "{err}");
    }
}
