//! Token sampling on the device ([`crate::sample`] is the CPU reference and states the rule):
//! `dsv3_sample_greedy` (every row greedy) and `dsv3_sample` (each row with its own
//! temperature, top-k, top-p and uniform: [`SampleRow`]).

use super::params::{SampleGreedyParams, SampleParams as SampleKernelParams};
use super::{CudaDevice, DeviceBuf, u32_of};
use crate::error::{Result, check_len, checked_mul};
use crate::sample::{SampleParams, SampleRow, SampleShape, check_uniforms, nan_error};

const OP: &str = "sample";

impl CudaDevice {
    /// `dsv3_sample_greedy`: [`crate::sample::greedy`] on the GPU, exact (argmax of each
    /// row's candidates, lowest id on ties). A NaN candidate gives the CPU's error (inside a
    /// step: the step's [`crate::KernelError::DeviceCheck`]).
    pub fn sample_greedy(&self, logits: &DeviceBuf<f32>, shape: SampleShape, out: &mut DeviceBuf<u32>) -> Result<()> {
        let n = shape.check(OP, logits.len(), out.len())?;
        let (rows, vocab, allowed) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "vocab", shape.vocab)?, u32_of(OP, "allowed", n)?);
        u32_of(OP, "rows * allowed", checked_mul(OP, "rows * allowed", shape.rows, n)?)?;
        u32_of(OP, "rows * vocab", logits.len())?;
        if rows == 0 {
            return Ok(());
        }
        let st = self.imp.status(kernel!(SampleGreedy))?;
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

    /// `dsv3_sample`: [`crate::sample::sample_rows`] on the GPU: per row, greedy at
    /// temperature 0, else the same candidates in the same order (by logit, ties to the lowest
    /// id), the same weights, cuts and draw; sums are f64 block scans (the CPU adds one by
    /// one), so probabilities agree to f64 rounding and a draw can differ only for a uniform
    /// within ~1e-15 of a boundary. The rows' parameters are checked on their host copy (a
    /// step's rows always have one). Scratch: `rows · next_power_of_two(candidates)` 64-bit
    /// sort keys and `rows · candidates` f64 (from the workspace inside a step; allocated even
    /// for greedy rows there, since a captured step must serve any rows).
    pub fn sample_rows(
        &self,
        logits: &DeviceBuf<f32>,
        shape: SampleShape,
        rows: &DeviceBuf<SampleRow>,
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        let n = shape.check(OP, logits.len(), out.len())?;
        check_len(OP, "rows", rows.len(), shape.rows)?;
        let host = self.host_copy(rows)?;
        for (r, p) in host.iter().enumerate() {
            p.validate(r)?;
        }
        // Outside a step, all-greedy rows take the plain argmax kernel. Inside one the kernel
        // must not depend on the rows' values: a captured step is replayed with other rows.
        if !self.in_step() && host.iter().all(|p| p.params().is_greedy()) {
            return self.sample_greedy(logits, shape, out);
        }
        let padded = n.next_power_of_two();
        let (n_rows, vocab, allowed) = (u32_of(OP, "rows", shape.rows)?, u32_of(OP, "vocab", shape.vocab)?, u32_of(OP, "allowed", n)?);
        let padded32 = u32_of(OP, "candidates (next power of two)", padded)?;
        u32_of(OP, "rows * allowed", checked_mul(OP, "rows * allowed", shape.rows, n)?)?;
        u32_of(OP, "rows * vocab", logits.len())?;
        let mut keys = self.imp.zeros(checked_mul(OP, "sort keys", checked_mul(OP, "sort keys", shape.rows, padded)?, 8)?)?;
        let mut probs = self.imp.zeros(checked_mul(OP, "probabilities", shape.rows * n, 8)?)?;
        let st = self.imp.status(kernel!(Sample))?;
        {
            let (la, _gl) = self.imp.addr(&logits.imp);
            let (ra, _gr) = self.imp.addr(&rows.imp);
            let (ka, _gk) = self.imp.addr_mut(&mut keys);
            let (pa, _gp) = self.imp.addr_mut(&mut probs);
            let (oa, _go) = self.imp.addr_mut(&mut out.imp);
            let p = SampleKernelParams {
                logits: la,
                rows: ra,
                keys: ka,
                probs: pa,
                out: oa,
                status: st.addr,
                n_rows,
                vocab,
                allowed,
                padded: padded32,
            };
            // SAFETY: logits is rows·vocab, `rows` and out hold n_rows entries (checked); keys
            // is n_rows·padded u64 and probs n_rows·allowed f64 (allocated above, alive until
            // the kernel is done: freed or reused in stream order). Block r touches only row r
            // of logits, keys, probs, rows and out; padded is a power of two >= allowed, so the
            // bitonic sort's pairs (i, i + stride) stay below padded; top_k is clamped to
            // allowed by the kernel. The parameters were validated (finite temperature, top_p
            // in (0, 1], uniform in [0, 1)) on the host copy, which is what the device holds.
            unsafe { self.imp.launch(kernel!(Sample), (n_rows, 1), 1024, &p)? };
        }
        match st.read()? {
            None => Ok(()),
            Some(i) => Err(nan_error(i as usize / n, i as usize % n)),
        }
    }

    /// [`crate::sample::sample`] on the GPU: every row with `params` and its own uniform
    /// ([`CudaDevice::sample_greedy`] at temperature 0, else [`CudaDevice::sample_rows`]).
    pub fn sample(
        &self,
        logits: &DeviceBuf<f32>,
        shape: SampleShape,
        params: &SampleParams,
        uniforms: &[f64],
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        params.validate()?;
        shape.check(OP, logits.len(), out.len())?;
        check_uniforms(uniforms, shape.rows)?;
        if params.is_greedy() {
            return self.sample_greedy(logits, shape, out);
        }
        let rows: Vec<SampleRow> = uniforms.iter().map(|&u| SampleRow::new(params, u)).collect();
        self.sample_rows(logits, shape, &self.upload(&rows)?, out)
    }
}
