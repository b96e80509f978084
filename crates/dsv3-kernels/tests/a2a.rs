//! Expert-parallel all-to-all protocol, simulated in process: delivery of every pair exactly
//! once to its owner, counts/displacements, and N-rank == 1-rank bit for bit.
#![allow(clippy::needless_range_loop)] // rank indices index several parallel arrays

mod common;

use dsv3_kernels::a2a::{self, BatchShape, CombineBuf, DispatchBuf, EpLayout};
use dsv3_kernels::permute::{self, DispatchPlan, PlanShape};
use proptest::prelude::*;

/// One rank's tokens.
#[derive(Debug, Clone)]
struct RankBatch {
    tokens: usize,
    x: Vec<f32>,
    ids: Vec<u32>,
    w: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Case {
    layout: EpLayout,
    top_k: usize,
    hidden: usize,
    ranks: Vec<RankBatch>,
}

/// The toy expert: y = x * (e + 1).
fn toy_expert(e: usize, x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = v * (e + 1) as f32;
    }
}

fn case() -> impl Strategy<Value = Case> {
    (proptest::sample::select(&[1usize, 2, 4, 8][..]), 1usize..=8, 1usize..=4, 1usize..=24)
        .prop_flat_map(|(r, per_rank, top_k, hidden)| {
            let n_experts = r * per_rank;
            let rank = (0usize..40).prop_flat_map(move |t| {
                (
                    Just(t),
                    common::vec_f32(t * hidden, 3.0),
                    proptest::collection::vec(0..n_experts as u32, t * top_k),
                    common::vec_f32(t * top_k, 2.0),
                )
                    .prop_map(|(tokens, x, ids, w)| RankBatch { tokens, x, ids, w })
            });
            (Just(EpLayout { n_ranks: r, n_experts }), Just(top_k), Just(hidden), proptest::collection::vec(rank, r))
        })
        .prop_map(|(layout, top_k, hidden, ranks)| Case { layout, top_k, hidden, ranks })
}

/// All tokens on one rank: plan over every expert, toy experts, combine.
fn single_rank(c: &Case) -> Vec<f32> {
    let h = c.hidden;
    let tokens: usize = c.ranks.iter().map(|r| r.tokens).sum();
    let x: Vec<f32> = c.ranks.iter().flat_map(|r| r.x.clone()).collect();
    let ids: Vec<u32> = c.ranks.iter().flat_map(|r| r.ids.clone()).collect();
    let w: Vec<f32> = c.ranks.iter().flat_map(|r| r.w.clone()).collect();
    let plan = DispatchPlan::build(PlanShape { tokens, top_k: c.top_k, n_experts: c.layout.n_experts }, &ids).unwrap();
    let mut p = vec![0.0; plan.rows() * h];
    permute::permute(&plan, h, &x, &mut p).unwrap();
    let mut y = vec![0.0; p.len()];
    for e in 0..c.layout.n_experts {
        let (lo, hi) = (plan.offsets()[e] as usize, plan.offsets()[e + 1] as usize);
        toy_expert(e, &p[lo * h..hi * h], &mut y[lo * h..hi * h]);
    }
    let mut out = vec![0.0; tokens * h];
    permute::unpermute(&plan, h, &y, &w, &mut out).unwrap();
    out
}

