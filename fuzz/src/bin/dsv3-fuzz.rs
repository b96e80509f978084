//! The libFuzzer driver of every target: `DSV3_FUZZ_TARGET=<name>` picks one (scripts/fuzz.sh
//! sets it), the rest of the command line is libFuzzer's.
#![no_main]

#[global_allocator]
static ALLOC: dsv3_fuzz::Allocator = dsv3_fuzz::allocator();

static RUN: std::sync::OnceLock<fn(&[u8])> = std::sync::OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let run = RUN.get_or_init(|| {
        // libfuzzer-sys aborts on any panic, even one the library catches (it contains the
        // `tokenizers` crate's panics and returns an error). Restore the default hook: a panic
        // that escapes the target still aborts, in libfuzzer-sys's own catch_unwind.
        drop(std::panic::take_hook());
        let name = std::env::var("DSV3_FUZZ_TARGET").unwrap_or_default();
        match dsv3_fuzz::target(&name) {
            Some(t) => t.run,
            None => {
                let names: Vec<_> = dsv3_fuzz::TARGETS.iter().map(|t| t.name).collect();
                eprintln!("set DSV3_FUZZ_TARGET to one of {names:?} (got {name:?})");
                std::process::exit(2);
            }
        }
    });
    run(data);
});
