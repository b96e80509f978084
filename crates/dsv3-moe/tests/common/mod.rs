//! Shared pieces of the MoE tests: small configs of the three routing families, inputs on a
//! grid that makes the router exact, and the token-by-token reference built only from the
//! `reference` functions of dsv3-kernels.
#![allow(dead_code, unused_imports)] // each test crate uses a part of these

use dsv3_kernels::act;
use dsv3_kernels::bf16_gemm::{self, Bf16Weight};
use dsv3_kernels::fp8::{Fp8Weight, calc_diff};
use dsv3_kernels::gating::{self, RouteCfg, RouteMethod};
use dsv3_kernels::gemm::{GemmPath, GemmShape, reference as gemm_ref};
use dsv3_kernels::norm::RowsShape;
use dsv3_moe::{GroupedLayout, MlpWeights, MoeConfig, MoeWeights};
use half::bf16;

pub use dsv3_testutil::{Rng, max_abs, max_abs_diff, uniform_vec as rand_x};

/// Routing families at test size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// V3 `noaux_tc`: sigmoid + bias, groups (n_group of `E/8` experts each... see `route`).
    V3,
    /// V2-Lite: softmax greedy, no bias, no renormalisation.
    V2Lite,
    /// Moonlight: noaux_tc with a single group.
    Moonlight,
}

/// A small MoE config of `family` with `n_experts` experts (16..=64, a multiple of 8).
pub fn small_cfg(family: Family, hidden: usize, inter: usize, n_experts: usize, n_shared: usize, path: GemmPath) -> MoeConfig {
    let route = match family {
        Family::V3 => RouteCfg { n_experts, top_k: 8, n_group: 8, topk_group: 4, ..RouteCfg::deepseek_v3() },
        Family::V2Lite => RouteCfg { n_experts, top_k: 6, ..RouteCfg::deepseek_v2_lite() },
        Family::Moonlight => RouteCfg { n_experts, top_k: 6, ..RouteCfg::moonlight() },
    };
    MoeConfig {
        hidden,
        moe_intermediate: inter,
        n_routed_experts: n_experts,
        n_shared_experts: n_shared,
        route,
        gemm_path: path,
        layout: GroupedLayout::Contiguous,
    }
}

/// Activations on the grid `i / 64`, `|i| <= 127` (|x| < 2).
pub fn grid_x(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.int(127) as f32 / 64.0).collect()
}

/// A router weight on the grid `i / 1024`, `|i| <= 255` (exact in bf16, |w| < 1/4). With
/// `grid_x` inputs every product is a multiple of 2^-16 below 1/2 in magnitude, so for
/// hidden <= 512 every partial sum of a logit is exact in f32: the fast and the reference
/// router GEMMs give identical logits whatever their summation order, and the routing
/// compared in the tests cannot flip on a near-tie.
pub fn grid_router(rng: &mut Rng, n: usize, hidden: usize) -> Bf16Weight {
    assert!(hidden <= 512, "the exactness argument needs hidden <= 512");
    Bf16Weight::new(n, hidden, (0..n * hidden).map(|_| bf16::from_f32(rng.int(255) as f32 / 1024.0)).collect()).unwrap()
}

/// Random weights with a grid router (see [`grid_router`]).
pub fn test_weights(cfg: &MoeConfig, seed: u64) -> MoeWeights {
    let w = MoeWeights::random(cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xabc);
    w.with_router(cfg, grid_router(&mut rng, cfg.n_routed_experts, cfg.hidden)).unwrap()
}

/// `src` with explicit zero codes appended up to `[rows, cols]` (same scales), built here
/// from the codes as the oracle of the layers' own K padding.
pub fn zero_pad(src: &Fp8Weight, rows: usize, cols: usize) -> Fp8Weight {
    let mut data = vec![0u8; rows * cols];
    for r in 0..src.rows() {
        data[r * cols..r * cols + src.cols()].copy_from_slice(&src.storage()[r * src.cols()..(r + 1) * src.cols()]);
    }
    Fp8Weight::new(rows, cols, data, src.view().scale_inv().to_vec()).unwrap()
}

