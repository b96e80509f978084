//! MLA attention on the paged latent cache (layout and contracts in [`crate::attention`]):
//! `dsv3_mla_cache_write`, `dsv3_mla_cache_gather`, `dsv3_mla_absorb_q`, `dsv3_mla_expand_v`,
//! `dsv3_mla_decode` (the absorbed form, FlashMLA's contract) and `dsv3_mla_prefill` (the
//! expanded causal form). The checks are the CPU's own (`crate::attention::check_*`), run on
//! the host copies of the index arrays (slots, block tables, lengths, offsets: what a step
//! plan uploads keeps one; anything else is read back); then the kernels' limits on head
//! widths. Copies are exact; the rest agrees with the f64 references within
//! f32 rounding (see the kernels).

use super::gemm::DeviceBf16Weight;
use super::params::*;
use super::{CudaDevice, DeviceBuf, grid_yz, stride_grid, u32_of};
use crate::attention::{self, CacheWriteShape, DecodeParams, GatherShape, MlaDims, PrefillCheck, PrefillInputs, PrefillParams};
use crate::error::{Result, shape_err};

/// Widest `kv_lora + rope` of `dsv3_mla_decode` (20 values per lane).
pub const DECODE_MAX_WIDTH: usize = 640;
/// Widest `kv_lora` of `dsv3_mla_decode` (16 values per lane).
pub const DECODE_MAX_KV_LORA: usize = 512;
/// Widest `qk_nope + qk_rope` and `v` of `dsv3_mla_prefill` (8 values per lane).
pub const PREFILL_MAX_HEAD: usize = 256;
/// Widest `qk_nope` of `dsv3_mla_absorb_q` (its shared query tile).
pub const ABSORB_MAX_NOPE: usize = 256;
/// Widest `kv_lora` of `dsv3_mla_expand_v` (its shared latent tile).
pub const EXPAND_MAX_KV_LORA: usize = 1024;

/// Tokens per block of the absorb / expand kernels, query rows or heads per block of the
/// attention kernels.
const RT: usize = 8;

impl CudaDevice {
    /// `dsv3_mla_cache_write`: [`crate::attention::cache_write`] on the GPU: RMSNorm of each
    /// new latent (the f32 block sum of [`CudaDevice::rms_norm`]) and `k_pe` copied, into the
    /// pool rows `slots[t]`. Slots are checked (in range, distinct) on their host copy first.
    pub fn mla_cache_write(
        &self,
        kv: &DeviceBuf<f32>,
        norm_w: &DeviceBuf<f32>,
        eps: f32,
        slots: &DeviceBuf<u32>,
        shape: CacheWriteShape,
        pool: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::cache_write";
        let host_slots = self.host_copy(slots)?;
        attention::check_cache_write(OP, kv.len(), norm_w.len(), eps, &host_slots, shape, pool.len())?;
        let tokens = u32_of(OP, "tokens", shape.tokens)?;
        let (kv_lora, rope) = (u32_of(OP, "kv_lora", shape.pool.kv_lora)?, u32_of(OP, "rope", shape.pool.rope)?);
        u32_of(OP, "kv_lora + rope", shape.pool.width())?;
        if tokens == 0 {
            return Ok(());
        }
        let (ka, _gk) = self.imp.addr(&kv.imp);
        let (na, _gn) = self.imp.addr(&norm_w.imp);
        let (sa, _gs) = self.imp.addr(&slots.imp);
        let (pa, _gp) = self.imp.addr_mut(&mut pool.imp);
        let p = MlaCacheWriteParams { kv: ka, norm_w: na, slots: sa, pool: pa, tokens, kv_lora, rope, eps };
        // SAFETY: kv is tokens·(kv_lora + rope), norm_w kv_lora (checked); every slot is below
        // num_pages·page_size and distinct (checked on the host copy, which is what the device
        // holds: a host copy is dropped when the device may write the buffer, and is not used
        // after a graph replay), so block t writes only its own pool row, inside the pool
        // (checked length). pool is the only &mut buffer.
        unsafe { self.imp.launch(kernel!(MlaCacheWrite), (tokens, 1), 256, &p) }
    }

