//! The sampling reference (`sample`), by hand: it restates the runtime sampler's semantics, so
//! these cases pin them (greedy ties and -inf rows, `allowed`, temperature, top-k, top-p cut
//! and renormalisation, the draw's walk, and the errors).

use dsv3_kernels::KernelError;
use dsv3_kernels::sample::{self, SampleParams, SampleShape};

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
