//! The MLA forward pass of one layer over the paged latent cache, in both forms:
//!
//! * [`MlaWeights::prefill`], the expanded (naive) form of docs/model.md §3.3: every cached latent of
//!   the step's sequences is up-projected to per-head keys and values, and the new tokens
//!   attend causally by absolute position (so a chunk at positions `p0..p1` attends to the
//!   cached `0..p0` and to itself);
//! * [`MlaWeights::decode`], the weight-absorbed form of docs/model.md §3.7 on the paged cache: the
//!   query is absorbed into the latent space (`q̃ = W_UKᵀ q_nope`), scored against the 576-wide
//!   cache rows, and the latent output is up-projected (`o = W_UV ō`). Each new token is one
//!   decode row with its own length, so a batch may mix sequences of different lengths, and a
//!   sequence may contribute several tokens (speculative verification).
//!
//! Both write the step's new cache rows (`c_kv` after `kv_a_layernorm`, `k_pe` after RoPE)
//! before attending, and both end with `o_proj`. The input `x` is the layer input after
//! `input_layernorm`, `[T, hidden]` with `T = plan.tokens()` rows in the plan's order.

use crate::cache::LayerCache;
use crate::config::MlaConfig;
use crate::error::{Result, invalid};
use crate::weights::{MlaWeights, QPath};
use dsv3_kernels::Backend;
use dsv3_kernels::attention::{CacheWriteShape, DecodeParams, GatherShape, PrefillInputs, PrefillParams};
use dsv3_kernels::gemm::{GemmPath, GemmShape};
use dsv3_kernels::norm::RowsShape;
use dsv3_kernels::rope::RopeLayout;
use std::fmt;

/// What every layer's attention shares: the configuration, the RoPE table for positions
/// `0..max_position`, the softmax scale, and the GEMM path of the FP8 projections.
pub struct MlaContext<B: Backend> {
    cfg: MlaConfig,
    rope: B::Rope,
    scale: f32,
    path: GemmPath,
}

impl<B: Backend> fmt::Debug for MlaContext<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlaContext").field("cfg", &self.cfg).field("scale", &self.scale).field("path", &self.path).finish_non_exhaustive()
    }
}

impl<B: Backend> MlaContext<B> {
    /// Validates `cfg` for `path` and builds the RoPE table (about 42 MB for V3's 163840
    /// positions on the CPU backend).
    pub fn new(b: &B, cfg: MlaConfig, path: GemmPath) -> Result<Self> {
        cfg.validate_path(path)?;
        let rope = b.rope_table(&cfg.rope, cfg.max_position)?;
        Ok(MlaContext { cfg, rope, scale: cfg.softmax_scale()?, path })
    }
    pub fn config(&self) -> &MlaConfig {
        &self.cfg
    }
    /// The softmax scale of docs/model.md §3.6.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    pub fn path(&self) -> GemmPath {
        self.path
    }
}

fn gemm<B: Backend>(b: &B, a: &B::Buf<f32>, w: &B::Weight, m: usize, path: GemmPath) -> Result<B::Buf<f32>> {
    let (n, k) = b.weight_shape(w);
    let mut out = b.zeros::<f32>(m * n)?;
    b.gemm(a, w, GemmShape { m, n, k }, path, &mut out)?;
    Ok(out)
}

/// `op(hi) + op(lo)` for a weight held as a bf16 pair (see the weights module docs): two
/// outputs of `len` values, summed.
fn pair_product<B: Backend>(
    b: &B,
    len: usize,
    pair: &[B::DenseWeight; 2],
    op: impl Fn(&B::DenseWeight, &mut B::Buf<f32>) -> std::result::Result<(), dsv3_kernels::KernelError>,
) -> Result<B::Buf<f32>> {
    let (mut out, mut lo) = (b.zeros::<f32>(len)?, b.zeros::<f32>(len)?);
    op(&pair[0], &mut out)?;
    op(&pair[1], &mut lo)?;
    b.add_assign(&mut out, &lo)?;
    Ok(out)
}

impl<B: Backend> MlaWeights<B> {
    fn check_call(&self, b: &B, ctx: &MlaContext<B>, lc: &LayerCache<'_, B>, x: &B::Buf<f32>, out: &B::Buf<f32>) -> Result<usize> {
        if ctx.cfg != self.cfg {
            return Err(invalid("MlaContext", "built for a different MlaConfig than the weights"));
        }
        let c = &self.cfg;
        if lc.shape.kv_lora != c.kv_lora_rank || lc.shape.rope != c.qk_rope_head_dim {
            return Err(invalid(
                "cache",
                format!("rows are {} + {}, the layer needs {} + {}", lc.shape.kv_lora, lc.shape.rope, c.kv_lora_rank, c.qk_rope_head_dim),
            ));
        }
        let t = lc.plan.tokens();
        for (what, buf) in [("x", x), ("out", out)] {
            if b.len(buf) != t * c.hidden {
                return Err(invalid(what, format!("has {} values, expected tokens {t} × hidden {}", b.len(buf), c.hidden)));
            }
        }
        Ok(t)
    }

