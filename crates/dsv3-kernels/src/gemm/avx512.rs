//! The AVX-512 kernels: the matrix-vector path (chunks of at most 4 rows, K a multiple of
//! 128), the row-tile path (9 to 63 rows, K a multiple of 128) and the outer-product tile path,
//! with one summation order. Per (row, weight row) and 128-block: 16 partial sums, one per K
//! residue `l` (offsets `16c + l`, c = 0..8 in order, fused multiply-adds from zero), each
//! promoted into its own total by one FMA with `promotion` (tile.rs); the 16 totals are then
//! added in the fixed tree of [`hsum16`]. The matrix-vector and row-tile paths keep the 16
//! residues in the lanes of one vector ([`matvec`], [`row_tile`]); the tile path keeps 16
//! activation rows in the lanes and runs the residues one after another ([`tile`]). Codes are
//! decoded with one widening load, a shift pair and a mask into f16, then two 16-lane F16C
//! conversions.

use super::cpu::Job;
use super::tile::{ATiles, Scratch, promotion, row_scale, weight_promotion};
use crate::fp8::{BLOCK, blocks, decode_fast};
use crate::simd::avx512::{load16, store16, transpose16};
use std::arch::x86_64::*;

/// Bytes ahead of the current weight block that the matrix-vector path prefetches.
const PREFETCH_AHEAD: usize = 2048;

/// Decodes 32 codes to 2 x 16 f32, divided by 256 (see `avx2::decode16_div256`).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn decode32_div256(bytes: &[u8; 32]) -> (__m512, __m512) {
    // SAFETY: `bytes` is a reference to 32 readable bytes; loadu has no alignment needs.
    let raw = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) };
    let x = _mm512_cvtepu8_epi16(raw);
    let h = _mm512_and_si512(_mm512_srai_epi16::<1>(_mm512_slli_epi16::<8>(x)), _mm512_set1_epi16(0xBF80u16 as i16));
    (_mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)))
}

/// The sum of the 16 lanes in a fixed tree: lane `l` with `l + 8`, then with `l + 4`,
/// `l + 2`, `l + 1` (the tile path adds its 16 residue totals in the same tree).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn hsum16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// [`hsum16`]'s tree over 16 vectors: `out` lane `r` = the tree sum of `t[0..16]` lane `r`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn tree16(t: [__m512; 16]) -> __m512 {
    let s8: [__m512; 8] = std::array::from_fn(|i| _mm512_add_ps(t[i], t[i + 8]));
    let s4: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(s8[i], s8[i + 4]));
    let s2: [__m512; 2] = std::array::from_fn(|i| _mm512_add_ps(s4[i], s4[i + 2]));
    _mm512_add_ps(s2[0], s2[1])
}

/// `dst[(l·qn + q)·16 + r] = rows[r][16q + l]` for `q < whole` (rows past `rows.len()`, at
/// most 16, as zeros): 16 x 16 register transposes into [`ATiles`]'s layout.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) fn split16(rows: &[&[f32]], whole: usize, qn: usize, dst: &mut [f32]) {
    let zero = [0f32; 16];
    for q in 0..whole {
        let r: [__m512; 16] = std::array::from_fn(|i| match rows.get(i) {
            Some(row) => load16(&row[16 * q..]),
            None => load16(&zero),
        });
        for (l, v) in transpose16(r).iter().enumerate() {
            store16(&mut dst[(l * qn + q) * 16..], *v);
        }
    }
}

/// Rows `m0..m1` (at most 4) of the activation against weight rows `n0..n1`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(super) fn matvec(job: &Job<'_>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    match m1 - m0 {
        1 => rows::<1>(job, k, m0, n0, n1, tile),
        2 => rows::<2>(job, k, m0, n0, n1, tile),
        3 => rows::<3>(job, k, m0, n0, n1, tile),
        _ => rows::<4>(job, k, m0, n0, n1, tile),
    }
}

