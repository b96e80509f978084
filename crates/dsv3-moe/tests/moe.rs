//! The MoE layer against a token-by-token reference built from the dsv3-kernels references,
//! the two grouped layouts against each other, and the load statistics against counts taken
//! directly from the reference routing.
//!
//! Tolerances (relative to max |y| of the reference):
//! * reference GEMM path: 1e-5. Both sides dequantise the same FP8 weights exactly and sum
//!   in f32, in different orders (blocked vs. plain loops); observed about 1e-6.
//! * fp8 GEMM path: calc_diff (DeepGEMM's 1 - 2<x,y>/(|x|²+|y|²)) <= 1e-4 and 5e-2 per
//!   element. The expert's intermediate activation is re-quantised to E4M3 before the down
//!   GEMM; a last-bit difference in it (fast vs. reference silu and gate/up sums) can move a
//!   value that sits on a rounding boundary by one E4M3 step (up to 1/14 of its block's
//!   amax), and with it one token's output row. Measured over 1,500 random cases: typical
//!   calc_diff 1e-11; 3 cases above 1e-6 (worst 4.7e-6, max err 3.4e-3); the worst seen in CI
//!   was calc_diff 1.7e-5 with max err 1.6e-2 (two flips in one row of a 12-token batch).
//!   A wrong expert, weight or scale moves whole rows by > 1e-1 of max |y|; the structure
//!   itself is held to 1e-5 by the reference path.
//!
//! The router cannot flip on near-ties: inputs and router weights are on a grid that makes
//! every logit exact in f32 (see `common::grid_router`).

mod common;

use common::Rng; // not proptest's `Rng` trait
use common::*;
use dsv3_kernels::backend::{Backend, Cpu};
use dsv3_kernels::fp8::calc_diff;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::{GroupedLayout, LoadStats, MoeLayer, MoeWeights, Routing};
use proptest::prelude::*;
use std::sync::Arc;

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::V3), Just(Family::V2Lite), Just(Family::Moonlight)]
}

