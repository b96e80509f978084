//! Writes a random model (what `dsv3 init-random` does, as a library call):
//! `cargo run --release -p dsv3-runtime --example init_random -- PRESET OUT [--tokenizer DIR] [--seed N]`

use dsv3_runtime::{InitOptions, Preset, init_random_preset};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(preset), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: init_random PRESET OUT [--tokenizer DIR] [--seed N]");
        return ExitCode::from(2);
    };
    let mut opts = InitOptions::default();
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--tokenizer", Some(d)) => opts.tokenizer_dir = Some(PathBuf::from(d)),
            ("--seed", Some(s)) => match s.parse() {
                Ok(s) => opts.seed = s,
                Err(e) => {
                    eprintln!("--seed {s}: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("unknown or incomplete argument {flag}");
                return ExitCode::from(2);
            }
        }
    }
    let t = std::time::Instant::now();
    let r = Preset::from_name(preset).and_then(|p| init_random_preset(p, &PathBuf::from(out), &opts));
    match r {
        Ok(rep) => {
            println!(
                "wrote {} ({} tensors, {:.3} GB of tensor data, {} files) in {:.1} s",
                rep.dir.display(),
                rep.tensors,
                rep.bytes as f64 / 1e9,
                rep.files.len(),
                t.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
