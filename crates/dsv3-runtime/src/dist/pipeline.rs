//! The loop every rank of a job runs: rounds of two exchanges and one stage step.
//!
//! **Micro-batches.** The job's sequences are split into `micro_batches` contiguous groups;
//! inside a micro-batch, its `k`-th sequence lives on lane `k % ep` (its cache, its
//! attention). Rank 0 keeps a queue of micro-batches whose next step may start.
//!
//! **A round**, on every rank (`s` its stage):
//! 1. exchange [`Tag::Stage`]: send what the last round produced to the next stage (the last
//!    stage sends logits to rank 0); receive the previous stage's output, and on rank 0 the
//!    last stage's logits;
//! 2. rank 0 samples the logits that came back (their micro-batch rejoins the queue) and
//!    takes the next micro-batch off the queue;
//! 3. exchange [`Tag::Input`]: rank 0 sends that micro-batch's token ids to each lane of the
//!    first stage;
//! 4. every rank runs its stage on what it received (a lane without tokens of that
//!    micro-batch still serves its experts).
//!
//! Every link carries exactly one message per round (work, idle or stop), so every rank
//! knows what to receive, the lanes of a stage always step the same micro-batch together
//! (their MoE all-to-alls pair up), and a micro-batch moves one stage per round: with `pp`
//! stages and at least `pp` micro-batches, every stage works on another micro-batch in every
//! round. When nothing is queued or in flight and every sequence has finished, rank 0 sends
//! a stop, which travels the pipeline once and comes back to it; then every rank returns.
//!
//! The steps are exactly those of one process ([`crate::generate::generate`],
//! [`crate::model::Model::forward_hidden`]): a sequence's rows see the same kernels, in the
//! same batches, on any layout. So with one sequence per micro-batch (or one lane) the
//! logits are bit-identical to one process.

use super::stage::{StageInput, StageModel, StageOutput};
use super::{Comm, Layout, Reader, Tag, Writer, agree, broadcast, dist_err};
use crate::error::{Result, RuntimeError};
use crate::generate::{Generation, Sampler, SamplingParams};
use dsv3_kernels::Backend;
use dsv3_mla::SeqId;
use dsv3_moe::token_split;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// What a job computes for each prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Sampled tokens after the prompt, until EOS or `max_tokens`.
    Generate,
    /// The logits of every position of the prompt (one prefill step).
    Logits,
}

/// What rank 0 asks the job to do.
#[derive(Debug, Clone)]
pub struct Job {
    pub kind: JobKind,
    pub prompts: Vec<Vec<u32>>,
    /// Groups the prompts are split into (contiguous; each group steps as one batch).
    pub micro_batches: usize,
    pub max_tokens: usize,
    /// Sequence `i` samples with seed `seed + i`.
    pub sampling: SamplingParams,
    pub eos: Vec<u32>,
    /// Sampled ids are below this.
    pub allowed: usize,
}

/// What a job returns on rank 0.
#[derive(Debug, Clone, Default)]
pub struct JobOutput {
    /// Per prompt (a generate job).
    pub generations: Vec<Generation>,
    /// Per prompt, `[prompt tokens, vocab]` (a logits job).
    pub logits: Vec<Vec<f32>>,
    /// Pipeline rounds the job took, and in how many of them the first stage had work: with
    /// enough micro-batches in flight, nearly all.
    pub rounds: usize,
    pub busy_rounds: usize,
}

