//! `dsv3 bench`: prefill and decode speed of one sequence (decode GB/s against the measured
//! read bandwidth), the cost of an MTP verify step, and batched decode at `--batch` sizes:
//! prefill tokens/s, decode step time and tokens/s, decode GB/s against the bandwidth measured
//! in the same run (the device's copy bandwidth on a GPU, the host's read bandwidth on the
//! CPU), and the host time per step (wall minus the device time between CUDA events; `null`
//! on the CPU, where all of a step is host time), with what the device did per step.

use crate::args::{GraphsArg, ModelArgs, OnDevice, WithMtp, load};
use dsv3_kernels::Backend;
use dsv3_kernels::sample::SampleRow;
use dsv3_runtime::decode::{DecodeRow, DecodeRunner, device_stats_of};
use dsv3_runtime::generate::{Request, SamplingParams, generate, generate_mtp};
use dsv3_runtime::model::{AttnForm, Model};
use dsv3_runtime::profile::Part;
use dsv3_runtime::{Result, RuntimeError};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Batch sizes for the batched-decode part (comma-separated): that many sequences
    /// prefilled together, then decoded one token each per step.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Decode steps as CUDA graphs per batch-size bucket (`auto`: where the device can), or
    /// eagerly (`off`), for comparison.
    #[arg(long, default_value = "auto")]
    pub graphs: GraphsArg,
    /// Also time the parts of the batch-1 decode step (attention, dense MLP, MoE, lm_head +
    /// sampling, the rest) against the weight bytes each reads. CPU only: on a GPU the host
    /// does not wait for each part.
    #[arg(long)]
    pub profile: bool,
}

impl OnDevice for BenchArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        let l = load(b, &a.model, WithMtp::IfPresent)?;
        let (b, m) = (&l.b, &l.model);
        if a.profile && b.defers_checks() {
            return Err(RuntimeError::Request(format!(
                "--profile times host work, which on {} does not wait for the device; run it on the CPU",
                b.name()
            )));
        }
        let cfg = m.config();
        eprintln!("measuring this machine's memory bandwidth ...");
        let limits = dsv3_kernels::machine::Limits::measure();
        println!("{}", limits.describe());
        let prompt = bench_prompt(cfg.vocab_size, a.prompt_tokens.max(1), 0);
        let params = SamplingParams::default();
        // Warm-up with the same prompt (page in the weights, and let the allocator hold the
        // prefill's buffers, as llama-bench's warm-up run does), then the measured run; EOS is
        // ignored so every step runs.
        let warm = Request { prompt: &prompt, max_tokens: 2, sampling: params, eos: &[], allowed: cfg.vocab_size };
        generate(b, m, &warm, |_| Ok(()))?;
        let t = Instant::now();
        let req = Request { prompt: &prompt, max_tokens: a.decode_tokens + 1, sampling: params, eos: &[], allowed: cfg.vocab_size };
        let g = generate(b, m, &req, |_| Ok(()))?;
        let bytes = m.decode_weight_bytes() as f64;
        let decode = g.decode_tokens_per_s();
        let gbs = bytes * decode / 1e9;
        let (one, two) = step_times(b, m, &prompt, a.decode_tokens.clamp(3, 9))?;
        let mut report = serde_json::json!({
            "device": b.name(),
            "prompt_tokens": g.prompt_tokens,
            "prefill_tokens_per_s": g.prefill_tokens_per_s(),
            "decode_tokens": g.ids.len().saturating_sub(1),
            "decode_tokens_per_s": decode,
            "decode_weight_bytes_per_token": bytes,
            "decode_gb_per_s": gbs,
            "decode_ratio_to_read_bandwidth": gbs * 1e9 / limits.read_bytes_per_s,
            "gemm": format!("{:?}", m.gemm_path()).to_lowercase(),
            "verify_step": {
                "one_token_step_s": one,
                "two_token_step_s": two,
                "cost_ratio": two / one,
                "mtp_speedup_bound_at_85pct_acceptance": 1.85 / (two / one),
                "note": "a speculative step verifies [next, draft] in one absorbed two-token step; with acceptance a it yields 1 + a tokens for cost_ratio one-token steps (plus the MTP block, about 1/num_hidden_layers of a step for V3)",
            },
        });
        let mut batches = Vec::new();
        let sizes: Vec<usize> = a.batch.iter().copied().filter(|&n| n > 0).collect();
        if let Some(&max) = sizes.iter().max() {
            let bandwidth = match b.copy_bandwidth()? {
                Some(bw) => (bw, "device-to-device copy, CUDA events (bytes read + written)"),
                None => (limits.read_bytes_per_s, "host memory read (machine::Limits)"),
            };
            let mut runner = DecodeRunner::new(b, m, max, a.graphs.into())?;
            for &n in &sizes {
                let profile = a.profile && n == 1;
                let r = batched(b, m, &mut runner, n, a.prompt_tokens.max(1), a.decode_tokens.max(1), bandwidth, profile)?;
                print_batch(&r);
                print_profile(&r);
                batches.push(r);
            }
        }
        if let Some(obj) = report.as_object_mut() {
            obj.insert("batches".into(), batches.into());
            if let Some(mtp) = &l.mtp {
                let s = generate_mtp(b, m, mtp, &req, |_| Ok(()))?;
                let stats = s.mtp.clone().unwrap_or_default();
                obj.insert(
                    "mtp".into(),
                    serde_json::json!({
                        "decode_tokens_per_s": s.decode_tokens_per_s(),
                        "speedup": s.decode_tokens_per_s() / decode,
                        "acceptance": stats.acceptance(),
                        "same_tokens_as_without": s.ids == g.ids,
                        "note": "random weights: the MTP module was not trained to agree with the main model, so acceptance (and speedup) are far below a real checkpoint's",
                    }),
                );
            }
            obj.insert("wall_s".into(), t.elapsed().as_secs_f64().into());
        }
        println!("{report}");
        Ok(())
    }
}

