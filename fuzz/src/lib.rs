//! Coverage-guided fuzz targets for every file dsv3 reads from a model directory and for the
//! bodies of the server's requests, and the helpers they share. Each target is a function `fn(&[u8])` that feeds the bytes to the
//! library's own parsing entry points (bytes in, typed result out) and **panics when an
//! invariant breaks**:
//!
//! * no panic and no abort inside the library: every input gives a typed error or a value;
//! * no unbounded allocation: the process runs under [`Allocator`], which refuses to hold
//!   more than [`MEMORY_LIMIT`] bytes at once, so an allocation sized from a declared length
//!   aborts the run instead of slowly exhausting the machine;
//! * no read outside the file: every accepted tensor range lies inside the bytes given;
//! * what the library accepts is consistent (round trips, agreement with the reference
//!   `safetensors` crate, streaming decode = full decode; see each target).
//!
//! The same functions run two ways: under libFuzzer (`scripts/fuzz.sh TARGET MINUTES`, the
//! `dsv3-fuzz` binary built with coverage instrumentation) and as a plain test that replays
//! every file of `fuzz/corpus/<target>/` (`tests/corpus.rs`, part of `scripts/test.sh`).
//!
//! Adding a target: one module here with `pub fn run(data: &[u8])`, one line in [`TARGETS`],
//! and a seed directory `fuzz/corpus/<name>/`.
#![forbid(unsafe_code)]

pub mod config;
pub mod http;
pub mod index;
pub mod safetensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One fuzz target.
pub struct Target {
    /// Its name: the argument of `scripts/fuzz.sh` and the corpus folder.
    pub name: &'static str,
    /// Runs one input; panics when an invariant breaks.
    pub run: fn(&[u8]),
    /// Largest input the fuzzer generates (`-max_len`).
    pub max_len: usize,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "safetensors", run: safetensors::run, max_len: 16 << 10 },
    Target { name: "index", run: index::run, max_len: 8 << 10 },
    Target { name: "config", run: config::run, max_len: 8 << 10 },
    Target { name: "tokenizer", run: tokenizer::run, max_len: 16 << 10 },
    Target { name: "http", run: http::run, max_len: 8 << 10 },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The committed corpus of a target.
pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name)
}

/// Live heap memory a fuzz or replay process may hold. Every input is at most a few KiB, so a
/// legitimate parse stays far below this; a length read from the input and trusted
/// (`Vec::with_capacity(declared)`) goes over and aborts with "memory allocation failed".
pub const MEMORY_LIMIT: usize = 512 << 20;

/// The capped allocator: `#[global_allocator] static A: Allocator = allocator();`.
pub type Allocator = cap::Cap<std::alloc::System>;

/// [`Allocator`] with [`MEMORY_LIMIT`].
pub const fn allocator() -> Allocator {
    cap::Cap::new(std::alloc::System, MEMORY_LIMIT)
}

/// Separates the parts of a multi-file input (the tokenizer target's `tokenizer.json`,
/// `tokenizer_config.json` and text). JSON never holds a raw NUL byte, so seeds made of
/// valid files split exactly where they were joined.
pub const SEP: &[u8] = b"\n\x00\x00\n";

/// The parts of `data` between [`SEP`]s (always at least one).
pub fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// `parts` joined by [`SEP`] (how multi-file seeds are written).
pub fn join_parts(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

/// A scratch directory of this process (created empty on first use), for the targets that go
/// through real files; [`remove_scratch`] deletes it.
pub fn scratch(sub: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("dsv3-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    });
    let d = root.join(sub);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create the scratch directory {}: {e}", d.display()));
    d
}

/// Deletes this process's scratch directory.
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("dsv3-fuzz-{}", std::process::id())));
}

/// Renders a library error (its message must be printable) and drops it; prints it when
/// `DSV3_FUZZ_VERBOSE` is set (to see what a corpus file exercises).
pub fn typed_error(e: dsv3_runtime::RuntimeError) {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    let msg = e.to_string();
    assert!(!msg.is_empty(), "an error with an empty message: {e:?}");
    if *VERBOSE.get_or_init(|| std::env::var_os("DSV3_FUZZ_VERBOSE").is_some()) {
        eprintln!("  typed error: {msg}");
    }
}
