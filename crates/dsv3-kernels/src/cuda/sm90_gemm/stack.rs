//! Weight stacks: the device memory of every FP8 weight (a backend weight is one entry of a
//! stack), and where a GEMM writes.

use crate::cuda::{CudaDevice, DeviceBuf, DeviceFp8Weight};
use crate::error::{Result, checked_mul, shape_err};
use crate::fp8::{Fp8WeightRef, blocks};
use std::sync::Arc;

/// The weights of a single GEMM (one group) or of E experts, stacked: codes `[E·N, K]` and
/// `scale_inv` `[E·ceil(N/128), ceil(K/128)]` ([`CudaDevice::upload_fp8_stack`]). The device
/// memory of every FP8 weight: a backend weight ([`DeviceFp8Weight`]) is one entry of a stack.
#[derive(Debug)]
pub struct DeviceFp8Stack {
    pub(in crate::cuda) groups: usize,
    pub(in crate::cuda) n: usize,
    pub(in crate::cuda) k: usize,
    pub(in crate::cuda) data: DeviceBuf<u8>,
    pub(in crate::cuda) scale_inv: DeviceBuf<f32>,
}

/// Entries `first .. first + groups` of a stack (`first + groups <= stack.groups`, which every
/// constructor guarantees): what one launch reads (a whole stack for
/// [`CudaDevice::sm90_fp8_gemm`]; one weight, or a consecutive run of experts, for the
/// backend's GEMMs).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // read by the launches only
pub(in crate::cuda) struct StackRange<'a> {
    pub(in crate::cuda) stack: &'a DeviceFp8Stack,
    pub(super) first: usize,
    pub(super) groups: usize,
}

impl<'a> StackRange<'a> {
    /// All of a stack.
    pub(in crate::cuda) fn all(stack: &'a DeviceFp8Stack) -> StackRange<'a> {
        StackRange { stack, first: 0, groups: stack.groups }
    }
    /// Entries `first .. first + groups`, when the stack has them.
    pub(in crate::cuda) fn new(stack: &'a DeviceFp8Stack, first: usize, groups: usize) -> Option<StackRange<'a>> {
        (groups >= 1 && first.checked_add(groups)? <= stack.groups).then_some(StackRange { stack, first, groups })
    }
    /// Byte offsets of entry `first`'s codes and scales from the starts of the stack's buffers.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(in crate::cuda) fn offsets(&self) -> (u64, u64) {
        let s = self.stack;
        ((self.first * s.n * s.k) as u64, (self.first * blocks(s.n) * blocks(s.k) * size_of::<f32>()) as u64)
    }
}

impl DeviceFp8Stack {
    /// Number of weights (experts).
    pub fn groups(&self) -> usize {
        self.groups
    }
    /// Rows (N) of each weight.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Columns (K) of each weight.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Where a GEMM writes: f32 (what the backend's gemm produces) or bf16 (round to nearest even).
#[derive(Debug)]
pub enum Sm90Out<'a> {
    F32(&'a mut DeviceBuf<f32>),
    Bf16(&'a mut DeviceBuf<half::bf16>),
}

impl Sm90Out<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Sm90Out::F32(b) => b.len(),
            Sm90Out::Bf16(b) => b.len(),
        }
    }
}

impl CudaDevice {
    /// Uploads E validated FP8 weights of one shape, stacked (one weight for a single GEMM),
    /// each copied straight into its place (no host-side concatenation).
    pub fn upload_fp8_stack(&self, w: &[Fp8WeightRef<'_>]) -> Result<DeviceFp8Stack> {
        const OP: &str = "upload_fp8_stack";
        let first = w.first().ok_or_else(|| shape_err(OP, "no weights"))?;
        let (n, k) = (first.rows(), first.cols());
        if let Some(e) = w.iter().position(|x| x.rows() != n || x.cols() != k) {
            return Err(shape_err(OP, format!("weight {e} is [{}, {}], weight 0 is [{n}, {k}]", w[e].rows(), w[e].cols())));
        }
        let (codes, scales) = (checked_mul(OP, "data", n, k)?, blocks(n) * blocks(k));
        let mut data = self.zeros::<u8>(checked_mul(OP, "data", w.len(), codes)?)?;
        let mut scale_inv = self.zeros::<f32>(checked_mul(OP, "scale_inv", w.len(), scales)?)?;
        for (g, x) in w.iter().enumerate() {
            self.write(&mut data, g * codes, x.data())?;
            self.write(&mut scale_inv, g * scales, x.scale_inv())?;
        }
        Ok(DeviceFp8Stack { groups: w.len(), n, k, data, scale_inv })
    }

    /// Uploads E validated FP8 weights of one shape (a MoE layer's experts of one projection)
    /// as one stack and returns them as backend weights, entries `0..E` of it in order: a
    /// grouped GEMM over them (or over a consecutive run of them) takes the sm90 kernel where
    /// it has the shape, and each one still works alone. Errors as [`Self::upload_fp8_stack`].
    pub fn upload_fp8_experts(&self, w: &[Fp8WeightRef<'_>]) -> Result<Vec<DeviceFp8Weight>> {
        let stack = Arc::new(self.upload_fp8_stack(w)?);
        Ok((0..w.len()).map(|index| DeviceFp8Weight::entry(Arc::clone(&stack), index)).collect())
    }
}
