//! The error type of the MLA crate.

use crate::cache::SeqId;
use dsv3_kernels::KernelError;
use thiserror::Error;

/// Everything that can go wrong in this crate. Errors are returned before any state changes
/// unless a variant says otherwise.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MlaError {
    /// A kernel rejected its input (shapes are validated before any work).
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// A field of [`crate::MlaConfig`] or [`crate::CacheConfig`] is out of range.
    #[error("invalid MLA config: `{field}`: {detail}")]
    Config { field: &'static str, detail: String },

    /// A weight tensor has the wrong shape or length.
    #[error("tensor `{tensor}`: expected {expected}, got {got}")]
    TensorShape { tensor: &'static str, expected: String, got: String },

    /// The cache has fewer free pages than a step needs; nothing was allocated.
    #[error("latent cache out of pages: {needed} needed, {free} free")]
    OutOfPages { needed: usize, free: usize },

    /// A sequence id that the cache does not hold (never created, or freed).
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),

    /// A step would take a sequence past `max_position`.
    #[error("sequence {seq}: {len} tokens + {add} new exceed max_position {max}")]
    PositionLimit { seq: SeqId, len: usize, add: usize, max: usize },

    /// A batch, plan or call argument is inconsistent (duplicate sequence, zero tokens,
    /// truncation past the end, layer out of range, buffer of the wrong length, ...).
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },

    /// A [`crate::StepPlan`] used after the cache changed (another plan, a truncate or a free).
    #[error("stale step plan: made at cache generation {plan}, the cache is at {cache}")]
    StalePlan { plan: u64, cache: u64 },
}

pub type Result<T, E = MlaError> = std::result::Result<T, E>;

pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> MlaError {
    MlaError::Invalid { what, detail: detail.into() }
}