/// Weight rows `n0..n1` in two halves streamed side by side (row `n` with row `n + half`):
/// two independent DRAM streams per core keep more lines in flight than one (a plain f32
/// dot product measured 22 GB/s with two streams against 18 GB/s with one, on 2 cores).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn rows<const MR: usize>(job: &Job<'_>, k: usize, m0: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    let nw = n1 - n0;
    let a: [&[f32]; MR] = std::array::from_fn(|r| &job.a.x[(m0 + r) * k..(m0 + r + 1) * k]);
    let half = nw.div_ceil(2);
    for i in 0..half {
        let (n, m) = (n0 + i, n0 + i + half);
        if m < n1 {
            let s = row_group::<MR, 2>(job, k, m0, [n, m], &a);
            for r in 0..MR {
                tile[r * nw + i] = s[r][0];
                tile[r * nw + i + half] = s[r][1];
            }
        } else {
            let s = row_group::<MR, 1>(job, k, m0, [n], &a);
            for r in 0..MR {
                tile[r * nw + i] = s[r][0];
            }
        }
    }
}

/// `[r][c]`: activation row `m0 + r` against weight row `ns[c]`, over all of K.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn row_group<const MR: usize, const R: usize>(job: &Job<'_>, k: usize, m0: usize, ns: [usize; R], a: &[&[f32]; MR]) -> [[f32; R]; MR] {
    let kb_n = k / BLOCK;
    let data = job.w.data();
    let mut total = [[_mm512_setzero_ps(); R]; MR];
    for kb in 0..kb_n {
        let j0 = kb * BLOCK;
        let mut acc = [[_mm512_setzero_ps(); R]; MR];
        for c in 0..R {
            let blk = &data[ns[c] * k + j0..ns[c] * k + j0 + BLOCK];
            // The hardware streamer restarts at each 4 KiB page; a software prefetch 2 KiB
            // ahead keeps each stream of FP8 codes going (measured: +25-50%).
            let p = blk.as_ptr().wrapping_add(PREFETCH_AHEAD);
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
            for q in 0..BLOCK / 32 {
                let quad: &[u8; 32] = match blk[q * 32..q * 32 + 32].try_into() {
                    Ok(q) => q,
                    Err(_) => unreachable!("32 bytes"),
                };
                let (w0, w1) = decode32_div256(quad);
                for r in 0..MR {
                    acc[r][c] = _mm512_fmadd_ps(load16(&a[r][j0 + q * 32..]), w0, acc[r][c]);
                    acc[r][c] = _mm512_fmadd_ps(load16(&a[r][j0 + q * 32 + 16..]), w1, acc[r][c]);
                }
            }
        }
        for c in 0..R {
            let ws = weight_promotion(job, ns[c], kb, kb_n);
            for r in 0..MR {
                let s = _mm512_set1_ps(promotion(row_scale(job, m0 + r, kb, kb_n), ws));
                total[r][c] = _mm512_fmadd_ps(acc[r][c], s, total[r][c]);
            }
        }
    }
    let mut out = [[0f32; R]; MR];
    for r in 0..MR {
        for c in 0..R {
            out[r][c] = hsum16(total[r][c]);
        }
    }
    out
}

/// 128-blocks of K whose decoded weights [`tile`] holds at once (for 64 weight rows:
/// 256 KiB, L2).
const CHUNK_BLOCKS: usize = 8;

