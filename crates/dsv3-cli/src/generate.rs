//! `dsv3 generate`: text (or ids) after a prompt, streamed to stdout; stops at EOS. Several
//! prompts (repeat `--prompt` / `--prompt-ids`), `--pp`/`--ep` or `mpirun` run the
//! multi-process job of [`crate::parallel`].

use crate::args::{ModelArgs, OnDevice, WithMtp, load};
use crate::parallel::ParallelArgs;
use dsv3_kernels::Backend;
use dsv3_runtime::generate::{Generation, Request, SamplingParams};
use dsv3_runtime::tokenizer::StreamDecoder;
use dsv3_runtime::{Result, RuntimeError, Tokenizer};
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (needs a tokenizer in the model directory); repeat it for several prompts.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Vec<String>,
    /// Prompt as comma-separated token ids; repeat it for several prompts.
    #[arg(long)]
    pub prompt_ids: Vec<IdList>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the first prompt's sampler (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (per prompt) as the last line(s) of stdout.
    #[arg(long)]
    pub json: bool,
    /// Speculative decoding with the model's MTP module: one draft token per step, verified
    /// by the main model (greedy output is unchanged; sampled output keeps its distribution).
    #[arg(long)]
    pub mtp: bool,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

/// Token ids written `1,2,3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdList(pub Vec<u32>);

impl std::str::FromStr for IdList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',').map(|t| t.trim().parse::<u32>().map_err(|e| format!("`{t}`: {e}"))).collect::<Result<_, _>>().map(IdList)
    }
}

impl GenerateArgs {
    /// The prompts as token ids (text through `tok`).
    pub(crate) fn prompts(&self, tok: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>> {
        if !self.prompt.is_empty() {
            let t = tok.ok_or_else(|| {
                RuntimeError::Request("--prompt (or use --prompt-ids) needs a tokenizer.json in the model directory".into())
            })?;
            return self.prompt.iter().map(|p| t.encode(p, true)).collect();
        }
        if self.prompt_ids.is_empty() {
            return Err(RuntimeError::Request("give --prompt TEXT or --prompt-ids 1,2,3".into()));
        }
        Ok(self.prompt_ids.iter().map(|p| p.0.clone()).collect())
    }

    pub(crate) fn sampling(&self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }
}

impl OnDevice for GenerateArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        if a.parallel.wanted(a.prompt.len() + a.prompt_ids.len()) {
            return crate::parallel::generate(&b, a);
        }
        let l = load(b, &a.model, if a.mtp { WithMtp::Required } else { WithMtp::No })?;
        let prompt = a.prompts(l.tokenizer.as_ref())?.remove(0);
        let mut out = Printer::new(l.tokenizer.as_ref(), l.model.config().vocab_size);
        let eos = l.eos_ids();
        let req = Request { prompt: &prompt, max_tokens: a.max_tokens, sampling: a.sampling(), eos: &eos, allowed: l.allowed() };
        let g = l.generate(&req, |id| out.push(id))?;
        out.finish(&g, a.json)
    }
}

/// Prints a generation: its text as it comes (with a tokenizer), else its ids at the end;
/// then, with `--json`, the summary.
pub(crate) struct Printer<'t> {
    stream: Option<StreamDecoder<'t>>,
    text: String,
}

impl<'t> Printer<'t> {
    pub(crate) fn new(tok: Option<&'t Tokenizer>, vocab: usize) -> Self {
        Self::from_stream(tok.map(|t| t.stream(vocab)))
    }

    pub(crate) fn from_stream(stream: Option<StreamDecoder<'t>>) -> Self {
        Printer { stream, text: String::new() }
    }

    pub(crate) fn push(&mut self, id: u32) -> Result<()> {
        if let Some(s) = self.stream.as_mut() {
            let piece = s.push(id)?;
            self.text.push_str(&piece);
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        }
        Ok(())
    }

    pub(crate) fn finish(mut self, g: &Generation, json: bool) -> Result<()> {
        if let Some(s) = self.stream.as_mut() {
            let rest = s.finish()?;
            self.text.push_str(&rest);
            println!("{rest}");
        } else {
            println!("{}", g.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        }
        if json {
            println!("{}", summary_json(g, self.stream.is_some().then_some(self.text.as_str())));
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
