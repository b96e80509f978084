//! The attention core shared by decode and prefill: one key block against a group of query
//! rows (a flash-attention step), in register tiles with an online softmax.

use super::{CT, HB, JT, KB, QB};
use crate::act::exp_fast;
use crate::cpu::dispatch;

// Query rows are padded to a multiple of `HB` (padding rows see no key and are never read), so
// every register tile has `HB` real rows. The tiles read their inputs through fixed-size array
// references and write their accumulators element by element: the form LLVM's SLP vectoriser
// turns into packed FMAs (with `copy_from_slice` stores, or the three phases fused into one
// function, it falls back to scalar code).

const _: () = assert!(HB == 4 && QB.is_multiple_of(HB) && KB.is_multiple_of(JT));

/// One key block of the attention core: up to [`KB`] keys against the query rows (the heads
/// of one token in decode, up to [`QB`] tokens of one head in prefill).
pub(super) struct Block<'a> {
    /// Queries transposed per tile of [`HB`] rows: `[tiles][d][HB]`.
    pub(super) qt: &'a [f32],
    /// Key `j` is `k1[j·k1_stride ..][..d1]` followed by `k2[j·k2_stride ..][..d - d1]` (decode:
    /// the whole cached row in `k1`; prefill: `k_nope` of the head, then the shared `k_pe`).
    pub(super) k1: &'a [f32],
    pub(super) k1_stride: usize,
    pub(super) d1: usize,
    pub(super) k2: &'a [f32],
    pub(super) k2_stride: usize,
    /// Query/key width.
    pub(super) d: usize,
    /// Keys in the block.
    pub(super) nk: usize,
    /// Value row `j` is `v[j·v_stride ..][..dv]`.
    pub(super) v: &'a [f32],
    pub(super) v_stride: usize,
    pub(super) dv: usize,
    /// Per (padded) query row: keys `j < vis[r]` of the block are visible (`vis[r] <= nk`;
    /// 0 for padding rows). Its length is the padded row count.
    pub(super) vis: &'a [usize],
    pub(super) scale: f32,
}

/// Online-softmax state of the (padded) query rows: running max `m`, sum `l`, unnormalised
/// output `o [rows, dv]`, and the block's scores, one `HB × KB` array per tile.
pub(super) struct State<'a> {
    pub(super) m: &'a mut [f32],
    pub(super) l: &'a mut [f32],
    pub(super) o: &'a mut [f32],
    pub(super) s: &'a mut [[[f32; KB]; HB]],
}

/// Whether any row of tile `g` sees a key of the block.
#[inline(always)]
pub(super) fn tile_live(vis: &[usize], g: usize) -> bool {
    vis[g * HB..(g + 1) * HB].iter().any(|&n| n > 0)
}

/// Scores of one register tile: `s[r][jt·JT + j] = Σ_c qt[c·HB + r] · kt[c·JT + j]` (`qt` is
/// one tile's `[d][HB]` queries, `kt` the panel's `[d][JT]` keys): one broadcast query value
/// times 16 consecutive keys per FMA, `HB × JT` accumulators in registers.
#[inline(always)]
#[allow(clippy::manual_memcpy)] // element stores, not a memcpy: see the section comment
pub(super) fn qk_tile(qt: &[f32], kt: &[f32], jt: usize, s: &mut [[f32; KB]; HB]) {
    let mut acc = [[0f32; JT]; HB];
    for (qc, krow) in qt.chunks_exact(HB).zip(kt.chunks_exact(JT)) {
        let (Some(q), Some(k)) = (qc.first_chunk::<HB>(), krow.first_chunk::<JT>()) else { return };
        for r in 0..HB {
            for j in 0..JT {
                acc[r][j] = q[r].mul_add(k[j], acc[r][j]);
            }
        }
    }
    for r in 0..HB {
        if let Some(dst) = s[r][jt * JT..].first_chunk_mut::<JT>() {
            for j in 0..JT {
                dst[j] = acc[r][j];
            }
        }
    }
}

