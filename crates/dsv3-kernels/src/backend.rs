//! The op-level interface model code is written against, and its CPU implementation.
//!
//! `dsv3-mla`, `dsv3-moe` and `dsv3-runtime` are generic over [`Backend`] and monomorphised:
//! no dynamic dispatch per op and no `cfg(feature = "cuda")` outside this crate. Buffers are
//! the backend's own ([`Backend::Buf`]: a `Vec` on the CPU, a device slice on a GPU); shapes
//! travel in the same small `Copy` structs the kernels validate. Activations are f32 on the
//! CPU backend.

use crate::attention::{self, CacheWriteShape, DecodeParams, GatherShape, MlaDims, PrefillInputs, PrefillParams};
use crate::bf16_gemm::{self, Bf16Weight, Bf16WeightRef};
use crate::embed::EmbedShape;
use crate::error::Result;
use crate::fp8::{ActQuantShape, Fp8Weight, Fp8WeightRef, ScaleFmt};
use crate::gating::RouteCfg;
use crate::gemm::{GemmPath, GemmShape};
use crate::norm::RowsShape;
use crate::permute::{DispatchPlan, PlanShape};
use crate::rope::{RopeCfg, RopeLayout, RopeTable};
use crate::sample::{SampleRow, SampleShape};
use crate::{KernelError, act, embed, fp8, gating, gemm, norm, permute, rope, sample};
use std::fmt::Debug;

/// Element types a backend buffer can hold.
pub trait Elem: bytemuck::Pod + Default + Send + Sync + Debug + 'static {}
impl Elem for f32 {}
impl Elem for u8 {}
impl Elem for u32 {}
impl Elem for i32 {}
impl Elem for half::bf16 {}
impl Elem for SampleRow {}

/// What a device did since it was opened ([`Backend::stats`]): the CUDA backend's counters
/// (all zero on the CPU, which has none of these costs). Per step, [`DeviceStats::since`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Kernel launches (graph replays count as one, not as their kernels).
    pub launches: u64,
    /// Driver allocations (buffers not carved from the workspace).
    pub allocations: u64,
    /// Host-to-device copies.
    pub uploads: u64,
    /// Times the host waited for the device (read-backs, status words, synchronisations).
    pub host_syncs: u64,
    pub graph_replays: u64,
    /// Bytes of the reserved workspace (0: none).
    pub workspace_bytes: usize,
    /// The workspace's high-water mark, bytes.
    pub workspace_peak: usize,
    /// Buffers carved from the workspace, and requests it had no room for.
    pub workspace_allocations: u64,
    pub workspace_overflows: u64,
}

impl DeviceStats {
    /// The counters' increase since `before` (the sizes are this one's).
    pub fn since(&self, before: &DeviceStats) -> DeviceStats {
        DeviceStats {
            launches: self.launches - before.launches,
            allocations: self.allocations - before.allocations,
            uploads: self.uploads - before.uploads,
            host_syncs: self.host_syncs - before.host_syncs,
            graph_replays: self.graph_replays - before.graph_replays,
            workspace_allocations: self.workspace_allocations.saturating_sub(before.workspace_allocations),
            workspace_overflows: self.workspace_overflows.saturating_sub(before.workspace_overflows),
            ..*self
        }
    }
}

/// The graph type of a backend that cannot capture ([`Backend::capture`] returns `None`).
#[derive(Debug)]
pub enum NoGraph {}

/// One implementation of every op family. Methods validate shapes before any work and return
/// [`crate::KernelError`] on a mismatch.
pub trait Backend: Send + Sync + Debug {
    /// A buffer of `T` owned by the backend.
    type Buf<T: Elem>: Send + Sync + Debug;
    /// A block-scaled FP8 weight resident on the backend.
    type Weight: Send + Sync + Debug;
    /// A bf16 weight resident on the backend (router, lm_head, eh_proj, the MLA up-projections).
    type DenseWeight: Send + Sync + Debug;
    /// A RoPE cos/sin table resident on the backend.
    type Rope: Send + Sync + Debug;
    /// A dispatch plan (per-expert counts, offsets and slot maps) for one batch.
    type Plan: Send + Sync + Debug;
    /// A captured step, replayed without host work ([`Backend::capture`]).
    type Graph: Send + Sync + Debug;