/// A deterministic prompt of `n` ids (sequence `k` of a batch gets its own).
fn bench_prompt(vocab: usize, n: usize, k: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + k * 104_729) % vocab.min(100_000)) as u32).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of a one-token and of a two-token absorbed decode step after `prompt`, each
/// rolled back after timing so every sample runs at the same position.
fn step_times<B: Backend>(b: &B, m: &Model<B>, prompt: &[u32], samples: usize) -> Result<(f64, f64)> {
    let mut cache = m.new_cache(b, prompt.len() + 4)?;
    let seq = cache.add_sequence();
    m.forward_hidden(b, &mut cache, &[(seq, prompt)])?;
    let n = prompt.len();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let a = (i * 131 + 17) as u32 % m.config().vocab_size as u32;
        for (times, toks) in [(&mut one, &[a][..]), (&mut two, &[a, a ^ 1][..])] {
            let t = Instant::now();
            m.forward_hidden_with(b, &mut cache, &[(seq, toks)], AttnForm::Absorbed)?;
            times.push(t.elapsed().as_secs_f64());
            cache.truncate(seq, n)?;
        }
    }
    Ok((median(&mut one), median(&mut two)))
}

/// `n` sequences of `prompt` tokens prefilled in one step, then `steps` decode steps of all
/// of them through `runner` (greedy, sampled on the backend, as a server's step): prefill
/// tokens/s, the median decode step, tokens/s, GB/s against `bandwidth`, the host time per
/// step, and what the device did per step.
#[allow(clippy::too_many_arguments)] // the batch's plain settings
fn batched<B: Backend>(
    b: &B,
    m: &Model<B>,
    runner: &mut DecodeRunner<B>,
    n: usize,
    prompt: usize,
    steps: usize,
    (bandwidth, bandwidth_source): (f64, &str),
    profile: bool,
) -> Result<serde_json::Value> {
    let vocab = m.config().vocab_size;
    // Whole pages per sequence: a sequence never shares a page.
    let per_seq = (prompt + steps + 2).div_ceil(dsv3_runtime::mla::PAGE_SIZE) * dsv3_runtime::mla::PAGE_SIZE;
    let mut cache = m.new_cache_with(b, n * per_seq, runner.pad_rows())?;
    let seqs: Vec<_> = (0..n).map(|_| cache.add_sequence()).collect();
    let prompts: Vec<Vec<u32>> = (0..n).map(|k| bench_prompt(vocab, prompt, k)).collect();
    let batch: Vec<_> = seqs.iter().zip(&prompts).map(|(&s, p)| (s, &p[..])).collect();
    let last: Vec<usize> = (0..n).map(|k| (k + 1) * prompt - 1).collect();
    m.profile().enable(profile);
    let t = Instant::now();
    let mut next = {
        let h = m.forward_hidden(b, &mut cache, &batch)?;
        m.sample(b, &h, &last, &vec![SampleRow::GREEDY; n], vocab)?
    };
    let prefill = t.elapsed().as_secs_f64();
    let prefill_parts = profile.then(|| profile_parts(m, prefill, 1, None));
    m.profile().enable(false);
    runner.set_timing(true);
    let mut timed = 0.0;
    let (mut wall, mut device, mut host, mut per_step) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One step before timing: a new shape captures its graph (or warms up) first.
    for i in 0..=steps {
        let rows: Vec<DecodeRow> = (0..n).map(|k| DecodeRow { seq: seqs[k], token: next[k], sample: SampleRow::GREEDY }).collect();
        // Parts are timed from the second step on, as the steps are.
        if profile && i == 1 {
            m.profile().enable(true);
        }
        let t = Instant::now();
        let (ids, stats) = device_stats_of(b, || runner.step(b, m, &mut cache, &rows, vocab))?;
        let w = t.elapsed().as_secs_f64();
        next = ids;
        if i == 0 {
            continue;
        }
        timed += w;
        wall.push(w);
        per_step.push(stats);
        if let Some(d) = runner.stats().last_device_s {
            device.push(d);
            host.push((w - d).max(0.0));
        }
    }
    runner.set_timing(false);
    let parts = profile.then(|| profile_parts(m, timed, steps, Some(bandwidth)));
    m.profile().enable(false);
    let step = median(&mut wall);
    let bytes = m.decode_weight_bytes_for(n);
    let gbs = bytes / step / 1e9;
    let s = per_step.last().copied().unwrap_or_default();
    let rs = runner.stats();
    Ok(serde_json::json!({
        "batch": n,
        "prompt_tokens": prompt,
        "prefill_tokens_per_s": (n * prompt) as f64 / prefill,
        "decode_steps": steps,
        "decode_step_s": step,
        "decode_tokens_per_s": n as f64 / step,
        "decode_weight_bytes_per_step": bytes,
        "decode_gb_per_s": gbs,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_source": bandwidth_source,
        "decode_ratio_to_bandwidth": gbs * 1e9 / bandwidth,
        "device_step_s": (!device.is_empty()).then(|| median(&mut device)),
        "host_step_s": (!host.is_empty()).then(|| median(&mut host)),
        "host_step_note": if host.is_empty() { "n/a: no device clock (the CPU backend: the whole step is host time)" } else { "wall time of the step minus the device time between CUDA events around its device work" },
        "graphs": runner.uses_graphs() && n <= runner.pad_rows(),
        "per_step": {
            "launches": s.launches,
            "allocations": s.allocations,
            "uploads": s.uploads,
            "host_syncs": s.host_syncs,
            "graph_replays": s.graph_replays,
            "workspace_overflows": s.workspace_overflows,
        },
        "workspace_bytes": rs.workspace_bytes,
        "captures": rs.captures,
        "capture_error": rs.capture_error,
        "profile": parts,
        "prefill_profile": prefill_parts,
    }))
}

