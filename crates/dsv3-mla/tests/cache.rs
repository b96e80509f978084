//! The block allocator and step plans of the paged latent cache: pages come back on free and
//! truncate, running out of pages is a typed error that changes nothing (other sequences stay
//! bit-identical), plans are all-or-nothing, stale plans are refused, and bad batches get
//! typed errors.

mod common;

use common::*;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::*;
use proptest::prelude::*;

fn tiny() -> MlaConfig {
    small_cfg(Some(128), 64, 16)
}

/// A one-layer engine with `pages` pages and random weights.
fn engine(pages: usize) -> Engine {
    let cfg = tiny();
    Engine::new(cfg, &MlaHostWeights::random(&cfg, 1).unwrap(), pages, GemmPath::Reference)
}

/// Prefills `n` tokens into `s` with real data.
fn fill(e: &mut Engine, s: SeqId, n: usize, seed: u64) {
    let x = inputs(seed, n * e.cfg.hidden);
    e.step(&[(s, n)], &x, false);
}

#[test]
fn pages_are_allocated_on_demand_and_returned_on_free() {
    let mut e = engine(6);
    assert_eq!((e.cache.free_pages(), e.cache.total_pages()), (6, 6));
    let a = e.cache.add_sequence();
    let b = e.cache.add_sequence();
    fill(&mut e, a, 1, 1);
    assert_eq!(e.cache.free_pages(), 5);
    fill(&mut e, a, 63, 2); // exactly fills the first page
    assert_eq!((e.cache.free_pages(), e.cache.seq_len(a).unwrap()), (5, 64));
    fill(&mut e, a, 1, 3); // the 65th token opens a second page
    assert_eq!((e.cache.free_pages(), e.cache.block_table(a).unwrap().len()), (4, 2));
    fill(&mut e, b, 130, 4);
    assert_eq!(e.cache.free_pages(), 1);
    let b_pages = e.cache.block_table(b).unwrap().to_vec();
    e.cache.free_sequence(b).unwrap();
    assert_eq!(e.cache.free_pages(), 4);
    assert_eq!(e.cache.seq_len(b), Err(MlaError::UnknownSequence(b)));
    // The freed pages are the ones handed out next.
    let c = e.cache.add_sequence();
    fill(&mut e, c, 192, 5);
    let mut c_pages = e.cache.block_table(c).unwrap().to_vec();
    c_pages.sort();
    let mut want = b_pages.clone();
    want.sort();
    assert_eq!(c_pages, want);
    e.cache.free_sequence(a).unwrap();
    e.cache.free_sequence(c).unwrap();
    assert_eq!(e.cache.free_pages(), 6);
    assert_eq!(e.cache.free_sequence(c), Err(MlaError::UnknownSequence(c)));
}

#[test]
fn out_of_pages_is_an_error_and_leaves_everything_untouched() {
    let mut e = engine(5);
    let a = e.cache.add_sequence();
    let b = e.cache.add_sequence();
    fill(&mut e, a, 100, 7); // 2 pages
    let (table, len, free) = (e.cache.block_table(a).unwrap().to_vec(), e.cache.seq_len(a).unwrap(), e.cache.free_pages());
    let pool = e.cache.download_pool(&B, 0).unwrap();
    let generation = e.cache.generation();

    // b alone needs 4 pages, 3 are free.
    let err = e.cache.plan(&B, &[(b, 200)]).unwrap_err();
    assert_eq!(err, MlaError::OutOfPages { needed: 4, free: 3 });
    // A batch where a's part fits but the whole does not: all or nothing.
    let err = e.cache.plan(&B, &[(a, 30), (b, 150)]).unwrap_err();
    assert_eq!(err, MlaError::OutOfPages { needed: 4, free: 3 });

    assert_eq!(e.cache.block_table(a).unwrap(), &table[..]);
    assert_eq!(e.cache.seq_len(a).unwrap(), len);
    assert_eq!(e.cache.seq_len(b).unwrap(), 0);
    assert_eq!(e.cache.free_pages(), free);
    assert_eq!(e.cache.generation(), generation);
    let after = e.cache.download_pool(&B, 0).unwrap();
    assert!(pool.iter().zip(&after).all(|(x, y)| x.to_bits() == y.to_bits()), "the pool changed");

    // And the cache still works: b fits in what is left.
    fill(&mut e, b, 192, 8);
    assert_eq!(e.cache.free_pages(), 0);
    assert_eq!(e.cache.plan(&B, &[(a, 1)]).err(), None, "a still has room in its second page");
}

#[test]
fn truncate_returns_whole_pages_only_and_keeps_the_prefix() {
    let mut e = engine(8);
    let s = e.cache.add_sequence();
    fill(&mut e, s, 200, 9); // 4 pages
    let rows = e.cache.read_rows(&B, 0, s).unwrap();
    let w = e.cfg.latent_dim();
    for (len, pages) in [(200, 4), (193, 4), (192, 3), (129, 3), (64, 1), (1, 1), (0, 0)] {
        e.cache.truncate(s, len).unwrap();
        assert_eq!(e.cache.seq_len(s).unwrap(), len);
        assert_eq!(e.cache.block_table(s).unwrap().len(), pages, "len {len}");
        assert_eq!(e.cache.free_pages(), 8 - pages);
        assert_eq!(e.cache.read_rows(&B, 0, s).unwrap(), rows[..len * w], "len {len}");
    }
    let err = e.cache.truncate(s, 1).unwrap_err();
    assert!(matches!(err, MlaError::Invalid { what: "truncate", .. }), "{err}");
    // An emptied sequence takes tokens again from position 0.
    fill(&mut e, s, 3, 10);
    assert_eq!(e.cache.seq_len(s).unwrap(), 3);
}

