//! The body of `POST /v1/chat/completions` and `/v1/completions` (`dsv3-server`'s
//! [`request::parse`]). The first byte picks the endpoint (even: chat, odd: completions); the
//! rest is the body.
//!
//! Invariants beyond "typed error or value": an error is a 4xx with a message, its JSON body
//! has the OpenAI shape; an accepted request is within every documented bound (`n`, sampling
//! ranges, stop strings, logprobs) and has a non-empty prompt.

use dsv3_server::request::{self, Endpoint, MAX_LOGPROBS, MAX_N, MAX_STOP_BYTES, MAX_STOPS, Prompt};

pub fn run(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else { return };
    let endpoint = if first % 2 == 0 { Endpoint::Chat } else { Endpoint::Completions };
    match request::parse(endpoint, body) {
        Err(e) => {
            assert!(e.status.is_client_error(), "a {} for a bad body: {e:?}", e.status);
            assert!(!e.message.is_empty(), "an error without a message: {e:?}");
            let v = e.body();
            for field in ["message", "type", "param", "code"] {
                assert!(v["error"].get(field).is_some(), "error body without `{field}`: {v}");
            }
        }
        Ok(r) => {
            assert_eq!(r.endpoint, endpoint);
            assert!((1..=MAX_N).contains(&r.n), "n = {}", r.n);
            assert!((0.0..=2.0).contains(&r.temperature), "temperature {}", r.temperature);
            assert!(r.top_p > 0.0 && r.top_p <= 1.0, "top_p {}", r.top_p);
            assert!(r.max_tokens.is_none_or(|m| m >= 1), "max_tokens {:?}", r.max_tokens);
            assert!(r.stop.len() <= MAX_STOPS && r.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES), "stop {:?}", r.stop);
            assert!(r.logprobs.is_none_or(|k| k <= MAX_LOGPROBS), "logprobs {:?}", r.logprobs);
            match &r.prompt {
                Prompt::Chat(m) => assert!(endpoint == Endpoint::Chat && !m.is_empty()),
                Prompt::Text(_) => assert_eq!(endpoint, Endpoint::Completions),
                Prompt::Ids(ids) => assert!(endpoint == Endpoint::Completions && !ids.is_empty()),
            }
        }
    }
}
