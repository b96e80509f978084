//! Expert parallelism: R ranks in one process (threads over the in-process transport) give
//! what one rank gives.
//!
//! Tolerance: the routed part is **bit-identical** for every R (each expert receives the same
//! rows in the same order, every kernel works row by row, and the combine adds the same
//! products in the same order), so without shared experts the outputs are compared exactly.
//! The shared experts run on T/R tokens per rank instead of T, and the CPU GEMM sums a block
//! of <= 8 rows (matrix-vector kernel) in another order than a larger block (tiled kernel):
//! with shared experts the bound is the MoE layer's against its reference (`assert_close`,
//! stated in tests/moe.rs): float reassociation, 1e-5 of max |y|, on the reference path
//! (observed up to 4e-7); on the fp8 path a last-bit difference can also flip the E4M3
//! re-quantisation of one intermediate value (seen: 1.2e-4 of max |y| at 9 tokens on 2 ranks).

mod common;

use common::*;
use dsv3_kernels::a2a::EpLayout;
use dsv3_kernels::backend::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::{GroupedLayout, InProcessTransport, LoadStats, MoeError, MoeLayer, MoeWeights, forward_in_process, token_split};
use proptest::prelude::*;

fn ranks(cfg: dsv3_moe::MoeConfig, w: &MoeWeights, n: usize) -> Vec<MoeLayer<Cpu>> {
    let layout = EpLayout { n_ranks: n, n_experts: cfg.n_routed_experts };
    (0..n).map(|r| MoeLayer::new_rank(&Cpu, cfg, &w.shard(&cfg, n, r).unwrap(), layout, r).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn ep_ranks_equal_one_rank(
        fam in prop_oneof![Just(Family::V3), Just(Family::V2Lite), Just(Family::Moonlight)],
        path in prop_oneof![Just(GemmPath::Reference), Just(GemmPath::Fp8)],
        n_shared in 0usize..=1,
        tokens in 0usize..=40,
        masked in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut cfg = small_cfg(fam, 256, 128, 32, n_shared, path);
        if masked {
            cfg.layout = GroupedLayout::Auto { masked_max_tokens: 16 };
        }
        let w = MoeWeights::random(&cfg, seed).unwrap();
        let x = rand_x(seed ^ 3, tokens * 256);
        let single = MoeLayer::new(&Cpu, cfg, &w).unwrap().forward(&Cpu, &x, tokens).unwrap();
        for n in [1usize, 2, 4, 8] {
            let (y, stats) = forward_in_process(&Cpu, &ranks(cfg, &w, n), &x, tokens).unwrap();
            if n_shared == 0 {
                prop_assert!(y == single.y, "R={n}: routed output differs from one rank");
            } else {
                assert_close(&y, &single.y, path, &format!("R={n}"));
            }
            prop_assert_eq!(stats.per_expert(), single.stats.per_expert());
            prop_assert_eq!(stats.tokens(), tokens);
            prop_assert_eq!(&stats, &single.stats.with_ranks(n).unwrap());
        }
    }
}

/// Per-rank loads equal the rows each rank's experts get, counted from the single-rank
/// routing grouped by owner.
#[test]
fn per_rank_load_is_rows_per_owner() {
    let cfg = small_cfg(Family::V3, 128, 128, 64, 1, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 8).unwrap();
    let tokens = 33;
    let x = rand_x(8, tokens * 128);
    let single = MoeLayer::new(&Cpu, cfg, &w).unwrap();
    let r = single.route(&Cpu, &x, tokens).unwrap();
    let (_, stats) = forward_in_process(&Cpu, &ranks(cfg, &w, 4), &x, tokens).unwrap();
    let mut want = [0u64; 4];
    for &e in &r.ids {
        want[e as usize / 16] += 1;
    }
    assert_eq!(stats.per_rank(), &want);
    assert_eq!(want.iter().sum::<u64>(), (tokens * 8) as u64);
    let max = *want.iter().max().unwrap() as f64;
    assert!((stats.rank_imbalance() - max / (tokens * 8) as f64 * 4.0).abs() < 1e-12);
}

#[test]
fn token_split_is_contiguous_and_balanced() {
    for tokens in 0..20 {
        for n in 1..=8 {
            let parts: Vec<_> = (0..n).map(|r| token_split(tokens, n, r)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[n - 1].end, tokens);
            assert!(parts.windows(2).all(|p| p[0].end == p[1].start && p[0].len() >= p[1].len() && p[0].len() <= p[1].len() + 1));
        }
    }
}

/// A rank that fails before the dispatch releases its peers (no hang) and its own error is
/// what the caller sees.
#[test]
fn failing_rank_releases_peers_and_reports_its_error() {
    let cfg = small_cfg(Family::V3, 128, 128, 16, 1, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 2).unwrap();
    let tokens = 8;
    let mut x = rand_x(2, tokens * 128);
    x[5 * 128 + 3] = f32::NAN; // token 5 lands on rank 2 of 4: its router logits are NaN
    let err = forward_in_process(&Cpu, &ranks(cfg, &w, 4), &x, tokens).unwrap_err();
    assert!(matches!(err, MoeError::Kernel(_)), "{err}");
    assert!(err.to_string().contains("non-finite logit"), "{err}");
}

/// The transport checks: a layer run with another rank's endpoint is refused; an aborted
/// group fails later collectives.
#[test]
fn transport_mismatch_and_abort() {
    let cfg = small_cfg(Family::V3, 128, 128, 16, 0, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 2).unwrap();
    let layers = ranks(cfg, &w, 2);
    let group = InProcessTransport::group(2).unwrap();
    let x = rand_x(1, 128);
    let err = layers[0].forward_ep(&Cpu, &group[1], &x, 1).unwrap_err();
    assert!(matches!(err, MoeError::Input { what: "transport", .. }), "{err}");
    group[1].abort("test");
    let err = layers[0].forward_ep(&Cpu, &group[0], &x, 1).unwrap_err();
    assert!(matches!(err, MoeError::Transport { rank: 0, .. }), "{err}");
    assert!(InProcessTransport::group(0).is_err());
}

/// Statistics of all ranks merge into the whole batch's.
#[test]
fn rank_stats_merge() {
    let a = LoadStats::from_topk_ids(&[0, 1, 2, 3], 2, 2, 4, 2).unwrap();
    let b = LoadStats::from_topk_ids(&[3, 2], 1, 2, 4, 2).unwrap();
    let m = LoadStats::merge(&[a, b]).unwrap();
    assert_eq!((m.tokens(), m.per_expert(), m.per_rank()), (3, &[1, 1, 2, 2][..], &[2, 4][..]));
}
