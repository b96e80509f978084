//! One rank's part of the model: the layers of its pipeline stage with its lane's routed
//! experts, plus the embedding (first stage) or the final norm and `lm_head` (last stage).

use super::Layout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{ExpertShard, FiniteCheck, Layer, Stack, embed_ids, head_logits, mla_config};
use dsv3_kernels::Backend;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::{CacheConfig, MlaConfig, MlaContext, PagedLatentCache, SeqId};
use dsv3_moe::Transport;
use half::bf16;
use std::ops::Range;

/// The part of a model one rank of a [`Layout`] holds, on backend `B`.
#[derive(Debug)]
pub struct StageModel<B: Backend> {
    cfg: ModelConfig,
    mla: MlaConfig,
    ctx: MlaContext<B>,
    range: Range<usize>,
    embed: Option<B::Buf<bf16>>,
    layers: Vec<Layer<B>>,
    /// The final norm (a few KiB; every stage holds it so that the stack is the same type).
    norm: B::Buf<f32>,
    lm_head: Option<B::DenseWeight>,
    check: FiniteCheck,
}

/// What a stage computes on: token ids (first stage) or the previous stage's hidden state.
#[derive(Debug, Clone, PartialEq)]
pub enum StageInput {
    Ids(Vec<u32>),
    /// `residual` (the hidden state so far) and `x` (the last sub-layer's output, still to be
    /// added), each `[tokens, hidden]`.
    Hidden {
        x: Vec<f32>,
        residual: Vec<f32>,
    },
}

/// What a stage hands on: the hidden state to the next stage, or (last stage) logits.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    Hidden {
        x: Vec<f32>,
        residual: Vec<f32>,
    },
    /// `[rows, vocab]` of the rows asked for.
    Logits(Vec<f32>),
}

impl<B: Backend> StageModel<B> {
    /// Loads rank `rank`'s part of a checkpoint validated against `cfg`: the layers of its
    /// stage (routed experts of its lane only), the embedding if it is the first stage, the
    /// final norm and `lm_head` if it is the last. Tensors of other ranks are not read.
    pub fn load(b: &B, ck: &Checkpoint, cfg: &ModelConfig, path: GemmPath, layout: Layout, rank: usize) -> Result<StageModel<B>> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let check = FiniteCheck::from_env()?;
        let (stage, lane) = (layout.stage(rank), layout.lane(rank));
        let range = layout.layers(stage, cfg.num_hidden_layers);
        let mla = mla_config(cfg);
        let ctx = MlaContext::new(b, mla, path)?;
        let embed = if stage == 0 { Some(b.upload(ck.bf16_weight("model.embed_tokens.weight", v, h)?.view().data())?) } else { None };
        let shard = ExpertShard { n_ranks: layout.ep, rank: lane };
        let layers = range.clone().map(|l| Layer::load_shard(b, ck, cfg, &mla, l, path, shard)).collect::<Result<Vec<_>>>()?;
        let norm = b.upload(&ck.norm_weight("model.norm.weight", h)?)?;
        let last = stage + 1 == layout.pp;
        let lm_head = if last { Some(b.upload_dense_weight(ck.bf16_weight("lm_head.weight", v, h)?.view())?) } else { None };
        ck.finish_progress();
        Ok(StageModel { cfg: cfg.clone(), mla, ctx, range, embed, layers, norm, lm_head, check })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model layers this rank holds.
    pub fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    /// A latent cache for this stage's layers with room for `tokens` tokens.
    pub fn new_cache(&self, b: &B, tokens: usize) -> Result<PagedLatentCache<B>> {
        let pages = tokens.div_ceil(dsv3_mla::PAGE_SIZE).max(1);
        Ok(PagedLatentCache::new(b, CacheConfig::for_model(&self.mla, self.layers.len(), pages))?)
    }

    fn stack<'a>(&'a self, ep: Option<&'a dyn Transport>) -> Stack<'a, B> {
        Stack {
            ctx: &self.ctx,
            layers: &self.layers,
            final_norm: &self.norm,
            hidden: self.cfg.hidden_size,
            eps: self.cfg.norm_eps(),
            first_layer: self.range.start,
            check: self.check,
            ep,
            profile: None,
        }
    }

    /// One step of this stage for the sequences `batch` (`(sequence, new tokens)`), exactly
    /// the operations [`crate::model::Model::forward_hidden`] runs on these layers; the last
    /// stage returns the logits of `rows` (rows of the step, in batch order). With `ep`, the
    /// MoE layers run through that transport (every lane of the stage must call this, or
    /// [`StageModel::serve_experts`] when it has no tokens).
    pub fn step(
        &self,
        b: &B,
        ep: Option<&dyn Transport>,
        cache: &mut PagedLatentCache<B>,
        batch: &[(SeqId, usize)],
        input: StageInput,
        rows: &[usize],
    ) -> Result<StageOutput> {
        let t: usize = batch.iter().map(|x| x.1).sum();
        let n = t * self.cfg.hidden_size;
        let (x, mut residual) = match (input, &self.embed) {
            (StageInput::Ids(ids), Some(table)) if ids.len() == t => (embed_ids(b, table, &self.cfg, &ids)?, b.zeros::<f32>(n)?),
            (StageInput::Hidden { x, residual }, None) if x.len() == n && residual.len() == n => (b.upload(&x)?, b.upload(&residual)?),
            _ => {
                return Err(crate::error::RuntimeError::Request(format!(
                    "stage of layers {:?}: input does not match its role or the {t} tokens of the step",
                    self.range
                )));
            }
        };
        let plan = cache.plan(b, batch)?;
        let absorbed = batch.iter().all(|x| x.1 == 1);
        let stack = self.stack(ep);
        let x = stack.run_layers(b, cache, &plan, x, &mut residual, absorbed)?;
        match &self.lm_head {
            Some(head) => {
                let normed = stack.final_norm(b, &x, &mut residual, t)?;
                Ok(StageOutput::Logits(head_logits(b, head, &normed, self.cfg.hidden_size, self.cfg.vocab_size, rows)?))
            }
            None => Ok(StageOutput::Hidden { x: b.download(&x)?, residual: b.download(&residual)? }),
        }
    }

    /// A step in which this lane has no tokens: it serves its experts to the other lanes.
    pub fn serve_experts(&self, b: &B, ep: Option<&dyn Transport>) -> Result<()> {
        self.stack(ep).serve_experts(b)
    }
}
