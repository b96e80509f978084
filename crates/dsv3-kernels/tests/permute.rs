//! Dispatch plan, permute and combine: fast == reference bit for bit, plan invariants,
//! round trips, masked layout, edge sizes, bad input.

mod common;

use dsv3_kernels::KernelError;
use dsv3_kernels::permute::{self, DispatchPlan, PlanShape, reference};
use proptest::prelude::*;

/// A routed batch with small-integer data, so every sum is exact.
#[derive(Debug, Clone)]
struct Case {
    shape: PlanShape,
    hidden: usize,
    ids: Vec<u32>,
    x: Vec<f32>,
    w: Vec<f32>,
}

fn case(tokens: impl Strategy<Value = usize>, hidden: impl Strategy<Value = usize>) -> impl Strategy<Value = Case> {
    (tokens, 1usize..=8, 1usize..=300, hidden)
        .prop_flat_map(|(tokens, top_k, n_experts, hidden)| {
            let shape = PlanShape { tokens, top_k, n_experts };
            let pairs = tokens * top_k;
            (
                Just(shape),
                Just(hidden),
                // Skewed ids sometimes, so some experts get many rows and most none.
                prop_oneof![
                    proptest::collection::vec(0..n_experts as u32, pairs),
                    proptest::collection::vec(0..(n_experts as u32).min(3), pairs)
                ],
                proptest::collection::vec(common::small_int(), tokens * hidden),
                proptest::collection::vec(common::small_int(), pairs),
            )
        })
        .prop_map(|(shape, hidden, ids, x, w)| Case { shape, hidden, ids, x, w })
}

fn edge_tokens() -> impl Strategy<Value = usize> {
    prop_oneof![proptest::sample::select(&[0usize, 1, 7, 127, 128, 129][..]), 0usize..200]
}

fn edge_hidden() -> impl Strategy<Value = usize> {
    prop_oneof![proptest::sample::select(&[1usize, 7, 128][..]), 1usize..40]
}

fn check_plan(plan: &DispatchPlan, ids: &[u32]) -> Result<(), TestCaseError> {
    let PlanShape { tokens, top_k: k, n_experts: n } = plan.shape();
    let pairs = tokens * k;
    prop_assert_eq!(plan.counts().len(), n);
    prop_assert_eq!(plan.offsets().len(), n + 1);
    prop_assert_eq!(plan.counts().iter().map(|&c| c as usize).sum::<usize>(), pairs);
    prop_assert_eq!(plan.offsets()[0], 0);
    for e in 0..n {
        prop_assert_eq!(plan.offsets()[e + 1], plan.offsets()[e] + plan.counts()[e]);
    }
    // Every pair exactly once, at a row of its expert; rows of one expert ascend by pair.
    let mut seen = vec![false; pairs];
    for s in 0..pairs {
        let p = plan.pair_of_slot()[s] as usize;
        prop_assert!(p < pairs && !seen[p], "row {s}: pair {p} repeated or out of range");
        seen[p] = true;
        prop_assert_eq!(plan.slot_of()[p] as usize, s);
        prop_assert_eq!(plan.token_of_slot()[s] as usize, p / k);
        let e = ids[p] as usize;
        prop_assert!(plan.offsets()[e] as usize <= s && s < plan.offsets()[e + 1] as usize);
        if s > plan.offsets()[e] as usize {
            prop_assert!(plan.pair_of_slot()[s - 1] < p as u32, "row {s}: not in (token, j) order");
        }
    }
    Ok(())
}

