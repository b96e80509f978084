//! The error type of the MoE crate.

use dsv3_kernels::KernelError;
use thiserror::Error;

/// Every fallible entry point of this crate returns this. Configs, weights and inputs are
/// checked before any kernel runs; a kernel's own check surfaces as [`MoeError::Kernel`].
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MoeError {
    /// A kernel rejected its arguments (shape, length, expert id, non-finite logit, ...).
    #[error(transparent)]
    Kernel(#[from] KernelError),

    /// A config field is out of range or inconsistent with another field.
    #[error("bad config: `{field}` {detail}")]
    Config { field: &'static str, detail: String },

    /// A weight tensor has the wrong shape, is missing, or should not be there.
    #[error("weight `{tensor}`: {detail}")]
    Weight { tensor: String, detail: String },

    /// A forward input (activation, routing, rank) does not match the layer.
    #[error("input `{what}`: {detail}")]
    Input { what: &'static str, detail: String },

    /// The expert-parallel transport failed, or a peer rank failed during a collective.
    #[error("transport, rank {rank}: {detail}")]
    Transport { rank: usize, detail: String },
}

pub type Result<T, E = MoeError> = std::result::Result<T, E>;

pub(crate) fn config(field: &'static str, detail: impl Into<String>) -> MoeError {
    MoeError::Config { field, detail: detail.into() }
}

pub(crate) fn weight(tensor: impl Into<String>, detail: impl Into<String>) -> MoeError {
    MoeError::Weight { tensor: tensor.into(), detail: detail.into() }
}

pub(crate) fn input(what: &'static str, detail: impl Into<String>) -> MoeError {
    MoeError::Input { what, detail: detail.into() }
}

/// `a * b`, or an input error naming `what`.
pub(crate) fn mul(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| input(what, format!("size {a} x {b} overflows")))
}