fn path() -> impl Strategy<Value = GemmPath> {
    prop_oneof![Just(GemmPath::Reference), Just(GemmPath::Fp8)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The layer (router, routing, plan, permute, grouped GEMMs, combine, shared experts)
    /// equals the reference, and its load statistics equal counts of the reference ids.
    #[test]
    fn moe_matches_token_by_token_reference(
        fam in family(),
        path in path(),
        n_experts in prop_oneof![Just(16usize), Just(32), Just(64)],
        n_shared in 0usize..=2,
        hidden in prop_oneof![Just(128usize), Just(256)],
        tokens in 0usize..=20,
        masked in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut cfg = small_cfg(fam, hidden, 128, n_experts, n_shared, path);
        if masked {
            cfg.layout = GroupedLayout::Masked;
        }
        let w = test_weights(&cfg, seed);
        let x = grid_x(&mut Rng::new(seed ^ 1), tokens * hidden);
        let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
        let out = layer.forward(&Cpu, &x, tokens).unwrap();
        let (want, ids, _) = ref_moe(&cfg, &w, &x, tokens);
        assert_close(&out.y, &want, path, &format!("{fam:?} {path:?} E={n_experts} shared={n_shared} T={tokens}"));
        let counts = count_ids(&ids, n_experts);
        prop_assert_eq!(out.stats.per_expert(), &counts[..]);
        prop_assert_eq!(out.stats.per_rank(), &[(tokens * cfg.route.top_k) as u64][..]);
        prop_assert_eq!(out.stats.tokens(), tokens);
        // What a model step runs (no statistics, the plan passed to the grouped GEMMs as it
        // is): the same bits.
        prop_assert_eq!(layer.forward_y(&Cpu, &x, tokens).unwrap(), out.y);
    }

    /// Contiguous and masked layouts give the same output bit for bit (the masked GEMM runs
    /// each expert's live rows through the same kernel; the combine is the same op), and
    /// `Auto` picks by batch size.
    #[test]
    fn masked_layout_equals_contiguous(
        fam in family(),
        path in path(),
        tokens in 0usize..=24,
        seed in any::<u64>(),
    ) {
        let mut cfg = small_cfg(fam, 256, 128, 32, 1, path);
        let w = MoeWeights::random(&cfg, seed).unwrap();
        let x = rand_x(seed, tokens * 256);
        let mut outs = Vec::new();
        for layout in [GroupedLayout::Contiguous, GroupedLayout::Masked, GroupedLayout::Auto { masked_max_tokens: 8 }] {
            cfg.layout = layout;
            let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
            outs.push(layer.forward(&Cpu, &x, tokens).unwrap());
        }
        prop_assert_eq!(&outs[0].y, &outs[1].y);
        prop_assert_eq!(&outs[0].y, &outs[2].y);
        prop_assert_eq!(&outs[0].stats, &outs[1].stats);
    }
}

#[test]
fn zero_tokens_give_empty_output_and_empty_stats() {
    let cfg = small_cfg(Family::V3, 128, 128, 16, 1, GemmPath::Fp8);
    let layer = MoeLayer::new(&Cpu, cfg, &MoeWeights::random(&cfg, 1).unwrap()).unwrap();
    let out = layer.forward(&Cpu, &vec![], 0).unwrap();
    assert!(out.y.is_empty());
    assert_eq!(out.stats.pairs(), 0);
    assert_eq!(out.stats.expert_imbalance(), 1.0);
}

/// The random router bias is large enough to change selections (so tests exercise the
/// noaux_tc bias path), and the weights still come from the unbiased scores.
#[test]
fn random_bias_changes_some_routing() {
    let cfg = small_cfg(Family::V3, 256, 128, 64, 0, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 5).unwrap();
    let no_bias = MoeWeights::new(&cfg, "mlp", w.router().clone(), Some(vec![0.0; 64]), 0, w.experts().to_vec(), None).unwrap();
    let tokens = 32;
    let x = rand_x(9, tokens * 256);
    let route = |w: &MoeWeights| {
        let l = MoeLayer::new(&Cpu, cfg, w).unwrap();
        Cpu.download(&l.route(&Cpu, &x, tokens).unwrap().ids).unwrap()
    };
    let (a, b) = (route(&w), route(&no_bias));
    let differ = a.chunks(8).zip(b.chunks(8)).filter(|(p, q)| p != q).count();
    assert!(differ > 0, "the bias never changed a token's experts");
}

/// Experts sharing one `Arc` are uploaded once and compute what separate copies compute.
#[test]
fn cyclic_shared_expert_weights_upload_once_and_match_copies() {
    let cfg = small_cfg(Family::V3, 256, 128, 32, 1, GemmPath::Reference);
    let w = MoeWeights::random_cyclic(&cfg, 3, 4).unwrap();
    assert_eq!(w.distinct_experts(), 4);
    let copies: Vec<Arc<_>> = w.experts().iter().map(|e| Arc::new((**e).clone())).collect();
    let w2 = MoeWeights::new(&cfg, "mlp", w.router().clone(), w.bias().map(<[f32]>::to_vec), 0, copies, w.shared().cloned()).unwrap();
    assert_eq!(w2.distinct_experts(), 32);
    let (l1, l2) = (MoeLayer::new(&Cpu, cfg, &w).unwrap(), MoeLayer::new(&Cpu, cfg, &w2).unwrap());
    assert_eq!((l1.distinct_experts(), l2.distinct_experts()), (4, 32));
    let x = rand_x(2, 12 * 256);
    assert_eq!(l1.forward(&Cpu, &x, 12).unwrap().y, l2.forward(&Cpu, &x, 12).unwrap().y);
}

/// `forward` = `route` + `forward_routed`; a routing given by the caller runs as given.
#[test]
fn forward_routed_with_given_routing() {
    let cfg = small_cfg(Family::V2Lite, 128, 128, 16, 2, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 4).unwrap();
    let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
    let tokens = 5;
    let x = rand_x(4, tokens * 128);
    let r = layer.route(&Cpu, &x, tokens).unwrap();
    assert_eq!(layer.forward_routed(&Cpu, &x, &r).unwrap().y, layer.forward(&Cpu, &x, tokens).unwrap().y);
    // Every token to experts 0..6 with weight 1/6: the stats say so.
    let r = Routing::<Cpu> { tokens, ids: (0..tokens * 6).map(|p| (p % 6) as u32).collect(), weights: vec![1.0 / 6.0; tokens * 6] };
    let out = layer.forward_routed(&Cpu, &x, &r).unwrap();
    let mut want = [0u64; 16];
    want[..6].fill(tokens as u64);
    assert_eq!(out.stats.per_expert(), &want[..]);
    assert!((out.stats.expert_imbalance() - 16.0 / 6.0).abs() < 1e-12);
}

/// The fp8 GEMM path stays close to the reference path on the whole layer (how the fp8
/// path is validated, docs/model.md §4.5), at a wider model.
#[test]
fn fp8_path_close_to_reference_path() {
    let mut cfg = small_cfg(Family::V3, 1024, 256, 64, 1, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 11).unwrap();
    let tokens = 16;
    let x = rand_x(11, tokens * 1024);
    let y_ref = MoeLayer::new(&Cpu, cfg, &w).unwrap().forward(&Cpu, &x, tokens).unwrap().y;
    cfg.gemm_path = GemmPath::Fp8;
    let y_fp8 = MoeLayer::new(&Cpu, cfg, &w).unwrap().forward(&Cpu, &x, tokens).unwrap().y;
    let d = calc_diff(&y_fp8, &y_ref);
    assert!(d < 1e-3, "calc_diff(fp8, reference) = {d}");
}

/// Experts whose width is not a multiple of 128 run on the fp8 path (zero-padded K of
/// down_proj), close to the reference path, in both grouped layouts; `forward_y` (what a
/// model step runs) gives the same bits as `forward` there too.
#[test]
fn fp8_path_takes_expert_widths_off_the_128_grid() {
    for layout in [GroupedLayout::Contiguous, GroupedLayout::Masked] {
        let mut cfg = small_cfg(Family::V3, 256, 176, 16, 1, GemmPath::Reference);
        cfg.layout = layout;
        let w = MoeWeights::random(&cfg, 5).unwrap();
        let x = rand_x(5, 9 * 256);
        let y_ref = MoeLayer::new(&Cpu, cfg, &w).unwrap().forward(&Cpu, &x, 9).unwrap().y;
        cfg.gemm_path = GemmPath::Fp8;
        let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
        let y_fp8 = layer.forward(&Cpu, &x, 9).unwrap().y;
        let d = calc_diff(&y_fp8, &y_ref);
        assert!(d < 1e-3, "{layout:?}: calc_diff(fp8, reference) = {d}");
        assert_eq!(layer.forward_y(&Cpu, &x, 9).unwrap(), y_fp8, "{layout:?}: forward_y");
    }
}

#[test]
fn load_stats_by_hand() {
    // 4 tokens, top-2, 4 experts on 2 ranks: expert 0 gets 4 rows, 1 gets 3, 2 gets 1, 3 none.
    let ids = [0, 1, 0, 1, 0, 2, 1, 0];
    let s = LoadStats::from_topk_ids(&ids, 4, 2, 4, 2).unwrap();
    assert_eq!(s.per_expert(), &[4, 3, 1, 0]);
    assert_eq!(s.per_rank(), &[7, 1]);
    assert_eq!(s.pairs(), 8);
    assert_eq!(s.active_experts(), 3);
    assert_eq!(s.max_expert_load(), 4);
    assert_eq!(s.expert_imbalance(), 2.0); // 4 / (8/4)
    assert_eq!(s.rank_imbalance(), 1.75); // 7 / (8/2)
    assert_eq!(s.with_ranks(4).unwrap().per_rank(), &[4, 3, 1, 0]);
    let m = LoadStats::merge(&[s.clone(), s.clone()]).unwrap();
    assert_eq!((m.tokens(), m.per_expert()), (8, &[8, 6, 2, 0][..]));
    assert!(s.to_string().contains("3/4 experts active"), "{s}");
}
