//! Parsing and checking request bodies: `POST /v1/chat/completions` and `/v1/completions`.
//!
//! A body is untrusted: it is parsed from bytes ([`parse`]), every known field is checked for
//! its JSON type and range, and each problem is an [`ApiError`] naming the field. Unknown
//! fields are ignored (clients send extras, as with vLLM); known fields this server does not
//! implement are refused when they would change the answer (`tools`, penalties, ...).

use crate::error::ApiError;
use serde_json::{Map, Value};

/// Which endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages `(role, content)`, for the model's chat template.
    Chat(Vec<(String, String)>),
    /// Text, tokenised with BOS first.
    Text(String),
    /// Token ids, as given.
    Ids(Vec<u32>),
}

/// Most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// Most stop strings, and the longest one in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Most `top_logprobs` (chat) or `logprobs` (completions).
pub const MAX_LOGPROBS: usize = dsv3_runtime::engine::MAX_TOP_LOGPROBS;

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub prompt: Prompt,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    /// `None`: a fresh seed per choice.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: log-probabilities with the `k` most likely tokens.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

/// A JSON object with typed, range-checked accessors whose errors name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The value of `k`, treating `null` as absent.
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn bool(&self, k: &str, default: bool) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| ApiError::wrong_type(k, "a boolean")),
        }
    }

    fn number(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::wrong_type(k, "a number")),
        }
    }

    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_i64().or_else(|| v.as_u64().map(|u| u as i64)).map(Some).ok_or_else(|| ApiError::wrong_type(k, "an integer")),
        }
    }

    /// An integer in `lo..=hi`.
    fn int_in(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.int(k)? {
            Some(v) if v < lo || v > hi => Err(ApiError::invalid(Some(k), format!("`{k}` must be in {lo}..={hi}, got {v}"))),
            v => Ok(v),
        }
    }

    fn str(&self, k: &str) -> Result<Option<&str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| ApiError::wrong_type(k, "a string")),
        }
    }
}

/// Parses and checks a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<ParsedRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| ApiError::invalid(None, "the body must be a JSON object"))?;
    let f = Fields(obj);
    refuse_unsupported(&f, endpoint)?;

    let model = f.str("model")?.map(str::to_string);
    let prompt = match endpoint {
        Endpoint::Chat => Prompt::Chat(messages(f.get("messages"))?),
        Endpoint::Completions => completion_prompt(f.get("prompt"))?,
    };
    let max_tokens = {
        let primary = if endpoint == Endpoint::Chat { "max_completion_tokens" } else { "max_tokens" };
        let v = match f.int(primary)? {
            Some(v) => Some((primary, v)),
            None => f.int("max_tokens")?.map(|v| ("max_tokens", v)),
        };
        match v {
            Some((k, v)) if v < 1 => return Err(ApiError::invalid(Some(k), format!("`{k}` must be >= 1, got {v}"))),
            Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
            None => None,
        }
    };
    let temperature = match f.number("temperature")? {
        Some(t) if !(0.0..=2.0).contains(&t) => {
            return Err(ApiError::invalid(Some("temperature"), format!("`temperature` must be in [0, 2], got {t}")));
        }
        Some(t) => t as f32,
        None => 1.0,
    };
    let top_p = match f.number("top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => return Err(ApiError::invalid(Some("top_p"), format!("`top_p` must be in (0, 1], got {p}"))),
        Some(p) => p as f32,
        None => 1.0,
    };
    let top_k = match f.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k < 0 => return Err(ApiError::invalid(Some("top_k"), format!("`top_k` must be -1, 0 (off) or positive, got {k}"))),
        Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    let n = f.int_in("n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
    let stream = f.bool("stream", false)?;
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            Fields(o).bool("include_usage", false).map_err(|_| ApiError::wrong_type("stream_options.include_usage", "a boolean"))?
        }
        Some(_) => return Err(ApiError::wrong_type("stream_options", "an object")),
    };
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let on = f.bool("logprobs", false)?;
            let top = f.int_in("top_logprobs", 0, MAX_LOGPROBS as i64)?;
            if top.is_some() && !on {
                return Err(ApiError::invalid(Some("top_logprobs"), "`top_logprobs` needs `logprobs: true`"));
            }
            on.then_some(top.unwrap_or(0) as usize)
        }
        Endpoint::Completions => f.int_in("logprobs", 0, MAX_LOGPROBS as i64)?.map(|k| k as usize),
    };
    Ok(ParsedRequest {
        endpoint,
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop: stops(f.get("stop"))?,
        n,
        stream,
        include_usage,
        logprobs,
        ignore_eos: f.bool("ignore_eos", false)?,
    })
}

