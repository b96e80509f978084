//! MoE routing and permutation on the GPU against the CPU: `noaux_tc` routing equal to
//! `gating::reference::route` in indices and weights, bit for bit (ties included); permute and
//! weighted un-permute bit-exact; bad input gives the CPU's error.

mod common;
mod cuda_common;

use common::*;
use cuda_common::{gpu, runner, same_bits};
use dsv3_kernels::gating::{self, RouteCfg};
use dsv3_kernels::permute::{self, DispatchPlan, PlanShape};
use proptest::prelude::*;

/// Logits in [-r, r], coarse on every other case so that ties between experts are common.
fn logits(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![vec_f32(n, 6.0), proptest::collection::vec((-8i32..=8).prop_map(|v| v as f32 * 0.25), n)]
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_route_noaux_tc_matches_cpu() {
    let Some(dev) = gpu("cuda_route_noaux_tc_matches_cpu") else { return };
    let cfgs = [RouteCfg::deepseek_v3(), RouteCfg::moonlight(), RouteCfg { norm_topk_prob: false, ..RouteCfg::deepseek_v3() }];
    let strat = (0usize..3, prop_oneof![Just(0usize), Just(1usize), 2usize..=70]).prop_flat_map(move |(c, t)| {
        let n = cfgs[c].n_experts;
        (Just(cfgs[c]), Just(t), logits(t * n), prop_oneof![vec_f32(n, 0.5), Just(vec![0.0; n])])
    });
    runner(48)
        .run(&strat, |(cfg, tokens, l, bias)| {
            let k = cfg.top_k;
            let (mut ic, mut wc) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
            gating::reference::route(&cfg, tokens, &l, Some(&bias), &mut ic, &mut wc).unwrap();
            let (ld, bd) = (dev.upload(&l).unwrap(), dev.upload(&bias).unwrap());
            let (mut id, mut wd) = (dev.zeros::<u32>(ic.len()).unwrap(), dev.zeros::<f32>(wc.len()).unwrap());
            dev.route(&cfg, tokens, &ld, Some(&bd), &mut id, &mut wd).unwrap();
            prop_assert_eq!(dev.download(&id).unwrap(), ic.clone());
            same_bits("weights", &dev.download(&wd).unwrap(), &wc)?;
            if tokens > 0 {
                // Non-finite logits: the CPU's error (lowest token, its first bad expert).
                let mut bad = l.clone();
                bad[(tokens - 1) * cfg.n_experts + 77 % cfg.n_experts] = f32::NAN;
                bad[(tokens - 1) * cfg.n_experts + 5] = f32::INFINITY;
                let cpu_e = gating::route(&cfg, tokens, &bad, Some(&bias), &mut ic, &mut wc).unwrap_err();
                let g = dev.route(&cfg, tokens, &dev.upload(&bad).unwrap(), Some(&bd), &mut id, &mut wd).unwrap_err();
                prop_assert_eq!(g, cpu_e);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_route_rejects_what_it_does_not_implement() {
    let Some(dev) = gpu("cuda_route_rejects_what_it_does_not_implement") else { return };
    let cfg = RouteCfg::deepseek_v2_lite();
    let l = dev.zeros::<f32>(64).unwrap();
    let (mut i, mut w) = (dev.zeros::<u32>(6).unwrap(), dev.zeros::<f32>(6).unwrap());
    assert!(dev.route(&cfg, 1, &l, None, &mut i, &mut w).is_err());
    let v3 = RouteCfg::deepseek_v3();
    let (l, mut i, mut w) = (dev.zeros::<f32>(256).unwrap(), dev.zeros::<u32>(8).unwrap(), dev.zeros::<f32>(8).unwrap());
    assert!(dev.route(&v3, 1, &l, None, &mut i, &mut w).is_err(), "noaux_tc needs a bias");
    let nan_bias = dev.upload(&[f32::NAN; 256]).unwrap();
    assert!(dev.route(&v3, 1, &l, Some(&nan_bias), &mut i, &mut w).is_err());
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_permute_unpermute_match_cpu() {
    let Some(dev) = gpu("cuda_permute_unpermute_match_cpu") else { return };
    let strat = (0usize..=40, proptest::sample::select(&[1usize, 6, 8][..]), proptest::sample::select(&[1usize, 129, 7168][..]))
        .prop_flat_map(|(t, k, h)| {
            (
                Just(PlanShape { tokens: t, top_k: k, n_experts: 256 }),
                proptest::collection::vec(0u32..256, t * k),
                vec_f32(t * h, 3.0),
                vec_f32(t * k * h, 3.0),
                vec_f32(t * k, 1.0),
                Just(h),
            )
        });
    runner(24)
        .run(&strat, |(shape, ids, x, y, w, h)| {
            let plan = DispatchPlan::build(shape, &ids).unwrap();
            let pd = dev.upload_plan(&plan).unwrap();
            let mut cpu = vec![0f32; plan.rows() * h];
            permute::permute(&plan, h, &x, &mut cpu).unwrap();
            let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
            dev.permute(&pd, h, &dev.upload(&x).unwrap(), &mut od).unwrap();
            same_bits("permute", &dev.download(&od).unwrap(), &cpu)?;
            let mut cpu = vec![0f32; shape.tokens * h];
            permute::reference::unpermute(&plan, h, &y, &w, &mut cpu).unwrap();
            let mut od = dev.zeros::<f32>(cpu.len()).unwrap();
            dev.unpermute(&pd, h, &dev.upload(&y).unwrap(), &dev.upload(&w).unwrap(), &mut od).unwrap();
            same_bits("unpermute", &dev.download(&od).unwrap(), &cpu)?;
            Ok(())
        })
        .unwrap();
}
