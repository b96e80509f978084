//! The bf16 GEMM at 16 lanes, in groups of at most 4 activation rows (K a multiple of 32): the
//! weight rows of a task are streamed two at a time from far-apart places (row `i` with row
//! `i + half`), each with a software prefetch 2 KiB ahead, and widened to f32 in registers
//! (`bf16 << 16`). This is what `lm_head` and the router run on at decode; the autovectorised
//! AVX2 body reached about 56% of the read bandwidth on `lm_head` (see benches/results).

use crate::simd::avx512::{load16, store16};
use half::bf16;
use std::arch::x86_64::*;

/// Bytes ahead of the current position that each weight stream prefetches.
const PREFETCH_AHEAD: usize = 2048;

/// 32 bf16 values (one 64-byte line) widened to two vectors of 16 f32.
#[target_feature(enable = "avx512f,avx512bw")]
fn widen32(w: &[bf16; 32]) -> (__m512, __m512) {
    // SAFETY: `w` is a reference to 64 readable bytes; loadu has no alignment requirement.
    let (lo, hi) = unsafe { (_mm256_loadu_si256(w.as_ptr().cast()), _mm256_loadu_si256(w.as_ptr().add(16).cast())) };
    let f = |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
    (f(lo), f(hi))
}

/// `out[i * stride + r] = a[r] · w[n0 + i]` for the `rows` weight rows starting at `n0` (each
/// `k` long, `k % 32 == 0`), with `MR` activation rows `a[r]`.
#[target_feature(enable = "avx512f,avx512bw")]
fn matvec<const MR: usize>(a: [&[f32]; MR], w: &[bf16], k: usize, n0: usize, rows: usize, stride: usize, out: &mut [f32]) {
    let half = rows.div_ceil(2);
    for i in 0..half {
        let (p, q) = (n0 + i, n0 + i + half);
        if i + half < rows {
            let s = dots::<MR, 2>(&a, w, k, [p, q]);
            for r in 0..MR {
                out[i * stride + r] = s[r][0];
                out[(i + half) * stride + r] = s[r][1];
            }
        } else {
            let s = dots::<MR, 1>(&a, w, k, [p]);
            for r in 0..MR {
                out[i * stride + r] = s[r][0];
            }
        }
    }
}

/// [`matvec`] for 1 to 4 activation rows `a` (more are not read).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn matvec_rows(a: &[&[f32]], w: &[bf16], k: usize, n0: usize, rows: usize, stride: usize, out: &mut [f32]) {
    match a {
        [a0] => matvec::<1>([a0], w, k, n0, rows, stride, out),
        [a0, a1] => matvec::<2>([a0, a1], w, k, n0, rows, stride, out),
        [a0, a1, a2] => matvec::<3>([a0, a1, a2], w, k, n0, rows, stride, out),
        [a0, a1, a2, a3, ..] => matvec::<4>([a0, a1, a2, a3], w, k, n0, rows, stride, out),
        [] => {}
    }
}

/// `[r][c]`: activation row `r` against weight row `ns[c]`, over all of K.
#[target_feature(enable = "avx512f,avx512bw")]
fn dots<const MR: usize, const R: usize>(a: &[&[f32]; MR], w: &[bf16], k: usize, ns: [usize; R]) -> [[f32; R]; MR] {
    let mut acc = [[[_mm512_setzero_ps(); 2]; R]; MR];
    for j in (0..k).step_by(32) {
        for c in 0..R {
            let line: &[bf16; 32] = match w[ns[c] * k + j..ns[c] * k + j + 32].try_into() {
                Ok(l) => l,
                Err(_) => unreachable!("32 values"),
            };
            // The prefetch may point past the end of the weight: prefetches never fault.
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD).cast());
            let (w0, w1) = widen32(line);
            for r in 0..MR {
                acc[r][c][0] = _mm512_fmadd_ps(load16(&a[r][j..]), w0, acc[r][c][0]);
                acc[r][c][1] = _mm512_fmadd_ps(load16(&a[r][j + 16..]), w1, acc[r][c][1]);
            }
        }
    }
    let mut out = [[0f32; R]; MR];
    for r in 0..MR {
        for c in 0..R {
            out[r][c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]));
        }
    }
    out
}

/// Column granularity of [`vecmat`]: its register tiles are multiples of 64 columns.
pub(crate) const VECMAT_COLS: usize = 64;

/// `out[r][c] = Σ_e a[r][e] · w[e·cols + c]` (`w` is `[a[r].len(), cols]`, `cols % 64 == 0`):
/// the transposed product, `aᵀ W`, that the absorbed query needs (`W_UKᵀ q`). Register tiles of
/// `MR` rows × `16·NV` columns (`NV` even, `MR·NV <= 16` accumulators) run down the weight's
/// rows, reading a `32·NV`-byte strip of each with a prefetch 8 rows ahead; every output is
/// one fused multiply-add chain in the order of `e`, so a row's result does not depend on the
/// other rows of the call or on the tile width.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn vecmat<const MR: usize, const NV: usize>(a: [&[f32]; MR], w: &[bf16], cols: usize, mut out: [&mut [f32]; MR]) {
    let k = a[0].len();
    let tile = 16 * NV;
    let mut c0 = 0;
    while c0 < cols {
        if c0 + tile > cols {
            // The last columns in tiles of 64 (NV = 4 fits every MR).
            vecmat_tile::<MR, 4>(&a, w, k, cols, c0, &mut out);
            c0 += 64;
            continue;
        }
        vecmat_tile::<MR, NV>(&a, w, k, cols, c0, &mut out);
        c0 += tile;
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
fn vecmat_tile<const MR: usize, const NV: usize>(
    a: &[&[f32]; MR],
    w: &[bf16],
    k: usize,
    cols: usize,
    c0: usize,
    out: &mut [&mut [f32]; MR],
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for e in 0..k {
        let row = &w[e * cols + c0..e * cols + c0 + 16 * NV];
        let mut wv = [_mm512_setzero_ps(); NV];
        for p in 0..NV / 2 {
            // Each 64-byte line of the strip 8 rows ahead; the prefetch may point past the end
            // of the weight: prefetches never fault.
            _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(8 * cols + 32 * p).cast());
            let line: &[bf16; 32] = match row[32 * p..32 * p + 32].try_into() {
                Ok(l) => l,
                Err(_) => unreachable!("32 values"),
            };
            (wv[2 * p], wv[2 * p + 1]) = widen32(line);
        }
        for r in 0..MR {
            let x = _mm512_set1_ps(a[r][e]);
            for v in 0..NV {
                acc[r][v] = _mm512_fmadd_ps(x, wv[v], acc[r][v]);
            }
        }
    }
    for r in 0..MR {
        for v in 0..NV {
            store16(&mut out[r][c0 + 16 * v..], acc[r][v]);
        }
    }
}
