//! The tokenizer: HF `tokenizer.json` through the `tokenizers` crate (pure-Rust regex), BOS/EOS
//! and the chat template from `tokenizer_config.json`, and a streaming detokeniser.
//!
//! * [`Tokenizer::encode`] never lets the file's post-processor add tokens; `add_bos` decides.
//! * [`Tokenizer::decode`] and [`StreamDecoder`] keep special tokens (as HF's
//!   `decode(skip_special_tokens=False)`), and map ids in the gap between the tokenizer's
//!   vocabulary and the model's `vocab_size` to nothing; ids `>= vocab_size` are an error.
//! * [`StreamDecoder`] never emits broken UTF-8: for byte-level BPE (DeepSeek) it works on the
//!   bytes of each token, emits every complete character, holds back an incomplete trailing
//!   sequence (at most 3 bytes) and replaces invalid bytes with U+FFFD exactly as the full
//!   decode does, so the concatenated stream equals [`Tokenizer::decode`] of all ids.
//!
//! A model directory without `tokenizer.json` has no tokenizer ([`Tokenizer::from_dir`] returns
//! `None`); the model then runs from token ids.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::{Result, RuntimeError, io_err};
use crate::json::{Obj, parse_json_bytes, read_json_bytes};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::decoders::DecoderWrapper;

/// Largest `tokenizer.json` read (the DeepSeek one is ~8 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Highest id the tokenizer knows + 1.
    token_count: usize,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    template: Option<ChatTemplate>,
    /// Bytes of each id for byte-level decoders (`None` for other decoders).
    id_bytes: Option<Vec<Option<Box<[u8]>>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("path", &self.path).field("token_count", &self.token_count).finish_non_exhaustive()
    }
}

