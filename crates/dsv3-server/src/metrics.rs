//! `GET /metrics`: the engine's metrics and the server's request counts in the Prometheus
//! text format (version 0.0.4).

use dsv3_runtime::engine::{Histogram, LATENCY_BUCKETS, MetricsSnapshot};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Requests answered, by endpoint and status.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl HttpMetrics {
    pub fn count(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
    }

    /// `(endpoint, status, count)` for every pair seen.
    pub fn requests(&self) -> Vec<(&'static str, u16, u64)> {
        self.requests.lock().map(|m| m.iter().map(|(&(e, s), &c)| (e, s, c)).collect()).unwrap_or_default()
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    metric(out, name, "histogram", help);
    for (bound, c) in LATENCY_BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_string()]).zip(h.cumulative()) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
}

/// The whole exposition.
pub fn render(m: &MetricsSnapshot, http: &HttpMetrics, model: &str) -> String {
    let mut out = String::new();
    metric(&mut out, "dsv3_requests_total", "counter", "HTTP requests answered, by endpoint and status code.");
    for (endpoint, status, c) in http.requests() {
        let _ = writeln!(out, "dsv3_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {c}");
    }
    let model = model.replace('\\', "\\\\").replace('"', "\\\"");
    let gauges: [(&str, &str, &str, u64); 5] = [
        ("dsv3_running_sequences", "gauge", "Sequences admitted to the cache (prefilling or decoding).", m.running),
        ("dsv3_waiting_sequences", "gauge", "Requests waiting for admission (new or preempted).", m.waiting),
        ("dsv3_cache_pages_used", "gauge", "Pages of the paged latent cache held by sequences.", m.cache_pages_used),
        (
            "dsv3_cache_pages_free",
            "gauge",
            "Pages of the paged latent cache not held by any sequence.",
            m.cache_pages_total - m.cache_pages_used,
        ),
        ("dsv3_cache_pages_total", "gauge", "Pages of the paged latent cache.", m.cache_pages_total),
    ];
    let counters: [(&str, &str, &str, u64); 4] = [
        ("dsv3_preemptions_total", "counter", "Sequences preempted (pages freed, recomputed later).", m.preemptions),
        ("dsv3_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", m.prompt_tokens),
        ("dsv3_generation_tokens_total", "counter", "Generated tokens.", m.generation_tokens),
        ("dsv3_engine_steps_total", "counter", "Engine steps run.", m.steps),
    ];
    for (name, kind, help, v) in gauges.into_iter().chain(counters) {
        metric(&mut out, name, kind, help);
        let _ = writeln!(out, "{name}{{model=\"{model}\"}} {v}");
    }
    metric(&mut out, "dsv3_finished_sequences_total", "counter", "Sequences that ended, by reason.");
    for (r, c) in m.finished {
        let _ = writeln!(out, "dsv3_finished_sequences_total{{reason=\"{}\"}} {c}", r.as_str());
    }
    histogram(&mut out, "dsv3_time_to_first_token_seconds", "Seconds from arrival to the first generated token.", &m.time_to_first_token);
    histogram(&mut out, "dsv3_time_per_output_token_seconds", "Seconds between consecutive generated tokens.", &m.time_per_output_token);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_once_with_its_samples() {
        let http = HttpMetrics::default();
        http.count("chat", 200);
        http.count("chat", 200);
        http.count("completions", 400);
        let snap = MetricsSnapshot { cache_pages_total: 10, cache_pages_used: 3, ..Default::default() };
        let text = render(&snap, &http, "m\"x");
        assert!(text.contains("dsv3_requests_total{endpoint=\"chat\",status=\"200\"} 2"));
        assert!(text.contains("dsv3_requests_total{endpoint=\"completions\",status=\"400\"} 1"));
        assert!(text.contains("dsv3_cache_pages_free{model=\"m\\\"x\"} 7"));
        assert!(text.contains("dsv3_time_to_first_token_seconds_bucket{le=\"+Inf\"} 0"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
        }
    }
}
