//! Multi-process runs of `generate` and `logits`: `--pp` pipeline stages of `--ep` expert-
//! parallel ranks, launched as `mpirun -np N dsv3 <command> ...` (one process per GPU or CPU
//! socket). Rank 0 tokenises, samples and prints; every rank loads only its part of the
//! model. Several prompts in one process run through the same job (one rank).
//!
//! Errors: a rank that cannot load its part, or a request rank 0 refuses, makes every rank
//! exit 1 with that error (named by rank). A rank that fails while the job runs aborts the
//! job (`MPI_Abort`); `mpirun` then stops the others, each printing that it was aborted.

use crate::generate::{GenerateArgs, Printer};
use crate::logits::{LogitsArgs, write_logits};
use dsv3_dist::{EpWire, Launch, MpiWorld};
use dsv3_kernels::Backend;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::dist::{Comm, InProcessComm, Job, JobKind, JobOutput, Layout, StageModel, agree, run_job};
use dsv3_runtime::{Checkpoint, ModelConfig, Progress, Result, RuntimeError, Tokenizer};
use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

/// The parallel layout flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ParallelArgs {
    /// Pipeline stages: the layers are split over this many groups of ranks [default: 1].
    #[arg(long)]
    pub pp: Option<usize>,
    /// Expert-parallel ranks per stage, each holding n_routed_experts / EP routed experts
    /// [default: the processes / --pp].
    #[arg(long)]
    pub ep: Option<usize>,
    /// Groups the prompts are split into; the pipeline keeps up to --pp of them in flight
    /// [default: the number of prompts, at most --pp].
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// How expert-parallel ranks exchange tokens: `mpi` (host buffers) or `nccl` (GPU memory,
    /// needs --device cuda and a `cuda` build).
    #[arg(long, default_value = "mpi")]
    pub ep_wire: String,
}

impl ParallelArgs {
    /// Whether the command runs as a job of [`run`]: a layout or a transport was asked for,
    /// the process was started by an MPI launcher, or there are several prompts.
    pub fn wanted(&self, prompts: usize) -> bool {
        self.pp.is_some()
            || self.ep.is_some()
            || self.micro_batches.is_some()
            || self.ep_wire != "mpi"
            || prompts > 1
            || Launch::detect().size() > 1
    }

    fn layout(&self, world: usize) -> Layout {
        let pp = self.pp.unwrap_or(1).max(1);
        Layout { pp, ep: self.ep.unwrap_or((world / pp).max(1)) }
    }

    fn wire(&self, device: &crate::args::Device) -> Result<EpWire> {
        match (self.ep_wire.as_str(), device) {
            ("mpi", _) => Ok(EpWire::Mpi),
            ("nccl", crate::args::Device::Cuda(n)) => Ok(EpWire::Nccl { device: *n }),
            ("nccl", crate::args::Device::CudaLocal) => Ok(EpWire::Nccl { device: Launch::detect().local_rank() }),
            ("nccl", _) => Err(RuntimeError::Request("--ep-wire nccl needs --device cuda".into())),
            (w, _) => Err(RuntimeError::Request(format!("--ep-wire {w}: expected mpi or nccl"))),
        }
    }
}

/// One rank's part of a model directory, and (rank 0) its tokenizer.
struct Part<B: Backend> {
    stage: StageModel<B>,
    cfg: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
}

fn load_part<B: Backend>(b: &B, dir: &Path, path: GemmPath, layout: Layout, rank: usize) -> Result<Part<B>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    layout.check(&cfg, layout.world())?;
    let ck = Checkpoint::open_with(dir, if rank == 0 { Progress::Auto } else { Progress::Never })?;
    ck.validate(&cfg)?;
    let stage = StageModel::load(b, &ck, &cfg, path, layout, rank)?;
    let tokenizer = if rank == 0 { Tokenizer::from_dir(dir)?.map(|t| Arc::new(t.with_model_config(&cfg))) } else { None };
    Ok(Part { stage, cfg, tokenizer })
}

/// An error of a job: `agreed` if every rank has it (the job ends cleanly), otherwise it is
/// this rank's alone and the job must be aborted.
struct JobError {
    err: RuntimeError,
    agreed: bool,
}

fn agreed(err: RuntimeError) -> JobError {
    JobError { err, agreed: true }
}

/// Runs one job on `comm`: every rank loads its part (agreed), rank 0 builds the job from
/// the tokenizer and config (agreed), then the pipeline runs and rank 0 hands the output to
/// `finish`.
#[allow(clippy::too_many_arguments)] // the job's three callbacks and where it runs
fn run_on<B: Backend, C: Comm>(
    b: &B,
    comm: &C,
    layout: Layout,
    model: &crate::args::ModelArgs,
    make_job: impl FnOnce(Option<&Tokenizer>, &ModelConfig) -> Result<Job>,
    on_token: impl FnMut(&Part<B>, usize, u32) -> Result<()>,
    finish: impl FnOnce(&Part<B>, JobOutput) -> Result<()>,
) -> Result<(), JobError> {
    let rank = comm.rank();
    let (dir, _tmp) = agree(comm, model.dir()).map_err(agreed)?;
    let part = agree(comm, load_part(b, &dir, model.gemm, layout, rank)).map_err(agreed)?;
    let job = if rank == 0 { make_job(part.tokenizer.as_deref(), &part.cfg).map(Some) } else { Ok(None) };
    let job = agree(comm, job).map_err(agreed)?;
    let mut on_token = on_token;
    let out = run_job(b, comm, &part.stage, layout, job, |s, id| on_token(&part, s, id)).map_err(|err| JobError { err, agreed: false })?;
    match out {
        Some(out) => finish(&part, out).map_err(|err| JobError { err, agreed: false }),
        None => Ok(()),
    }
}

