//! The AVX2 + FMA kernels: the matrix-vector path (chunks of at most 4 rows, K a multiple of
//! 128) and the tile path, with one summation order. Per (row, weight row) and 128-block: one
//! 8-lane accumulator over K in order (lane `l` sums offsets `8c + l`, c = 0..16, fused
//! multiply-adds from zero), promoted into an 8-lane total by one FMA with
//! `promotion` (tile.rs); one horizontal sum at the end. A ragged K (tile path only) sums the
//! last values of each block that do not fill 8 lanes in scalar code and adds them last.

use super::cpu::Job;
use super::tile::{promotion, row_scale, weight_promotion};
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

/// See `core_tile` (tile.rs). Up to 4 rows of A and K a multiple of 128: the matrix-vector
/// path, which streams each weight row once and decodes it in registers. More rows: rows
/// of A are taken 4 at a time against 2 weight rows of a decoded L1 tile ([`micro`]), so
/// each loaded vector feeds several FMAs. Both sum in the order of the module docs.
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
    let mut i = 0;
    while i < rows {
        let mr = (rows - i).min(4);
        let mut n = 0;
        while n < nw {
            // With one weight row left, row 0 stands in for row 1 and its sums are unused.
            let nr = (nw - n).min(2);
            let w0 = &wt[n * k..(n + 1) * k];
            let w1 = if nr == 2 { &wt[(n + 1) * k..(n + 2) * k] } else { w0 };
            let ns = [n0 + n, n0 + n + nr - 1];
            let out: [[f32; 2]; 4] = match mr {
                4 => micro::<4>(job, k, m0 + i, ns, w0, w1),
                3 => pad(micro::<3>(job, k, m0 + i, ns, w0, w1)),
                2 => pad(micro::<2>(job, k, m0 + i, ns, w0, w1)),
                _ => pad(micro::<1>(job, k, m0 + i, ns, w0, w1)),
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

/// The register-blocked kernel: `MR` activation rows from `m` against weight rows `ns`
/// (decoded: `w0`, `w1`) over all of K. Each 128-block is summed in `MR x 2` vector
/// accumulators (8 values per step, in K order: the matrix-vector path's order), then
/// promoted into vector totals; one horizontal sum per output at the end. A ragged end
/// (fewer than 8 values) is summed in scalar code and added last.
#[target_feature(enable = "avx2,fma,f16c")]
fn micro<const MR: usize>(job: &Job<'_>, k: usize, m: usize, ns: [usize; 2], w0: &[f32], w1: &[f32]) -> [[f32; 2]; MR] {
    let a = &job.a.x[m * k..];
    let kb_n = blocks(k);
    let mut tot = [[_mm256_setzero_ps(); 2]; MR];
    let mut tail = [[0f32; 2]; MR];
    for kb in 0..kb_n {
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
        let ws = ns.map(|n| weight_promotion(job, n, kb, kb_n));
        for r in 0..MR {
            let sa = row_scale(job, m + r, kb, kb_n);
            for (c, w) in [w0, w1].into_iter().enumerate() {
                let s = promotion(sa, ws[c]);
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
            // Only a ragged K has a tail (adding a zero would turn a -0 into +0).
            out[r][c] = if k.is_multiple_of(8) { hsum(tot[r][c]) } else { hsum(tot[r][c]) + tail[r][c] };
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
/// weight row is read once, 16 codes at a time, decoded in registers and multiplied into
/// all `MR` rows: per 128-block one 8-lane accumulator (K in order, [`micro`]'s order),
/// promoted into an 8-lane total; one horizontal sum per output at the end.
#[target_feature(enable = "avx2,fma,f16c")]
fn matvec<const MR: usize>(job: &Job<'_>, k: usize, m0: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    let kb_n = k / BLOCK;
    let nw = n1 - n0;
    let a: [&[f32]; MR] = std::array::from_fn(|r| &job.a.x[(m0 + r) * k..(m0 + r + 1) * k]);
    for n in n0..n1 {
        let wrow = &job.w.data()[n * k..(n + 1) * k];
        let mut total = [_mm256_setzero_ps(); MR];
        for (kb, (wblk, j0)) in wrow.chunks_exact(BLOCK).zip((0..k).step_by(BLOCK)).enumerate() {
            let mut acc = [_mm256_setzero_ps(); MR];
            for (c, pair) in wblk.chunks_exact(16).enumerate() {
                let pair: &[u8; 16] = match pair.try_into() {
                    Ok(p) => p,
                    Err(_) => unreachable!("chunks_exact(16)"),
                };
                let (w0, w1) = decode16_div256(pair);
                for r in 0..MR {
                    acc[r] = _mm256_fmadd_ps(load8(a[r], j0 + c * 16), w0, acc[r]);
                    acc[r] = _mm256_fmadd_ps(load8(a[r], j0 + c * 16 + 8), w1, acc[r]);
                }
            }
            let ws = weight_promotion(job, n, kb, kb_n);
            for r in 0..MR {
                let s = promotion(row_scale(job, m0 + r, kb, kb_n), ws);
                total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(s), total[r]);
            }
        }
        for r in 0..MR {
            tile[r * nw + (n - n0)] = hsum(total[r]);
        }
    }
}
