//! The whole model (docs/model.md §3.1), written once against the op-level `Backend` trait:
//! embedding, the layer stack (dense MLP layers first, MoE after), final norm, `lm_head`.
//!
//! Every layer is `h ← h + MLA(RMSNorm_in(h))`, then `h ← h + FFN(RMSNorm_post(h))`; the
//! residual add of the next norm is fused ([`Backend::add_rms_norm`]). Attention runs in the
//! expanded form when a step appends several tokens to a sequence (prefill, chunked prefill)
//! and in the weight-absorbed form on the paged latent cache when every sequence appends one
//! token (batched decode).
//!
//! **Numerical hazards.** A step refuses, before any work, token ids outside the vocabulary
//! and positions past `max_position_embeddings`. A non-finite activation never becomes silent
//! garbage: the final hidden state of every step is checked (one pass over `[tokens,
//! hidden]`), and `DSV3_CHECK_FINITE=layers` (or [`Model::set_finite_check`]) checks the
//! output of every attention and MLP, so the error names the layer that produced it; an
//! error raised inside a layer (the fp8 path's activation quantiser refuses NaN and ±inf)
//! names its layer too. A decode step on a GPU, which reads nothing back until its end,
//! checks the final hidden state through its sampled logits (`Model::decode_into`).

use crate::checkpoint::Checkpoint;
use crate::config::{LayerKind, ModelConfig};
use crate::error::{Result, RuntimeError};
use crate::profile::{DecodeBytes, Part, Profile};
use dsv3_kernels::Backend;
use dsv3_kernels::a2a::EpLayout;
use dsv3_kernels::embed::EmbedShape;
use dsv3_kernels::fp8::{Fp8Weight, ScaleFmt};
use dsv3_kernels::gemm::{GemmPath, GemmShape};
use dsv3_kernels::norm::RowsShape;
use dsv3_kernels::sample::{SampleRow, SampleShape};
use dsv3_mla::{CacheConfig, HostQProj, MlaConfig, MlaContext, MlaHostWeights, MlaWeights, PagedLatentCache, SeqId, StepPlan};
use dsv3_moe::{DenseMlp, DenseMlpConfig, GroupedLayout, MlpWeights, MoeConfig, MoeLayer, MoeWeights, Transport};
use half::bf16;
use std::sync::Arc;

/// The MLP of one layer.
#[derive(Debug)]
enum Ffn<B: Backend> {
    Dense(DenseMlp<B>),
    Moe(Box<MoeLayer<B>>),
}

/// One decoder layer on a backend.
#[derive(Debug)]
pub(crate) struct Layer<B: Backend> {
    input_norm: B::Buf<f32>,
    attn: MlaWeights<B>,
    post_norm: B::Buf<f32>,
    ffn: Ffn<B>,
}

/// Which form of attention a forward step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnForm {
    /// Absorbed when every sequence appends one token (decode), expanded otherwise (prefill).
    #[default]
    Auto,
    /// The weight-absorbed form on the paged cache for any number of new tokens. Each row is
    /// then computed exactly as a one-token decode step computes it (the kernels are
    /// row-independent), which speculative verification relies on: accepting a draft gives
    /// the bits plain decoding gives.
    Absorbed,
    /// The expanded form for any number of new tokens, as a prefill computes them: each row
    /// exactly as a one-shot prefill of its sequence computes it (the serving engine runs
    /// prompt chunks this way, one-token chunks included).
    Expanded,
}

/// What [`Model::decode_into`] reads: the step's plan, its token ids and sampling rows on the
/// backend, and the ids that may be sampled.
pub(crate) struct DecodeInputs<'a, B: Backend> {
    pub plan: &'a StepPlan<B>,
    pub ids: &'a B::Buf<u32>,
    pub rows: &'a B::Buf<SampleRow>,
    pub allowed: usize,
}

impl<B: Backend> Clone for DecodeInputs<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for DecodeInputs<'_, B> {}

/// Numbers the models of a process ([`Model::instance`]).
static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where a step looks for non-finite activations (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FiniteCheck {
    /// No check.
    Off,
    /// The final hidden state (cheap: one pass over it).
    #[default]
    Final,
    /// Every attention and MLP output too, naming the layer (a debugging mode).
    Layers,
}

impl FiniteCheck {
    /// From `DSV3_CHECK_FINITE` (`off`, `final`, `layers`; unset: `final`).
    pub fn from_env() -> Result<FiniteCheck> {
        match std::env::var("DSV3_CHECK_FINITE").as_deref() {
            Err(_) | Ok("") | Ok("final") => Ok(FiniteCheck::Final),
            Ok("layers") => Ok(FiniteCheck::Layers),
            Ok("off") => Ok(FiniteCheck::Off),
            Ok(other) => Err(RuntimeError::Request(format!("DSV3_CHECK_FINITE={other}: expected off, final or layers"))),
        }
    }
}

/// Errors if `x` (`[rows, width]`) holds a NaN or an infinity, naming `at` and the first one.
pub(crate) fn check_finite<B: Backend>(b: &B, x: &B::Buf<f32>, width: usize, at: impl FnOnce() -> String) -> Result<()> {
    let v = b.download(x)?;
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(RuntimeError::NonFinite { at: at(), row: i / width.max(1), col: i % width.max(1), value: v[i] }),
    }
}