/// The tile path at 16 lanes (more than `AVX512_MATVEC_ROWS` (tile.rs) activation rows, or a
/// ragged K), in outer-product form over residues. The sums of the module docs split into
/// 16 independent ones, one per K residue `l`, each an outer product with 16 activation
/// rows in the lanes ([`ATiles`], split by residue). K is taken in chunks of
/// [`CHUNK_BLOCKS`] blocks: the task's weight rows are decoded and split by residue into
/// `wt [nw][16][chunk · 8]` (units of 2^-8, zeros past a ragged end; 16 x 16 register
/// transposes); then for each residue in turn, block by block, register tiles of 4 weight
/// rows x 64 activation rows (4 vector loads and 4 broadcast weights feed 16 FMAs per step;
/// 8 x 32 or 8 x 16 for the last groups) sum the block's 8 products of that residue and
/// promote them into the residue's totals `tot [16][nw][rows]` (the residue's 16 KiB stay in
/// L1 through its pass). At the end each output adds its 16 totals in [`tree16`].
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the tile's rectangle is four plain indices
pub(super) fn tile(
    job: &Job<'_>,
    at: &ATiles,
    k: usize,
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    scratch: &mut Scratch,
    tile: &mut [f32],
) {
    let (nw, kb_n) = (n1 - n0, blocks(k));
    // Row groups of 16 (m0 is a multiple of 16: MC is).
    let (g0, g1) = (m0 / 16, m1.div_ceil(16));
    let rp = (g1 - g0) * 16;
    let cw = CHUNK_BLOCKS * BLOCK / 16;
    // Totals of the padded width (register tiles of up to 4 weight rows); the padding is
    // never read.
    let nwp = nw.next_multiple_of(4);
    let (tot, wt) = scratch.take(16 * nwp * rp, nw * 16 * cw + nw * CHUNK_BLOCKS);
    let (wt, ws) = wt.split_at_mut(nw * 16 * cw);
    for kc in (0..kb_n).step_by(CHUNK_BLOCKS) {
        let nb = (kb_n - kc).min(CHUNK_BLOCKS);
        for (c, (dst, w)) in wt.chunks_exact_mut(16 * cw).zip(ws.chunks_exact_mut(CHUNK_BLOCKS)).enumerate() {
            let n = n0 + c;
            split_weights(&job.w.data()[n * k..(n + 1) * k], kc, nb, dst);
            for (b, w) in w.iter_mut().enumerate().take(nb) {
                *w = weight_promotion(job, n, kc + b, kb_n);
            }
        }
        for l in 0..16 {
            let mut g = g0;
            while g < g1 {
                let p = Pass { at, wt, ws, tot: l * nwp * rp, kb_n, kc, nb, cw, l, nw, g0, g, rp };
                g += match g1 - g {
                    1 => p.run::<4, 1>(tot),
                    2 | 3 => p.run::<4, 2>(tot),
                    _ => p.run::<4, 4>(tot),
                };
            }
        }
    }
    let off = m0 - g0 * 16;
    let mut out = [0f32; 16];
    for c in 0..nw {
        for v in 0..g1 - g0 {
            let t: [__m512; 16] = std::array::from_fn(|l| load16(&tot[(l * nwp + c) * rp + v * 16..]));
            store16(&mut out, tree16(t));
            for (i, &o) in out.iter().enumerate() {
                let r = v * 16 + i;
                if r >= off && r - off < m1 - m0 {
                    tile[(r - off) * nw + c] = o;
                }
            }
        }
    }
}

/// Codes of blocks `kc..kc + nb` of one weight row (`row`, all of K), decoded (units of
/// 2^-8) and split by residue: `dst[l · cw + 8b + c]` = column `128 (kc + b) + 16c + l`
/// (`cw = CHUNK_BLOCKS · 8`), zeros past the row's end. Two blocks (16 vectors of 16
/// columns) per 16 x 16 register transpose.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn split_weights(row: &[u8], kc: usize, nb: usize, dst: &mut [f32]) {
    let cw = dst.len() / 16;
    for b0 in (0..nb).step_by(2) {
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            let kb = kc + b0 + h;
            if b0 + h >= nb {
                continue;
            }
            let (k0, k1) = (kb * BLOCK, ((kb + 1) * BLOCK).min(row.len()));
            if let Ok(codes) = <&[u8; BLOCK]>::try_from(&row[k0..k1]) {
                // A whole block: decoded in registers, 32 codes at a time.
                for q in 0..BLOCK / 32 {
                    let quad: &[u8; 32] = match codes[32 * q..32 * q + 32].try_into() {
                        Ok(c) => c,
                        Err(_) => unreachable!("32 codes"),
                    };
                    (v[8 * h + 2 * q], v[8 * h + 2 * q + 1]) = decode32_div256(quad);
                }
            } else {
                let mut buf = [0f32; BLOCK];
                decode_block(&row[k0..k1], &mut buf);
                for c in 0..8 {
                    v[8 * h + c] = load16(&buf[16 * c..]);
                }
            }
        }
        for (l, x) in transpose16(v).iter().enumerate() {
            // Lanes 0..8: block b0, 8..16: block b0 + 1 (past the chunk: zeros, unused).
            let at = l * cw + b0 * 8;
            if b0 + 1 < nb {
                store16(&mut dst[at..], *x);
            } else {
                let mut t = [0f32; 16];
                store16(&mut t, *x);
                dst[at..at + 8].copy_from_slice(&t[..8]);
            }
        }
    }
}

