//! The one sampler (`dsv3_kernels::sample`, which the runtime's `Sampler` calls): hand-worked
//! cases pin its rule (greedy ties and -inf rows, `allowed`, temperature, top-k, top-p cut and
//! renormalisation, the draw's walk, speculative verification, the errors), and property tests
//! hold it over extreme temperatures (subnormal to `f32::MAX`), infinite and huge logits,
//! ties, and the edges of top-k and top-p.

use dsv3_kernels::KernelError;
use dsv3_kernels::sample::{self, Dist, SampleParams, SampleShape, Verdict};
use proptest::prelude::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn greedy_picks_the_lowest_id_of_the_max_within_allowed() {
    let l = [1.0, 3.0, 3.0, 9.0, f32::NEG_INFINITY, f32::NEG_INFINITY, -0.0, 0.0];
    let mut out = [0u32; 2];
    sample::greedy(&l, SampleShape { rows: 2, vocab: 4, allowed: 3 }, &mut out).unwrap();
    // Row 0: id 3 (9.0) is past `allowed`; ids 1 and 2 tie: 1. Row 1: -inf, -inf, -0: id 2.
    assert_eq!(out, [1, 2]);
    sample::greedy(&l[4..6], SampleShape { rows: 1, vocab: 2, allowed: 2 }, &mut out[..1]).unwrap();
    assert_eq!(out[0], 0, "a row of -inf gives id 0");
    sample::greedy(&l[6..], SampleShape { rows: 1, vocab: 2, allowed: 9 }, &mut out[..1]).unwrap();
    assert_eq!(out[0], 0, "-0 and +0 tie (IEEE >)");
}

#[test]
fn dist_applies_temperature_top_k_and_top_p_in_order() {
    let row = [0.0f32, 2.0, 1.0, 2.0];
    // Temperature 1, all: softmax over ids sorted by value, ties by id: 1, 3, 2, 0.
    let d = sample::dist(&row, &SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0 });
    let ids: Vec<u32> = d.iter().map(|x| x.0).collect();
    assert_eq!(ids, [1, 3, 2, 0]);
    let z = 2.0 + (-1f64).exp() + (-2f64).exp();
    assert!(close(d[0].1, 1.0 / z) && close(d[1].1, 1.0 / z) && close(d[2].1, (-1f64).exp() / z) && close(d[3].1, (-2f64).exp() / z));
    // top_k = 3 drops id 0; top_p = 0.5 keeps the first candidate whose cumulative mass reaches it.
    let d = sample::dist(&row, &SampleParams { temperature: 1.0, top_k: 3, top_p: 1.0 });
    assert_eq!(d.len(), 3);
    let d = sample::dist(&row, &SampleParams { temperature: 1.0, top_k: 0, top_p: 0.5 });
    assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 3]);
    assert!(close(d[0].1, 0.5) && close(d[1].1, 0.5));
    // A low temperature sharpens: logits 0 and 1 at T = 0.5 are 0 and 2.
    let d = sample::dist(&[0.0, 1.0], &SampleParams { temperature: 0.5, top_k: 0, top_p: 1.0 });
    assert!(close(d[0].1, 1.0 / (1.0 + (-2f64).exp())));
}

#[test]
fn draw_walks_the_distribution() {
    let d = [(7u32, 0.5f64), (3, 0.25), (9, 0.25)];
    assert_eq!(sample::draw(&d, 0.0), 7);
    assert_eq!(sample::draw(&d, 0.4999), 7);
    assert_eq!(sample::draw(&d, 0.5), 3);
    assert_eq!(sample::draw(&d, 0.7499), 3);
    assert_eq!(sample::draw(&d, 0.75), 9);
    assert_eq!(sample::draw(&d, 0.999_999), 9);
    // Rounding that leaves no candidate: the last one.
    assert_eq!(sample::draw(&[(1, 0.3), (2, 0.3)], 0.99), 2);
}

