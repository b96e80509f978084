//! The shape of one MLA layer (docs/model.md §1, §3.3).

use crate::error::{MlaError, Result};
use dsv3_kernels::attention::MlaDims;
use dsv3_kernels::fp8::BLOCK;
use dsv3_kernels::gemm::GemmPath;
use dsv3_kernels::rope::{self, RopeCfg};

/// The dimensions and constants of Multi-head Latent Attention, as the HF `config.json` gives
/// them. Build it by hand or from [`MlaConfig::deepseek_v3`], then [`MlaConfig::validate`]
/// (every constructor of this crate validates it again).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// `hidden_size` (7168).
    pub hidden: usize,
    /// `num_attention_heads` (128).
    pub n_heads: usize,
    /// `q_lora_rank` (1536); `None` for V2-Lite / Moonlight, which have a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank` (512): the cached latent width.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim` (128).
    pub qk_nope_head_dim: usize,
    /// `qk_rope_head_dim` (64); must equal `rope.rope_head_dim`.
    pub qk_rope_head_dim: usize,
    /// `v_head_dim` (128).
    pub v_head_dim: usize,
    /// RoPE / YaRN (docs/model.md §3.4–3.5); YaRN also sets the softmax scale (docs/model.md §3.6).
    pub rope: RopeCfg,
    /// `max_position_embeddings` (163840): positions `0..max_position` are valid.
    pub max_position: usize,
    /// Epsilon of `q_a_layernorm` and `kv_a_layernorm`: 1e-6 in every model, even where
    /// `rms_norm_eps` differs (HF builds these two norms with the default; docs/model.md §3.2, §8 item 6).
    pub rms_eps: f32,
}

impl MlaConfig {
    /// DeepSeek-V3 / R1 (docs/model.md §1).
    pub const fn deepseek_v3() -> MlaConfig {
        MlaConfig {
            hidden: 7168,
            n_heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            rope: RopeCfg::DEEPSEEK_V3,
            max_position: 163_840,
            rms_eps: 1e-6,
        }
    }

    /// DeepSeek-V2-Lite: hidden 2048, 16 heads, no q LoRA (a plain `q_proj`), YaRN with
    /// mscale 0.707 (softmax scale 0.1147).
    pub const fn deepseek_v2_lite() -> MlaConfig {
        MlaConfig { hidden: 2048, n_heads: 16, q_lora_rank: None, rope: RopeCfg::DEEPSEEK_V2_LITE, ..Self::deepseek_v3() }
    }

    /// Moonlight-16B-A3B: as V2-Lite's shape, plain RoPE with base 50000, 8192 positions.
    pub const fn moonlight() -> MlaConfig {
        MlaConfig { rope: RopeCfg::MOONLIGHT, max_position: 8192, ..Self::deepseek_v2_lite() }
    }

    /// The same attention at another model width (`hidden_size`).
    ///
    /// ```
    /// use dsv3_mla::MlaConfig;
    /// // V3's heads (q LoRA 1536, latent 512 + 64, YaRN) with 2 heads and hidden 512.
    /// let cfg = MlaConfig::deepseek_v3().with_hidden(512).with_heads(2);
    /// assert!(cfg.validate().is_ok());
    /// assert_eq!((cfg.latent_dim(), cfg.q_dim()), (576, 2 * 192));
    /// ```
    pub const fn with_hidden(self, hidden: usize) -> MlaConfig {
        MlaConfig { hidden, ..self }
    }

    /// The same head shape with another number of heads.
    pub const fn with_heads(self, n_heads: usize) -> MlaConfig {
        MlaConfig { n_heads, ..self }
    }

