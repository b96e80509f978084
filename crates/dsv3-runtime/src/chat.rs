//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json`, rendered with
//! `minijinja` the way HF's `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, Python string methods such as `.split`), inside limits:
//! the template text at most [`MAX_TEMPLATE_BYTES`], a fuel budget of [`FUEL`] instructions per
//! render, and an output of at most [`MAX_OUTPUT_BYTES`]. Every failure is a
//! [`RuntimeError::Template`].

use crate::error::{Result, RuntimeError};
use minijinja::{Environment, Error, ErrorKind, Value as JValue, context};
use serde::Serialize;

/// Largest template accepted.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Instructions one render may execute.
pub const FUEL: u64 = 50_000_000;
/// Largest rendered prompt.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// One chat message (`role`: system, user, assistant, tool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

fn tmpl_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Template { detail: e.to_string() }
}

impl ChatTemplate {
    /// Compiles `source` (syntax errors are reported here, not at render time).
    pub fn new(source: &str) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(tmpl_err(format!("{} bytes, larger than the {MAX_TEMPLATE_BYTES}-byte limit", source.len())));
        }
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(tmpl_err)?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
        });
        env.add_template_owned("chat_template", source.to_string()).map_err(tmpl_err)?;
        Ok(ChatTemplate { env })
    }

    /// Sets the instruction budget of each render ([`FUEL`] by default); the fuzz targets
    /// lower it so that a looping template costs milliseconds, not seconds.
    pub fn set_fuel(&mut self, fuel: u64) {
        self.env.set_fuel(Some(fuel));
    }

    /// Renders `messages` (a JSON list of message objects, tool calls included) with
    /// `add_generation_prompt`, `bos_token` and `eos_token` in the context.
    pub fn render(&self, messages: &serde_json::Value, add_generation_prompt: bool, bos_token: &str, eos_token: &str) -> Result<String> {
        let t = self.env.get_template("chat_template").map_err(tmpl_err)?;
        let ctx = context! {
            messages => JValue::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        let mut out = Limited { buf: Vec::new() };
        t.render_captured_to(ctx, &mut out).map_err(|e| {
            if out.buf.len() >= MAX_OUTPUT_BYTES {
                tmpl_err(format!("output exceeds the {MAX_OUTPUT_BYTES}-byte limit"))
            } else {
                tmpl_err(e)
            }
        })?;
        String::from_utf8(out.buf).map_err(tmpl_err)
    }
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Limited {
    buf: Vec<u8>,
}

impl std::io::Write for Limited {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_OUTPUT_BYTES {
            self.buf.resize(MAX_OUTPUT_BYTES, 0);
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
