//! `dsv3 eval`: perplexity and bits per byte of a text file.

use crate::args::{ModelArgs, OnDevice, WithMtp, load};
use dsv3_kernels::Backend;
use dsv3_runtime::{Result, RuntimeError};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per forward chunk (chunked prefill on one sequence).
    #[arg(long, default_value_t = 256)]
    pub chunk: usize,
    /// Evaluate at most this many tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
}

impl OnDevice for EvalArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        let text =
            std::fs::read_to_string(&a.text).map_err(|e| RuntimeError::Io { path: a.text.clone(), op: "read the text", source: e })?;
        let l = load(b, &a.model, WithMtp::No)?;
        let tok = l.tokenizer("eval")?;
        let mut ids = tok.encode(&text, true)?;
        if a.max_tokens > 0 {
            ids.truncate(a.max_tokens + 1);
        }
        let vocab = l.model.config().vocab_size;
        let bar = indicatif::ProgressBar::new(ids.len().saturating_sub(1) as u64);
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let t0 = Instant::now();
        let (nll, count) = dsv3_runtime::eval::nll(&l.b, &l.model, &ids, a.chunk, |n| bar.set_position(n as u64))?;
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
}
