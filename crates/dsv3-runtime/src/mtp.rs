//! The multi-token-prediction module (docs/model.md §3.10): layer `num_hidden_layers` of a V3
//! checkpoint, which predicts token `i + 2` from the main model's hidden state at position `i`
//! and token `i + 1`:
//!
//! ```text
//! e = Embed[t_{i+1}]
//! z = eh_proj([enorm(e) ; hnorm(h_i)])        embedding first, hidden second
//! y = decoder block (own MLA latent cache, RoPE at position i, own MoE)
//! logits = shared_head.norm(y) · shared_head.headᵀ
//! ```
//!
//! `h_i` is the main model's hidden state **after** `model.norm` (what feeds `lm_head`), as
//! vLLM and SGLang use it. `eh_proj` is held as its two `[hidden, hidden]` column halves, so
//! the concatenation is two GEMMs and an add; it is BF16 in DeepSeek's checkpoints, and may be
//! FP8 with a `weight_scale_inv` in converted ones (then dequantised exactly, as the BF16 form). The module's `embed_tokens` and
//! `shared_head.head` are full copies of the main embedding and `lm_head` in DeepSeek's
//! checkpoints: when they are byte-identical the main model's tensors are shared instead of
//! holding a second copy (1.85 GB each for V3).

use crate::checkpoint::{Checkpoint, LinearWeight};
use crate::config::ModelConfig;
use crate::error::{Result, RuntimeError};
use crate::model::{Layer, Model, Stack};
use dsv3_kernels::Backend;
use dsv3_kernels::dense::Bf16Weight;
use dsv3_kernels::embed::EmbedShape;
use dsv3_kernels::fp8::{BLOCK, Fp8Weight, blocks};
use dsv3_kernels::gemm::{GemmPath, GemmShape};
use dsv3_kernels::norm::RowsShape;
use dsv3_mla::{CacheConfig, PagedLatentCache, SeqId};
use half::bf16;
use std::sync::Arc;

/// One loaded MTP module on backend `B`.
#[derive(Debug)]
pub struct Mtp<B: Backend> {
    hidden: usize,
    vocab: usize,
    eps: f32,
    /// The module's own embedding, or the main model's when identical.
    embed: Arc<B::Buf<bf16>>,
    enorm: B::Buf<f32>,
    hnorm: B::Buf<f32>,
    /// `eh_proj` as its two column halves: `[:, ..hidden]` multiplies the normalised embedding,
    /// `[:, hidden..]` the normalised hidden state.
    eh: EhProj<B>,
    block: [Layer<B>; 1],
    head_norm: B::Buf<f32>,
    head: Arc<B::DenseWeight>,
    /// Whether `embed` / `head` are the main model's tensors.
    shared: (bool, bool),
}

/// `eh_proj`'s two column halves, in the form the checkpoint stores: BF16 (DeepSeek's), or
/// FP8 with 128x128 scales (some converted checkpoints). The FP8 form runs on the reference
/// GEMM path whatever the model's path is: its exact dequantised weight against f32
/// activations, as the BF16 form computes.
#[derive(Debug)]
enum EhProj<B: Backend> {
    Bf16(B::DenseWeight, B::DenseWeight),
    Fp8(B::Weight, B::Weight),
}

/// The columns `cols` of an FP8 weight; `cols` must start and end on 128-block edges (or at
/// the last column), so the halves keep their block scales exactly.
fn fp8_columns(w: &Fp8Weight, cols: std::ops::Range<usize>) -> Result<Fp8Weight> {
    let (rows, width) = (w.rows(), w.cols());
    let (b0, b1) = (cols.start / BLOCK, cols.end.div_ceil(BLOCK));
    let codes = w.storage();
    let mut data = Vec::with_capacity(rows * cols.len());
    for r in 0..rows {
        data.extend_from_slice(&codes[r * width + cols.start..r * width + cols.end]);
    }
    let scales = w.view().scale_inv();
    let bc = blocks(width);
    let scale = (0..blocks(rows)).flat_map(|br| scales[br * bc + b0..br * bc + b1].iter().copied()).collect();
    Ok(Fp8Weight::new(rows, cols.len(), data, scale)?)
}

/// The columns `cols` of a row-major `[rows, width]` BF16 matrix.
fn columns(w: &Bf16Weight, cols: std::ops::Range<usize>) -> Result<Bf16Weight> {
    let (rows, width) = (w.rows(), w.cols());
    let data = w.view().data();
    let mut out = Vec::with_capacity(rows * cols.len());
    for r in 0..rows {
        out.extend_from_slice(&data[r * width + cols.start..r * width + cols.end]);
    }
    Ok(Bf16Weight::new(rows, cols.len(), out)?)
}

