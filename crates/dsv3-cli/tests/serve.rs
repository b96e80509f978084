//! `dsv3 serve` as a user runs it: 32 concurrent greedy requests get, token for token, what
//! `dsv3 generate` gives each prompt alone; SIGTERM lets a running stream finish, then the
//! server exits 0.

use dsv3_server::client::{post, post_stream};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// A `dsv3 serve` process on an ephemeral port of 127.0.0.1 (killed on drop).
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn start(extra: &[&str]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dsv3"))
            .args(["serve", "--preset", "tiny", "--port", "0"])
            .args(extra)
            .env("DSV3_TOKENIZER_DIR", "/nonexistent-dsv3-tokenizer")
            .stderr(Stdio::piped())
            .spawn()
            .expect("dsv3 runs");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("serve printed its address").unwrap();
            if let Some(a) = line.strip_prefix("dsv3 serve: listening on http://") {
                break a.parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Serve { child, addr }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token_ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("token_ids").iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn batching_does_not_change_greedy_answers() {
    let s = Serve::start(&["--max-running", "32", "--max-step-tokens", "128", "--prefill-chunk", "48"]);
    let prompts: Vec<Vec<u32>> = (0..32u32).map(|i| (0..1 + (i * 29) % 140).map(|j| (j * 131 + i * 17 + 3) % 1024).collect()).collect();
    let threads: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let r = post(addr, "/v1/completions", &json!({"prompt": p, "max_tokens": 12, "temperature": 0}), T).unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                token_ids(&r.json()["choices"][0]["token_ids"])
            })
        })
        .collect();
    let served: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (p, got) in prompts.iter().zip(&served) {
        let ids = p.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
            .args(["generate", "--preset", "tiny", "--prompt-ids", &ids, "--max-tokens", "12", "--json"])
            .env("DSV3_TOKENIZER_DIR", "/nonexistent-dsv3-tokenizer")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        let alone: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(got, &token_ids(&alone["ids"]), "prompt of {} tokens", p.len());
    }
}

#[test]
fn sigterm_lets_running_streams_finish_then_exits_0() {
    let mut s = Serve::start(&[]);
    let addr = s.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    let stream = std::thread::spawn(move || {
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 300, "ignore_eos": true, "stream": true});
        let (mut ids, mut done) = (0, false);
        post_stream(addr, "/v1/completions", &body, T, |d| {
            if d == "[DONE]" {
                done = true;
            } else {
                let v: Value = serde_json::from_str(d).unwrap();
                ids += v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                if ids == 1 {
                    let _ = tx.send(());
                }
            }
            true
        })
        .unwrap();
        (ids, done)
    });
    rx.recv_timeout(T).unwrap();
    let kill = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    assert_eq!(stream.join().unwrap(), (300, true), "the running stream is finished, not cut");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < T, "serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        post(addr, "/v1/completions", &json!({"prompt": [1], "max_tokens": 1}), Duration::from_secs(5)).is_err(),
        "nothing listens any more"
    );
}