    /// A short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Runs one model step `f` (its kernels, called from this thread). The CPU backend keeps
    /// its thread pool polling for work during the step ([`crate::cpu::with_busy_pool`]);
    /// the others just run `f`.
    fn run_step<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }

    // --- memory -------------------------------------------------------------------------
    fn zeros<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// Overwrites all of `buf` with `host` (same length), in order with the ops before it.
    fn write<T: Elem>(&self, buf: &mut Self::Buf<T>, host: &[T]) -> Result<()>;
    /// Several host arrays at once, one buffer each. A device backend may make this one
    /// allocation and one copy (the CUDA backend does: a step's index tables).
    fn upload_many<T: Elem>(&self, parts: &[&[T]]) -> Result<Vec<Self::Buf<T>>> {
        parts.iter().map(|p| self.upload(p)).collect()
    }
    /// [`Backend::write`] of several buffers at once (`bufs[i]` gets `hosts[i]`, same
    /// lengths). Buffers made by one [`Backend::upload_many`] are written in one copy on a
    /// device backend that made them one allocation.
    fn write_many<T: Elem>(&self, bufs: &mut [&mut Self::Buf<T>], hosts: &[&[T]]) -> Result<()> {
        crate::error::check_len("write_many", "hosts", hosts.len(), bufs.len())?;
        bufs.iter_mut().zip(hosts).try_for_each(|(b, h)| self.write(b, h))
    }
    /// Makes a weight resident. A host backend may share the storage of the view's
    /// [`Fp8WeightRef::source`] instead of copying (the CPU backend does, so a weight read in
    /// place from a memory-mapped checkpoint stays in the map).
    fn upload_weight(&self, w: Fp8WeightRef<'_>) -> Result<Self::Weight>;
    /// Makes an owned weight (a `Vec`, or a range of a memory map) resident, consuming it.
    /// The default uploads its view; the CPU backend keeps the weight itself, without a copy.
    fn upload_weight_owned(&self, w: Fp8Weight) -> Result<Self::Weight> {
        self.upload_weight(w.view())
    }
    /// Makes several weights resident at once, in order: a MoE layer's experts of one
    /// projection. A backend may place weights of one shape side by side in one allocation, so
    /// that a grouped GEMM over them (or over a consecutive run of them, in this order) is one
    /// launch of its fastest kernel; the CUDA backend does, for its sm90 GEMM. The default
    /// uploads each one ([`Backend::upload_weight`]).
    fn upload_weights(&self, w: &[Fp8WeightRef<'_>]) -> Result<Vec<Self::Weight>> {
        w.iter().map(|w| self.upload_weight(*w)).collect()
    }
    /// `(rows, cols)` of a weight.
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);
    /// As [`Backend::upload_weight`], for a bf16 weight.
    fn upload_dense_weight(&self, w: Bf16WeightRef<'_>) -> Result<Self::DenseWeight>;
    /// As [`Backend::upload_weight_owned`], for a bf16 weight.
    fn upload_dense_weight_owned(&self, w: Bf16Weight) -> Result<Self::DenseWeight> {
        self.upload_dense_weight(w.view())
    }
    fn rope_table(&self, cfg: &RopeCfg, max_pos: usize) -> Result<Self::Rope>;

    // --- steps: deferred checks, the workspace, graphs, timing ----------------------------
    /// Enters a step (steps nest; the outermost counts). On a device backend the ops of a step
    /// do not wait for the device: checks the kernels make on the device (non-finite values,
    /// ids out of range) are read back once, at [`Backend::end_step`], and temporaries come
    /// from the workspace ([`Backend::reserve_workspace`]). The CPU checks as it goes.
    fn begin_step(&self) -> Result<()> {
        Ok(())
    }
    /// Leaves a step; at the outermost, the first failed device-side check of the step as
    /// [`KernelError::DeviceCheck`] (outputs of that step are then unusable).
    fn end_step(&self) -> Result<()> {
        Ok(())
    }
    /// Starts measuring the workspace the steps run next need ([`Backend::measured_workspace`]).
    fn measure_workspace(&self) -> Result<()> {
        Ok(())
    }
    /// The peak workspace bytes of the steps since [`Backend::measure_workspace`] (0 on the CPU).
    fn measured_workspace(&self) -> usize {
        0
    }
    /// Reserves the step workspace, once (at load, for the largest step): the temporaries of
    /// a step are carved from it instead of being allocated one by one. A no-op on the CPU.
    fn reserve_workspace(&self, _bytes: usize) -> Result<()> {
        Ok(())
    }
    /// Whether the checks of a step are read back only at [`Backend::end_step`] (a device
    /// backend: reading anything back inside a step would make the host wait for the device,
    /// and a graph capture cannot). Then a caller that wants a check of its own inside a step
    /// folds it into one the kernels make (a decode step: the sampler's NaN check). False on
    /// the CPU, which checks as it goes.
    fn defers_checks(&self) -> bool {
        false
    }
    /// Whether [`Backend::capture`] records graphs (false on the CPU).
    fn can_capture(&self) -> bool {
        false
    }
    /// Records what `f` enqueues (one step, nothing runs) into a graph that
    /// [`Backend::replay`] runs again on the same buffers with no host work. `f` must not read
    /// anything back, upload, or keep a buffer it allocates. `Ok(None)`, without running `f`,
    /// on a backend that cannot capture (the CPU).
    fn capture<E: From<KernelError>>(&self, _f: impl FnMut() -> Result<(), E>) -> Result<Option<Self::Graph>, E> {
        Ok(None)
    }
    /// Runs a captured step again (its inputs are whatever its buffers hold now), then reads
    /// its device-side checks back, as [`Backend::end_step`].
    fn replay(&self, g: &Self::Graph) -> Result<()>;
    /// Runs `f`; with its result, the seconds of device time of the work it enqueued (events
    /// around it; waits for that work), or `None` on a backend without a device clock (CPU).
    fn timed<R, E: From<KernelError>>(&self, f: impl FnOnce() -> Result<R, E>) -> Result<(R, Option<f64>), E> {
        f().map(|r| (r, None))
    }
    /// The device's measured copy bandwidth, bytes/s (read + write), or `None` (CPU: use
    /// `machine::Limits`).
    fn copy_bandwidth(&self) -> Result<Option<f64>> {
        Ok(None)
    }
    /// What the device did so far (all zero on the CPU).
    fn stats(&self) -> DeviceStats {
        DeviceStats::default()
    }

    // --- small ops ----------------------------------------------------------------------
    /// `acc += x`, element-wise (residual and shared-expert sums).
    fn add_assign(&self, acc: &mut Self::Buf<f32>, x: &Self::Buf<f32>) -> Result<()>;
    fn rms_norm(&self, x: &Self::Buf<f32>, w: &Self::Buf<f32>, shape: RowsShape, eps: f32, out: &mut Self::Buf<f32>) -> Result<()>;
    /// `residual += x; out = rms_norm(residual)`.
    fn add_rms_norm(
        &self,
        x: &Self::Buf<f32>,
        residual: &mut Self::Buf<f32>,
        w: &Self::Buf<f32>,
        shape: RowsShape,
        eps: f32,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    fn silu_mul(&self, gate: &Self::Buf<f32>, up: &Self::Buf<f32>, shape: RowsShape, out: &mut Self::Buf<f32>) -> Result<()>;
    fn softmax(&self, x: &Self::Buf<f32>, shape: RowsShape, out: &mut Self::Buf<f32>) -> Result<()>;
    fn embedding(&self, table: &Self::Buf<half::bf16>, shape: EmbedShape, ids: &Self::Buf<u32>, out: &mut Self::Buf<f32>) -> Result<()>;
    fn apply_rope(&self, x: &mut Self::Buf<f32>, layout: RopeLayout, positions: &Self::Buf<u32>, table: &Self::Rope) -> Result<()>;
    fn act_quant(
        &self,
        x: &Self::Buf<f32>,
        shape: ActQuantShape,
        fmt: ScaleFmt,
        q: &mut Self::Buf<u8>,
        scales: &mut Self::Buf<f32>,
    ) -> Result<()>;

    // --- GEMM ---------------------------------------------------------------------------
    /// Whether the fp8 GEMM path honours a weight's activation scale format `fmt`
    /// ([`Fp8Weight::with_act_scale_fmt`]). Every backend does `Float`; the CPU backend also
    /// `Ue8m0`. A model refuses, naming the config field, to run a format its backend lacks.
    fn supports_act_scale_fmt(&self, fmt: ScaleFmt) -> bool {
        fmt == ScaleFmt::Float
    }
    /// `out = a · wᵀ` (`a` `[m, k]` f32, `w` `[n, k]`) on either path (`docs/model.md` §4.5);
    /// the fp8 path quantises `a` per 1x128 tile with [`ScaleFmt::Float`] scales.
    fn gemm(&self, a: &Self::Buf<f32>, w: &Self::Weight, shape: GemmShape, path: GemmPath, out: &mut Self::Buf<f32>) -> Result<()>;
    /// The fp8 path on an activation already quantised per 1x128 tile ([`Backend::act_quant`]
    /// with either [`ScaleFmt`]: ue8m0 scales are f32 powers of two, used as they are):
    /// `a_q` `[m, k]` e4m3 codes, `a_s` `[m, k/128]` scales, `k` a multiple of 128
    /// (`docs/model.md` §4.4).
    fn gemm_quantized(
        &self,
        a_q: &Self::Buf<u8>,
        a_s: &Self::Buf<f32>,
        w: &Self::Weight,
        shape: GemmShape,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// `out = a · wᵀ` against a bf16 weight ([`Backend::DenseWeight`]), accumulated in f32 (the
    /// router runs here in f32). "Dense" in this trait's names means bf16, as opposed to FP8.
    fn gemm_dense(&self, a: &Self::Buf<f32>, w: &Self::DenseWeight, shape: GemmShape, out: &mut Self::Buf<f32>) -> Result<()>;
    /// `w` with an int8 copy for [`Backend::gemm_dense_screened`] (the opt-in int8 `lm_head`).
    /// Backends without the screened product say so.
    fn screen_dense_weight(&self, w: &Self::DenseWeight) -> Result<Self::DenseWeight> {
        let _ = w;
        Err(KernelError::Invalid {
            op: "screen_dense_weight",
            what: "backend",
            detail: format!("the int8-screened bf16 product runs on the CPU backend only, not on {}", self.name()),
        })
    }
    /// `out = a · wᵀ` screened by `w`'s int8 copy when it has one
    /// ([`crate::bf16_gemm::gemm_bf16_screened`]: every row's arg-max, and the values of all
    /// columns that could hold it, are those of [`Backend::gemm_dense`]; the others are int8
    /// estimates), and exactly [`Backend::gemm_dense`] otherwise.
    fn gemm_dense_screened(&self, a: &Self::Buf<f32>, w: &Self::DenseWeight, shape: GemmShape, out: &mut Self::Buf<f32>) -> Result<()> {
        self.gemm_dense(a, w, shape, out)
    }
    /// Expert `e` multiplies rows `offsets[e]..offsets[e+1]` of `a`.
    fn grouped_gemm_contiguous(
        &self,
        a: &Self::Buf<f32>,
        offsets: &Self::Buf<u32>,
        w: &[&Self::Weight],
        path: GemmPath,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// `a` is `[E, capacity, K]`; expert `e` multiplies its first `counts[e]` rows.
    fn grouped_gemm_masked(
        &self,
        a: &Self::Buf<f32>,
        counts: &Self::Buf<u32>,
        capacity: usize,
        w: &[&Self::Weight],
        path: GemmPath,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    // --- MoE routing and permutation ------------------------------------------------------
    fn route(
        &self,
        cfg: &RouteCfg,
        tokens: usize,
        logits: &Self::Buf<f32>,
        bias: Option<&Self::Buf<f32>>,
        indices: &mut Self::Buf<u32>,
        weights: &mut Self::Buf<f32>,
    ) -> Result<()>;
    fn dispatch_plan(&self, shape: PlanShape, topk_ids: &Self::Buf<u32>) -> Result<Self::Plan>;
    /// [`Backend::grouped_gemm_contiguous`] with the plan's offsets: expert `e` multiplies rows
    /// `offsets[e]..offsets[e+1]` of `a` (`[pairs, k]`). A device backend schedules the rows
    /// on the device, without reading the offsets back.
    fn grouped_gemm_planned(
        &self,
        a: &Self::Buf<f32>,
        plan: &Self::Plan,
        w: &[&Self::Weight],
        path: GemmPath,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// Two [`Backend::gemm`] of the same activation against weights of the same shape (an MLP's
    /// gate and up projection), with the same results. The default runs them one after the
    /// other; the CPU runs both in one parallel pass.
    fn gemm_pair(
        &self,
        a: &Self::Buf<f32>,
        w: [&Self::Weight; 2],
        shape: GemmShape,
        path: GemmPath,
        out: [&mut Self::Buf<f32>; 2],
    ) -> Result<()> {
        let [o0, o1] = out;
        self.gemm(a, w[0], shape, path, o0)?;
        self.gemm(a, w[1], shape, path, o1)
    }
    /// Two [`Backend::grouped_gemm_planned`] of the same activations and plan (every expert's
    /// gate and up projection), with the same results. The default runs them one after the
    /// other; the CPU runs both in one parallel pass.
    fn grouped_gemm_planned_pair(
        &self,
        a: &Self::Buf<f32>,
        plan: &Self::Plan,
        w: [&[&Self::Weight]; 2],
        path: GemmPath,
        out: [&mut Self::Buf<f32>; 2],
    ) -> Result<()> {
        let [o0, o1] = out;
        self.grouped_gemm_planned(a, plan, w[0], path, o0)?;
        self.grouped_gemm_planned(a, plan, w[1], path, o1)
    }
    /// Per-expert row offsets of a plan (`n_experts + 1` entries), as grouped GEMM takes them.
    fn plan_offsets(&self, plan: &Self::Plan) -> Result<Self::Buf<u32>>;
    fn permute(&self, plan: &Self::Plan, hidden: usize, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()>;
    /// `out[t] = Σ_j weights[t, j] · y[slot(t, j)]`.
    fn unpermute(
        &self,
        plan: &Self::Plan,
        hidden: usize,
        y: &Self::Buf<f32>,
        weights: &Self::Buf<f32>,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    // --- MLA attention (see `attention` for the cache layout and the exact contracts) -------
    /// Normalises the latent of each `kv` row with `norm_w` and writes `[c_kv | k_pe]` to the
    /// layer's page pool at `slots[t]`.
    fn mla_cache_write(
        &self,
        kv: &Self::Buf<f32>,
        norm_w: &Self::Buf<f32>,
        eps: f32,
        slots: &Self::Buf<u32>,
        shape: CacheWriteShape,
        pool: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// Copies sequences' cached rows into contiguous `c_kv [keys, kv_lora]` and `k_pe [keys, rope]`.
    fn mla_cache_gather(
        &self,
        pool: &Self::Buf<f32>,
        block_table: &Self::Buf<u32>,
        seq_lens: &Self::Buf<u32>,
        shape: GatherShape,
        c_kv: &mut Self::Buf<f32>,
        k_pe: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// `out[t,h] = [W_UK[h]ᵀ q_nope[t,h] | q_pe[t,h]]` (`w_uk` is `[H·nope, kv_lora]`).
    /// `w_uk` is one or more parts summed (`W_UK = Σ parts`, e.g. a bf16 hi/lo pair); `q_pe`
    /// is copied once.
    fn mla_absorb_q(
        &self,
        q: &Self::Buf<f32>,
        w_uk: &[&Self::DenseWeight],
        dims: MlaDims,
        rows: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// `out[t, h·v..] = W_UV[h] o_lat[t,h]` (`w_uv` is `[H·v, kv_lora]`).
    fn mla_expand_v(
        &self,
        o_lat: &Self::Buf<f32>,
        w_uv: &Self::DenseWeight,
        dims: MlaDims,
        rows: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// [`Backend::mla_expand_v`] with `W_UV` the sum of `w_uv`'s parts (the bf16 pair): each
    /// part's product, added in order. The default runs one call per part.
    fn mla_expand_v_parts(
        &self,
        o_lat: &Self::Buf<f32>,
        w_uv: &[&Self::DenseWeight],
        dims: MlaDims,
        rows: usize,
        out: &mut Self::Buf<f32>,
    ) -> Result<()> {
        let (first, rest) =
            w_uv.split_first().ok_or_else(|| crate::error::shape_err("mla_expand_v_parts", "w_uv needs at least one part"))?;
        self.mla_expand_v(o_lat, first, dims, rows, out)?;
        for w in rest {
            let mut part = self.zeros::<f32>(self.len(out))?;
            self.mla_expand_v(o_lat, w, dims, rows, &mut part)?;
            self.add_assign(out, &part)?;
        }
        Ok(())
    }
    /// FlashMLA-style decode over the paged latent cache: `q [B, H, width]` → `out [B, H, kv_lora]`.
    fn mla_decode(
        &self,
        q: &Self::Buf<f32>,
        pool: &Self::Buf<f32>,
        block_table: &Self::Buf<u32>,
        kv_lens: &Self::Buf<u32>,
        params: &DecodeParams,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// The expanded causal attention of a batch of sequences (absolute positions).
    fn mla_prefill(
        &self,
        inputs: PrefillInputs<'_, Self::Buf<f32>, Self::Buf<u32>>,
        params: &PrefillParams,
        out: &mut Self::Buf<f32>,
    ) -> Result<()>;

    // --- sampling -----------------------------------------------------------------------
    /// One token per row of `logits` (`[rows, vocab]`), each row with its own parameters and
    /// uniform: the rule of [`crate::sample`] ([`sample::sample_rows`]), ties to the lowest id.
    fn sample_rows(&self, logits: &Self::Buf<f32>, shape: SampleShape, rows: &Self::Buf<SampleRow>, out: &mut Self::Buf<u32>)
    -> Result<()>;
}

/// The CPU backend: host vectors and the fast, multi-threaded kernels of this crate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf<T: Elem> = Vec<T>;
    type Weight = Fp8Weight;
    type DenseWeight = Bf16Weight;
    type Rope = RopeTable;
    type Plan = DispatchPlan;
    type Graph = NoGraph;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn run_step<R>(&self, f: impl FnOnce() -> R) -> R {
        crate::cpu::with_busy_pool(f)
    }
    fn write<T: Elem>(&self, buf: &mut Vec<T>, host: &[T]) -> Result<()> {
        crate::error::check_len("write", "host", host.len(), buf.len())?;
        buf.copy_from_slice(host);
        Ok(())
    }
    fn replay(&self, g: &NoGraph) -> Result<()> {
        match *g {}
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }
    fn download<T: Elem>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    /// Host memory is this backend's memory: a view of an owned weight is cloned (which shares
    /// a mapped weight's map and copies an owned one's `Vec`); a bare view is copied.
    fn upload_weight(&self, w: Fp8WeightRef<'_>) -> Result<Fp8Weight> {
        match w.source() {
            Some(src) => Ok(src.clone()),
            None => Fp8Weight::new(w.rows(), w.cols(), w.data().to_vec(), w.scale_inv().to_vec()),
        }
    }
    fn upload_weight_owned(&self, w: Fp8Weight) -> Result<Fp8Weight> {
        Ok(w)
    }
    fn weight_shape(&self, w: &Fp8Weight) -> (usize, usize) {
        (w.rows(), w.cols())
    }
    fn upload_dense_weight(&self, w: Bf16WeightRef<'_>) -> Result<Bf16Weight> {
        match w.source() {
            Some(src) => Ok(src.clone()),
            None => Bf16Weight::new(w.rows(), w.cols(), w.data().to_vec()),
        }
    }
    fn upload_dense_weight_owned(&self, w: Bf16Weight) -> Result<Bf16Weight> {
        Ok(w)
    }
    fn rope_table(&self, cfg: &RopeCfg, max_pos: usize) -> Result<RopeTable> {
        RopeTable::new(cfg, max_pos)
    }

    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        crate::error::check_len("add_assign", "x", x.len(), acc.len())?;
        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        Ok(())
    }
    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, shape: RowsShape, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        norm::rms_norm(x, w, shape, eps, out)
    }
    fn add_rms_norm(
        &self,
        x: &Vec<f32>,
        residual: &mut Vec<f32>,
        w: &Vec<f32>,
        shape: RowsShape,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        norm::add_rms_norm(x, residual, w, shape, eps, out)
    }
    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, shape: RowsShape, out: &mut Vec<f32>) -> Result<()> {
        act::silu_mul(gate, up, shape, out)
    }
    fn softmax(&self, x: &Vec<f32>, shape: RowsShape, out: &mut Vec<f32>) -> Result<()> {
        act::softmax(x, shape, out)
    }
    fn embedding(&self, table: &Vec<half::bf16>, shape: EmbedShape, ids: &Vec<u32>, out: &mut Vec<f32>) -> Result<()> {
        embed::embedding(table, shape, ids, out)
    }
    fn apply_rope(&self, x: &mut Vec<f32>, layout: RopeLayout, positions: &Vec<u32>, table: &RopeTable) -> Result<()> {
        rope::apply_rope(x, layout, positions, table)
    }
    fn act_quant(&self, x: &Vec<f32>, shape: ActQuantShape, fmt: ScaleFmt, q: &mut Vec<u8>, scales: &mut Vec<f32>) -> Result<()> {
        fp8::act_quant(x, shape, fmt, q, scales)
    }

    fn supports_act_scale_fmt(&self, _fmt: ScaleFmt) -> bool {
        true
    }
    fn gemm(&self, a: &Vec<f32>, w: &Fp8Weight, shape: GemmShape, path: GemmPath, out: &mut Vec<f32>) -> Result<()> {
        if path == GemmPath::Fp8 && w.act_scale_fmt() != ScaleFmt::Float {
            return crate::gemm_fmt::gemm(a, w, shape, out);
        }
        gemm::gemm(a, w.view(), shape, path, out)
    }
    fn gemm_quantized(&self, a_q: &Vec<u8>, a_s: &Vec<f32>, w: &Fp8Weight, shape: GemmShape, out: &mut Vec<f32>) -> Result<()> {
        gemm::gemm_fp8_quantized(a_q, a_s, w.view(), shape, out)
    }
    fn gemm_dense(&self, a: &Vec<f32>, w: &Bf16Weight, shape: GemmShape, out: &mut Vec<f32>) -> Result<()> {
        bf16_gemm::gemm_bf16(a, w.view(), shape, out)
    }
    fn screen_dense_weight(&self, w: &Bf16Weight) -> Result<Bf16Weight> {
        Ok(w.clone().with_int8_screen())
    }
    fn gemm_dense_screened(&self, a: &Vec<f32>, w: &Bf16Weight, shape: GemmShape, out: &mut Vec<f32>) -> Result<()> {
        match w.int8_screen() {
            Some(q) => bf16_gemm::gemm_bf16_screened(a, w.view(), q, shape, out),
            None => bf16_gemm::gemm_bf16(a, w.view(), shape, out),
        }
    }
    fn grouped_gemm_contiguous(
        &self,
        a: &Vec<f32>,
        offsets: &Vec<u32>,
        w: &[&Fp8Weight],
        path: GemmPath,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if path == GemmPath::Fp8 && w.iter().any(|w| w.act_scale_fmt() != ScaleFmt::Float) {
            return crate::gemm_fmt::grouped_contiguous(a, offsets, w, out);
        }
        let views: Vec<Fp8WeightRef<'_>> = w.iter().map(|w| w.view()).collect();
        gemm::grouped_contiguous(a, offsets, &views, path, out)
    }
    fn grouped_gemm_masked(
        &self,
        a: &Vec<f32>,
        counts: &Vec<u32>,
        capacity: usize,
        w: &[&Fp8Weight],
        path: GemmPath,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if path == GemmPath::Fp8 && w.iter().any(|w| w.act_scale_fmt() != ScaleFmt::Float) {
            return crate::gemm_fmt::grouped_masked(a, counts, capacity, w, out);
        }
        let views: Vec<Fp8WeightRef<'_>> = w.iter().map(|w| w.view()).collect();
        gemm::grouped_masked(a, counts, capacity, &views, path, out)
    }

    fn route(
        &self,
        cfg: &RouteCfg,
        tokens: usize,
        logits: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        indices: &mut Vec<u32>,
        weights: &mut Vec<f32>,
    ) -> Result<()> {
        gating::route(cfg, tokens, logits, bias.map(|b| b.as_slice()), indices, weights)
    }
    fn dispatch_plan(&self, shape: PlanShape, topk_ids: &Vec<u32>) -> Result<DispatchPlan> {
        DispatchPlan::build(shape, topk_ids)
    }
    fn grouped_gemm_planned(&self, a: &Vec<f32>, plan: &DispatchPlan, w: &[&Fp8Weight], path: GemmPath, out: &mut Vec<f32>) -> Result<()> {
        let views: Vec<Fp8WeightRef<'_>> = w.iter().map(|w| w.view()).collect();
        gemm::grouped_contiguous(a, plan.offsets(), &views, path, out)
    }
    fn gemm_pair(&self, a: &Vec<f32>, w: [&Fp8Weight; 2], shape: GemmShape, path: GemmPath, out: [&mut Vec<f32>; 2]) -> Result<()> {
        let [o0, o1] = out;
        if path == GemmPath::Fp8 && w.iter().any(|w| w.act_scale_fmt() != ScaleFmt::Float) {
            self.gemm(a, w[0], shape, path, o0)?;
            return self.gemm(a, w[1], shape, path, o1);
        }
        // One expert over every row: the dense GEMM's jobs, both in one pass.
        for (w, o) in w.iter().zip([&*o0, &*o1]) {
            shape.validate("gemm_pair", path, a.len(), &w.view(), o.len())?;
        }
        let offsets = [0, u32::try_from(shape.m).map_err(|_| crate::error::shape_err("gemm_pair", "more than 2^32 rows"))?];
        gemm::grouped_contiguous_pair(a, &offsets, [&[w[0].view()], &[w[1].view()]], path, [o0, o1])
    }
    fn grouped_gemm_planned_pair(
        &self,
        a: &Vec<f32>,
        plan: &DispatchPlan,
        w: [&[&Fp8Weight]; 2],
        path: GemmPath,
        out: [&mut Vec<f32>; 2],
    ) -> Result<()> {
        let v0: Vec<Fp8WeightRef<'_>> = w[0].iter().map(|w| w.view()).collect();
        let v1: Vec<Fp8WeightRef<'_>> = w[1].iter().map(|w| w.view()).collect();
        let [o0, o1] = out;
        gemm::grouped_contiguous_pair(a, plan.offsets(), [&v0, &v1], path, [o0, o1])
    }
    fn plan_offsets(&self, plan: &DispatchPlan) -> Result<Vec<u32>> {
        Ok(plan.offsets().to_vec())
    }
    fn permute(&self, plan: &DispatchPlan, hidden: usize, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        permute::permute(plan, hidden, x, out)
    }
    fn unpermute(&self, plan: &DispatchPlan, hidden: usize, y: &Vec<f32>, weights: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        permute::unpermute(plan, hidden, y, weights, out)
    }

    fn mla_cache_write(
        &self,
        kv: &Vec<f32>,
        norm_w: &Vec<f32>,
        eps: f32,
        slots: &Vec<u32>,
        shape: CacheWriteShape,
        pool: &mut Vec<f32>,
    ) -> Result<()> {
        attention::cache_write(kv, norm_w, eps, slots, shape, pool)
    }
    fn mla_cache_gather(
        &self,
        pool: &Vec<f32>,
        block_table: &Vec<u32>,
        seq_lens: &Vec<u32>,
        shape: GatherShape,
        c_kv: &mut Vec<f32>,
        k_pe: &mut Vec<f32>,
    ) -> Result<()> {
        attention::gather(pool, block_table, seq_lens, shape, c_kv, k_pe)
    }
    fn mla_absorb_q(&self, q: &Vec<f32>, w_uk: &[&Bf16Weight], dims: MlaDims, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let parts: Vec<Bf16WeightRef<'_>> = w_uk.iter().map(|w| w.view()).collect();
        attention::absorb_q_parts(q, &parts, dims, rows, out)
    }
    fn mla_expand_v(&self, o_lat: &Vec<f32>, w_uv: &Bf16Weight, dims: MlaDims, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        attention::expand_v(o_lat, w_uv.view(), dims, rows, out)
    }
    fn mla_expand_v_parts(&self, o_lat: &Vec<f32>, w_uv: &[&Bf16Weight], dims: MlaDims, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let parts: Vec<Bf16WeightRef<'_>> = w_uv.iter().map(|w| w.view()).collect();
        attention::expand_v_parts(o_lat, &parts, dims, rows, out)
    }
    fn mla_decode(
        &self,
        q: &Vec<f32>,
        pool: &Vec<f32>,
        block_table: &Vec<u32>,
        kv_lens: &Vec<u32>,
        params: &DecodeParams,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        attention::decode(q, pool, block_table, kv_lens, params, out)
    }
    fn mla_prefill(&self, x: PrefillInputs<'_, Vec<f32>, Vec<u32>>, params: &PrefillParams, out: &mut Vec<f32>) -> Result<()> {
        let x: PrefillInputs<'_, [f32], [u32]> =
            PrefillInputs { q: x.q, k_nope: x.k_nope, k_pe: x.k_pe, v: x.v, q_pos: x.q_pos, cu_q: x.cu_q, cu_k: x.cu_k };
        attention::prefill(x, params, out)
    }

    fn sample_rows(&self, logits: &Vec<f32>, shape: SampleShape, rows: &Vec<SampleRow>, out: &mut Vec<u32>) -> Result<()> {
        sample::sample_rows(logits, shape, rows, out)
    }
}
