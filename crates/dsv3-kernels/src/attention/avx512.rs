//! The attention core's two products at 16 lanes, on the layouts of the portable phases:
//! scores for four tiles (16 query rows) x one key panel of [`JT`] keys at a time (16
//! accumulators, one broadcast query value per FMA), and `P·V` for one tile x 64 value
//! columns (16 accumulators, four value loads and four broadcast probabilities per 16 FMAs).
//! Every score and output element is one FMA chain in the order of the portable code's.

use super::core::{Block, qk_tile, tile_live};
use super::{HB, JT, KB};
use crate::simd::avx512::{load16, store16, transpose16};
use std::arch::x86_64::*;

/// Value columns per `P·V` register tile.
pub(super) const PV_COLS: usize = 64;

/// [`super::core`]'s `qk_panel_body` with the tiles taken four at a time.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
pub(super) fn qk_panel(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) {
    let (j0, d2) = (jt * JT, b.d - b.d1);
    let nj = JT.min(b.nk.saturating_sub(j0));
    for (src, stride, width, c_off) in [(b.k1, b.k1_stride, b.d1, 0), (b.k2, b.k2_stride, d2, b.d1)] {
        if width.is_multiple_of(16) {
            // 16 x 16 blocks transposed in registers (keys past `nj` repeat key 0; their
            // scores are masked by the softmax).
            let rows: [&[f32]; JT] = std::array::from_fn(|j| {
                let j = if j < nj { j } else { 0 };
                &src[(j0 + j) * stride..(j0 + j) * stride + width]
            });
            for c0 in (0..width).step_by(16) {
                let t = transpose16(std::array::from_fn(|j| load16(&rows[j][c0..])));
                for (e, v) in t.iter().enumerate() {
                    store16(&mut kt[(c_off + c0 + e) * JT..], *v);
                }
            }
        } else {
            for j in 0..nj {
                let r = &src[(j0 + j) * stride..(j0 + j) * stride + width];
                for (c, &x) in r.iter().enumerate() {
                    kt[(c_off + c) * JT + j] = x;
                }
            }
        }
    }
    let kt = &kt[..b.d * JT];
    let tiles = s.len();
    let mut g = 0;
    while g + 4 <= tiles {
        if (g..g + 4).any(|t| tile_live(b.vis, t)) {
            let q = &b.qt[g * b.d * HB..(g + 4) * b.d * HB];
            let acc = scores4(q, kt, b.d);
            for (t, st) in s[g..g + 4].iter_mut().enumerate() {
                for r in 0..HB {
                    store16(&mut st[r][jt * JT..jt * JT + JT], acc[t * HB + r]);
                }
            }
        }
        g += 4;
    }
    for (t, st) in s.iter_mut().enumerate().skip(g) {
        if tile_live(b.vis, t) {
            qk_tile(&b.qt[t * b.d * HB..(t + 1) * b.d * HB], kt, jt, st);
        }
    }
}

/// `acc[t·4 + r][j] = Σ_c q[(t·d + c)·4 + r] · kt[c·16 + j]` for four tiles `t`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn scores4(q: &[f32], kt: &[f32], d: usize) -> [__m512; 16] {
    let mut acc = [_mm512_setzero_ps(); 16];
    let qs = |t: usize| q[t * d * HB..(t + 1) * d * HB].chunks_exact(HB);
    let rows = kt.chunks_exact(JT).zip(qs(0)).zip(qs(1)).zip(qs(2)).zip(qs(3));
    for ((((k, q0), q1), q2), q3) in rows {
        let kv = load16(k);
        for (t, qc) in [q0, q1, q2, q3].into_iter().enumerate() {
            for r in 0..HB {
                acc[t * HB + r] = _mm512_fmadd_ps(_mm512_set1_ps(qc[r]), kv, acc[t * HB + r]);
            }
        }
    }
    acc
}

/// `o += P·V` over the columns `0..c1` (`c1 % 64 == 0`) of every live tile.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
pub(super) fn pv(b: &Block<'_>, c1: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) {
    let nk = b.nk.min(KB);
    for c0 in (0..c1).step_by(PV_COLS) {
        for ((g, p), og) in s.iter().enumerate().zip(o.chunks_exact_mut(HB * b.dv)) {
            if !tile_live(b.vis, g) {
                continue;
            }
            let mut acc = [[_mm512_setzero_ps(); 4]; HB];
            for r in 0..HB {
                for v in 0..4 {
                    acc[r][v] = load16(&og[r * b.dv + c0 + 16 * v..]);
                }
            }
            for j in 0..nk {
                let Some(vj) = b.v.get(j * b.v_stride + c0..j * b.v_stride + c0 + PV_COLS) else { break };
                let x: [__m512; 4] = std::array::from_fn(|v| load16(&vj[16 * v..]));
                for r in 0..HB {
                    let pr = _mm512_set1_ps(p[r][j]);
                    for v in 0..4 {
                        acc[r][v] = _mm512_fmadd_ps(pr, x[v], acc[r][v]);
                    }
                }
            }
            for r in 0..HB {
                for v in 0..4 {
                    store16(&mut og[r * b.dv + c0 + 16 * v..], acc[r][v]);
                }
            }
        }
    }
}
