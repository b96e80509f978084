//! The runtime's `Sampler` (the seeded front of `dsv3_kernels::sample`): extreme temperatures
//! and the errors it reports, without a model.

use dsv3_runtime::RuntimeError;
use dsv3_runtime::generate::{Sampler, SamplingParams};

/// The tiny-temperature bug (issue 16): `--temperature 1e-38` passed validation, the
/// distribution became NaN and the sampler returned the least likely token with `Ok`.
#[test]
fn tiny_temperature_samples_the_most_likely_token() {
    let logits = [1.0f32, 30.0, 20.0, -10.0, 5.0];
    for temperature in [1e-38f32, 1e-45, 1e-20] {
        let mut s = Sampler::new(SamplingParams { temperature, top_k: 0, top_p: 1.0, seed: 3 }).unwrap();
        let d = s.dist(&logits, logits.len()).unwrap();
        assert!(d.support().iter().all(|x| x.1.is_finite()), "T = {temperature:e}: {d:?}");
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, logits.len()).unwrap(), 1, "T = {temperature:e}");
        }
    }
}

#[test]
fn bad_parameters_and_nan_logits_are_request_errors() {
    for bad in [
        SamplingParams { temperature: -1.0, ..Default::default() },
        SamplingParams { temperature: f32::NAN, ..Default::default() },
        SamplingParams { temperature: f32::INFINITY, ..Default::default() },
        SamplingParams { top_p: 0.0, ..Default::default() },
        SamplingParams { top_p: 1.5, ..Default::default() },
    ] {
        assert!(matches!(Sampler::new(bad), Err(RuntimeError::Request(_))), "{bad:?}");
    }
    let s = Sampler::new(SamplingParams { temperature: 0.7, ..Default::default() }).unwrap();
    let e = s.dist(&[0.0, f32::NAN, 1.0], 3).unwrap_err();
    assert!(matches!(&e, RuntimeError::Request(m) if m.contains("NaN logit (token 1)")), "{e}");
    assert!(s.dist(&[0.0, 1.0, f32::NAN], 2).is_ok(), "a NaN past `allowed` is not a candidate");
    assert!(matches!(s.dist(&[0.0; 3], 0), Err(RuntimeError::Request(_))));
}
