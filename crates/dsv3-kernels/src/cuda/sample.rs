//! Token sampling on the device ([`crate::sample`] is the CPU reference and states the
//! semantics): `dsv3_sample_greedy` and `dsv3_sample_top_k_top_p` (temperature, top-k,
//! top-p and the draw with one caller-given uniform per row).

use super::params::*;
use super::{CudaDevice, DeviceBuf, u32_of};
use crate::error::{Result, checked_mul};
use crate::sample::{SampleParams, SampleShape, check_uniforms, nan_error};

const OP: &str = "sample";

impl CudaDevice {
    /// `dsv3_sample_greedy`: [`crate::sample::greedy`] on the GPU, exact (argmax of each
    /// row's candidates, lowest id on ties). A NaN candidate gives the CPU's error.
    pub fn sample_greedy(&self, logits: &DeviceBuf<f32>, shape: SampleShape, out: &mut DeviceBuf<u32>) -> Result<()> {
        let n = shape.check(OP, logits.len(), out.len())?;
        let (rows, vocab, allowed) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "vocab", shape.vocab)?, u32_of(OP, "allowed", n)?);
        u32_of(OP, "rows * allowed", checked_mul(OP, "rows * allowed", shape.rows, n)?)?;
        u32_of(OP, "rows * vocab", logits.len())?;
        if rows == 0 {
            return Ok(());
        }
        let st = self.imp.status()?;
        {
            let (la, _gl) = self.imp.addr(&logits.imp);
            let (oa, _go) = self.imp.addr_mut(&mut out.imp);
            let p = SampleGreedyParams { logits: la, out: oa, status: st.addr, rows, vocab, allowed, pad: 0 };
            // SAFETY: logits is rows·vocab (checked), block r reads row r's first allowed <=
            // vocab values and writes out[r] (rows entries, checked), a distinct &mut buffer.
            unsafe { self.imp.launch(kernel!(SampleGreedy), (rows, 1), 1024, &p)? };
        }
        match st.read()? {
            None => Ok(()),
            Some(i) => Err(nan_error(i as usize / n, i as usize % n)),
        }
    }

    /// `dsv3_sample_top_k_top_p`: [`crate::sample::sample`] at a temperature > 0 on the GPU:
    /// the same candidates in the same order, the same cuts and the same draw; sums are f64
    /// block scans (the CPU adds one by one), so probabilities agree to f64 rounding and a
    /// draw can differ only for a uniform within ~1e-15 of a boundary. Scratch: `rows ·
    /// next_power_of_two(candidates)` 64-bit sort keys and `rows · candidates` f64.
    pub fn sample_top_k_top_p(
        &self,
        logits: &DeviceBuf<f32>,
        shape: SampleShape,
        params: &SampleParams,
        uniforms: &[f64],
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        params.validate()?;
        let n = shape.check(OP, logits.len(), out.len())?;
        check_uniforms(uniforms, shape.rows)?;
        if params.temperature == 0.0 {
            return Err(crate::error::invalid(OP, "temperature", "0 is greedy: use sample_greedy"));
        }
        let padded = n.next_power_of_two();
        let (rows, vocab, allowed) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "vocab", shape.vocab)?, u32_of(OP, "allowed", n)?);
        let padded32 = u32_of(OP, "candidates (next power of two)", padded)?;
        u32_of(OP, "rows * allowed", checked_mul(OP, "rows * allowed", shape.rows, n)?)?;
        u32_of(OP, "rows * vocab", logits.len())?;
        let top_k = u32::try_from(params.top_k).unwrap_or(u32::MAX);
        if rows == 0 {
            return Ok(());
        }
        let mut keys = self.imp.zeros(checked_mul(OP, "sort keys", shape.rows * padded, 8)?)?;
        let mut probs = self.imp.zeros(checked_mul(OP, "probabilities", shape.rows * n, 8)?)?;
        let uni = self.upload_pod(uniforms)?;
        let st = self.imp.status()?;
        {
            let (la, _gl) = self.imp.addr(&logits.imp);
            let (ua, _gu) = self.imp.addr(&uni);
            let (ka, _gk) = self.imp.addr_mut(&mut keys);
            let (pa, _gp) = self.imp.addr_mut(&mut probs);
            let (oa, _go) = self.imp.addr_mut(&mut out.imp);
            let p = SampleTopKTopPParams {
                logits: la,
                uniforms: ua,
                keys: ka,
                probs: pa,
                out: oa,
                status: st.addr,
                rows,
                vocab,
                allowed,
                padded: padded32,
                top_k,
                temperature: params.temperature,
                top_p: params.top_p,
                pad: 0,
            };
            // SAFETY: logits is rows·vocab, uniforms and out rows entries (checked); keys is
            // rows·padded u64 and probs rows·allowed f64 (allocated above, owned by this call
            // and alive until the launch is done: freed in stream order). Block r touches only
            // row r of logits, keys, probs, uniforms and out; padded is a power of two >=
            // allowed, so the bitonic sort's pairs (i, i + stride) stay below padded.
            unsafe { self.imp.launch(kernel!(SampleTopKTopP), (rows, 1), 1024, &p)? };
        }
        match st.read()? {
            None => Ok(()),
            Some(i) => Err(nan_error(i as usize / n, i as usize % n)),
        }
    }

    /// [`crate::sample::sample`] on the GPU: [`CudaDevice::sample_greedy`] at temperature 0,
    /// else [`CudaDevice::sample_top_k_top_p`].
    pub fn sample(
        &self,
        logits: &DeviceBuf<f32>,
        shape: SampleShape,
        params: &SampleParams,
        uniforms: &[f64],
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        params.validate()?;
        if params.temperature == 0.0 {
            shape.check(OP, logits.len(), out.len())?;
            check_uniforms(uniforms, shape.rows)?;
            return self.sample_greedy(logits, shape, out);
        }
        self.sample_top_k_top_p(logits, shape, params, uniforms, out)
    }
}
