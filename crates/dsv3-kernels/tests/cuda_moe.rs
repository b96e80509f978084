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

/// The softmax methods (`dsv3_route_softmax`): V2-Lite's greedy and V2's group-limited
/// routing, plus small configs at the kernel's edges, bit-exact with the reference.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_route_softmax_matches_cpu() {
    let Some(dev) = gpu("cuda_route_softmax_matches_cpu") else { return };
    use dsv3_kernels::gating::RouteMethod;
    let cfgs = [
        RouteCfg::deepseek_v2_lite(),
        RouteCfg::deepseek_v2(),
        RouteCfg { norm_topk_prob: true, ..RouteCfg::deepseek_v2() },
        RouteCfg {
            n_experts: 256,
            top_k: 32,
            n_group: 32,
            topk_group: 5,
            method: RouteMethod::GroupLimitedGreedy,
            ..RouteCfg::deepseek_v2()
        },
        RouteCfg { n_experts: 3, top_k: 3, n_group: 1, topk_group: 1, ..RouteCfg::deepseek_v2_lite() },
        RouteCfg { n_experts: 256, top_k: 1, ..RouteCfg::deepseek_v2_lite() },
    ];
    let strat = (0usize..cfgs.len(), prop_oneof![Just(0usize), Just(1usize), 2usize..=70]).prop_flat_map(move |(c, t)| {
        let n = cfgs[c].n_experts;
        (Just(cfgs[c]), Just(t), logits(t * n))
    });
    runner(48)
        .run(&strat, |(cfg, tokens, l)| {
            let k = cfg.top_k;
            let (mut ic, mut wc) = (vec![0u32; tokens * k], vec![0f32; tokens * k]);
            gating::reference::route(&cfg, tokens, &l, None, &mut ic, &mut wc).unwrap();
            let ld = dev.upload(&l).unwrap();
            let (mut id, mut wd) = (dev.zeros::<u32>(ic.len()).unwrap(), dev.zeros::<f32>(wc.len()).unwrap());
            dev.route(&cfg, tokens, &ld, None, &mut id, &mut wd).unwrap();
            prop_assert_eq!(dev.download(&id).unwrap(), ic.clone());
            same_bits("weights", &dev.download(&wd).unwrap(), &wc)?;
            if tokens > 0 {
                let mut bad = l.clone();
                bad[(tokens - 1) * cfg.n_experts + cfg.n_experts - 1] = f32::NEG_INFINITY;
                let cpu_e = gating::route(&cfg, tokens, &bad, None, &mut ic, &mut wc).unwrap_err();
                let g = dev.route(&cfg, tokens, &dev.upload(&bad).unwrap(), None, &mut id, &mut wd).unwrap_err();
                prop_assert_eq!(g, cpu_e);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_route_rejects_bad_input_as_cpu() {
    let Some(dev) = gpu("cuda_route_rejects_bad_input_as_cpu") else { return };
    let v3 = RouteCfg::deepseek_v3();
    let (l, mut i, mut w) = (dev.zeros::<f32>(256).unwrap(), dev.zeros::<u32>(8).unwrap(), dev.zeros::<f32>(8).unwrap());
    let (mut ic, mut wc) = (vec![0u32; 8], vec![0f32; 8]);
    let cpu = gating::route(&v3, 1, &[0.0; 256], None, &mut ic, &mut wc).unwrap_err();
    assert_eq!(dev.route(&v3, 1, &l, None, &mut i, &mut w).unwrap_err(), cpu, "noaux_tc needs a bias");
    let cpu = gating::route(&v3, 1, &[0.0; 256], Some(&[f32::NAN; 256]), &mut ic, &mut wc).unwrap_err();
    let nan_bias = dev.upload(&[f32::NAN; 256]).unwrap();
    assert_eq!(dev.route(&v3, 1, &l, Some(&nan_bias), &mut i, &mut w).unwrap_err(), cpu);
    let lite = RouteCfg::deepseek_v2_lite();
    let (l64, mut i6, mut w6) = (dev.zeros::<f32>(64).unwrap(), dev.zeros::<u32>(6).unwrap(), dev.zeros::<f32>(6).unwrap());
    let cpu = gating::route(&lite, 1, &[0.0; 64], Some(&[0.0; 64]), &mut [0; 6], &mut [0.0; 6]).unwrap_err();
    let zero_bias = dev.zeros::<f32>(64).unwrap();
    assert_eq!(dev.route(&lite, 1, &l64, Some(&zero_bias), &mut i6, &mut w6).unwrap_err(), cpu, "only noaux_tc takes a bias");
    let cpu = gating::route(&lite, 2, &[0.0; 64], None, &mut [0; 6], &mut [0.0; 6]).unwrap_err();
    assert_eq!(dev.route(&lite, 2, &l64, None, &mut i6, &mut w6).unwrap_err(), cpu, "lengths");
    // Past the kernels' limits (valid for the CPU): a typed shape error, never a wrong answer.
    let big = RouteCfg { n_experts: 512, ..RouteCfg::deepseek_v2_lite() };
    let (l512, mut i, mut w) = (dev.zeros::<f32>(512).unwrap(), dev.zeros::<u32>(6).unwrap(), dev.zeros::<f32>(6).unwrap());
    assert!(matches!(dev.route(&big, 1, &l512, None, &mut i, &mut w), Err(dsv3_kernels::KernelError::Shape { .. })));
}

/// `dsv3_dispatch_plan` against `DispatchPlan::build`: every table equal (a stable counting
/// sort), empty and one-token batches, V3's 256 experts and a single expert; a bad id is the
/// CPU's error.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_dispatch_plan_matches_cpu() {
    let Some(dev) = gpu("cuda_dispatch_plan_matches_cpu") else { return };
    let strat = (
        prop_oneof![Just(0usize), Just(1usize), 2usize..=300, Just(4096usize)],
        proptest::sample::select(&[1usize, 6, 8][..]),
        proptest::sample::select(&[1usize, 8, 256][..]),
    )
        .prop_flat_map(|(t, k, e)| {
            (Just(PlanShape { tokens: t, top_k: k, n_experts: e }), proptest::collection::vec(0u32..e as u32, t * k))
        });
    runner(32)
        .run(&strat, |(shape, ids)| {
            let cpu = DispatchPlan::build(shape, &ids).unwrap();
            let idd = dev.upload(&ids).unwrap();
            let p = dev.dispatch_plan(shape, &idd).unwrap();
            prop_assert_eq!(p.shape(), shape);
            prop_assert_eq!(dev.download(p.counts()).unwrap(), cpu.counts().to_vec());
            prop_assert_eq!(dev.download(p.offsets()).unwrap(), cpu.offsets().to_vec());
            prop_assert_eq!(dev.download(p.slot_of()).unwrap(), cpu.slot_of().to_vec());
            prop_assert_eq!(dev.download(p.token_of_slot()).unwrap(), cpu.token_of_slot().to_vec());
            prop_assert_eq!(dev.download(p.pair_of_slot()).unwrap(), cpu.pair_of_slot().to_vec());
            prop_assert_eq!(dev.download(&dev.plan_offsets(&p).unwrap()).unwrap(), cpu.offsets().to_vec());
            if !ids.is_empty() {
                let mut bad = ids.clone();
                let j = bad.len() / 2;
                bad[j] = shape.n_experts as u32;
                *bad.last_mut().unwrap() = u32::MAX;
                let cpu_e = DispatchPlan::build(shape, &bad).unwrap_err();
                prop_assert_eq!(dev.dispatch_plan(shape, &dev.upload(&bad).unwrap()).unwrap_err(), cpu_e);
            }
            Ok(())
        })
        .unwrap();
    let e = dev.dispatch_plan(PlanShape { tokens: 2, top_k: 0, n_experts: 4 }, &dev.zeros::<u32>(0).unwrap()).unwrap_err();
    assert_eq!(e, DispatchPlan::build(PlanShape { tokens: 2, top_k: 0, n_experts: 4 }, &[]).unwrap_err());
}

/// Expert-parallel packing on the device against `a2a` on the host, step by step and bit for
/// bit, for 1, 2 and 4 ranks: pack, (host exchange), unpack, experts, pack_return, (host
/// exchange), combine; the N-rank result equals one rank's unpermute.
#[test]
#[ignore = "needs a GPU; run with --run-ignored"]
fn cuda_a2a_matches_cpu() {
    let Some(dev) = gpu("cuda_a2a_matches_cpu") else { return };
    use dsv3_kernels::a2a::{self, BatchShape, EpLayout};
    let strat = (
        proptest::sample::select(&[1usize, 2, 4][..]),
        proptest::sample::select(&[8usize, 256][..]),
        1usize..=8,
        proptest::sample::select(&[1usize, 129][..]),
    )
        .prop_flat_map(|(r, e, k, h)| (Just((r, e, k.min(e), h)), proptest::collection::vec(0usize..=12, r)));
    runner(16)
        .run(&strat, |((n_ranks, n_experts, top_k, hidden), tokens)| {
            let layout = EpLayout { n_ranks, n_experts };
            let mut seed = 0x1234_5678u64 ^ (n_ranks * 1000 + top_k) as u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut host_packed = Vec::new();
            let mut dev_packed = Vec::new();
            let mut inputs = Vec::new();
            for &t in &tokens {
                let shape = BatchShape { tokens: t, top_k, hidden };
                let x: Vec<f32> = (0..t * hidden).map(|_| (next() % 2001) as f32 / 500.0 - 2.0).collect();
                let ids: Vec<u32> = (0..t * top_k).map(|_| (next() % n_experts as u64) as u32).collect();
                let w: Vec<f32> = (0..t * top_k).map(|_| (next() % 1000) as f32 / 999.0).collect();
                let hp = a2a::pack(&layout, shape, &x, &ids, &w).unwrap();
                let (xd, idd, wd) = (dev.upload(&x).unwrap(), dev.upload(&ids).unwrap(), dev.upload(&w).unwrap());
                let dp = dev.a2a_pack(&layout, shape, &xd, &idd, &wd).unwrap();
                prop_assert_eq!(&dev.download_dispatch(&dp.send).unwrap(), &hp.send);
                if !ids.is_empty() {
                    let mut bad = ids.clone();
                    bad[0] = n_experts as u32;
                    let cpu_e = a2a::pack(&layout, shape, &x, &bad, &w).unwrap_err();
                    prop_assert_eq!(dev.a2a_pack(&layout, shape, &xd, &dev.upload(&bad).unwrap(), &wd).unwrap_err(), cpu_e);
                }
                host_packed.push(hp);
                dev_packed.push(dp);
                inputs.push((x, ids, w, wd));
            }
            let sends: Vec<_> = host_packed.iter().map(|p| p.send.clone()).collect();
            let recv = a2a::exchange_dispatch(&sends).unwrap();
            let mut returns = Vec::new();
            for (rank, rb) in recv.iter().enumerate() {
                let hu = a2a::unpack(&layout, rank, rb).unwrap();
                let du = dev.a2a_unpack(&layout, rank, &dev.upload_dispatch(rb).unwrap()).unwrap();
                prop_assert_eq!(dev.download(&du.input).unwrap(), hu.input.clone());
                prop_assert_eq!(dev.download(&du.expert).unwrap(), hu.expert.clone());
                prop_assert_eq!(dev.download(&du.weight).unwrap(), hu.weight.clone());
                prop_assert_eq!(dev.download(du.plan.offsets()).unwrap(), hu.plan.offsets().to_vec());
                // Experts: y = 2x + expert id (enough to see rows move with their ids).
                let y: Vec<f32> =
                    hu.input.chunks(hidden).zip(&hu.expert).flat_map(|(r, &e)| r.iter().map(move |v| 2.0 * v + e as f32)).collect();
                let hr = hu.pack_return(&y).unwrap();
                let dr = dev.a2a_pack_return(&du, &dev.upload(&y).unwrap()).unwrap();
                prop_assert_eq!(&dev.download_combine(&dr).unwrap(), &hr);
                if !rb.is_empty() && n_ranks > 1 {
                    let mut wrong = rb.clone();
                    wrong.expert[rb.len() - 1] = ((rank + 1) % n_ranks * (n_experts / n_ranks)) as u32;
                    let cpu_e = a2a::unpack(&layout, rank, &wrong).unwrap_err();
                    prop_assert_eq!(dev.a2a_unpack(&layout, rank, &dev.upload_dispatch(&wrong).unwrap()).unwrap_err(), cpu_e);
                }
                returns.push(hr);
            }
            let back = a2a::exchange_combine(&returns).unwrap();
            for (rank, rb) in back.iter().enumerate() {
                let (x, _, w, wd) = &inputs[rank];
                let mut cpu = vec![0f32; x.len()];
                a2a::combine(&host_packed[rank], rb, w, &mut cpu).unwrap();
                let mut od = dev.zeros::<f32>(x.len()).unwrap();
                dev.a2a_combine(&dev_packed[rank], &dev.upload_combine(rb).unwrap(), wd, &mut od).unwrap();
                same_bits("combine", &dev.download(&od).unwrap(), &cpu)?;
            }
            Ok(())
        })
        .unwrap();
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
