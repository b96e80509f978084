//! GEMM against block-scaled FP8 weights: `out[M, N] = a[M, K] · W[N, K]ᵀ` (model-spec §4),
//! dense and grouped (MoE experts) in the two layouts DeepGEMM uses.
//!
//! Two numeric paths, chosen at run time ([`GemmPath`]):
//! * **Reference**: the exact dequantised weight (fp8 × scale_inv) against f32 activations,
//!   f32 accumulation. The weight stays FP8 in memory; the fast kernel decodes it per 128-wide
//!   block into L1 and applies the block scale to each block's partial sum.
//! * **Fp8**: activations quantised per 1x128 tile (scale = amax/448), FP8 × FP8 products
//!   accumulated in f32 within each 128-wide block, the block sum scaled by
//!   `a_scale[m, kb] · w_scale[n/128, kb]` and promoted into an f32 total (DeepGEMM's scheme).
//!   `K` must be a multiple of 128.
//!
//! Grouped layouts: **contiguous** (prefill; expert `e` owns rows `offsets[e]..offsets[e+1]` of
//! one `[rows, K]` activation) and **masked** (decode; `[E, capacity, K]` with a row count per
//! expert; rows past the count are written as zeros).

use crate::cpu::{IsaLevel, isa_level};
use crate::error::{KernelError, Result, check_len, checked_mul, invalid, shape_err};
use crate::fp8::{self, ActQuantShape, BLOCK, Fp8WeightRef, ScaleFmt, blocks, decode_fast};
use rayon::prelude::*;

/// Every `(N, K)` of DeepSeek-V3's FP8 linears: DeepGEMM's six (q_a + kv_a and gate + up
/// fused), then the unfused projections as the checkpoint stores them and the model multiplies
/// by them (q_a, kv_a, expert and shared gate / up, the dense layers' gate / up and down).
/// Tests and benchmarks run over this list; the CUDA backend has an sm90 instantiation for each.
pub const V3_SHAPES: &[(usize, usize)] = &[
    (2112, 7168),
    (24576, 1536),
    (32768, 512),
    (7168, 16384),
    (4096, 7168),
    (7168, 2048),
    (1536, 7168),
    (576, 7168),
    (2048, 7168),
    (18432, 7168),
    (7168, 18432),
];

/// `out[m, n] = Σ_k a[m, k] · w[n, k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Which numeric path a GEMM takes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    #[default]
    Reference,
    Fp8,
}

impl std::str::FromStr for GemmPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reference" => Ok(GemmPath::Reference),
            "fp8" => Ok(GemmPath::Fp8),
            _ => Err(format!("unknown GEMM path `{s}` (expected `reference` or `fp8`)")),
        }
    }
}

impl GemmShape {
    fn validate(&self, op: &'static str, path: GemmPath, a: usize, w: &Fp8WeightRef<'_>, out: usize) -> Result<()> {
        self.check(op, path, a, (w.rows(), w.cols()), out)
    }

