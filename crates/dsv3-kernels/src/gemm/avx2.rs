//! The AVX2 + FMA kernel: same blocking and the same per-block scaling as the portable body,
//! with the decode and the dot products written in intrinsics so that they are vectorised
//! whatever the optimiser decides.

use super::cpu::Job;
use crate::fp8::{BLOCK, blocks, decode_fast};
use std::arch::x86_64::*;

/// Decodes 16 FP8 codes to 2 x 8 f32 **divided by 256**, exactly, through F16C: with the
/// code in the high byte of a 16-bit lane, an arithmetic shift right by one and a mask
/// give the f16 whose sign, exponent and mantissa are the code's (exponent bias 15 instead
/// of 7, hence the factor 2^-8; f16 subnormals are E4M3 subnormals). Callers fold the 256
/// into the block scale. Four cheap ops per 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
fn decode16_div256(bytes: &[u8; 16]) -> (__m256, __m256) {
    // SAFETY: `bytes` is a reference to 16 readable bytes; loadu has no alignment needs.
    let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
    let zero = _mm_setzero_si128();
    let mask = _mm_set1_epi16(0xBF80u16 as i16);
    let lo = _mm_and_si128(_mm_srai_epi16::<1>(_mm_unpacklo_epi8(zero, raw)), mask);
    let hi = _mm_and_si128(_mm_srai_epi16::<1>(_mm_unpackhi_epi8(zero, raw)), mask);
    (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Loads 8 f32 from `x[i..i + 8]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn load8(x: &[f32], i: usize) -> __m256 {
    let c: &[f32; 8] = match x[i..i + 8].try_into() {
        Ok(c) => c,
        Err(_) => unreachable!("a slice of length 8"),
    };
    // SAFETY: `c` is a reference to 8 initialised f32; loadu has no alignment requirement.
    unsafe { _mm256_loadu_ps(c.as_ptr()) }
}

/// Stores 8 f32 into `x[i..i + 8]`.
#[target_feature(enable = "avx2,fma,f16c")]
fn store8(x: &mut [f32], i: usize, v: __m256) {
    let c: &mut [f32; 8] = match (&mut x[i..i + 8]).try_into() {
        Ok(c) => c,
        Err(_) => unreachable!("a slice of length 8"),
    };
    // SAFETY: `c` is an exclusive reference to 8 f32; storeu has no alignment requirement.
    unsafe { _mm256_storeu_ps(c.as_mut_ptr(), v) }
}

/// See [`super::tile`]'s `core_tile`. Up to 4 rows of A: the matrix-vector path, which streams each
/// weight row once and decodes it in registers. More rows: rows of A are taken 4 at a time
/// against 2 weight rows of a decoded L1 tile, so each loaded vector feeds several FMAs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn core_tile(job: &Job<'_>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    if k.is_multiple_of(BLOCK) {
        match m1 - m0 {
            1 => return matvec::<1>(job, k, m0, n0, n1, tile),
            2 => return matvec::<2>(job, k, m0, n0, n1, tile),
            3 => return matvec::<3>(job, k, m0, n0, n1, tile),
            4 => return matvec::<4>(job, k, m0, n0, n1, tile),
            _ => {}
        }
    }
    let nw = n1 - n0;
    let rows = m1 - m0;
    let kb_n = blocks(k);
    // Decode the task's weight rows over all of K once (at most NC x K f32: 1 MiB for
    // K = 16384, L2-resident), in units of 2^-8 (the micro-kernel scales by 256).
    let mut wt = vec![0f32; nw * k];
    for (n, dst) in (n0..n1).zip(wt.chunks_exact_mut(k)) {
        let src = &job.w.data()[n * k..(n + 1) * k];
        let mut codes = src.chunks_exact(16);
        for (c, d) in (&mut codes).zip(dst.chunks_exact_mut(16)) {
            let c: &[u8; 16] = match c.try_into() {
                Ok(c) => c,
                Err(_) => unreachable!("chunks_exact(16)"),
            };
            let (lo, hi) = decode16_div256(c);
            store8(d, 0, lo);
            store8(d, 8, hi);
        }
        let done = k - codes.remainder().len();
        for (d, &b) in dst[done..].iter_mut().zip(codes.remainder()) {
            *d = decode_fast(b) * (1.0 / 256.0);
        }
    }
    let a = &job.a.x[m0 * k..m1 * k];
    let a_scales = job.a.scales.map(|s| &s[m0 * kb_n..m1 * kb_n]);
    let w_scales = job.w.scale_inv();
    let mut i = 0;
    while i < rows {
        let mr = (rows - i).min(4);
        let mut n = 0;
        while n < nw {
            // With one weight row left, row 0 stands in for row 1 and its sums are unused.
            let nr = (nw - n).min(2);
            let w0 = &wt[n * k..(n + 1) * k];
            let w1 = if nr == 2 { &wt[(n + 1) * k..(n + 2) * k] } else { w0 };
            let ws = |c: usize| &w_scales[((n0 + n + c.min(nr - 1)) / BLOCK) * kb_n..][..kb_n];
            let (ws0, ws1) = (ws(0), ws(1));
            let sc = |r: usize| a_scales.map(|s| &s[(i + r) * kb_n..(i + r + 1) * kb_n]);
            let a_i = &a[i * k..];
            let out: [[f32; 2]; 4] = match mr {
                4 => micro::<4>(a_i, k, w0, w1, ws0, ws1, [sc(0), sc(1), sc(2), sc(3)]),
                3 => pad(micro::<3>(a_i, k, w0, w1, ws0, ws1, [sc(0), sc(1), sc(2)])),
                2 => pad(micro::<2>(a_i, k, w0, w1, ws0, ws1, [sc(0), sc(1)])),
                _ => pad(micro::<1>(a_i, k, w0, w1, ws0, ws1, [sc(0)])),
            };
            for r in 0..mr {
                for c in 0..nr {
                    tile[(i + r) * nw + n + c] = out[r][c];
                }
            }
            n += nr;
        }
        i += mr;
    }
}

/// The register-blocked kernel: `MR` activation rows (row r at `a[r * k..]`) against two
/// decoded weight rows over all of K. Each 128-block is summed in `MR x 2` vector
/// accumulators, then promoted into vector totals with its scale (`w_scale * 256`, times
/// the row's activation scale on the fp8 path); one horizontal sum per output at the end.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn micro<const MR: usize>(
    a: &[f32],
    k: usize,
    w0: &[f32],
    w1: &[f32],
    ws0: &[f32],
    ws1: &[f32],
    a_s: [Option<&[f32]>; MR],
) -> [[f32; 2]; MR] {
    let mut tot = [[_mm256_setzero_ps(); 2]; MR];
    let mut tail = [[0f32; 2]; MR];
    for kb in 0..blocks(k) {
        let (k0, k1) = (kb * BLOCK, ((kb + 1) * BLOCK).min(k));
        let vend = k0 + (k1 - k0) / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut j = k0;
        while j < vend {
            let (x0, x1) = (load8(w0, j), load8(w1, j));
            for r in 0..MR {
                let v = load8(a, r * k + j);
                acc[r][0] = _mm256_fmadd_ps(v, x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(v, x1, acc[r][1]);
            }
            j += 8;
        }
        for r in 0..MR {
            let s_a = match a_s[r] {
                Some(s) => s[kb],
                None => 1.0,
            };
            for (c, (ws, w)) in [(ws0, w0), (ws1, w1)].into_iter().enumerate() {
                let s = s_a * ws[kb] * 256.0;
                tot[r][c] = _mm256_fmadd_ps(acc[r][c], _mm256_set1_ps(s), tot[r][c]);
                if vend < k1 {
                    let t: f32 = (vend..k1).map(|j| a[r * k + j] * w[j]).sum();
                    tail[r][c] += t * s;
                }
            }
        }
    }
    let mut out = [[0f32; 2]; MR];
    for r in 0..MR {
        for c in 0..2 {
            out[r][c] = hsum(tot[r][c]) + tail[r][c];
        }
    }
    out
}

/// Widens a micro-kernel result to 4 rows (the extra rows are never read).
fn pad<const MR: usize>(v: [[f32; 2]; MR]) -> [[f32; 2]; 4] {
    let mut out = [[0f32; 2]; 4];
    out[..MR].copy_from_slice(&v);
    out
}

/// `MR` (1..=4) activation rows against weight rows `n0..n1`, K a multiple of 128. Each
/// weight row is read once, 8 codes at a time, decoded in registers and multiplied into
/// all `MR` rows; every 128-block's sum is scaled into a vector total, so one horizontal
/// sum per output remains.
#[target_feature(enable = "avx2,fma,f16c")]
fn matvec<const MR: usize>(job: &Job<'_>, k: usize, m0: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    let kb_n = k / BLOCK;
    let nw = n1 - n0;
    let a: [&[f32]; MR] = std::array::from_fn(|r| &job.a.x[(m0 + r) * k..(m0 + r + 1) * k]);
    let w_scales = job.w.scale_inv();
    for n in n0..n1 {
        let wrow = &job.w.data()[n * k..(n + 1) * k];
        let mut total = [_mm256_setzero_ps(); MR];
        for (kb, (wblk, j0)) in wrow.chunks_exact(BLOCK).zip((0..k).step_by(BLOCK)).enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for (c, pair) in wblk.chunks_exact(16).enumerate() {
                let pair: &[u8; 16] = match pair.try_into() {
                    Ok(p) => p,
                    Err(_) => unreachable!("chunks_exact(16)"),
                };
                let (w0, w1) = decode16_div256(pair);
                for r in 0..MR {
                    acc[r][0] = _mm256_fmadd_ps(load8(a[r], j0 + c * 16), w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(load8(a[r], j0 + c * 16 + 8), w1, acc[r][1]);
                }
            }
            // x 256 undoes the decoder's 2^-8 (exact: a power of two).
            let ws = w_scales[(n / BLOCK) * kb_n + kb] * 256.0;
            for r in 0..MR {
                let s = match job.a.scales {
                    Some(sc) => sc[(m0 + r) * kb_n + kb] * ws,
                    None => ws,
                };
                total[r] = _mm256_fmadd_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_set1_ps(s), total[r]);
            }
        }
        for r in 0..MR {
            tile[r * nw + (n - n0)] = hsum(total[r]);
        }
    }
}