/// The job-wide facts every rank needs: how many sequences, how they are grouped, and how
/// many tokens each may reach (cache sizing).
#[derive(Debug, Clone, PartialEq)]
struct Header {
    kind: JobKind,
    micro_batches: usize,
    /// Per sequence, the cache room it needs.
    capacity: Vec<u32>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        Writer::default().u32((self.kind == JobKind::Logits) as u32).u32(self.micro_batches as u32).u32s(&self.capacity).finish()
    }
    fn decode(m: &[u8]) -> Result<Header> {
        let mut r = Reader::new(m, 0);
        let kind = if r.u32()? == 1 { JobKind::Logits } else { JobKind::Generate };
        let micro_batches = r.u32()? as usize;
        let capacity = r.u32s()?;
        r.end()?;
        Ok(Header { kind, micro_batches, capacity })
    }
    /// The sequences of micro-batch `m`, each with its lane.
    fn members(&self, m: usize, ep: usize) -> Vec<(usize, usize)> {
        token_split(self.capacity.len(), self.micro_batches, m).enumerate().map(|(k, seq)| (seq, k % ep)).collect()
    }
}

impl Job {
    /// Checks the request; the header every rank gets.
    fn header(&self) -> Result<Header> {
        if self.prompts.is_empty() || self.prompts.iter().any(Vec::is_empty) {
            return Err(RuntimeError::Request("the prompt is empty".into()));
        }
        if self.micro_batches == 0 || self.micro_batches > self.prompts.len() {
            return Err(RuntimeError::Request(format!(
                "--micro-batches {} must be between 1 and the number of prompts ({})",
                self.micro_batches,
                self.prompts.len()
            )));
        }
        Sampler::new(self.sampling)?;
        let extra = if self.kind == JobKind::Generate { self.max_tokens.saturating_add(2) } else { 0 };
        let capacity = self
            .prompts
            .iter()
            .map(|p| {
                u32::try_from(p.len().saturating_add(extra)).map_err(|_| RuntimeError::Request("prompt or --max-tokens too long".into()))
            })
            .collect::<Result<_>>()?;
        Ok(Header { kind: self.kind, micro_batches: self.micro_batches, capacity })
    }
}

/// One message on a pipeline link.
#[derive(Debug, Clone, Default, PartialEq)]
struct Msg {
    kind: u32,
    mb: u32,
    /// 1: the step wants the logits of every row (a logits job), 0: of each sequence's last.
    all_rows: u32,
    /// Sequence ids of this lane's part of the step, and their new tokens.
    seqs: Vec<u32>,
    ntok: Vec<u32>,
    /// Token ids (to the first stage).
    ids: Vec<u32>,
    /// `x` and `residual` between stages; logits (`a`) to rank 0.
    a: Vec<f32>,
    b: Vec<f32>,
}

const IDLE: u32 = 0;
const STOP: u32 = 1;
const WORK: u32 = 2;

impl Msg {
    fn of(kind: u32) -> Msg {
        Msg { kind, ..Msg::default() }
    }
    fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.kind)
            .u32(self.mb)
            .u32(self.all_rows)
            .u32s(&self.seqs)
            .u32s(&self.ntok)
            .u32s(&self.ids)
            .f32s(&self.a)
            .f32s(&self.b)
            .finish()
    }
    fn decode(m: &[u8], from: usize) -> Result<Msg> {
        let mut r = Reader::new(m, from);
        let msg = Msg {
            kind: r.u32()?,
            mb: r.u32()?,
            all_rows: r.u32()?,
            seqs: r.u32s()?,
            ntok: r.u32s()?,
            ids: r.u32s()?,
            a: r.f32s()?,
            b: r.f32s()?,
        };
        r.end()?;
        if msg.kind > WORK || msg.seqs.len() != msg.ntok.len() {
            return Err(dist_err(from, "malformed pipeline message"));
        }
        Ok(msg)
    }
}