/// A loaded model on backend `B`.
#[derive(Debug)]
pub struct Model<B: Backend> {
    instance: u64,
    cfg: ModelConfig,
    mla: MlaConfig,
    ctx: MlaContext<B>,
    embed: Arc<B::Buf<bf16>>,
    layers: Vec<Layer<B>>,
    norm: B::Buf<f32>,
    lm_head: Arc<B::DenseWeight>,
    head_mode: LmHead,
    profile: Arc<Profile>,
    /// Whether `lm_head` carries its int8 copy (made once, by the first [`LmHead::Int8`]).
    screened: bool,
    path: GemmPath,
    check: FiniteCheck,
}

/// How decode steps multiply by `lm_head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LmHead {
    /// The bf16 weight as the checkpoint ships it: every logit exact (the default).
    #[default]
    Exact,
    /// An int8 copy of the weight (one scale per row) screens the vocabulary and only the rows
    /// that can hold a row's maximum are recomputed from bf16
    /// ([`dsv3_kernels::bf16_gemm::gemm_bf16_screened`]): greedy tokens are those of
    /// [`LmHead::Exact`] bit for bit, and sampling sees exact logits for the likely tokens and
    /// int8 estimates for the tail. Half the `lm_head` bytes per decode step; CPU only.
    Int8,
}

impl std::str::FromStr for LmHead {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" | "bf16" => Ok(LmHead::Exact),
            "int8" => Ok(LmHead::Int8),
            _ => Err(format!("unknown lm_head mode \"{s}\", expected exact or int8")),
        }
    }
}

/// Which routed experts a process loads: expert-parallel rank `rank` of `n_ranks` holds the
/// contiguous experts `rank * E/n_ranks ..` (all of them when `n_ranks` is 1). Only those
/// experts' tensors are read from the (memory-mapped) checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShard {
    pub n_ranks: usize,
    pub rank: usize,
}

impl ExpertShard {
    /// Every expert, on one rank.
    pub const ALL: ExpertShard = ExpertShard { n_ranks: 1, rank: 0 };

    /// The expert layout of a model with `n_experts` routed experts.
    pub fn layout(self, n_experts: usize) -> EpLayout {
        EpLayout { n_ranks: self.n_ranks, n_experts }
    }
}

impl<B: Backend> Layer<B> {
    /// Decoder block `l` (a main layer or an MTP module's block) from `model.layers.{l}`.
    pub(crate) fn load(b: &B, ck: &Checkpoint, cfg: &ModelConfig, mla: &MlaConfig, l: usize, path: GemmPath) -> Result<Layer<B>> {
        Self::load_shard(b, ck, cfg, mla, l, path, ExpertShard::ALL)
    }

    /// [`Layer::load`] holding only the routed experts of `shard` (an MoE layer).
    pub(crate) fn load_shard(
        b: &B,
        ck: &Checkpoint,
        cfg: &ModelConfig,
        mla: &MlaConfig,
        l: usize,
        path: GemmPath,
        shard: ExpertShard,
    ) -> Result<Layer<B>> {
        let h = cfg.hidden_size;
        let p = format!("model.layers.{l}");
        let w = Weights { ck, fmt: cfg.scale_fmt() };
        let attn = MlaWeights::new(b, mla, &load_attention(&w, &format!("{p}.self_attn"), mla)?)?;
        let ffn = match cfg.layer_kind(l) {
            LayerKind::Dense => {
                let dc = DenseMlpConfig { hidden: h, intermediate: cfg.intermediate_size, gemm_path: path };
                Ffn::Dense(DenseMlp::new(b, dc, &load_mlp(&w, &format!("{p}.mlp"), &dc)?)?)
            }
            LayerKind::Moe => {
                let mw = load_moe(&w, &format!("{p}.mlp"), cfg, path, shard)?;
                let layout = shard.layout(cfg.n_routed_experts);
                Ffn::Moe(Box::new(MoeLayer::new_rank(b, moe_config(cfg, path), &mw, layout, shard.rank)?))
            }
        };
        Ok(Layer {
            input_norm: b.upload(&ck.norm_weight(&format!("{p}.input_layernorm.weight"), h)?)?,
            attn,
            post_norm: b.upload(&ck.norm_weight(&format!("{p}.post_attention_layernorm.weight"), h)?)?,
            ffn,
        })
    }
}

