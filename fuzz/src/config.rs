//! `config.json` (V3 hub format, V2-Lite, Moonlight, and the later V3 releases).
//!
//! Invariants beyond "typed error or value": an accepted config writes itself back
//! ([`ModelConfig::to_json`]) as a file that parses to the same config; its tensor plan is
//! computable without overflow, names every tensor once, and (when small enough to list
//! here) has exactly [`planned_tensor_count`] entries.

use dsv3_runtime::plan::{planned_tensor_count, tensor_plan};
use dsv3_runtime::{ModelConfig, RuntimeError};
use std::collections::BTreeSet;

/// Plans up to this many tensors are listed in full (larger ones are only counted).
const LIST_MAX: u64 = 20_000;

pub fn run(data: &[u8]) {
    let cfg = match ModelConfig::from_json_bytes(data, "config.json") {
        Ok(c) => c,
        Err(e) => return crate::typed_error(e),
    };
    let again = ModelConfig::from_json_value(&cfg.to_json(), "config.json (written back)")
        .unwrap_or_else(|e: RuntimeError| panic!("an accepted config does not read back: {e}"));
    assert_eq!(again, cfg, "config changed on a write/read round trip");
    cfg.softmax_scale().unwrap_or_else(|e| panic!("an accepted config has no softmax scale: {e}"));
    let count = planned_tensor_count(&cfg);
    if count <= LIST_MAX {
        let plan = tensor_plan(&cfg);
        let stored = plan.stored(&cfg);
        assert_eq!(stored.len() as u64, count, "planned_tensor_count disagrees with the plan");
        let mut names = BTreeSet::new();
        for (spec, _) in &stored {
            assert!(names.insert(spec.name.as_str()), "tensor `{}` planned twice", spec.name);
            assert!(spec.bytes().is_some(), "tensor `{}` of shape {:?} overflows", spec.name, spec.shape);
        }
    }
}
