//! `dsv3 generate`: text (or ids) after a prompt, streamed to stdout; stops at EOS.

use crate::args::{ModelArgs, OnDevice, WithMtp, load};
use dsv3_kernels::Backend;
use dsv3_runtime::generate::{Generation, Request, SamplingParams};
use dsv3_runtime::{Result, RuntimeError};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (needs a tokenizer in the model directory).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Speculative decoding with the model's MTP module: one draft token per step, verified
    /// by the main model (greedy output is unchanged; sampled output keeps its distribution).
    #[arg(long)]
    pub mtp: bool,
}

impl OnDevice for GenerateArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        let l = load(b, &a.model, if a.mtp { WithMtp::Required } else { WithMtp::No })?;
        let prompt = match (&a.prompt, &a.prompt_ids) {
            (Some(text), _) => l.tokenizer("--prompt (or use --prompt-ids)")?.encode(text, true)?,
            (None, Some(ids)) => ids.clone(),
            (None, None) => return Err(RuntimeError::Request("give --prompt TEXT or --prompt-ids 1,2,3".into())),
        };
        let params = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
        let mut stream = l.tokenizer.as_ref().map(|t| t.stream(l.model.config().vocab_size));
        let mut text = String::new();
        let stdout = std::io::stdout();
        let eos = l.eos_ids();
        let req = Request { prompt: &prompt, max_tokens: a.max_tokens, sampling: params, eos: &eos, allowed: l.allowed() };
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
