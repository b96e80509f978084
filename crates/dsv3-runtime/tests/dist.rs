//! Pipeline and expert parallelism with threads as ranks ([`run_in_process`]): every layout
//! gives, bit for bit, what one process gives, and a rank that fails ends the job on every
//! rank with its error. (The same code over MPI processes is tested by scripts/mpi-check.sh.)

mod common;

use common::{load_model, write_preset};
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::Transport;
use dsv3_runtime::dist::{Comm, InProcessComm, Job, JobKind, JobOutput, Layout, StageModel, Tag, run_in_process, run_job};
use dsv3_runtime::generate::{Request, SamplingParams, generate};
use dsv3_runtime::{Checkpoint, ModelConfig, Preset, Progress, RuntimeError};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

fn stage(dir: &Path, layout: Layout, rank: usize, path: GemmPath) -> dsv3_runtime::Result<StageModel<Cpu>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open_with(dir, Progress::Never)?;
    ck.validate(&cfg)?;
    layout.check(&cfg, layout.world())?;
    StageModel::load(&Cpu, &ck, &cfg, path, layout, rank)
}

fn job(kind: JobKind, prompts: Vec<Vec<u32>>, micro_batches: usize, sampling: SamplingParams) -> Job {
    Job { kind, prompts, micro_batches, max_tokens: 6, sampling, eos: vec![], allowed: 1024 }
}

/// Runs `job` on every rank of `layout` (threads), returns rank 0's output.
fn run(dir: &Path, layout: Layout, job: Job, path: GemmPath) -> JobOutput {
    let results = run_in_process(layout, |c| {
        let s = stage(dir, layout, c.rank(), path)?;
        run_job(&Cpu, c, &s, layout, (c.rank() == 0).then(|| job.clone()), |_, _| Ok(()))
    })
    .unwrap();
    let mut it = results.into_iter();
    let first = it.next().unwrap().unwrap().unwrap();
    for r in it {
        assert!(r.unwrap().is_none(), "only rank 0 returns the output");
    }
    first
}

fn ids(out: JobOutput) -> Vec<Vec<u32>> {
    out.generations.into_iter().map(|g| g.ids).collect()
}

const LAYOUTS: [Layout; 7] = [
    Layout { pp: 1, ep: 1 },
    Layout { pp: 1, ep: 2 },
    Layout { pp: 1, ep: 4 },
    Layout { pp: 2, ep: 1 },
    Layout { pp: 4, ep: 1 },
    Layout { pp: 2, ep: 2 },
    Layout { pp: 2, ep: 4 },
];

#[test]
fn every_layout_generates_what_one_process_generates() {
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let prompts: Vec<Vec<u32>> = vec![vec![0, 19, 923, 3], vec![5, 6], vec![77, 1000, 12, 9, 400]];
    for (path, temperature) in [(GemmPath::Reference, 0.0), (GemmPath::Fp8, 0.8)] {
        let sampling = SamplingParams { temperature, seed: 11, ..Default::default() };
        // One process, one prompt at a time (sequence i samples with seed + i).
        let m = load_model(&dir, path);
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = SamplingParams { seed: 11 + i as u64, ..sampling };
                let req = Request { prompt: p, max_tokens: 6, sampling: s, eos: &[], allowed: 1024 };
                generate(&Cpu, &m, &req, |_| Ok(())).unwrap().ids
            })
            .collect();
        for layout in LAYOUTS {
            // One prompt; then all three, one per micro-batch, in flight together.
            let one = ids(run(&dir, layout, job(JobKind::Generate, prompts[..1].to_vec(), 1, sampling), path));
            assert_eq!(one, want[..1], "{layout:?} {path:?}: one prompt");
            let three = ids(run(&dir, layout, job(JobKind::Generate, prompts.clone(), 3, sampling), path));
            assert_eq!(three, want, "{layout:?} {path:?}: three micro-batches");
        }
    }
}

#[test]
fn every_layout_gives_the_logits_of_one_process_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let prompt: Vec<u32> = (0..13).map(|i| (i * 71 + 4) % 1024).collect();
    let m = load_model(&dir, GemmPath::Reference);
    let mut cache = m.new_cache(&Cpu, prompt.len()).unwrap();
    let seq = cache.add_sequence();
    let hidden = m.forward_hidden(&Cpu, &mut cache, &[(seq, &prompt[..])]).unwrap();
    let want = m.logits(&Cpu, &hidden, &(0..prompt.len()).collect::<Vec<_>>()).unwrap();
    for layout in LAYOUTS {
        let got = run(&dir, layout, job(JobKind::Logits, vec![prompt.clone()], 1, Default::default()), GemmPath::Reference).logits;
        assert!(got[0] == want, "{layout:?}: logits differ from one process");
    }
}

#[test]
fn several_sequences_per_micro_batch_match_one_process_batch() {
    // Two sequences in one micro-batch on one lane: the rows of one batched step, as one
    // process batches them (bit-identical). On two lanes each lane runs one sequence's
    // attention and only the experts see both: close, not bit-identical (the CPU GEMMs sum a
    // 1..4-row block and a larger one in different orders).
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let prompts = vec![vec![3u32, 4, 5, 6, 7, 8], vec![9u32, 8, 7, 6, 5]];
    let logits = |layout| run(&dir, layout, job(JobKind::Logits, prompts.clone(), 1, Default::default()), GemmPath::Reference).logits;
    let single = logits(Layout::SINGLE);
    for layout in [Layout { pp: 2, ep: 1 }, Layout { pp: 4, ep: 1 }] {
        assert!(logits(layout) == single, "{layout:?}");
    }
    for layout in [Layout { pp: 1, ep: 2 }, Layout { pp: 2, ep: 2 }] {
        let two_lanes = logits(layout);
        for (a, b) in two_lanes.iter().zip(&single) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale, "{layout:?}: max |diff| {diff} of max |logit| {scale}");
        }
    }
}

