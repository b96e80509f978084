//! The fast CPU GEMMs: each call becomes jobs (one weight against a run of activation rows),
//! jobs become tiles (row chunk x weight-row chunk), and the tiles run in parallel.

use super::tile::{ATiles, AVX512_MATVEC_ROWS, AVX512_TILE_N, avx512_matvec, avx512_tiles, core_tile};
use super::{GemmPath, GemmShape, GroupedShape, shapes};
use crate::error::{KernelError, Result, check_len, invalid, shape_err};
use crate::fp8::{self, ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt, decode_fast};
use rayon::prelude::*;

/// Rows of W one task owns (decoded per 128-block into an L1-resident tile).
pub(super) const NC: usize = 16;
/// Rows of A one task owns.
pub(super) const MC: usize = 64;
/// Weight bytes a matrix-vector task reads at least (when the matrix has that many).
const MATVEC_TILE_BYTES: usize = 64 << 10;

/// The activation side of the core: f32 values and, on the fp8 path, their tile scales.
#[derive(Clone, Copy)]
pub(super) struct ASide<'a> {
    /// `[rows, k]`: f32 activations (reference path) or decoded FP8 codes (fp8 path).
    pub(super) x: &'a [f32],
    /// `[rows, k/128]` tile scales (fp8 path only).
    pub(super) scales: Option<&'a [f32]>,
}

/// One GEMM of the grouped or single-weight drivers: rows `r0..r1` of the activation against one weight.
#[derive(Clone, Copy)]
pub(super) struct Job<'a> {
    pub(super) a: ASide<'a>,
    pub(super) w: Fp8WeightRef<'a>,
    /// Which of the call's output buffers the job writes, and its first row there.
    pub(super) out: (usize, usize),
    pub(super) m: usize,
}

/// A GEMM on one weight, either path. `a` is `[m, k]` f32, `out` is `[m, n]`.
pub fn gemm(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, path: GemmPath, out: &mut [f32]) -> Result<()> {
    s.validate("gemm", path, a.len(), &w, out.len())?;
    let prepared = prepare_a("gemm", a, s.m, s.k, path)?;
    let job = Job { a: prepared.side(a), w, out: (0, 0), m: s.m };
    run_jobs(&[job], s.n, s.k, &mut [out]);
    Ok(())
}

/// The fp8 path on an activation that is already quantised: `a_q` `[m, k]` e4m3 codes and
/// `a_s` `[m, k/128]` tile scales, as [`fp8::act_quant`] makes them with either
/// [`ScaleFmt`] (a ue8m0 scale is an f32 power of two and is used as it is). `k` must be a
/// multiple of 128.
///
/// ```
/// use dsv3_kernels::fp8::{self, ActQuantShape, Fp8Weight, ScaleFmt};
/// use dsv3_kernels::gemm::{self, GemmPath, GemmShape};
///
/// let (m, n, k) = (2, 3, 128);
/// let w = Fp8Weight::new(n, k, vec![0x28; n * k], vec![1.0])?; // every entry 0.25, scale 1
/// let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
/// let shape = ActQuantShape { rows: m, cols: k };
/// let (mut q, mut s) = (vec![0u8; m * k], vec![0f32; m * shape.tiles()]);
/// fp8::act_quant(&a, shape, ScaleFmt::Ue8m0, &mut q, &mut s)?; // power-of-two scales
/// let mut out = vec![0f32; m * n];
/// gemm::gemm_fp8_quantized(&q, &s, w.view(), GemmShape { m, n, k }, &mut out)?;
/// // Small integers survive e4m3 exactly: the result is the exact product.
/// let want: f32 = a[..k].iter().map(|x| x * 0.25).sum();
/// assert_eq!(out[0], want);
/// # Ok::<(), dsv3_kernels::KernelError>(())
/// ```
///
/// Errors: the GEMM's shape checks, `a_s` of the wrong length, a NaN code (`0x7F`, `0xFF`) in
/// `a_q`, or a scale that is not finite and > 0 (naming its row and tile).
pub fn gemm_fp8_quantized(a_q: &[u8], a_s: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm_fp8_quantized";
    s.validate(OP, GemmPath::Fp8, a_q.len(), &w, out.len())?;
    let kb = s.k / BLOCK;
    check_len(OP, "a_s", a_s.len(), s.m * kb)?;
    if let Some(i) = a_q.iter().position(|&c| fp8::is_nan_code(c)) {
        return Err(invalid(OP, "a_q", format!("row {}, column {}: NaN code {:#04x}", i / s.k, i % s.k, a_q[i])));
    }
    if let Some(i) = a_s.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(invalid(OP, "a_s", format!("row {}, tile {}: scale {} is not finite and > 0", i / kb, i % kb, a_s[i])));
    }
    let x = decode_codes(a_q);
    let job = Job { a: ASide { x: &x, scales: Some(a_s) }, w, out: (0, 0), m: s.m };
    run_jobs(&[job], s.n, s.k, &mut [out]);
    Ok(())
}

