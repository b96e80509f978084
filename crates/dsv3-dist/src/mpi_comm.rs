//! MPI (feature `mpi`): the world, the pipeline's [`Comm`], and the expert-parallel
//! [`Transport`] of each stage.

use crate::EpWire;
use dsv3_kernels::a2a::{CombineBuf, DispatchBuf};
use dsv3_kernels::cuda::nccl::{NcclComm, NcclId};
use dsv3_moe::{MoeError, Transport, wire};
use dsv3_runtime::dist::{Comm, Layout, Tag, dist_err};
use dsv3_runtime::{Result, RuntimeError};
use mpi::Count;
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use std::cell::Cell;
use std::fmt::Display;

/// MPI, started: this process's rank in the world communicator. Dropping it finalises MPI.
pub struct MpiWorld {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Last: finalises MPI after the communicators above are freed.
    _universe: Universe,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiWorld {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl MpiWorld {
    /// Starts MPI (MPI calls from this thread only; the kernels' worker threads never call
    /// it) and a thread that turns the launcher's SIGTERM into a one-line error and exit 1.
    pub fn init() -> Result<MpiWorld> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| dist_err(0, "MPI was already started in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        watch_sigterm(rank, size)?;
        Ok(MpiWorld { world, rank, size, _universe: universe })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }

    /// The job's communicators for `layout` (a collective: every rank calls it): the world
    /// for the pipeline, and the ranks of this rank's stage for its expert parallelism.
    pub fn comm(&self, layout: Layout, wire: EpWire) -> Result<MpiComm<'_>> {
        if layout.world() != self.size {
            return Err(dist_err(self.rank, format!("the layout has {} ranks, MPI has {}", layout.world(), self.size)));
        }
        let (stage, lane) = (layout.stage(self.rank), layout.lane(self.rank));
        let group = self
            .world
            .split_by_color_with_key(Color::with_value(stage as i32), lane as i32)
            .ok_or_else(|| dist_err(self.rank, "splitting the world into pipeline stages failed"))?;
        let rows = match wire {
            EpWire::Mpi => Rows::Mpi,
            EpWire::Nccl { device } => Rows::Nccl(nccl_group(&group, lane, layout.ep, device).map_err(|e| dist_err(self.rank, e))?),
        };
        let ep = MpiTransport { comm: group, rank: lane, n: layout.ep, rows };
        let always = wire != EpWire::Mpi;
        Ok(MpiComm { world: &self.world, rank: self.rank, size: self.size, ep, always, exchanges: Cell::new(0), fault: Fault::from_env() })
    }

    /// Ends the whole job because this rank failed with `err`: prints it (naming this rank)
    /// and calls `MPI_Abort`, after which `mpirun` stops every other rank.
    pub fn abort(&self, err: &dyn Display) -> ! {
        eprintln!("error: rank {} of {}: {err}", self.rank, self.size);
        self.world.abort(1)
    }
}

/// Joins this stage's NCCL group on GPU `device`: lane 0 makes the unique id and broadcasts
/// it over the stage's MPI communicator (with a status byte, so that its failure reaches the
/// others instead of leaving them in `ncclCommInitRank`).
fn nccl_group(group: &SimpleCommunicator, lane: usize, n: usize, device: usize) -> Result<NcclComm, String> {
    let mut buf = [0u8; 129];
    if lane == 0 {
        match NcclComm::unique_id() {
            Ok(NcclId(id)) => buf[1..].copy_from_slice(&id),
            Err(e) => {
                let msg = e.to_string();
                buf[0] = 1;
                let n = msg.len().min(128);
                buf[1..1 + n].copy_from_slice(&msg.as_bytes()[..n]);
            }
        }
    }
    group.process_at_rank(0).broadcast_into(&mut buf[..]);
    if buf[0] != 0 {
        return Err(format!(
            "--ep-wire nccl: lane 0 could not make the NCCL id: {}",
            String::from_utf8_lossy(&buf[1..]).trim_end_matches('\0')
        ));
    }
    let mut id = [0u8; 128];
    id.copy_from_slice(&buf[1..]);
    NcclComm::new(device, lane, n, &NcclId(id)).map_err(|e| format!("--ep-wire nccl on GPU {device}: {e}"))
}

/// Prints, on SIGTERM (what `mpirun` sends every rank when another one aborted or died),
/// that the job was aborted, and exits 1.
fn watch_sigterm(rank: usize, size: usize) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM])
        .map_err(|e| dist_err(rank, format!("cannot watch for SIGTERM: {e}")))?;
    std::thread::Builder::new()
        .name("dsv3-sigterm".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                // One write of the whole line (the ranks share stderr: see main.rs).
                let line = format!(
                    "error: rank {rank} of {size}: the job was aborted (SIGTERM from the MPI launcher): another rank failed or died; its error, or mpirun's report, says which\n"
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                std::process::exit(1);
            }
        })
        .map_err(|e| dist_err(rank, format!("cannot start the SIGTERM watcher: {e}")))?;
    Ok(())
}