    /// Projections shared by both forms: returns `q [T, H, nope + rope]` with RoPE applied,
    /// after writing the new tokens' `[c_kv | k_pe]` rows into the layer's pool.
    fn project(&self, b: &B, ctx: &MlaContext<B>, lc: &mut LayerCache<'_, B>, x: &B::Buf<f32>, t: usize) -> Result<B::Buf<f32>> {
        let c = &self.cfg;
        let path = ctx.path;
        let mut q = match self.q_path() {
            QPath::Lora { a, norm, b: wb } => {
                let qa = gemm(b, x, a, t, path)?;
                let r = b.len(norm);
                let mut cq = b.zeros::<f32>(t * r)?;
                b.rms_norm(&qa, norm, RowsShape { rows: t, cols: r }, c.rms_eps, &mut cq)?;
                gemm(b, &cq, wb, t, path)?
            }
            QPath::Direct { q } => gemm(b, x, q, t, path)?,
        };
        let positions = &lc.plan.bufs.positions;
        b.apply_rope(&mut q, RopeLayout::q_pe(t, c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim), positions, &ctx.rope)?;
        let mut kv = gemm(b, x, &self.kv_a, t, path)?;
        b.apply_rope(&mut kv, RopeLayout::k_pe(t, c.kv_lora_rank, c.qk_rope_head_dim), positions, &ctx.rope)?;
        let shape = CacheWriteShape { tokens: t, pool: lc.shape };
        b.mla_cache_write(&kv, &self.kv_norm, c.rms_eps, &lc.plan.bufs.slots, shape, lc.pool)?;
        Ok(q)
    }

    /// The expanded (naive) form, docs/model.md §3.3 (module docs): `out [T, hidden]` for the plan's
    /// new tokens, whose cache rows it writes. Costs `O(keys · H · (nope + v) · kv_lora)` for
    /// the up-projection of every cached key of the step's sequences: meant for prefill.
    ///
    /// Errors: the weights, context and cache disagree on the config, a buffer of the wrong
    /// length, or a kernel error; the cache rows of the new tokens may then be written.
    pub fn prefill(&self, b: &B, ctx: &MlaContext<B>, lc: &mut LayerCache<'_, B>, x: &B::Buf<f32>, out: &mut B::Buf<f32>) -> Result<()> {
        let t = self.check_call(b, ctx, lc, x, out)?;
        let c = &self.cfg;
        let d = c.dims();
        let q = self.project(b, ctx, lc, x, t)?;
        let plan = lc.plan;
        let s = plan.keys();
        let (mut c_kv, mut k_pe) = (b.zeros::<f32>(s * c.kv_lora_rank)?, b.zeros::<f32>(s * c.qk_rope_head_dim)?);
        let gs = GatherShape { seqs: plan.entries().len(), max_blocks: plan.max_blocks(), keys: s, pool: lc.shape };
        b.mla_cache_gather(lc.pool, &plan.bufs.seq_table, &plan.bufs.seq_lens, gs, &mut c_kv, &mut k_pe)?;
        let k_nope = pair_product(b, s * c.n_heads * c.qk_nope_head_dim, &self.w_uk, |w, out| {
            b.gemm_dense(&c_kv, w, GemmShape { m: s, n: c.n_heads * c.qk_nope_head_dim, k: c.kv_lora_rank }, out)
        })?;
        let v = pair_product(b, s * c.o_dim(), &self.w_uv, |w, out| {
            b.gemm_dense(&c_kv, w, GemmShape { m: s, n: c.o_dim(), k: c.kv_lora_rank }, out)
        })?;
        let inputs = PrefillInputs {
            q: &q,
            k_nope: &k_nope,
            k_pe: &k_pe,
            v: &v,
            q_pos: &plan.bufs.positions,
            cu_q: &plan.bufs.cu_q,
            cu_k: &plan.bufs.cu_k,
        };
        let params = PrefillParams { dims: d, seqs: plan.entries().len(), tokens: t, keys: s, scale: ctx.scale };
        let mut attn = b.zeros::<f32>(t * c.o_dim())?;
        b.mla_prefill(inputs, &params, &mut attn)?;
        b.gemm(&attn, &self.o_proj, GemmShape { m: t, n: c.hidden, k: c.o_dim() }, ctx.path, out)?;
        Ok(())
    }

    /// The weight-absorbed form, docs/model.md §3.7 (module docs): `out [T, hidden]` for the plan's new
    /// tokens, whose cache rows it writes; each token attends to positions `0..=its own`.
    /// Costs `O(T · H · keys · (kv_lora + rope))`: meant for decode.
    ///
    /// Errors: as [`MlaWeights::prefill`].
    pub fn decode(&self, b: &B, ctx: &MlaContext<B>, lc: &mut LayerCache<'_, B>, x: &B::Buf<f32>, out: &mut B::Buf<f32>) -> Result<()> {
        let t = self.check_call(b, ctx, lc, x, out)?;
        let c = &self.cfg;
        let d = c.dims();
        let q = self.project(b, ctx, lc, x, t)?;
        let plan = lc.plan;
        let mut q_abs = b.zeros::<f32>(t * c.n_heads * c.latent_dim())?;
        b.mla_absorb_q(&q, &[&self.w_uk[0], &self.w_uk[1]], d, t, &mut q_abs)?;
        let params = DecodeParams { batch: t, heads: c.n_heads, max_blocks: plan.max_blocks(), pool: lc.shape, scale: ctx.scale };
        let mut o_lat = b.zeros::<f32>(t * c.n_heads * c.kv_lora_rank)?;
        let (table, kv_lens) = plan.decode_rows(b)?;
        b.mla_decode(&q_abs, lc.pool, table, kv_lens, &params, &mut o_lat)?;
        let mut attn = b.zeros::<f32>(t * c.o_dim())?;
        b.mla_expand_v_parts(&o_lat, &[&self.w_uv[0], &self.w_uv[1]], d, t, &mut attn)?;
        b.gemm(&attn, &self.o_proj, GemmShape { m: t, n: c.hidden, k: c.o_dim() }, ctx.path, out)?;
        Ok(())
    }
}