#[test]
fn micro_batches_keep_every_stage_busy() {
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![i + 1, 2 * i + 3]).collect();
    // 4 stages, 6 steps per sequence: one micro-batch keeps the first stage busy one round
    // in four; four micro-batches in flight keep it busy all but the fill and drain rounds.
    let layout = Layout { pp: 4, ep: 1 };
    let one = run(&dir, layout, job(JobKind::Generate, prompts.clone(), 1, Default::default()), GemmPath::Reference);
    let four = run(&dir, layout, job(JobKind::Generate, prompts.clone(), 4, Default::default()), GemmPath::Reference);
    assert_eq!((one.busy_rounds, four.busy_rounds), (6, 24));
    let (u1, u4) = (one.busy_rounds as f64 / one.rounds as f64, four.busy_rounds as f64 / four.rounds as f64);
    assert!(
        u1 <= 0.26 && u4 >= 0.85,
        "first-stage utilisation: 1 micro-batch {u1:.2} ({} rounds), 4: {u4:.2} ({} rounds)",
        one.rounds,
        four.rounds
    );
}

/// A comm that fails on rank `rank` at its `at`-th exchange (a rank dying mid-run).
struct Failing<'a> {
    inner: &'a InProcessComm,
    rank: usize,
    at: usize,
    calls: AtomicUsize,
}

impl Comm for Failing<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn exchange(&self, tag: Tag, sends: &[(usize, &[u8])], from: &[usize]) -> dsv3_runtime::Result<Vec<Vec<u8>>> {
        if self.rank() == self.rank && self.calls.fetch_add(1, Ordering::SeqCst) == self.at {
            return Err(RuntimeError::Request("injected failure".into()));
        }
        self.inner.exchange(tag, sends, from)
    }
    fn ep(&self) -> &dyn Transport {
        self.inner.ep()
    }
}

#[test]
fn a_rank_that_fails_mid_run_ends_the_job_on_every_rank_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let layout = Layout { pp: 2, ep: 2 };
    for (bad, at) in [(3, 7), (0, 9), (1, 4)] {
        let results = run_in_process(layout, |c| {
            let f = Failing { inner: c, rank: bad, at, calls: AtomicUsize::new(0) };
            let s = stage(&dir, layout, c.rank(), GemmPath::Reference)?;
            let j = job(JobKind::Generate, vec![vec![1, 2, 3], vec![4, 5]], 2, Default::default());
            run_job(&Cpu, &f, &s, layout, (c.rank() == 0).then_some(j), |_, _| Ok(()))
        })
        .unwrap();
        for (r, res) in results.into_iter().enumerate() {
            // A transport error seen inside a layer comes wrapped in the layer that saw it.
            let res = res.map_err(|e| match e {
                RuntimeError::Layer { source, .. } => *source,
                e => e,
            });
            match res {
                Err(RuntimeError::Request(m)) if r == bad => assert_eq!(m, "injected failure"),
                Err(RuntimeError::Dist { rank, detail }) => {
                    assert_eq!(rank, bad, "rank {r} names the failing rank");
                    assert!(detail.contains("injected failure"), "rank {r}: {detail}");
                }
                Err(RuntimeError::Moe(dsv3_moe::MoeError::Transport { detail, .. })) => {
                    assert!(detail.contains(&format!("rank {bad} failed: request: injected failure")), "rank {r}: {detail}")
                }
                other => panic!("rank {r} (failing rank {bad}): {other:?}"),
            }
        }
    }
}

#[test]
fn bad_requests_and_layouts_are_typed_errors_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    write_preset(tmp.path(), "m", Preset::Tiny, None);
    let dir = tmp.path().join("m");
    let layout = Layout { pp: 2, ep: 2 };
    let results = run_in_process(layout, |c| {
        let s = stage(&dir, layout, c.rank(), GemmPath::Reference)?;
        let j = job(JobKind::Generate, vec![vec![1, 2], vec![]], 1, Default::default());
        run_job(&Cpu, c, &s, layout, (c.rank() == 0).then_some(j), |_, _| Ok(()))
    })
    .unwrap();
    for r in results {
        match r {
            Err(RuntimeError::Dist { rank: 0, detail }) => assert_eq!(detail, "request: the prompt is empty"),
            other => panic!("{other:?}"),
        }
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    for (l, world, want) in [
        (Layout { pp: 1, ep: 3 }, 3, "--ep 3 must divide the model's 16 routed experts"),
        (Layout { pp: 5, ep: 1 }, 5, "--pp 5 must be between 1 and the model's 4 layers"),
        (Layout { pp: 2, ep: 2 }, 2, "--pp 2 x --ep 2 = 4 ranks, but the job has 2 processes"),
    ] {
        assert_eq!(l.check(&cfg, world).unwrap_err().to_string(), format!("request: {want}"));
    }
}
