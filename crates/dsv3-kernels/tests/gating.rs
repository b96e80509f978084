//! Property and hand-worked tests of MoE routing: fast == reference, the routing invariants
//! (kept groups, no duplicates, renormalised sums, lowest-index ties), and bad input.

mod common;

use dsv3_kernels::KernelError;
use dsv3_kernels::gating::{self, RouteCfg, RouteMethod, reference};
use proptest::prelude::*;

type Routed = (Vec<u32>, Vec<f32>);

fn run_fast(cfg: &RouteCfg, t: usize, l: &[f32], b: Option<&[f32]>) -> Result<Routed, KernelError> {
    let mut i = vec![u32::MAX; t * cfg.top_k];
    let mut w = vec![f32::NAN; t * cfg.top_k];
    gating::route(cfg, t, l, b, &mut i, &mut w).map(|_| (i, w))
}

fn run_ref(cfg: &RouteCfg, t: usize, l: &[f32], b: Option<&[f32]>) -> Result<Routed, KernelError> {
    let mut i = vec![u32::MAX; t * cfg.top_k];
    let mut w = vec![f32::NAN; t * cfg.top_k];
    reference::route(cfg, t, l, b, &mut i, &mut w).map(|_| (i, w))
}

fn bias_for(cfg: &RouteCfg, b: &[f32]) -> Option<Vec<f32>> {
    (cfg.method == RouteMethod::NoauxTc).then(|| b[..cfg.n_experts].to_vec())
}

/// The selection scores of one token, recomputed here from the public scalar functions.
fn selection(cfg: &RouteCfg, row: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    match cfg.method {
        RouteMethod::NoauxTc => row.iter().zip(bias.unwrap()).map(|(&l, b)| gating::sigmoid(l) + b).collect(),
        _ => {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|&l| gating::exp(l - m)).collect();
            let s: f32 = e.iter().fold(0.0, |a, &b| a + b);
            e.iter().map(|v| v / s).collect()
        }
    }
}

/// Kept groups of one token (independent recomputation), with ties to the lowest group.
fn kept_groups(cfg: &RouteCfg, sel: &[f32]) -> Vec<bool> {
    if !cfg.uses_groups() {
        return vec![true; cfg.n_group];
    }
    let gs = cfg.group_size();
    let score: Vec<f32> = (0..cfg.n_group)
        .map(|g| {
            let mut v = sel[g * gs..(g + 1) * gs].to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            if cfg.method == RouteMethod::NoauxTc { v[0] + v[1] } else { v[0] }
        })
        .collect();
    let mut keep = vec![false; cfg.n_group];
    for _ in 0..cfg.topk_group {
        // The best group not yet kept; strict > keeps the lowest index among equals.
        let mut best = None;
        for g in 0..cfg.n_group {
            if !keep[g] && best.is_none_or(|b: usize| score[g] > score[b]) {
                best = Some(g);
            }
        }
        keep[best.unwrap()] = true;
    }
    keep
}

/// Checks every routing invariant of one routed batch.
fn check_invariants(cfg: &RouteCfg, t: usize, l: &[f32], b: Option<&[f32]>, (idx, w): &Routed) -> Result<(), TestCaseError> {
    let (n, k) = (cfg.n_experts, cfg.top_k);
    for tok in 0..t {
        let sel = selection(cfg, &l[tok * n..(tok + 1) * n], b);
        let keep = kept_groups(cfg, &sel);
        let ids = &idx[tok * k..(tok + 1) * k];
        let mut seen = vec![false; n];
        for &e in ids {
            let e = e as usize;
            prop_assert!(e < n, "token {tok}: expert {e} out of range");
            prop_assert!(!seen[e], "token {tok}: duplicate expert {e}");
            seen[e] = true;
            prop_assert!(keep[e / cfg.group_size()], "token {tok}: expert {e} outside the kept groups");
        }
        // Output order: descending selection score, ties by ascending index.
        for p in ids.windows(2) {
            let (a, c) = (p[0] as usize, p[1] as usize);
            prop_assert!(sel[a] > sel[c] || (sel[a] == sel[c] && a < c), "token {tok}: order {a} then {c}");
        }
        // Nothing allowed and unchosen beats the last chosen; equal ones have higher indices.
        let last = *ids.last().unwrap() as usize;
        for e in 0..n {
            if keep[e / cfg.group_size()] && !seen[e] {
                prop_assert!(sel[e] < sel[last] || (sel[e] == sel[last] && e > last), "token {tok}: expert {e} should win");
            }
        }
        let ws = &w[tok * k..(tok + 1) * k];
        if cfg.norm_topk_prob {
            let s: f32 = ws.iter().sum();
            let r = cfg.routed_scaling_factor;
            prop_assert!((s - r).abs() <= 1e-5 * r, "token {tok}: weights sum {s} != {r}");
        }
        prop_assert!(ws.iter().all(|v| v.is_finite() && *v >= 0.0));
    }
    Ok(())
}

