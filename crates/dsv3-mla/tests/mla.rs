//! MLA layer invariants (docs/testing.md, "Test tiers": invariants), all in f32 on the CPU backend, each
//! within `max |diff| <= 1e-4 · max |value|` (`common::REL`):
//!
//! * paged == contiguous: the engine (paged cache, fast kernels) equals the naive host
//!   reference with a contiguous cache, for one-shot prefill;
//! * chunked prefill == one-shot prefill;
//! * absorbed (decode form) over a whole chunk == expanded (prefill form);
//! * token-by-token decode == prefill of the whole sequence;
//! * batched decode of sequences of different lengths == each decoded alone;
//! * rollback (truncate) then re-decode == the first decode, bit for bit;
//!
//! over q_lora Some/None, kv_lora 64/128, rope 16/64 with the YaRN table on, plus one case
//! at the true V3 head widths (2 heads) and one on the FP8 GEMM path.

mod common;

use common::*;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::*;
use proptest::prelude::*;

/// Runs a sequence of `n` tokens through the engine several ways and checks that they agree
/// with each other and with the host reference.
fn check_forms(cfg: MlaConfig, seed: u64, n: usize, chunks: &[usize], prompt: usize) {
    let host = MlaHostWeights::random(&cfg, seed).unwrap();
    let x = inputs(seed ^ 0x55, n * cfg.hidden);
    let hd = cfg.hidden;
    let pages = 2 * n.div_ceil(PAGE_SIZE) + 2;

    // Reference: naive attention on a contiguous cache, one-shot.
    let mut ref_cache = Vec::new();
    let reference = HostRef::new(&cfg, &host).step(&mut ref_cache, &x, n);

    // One-shot prefill (expanded form): output and cached rows (c_kv normalised, k_pe rotated
    // at its absolute position) equal the reference's.
    let mut e = Engine::new(cfg, &host, pages, GemmPath::Reference);
    let s = e.cache.add_sequence();
    let one_shot = e.step(&[(s, n)], &x, false);
    assert_close(&one_shot, &reference, REL, "paged one-shot prefill vs contiguous reference");
    assert_close(&e.cache.read_rows(&B, 0, s).unwrap(), &ref_cache, REL, "paged cache rows vs contiguous reference cache");

    // The same chunk in the absorbed form.
    let mut e = Engine::new(cfg, &host, pages, GemmPath::Reference);
    let s = e.cache.add_sequence();
    let absorbed = e.step(&[(s, n)], &x, true);
    assert_close(&absorbed, &one_shot, REL, "absorbed vs expanded");

    // Chunked prefill at the given boundaries.
    let mut e = Engine::new(cfg, &host, pages, GemmPath::Reference);
    let s = e.cache.add_sequence();
    let mut chunked = Vec::with_capacity(n * hd);
    let mut t0 = 0;
    for &len in chunks.iter().chain(std::iter::once(&n)) {
        let len = len.min(n - t0);
        if len == 0 {
            continue;
        }
        chunked.extend(e.step(&[(s, len)], &x[t0 * hd..(t0 + len) * hd], false));
        t0 += len;
    }
    assert_eq!(t0, n);
    assert_close(&chunked, &one_shot, REL, "chunked vs one-shot prefill");

    // Prefill of a prompt, then token-by-token decode.
    let mut e = Engine::new(cfg, &host, pages, GemmPath::Reference);
    let s = e.cache.add_sequence();
    let prompt = prompt.clamp(1, n);
    let mut stepped = e.step(&[(s, prompt)], &x[..prompt * hd], false);
    for t in prompt..n {
        stepped.extend(e.step(&[(s, 1)], &x[t * hd..(t + 1) * hd], true));
    }
    assert_eq!(e.cache.seq_len(s).unwrap(), n);
    assert_close(&stepped, &one_shot, REL, "token-by-token decode vs prefill");
    assert_close(&e.cache.read_rows(&B, 0, s).unwrap(), &ref_cache, REL, "decode-written cache rows vs reference cache");
}