/// Runs `x [T, hidden]` (the stack's input, not yet normalised) through `layers`, whose caches
/// are layers `0..` of `cache` under `plan`, and returns `final_norm(h)` of the last hidden
/// state. The residual add of each next norm is fused ([`Backend::add_rms_norm`]). With `ep`,
/// the MoE layers hold one expert-parallel rank's experts and run through that transport.
pub(crate) struct Stack<'a, B: Backend> {
    pub ctx: &'a MlaContext<B>,
    pub layers: &'a [Layer<B>],
    pub final_norm: &'a B::Buf<f32>,
    pub hidden: usize,
    pub eps: f32,
    /// The model layer index of `layers[0]` (0, or `num_hidden_layers` for the MTP block).
    pub first_layer: usize,
    pub check: FiniteCheck,
    pub ep: Option<&'a dyn Transport>,
    /// Where the sub-layers' times go, if anywhere.
    pub profile: Option<&'a Profile>,
}

impl<B: Backend> Stack<'_, B> {
    fn time<T>(&self, part: Part, f: impl FnOnce() -> T) -> T {
        match self.profile {
            Some(p) => p.time(part, f),
            None => f(),
        }
    }

    pub fn run(&self, b: &B, cache: &mut PagedLatentCache<B>, plan: &StepPlan<B>, x: B::Buf<f32>, absorbed: bool) -> Result<B::Buf<f32>> {
        let t = plan.tokens();
        // `residual` holds h; `x` holds the output of the last sub-layer, still to be added.
        let mut residual = b.zeros::<f32>(t * self.hidden)?;
        let x = self.run_layers(b, cache, plan, x, &mut residual, absorbed)?;
        self.final_norm(b, &x, &mut residual, t)
    }

    /// `final_norm(residual + x)` of `t` rows (`residual` becomes the sum), checked for
    /// non-finite values unless the check is off.
    pub fn final_norm(&self, b: &B, x: &B::Buf<f32>, residual: &mut B::Buf<f32>, t: usize) -> Result<B::Buf<f32>> {
        let mut normed = b.zeros::<f32>(t * self.hidden)?;
        b.add_rms_norm(x, residual, self.final_norm, RowsShape { rows: t, cols: self.hidden }, self.eps, &mut normed)?;
        if self.check != FiniteCheck::Off {
            let last = self.first_layer + self.layers.len();
            check_finite(b, &normed, self.hidden, || {
                format!("the final hidden state (after layers {}..{last}; DSV3_CHECK_FINITE=layers names the layer)", self.first_layer)
            })?;
        }
        Ok(normed)
    }

    /// The layers alone: the hidden state enters and leaves as `residual` plus `x` (the last
    /// sub-layer's output, not yet added), so a pipeline stage can hand both to the next.
    pub fn run_layers(
        &self,
        b: &B,
        cache: &mut PagedLatentCache<B>,
        plan: &StepPlan<B>,
        mut x: B::Buf<f32>,
        residual: &mut B::Buf<f32>,
        absorbed: bool,
    ) -> Result<B::Buf<f32>> {
        let t = plan.tokens();
        let rows = RowsShape { rows: t, cols: self.hidden };
        let mut normed = b.zeros::<f32>(t * self.hidden)?;
        let mut attn_out = b.zeros::<f32>(t * self.hidden)?;
        let layers = self.check == FiniteCheck::Layers;
        for (l, layer) in self.layers.iter().enumerate() {
            let at = self.first_layer + l;
            let in_layer = |e: RuntimeError| RuntimeError::Layer { layer: at, source: Box::new(e) };
            let mut lc = cache.layer(plan, l)?;
            self.time(Part::Attention, || {
                b.add_rms_norm(&x, residual, &layer.input_norm, rows, self.eps, &mut normed).map_err(RuntimeError::from)?;
                if absorbed {
                    layer.attn.decode(b, self.ctx, &mut lc, &normed, &mut attn_out).map_err(RuntimeError::from)
                } else {
                    layer.attn.prefill(b, self.ctx, &mut lc, &normed, &mut attn_out).map_err(RuntimeError::from)
                }
            })
            .map_err(in_layer)?;
            if layers {
                check_finite(b, &attn_out, self.hidden, || format!("layer {at} attention output"))?;
            }
            let part = if matches!(layer.ffn, Ffn::Dense(_)) { Part::DenseMlp } else { Part::Moe };
            x = self
                .time(part, || {
                    b.add_rms_norm(&attn_out, residual, &layer.post_norm, rows, self.eps, &mut normed).map_err(RuntimeError::from)?;
                    match (&layer.ffn, self.ep) {
                        (Ffn::Dense(mlp), _) => mlp.forward(b, &normed, t).map_err(RuntimeError::from),
                        (Ffn::Moe(moe), None) => moe.forward_y(b, &normed, t).map_err(RuntimeError::from),
                        (Ffn::Moe(moe), Some(ep)) => moe.forward_ep(b, ep, &normed, t).map(|o| o.y).map_err(RuntimeError::from),
                    }
                })
                .map_err(in_layer)?;
            if layers {
                check_finite(b, &x, self.hidden, || format!("layer {at} MLP output"))?;
            }
        }
        Ok(x)
    }

    /// A step in which this expert-parallel rank has no tokens: it still serves its experts
    /// in every MoE layer's two all-to-alls (its peers' tokens come through them).
    pub fn serve_experts(&self, b: &B) -> Result<()> {
        let Some(ep) = self.ep else { return Ok(()) };
        let none = b.zeros::<f32>(0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            if let Ffn::Moe(moe) = &layer.ffn {
                moe.forward_ep(b, ep, &none, 0)
                    .map_err(|e| RuntimeError::Layer { layer: self.first_layer + l, source: Box::new(e.into()) })?;
            }
        }
        Ok(())
    }
}