    /// The same layer with positions `0..max_position` (the size of the RoPE table).
    pub const fn with_max_position(self, max_position: usize) -> MlaConfig {
        MlaConfig { max_position, ..self }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let pos = |field: &'static str, v: usize| if v == 0 { Err(cfg_err(field, "must be > 0")) } else { Ok(()) };
        pos("hidden", self.hidden)?;
        pos("n_heads", self.n_heads)?;
        if let Some(r) = self.q_lora_rank {
            pos("q_lora_rank", r)?;
        }
        pos("kv_lora_rank", self.kv_lora_rank)?;
        pos("qk_nope_head_dim", self.qk_nope_head_dim)?;
        pos("qk_rope_head_dim", self.qk_rope_head_dim)?;
        pos("v_head_dim", self.v_head_dim)?;
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(cfg_err("qk_rope_head_dim", format!("must be even, got {}", self.qk_rope_head_dim)));
        }
        if self.rope.rope_head_dim != self.qk_rope_head_dim {
            return Err(cfg_err(
                "rope.rope_head_dim",
                format!("is {}, must equal qk_rope_head_dim {}", self.rope.rope_head_dim, self.qk_rope_head_dim),
            ));
        }
        self.rope.validate("MlaConfig").map_err(|e| cfg_err("rope", e.to_string()))?;
        if self.max_position == 0 || self.max_position as u64 > u64::from(u32::MAX) {
            return Err(cfg_err("max_position", format!("must be in 1..=2^32-1, got {}", self.max_position)));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(cfg_err("rms_eps", format!("must be finite and > 0, got {}", self.rms_eps)));
        }
        self.dims().check("MlaConfig").map_err(|e| cfg_err("n_heads", e.to_string()))?;
        self.n_heads
            .checked_mul(self.qk_nope_head_dim + self.v_head_dim)
            .and_then(|r| r.checked_mul(self.kv_lora_rank))
            .and_then(|_| self.hidden.checked_mul(self.n_heads * self.v_head_dim))
            .ok_or_else(|| cfg_err("n_heads", "weight sizes overflow usize"))?;
        Ok(())
    }

    /// Also checks the FP8 GEMM path's constraint (every Linear input a multiple of 128):
    /// `hidden`, `q_lora_rank` and `n_heads · v_head_dim` on [`GemmPath::Fp8`].
    pub fn validate_path(&self, path: GemmPath) -> Result<()> {
        self.validate()?;
        if path == GemmPath::Fp8 {
            let k = |field: &'static str, v: usize| {
                if v.is_multiple_of(BLOCK) {
                    Ok(())
                } else {
                    Err(cfg_err(field, format!("the fp8 GEMM path needs a multiple of {BLOCK}, got {v}")))
                }
            };
            k("hidden", self.hidden)?;
            if let Some(r) = self.q_lora_rank {
                k("q_lora_rank", r)?;
            }
            k("v_head_dim", self.n_heads * self.v_head_dim)?;
        }
        Ok(())
    }

    /// The head dimensions the kernels take.
    pub fn dims(&self) -> MlaDims {
        MlaDims {
            heads: self.n_heads,
            qk_nope: self.qk_nope_head_dim,
            qk_rope: self.qk_rope_head_dim,
            kv_lora: self.kv_lora_rank,
            v: self.v_head_dim,
        }
    }
    /// `qk_nope + qk_rope` (192).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// `n_heads · qk_head_dim` (24576): the width of `q`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.qk_head_dim()
    }
    /// `kv_lora + qk_rope` (576): the cached row and the output of `kv_a_proj_with_mqa`.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
    /// `n_heads · v_head_dim` (16384): the input of `o_proj`.
    pub fn o_dim(&self) -> usize {
        self.n_heads * self.v_head_dim
    }
    /// The softmax scale `qk_head_dim^-1/2 · mscale²` (docs/model.md §3.6; 0.13523378 for V3).
    pub fn softmax_scale(&self) -> Result<f32> {
        Ok(rope::softmax_scale(self.qk_head_dim(), self.rope.yarn.as_ref())?)
    }
}

pub(crate) fn cfg_err(field: &'static str, detail: impl Into<String>) -> MlaError {
    MlaError::Config { field, detail: detail.into() }
}
