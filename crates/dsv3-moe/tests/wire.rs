//! The dispatch on the wire between processes: each token's hidden state crosses to each
//! destination rank once, the receiver rebuilds exactly what was packed, and with V3's
//! group-limited routing a token reaches at most `topk_group` groups of ranks.

mod common;

use common::*;
use dsv3_kernels::a2a::{self, BatchShape, EpLayout};
use dsv3_kernels::backend::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_moe::wire::{crossings, dedup, expand, meta, unmeta};
use dsv3_moe::{MoeLayer, MoeWeights};
use std::collections::BTreeSet;

#[test]
fn dedup_sends_each_token_once_per_rank_and_expand_rebuilds_the_buffer() {
    // 64 experts in 8 groups, top-8 from at most 4 groups: V3's routing at small widths.
    let cfg = small_cfg(Family::V3, 128, 128, 64, 0, GemmPath::Reference);
    let w = MoeWeights::random(&cfg, 5).unwrap();
    let layer = MoeLayer::new(&Cpu, cfg, &w).unwrap();
    let tokens = 37;
    let x = rand_x(9, tokens * 128);
    let r = layer.route(&Cpu, &x, tokens).unwrap();
    let (k, h) = (cfg.route.top_k, cfg.hidden);
    for n_ranks in [1usize, 2, 4, 8, 16, 32] {
        let layout = EpLayout { n_ranks, n_experts: 64 };
        let packed = a2a::pack(&layout, BatchShape { tokens, top_k: k, hidden: h }, &x, &r.ids, &r.weights).unwrap();
        let (rows, unique, repeat) = dedup(&packed.send).unwrap();
        // One row per distinct (token, destination rank).
        let pairs: BTreeSet<(usize, usize)> = r.ids.iter().enumerate().map(|(p, &e)| (p / k, layout.owner(e as usize))).collect();
        assert_eq!(unique.iter().sum::<u32>() as usize, pairs.len(), "R={n_ranks}");
        assert_eq!(rows.len(), pairs.len() * h);
        for (d, &u) in unique.iter().enumerate() {
            assert_eq!(u as usize, pairs.iter().filter(|p| p.1 == d).count(), "R={n_ranks} rank {d}");
        }
        assert_eq!(expand(h, &rows, &repeat, &packed.send.counts).unwrap(), packed.send.rows);
        let m = unmeta(&meta(&packed.send, &repeat)).unwrap();
        assert_eq!((&m.expert, &m.src_slot, &m.repeat), (&packed.send.expert, &packed.send.src_slot, &repeat));
        assert!(m.weight.iter().zip(&packed.send.weight).all(|(a, b)| a.to_bits() == b.to_bits()));
        if n_ranks == 1 {
            assert_eq!(unique, vec![tokens as u32], "one rank: every token once");
        }
        // Group-limited routing: at most topk_group groups of ranks per token (each group of
        // experts on its own ranks when R >= n_group; whole groups per rank otherwise).
        let per_group = (n_ranks / cfg.route.n_group).max(1);
        let (max_ranks, max_groups) = crossings(&layout, &r.ids, k, per_group);
        assert!(max_groups <= cfg.route.topk_group, "R={n_ranks}: a token reaches {max_groups} groups of ranks");
        assert!(max_ranks <= k.min(n_ranks));
    }
}

#[test]
fn malformed_wire_data_is_a_typed_error() {
    assert!(expand(2, &[1.0, 2.0], &[1, 0], &[2]).unwrap_err().to_string().contains("first row is flagged as a repeat"));
    assert!(expand(2, &[1.0, 2.0], &[0, 0], &[2]).unwrap_err().to_string().contains("2 values for 2 distinct rows of 2"));
    assert!(expand(2, &[1.0], &[0], &[1]).unwrap_err().to_string().contains("1 values for 1 distinct rows of 2"));
    assert!(expand(2, &[], &[0], &[2]).unwrap_err().to_string().contains("1 repeat flags for 2 rows"));
    assert!(unmeta(&[1, 2, 3]).unwrap_err().to_string().contains("3 metadata words"));
}