#[test]
fn stale_plans_and_bad_batches_are_refused() {
    let mut e = engine(4);
    let a = e.cache.add_sequence();
    let b = e.cache.add_sequence();
    let old = e.cache.plan(&B, &[(a, 2)]).unwrap();
    let _new = e.cache.plan(&B, &[(a, 1)]).unwrap();
    let err = e.cache.layer(&old, 0).unwrap_err();
    assert!(matches!(err, MlaError::StalePlan { .. }), "{err}");
    let p = e.cache.plan(&B, &[(b, 1)]).unwrap();
    e.cache.truncate(b, 0).unwrap();
    assert!(matches!(e.cache.layer(&p, 0), Err(MlaError::StalePlan { .. })));
    let p = e.cache.plan(&B, &[(b, 1)]).unwrap();
    assert!(matches!(e.cache.layer(&p, 1), Err(MlaError::Invalid { what: "layer", .. })));

    let len_a = e.cache.seq_len(a).unwrap();
    let bad: Vec<(Vec<(SeqId, usize)>, &str)> =
        vec![(vec![], "empty"), (vec![(a, 0)], "0 tokens"), (vec![(a, 1), (b, 1), (a, 1)], "twice")];
    for (batch, want) in bad {
        let err = e.cache.plan(&B, &batch).unwrap_err();
        assert!(err.to_string().contains(want), "{batch:?}: {err}");
    }
    let ghost = {
        let g = e.cache.add_sequence();
        e.cache.free_sequence(g).unwrap();
        g
    };
    assert_eq!(e.cache.plan(&B, &[(a, 1), (ghost, 1)]).unwrap_err(), MlaError::UnknownSequence(ghost));
    let err = e.cache.plan(&B, &[(a, 4096)]).unwrap_err();
    assert_eq!(err, MlaError::PositionLimit { seq: a, len: len_a, add: 4096, max: 4096 });
    assert_eq!(e.cache.seq_len(a).unwrap(), len_a, "failed plans change nothing");

    // Buffers of the wrong length are refused before any work.
    let p = e.cache.plan(&B, &[(a, 2)]).unwrap();
    let mut lc = e.cache.layer(&p, 0).unwrap();
    let x = vec![0f32; 3 * e.cfg.hidden];
    let mut out = vec![0f32; 2 * e.cfg.hidden];
    let err = e.w.decode(&B, &e.ctx, &mut lc, &x, &mut out).unwrap_err();
    assert!(matches!(err, MlaError::Invalid { what: "x", .. }), "{err}");
}

#[test]
fn cache_config_is_validated() {
    let good = CacheConfig::for_model(&tiny(), 2, 8);
    assert!(good.validate().is_ok());
    for (c, field) in [
        (CacheConfig { layers: 0, ..good }, "layers"),
        (CacheConfig { num_pages: 0, ..good }, "num_pages"),
        (CacheConfig { page_size: 0, ..good }, "page_size"),
        (CacheConfig { max_position: 0, ..good }, "max_position"),
        (CacheConfig { kv_lora_rank: 0, ..good }, "kv_lora_rank"),
    ] {
        match PagedLatentCache::new(&B, c) {
            Err(MlaError::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut cache = PagedLatentCache::new(&B, good).unwrap();
    let err = cache.upload_pool(&B, 0, &[0.0; 3]).unwrap_err();
    assert!(matches!(err, MlaError::Invalid { what: "upload_pool", .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random add / append / truncate / free sequences keep the allocator's books: every page
    /// is either free or owned by exactly one sequence, and each table has ceil(len / 64) pages.
    #[test]
    fn allocator_books_balance(ops in proptest::collection::vec((0u8..4, 0usize..4, 1usize..150), 1..40)) {
        let cfg = tiny();
        let mut cache = PagedLatentCache::new(&B, CacheConfig::for_model(&cfg, 1, 10)).unwrap();
        let mut ids: Vec<SeqId> = Vec::new();
        for (op, which, n) in ops {
            match op {
                0 => ids.push(cache.add_sequence()),
                1 if !ids.is_empty() => {
                    let s = ids[which % ids.len()];
                    let before = cache.seq_len(s).unwrap();
                    match cache.plan(&B, &[(s, n)]) {
                        Ok(_) => prop_assert_eq!(cache.seq_len(s).unwrap(), before + n),
                        Err(MlaError::OutOfPages { needed, free }) => {
                            prop_assert!(needed > free);
                            prop_assert_eq!(cache.seq_len(s).unwrap(), before);
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                2 if !ids.is_empty() => {
                    let s = ids[which % ids.len()];
                    let len = cache.seq_len(s).unwrap();
                    cache.truncate(s, len.saturating_sub(n)).unwrap();
                }
                3 if !ids.is_empty() => {
                    let s = ids.remove(which % ids.len());
                    cache.free_sequence(s).unwrap();
                }
                _ => {}
            }
            let mut owned = vec![0u32; 10];
            for &s in &ids {
                let t = cache.block_table(s).unwrap();
                prop_assert_eq!(t.len(), cache.seq_len(s).unwrap().div_ceil(PAGE_SIZE));
                t.iter().for_each(|&p| owned[p as usize] += 1);
            }
            prop_assert!(owned.iter().all(|&c| c <= 1), "a page has two owners: {owned:?}");
            prop_assert_eq!(owned.iter().filter(|&&c| c == 0).count(), cache.free_pages());
        }
    }
}