/// Runs a job: every rank of `layout` calls this with its part of the model; rank 0 passes
/// the `job` (the others `None`) and `on_token(prompt index, id)` sees each sampled token
/// there. Returns the output on rank 0, `None` elsewhere.
pub fn run_job<B: Backend, C: Comm + ?Sized>(
    b: &B,
    comm: &C,
    stage: &StageModel<B>,
    layout: Layout,
    job: Option<Job>,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Option<JobOutput>> {
    let me = comm.rank();
    let mine = match (&job, me) {
        (Some(j), 0) => j.header().map(|h| h.encode()),
        (None, 0) => Err(RuntimeError::Request("rank 0 needs the job".into())),
        _ => Ok(Vec::new()),
    };
    let mine = agree(comm, mine)?;
    let header = Header::decode(&broadcast(comm, &mine)?)?;
    let lane = layout.lane(me);
    // Cache room: whole pages for each of this lane's sequences.
    let page = dsv3_mla::PAGE_SIZE;
    let room: usize = (0..header.micro_batches)
        .flat_map(|m| header.members(m, layout.ep))
        .filter(|&(_, l)| l == lane)
        .map(|(s, _)| (header.capacity[s] as usize).div_ceil(page) * page)
        .sum();
    let ep = (layout.ep > 1 || comm.ep_always()).then(|| comm.ep());
    let mut worker = Worker { b, stage, ep, first: layout.stage(me) == 0, cache: stage.new_cache(b, room)?, seqs: HashMap::new() };
    let mut driver = match job {
        Some(job) if me == 0 => Some(Driver::new(job, header, layout.ep, stage.config().vocab_size, on_token)?),
        _ => None,
    };

    let (s, last) = (layout.stage(me), layout.stage(me) + 1 == layout.pp);
    let next = if last { 0 } else { layout.rank(s + 1, lane) };
    let prev = (s > 0).then(|| layout.rank(s - 1, lane));
    let last_lanes: Vec<usize> = (0..layout.ep).map(|l| layout.rank(layout.pp - 1, l)).collect();
    // The stage's output of the last round, and whether the stage has received / sent a stop.
    let mut out = Msg::of(IDLE);
    let (mut stopping, mut stopped) = (false, false);
    loop {
        // 1. Stage outputs on, inputs in (and logits back to rank 0).
        let encoded = out.encode();
        let sends: Vec<(usize, &[u8])> = if stopped { vec![] } else { vec![(next, &encoded[..])] };
        let mut from: Vec<usize> = if stopped || stopping { vec![] } else { prev.into_iter().collect() };
        let driving = driver.as_ref().is_some_and(|d| !d.finished);
        if driving {
            from.extend(&last_lanes);
        }
        let mut got = comm.exchange(Tag::Stage, &sends, &from)?.into_iter().zip(from.iter().copied());
        if out.kind == STOP {
            stopped = true;
        }
        let mut input = match (prev, stopped || stopping) {
            (Some(p), false) => got.next().map(|(m, _)| Msg::decode(&m, p)).transpose()?,
            _ => None,
        };
        // 2. Rank 0 samples what came back and picks the next micro-batch.
        let mut first_inputs = Vec::new();
        if let Some(d) = driver.as_mut() {
            if driving {
                let back = got.map(|(m, from)| Msg::decode(&m, from)).collect::<Result<Vec<_>>>()?;
                d.absorb(back)?;
            }
            if !d.stop_sent {
                first_inputs = d.next_inputs();
            }
        }
        // 3. Token ids to the first stage.
        if s == 0 && !stopping && !stopped {
            let encoded: Vec<Vec<u8>> = first_inputs.iter().map(Msg::encode).collect();
            let sends: Vec<(usize, &[u8])> = encoded.iter().enumerate().map(|(l, m)| (layout.rank(0, l), &m[..])).collect();
            let m = comm.exchange(Tag::Input, &sends, &[0])?;
            input = m.first().map(|m| Msg::decode(m, 0)).transpose()?;
        }
        if stopped && driver.as_ref().is_none_or(|d| d.finished) {
            return Ok(driver.map(Driver::finish));
        }
        // 4. This stage's step.
        out = match input {
            Some(m) if m.kind == WORK => worker.step(m)?,
            Some(m) if m.kind == STOP => {
                stopping = true;
                m
            }
            _ => Msg::of(IDLE),
        };
    }
}

/// A rank's stage with its cache and the sequences it holds.
struct Worker<'a, B: Backend> {
    b: &'a B,
    stage: &'a StageModel<B>,
    ep: Option<&'a dyn dsv3_moe::Transport>,
    /// The first stage (embeds token ids).
    first: bool,
    cache: dsv3_mla::PagedLatentCache<B>,
    /// Job sequence id → this rank's cache sequence.
    seqs: HashMap<u32, SeqId>,
}