/// Grouped GEMM, contiguous layout (see [`super::reference::grouped_contiguous`]).
pub fn grouped_contiguous(a: &[f32], offsets: &[u32], w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
    const OP: &str = "grouped_contiguous";
    let g = GroupedShape::contiguous(OP, a.len(), offsets, &shapes(w), out.len())?;
    grouped_sets(OP, a, offsets, &[w], (g.n, g.k), path, &mut [out])
}

/// Two grouped GEMMs of the same activations and offsets (every expert's gate and up
/// projection): `outs[i]` = [`grouped_contiguous`]`(a, offsets, w[i], path)`, with the same
/// bits, run as one parallel pass (the activation is prepared once, and at decode the sixteen
/// small products share one fork/join instead of two).
pub fn grouped_contiguous_pair(
    a: &[f32],
    offsets: &[u32],
    w: [&[Fp8WeightRef<'_>]; 2],
    path: GemmPath,
    outs: [&mut [f32]; 2],
) -> Result<()> {
    const OP: &str = "grouped_contiguous_pair";
    let [o0, o1] = outs;
    let g = GroupedShape::contiguous(OP, a.len(), offsets, &shapes(w[0]), o0.len())?;
    let g1 = GroupedShape::contiguous(OP, a.len(), offsets, &shapes(w[1]), o1.len())?;
    if g1.n != g.n {
        return Err(shape_err(OP, format!("the two weight sets have {} and {} rows", g.n, g1.n)));
    }
    grouped_sets(OP, a, offsets, &w, (g.n, g.k), path, &mut [o0, o1])
}

/// The grouped GEMM of every weight set in `sets` (each checked against `offsets` and `[n, k]`
/// by the caller) in one parallel pass, with the activation prepared once: set `i` writes
/// `outs[i]` (`[rows, n]`, `rows` = the offsets' total).
fn grouped_sets(
    op: &'static str,
    a: &[f32],
    offsets: &[u32],
    sets: &[&[Fp8WeightRef<'_>]],
    (n, k): (usize, usize),
    path: GemmPath,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    if path == GemmPath::Fp8 && !k.is_multiple_of(BLOCK) {
        return Err(shape_err(op, format!("the fp8 path needs k % 128 == 0, got k = {k}")));
    }
    let rows = offsets.last().copied().unwrap_or(0) as usize;
    let prepared = prepare_a(op, a, rows, k, path)?;
    let side = prepared.side(a);
    let jobs: Vec<Job<'_>> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            (0..w.len()).filter(|&e| offsets[e + 1] > offsets[e]).map(move |e| {
                let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
                Job { a: side.rows(r0, r1, k), w: w[e], out: (i, r0), m: r1 - r0 }
            })
        })
        .collect();
    run_jobs(&jobs, n, k, outs);
    Ok(())
}

/// Grouped GEMM, masked layout (see [`super::reference::grouped_masked`]).
pub fn grouped_masked(a: &[f32], counts: &[u32], capacity: usize, w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
    const OP: &str = "grouped_masked";
    let g = GroupedShape::masked(OP, a.len(), counts, capacity, &shapes(w), out.len())?;
    if path == GemmPath::Fp8 && !g.k.is_multiple_of(BLOCK) {
        return Err(shape_err(OP, format!("the fp8 path needs k % 128 == 0, got k = {}", g.k)));
    }
    // Only the live rows are quantised: pack them contiguously first (cheap next to the GEMM).
    let mut offsets = vec![0u32; w.len() + 1];
    for e in 0..w.len() {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let live = offsets[w.len()] as usize;
    let mut packed = Vec::with_capacity(live * g.k);
    for e in 0..w.len() {
        let a0 = e * capacity * g.k;
        packed.extend_from_slice(&a[a0..a0 + counts[e] as usize * g.k]);
    }
    let mut packed_out = vec![0f32; live * g.n];
    grouped_contiguous(&packed, &offsets, w, path, &mut packed_out)?;
    out.par_chunks_mut(capacity.max(1) * g.n).enumerate().for_each(|(e, o)| {
        let (p0, p1) = (offsets[e] as usize * g.n, offsets[e + 1] as usize * g.n);
        o[..p1 - p0].copy_from_slice(&packed_out[p0..p1]);
        o[p1 - p0..].fill(0.0);
    });
    Ok(())
}

/// On the fp8 path, the activation quantised and decoded back to f32 codes (exact small
/// values) plus its scales; on the reference path nothing.
struct Prepared {
    x: Vec<f32>,
    scales: Vec<f32>,
    fp8: bool,
}

impl Prepared {
    fn side<'a>(&'a self, a: &'a [f32]) -> ASide<'a> {
        if self.fp8 { ASide { x: &self.x, scales: Some(&self.scales) } } else { ASide { x: a, scales: None } }
    }
}

impl<'a> ASide<'a> {
    fn rows(self, r0: usize, r1: usize, k: usize) -> ASide<'a> {
        let kb = k / BLOCK;
        ASide { x: &self.x[r0 * k..r1 * k], scales: self.scales.map(|s| &s[r0 * kb..r1 * kb]) }
    }
}