/// The attention shape of a model config.
pub fn mla_config(cfg: &ModelConfig) -> MlaConfig {
    MlaConfig {
        hidden: cfg.hidden_size,
        n_heads: cfg.num_attention_heads,
        q_lora_rank: cfg.q_lora_rank,
        kv_lora_rank: cfg.kv_lora_rank,
        qk_nope_head_dim: cfg.qk_nope_head_dim,
        qk_rope_head_dim: cfg.qk_rope_head_dim,
        v_head_dim: cfg.v_head_dim,
        rope: cfg.rope_cfg(),
        max_position: cfg.max_position_embeddings,
        rms_eps: cfg.latent_norm_eps(),
    }
}

/// The MoE shape of a model config.
pub fn moe_config(cfg: &ModelConfig, path: GemmPath) -> MoeConfig {
    MoeConfig {
        hidden: cfg.hidden_size,
        moe_intermediate: cfg.moe_intermediate_size,
        n_routed_experts: cfg.n_routed_experts,
        n_shared_experts: cfg.n_shared_experts,
        route: cfg.route_cfg(),
        gemm_path: path,
        layout: GroupedLayout::Contiguous,
    }
}

/// The checkpoint's projection weights, tagged with the activation scale format of its
/// `quantization_config` (`ue8m0` for V3.1 and later) for the fp8 GEMM path.
struct Weights<'a> {
    ck: &'a Checkpoint,
    fmt: ScaleFmt,
}

impl Weights<'_> {
    fn fp8(&self, name: &str, rows: usize, cols: usize) -> Result<Fp8Weight> {
        Ok(self.ck.fp8_weight(name, rows, cols)?.with_act_scale_fmt(self.fmt))
    }
}

fn load_mlp(w: &Weights<'_>, prefix: &str, cfg: &DenseMlpConfig) -> Result<MlpWeights> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let gate = w.fp8(&format!("{prefix}.gate_proj.weight"), i, h)?;
    let up = w.fp8(&format!("{prefix}.up_proj.weight"), i, h)?;
    let down = w.fp8(&format!("{prefix}.down_proj.weight"), h, i)?;
    Ok(MlpWeights::new(cfg, prefix, gate, up, down)?)
}

fn load_attention(w: &Weights<'_>, p: &str, c: &MlaConfig) -> Result<MlaHostWeights> {
    let ck = w.ck;
    let q = match c.q_lora_rank {
        Some(r) => HostQProj::Lora {
            q_a_proj: w.fp8(&format!("{p}.q_a_proj.weight"), r, c.hidden)?,
            q_a_layernorm: ck.norm_weight(&format!("{p}.q_a_layernorm.weight"), r)?,
            q_b_proj: w.fp8(&format!("{p}.q_b_proj.weight"), c.q_dim(), r)?,
        },
        None => HostQProj::Direct { q_proj: w.fp8(&format!("{p}.q_proj.weight"), c.q_dim(), c.hidden)? },
    };
    let kv_b_rows = c.n_heads * (c.qk_nope_head_dim + c.v_head_dim);
    Ok(MlaHostWeights {
        q,
        kv_a_proj_with_mqa: w.fp8(&format!("{p}.kv_a_proj_with_mqa.weight"), c.kv_lora_rank + c.qk_rope_head_dim, c.hidden)?,
        kv_a_layernorm: ck.norm_weight(&format!("{p}.kv_a_layernorm.weight"), c.kv_lora_rank)?,
        kv_b_proj: w.fp8(&format!("{p}.kv_b_proj.weight"), kv_b_rows, c.kv_lora_rank)?,
        o_proj: w.fp8(&format!("{p}.o_proj.weight"), c.hidden, c.o_dim())?,
    })
}

