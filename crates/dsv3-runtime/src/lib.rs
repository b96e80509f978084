//! dsv3-runtime: configuration, checkpoint loading and the full model.
#![forbid(unsafe_code)]
