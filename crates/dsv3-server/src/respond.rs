//! The answer to a completion request: each choice's state as engine events arrive, and the
//! JSON OpenAI's clients read (whole responses and stream chunks of both endpoints).

use crate::reasoning::{ReasoningMode, Splitter};
use crate::request::Endpoint;
use dsv3_runtime::Tokenizer;
use dsv3_runtime::engine::{FinishReason, TokenLogprob, Usage};
use serde_json::{Value, json};
use std::sync::Arc;

/// What is fixed for one response: ids and names in every chunk, how tokens print.
#[derive(Debug, Clone)]
pub struct Meta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tok: Option<Arc<Tokenizer>>,
    pub prompt_tokens: usize,
}

impl Meta {
    /// A token as text for logprobs (its bytes, lossily; `token_id:N` without a tokenizer).
    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        match self.tok.as_ref().and_then(|t| t.token_bytes(id)) {
            Some(b) => (String::from_utf8_lossy(&b).into_owned(), b),
            None => {
                let s = format!("token_id:{id}");
                let b = s.clone().into_bytes();
                (s, b)
            }
        }
    }

    /// Chat's `logprobs.content` entry of one token.
    fn chat_logprob(&self, lp: &TokenLogprob) -> Value {
        let (token, bytes) = self.token_text(lp.id);
        let top: Vec<Value> = lp
            .top
            .iter()
            .map(|&(id, l)| {
                let (t, b) = self.token_text(id);
                json!({"token": t, "logprob": l, "bytes": b})
            })
            .collect();
        json!({"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
    }

    /// Completions' `logprobs` object of a run of tokens (`offset`: text offset of the first).
    fn completion_logprobs(&self, lps: &[TokenLogprob], mut offset: usize) -> Value {
        let (mut tokens, mut values, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for lp in lps {
            let (t, _) = self.token_text(lp.id);
            offsets.push(offset);
            offset += t.len();
            tokens.push(t);
            values.push(lp.logprob);
            let top: serde_json::Map<String, Value> = lp.top.iter().map(|&(id, l)| (self.token_text(id).0, json!(l))).collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
    }

    /// The `usage` object over all choices (the prompt counted once).
    pub fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// One stream chunk with `choices`.
    pub fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": choices})
    }

    /// The last stream chunk with `usage` and no choices (`stream_options.include_usage`).
    pub fn usage_chunk(&self, completion_tokens: usize) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": self.usage(completion_tokens)})
    }
}

/// One choice's state.
#[derive(Debug)]
pub struct Choice {
    pub index: usize,
    splitter: Option<Splitter>,
    content: String,
    reasoning: String,
    logprobs: Vec<TokenLogprob>,
    /// Generated ids (sent as `token_ids` when the model has no tokenizer, so id-only models
    /// can be served).
    ids: Vec<u32>,
    pub tokens: usize,
    pub finish: Option<(FinishReason, Usage, Option<String>)>,
    /// Whether the stream has sent this choice's opening chunk (the assistant role).
    opened: bool,
}

/// The `finish_reason` a client sees.
pub fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled | FinishReason::Timeout | FinishReason::Error => "abort",
    }
}

impl Choice {
    /// A chat choice splits `<think>` blocks (per `mode` and the rendered prompt's tail).
    pub fn new(index: usize, endpoint: Endpoint, mode: ReasoningMode, prompt_tail: &str) -> Self {
        let splitter = (endpoint == Endpoint::Chat).then(|| Splitter::new(mode, prompt_tail));
        Choice {
            index,
            splitter,
            content: String::new(),
            reasoning: String::new(),
            logprobs: Vec::new(),
            ids: Vec::new(),
            tokens: 0,
            finish: None,
            opened: false,
        }
    }

    /// Routes a text piece; returns `(reasoning, content)` it adds.
    fn route(&mut self, text: &str, last: bool) -> (String, String) {
        match self.splitter.as_mut() {
            Some(s) => {
                let mut p = s.push(text);
                if last {
                    let f = s.finish();
                    p.reasoning.push_str(&f.reasoning);
                    p.content.push_str(&f.content);
                }
                (p.reasoning, p.content)
            }
            None => (String::new(), text.to_string()),
        }
    }