impl<B: Backend> Model<B> {
    /// Loads the main model (layers `0..num_hidden_layers`; the MTP layer is not read) from a
    /// checkpoint whose tensors were validated against `cfg`.
    pub fn load(b: &B, ck: &Checkpoint, cfg: &ModelConfig, path: GemmPath) -> Result<Model<B>> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let check = FiniteCheck::from_env()?;
        if path == GemmPath::Fp8 && !b.supports_act_scale_fmt(cfg.scale_fmt()) {
            return Err(RuntimeError::Config {
                file: ck.dir().join("config.json").display().to_string(),
                field: "quantization_config.scale_fmt".into(),
                detail: format!(
                    "{:?} activation scales on the fp8 GEMM path are not implemented on the {} backend (the reference path works)",
                    cfg.scale_fmt(),
                    b.name()
                ),
            });
        }
        let mla = mla_config(cfg);
        let ctx = MlaContext::new(b, mla, path)?;
        let embed_w = ck.bf16_weight("model.embed_tokens.weight", v, h)?;
        let embed = Arc::new(b.upload(embed_w.view().data())?);
        drop(embed_w);
        let layers = (0..cfg.num_hidden_layers).map(|l| Layer::load(b, ck, cfg, &mla, l, path)).collect::<Result<Vec<_>>>()?;
        let norm = b.upload(&ck.norm_weight("model.norm.weight", h)?)?;
        let lm_head = Arc::new(b.upload_dense_weight(ck.bf16_weight("lm_head.weight", v, h)?.view())?);
        ck.finish_progress();
        let instance = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Model {
            instance,
            cfg: cfg.clone(),
            mla,
            ctx,
            embed,
            layers,
            norm,
            lm_head,
            head_mode: LmHead::Exact,
            screened: false,
            profile: Arc::default(),
            path,
            check,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn gemm_path(&self) -> GemmPath {
        self.path
    }

    /// Sets how decode steps and [`Model::sample`] multiply by `lm_head` (before an MTP module
    /// that shares it is loaded). [`Model::logits`] stays exact either way.
    pub fn set_lm_head(&mut self, b: &B, mode: LmHead) -> Result<()> {
        if mode == LmHead::Int8 && !self.screened {
            self.lm_head = Arc::new(b.screen_dense_weight(&self.lm_head)?);
            self.screened = true;
        }
        self.head_mode = mode;
        Ok(())
    }
    pub fn lm_head_mode(&self) -> LmHead {
        self.head_mode
    }

    /// Where steps look for non-finite activations (default: `DSV3_CHECK_FINITE`, else the
    /// final hidden state).
    pub fn set_finite_check(&mut self, check: FiniteCheck) {
        self.check = check;
    }
    pub fn finite_check(&self) -> FiniteCheck {
        self.check
    }

    /// This model among the models of the process (a captured step reads the weights of the
    /// model it was captured with: [`crate::decode::DecodeRunner`] checks it).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// A paged latent cache for this model with room for `tokens` tokens in all.
    pub fn new_cache(&self, b: &B, tokens: usize) -> Result<PagedLatentCache<B>> {
        self.new_cache_with(b, tokens, 0)
    }

    /// [`Model::new_cache`] that also holds the pad rows of decode steps of up to `pad_rows`
    /// rows ([`PagedLatentCache::plan_decode_padded`]; what [`crate::decode::DecodeRunner`]
    /// needs to replay graphs per batch-size bucket).
    pub fn new_cache_with(&self, b: &B, tokens: usize, pad_rows: usize) -> Result<PagedLatentCache<B>> {
        let pages = tokens.div_ceil(dsv3_mla::PAGE_SIZE).max(1);
        Ok(PagedLatentCache::new(b, CacheConfig::for_model(&self.mla, self.layers.len(), pages).with_pad_rows(pad_rows))?)
    }

    /// One forward step: appends `tokens` of each `(sequence, tokens)` to the cache and
    /// returns the final-norm hidden states `[Σ tokens, hidden]` of every new position, in
    /// batch order. Token ids are checked against the vocabulary before anything changes.
    pub fn forward_hidden(&self, b: &B, cache: &mut PagedLatentCache<B>, batch: &[(SeqId, &[u32])]) -> Result<B::Buf<f32>> {
        self.forward_hidden_with(b, cache, batch, AttnForm::Auto)
    }

    /// [`Model::forward_hidden`] with the attention form chosen by the caller.
    pub fn forward_hidden_with(
        &self,
        b: &B,
        cache: &mut PagedLatentCache<B>,
        batch: &[(SeqId, &[u32])],
        form: AttnForm,
    ) -> Result<B::Buf<f32>> {
        let ids: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let sizes: Vec<(SeqId, usize)> = batch.iter().map(|(s, toks)| (*s, toks.len())).collect();
        self.check_step(cache, &ids, &sizes)?;
        let absorbed = match form {
            AttnForm::Auto => batch.iter().all(|(_, toks)| toks.len() == 1),
            AttnForm::Absorbed => true,
            AttnForm::Expanded => false,
        };
        b.run_step(|| {
            let step = crate::decode::StepScope::begin(b)?;
            let x = self.embed(b, &ids)?;
            let plan = cache.plan(b, &sizes)?;
            let hidden = self.stack().run(b, cache, &plan, x, absorbed)?;
            step.end()?;
            Ok(hidden)
        })
    }

    /// The absorbed step on inputs already on the backend ([`DecodeInputs`]), through
    /// sampling: embeds `ids` (`[plan.tokens()]`), runs every layer on `plan` (one token per
    /// entry), multiplies every row by `lm_head` and samples row `i` by `rows[i]` into
    /// `out[i]`, ids below `allowed`.
    /// Reads nothing back: what [`crate::decode::DecodeRunner`] runs, or captures as a graph.
    /// The caller checked the step ([`Model::check_step`]) and holds the step scope.
    ///
    /// The finite check of the final hidden state ([`FiniteCheck::Final`]) on a backend that
    /// defers its checks to the step's end ([`Backend::defers_checks`]: a GPU) is the
    /// sampler's: an infinity entering the final RMS norm leaves it as a NaN, a NaN in a row
    /// of the final hidden state makes every logit of that row NaN, and the sampling kernel
    /// reports a NaN logit among the step's deferred checks ([`crate::decode::DecodeRunner`] names it as
    /// [`RuntimeError::NonFinite`]). Elsewhere (the CPU) the stack checks it directly, as
    /// [`Model::forward_hidden`] does. [`FiniteCheck::Layers`] reads every layer's output
    /// back, so the runner runs that debugging mode eagerly, never as a graph.
    pub(crate) fn decode_into(&self, b: &B, cache: &mut PagedLatentCache<B>, x: DecodeInputs<'_, B>, out: &mut B::Buf<u32>) -> Result<()> {
        let DecodeInputs { plan, ids, rows, allowed } = x;
        let (t, h, vocab) = (plan.tokens(), self.cfg.hidden_size, self.cfg.vocab_size);
        let mut x = b.zeros::<f32>(t * h)?;
        b.embedding(&self.embed, EmbedShape { vocab, dim: h }, ids, &mut x)?;
        let mut stack = self.stack();
        if stack.check == FiniteCheck::Final && b.defers_checks() {
            stack.check = FiniteCheck::Off;
        }
        let hidden = stack.run(b, cache, plan, x, true)?;
        self.profile.time(Part::Head, || {
            let mut logits = b.zeros::<f32>(t * vocab)?;
            let shape = GemmShape { m: t, n: vocab, k: h };
            head_gemm(b, &self.lm_head, &hidden, shape, self.head_mode == LmHead::Int8, &mut logits)?;
            b.sample_rows(&logits, SampleShape { rows: t, vocab, allowed }, rows, out)?;
            Ok(())
        })
    }

    /// Refuses a step before any work: an id outside the vocabulary, or a sequence that would
    /// pass `max_position_embeddings`.
    pub(crate) fn check_step(&self, cache: &PagedLatentCache<B>, ids: &[u32], sizes: &[(SeqId, usize)]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(RuntimeError::TokenId { id: bad as u64, vocab_size: self.cfg.vocab_size });
        }
        let max = self.cfg.max_position_embeddings;
        for &(seq, n) in sizes {
            let len = cache.seq_len(seq)?;
            if len.checked_add(n).is_none_or(|end| end > max) {
                return Err(RuntimeError::Request(format!(
                    "sequence {seq}: positions {len}..{} pass max_position_embeddings = {max} (config.json); nothing was computed",
                    len.saturating_add(n)
                )));
            }
        }
        Ok(())
    }