/// Per part of the model ([`Part`]) over `steps` steps of `total_s` seconds in all: seconds per
/// step and share of the step, and "other", the rest (embedding, final norm, step
/// bookkeeping). With `bandwidth` (a decode step), also each part's weight bytes, GB/s and
/// their ratio to it.
fn profile_parts<B: Backend>(m: &Model<B>, total_s: f64, steps: usize, bandwidth: Option<f64>) -> serde_json::Value {
    let per_step = |s: f64| s / steps.max(1) as f64;
    let step = per_step(total_s);
    let bytes = m.decode_bytes();
    let mut parts = Vec::new();
    let mut rest = step;
    for p in Part::ALL {
        let s = per_step(m.profile().get(p).as_secs_f64());
        rest -= s;
        let mut part = serde_json::json!({ "part": p.name(), "step_s": s, "share": s / step });
        if let (Some(bw), Some(obj)) = (bandwidth, part.as_object_mut()) {
            let gbs = bytes.of(p) as f64 / s.max(1e-12) / 1e9;
            obj.insert("weight_bytes".into(), bytes.of(p).into());
            obj.insert("gb_per_s".into(), gbs.into());
            obj.insert("ratio_to_bandwidth".into(), (gbs * 1e9 / bw).into());
        }
        parts.push(part);
    }
    let mut other = serde_json::json!({ "part": "other", "step_s": rest, "share": rest / step });
    if let (Some(_), Some(obj)) = (bandwidth, other.as_object_mut()) {
        obj.insert("weight_bytes".into(), 0.into());
    }
    parts.push(other);
    serde_json::Value::Array(parts)
}

/// The profiles of a batch (prefill and decode, [`profile_parts`]), a line per part, if it has
/// them.
fn print_profile(r: &serde_json::Value) {
    if let Some(parts) = r["prefill_profile"].as_array() {
        let line: Vec<String> = parts
            .iter()
            .map(|p| format!("{} {:.1} ms", p["part"].as_str().unwrap_or("?"), p["step_s"].as_f64().unwrap_or(f64::NAN) * 1e3))
            .collect();
        println!("  prefill: {}", line.join(", "));
    }
    for p in r["profile"].as_array().into_iter().flatten() {
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        let mut line = format!("  {:<20} {:>8.3} ms {:>5.1}%", p["part"].as_str().unwrap_or("?"), f("step_s") * 1e3, 100.0 * f("share"));
        if f("weight_bytes") > 0.0 {
            line += &format!(
                " | {:>7.1} MB, {:>6.1} GB/s ({:.1}% of read bandwidth)",
                f("weight_bytes") / 1e6,
                f("gb_per_s"),
                100.0 * f("ratio_to_bandwidth")
            );
        }
        println!("{line}");
    }
}

/// One line per batch on stdout, before the JSON report.
fn print_batch(r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let host = r["host_step_s"].as_f64().map_or("n/a".to_string(), |h| format!("{:.3} ms", h * 1e3));
    println!(
        "batch {:>3}: prefill {:>9.1} tok/s | decode step {:>8.3} ms, {:>9.1} tok/s, {:>7.1} GB/s ({:.1}% of {:.0} GB/s) | host per step {host}",
        r["batch"],
        f("prefill_tokens_per_s"),
        f("decode_step_s") * 1e3,
        f("decode_tokens_per_s"),
        f("decode_gb_per_s"),
        100.0 * f("decode_ratio_to_bandwidth"),
        f("bandwidth_bytes_per_s") / 1e9,
    );
}
