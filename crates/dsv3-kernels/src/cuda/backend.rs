//! [`Cuda`]: the [`Backend`] on one Hopper GPU. Buffers are device memory ([`DeviceBuf`]),
//! weights, RoPE tables and dispatch plans are resident on the device, and every op is the
//! [`CudaDevice`] wrapper of the same name (the kernels of `cuda/`). Activations are f32, as
//! on the CPU backend, so model code runs unchanged; the results match the CPU's within the
//! documented tolerances (bit for bit where the wrappers say so). The FP8 GEMMs' fp8 path
//! (`gemm`, `grouped_gemm_*`) runs on the Hopper kernel (`sm90_fp8_gemm`) where its router
//! has the shape and on the simple kernels otherwise ([`super::sm90_gemm::gemm_route`]); the
//! Reference path always runs on the simple dequantising kernel.

use super::{CudaDevice, DeviceBf16Weight, DeviceBuf, DeviceFp8Weight, DeviceGraph, DevicePlan, DeviceRope};
use crate::attention::{CacheWriteShape, DecodeParams, GatherShape, MlaDims, PrefillInputs, PrefillParams};
use crate::backend::{Backend, DeviceStats, Elem};
use crate::dense::Bf16WeightRef;
use crate::embed::EmbedShape;
use crate::error::KernelError;
use crate::error::Result;
use crate::fp8::{ActQuantShape, Fp8WeightRef, ScaleFmt};
use crate::gating::RouteCfg;
use crate::gemm::{GemmPath, GemmShape};
use crate::norm::RowsShape;
use crate::permute::PlanShape;
use crate::rope::{RopeCfg, RopeLayout, RopeTable};
use crate::sample::{SampleRow, SampleShape};

/// The CUDA backend: one GPU and its stream ([`CudaDevice`]).
#[derive(Debug)]
pub struct Cuda {
    dev: CudaDevice,
}

impl Cuda {
    /// Opens GPU `ordinal` ([`CudaDevice::new`]: [`crate::KernelError::CudaUnavailable`] on a
    /// build without the `cuda` feature or a machine without a Hopper GPU).
    pub fn new(ordinal: usize) -> Result<Cuda> {
        CudaDevice::new(ordinal).map(|dev| Cuda { dev })
    }

    /// The device, for the ops outside the [`Backend`] trait (sampling, all-to-all packing,
    /// the standalone kernels).
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// The device, owned.
    pub fn into_device(self) -> CudaDevice {
        self.dev
    }