    /// Embedding rows of `ids` (checked against the vocabulary).
    pub(crate) fn embed(&self, b: &B, ids: &[u32]) -> Result<B::Buf<f32>> {
        embed_ids(b, &self.embed, &self.cfg, ids)
    }

    fn stack(&self) -> Stack<'_, B> {
        Stack {
            ctx: &self.ctx,
            layers: &self.layers,
            final_norm: &self.norm,
            hidden: self.cfg.hidden_size,
            eps: self.cfg.norm_eps(),
            first_layer: 0,
            check: self.check,
            ep: None,
            profile: Some(&self.profile),
        }
    }

    /// `logits [rows, vocab] = hidden[rows] · lm_headᵀ` for the given rows of `hidden`,
    /// copied to the host (what `dsv3 logits` writes; a decode step samples on the backend
    /// instead: [`Model::sample`]).
    pub fn logits(&self, b: &B, hidden: &B::Buf<f32>, rows: &[usize]) -> Result<Vec<f32>> {
        head_logits(b, &self.lm_head, hidden, self.cfg.hidden_size, self.cfg.vocab_size, rows)
    }

    /// One token for each of the given rows of `hidden`, row `rows[i]` drawn by `params[i]`
    /// (ids below `allowed`), on the backend: the logits stay there and only the ids come back.
    /// The same tokens as [`crate::generate::Sampler::sample`] on [`Model::logits`] with the
    /// same parameters and uniforms.
    pub fn sample(&self, b: &B, hidden: &B::Buf<f32>, rows: &[usize], params: &[SampleRow], allowed: usize) -> Result<Vec<u32>> {
        if params.len() != rows.len() {
            return Err(RuntimeError::Request(format!("{} sampling rows for {} hidden rows", params.len(), rows.len())));
        }
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let logits = head_logits_buf(b, &self.lm_head, hidden, h, vocab, rows, self.head_mode == LmHead::Int8)?;
        let p = b.upload(params)?;
        let mut out = b.zeros::<u32>(rows.len())?;
        b.sample_rows(&logits, SampleShape { rows: rows.len(), vocab, allowed }, &p, &mut out)?;
        Ok(b.download(&out)?)
    }

    pub fn mla_config(&self) -> &MlaConfig {
        &self.mla
    }
    pub(crate) fn mla_context(&self) -> &MlaContext<B> {
        &self.ctx
    }
    pub(crate) fn embed_table(&self) -> Arc<B::Buf<bf16>> {
        self.embed.clone()
    }
    pub(crate) fn lm_head(&self) -> Arc<B::DenseWeight> {
        self.lm_head.clone()
    }

    /// Bytes of weights one decode step reads: [`decode_weight_bytes`] of its config.
    pub fn decode_weight_bytes(&self) -> usize {
        self.decode_bytes().total()
    }

    /// [`Model::decode_weight_bytes`] per part of the step.
    pub fn decode_bytes(&self) -> DecodeBytes {
        let (h, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut b = decode_bytes(&self.cfg);
        if self.head_mode == LmHead::Int8 {
            // int8 codes and an f32 scale per row instead of bf16 (the recomputed rows: ~0).
            b.head = (h + 4) * v;
        }
        b
    }

    /// The step profile ([`crate::profile`]): off until enabled.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Bytes of weights a decode step of `batch` sequences reads: every dense tensor once, and
    /// per MoE layer the routed experts the batch touches, `E · (1 - (1 - top_k/E)^batch)`
    /// of them in expectation when tokens pick experts uniformly (`top_k` at batch 1: exactly
    /// [`Model::decode_weight_bytes`]). The numerator of batched decode GB/s; the cache reads
    /// (a few hundred KiB per sequence at short contexts) are not counted.
    pub fn decode_weight_bytes_for(&self, batch: usize) -> f64 {
        let c = &self.cfg;
        let (e, k) = (c.n_routed_experts as f64, c.num_experts_per_tok as f64);
        if batch <= 1 || c.n_routed_experts == 0 {
            return self.decode_weight_bytes() as f64;
        }
        let touched = e * (1.0 - (1.0 - k / e).powi(batch as i32));
        let moe_layers = (0..c.num_hidden_layers).filter(|&l| c.layer_kind(l) == LayerKind::Moe).count() as f64;
        let expert = 3.0 * c.hidden_size as f64 * c.moe_intermediate_size as f64;
        self.decode_weight_bytes() as f64 + moe_layers * expert * (touched - k)
    }
}