fn assert_same(a: &Routed, b: &Routed) -> Result<(), TestCaseError> {
    prop_assert_eq!(&a.0, &b.0);
    for (x, y) in a.1.iter().zip(&b.1) {
        prop_assert!((x - y).abs() <= 1e-6 * x.abs().max(y.abs()), "weights {x} vs {y}");
    }
    Ok(())
}

fn check_all(cfg: &RouteCfg, t: usize, l: &[f32], bias: &[f32]) -> Result<(), TestCaseError> {
    let b = bias_for(cfg, bias);
    let fast = run_fast(cfg, t, l, b.as_deref()).unwrap();
    let slow = run_ref(cfg, t, l, b.as_deref()).unwrap();
    assert_same(&fast, &slow)?;
    check_invariants(cfg, t, l, b.as_deref(), &slow)
}

/// Tokens around the parallel threshold (2 * 8192 / n_experts tokens) included.
fn tokens() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..8, 60usize..140, Just(0usize)]
}

fn logits_and_bias(n: usize, max_t: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (common::vec_f32(max_t * n, 6.0), common::vec_f32(n, 0.5))
}

/// Logits from a tiny integer set and bias from {0, 0.25}: ties everywhere.
fn tie_data(n: usize, max_t: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (
        proptest::collection::vec((-1i32..=1).prop_map(|v| v as f32), max_t * n),
        proptest::collection::vec(prop_oneof![Just(0.0f32), Just(0.25f32)], n),
    )
}

fn presets() -> Vec<RouteCfg> {
    vec![RouteCfg::deepseek_v3(), RouteCfg::deepseek_v2_lite(), RouteCfg::deepseek_v2(), RouteCfg::moonlight()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn presets_match_reference(t in tokens(), (l, b) in logits_and_bias(256, 140)) {
        for cfg in presets() {
            check_all(&cfg, t, &l[..t * cfg.n_experts], &b)?;
        }
    }

    #[test]
    fn presets_with_ties(t in tokens(), (l, b) in tie_data(256, 140)) {
        for cfg in presets() {
            check_all(&cfg, t, &l[..t * cfg.n_experts], &b)?;
        }
    }

    #[test]
    fn random_configs(
        (cfg, t, l, b) in (1usize..=8, 1usize..=8, 0usize..3, any::<bool>(), 0.1f32..20.0)
            .prop_flat_map(|(ng, gs, m, norm, scale)| {
                let method = [RouteMethod::NoauxTc, RouteMethod::SoftmaxGreedy, RouteMethod::GroupLimitedGreedy][m];
                let gs = if method == RouteMethod::NoauxTc { gs.max(2) } else { gs };
                (Just((ng, gs, method, norm, scale)), 1..=ng)
            })
            .prop_flat_map(|((ng, gs, method, norm, scale), tg)| {
                let avail = if method == RouteMethod::SoftmaxGreedy { ng * gs } else { tg * gs };
                let cfg = move |k| RouteCfg { n_experts: ng * gs, top_k: k, n_group: ng, topk_group: tg, method,
                    norm_topk_prob: norm, routed_scaling_factor: scale };
                ((1..=avail).prop_map(cfg), 1usize..700)
            })
            .prop_flat_map(|(cfg, t)| {
                let n = cfg.n_experts;
                let data = prop_oneof![logits_and_bias(n, t), tie_data(n, t)];
                (Just(cfg), Just(t), data).prop_map(|(c, t, (l, b))| (c, t, l, b))
            })
    ) {
        check_all(&cfg, t, &l, &b)?;
    }
}

#[test]
fn exp_and_sigmoid_are_accurate() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let e = gating::exp(x) as f64;
        let want = (x as f64).exp();
        assert!(((e - want) / want).abs() < 3e-7, "exp({x}) = {e}, want {want}");
        let s = gating::sigmoid(x) as f64;
        let want = 1.0 / (1.0 + (-(x as f64)).exp());
        assert!(((s - want) / want).abs() < 5e-7, "sigmoid({x}) = {s}, want {want}");
        x += 0.0137;
    }
    assert_eq!(gating::exp(0.0), 1.0);
    assert!(gating::exp(-1e30) > 0.0 && gating::exp(1e30).is_finite());
    assert!(gating::sigmoid(-1e30) >= 0.0 && gating::sigmoid(1e30) == 1.0);
}

