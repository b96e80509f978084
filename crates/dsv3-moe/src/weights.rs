//! Host-side weights of the dense MLP and the MoE layer, checked against a config with
//! errors that name the checkpoint tensor, plus random weights for tests and benchmarks.
//!
//! Routed experts are held as `Arc<MlpWeights>`, so several expert ids may share one set of
//! weights. A checkpoint never does this (every expert is its own tensor); it is how the
//! benchmark builds a 256-expert layer at V3 widths from a few distinct random experts
//! ([`MoeWeights::random_cyclic`]). Backends upload each distinct `Arc` once
//! ([`crate::MoeLayer::new`]), so sharing also holds on the backend.

use crate::config::{DenseMlpConfig, MoeConfig};
use crate::error::{Result, config, weight};
use dsv3_kernels::bf16_gemm::Bf16Weight;
use dsv3_kernels::fp8::{AMAX_FLOOR, BLOCK, E4M3_MAX, Fp8Weight, blocks, encode_e4m3};
use dsv3_kernels::gating::RouteMethod;
use half::bf16;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// Checks that `w` is `[rows, cols]`, naming the tensor otherwise.
fn check_fp8(name: impl FnOnce() -> String, w: &Fp8Weight, rows: usize, cols: usize) -> Result<()> {
    if w.rows() != rows || w.cols() != cols {
        return Err(weight(name(), format!("shape [{}, {}], expected [{rows}, {cols}]", w.rows(), w.cols())));
    }
    Ok(())
}

/// The three FP8 projections of one SwiGLU MLP (`gate_proj`, `up_proj`: `[inter, hidden]`;
/// `down_proj`: `[hidden, inter]`), each with its 128x128 `weight_scale_inv`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpWeights {
    gate: Fp8Weight,
    up: Fp8Weight,
    down: Fp8Weight,
}

impl MlpWeights {
    /// Takes the three projections; `prefix` (e.g. `model.layers.0.mlp`) names them in errors.
    pub fn new(cfg: &DenseMlpConfig, prefix: &str, gate: Fp8Weight, up: Fp8Weight, down: Fp8Weight) -> Result<MlpWeights> {
        cfg.validate()?;
        let w = MlpWeights { gate, up, down };
        w.check(cfg, prefix)?;
        Ok(w)
    }

    /// Checks the shapes against `cfg`, naming `{prefix}.{gate,up,down}_proj.weight`.
    pub fn check(&self, cfg: &DenseMlpConfig, prefix: &str) -> Result<()> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        check_fp8(|| format!("{prefix}.gate_proj.weight"), &self.gate, i, h)?;
        check_fp8(|| format!("{prefix}.up_proj.weight"), &self.up, i, h)?;
        check_fp8(|| format!("{prefix}.down_proj.weight"), &self.down, h, i)
    }

    /// FP8-quantised random weights: entries ~ N(0, 1/in_features) (so activations keep
    /// their scale through each projection), quantised per 128x128 block as checkpoints are.
    /// Deterministic in `seed`; generated in parallel.
    pub fn random(cfg: &DenseMlpConfig, seed: u64) -> Result<MlpWeights> {
        cfg.validate()?;
        let (h, i) = (cfg.hidden, cfg.intermediate);
        Ok(MlpWeights {
            gate: random_fp8(i, h, seed_for(seed, 1))?,
            up: random_fp8(i, h, seed_for(seed, 2))?,
            down: random_fp8(h, i, seed_for(seed, 3))?,
        })
    }

    /// The three projections at the inner width `cfg.inner()` (zero-padded on the fp8 path
    /// when `intermediate` is not a multiple of 128; see [`DenseMlpConfig::inner`]).
    pub fn at_inner_width(&self, cfg: &DenseMlpConfig) -> Result<std::borrow::Cow<'_, MlpWeights>> {
        let (h, i) = (cfg.hidden, cfg.inner());
        if i == self.gate.rows() {
            return Ok(std::borrow::Cow::Borrowed(self));
        }
        Ok(std::borrow::Cow::Owned(MlpWeights {
            gate: self.gate.zero_padded(i, h)?,
            up: self.up.zero_padded(i, h)?,
            down: self.down.zero_padded(h, i)?,
        }))
    }

    pub fn gate(&self) -> &Fp8Weight {
        &self.gate
    }
    pub fn up(&self) -> &Fp8Weight {
        &self.up
    }
    pub fn down(&self) -> &Fp8Weight {
        &self.down
    }

    /// Bytes a forward pass reads: FP8 codes plus f32 block scales of the three projections.
    pub fn bytes(&self) -> usize {
        [&self.gate, &self.up, &self.down].iter().map(|w| fp8_bytes(w)).sum()
    }
}

