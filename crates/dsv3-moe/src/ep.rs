//! Expert parallelism: `R` ranks, rank `r` owning experts `r*E/R..(r+1)*E/R` and a replica of
//! the router and the shared experts. Each rank routes its own tokens, then
//!
//! 1. packs its `(token, j)` pairs by destination rank ([`a2a::pack`]),
//! 2. **dispatch all-to-all** ([`Transport::all_to_all_dispatch`]),
//! 3. runs its experts on what it received ([`a2a::unpack`], grouped GEMMs,
//!    [`a2a::Unpacked::pack_return`]),
//! 4. **combine all-to-all** ([`Transport::all_to_all_combine`]), then sums each token's
//!    `top_k` returned rows with its weights, in ascending `j` ([`a2a::combine`]), and adds
//!    its shared experts.
//!
//! # Why R ranks compute what one rank computes
//!
//! With the tokens split contiguously over the ranks (as [`forward_in_process`] does), every
//! expert receives exactly the rows it gets on one rank, in the same (token, j) order; the
//! router, the activation quantisation and every GEMM row are computed row by row, and the
//! combine adds the same `top_k` products in the same order. So the **routed part is
//! bit-identical** for every `R`. The shared experts run on each rank's `T/R` tokens instead
//! of `T`: the CPU GEMM takes its matrix-vector kernel for blocks of at most 4 rows and its
//! tiled kernel above, which sum in different orders, so the shared part can differ by float
//! reassociation (a few f32 ulps of the result). Tests assert bit-identity without shared
//! experts and `1e-5` of max |y| with them.
//!
//! The packing layer ([`dsv3_kernels::a2a`]) works on host buffers, so a rank stages the
//! routed rows through the host (download, pack, exchange, unpack, upload). A device-side
//! pack/unpack op would remove the staging; the transport's contract (counts and
//! displacements as NCCL takes them) stays the same.

use crate::error::{MoeError, Result, input};
use crate::layer::{MoeLayer, MoeOutput};
use crate::stats::LoadStats;
use dsv3_kernels::a2a::{self, BatchShape, CombineBuf, DispatchBuf};
use dsv3_kernels::backend::Backend;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One rank's endpoint of an expert-parallel group: the two all-to-alls of an MoE layer,
/// shaped like NCCL grouped send/recv. Both are collectives: every rank of the group calls
/// them, in the same order. Counts and displacements follow [`dsv3_kernels::a2a`]'s rules:
///
/// * dispatch: `send.counts[d]` rows starting at row `send.displs[d]` go to rank `d`
///   (activations, expert ids, weights and source slots alike); the result holds, for each
///   source rank `s` in rank order, the rows `s` sent here, contiguous and in `s`'s order,
///   with `counts[s]` / `displs[s]` describing them;
/// * combine: the reverse trip: `send` is laid out as the dispatch result was (segment `s`
///   goes back to rank `s`), and the result is laid out as this rank's dispatch `send` was.
pub trait Transport {
    /// This endpoint's rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn n_ranks(&self) -> usize;
    fn all_to_all_dispatch(&self, send: &DispatchBuf) -> Result<DispatchBuf>;
    fn all_to_all_combine(&self, send: &CombineBuf) -> Result<CombineBuf>;
}

impl<B: Backend> MoeLayer<B> {
    /// This rank's part of an expert-parallel forward pass over its own `tokens` tokens
    /// (`x` `[tokens, hidden]`, may be empty). Every rank of the group must call it (it runs
    /// two collectives). The statistics cover the tokens this rank routed.
    pub fn forward_ep<T: Transport + ?Sized>(&self, b: &B, t: &T, x: &B::Buf<f32>, tokens: usize) -> Result<MoeOutput<B>> {
        let ep = self.ep_layout();
        if t.n_ranks() != ep.n_ranks || t.rank() != self.rank() {
            return Err(input(
                "transport",
                format!("endpoint is rank {} of {}, the layer is rank {} of {}", t.rank(), t.n_ranks(), self.rank(), ep.n_ranks),
            ));
        }
        let cfg = *self.config();
        let (k, h) = (cfg.route.top_k, cfg.hidden);
        let routing = self.route(b, x, tokens)?;
        let (ids, wts, xh) = (b.download(&routing.ids)?, b.download(&routing.weights)?, b.download(x)?);
        let stats = LoadStats::from_topk_ids(&ids, tokens, k, cfg.n_routed_experts, ep.n_ranks)?;

        let packed = a2a::pack(&ep, BatchShape { tokens, top_k: k, hidden: h }, &xh, &ids, &wts)?;
        let recv = t.all_to_all_dispatch(&packed.send)?;
        let un = a2a::unpack(&ep, self.rank(), &recv)?;
        let rows = un.expert.len();
        let yh = if rows == 0 {
            Vec::new()
        } else {
            let xin = b.upload(&un.input)?;
            let offsets = un.plan.offsets();
            let y = self.run_experts(b, &xin, &b.upload(offsets)?, offsets, tokens)?;
            b.download(&y)?
        };
        let back = t.all_to_all_combine(&un.pack_return(&yh)?)?;
        let mut out = vec![0f32; tokens * h];
        a2a::combine(&packed, &back, &wts, &mut out)?;
        let mut y = b.upload(&out)?;
        self.add_shared(b, x, tokens, &mut y)?;
        Ok(MoeOutput { y, stats })
    }
}

