//! `dsv3`: run DeepSeek-V3-architecture models from their real checkpoint format: generate,
//! chat, logits, eval, bench, and serve them behind an OpenAI-compatible endpoint, on the CPU
//! or a GPU (`--device`). One file per command.
#![forbid(unsafe_code)]

mod args;
mod bench;
mod chat;
mod eval;
mod generate;
mod init;
mod logits;
mod parallel;
mod plan;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc, keeping the pages it frees (`dsv3_kernels::alloc`).
#[global_allocator]
static GLOBAL: dsv3_kernels::alloc::MiMalloc = dsv3_kernels::alloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dsv3", version, about = "DeepSeek-V3 inference engine (CPU and CUDA backends)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or ids) after a prompt; stops at EOS.
    Generate(generate::GenerateArgs),
    /// Interactive chat with the model's chat template (`/exit`, `/clear`).
    Chat(chat::ChatArgs),
    /// Write the logits of every position of a token sequence to a new safetensors file.
    Logits(logits::LogitsArgs),
    /// Write a random model in the real checkpoint format to a new directory.
    InitRandom(init::InitArgs),
    /// Prefill and decode tokens/s (one sequence and batches), decode GB/s against the measured memory bandwidth.
    Bench(bench::BenchArgs),
    /// Perplexity and bits per byte of a text file (the metric DeepSeek reports on Pile-test).
    Eval(eval::EvalArgs),
    /// An OpenAI-compatible HTTP server with continuous batching.
    Serve(serve::ServeArgs),
    /// Per-rank memory and a decode time model of multi-process layouts (--pp x --ep) on stated hardware.
    Plan(plan::PlanArgs),
}

fn main() -> ExitCode {
    dsv3_kernels::alloc::keep_freed_pages();
    let cmd = Cli::parse().cmd;
    // Commands run on a worker of this pool (below): give its threads the main thread's stack.
    // `RAYON_NUM_THREADS` still sets their number. (An error here means a pool already exists.)
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    // Under mpirun only the commands that run as a multi-process job may start: any other
    // would run once per process.
    let launch = dsv3_dist::Launch::detect();
    let serve = matches!(cmd, Cmd::Serve(_));
    if launch.size() > 1 && !matches!(cmd, Cmd::Generate(_) | Cmd::Logits(_)) {
        eprintln!("error: rank {} of {}: only `dsv3 generate` and `dsv3 logits` run under mpirun", launch.rank(), launch.size());
        return ExitCode::FAILURE;
    }
    let run = move || match cmd {
        Cmd::Generate(a) => args::on_device(a.model.device, a),
        Cmd::Chat(a) => args::on_device(a.model.device, a),
        Cmd::Logits(a) => args::on_device(a.model.device, a),
        Cmd::InitRandom(a) => init::run(a).map_err(args::CliError::from),
        Cmd::Bench(a) => args::on_device(a.model.device, a),
        Cmd::Eval(a) => args::on_device(a.model.device, a),
        Cmd::Serve(a) => args::on_device(a.model.device, a),
        Cmd::Plan(a) => a.run().map_err(args::CliError::from),
    };
    // The command runs on a worker of the kernels' thread pool, so each parallel kernel is a
    // fork/join among the pool's own threads: called from outside the pool, every one of a
    // decode step's ~100 kernels handed its work to the pool and put this thread to sleep
    // until it was done (two context switches per kernel: ~20% of a small model's decode
    // step). Not under mpirun, whose calls stay on the thread that initialised MPI; not for
    // `serve`, whose engine thread enters the pool itself (`dsv3_runtime::engine::spawn`).
    let result = if launch.size() > 1 || serve { run() } else { rayon::scope(|_| run()) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One write of the whole line: the ranks of an mpirun job share stderr, and a line
            // written piece by piece (stderr is unbuffered) interleaves with theirs.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("error: {e}\n").as_bytes());
            ExitCode::FAILURE
        }
    }
}