impl<B: Backend> Worker<'_, B> {
    /// Runs one work message through the stage; the message for the next link.
    fn step(&mut self, m: Msg) -> Result<Msg> {
        let cache = &mut self.cache;
        let batch: Vec<(SeqId, usize)> = m
            .seqs
            .iter()
            .zip(&m.ntok)
            .map(|(&seq, &n)| (*self.seqs.entry(seq).or_insert_with(|| cache.add_sequence()), n as usize))
            .collect();
        let mut out = Msg { kind: WORK, mb: m.mb, all_rows: m.all_rows, seqs: m.seqs, ntok: m.ntok, ..Msg::default() };
        if batch.is_empty() {
            self.stage.serve_experts(self.b, self.ep)?;
            return Ok(out);
        }
        let rows = rows_wanted(&out.ntok, m.all_rows != 0);
        let input = if self.first { StageInput::Ids(m.ids) } else { StageInput::Hidden { x: m.a, residual: m.b } };
        match self.stage.step(self.b, self.ep, &mut self.cache, &batch, input, &rows)? {
            StageOutput::Hidden { x, residual } => (out.a, out.b) = (x, residual),
            StageOutput::Logits(l) => out.a = l,
        }
        Ok(out)
    }
}

/// The rows whose logits a step returns: every row, or each sequence's last.
fn rows_wanted(ntok: &[u32], all: bool) -> Vec<usize> {
    let total: usize = ntok.iter().map(|&n| n as usize).sum();
    if all {
        return (0..total).collect();
    }
    let mut end = 0;
    ntok.iter()
        .map(|&n| {
            end += n as usize;
            end - 1
        })
        .collect()
}

/// One sequence as rank 0 sees it.
struct Seq {
    prompt: Vec<u32>,
    sampler: Sampler,
    out: Generation,
    logits: Vec<f32>,
    /// The token its next step appends (after the prefill).
    next: Option<u32>,
    done: bool,
}

/// Rank 0's side: sampling, the queue of micro-batches, the outputs.
struct Driver<F> {
    kind: JobKind,
    header: Header,
    ep: usize,
    vocab: usize,
    max_tokens: usize,
    eos: Vec<u32>,
    allowed: usize,
    seqs: Vec<Seq>,
    ready: VecDeque<usize>,
    in_flight: usize,
    stop_sent: bool,
    finished: bool,
    rounds: usize,
    busy_rounds: usize,
    start: Instant,
    on_token: F,
}

impl<F: FnMut(usize, u32) -> Result<()>> Driver<F> {
    fn new(job: Job, header: Header, ep: usize, vocab: usize, on_token: F) -> Result<Self> {
        let seqs = job
            .prompts
            .into_iter()
            .enumerate()
            .map(|(i, prompt)| {
                let sampling = SamplingParams { seed: job.sampling.seed.wrapping_add(i as u64), ..job.sampling };
                let out = Generation { prompt_tokens: prompt.len(), ..Generation::default() };
                let done = job.kind == JobKind::Generate && job.max_tokens == 0;
                Ok(Seq { prompt, sampler: Sampler::new(sampling)?, out, logits: Vec::new(), next: None, done })
            })
            .collect::<Result<Vec<_>>>()?;
        let ready = (0..header.micro_batches).filter(|&m| header.members(m, ep).iter().any(|&(s, _)| !seqs[s].done)).collect();
        Ok(Driver {
            kind: job.kind,
            header,
            ep,
            vocab,
            max_tokens: job.max_tokens,
            eos: job.eos,
            allowed: job.allowed,
            seqs,
            ready,
            in_flight: 0,
            stop_sent: false,
            finished: false,
            rounds: 0,
            busy_rounds: 0,
            start: Instant::now(),
            on_token,
        })
    }