fn small(method: RouteMethod, n_group: usize, topk_group: usize, top_k: usize, norm: bool) -> RouteCfg {
    RouteCfg { n_experts: 8, top_k, n_group, topk_group, method, norm_topk_prob: norm, routed_scaling_factor: 1.0 }
}

fn both(cfg: &RouteCfg, l: &[f32], b: Option<&[f32]>) -> Routed {
    let t = l.len() / cfg.n_experts;
    let fast = run_fast(cfg, t, l, b).unwrap();
    let slow = run_ref(cfg, t, l, b).unwrap();
    assert_eq!(fast.0, slow.0);
    assert_eq!(fast.1, slow.1);
    fast
}

#[test]
fn hand_worked_noaux_tc() {
    let s = gating::sigmoid;
    let cfg = small(RouteMethod::NoauxTc, 4, 2, 3, true);
    let l = [0.0, 3.0, 1.0, 1.0, -2.0, 5.0, 2.0, -1.0];
    // Groups (top-2 sums): g0 = s(0)+s(3) = 1.4526, g1 = 2 s(1) = 1.4621, g2 = s(-2)+s(5) =
    // 1.1125, g3 = s(2)+s(-1) = 1.1497. Kept: g1, g0, so expert 5 (the largest logit) is out.
    // Top-3 of {0,1,2,3}: 1, then 2 and 3 tie -> 2 first.
    let (i, w) = both(&cfg, &l, Some(&[0.0; 8]));
    assert_eq!(i, [1, 2, 3]);
    let sum = s(3.0) + s(1.0) + s(1.0);
    let want = [s(3.0) / sum, s(1.0) / sum, s(1.0) / sum];
    assert!(common::max_abs_diff(&w, &want) < 1e-6, "{w:?} vs {want:?}");

    // Bias on expert 6 lifts g3 to 1.6497: kept g3, g1; selection 6 (1.3808), 2, 3. The
    // weights stay the unbiased sigmoids.
    let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0];
    let (i, w) = both(&RouteCfg { norm_topk_prob: false, routed_scaling_factor: 2.0, ..cfg }, &l, Some(&bias));
    assert_eq!(i, [6, 2, 3]);
    assert!(common::max_abs_diff(&w, &[2.0 * s(2.0), 2.0 * s(1.0), 2.0 * s(1.0)]) < 1e-6);

    // All equal: groups tie -> g0, g1 kept; experts tie -> 0, 1, 2.
    let (i, _) = both(&cfg, &[0.5; 8], Some(&[0.0; 8]));
    assert_eq!(i, [0, 1, 2]);

    // Negative biased scores with the official -inf mask: a masked expert never wins even
    // though every allowed score is below 0 (HF's 0.0 mask would admit one).
    let (i, _) = both(&small(RouteMethod::NoauxTc, 4, 1, 2, true), &[0.0; 8], Some(&[-5.0, -5.0, -1.0, -1.0, -2.0, -2.0, -3.0, -3.0]));
    assert_eq!(i, [2, 3]);
}

#[test]
fn hand_worked_softmax() {
    // V2-Lite style greedy top-2: 1 and 2 tie at 3 -> [1, 2]; weights are the softmax values.
    let cfg = RouteCfg { n_experts: 4, ..small(RouteMethod::SoftmaxGreedy, 1, 1, 2, false) };
    let (i, w) = both(&cfg, &[1.0, 3.0, 3.0, 0.0], None);
    assert_eq!(i, [1, 2]);
    let z = 1f64.exp() + 2.0 * 3f64.exp() + 1.0;
    let p = (3f64.exp() / z) as f32;
    assert!(common::max_abs_diff(&w, &[p, p]) < 1e-6);

    // V2 group-limited: group maxima 4, 3, 5, 1 -> keep g2, g0 -> experts 4, 1.
    let cfg = small(RouteMethod::GroupLimitedGreedy, 4, 2, 2, false);
    let (i, _) = both(&cfg, &[0.0, 4.0, 3.0, 3.0, 5.0, -9.0, 1.0, 1.0], None);
    assert_eq!(i, [4, 1]);
    // With the greedy method the same logits pick 4 then 1 too, but 2 / 3 are reachable:
    let (i, _) = both(&small(RouteMethod::SoftmaxGreedy, 4, 2, 4, false), &[0.0, 4.0, 3.0, 3.0, 5.0, -9.0, 1.0, 1.0], None);
    assert_eq!(i, [4, 1, 2, 3]);
}

