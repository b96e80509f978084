//! `dsv3 chat`: an interactive chat with the model's chat template (`/clear`, `/exit`).

use crate::args::{ModelArgs, OnDevice, WithMtp, load};
use dsv3_kernels::Backend;
use dsv3_runtime::chat::ChatMessage;
use dsv3_runtime::generate::{Request, SamplingParams};
use dsv3_runtime::{Result, RuntimeError};
use std::io::{BufRead, Write};

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Speculative decoding with the model's MTP module (as `generate --mtp`).
    #[arg(long)]
    pub mtp: bool,
}

impl OnDevice for ChatArgs {
    fn run<B: Backend + 'static>(self, b: B) -> Result<()> {
        let a = self;
        let l = load(b, &a.model, if a.mtp { WithMtp::Required } else { WithMtp::No })?;
        let tok = l.tokenizer("chat")?;
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
            let eos = l.eos_ids();
            let req = Request { prompt: &prompt, max_tokens: a.max_tokens, sampling: params, eos: &eos, allowed: l.allowed() };
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
}