#[test]
fn sample_is_greedy_at_zero_temperature_and_draws_otherwise() {
    let l = [0.0f32, 5.0, 1.0, 0.0, 0.0, 9.0];
    let shape = SampleShape { rows: 2, vocab: 3, allowed: 3 };
    let mut out = [0u32; 2];
    sample::sample(&l, shape, &SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0 }, &[0.9, 0.9], &mut out).unwrap();
    assert_eq!(out, [1, 2]);
    // top_k = 1 is greedy whatever the uniform.
    sample::sample(&l, shape, &SampleParams { temperature: 3.0, top_k: 1, top_p: 1.0 }, &[0.999, 0.0], &mut out).unwrap();
    assert_eq!(out, [1, 2]);
    // A flat row of 3: u in [0, 1/3) -> id 0, [1/3, 2/3) -> id 1, else id 2.
    let flat = [0.0f32; 3];
    for (u, id) in [(0.1, 0u32), (0.5, 1), (0.9, 2)] {
        sample::sample(
            &flat,
            SampleShape { rows: 1, vocab: 3, allowed: 3 },
            &SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0 },
            &[u],
            &mut out[..1],
        )
        .unwrap();
        assert_eq!(out[0], id, "u = {u}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let shape = SampleShape { rows: 1, vocab: 3, allowed: 3 };
    let p = SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0 };
    let mut out = [0u32];
    let e = sample::sample(&[0.0, f32::NAN, 0.0], shape, &p, &[0.5], &mut out).unwrap_err();
    assert!(matches!(&e, KernelError::Invalid { what: "logits", detail, .. } if detail.contains("token 1")), "{e}");
    let e = sample::greedy(&[0.0, 0.0, f32::NAN], SampleShape { allowed: 2, ..shape }, &mut out);
    assert!(e.is_ok(), "a NaN past `allowed` is not a candidate");
    for bad in [
        SampleParams { temperature: -1.0, ..p },
        SampleParams { temperature: f32::INFINITY, ..p },
        SampleParams { top_p: 0.0, ..p },
        SampleParams { top_p: 1.5, ..p },
    ] {
        assert!(matches!(sample::sample(&[0.0; 3], shape, &bad, &[0.5], &mut out), Err(KernelError::Invalid { .. })), "{bad:?}");
    }
    assert!(matches!(sample::sample(&[0.0; 3], shape, &p, &[1.0], &mut out), Err(KernelError::Invalid { what: "uniforms", .. })));
    assert!(matches!(sample::sample(&[0.0; 3], shape, &p, &[], &mut out), Err(KernelError::Length { .. })));
    assert!(matches!(sample::greedy(&[0.0; 3], SampleShape { allowed: 0, ..shape }, &mut out), Err(KernelError::Shape { .. })));
    assert!(matches!(sample::greedy(&[0.0; 2], shape, &mut out), Err(KernelError::Length { .. })));
}

/// The tiny-temperature bug (issue 16): `logit / 1e-38` overflows f32, the old rule then took
/// `inf - inf` = NaN for every probability, no uniform was `< NaN`, and the draw returned the
/// *last* candidate, the least likely token, with `Ok`. Every positive temperature must give a
/// finite distribution; as T → 0 it tends to all mass on the argmax.
#[test]
fn tiny_temperatures_draw_the_most_likely_token() {
    // Logits of a real model's size: 30 / 1e-38 = 3e39 overflows f32.
    let row = [1.0f32, 30.0, 20.0, -10.0];
    let mut out = [9u32];
    for t in [1e-38f32, 1e-45, f32::MIN_POSITIVE, 1e-30, 1e-6] {
        let p = SampleParams { temperature: t, top_k: 0, top_p: 1.0 };
        let d = sample::dist(&row, &p);
        assert!(d.iter().all(|x| x.1.is_finite()), "T = {t:e}: {d:?}");
        assert_eq!(d[0], (1, 1.0), "T = {t:e}: all mass on the argmax, got {d:?}");
        for u in [0.0, 0.5, 0.999_999] {
            sample::sample(&row, SampleShape { rows: 1, vocab: 4, allowed: 4 }, &p, &[u], &mut out).unwrap();
            assert_eq!(out[0], 1, "T = {t:e}, u = {u}");
        }
    }
}

/// Logits with the edges a model can produce: ties (small integers), ±0, huge magnitudes that
/// overflow when divided by a small temperature, ±inf, and ordinary values.
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (-3i32..=3).prop_map(|v| v as f32),
        1 => Just(-0.0f32),
        1 => prop_oneof![Just(3e38f32), Just(-3e38f32), Just(f32::MAX), Just(f32::MIN)],
        1 => prop_oneof![Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        3 => -40f32..40.0,
    ]
}

