//! Bad configs, weights, inputs and ids give typed errors naming the field, tensor or input;
//! nothing panics.

mod common;

use common::*;
use dsv3_kernels::KernelError;
use dsv3_kernels::a2a::EpLayout;
use dsv3_kernels::backend::Cpu;
use dsv3_kernels::bf16_gemm::Bf16Weight;
use dsv3_kernels::fp8::Fp8Weight;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::{DenseMlp, DenseMlpConfig, LoadStats, MlpWeights, MoeConfig, MoeError, MoeLayer, MoeWeights, Routing};
use std::sync::Arc;

fn field_of(e: MoeError) -> &'static str {
    match e {
        MoeError::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

fn tensor_of(e: MoeError) -> String {
    match e {
        MoeError::Weight { tensor, .. } => tensor,
        other => panic!("expected a weight error, got {other}"),
    }
}

fn base() -> MoeConfig {
    small_cfg(Family::V3, 256, 128, 16, 1, GemmPath::Fp8)
}

#[test]
fn bad_configs_name_the_field() {
    let bad = |f: fn(&mut MoeConfig)| {
        let mut c = base();
        f(&mut c);
        field_of(c.validate().unwrap_err())
    };
    assert_eq!(bad(|c| c.hidden = 0), "hidden");
    assert_eq!(bad(|c| c.hidden = 200), "hidden"); // not a multiple of 128 on the fp8 path
    assert_eq!(bad(|c| c.moe_intermediate = 0), "moe_intermediate");
    assert_eq!(bad(|c| c.n_routed_experts = 32), "n_routed_experts");
    assert_eq!(bad(|c| c.route.top_k = 0), "route");
    assert_eq!(bad(|c| c.route.n_group = 3), "route");
    assert_eq!(bad(|c| c.route.routed_scaling_factor = f32::NAN), "route");
    assert_eq!(bad(|c| c.n_shared_experts = usize::MAX), "n_shared_experts");
    // Any expert width: on the fp8 path a partial last K block is zero-padded (tests/mlp.rs).
    let mut c = base();
    c.moe_intermediate = 100;
    c.validate().unwrap();
    // The reference path takes any width.
    let mut c = base();
    c.gemm_path = GemmPath::Reference;
    c.hidden = 200;
    c.validate().unwrap();
    for c in [MoeConfig::deepseek_v3(), MoeConfig::deepseek_v2_lite(), MoeConfig::moonlight()] {
        c.validate().unwrap();
    }

    let d = DenseMlpConfig { hidden: 256, intermediate: 0, gemm_path: GemmPath::Reference };
    assert_eq!(field_of(d.validate().unwrap_err()), "intermediate");
    let d = DenseMlpConfig { hidden: 129, intermediate: 256, gemm_path: GemmPath::Fp8 };
    assert_eq!(field_of(d.validate().unwrap_err()), "hidden");
    DenseMlpConfig::deepseek_v3().validate().unwrap();
}

fn fp8(rows: usize, cols: usize) -> Fp8Weight {
    Fp8Weight::quantize(rows, cols, &vec![0.01; rows * cols]).unwrap()
}

#[test]
fn bad_mlp_weights_name_the_tensor() {
    let cfg = DenseMlpConfig { hidden: 256, intermediate: 128, gemm_path: GemmPath::Reference };
    let e = MlpWeights::new(&cfg, "model.layers.0.mlp", fp8(128, 256), fp8(128, 256), fp8(128, 256)).unwrap_err();
    assert_eq!(tensor_of(e), "model.layers.0.mlp.down_proj.weight");
    let e = MlpWeights::new(&cfg, "model.layers.0.mlp", fp8(128, 256), fp8(256, 128), fp8(256, 128)).unwrap_err();
    assert_eq!(tensor_of(e), "model.layers.0.mlp.up_proj.weight");
    // Weights built for another config are refused by the backend constructor too.
    let w = MlpWeights::new(&cfg, "mlp", fp8(128, 256), fp8(128, 256), fp8(256, 128)).unwrap();
    let other = DenseMlpConfig { intermediate: 256, ..cfg };
    assert_eq!(tensor_of(DenseMlp::new(&Cpu, other, &w).unwrap_err()), "mlp.gate_proj.weight");
    // Input length.
    let mlp = DenseMlp::new(&Cpu, cfg, &w).unwrap();
    assert!(matches!(mlp.forward(&Cpu, &vec![0.0; 255], 1), Err(MoeError::Input { what: "x", .. })));
}

#[test]
fn bad_moe_weights_name_the_tensor() {
    let cfg = base();
    let w = MoeWeights::random(&cfg, 1).unwrap();
    let parts = || (w.router().clone(), w.bias().map(<[f32]>::to_vec), w.experts().to_vec(), w.shared().cloned());
    let p = "model.layers.3.mlp";

    let (_, b, ex, s) = parts();
    let router = Bf16Weight::from_f32(16, 128, &vec![0.0; 16 * 128]).unwrap();
    assert_eq!(tensor_of(MoeWeights::new(&cfg, p, router, b, 0, ex, s).unwrap_err()), "model.layers.3.mlp.gate.weight");

    let (r, _, ex, s) = parts();
    let bias_name = "model.layers.3.mlp.gate.e_score_correction_bias";
    assert_eq!(tensor_of(MoeWeights::new(&cfg, p, r.clone(), None, 0, ex.clone(), s.clone()).unwrap_err()), bias_name);
    assert_eq!(tensor_of(MoeWeights::new(&cfg, p, r.clone(), Some(vec![0.0; 15]), 0, ex.clone(), s.clone()).unwrap_err()), bias_name);
    let mut nan = vec![0.0; 16];
    nan[4] = f32::NAN;
    assert_eq!(tensor_of(MoeWeights::new(&cfg, p, r.clone(), Some(nan), 0, ex.clone(), s.clone()).unwrap_err()), bias_name);
    let soft =
        MoeConfig { route: dsv3_kernels::gating::RouteCfg { n_experts: 16, ..dsv3_kernels::gating::RouteCfg::deepseek_v2_lite() }, ..cfg };
    assert_eq!(tensor_of(MoeWeights::new(&soft, p, r.clone(), Some(vec![0.0; 16]), 0, ex.clone(), s.clone()).unwrap_err()), bias_name);

    let (r, b, mut ex, s) = parts();
    let ecfg = cfg.expert_mlp();
    let wrong = DenseMlpConfig { hidden: 256, intermediate: 256, gemm_path: GemmPath::Fp8 };
    ex[5] = Arc::new(MlpWeights::random(&wrong, 1).unwrap());
    assert_eq!(
        tensor_of(MoeWeights::new(&cfg, p, r.clone(), b.clone(), 0, ex, s.clone()).unwrap_err()),
        "model.layers.3.mlp.experts.5.gate_proj.weight"
    );
    let ex: Vec<_> = (0..16).map(|_| Arc::new(MlpWeights::random(&ecfg, 2).unwrap())).collect();
    assert_eq!(
        tensor_of(MoeWeights::new(&cfg, p, r.clone(), b.clone(), 1, ex.clone(), s.clone()).unwrap_err()),
        "model.layers.3.mlp.experts"
    );
    assert_eq!(tensor_of(MoeWeights::new(&cfg, p, r.clone(), b.clone(), 0, vec![], s.clone()).unwrap_err()), "model.layers.3.mlp.experts");

    assert_eq!(
        tensor_of(MoeWeights::new(&cfg, p, r.clone(), b.clone(), 0, ex.clone(), None).unwrap_err()),
        "model.layers.3.mlp.shared_experts"
    );
    let no_shared = MoeConfig { n_shared_experts: 0, ..cfg };
    assert_eq!(
        tensor_of(MoeWeights::new(&no_shared, p, r.clone(), b.clone(), 0, ex.clone(), s.clone()).unwrap_err()),
        "model.layers.3.mlp.shared_experts"
    );
    let two_shared = MoeConfig { n_shared_experts: 2, ..cfg };
    assert_eq!(
        tensor_of(MoeWeights::new(&two_shared, p, r, b, 0, ex, s).unwrap_err()),
        "model.layers.3.mlp.shared_experts.gate_proj.weight"
    );

    // A layer built for another config re-checks the weights.
    let other = MoeConfig { moe_intermediate: 256, ..cfg };
    assert_eq!(tensor_of(MoeLayer::new(&Cpu, other, &w).unwrap_err()), "mlp.experts.0.gate_proj.weight");
    assert!(MoeWeights::random_cyclic(&cfg, 1, 0).is_err());
}

#[test]
fn bad_inputs_and_ids_are_typed_errors() {
    let cfg = base();
    let w = MoeWeights::random(&cfg, 1).unwrap();
    let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
    let x = rand_x(1, 3 * 256);
    assert!(matches!(layer.forward(&Cpu, &x, 4), Err(MoeError::Input { what: "x", .. })));
    assert!(matches!(layer.forward(&Cpu, &x, usize::MAX), Err(MoeError::Input { what: "x", .. })));

    // An expert id out of range names the token.
    let mut ids: Vec<u32> = (0..24).map(|p| (p % 8) as u32).collect();
    ids[2 * 8 + 1] = 16;
    let r = Routing::<Cpu> { tokens: 3, ids, weights: vec![0.1; 24] };
    match layer.forward_routed(&Cpu, &x, &r) {
        Err(MoeError::Kernel(KernelError::Invalid { what: "topk_ids", detail, .. })) => assert!(detail.contains("token 2"), "{detail}"),
        other => panic!("expected an invalid-id error, got {other:?}"),
    }
    let r = Routing::<Cpu> { tokens: 3, ids: vec![0; 23], weights: vec![0.1; 24] };
    assert!(matches!(layer.forward_routed(&Cpu, &x, &r), Err(MoeError::Input { what: "routing", .. })));

    // A non-finite activation surfaces as the router's error naming the token.
    let mut bad = x.clone();
    bad[256 + 7] = f32::INFINITY;
    let e = layer.forward(&Cpu, &bad, 3).unwrap_err();
    assert!(e.to_string().contains("token 1"), "{e}");

    assert!(matches!(LoadStats::from_topk_ids(&[0, 16], 1, 2, 16, 1), Err(MoeError::Input { what: "topk_ids", .. })));
    assert!(LoadStats::from_counts(2, 2, vec![1, 1], 1).is_err()); // sums to 2, not 4
    assert!(LoadStats::from_counts(1, 2, vec![1, 1, 0], 2).is_err()); // 2 ranks, 3 experts
    assert!(LoadStats::merge(&[]).is_err());
}

#[test]
fn bad_expert_parallel_setups_are_typed_errors() {
    let cfg = base();
    let w = MoeWeights::random(&cfg, 1).unwrap();
    let layout = EpLayout { n_ranks: 4, n_experts: 16 };
    assert!(matches!(MoeLayer::new_rank(&Cpu, cfg, &w, layout, 4), Err(MoeError::Input { what: "rank", .. })));
    let odd = EpLayout { n_ranks: 3, n_experts: 16 };
    assert_eq!(field_of(MoeLayer::new_rank(&Cpu, cfg, &w, odd, 0).unwrap_err()), "n_ranks");
    let wrong_e = EpLayout { n_ranks: 2, n_experts: 32 };
    assert_eq!(field_of(MoeLayer::new_rank(&Cpu, cfg, &w, wrong_e, 0).unwrap_err()), "n_routed_experts");
    // Rank 1's shard does not hold rank 2's experts.
    let shard = w.shard(&cfg, 4, 1).unwrap();
    assert_eq!(shard.expert_range(), 4..8);
    assert_eq!(tensor_of(MoeLayer::new_rank(&Cpu, cfg, &shard, layout, 2).unwrap_err()), "mlp.experts");
    assert_eq!(tensor_of(MoeLayer::new(&Cpu, cfg, &shard).unwrap_err()), "mlp.experts");
    assert_eq!(field_of(w.shard(&cfg, 3, 0).unwrap_err()), "n_ranks");
    // A rank layer cannot run the single-rank forward.
    let r0 = MoeLayer::new_rank(&Cpu, cfg, &w, layout, 0).unwrap();
    assert!(matches!(r0.forward(&Cpu, &rand_x(1, 256), 1), Err(MoeError::Input { what: "rank", .. })));
    // The in-process driver checks its ranks.
    let r1 = MoeLayer::new_rank(&Cpu, cfg, &w, layout, 1).unwrap();
    assert!(matches!(dsv3_moe::forward_in_process(&Cpu, &[r1], &rand_x(1, 256), 1), Err(MoeError::Input { what: "ranks", .. })));
    assert!(matches!(dsv3_moe::forward_in_process::<Cpu>(&Cpu, &[], &[], 0), Err(MoeError::Input { what: "ranks", .. })));
}