fn tok_err(file: &Path, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Tokenizer { file: file.to_path_buf(), detail: detail.into() }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json` if present); `None` when the
    /// directory has no `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Ok(None);
        }
        let tc = dir.join("tokenizer_config.json");
        Ok(Some(Self::from_files(&tj, tc.exists().then_some(tc.as_path()))?))
    }

    /// Loads a `tokenizer.json` and optionally its `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
        let f = std::fs::File::open(tokenizer_json).map_err(io_err(tokenizer_json, "open"))?;
        let mut bytes = Vec::new();
        f.take(MAX_TOKENIZER_BYTES + 1).read_to_end(&mut bytes).map_err(io_err(tokenizer_json, "read"))?;
        let config = match tokenizer_config {
            Some(p) => Some((p, read_json_bytes(p)?)),
            None => None,
        };
        Self::from_bytes(tokenizer_json, &bytes, config.as_ref().map(|(p, b)| (*p, b.as_slice())))
    }

    /// Loads a tokenizer from the bytes of its `tokenizer.json` and, optionally, of its
    /// `tokenizer_config.json` (each paired with the path that names it in errors): what
    /// [`Tokenizer::from_files`] does after reading the files.
    pub fn from_bytes(tokenizer_json: &Path, bytes: &[u8], tokenizer_config: Option<(&Path, &[u8])>) -> Result<Tokenizer> {
        if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
            return Err(tok_err(tokenizer_json, format!("larger than the {MAX_TOKENIZER_BYTES}-byte limit")));
        }
        let inner = contain(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|e| tok_err(tokenizer_json, format!("cannot load: {e}")))?
            .map_err(|e| tok_err(tokenizer_json, format!("cannot load: {e}")))?;
        let token_count = inner.get_vocab(true).values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if token_count == 0 {
            return Err(tok_err(tokenizer_json, "has an empty vocabulary"));
        }
        let mut t =
            Tokenizer { inner, path: tokenizer_json.to_path_buf(), token_count, bos: None, eos: None, template: None, id_bytes: None };
        if matches!(t.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            t.id_bytes = Some(t.byte_table());
        }
        if let Some((path, bytes)) = tokenizer_config {
            t.read_config(path, bytes)?;
        }
        Ok(t)
    }

    fn read_config(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let v = parse_json_bytes(path, bytes)?;
        let file = path.display().to_string();
        let o = Obj::root(&v, &file)?;
        for (field, slot) in [("bos_token", &mut self.bos), ("eos_token", &mut self.eos)] {
            let text = match o.get(field) {
                None => continue,
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(m)) => match m.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(o.err(&format!("{field}.content"), "missing or not a string")),
                },
                Some(other) => {
                    return Err(o.err(field, format!("expected a string or an AddedToken object, got {}", crate::json::short(other))));
                }
            };
            let id = self.inner.token_to_id(&text).ok_or_else(|| o.err(field, format!("\"{text}\" is not a token of tokenizer.json")))?;
            *slot = Some((id, text));
        }
        self.template = match o.get("chat_template") {
            None => None,
            Some(Value::String(s)) => Some(ChatTemplate::new(s)?),
            Some(Value::Array(list)) => {
                // Newer HF format: [{"name": "default", "template": "..."}, ...].
                let pick = list
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|e| e.get("template"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| o.err("chat_template", "a list without a {name, template} entry"))?;
                Some(ChatTemplate::new(pick)?)
            }
            Some(other) => return Err(o.err("chat_template", format!("expected a string, got {}", crate::json::short(other)))),
        };
        Ok(())
    }

    /// Fills BOS / EOS the tokenizer config did not name from `config.json`'s ids.
    pub fn with_model_config(mut self, cfg: &ModelConfig) -> Self {
        let lookup = |id: u32| self.inner.id_to_token(id).map(|t| (id, t));
        if self.bos.is_none() {
            self.bos = cfg.bos_token_id.and_then(lookup);
        }
        if self.eos.is_none() {
            self.eos = cfg.eos_token_ids.first().copied().and_then(lookup);
        }
        self
    }

    /// The bytes of every id under a byte-level decoder, as `decode` would produce them:
    /// a token whose characters are all in the GPT-2 byte map becomes those bytes, any other
    /// token (special and added tokens) its UTF-8 text.
    fn byte_table(&self) -> Vec<Option<Box<[u8]>>> {
        let map = unicode_to_byte();
        (0..self.token_count as u32)
            .map(|id| {
                self.inner.id_to_token(id).map(|tok| {
                    let mapped: Option<Vec<u8>> = tok.chars().map(|c| map.get(&c).copied()).collect();
                    mapped.unwrap_or_else(|| tok.as_bytes().to_vec()).into_boxed_slice()
                })
            })
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether the decoder is byte-level (streaming then works on exact bytes).
    pub fn is_byte_level(&self) -> bool {
        self.id_bytes.is_some()
    }
    /// Highest token id + 1 (128815 for DeepSeek-V3; the model's vocab_size is larger).
    pub fn token_count(&self) -> usize {
        self.token_count
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.0)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.0)
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|b| b.1.as_str())
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.1.as_str())
    }
    /// The bytes token `id` stands for: its exact bytes under a byte-level decoder (possibly a
    /// part of a UTF-8 character), its decoded text otherwise; `None` for ids the tokenizer
    /// does not know.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.id_bytes {
            Some(table) => table.get(id as usize)?.as_ref().map(|b| b.to_vec()),
            None if (id as usize) < self.token_count => self.inner.decode(&[id], false).ok().map(String::into_bytes),
            None => None,
        }
    }

    /// The id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; BOS first when `add_bos` (an error if there is no BOS token).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| tok_err(&self.path, format!("encode failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_bos {
            ids.push(self.bos_id().ok_or_else(|| tok_err(&self.path, "add_bos asked for, but no bos_token is known"))?);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` (special tokens kept); ids in `token_count..vocab_size` decode to nothing.
    pub fn decode(&self, ids: &[u32], vocab_size: usize) -> Result<String> {
        let known: Vec<u32> = self.check_ids(ids, vocab_size)?.filter(|&id| (id as usize) < self.token_count).collect();
        self.inner.decode(&known, false).map_err(|e| tok_err(&self.path, format!("decode failed: {e}")))
    }

    fn check_ids<'a>(&self, ids: &'a [u32], vocab_size: usize) -> Result<impl Iterator<Item = u32> + 'a> {
        let limit = vocab_size.max(self.token_count);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= limit) {
            return Err(RuntimeError::TokenId { id: id as u64, vocab_size: limit });
        }
        Ok(ids.iter().copied())
    }

    /// A streaming detokeniser for a model of `vocab_size` ids.
    pub fn stream(&self, vocab_size: usize) -> StreamDecoder<'_> {
        StreamDecoder::new(TokRef::Borrowed(self), vocab_size)
    }

    /// [`Tokenizer::stream`] holding a share of the tokenizer instead of a borrow, for state
    /// that outlives the caller's scope (the serving engine keeps one per sequence).
    pub fn stream_shared(self: &Arc<Self>, vocab_size: usize) -> StreamDecoder<'static> {
        StreamDecoder::new(TokRef::Shared(self.clone()), vocab_size)
    }

    /// The chat template of `tokenizer_config.json`, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The chat template, to change its limits ([`ChatTemplate::set_fuel`]).
    pub fn chat_template_mut(&mut self) -> Option<&mut ChatTemplate> {
        self.template.as_mut()
    }

    /// Renders the chat template with `bos_token` / `eos_token` from the tokenizer config.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| tok_err(&self.path, "tokenizer_config.json has no chat_template"))?;
        let messages = serde_json::to_value(messages).map_err(|e| RuntimeError::Template { detail: e.to_string() })?;
        t.render(&messages, add_generation_prompt, self.bos_token().unwrap_or(""), self.eos_token().unwrap_or(""))
    }
}

/// Runs `f`, turning a panic inside the `tokenizers` library into an error: some malformed
/// `tokenizer.json` files make it panic instead of failing (a broken `decoder` object:
/// `expect("Helper")` in its deserializer; found by fuzzing).
fn contain<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        format!("the tokenizers library panicked: {}", msg.unwrap_or_else(|| "(no message)".into()))
    })
}

/// GPT-2's byte-level map, reversed: the printable stand-in character of each byte → the byte.
fn unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8))).collect()
}

/// The tokenizer a [`StreamDecoder`] reads: borrowed, or shared.
enum TokRef<'a> {
    Borrowed(&'a Tokenizer),
    Shared(Arc<Tokenizer>),
}

impl std::ops::Deref for TokRef<'_> {
    type Target = Tokenizer;
    fn deref(&self) -> &Tokenizer {
        match self {
            TokRef::Borrowed(t) => t,
            TokRef::Shared(t) => t,
        }
    }
}

/// Turns ids into text piece by piece without ever emitting a broken UTF-8 sequence.
pub struct StreamDecoder<'a> {
    tok: TokRef<'a>,
    vocab_size: usize,
    /// Byte-level: bytes not emitted yet (an incomplete trailing character).
    pending: Vec<u8>,
    /// Other decoders: the decode window (a few already emitted ids as context, then the ids
    /// whose text may still change) and the length of the window's text already emitted.
    /// Decoding a window rather than every id so far keeps a stream linear in its length
    /// (the whole-prefix decode was quadratic: a 2 600-id stream took seconds; found by
    /// fuzzing), as vLLM's incremental detokeniser does.
    ids: Vec<u32>,
    emitted: usize,
}

/// Ids kept as context when the decode window moves on.
const WINDOW_CONTEXT: usize = 4;
/// The window moves on once it holds more ids than this and its text is final.
const WINDOW_MAX: usize = 16;
/// A window this long emits its text even with a trailing U+FFFD (which then is final).
const WINDOW_HOLD_MAX: usize = 64;

impl std::fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder").field("vocab_size", &self.vocab_size).field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl<'a> StreamDecoder<'a> {
    fn new(tok: TokRef<'a>, vocab_size: usize) -> Self {
        let vocab_size = vocab_size.max(tok.token_count);
        StreamDecoder { tok, vocab_size, pending: Vec::new(), ids: Vec::new(), emitted: 0 }
    }

    /// Adds one id; returns the text it completes (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if id as usize >= self.vocab_size {
            return Err(RuntimeError::TokenId { id: id as u64, vocab_size: self.vocab_size });
        }
        match &self.tok.id_bytes {
            Some(table) => {
                if let Some(Some(b)) = table.get(id as usize) {
                    self.pending.extend_from_slice(b);
                }
                Ok(drain_utf8(&mut self.pending, false))
            }
            None => {
                if (id as usize) < self.tok.token_count {
                    self.ids.push(id);
                }
                let text = self.tok.decode(&self.ids, self.vocab_size)?;
                // Hold back text that may still change: a trailing replacement character.
                let stable = if self.ids.len() <= WINDOW_HOLD_MAX { text.trim_end_matches('\u{FFFD}').len() } else { text.len() };
                if stable > self.emitted && text.is_char_boundary(self.emitted) {
                    let out = text[self.emitted..stable].to_string();
                    self.emitted = stable;
                    if stable == text.len() && self.ids.len() > WINDOW_MAX {
                        self.ids.drain(..self.ids.len() - WINDOW_CONTEXT);
                        self.emitted = self.tok.decode(&self.ids, self.vocab_size)?.len();
                    }
                    Ok(out)
                } else {
                    Ok(String::new())
                }
            }
        }
    }

    /// Ends the stream: emits what is held back (an incomplete character becomes U+FFFD, as
    /// in the full decode).
    pub fn finish(&mut self) -> Result<String> {
        match &self.tok.id_bytes {
            Some(_) => Ok(drain_utf8(&mut self.pending, true)),
            None => {
                let text = self.tok.decode(&self.ids, self.vocab_size)?;
                let out = text.get(self.emitted..).unwrap_or("").to_string();
                self.emitted = text.len();
                Ok(out)
            }
        }
    }
}

/// Removes and returns the decodable prefix of `buf`, invalid sequences as U+FFFD (exactly
/// `String::from_utf8_lossy`'s rule); an incomplete final sequence stays unless `flush`.
fn drain_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut pos = 0;
    loop {
        match std::str::from_utf8(&buf[pos..]) {
            Ok(s) => {
                out.push_str(s);
                pos = buf.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[pos..pos + valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        pos += valid + n;
                    }
                    None => {
                        pos += valid;
                        if flush {
                            out.push('\u{FFFD}');
                            pos = buf.len();
                        }
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..pos);
    out
}

#[cfg(test)]
mod tests {
    use super::drain_utf8;

    /// Feeding bytes one at a time gives exactly `String::from_utf8_lossy` of the whole.
    #[test]
    fn incremental_drain_equals_lossy_decode() {
        let cases: &[&[u8]] = &[
            "héllo 😀 日本".as_bytes(),
            &[0xE4, 0xB8, 0x41],             // truncated 3-byte sequence, then 'A'
            &[0xF0, 0x9F, 0x98],             // incomplete at the end
            &[0x80, 0xC0, 0xAF, 0xED, 0xA0], // stray continuation, overlong, surrogate start
            &[0xF4, 0x90, 0x80, 0x80, 0x61], // above U+10FFFF
            &[0xE2, 0x82, 0xAC, 0xE2, 0x82],
        ];
        for bytes in cases {
            for step in 1..=3 {
                let mut buf = Vec::new();
                let mut out = String::new();
                for chunk in bytes.chunks(step) {
                    buf.extend_from_slice(chunk);
                    out.push_str(&drain_utf8(&mut buf, false));
                }
                out.push_str(&drain_utf8(&mut buf, true));
                assert_eq!(out, String::from_utf8_lossy(bytes), "{bytes:?} in steps of {step}");
            }
        }
    }

    #[test]
    fn incomplete_character_is_held_back() {
        let mut buf = vec![b'a', 0xE6, 0xAF];
        assert_eq!(drain_utf8(&mut buf, false), "a");
        assert_eq!(buf, [0xE6, 0xAF]);
        buf.push(0x95);
        assert_eq!(drain_utf8(&mut buf, false), "毕");
        assert!(buf.is_empty());
    }
}
