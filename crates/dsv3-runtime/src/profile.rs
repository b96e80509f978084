//! Where a step's time goes, part by part: `dsv3 bench --profile` prints it for the batch-1
//! decode step, next to the weight bytes each part reads ([`DecodeBytes`]) and the GB/s that
//! makes.
//!
//! The parts are timed on the host around whole sub-layers, so the times are exact on the CPU
//! backend (every op is synchronous) and meaningless on a GPU, whose ops are queued: the
//! bench refuses `--profile` there. Off, a part costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The attention sub-layer of every layer, with its input norm.
    Attention,
    /// The dense MLP layers (the first `first_k_dense_replace`), with their input norm.
    DenseMlp,
    /// The MoE layers: router, shared and routed experts.
    Moe,
    /// `lm_head` and sampling.
    Head,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Attention, Part::DenseMlp, Part::Moe, Part::Head];
    pub fn name(self) -> &'static str {
        match self {
            Part::Attention => "attention",
            Part::DenseMlp => "dense MLP",
            Part::Moe => "MoE",
            Part::Head => "lm_head + sampling",
        }
    }
}

/// Time per [`Part`], summed over the steps run while enabled.
#[derive(Debug, Default)]
pub struct Profile {
    on: AtomicBool,
    ns: [AtomicU64; 4],
}

impl Profile {
    /// Starts (or stops) timing; starting clears the sums.
    pub fn enable(&self, on: bool) {
        if on {
            for n in &self.ns {
                n.store(0, Ordering::Relaxed);
            }
        }
        self.on.store(on, Ordering::Relaxed);
    }
    /// Runs `f`, adding its time to `part` when timing.
    pub fn time<T>(&self, part: Part, f: impl FnOnce() -> T) -> T {
        if !self.on.load(Ordering::Relaxed) {
            return f();
        }
        let t = Instant::now();
        let out = f();
        self.ns[part as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
    /// The sums so far.
    pub fn get(&self, part: Part) -> Duration {
        Duration::from_nanos(self.ns[part as usize].load(Ordering::Relaxed))
    }
}

/// Weight bytes one decode step of one token reads, per [`Part`] (the numerators of its GB/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeBytes {
    pub attention: usize,
    pub dense_mlp: usize,
    pub moe: usize,
    pub head: usize,
}

impl DecodeBytes {
    pub fn total(&self) -> usize {
        self.attention + self.dense_mlp + self.moe + self.head
    }
    pub fn of(&self, part: Part) -> usize {
        match part {
            Part::Attention => self.attention,
            Part::DenseMlp => self.dense_mlp,
            Part::Moe => self.moe,
            Part::Head => self.head,
        }
    }
}