    /// A generated token: its text and log-probability; returns the stream chunk's choice
    /// entry (`None` when there is nothing to send yet).
    pub fn token(&mut self, meta: &Meta, id: u32, text: &str, lp: Option<TokenLogprob>) -> Option<Value> {
        self.tokens += 1;
        self.ids.push(id);
        let (r, c) = self.route(text, false);
        let ids = if meta.tok.is_none() { vec![id] } else { Vec::new() };
        self.piece(meta, r, c, lp.into_iter().collect(), ids, None)
    }

    /// The end: the rest of the text and the reason; returns the closing chunk's entry.
    pub fn finished(&mut self, meta: &Meta, text: &str, reason: FinishReason, usage: Usage, error: Option<String>) -> Value {
        let (r, c) = self.route(text, true);
        self.finish = Some((reason, usage, error));
        self.piece(meta, r, c, Vec::new(), Vec::new(), Some(finish_name(reason))).unwrap_or(Value::Null)
    }

    fn piece(
        &mut self,
        meta: &Meta,
        reasoning: String,
        content: String,
        lps: Vec<TokenLogprob>,
        ids: Vec<u32>,
        finish: Option<&str>,
    ) -> Option<Value> {
        let offset = self.content.len();
        self.reasoning.push_str(&reasoning);
        self.content.push_str(&content);
        self.logprobs.extend(lps.iter().cloned());
        if reasoning.is_empty() && content.is_empty() && lps.is_empty() && ids.is_empty() && finish.is_none() {
            return None;
        }
        Some(match meta.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if !self.opened {
                    delta.insert("role".into(), json!("assistant"));
                    self.opened = true;
                }
                if !reasoning.is_empty() {
                    delta.insert("reasoning_content".into(), json!(reasoning));
                }
                if !content.is_empty() || delta.contains_key("role") {
                    delta.insert("content".into(), json!(content));
                }
                let logprobs = if lps.is_empty() {
                    Value::Null
                } else {
                    json!({"content": lps.iter().map(|l| meta.chat_logprob(l)).collect::<Vec<_>>()})
                };
                let mut v = json!({"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
                if !ids.is_empty() {
                    v["token_ids"] = json!(ids);
                }
                v
            }
            Endpoint::Completions => {
                let logprobs = if lps.is_empty() { Value::Null } else { meta.completion_logprobs(&lps, offset) };
                let mut v = json!({"index": self.index, "text": content, "logprobs": logprobs, "finish_reason": finish});
                if !ids.is_empty() {
                    v["token_ids"] = json!(ids);
                }
                v
            }
        })
    }

    /// The whole choice of a non-streamed response.
    pub fn whole(&self, meta: &Meta, with_logprobs: bool) -> Value {
        let finish = self.finish.as_ref().map(|f| finish_name(f.0));
        let logprobs = match (with_logprobs, meta.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Chat) => json!({"content": self.logprobs.iter().map(|l| meta.chat_logprob(l)).collect::<Vec<_>>()}),
            (true, Endpoint::Completions) => meta.completion_logprobs(&self.logprobs, 0),
        };
        let mut v = match meta.endpoint {
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": self.content});
                if self.splitter.as_ref().is_some_and(|s| s.may_reason()) || !self.reasoning.is_empty() {
                    message["reasoning_content"] = json!(self.reasoning);
                }
                json!({"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => json!({"index": self.index, "text": self.content, "logprobs": logprobs, "finish_reason": finish}),
        };
        if meta.tok.is_none() {
            v["token_ids"] = json!(self.ids);
        }
        v
    }
}

/// The non-streamed response of all choices.
pub fn whole_response(meta: &Meta, choices: &[Choice], with_logprobs: bool) -> Value {
    let tokens: usize = choices.iter().map(|c| c.tokens).sum();
    json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "choices": choices.iter().map(|c| c.whole(meta, with_logprobs)).collect::<Vec<_>>(),
        "usage": meta.usage(tokens),
    })
}