/// The `[CT]` columns at `c0` of the `HB` rows of `o` (`[HB, dv]`).
#[inline(always)]
pub(super) fn tile_rows(o: &mut [f32], dv: usize, c0: usize) -> Option<[&mut [f32; CT]; HB]> {
    let mut it = o.chunks_exact_mut(dv).map(|r| r.get_mut(c0..).and_then(|x| x.first_chunk_mut::<CT>()));
    Some([it.next()??, it.next()??, it.next()??, it.next()??])
}

/// `o[r, c0..c0+CT] += Σ_{j < nk} p[r][j] · V_j[c0..c0+CT]` for one tile (`o` is its
/// `[HB, dv]` rows): `HB × CT` accumulators in registers.
#[inline(always)]
fn pv_tile(b: &Block<'_>, p: &[[f32; KB]; HB], c0: usize, o: &mut [f32]) {
    let Some(rows) = tile_rows(o, b.dv, c0) else { return };
    let mut acc = [[0f32; CT]; HB];
    for r in 0..HB {
        for c in 0..CT {
            acc[r][c] = rows[r][c];
        }
    }
    for j in 0..b.nk.min(KB) {
        let Some(vj) = b.v.get(j * b.v_stride + c0..).and_then(|x| x.first_chunk::<CT>()) else { break };
        for r in 0..HB {
            let pr = p[r][j];
            for c in 0..CT {
                acc[r][c] = pr.mul_add(vj[c], acc[r][c]);
            }
        }
    }
    for r in 0..HB {
        for c in 0..CT {
            rows[r][c] = acc[r][c];
        }
    }
}

/// Online-softmax step of one query row: scale, mask keys `j >= n`, `exp(s - m_new)`, update
/// `(m, l)`, rescale the row's output by `exp(m_old - m_new)`. A row that has seen no key yet
/// gets `p = 0` and keeps its state.
/// Max and sum run over [`JT`] independent lanes so that they vectorise.
#[inline(always)]
fn softmax_row(sr: &mut [f32; KB], n: usize, scale: f32, m: &mut f32, l: &mut f32, o: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; JT];
    for (jc, c) in sr.chunks_exact_mut(JT).enumerate() {
        for (i, v) in c.iter_mut().enumerate() {
            *v = if jc * JT + i < n { *v * scale } else { f32::NEG_INFINITY };
            mx[i] = mx[i].max(*v);
        }
    }
    let m_new = mx.iter().fold(*m, |a, &b| a.max(b));
    if m_new == f32::NEG_INFINITY {
        sr.fill(0.0);
        return;
    }
    let alpha = exp_fast(*m - m_new);
    let mut sums = [0f32; JT];
    for c in sr.chunks_exact_mut(JT) {
        for (i, v) in c.iter_mut().enumerate() {
            *v = exp_fast(*v - m_new);
            sums[i] += *v;
        }
    }
    let sum: f32 = sums.iter().sum();
    *l = *l * alpha + sum;
    *m = m_new;
    if alpha != 1.0 {
        for x in o.iter_mut() {
            *x *= alpha;
        }
    }
}

/// Phase 1 of a block: key panel `jt` ([`JT`] keys) transposed into `kt [d][JT]` (`d · 64`
/// bytes, written and then read from L1), and its scores against every live tile.
#[inline(always)]
fn qk_panel_body(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) {
    let (j0, d2) = (jt * JT, b.d - b.d1);
    for j in 0..JT.min(b.nk.saturating_sub(j0)) {
        let r1 = &b.k1[(j0 + j) * b.k1_stride..(j0 + j) * b.k1_stride + b.d1];
        for (c, &x) in r1.iter().enumerate() {
            kt[c * JT + j] = x;
        }
        let r2 = &b.k2[(j0 + j) * b.k2_stride..(j0 + j) * b.k2_stride + d2];
        for (c, &x) in r2.iter().enumerate() {
            kt[(b.d1 + c) * JT + j] = x;
        }
    }
    for (g, sg) in s.iter_mut().enumerate() {
        if tile_live(b.vis, g) {
            qk_tile(&b.qt[g * b.d * HB..(g + 1) * b.d * HB], &kt[..b.d * JT], jt, sg);
        }
    }
}

