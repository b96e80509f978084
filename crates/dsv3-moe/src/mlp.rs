//! The dense SwiGLU MLP on a backend: `down(silu(gate x) ⊙ up x)` (docs/model.md §3.8). The
//! dense layers use it directly; the MoE layer uses it for the fused shared experts.

use crate::config::DenseMlpConfig;
use crate::error::{Result, input, mul};
use crate::weights::MlpWeights;
use dsv3_kernels::backend::Backend;
use dsv3_kernels::gemm::GemmShape;
use dsv3_kernels::norm::RowsShape;

/// A dense SwiGLU MLP whose three FP8 projections are resident on backend `B`.
#[derive(Debug)]
pub struct DenseMlp<B: Backend> {
    cfg: DenseMlpConfig,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

impl<B: Backend> DenseMlp<B> {
    /// Validates `cfg`, checks the weights against it (errors name `mlp.*_proj.weight`) and
    /// uploads them.
    pub fn new(b: &B, cfg: DenseMlpConfig, w: &MlpWeights) -> Result<DenseMlp<B>> {
        Self::with_prefix(b, cfg, w, "mlp")
    }

    pub(crate) fn with_prefix(b: &B, cfg: DenseMlpConfig, w: &MlpWeights, prefix: &str) -> Result<DenseMlp<B>> {
        cfg.validate()?;
        w.check(&cfg, prefix)?;
        let w = w.at_inner_width(&cfg)?;
        Ok(DenseMlp {
            cfg,
            gate: b.upload_weight(w.gate().view())?,
            up: b.upload_weight(w.up().view())?,
            down: b.upload_weight(w.down().view())?,
        })
    }

    pub fn config(&self) -> &DenseMlpConfig {
        &self.cfg
    }

    /// `x` `[tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, b: &B, x: &B::Buf<f32>, tokens: usize) -> Result<B::Buf<f32>> {
        let (h, i, path) = (self.cfg.hidden, self.cfg.inner(), self.cfg.gemm_path);
        let xs = mul("x", tokens, h)?;
        if b.len(x) != xs {
            return Err(input("x", format!("has {} elements, expected tokens {tokens} x hidden {h} = {xs}", b.len(x))));
        }
        let inner = mul("x", tokens, i)?;
        let (mut g, mut u, mut act) = (b.zeros::<f32>(inner)?, b.zeros::<f32>(inner)?, b.zeros::<f32>(inner)?);
        b.gemm_pair(x, [&self.gate, &self.up], GemmShape { m: tokens, n: i, k: h }, path, [&mut g, &mut u])?;
        b.silu_mul(&g, &u, RowsShape { rows: tokens, cols: i }, &mut act)?;
        let mut y = b.zeros::<f32>(xs)?;
        b.gemm(&act, &self.down, GemmShape { m: tokens, n: h, k: i }, path, &mut y)?;
        Ok(y)
    }

    /// [`DenseMlp::forward`] on host memory (uploads `x`, downloads the result).
    pub fn forward_host(&self, b: &B, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        Ok(b.download(&self.forward(b, &b.upload(x)?, tokens)?)?)
    }
}