    /// `dsv3_mla_cache_gather`: [`crate::attention::gather`] on the GPU (exact copies). The
    /// block table and lengths are checked on their host copies first.
    pub fn mla_cache_gather(
        &self,
        pool: &DeviceBuf<f32>,
        block_table: &DeviceBuf<u32>,
        seq_lens: &DeviceBuf<u32>,
        shape: GatherShape,
        c_kv: &mut DeviceBuf<f32>,
        k_pe: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::gather";
        let (table, lens) = (self.host_copy(block_table)?, self.host_copy(seq_lens)?);
        attention::check_gather(OP, pool.len(), &table, &lens, shape, c_kv.len(), k_pe.len())?;
        let keys = u32_of(OP, "keys", shape.keys)?;
        let (seqs, max_blocks) = (u32_of(OP, "seqs", shape.seqs)?, u32_of(OP, "max_blocks", shape.max_blocks)?);
        let (page_size, kv_lora, rope) = (
            u32_of(OP, "page_size", shape.pool.page_size)?,
            u32_of(OP, "kv_lora", shape.pool.kv_lora)?,
            u32_of(OP, "rope", shape.pool.rope)?,
        );
        u32_of(OP, "kv_lora + rope", shape.pool.width())?;
        if keys == 0 {
            return Ok(());
        }
        let mut cu = vec![0u32; lens.len() + 1];
        for (i, &l) in lens.iter().enumerate() {
            cu[i + 1] = cu[i] + l; // Σ lens == keys < u32::MAX (checked)
        }
        let cu = self.upload(&cu)?;
        let (pa, _gp) = self.imp.addr(&pool.imp);
        let (ta, _gt) = self.imp.addr(&block_table.imp);
        let (ua, _gu) = self.imp.addr(&cu.imp);
        let (ca, _gc) = self.imp.addr_mut(&mut c_kv.imp);
        let (ka, _gk) = self.imp.addr_mut(&mut k_pe.imp);
        let p = MlaCacheGatherParams { pool: pa, table: ta, cu: ua, c_kv: ca, k_pe: ka, keys, seqs, max_blocks, page_size, kv_lora, rope };
        // SAFETY: cu is the prefix sum of the checked lengths (seqs + 1 entries, from 0 to
        // keys), so row k < keys belongs to a sequence i < seqs at position pos < lens[i];
        // `check_gather` proved ceil(lens[i] / page_size) <= max_blocks and every page of those
        // entries < num_pages, so the table read and the pool row are in bounds; c_kv and k_pe
        // are keys·kv_lora and keys·rope (checked), distinct &mut buffers.
        unsafe { self.imp.launch(kernel!(MlaCacheGather), (stride_grid(shape.keys, 1), 1), 256, &p) }
    }

    /// `dsv3_mla_absorb_q`: [`crate::attention::absorb_q`] on the GPU with `W_UK` given as one
    /// or more bf16 parts (applied one after the other, the later ones added to the latent
    /// columns, as the CPU backend does); `q_pe` copied once. Limit: qk_nope <= 256.
    pub fn mla_absorb_q(
        &self,
        q: &DeviceBuf<f32>,
        w_uk: &[&DeviceBf16Weight],
        d: MlaDims,
        rows: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::absorb_q";
        if w_uk.is_empty() {
            return Err(shape_err("mla_absorb_q", "w_uk needs at least one part"));
        }
        for w in w_uk {
            attention::check_absorb(OP, q.len(), w.shape(), d, rows, out.len())?;
        }
        if d.qk_nope > ABSORB_MAX_NOPE {
            return Err(shape_err(OP, format!("qk_nope = {} exceeds the CUDA kernel's {ABSORB_MAX_NOPE}", d.qk_nope)));
        }
        let gz = grid_yz(OP, "rows", rows, RT)?;
        let heads = grid_yz(OP, "heads", d.heads, 1)?;
        u32_of(OP, "out", out.len())?;
        let (nope, rope, kv_lora) =
            (u32_of(OP, "qk_nope", d.qk_nope)?, u32_of(OP, "qk_rope", d.qk_rope)?, u32_of(OP, "kv_lora", d.kv_lora)?);
        if rows == 0 {
            return Ok(());
        }
        for (i, w) in w_uk.iter().enumerate() {
            let (qa, _gq) = self.imp.addr(&q.imp);
            let (wa, _gw) = self.imp.addr(&w.data().imp);
            let (oa, _go) = self.imp.addr_mut(&mut out.imp);
            let accumulate = u32::from(i > 0);
            let p = MlaAbsorbQParams { q: qa, w: wa, out: oa, rows: rows as u32, heads, nope, rope, kv_lora, accumulate };
            // SAFETY: q is rows·H·(nope + rope), out rows·H·(kv_lora + rope), w [H·nope, kv_lora]
            // (all checked); block (x, h, z) reads rows z·8.. (< rows) of head h < H, weight
            // rows h·nope + e (e < nope <= 256, its shared tile) and columns c < kv_lora, and
            // writes out[t, h, c] for those rows only. out is the only &mut buffer.
            unsafe { self.imp.launch3(kernel!(MlaAbsorbQ), (d.kv_lora.div_ceil(256) as u32, heads, gz), 256, &p)? };
        }
        Ok(())
    }

