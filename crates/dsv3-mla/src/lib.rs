//! dsv3-mla: Multi-head Latent Attention over a paged latent KV cache, written against the
//! op-level API of `dsv3-kernels`.
#![forbid(unsafe_code)]