fn run_all(c: &Case) -> Result<(), TestCaseError> {
    let Case { shape, hidden: h, ids, x, w } = c;
    let (h, pairs, t) = (*h, shape.pairs(), shape.tokens);
    let plan = DispatchPlan::build(*shape, ids).unwrap();
    prop_assert_eq!(&plan, &reference::build_plan(*shape, ids).unwrap());
    check_plan(&plan, ids)?;

    let mut p_fast = vec![f32::NAN; pairs * h];
    let mut p_ref = vec![f32::NAN; pairs * h];
    permute::permute(&plan, h, x, &mut p_fast).unwrap();
    reference::permute(&plan, h, x, &mut p_ref).unwrap();
    prop_assert_eq!(&p_fast, &p_ref);
    for s in 0..pairs {
        let tok = plan.token_of_slot()[s] as usize;
        prop_assert_eq!(&p_fast[s * h..(s + 1) * h], &x[tok * h..(tok + 1) * h]);
    }

    // Combine: fast == reference, and permute-then-combine == x * Σ_j w (exact, small ints).
    let mut o_fast = vec![f32::NAN; t * h];
    let mut o_ref = vec![f32::NAN; t * h];
    permute::unpermute(&plan, h, &p_fast, w, &mut o_fast).unwrap();
    reference::unpermute(&plan, h, &p_ref, w, &mut o_ref).unwrap();
    prop_assert_eq!(&o_fast, &o_ref);
    let k = shape.top_k;
    for tok in 0..t {
        let ws: f32 = w[tok * k..(tok + 1) * k].iter().sum();
        for col in 0..h {
            prop_assert_eq!(o_fast[tok * h + col], x[tok * h + col] * ws);
        }
    }

    // Unweighted gather back to pair order.
    let mut g_fast = vec![f32::NAN; pairs * h];
    let mut g_ref = vec![f32::NAN; pairs * h];
    permute::gather_pairs(&plan, h, &p_fast, &mut g_fast).unwrap();
    reference::gather_pairs(&plan, h, &p_ref, &mut g_ref).unwrap();
    prop_assert_eq!(&g_fast, &g_ref);
    for p in 0..pairs {
        prop_assert_eq!(&g_fast[p * h..(p + 1) * h], &x[(p / k) * h..(p / k + 1) * h]);
    }

    // Masked layout, at the tightest capacity and with slack.
    for cap in [plan.max_count(), plan.max_count() + 2] {
        let rows = shape.n_experts * cap;
        let mut m_fast = vec![f32::NAN; rows * h];
        let mut m_ref = vec![f32::NAN; rows * h];
        permute::permute_masked(&plan, h, cap, x, &mut m_fast).unwrap();
        reference::permute_masked(&plan, h, cap, x, &mut m_ref).unwrap();
        prop_assert_eq!(&m_fast, &m_ref);
        for e in 0..shape.n_experts {
            let (lo, n) = (plan.offsets()[e] as usize, plan.counts()[e] as usize);
            let block = &m_fast[e * cap * h..(e + 1) * cap * h];
            prop_assert_eq!(&block[..n * h], &p_fast[lo * h..(lo + n) * h]);
            prop_assert!(block[n * h..].iter().all(|&v| v == 0.0));
        }
        let mut u_fast = vec![f32::NAN; t * h];
        let mut u_ref = vec![f32::NAN; t * h];
        permute::unpermute_masked(&plan, h, cap, &m_fast, w, &mut u_fast).unwrap();
        reference::unpermute_masked(&plan, h, cap, &m_ref, w, &mut u_ref).unwrap();
        prop_assert_eq!(&u_fast, &u_ref);
        prop_assert_eq!(&u_fast, &o_fast);
    }
    if plan.max_count() > 0 {
        let cap = plan.max_count() - 1;
        let mut m = vec![0.0; shape.n_experts * cap * h];
        prop_assert!(permute::permute_masked(&plan, h, cap, x, &mut m).is_err());
        prop_assert!(reference::permute_masked(&plan, h, cap, x, &mut m).is_err());
        let mut o = vec![0.0; t * h];
        prop_assert!(permute::unpermute_masked(&plan, h, cap, &m, w, &mut o).is_err());
        prop_assert!(plan.masked_rows(cap).is_err());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn fast_matches_reference_and_round_trips(c in case(edge_tokens(), edge_hidden())) {
        run_all(&c)?;
    }

    /// Random floats: sums now round, so equality checks the accumulation order (j ascending).
    #[test]
    fn combine_order_is_bitwise_reference(
        c in case(edge_tokens(), edge_hidden()),
        seed in any::<u32>(),
    ) {
        let plan = DispatchPlan::build(c.shape, &c.ids).unwrap();
        let (h, t) = (c.hidden, c.shape.tokens);
        let y: Vec<f32> = (0..plan.rows() * h).map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 * 1e-9 - 2.1).collect();
        let w: Vec<f32> = c.w.iter().enumerate().map(|(i, v)| v * 0.3 + i as f32 * 1e-3 + 0.01).collect();
        let mut a = vec![f32::NAN; t * h];
        let mut b = vec![f32::NAN; t * h];
        permute::unpermute(&plan, h, &y, &w, &mut a).unwrap();
        reference::unpermute(&plan, h, &y, &w, &mut b).unwrap();
        prop_assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn top1_unit_weights_is_identity(
        (t, n, h) in (edge_tokens(), 1usize..64, edge_hidden()),
        seed in any::<u64>(),
    ) {
        let shape = PlanShape { tokens: t, top_k: 1, n_experts: n };
        let ids: Vec<u32> = (0..t).map(|i| ((seed >> (i % 32)) as usize ^ i.wrapping_mul(31)) as u32 % n as u32).collect();
        let x: Vec<f32> = (0..t * h).map(|i| i as f32 * 0.37 - 11.0).collect();
        let plan = DispatchPlan::build(shape, &ids).unwrap();
        let mut p = vec![0.0; t * h];
        let mut o = vec![f32::NAN; t * h];
        permute::permute(&plan, h, &x, &mut p).unwrap();
        permute::unpermute(&plan, h, &p, &vec![1.0; t], &mut o).unwrap();
        prop_assert_eq!(o, x);
    }
}

/// The real width: hidden 7168, 256 experts, top-8, around the 128-token edges.
#[test]
fn v3_width_edges() {
    let mut rng = 0x1234_5678_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for t in [1usize, 7, 127, 128, 129] {
        let shape = PlanShape { tokens: t, top_k: 8, n_experts: 256 };
        let ids: Vec<u32> = (0..t * 8).map(|_| (next() % 256) as u32).collect();
        let x: Vec<f32> = (0..t * 7168).map(|_| (next() % 9) as f32 - 4.0).collect();
        let w: Vec<f32> = (0..t * 8).map(|_| (next() % 9) as f32 - 4.0).collect();
        run_all(&Case { shape, hidden: 7168, ids, x, w }).unwrap();
    }
}

#[test]
fn bad_input_is_an_error() {
    let shape = PlanShape { tokens: 3, top_k: 2, n_experts: 4 };
    match DispatchPlan::build(shape, &[0, 1, 2, 3, 1, 4]) {
        Err(KernelError::Invalid { what: "topk_ids", detail, .. }) => assert!(detail.contains("token 2"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(reference::build_plan(shape, &[0, 1, 2, 3, 1, 4]).is_err());
    assert!(DispatchPlan::build(shape, &[0, 1, 2, 3, 1, u32::MAX]).is_err());
    assert!(DispatchPlan::build(shape, &[0, 1, 2, 3, 1]).is_err());
    assert!(DispatchPlan::build(PlanShape { top_k: 0, ..shape }, &[]).is_err());
    assert!(DispatchPlan::build(PlanShape { n_experts: 0, ..shape }, &[0; 6]).is_err());
    assert!(DispatchPlan::build(PlanShape { tokens: usize::MAX, ..shape }, &[]).is_err());
    assert!(DispatchPlan::build(PlanShape { tokens: 1 << 31, top_k: 2, n_experts: 4 }, &[]).is_err());

    let plan = DispatchPlan::build(shape, &[0, 1, 2, 3, 1, 1]).unwrap();
    let (x, w) = (vec![1.0; 3 * 5], vec![1.0; 6]);
    let mut p = vec![0.0; 6 * 5];
    let mut o = vec![0.0; 3 * 5];
    assert!(permute::permute(&plan, 5, &x, &mut p).is_ok());
    assert!(permute::permute(&plan, 0, &[], &mut []).is_err());
    assert!(permute::permute(&plan, 5, &x[1..], &mut p).is_err());
    assert!(permute::permute(&plan, 5, &x, &mut p[1..]).is_err());
    assert!(permute::permute(&plan, usize::MAX, &x, &mut p).is_err());
    assert!(reference::permute(&plan, 5, &x, &mut p[1..]).is_err());
    assert!(permute::unpermute(&plan, 5, &p, &w, &mut o).is_ok());
    assert!(permute::unpermute(&plan, 5, &p, &w[1..], &mut o).is_err());
    assert!(permute::unpermute(&plan, 5, &p[1..], &w, &mut o).is_err());
    assert!(permute::unpermute(&plan, 5, &p, &w, &mut o[1..]).is_err());
    assert!(reference::unpermute(&plan, 5, &p, &w, &mut o[1..]).is_err());
    assert!(permute::gather_pairs(&plan, 5, &p, &mut o).is_err());
    // Expert 1 has 3 rows: capacity 2 is an error naming it, capacity 3 works.
    match permute::permute_masked(&plan, 5, 2, &x, &mut [0.0; 4 * 2 * 5]) {
        Err(KernelError::Invalid { what: "capacity", detail, .. }) => assert!(detail.contains("expert 1"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let mut m = vec![0.0; 4 * 3 * 5];
    assert!(permute::permute_masked(&plan, 5, 3, &x, &mut m).is_ok());
    assert!(permute::permute_masked(&plan, 5, 3, &x, &mut m[1..]).is_err());
    assert!(permute::permute_masked(&plan, 5, usize::MAX, &x, &mut m).is_err());
    assert!(permute::unpermute_masked(&plan, 5, 3, &m[5..], &w, &mut o).is_err());
    assert!(reference::unpermute_masked(&plan, 5, 3, &m, &w[1..], &mut o).is_err());

    // Zero tokens: empty plan, empty buffers, capacity 0 allowed.
    let empty = DispatchPlan::build(PlanShape { tokens: 0, top_k: 8, n_experts: 256 }, &[]).unwrap();
    assert_eq!(empty.counts().len(), 256);
    assert_eq!(empty.max_count(), 0);
    assert!(permute::permute_masked(&empty, 16, 0, &[], &mut []).is_ok());
    assert!(permute::unpermute(&empty, 16, &[], &[], &mut []).is_ok());
}