    /// Takes the last stage's messages of one round (one per lane).
    fn absorb(&mut self, back: Vec<Msg>) -> Result<()> {
        let Some(kind) = back.first().map(|m| m.kind) else { return Ok(()) };
        if back.iter().any(|m| m.kind != kind) {
            return Err(dist_err(0, "the last stage's lanes disagree on the round"));
        }
        match kind {
            STOP => self.finished = true,
            WORK => {
                let mb = back[0].mb as usize;
                for m in &back {
                    self.take_logits(m)?;
                }
                self.in_flight -= 1;
                if self.header.members(mb, self.ep).iter().any(|&(s, _)| !self.seqs[s].done) {
                    self.ready.push_back(mb);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Samples (or keeps) the logits one lane returned for its sequences.
    fn take_logits(&mut self, m: &Msg) -> Result<()> {
        let (vocab, rows) = (self.vocab, rows_wanted(&m.ntok, m.all_rows != 0).len());
        if m.a.len() != rows * vocab {
            return Err(dist_err(0, format!("{} logits for {rows} rows of {vocab}", m.a.len())));
        }
        let mut at = 0;
        for (&seq, &n) in m.seqs.iter().zip(&m.ntok) {
            let s = self.seqs.get_mut(seq as usize).ok_or_else(|| dist_err(0, format!("logits for unknown sequence {seq}")))?;
            let rows = if self.kind == JobKind::Logits { n as usize } else { 1 };
            let Some(l) = m.a.get(at..at + rows * vocab) else { return Err(dist_err(0, "short logits message")) };
            at += rows * vocab;
            if self.kind == JobKind::Logits {
                s.logits = l.to_vec();
                s.done = true;
                continue;
            }
            let id = s.sampler.sample(l, self.allowed)?;
            if s.out.ids.is_empty() {
                s.out.prefill_time = self.start.elapsed();
            }
            s.out.ids.push(id);
            (self.on_token)(seq as usize, id)?;
            if self.eos.contains(&id) {
                s.out.stopped_at_eos = true;
            }
            s.done = s.out.stopped_at_eos || s.out.ids.len() >= self.max_tokens;
            if s.done {
                s.out.decode_time = self.start.elapsed() - s.out.prefill_time;
            }
            s.next = Some(id);
        }
        Ok(())
    }

    /// The first stage's inputs of this round, one message per lane.
    fn next_inputs(&mut self) -> Vec<Msg> {
        self.rounds += 1;
        let Some(mb) = self.ready.pop_front() else {
            let all_done = self.in_flight == 0 && self.seqs.iter().all(|s| s.done);
            let kind = if all_done { STOP } else { IDLE };
            self.stop_sent = all_done;
            return vec![Msg::of(kind); self.ep];
        };
        self.in_flight += 1;
        self.busy_rounds += 1;
        let all_rows = (self.kind == JobKind::Logits) as u32;
        let mut msgs = vec![Msg { kind: WORK, mb: mb as u32, all_rows, ..Msg::default() }; self.ep];
        for (seq, lane) in self.header.members(mb, self.ep) {
            let s = &self.seqs[seq];
            if s.done {
                continue;
            }
            let toks = match s.next {
                Some(t) => vec![t],
                None => s.prompt.clone(),
            };
            let m = &mut msgs[lane];
            m.seqs.push(seq as u32);
            m.ntok.push(toks.len() as u32);
            m.ids.extend(toks);
        }
        msgs
    }

    fn finish(self) -> JobOutput {
        let (rounds, busy_rounds) = (self.rounds, self.busy_rounds);
        let (generations, logits) = match self.kind {
            JobKind::Generate => (self.seqs.into_iter().map(|s| s.out).collect(), Vec::new()),
            JobKind::Logits => (Vec::new(), self.seqs.into_iter().map(|s| s.logits).collect()),
        };
        JobOutput { generations, logits, rounds, busy_rounds }
    }
}
