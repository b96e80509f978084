//! FP8 (in progress)