fn check_delivery(c: &Case, sent: &[DispatchBuf], recv: &[DispatchBuf]) -> Result<(), TestCaseError> {
    let (r, h, k) = (c.layout.n_ranks, c.hidden, c.top_k);
    // Counts and displacements.
    for d in 0..r {
        let mut acc = 0;
        for s in 0..r {
            prop_assert_eq!(recv[d].counts[s], sent[s].counts[d]);
            prop_assert_eq!(recv[d].displs[s], acc);
            acc += recv[d].counts[s];
        }
        prop_assert_eq!(acc as usize, recv[d].len());
    }
    for s in 0..r {
        prop_assert_eq!(sent[s].counts.iter().sum::<u32>() as usize, c.ranks[s].tokens * k);
    }
    // Every pair exactly once, on its owner, with its row, expert and weight.
    let mut seen: Vec<Vec<bool>> = c.ranks.iter().map(|b| vec![false; b.tokens * k]).collect();
    for d in 0..r {
        let b = &recv[d];
        for s in 0..r {
            let (lo, n) = (b.displs[s] as usize, b.counts[s] as usize);
            let mut prev = None;
            for i in lo..lo + n {
                let p = b.src_slot[i] as usize;
                let src = &c.ranks[s];
                prop_assert!(p < src.tokens * k && !seen[s][p], "pair ({s}, {p}) missing or repeated");
                seen[s][p] = true;
                prop_assert!(prev < Some(p), "segment from {s} not in (token, j) order");
                prev = Some(p);
                prop_assert_eq!(b.expert[i], src.ids[p]);
                prop_assert_eq!(c.layout.owner(b.expert[i] as usize), d);
                prop_assert_eq!(b.weight[i], src.w[p]);
                let t = p / k;
                prop_assert_eq!(&b.rows[i * h..(i + 1) * h], &src.x[t * h..(t + 1) * h]);
            }
        }
    }
    prop_assert!(seen.iter().all(|v| v.iter().all(|&x| x)), "a pair was not delivered");
    Ok(())
}

fn round_trip(c: &Case) -> Result<(), TestCaseError> {
    let (r, h, k) = (c.layout.n_ranks, c.hidden, c.top_k);
    let packed: Vec<a2a::Packed> = c
        .ranks
        .iter()
        .map(|b| a2a::pack(&c.layout, BatchShape { tokens: b.tokens, top_k: k, hidden: h }, &b.x, &b.ids, &b.w).unwrap())
        .collect();
    let sent: Vec<DispatchBuf> = packed.iter().map(|p| p.send.clone()).collect();
    let recv = a2a::exchange_dispatch(&sent).unwrap();
    check_delivery(c, &sent, &recv)?;

    // Each rank runs its own experts on its unpacked input.
    let mut back: Vec<CombineBuf> = Vec::new();
    for (d, rb) in recv.iter().enumerate() {
        let u = a2a::unpack(&c.layout, d, rb).unwrap();
        let base = c.layout.local_experts(d).start;
        let mut y = vec![0.0; u.input.len()];
        for el in 0..c.layout.experts_per_rank() {
            let (lo, hi) = (u.plan.offsets()[el] as usize, u.plan.offsets()[el + 1] as usize);
            prop_assert!(u.expert[lo..hi].iter().all(|&e| e as usize == base + el));
            toy_expert(base + el, &u.input[lo * h..hi * h], &mut y[lo * h..hi * h]);
        }
        back.push(u.pack_return(&y).unwrap());
    }
    let returned = a2a::exchange_combine(&back).unwrap();
    let mut out = Vec::new();
    for s in 0..r {
        prop_assert_eq!(&returned[s].counts, &packed[s].send.counts);
        let mut o = vec![f32::NAN; c.ranks[s].tokens * h];
        a2a::combine(&packed[s], &returned[s], &c.ranks[s].w, &mut o).unwrap();
        out.extend(o);
    }
    let want = single_rank(c);
    prop_assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "N-rank combine differs from the one-rank computation"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn n_ranks_equal_one_rank(c in case()) {
        round_trip(&c)?;
    }
}

