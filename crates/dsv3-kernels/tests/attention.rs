//! MLA attention kernels: every fast op against its f64 reference (proptest, bounded cases,
//! shapes around the 4-head / 16-key / 64-key tiles and the V3 widths), paged == contiguous,
//! absorbed == expanded at the kernel level, and typed errors for bad input.
//!
//! Tolerance: the fast kernels accumulate in f32 (FMA) with an online softmax; the references
//! work in f64 and round once. Outputs are convex combinations of cached values, so the error
//! is bounded relative to the largest output: `max |fast - ref| <= 1e-5 · max |ref|` (observed
//! about 1e-7; the bound leaves room for long f32 sums).

mod common;

use common::{Rng, assert_close, latent_dims, max_abs, max_abs_diff, paged, varlen_layout};
use dsv3_kernels::KernelError;
use dsv3_kernels::attention::{
    self, CacheWriteShape, DecodeParams, GatherShape, LatentPool, MlaDims, PrefillInputs, PrefillParams, reference,
};
use dsv3_kernels::bf16_gemm::{Bf16Weight, reference as bf16_ref};
use dsv3_kernels::gemm::GemmShape;
use proptest::prelude::*;

const REL: f32 = 1e-5;

fn bf16_weight(rng: &mut Rng, rows: usize, cols: usize) -> Bf16Weight {
    Bf16Weight::from_f32(rows, cols, &rng.vec(rows * cols, 1.0 / (cols as f32).sqrt())).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn decode_fast_matches_reference(
        seed in any::<u64>(),
        heads in 1usize..=9,
        (kv_lora, rope) in latent_dims(),
        page_size in proptest::sample::select(&[1usize, 5, 16, 64][..]),
        lens in proptest::collection::vec(prop_oneof![1 => Just(0u32), 1 => 1u32..3, 4 => 1u32..300], 0..=4),
    ) {
        let mut rng = Rng::new(seed);
        let (pool_data, table, max_blocks, pool) = paged(&mut rng, &lens, page_size, kv_lora, rope);
        let p = DecodeParams { batch: lens.len(), heads, max_blocks, pool, scale: 0.3 };
        let q = rng.vec(lens.len() * heads * pool.width(), 1.0);
        let mut fast = vec![f32::NAN; lens.len() * heads * kv_lora];
        let mut refr = fast.clone();
        attention::decode(&q, &pool_data, &table, &lens, &p, &mut fast).unwrap();
        reference::decode(&q, &pool_data, &table, &lens, &p, &mut refr).unwrap();
        assert_close(&fast, &refr, REL, "decode")?;
        for (b, &len) in lens.iter().enumerate() {
            if len == 0 {
                prop_assert!(fast[b * heads * kv_lora..(b + 1) * heads * kv_lora].iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn decode_paged_equals_contiguous(
        seed in any::<u64>(),
        heads in 1usize..=5,
        (kv_lora, rope) in latent_dims(),
        page_size in proptest::sample::select(&[1usize, 7, 64][..]),
        lens in proptest::collection::vec(1u32..400, 1..=3),
    ) {
        // The same rows, once on shuffled pages and once as one contiguous page per row.
        let mut rng = Rng::new(seed);
        let (pool_data, table, max_blocks, pool) = paged(&mut rng, &lens, page_size, kv_lora, rope);
        let w = pool.width();
        let maxlen = *lens.iter().max().unwrap() as usize;
        let cpool = LatentPool { num_pages: lens.len(), page_size: maxlen, kv_lora, rope };
        let mut cdata = vec![0f32; cpool.check("test").unwrap()];
        for (b, &len) in lens.iter().enumerate() {
            for j in 0..len as usize {
                let src = (table[b * max_blocks + j / page_size] as usize * page_size + j % page_size) * w;
                cdata[(b * maxlen + j) * w..(b * maxlen + j + 1) * w].copy_from_slice(&pool_data[src..src + w]);
            }
        }
        let ctable: Vec<u32> = (0..lens.len() as u32).collect();
        let q = rng.vec(lens.len() * heads * w, 1.0);
        let mut paged_out = vec![0f32; lens.len() * heads * kv_lora];
        let mut contig_out = paged_out.clone();
        let p = DecodeParams { batch: lens.len(), heads, max_blocks, pool, scale: 0.2 };
        attention::decode(&q, &pool_data, &table, &lens, &p, &mut paged_out).unwrap();
        let cp = DecodeParams { max_blocks: 1, pool: cpool, ..p };
        attention::decode(&q, &cdata, &ctable, &lens, &cp, &mut contig_out).unwrap();
        assert_close(&paged_out, &contig_out, REL, "paged vs contiguous")?;
    }

    #[test]
    fn prefill_fast_matches_reference(
        seed in any::<u64>(),
        heads in 1usize..=5,
        nope in proptest::sample::select(&[4usize, 16, 32][..]),
        (kv_lora, rope) in latent_dims(),
        v in proptest::sample::select(&[8usize, 20, 32][..]),
        seqs in proptest::collection::vec((1u32..150, 1u32..40, any::<bool>()), 1..=3),
    ) {
        let mut rng = Rng::new(seed);
        let d = MlaDims { heads, qk_nope: nope, qk_rope: rope, kv_lora, v };
        let (cu_q, cu_k, q_pos) = varlen_layout(&mut rng, &seqs);
        let (t, s) = (q_pos.len(), *cu_k.last().unwrap() as usize);
        let q = rng.vec(t * heads * d.qk_head(), 1.0);
        let k_nope = rng.vec(s * heads * nope, 1.0);
        let k_pe = rng.vec(s * rope, 1.0);
        let vv = rng.vec(s * heads * v, 1.0);
        let x = PrefillInputs { q: &q[..], k_nope: &k_nope[..], k_pe: &k_pe[..], v: &vv[..], q_pos: &q_pos[..], cu_q: &cu_q[..], cu_k: &cu_k[..] };
        let p = PrefillParams { dims: d, seqs: seqs.len(), tokens: t, keys: s, scale: 0.25 };
        let mut fast = vec![f32::NAN; t * heads * v];
        let mut refr = fast.clone();
        attention::prefill(x, &p, &mut fast).unwrap();
        reference::prefill(x, &p, &mut refr).unwrap();
        assert_close(&fast, &refr, REL, "prefill")?;
    }

    #[test]
    fn absorb_and_expand_fast_match_reference(
        seed in any::<u64>(),
        rows in prop_oneof![Just(0usize), 1usize..5, 30usize..70],
        heads in 1usize..=5,
        nope in proptest::sample::select(&[4usize, 32, 128][..]),
        (kv_lora, rope) in latent_dims(),
        v in proptest::sample::select(&[8usize, 20, 128][..]),
    ) {
        let mut rng = Rng::new(seed);
        let d = MlaDims { heads, qk_nope: nope, qk_rope: rope, kv_lora, v };
        let w_uk = bf16_weight(&mut rng, heads * nope, kv_lora);
        let w_uv = bf16_weight(&mut rng, heads * v, kv_lora);
        let q = rng.vec(rows * heads * d.qk_head(), 1.0);
        let (mut fast, mut refr) = (vec![f32::NAN; rows * heads * d.latent()], vec![f32::NAN; rows * heads * d.latent()]);
        attention::absorb_q(&q, w_uk.view(), d, rows, &mut fast).unwrap();
        reference::absorb_q(&q, w_uk.view(), d, rows, &mut refr).unwrap();
        assert_close(&fast, &refr, REL, "absorb_q")?;
        let o_lat = rng.vec(rows * heads * kv_lora, 1.0);
        let (mut fast, mut refr) = (vec![f32::NAN; rows * heads * v], vec![f32::NAN; rows * heads * v]);
        attention::expand_v(&o_lat, w_uv.view(), d, rows, &mut fast).unwrap();
        reference::expand_v(&o_lat, w_uv.view(), d, rows, &mut refr).unwrap();
        assert_close(&fast, &refr, REL, "expand_v")?;
    }

    #[test]
    fn cache_write_and_gather_match_reference(
        seed in any::<u64>(),
        (kv_lora, rope) in latent_dims(),
        page_size in proptest::sample::select(&[1usize, 3, 64][..]),
        lens in proptest::collection::vec(0u32..200, 0..=3),
    ) {
        let mut rng = Rng::new(seed);
        let (pool0, table, max_blocks, pool) = paged(&mut rng, &lens, page_size, kv_lora, rope);
        let w = pool.width();
        // Write every token of every sequence through the kernels.
        let tokens: usize = lens.iter().map(|&l| l as usize).sum();
        let mut slots = Vec::with_capacity(tokens);
        for (b, &len) in lens.iter().enumerate() {
            for j in 0..len as usize {
                slots.push(table[b * max_blocks + j / page_size] * page_size as u32 + (j % page_size) as u32);
            }
        }
        let kv = rng.vec(tokens * w, 3.0);
        let norm_w = rng.vec(kv_lora, 2.0);
        let shape = CacheWriteShape { tokens, pool };
        let (mut fast, mut refr) = (pool0.clone(), pool0.clone());
        attention::cache_write(&kv, &norm_w, 1e-6, &slots, shape, &mut fast).unwrap();
        reference::cache_write(&kv, &norm_w, 1e-6, &slots, shape, &mut refr).unwrap();
        assert_close(&fast, &refr, 2e-6, "cache_write")?;
        // Slots not written are untouched, bit for bit.
        let mut written = vec![false; pool.num_pages * page_size];
        slots.iter().for_each(|&s| written[s as usize] = true);
        for (slot, &wr) in written.iter().enumerate() {
            if !wr {
                prop_assert_eq!(&fast[slot * w..(slot + 1) * w], &pool0[slot * w..(slot + 1) * w]);
            }
        }
        // Gather returns the written rows in order: k_pe exactly, c_kv as written.
        let gs = GatherShape { seqs: lens.len(), max_blocks, keys: tokens, pool };
        let (mut c_fast, mut c_ref) = (vec![f32::NAN; tokens * kv_lora], vec![f32::NAN; tokens * kv_lora]);
        let (mut p_fast, mut p_ref) = (vec![f32::NAN; tokens * rope], vec![f32::NAN; tokens * rope]);
        attention::gather(&fast, &table, &lens, gs, &mut c_fast, &mut p_fast).unwrap();
        reference::gather(&fast, &table, &lens, gs, &mut c_ref, &mut p_ref).unwrap();
        prop_assert_eq!(&c_fast, &c_ref);
        prop_assert_eq!(&p_fast, &p_ref);
        for t in 0..tokens {
            let slot = slots[t] as usize;
            prop_assert_eq!(&c_fast[t * kv_lora..(t + 1) * kv_lora], &fast[slot * w..slot * w + kv_lora]);
            prop_assert_eq!(&p_fast[t * rope..(t + 1) * rope], &kv[t * w + kv_lora..(t + 1) * w]);
        }
    }
}

/// `absorb_q` and `expand_v` give every row the same bits whether it is computed alone or with
/// other rows (1 to 9 at once, V3 widths): MTP verification (a 2-token step against two 1-token
/// steps) and expert-parallel ranks rely on it, on every kernel path.
#[test]
fn absorb_and_expand_rows_are_batch_invariant() {
    let d = MlaDims { heads: 3, qk_nope: 128, qk_rope: 64, kv_lora: 512, v: 128 };
    let mut rng = Rng::new(41);
    let w_uk = bf16_weight(&mut rng, d.heads * d.qk_nope, d.kv_lora);
    let w_uv = bf16_weight(&mut rng, d.heads * d.v, d.kv_lora);
    let (qw, lw, ow, vw) = (d.heads * d.qk_head(), d.heads * d.latent(), d.heads * d.kv_lora, d.heads * d.v);
    let q = rng.vec(9 * qw, 1.0);
    let o_lat = rng.vec(9 * ow, 1.0);
    let one = |t: usize| {
        let (mut a, mut e) = (vec![0f32; lw], vec![0f32; vw]);
        attention::absorb_q(&q[t * qw..(t + 1) * qw], w_uk.view(), d, 1, &mut a).unwrap();
        attention::expand_v(&o_lat[t * ow..(t + 1) * ow], w_uv.view(), d, 1, &mut e).unwrap();
        (a, e)
    };
    let alone: Vec<_> = (0..9).map(one).collect();
    for rows in 2..=9 {
        let (mut a, mut e) = (vec![0f32; rows * lw], vec![0f32; rows * vw]);
        attention::absorb_q(&q[..rows * qw], w_uk.view(), d, rows, &mut a).unwrap();
        attention::expand_v(&o_lat[..rows * ow], w_uv.view(), d, rows, &mut e).unwrap();
        for (t, (a1, e1)) in alone.iter().take(rows).enumerate() {
            assert!(a[t * lw..(t + 1) * lw].iter().zip(a1).all(|(x, y)| x.to_bits() == y.to_bits()), "absorb_q row {t} of {rows}");
            assert!(e[t * vw..(t + 1) * vw].iter().zip(e1).all(|(x, y)| x.to_bits() == y.to_bits()), "expand_v row {t} of {rows}");
        }
    }
}

/// At the kernel level: absorbed decode (absorb_q → decode on the paged cache → expand_v) of
/// every query of a chunk equals the expanded prefill with `k_nope = W_UK c`, `v = W_UV c`.
#[test]
fn absorbed_equals_expanded_kernels() {
    for &(heads, nope, rope, kv_lora, v, page_size) in &[(3usize, 32usize, 16usize, 64usize, 32usize, 16usize), (2, 128, 64, 512, 128, 64)]
    {
        let mut rng = Rng::new(heads as u64 * 7 + kv_lora as u64);
        let d = MlaDims { heads, qk_nope: nope, qk_rope: rope, kv_lora, v };
        let s = 150usize; // keys of the one sequence
        let t = 40usize; // the last 40 positions are the queries
        let (pool_data, table, max_blocks, pool) = paged(&mut rng, &[s as u32], page_size, kv_lora, rope);
        let w_uk = bf16_weight(&mut rng, heads * nope, kv_lora);
        let w_uv = bf16_weight(&mut rng, heads * v, kv_lora);
        let q = rng.vec(t * heads * d.qk_head(), 1.0);
        let q_pos: Vec<u32> = ((s - t) as u32..s as u32).collect();
        let scale = 0.15;

        // Expanded: gather the sequence, up-project every key.
        let (mut c, mut k_pe) = (vec![0f32; s * kv_lora], vec![0f32; s * rope]);
        let gs = GatherShape { seqs: 1, max_blocks, keys: s, pool };
        attention::gather(&pool_data, &table, &[s as u32], gs, &mut c, &mut k_pe).unwrap();
        let mut k_nope = vec![0f32; s * heads * nope];
        let mut vv = vec![0f32; s * heads * v];
        bf16_ref::gemm_bf16(&c, w_uk.view(), GemmShape { m: s, n: heads * nope, k: kv_lora }, &mut k_nope).unwrap();
        bf16_ref::gemm_bf16(&c, w_uv.view(), GemmShape { m: s, n: heads * v, k: kv_lora }, &mut vv).unwrap();
        let (cu_q, cu_k) = ([0u32, t as u32], [0u32, s as u32]);
        let x = PrefillInputs {
            q: &q[..],
            k_nope: &k_nope[..],
            k_pe: &k_pe[..],
            v: &vv[..],
            q_pos: &q_pos[..],
            cu_q: &cu_q[..],
            cu_k: &cu_k[..],
        };
        let mut expanded = vec![0f32; t * heads * v];
        attention::prefill(x, &PrefillParams { dims: d, seqs: 1, tokens: t, keys: s, scale }, &mut expanded).unwrap();

        // Absorbed: one decode row per query, each with the sequence's table and pos + 1 keys.
        let mut q_abs = vec![0f32; t * heads * d.latent()];
        attention::absorb_q(&q, w_uk.view(), d, t, &mut q_abs).unwrap();
        let rows_table: Vec<u32> = (0..t).flat_map(|_| table.clone()).collect();
        let kv_lens: Vec<u32> = q_pos.iter().map(|&p| p + 1).collect();
        let mut o_lat = vec![0f32; t * heads * kv_lora];
        let p = DecodeParams { batch: t, heads, max_blocks, pool, scale };
        attention::decode(&q_abs, &pool_data, &rows_table, &kv_lens, &p, &mut o_lat).unwrap();
        let mut absorbed = vec![0f32; t * heads * v];
        attention::expand_v(&o_lat, w_uv.view(), d, t, &mut absorbed).unwrap();

        let (err, scale) = (max_abs_diff(&absorbed, &expanded), max_abs(&expanded));
        assert!(err <= 1e-4 * scale, "heads {heads} kv_lora {kv_lora}: absorbed vs expanded max |diff| {err} vs max {scale}");
    }
}

/// Hand-worked: one head, two keys, width 2 (kv_lora 1, rope 1), scale 1.
/// q = [1, 0]; keys [1, 0] and [0, 0] → scores 1 and 0 → P = [e/(1+e), 1/(1+e)];
/// output = P · [1, 0] = e/(1+e).
#[test]
fn decode_hand_worked() {
    let pool = LatentPool { num_pages: 2, page_size: 1, kv_lora: 1, rope: 1 };
    let data = vec![0.0, 0.0, 1.0, 0.0]; // page 0 = key 1, page 1 = key 0
    let table = vec![1u32, 0];
    let p = DecodeParams { batch: 1, heads: 1, max_blocks: 2, pool, scale: 1.0 };
    let mut out = vec![0f32; 1];
    attention::decode(&[1.0, 0.0], &data, &table, &[2], &p, &mut out).unwrap();
    let e = std::f32::consts::E;
    assert!((out[0] - e / (1.0 + e)).abs() < 1e-6, "{}", out[0]);
}

#[test]
fn bad_input_gives_typed_errors() {
    let pool = LatentPool { num_pages: 2, page_size: 4, kv_lora: 8, rope: 2 };
    let data = vec![0f32; pool.check("t").unwrap()];
    let p = DecodeParams { batch: 1, heads: 2, max_blocks: 2, pool, scale: 0.1 };
    let q = vec![0f32; 2 * 10];
    let mut out = vec![0f32; 2 * 8];
    let dec = |table: &[u32], lens: &[u32], p: &DecodeParams, q: &[f32], out: &mut [f32]| attention::decode(q, &data, table, lens, p, out);
    // Page id outside the pool.
    let e = dec(&[0, 2], &[5], &p, &q, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "block_table", .. }), "{e}");
    // The page past the length is not read, so it may hold anything.
    dec(&[0, 99], &[4], &p, &q, &mut out).unwrap();
    // More tokens than the block table covers.
    let e = dec(&[0, 1], &[9], &p, &q, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "kv_lens", .. }), "{e}");
    // Non-finite scale, wrong q length, zero heads.
    let e = dec(&[0, 1], &[3], &DecodeParams { scale: f32::NAN, ..p }, &q, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "scale", .. }), "{e}");
    let e = dec(&[0, 1], &[3], &p, &q[1..], &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Length { what: "q", .. }), "{e}");
    let e = dec(&[0, 1], &[3], &DecodeParams { heads: 0, ..p }, &q, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Shape { .. }), "{e}");
    let e = LatentPool { page_size: 0, ..pool }.check("t").unwrap_err();
    assert!(matches!(e, KernelError::Shape { .. }), "{e}");

    // cache_write: duplicate slot, slot outside the pool, bad eps; nothing written.
    let mut pool_data = vec![7f32; data.len()];
    let shape = CacheWriteShape { tokens: 2, pool };
    let kv = vec![1f32; 2 * 10];
    let w = vec![1f32; 8];
    let e = attention::cache_write(&kv, &w, 1e-6, &[3, 3], shape, &mut pool_data).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "slots", .. }), "{e}");
    let e = attention::cache_write(&kv, &w, 1e-6, &[3, 8], shape, &mut pool_data).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "slots", .. }), "{e}");
    let e = attention::cache_write(&kv, &w, f32::INFINITY, &[3, 4], shape, &mut pool_data).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "eps", .. }), "{e}");
    assert!(pool_data.iter().all(|&v| v == 7.0));

    // prefill: a query position with no key, cu_q decreasing.
    let d = MlaDims { heads: 1, qk_nope: 2, qk_rope: 2, kv_lora: 8, v: 2 };
    let (q, kn, kp, v) = (vec![0f32; 4], vec![0f32; 2 * 2], vec![0f32; 2 * 2], vec![0f32; 2 * 2]);
    let p = PrefillParams { dims: d, seqs: 1, tokens: 1, keys: 2, scale: 1.0 };
    let mut out = vec![0f32; 2];
    let x = PrefillInputs {
        q: &q[..],
        k_nope: &kn[..],
        k_pe: &kp[..],
        v: &v[..],
        q_pos: &[2u32][..],
        cu_q: &[0u32, 1][..],
        cu_k: &[0u32, 2][..],
    };
    let e = attention::prefill(x, &p, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "q_pos", .. }), "{e}");
    let x = PrefillInputs { q_pos: &[1u32][..], cu_q: &[0u32, 1, 0][..], ..x };
    let e = attention::prefill(x, &PrefillParams { seqs: 2, ..p }, &mut out).unwrap_err();
    assert!(matches!(e, KernelError::Invalid { what: "cu_q", .. }), "{e}");

    // absorb_q with a weight of the wrong shape.
    let w_uk = Bf16Weight::from_f32(3, 8, &[0.0; 24]).unwrap();
    let e = attention::absorb_q(&q, w_uk.view(), d, 1, &mut [0f32; 10]).unwrap_err();
    assert!(matches!(e, KernelError::Shape { .. }), "{e}");
}