/// Phase 2: the online-softmax step of every row.
#[inline(always)]
fn softmax_rows_body(b: &Block<'_>, st: &mut State<'_>) {
    let (nk, dv) = (b.nk.min(KB), b.dv);
    for (r, &vis) in b.vis.iter().enumerate() {
        softmax_row(&mut st.s[r / HB][r % HB], vis.min(nk), b.scale, &mut st.m[r], &mut st.l[r], &mut st.o[r * dv..(r + 1) * dv]);
    }
}

/// Phase 3: `o += P·V` for the [`CT`]-column strip at `c0` (`nk · 64` bytes of `V`, kept in
/// L1) and every live tile.
#[inline(always)]
fn pv_strip_body(b: &Block<'_>, c0: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) {
    for ((g, p), og) in s.iter().enumerate().zip(o.chunks_exact_mut(HB * b.dv)) {
        if tile_live(b.vis, g) {
            pv_tile(b, p, c0, og);
        }
    }
}

dispatch!(fn qk_panel(b: &Block<'_>, jt: usize, kt: &mut [f32], s: &mut [[[f32; KB]; HB]]) = qk_panel_body;);
dispatch!(fn softmax_rows(b: &Block<'_>, st: &mut State<'_>) = softmax_rows_body;);
dispatch!(fn pv_strip(b: &Block<'_>, c0: usize, s: &[[[f32; KB]; HB]], o: &mut [f32]) = pv_strip_body;);

/// One key block for all query rows (a flash-attention step), ordered for cache reuse: scores
/// panel by panel ([`qk_panel`]), the online softmax ([`softmax_rows`]), then `o += P·V` strip
/// by strip ([`pv_strip`]); leftover columns (`dv % CT`) in scalar code. `kt` is a `[d][JT]`
/// scratch. With AVX-512 the scores and `P·V` run on wider register tiles (`avx512.rs`).
pub(super) fn attend_block(b: &Block<'_>, st: &mut State<'_>, kt: &mut [f32]) {
    let (rows, nk, dv) = (b.vis.len(), b.nk.min(KB), b.dv);
    let tiles = rows / HB;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::isa_level() == crate::cpu::IsaLevel::Avx512 {
        for jt in 0..nk.div_ceil(JT) {
            // SAFETY: the CPU was checked at run time to have avx512f, avx512bw, avx2 and fma.
            unsafe { super::avx512::qk_panel(b, jt, kt, &mut st.s[..tiles]) };
        }
        softmax_rows(b, st);
        let c1 = dv - dv % super::avx512::PV_COLS;
        // SAFETY: as above.
        unsafe { super::avx512::pv(b, c1, &st.s[..tiles], st.o) };
        attend_rest(b, st, c1);
        return;
    }
    for jt in 0..nk.div_ceil(JT) {
        qk_panel(b, jt, kt, &mut st.s[..tiles]);
    }
    softmax_rows(b, st);
    let mut c0 = 0;
    while c0 + CT <= dv {
        pv_strip(b, c0, &st.s[..tiles], st.o);
        c0 += CT;
    }
    attend_rest(b, st, c0);
}

/// `o += P·V` for the columns `c0..dv` in scalar code.
fn attend_rest(b: &Block<'_>, st: &mut State<'_>, c0: usize) {
    let (rows, nk, dv) = (b.vis.len(), b.nk.min(KB), b.dv);
    for c in c0..dv {
        for r in 0..rows {
            let p = &st.s[r / HB][r % HB];
            let mut a = st.o[r * dv + c];
            for j in 0..nk {
                a = p[j].mul_add(b.v[j * b.v_stride + c], a);
            }
            st.o[r * dv + c] = a;
        }
    }
}

/// Query rows `row(r)` (`r < rows`, padded to a multiple of [`HB`] by repeating the last) into
/// the per-tile transposed layout `[tiles][d][HB]`.
pub(super) fn transpose_queries<'a>(rows: usize, d: usize, row: impl Fn(usize) -> &'a [f32]) -> Vec<f32> {
    let tiles = rows.div_ceil(HB);
    let mut qt = vec![0f32; tiles * d * HB];
    for g in 0..tiles {
        for r in 0..HB {
            let src = row((g * HB + r).min(rows - 1));
            for c in 0..d {
                qt[(g * d + c) * HB + r] = src[c];
            }
        }
    }
    qt
}
