//! FP8 E4M3 codec, block-scaled weights and activation quantisation against their definitions.

mod common;

use common::*;
use dsv3_kernels::KernelError;
use dsv3_kernels::fp8::{self, ActQuantShape, E4M3_TABLE, Fp8Weight, ScaleFmt, decode_e4m3, decode_fast, encode_e4m3};
use proptest::prelude::*;

/// The format's definition, written independently of the crate: (-1)^s (1 + m/8) 2^(e-7),
/// subnormals (m/8) 2^-6, NaN at S.1111.111.
fn definition(b: u8) -> f64 {
    let s = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 15) as i32, (b & 7) as f64);
    if e == 15 && m == 7.0 {
        f64::NAN
    } else if e == 0 {
        s * m / 8.0 * 2f64.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

#[test]
fn all_256_codes_decode_exactly() {
    for b in 0..=255u8 {
        let d = definition(b);
        if d.is_nan() {
            assert!(E4M3_TABLE[b as usize].is_nan() && decode_e4m3(b).is_nan(), "code {b:#04x} must be NaN");
            assert!(b == 0x7F || b == 0xFF);
        } else {
            assert_eq!(E4M3_TABLE[b as usize] as f64, d, "table, code {b:#04x}");
            assert_eq!(decode_fast(b).to_bits(), E4M3_TABLE[b as usize].to_bits(), "fast decode, code {b:#04x}");
        }
    }
}

#[test]
fn reference_values_of_the_spec() {
    for (b, v) in [(0x01u8, 0.001953125f32), (0x08, 0.015625), (0x38, 1.0), (0x3C, 1.5), (0x40, 2.0), (0x7E, 448.0), (0xFE, -448.0)] {
        assert_eq!(decode_e4m3(b), v, "code {b:#04x}");
    }
    assert_eq!(decode_e4m3(0x80).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn encode_inverts_decode_on_every_finite_code() {
    for b in 0..=255u8 {
        if !fp8::is_nan_code(b) {
            assert_eq!(encode_e4m3(decode_e4m3(b)), b, "code {b:#04x}");
        }
    }
}

#[test]
fn ties_round_to_the_even_code() {
    // Every midpoint between two adjacent positive codes goes to the even one.
    for c in 0..0x7Eu8 {
        let mid = (decode_e4m3(c) as f64 + decode_e4m3(c + 1) as f64) / 2.0;
        let mid32 = mid as f32;
        assert_eq!(mid32 as f64, mid, "midpoint is exact in f32");
        let want = if c % 2 == 0 { c } else { c + 1 };
        assert_eq!(encode_e4m3(mid32), want, "midpoint of {c:#04x} and {:#04x}", c + 1);
        assert_eq!(encode_e4m3(-mid32), 0x80 | want);
    }
}

#[test]
fn saturation_and_nan() {
    assert_eq!(encode_e4m3(448.0), 0x7E);
    assert_eq!(encode_e4m3(463.99), 0x7E);
    assert_eq!(encode_e4m3(464.0), 0x7E, "the tie above 448 would round to the NaN code; saturates");
    assert_eq!(encode_e4m3(1e30), 0x7E);
    assert_eq!(encode_e4m3(f32::INFINITY), 0x7E);
    assert_eq!(encode_e4m3(f32::NEG_INFINITY), 0xFE);
    assert!(fp8::is_nan_code(encode_e4m3(f32::NAN)));
    assert_eq!(encode_e4m3(1e-30), 0x00);
    assert_eq!(encode_e4m3(-1e-30), 0x80);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn encode_matches_exhaustive_search(x in prop_oneof![-500f32..500.0, -0.05f32..0.05, -0.002f32..0.002]) {
        prop_assert_eq!(encode_e4m3(x), fp8::reference::encode_by_search(x));
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp(x in -448f32..448.0) {
        let y = decode_e4m3(encode_e4m3(x));
        // 3 mantissa bits: half an ulp is 2^-4 relative for normals, 2^-10 absolute below 2^-6.
        let bound = if x.abs() >= 1.0 / 64.0 { x.abs() / 16.0 } else { 1.0 / 1024.0 };
        prop_assert!((x - y).abs() <= bound, "x = {x}, decoded {y}");
    }
}

fn quant_both(x: &[f32], rows: usize, cols: usize, fmt: ScaleFmt) -> (Vec<u8>, Vec<f32>) {
    let shape = ActQuantShape { rows, cols };
    let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; rows * cols / 128]);
    let (mut qr, mut sr) = (q.clone(), s.clone());
    fp8::act_quant(x, shape, fmt, &mut q, &mut s).unwrap();
    fp8::reference::act_quant(x, shape, fmt, &mut qr, &mut sr).unwrap();
    assert_eq!(q, qr, "codes");
    assert_eq!(s, sr, "scales");
    (q, s)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn act_quant_fast_equals_reference_and_bounds_error(
        rows in prop_oneof![Just(1usize), Just(7), 1usize..40],
        tiles in prop_oneof![Just(1usize), Just(4), Just(56), 1usize..20],
        range in prop_oneof![Just(1e-6f32), Just(1.0), Just(1e4)],
        ue8m0 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cols = tiles * 128;
        let mut rng = seed | 1;
        let x: Vec<f32> = (0..rows * cols).map(|i| {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            if i % 97 == 0 { 0.0 } else { ((rng >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * range }
        }).collect();
        let fmt = if ue8m0 { ScaleFmt::Ue8m0 } else { ScaleFmt::Float };
        let (q, s) = quant_both(&x, rows, cols, fmt);
        let mut back = vec![0f32; x.len()];
        fp8::act_dequant(&q, &s, ActQuantShape { rows, cols }, &mut back).unwrap();
        for (t, tile) in x.chunks(128).enumerate() {
            let amax = tile.iter().fold(0f32, |a, v| a.max(v.abs()));
            let want = amax.max(1e-4) / 448.0;
            if ue8m0 {
                prop_assert!(s[t] >= want && s[t] < 2.0 * want && s[t].to_bits() & 0x7F_FFFF == 0, "ue8m0 scale {} for {}", s[t], want);
            } else {
                prop_assert_eq!(s[t], want);
            }
            for (j, &v) in tile.iter().enumerate() {
                let err = (v - back[t * 128 + j]).abs();
                prop_assert!(err <= (v.abs() / 16.0).max(s[t] / 1024.0) * 1.0001, "x = {v}, back = {}", back[t * 128 + j]);
            }
        }
    }
}

#[test]
fn act_quant_zero_tile_gets_the_floor_scale() {
    let x = vec![0f32; 256];
    let (q, s) = quant_both(&x, 1, 256, ScaleFmt::Float);
    assert!(q.iter().all(|&b| b == 0));
    assert_eq!(s, vec![1e-4 / 448.0; 2]);
}

#[test]
fn act_quant_detects_nan_and_inf_in_a_tile() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![1f32; 3 * 256];
        x[2 * 256 + 130] = bad; // row 2, second tile; amax by f32::max would hide a NaN
        let shape = ActQuantShape { rows: 3, cols: 256 };
        let (mut q, mut s) = (vec![0u8; x.len()], vec![0f32; 6]);
        for r in [
            fp8::act_quant(&x, shape, ScaleFmt::Float, &mut q, &mut s),
            fp8::reference::act_quant(&x, shape, ScaleFmt::Float, &mut q, &mut s),
        ] {
            match r {
                Err(KernelError::Invalid { detail, .. }) => assert!(detail.contains("row 2, columns 128..256"), "{detail}"),
                other => panic!("expected an error for {bad}, got {other:?}"),
            }
        }
    }
}

#[test]
fn act_quant_bad_shapes_are_errors() {
    let (mut q, mut s) = (vec![0u8; 100], vec![0f32; 1]);
    let r = fp8::act_quant(&[0.0; 100], ActQuantShape { rows: 1, cols: 100 }, ScaleFmt::Float, &mut q, &mut s);
    assert!(matches!(r, Err(KernelError::Shape { .. })), "{r:?}");
    let (mut q, mut s) = (vec![0u8; 128], vec![0f32; 2]);
    let r = fp8::act_quant(&[0.0; 128], ActQuantShape { rows: 1, cols: 128 }, ScaleFmt::Float, &mut q, &mut s);
    assert!(matches!(r, Err(KernelError::Length { what: "scales", .. })), "{r:?}");
}

#[test]
fn weight_validation_names_the_problem() {
    let ok = |s: Vec<f32>| Fp8Weight::new(130, 200, vec![0x38; 130 * 200], s);
    assert!(ok(vec![1.0; 4]).is_ok());
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut s = vec![1.0; 4];
        s[3] = bad;
        match ok(s) {
            Err(KernelError::Invalid { what: "scale_inv", detail, .. }) => assert!(detail.contains("[1, 1]"), "{detail}"),
            other => panic!("scale {bad}: {other:?}"),
        }
    }
    assert!(matches!(ok(vec![1.0; 3]), Err(KernelError::Length { what: "scale_inv", expected: 4, got: 3, .. })));
    let mut d = vec![0x38u8; 130 * 200];
    d[129 * 200 + 5] = 0xFF;
    match Fp8Weight::new(130, 200, d, vec![1.0; 4]) {
        Err(KernelError::Invalid { what: "data", detail, .. }) => assert!(detail.contains("[129, 5]"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(Fp8Weight::new(130, 200, vec![0; 10], vec![1.0; 4]), Err(KernelError::Length { what: "data", .. })));
    assert!(Fp8Weight::new(0, 200, vec![], vec![]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn weight_quantize_dequantize_within_bound(rows in small_dim(), cols in small_dim(), seed in any::<u64>()) {
        let mut rng = seed | 1;
        let w: Vec<f32> = (0..rows * cols).map(|_| { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5 }).collect();
        let q = Fp8Weight::quantize(rows, cols, &w).unwrap();
        let v = q.view();
        let d = v.dequantize();
        // Each block's scale is max(amax, 1e-4) / 448 (so the block's largest value maps to
        // the largest code); the per-element bound below would also hold for a larger scale.
        let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
        for b in 0..br * bc {
            let (r0, c0) = ((b / bc) * 128, (b % bc) * 128);
            let mut amax = 0f32;
            for r in r0..(r0 + 128).min(rows) {
                for c in c0..(c0 + 128).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            prop_assert_eq!(v.scale_inv()[b], amax.max(1e-4) / 448.0, "block {}", b);
        }
        for r in 0..rows {
            for c in 0..cols {
                let s = v.scale_at(r, c);
                let (x, y) = (w[r * cols + c], d[r * cols + c]);
                prop_assert!((x - y).abs() <= (x.abs() / 16.0).max(s / 1024.0) * 1.0001);
                // Dequantisation is exactly code value times the block scale.
                prop_assert_eq!(y, decode_e4m3(v.data()[r * cols + c]) * s);
            }
        }
        // In aggregate: three mantissa bits keep the error of a normal value within |x|/16, so
        // calc_diff = Σ(w - d)² / Σ(w² + d²) <= Σ w²/256 / Σ w² (the subnormal terms, at most
        // (scale/1024)² each, are below 1e-6 of Σ w² since one value per block is 448·scale).
        let cd = fp8::calc_diff(&w, &d);
        prop_assert!(cd <= 1.0 / 256.0 + 1e-6, "calc_diff {cd}");
    }
}