    /// Test support, one rule for every GPU test of the workspace: GPU 0, or `Ok(None)` after
    /// printing `SKIPPED: {test}: {why}` when no usable GPU is there (so the test returns
    /// without passing anything). With `DSV3_REQUIRE_GPU` set (the GPU check sets it) a
    /// missing GPU is the error instead, so a GPU test can never succeed by skipping where a
    /// GPU is expected.
    pub fn for_test(test: &str) -> Result<Option<Cuda>> {
        match Cuda::new(0) {
            Ok(b) => Ok(Some(b)),
            Err(e @ crate::KernelError::CudaUnavailable(_)) => {
                if std::env::var_os("DSV3_REQUIRE_GPU").is_some() {
                    return Err(e);
                }
                println!("SKIPPED: {test}: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Backend for Cuda {
    type Buf<T: Elem> = DeviceBuf<T>;
    type Weight = DeviceFp8Weight;
    type DenseWeight = DeviceBf16Weight;
    type Rope = DeviceRope;
    type Plan = DevicePlan;
    type Graph = DeviceGraph;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn write<T: Elem>(&self, buf: &mut DeviceBuf<T>, host: &[T]) -> Result<()> {
        crate::error::check_len("write", "host", host.len(), buf.len())?;
        self.dev.write(buf, 0, host)
    }
    /// One allocation (from the workspace inside a step) and one copy for all parts.
    fn upload_many<T: Elem>(&self, parts: &[&[T]]) -> Result<Vec<DeviceBuf<T>>> {
        self.dev.upload_many(parts)
    }
    /// One copy when the buffers are the parts of one [`Backend::upload_many`], in order.
    fn write_many<T: Elem>(&self, bufs: &mut [&mut DeviceBuf<T>], hosts: &[&[T]]) -> Result<()> {
        self.dev.write_many(bufs, hosts)
    }

    fn begin_step(&self) -> Result<()> {
        self.dev.begin_step()
    }
    fn end_step(&self) -> Result<()> {
        self.dev.end_step()
    }
    fn measure_workspace(&self) -> Result<()> {
        self.dev.imp.measure_workspace()
    }
    fn measured_workspace(&self) -> usize {
        self.dev.imp.measured_workspace()
    }
    fn reserve_workspace(&self, bytes: usize) -> Result<()> {
        self.dev.imp.reserve_workspace(bytes)
    }
    fn defers_checks(&self) -> bool {
        true
    }
    fn can_capture(&self) -> bool {
        true
    }
    fn capture<E: From<KernelError>>(&self, mut f: impl FnMut() -> Result<(), E>) -> Result<Option<DeviceGraph>, E> {
        let mut failed = None;
        let r = self.dev.imp.capture(&mut || {
            f().map_err(|e| {
                failed = Some(e);
                KernelError::Cuda("the captured step failed".into())
            })
        });
        match (r, failed) {
            (_, Some(e)) => Err(e),
            (Ok(g), None) => Ok(Some(DeviceGraph(g))),
            (Err(e), None) => Err(e.into()),
        }
    }
    fn replay(&self, g: &DeviceGraph) -> Result<()> {
        self.dev.imp.replay(&g.0)
    }
    fn timed<R, E: From<KernelError>>(&self, f: impl FnOnce() -> Result<R, E>) -> Result<(R, Option<f64>), E> {
        let (r, ms) = self.dev.imp.timed(f)?;
        Ok((r, Some(f64::from(ms) / 1e3)))
    }
    fn copy_bandwidth(&self) -> Result<Option<f64>> {
        self.dev.imp.copy_bandwidth().map(Some)
    }
    fn stats(&self) -> DeviceStats {
        self.dev.stats()
    }

    fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        self.dev.zeros(len)
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        self.dev.upload(host)
    }
    fn download<T: Elem>(&self, buf: &DeviceBuf<T>) -> Result<Vec<T>> {
        self.dev.download(buf)
    }
    fn len<T: Elem>(&self, buf: &DeviceBuf<T>) -> usize {
        buf.len()
    }
    fn upload_weight(&self, w: Fp8WeightRef<'_>) -> Result<DeviceFp8Weight> {
        self.dev.upload_fp8_weight(w)
    }
    /// Weights of one shape become one stack ([`CudaDevice::upload_fp8_experts`]), so the
    /// grouped GEMMs over them take the sm90 kernel; weights of mixed shapes are uploaded one
    /// by one.
    fn upload_weights(&self, w: &[Fp8WeightRef<'_>]) -> Result<Vec<DeviceFp8Weight>> {
        match w.first() {
            Some(f) if w.iter().all(|x| (x.rows(), x.cols()) == (f.rows(), f.cols())) => self.dev.upload_fp8_experts(w),
            _ => w.iter().map(|x| self.dev.upload_fp8_weight(*x)).collect(),
        }
    }
    fn weight_shape(&self, w: &DeviceFp8Weight) -> (usize, usize) {
        w.shape()
    }
    fn upload_dense_weight(&self, w: Bf16WeightRef<'_>) -> Result<DeviceBf16Weight> {
        self.dev.upload_bf16_weight(w)
    }
    fn rope_table(&self, cfg: &RopeCfg, max_pos: usize) -> Result<DeviceRope> {
        self.dev.rope_table(&RopeTable::new(cfg, max_pos)?)
    }

    fn add_assign(&self, acc: &mut DeviceBuf<f32>, x: &DeviceBuf<f32>) -> Result<()> {
        self.dev.add_assign(acc, x)
    }
    fn rms_norm(&self, x: &DeviceBuf<f32>, w: &DeviceBuf<f32>, shape: RowsShape, eps: f32, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.rms_norm(x, w, shape, eps, out)
    }
    fn add_rms_norm(
        &self,
        x: &DeviceBuf<f32>,
        residual: &mut DeviceBuf<f32>,
        w: &DeviceBuf<f32>,
        shape: RowsShape,
        eps: f32,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.add_rms_norm(x, residual, w, shape, eps, out)
    }
    fn silu_mul(&self, gate: &DeviceBuf<f32>, up: &DeviceBuf<f32>, shape: RowsShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.silu_mul(gate, up, shape, out)
    }
    fn softmax(&self, x: &DeviceBuf<f32>, shape: RowsShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.softmax(x, shape, out)
    }
    fn embedding(&self, table: &DeviceBuf<half::bf16>, shape: EmbedShape, ids: &DeviceBuf<u32>, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.embedding(table, shape, ids, out)
    }
    fn apply_rope(&self, x: &mut DeviceBuf<f32>, layout: RopeLayout, positions: &DeviceBuf<u32>, table: &DeviceRope) -> Result<()> {
        self.dev.apply_rope(x, layout, positions, table)
    }
    fn act_quant(
        &self,
        x: &DeviceBuf<f32>,
        shape: ActQuantShape,
        fmt: ScaleFmt,
        q: &mut DeviceBuf<u8>,
        scales: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.act_quant_1x128(x, shape, fmt, q, scales)
    }

    fn gemm(&self, a: &DeviceBuf<f32>, w: &DeviceFp8Weight, shape: GemmShape, path: GemmPath, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.gemm(a, w, shape, path, out)
    }
    /// The simple FP8 kernel (`dsv3_gemm_fp8_simt`, bit-exact with the CPU reference).
    fn gemm_quantized(
        &self,
        a_q: &DeviceBuf<u8>,
        a_s: &DeviceBuf<f32>,
        w: &DeviceFp8Weight,
        shape: GemmShape,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.gemm_fp8(a_q, a_s, w, shape, out)
    }
    fn gemm_dense(&self, a: &DeviceBuf<f32>, w: &DeviceBf16Weight, shape: GemmShape, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.gemm_bf16(a, w, shape, out)
    }
    fn grouped_gemm_contiguous(
        &self,
        a: &DeviceBuf<f32>,
        offsets: &DeviceBuf<u32>,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.grouped_contiguous(a, offsets, w, path, out)
    }
    fn grouped_gemm_masked(
        &self,
        a: &DeviceBuf<f32>,
        counts: &DeviceBuf<u32>,
        capacity: usize,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.grouped_masked(a, counts, capacity, w, path, out)
    }

    fn route(
        &self,
        cfg: &RouteCfg,
        tokens: usize,
        logits: &DeviceBuf<f32>,
        bias: Option<&DeviceBuf<f32>>,
        indices: &mut DeviceBuf<u32>,
        weights: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.route(cfg, tokens, logits, bias, indices, weights)
    }
    fn dispatch_plan(&self, shape: PlanShape, topk_ids: &DeviceBuf<u32>) -> Result<DevicePlan> {
        self.dev.dispatch_plan(shape, topk_ids)
    }
    fn grouped_gemm_planned(
        &self,
        a: &DeviceBuf<f32>,
        plan: &DevicePlan,
        w: &[&DeviceFp8Weight],
        path: GemmPath,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.grouped_planned(a, plan, w, path, out)
    }
    fn plan_offsets(&self, plan: &DevicePlan) -> Result<DeviceBuf<u32>> {
        self.dev.plan_offsets(plan)
    }
    fn permute(&self, plan: &DevicePlan, hidden: usize, x: &DeviceBuf<f32>, out: &mut DeviceBuf<f32>) -> Result<()> {
        self.dev.permute(plan, hidden, x, out)
    }
    fn unpermute(
        &self,
        plan: &DevicePlan,
        hidden: usize,
        y: &DeviceBuf<f32>,
        weights: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.unpermute(plan, hidden, y, weights, out)
    }

    fn mla_cache_write(
        &self,
        kv: &DeviceBuf<f32>,
        norm_w: &DeviceBuf<f32>,
        eps: f32,
        slots: &DeviceBuf<u32>,
        shape: CacheWriteShape,
        pool: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_cache_write(kv, norm_w, eps, slots, shape, pool)
    }
    fn mla_cache_gather(
        &self,
        pool: &DeviceBuf<f32>,
        block_table: &DeviceBuf<u32>,
        seq_lens: &DeviceBuf<u32>,
        shape: GatherShape,
        c_kv: &mut DeviceBuf<f32>,
        k_pe: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_cache_gather(pool, block_table, seq_lens, shape, c_kv, k_pe)
    }
    fn mla_absorb_q(
        &self,
        q: &DeviceBuf<f32>,
        w_uk: &[&DeviceBf16Weight],
        dims: MlaDims,
        rows: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_absorb_q(q, w_uk, dims, rows, out)
    }
    fn mla_expand_v(
        &self,
        o_lat: &DeviceBuf<f32>,
        w_uv: &DeviceBf16Weight,
        dims: MlaDims,
        rows: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_expand_v(o_lat, w_uv, dims, rows, out)
    }
    fn mla_decode(
        &self,
        q: &DeviceBuf<f32>,
        pool: &DeviceBuf<f32>,
        block_table: &DeviceBuf<u32>,
        kv_lens: &DeviceBuf<u32>,
        params: &DecodeParams,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_decode(q, pool, block_table, kv_lens, params, out)
    }
    fn mla_prefill(
        &self,
        inputs: PrefillInputs<'_, DeviceBuf<f32>, DeviceBuf<u32>>,
        params: &PrefillParams,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        self.dev.mla_prefill(inputs, params, out)
    }

    fn sample_rows(
        &self,
        logits: &DeviceBuf<f32>,
        shape: SampleShape,
        rows: &DeviceBuf<SampleRow>,
        out: &mut DeviceBuf<u32>,
    ) -> Result<()> {
        self.dev.sample_rows(logits, shape, rows, out)
    }
}
