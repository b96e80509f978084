//! RoPE / YaRN against docs/model.md §3.4–3.6: the V3 frequency table, the correction range,
//! softmax scales, the attention factor, rotation invariants, fast == reference bit for bit,
//! and equivalence with HF's de-interleave + rotate-half under the (evens, odds) permutation.

mod common;

use dsv3_kernels::KernelError;
use dsv3_kernels::rope::{self, RopeCfg, RopeLayout, RopeTable, Yarn, reference};
use proptest::prelude::*;
use std::sync::LazyLock;

const V3: RopeCfg = RopeCfg::DEEPSEEK_V3;

/// Full-context (163840-position) tables, built once for the property tests.
static V3_TABLE: LazyLock<RopeTable> = LazyLock::new(|| RopeTable::new(&V3, 163_840).unwrap());
static LITE_TABLE: LazyLock<RopeTable> = LazyLock::new(|| RopeTable::new(&RopeCfg::DEEPSEEK_V2_LITE, 163_840).unwrap());

fn rel(a: f64, b: f64) -> f64 {
    if b == 0.0 { a.abs() } else { ((a - b) / b).abs() }
}

#[test]
fn v3_inv_freq_equals_spec_table() {
    // docs/model.md §3.5 reference table: (i, θ'_i).
    let table = [
        (0, 1.0),
        (10, 5.6234132519e-02),
        (11, 3.9006926567e-02),
        (12, 2.6879360111e-02),
        (13, 1.8378146219e-02),
        (14, 1.2447955870e-02),
        (15, 8.3345089510e-03),
        (16, 5.5e-03),
        (17, 3.5619974943e-03),
        (18, 2.2493653008e-03),
        (19, 1.3705136361e-03),
        (20, 7.9056941504e-04),
        (21, 4.1499039849e-04),
        (22, 1.7782794100e-04),
        (23, 3.3338035804e-05),
        (31, 3.3338035804e-06),
    ];
    let f = rope::inv_freq(&V3).unwrap();
    assert_eq!(f.len(), 32);
    for (i, want) in table {
        assert!(rel(f[i] as f64, want) <= 1e-6, "θ'_{i} = {} vs {want}", f[i]);
    }
    // Pairs 0..=10 keep θ_i = 10000^(-i/32); pairs >= 23 are θ_i / 40.
    for (i, &v) in f.iter().enumerate() {
        let theta = 10000f64.powf(-(i as f64) / 32.0);
        if i <= 10 {
            assert!(rel(v as f64, theta) <= 1e-6, "i = {i}");
        } else if i >= 23 {
            assert!(rel(v as f64, theta / 40.0) <= 1e-6, "i = {i}");
        } else {
            assert!((v as f64) < theta && (v as f64) > theta / 40.0, "blend at {i}");
        }
    }
}

#[test]
fn v3_correction_range_is_10_23() {
    let y = V3.yarn.unwrap();
    assert!((rope::correction_dim(32.0, 64, 10000.0, 4096) - 10.4722).abs() < 1e-4);
    assert!((rope::correction_dim(1.0, 64, 10000.0, 4096) - 22.5134).abs() < 1e-4);
    assert_eq!(rope::correction_range(&V3).unwrap(), Some((10, 23)));
    assert_eq!(rope::correction_range(&RopeCfg::MOONLIGHT).unwrap(), None);
    // Clamps: huge β_fast → low = 0; tiny β_slow → high = d - 1.
    let wide = RopeCfg { yarn: Some(Yarn { beta_fast: 1e9, beta_slow: 1e-9, ..y }), ..V3 };
    assert_eq!(rope::correction_range(&wide).unwrap(), Some((0, 63)));
    // low == high gets +0.001 instead of a division by zero. β = 1000/700 puts both
    // correction dims in (-2, 0]: low = high = 0, so pair 0 is kept and pairs >= 1 are / 40.
    let step = RopeCfg { yarn: Some(Yarn { beta_fast: 1000.0, beta_slow: 700.0, ..y }), ..V3 };
    assert_eq!(rope::correction_range(&step).unwrap(), Some((0, 0)));
    let plain = rope::inv_freq(&RopeCfg { yarn: None, ..V3 }).unwrap();
    let f = rope::inv_freq(&step).unwrap();
    assert_eq!(f[0], plain[0]);
    for i in 1..32 {
        assert_eq!(f[i], plain[i] / 40.0, "pair {i}");
    }
    // Both ends clamped to d - 1 = 63: low = high = 63, nothing interpolated.
    let top = RopeCfg { yarn: Some(Yarn { beta_fast: 7.5e-6, beta_slow: 1e-7, ..y }), ..V3 };
    assert_eq!(rope::correction_range(&top).unwrap(), Some((63, 63)));
    assert_eq!(rope::inv_freq(&top).unwrap(), plain);
}

