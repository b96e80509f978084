//! The `dsv3` program as scripts use it: exit codes (0 success, 1 a typed error printed as
//! `error: ...` on stderr, 2 a usage error from clap), the `--json` summary line, and files
//! that are never overwritten.

use std::path::Path;
use std::process::{Command, Output};

fn dsv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        // No tokenizer: the tiny presets keep their 1024-token vocabulary, ids only.
        .env("DSV3_TOKENIZER_DIR", "/nonexistent-dsv3-tokenizer")
        .output()
        .expect("the dsv3 binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON object on the last line of stdout.
fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {line:?}"))
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v["ids"].as_array().expect("ids").iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn generate_json_with_and_without_mtp() {
    let common = ["generate", "--preset", "tiny", "--prompt-ids", "3,14,15,92", "--max-tokens", "12", "--json"];
    let plain = dsv3(&common);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let p = last_json(&plain);
    assert!(p["decode_tokens_per_s"].as_f64().unwrap() > 0.0 && p["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(p["prompt_tokens"], 4);
    assert!(p.get("mtp_acceptance").is_none());
    assert!(!ids(&p).is_empty() && ids(&p).len() <= 12);

    let spec = dsv3(&[&common[..], &["--mtp"]].concat());
    assert!(spec.status.success(), "{}", stderr(&spec));
    let s = last_json(&spec);
    assert_eq!(ids(&s), ids(&p), "greedy tokens with --mtp differ");
    let acc = &s["mtp_acceptance"];
    let overall = acc["overall"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&overall));
    assert_eq!(acc["per_position"].as_array().unwrap().len(), 1);
    assert!(acc["drafted"].as_u64().unwrap() >= acc["accepted"].as_u64().unwrap());
}

#[test]
fn typed_errors_exit_1_and_name_the_problem() {
    let cases: [(&[&str], &str); 4] = [
        (&["generate", "--preset", "tiny-v2lite", "--prompt-ids", "1,2", "--mtp"], "num_nextn_predict_layers"),
        (&["generate", "--model", "/nonexistent/model-dir", "--prompt-ids", "1"], "/nonexistent/model-dir"),
        (&["generate", "--preset", "tiny", "--prompt-ids", "1,5000"], "5000"),
        (&["generate", "--preset", "no-such-preset", "--prompt-ids", "1"], "no-such-preset"),
    ];
    for (args, needle) in cases {
        let o = dsv3(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.starts_with("error: ") && e.contains(needle), "{args:?}: stderr {e:?} should name {needle:?}");
    }
}

/// Without a usable GPU (here: a build without the `cuda` feature, or no driver, or no GPU),
/// `--device cuda` is one line naming the cause, exit 1, for every command that takes it.
#[test]
fn an_unavailable_gpu_is_a_one_line_error() {
    for cmd in ["generate", "logits", "bench", "eval", "serve"] {
        let mut args = vec![cmd, "--preset", "tiny", "--device", "cuda:0"];
        match cmd {
            "generate" => args.extend(["--prompt-ids", "1"]),
            "logits" => args.extend(["--ids", "1", "--out", "/nonexistent-dir/l.safetensors"]),
            "eval" => args.extend(["--text", "/dev/null"]),
            _ => {}
        }
        let o = dsv3(&args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.starts_with("error: --device cuda:0: CUDA is unavailable"), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
}

/// `dsv3 bench` on the CPU: per batch the fields the GPU run reports too (prefill tokens/s,
/// decode step, tokens/s, GB/s against the measured bandwidth, per-step counters), with the
/// host time `null` and saying why (no device clock: all of a CPU step is host time).
#[test]
fn bench_reports_every_batch_field() {
    let o = dsv3(&["bench", "--preset", "tiny", "--batch", "1,3", "--prompt-tokens", "5", "--decode-tokens", "2", "--graphs", "off"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = last_json(&o);
    let batches = r["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 2);
    for (b, n) in batches.iter().zip([1, 3]) {
        assert_eq!(b["batch"], n);
        for k in ["prefill_tokens_per_s", "decode_step_s", "decode_tokens_per_s", "decode_gb_per_s", "decode_ratio_to_bandwidth"] {
            assert!(b[k].as_f64().is_some_and(|v| v > 0.0), "batch {n}: {k} = {}", b[k]);
        }
        assert!(b["bandwidth_source"].as_str().unwrap().contains("host memory"));
        assert!(b["host_step_s"].is_null() && b["host_step_note"].as_str().unwrap().starts_with("n/a"));
        assert_eq!(b["per_step"]["host_syncs"], 0, "the CPU has no device to wait for");
        assert_eq!(b["graphs"], false);
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("batch ")).count(), 2, "{stdout}");
}

#[test]
fn serve_refuses_mtp_with_a_reason() {
    let o = dsv3(&["serve", "--preset", "tiny", "--mtp", "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("MTP speculative decoding is not batched in the server"), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["generate", "--temperature"][..],
        &["no-such-command"],
        &["generate", "--max-tokens", "many"],
        &["generate", "--preset", "tiny", "--device", "gpu"],
        &["serve", "--preset", "tiny", "--host", "localhost:80"],
    ] {
        let o = dsv3(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn logits_writes_a_new_file_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    let o = dsv3(&["logits", "--preset", "tiny", "--ids", "1,2,3", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[3, 1024]);

    std::fs::write(&out, b"precious").unwrap();
    let o = dsv3(&["logits", "--preset", "tiny", "--ids", "1", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn init_random_refuses_an_existing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), b"mine").unwrap();
    let o = dsv3(&["init-random", "--preset", "tiny", "--out", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.join("keep.txt")).unwrap(), b"mine");
    assert!(!Path::new(&dir.join("config.json")).exists());
}

#[test]
fn init_random_vocab_sets_the_vocabulary_and_refuses_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let o = dsv3(&["init-random", "--preset", "tiny", "--vocab", "500", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 500);
    let o = dsv3(&["init-random", "--preset", "tiny", "--vocab", "0", "--out", tmp.path().join("z").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vocab") && stderr(&o).contains("vocab_size"), "{}", stderr(&o));
    assert!(!tmp.path().join("z").exists());
}
