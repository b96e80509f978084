//! dsv3-moe: the MoE layer (router, dispatch, grouped experts, combine, shared experts) and
//! expert parallelism, written against the op-level API of `dsv3-kernels`.
#![forbid(unsafe_code)]