/// The token range rank `r` of `n` takes from a batch of `tokens` (contiguous, sizes differ by
/// at most one, earlier ranks larger).
pub fn token_split(tokens: usize, n: usize, r: usize) -> std::ops::Range<usize> {
    let n = n.max(1);
    let (q, rem) = (tokens / n, tokens % n);
    let start = r * q + r.min(rem);
    start..start + q + usize::from(r < rem)
}

/// Runs one expert-parallel forward pass of `ranks` (rank `r` at index `r`, all of one
/// layer) in this process, one thread per rank over an [`InProcessTransport`] group. The
/// batch `x` `[tokens, hidden]` (host) is split contiguously ([`token_split`]); returns the
/// host output `[tokens, hidden]` and the merged statistics of the whole batch. If a rank
/// fails, the others are released and the first rank's own error is returned.
pub fn forward_in_process<B: Backend>(b: &B, ranks: &[MoeLayer<B>], x: &[f32], tokens: usize) -> Result<(Vec<f32>, LoadStats)> {
    let n = ranks.len();
    let first = ranks.first().ok_or_else(|| input("ranks", "no ranks"))?;
    let cfg = *first.config();
    for (r, l) in ranks.iter().enumerate() {
        if l.rank() != r || l.ep_layout().n_ranks != n || *l.config() != cfg {
            return Err(input("ranks", format!("index {r} holds rank {} of {} (or another layer)", l.rank(), l.ep_layout().n_ranks)));
        }
    }
    let h = cfg.hidden;
    if x.len() != crate::error::mul("x", tokens, h)? {
        return Err(input("x", format!("has {} elements, expected tokens {tokens} x hidden {h}", x.len())));
    }
    let group = InProcessTransport::group(n)?;
    let results: Vec<Result<(Vec<f32>, LoadStats)>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(&group)
            .enumerate()
            .map(|(r, (layer, t))| {
                let part = token_split(tokens, n, r);
                let xr = &x[part.start * h..part.end * h];
                s.spawn(move || {
                    let run = || -> Result<(Vec<f32>, LoadStats)> {
                        let xb = b.upload(xr)?;
                        let out = layer.forward_ep(b, t, &xb, part.len())?;
                        Ok((b.download(&out.y)?, out.stats))
                    };
                    let res = run();
                    if let Err(e) = &res {
                        t.abort(&format!("rank {r} failed: {e}"));
                    }
                    res
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, hd)| hd.join().unwrap_or_else(|_| Err(MoeError::Transport { rank: r, detail: "rank thread panicked".into() })))
            .collect()
    });
    // Report the root cause: a rank's own error before the "a peer failed" errors it caused.
    if let Some(e) = results.iter().filter_map(|r| r.as_ref().err()).find(|e| !matches!(e, MoeError::Transport { .. })) {
        return Err(e.clone());
    }
    let mut y = Vec::with_capacity(tokens * h);
    let mut stats = Vec::with_capacity(n);
    for r in results {
        let (yr, sr) = r?;
        y.extend_from_slice(&yr);
        stats.push(sr);
    }
    Ok((y, LoadStats::merge(&stats)?))
}

// ------------------------------------------------------------------------------------------
// In-process transport.
// ------------------------------------------------------------------------------------------

/// One message of a collective.
#[derive(Debug)]
enum Msg {
    Dispatch(DispatchBuf),
    Combine(CombineBuf),
}

/// The state of an in-process group: the current collective's deposits, then its results.
#[derive(Debug)]
struct Round {
    /// Completed collectives.
    done: u64,
    sends: Vec<Option<Msg>>,
    arrived: usize,
    results: Vec<Option<Result<Msg>>>,
    /// Results of the last collective not yet taken; a new one starts at 0.
    untaken: usize,
    aborted: Option<String>,
}

#[derive(Debug)]
struct Group {
    n: usize,
    state: Mutex<Round>,
    cv: Condvar,
}

/// `R` simulated ranks in one process: each endpoint is used by one thread (rank), and the
/// collectives exchange through [`a2a::exchange_dispatch`] / [`a2a::exchange_combine`] once
/// all ranks have arrived. [`InProcessTransport::abort`] releases every waiting rank with an
/// error (a rank that fails must call it, or its peers wait forever, as with NCCL).
#[derive(Debug, Clone)]
pub struct InProcessTransport {
    rank: usize,
    group: Arc<Group>,
}

