//! One output tile of one job over all of K, one 128-block at a time, on the widest code path
//! the CPU has (AVX-512, AVX2 + FMA, or the portable body).

use super::cpu::{Job, MC};
use crate::cpu::{IsaLevel, isa_level};
use crate::fp8::{BLOCK, blocks, decode_fast};
use rayon::prelude::*;

/// Computes `tile[m - m0][n - n0]` for one job over all of K, one 128-block at a time: the
/// weight block is decoded into an L1 tile, each (m, n) block dot is summed in f32 and then
/// scaled by the block's scale(s) into the f32 total.
#[allow(clippy::too_many_arguments)] // the tile's rectangle is four plain indices
pub(super) fn core_tile(job: &Job<'_>, at: Option<&ATiles>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = isa_level();
        if level == IsaLevel::Avx512 {
            // SAFETY: the CPU was checked at run time to have avx512f, avx512bw, avx2, fma and
            // f16c; `at` is the job's transposed activation whenever the tile path runs
            // (`avx512_tiles`).
            return unsafe {
                match at {
                    Some(at) => SCRATCH.with_borrow_mut(|sc| super::avx512::tile(job, at, k, m0, m1, n0, n1, sc, tile)),
                    None if job.m <= AVX512_MATVEC_ROWS => super::avx512::matvec(job, k, m0, m1, n0, n1, tile),
                    None => SCRATCH.with_borrow_mut(|sc| super::avx512::row_tile(job, k, m0, m1, n0, n1, sc, tile)),
                }
            };
        }
        if level >= IsaLevel::Avx2Fma {
            // SAFETY: `avx2::core_tile` needs avx2 + fma + f16c, which the CPU was checked to have.
            return unsafe { super::avx2::core_tile(job, k, m0, m1, n0, n1, tile) };
        }
    }
    core_tile_body(job, k, m0, m1, n0, n1, tile)
}

/// The factor that promotes block `kb` of a dot product with weight row `n` into the total:
/// the weight's block scale times 256 (the SIMD decoders give codes / 256).
#[inline(always)]
pub(super) fn weight_promotion(job: &Job<'_>, n: usize, kb: usize, kb_n: usize) -> f32 {
    // x 256 undoes the decoder's 2^-8 (exact: a power of two).
    job.w.scale_inv()[(n / BLOCK) * kb_n + kb] * 256.0
}

/// Activation row `m`'s tile scale of block `kb` on the fp8 path, `None` on the reference path.
#[inline(always)]
pub(super) fn row_scale(job: &Job<'_>, m: usize, kb: usize, kb_n: usize) -> Option<f32> {
    job.a.scales.map(|sc| sc[m * kb_n + kb])
}

/// The factor of a block of a row's dot product: [`weight_promotion`] `ws` times the row's
/// [`row_scale`] `sa` on the fp8 path. Every SIMD kernel takes its factors from these, so that
/// they agree to the bit.
#[inline(always)]
pub(super) fn promotion(sa: Option<f32>, ws: f32) -> f32 {
    match sa {
        Some(sa) => sa * ws,
        None => ws,
    }
}

