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
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Generate(a) => args::on_device(a.model.device, a),
        Cmd::Chat(a) => args::on_device(a.model.device, a),
        Cmd::Logits(a) => args::on_device(a.model.device, a),
        Cmd::InitRandom(a) => init::run(a).map_err(args::CliError::from),
        Cmd::Bench(a) => args::on_device(a.model.device, a),
        Cmd::Eval(a) => args::on_device(a.model.device, a),
        Cmd::Serve(a) => args::on_device(a.model.device, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