/// V3-sized layout: 256 experts on 8 ranks, top-8, uneven token counts including 0.
#[test]
fn v3_layout_eight_ranks() {
    let mut s = 0x9E37_79B9_u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let layout = EpLayout { n_ranks: 8, n_experts: 256 };
    let ranks = [0usize, 1, 7, 33, 64, 5, 0, 19]
        .iter()
        .map(|&t| RankBatch {
            tokens: t,
            x: (0..t * 64).map(|_| (next() % 9) as f32 - 4.0).collect(),
            ids: (0..t * 8).map(|_| (next() % 256) as u32).collect(),
            w: (0..t * 8).map(|_| (next() % 5) as f32).collect(),
        })
        .collect();
    round_trip(&Case { layout, top_k: 8, hidden: 64, ranks }).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    assert!(EpLayout { n_ranks: 3, n_experts: 256 }.validate().is_err());
    assert!(EpLayout { n_ranks: 0, n_experts: 256 }.validate().is_err());
    assert!(EpLayout { n_ranks: 8, n_experts: 0 }.validate().is_err());
    let bad = EpLayout { n_ranks: 3, n_experts: 8 };
    let shape = BatchShape { tokens: 2, top_k: 2, hidden: 4 };
    let (x, ids, w) = (vec![1.0; 8], vec![0, 1, 2, 7], vec![1.0; 4]);
    assert!(a2a::pack(&bad, shape, &x, &ids, &w).is_err());

    let layout = EpLayout { n_ranks: 2, n_experts: 8 };
    assert!(a2a::pack(&layout, shape, &x, &[0, 1, 2, 8], &w).is_err());
    assert!(a2a::pack(&layout, shape, &x[1..], &ids, &w).is_err());
    assert!(a2a::pack(&layout, shape, &x, &ids[1..], &w).is_err());
    assert!(a2a::pack(&layout, shape, &x, &ids, &w[1..]).is_err());
    assert!(a2a::pack(&layout, BatchShape { hidden: 0, ..shape }, &[], &ids, &w).is_err());
    assert!(a2a::pack(&layout, BatchShape { top_k: 0, ..shape }, &x, &[], &[]).is_err());
    assert!(a2a::pack(&layout, BatchShape { tokens: usize::MAX, ..shape }, &x, &ids, &w).is_err());

    let p = a2a::pack(&layout, shape, &x, &ids, &w).unwrap();
    assert_eq!(p.send.counts, [3, 1]);
    assert_eq!(p.send.displs, [0, 3]);
    let recv = a2a::exchange_dispatch(&[p.send.clone(), p.send.clone()]).unwrap();
    // Rank 0 cannot unpack rank 1's rows, and ranks out of range are errors.
    assert!(a2a::unpack(&layout, 1, &recv[0]).is_err());
    assert!(a2a::unpack(&layout, 2, &recv[0]).is_err());
    assert!(a2a::unpack(&layout, 0, &recv[0]).is_ok());
    // Malformed buffers.
    assert!(a2a::exchange_dispatch(&[]).is_err());
    assert!(a2a::exchange_dispatch(std::slice::from_ref(&p.send)).is_err()); // counts for 2 ranks
    let mut broken = p.send.clone();
    broken.displs[1] = 2;
    assert!(a2a::exchange_dispatch(&[broken.clone(), p.send.clone()]).is_err());
    assert!(a2a::unpack(&layout, 0, &broken).is_err());
    broken = p.send.clone();
    broken.rows.pop();
    assert!(a2a::exchange_dispatch(&[p.send.clone(), broken]).is_err());
    broken = p.send.clone();
    broken.hidden = 2;
    broken.rows.truncate(8);
    assert!(a2a::exchange_dispatch(&[p.send.clone(), broken]).is_err());
    broken = p.send.clone();
    broken.counts[0] = u32::MAX;
    assert!(a2a::exchange_dispatch(&[p.send.clone(), broken]).is_err());

    let u = a2a::unpack(&layout, 0, &recv[0]).unwrap();
    assert!(u.pack_return(&u.input[1..]).is_err());
    let ret = u.pack_return(&u.input).unwrap();
    let mut out = vec![0.0; 8];
    // A returned buffer whose layout is not what this rank sent.
    assert!(a2a::combine(&p, &ret, &w, &mut out).is_err());
    let wrong = CombineBuf { hidden: 4, rows: vec![0.0; 16], counts: vec![4, 0], displs: vec![0, 4] };
    assert!(a2a::combine(&p, &wrong, &w, &mut out).is_err());
    let right = CombineBuf { hidden: 4, rows: vec![0.0; 16], counts: vec![3, 1], displs: vec![0, 3] };
    assert!(a2a::combine(&p, &right, &w, &mut out).is_ok());
    assert!(a2a::combine(&p, &right, &w, &mut out[1..]).is_err());
    assert!(a2a::exchange_combine(&[right.clone(), wrong.clone()]).is_ok());
    assert!(a2a::exchange_combine(&[right, CombineBuf { displs: vec![0, 3], ..wrong }]).is_err());
}