/// Bytes of weights one decode step reads (every dense tensor, plus `top_k` of the routed
/// experts per MoE layer at one token): the numerator of decode GB/s.
pub fn decode_weight_bytes(c: &ModelConfig) -> usize {
    decode_bytes(c).total()
}

/// [`decode_weight_bytes`] per part of the step (the bf16 `lm_head`).
pub fn decode_bytes(c: &ModelConfig) -> DecodeBytes {
    let (h, i, m) = (c.hidden_size, c.intermediate_size, c.moe_intermediate_size);
    let attn = {
        let q = match c.q_lora_rank {
            Some(r) => r * h + c.num_attention_heads * c.qk_head_dim() * r,
            None => c.num_attention_heads * c.qk_head_dim() * h,
        };
        // kv_b as the two absorbed bf16 matrices.
        q + (c.kv_lora_rank + c.qk_rope_head_dim) * h
            + 2 * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank
            + h * c.num_attention_heads * c.v_head_dim
    };
    let mut bytes = DecodeBytes { attention: 0, dense_mlp: 0, moe: 0, head: 2 * h * c.vocab_size };
    for l in 0..c.num_hidden_layers {
        bytes.attention += attn;
        match c.layer_kind(l) {
            LayerKind::Dense => bytes.dense_mlp += 3 * h * i,
            LayerKind::Moe => bytes.moe += 3 * h * m * (c.num_experts_per_tok + c.n_shared_experts) + 2 * h * c.n_routed_experts,
        }
    }
    bytes
}

