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

    /// The GPU has no room for an allocation (at load: the model or its cache does not fit).
    #[error("out of GPU memory: {} asked for, {} free of {}", mib(*bytes), mib(*free), mib(*total))]
    OutOfMemory { bytes: usize, free: usize, total: usize },

    /// A check that a kernel of a step ran on the device failed (a non-finite value, an id or a
    /// position out of range); steps read these back once, at their end, so the error names
    /// the kernel and the lowest bad index it reported rather than the op's own words.
    #[error("{kernel}: a device-side check failed at index {index} (a non-finite value, or an id or position out of range)")]
    DeviceCheck { kernel: &'static str, index: u32 },
}

/// `bytes` in MiB, for messages.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
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

#[cfg(test)]
mod tests {
    use super::KernelError;

    /// The errors `dsv3 --device cuda` prints at load are one line each.
    #[test]
    fn device_errors_are_one_line() {
        let oom = KernelError::OutOfMemory { bytes: 3 << 30, free: 1 << 30, total: 80 << 30 };
        assert_eq!(oom.to_string(), "out of GPU memory: 3072.0 MiB asked for, 1024.0 MiB free of 81920.0 MiB");
        let chk = KernelError::DeviceCheck { kernel: "dsv3_embedding_bf16", index: 3 };
        assert!(chk.to_string().starts_with("dsv3_embedding_bf16: a device-side check failed at index 3"));
        for e in [oom, chk, KernelError::CudaUnavailable("NVIDIA A100 is sm_80; the kernels are built for sm_90a".into())] {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