/// One token through one SwiGLU MLP with the reference GEMM and reference silu_mul. On the
/// fp8 path an intermediate width off the 128 grid is zero-padded (h and down_proj's K).
pub fn ref_mlp_token(w: &MlpWeights, x: &[f32], path: GemmPath) -> Vec<f32> {
    let (inter, hidden) = (w.gate().rows(), w.gate().cols());
    let gemm = |a: &[f32], w: &Fp8Weight, n: usize, k: usize| {
        let mut o = vec![0f32; n];
        gemm_ref::gemm(a, w.view(), GemmShape { m: 1, n, k }, path, &mut o).unwrap();
        o
    };
    let g = gemm(x, w.gate(), inter, hidden);
    let u = gemm(x, w.up(), inter, hidden);
    let mut h = vec![0f32; inter];
    act::reference::silu_mul(&g, &u, RowsShape { rows: 1, cols: inter }, &mut h).unwrap();
    if path == GemmPath::Fp8 && inter % 128 != 0 {
        let wide = inter.next_multiple_of(128);
        h.resize(wide, 0.0);
        return gemm(&h, &zero_pad(w.down(), hidden, wide), hidden, wide);
    }
    gemm(&h, w.down(), hidden, inter)
}

/// The dense MLP, token by token.
pub fn ref_mlp(w: &MlpWeights, x: &[f32], path: GemmPath) -> Vec<f32> {
    let hidden = w.gate().cols();
    x.chunks_exact(hidden).flat_map(|xt| ref_mlp_token(w, xt, path)).collect()
}

/// The reference MoE layer: router logits by the reference bf16 GEMM, reference routing,
/// then per token `Σ_j w_j · expert_{id_j}(x)` (ascending j, from 0) `+ shared(x)`.
/// Returns (y, ids, weights).
pub fn ref_moe(cfg: &MoeConfig, w: &MoeWeights, x: &[f32], tokens: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let (n, k, h) = (cfg.n_routed_experts, cfg.route.top_k, cfg.hidden);
    let mut logits = vec![0f32; tokens * n];
    bf16_gemm::reference::gemm_bf16(x, w.router().view(), GemmShape { m: tokens, n, k: h }, &mut logits).unwrap();
    let (mut ids, mut wts) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
    let bias = if cfg.route.method == RouteMethod::NoauxTc { w.bias() } else { None };
    gating::reference::route(&cfg.route, tokens, &logits, bias, &mut ids, &mut wts).unwrap();
    let mut y = vec![0f32; tokens * h];
    for t in 0..tokens {
        let xt = &x[t * h..(t + 1) * h];
        let yt = &mut y[t * h..(t + 1) * h];
        for j in 0..k {
            let e = ids[t * k + j] as usize;
            let ye = ref_mlp_token(w.expert(e).unwrap(), xt, cfg.gemm_path);
            for (o, v) in yt.iter_mut().zip(&ye) {
                *o += wts[t * k + j] * v;
            }
        }
        if let Some(s) = w.shared() {
            for (o, v) in yt.iter_mut().zip(ref_mlp_token(s, xt, cfg.gemm_path)) {
                *o += v;
            }
        }
    }
    (y, ids, wts)
}

/// Per-expert counts computed directly from ids.
pub fn count_ids(ids: &[u32], n_experts: usize) -> Vec<u64> {
    let mut c = vec![0u64; n_experts];
    for &e in ids {
        c[e as usize] += 1;
    }
    c
}

/// Asserts the MoE layer's tolerance against the reference for `path` (tests/moe.rs states
/// it and why: on the fp8 path an E4M3 re-quantisation flip of the intermediate can move one
/// row).
pub fn assert_close(got: &[f32], want: &[f32], path: GemmPath, what: &str) {
    let scale = max_abs(want).max(1e-30);
    let err = max_abs_diff(got, want) / scale;
    match path {
        GemmPath::Reference => assert!(err <= 1e-5, "{what}: max err {err:e} of max |y|"),
        GemmPath::Fp8 => {
            let d = calc_diff(got, want);
            assert!(err <= 5e-2 && d <= 1e-4, "{what}: max err {err:e} of max |y|, calc_diff {d:e}");
        }
    }
}
