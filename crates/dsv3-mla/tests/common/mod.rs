//! A host reference of MLA (docs/model.md §3.3, the naive form) with a **contiguous** per-sequence
//! latent cache, and helpers shared by the MLA tests.
//!
//! The reference shares only the weights (FP8 dequantised exactly; `W_UK`/`W_UV` rounded to
//! bf16 as the backend holds them) and the plain-loop reference kernels for the projections,
//! norms and RoPE. The cache, the per-head up-projection of every key, the scores, the softmax
//! and the weighted sums are its own, in f64.
#![allow(dead_code, unused_imports)] // each test crate uses a part of these

use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::{GemmPath, GemmShape, reference as gemm_ref};
use dsv3_kernels::norm::{RowsShape, reference as norm_ref};
use dsv3_kernels::rope::{self, RopeCfg, RopeLayout};
use dsv3_mla::*;

pub const B: Cpu = Cpu;

/// The YaRN parameters of V3 (factor 40, L₀ 4096, β 32/1, mscale 1/1) at any rope width.
pub fn yarn_rope(rope_dim: usize) -> RopeCfg {
    RopeCfg { rope_head_dim: rope_dim, ..RopeCfg::DEEPSEEK_V3 }
}

/// A small config: hidden 256, 4 heads, nope 32, v 32.
pub fn small_cfg(q_lora: Option<usize>, kv_lora: usize, rope: usize) -> MlaConfig {
    MlaConfig {
        hidden: 256,
        n_heads: 4,
        q_lora_rank: q_lora,
        kv_lora_rank: kv_lora,
        qk_nope_head_dim: 32,
        qk_rope_head_dim: rope,
        v_head_dim: 32,
        rope: yarn_rope(rope),
        max_position: 4096,
        rms_eps: 1e-6,
    }
}

/// The true V3 head widths (q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, V3 YaRN) with
/// 2 heads and hidden 512.
pub fn v3_widths_cfg() -> MlaConfig {
    MlaConfig { hidden: 512, n_heads: 2, ..MlaConfig::deepseek_v3() }
}

pub use dsv3_testutil::{max_abs, max_abs_diff};

/// Deterministic inputs in [-1, 1) (the layer input is RMS-normalised in the model; any
/// scale of order 1 exercises the same code).
pub fn inputs(seed: u64, n: usize) -> Vec<f32> {
    dsv3_testutil::uniform_vec(seed, n)
}

/// `max |got - want| <= rel · max |want|`, with a message naming the comparison; `want` must
/// not be all zeros (a comparison against nothing proves nothing).
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert!(max_abs(want) > 0.0, "{what}: reference is all zeros");
    dsv3_testutil::assert_close(got, want, rel, what);
}

/// The relative tolerance of every f32 comparison of the MLA tests.
pub const REL: f32 = 1e-4;

/// One engine: context, one layer of weights, a one-layer cache.
pub struct Engine {
    pub cfg: MlaConfig,
    pub ctx: MlaContext<Cpu>,
    pub w: MlaWeights<Cpu>,
    pub cache: PagedLatentCache<Cpu>,
}

impl Engine {
    pub fn new(cfg: MlaConfig, host: &MlaHostWeights, pages: usize, path: GemmPath) -> Engine {
        Engine {
            cfg,
            ctx: MlaContext::new(&B, cfg, path).unwrap(),
            w: MlaWeights::new(&B, &cfg, host).unwrap(),
            cache: PagedLatentCache::new(&B, CacheConfig::for_model(&cfg, 1, pages)).unwrap(),
        }
    }

    /// One step, expanded or absorbed form, over `batch` with rows `x`.
    pub fn step(&mut self, batch: &[(SeqId, usize)], x: &[f32], absorbed: bool) -> Vec<f32> {
        let plan = self.cache.plan(&B, batch).unwrap();
        let mut out = vec![0f32; x.len()];
        let mut lc = self.cache.layer(&plan, 0).unwrap();
        if absorbed {
            self.w.decode(&B, &self.ctx, &mut lc, &x.to_vec(), &mut out).unwrap();
        } else {
            self.w.prefill(&B, &self.ctx, &mut lc, &x.to_vec(), &mut out).unwrap();
        }
        out
    }
}

/// The naive reference layer (module docs).
pub struct HostRef {
    cfg: MlaConfig,
    host: MlaHostWeights,
    w_uk: Vec<f64>,
    w_uv: Vec<f64>,
    inv_freq: Vec<f32>,
    attn_factor: f32,
    scale: f64,
}

