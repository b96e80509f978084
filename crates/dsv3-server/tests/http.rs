//! The server over real HTTP on 127.0.0.1: response shapes of both endpoints (whole and
//! streamed), malformed requests (status, error type and field), a full queue, and no page
//! left behind by finished, cancelled, timed-out and preempted requests.

mod common;

use common::{Server, T};
use dsv3_runtime::Preset;
use dsv3_runtime::engine::EngineConfig;
use dsv3_server::ServeOptions;
use dsv3_server::client::{get, post, post_stream, raw};
use serde_json::{Value, json};
use std::time::Duration;

fn small_cfg() -> EngineConfig {
    EngineConfig {
        max_running: 16,
        max_step_tokens: 256,
        max_context: 512,
        cache_tokens: 16 * 1024,
        max_waiting: 64,
        prefill_chunk: 64,
        ..Default::default()
    }
}

fn opts() -> ServeOptions {
    ServeOptions { model_name: "tiny".into(), max_body_bytes: 64 * 1024, ..Default::default() }
}

/// Every `data:` payload of a streamed request, `[DONE]` included.
fn stream_events(s: &Server, path: &str, body: &Value) -> Vec<String> {
    let mut events = Vec::new();
    let r = post_stream(s.addr, path, body, T, |d| {
        events.push(d.to_string());
        true
    })
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    events
}

#[test]
fn chat_and_completions_have_openai_shapes_whole_and_streamed() {
    let s = Server::start(Preset::Tiny, true, small_cfg(), opts());
    let chat = json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let r = post(s.addr, "/v1/chat/completions", &chat, T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "tiny");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap().to_string();
    assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    let lps = c["logprobs"]["content"].as_array().unwrap();
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"].as_u64().unwrap() as usize, lps.len());
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap());
    assert!(lps.iter().all(|l| l["top_logprobs"].as_array().unwrap().len() == 2 && l["logprob"].as_f64().unwrap() <= 0.0));

    // The same request streamed gives the same text, role first, usage last, then [DONE].
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&s, "/v1/chat/completions", &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let joined: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], *usage);
    assert!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"].is_string());

    // Completions: text prompt, n = 2 with a seed (reproducible), a stop string cut.
    let comp = json!({"prompt": "The capital of France is", "max_tokens": 8, "n": 2, "seed": 7, "temperature": 0.9});
    let a = post(s.addr, "/v1/completions", &comp, T).unwrap().json();
    let b = post(s.addr, "/v1/completions", &comp, T).unwrap().json();
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"], b["choices"], "same seed, same choices");
    let first = a["choices"][0]["text"].as_str().unwrap();
    if let Some(cut) = first.char_indices().nth(3).map(|(i, _)| &first[i..]).filter(|t| !t.is_empty()) {
        let stop: String = cut.chars().take(2).collect();
        let mut with_stop = comp.clone();
        with_stop["stop"] = json!([stop.clone()]);
        let c = post(s.addr, "/v1/completions", &with_stop, T).unwrap().json();
        let t = c["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains(&stop) && first.starts_with(t), "{t:?} vs {first:?} (stop {stop:?})");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
    }

    // Token-id prompts, streamed with logprobs.
    let ids = json!({"prompt": [1, 2, 3, 4], "max_tokens": 3, "stream": true, "logprobs": 1, "temperature": 0});
    let events = stream_events(&s, "/v1/completions", &ids);
    let lp: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .collect();
    assert_eq!(lp.len(), 3);

    let m = get(s.addr, "/v1/models", T).unwrap().json();
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["max_model_len"], 512);
    assert_eq!(get(s.addr, "/health", T).unwrap().status, 200);
}

