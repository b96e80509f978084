//! One MoE layer (V3 routing at a small size, no shared expert) on one rank and on four
//! in-process expert-parallel ranks (each owning a quarter of the experts, tokens split
//! contiguously, rows moved by two all-to-alls): the routed output is bit-identical.
//!
//! `cargo run --release -p dsv3-moe --example expert_parallel`

use dsv3_moe::prelude::*;
use dsv3_moe::{EpLayout, forward_in_process};

fn main() -> Result<(), MoeError> {
    let route = RouteCfg::deepseek_v3().with_experts(32, 8).with_groups(8, 4);
    let cfg = MoeConfig::new(512, 256, 0, route).with_gemm_path(GemmPath::Fp8);
    let weights = MoeWeights::random(&cfg, 3)?;
    let tokens = 24;
    let x: Vec<f32> = (0..tokens * cfg.hidden).map(|i| (((i * 2_654_435_761) % 997) as f32 - 498.0) / 498.0).collect();

    let single = MoeLayer::new(&Cpu, cfg, &weights)?;
    let (y1, stats) = single.forward_host(&Cpu, &x, tokens)?;
    println!("1 rank: tokens per expert {:?} (imbalance {:.2})", stats.per_expert(), stats.expert_imbalance());

    let n_ranks = 4;
    let layout = EpLayout { n_ranks, n_experts: cfg.n_routed_experts };
    let ranks =
        (0..n_ranks).map(|r| MoeLayer::new_rank(&Cpu, cfg, &weights.shard(&cfg, n_ranks, r)?, layout, r)).collect::<Result<Vec<_>, _>>()?;
    let (y4, _) = forward_in_process(&Cpu, &ranks, &x, tokens)?;
    let same = y1.iter().zip(&y4).all(|(a, b)| a.to_bits() == b.to_bits());
    println!("4 ranks: output bit-identical to 1 rank: {same}");
    assert!(same);
    Ok(())
}