impl<B: Backend> Mtp<B> {
    /// Loads MTP module 0 (layer `num_hidden_layers`) for `main`. Errors if the config has no
    /// MTP module (`num_nextn_predict_layers` = 0), naming the field.
    pub fn load(b: &B, ck: &Checkpoint, cfg: &ModelConfig, main: &Model<B>) -> Result<Mtp<B>> {
        if cfg.num_nextn_predict_layers == 0 {
            return Err(RuntimeError::Request(format!(
                "{}: this model has no MTP module (config.json: num_nextn_predict_layers = 0)",
                ck.dir().display()
            )));
        }
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let l = cfg.num_hidden_layers;
        let name = |s: &str| format!("model.layers.{l}.{s}");
        let embed_name = name("embed_tokens.weight");
        let embed_shared = ck.same_data("model.embed_tokens.weight", &embed_name)?;
        let embed = if embed_shared { main.embed_table() } else { Arc::new(b.upload(ck.bf16_weight(&embed_name, v, h)?.view().data())?) };
        let eh_name = name("eh_proj.weight");
        let eh = match ck.linear_weight(&eh_name, h, 2 * h)? {
            LinearWeight::Bf16(eh) => {
                EhProj::Bf16(b.upload_dense_weight(columns(&eh, 0..h)?.view())?, b.upload_dense_weight(columns(&eh, h..2 * h)?.view())?)
            }
            LinearWeight::Fp8(eh) => {
                if !h.is_multiple_of(BLOCK) {
                    let (path, _) = ck.info(&eh_name)?;
                    let detail =
                        format!("an F8_E4M3 eh_proj needs hidden_size ({h}) to be a multiple of {BLOCK}, to split it into two halves");
                    return Err(crate::error::tensor_err(path, &eh_name, detail));
                }
                let (e, hid) = (fp8_columns(&eh, 0..h)?, fp8_columns(&eh, h..2 * h)?);
                EhProj::Fp8(b.upload_weight_owned(e)?, b.upload_weight_owned(hid)?)
            }
        };
        let head_name = name("shared_head.head.weight");
        let head_shared = ck.same_data("lm_head.weight", &head_name)?;
        let head = if head_shared { main.lm_head() } else { Arc::new(b.upload_dense_weight(ck.bf16_weight(&head_name, v, h)?.view())?) };
        let block = [Layer::load(b, ck, cfg, main.mla_config(), l, main.gemm_path())?];
        let mtp = Mtp {
            hidden: h,
            vocab: v,
            eps: cfg.norm_eps(),
            embed,
            enorm: b.upload(&ck.norm_weight(&name("enorm.weight"), h)?)?,
            hnorm: b.upload(&ck.norm_weight(&name("hnorm.weight"), h)?)?,
            eh,
            block,
            head_norm: b.upload(&ck.norm_weight(&name("shared_head.norm.weight"), h)?)?,
            head,
            shared: (embed_shared, head_shared),
        };
        ck.finish_progress();
        Ok(mtp)
    }

    /// Whether the module's embedding and head are the main model's (byte-identical copies).
    pub fn shares_main_tensors(&self) -> (bool, bool) {
        self.shared
    }

    /// The module's own latent cache (one layer) with room for `tokens` tokens.
    pub fn new_cache(&self, b: &B, main: &Model<B>, tokens: usize) -> Result<PagedLatentCache<B>> {
        let pages = tokens.div_ceil(dsv3_mla::PAGE_SIZE).max(1);
        Ok(PagedLatentCache::new(b, CacheConfig::for_model(main.mla_config(), 1, pages))?)
    }

    /// Appends positions to `seq` of the module's cache: row `j` of `hidden` (the main model's
    /// final-norm state at the sequence's next position) with `next[j]` (the token after that
    /// position). Returns the `shared_head.norm` states `[next.len(), hidden]`, whose logits
    /// ([`Mtp::logits`]) predict the token after `next[j]`.
    pub fn forward(
        &self,
        b: &B,
        main: &Model<B>,
        cache: &mut PagedLatentCache<B>,
        seq: SeqId,
        hidden: &B::Buf<f32>,
        next: &[u32],
    ) -> Result<B::Buf<f32>> {
        let (t, h) = (next.len(), self.hidden);
        if b.len(hidden) != t * h {
            return Err(RuntimeError::Request(format!("MTP: {} hidden values for {t} tokens of width {h}", b.len(hidden))));
        }
        if let Some(&bad) = next.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(RuntimeError::TokenId { id: bad as u64, vocab_size: self.vocab });
        }
        let rows = RowsShape { rows: t, cols: h };
        let mut e = b.zeros::<f32>(t * h)?;
        b.embedding(&self.embed, EmbedShape { vocab: self.vocab, dim: h }, &b.upload(next)?, &mut e)?;
        let (mut en, mut hn) = (b.zeros::<f32>(t * h)?, b.zeros::<f32>(t * h)?);
        b.rms_norm(&e, &self.enorm, rows, self.eps, &mut en)?;
        b.rms_norm(hidden, &self.hnorm, rows, self.eps, &mut hn)?;
        let shape = GemmShape { m: t, n: h, k: h };
        let (mut z, mut zh) = (b.zeros::<f32>(t * h)?, b.zeros::<f32>(t * h)?);
        match &self.eh {
            EhProj::Bf16(e, hid) => {
                b.gemm_dense(&en, e, shape, &mut z)?;
                b.gemm_dense(&hn, hid, shape, &mut zh)?;
            }
            EhProj::Fp8(e, hid) => {
                b.gemm(&en, e, shape, GemmPath::Reference, &mut z)?;
                b.gemm(&hn, hid, shape, GemmPath::Reference, &mut zh)?;
            }
        }
        b.add_assign(&mut z, &zh)?;
        let plan = cache.plan(b, &[(seq, t)])?;
        let stack = Stack {
            ctx: main.mla_context(),
            layers: &self.block,
            final_norm: &self.head_norm,
            hidden: h,
            eps: self.eps,
            first_layer: main.config().num_hidden_layers,
            check: main.finite_check(),
            ep: None,
            profile: None,
        };
        stack.run(b, cache, &plan, z, t == 1)
    }

    /// `logits [rows, vocab]` of the given rows of `states` (from [`Mtp::forward`]).
    pub fn logits(&self, b: &B, states: &B::Buf<f32>, rows: &[usize]) -> Result<Vec<f32>> {
        crate::model::head_logits(b, &self.head, states, self.hidden, self.vocab, rows)
    }
}
