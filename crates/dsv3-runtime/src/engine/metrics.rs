//! Counters, gauges and histograms the engine keeps while it runs; readers (the server's
//! `/metrics`) take a [`MetricsSnapshot`] at any time from any thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets (`+Inf` is implied).
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A histogram with fixed buckets ([`LATENCY_BUCKETS`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    /// Observations `<=` each bound, not cumulative; one extra slot for `+Inf`.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let i = LATENCY_BUCKETS.iter().position(|&b| v <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// Cumulative counts per bucket bound, `+Inf` last (Prometheus' `le` buckets).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        (0..=LATENCY_BUCKETS.len())
            .map(|i| {
                acc += self.counts.get(i).copied().unwrap_or(0);
                acc
            })
            .collect()
    }
}

/// Why a sequence ended, for the per-reason counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    #[default]
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The client went away or cancelled.
    Cancelled,
    /// The request's deadline passed.
    Timeout,
    /// The engine failed while running it.
    Error,
}

impl FinishReason {
    pub const ALL: [FinishReason; 5] =
        [FinishReason::Stop, FinishReason::Length, FinishReason::Cancelled, FinishReason::Timeout, FinishReason::Error];

    /// The OpenAI-style name (`stop`, `length`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::Error => "error",
        }
    }
}

/// The engine's metrics, shared between the engine thread and readers.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub(crate) running: AtomicU64,
    pub(crate) waiting: AtomicU64,
    pub(crate) pages_used: AtomicU64,
    pub(crate) pages_total: AtomicU64,
    pub(crate) preemptions: AtomicU64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    pub(crate) steps: AtomicU64,
    pub(crate) finished: [AtomicU64; 5],
    latency: Mutex<(Histogram, Histogram)>,
}

/// A copy of every metric at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    /// Sequences admitted to the cache (prefilling or decoding).
    pub running: u64,
    /// Requests queued for admission (new, or preempted and waiting to be recomputed).
    pub waiting: u64,
    pub cache_pages_used: u64,
    pub cache_pages_total: u64,
    pub preemptions: u64,
    /// Prompt tokens of admitted requests (counted once per request, not per recompute).
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub steps: u64,
    /// Finished sequences per [`FinishReason`] (in [`FinishReason::ALL`] order).
    pub finished: [(FinishReason, u64); 5],
    /// Seconds from arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive generated tokens of a sequence.
    pub time_per_output_token: Histogram,
}

impl EngineMetrics {
    pub(crate) fn finished(&self, r: FinishReason) {
        let i = FinishReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.finished[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn observe_ttft(&self, d: Duration) {
        if let Ok(mut h) = self.latency.lock() {
            h.0.observe(d.as_secs_f64());
        }
    }

    pub(crate) fn observe_tpot(&self, d: Duration) {
        if let Ok(mut h) = self.latency.lock() {
            h.1.observe(d.as_secs_f64());
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let (ttft, tpot) = self.latency.lock().map(|h| (h.0.clone(), h.1.clone())).unwrap_or_default();
        MetricsSnapshot {
            running: self.running.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            cache_pages_used: self.pages_used.load(Relaxed),
            cache_pages_total: self.pages_total.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            generation_tokens: self.generation_tokens.load(Relaxed),
            steps: self.steps.load(Relaxed),
            finished: std::array::from_fn(|i| (FinishReason::ALL[i], self.finished[i].load(Relaxed))),
            time_to_first_token: ttft,
            time_per_output_token: tpot,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_last() {
        let mut h = Histogram::default();
        for v in [0.0005, 0.003, 0.003, 100.0] {
            h.observe(v);
        }
        let c = h.cumulative();
        assert_eq!(c.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(c[0], 1);
        assert_eq!(c[2], 3, "0.003 falls in the 0.005 bucket");
        assert_eq!(c[LATENCY_BUCKETS.len() - 1], 3);
        assert_eq!(*c.last().unwrap(), 4);
        assert_eq!(h.count, 4);
        assert!((h.sum - 100.0065).abs() < 1e-9);
    }
}