fn cfg_strategy() -> impl Strategy<Value = MlaConfig> {
    (
        prop_oneof![Just(None), Just(Some(128usize))],
        proptest::sample::select(&[64usize, 128][..]),
        proptest::sample::select(&[16usize, 64][..]),
    )
        .prop_map(|(q, kv, rope)| small_cfg(q, kv, rope))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn prefill_decode_chunked_absorbed_all_agree(
        cfg in cfg_strategy(),
        seed in any::<u64>(),
        n in prop_oneof![1usize..4, 60usize..140],
        chunks in proptest::collection::vec(1usize..70, 0..4),
        prompt in 1usize..140,
    ) {
        check_forms(cfg, seed, n, &chunks, prompt);
    }
}

#[test]
fn forms_agree_on_both_q_paths_across_pages() {
    // Deterministic coverage of both query paths, page boundaries (64, 128) and a 1-token chunk.
    for q in [None, Some(128)] {
        check_forms(small_cfg(q, 128, 64), 7, 131, &[63, 1, 64], 62);
        check_forms(small_cfg(q, 64, 16), 8, 65, &[64], 64);
    }
}

#[test]
fn forms_agree_at_v3_head_widths() {
    // q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, V3 YaRN; 2 heads.
    check_forms(v3_widths_cfg(), 3, 70, &[33, 30], 66);
}

#[test]
fn batched_decode_of_different_lengths_equals_each_alone() {
    let cfg = small_cfg(Some(128), 128, 64);
    let host = MlaHostWeights::random(&cfg, 11).unwrap();
    let hd = cfg.hidden;
    let prompts = [5usize, 70, 130, 1];
    let steps = 3;
    let xs: Vec<Vec<f32>> = prompts.iter().enumerate().map(|(i, &p)| inputs(100 + i as u64, (p + steps) * hd)).collect();

    // Batched: prefill the prompts in two batched rounds (first halves, then the rest, so the
    // sequences' pages interleave), then decode `steps` tokens for all sequences per step.
    let mut e = Engine::new(cfg, &host, 32, GemmPath::Reference);
    let ids: Vec<SeqId> = prompts.iter().map(|_| e.cache.add_sequence()).collect();
    let halves: Vec<(usize, usize)> =
        prompts.iter().map(|&p| (0, p.div_ceil(2))).chain(prompts.iter().map(|&p| (p.div_ceil(2), p))).collect();
    for round in halves.chunks(prompts.len()) {
        let batch: Vec<(SeqId, usize)> = ids.iter().zip(round).filter(|(_, r)| r.1 > r.0).map(|(&s, r)| (s, r.1 - r.0)).collect();
        let x: Vec<f32> = xs.iter().zip(round).flat_map(|(x, r)| x[r.0 * hd..r.1 * hd].to_vec()).collect();
        e.step(&batch, &x, false);
    }
    let mut batched = vec![Vec::new(); prompts.len()];
    for k in 0..steps {
        let batch: Vec<(SeqId, usize)> = ids.iter().map(|&s| (s, 1)).collect();
        let x: Vec<f32> = xs.iter().zip(&prompts).flat_map(|(x, &p)| x[(p + k) * hd..(p + k + 1) * hd].to_vec()).collect();
        let out = e.step(&batch, &x, true);
        for (i, o) in out.chunks(hd).enumerate() {
            batched[i].extend_from_slice(o);
        }
    }
    // Pages of different sequences do interleave.
    let t1 = e.cache.block_table(ids[1]).unwrap().to_vec();
    assert!(t1.windows(2).any(|w| w[1] != w[0] + 1), "block table {t1:?} is contiguous; the test wants fragmentation");

    // Alone: each sequence in its own engine.
    for (i, &p) in prompts.iter().enumerate() {
        let mut e = Engine::new(cfg, &host, 32, GemmPath::Reference);
        let s = e.cache.add_sequence();
        e.step(&[(s, p)], &xs[i][..p * hd], false);
        let mut alone = Vec::new();
        for k in 0..steps {
            alone.extend(e.step(&[(s, 1)], &xs[i][(p + k) * hd..(p + k + 1) * hd], true));
        }
        assert_close(&batched[i], &alone, REL, &format!("sequence {i} (prompt {p}) batched vs alone"));
    }
}

