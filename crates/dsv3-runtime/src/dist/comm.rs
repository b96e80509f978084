//! What a multi-process run needs from its processes ([`Comm`]), an in-process
//! implementation with threads as ranks ([`InProcessComm`], for tests), the collectives built
//! on it ([`agree`], [`broadcast`]) and the byte format of the messages ([`Writer`], [`Reader`]).

use super::Layout;
use crate::error::{Result, RuntimeError};
use dsv3_moe::{InProcessTransport, Transport};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Which exchange a message belongs to. Messages of one tag between two ranks arrive in the
/// order they were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// Pipeline round, first exchange: hidden states stage to stage, logits to rank 0.
    Stage = 1,
    /// Pipeline round, second exchange: token ids from rank 0 to the first stage.
    Input = 2,
    /// Setup collectives ([`agree`], [`broadcast`]).
    Setup = 3,
}

/// One rank's view of the processes of a job: point-to-point exchanges between any ranks and
/// the expert-parallel group of its pipeline stage.
pub trait Comm {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn size(&self) -> usize;
    /// Sends each `(rank, bytes)` of `sends` (a rank may send to itself), then receives one
    /// message of `tag` from each rank of `from`, in that order, and returns them; returns
    /// once its own sends have been taken. Sends are posted before any receive waits, so
    /// ranks that exchange with each other in the same call never deadlock.
    fn exchange(&self, tag: Tag, sends: &[(usize, &[u8])], from: &[usize]) -> Result<Vec<Vec<u8>>>;
    /// The expert-parallel group of this rank's pipeline stage (rank `lane` in it).
    fn ep(&self) -> &dyn Transport;
    /// Whether the MoE layers go through [`Comm::ep`] even when a stage has one lane (an
    /// expert-parallel group of one; used to run a transport end to end on one GPU).
    fn ep_always(&self) -> bool {
        false
    }
}

/// Every rank's `data`, in rank order, on every rank.
pub fn all_gather<C: Comm + ?Sized>(c: &C, data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let all: Vec<usize> = (0..c.size()).collect();
    let sends: Vec<(usize, &[u8])> = all.iter().map(|&r| (r, data)).collect();
    c.exchange(Tag::Setup, &sends, &all)
}

/// Rank 0's `data` on every rank (`data` is read on rank 0 only).
pub fn broadcast<C: Comm + ?Sized>(c: &C, data: &[u8]) -> Result<Vec<u8>> {
    let sends: Vec<(usize, &[u8])> = if c.rank() == 0 { (0..c.size()).map(|r| (r, data)).collect() } else { Vec::new() };
    let mut got = c.exchange(Tag::Setup, &sends, &[0])?;
    got.pop().ok_or_else(|| dist_err(0, "broadcast: no message"))
}

/// Ends a phase that every rank runs on its own (loading its part of the model, checking a
/// request): `Ok` on every rank if it was `Ok` on every rank; otherwise every rank returns
/// the lowest failing rank's error as [`RuntimeError::Dist`], so the whole job exits with
/// the cause instead of waiting for a rank that gave up.
pub fn agree<C: Comm + ?Sized, T>(c: &C, local: Result<T>) -> Result<T> {
    let mine = match &local {
        Ok(_) => vec![0u8],
        Err(e) => [&[1u8][..], e.to_string().as_bytes()].concat(),
    };
    let all = all_gather(c, &mine)?;
    if let Some((r, m)) = all.iter().enumerate().find(|(_, m)| m.first() != Some(&0)) {
        return Err(dist_err(r, String::from_utf8_lossy(m.get(1..).unwrap_or_default())));
    }
    local
}

/// A [`RuntimeError::Dist`] naming `rank`.
pub fn dist_err(rank: usize, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Dist { rank, detail: detail.into() }
}

// ------------------------------------------------------------------------------------------
// Message bytes.
// ------------------------------------------------------------------------------------------