/// Bytes of an FP8 weight: one per code plus four per 128x128 scale.
pub fn fp8_bytes(w: &Fp8Weight) -> usize {
    w.rows() * w.cols() + 4 * blocks(w.rows()) * blocks(w.cols())
}

/// The host weights of one MoE layer: router (`mlp.gate.weight`, bf16 `[E, hidden]`), its
/// correction bias (`mlp.gate.e_score_correction_bias`, f32 `[E]`, present exactly for
/// `noaux_tc`), the routed experts `first_expert..first_expert + experts.len()` (all of them,
/// or one expert-parallel rank's share), and the fused shared experts
/// (`mlp.shared_experts.*`, present exactly when `n_shared_experts > 0`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeWeights {
    router: Bf16Weight,
    bias: Option<Vec<f32>>,
    first_expert: usize,
    experts: Vec<Arc<MlpWeights>>,
    shared: Option<MlpWeights>,
}

impl MoeWeights {
    /// Checks every tensor against `cfg`; `prefix` (e.g. `model.layers.3.mlp`) names them in
    /// errors.
    pub fn new(
        cfg: &MoeConfig,
        prefix: &str,
        router: Bf16Weight,
        bias: Option<Vec<f32>>,
        first_expert: usize,
        experts: Vec<Arc<MlpWeights>>,
        shared: Option<MlpWeights>,
    ) -> Result<MoeWeights> {
        let w = MoeWeights { router, bias, first_expert, experts, shared };
        w.check(cfg, prefix)?;
        Ok(w)
    }

