//! Config and weight validation: typed errors that name the field or tensor, the V3 constants
//! of docs/model.md §3.6 / §7, and the split of `kv_b_proj` into `W_UK` / `W_UV` (docs/model.md §2 row layout).

mod common;

use common::*;
use dsv3_kernels::fp8::Fp8Weight;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::*;

fn field_of(r: Result<(), MlaError>) -> &'static str {
    match r {
        Err(MlaError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn v3_config_constants() {
    let c = MlaConfig::deepseek_v3();
    c.validate().unwrap();
    c.validate_path(GemmPath::Fp8).unwrap();
    assert!((c.softmax_scale().unwrap() - 0.135_233_78).abs() < 1e-7);
    assert_eq!((c.q_dim(), c.latent_dim(), c.o_dim(), c.qk_head_dim()), (24576, 576, 16384, 192));
    assert_eq!(c.rms_eps, 1e-6);
}

#[test]
fn bad_fields_are_named() {
    let g = small_cfg(Some(128), 64, 16);
    g.validate().unwrap();
    let cases: Vec<(MlaConfig, &str)> = vec![
        (MlaConfig { hidden: 0, ..g }, "hidden"),
        (MlaConfig { n_heads: 0, ..g }, "n_heads"),
        (MlaConfig { q_lora_rank: Some(0), ..g }, "q_lora_rank"),
        (MlaConfig { kv_lora_rank: 0, ..g }, "kv_lora_rank"),
        (MlaConfig { qk_nope_head_dim: 0, ..g }, "qk_nope_head_dim"),
        (MlaConfig { qk_rope_head_dim: 0, ..g }, "qk_rope_head_dim"),
        (MlaConfig { qk_rope_head_dim: 15, rope: yarn_rope(15), ..g }, "qk_rope_head_dim"),
        (MlaConfig { v_head_dim: 0, ..g }, "v_head_dim"),
        (MlaConfig { rope: yarn_rope(64), ..g }, "rope.rope_head_dim"),
        (MlaConfig { max_position: 0, ..g }, "max_position"),
        (MlaConfig { rms_eps: 0.0, ..g }, "rms_eps"),
        (MlaConfig { rms_eps: f32::NAN, ..g }, "rms_eps"),
        (MlaConfig { n_heads: usize::MAX / 2, ..g }, "n_heads"),
    ];
    for (c, want) in cases {
        assert_eq!(field_of(c.validate()), want, "{c:?}");
    }
    let mut bad_theta = g;
    bad_theta.rope.theta = 0.5;
    assert_eq!(field_of(bad_theta.validate()), "rope");
    // The fp8 path needs every Linear input to be a multiple of 128.
    assert_eq!(field_of(MlaConfig { hidden: 200, ..g }.validate_path(GemmPath::Fp8)), "hidden");
    assert_eq!(field_of(MlaConfig { q_lora_rank: Some(96), ..g }.validate_path(GemmPath::Fp8)), "q_lora_rank");
    MlaConfig { hidden: 200, ..g }.validate_path(GemmPath::Reference).unwrap();
    assert!(matches!(MlaContext::new(&B, MlaConfig { hidden: 200, ..g }, GemmPath::Fp8), Err(MlaError::Config { field: "hidden", .. })));
}

#[test]
fn weight_shapes_are_checked_by_name() {
    let cfg = small_cfg(Some(128), 64, 16);
    let good = MlaHostWeights::random(&cfg, 1).unwrap();
    let zero = |r: usize, c: usize| Fp8Weight::quantize(r, c, &vec![0.0; r * c]).unwrap();
    let tensor_of = |w: &MlaHostWeights| match MlaWeights::new(&B, &cfg, w) {
        Err(MlaError::TensorShape { tensor, .. }) => tensor,
        other => panic!("expected a tensor error, got {other:?}"),
    };
    let mut w = good.clone();
    w.kv_b_proj = zero(4 * 64, 48);
    assert_eq!(tensor_of(&w), "kv_b_proj");
    let mut w = good.clone();
    w.kv_a_proj_with_mqa = zero(64, 256);
    assert_eq!(tensor_of(&w), "kv_a_proj_with_mqa");
    let mut w = good.clone();
    w.kv_a_layernorm = vec![1.0; 63];
    assert_eq!(tensor_of(&w), "kv_a_layernorm");
    let mut w = good.clone();
    w.kv_a_layernorm[3] = f32::INFINITY;
    assert_eq!(tensor_of(&w), "kv_a_layernorm");
    let mut w = good.clone();
    w.o_proj = zero(256, 64);
    assert_eq!(tensor_of(&w), "o_proj");
    if let HostQProj::Lora { q_a_proj, .. } = &mut w.q {
        *q_a_proj = zero(128, 128);
    }
    w.o_proj = good.o_proj.clone();
    assert_eq!(tensor_of(&w), "q_a_proj");
    let mut w = good.clone();
    if let HostQProj::Lora { q_b_proj, .. } = &mut w.q {
        *q_b_proj = zero(4 * 48, 64);
    }
    assert_eq!(tensor_of(&w), "q_b_proj");
    let mut w = good.clone();
    if let HostQProj::Lora { q_a_layernorm, .. } = &mut w.q {
        q_a_layernorm.pop();
    }
    assert_eq!(tensor_of(&w), "q_a_layernorm");
    // A direct q_proj where the config has q_lora_rank, and the reverse.
    let mut w = good.clone();
    w.q = HostQProj::Direct { q_proj: zero(4 * 48, 256) };
    assert_eq!(tensor_of(&w), "q_a_proj");
    let direct = MlaConfig { q_lora_rank: None, ..cfg };
    assert!(matches!(MlaWeights::new(&B, &direct, &good), Err(MlaError::TensorShape { tensor: "q_proj", .. })));
    let mut w = MlaHostWeights::random(&direct, 2).unwrap();
    w.q = HostQProj::Direct { q_proj: zero(4 * 48, 255) };
    assert!(matches!(MlaWeights::new(&B, &direct, &w), Err(MlaError::TensorShape { tensor: "q_proj", .. })));
    MlaWeights::new(&B, &cfg, &good).unwrap();
}

#[test]
fn kv_b_proj_splits_into_w_uk_and_w_uv_per_head() {
    let cfg = small_cfg(None, 64, 16);
    let w = MlaHostWeights::random(&cfg, 3).unwrap();
    let (uk, uv) = w.absorbed(&cfg).unwrap();
    let (h_n, n, v, l) = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    assert_eq!((uk.len(), uv.len()), (h_n * n * l, h_n * v * l));
    let full = w.kv_b_proj.view().dequantize();
    for h in 0..h_n {
        for j in 0..n + v {
            for c in 0..l {
                // The bf16 pair holds the dequantised value to 16 significant bits.
                let want = full[(h * (n + v) + j) * l + c];
                let got = if j < n { uk[(h * n + j) * l + c] } else { uv[(h * v + j - n) * l + c] };
                assert!((got - want).abs() <= want.abs() * 2f32.powi(-16), "head {h} row {j} col {c}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn random_weights_are_deterministic_and_realistic() {
    let cfg = small_cfg(Some(128), 128, 64);
    let a = MlaHostWeights::random(&cfg, 42).unwrap();
    assert_eq!(a, MlaHostWeights::random(&cfg, 42).unwrap());
    assert_ne!(a, MlaHostWeights::random(&cfg, 43).unwrap());
    // o_proj ~ N(0, 1/sqrt(in)): the dequantised standard deviation is near in^-1/2.
    let o = a.o_proj.view().dequantize();
    let std = (o.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / o.len() as f64).sqrt();
    let want = 1.0 / (cfg.o_dim() as f64).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
}

#[test]
fn parallel_quantisation_equals_the_kernel_crate_s() {
    for (r, c) in [(1usize, 1usize), (130, 300), (256, 128), (7, 129)] {
        let w: Vec<f32> = inputs(r as u64 * 31 + c as u64, r * c).iter().map(|v| v * 3.0).collect();
        assert_eq!(quantize_par(r, c, &w).unwrap(), Fp8Weight::quantize(r, c, &w).unwrap(), "[{r}, {c}]");
    }
    assert!(matches!(quantize_par(2, 2, &[0.0, 1.0, f32::NAN, 0.0]), Err(MlaError::TensorShape { .. })));
    assert!(matches!(quantize_par(2, 3, &[0.0; 5]), Err(MlaError::TensorShape { .. })));
}