#[test]
fn malformed_requests_get_4xx_openai_errors_and_hurt_no_one() {
    let s = Server::start(Preset::Tiny, false, small_cfg(), opts());
    // A request that runs through all of it and must come out whole.
    let addr = s.addr;
    let good = std::thread::spawn(move || {
        let body = json!({"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": true, "stream": true, "temperature": 0});
        let mut n = 0;
        post_stream(addr, "/v1/completions", &body, T, |d| {
            if d != "[DONE]" {
                let v: Value = serde_json::from_str(d).unwrap();
                n += v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
            }
            true
        })
        .unwrap();
        n
    });
    let msgs = json!([{"role": "user", "content": "x"}]);
    let chat = |extra: Value| {
        let mut b = json!({"messages": msgs});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let comp = |extra: Value| {
        let mut b = json!({"prompt": [1, 2]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let c = "/v1/chat/completions";
    let p = "/v1/completions";
    // (path, body, status, error type, param)
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (c, json!({}), 400, "invalid_request_error", Some("messages")),
        (c, json!({"messages": "hi"}), 400, "invalid_request_error", Some("messages")),
        (c, json!({"messages": []}), 400, "invalid_request_error", Some("messages")),
        (c, json!({"messages": [{"content": "x"}]}), 400, "invalid_request_error", Some("messages[0].role")),
        (c, json!({"messages": [{"role": "user", "content": 3}]}), 400, "invalid_request_error", Some("messages[0].content")),
        (c, json!({"messages": [{"role": "user", "content": "x"}]}), 400, "invalid_request_error", Some("messages")), // no tokenizer
        (c, chat(json!({"model": "gpt-4"})), 404, "not_found_error", Some("model")),
        (p, comp(json!({"model": "other"})), 404, "not_found_error", Some("model")),
        (p, comp(json!({"model": ["tiny"]})), 400, "invalid_request_error", Some("model")),
        (p, json!({}), 400, "invalid_request_error", Some("prompt")),
        (p, json!({"prompt": "text"}), 400, "invalid_request_error", Some("prompt")), // no tokenizer
        (p, json!({"prompt": []}), 400, "invalid_request_error", Some("prompt")),
        (p, json!({"prompt": [1, 99999]}), 400, "invalid_request_error", Some("prompt")),
        (p, json!({"prompt": [1, -1]}), 400, "invalid_request_error", Some("prompt")),
        (p, json!({"prompt": [[1], [2]]}), 400, "invalid_request_error", Some("prompt")),
        (p, json!({"prompt": vec![1; 600]}), 400, "invalid_request_error", Some("prompt")),
        (p, comp(json!({"max_tokens": 0})), 400, "invalid_request_error", Some("max_tokens")),
        (p, comp(json!({"max_tokens": 511})), 400, "invalid_request_error", Some("max_tokens")),
        (p, comp(json!({"max_tokens": "many"})), 400, "invalid_request_error", Some("max_tokens")),
        (p, comp(json!({"temperature": -0.1})), 400, "invalid_request_error", Some("temperature")),
        (p, comp(json!({"temperature": 3})), 400, "invalid_request_error", Some("temperature")),
        (p, comp(json!({"temperature": "warm"})), 400, "invalid_request_error", Some("temperature")),
        (p, comp(json!({"top_p": 1.5})), 400, "invalid_request_error", Some("top_p")),
        (p, comp(json!({"top_p": 0})), 400, "invalid_request_error", Some("top_p")),
        (p, comp(json!({"top_k": -5})), 400, "invalid_request_error", Some("top_k")),
        (p, comp(json!({"n": 0})), 400, "invalid_request_error", Some("n")),
        (p, comp(json!({"n": 100})), 400, "invalid_request_error", Some("n")),
        (p, comp(json!({"seed": "abc"})), 400, "invalid_request_error", Some("seed")),
        (p, comp(json!({"stop": 5})), 400, "invalid_request_error", Some("stop")),
        (p, comp(json!({"stop": ["x"]})), 400, "invalid_request_error", Some("stop")), // no tokenizer
        (p, comp(json!({"stream": 1})), 400, "invalid_request_error", Some("stream")),
        (p, comp(json!({"stream_options": true})), 400, "invalid_request_error", Some("stream_options")),
        (p, comp(json!({"logprobs": 21})), 400, "invalid_request_error", Some("logprobs")),
        (p, comp(json!({"echo": true})), 400, "invalid_request_error", Some("echo")),
        (p, comp(json!({"best_of": 3})), 400, "invalid_request_error", Some("best_of")),
        (p, comp(json!({"frequency_penalty": 1.0})), 400, "invalid_request_error", Some("frequency_penalty")),
        (p, comp(json!({"logit_bias": {"5": 10}})), 400, "invalid_request_error", Some("logit_bias")),
        (c, chat(json!({"tools": [{"type": "function"}]})), 400, "invalid_request_error", Some("tools")),
        (c, chat(json!({"response_format": {"type": "json_object"}})), 400, "invalid_request_error", Some("response_format")),
        (c, chat(json!({"top_logprobs": 3})), 400, "invalid_request_error", Some("top_logprobs")),
    ];
    for (path, body, status, kind, param) in &cases {
        let r = post(s.addr, path, body, T).unwrap();
        let e = r.json();
        assert_eq!(r.status, *status, "{path} {body}: {}", r.text());
        assert_eq!(e["error"]["type"], *kind, "{path} {body}: {}", r.text());
        assert_eq!(e["error"]["param"].as_str(), *param, "{path} {body}: {}", r.text());
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    // Bodies that are not requests at all, and what is not a route.
    let raw_cases: Vec<(Vec<u8>, u16)> = vec![
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops".to_vec(), 400),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]".to_vec(), 400),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n\xff\xfe\xfd\xfc".to_vec(), 400),
        (format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 1 << 20).into_bytes(), 413),
        (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 404),
        (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405),
    ];
    for (req, status) in &raw_cases {
        let r = raw(s.addr, req, T).unwrap();
        assert_eq!(r.status, *status, "{}: {}", String::from_utf8_lossy(&req[..40]), r.text());
        assert!(r.json()["error"]["type"].is_string(), "{}", r.text());
    }
    // A chunked body past the limit (no Content-Length to refuse it early).
    let big = vec![b'a'; 70 * 1024];
    let mut req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{:x}\r\n", big.len()).as_bytes());
    req.extend_from_slice(&big);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = raw(s.addr, &req, T).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(cases.len() + raw_cases.len() + 1 >= 30);

    assert_eq!(good.join().unwrap(), 40, "the request running beside the bad ones got every token");
    s.wait_idle();
    let bad = s.metric("dsv3_requests_total{endpoint=\"completions\",status=\"400\"}");
    assert!(bad >= 25.0, "{bad}");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let cfg = EngineConfig { max_running: 1, max_waiting: 1, max_context: 4096, ..small_cfg() };
    let s = Server::start(Preset::Tiny, false, cfg, opts());
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let addr = s.addr;
    // One running (until its client hangs up), one waiting: the third is refused.
    let hang_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = hang_up.clone();
    let running = std::thread::spawn(move || {
        let mut n = 0;
        post_stream(addr, "/v1/completions", &long, T, |_| {
            n += 1;
            if n == 2 {
                let _ = tx.send(());
            }
            !flag.load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
        n
    });
    rx.recv_timeout(T).unwrap();
    let short = json!({"prompt": [4], "max_tokens": 2});
    let waiting = std::thread::spawn(move || post(addr, "/v1/completions", &short, T).unwrap().status);
    let t0 = std::time::Instant::now();
    while s.engine.metrics().waiting < 1 {
        assert!(t0.elapsed() < T);
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = post(s.addr, "/v1/completions", &json!({"prompt": [4], "max_tokens": 2}), T).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    assert_eq!(r.header("retry-after"), Some("1"));
    hang_up.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(running.join().unwrap() < 4000, "the first request was still running when the third came");
    assert_eq!(waiting.join().unwrap(), 200, "the waiting request runs once the first client hangs up");
    s.wait_idle();
}

/// Pages, running and waiting sequences after a run, as `/metrics` and the engine report them.
fn assert_nothing_leaked(s: &Server, pages: f64) {
    s.wait_idle();
    let m = s.engine.metrics();
    assert_eq!(m.cache_pages_used, 0, "{m:?}");
    assert_eq!(s.metric("dsv3_cache_pages_used{model=\"tiny\"}"), 0.0);
    assert_eq!(s.metric("dsv3_cache_pages_free{model=\"tiny\"}"), pages);
    assert_eq!(s.metric("dsv3_running_sequences{model=\"tiny\"}"), 0.0);
    assert_eq!(s.metric("dsv3_waiting_sequences{model=\"tiny\"}"), 0.0);
}

#[test]
fn finished_cancelled_and_preempted_requests_leave_every_page_free() {
    // 24 pages for up to 8 sequences that each grow to 3-5 pages: decodes run out of pages
    // whatever the machine's speed, and the newest sequences are preempted.
    let cfg = EngineConfig {
        max_running: 8,
        max_step_tokens: 128,
        max_context: 512,
        cache_tokens: 24 * 64,
        max_waiting: 64,
        prefill_chunk: 32,
        ..Default::default()
    };
    let s = Server::start(Preset::Tiny, false, cfg, opts());
    let addr = s.addr;
    let threads: Vec<_> = (0..16u32)
        .map(|i| {
            std::thread::spawn(move || {
                let prompt: Vec<u32> = (0..20 + i * 5).map(|j| (j * 13 + i) % 1000).collect();
                if i % 4 == 2 {
                    // The client hangs up after 3 chunks.
                    let body = json!({"prompt": prompt, "max_tokens": 200, "ignore_eos": true, "stream": true});
                    let mut n = 0;
                    return post_stream(addr, "/v1/completions", &body, T, |_| {
                        n += 1;
                        n < 3
                    })
                    .unwrap()
                    .status;
                }
                let max_tokens = if i % 4 == 0 { 8 } else { 150 + i * 5 };
                let r = post(addr, "/v1/completions", &json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true}), T).unwrap();
                assert_eq!(r.json()["usage"]["completion_tokens"], max_tokens, "{}", r.text());
                r.status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
    assert_nothing_leaked(&s, 24.0);
    assert!(s.metric("dsv3_preemptions_total{model=\"tiny\"}") > 0.0, "{:?}", s.engine.metrics());
    assert_eq!(s.metric("dsv3_finished_sequences_total{reason=\"cancelled\"}"), 4.0);
    assert_eq!(s.metric("dsv3_finished_sequences_total{reason=\"length\"}"), 12.0);
}

#[test]
fn timed_out_requests_leave_every_page_free() {
    // Two at a time, 1900 tokens each, a 1 s deadline from arrival: the second wave cannot
    // finish in time on any machine this runs on (a tiny-model decode step takes ~0.5 ms).
    let cfg = EngineConfig {
        max_running: 2,
        max_step_tokens: 128,
        max_context: 2048,
        cache_tokens: 64 * 64,
        max_waiting: 64,
        prefill_chunk: 32,
        ..Default::default()
    };
    let s = Server::start(Preset::Tiny, false, cfg, ServeOptions { request_timeout: Duration::from_secs(1), ..opts() });
    let addr = s.addr;
    let threads: Vec<_> = (0..6u32)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"prompt": [i + 1, 2, 3], "max_tokens": 1900, "ignore_eos": true, "stream": i % 2 == 0});
                if i % 2 == 0 {
                    let mut error = None;
                    let r = post_stream(addr, "/v1/completions", &body, T, |d| {
                        if let Ok(v) = serde_json::from_str::<Value>(d)
                            && v.get("error").is_some()
                        {
                            error = Some(v["error"]["type"].as_str().unwrap_or_default().to_string());
                        }
                        true
                    })
                    .unwrap();
                    assert_eq!(r.status, 200);
                    error.map_or(200, |t| if t == "timeout_error" { 504 } else { 500 })
                } else {
                    let r = post(addr, "/v1/completions", &body, T).unwrap();
                    if r.status == 504 {
                        assert_eq!(r.json()["error"]["type"], "timeout_error", "{}", r.text());
                    }
                    r.status
                }
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&st| st == 200 || st == 504), "{statuses:?}");
    let timeouts = statuses.iter().filter(|&&st| st == 504).count();
    assert!(timeouts >= 2, "{statuses:?}");
    assert_nothing_leaked(&s, 64.0);
    assert_eq!(s.metric("dsv3_finished_sequences_total{reason=\"timeout\"}"), timeouts as f64);
}