#[test]
fn softmax_scales_and_attention_factor() {
    let v3 = rope::softmax_scale_f64(192, V3.yarn.as_ref()).unwrap();
    assert!(rel(v3, 0.1352337789) < 1e-9, "{v3}");
    let lite = rope::softmax_scale_f64(192, RopeCfg::DEEPSEEK_V2_LITE.yarn.as_ref()).unwrap();
    assert!(rel(lite, 0.1147213868) < 1e-9, "{lite}");
    let moon = rope::softmax_scale_f64(192, None).unwrap();
    assert!(rel(moon, 0.0721687836) < 1e-9, "{moon}");
    // The f32 value is the f64 one rounded once.
    assert_eq!(rope::softmax_scale(192, V3.yarn.as_ref()).unwrap(), v3 as f32);
    assert!((rope::yarn_mscale(40.0, 1.0) - 1.3688879454).abs() < 1e-9);
    assert!((rope::yarn_mscale(40.0, 0.707) - 1.2608037774).abs() < 1e-9);
    assert_eq!(rope::yarn_mscale(1.0, 1.0), 1.0);
    assert_eq!(rope::yarn_mscale(0.5, 1.0), 1.0);
    // cos/sin attention factor: exactly 1 for V3, V2-Lite, and plain RoPE.
    assert_eq!(rope::attn_factor(V3.yarn.as_ref()), 1.0);
    assert_eq!(rope::attn_factor(RopeCfg::DEEPSEEK_V2_LITE.yarn.as_ref()), 1.0);
    assert_eq!(rope::attn_factor(None), 1.0);
    let odd = Yarn { mscale: 1.0, mscale_all_dim: 0.0, ..V3.yarn.unwrap() };
    assert!(rel(rope::attn_factor(Some(&odd)) as f64, 1.3688879454) < 1e-7);
    assert!(rope::softmax_scale(0, None).is_err());
    let table = RopeTable::new(&V3, 4).unwrap();
    assert_eq!(table.attn_factor(), 1.0);
}

#[test]
fn moonlight_is_plain_rope_with_theta_50000() {
    let f = rope::inv_freq(&RopeCfg::MOONLIGHT).unwrap();
    for (i, &v) in f.iter().enumerate() {
        let want = 1.0 / 50000f64.powf(2.0 * i as f64 / 64.0);
        assert!(rel(v as f64, want) <= 1e-6, "θ_{i} = {v} vs {want}");
    }
}

/// Builds `[tokens, heads, 192]` q-like data with a deterministic pattern.
fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.7311 + seed as f32 * 0.1).sin() * 3.0).collect()
}

#[test]
fn position_zero_is_identity_and_hand_worked_rotation() {
    let table = RopeTable::new(&V3, 8).unwrap();
    let lay = RopeLayout::q_pe(2, 3, 128, 64);
    let x = data(2 * 3 * 192, 1);
    let mut y = x.clone();
    rope::apply_rope(&mut y, lay, &[0, 0], &table).unwrap();
    assert_eq!(x, y);
    // Pair 0 has θ' = 1: (1, 0) at p = 1 becomes (cos 1, sin 1); pair 31 turns by θ'_31.
    let mut v = vec![0f32; 64];
    v[0] = 1.0;
    v[62] = 1.0;
    rope::apply_rope(&mut v, RopeLayout::contiguous(1, 1, 64), &[1], &table).unwrap();
    assert_eq!((v[0], v[1]), (1f32.cos(), 1f32.sin()));
    let t31 = table.inv_freq()[31];
    assert_eq!((v[62], v[63]), (t31.cos(), t31.sin()));
    assert!(v[2..62].iter().all(|&e| e == 0.0));
}

#[test]
fn table_matches_angle_formed_in_f32() {
    let table = RopeTable::new(&V3, 200_000).unwrap();
    let f = rope::inv_freq(&V3).unwrap();
    for p in [0usize, 1, 4095, 4096, 163_839, 199_999] {
        let (c, s) = table.cos_sin(p).unwrap();
        for i in 0..32 {
            let phi = p as f32 * f[i];
            assert_eq!((c[i].to_bits(), s[i].to_bits()), (phi.cos().to_bits(), phi.sin().to_bits()));
        }
    }
    assert!(table.cos_sin(200_000).is_none());
    assert_eq!((table.rope_dim(), table.max_pos()), (64, 200_000));
}