/// A failure injected for the job-failure tests (`DSV3_FAULT_INJECT=RANK:EXCHANGE:KIND`):
/// rank `RANK` fails at its `EXCHANGE`-th pipeline exchange, with an error (`error`) or by
/// aborting the process (`crash`, as a killed rank would vanish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    rank: usize,
    at: usize,
    crash: bool,
}

impl Fault {
    fn from_env() -> Option<Fault> {
        let v = std::env::var("DSV3_FAULT_INJECT").ok()?;
        let mut p = v.split(':');
        let (rank, at, kind) = (p.next()?.parse().ok()?, p.next()?.parse().ok()?, p.next()?);
        Some(Fault { rank, at, crash: kind == "crash" })
    }
}

/// One rank's communicators for a job: the world (pipeline) and its stage's group (experts).
pub struct MpiComm<'w> {
    world: &'w SimpleCommunicator,
    rank: usize,
    size: usize,
    ep: MpiTransport,
    /// Whether the pipeline uses the transport even with one lane (to exercise NCCL).
    always: bool,
    exchanges: Cell<usize>,
    fault: Option<Fault>,
}

impl std::fmt::Debug for MpiComm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiComm {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl Comm for MpiComm<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn exchange(&self, tag: Tag, sends: &[(usize, &[u8])], from: &[usize]) -> Result<Vec<Vec<u8>>> {
        let n = self.exchanges.get();
        self.exchanges.set(n + 1);
        if let Some(f) = self.fault.filter(|f| f.rank == self.rank && f.at == n) {
            if f.crash {
                eprintln!("rank {}: DSV3_FAULT_INJECT: crashing at exchange {n}", self.rank);
                std::process::abort();
            }
            return Err(RuntimeError::Request(format!("injected failure at exchange {n} (DSV3_FAULT_INJECT)")));
        }
        if let Some(&(to, d)) = sends.iter().find(|(to, d)| *to >= self.size || d.len() > Count::MAX as usize) {
            return Err(dist_err(self.rank, format!("a message of {} bytes to rank {to} of {}", d.len(), self.size)));
        }
        if let Some(&src) = from.iter().find(|&&s| s >= self.size) {
            return Err(dist_err(self.rank, format!("a receive from rank {src} of {}", self.size)));
        }
        let tag = tag as i32;
        Ok(mpi::request::scope(|scope| {
            // Every send is posted before any receive waits: ranks exchanging with each other
            // in one call cannot deadlock.
            let pending: Vec<_> =
                sends.iter().map(|&(to, d)| self.world.process_at_rank(to as i32).immediate_send_with_tag(scope, d, tag)).collect();
            let got: Vec<Vec<u8>> = from
                .iter()
                .map(|&src| self.world.process_at_rank(src as i32).matched_probe_with_tag(tag).matched_receive_vec::<u8>().0)
                .collect();
            for p in pending {
                p.wait();
            }
            got
        }))
    }
    fn ep(&self) -> &dyn Transport {
        &self.ep
    }
    fn ep_always(&self) -> bool {
        self.always
    }
}

/// How a stage's all-to-alls move their rows and metadata (the counts always go over MPI).
enum Rows {
    /// `MPI_Alltoallv` of host buffers.
    Mpi,
    /// NCCL grouped send/recv through the GPU.
    Nccl(NcclComm),
}

/// The expert-parallel all-to-alls of one stage: the counts first (one MPI all-to-all), then
/// the rows and the metadata (`MPI_Alltoallv`, or NCCL). The dispatch sends each token's row
/// once per destination rank ([`wire::dedup`]).
struct MpiTransport {
    comm: SimpleCommunicator,
    rank: usize,
    n: usize,
    rows: Rows,
}

impl MpiTransport {
    fn err(&self, detail: impl Into<String>) -> MoeError {
        MoeError::Transport { rank: self.rank, detail: detail.into() }
    }