/// Codes of one (possibly ragged) block into `dst [128]`, in units of 2^-8, zeros past the
/// codes.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn decode_block(src: &[u8], dst: &mut [f32; BLOCK]) {
    let mut codes = src.chunks_exact(32);
    for (c, d) in (&mut codes).zip(dst.chunks_exact_mut(32)) {
        let c: &[u8; 32] = match c.try_into() {
            Ok(c) => c,
            Err(_) => unreachable!("chunks_exact(32)"),
        };
        let (lo, hi) = decode32_div256(c);
        store16(d, lo);
        store16(&mut d[16..], hi);
    }
    let done = src.len() - codes.remainder().len();
    for (d, &b) in dst[done..src.len()].iter_mut().zip(codes.remainder()) {
        *d = decode_fast(b) * (1.0 / 256.0);
    }
    dst[src.len()..].fill(0.0);
}

/// Residue `l` of the chunk's blocks for the row groups `g..g + MV` of [`tile`]: per group
/// of `NR` weight rows, block after block, [`outer`] over the block's 8 columns of that
/// residue and the promotion into the residue's totals `tot[self.tot..][nw][rp]`.
struct Pass<'a> {
    at: &'a ATiles,
    wt: &'a [f32],
    ws: &'a [f32],
    /// Start of the residue's totals in `tot`.
    tot: usize,
    kb_n: usize,
    /// First block of the chunk, and its blocks.
    kc: usize,
    nb: usize,
    cw: usize,
    l: usize,
    nw: usize,
    g0: usize,
    g: usize,
    rp: usize,
}

impl Pass<'_> {
    /// Returns `MV`, the row groups done.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn run<const NR: usize, const MV: usize>(&self, tot: &mut [f32]) -> usize {
        let (g, qn, nb) = (self.g, self.at.qn, self.nb);
        // The chunk's 8 · nb columns of residue l, per row group, and the rows' scales.
        // (Plain loops, not `array::from_fn`: closures that call intrinsics are not always
        // inlined.)
        let mut xs: [&[f32]; MV] = [&[]; MV];
        let mut sv: [&[f32]; MV] = [&[]; MV];
        for v in 0..MV {
            xs[v] = &self.at.x[(((g + v) * 16 + self.l) * qn + 8 * self.kc) * 16..][..8 * nb * 16];
            if let Some(sc) = &self.at.s {
                sv[v] = &sc[((g + v) * self.kb_n + self.kc) * 16..][..nb * 16];
            }
        }
        let mut c = 0;
        while c < self.nw {
            // Weight rows past nw (up to the padded width) stand in for missing ones: the
            // last real row's values, totals that are never read.
            let mut w: [&[f32]; NR] = [&[]; NR];
            let mut ws: [&[f32]; NR] = [&[]; NR];
            for i in 0..NR {
                let r = (c + i).min(self.nw - 1);
                w[i] = &self.wt[(r * 16 + self.l) * self.cw..][..8 * nb];
                ws[i] = &self.ws[r * CHUNK_BLOCKS..][..nb];
            }
            let t = &mut tot[self.tot + c * self.rp..][..NR * self.rp];
            outer::<NR, MV>(xs, w, (ws, if self.at.s.is_some() { Some(sv) } else { None }), (t, self.rp, (g - self.g0) * 16));
            c += NR;
        }
        MV
    }
}

