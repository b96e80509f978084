//! Loads every tensor of a model directory through the typed accessors and reports the time:
//! `cargo run --release -p dsv3-runtime --example load_all -- DIR`

use dsv3_runtime::plan::{TensorRole, tensor_plan};
use dsv3_runtime::{Checkpoint, ModelConfig};
use std::path::PathBuf;

fn main() -> Result<(), dsv3_runtime::RuntimeError> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    let t = std::time::Instant::now();
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(&dir)?;
    ck.validate(&cfg)?;
    let opened = t.elapsed();
    let mut bytes = 0usize;
    let mut per_role = std::collections::BTreeMap::<String, std::time::Duration>::new();
    for p in tensor_plan(&cfg).iter() {
        let t0 = std::time::Instant::now();
        bytes += match p.role {
            TensorRole::Linear => {
                let w = ck.fp8_weight(&p.name, p.shape[0], p.shape[1])?;
                w.rows() * w.cols()
            }
            TensorRole::Bf16 => 2 * ck.bf16_weight(&p.name, p.shape[0], p.shape[1])?.rows() * p.shape[1],
            TensorRole::Bf16OrFp8 => match ck.linear_weight(&p.name, p.shape[0], p.shape[1])? {
                dsv3_runtime::LinearWeight::Fp8(w) => w.rows() * w.cols(),
                dsv3_runtime::LinearWeight::Bf16(w) => 2 * w.rows() * w.cols(),
            },
            TensorRole::Norm => 4 * ck.norm_weight(&p.name, p.shape[0])?.len(),
            TensorRole::F32 => 4 * ck.f32_vec(&p.name, p.shape[0])?.len(),
        };
        *per_role.entry(format!("{:?}", p.role)).or_default() += t0.elapsed();
    }
    println!("{per_role:?}");
    ck.finish_progress();
    println!("opened + validated in {opened:.2?}; loaded {:.3} GB in {:.2?}", bytes as f64 / 1e9, t.elapsed());
    Ok(())
}