    /// `dsv3_mla_expand_v`: [`crate::attention::expand_v`] on the GPU. Limit: kv_lora <= 1024.
    pub fn mla_expand_v(
        &self,
        o_lat: &DeviceBuf<f32>,
        w_uv: &DeviceBf16Weight,
        d: MlaDims,
        rows: usize,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::expand_v";
        attention::check_expand(OP, o_lat.len(), w_uv.shape(), d, rows, out.len())?;
        if d.kv_lora > EXPAND_MAX_KV_LORA {
            return Err(shape_err(OP, format!("kv_lora = {} exceeds the CUDA kernel's {EXPAND_MAX_KV_LORA}", d.kv_lora)));
        }
        let gz = grid_yz(OP, "rows", rows, RT)?;
        let heads = grid_yz(OP, "heads", d.heads, 1)?;
        u32_of(OP, "o_lat", o_lat.len())?;
        let (v, kv_lora) = (u32_of(OP, "v", d.v)?, u32_of(OP, "kv_lora", d.kv_lora)?);
        if rows == 0 {
            return Ok(());
        }
        let (la, _gl) = self.imp.addr(&o_lat.imp);
        let (wa, _gw) = self.imp.addr(&w_uv.data().imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = MlaExpandVParams { o_lat: la, w: wa, out: oa, rows: rows as u32, heads, v, kv_lora };
        // SAFETY: o_lat is rows·H·kv_lora, out rows·H·v, w [H·v, kv_lora] (checked); block
        // (x, h, z) reads rows z·8.. (< rows) of head h into its tile (kv_lora <= 1024), weight
        // rows h·v + e for e < v, and writes out[t, h·v + e] for those rows only.
        unsafe { self.imp.launch3(kernel!(MlaExpandV), (v.div_ceil(RT as u32), heads, gz), 256, &p) }
    }

    /// `dsv3_mla_decode`: [`crate::attention::decode`] on the GPU (absorbed MLA over the paged
    /// latent cache; a row with no key gets zeros). The block table and lengths are checked on
    /// their host copies first. Limits: kv_lora + rope <= 640, kv_lora <= 512, batch <= 65535.
    pub fn mla_decode(
        &self,
        q: &DeviceBuf<f32>,
        pool: &DeviceBuf<f32>,
        block_table: &DeviceBuf<u32>,
        kv_lens: &DeviceBuf<u32>,
        params: &DecodeParams,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::decode";
        let (table, lens) = (self.host_copy(block_table)?, self.host_copy(kv_lens)?);
        attention::check_decode(OP, q.len(), pool.len(), &table, &lens, params, out.len())?;
        let pl = params.pool;
        if pl.width() > DECODE_MAX_WIDTH || pl.kv_lora > DECODE_MAX_KV_LORA {
            return Err(shape_err(
                OP,
                format!("the CUDA decode takes kv_lora <= {DECODE_MAX_KV_LORA} and kv_lora + rope <= {DECODE_MAX_WIDTH}, got {pl:?}"),
            ));
        }
        let batch = grid_yz(OP, "batch", params.batch, 1)?;
        let heads = u32_of(OP, "heads", params.heads)?;
        let (max_blocks, page_size) = (u32_of(OP, "max_blocks", params.max_blocks)?, u32_of(OP, "page_size", pl.page_size)?);
        if batch == 0 {
            return Ok(());
        }
        let (qa, _gq) = self.imp.addr(&q.imp);
        let (pa, _gp) = self.imp.addr(&pool.imp);
        let (ta, _gt) = self.imp.addr(&block_table.imp);
        let (la, _gl) = self.imp.addr(&kv_lens.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = MlaDecodeParams {
            q: qa,
            pool: pa,
            table: ta,
            kv_lens: la,
            out: oa,
            batch,
            heads,
            max_blocks,
            page_size,
            width: pl.width() as u32,
            kv_lora: pl.kv_lora as u32,
            scale: params.scale,
            pad: 0,
        };
        // SAFETY: q is batch·H·width, out batch·H·kv_lora, the table batch·max_blocks and
        // kv_lens batch entries (all checked); `check_decode` proved every row's length fits its
        // table row and every page it reads is < num_pages, so each cache row read is inside
        // the pool (checked length). Warp (b, h) writes only out[b, h, ..]; out is the only
        // &mut buffer; the widths fit the kernel's registers (limits above).
        unsafe { self.imp.launch(kernel!(MlaDecode), (heads.div_ceil(RT as u32), batch), 256, &p) }
    }

    /// `dsv3_mla_prefill`: [`crate::attention::prefill`] on the GPU (expanded causal attention
    /// by absolute position). `q_pos`, `cu_q` and `cu_k` are checked on their host copies first.
    /// Limits: qk_nope + qk_rope <= 256, v <= 256.
    pub fn mla_prefill(
        &self,
        x: PrefillInputs<'_, DeviceBuf<f32>, DeviceBuf<u32>>,
        params: &PrefillParams,
        out: &mut DeviceBuf<f32>,
    ) -> Result<()> {
        const OP: &str = "attention::prefill";
        let (q_pos, cu_q, cu_k) = (self.host_copy(x.q_pos)?, self.host_copy(x.cu_q)?, self.host_copy(x.cu_k)?);
        let lens = PrefillCheck {
            q: x.q.len(),
            k_nope: x.k_nope.len(),
            k_pe: x.k_pe.len(),
            v: x.v.len(),
            q_pos: &q_pos,
            cu_q: &cu_q,
            cu_k: &cu_k,
        };
        attention::check_prefill(OP, &lens, params, out.len())?;
        let d = params.dims;
        if d.qk_head() > PREFILL_MAX_HEAD || d.v > PREFILL_MAX_HEAD {
            return Err(shape_err(
                OP,
                format!("the CUDA prefill takes qk_nope + qk_rope <= {PREFILL_MAX_HEAD} and v <= {PREFILL_MAX_HEAD}, got {d:?}"),
            ));
        }
        let gy = grid_yz(OP, "tokens", params.tokens, RT)?;
        let heads = u32_of(OP, "heads", d.heads)?;
        let (tokens, seqs) = (u32_of(OP, "tokens", params.tokens)?, u32_of(OP, "seqs", params.seqs)?);
        for (what, n) in [("q", x.q.len()), ("k_nope", x.k_nope.len()), ("v", x.v.len()), ("out", out.len())] {
            u32_of(OP, what, n)?;
        }
        if tokens == 0 {
            return Ok(());
        }
        let (qa, _gq) = self.imp.addr(&x.q.imp);
        let (na, _gn) = self.imp.addr(&x.k_nope.imp);
        let (ka, _gk) = self.imp.addr(&x.k_pe.imp);
        let (va, _gv) = self.imp.addr(&x.v.imp);
        let (pa, _gp) = self.imp.addr(&x.q_pos.imp);
        let (cqa, _gcq) = self.imp.addr(&x.cu_q.imp);
        let (cka, _gck) = self.imp.addr(&x.cu_k.imp);
        let (oa, _go) = self.imp.addr_mut(&mut out.imp);
        let p = MlaPrefillParams {
            q: qa,
            k_nope: na,
            k_pe: ka,
            v: va,
            q_pos: pa,
            cu_q: cqa,
            cu_k: cka,
            out: oa,
            tokens,
            seqs,
            heads,
            nope: d.qk_nope as u32,
            rope: d.qk_rope as u32,
            v_dim: d.v as u32,
            scale: params.scale,
            pad: 0,
        };
        // SAFETY: every length was checked against the shape; cu_q / cu_k run from 0 to
        // tokens / keys without decreasing, so token t < tokens finds its sequence i < seqs,
        // and its keys cu_k[i] + j for j <= q_pos[t] < cu_k[i+1] - cu_k[i] (checked) are rows
        // of k_nope, k_pe and v. Warp (t, h) writes only out[t, h·v..]; out is the only &mut
        // buffer; the head widths fit the kernel's registers (limits above).
        unsafe { self.imp.launch(kernel!(MlaPrefill), (heads, gy), 256, &p) }
    }
}
