//! One output tile of one job over all of K, one 128-block at a time, on the widest code path
//! the CPU has (AVX-512, AVX2 + FMA, or the portable body).

use super::cpu::Job;
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
                    Some(at) => super::avx512::tile(job, at, k, m0, m1, n0, n1, tile),
                    None => super::avx512::matvec(job, k, m0, m1, n0, n1, tile),
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

/// Whether `job` runs on the AVX-512 tile path (more than [`AVX512_MATVEC_ROWS`] rows, or a
/// K that is not a whole number of 128-blocks), which reads its activations as [`ATiles`].
pub(super) fn avx512_tiles(job: &Job<'_>, k: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa_level() == IsaLevel::Avx512 && (job.m > AVX512_MATVEC_ROWS || !k.is_multiple_of(BLOCK))
}

/// A job's activation rows transposed in groups of 16 (the last padded with zero rows):
/// `x[g][k][16]` holds rows `16g..16g+16` at each K index, `s[g][kb][16]` their 1x128 scales
/// (fp8 path). The AVX-512 tile kernel loads 16 rows' values at one K index as one vector.
pub(super) struct ATiles {
    pub(super) x: Vec<f32>,
    pub(super) s: Option<Vec<f32>>,
}

impl ATiles {
    pub(super) fn new(job: &Job<'_>, k: usize) -> ATiles {
        let (m, kb_n) = (job.m, blocks(k));
        let groups = m.div_ceil(16);
        let mut x = vec![0f32; groups * k * 16];
        x.par_chunks_mut(k * 16).enumerate().for_each(|(g, dst)| {
            let rows: Vec<&[f32]> = (16 * g..m.min(16 * g + 16)).map(|r| &job.a.x[r * k..(r + 1) * k]).collect();
            let done = k - k % 16;
            // SAFETY: ATiles are only built for the AVX-512 tile path (`avx512_tiles`), on a
            // CPU checked at run time to have avx512f.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                crate::simd::avx512::interleave16(&rows, done, dst)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            for (r, row) in rows.iter().enumerate() {
                for (j, &v) in row.iter().enumerate().skip(done) {
                    dst[j * 16 + r] = v;
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
        ATiles { x, s }
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