/// One register tile of [`Pass::run`] through the chunk's `nb` blocks: `acc[i][v]` = Σ over
/// `kk < 8` of `w[i][8b + kk]` times activation rows `xs[v][16 (8b + kk)..]` (16 rows), in
/// order of `kk`, then promoted into the totals `t[i · rp + off + 16 v..]` with the factor
/// `sv[v][16 b..] · ws[i][b]` (`ws` alone on the reference path).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[inline]
#[allow(clippy::type_complexity)] // the operands of one register tile
fn outer<const NR: usize, const MV: usize>(
    xs: [&[f32]; MV],
    w: [&[f32]; NR],
    (ws, sv): ([&[f32]; NR], Option<[&[f32]; MV]>),
    (t, rp, off): (&mut [f32], usize, usize),
) {
    let nb = ws[0].len();
    // The unchecked accesses below stay inside these bounds.
    assert!(xs.iter().all(|x| x.len() >= nb * 128) && w.iter().all(|x| x.len() >= nb * 8) && ws.iter().all(|x| x.len() >= nb));
    assert!(sv.is_none_or(|sv| sv.iter().all(|x| x.len() >= nb * 16)));
    assert!(off + 16 * MV <= rp && t.len() >= NR * rp);
    let (xp, wp) = (xs.map(|x| x.as_ptr()), w.map(|x| x.as_ptr()));
    let tp = t.as_mut_ptr();
    for b in 0..nb {
        let mut acc = [[_mm512_setzero_ps(); MV]; NR];
        // An opaque trip count keeps the loop rolled: fully unrolled, the scheduler hoists
        // the loads and spills the accumulators.
        for kk in 0..std::hint::black_box(8usize).min(8) {
            let q = 8 * b + kk;
            let mut xv = [_mm512_setzero_ps(); MV];
            for v in 0..MV {
                // SAFETY: q < 8 nb and xs[v] holds at least 128 nb = 16 (8 nb) values.
                xv[v] = unsafe { _mm512_loadu_ps(xp[v].add(16 * q)) };
            }
            for i in 0..NR {
                // SAFETY: q < 8 nb <= w[i].len().
                let bw = _mm512_set1_ps(unsafe { *wp[i].add(q) });
                for v in 0..MV {
                    acc[i][v] = _mm512_fmadd_ps(bw, xv[v], acc[i][v]);
                }
            }
        }
        for i in 0..NR {
            // SAFETY: b < nb <= ws[i].len() (asserted above).
            let wsi = _mm512_set1_ps(unsafe { *ws[i].get_unchecked(b) });
            for v in 0..MV {
                let s = match &sv {
                    // SAFETY: 16 b + 16 <= 16 nb <= sv[v].len() (asserted above).
                    Some(sv) => _mm512_mul_ps(unsafe { _mm512_loadu_ps(sv[v].as_ptr().add(16 * b)) }, wsi),
                    None => wsi,
                };
                // SAFETY: i rp + off + 16 v + 16 <= (NR - 1) rp + rp <= t.len() (asserted above);
                // loadu / storeu have no alignment requirement.
                unsafe {
                    let p = tp.add(i * rp + off + 16 * v);
                    _mm512_storeu_ps(p, _mm512_fmadd_ps(acc[i][v], s, _mm512_loadu_ps(p)));
                }
            }
        }
    }
}

/// 128-blocks of K per chunk of [`row_tile`]: the task's weight rows decoded for one chunk
/// (16 rows x 4 x 128 x 4 B = 32 KiB) stay in L1 while every row group passes over them.
const ROW_TILE_CHUNK: usize = 4;

/// Weight rows and activation rows of one register tile of [`row_tile`].
const ROW_TILE_NR: usize = 4;
const ROW_TILE_MR: usize = 4;

/// How many weight rows ahead [`row_tile`] prefetches the codes it is about to decode.
const ROW_TILE_AHEAD: usize = 4;