/// Refuses fields whose values would change the answer in ways this server does not do.
fn refuse_unsupported(f: &Fields<'_>, endpoint: Endpoint) -> Result<(), ApiError> {
    for k in ["presence_penalty", "frequency_penalty", "repetition_penalty"] {
        if let Some(v) = f.number(k)?
            && v != 0.0
            && !(k == "repetition_penalty" && v == 1.0)
        {
            return Err(ApiError::unsupported(k, "only the neutral value is accepted"));
        }
    }
    match f.get("logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(Value::Object(_)) => return Err(ApiError::unsupported("logit_bias", "no biases can be applied")),
        Some(_) => return Err(ApiError::wrong_type("logit_bias", "an object")),
    }
    for k in ["tools", "functions"] {
        match f.get(k) {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(Value::Array(_)) => return Err(ApiError::unsupported(k, "no tool calling")),
            Some(_) => return Err(ApiError::wrong_type(k, "an array")),
        }
    }
    match f.get("tool_choice") {
        None => {}
        Some(Value::String(s)) if s == "none" || s == "auto" => {}
        Some(_) => return Err(ApiError::unsupported("tool_choice", "no tool calling")),
    }
    match f.get("response_format") {
        None => {}
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(Value::Object(_)) => return Err(ApiError::unsupported("response_format", "only {\"type\": \"text\"}")),
        Some(_) => return Err(ApiError::wrong_type("response_format", "an object")),
    }
    if endpoint == Endpoint::Completions {
        if f.bool("echo", false)? {
            return Err(ApiError::unsupported("echo", "the prompt is not echoed"));
        }
        if f.int("best_of")?.is_some_and(|b| b > 1) {
            return Err(ApiError::unsupported("best_of", "use `n`"));
        }
        if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "no insertion"));
        }
    }
    Ok(())
}

/// Chat messages: a non-empty array of `{role, content}`; content a string or text parts.
fn messages(v: Option<&Value>) -> Result<Vec<(String, String)>, ApiError> {
    let list = match v {
        None => return Err(ApiError::invalid(Some("messages"), "`messages` is required")),
        Some(Value::Array(a)) if a.is_empty() => return Err(ApiError::invalid(Some("messages"), "`messages` is empty")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::wrong_type("messages", "an array")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = |k: &str| format!("messages[{i}].{k}");
        let o = m.as_object().ok_or_else(|| ApiError::wrong_type(&format!("messages[{i}]"), "an object"))?;
        let role = match o.get("role") {
            Some(Value::String(r)) if ["system", "developer", "user", "assistant", "tool"].contains(&r.as_str()) => {
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            Some(Value::String(r)) => {
                return Err(ApiError::invalid(Some(&at("role")), format!("unknown role `{r}` (system, developer, user, assistant, tool)")));
            }
            None => return Err(ApiError::invalid(Some(&at("role")), "`role` is required")),
            Some(_) => return Err(ApiError::wrong_type(&at("role"), "a string")),
        };
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => return Err(ApiError::invalid(Some(&at("content")), "`content` is required")),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let here = format!("messages[{i}].content[{j}]");
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        (Some("text"), _) => return Err(ApiError::wrong_type(&format!("{here}.text"), "a string")),
                        (Some(other), _) => {
                            return Err(ApiError::unsupported(&format!("{here}.type"), &format!("content parts of type `{other}`")));
                        }
                        (None, _) => return Err(ApiError::invalid(Some(&here), "a content part needs a `type`")),
                    }
                }
                text
            }
            Some(_) => return Err(ApiError::wrong_type(&at("content"), "a string or an array of text parts")),
        };
        out.push((role, content));
    }
    Ok(out)
}

/// A completion prompt: a string, or token ids; a list of one of either.
fn completion_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let ids = |a: &[Value]| -> Result<Prompt, ApiError> {
        let mut out = Vec::with_capacity(a.len());
        for (i, x) in a.iter().enumerate() {
            let id = x.as_u64().and_then(|u| u32::try_from(u).ok());
            out.push(
                id.ok_or_else(|| ApiError::invalid(Some("prompt"), format!("`prompt[{i}]` is not a token id (an integer in 0..2^32)")))?,
            );
        }
        Ok(Prompt::Ids(out))
    };
    match v {
        None => Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid(Some("prompt"), "`prompt` is empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => ids(a),
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) if !inner.is_empty() => ids(inner),
            _ => Err(ApiError::wrong_type("prompt", "a string, an array of token ids, or a list of one of either")),
        },
        Some(Value::Array(_)) => Err(ApiError::invalid(Some("prompt"), "one prompt per request (send several requests, or use `n`)")),
        Some(_) => Err(ApiError::wrong_type("prompt", "a string or an array of token ids")),
    }
}

