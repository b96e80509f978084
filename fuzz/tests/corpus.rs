//! Replays every committed corpus file through its fuzz target (no fuzzing: seconds), under
//! the same capped allocator as the fuzzer. A failure names the file; reproduce it with
//! `scripts/fuzz.sh TARGET 0 fuzz/corpus/TARGET/FILE` or this test.

#[global_allocator]
static ALLOC: dsv3_fuzz::Allocator = dsv3_fuzz::allocator();

use dsv3_fuzz::{TARGETS, corpus_dir};

fn corpus_files(name: &str) -> Vec<std::path::PathBuf> {
    let dir = corpus_dir(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("target `{name}` has no corpus at {}: {e}", dir.display()))
        .map(|e| e.expect("read corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(name: &str) {
    let target = dsv3_fuzz::target(name).expect("a registered target");
    let files = corpus_files(name);
    assert!(!files.is_empty(), "target `{name}`: empty corpus");
    let t = std::time::Instant::now();
    for f in &files {
        let data = std::fs::read(f).expect("read corpus file");
        if std::env::var_os("DSV3_FUZZ_VERBOSE").is_some() {
            eprintln!("{}", f.display());
        }
        let outcome = std::panic::catch_unwind(|| (target.run)(&data));
        assert!(outcome.is_ok(), "target `{name}`: corpus file {} breaks an invariant (message above)", f.display());
    }
    eprintln!("{name}: {} files in {:?}", files.len(), t.elapsed());
    dsv3_fuzz::remove_scratch();
}

#[test]
fn safetensors_corpus() {
    replay("safetensors");
}

#[test]
fn index_corpus() {
    replay("index");
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn tokenizer_corpus() {
    replay("tokenizer");
}

/// Every corpus folder belongs to a target and every target has a test above.
#[test]
fn corpus_folders_match_the_targets() {
    let root = corpus_dir("");
    let mut dirs: Vec<String> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    dirs.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(dirs, names, "fuzz/corpus/ folders and dsv3_fuzz::TARGETS differ");
    let src = include_str!("corpus.rs");
    for n in &names {
        assert!(src.contains(&format!("replay(\"{n}\")")), "target `{n}` has no replay test in fuzz/tests/corpus.rs");
    }
}

#[test]
fn http_corpus() {
    replay("http");
}