thread_local! {
    /// Each worker's [`Scratch`], kept from tile to tile and from call to call.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Buffers a worker reuses from tile to tile: allocating a few hundred KiB per tile costs page
/// faults and, when they are freed, TLB shootdowns between the threads.
#[derive(Default)]
pub(super) struct Scratch {
    tot: Vec<f32>,
    wt: Vec<f32>,
}

impl Scratch {
    /// `tot` (zeroed) and `wt` (contents unspecified) of the given lengths, each starting on a
    /// 64-byte boundary: a 16-lane load that straddles two cache lines costs two, and the
    /// allocator only promises 16 bytes (glibc's large blocks start 16 bytes into a page;
    /// measured: the MoE GEMMs of a prefill 30% slower than on mimalloc's aligned blocks).
    pub(super) fn take(&mut self, tot: usize, wt: usize) -> (&mut [f32], &mut [f32]) {
        let tot_at = aligned_len(&mut self.tot, tot);
        self.tot[tot_at..tot_at + tot].fill(0.0);
        let wt_at = aligned_len(&mut self.wt, wt);
        (&mut self.tot[tot_at..tot_at + tot], &mut self.wt[wt_at..wt_at + wt])
    }
}

/// Grows `v` so that `len` values fit after its first 64-byte boundary, and returns the
/// index of that boundary.
fn aligned_len(v: &mut Vec<f32>, len: usize) -> usize {
    const LANES: usize = 16;
    if v.len() < len + LANES {
        v.resize(len + LANES, 0.0);
    }
    // The element offset to the next 64-byte boundary (f32 buffers are 4-byte aligned).
    let at = v.as_ptr().align_offset(64);
    match at.checked_add(len) {
        Some(end) if end <= v.len() => at,
        _ => 0,
    }
}

/// Weight rows of one AVX-512 tile task when the job has at least `MC` (cpu.rs) rows: each 128-block
/// of activations (64 rows, 32 KiB) is reused across this many weight rows while it sits in
/// L1 (fewer rows keep `NC` (cpu.rs), measured faster there). Divides 128.
pub(super) const AVX512_TILE_N: usize = 64;

/// Rows up to which an AVX-512 job runs on the matrix-vector path (in chunks of 4).
pub(super) const AVX512_MATVEC_ROWS: usize = 8;

/// Whether the AVX-512 matrix-vector path can run (K a whole number of 128-blocks).
pub(super) fn avx512_matvec(k: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa_level() == IsaLevel::Avx512 && k.is_multiple_of(BLOCK)
}

/// Whether `job` runs on the AVX-512 outer-product tile path, which reads its activations as
/// [`ATiles`]: jobs of at least `MC` rows (there it measured a little faster than the row-tile
/// path: 7168 x 2048 at M = 64 and 128, 44-45% of the FMA peak against 42%), and any K that
/// is not a whole number of 128-blocks (which only it handles). Jobs of more than
/// [`AVX512_MATVEC_ROWS`] and fewer than `MC` rows take the row-tile path (`avx512::row_tile`),
/// which wastes no lanes on rows past a multiple of 16: MoE experts at prefill get a few to a
/// few dozen rows each. All three AVX-512 paths give the same bits.
pub(super) fn avx512_tiles(job: &Job<'_>, k: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa_level() == IsaLevel::Avx512 && (job.m >= MC || !k.is_multiple_of(BLOCK))
}

/// A job's activation rows transposed in groups of 16 (the last padded with zero rows) and
/// split by K residue: `x[g][l][q][16]` holds rows `16g..16g+16` at K index `16q + l` (zeros
/// past K, which is padded to whole 128-blocks), so that the tile kernel's pass for residue
/// `l` reads one contiguous run per group; `s[g][kb][16]` are the rows' 1x128 scales (fp8
/// path).
pub(super) struct ATiles {
    pub(super) x: Vec<f32>,
    pub(super) s: Option<Vec<f32>>,
    /// `q` per residue: K padded to whole blocks, over 16.
    pub(super) qn: usize,
}

impl ATiles {
    pub(super) fn new(job: &Job<'_>, k: usize) -> ATiles {
        let (m, kb_n) = (job.m, blocks(k));
        let groups = m.div_ceil(16);
        let qn = kb_n * BLOCK / 16;
        let mut x = vec![0f32; groups * 16 * qn * 16];
        x.par_chunks_mut(16 * qn * 16).enumerate().for_each(|(g, dst)| {
            let rows: Vec<&[f32]> = (16 * g..m.min(16 * g + 16)).map(|r| &job.a.x[r * k..(r + 1) * k]).collect();
            let whole = k / 16;
            // SAFETY: ATiles are only built for the AVX-512 tile path (`avx512_tiles`), on a
            // CPU checked at run time to have avx512f.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                super::avx512::split16(&rows, whole, qn, dst)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let whole = 0;
            for (r, row) in rows.iter().enumerate() {
                for (j, &v) in row.iter().enumerate().skip(whole * 16) {
                    dst[((j % 16) * qn + j / 16) * 16 + r] = v;
                }
            }
        });
        let s = job.a.scales.map(|sc| {
            let mut t = vec![0f32; groups * kb_n * 16];
            for r in 0..m {
                for kb in 0..kb_n {
                    t[((r / 16) * kb_n + kb) * 16 + r % 16] = sc[r * kb_n + kb];
                }
            }
            t
        });
        ATiles { x, s, qn }
    }
}

/// The portable kernel (any CPU): per 128-block, decode the weight rows into a tile, then one
/// f32 dot product per (row, weight row), scaled into the output.
pub(super) fn core_tile_body(job: &Job<'_>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    let nw = n1 - n0;
    let kb_n = blocks(k);
    let mut wt = vec![0f32; nw * BLOCK];
    let a_rows = &job.a.x[m0 * k..m1 * k];
    for kb in 0..kb_n {
        let (k0, k1) = (kb * BLOCK, ((kb + 1) * BLOCK).min(k));
        let len = k1 - k0;
        // Decode rows n0..n1 of this block into the L1 tile.
        for n in n0..n1 {
            let src = &job.w.data()[n * k + k0..n * k + k1];
            let dst = &mut wt[(n - n0) * BLOCK..(n - n0) * BLOCK + len];
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = decode_fast(b);
            }
        }
        for n in n0..n1 {
            let ws = job.w.scale_inv()[(n / BLOCK) * kb_n + kb];
            let wrow = &wt[(n - n0) * BLOCK..(n - n0) * BLOCK + len];
            for (i, arow) in a_rows.chunks_exact(k).enumerate() {
                let dot = dot_body(&arow[k0..k1], wrow);
                let s = match job.a.scales {
                    Some(sc) => sc[(m0 + i) * kb_n + kb] * ws,
                    None => ws,
                };
                tile[i * nw + (n - n0)] += dot * s;
            }
        }
    }
}

/// Dot product of two slices of equal length (at most 128) with two 8-lane accumulators.
#[inline(always)]
pub(super) fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [[0f32; L]; 2];
    let mut ca = a.chunks_exact(2 * L);
    let mut cb = b.chunks_exact(2 * L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for h in 0..2 {
            for l in 0..L {
                acc[h][l] += x[h * L + l] * y[h * L + l];
            }
        }
    }
    let mut s = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    for l in 0..L {
        s += acc[0][l] + acc[1][l];
    }
    s
}