    /// The checks of every GEMM on a weight of shape `w = (rows, cols)` (CPU and CUDA alike).
    pub(crate) fn check(&self, op: &'static str, path: GemmPath, a: usize, w: (usize, usize), out: usize) -> Result<()> {
        if w.0 != self.n || w.1 != self.k {
            return Err(shape_err(op, format!("weight is [{}, {}], shape wants [n={}, k={}]", w.0, w.1, self.n, self.k)));
        }
        if path == GemmPath::Fp8 && !self.k.is_multiple_of(BLOCK) {
            return Err(shape_err(op, format!("the fp8 path needs k % 128 == 0, got k = {}", self.k)));
        }
        check_len(op, "a", a, checked_mul(op, "a", self.m, self.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", self.m, self.n)?)
    }
}

/// Plain-loop references (§4.2, §4.4): the oracles of the fast kernels.
pub mod reference {
    use super::*;

    /// `out[m, n] = Σ_k a[m, k] · b[n, k]` in f32, in order of k.
    pub fn gemm_f32(a: &[f32], b: &[f32], s: GemmShape, out: &mut [f32]) -> Result<()> {
        const OP: &str = "gemm_f32 (reference)";
        check_len(OP, "a", a.len(), checked_mul(OP, "a", s.m, s.k)?)?;
        check_len(OP, "b", b.len(), checked_mul(OP, "b", s.n, s.k)?)?;
        check_len(OP, "out", out.len(), checked_mul(OP, "out", s.m, s.n)?)?;
        for m in 0..s.m {
            for n in 0..s.n {
                let mut acc = 0f32;
                for k in 0..s.k {
                    acc += a[m * s.k + k] * b[n * s.k + k];
                }
                out[m * s.n + n] = acc;
            }
        }
        Ok(())
    }

    /// Reference path: dequantise the weight (§4.2), then an f32 GEMM.
    pub fn gemm_dequant(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
        s.validate("gemm_dequant (reference)", GemmPath::Reference, a.len(), &w, out.len())?;
        gemm_f32(a, &w.dequantize(), s, out)
    }

    /// §4.4 on an already quantised activation: per 128-block exact FP8 products summed in
    /// f32, the block sum times both scales, summed over blocks in f32.
    pub fn gemm_fp8(a_q: &[u8], a_s: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
        const OP: &str = "gemm_fp8 (reference)";
        check_len(OP, "a_q", a_q.len(), checked_mul(OP, "a_q", s.m, s.k)?)?;
        s.validate(OP, GemmPath::Fp8, a_q.len(), &w, out.len())?;
        let kb_n = s.k / BLOCK;
        check_len(OP, "a_s", a_s.len(), s.m * kb_n)?;
        for m in 0..s.m {
            for n in 0..s.n {
                let mut total = 0f32;
                for kb in 0..kb_n {
                    let mut block = 0f32;
                    for k in kb * BLOCK..(kb + 1) * BLOCK {
                        block += fp8::decode_e4m3(a_q[m * s.k + k]) * fp8::decode_e4m3(w.data()[n * s.k + k]);
                    }
                    total += block * a_s[m * kb_n + kb] * w.scale_at(n, kb * BLOCK);
                }
                out[m * s.n + n] = total;
            }
        }
        Ok(())
    }

    /// Either path on an f32 activation (the fp8 path quantises it with the reference quantiser).
    pub fn gemm(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, path: GemmPath, out: &mut [f32]) -> Result<()> {
        match path {
            GemmPath::Reference => gemm_dequant(a, w, s, out),
            GemmPath::Fp8 => {
                s.validate("gemm (reference)", path, a.len(), &w, out.len())?;
                let qs = ActQuantShape { rows: s.m, cols: s.k };
                let (mut q, mut sc) = (vec![0u8; a.len()], vec![0f32; s.m * qs.tiles()]);
                fp8::reference::act_quant(a, qs, ScaleFmt::Float, &mut q, &mut sc)?;
                gemm_fp8(&q, &sc, w, s, out)
            }
        }
    }

    /// Grouped, contiguous layout: expert `e` multiplies rows `offsets[e]..offsets[e+1]`.
    pub fn grouped_contiguous(a: &[f32], offsets: &[u32], w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
        let g = GroupedShape::contiguous("grouped_contiguous (reference)", a.len(), offsets, &shapes(w), out.len())?;
        for e in 0..w.len() {
            let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
            let s = GemmShape { m: r1 - r0, n: g.n, k: g.k };
            gemm(&a[r0 * g.k..r1 * g.k], w[e], s, path, &mut out[r0 * g.n..r1 * g.n])?;
        }
        Ok(())
    }

    /// Grouped, masked layout: `a` is `[E, capacity, K]`, expert `e` multiplies its first
    /// `counts[e]` rows; the other rows of `out` are zero.
    pub fn grouped_masked(
        a: &[f32],
        counts: &[u32],
        capacity: usize,
        w: &[Fp8WeightRef<'_>],
        path: GemmPath,
        out: &mut [f32],
    ) -> Result<()> {
        let g = GroupedShape::masked("grouped_masked (reference)", a.len(), counts, capacity, &shapes(w), out.len())?;
        out.fill(0.0);
        for e in 0..w.len() {
            let rows = counts[e] as usize;
            let (a0, o0) = (e * capacity * g.k, e * capacity * g.n);
            let s = GemmShape { m: rows, n: g.n, k: g.k };
            gemm(&a[a0..a0 + rows * g.k], w[e], s, path, &mut out[o0..o0 + rows * g.n])?;
        }
        Ok(())
    }
}

/// The common (n, k) of a grouped GEMM, validated (CPU and CUDA alike: the checks take the
/// experts' weight shapes `(rows, cols)`).
pub(crate) struct GroupedShape {
    pub n: usize,
    pub k: usize,
}

/// `(rows, cols)` of each weight.
fn shapes(w: &[Fp8WeightRef<'_>]) -> Vec<(usize, usize)> {
    w.iter().map(|x| (x.rows(), x.cols())).collect()
}

impl GroupedShape {
    fn common(op: &'static str, w: &[(usize, usize)]) -> Result<GroupedShape> {
        let &(n, k) = w.first().ok_or_else(|| shape_err(op, "no experts"))?;
        if let Some(e) = w.iter().position(|x| x.0 != n || x.1 != k) {
            return Err(shape_err(op, format!("expert {e} weight is [{}, {}], expert 0 is [{n}, {k}]", w[e].0, w[e].1)));
        }
        Ok(GroupedShape { n, k })
    }

    pub(crate) fn contiguous(op: &'static str, a: usize, offsets: &[u32], w: &[(usize, usize)], out: usize) -> Result<GroupedShape> {
        let g = Self::common(op, w)?;
        check_len(op, "offsets", offsets.len(), w.len() + 1)?;
        if offsets[0] != 0 || offsets.windows(2).any(|p| p[1] < p[0]) {
            return Err(invalid(op, "offsets", "must start at 0 and never decrease"));
        }
        let rows = offsets[w.len()] as usize;
        check_len(op, "a", a, checked_mul(op, "a", rows, g.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", rows, g.n)?)?;
        Ok(g)
    }

    pub(crate) fn masked(op: &'static str, a: usize, counts: &[u32], cap: usize, w: &[(usize, usize)], out: usize) -> Result<GroupedShape> {
        let g = Self::common(op, w)?;
        check_len(op, "counts", counts.len(), w.len())?;
        if let Some(e) = counts.iter().position(|&c| c as usize > cap) {
            return Err(invalid(op, "counts", format!("expert {e} has {} rows, capacity is {cap}", counts[e])));
        }
        let rows = checked_mul(op, "a", w.len(), cap)?;
        check_len(op, "a", a, checked_mul(op, "a", rows, g.k)?)?;
        check_len(op, "out", out, checked_mul(op, "out", rows, g.n)?)?;
        Ok(g)
    }
}

// ---------------------------------------------------------------------------------------------
// Fast CPU kernels.
// ---------------------------------------------------------------------------------------------

/// Rows of W one task owns (decoded per 128-block into an L1-resident tile).
const NC: usize = 16;
/// Rows of A one task owns.
const MC: usize = 64;

/// The activation side of the core: f32 values and, on the fp8 path, their tile scales.
#[derive(Clone, Copy)]
struct ASide<'a> {
    /// `[rows, k]`: f32 activations (reference path) or decoded FP8 codes (fp8 path).
    x: &'a [f32],
    /// `[rows, k/128]` tile scales (fp8 path only).
    scales: Option<&'a [f32]>,
}

/// One GEMM of the grouped or dense drivers: rows `r0..r1` of the activation against one weight.
#[derive(Clone, Copy)]
struct Job<'a> {
    a: ASide<'a>,
    w: Fp8WeightRef<'a>,
    /// First output row in the caller's output buffer.
    out_row: usize,
    m: usize,
}

/// Dense GEMM on either path. `a` is `[m, k]` f32, `out` is `[m, n]`.
pub fn gemm(a: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, path: GemmPath, out: &mut [f32]) -> Result<()> {
    s.validate("gemm", path, a.len(), &w, out.len())?;
    let prepared = prepare_a("gemm", a, s.m, s.k, path)?;
    let job = Job { a: prepared.side(a), w, out_row: 0, m: s.m };
    run_jobs(&[job], s.n, s.k, out);
    Ok(())
}

/// The fp8 path on an activation that is already quantised (codes + 1x128 scales).
pub fn gemm_fp8_quantized(a_q: &[u8], a_s: &[f32], w: Fp8WeightRef<'_>, s: GemmShape, out: &mut [f32]) -> Result<()> {
    const OP: &str = "gemm_fp8_quantized";
    s.validate(OP, GemmPath::Fp8, a_q.len(), &w, out.len())?;
    check_len(OP, "a_s", a_s.len(), s.m * (s.k / BLOCK))?;
    let x = decode_codes(a_q);
    let job = Job { a: ASide { x: &x, scales: Some(a_s) }, w, out_row: 0, m: s.m };
    run_jobs(&[job], s.n, s.k, out);
    Ok(())
}

/// Grouped GEMM, contiguous layout (see [`reference::grouped_contiguous`]).
pub fn grouped_contiguous(a: &[f32], offsets: &[u32], w: &[Fp8WeightRef<'_>], path: GemmPath, out: &mut [f32]) -> Result<()> {
    const OP: &str = "grouped_contiguous";
    let g = GroupedShape::contiguous(OP, a.len(), offsets, &shapes(w), out.len())?;
    let rows = offsets[w.len()] as usize;
    if path == GemmPath::Fp8 && !g.k.is_multiple_of(BLOCK) {
        return Err(shape_err(OP, format!("the fp8 path needs k % 128 == 0, got k = {}", g.k)));
    }
    let prepared = prepare_a(OP, a, rows, g.k, path)?;
    let side = prepared.side(a);
    let jobs: Vec<Job<'_>> = (0..w.len())
        .filter(|&e| offsets[e + 1] > offsets[e])
        .map(|e| {
            let (r0, r1) = (offsets[e] as usize, offsets[e + 1] as usize);
            Job { a: side.rows(r0, r1, g.k), w: w[e], out_row: r0, m: r1 - r0 }
        })
        .collect();
    run_jobs(&jobs, g.n, g.k, out);
    Ok(())
}

/// Grouped GEMM, masked layout (see [`reference::grouped_masked`]).
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

/// Splits every job into (row chunk, column chunk) tiles, runs them in parallel, and writes
/// each tile into `out` (`[total rows, n]`). Jobs of at most 4 rows (the matrix-vector path)
/// get column chunks of a few hundred rows, so each thread streams long runs of weight bytes;
/// larger jobs get [`NC`]-row chunks, whose decoded weights stay in L2.
fn run_jobs(jobs: &[Job<'_>], n: usize, k: usize, out: &mut [f32]) {
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
                n.div_ceil(threads * 4 * jobs.len()).next_multiple_of(NC).clamp(NC, 512)
            } else if transposed[j].is_some() && job.m >= MC {
                AVX512_TILE_N
            } else {
                NC
            };
            let mc = mc_of(job);
            (0..job.m.div_ceil(mc)).flat_map(move |i| (0..n.div_ceil(nc)).map(move |c| (j, i * mc, c * nc, ((c + 1) * nc).min(n))))
        })
        .collect();
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map(|&(j, m0, n0, n1)| {
            let job = &jobs[j];
            let m1 = (m0 + mc_of(job)).min(job.m);
            let mut tile = vec![0f32; (m1 - m0) * (n1 - n0)];
            core_tile(job, transposed[j].as_ref(), k, m0, m1, n0, n1, &mut tile);
            tile
        })
        .collect();
    // Scatter the tiles (disjoint rectangles of `out`).
    for (&(j, m0, n0, n1), tile) in tiles.iter().zip(&results) {
        let row0 = jobs[j].out_row + m0;
        for (i, row) in tile.chunks_exact(n1 - n0).enumerate() {
            out[(row0 + i) * n + n0..(row0 + i) * n + n1].copy_from_slice(row);
        }
    }
}

/// Computes `tile[m - m0][n - n0]` for one job over all of K, one 128-block at a time: the
/// weight block is decoded into an L1 tile, each (m, n) block dot is summed in f32 and then
/// scaled by the block's scale(s) into the f32 total.
#[allow(clippy::too_many_arguments)] // the tile's rectangle is four plain indices
fn core_tile(job: &Job<'_>, at: Option<&ATiles>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = isa_level();
        if level == IsaLevel::Avx512 {
            // SAFETY: the CPU was checked at run time to have avx512f, avx512bw, avx2, fma and
            // f16c; `at` is the job's transposed activation whenever the tile path runs
            // (`avx512_tiles`).
            return unsafe {
                match at {
                    Some(at) => avx512::tile(job, at, k, m0, m1, n0, n1, tile),
                    None => avx512::matvec(job, k, m0, m1, n0, n1, tile),
                }
            };
        }
        if level >= IsaLevel::Avx2Fma {
            // SAFETY: `avx2::core_tile` needs avx2 + fma + f16c, which the CPU was checked to have.
            return unsafe { avx2::core_tile(job, k, m0, m1, n0, n1, tile) };
        }
    }
    core_tile_body(job, k, m0, m1, n0, n1, tile)
}

/// Weight rows of one AVX-512 tile task when the job has at least [`MC`] rows: each 128-block
/// of activations (64 rows, 32 KiB) is reused across this many weight rows while it sits in
/// L1 (fewer rows keep [`NC`], measured faster there). Divides 128.
const AVX512_TILE_N: usize = 64;

/// Rows up to which an AVX-512 job runs on the matrix-vector path (in chunks of 4).
const AVX512_MATVEC_ROWS: usize = 8;

/// Whether the AVX-512 matrix-vector path can run (K a whole number of 128-blocks).
fn avx512_matvec(k: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa_level() == IsaLevel::Avx512 && k.is_multiple_of(BLOCK)
}

/// Whether `job` runs on the AVX-512 tile path (more than [`AVX512_MATVEC_ROWS`] rows, or a
/// K that is not a whole number of 128-blocks), which reads its activations as [`ATiles`].
fn avx512_tiles(job: &Job<'_>, k: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa_level() == IsaLevel::Avx512 && (job.m > AVX512_MATVEC_ROWS || !k.is_multiple_of(BLOCK))
}

/// A job's activation rows transposed in groups of 16 (the last padded with zero rows):
/// `x[g][k][16]` holds rows `16g..16g+16` at each K index, `s[g][kb][16]` their 1x128 scales
/// (fp8 path). The AVX-512 tile kernel loads 16 rows' values at one K index as one vector.
struct ATiles {
    x: Vec<f32>,
    s: Option<Vec<f32>>,
}

impl ATiles {
    fn new(job: &Job<'_>, k: usize) -> ATiles {
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
fn core_tile_body(job: &Job<'_>, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
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
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
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

/// The AVX2 + FMA kernel: same blocking and the same per-block scaling as the portable body,
/// with the decode and the dot products written in intrinsics so that they are vectorised
/// whatever the optimiser decides.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, Job, blocks, decode_fast};
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

    /// See [`super::core_tile`]. Up to 4 rows of A: the matrix-vector path, which streams each
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
}

/// The AVX-512 matrix-vector path (M <= 4, K a multiple of 128): 32 FP8 codes per step,
/// decoded with one widening load, a shift pair and a mask into f16, then two 16-lane F16C
/// conversions. Same per-128 promotion as the AVX2 kernels.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ATiles, BLOCK, Job, blocks, decode_fast};
    use crate::simd::avx512::{load16, store16};
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
        let w_scales = job.w.scale_inv();
        let data = job.w.data();
        let mut total = [[_mm512_setzero_ps(); R]; MR];
        for kb in 0..kb_n {
            let j0 = kb * BLOCK;
            let mut acc = [[[_mm512_setzero_ps(); 2]; R]; MR];
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
                        acc[r][c][0] = _mm512_fmadd_ps(load16(&a[r][j0 + q * 32..]), w0, acc[r][c][0]);
                        acc[r][c][1] = _mm512_fmadd_ps(load16(&a[r][j0 + q * 32 + 16..]), w1, acc[r][c][1]);
                    }
                }
            }
            for c in 0..R {
                // x 256 undoes the decoder's 2^-8 (exact: a power of two).
                let ws = w_scales[(ns[c] / BLOCK) * kb_n + kb] * 256.0;
                for r in 0..MR {
                    let s = match job.a.scales {
                        Some(sc) => sc[(m0 + r) * kb_n + kb] * ws,
                        None => ws,
                    };
                    total[r][c] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][c][0], acc[r][c][1]), _mm512_set1_ps(s), total[r][c]);
                }
            }
        }
        let mut out = [[0f32; R]; MR];
        for r in 0..MR {
            for c in 0..R {
                out[r][c] = _mm512_reduce_add_ps(total[r][c]);
            }
        }
        out
    }

    /// The tile path at 16 lanes (more than [`super::AVX512_MATVEC_ROWS`] activation rows, or a
    /// ragged K), in outer-product form. Per 128-block of K, the task's weight rows are decoded
    /// (units of 2^-8, row-major, 8-32 KiB) and every group of 16 activation rows
    /// ([`ATiles`]: transposed, one vector per K index) runs over them in register tiles of 4
    /// weight rows x 64 activation rows (4 vector loads and 4 broadcast weights feed 16 FMAs
    /// per K step; 8 x 32 or 8 x 16 for the last groups). Each block's sums are promoted into
    /// f32 totals with the two scales, as the reference does; every (row, column) sum runs in
    /// K order in its own lane, so a row's result does not depend on the other rows of the
    /// call.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)] // the tile's rectangle is four plain indices
    pub(super) fn tile(job: &Job<'_>, at: &ATiles, k: usize, m0: usize, m1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
        let nw = n1 - n0;
        let kb_n = blocks(k);
        let w_scales = job.w.scale_inv();
        // Row groups of 16 (m0 is a multiple of 16: MC is); totals `[nw][groups * 16]`.
        let (g0, g1) = (m0 / 16, m1.div_ceil(16));
        let rp = (g1 - g0) * 16;
        let mut tot = vec![0f32; nw * rp];
        // One 128-block of the task's weight rows at a time, decoded (units of 2^-8) into
        // `wt [nw][128]`, L1/L2-resident while every row group of the task runs over it.
        let mut wt = vec![0f32; nw * BLOCK];
        for kb in 0..kb_n {
            let (k0, k1) = (kb * BLOCK, ((kb + 1) * BLOCK).min(k));
            let kl = k1 - k0;
            for (n, dst) in (n0..n1).zip(wt.chunks_exact_mut(BLOCK)) {
                let src = &job.w.data()[n * k + k0..n * k + k1];
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
                let done = kl - codes.remainder().len();
                for (d, &b) in dst[done..kl].iter_mut().zip(codes.remainder()) {
                    *d = decode_fast(b) * (1.0 / 256.0);
                }
            }
            let mut g = g0;
            while g < g1 {
                let b = Blocks { at, wt: &wt, w_scales, k, kb_n, kb, kl, n0, nw, g0, g, rp };
                g += match g1 - g {
                    1 => b.run::<8, 1>(&mut tot),
                    2 | 3 => b.run::<8, 2>(&mut tot),
                    _ => b.run::<4, 4>(&mut tot),
                };
            }
        }
        let off = m0 - g0 * 16;
        for r in 0..m1 - m0 {
            for c in 0..nw {
                tile[r * nw + c] = tot[c * rp + off + r];
            }
        }
    }

    /// One 128-block `kb` of [`tile`] for the row groups `g..g + MV`: per group of `NR` weight
    /// rows of `wt [nw][128]`, [`outer`] and the promotion into the totals `tot [nw][rp]`.
    struct Blocks<'a> {
        at: &'a ATiles,
        wt: &'a [f32],
        w_scales: &'a [f32],
        k: usize,
        kb_n: usize,
        kb: usize,
        /// Columns of K in the block (128, or fewer in a ragged last block).
        kl: usize,
        n0: usize,
        nw: usize,
        g0: usize,
        g: usize,
        rp: usize,
    }

    impl Blocks<'_> {
        /// Returns `MV`, the row groups done.
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        fn run<const NR: usize, const MV: usize>(&self, tot: &mut [f32]) -> usize {
            let (k, kb_n, kb, g) = (self.k, self.kb_n, self.kb, self.g);
            let sv: [__m512; MV] = std::array::from_fn(|v| match &self.at.s {
                Some(sc) => load16(&sc[((g + v) * kb_n + kb) * 16..]),
                None => _mm512_set1_ps(1.0),
            });
            let mut c = 0;
            while c < self.nw {
                // Fewer than NR weight rows left: the last one stands in; its sums are unused.
                let nr = (self.nw - c).min(NR);
                let row = |i: usize| c + i.min(nr - 1);
                let w: [&[f32]; NR] = std::array::from_fn(|i| &self.wt[row(i) * BLOCK..row(i) * BLOCK + self.kl]);
                let acc = outer::<NR, MV>(&self.at.x, g, k, kb * BLOCK, w);
                for (i, acc) in acc.iter().enumerate().take(nr) {
                    // x 256 undoes the decoder's 2^-8 (exact: a power of two).
                    let ws = _mm512_set1_ps(self.w_scales[((self.n0 + row(i)) / BLOCK) * kb_n + kb] * 256.0);
                    for v in 0..MV {
                        let at = (c + i) * self.rp + (g - self.g0 + v) * 16;
                        let t = _mm512_fmadd_ps(acc[v], _mm512_mul_ps(sv[v], ws), load16(&tot[at..]));
                        store16(&mut tot[at..], t);
                    }
                }
                c += nr;
            }
            MV
        }
    }

    /// `acc[i][v]` = Σ over the block's K of `w[i][kk]` times activation rows `16(g + v)..+16`
    /// at `k0 + kk` (`x` is [`ATiles::x`]): `NR x MV` accumulators, one lane per (row, column).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn outer<const NR: usize, const MV: usize>(x: &[f32], g: usize, k: usize, k0: usize, w: [&[f32]; NR]) -> [[__m512; MV]; NR] {
        let kl = w[0].len();
        let w: [&[f32]; NR] = std::array::from_fn(|i| &w[i][..kl]);
        let xs: [&[f32]; MV] = std::array::from_fn(|v| &x[((g + v) * k + k0) * 16..((g + v) * k + k0 + kl) * 16]);
        let mut acc = [[_mm512_setzero_ps(); MV]; NR];
        for kk in 0..kl {
            // SAFETY: every `xs[v]` holds `kl * 16` values and `kk < kl`, so the 16 read are in
            // bounds; loadu has no alignment requirement.
            let xv: [__m512; MV] = std::array::from_fn(|v| unsafe { _mm512_loadu_ps(xs[v].as_ptr().add(kk * 16)) });
            for i in 0..NR {
                // SAFETY: every `w[i]` was sliced to exactly `kl` values above and `kk < kl`.
                let b = _mm512_set1_ps(unsafe { *w[i].get_unchecked(kk) });
                for v in 0..MV {
                    acc[i][v] = _mm512_fmadd_ps(b, xv[v], acc[i][v]);
                }
            }
        }
        acc
    }
}
