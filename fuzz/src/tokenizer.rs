//! `tokenizer.json` + `tokenizer_config.json` + the chat template. An input is up to three
//! parts joined by [`crate::SEP`]: the `tokenizer.json` bytes, the `tokenizer_config.json`
//! bytes (empty: none), and a text — encoded, its bytes also read as token ids, and, when it
//! is a JSON list of messages, rendered by the chat template (else rendered as one user
//! message).
//!
//! Invariants beyond "typed error or value": for a byte-level tokenizer (DeepSeek's) the
//! streaming detokeniser's pieces concatenate to exactly the full decode, for any ids; the
//! template's render is bounded by its fuel and output limits.

use dsv3_runtime::Tokenizer;
use serde_json::{Value, json};
use std::path::Path;

/// Instruction budget of one render while fuzzing (the library's default is 50 M; a looping
/// template then costs a second per run, which would stall the search).
const FUZZ_FUEL: u64 = 1_000_000;

pub fn run(data: &[u8]) {
    let parts = crate::split_parts(data);
    let config = parts.get(1).filter(|c| !c.is_empty()).map(|c| (Path::new("tokenizer_config.json"), *c));
    let mut tok = match Tokenizer::from_bytes(Path::new("tokenizer.json"), parts[0], config) {
        Ok(t) => t,
        Err(e) => return crate::typed_error(e),
    };
    if let Some(t) = tok.chat_template_mut() {
        t.set_fuel(FUZZ_FUEL);
    }
    let text_bytes = parts.get(2).copied().unwrap_or_default();
    let text = String::from_utf8_lossy(text_bytes);
    match tok.encode(&text, false) {
        Ok(ids) => decode_consistently(&tok, &ids),
        Err(e) => crate::typed_error(e),
    }
    // The text's bytes as ids, a few past the tokenizer's own range included.
    let span = tok.token_count() as u32 + 4;
    let ids: Vec<u32> = text_bytes.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).map(|v| v % span).collect();
    decode_consistently(&tok, &ids);
    render(&tok, text_bytes, &text);
}

/// Full decode and streaming decode of `ids` (model vocabulary = token count + 2, so the
/// last ids are out of range and must be a typed error in both).
fn decode_consistently(tok: &Tokenizer, ids: &[u32]) {
    let vocab = tok.token_count() + 2;
    let full = tok.decode(ids, vocab);
    let mut stream = tok.stream(vocab);
    let mut pieces = String::new();
    let mut streamed = Ok(());
    for &id in ids {
        match stream.push(id) {
            Ok(p) => pieces.push_str(&p),
            Err(e) => {
                streamed = Err(e);
                break;
            }
        }
    }
    if streamed.is_ok() {
        match stream.finish() {
            Ok(p) => pieces.push_str(&p),
            Err(e) => streamed = Err(e),
        }
    }
    match (full, streamed) {
        (Ok(full), Ok(())) if tok.is_byte_level() => assert_eq!(pieces, full, "streamed pieces differ from the full decode of {ids:?}"),
        (Ok(_), Ok(())) => {}
        (Err(a), Err(b)) => {
            crate::typed_error(a);
            crate::typed_error(b);
        }
        (Ok(_), Err(e)) | (Err(e), Ok(())) if !tok.is_byte_level() => crate::typed_error(e),
        (full, streamed) => panic!("decode and stream disagree on failure for {ids:?}: {full:?} vs {streamed:?}"),
    }
}

/// Renders the chat template, if any, with the text as a list of messages or as one message.
fn render(tok: &Tokenizer, text_bytes: &[u8], text: &str) {
    let Some(template) = tok.chat_template() else { return };
    let messages = match serde_json::from_slice::<Value>(text_bytes) {
        Ok(v @ Value::Array(_)) => v,
        _ => {
            json!([{"role": "system", "content": "s"}, {"role": "user", "content": text}, {"role": "assistant", "content": "<think>r</think>a"}])
        }
    };
    for add_generation_prompt in [false, true] {
        match template.render(&messages, add_generation_prompt, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or("")) {
            Ok(s) => assert!(s.len() <= dsv3_runtime::chat::MAX_OUTPUT_BYTES),
            Err(e) => crate::typed_error(e),
        }
    }
}
