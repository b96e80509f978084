//! Typed field access on parsed JSON objects, with errors that name the file and the field.
//!
//! Config files are parsed into `serde_json::Value` first and read field by field here, rather
//! than through `#[derive(Deserialize)]`, because serde's messages name a line and column but
//! not the field, and this crate's errors must name the field.

use crate::error::{Result, RuntimeError};
use serde_json::{Map, Value};

/// Largest config-like JSON file read (config.json, tokenizer_config.json, index): 64 MiB.
pub(crate) const MAX_JSON_BYTES: u64 = 64 << 20;

/// A JSON object plus where it came from, for error messages.
#[derive(Clone, Copy)]
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
    prefix: &'a str,
}

impl<'a> Obj<'a> {
    /// Wraps the top-level value of `file`, which must be an object.
    pub(crate) fn root(v: &'a Value, file: &'a str) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Obj { map, file, prefix: "" }),
            other => Err(RuntimeError::Config {
                file: file.to_string(),
                field: "<root>".into(),
                detail: format!("expected a JSON object, got {}", kind(other)),
            }),
        }
    }

    /// The full path of `field` (e.g. `rope_scaling.factor`).
    pub(crate) fn path(&self, field: &str) -> String {
        if self.prefix.is_empty() { field.to_string() } else { format!("{}.{field}", self.prefix) }
    }

    pub(crate) fn err(&self, field: &str, detail: impl Into<String>) -> RuntimeError {
        RuntimeError::Config { file: self.file.to_string(), field: self.path(field), detail: detail.into() }
    }

    /// The value of `field`; absent and `null` are both `None`.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// Whether the key exists, even with a `null` value.
    pub(crate) fn contains_key(&self, field: &str) -> bool {
        self.map.contains_key(field)
    }

    fn type_err(&self, field: &str, want: &str, got: &Value) -> RuntimeError {
        self.err(field, format!("expected {want}, got {}", short(got)))
    }

    pub(crate) fn opt_u64(&self, field: &str) -> Result<Option<u64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.type_err(field, "a non-negative integer", v)),
        }
    }

    /// A required non-negative integer that fits `usize`.
    pub(crate) fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing (required)"))
    }

    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.opt_u64(field)? {
            None => Ok(None),
            Some(v) => usize::try_from(v).map(Some).map_err(|_| self.err(field, format!("{v} does not fit in usize"))),
        }
    }

    pub(crate) fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(field)?.unwrap_or(default))
    }

    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.type_err(field, "a number", v)),
        }
    }

    pub(crate) fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.type_err(field, "true or false", v)),
        }
    }

    pub(crate) fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        Ok(self.opt_bool(field)?.unwrap_or(default))
    }

    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.type_err(field, "a string", v)),
        }
    }

    /// A nested object (`None` when absent or null).
    pub(crate) fn opt_obj(&self, field: &'a str) -> Result<Option<Obj<'a>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj { map, file: self.file, prefix: field })),
            Some(v) => Err(self.type_err(field, "an object", v)),
        }
    }

    /// An integer or a list of integers (e.g. `eos_token_id`).
    pub(crate) fn opt_u64_list(&self, field: &str) -> Result<Option<Vec<u64>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().ok_or_else(|| self.type_err(field, "a list of non-negative integers", v)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => v.as_u64().map(|x| Some(vec![x])).ok_or_else(|| self.type_err(field, "an integer or a list of integers", v)),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A value for an error message: its kind, and the value itself when short.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() <= 40 { s } else { kind(v).to_string() }
}

/// Reads the bytes of a JSON file of at most [`MAX_JSON_BYTES`] (never more is read).
pub(crate) fn read_json_bytes(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(crate::error::io_err(path, "open"))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON_BYTES + 1).read_to_end(&mut bytes).map_err(crate::error::io_err(path, "read"))?;
    Ok(bytes)
}

/// Parses JSON bytes of at most [`MAX_JSON_BYTES`], naming `origin` on error.
pub(crate) fn parse_json_bytes(origin: &std::path::Path, bytes: &[u8]) -> Result<Value> {
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(crate::error::format_err(origin, format!("larger than the {MAX_JSON_BYTES}-byte limit for JSON files")));
    }
    serde_json::from_slice(bytes).map_err(|e| crate::error::format_err(origin, format!("invalid JSON: {e}")))
}

/// Reads a JSON file of at most [`MAX_JSON_BYTES`] and parses it, naming the file on error.
pub(crate) fn read_json_file(path: &std::path::Path) -> Result<Value> {
    parse_json_bytes(path, &read_json_bytes(path)?)
}

/// Parses JSON like `serde_json::from_slice`, but refuses an object that has a key twice (at
/// any depth): `serde_json::Value` silently keeps the last one.
pub(crate) fn from_slice_unique_keys(bytes: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice::<Unique>(bytes).map(|u| u.0)
}

/// A JSON value whose objects have no repeated key.
struct Unique(Value);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Unique;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::String(v)))
    }
    fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
        Ok(Unique(Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Unique, A::Error> {
        let mut v = Vec::new();
        while let Some(Unique(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Unique(Value::Array(v)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<Unique, A::Error> {
        let mut map = Map::new();
        while let Some((k, Unique(v))) = m.next_entry::<String, Unique>()? {
            if map.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("key `{k}` appears twice")));
            }
            map.insert(k, v);
        }
        Ok(Unique(Value::Object(map)))
    }
}
