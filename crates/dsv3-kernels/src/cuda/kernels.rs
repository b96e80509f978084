//! The generated kernel table (build.rs: `Module`, `Kernel`, `KERNEL_REPORT`).

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