impl HostRef {
    pub fn new(cfg: &MlaConfig, host: &MlaHostWeights) -> HostRef {
        let (uk, uv) = host.absorbed(cfg).unwrap();
        HostRef {
            cfg: *cfg,
            host: host.clone(),
            w_uk: uk.iter().map(|&v| v as f64).collect(),
            w_uv: uv.iter().map(|&v| v as f64).collect(),
            inv_freq: rope::inv_freq(&cfg.rope).unwrap(),
            attn_factor: rope::attn_factor(cfg.rope.yarn.as_ref()),
            scale: rope::softmax_scale_f64(cfg.qk_head_dim(), cfg.rope.yarn.as_ref()).unwrap(),
        }
    }

    fn linear(w: &dsv3_kernels::fp8::Fp8Weight, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * w.rows()];
        gemm_ref::gemm(x, w.view(), GemmShape { m, n: w.rows(), k: w.cols() }, GemmPath::Reference, &mut out).unwrap();
        out
    }

    fn norm(x: &[f32], w: &[f32], m: usize, eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        norm_ref::rms_norm(x, w, RowsShape { rows: m, cols: w.len() }, eps, &mut out).unwrap();
        out
    }

    /// Appends `n` tokens (rows of `x`) to the contiguous `cache` (`[len, kv_lora + rope]`),
    /// at positions `len..len+n`, and returns the layer output `[n, hidden]`.
    pub fn step(&self, cache: &mut Vec<f32>, x: &[f32], n: usize) -> Vec<f32> {
        let c = &self.cfg;
        let (h_n, dn, dr, dv, l) = (c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let lw = l + dr;
        let start = cache.len() / lw;
        let positions: Vec<u32> = (start as u32..(start + n) as u32).collect();
        // Query: projection(s), then RoPE on the last `dr` values of each head.
        let mut q = match &self.host.q {
            HostQProj::Lora { q_a_proj, q_a_layernorm, q_b_proj } => {
                let cq = Self::norm(&Self::linear(q_a_proj, x, n), q_a_layernorm, n, c.rms_eps);
                Self::linear(q_b_proj, &cq, n)
            }
            HostQProj::Direct { q_proj } => Self::linear(q_proj, x, n),
        };
        rope::reference::apply_rope(&mut q, RopeLayout::q_pe(n, h_n, dn, dr), &positions, &self.inv_freq, self.attn_factor).unwrap();
        // Latent: projection, RoPE on k_pe, RMSNorm on c_kv, appended to the contiguous cache.
        let mut kv = Self::linear(&self.host.kv_a_proj_with_mqa, x, n);
        rope::reference::apply_rope(&mut kv, RopeLayout::k_pe(n, l, dr), &positions, &self.inv_freq, self.attn_factor).unwrap();
        for t in 0..n {
            let row = &kv[t * lw..(t + 1) * lw];
            cache.extend(Self::norm(&row[..l], &self.host.kv_a_layernorm, 1, c.rms_eps));
            cache.extend_from_slice(&row[l..]);
        }
        // Every key and value per head, k_nope = W_UK[h] c and v = W_UV[h] c, in f64.
        let s = start + n;
        let mut k_nope = vec![0f64; s * h_n * dn];
        let mut vals = vec![0f64; s * h_n * dv];
        for j in 0..s {
            let cj = &cache[j * lw..j * lw + l];
            for h in 0..h_n {
                for e in 0..dn {
                    k_nope[(j * h_n + h) * dn + e] = (0..l).map(|i| self.w_uk[(h * dn + e) * l + i] * cj[i] as f64).sum();
                }
                for e in 0..dv {
                    vals[(j * h_n + h) * dv + e] = (0..l).map(|i| self.w_uv[(h * dv + e) * l + i] * cj[i] as f64).sum();
                }
            }
        }
        // Causal attention by absolute position.
        let mut attn = vec![0f32; n * h_n * dv];
        for t in 0..n {
            let pos = start + t;
            for h in 0..h_n {
                let qh = &q[(t * h_n + h) * (dn + dr)..(t * h_n + h + 1) * (dn + dr)];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let nope: f64 = (0..dn).map(|e| qh[e] as f64 * k_nope[(j * h_n + h) * dn + e]).sum();
                        let pe: f64 = (0..dr).map(|e| qh[dn + e] as f64 * cache[j * lw + l + e] as f64).sum();
                        (nope + pe) * self.scale
                    })
                    .collect();
                let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let p: Vec<f64> = scores.iter().map(|&v| (v - m).exp()).collect();
                let sum: f64 = p.iter().sum();
                for e in 0..dv {
                    let o: f64 = p.iter().enumerate().map(|(j, &pj)| pj * vals[(j * h_n + h) * dv + e]).sum();
                    attn[(t * h_n + h) * dv + e] = (o / sum) as f32;
                }
            }
        }
        Self::linear(&self.host.o_proj, &attn, n)
    }
}
