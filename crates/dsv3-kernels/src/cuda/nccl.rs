//! NCCL point-to-point between GPUs, for expert parallelism across processes (one process per
//! GPU): a communicator on one GPU ([`NcclComm`]) and the variable all-to-all the MoE
//! dispatch and combine need, as one `ncclGroupStart` … `ncclGroupEnd` of `ncclSend` /
//! `ncclRecv` per peer (the count/displacement rules of [`crate::a2a`]).
//!
//! The group's unique id ([`NcclComm::unique_id`]) is made by one rank and handed to the
//! others by the launcher (MPI in `dsv3-dist`). The buffers are staged through the host,
//! like the rest of the expert-parallel layer (see `dsv3_moe::ep`): upload, exchange on the
//! GPU, download.
//!
//! cudarc loads `libnccl.so` at run time (feature `cuda`); a machine without it, or without a
//! GPU, gets [`KernelError::CudaUnavailable`], as does a build without the feature.
//! **Not run on hardware yet**: no GPU was available where this was written.

use crate::error::{KernelError, Result};

/// An NCCL unique id: 128 opaque bytes, the same on every rank of a group.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

/// Rank `rank` of an NCCL group of `n_ranks` GPUs, on its own stream of its GPU.
#[derive(Debug)]
pub struct NcclComm {
    imp: imp::Comm,
    rank: usize,
    n_ranks: usize,
}

impl NcclComm {
    /// A new unique id for a group (rank 0 makes it, the others receive it).
    pub fn unique_id() -> Result<NcclId> {
        imp::unique_id()
    }

    /// Joins the group `id` as `rank` of `n_ranks` on GPU `ordinal` (a collective: every rank
    /// of the group calls it).
    pub fn new(ordinal: usize, rank: usize, n_ranks: usize, id: &NcclId) -> Result<NcclComm> {
        if rank >= n_ranks {
            return Err(KernelError::Shape { op: "nccl", detail: format!("rank {rank} of {n_ranks}") });
        }
        Ok(NcclComm { imp: imp::Comm::new(ordinal, rank, n_ranks, id)?, rank, n_ranks })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn n_ranks(&self) -> usize {
        self.n_ranks
    }

    /// The variable all-to-all of bytes: `send_counts[p]` bytes of `send` (contiguous, in
    /// peer order) go to peer `p`; returns the bytes every peer sent here, `recv_counts[p]`
    /// from peer `p`, in peer order. The counts must mirror the peers' (exchanged first).
    pub fn all_to_all_v(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>> {
        let n = self.n_ranks;
        if send_counts.len() != n || recv_counts.len() != n || send_counts.iter().sum::<usize>() != send.len() {
            return Err(KernelError::Shape {
                op: "nccl",
                detail: format!("{} send / {} receive counts for {n} ranks, {} bytes", send_counts.len(), recv_counts.len(), send.len()),
            });
        }
        self.imp.all_to_all_v(send, send_counts, recv_counts)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::NcclId;
    use crate::cuda::driver::{guarded, probe_libcuda, probe_library};
    use crate::error::{KernelError, Result};
    use cudarc::driver::{CudaContext, CudaStream};
    use cudarc::nccl::{Comm as Nccl, Id, group_end, group_start};
    use std::sync::Arc;

    fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> KernelError {
        KernelError::Cuda(format!("NCCL {what}: {:?}", e.0))
    }

    fn probe() -> Result<()> {
        probe_libcuda()?;
        probe_library(&["libnccl.so.2", "libnccl.so"], "libnccl")
    }

    pub(super) fn unique_id() -> Result<NcclId> {
        probe()?;
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        let mut out = [0u8; 128];
        for (o, &c) in out.iter_mut().zip(id.internal()) {
            *o = c as u8;
        }
        Ok(NcclId(out))
    }

    pub(super) struct Comm {
        comm: Nccl,
        stream: Arc<CudaStream>,
    }

    impl std::fmt::Debug for Comm {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "NcclComm {{ rank: {}, ranks: {} }}", self.comm.rank(), self.comm.world_size())
        }
    }

    impl Comm {
        pub(super) fn new(ordinal: usize, rank: usize, n: usize, id: &NcclId) -> Result<Comm> {
            probe()?;
            let ctx = guarded("no usable GPU: creating the context failed", || CudaContext::new(ordinal))?;
            let stream = ctx.new_stream().map_err(|e| KernelError::Cuda(e.to_string()))?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (i, &b) in internal.iter_mut().zip(&id.0) {
                *i = b as std::ffi::c_char;
            }
            let comm = Nccl::from_rank(stream.clone(), rank, n, Id::uninit(internal)).map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Comm { comm, stream })
        }

        pub(super) fn all_to_all_v(&self, send: &[u8], sc: &[usize], rc: &[usize]) -> Result<Vec<u8>> {
            let drv = |e: cudarc::driver::DriverError| KernelError::Cuda(e.to_string());
            let total: usize = rc.iter().sum();
            // Zero-byte buffers are never allocated; peers with zero counts are skipped on both
            // sides (the counts mirror each other).
            let src = if send.is_empty() { None } else { Some(self.stream.clone_htod(send).map_err(drv)?) };
            let mut dst = if total == 0 { None } else { Some(self.stream.alloc_zeros::<u8>(total).map_err(drv)?) };
            group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
            let mut issued = Ok(());
            let (mut s_at, mut r_at) = (0usize, 0usize);
            for p in 0..sc.len() {
                if let (Some(src), true) = (&src, sc[p] > 0) {
                    issued = issued.and(self.comm.send(&src.slice(s_at..s_at + sc[p]), p as i32).map_err(|e| nccl_err("ncclSend", e)));
                }
                if let (Some(dst), true) = (&mut dst, rc[p] > 0) {
                    let r = self.comm.recv(&mut dst.slice_mut(r_at..r_at + rc[p]), p as i32);
                    issued = issued.and(r.map(|_| ()).map_err(|e| nccl_err("ncclRecv", e)));
                }
                s_at += sc[p];
                r_at += rc[p];
            }
            // The group is always closed, even after a failed call inside it.
            let ended = group_end().map(|_| ()).map_err(|e| nccl_err("ncclGroupEnd", e));
            issued.and(ended)?;
            match &dst {
                Some(d) => self.stream.clone_dtoh(d).map_err(drv),
                None => Ok(Vec::new()),
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::NcclId;
    use crate::error::{KernelError, Result};
    use std::convert::Infallible;

    fn unavailable() -> KernelError {
        KernelError::CudaUnavailable("dsv3-kernels was built without the `cuda` feature (NCCL needs it)".into())
    }

    pub(super) fn unique_id() -> Result<NcclId> {
        Err(unavailable())
    }

    /// Never constructed.
    #[derive(Debug)]
    pub(super) struct Comm(Infallible);

    impl Comm {
        pub(super) fn new(_ordinal: usize, _rank: usize, _n: usize, _id: &NcclId) -> Result<Comm> {
            Err(unavailable())
        }
        pub(super) fn all_to_all_v(&self, _send: &[u8], _sc: &[usize], _rc: &[usize]) -> Result<Vec<u8>> {
            match self.0 {}
        }
    }
}
