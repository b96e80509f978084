//! Running one model over several processes (or GPUs): pipeline parallelism over the layers
//! and expert parallelism over the routed experts, as DeepSeek deploys V3.
//!
//! A job of `pp × ep` ranks ([`Layout`]): rank `stage * ep + lane`. Pipeline stage `stage`
//! holds a contiguous range of layers ([`Layout::layers`]); the first stage also holds the
//! embedding, the last the final norm and `lm_head`. Inside a stage, the `ep` ranks ("lanes")
//! each hold `n_routed_experts / ep` routed experts of every MoE layer of the stage (only
//! those are read from the memory-mapped checkpoint) and a replica of everything else.
//!
//! **Attention, dense layers, router and shared experts are data-parallel** across the lanes
//! of a stage: each lane runs them for its own sequences, with its own latent cache, and the
//! MoE layers exchange tokens through the stage's [`dsv3_moe::Transport`] (dispatch and
//! combine all-to-alls). Why not replicate them: a replica would hold and read every
//! sequence's KV cache on every lane (`ep` times the cache memory and bandwidth), and the
//! dispatch would carry no information (every rank would already have every token); data
//! parallelism is what DeepSeek's deployment does for attention. A sequence lives on one
//! lane, so one sequence alone is computed with exactly the rows one process uses.
//!
//! Rank 0 drives the job ([`pipeline`]): it tokenises, samples and prints; the other ranks
//! only compute. The processes talk through a [`Comm`] (MPI in `dsv3-dist`, threads in
//! [`InProcessComm`]).
//!
//! Failures: a phase every rank runs alone (loading, checking the request) ends with
//! [`agree`], so a rank that fails there makes every rank return its error. A rank that
//! fails while the pipeline runs is handled by the launcher (`dsv3-dist`: MPI_Abort, and every
//! other rank reports the abort), or by [`InProcessComm::fail`] in process.

mod comm;
pub mod cost;
pub mod pipeline;
mod stage;

pub use comm::{Comm, InProcessComm, Reader, Tag, Writer, agree, all_gather, broadcast, dist_err, run_in_process};
pub use pipeline::{Job, JobKind, JobOutput, run_job};
pub use stage::StageModel;

use crate::config::ModelConfig;
use crate::error::Result;
use std::ops::Range;

/// How the ranks of a job split the model: `pp` pipeline stages of `ep` expert-parallel
/// lanes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pp: usize,
    pub ep: usize,
}

impl Layout {
    /// One process holding everything.
    pub const SINGLE: Layout = Layout { pp: 1, ep: 1 };

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.pp * self.ep
    }
    /// The pipeline stage of `rank`.
    pub fn stage(&self, rank: usize) -> usize {
        rank / self.ep
    }
    /// The lane (expert-parallel rank inside its stage) of `rank`.
    pub fn lane(&self, rank: usize) -> usize {
        rank % self.ep
    }
    /// The rank of `lane` in `stage`.
    pub fn rank(&self, stage: usize, lane: usize) -> usize {
        stage * self.ep + lane
    }
    /// The layers of `stage`: contiguous, sizes differing by at most one, later stages larger
    /// (the first stage also holds the embedding).
    pub fn layers(&self, stage: usize, n_layers: usize) -> Range<usize> {
        let rev = dsv3_moe::token_split(n_layers, self.pp, self.pp - 1 - stage);
        n_layers - rev.end..n_layers - rev.start
    }

    /// Checks the layout against the model and the number of processes: `pp` at least 1 and
    /// at most the layer count, `ep` at least 1 and dividing `n_routed_experts`, `pp × ep`
    /// equal to `world`.
    pub fn check(&self, cfg: &ModelConfig, world: usize) -> Result<()> {
        let bad = |detail: String| crate::error::RuntimeError::Request(detail);
        if self.pp == 0 || self.pp > cfg.num_hidden_layers {
            return Err(bad(format!("--pp {} must be between 1 and the model's {} layers", self.pp, cfg.num_hidden_layers)));
        }
        if self.ep == 0 || !cfg.n_routed_experts.is_multiple_of(self.ep) {
            return Err(bad(format!("--ep {} must divide the model's {} routed experts", self.ep, cfg.n_routed_experts)));
        }
        if self.world() != world {
            return Err(bad(format!("--pp {} x --ep {} = {} ranks, but the job has {world} processes", self.pp, self.ep, self.world())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn layers_split_contiguously_later_stages_larger() {
        let l = Layout { pp: 4, ep: 2 };
        let r: Vec<_> = (0..4).map(|s| l.layers(s, 61)).collect();
        assert_eq!(r, vec![0..15, 15..30, 30..45, 45..61]);
        assert_eq!(Layout { pp: 3, ep: 1 }.layers(2, 3), 2..3);
        assert_eq!((l.stage(5), l.lane(5), l.rank(2, 1)), (2, 1, 5));
    }
}