/// `stop`: a string or an array of strings.
fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<&Value> = match v {
        None => return Ok(Vec::new()),
        Some(s @ Value::String(_)) => vec![s],
        Some(Value::Array(a)) => a.iter().collect(),
        Some(_) => return Err(ApiError::wrong_type("stop", "a string or an array of strings")),
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(Some("stop"), format!("at most {MAX_STOPS} stop strings")));
    }
    list.into_iter()
        .map(|s| match s {
            Value::String(s) if s.len() > MAX_STOP_BYTES => {
                Err(ApiError::invalid(Some("stop"), format!("a stop string longer than {MAX_STOP_BYTES} bytes")))
            }
            Value::String(s) if s.is_empty() => Err(ApiError::invalid(Some("stop"), "an empty stop string")),
            Value::String(s) => Ok(s.clone()),
            _ => Err(ApiError::wrong_type("stop", "a string or an array of strings")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn defaults_and_fields() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![("user".into(), "hi".into())]));
        assert_eq!((r.temperature, r.top_p, r.top_k, r.n, r.stream, r.max_tokens, r.logprobs), (1.0, 1.0, 0, 1, false, None, None));
        let r = chat(
            r#"{"messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "max_completion_tokens":7,"max_tokens":9,"temperature":0,"top_k":-1,"seed":-3,"stop":"x","n":2,
                "stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":3,"user":"ignored","extra":{"y":1}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![("system".into(), "ab".into())]));
        assert_eq!((r.max_tokens, r.temperature, r.top_k, r.seed, r.n), (Some(7), 0.0, 0, Some((-3i64) as u64), 2));
        assert_eq!((r.stop.clone(), r.stream, r.include_usage, r.logprobs), (vec!["x".to_string()], true, true, Some(3)));
        let c = parse(Endpoint::Completions, br#"{"prompt":[[1,2,3]],"logprobs":2,"max_tokens":4}"#).unwrap();
        assert_eq!((c.prompt, c.logprobs, c.max_tokens), (Prompt::Ids(vec![1, 2, 3]), Some(2), Some(4)));
        let c = parse(Endpoint::Completions, br#"{"prompt":["text"]}"#).unwrap();
        assert_eq!(c.prompt, Prompt::Text("text".into()));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(Endpoint, &str, Option<&str>)] = &[
            (Endpoint::Chat, "{", None),
            (Endpoint::Chat, "[]", None),
            (Endpoint::Chat, r#"{}"#, Some("messages")),
            (Endpoint::Chat, r#"{"messages":"hi"}"#, Some("messages")),
            (Endpoint::Chat, r#"{"messages":[]}"#, Some("messages")),
            (Endpoint::Chat, r#"{"messages":[{"role":"wizard","content":"x"}]}"#, Some("messages[0].role")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user"}]}"#, Some("messages[0].content")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#, Some("messages[0].content[0].type")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, Some("temperature")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"temperature":2.5}"#, Some("temperature")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#, Some("top_p")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, Some("max_tokens")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":1.5}"#, Some("max_completion_tokens")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#, Some("n")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#, Some("stop")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, Some("stream")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#, Some("top_logprobs")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#, Some("top_logprobs")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#, Some("tools")),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":0.5}"#, Some("presence_penalty")),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
                Some("response_format"),
            ),
            (Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"model":5}"#, Some("model")),
            (Endpoint::Completions, r#"{"prompt":["a","b"]}"#, Some("prompt")),
            (Endpoint::Completions, r#"{"prompt":[1,-2]}"#, Some("prompt")),
            (Endpoint::Completions, r#"{"prompt":[1,4294967296]}"#, Some("prompt")),
            (Endpoint::Completions, r#"{"prompt":{"text":"a"}}"#, Some("prompt")),
            (Endpoint::Completions, r#"{"prompt":"a","echo":true}"#, Some("echo")),
            (Endpoint::Completions, r#"{"prompt":"a","logprobs":true}"#, Some("logprobs")),
        ];
        for (e, body, param) in cases {
            let err = parse(*e, body.as_bytes()).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), *param, "{body}: {}", err.message);
        }
    }
}