    /// Checks every tensor against `cfg` (what [`MoeWeights::new`] does), naming
    /// `{prefix}.gate.weight`, `{prefix}.experts.{e}.up_proj.weight`, ...
    pub fn check(&self, cfg: &MoeConfig, prefix: &str) -> Result<()> {
        let MoeWeights { router, bias, first_expert, experts, shared } = self;
        let first_expert = *first_expert;
        cfg.validate()?;
        let n = cfg.n_routed_experts;
        if router.rows() != n || router.cols() != cfg.hidden {
            return Err(weight(
                format!("{prefix}.gate.weight"),
                format!("shape [{}, {}], expected [{n}, {}]", router.rows(), router.cols(), cfg.hidden),
            ));
        }
        let bias_name = || format!("{prefix}.gate.e_score_correction_bias");
        match (cfg.route.method, bias) {
            (RouteMethod::NoauxTc, None) => return Err(weight(bias_name(), "missing (noaux_tc routing needs it)")),
            (RouteMethod::NoauxTc, Some(b)) => {
                if b.len() != n {
                    return Err(weight(bias_name(), format!("shape [{}], expected [{n}]", b.len())));
                }
                if let Some(e) = b.iter().position(|v| !v.is_finite()) {
                    return Err(weight(bias_name(), format!("entry {e} is {}, expected finite", b[e])));
                }
            }
            (_, Some(_)) => return Err(weight(bias_name(), "present, but only noaux_tc routing uses a bias")),
            (_, None) => {}
        }
        let end = first_expert.checked_add(experts.len()).filter(|&end| end <= n);
        if end.is_none() || experts.is_empty() {
            return Err(weight(
                format!("{prefix}.experts"),
                format!("experts {first_expert}..+{} must be a non-empty range inside 0..{n}", experts.len()),
            ));
        }
        let ecfg = cfg.expert_mlp();
        for (i, e) in experts.iter().enumerate() {
            e.check(&ecfg, &format!("{prefix}.experts.{}", first_expert + i))?;
        }
        match (cfg.shared_mlp(), shared) {
            (Some(scfg), Some(s)) => s.check(&scfg, &format!("{prefix}.shared_experts"))?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(weight(format!("{prefix}.shared_experts"), format!("missing (n_shared_experts = {})", cfg.n_shared_experts)));
            }
            (None, Some(_)) => return Err(weight(format!("{prefix}.shared_experts"), "present, but n_shared_experts = 0")),
        }
        Ok(())
    }

    /// Random weights with every expert distinct (see [`MoeWeights::random_cyclic`]).
    pub fn random(cfg: &MoeConfig, seed: u64) -> Result<MoeWeights> {
        Self::random_cyclic(cfg, seed, cfg.n_routed_experts)
    }

    /// Random weights in which `distinct` random experts serve all `n_routed_experts` ids
    /// cyclically (expert `e` shares the weights of expert `e % distinct`). Router ~
    /// N(0, 1/hidden) in bf16; bias (noaux_tc only) uniform in [-0.1, 0.1], small next to the
    /// sigmoid scores but large enough to change selections; FP8 projections as
    /// [`MlpWeights::random`].
    pub fn random_cyclic(cfg: &MoeConfig, seed: u64, distinct: usize) -> Result<MoeWeights> {
        cfg.validate()?;
        if distinct == 0 || distinct > cfg.n_routed_experts {
            return Err(config("n_routed_experts", format!("cannot be served by {distinct} distinct random experts")));
        }
        let (n, h) = (cfg.n_routed_experts, cfg.hidden);
        let std = 1.0 / (h as f32).sqrt();
        let mut rng = Rng::new(seed_for(seed, 10));
        let router = Bf16Weight::new(n, h, (0..n * h).map(|_| bf16::from_f32(rng.normal() * std)).collect())?;
        let bias = (cfg.route.method == RouteMethod::NoauxTc).then(|| (0..n).map(|_| 0.1 * rng.uniform()).collect());
        let ecfg = cfg.expert_mlp();
        let pool: Vec<Arc<MlpWeights>> =
            (0..distinct).map(|e| MlpWeights::random(&ecfg, seed_for(seed, 100 + e as u64)).map(Arc::new)).collect::<Result<_>>()?;
        let experts = (0..n).map(|e| Arc::clone(&pool[e % distinct])).collect();
        let shared = cfg.shared_mlp().map(|s| MlpWeights::random(&s, seed_for(seed, 20))).transpose()?;
        Self::new(cfg, "mlp", router, bias, 0, experts, shared)
    }

    /// The same weights with another router weight (checked like [`MoeWeights::new`]).
    pub fn with_router(self, cfg: &MoeConfig, router: Bf16Weight) -> Result<MoeWeights> {
        Self::new(cfg, "mlp", router, self.bias, self.first_expert, self.experts, self.shared)
    }

    /// This rank's share of the experts under `n_ranks`-way expert parallelism (router, bias
    /// and shared experts replicated), as a rank's loader would hold them.
    pub fn shard(&self, cfg: &MoeConfig, n_ranks: usize, rank: usize) -> Result<MoeWeights> {
        let n = cfg.n_routed_experts;
        if n_ranks == 0 || !n.is_multiple_of(n_ranks) || rank >= n_ranks {
            return Err(config("n_ranks", format!("rank {rank} of {n_ranks} ranks cannot own an equal share of {n} experts")));
        }
        let per = n / n_ranks;
        let want = rank * per..(rank + 1) * per;
        let have = self.expert_range();
        if want.start < have.start || want.end > have.end {
            return Err(weight("mlp.experts", format!("rank {rank} needs experts {want:?}, these weights hold {have:?}")));
        }
        let experts = self.experts[want.start - have.start..want.end - have.start].to_vec();
        Self::new(cfg, "mlp", self.router.clone(), self.bias.clone(), want.start, experts, self.shared.clone())
    }

    pub fn router(&self) -> &Bf16Weight {
        &self.router
    }
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// Global ids of the routed experts held.
    pub fn expert_range(&self) -> Range<usize> {
        self.first_expert..self.first_expert + self.experts.len()
    }
    /// The weights of global expert `e`, if held.
    pub fn expert(&self, e: usize) -> Option<&Arc<MlpWeights>> {
        e.checked_sub(self.first_expert).and_then(|i| self.experts.get(i))
    }
    /// The held experts, in id order from [`MoeWeights::expert_range`]`.start`.
    pub fn experts(&self) -> &[Arc<MlpWeights>] {
        &self.experts
    }
    pub fn shared(&self) -> Option<&MlpWeights> {
        self.shared.as_ref()
    }
    /// Number of distinct expert weight sets (fewer than the experts when they share).
    pub fn distinct_experts(&self) -> usize {
        let mut p: Vec<usize> = self.experts.iter().map(|e| Arc::as_ptr(e) as usize).collect();
        p.sort_unstable();
        p.dedup();
        p.len()
    }
}

