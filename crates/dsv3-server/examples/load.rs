//! A bounded load test of a running `dsv3 serve` on this machine: `--requests` streamed
//! greedy completions (token-id prompts, `ignore_eos`, `--max-tokens` each), `--concurrency`
//! at a time, stopping after `--time-limit` seconds whatever is left. Prints throughput, time
//! to first token and time per output token (p50/p99), and with `--json` one JSON line.
//!
//! `cargo run --release -p dsv3-server --example load -- --url http://127.0.0.1:8000 --requests 128 --concurrency 64`

use dsv3_server::client::post_stream;
use serde_json::{Value, json};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    addr: SocketAddr,
    requests: usize,
    concurrency: usize,
    max_tokens: usize,
    prompt_tokens: usize,
    time_limit: Duration,
    json: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
        requests: 64,
        concurrency: 16,
        max_tokens: 32,
        prompt_tokens: 32,
        time_limit: Duration::from_secs(120),
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--url" => {
                let v = val()?;
                let host = v.trim_start_matches("http://").trim_end_matches('/');
                o.addr = host.to_socket_addrs().map_err(|e| format!("--url {v}: {e}"))?.next().ok_or(format!("--url {v}: no address"))?;
                if !o.addr.ip().is_loopback() {
                    return Err(format!("--url {v}: this load test only targets this machine (a loopback address)"));
                }
            }
            "--requests" => o.requests = num(val()?)?,
            "--concurrency" => o.concurrency = num(val()?)?.max(1),
            "--max-tokens" => o.max_tokens = num(val()?)?.max(1),
            "--prompt-tokens" => o.prompt_tokens = num(val()?)?.max(1),
            "--time-limit" => o.time_limit = Duration::from_secs(num(val()?)? as u64),
            "--json" => o.json = true,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

/// One finished request: seconds to the first token, per later token, and tokens.
struct Sample {
    ttft: f64,
    tpot: Option<f64>,
    tokens: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn one(o: &Opts, k: usize) -> Result<Sample, String> {
    let prompt: Vec<u32> = (0..o.prompt_tokens).map(|i| ((i * 131 + k * 7919 + 1) % 1000) as u32).collect();
    let body = json!({"prompt": prompt, "max_tokens": o.max_tokens, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let (mut first, mut last, mut tokens, mut err) = (None, t0, 0usize, None);
    let r = post_stream(o.addr, "/v1/completions", &body, o.time_limit, |d| {
        if d == "[DONE]" {
            return true;
        }
        let v: Value = serde_json::from_str(d).unwrap_or(Value::Null);
        if let Some(e) = v.get("error") {
            err = Some(e.to_string());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        let c = &v["choices"][0];
        if c["text"].as_str().is_some_and(|t| !t.is_empty()) || c["token_ids"].as_array().is_some_and(|a| !a.is_empty()) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
        true
    })
    .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("status {}", r.status));
    }
    if let Some(e) = err {
        return Err(e);
    }
    let first = first.ok_or("no token")?;
    let ttft = (first - t0).as_secs_f64();
    let tpot = (tokens > 1).then(|| (last - first).as_secs_f64() / (tokens - 1) as f64);
    Ok(Sample { ttft, tpot, tokens })
}

fn main() {
    let o = match parse() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..o.concurrency.min(o.requests))
        .map(|_| {
            let (o, next, samples, errors) = (o.clone(), next.clone(), samples.clone(), errors.clone());
            std::thread::spawn(move || {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= o.requests || start.elapsed() >= o.time_limit {
                        return;
                    }
                    match one(&o, k) {
                        Ok(s) => samples.lock().unwrap_or_else(|e| e.into_inner()).push(s),
                        Err(e) => errors.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut tpot: Vec<f64> = samples.iter().filter_map(|s| s.tpot).collect();
    let report = json!({
        "requests": samples.len(),
        "errors": errors.len(),
        "concurrency": o.concurrency,
        "max_tokens": o.max_tokens,
        "prompt_tokens": o.prompt_tokens,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / wall,
        "requests_per_s": samples.len() as f64 / wall,
        "ttft_p50_s": percentile(&mut ttft, 0.5),
        "ttft_p99_s": percentile(&mut ttft, 0.99),
        "tpot_p50_s": percentile(&mut tpot, 0.5),
        "tpot_p99_s": percentile(&mut tpot, 0.99),
    });
    if o.json {
        println!("{report}");
    } else {
        println!(
            "{} requests ({} errors) in {:.1} s at concurrency {}: {:.1} output tokens/s, {:.2} requests/s\nTTFT p50 {:.1} ms, p99 {:.1} ms; TPOT p50 {:.1} ms, p99 {:.1} ms",
            samples.len(),
            errors.len(),
            wall,
            o.concurrency,
            report["output_tokens_per_s"].as_f64().unwrap_or(0.0),
            report["requests_per_s"].as_f64().unwrap_or(0.0),
            report["ttft_p50_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
            report["ttft_p99_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
            report["tpot_p50_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
            report["tpot_p99_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
        );
    }
    for e in errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    if !errors.is_empty() || samples.is_empty() {
        std::process::exit(1);
    }
}