/// The row-tile path: jobs of more than `AVX512_MATVEC_ROWS` (tile.rs) rows with K a whole
/// number of 128-blocks, in the matrix-vector path's own form, so nothing is transposed: the
/// 16 K residues sit in the lanes. K is taken in chunks of [`ROW_TILE_CHUNK`] blocks; per chunk,
/// the task's weight rows are decoded into L1 (units of 2^-8, as the matrix-vector path
/// decodes them), and for each group of 4 activation rows, register tiles of 4 activation
/// rows x 4 weight rows run through the chunk's blocks: per block, 8 steps of 4 activation
/// loads, 4 weight loads and 16 fused multiply-adds from zero, then each partial sum promoted
/// into its total (`tot [nw][rows][16]`, L1) with `promotion`. At the end each total's 16 lanes
/// are added in [`hsum16`]'s tree. The same sums, in the same order, as [`matvec`] and [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the tile's rectangle is four plain indices
pub(super) fn row_tile(job: &Job<'_>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, scratch: &mut Scratch, tile: &mut [f32]) {
    let (m, nw, kb_n) = (m1 - m0, n1 - n0, k / BLOCK);
    let cw = ROW_TILE_CHUNK * BLOCK;
    let (tot, wt) = scratch.take(nw * m * 16, nw * (cw + ROW_TILE_CHUNK));
    let (wd, ws) = wt.split_at_mut(nw * cw);
    let data = job.w.data();
    for kc in (0..kb_n).step_by(ROW_TILE_CHUNK) {
        let nb = (kb_n - kc).min(ROW_TILE_CHUNK);
        for c in 0..nw {
            let n = n0 + c;
            let codes = &data[n * k + kc * BLOCK..n * k + (kc + nb) * BLOCK];
            let dst = &mut wd[c * cw..];
            // The codes ROW_TILE_AHEAD rows on (past the task's last row: the next chunk's
            // first rows), fetched while this row decodes: each row's run is a few blocks,
            // too short for the hardware prefetcher to start on.
            let ahead = match c + ROW_TILE_AHEAD {
                a if a < nw => Some((n0 + a) * k + kc * BLOCK),
                a if kc + nb < kb_n => Some((n0 + a - nw) * k + (kc + nb) * BLOCK),
                _ => None,
            };
            for (q, quad) in codes.chunks_exact(32).enumerate() {
                if let Some(at) = ahead
                    && q % 2 == 0
                {
                    // A prefetch never faults: an address past the weight is harmless.
                    _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(at + 32 * q).cast());
                }
                let quad: &[u8; 32] = match quad.try_into() {
                    Ok(q) => q,
                    Err(_) => unreachable!("chunks_exact(32)"),
                };
                let (lo, hi) = decode32_div256(quad);
                store16(&mut dst[32 * q..], lo);
                store16(&mut dst[32 * q + 16..], hi);
            }
            for b in 0..nb {
                ws[c * ROW_TILE_CHUNK + b] = weight_promotion(job, n, kc + b, kb_n);
            }
        }
        for r in (0..m).step_by(ROW_TILE_MR) {
            for c0 in (0..nw).step_by(ROW_TILE_NR) {
                let p = RowPass { job, k, kb_n, kc, nb, m0, r, m, c0, wd, ws };
                match ((m - r).min(ROW_TILE_MR), (nw - c0).min(ROW_TILE_NR)) {
                    (1, 1) => p.run::<1, 1>(tot),
                    (1, 2) => p.run::<1, 2>(tot),
                    (1, 3) => p.run::<1, 3>(tot),
                    (1, _) => p.run::<1, 4>(tot),
                    (2, 1) => p.run::<2, 1>(tot),
                    (2, 2) => p.run::<2, 2>(tot),
                    (2, 3) => p.run::<2, 3>(tot),
                    (2, _) => p.run::<2, 4>(tot),
                    (3, 1) => p.run::<3, 1>(tot),
                    (3, 2) => p.run::<3, 2>(tot),
                    (3, 3) => p.run::<3, 3>(tot),
                    (3, _) => p.run::<3, 4>(tot),
                    (_, 1) => p.run::<4, 1>(tot),
                    (_, 2) => p.run::<4, 2>(tot),
                    (_, 3) => p.run::<4, 3>(tot),
                    (_, _) => p.run::<4, 4>(tot),
                }
            }
        }
    }
    // Each output's 16 lanes added in hsum16's tree, 16 outputs (weight rows) at a time: a
    // register transpose, then tree16.
    let mut out = [0f32; 16];
    for r in 0..m {
        for c0 in (0..nw).step_by(16) {
            let cn = (nw - c0).min(16);
            let t: [__m512; 16] =
                std::array::from_fn(|i| if i < cn { load16(&tot[((c0 + i) * m + r) * 16..]) } else { _mm512_setzero_ps() });
            store16(&mut out, tree16(transpose16(t)));
            tile[r * nw + c0..r * nw + c0 + cn].copy_from_slice(&out[..cn]);
        }
    }
}