fn prepare_a(op: &'static str, a: &[f32], m: usize, k: usize, path: GemmPath) -> Result<Prepared> {
    if path == GemmPath::Reference || m == 0 {
        return Ok(Prepared { x: Vec::new(), scales: Vec::new(), fp8: path == GemmPath::Fp8 });
    }
    let shape = ActQuantShape { rows: m, cols: k };
    let mut q = vec![0u8; a.len()];
    let mut scales = vec![0f32; m * shape.tiles()];
    fp8::act_quant(a, shape, ScaleFmt::Float, &mut q, &mut scales).map_err(|e| match e {
        KernelError::Invalid { detail, .. } => invalid(op, "a", detail),
        other => other,
    })?;
    let x = decode_codes(&q);
    Ok(Prepared { x, scales, fp8: true })
}

/// FP8 codes to f32 values (unscaled); in parallel only when large enough to pay for waking
/// the thread pool.
fn decode_codes(q: &[u8]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut x = vec![0f32; q.len()];
    let body = |(x, q): (&mut [f32], &[u8])| x.iter_mut().zip(q).for_each(|(o, &b)| *o = decode_fast(b));
    if q.len() <= CHUNK {
        body((&mut x, q));
    } else {
        x.par_chunks_mut(CHUNK).zip(q.par_chunks(CHUNK)).for_each(body);
    }
    x
}

thread_local! {
    /// Each worker's output tile, reused from task to task (a fresh zeroed vector per task
    /// cost a tenth of a prefill's MoE GEMM time in allocation, zeroing and a serial scatter).
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An output buffer of one [`run_jobs`] call, written by its tasks in parallel: each task writes the
/// rows of its own tile, a rectangle no other task touches.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks of one call write disjoint ranges of the buffer (`write`'s contract), which
// outlives them (`run_jobs` borrows it mutably until every task has finished).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Copies `src` to `[at, at + src.len())`. The caller writes a range no other task writes
    /// or reads during the call: the tiles of `run_jobs` are disjoint rectangles of the output
    /// (jobs own disjoint output rows, tiles disjoint row chunks and column chunks of a job).
    fn write(&self, at: usize, src: &[f32]) {
        assert!(at.checked_add(src.len()).is_some_and(|end| end <= self.len), "tile row past the output");
        // SAFETY: in bounds (asserted); no other task writes or reads this range (the tiles are
        // disjoint), and the buffer lives for the whole call.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) }
    }
}

/// Splits every job into (row chunk, column chunk) tiles, runs them in parallel, and writes
/// each tile into its job's output buffer (`outs[i]`, `[rows, n]`) from the task itself. Jobs
/// on the matrix-vector path get column chunks of a few hundred rows, so each thread streams
/// long runs of weight bytes; larger jobs get [`NC`]-row chunks, whose decoded weights stay
/// in L2.
fn run_jobs(jobs: &[Job<'_>], n: usize, k: usize, outs: &mut [&mut [f32]]) {
    let threads = crate::cpu::threads().max(1);
    // The AVX-512 tile path reads each job's activations transposed; built once per job.
    let transposed: Vec<Option<ATiles>> = jobs.iter().map(|job| avx512_tiles(job, k).then(|| ATiles::new(job, k))).collect();
    // Matrix-vector jobs run in row chunks of 4 (AVX-512: up to 8 rows, as two chunks, which
    // beats the tile kernel's half-empty 16-row groups).
    let mv_rows = if avx512_matvec(k) { AVX512_MATVEC_ROWS } else { 4 };
    let mc_of = |job: &Job<'_>| if job.m <= mv_rows { 4 } else { MC };
    let tiles: Vec<(usize, usize, usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| {
            let nc = if job.m <= mv_rows {
                // At least MATVEC_TILE_BYTES of weight per tile: shorter streams (16 rows of a
                // small-preset expert, 16 KB) never got the hardware prefetcher going.
                let floor = (MATVEC_TILE_BYTES / k.max(1)).next_multiple_of(NC).clamp(NC, 512);
                n.div_ceil(threads * 4 * jobs.len()).next_multiple_of(NC).clamp(floor, 512)
            } else if transposed[j].is_some() && job.m >= MC {
                AVX512_TILE_N
            } else {
                NC
            };
            let mc = mc_of(job);
            (0..job.m.div_ceil(mc)).flat_map(move |i| (0..n.div_ceil(nc)).map(move |c| (j, i * mc, c * nc, ((c + 1) * nc).min(n))))
        })
        .collect();
    let dst: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut { ptr: o.as_mut_ptr(), len: o.len() }).collect();
    tiles.par_iter().for_each(|&(j, m0, n0, n1)| {
        let job = &jobs[j];
        let m1 = (m0 + mc_of(job)).min(job.m);
        let nw = n1 - n0;
        TILE.with_borrow_mut(|tile| {
            tile.clear();
            tile.resize((m1 - m0) * nw, 0.0);
            core_tile(job, transposed[j].as_ref(), k, m0, m1, n0, n1, tile);
            let (set, row0) = (job.out.0, job.out.1 + m0);
            for (i, row) in tile.chunks_exact(nw).enumerate() {
                dst[set].write((row0 + i) * n + n0, row);
            }
        });
    });
}