#[test]
fn non_finite_logits_are_a_typed_error() {
    let cfg = RouteCfg::deepseek_v3();
    let b = vec![0.0; 256];
    for t in [1usize, 10, 200] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut l = vec![0.1; t * 256];
            let tok = t / 2;
            l[tok * 256 + 5] = bad;
            if t > 100 {
                l[(t - 1) * 256 + 9] = f32::NAN; // a later bad token must not be the one named
            }
            for r in [run_fast(&cfg, t, &l, Some(&b)), run_ref(&cfg, t, &l, Some(&b))] {
                match r {
                    Err(KernelError::Invalid { what: "logits", detail, .. }) => {
                        assert!(detail.contains(&format!("token {tok}, expert 5")), "{detail}")
                    }
                    other => panic!("expected an error naming token {tok}, got {other:?}"),
                }
            }
        }
    }
    // Softmax too.
    let cfg = RouteCfg::deepseek_v2_lite();
    assert!(run_fast(&cfg, 1, &[f32::NAN; 64], None).is_err());
    assert!(run_ref(&cfg, 1, &[f32::NAN; 64], None).is_err());
}

#[test]
fn bad_configs_and_shapes_are_errors() {
    let v3 = RouteCfg::deepseek_v3();
    let bad_cfgs = [
        RouteCfg { n_group: 7, ..v3 },
        RouteCfg { n_group: 0, ..v3 },
        RouteCfg { topk_group: 9, ..v3 },
        RouteCfg { topk_group: 0, ..v3 },
        RouteCfg { top_k: 0, ..v3 },
        RouteCfg { top_k: 129, ..v3 },
        RouteCfg { n_experts: 0, ..v3 },
        RouteCfg { n_group: 256, topk_group: 256, ..v3 }, // group of 1: no top-2
        RouteCfg { routed_scaling_factor: f32::NAN, ..v3 },
        RouteCfg { routed_scaling_factor: 0.0, ..v3 },
        RouteCfg { top_k: 65, ..RouteCfg::deepseek_v2_lite() },
        RouteCfg { top_k: 61, ..RouteCfg::deepseek_v2() },
    ];
    let l = vec![0.0; 4 * 256];
    let b = vec![0.0; 256];
    for cfg in bad_cfgs {
        assert!(cfg.validate().is_err(), "{cfg:?}");
        let mut i = vec![0; 4 * cfg.top_k];
        let mut w = vec![0.0; 4 * cfg.top_k];
        let l = &l[..(4 * cfg.n_experts).min(l.len())];
        let b = &b[..cfg.n_experts.min(256)];
        assert!(gating::route(&cfg, 4, l, Some(b), &mut i, &mut w).is_err(), "{cfg:?}");
        assert!(reference::route(&cfg, 4, l, Some(b), &mut i, &mut w).is_err(), "{cfg:?}");
    }
    // A greedy config ignores groups for the top-k bound.
    assert!(RouteCfg { top_k: 64, ..RouteCfg::deepseek_v2_lite() }.validate().is_ok());

    let mut i = vec![0; 32];
    let mut w = vec![0.0; 32];
    type F = fn(&RouteCfg, usize, &[f32], Option<&[f32]>, &mut [u32], &mut [f32]) -> dsv3_kernels::Result<()>;
    for f in [gating::route as F, reference::route as F] {
        assert!(f(&v3, 4, &l, Some(&b), &mut i, &mut w).is_ok());
        assert!(f(&v3, 4, &l[1..], Some(&b), &mut i, &mut w).is_err());
        assert!(f(&v3, 4, &l, Some(&b[1..]), &mut i, &mut w).is_err());
        assert!(f(&v3, 4, &l, None, &mut i, &mut w).is_err());
        assert!(f(&v3, 4, &l, Some(&b), &mut i[1..], &mut w).is_err());
        assert!(f(&v3, 4, &l, Some(&b), &mut i, &mut w[1..]).is_err());
        assert!(f(&v3, usize::MAX, &l, Some(&b), &mut i, &mut w).is_err());
        let mut nan_b = b.clone();
        nan_b[3] = f32::NAN;
        assert!(f(&v3, 4, &l, Some(&nan_b), &mut i, &mut w).is_err());
        let lite = RouteCfg::deepseek_v2_lite();
        assert!(f(&lite, 4, &l[..256], Some(&b[..64]), &mut i[..24], &mut w[..24]).is_err());
        assert!(f(&lite, 4, &l[..256], None, &mut i[..24], &mut w[..24]).is_ok());
        assert!(f(&v3, 0, &[], Some(&b), &mut [], &mut []).is_ok());
    }
}