/// HF `rope_interleave=true`: de-interleave to [evens, odds], then q·cos + rotate_half(q)·sin
/// with cos/sin = concat(φ, φ) (written as in HF's modeling code).
fn hf_rope(u: &[f32], p: u32, inv_freq: &[f32]) -> Vec<f32> {
    let h = inv_freq.len();
    let q: Vec<f32> = (0..h).map(|j| u[2 * j]).chain((0..h).map(|j| u[2 * j + 1])).collect();
    let emb: Vec<f32> = (0..2 * h).map(|j| p as f32 * inv_freq[j % h]).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = emb.iter().map(|e| (e.cos(), e.sin())).unzip();
    let rot: Vec<f32> = (0..h).map(|j| -q[j + h]).chain((0..h).map(|j| q[j])).collect();
    (0..2 * h).map(|j| q[j] * cos[j] + rot[j] * sin[j]).collect()
}

#[test]
fn hf_layout_equals_ours_under_permutation() {
    let f = rope::inv_freq(&V3).unwrap();
    let table = RopeTable::new(&V3, 5000).unwrap();
    for (k, p) in [1u32, 7, 100, 4097].into_iter().enumerate() {
        let u = data(64, k as u32);
        let mut ours = u.clone();
        rope::apply_rope(&mut ours, RopeLayout::contiguous(1, 1, 64), &[p], &table).unwrap();
        let hf = hf_rope(&u, p, &f);
        let perm: Vec<f32> = (0..32).map(|j| ours[2 * j]).chain((0..32).map(|j| ours[2 * j + 1])).collect();
        assert!(perm.iter().zip(&hf).all(|(a, b)| a.to_bits() == b.to_bits()), "p = {p}");
        // Scores are permutation invariant: q·k agrees between the two layouts.
        let k2 = data(64, 99);
        let (mut ko, kh) = (k2.clone(), hf_rope(&k2, p + 3, &f));
        rope::apply_rope(&mut ko, RopeLayout::contiguous(1, 1, 64), &[p + 3], &table).unwrap();
        let d1: f64 = ours.iter().zip(&ko).map(|(a, b)| *a as f64 * *b as f64).sum();
        let d2: f64 = hf.iter().zip(&kh).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((d1 - d2).abs() < 1e-9 * d1.abs().max(1.0));
        // The wrong variant (rotate-half on the un-permuted vector) does differ.
        let q = &u;
        let wrong: Vec<f32> = (0..64)
            .map(|j| {
                let phi = p as f32 * f[j % 32];
                let r = if j < 32 { -q[j + 32] } else { q[j - 32] };
                q[j] * phi.cos() + r * phi.sin()
            })
            .collect();
        assert!(wrong.iter().zip(&ours).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

fn layouts() -> impl Strategy<Value = (RopeLayout, usize)> {
    let q = (0usize..6, 1usize..5).prop_map(|(t, h)| (RopeLayout::q_pe(t, h, 128, 64), t));
    let k = (0usize..9).prop_map(|t| (RopeLayout::k_pe(t, 512, 64), t));
    let c = (0usize..40, 1usize..130).prop_map(|(t, h)| (RopeLayout::contiguous(t, h, 64), t));
    let gap = (0usize..5, 1usize..4, 0usize..7, 0usize..5).prop_map(|(t, h, off, pad)| {
        let hs = 64 + pad;
        (RopeLayout { tokens: t, heads: h, row_stride: off + hs * h + pad, head_stride: hs, offset: off }, t)
    });
    prop_oneof![q, k, c, gap]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn fast_equals_reference_bitwise((lay, t) in layouts(), seed in any::<u32>(), pos in proptest::collection::vec(0u32..163_840, 40), lite in any::<bool>()) {
        let table: &RopeTable = if lite { &LITE_TABLE } else { &V3_TABLE };
        let n = lay.tokens * lay.row_stride;
        let x = data(n, seed);
        let (mut a, mut b) = (x.clone(), x.clone());
        rope::apply_rope(&mut a, lay, &pos[..t], table).unwrap();
        reference::apply_rope(&mut b, lay, &pos[..t], table.inv_freq(), table.attn_factor()).unwrap();
        prop_assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        // Only the rope slots moved.
        let mut touched = vec![false; n];
        for tok in 0..t {
            for h in 0..lay.heads {
                let s = tok * lay.row_stride + lay.offset + h * lay.head_stride;
                touched[s..s + 64].iter_mut().for_each(|v| *v = true);
            }
        }
        for i in 0..n {
            if !touched[i] {
                prop_assert_eq!(a[i].to_bits(), x[i].to_bits());
            }
        }
    }

    #[test]
    fn rotation_preserves_pair_norms_and_composes(p in 0u32..2048, q in 0u32..2048, seed in any::<u32>()) {
        let table = RopeTable::new(&V3, 4096).unwrap();
        let lay = RopeLayout::contiguous(1, 1, 64);
        let u = data(64, seed);
        let mut a = u.clone();
        rope::apply_rope(&mut a, lay, &[p], &table).unwrap();
        let mut ab = a.clone();
        rope::apply_rope(&mut ab, lay, &[q], &table).unwrap();
        let mut c = u.clone();
        rope::apply_rope(&mut c, lay, &[p + q], &table).unwrap();
        // Angle error of p·θ + q·θ versus (p+q)·θ in f32 (θ <= 1) is at most
        // (ulp(φ_p) + ulp(φ_q) + ulp(φ_{p+q})) / 2 + cos/sin and product roundings.
        let ang = 3.0 * (p + q + 1) as f32 * f32::EPSILON + 16.0 * f32::EPSILON;
        for i in 0..32 {
            let n0 = (u[2 * i] as f64).hypot(u[2 * i + 1] as f64);
            let n1 = (a[2 * i] as f64).hypot(a[2 * i + 1] as f64);
            prop_assert!((n0 - n1).abs() <= 4.0 * f32::EPSILON as f64 * n0 + 1e-30, "pair {i}: {n0} vs {n1}");
            for j in [2 * i, 2 * i + 1] {
                prop_assert!((ab[j] - c[j]).abs() <= ang * n0 as f32, "elem {j}: {} vs {}", ab[j], c[j]);
            }
        }
    }
}

#[test]
fn bad_shapes_and_configs_are_errors() {
    let table = RopeTable::new(&V3, 16).unwrap();
    let f = table.inv_freq().to_vec();
    let lay = RopeLayout::q_pe(2, 4, 128, 64);
    let mut x = vec![1f32; 2 * 4 * 192];
    let orig = x.clone();
    assert!(matches!(rope::apply_rope(&mut x[..100], lay, &[0, 1], &table), Err(KernelError::Length { what: "x", .. })));
    assert!(matches!(rope::apply_rope(&mut x, lay, &[0], &table), Err(KernelError::Length { what: "positions", .. })));
    let e = rope::apply_rope(&mut x, lay, &[3, 16], &table).unwrap_err();
    assert!(
        matches!(&e, KernelError::Invalid { what: "positions", detail, .. } if detail.contains("16") && detail.contains("token 1")),
        "{e}"
    );
    assert_eq!(x, orig, "nothing written on error");
    let overlap = RopeLayout { head_stride: 32, ..lay };
    assert!(matches!(rope::apply_rope(&mut x, overlap, &[0, 1], &table), Err(KernelError::Shape { .. })));
    let too_narrow = RopeLayout { offset: 129, ..lay };
    assert!(rope::apply_rope(&mut x, too_narrow, &[0, 1], &table).is_err());
    let no_heads = RopeLayout { heads: 0, ..lay };
    assert!(rope::apply_rope(&mut x, no_heads, &[0, 1], &table).is_err());
    let huge = RopeLayout { heads: usize::MAX, head_stride: usize::MAX, ..lay };
    assert!(rope::apply_rope(&mut x, huge, &[0, 1], &table).is_err());
    assert!(reference::apply_rope(&mut x, lay, &[0, 1], &[], 1.0).is_err());
    let wide = RopeLayout { offset: 130, row_stride: 768, ..lay };
    assert!(reference::apply_rope(&mut x, wide, &[0, 1], &f, 1.0).is_err(), "130 + 3*192 + 64 > 768");
    assert!(reference::apply_rope(&mut x[..10], lay, &[0, 1], &f, 1.0).is_err());
    assert_eq!(x, orig);
    // Zero tokens is valid.
    rope::apply_rope(&mut [], RopeLayout::k_pe(0, 512, 64), &[], &table).unwrap();
    // Configs.
    let y = V3.yarn.unwrap();
    for bad in [
        RopeCfg { rope_head_dim: 63, ..V3 },
        RopeCfg { rope_head_dim: 0, ..V3 },
        RopeCfg { theta: 1.0, ..V3 },
        RopeCfg { theta: f64::NAN, ..V3 },
        RopeCfg { yarn: Some(Yarn { factor: 0.0, ..y }), ..V3 },
        RopeCfg { yarn: Some(Yarn { factor: f64::INFINITY, ..y }), ..V3 },
        RopeCfg { yarn: Some(Yarn { original_max_position_embeddings: 0, ..y }), ..V3 },
        RopeCfg { yarn: Some(Yarn { beta_slow: -1.0, ..y }), ..V3 },
        RopeCfg { yarn: Some(Yarn { mscale: f64::NAN, ..y }), ..V3 },
    ] {
        assert!(rope::inv_freq(&bad).is_err(), "{bad:?}");
        assert!(RopeTable::new(&bad, 4).is_err(), "{bad:?}");
    }
    assert!(RopeTable::new(&V3, usize::MAX).is_err());
}