    /// Every peer's `send[p]` here: one u32 per peer (`width` per peer).
    fn swap_counts(&self, send: &[u32]) -> Vec<u32> {
        let mut recv = vec![0u32; send.len()];
        self.comm.all_to_all_into(send, &mut recv[..]);
        recv
    }

    /// `MPI_Alltoallv`: `counts[p] * width` elements of `send` to peer `p` (contiguous, in peer
    /// order); returns what each peer sent here, `recv_counts[p] * width` from peer `p`.
    fn all_to_all_v<T: Equivalence + bytemuck::Pod + Default>(
        &self,
        send: &[T],
        counts: &[u32],
        recv_counts: &[u32],
        width: usize,
    ) -> Result<Vec<T>, MoeError> {
        let total = recv_counts.iter().map(|&c| c as usize * width).sum();
        if let Rows::Nccl(nccl) = &self.rows {
            let bytes = |c: &[u32]| c.iter().map(|&n| n as usize * width * size_of::<T>()).collect::<Vec<_>>();
            let got = nccl.all_to_all_v(bytemuck::cast_slice(send), &bytes(counts), &bytes(recv_counts))?;
            if got.len() != total * size_of::<T>() {
                return Err(self.err(format!("NCCL returned {} bytes, expected {total} elements", got.len())));
            }
            let mut out = vec![T::default(); total];
            bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&got);
            return Ok(out);
        }
        let (sc, sd) = self.layout(counts, width, send.len())?;
        let (rc, rd) = self.layout(recv_counts, width, total)?;
        let mut recv = vec![T::default(); total];
        {
            let s = Partition::new(send, &sc[..], &sd[..]);
            let mut r = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
            self.comm.all_to_all_varcount_into(&s, &mut r);
        }
        Ok(recv)
    }

    /// Counts and displacements in elements, as MPI takes them (31-bit), for a buffer of `len`.
    fn layout(&self, counts: &[u32], width: usize, len: usize) -> Result<(Vec<Count>, Vec<Count>), MoeError> {
        let too_big = || self.err(format!("an all-to-all of {len} elements does not fit MPI's 31-bit counts"));
        let mut c = Vec::with_capacity(counts.len());
        let mut d = Vec::with_capacity(counts.len());
        let mut at = 0usize;
        for &n in counts {
            let e = (n as usize).checked_mul(width).ok_or_else(too_big)?;
            d.push(Count::try_from(at).map_err(|_| too_big())?);
            c.push(Count::try_from(e).map_err(|_| too_big())?);
            at += e;
        }
        if at != len {
            return Err(self.err(format!("counts cover {at} elements of a buffer of {len}")));
        }
        Ok((c, d))
    }
}

fn prefix(counts: &[u32]) -> Vec<u32> {
    counts.iter().scan(0u32, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect()
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn n_ranks(&self) -> usize {
        self.n
    }
    fn all_to_all_dispatch(&self, send: &DispatchBuf) -> Result<DispatchBuf, MoeError> {
        send.validate(self.n)?;
        let h = send.hidden;
        let (unique, unique_counts, repeat) = wire::dedup(send)?;
        let both: Vec<u32> = send.counts.iter().zip(&unique_counts).flat_map(|(&c, &u)| [c, u]).collect();
        let got = self.swap_counts(&both);
        let (recv_counts, recv_unique): (Vec<u32>, Vec<u32>) = got.chunks_exact(2).map(|c| (c[0], c[1])).unzip();
        let meta = self.all_to_all_v(&wire::meta(send, &repeat), &send.counts, &recv_counts, 4)?;
        let rows = self.all_to_all_v(&unique, &unique_counts, &recv_unique, h)?;
        let wire::Meta { expert, weight, src_slot, repeat } = wire::unmeta(&meta)?;
        let rows = wire::expand(h, &rows, &repeat, &recv_counts)?;
        let displs = prefix(&recv_counts);
        let out = DispatchBuf { hidden: h, rows, expert, weight, src_slot, counts: recv_counts, displs };
        out.validate(self.n)?;
        Ok(out)
    }
    fn all_to_all_combine(&self, send: &CombineBuf) -> Result<CombineBuf, MoeError> {
        send.validate(self.n)?;
        let recv_counts = self.swap_counts(&send.counts);
        let rows = self.all_to_all_v(&send.rows, &send.counts, &recv_counts, send.hidden)?;
        Ok(CombineBuf { hidden: send.hidden, rows, displs: prefix(&recv_counts), counts: recv_counts })
    }
}