fn temperature() -> impl Strategy<Value = f32> {
    prop_oneof![Just(1e-45f32), Just(1e-38f32), Just(f32::MIN_POSITIVE), 1e-30f32..1e-3, 0.01f32..10.0, Just(1e30f32), Just(f32::MAX),]
}

fn top_p() -> impl Strategy<Value = f32> {
    prop_oneof![Just(1.0f32), Just(f32::MIN_POSITIVE), Just(0.999_999_9f32), 0.01f32..1.0]
}

/// IEEE order (-0 == +0), descending, ties by ascending id: the candidate order of the rule.
fn before(row: &[f32], a: u32, b: u32) -> bool {
    let (x, y) = (row[a as usize], row[b as usize]);
    x > y || (x == y && a < b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every positive temperature, top-k and top-p gives a valid distribution in the rule's
    /// order, whose first token is the greedy one, with the temperature's probability ratios
    /// and the nucleus cut where the rule puts it; every draw lands in it.
    #[test]
    fn dist_is_valid_ordered_and_follows_the_rule(
        row in proptest::collection::vec(logit(), 1..12),
        t in temperature(),
        top_k in 0usize..14,
        top_p in top_p(),
        u in 0f64..1.0,
    ) {
        let p = SampleParams { temperature: t, top_k, top_p };
        let d = sample::dist(&row, &p);
        let n = row.len();
        prop_assert!(!d.is_empty() && d.len() <= n && (top_k == 0 || d.len() <= top_k), "{:?}", d);
        let mut seen = vec![false; n];
        for &(id, pr) in &d {
            prop_assert!((id as usize) < n && !seen[id as usize], "id {} repeated or out of range", id);
            seen[id as usize] = true;
            prop_assert!(pr.is_finite() && (0.0..=1.0).contains(&pr), "probability {}", pr);
        }
        let total: f64 = d.iter().map(|x| x.1).sum();
        prop_assert!((total - 1.0).abs() < 1e-9, "sum {}", total);
        let mut out = [0u32];
        sample::greedy(&row, SampleShape { rows: 1, vocab: n, allowed: n }, &mut out).unwrap();
        prop_assert_eq!(d[0].0, out[0], "the first candidate is the greedy token");
        for w in d.windows(2) {
            prop_assert!(before(&row, w[0].0, w[1].0), "order: {:?} then {:?}", w[0], w[1]);
            prop_assert!(w[0].1 >= w[1].1, "probabilities must not increase: {:?}", d);
            if row[w[0].0 as usize] == row[w[1].0 as usize] {
                prop_assert_eq!(w[0].1, w[1].1, "tied logits, equal probabilities");
            }
        }
        // Ratios: p_i / p_j = exp((l_i - l_j) / T) wherever both are normal and finite.
        for &(i, pi) in &d {
            for &(j, pj) in &d {
                let (li, lj) = (row[i as usize] as f64, row[j as usize] as f64);
                let x = (li - lj) / t as f64;
                if li.is_finite() && lj.is_finite() && x.abs() < 600.0 && pi > 1e-280 && pj > 1e-280 {
                    prop_assert!(((pi / pj).ln() - x).abs() <= 1e-9 * x.abs().max(1.0), "ln(p{}/p{}) = {} vs {}", i, j, (pi / pj).ln(), x);
                }
            }
        }
        // The nucleus (top_p < 1): the shortest prefix of the uncut list whose probability
        // reaches top_p.
        let full = sample::dist(&row, &SampleParams { top_p: 1.0, ..p });
        let mut acc = 0.0;
        let cut = full.iter().position(|x| { acc += x.1; acc >= top_p as f64 }).map_or(full.len(), |i| i + 1);
        prop_assert_eq!(d.len(), if top_p < 1.0 { cut } else { full.len() });
        prop_assert!(d.iter().zip(&full).all(|(a, b)| a.0 == b.0));
        // Every draw is in the support, and `sample` is `draw` of `dist`.
        let id = sample::draw(&d, u);
        prop_assert!(d.iter().any(|x| x.0 == id));
        sample::sample(&row, SampleShape { rows: 1, vocab: n, allowed: n }, &p, &[u], &mut out).unwrap();
        prop_assert_eq!(out[0], id);
        if top_k == 1 || top_p == f32::MIN_POSITIVE {
            prop_assert_eq!(d.len(), 1, "top-k 1 and a vanishing top-p are greedy");
        }
    }

    /// At a vanishing temperature the mass is split evenly over the tied maxima (one token
    /// when the maximum is unique), whatever the other logits.
    #[test]
    fn vanishing_temperature_is_greedy_over_the_tied_maxima(
        row in proptest::collection::vec((-3i32..=3).prop_map(|v| v as f32), 1..12),
        t in prop_oneof![Just(1e-45f32), Just(1e-38f32), Just(1e-30f32)],
    ) {
        let d = sample::dist(&row, &SampleParams::with_temperature(t));
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let ties = row.iter().filter(|&&v| v == max).count();
        for &(id, pr) in &d {
            let want = if row[id as usize] == max { 1.0 / ties as f64 } else { 0.0 };
            prop_assert!((pr - want).abs() < 1e-12, "T = {}: token {} has {}, want {}", t, id, pr, want);
        }
    }
}

#[test]
fn infinite_and_equal_rows_are_well_defined() {
    let p = SampleParams::with_temperature(1.0);
    // +inf beats everything; two +inf tie.
    let d = sample::dist(&[1.0, f32::INFINITY, 5.0, f32::INFINITY], &p);
    assert_eq!(d, [(1, 0.5), (3, 0.5), (2, 0.0), (0, 0.0)]);
    // A row of -inf: every token equally likely (greedy gives id 0).
    let d = sample::dist(&[f32::NEG_INFINITY; 4], &p);
    assert!(d.iter().all(|x| x.1 == 0.25), "{d:?}");
    // -0 and +0 tie: the lower id first, as greedy.
    assert_eq!(sample::dist(&[0.0, -0.0], &SampleParams { top_k: 1, ..p }), [(0, 1.0)]);
    assert_eq!(sample::dist(&[-0.0, 0.0], &SampleParams { top_k: 1, ..p }), [(0, 1.0)]);
    // A huge temperature flattens; the largest finite one still gives finite probabilities.
    let d = sample::dist(&[0.0, 30.0, -30.0], &SampleParams::with_temperature(f32::MAX));
    assert!(d.iter().all(|x| (x.1 - 1.0 / 3.0).abs() < 1e-12), "{d:?}");
}

#[test]
fn verify_accepts_and_replaces_as_the_speculative_rule() {
    let p = Dist::new(&[2.0, 1.0, 0.0], &SampleParams::with_temperature(1.0)).unwrap();
    let q = Dist::new(&[0.0, 2.0, 0.0], &SampleParams::with_temperature(1.0)).unwrap();
    // p(0) > q(0): always accepted, whatever the uniform.
    assert_eq!(sample::verify(&p, &q, 0, || 0.999_999), Verdict::Accepted);
    // p(1) / q(1) < 1: accepted below the ratio, otherwise replaced from max(0, p - q), whose
    // only positive entries are ids 0 and 2 (u = 0: the first, id 0).
    let ratio = p.prob(1) / q.prob(1);
    assert_eq!(sample::verify(&p, &q, 1, || ratio * 0.99), Verdict::Accepted);
    let mut us = [ratio, 0.0].into_iter();
    assert_eq!(sample::verify(&p, &q, 1, || us.next().unwrap()), Verdict::Rejected(0));
    // A point target: accepted iff the draft is its token, no uniform used.
    let g = Dist::point(4);
    assert_eq!(sample::verify(&g, &q, 4, || unreachable!()), Verdict::Accepted);
    assert_eq!(sample::verify(&g, &q, 1, || unreachable!()), Verdict::Rejected(4));
}

#[test]
fn dist_new_checks_its_row() {
    let p = SampleParams::with_temperature(0.5);
    assert!(matches!(Dist::new(&[], &p), Err(KernelError::Shape { .. })));
    assert!(matches!(Dist::new(&[0.0, f32::NAN], &p), Err(KernelError::Invalid { what: "logits", .. })));
    assert!(matches!(Dist::new(&[0.0], &SampleParams { temperature: -0.5, ..p }), Err(KernelError::Invalid { what: "temperature", .. })));
    let d = Dist::new(&[0.0, 3.0], &SampleParams::GREEDY).unwrap();
    assert_eq!((d.support(), d.top(), d.prob(0)), (&[(1, 1.0)][..], 1, 0.0));
}
