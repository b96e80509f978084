//! The one error type of the kernel layer.

use thiserror::Error;

/// Every fallible kernel entry point returns this. Shapes are checked before any work starts,
/// so an error never leaves an output half written by a kernel that started.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KernelError {
    /// A buffer does not have the length its shape implies.
    #[error("{op}: `{what}` has length {got}, expected {expected}")]
    Length { op: &'static str, what: &'static str, expected: usize, got: usize },

    /// A shape parameter is out of range or inconsistent with another one.
    #[error("{op}: bad shape: {detail}")]
    Shape { op: &'static str, detail: String },

    /// An argument value (not a shape) is invalid: a NaN scale, an expert id out of range, ...
    #[error("{op}: invalid argument `{what}`: {detail}")]
    Invalid { op: &'static str, what: &'static str, detail: String },

    /// A size computation overflowed `usize`.
    #[error("{op}: size of `{what}` overflows")]
    Overflow { op: &'static str, what: &'static str },

    /// The CUDA backend was asked for on a build or machine that cannot provide it.
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed on a machine that has a GPU (launch, copy, allocation).
    #[error("CUDA error: {0}")]
    Cuda(String),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Checks that `buf_len == expected`, naming the op and the buffer otherwise.
#[inline]
pub fn check_len(op: &'static str, what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(KernelError::Length { op, what, expected, got }) }
}

/// `a * b` with overflow reported as a typed error.
#[inline]
pub fn checked_mul(op: &'static str, what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(KernelError::Overflow { op, what })
}

/// Builds a [`KernelError::Shape`].
#[inline]
pub fn shape_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape { op, detail: detail.into() }
}

/// Builds a [`KernelError::Invalid`].
#[inline]
pub fn invalid(op: &'static str, what: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Invalid { op, what, detail: detail.into() }
}