/// Builds a message: little-endian u32 scalars, length-prefixed u32 / f32 arrays.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32s(mut self, v: &[u32]) -> Self {
        self.0.extend_from_slice(&(v.len() as u64).to_le_bytes());
        self.0.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        self
    }
    pub fn f32s(mut self, v: &[f32]) -> Self {
        self.0.extend_from_slice(&(v.len() as u64).to_le_bytes());
        self.0.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a message [`Writer`] built; a short or oversized message is a typed error naming
/// the sending rank.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    from: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], from: usize) -> Self {
        Reader { buf, from }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(dist_err(self.from, format!("malformed message: {} bytes left, {n} expected", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn len(&mut self, elem: usize) -> Result<usize> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default());
        match usize::try_from(n).ok().and_then(|n| n.checked_mul(elem)) {
            Some(bytes) if bytes <= self.buf.len() => Ok(n as usize),
            _ => Err(dist_err(self.from, format!("malformed message: an array of {n} elements in {} bytes", self.buf.len()))),
        }
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    pub fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.len(4)?;
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    /// Checks that the whole message was read.
    pub fn end(self) -> Result<()> {
        if self.buf.is_empty() { Ok(()) } else { Err(dist_err(self.from, format!("malformed message: {} trailing bytes", self.buf.len()))) }
    }
}

// ------------------------------------------------------------------------------------------
// In-process ranks.
// ------------------------------------------------------------------------------------------

type Queues = HashMap<(usize, usize, Tag), VecDeque<Vec<u8>>>;

#[derive(Debug, Default)]
struct HubState {
    /// `(from, to, tag)` → messages in flight, oldest first.
    queues: Queues,
    /// The first rank that failed, and why.
    failed: Option<(usize, String)>,
}

#[derive(Debug, Default)]
struct Hub {
    state: Mutex<HubState>,
    cv: Condvar,
}

/// A rank of a job whose ranks are threads of one process: messages go through shared
/// queues (sends never wait), each pipeline stage's expert-parallel group is an
/// [`InProcessTransport`]. A rank that fails calls [`InProcessComm::fail`], which releases
/// every waiting rank with a [`RuntimeError::Dist`] naming it.
#[derive(Debug)]
pub struct InProcessComm {
    rank: usize,
    size: usize,
    hub: Arc<Hub>,
    ep: InProcessTransport,
}

impl InProcessComm {
    /// The endpoints of a new job of `layout.world()` ranks, endpoint `r` for rank `r`.
    pub fn world(layout: Layout) -> Result<Vec<InProcessComm>> {
        let hub = Arc::new(Hub::default());
        let mut out = Vec::with_capacity(layout.world());
        for _stage in 0..layout.pp {
            for ep in InProcessTransport::group(layout.ep)? {
                let rank = out.len();
                out.push(InProcessComm { rank, size: layout.world(), hub: Arc::clone(&hub), ep });
            }
        }
        Ok(out)
    }

    /// Fails the job: every rank waiting in (or later entering) an exchange or an all-to-all
    /// of this rank's group gets an error naming this rank.
    /// A rank that fails because a peer failed first passes the first failure on, so every
    /// rank's error names the rank where the job went wrong.
    pub fn fail(&self, why: &str) {
        let (rank, why) = match self.hub.state.lock() {
            Ok(mut st) => st.failed.get_or_insert_with(|| (self.rank, why.to_string())).clone(),
            Err(_) => (self.rank, why.to_string()),
        };
        self.hub.cv.notify_all();
        self.ep.abort(&format!("rank {rank} failed: {why}"));
    }

    fn lock(&self) -> Result<MutexGuard<'_, HubState>> {
        self.hub.state.lock().map_err(|_| dist_err(self.rank, "message queues poisoned by a panicked rank"))
    }
}

impl Comm for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn exchange(&self, tag: Tag, sends: &[(usize, &[u8])], from: &[usize]) -> Result<Vec<Vec<u8>>> {
        let mut st = self.lock()?;
        for &(to, data) in sends {
            if to >= self.size {
                return Err(dist_err(self.rank, format!("send to rank {to} of {}", self.size)));
            }
            st.queues.entry((self.rank, to, tag)).or_default().push_back(data.to_vec());
        }
        self.hub.cv.notify_all();
        let mut got = Vec::with_capacity(from.len());
        for &src in from {
            loop {
                // What was sent before a failure is still delivered.
                if let Some(m) = st.queues.get_mut(&(src, self.rank, tag)).and_then(VecDeque::pop_front) {
                    got.push(m);
                    break;
                }
                if let Some((r, why)) = &st.failed {
                    return Err(dist_err(*r, why.clone()));
                }
                st = self.hub.cv.wait(st).map_err(|_| dist_err(self.rank, "message queues poisoned by a panicked rank"))?;
            }
        }
        Ok(got)
    }
    fn ep(&self) -> &dyn Transport {
        &self.ep
    }
}

/// Runs `f` on every rank of `layout`, one thread each, and returns every rank's result in
/// rank order. A rank whose `f` fails calls [`InProcessComm::fail`], so its peers return
/// instead of waiting for it.
pub fn run_in_process<T: Send>(layout: Layout, f: impl Fn(&InProcessComm) -> Result<T> + Sync) -> Result<Vec<Result<T>>> {
    let comms = InProcessComm::world(layout)?;
    let f = &f;
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let r = f(c);
                    if let Err(e) = &r {
                        c.fail(&e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().enumerate().map(|(r, h)| h.join().unwrap_or_else(|_| Err(dist_err(r, "rank thread panicked")))).collect()
    }))
}
