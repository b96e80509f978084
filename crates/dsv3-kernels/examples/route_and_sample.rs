//! DeepSeek-V3's router (`noaux_tc`: sigmoid scores, a selection-only bias, 8 groups keeping 4,
//! top-8, renormalised, x 2.5) on random logits, and the sampler on one row of logits.
//!
//! `cargo run --release -p dsv3-kernels --example route_and_sample`

use dsv3_kernels::prelude::*;
use dsv3_kernels::sample;

fn main() -> Result<()> {
    let cfg = RouteCfg::deepseek_v3();
    let tokens = 3;
    let logits: Vec<f32> = (0..tokens * cfg.n_experts).map(|i| (((i * 37) % 101) as f32 - 50.0) / 25.0).collect();
    let bias: Vec<f32> = (0..cfg.n_experts).map(|e| ((e % 7) as f32 - 3.0) / 100.0).collect();
    let (mut ids, mut weights) = (vec![0u32; tokens * cfg.top_k], vec![0f32; tokens * cfg.top_k]);
    route(&cfg, tokens, &logits, Some(&bias), &mut ids, &mut weights)?;
    for t in 0..tokens {
        let row = t * cfg.top_k..(t + 1) * cfg.top_k;
        let sum: f32 = weights[row.clone()].iter().sum();
        println!("token {t}: experts {:?}, weights sum to {sum:.3} (= routed_scaling_factor)", &ids[row]);
    }

    // Sampling: temperature 0.7, top-k 4, nucleus 0.9; the uniform comes from the caller.
    let row = [1.0f32, 3.5, 2.0, 3.4, -1.0, 0.5];
    let params = SampleParams { temperature: 0.7, top_k: 4, top_p: 0.9 };
    let d = Dist::new(&row, &params)?;
    println!("distribution: {:?}", d.support());
    let mut out = [0u32; 1];
    sample::sample(&row, SampleShape { rows: 1, vocab: row.len(), allowed: row.len() }, &params, &[0.42], &mut out)?;
    println!("u = 0.42 draws token {}", out[0]);
    Ok(())
}