/// Runs a job in this process (one rank) or, under `mpirun`, as this process's rank.
fn run<B: Backend, M, T, F>(b: &B, model: &crate::args::ModelArgs, par: &ParallelArgs, make_job: M, on_token: T, finish: F) -> Result<()>
where
    M: FnOnce(Option<&Tokenizer>, &ModelConfig) -> Result<Job>,
    T: FnMut(&Part<B>, usize, u32) -> Result<()>,
    F: FnOnce(&Part<B>, JobOutput) -> Result<()>,
{
    // NCCL needs MPI for its unique id even with one process (`mpirun -np 1 ... --ep-wire nccl`).
    if Launch::detect().size() == 1 && par.ep_wire != "nccl" {
        let layout = par.layout(1);
        if layout != Layout::SINGLE {
            return Err(RuntimeError::Request(format!(
                "--pp {} --ep {} needs {} processes: mpirun -np {} dsv3 ...",
                layout.pp,
                layout.ep,
                layout.world(),
                layout.world()
            )));
        }
        let comm = InProcessComm::world(layout)?.remove(0);
        return run_on(b, &comm, layout, model, make_job, on_token, finish).map_err(|e| e.err);
    }
    let world = MpiWorld::init()?;
    let layout = par.layout(world.size());
    let wire = par.wire(&model.device)?;
    if layout.world() != world.size() {
        return Err(RuntimeError::Request(format!(
            "--pp {} x --ep {} = {} ranks, but mpirun started {} processes",
            layout.pp,
            layout.ep,
            layout.world(),
            world.size()
        )));
    }
    // Joining NCCL is a collective: a rank that fails there must end the job.
    let comm = world.comm(layout, wire).unwrap_or_else(|e| world.abort(&e));
    match run_on(b, &comm, layout, model, make_job, on_token, finish) {
        Ok(()) => Ok(()),
        Err(JobError { err, agreed: true }) => Err(err),
        Err(JobError { err, agreed: false }) => world.abort(&err),
    }
}

/// How many micro-batches: as asked, else one per prompt up to the pipeline depth.
fn micro_batches(par: &ParallelArgs, prompts: usize) -> usize {
    par.micro_batches.unwrap_or(prompts.min(par.pp.unwrap_or(1)).max(1))
}

/// `dsv3 generate` as a job: rank 0 prints each prompt's completion (a single prompt
/// streamed as it comes), in prompt order.
pub fn generate<B: Backend>(b: &B, a: GenerateArgs) -> Result<()> {
    if a.mtp {
        return Err(RuntimeError::Request("--mtp runs in one process with one prompt only".into()));
    }
    let single = a.prompt.len() + a.prompt_ids.len() <= 1;
    let make_job = |tok: Option<&Tokenizer>, cfg: &ModelConfig| {
        let prompts = a.prompts(tok)?;
        let mut eos = cfg.eos_token_ids.clone();
        eos.extend(tok.and_then(|t| t.eos_id()));
        let allowed = tok.map_or(cfg.vocab_size, |t| t.token_count().min(cfg.vocab_size));
        let micro_batches = micro_batches(&a.parallel, prompts.len());
        Ok(Job { kind: JobKind::Generate, prompts, micro_batches, max_tokens: a.max_tokens, sampling: a.sampling(), eos, allowed })
    };
    // One prompt streams its text as it comes; several print in prompt order at the end.
    let streaming: RefCell<Option<Printer<'static>>> = RefCell::new(None);
    let printer = |p: &Part<B>| Printer::from_stream(p.tokenizer.as_ref().map(|t| t.stream_shared(p.cfg.vocab_size)));
    let on_token = |p: &Part<B>, _seq: usize, id: u32| match single {
        true => streaming.borrow_mut().get_or_insert_with(|| printer(p)).push(id),
        false => Ok(()),
    };
    let finish = |p: &Part<B>, out: JobOutput| {
        for g in &out.generations {
            let mut pr = streaming.borrow_mut().take().unwrap_or_else(|| printer(p));
            if !single {
                for &id in &g.ids {
                    pr.push(id)?;
                }
            }
            pr.finish(g, a.json)?;
        }
        Ok(())
    };
    run(b, &a.model, &a.parallel, make_job, on_token, finish)
}

/// `dsv3 logits` as a job: rank 0 writes the file.
pub fn logits<B: Backend>(b: &B, a: LogitsArgs) -> Result<()> {
    let make_job = |_: Option<&Tokenizer>, cfg: &ModelConfig| {
        Ok(Job {
            kind: JobKind::Logits,
            prompts: vec![a.ids.clone()],
            micro_batches: 1,
            max_tokens: 0,
            sampling: Default::default(),
            eos: vec![],
            allowed: cfg.vocab_size,
        })
    };
    let finish = |p: &Part<B>, out: JobOutput| {
        let logits = out.logits.into_iter().next().unwrap_or_default();
        write_logits(&a.out, &logits, a.ids.len(), p.cfg.vocab_size)
    };
    run(b, &a.model, &a.parallel, make_job, |_, _, _| Ok(()), finish)
}