/// One register tile of [`row_tile`]: activation rows `m0 + r..` (job rows) against the
/// decoded weight rows `wd [i][chunk · 128]` (weight rows `c0 + i` of the task), through the
/// chunk's `nb` blocks.
struct RowPass<'a> {
    job: &'a Job<'a>,
    k: usize,
    kb_n: usize,
    kc: usize,
    nb: usize,
    m0: usize,
    /// First row of the tile within the task, and the task's rows.
    r: usize,
    m: usize,
    /// First weight row of the tile within the task.
    c0: usize,
    wd: &'a [f32],
    ws: &'a [f32],
}

impl RowPass<'_> {
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn run<const MR: usize, const NR: usize>(&self, tot: &mut [f32]) {
        let (k, cw, c0) = (self.k, ROW_TILE_CHUNK * BLOCK, self.c0);
        let x = self.job.a.x;
        let (wd, ws) = (&self.wd[c0 * cw..], &self.ws[c0 * ROW_TILE_CHUNK..]);
        // The unchecked accesses below stay inside these bounds.
        assert!(x.len() >= (self.m0 + self.r + MR) * k && (self.kc + self.nb) * BLOCK <= k);
        assert!(wd.len() >= (NR - 1) * cw + self.nb * BLOCK && ws.len() >= (NR - 1) * ROW_TILE_CHUNK + self.nb);
        assert!(tot.len() >= ((c0 + NR - 1) * self.m + self.r + MR) * 16);
        let xp: [*const f32; MR] = std::array::from_fn(|i| x[(self.m0 + self.r + i) * k..].as_ptr());
        let (wp, tp) = (wd.as_ptr(), tot.as_mut_ptr());
        let mut sa = [[0f32; ROW_TILE_CHUNK]; MR];
        for (i, s) in sa.iter_mut().enumerate() {
            for (b, s) in s.iter_mut().enumerate().take(self.nb) {
                *s = row_scale(self.job, self.m0 + self.r + i, self.kc + b, self.kb_n).unwrap_or(1.0);
            }
        }
        let fp8 = self.job.a.scales.is_some();
        for b in 0..self.nb {
            let j0 = (self.kc + b) * BLOCK;
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            for c in 0..std::hint::black_box(8usize).min(8) {
                let mut a = [_mm512_setzero_ps(); MR];
                for i in 0..MR {
                    // SAFETY: row m0 + r + i < x.len() / k and j0 + 16 c + 16 <= k (asserted above).
                    a[i] = unsafe { _mm512_loadu_ps(xp[i].add(j0 + 16 * c)) };
                }
                for j in 0..NR {
                    // SAFETY: j cw + 128 b + 16 c + 16 <= (NR - 1) cw + 128 nb <= wd.len().
                    let w = unsafe { _mm512_loadu_ps(wp.add(j * cw + b * BLOCK + 16 * c)) };
                    for i in 0..MR {
                        acc[i][j] = _mm512_fmadd_ps(a[i], w, acc[i][j]);
                    }
                }
            }
            for j in 0..NR {
                // SAFETY: j CHUNK + b < (NR - 1) CHUNK + nb <= ws.len() (asserted above).
                let ws = unsafe { *ws.get_unchecked(j * ROW_TILE_CHUNK + b) };
                for i in 0..MR {
                    let s = _mm512_set1_ps(promotion(fp8.then_some(sa[i][b]), ws));
                    // SAFETY: ((c0 + j) m + r + i) 16 + 16 <= tot.len() (asserted above).
                    unsafe {
                        let p = tp.add(((c0 + j) * self.m + self.r + i) * 16);
                        _mm512_storeu_ps(p, _mm512_fmadd_ps(acc[i][j], s, _mm512_loadu_ps(p)));
                    }
                }
            }
        }
    }
}