impl InProcessTransport {
    /// The endpoints of a new group of `n_ranks` ranks, endpoint `r` for rank `r`.
    pub fn group(n_ranks: usize) -> Result<Vec<InProcessTransport>> {
        if n_ranks == 0 {
            return Err(input("n_ranks", "a group needs at least one rank"));
        }
        let state = Round {
            done: 0,
            sends: (0..n_ranks).map(|_| None).collect(),
            arrived: 0,
            results: (0..n_ranks).map(|_| None).collect(),
            untaken: 0,
            aborted: None,
        };
        let group = Arc::new(Group { n: n_ranks, state: Mutex::new(state), cv: Condvar::new() });
        Ok((0..n_ranks).map(|rank| InProcessTransport { rank, group: Arc::clone(&group) }).collect())
    }

    /// Fails the group: every rank waiting in (or later entering) a collective gets an error.
    pub fn abort(&self, why: &str) {
        if let Ok(mut st) = self.group.state.lock() {
            st.aborted.get_or_insert_with(|| why.to_string());
        }
        self.group.cv.notify_all();
    }

    fn err(&self, detail: impl Into<String>) -> MoeError {
        MoeError::Transport { rank: self.rank, detail: detail.into() }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Round>> {
        self.group.state.lock().map_err(|_| self.err("group state poisoned by a panicked rank"))
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Round>) -> Result<MutexGuard<'a, Round>> {
        self.group.cv.wait(g).map_err(|_| self.err("group state poisoned by a panicked rank"))
    }

    /// Deposits `msg`, waits for all ranks, returns this rank's share of the exchange.
    fn collective(&self, msg: Msg) -> Result<Msg> {
        let mut st = self.lock()?;
        // The previous collective's results must all be taken before a new one starts.
        while st.untaken > 0 && st.aborted.is_none() {
            st = self.wait(st)?;
        }
        if let Some(why) = &st.aborted {
            return Err(self.err(format!("group aborted: {why}")));
        }
        if st.sends[self.rank].is_some() {
            return Err(self.err("entered a collective twice"));
        }
        st.sends[self.rank] = Some(msg);
        st.arrived += 1;
        let round = st.done;
        if st.arrived == self.group.n {
            let sends: Vec<Msg> = st.sends.iter_mut().filter_map(Option::take).collect();
            let results = exchange(sends);
            st.results = results.into_iter().map(Some).collect();
            st.untaken = self.group.n;
            st.arrived = 0;
            st.done += 1;
            self.group.cv.notify_all();
        } else {
            while st.done == round && st.aborted.is_none() {
                st = self.wait(st)?;
            }
            if st.done == round {
                let why = st.aborted.clone().unwrap_or_default();
                return Err(self.err(format!("group aborted: {why}")));
            }
        }
        let mine = st.results[self.rank].take();
        st.untaken -= 1;
        if st.untaken == 0 {
            self.group.cv.notify_all();
        }
        mine.unwrap_or_else(|| Err(self.err("no result for this rank")))
    }
}

/// Runs one collective over all ranks' messages (all of one kind), giving each rank its
/// result; an error goes to every rank.
fn exchange(sends: Vec<Msg>) -> Vec<Result<Msg>> {
    let n = sends.len();
    let all_err = |e: MoeError| (0..n).map(|_| Err(e.clone())).collect();
    let mut disp = Vec::new();
    let mut comb = Vec::new();
    for m in sends {
        match m {
            Msg::Dispatch(d) => disp.push(d),
            Msg::Combine(c) => comb.push(c),
        }
    }
    if disp.len() == n {
        match a2a::exchange_dispatch(&disp) {
            Ok(v) => v.into_iter().map(|d| Ok(Msg::Dispatch(d))).collect(),
            Err(e) => all_err(e.into()),
        }
    } else if comb.len() == n {
        match a2a::exchange_combine(&comb) {
            Ok(v) => v.into_iter().map(|c| Ok(Msg::Combine(c))).collect(),
            Err(e) => all_err(e.into()),
        }
    } else {
        all_err(MoeError::Transport { rank: 0, detail: "ranks entered different collectives".into() })
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn n_ranks(&self) -> usize {
        self.group.n
    }
    fn all_to_all_dispatch(&self, send: &DispatchBuf) -> Result<DispatchBuf> {
        match self.collective(Msg::Dispatch(send.clone()))? {
            Msg::Dispatch(d) => Ok(d),
            Msg::Combine(_) => Err(self.err("dispatch returned a combine buffer")),
        }
    }
    fn all_to_all_combine(&self, send: &CombineBuf) -> Result<CombineBuf> {
        match self.collective(Msg::Combine(send.clone()))? {
            Msg::Combine(c) => Ok(c),
            Msg::Dispatch(_) => Err(self.err("combine returned a dispatch buffer")),
        }
    }
}