// ------------------------------------------------------------------------------------------
// Random generation.
// ------------------------------------------------------------------------------------------

/// A sub-seed: splitmix64 of `seed` and a stream id.
fn seed_for(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64* generator; `normal()` is the Irwin–Hall sum of four uniforms, rescaled to unit
/// variance (support ±3.46: tails are lighter than a Gaussian's, which random test weights
/// do not need; one 64-bit draw per value keeps generating gigabytes of weights quick).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0
    }
    /// Approximately N(0, 1): four 16-bit uniforms of one draw, summed and rescaled.
    fn normal(&mut self) -> f32 {
        let x = self.next();
        let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // Each term is uniform on 0..65536 (mean 32767.5, variance ~2^32/12): the sum has mean
        // 131070 and variance ~2^32/3, so this is mean 0, variance 1.
        (s as f32 - 131_070.0) * (1.732_050_8 / 65_536.0)
    }
}

/// A random `[rows, cols]` FP8 weight with entries ~ N(0, 1/cols), quantised per 128x128
/// block (scale_inv = max(amax, 1e-4)/448, RNE codes), one 128-row band per task.
fn random_fp8(rows: usize, cols: usize, seed: u64) -> Result<Fp8Weight> {
    let std = 1.0 / (cols as f32).sqrt();
    let bc = blocks(cols);
    let bands: Vec<(Vec<u8>, Vec<f32>)> = (0..blocks(rows))
        .into_par_iter()
        .map(|band| {
            let mut rng = Rng::new(seed_for(seed, band as u64));
            let r = (rows - band * BLOCK).min(BLOCK);
            let vals: Vec<f32> = (0..r * cols).map(|_| rng.normal() * std).collect();
            let mut amax = vec![0f32; bc];
            for row in vals.chunks_exact(cols) {
                for (a, blk) in amax.iter_mut().zip(row.chunks(BLOCK)) {
                    *a = blk.iter().fold(*a, |m, v| m.max(v.abs()));
                }
            }
            let scale: Vec<f32> = amax.iter().map(|a| a.max(AMAX_FLOOR) / E4M3_MAX).collect();
            let inv: Vec<f32> = scale.iter().map(|s| 1.0 / s).collect();
            let mut codes = Vec::with_capacity(vals.len());
            for row in vals.chunks_exact(cols) {
                for (&r, blk) in inv.iter().zip(row.chunks(BLOCK)) {
                    codes.extend(blk.iter().map(|v| encode_e4m3(v * r)));
                }
            }
            (codes, scale)
        })
        .collect();
    let mut data = Vec::with_capacity(rows * cols);
    let mut scale_inv = Vec::with_capacity(blocks(rows) * bc);
    for (c, s) in bands {
        data.extend_from_slice(&c);
        scale_inv.extend_from_slice(&s);
    }
    Ok(Fp8Weight::new(rows, cols, data, scale_inv)?)
}