/// Rows of the embedding `table` for `ids` (checked against the vocabulary).
pub(crate) fn embed_ids<B: Backend>(b: &B, table: &B::Buf<bf16>, cfg: &ModelConfig, ids: &[u32]) -> Result<B::Buf<f32>> {
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(RuntimeError::TokenId { id: bad as u64, vocab_size: cfg.vocab_size });
    }
    let h = cfg.hidden_size;
    let mut x = b.zeros::<f32>(ids.len() * h)?;
    b.embedding(table, EmbedShape { vocab: cfg.vocab_size, dim: h }, &b.upload(ids)?, &mut x)?;
    Ok(x)
}

/// Rows `rows` of a `[_, width]` buffer, as a new buffer.
pub fn select_rows<B: Backend>(b: &B, x: &B::Buf<f32>, width: usize, rows: &[usize]) -> Result<B::Buf<f32>> {
    let all = b.download(x)?;
    let mut picked = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        let row = all.get(r * width..(r + 1) * width).ok_or_else(|| RuntimeError::Request(format!("no hidden row {r}")))?;
        picked.extend_from_slice(row);
    }
    Ok(b.upload(&picked)?)
}

/// `logits [rows, vocab] = hidden[rows] · headᵀ`, copied to the host.
pub(crate) fn head_logits<B: Backend>(
    b: &B,
    head: &B::DenseWeight,
    hidden: &B::Buf<f32>,
    width: usize,
    vocab: usize,
    rows: &[usize],
) -> Result<Vec<f32>> {
    Ok(b.download(&head_logits_buf(b, head, hidden, width, vocab, rows, false)?)?)
}

/// `logits [rows, vocab] = hidden[rows] · headᵀ` on the backend.
pub(crate) fn head_logits_buf<B: Backend>(
    b: &B,
    head: &B::DenseWeight,
    hidden: &B::Buf<f32>,
    width: usize,
    vocab: usize,
    rows: &[usize],
    screened: bool,
) -> Result<B::Buf<f32>> {
    // Every row in order (each decode step): no copy of the hidden states.
    let all = rows.iter().enumerate().all(|(i, &r)| i == r) && b.len(hidden) == rows.len() * width;
    let picked = if all { None } else { Some(select_rows(b, hidden, width, rows)?) };
    let mut out = b.zeros::<f32>(rows.len() * vocab)?;
    let shape = GemmShape { m: rows.len(), n: vocab, k: width };
    head_gemm(b, head, picked.as_ref().unwrap_or(hidden), shape, screened, &mut out)?;
    Ok(out)
}

/// `out = a · headᵀ`: exact, or screened by the head's int8 copy ([`LmHead::Int8`]).
fn head_gemm<B: Backend>(
    b: &B,
    head: &B::DenseWeight,
    a: &B::Buf<f32>,
    shape: GemmShape,
    screened: bool,
    out: &mut B::Buf<f32>,
) -> Result<()> {
    if screened {
        b.gemm_dense_screened(a, head, shape, out)?
    } else {
        b.gemm_dense(a, head, shape, out)?
    }
    Ok(())
}

/// The router, bias, shared experts and the routed experts of `shard` of one MoE layer.
fn load_moe(w: &Weights<'_>, p: &str, cfg: &ModelConfig, path: GemmPath, shard: ExpertShard) -> Result<MoeWeights> {
    let ck = w.ck;
    let mc = moe_config(cfg, path);
    let h = cfg.hidden_size;
    let ec = DenseMlpConfig { hidden: h, intermediate: cfg.moe_intermediate_size, gemm_path: path };
    let router = ck.bf16_weight(&format!("{p}.gate.weight"), cfg.n_routed_experts, h)?;
    let bias =
        if cfg.has_router_bias() { Some(ck.f32_vec(&format!("{p}.gate.e_score_correction_bias"), cfg.n_routed_experts)?) } else { None };
    let layout = shard.layout(cfg.n_routed_experts);
    layout.validate().map_err(|e| RuntimeError::Request(format!("--ep {}: {e}", shard.n_ranks)))?;
    let mine = layout.local_experts(shard.rank);
    let first = mine.start;
    let experts = mine.map(|e| load_mlp(w, &format!("{p}.experts.{e}"), &ec).map(Arc::new)).collect::<Result<Vec<_>>>()?;
    let shared = if cfg.n_shared_experts > 0 {
        let sc = DenseMlpConfig { hidden: h, intermediate: cfg.shared_intermediate(), gemm_path: path };
        Some(load_mlp(w, &format!("{p}.shared_experts"), &sc)?)
    } else {
        None
    };
    Ok(MoeWeights::new(&mc, p, router, bias, first, experts, shared)?)
}