#[test]
fn truncate_then_redecode_is_bit_identical() {
    let cfg = small_cfg(None, 64, 16);
    let host = MlaHostWeights::random(&cfg, 5).unwrap();
    let hd = cfg.hidden;
    let x = inputs(9, 75 * hd);
    let mut e = Engine::new(cfg, &host, 8, GemmPath::Reference);
    let s = e.cache.add_sequence();
    e.step(&[(s, 62)], &x[..62 * hd], false);
    let free_before = e.cache.free_pages();
    let rows_before = e.cache.read_rows(&B, 0, s).unwrap();
    let draft = |e: &mut Engine| -> Vec<f32> { (62..70).flat_map(|t| e.step(&[(s, 1)], &x[t * hd..(t + 1) * hd], true)).collect() };
    let first = draft(&mut e);
    assert_eq!(e.cache.free_pages(), free_before - 1, "the draft crossed into a second page");
    e.cache.truncate(s, 62).unwrap();
    assert_eq!(e.cache.seq_len(s).unwrap(), 62);
    assert_eq!(e.cache.free_pages(), free_before);
    assert_eq!(e.cache.read_rows(&B, 0, s).unwrap(), rows_before, "rows before the cut are untouched");
    let second = draft(&mut e);
    assert_eq!(first, second);
}

#[test]
fn fp8_path_tracks_the_reference_path() {
    // hidden, q_lora and H·v are multiples of 128, as the fp8 path needs.
    let cfg = small_cfg(Some(128), 64, 16);
    let host = MlaHostWeights::random(&cfg, 21).unwrap();
    let n = 40;
    let x = inputs(22, n * cfg.hidden);
    let run = |path| {
        let mut e = Engine::new(cfg, &host, 4, path);
        let s = e.cache.add_sequence();
        let mut out = e.step(&[(s, n - 1)], &x[..(n - 1) * cfg.hidden], false);
        out.extend(e.step(&[(s, 1)], &x[(n - 1) * cfg.hidden..], true));
        out
    };
    let (fp8, refp) = (run(GemmPath::Fp8), run(GemmPath::Reference));
    // Activations quantised per 1x128 tile to E4M3 (3 mantissa bits): a few % per element.
    let num: f64 = fp8.iter().zip(&refp).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = refp.iter().map(|&b| (b as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    assert!(rel < 0.08, "fp8 vs reference path: relative L2 error {rel}");
    assert!(rel > 0.0, "the fp8 path should differ from the reference path");
}

#[test]
fn decode_of_several_tokens_per_sequence_equals_prefill() {
    // Speculative verification: several new tokens of one sequence in one absorbed step.
    let cfg = small_cfg(Some(128), 128, 16);
    let host = MlaHostWeights::random(&cfg, 31).unwrap();
    let hd = cfg.hidden;
    let x = inputs(32, 50 * hd);
    let mut a = Engine::new(cfg, &host, 4, GemmPath::Reference);
    let s = a.cache.add_sequence();
    a.step(&[(s, 45)], &x[..45 * hd], false);
    let verify = a.step(&[(s, 5)], &x[45 * hd..], true);
    let mut b = Engine::new(cfg, &host, 4, GemmPath::Reference);
    let s = b.cache.add_sequence();
    let full = b.step(&[(s, 50)], &x, false);
    assert_close(&verify, &full[45 * hd..], REL, "5-token absorbed step vs prefill");
}

#[test]
fn mixed_batch_absorbed_equals_expanded() {
    // One step where sequences bring 3, 1 and 2 new tokens, after prompts of 70, 5 and 1.
    let cfg = small_cfg(None, 128, 64);
    let host = MlaHostWeights::random(&cfg, 41).unwrap();
    let hd = cfg.hidden;
    let run = |absorbed: bool| -> Vec<f32> {
        let mut e = Engine::new(cfg, &host, 8, GemmPath::Reference);
        let ids: Vec<SeqId> = (0..3).map(|_| e.cache.add_sequence()).collect();
        let prompts: Vec<(SeqId, usize)> = ids.iter().copied().zip([70, 5, 1]).collect();
        e.step(&prompts, &inputs(42, 76 * hd), false);
        let batch: Vec<(SeqId, usize)> = ids.iter().copied().zip([3, 1, 2]).collect();
        e.step(&batch, &inputs(43, 6 * hd), absorbed)
    };
    assert_close(&run(true), &run(false), REL, "mixed batch: absorbed vs expanded");
}
