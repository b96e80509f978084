//! Three sequences of different lengths prefilled, then decoded together, one token each per
//! step, in the weight-absorbed form on the paged cache; every step is checked against the
//! expanded form computed on a second cache holding the same tokens.
//!
//! `cargo run --release -p dsv3-mla --example decode`

use dsv3_mla::prelude::*;

fn main() -> Result<(), MlaError> {
    let cfg = MlaConfig::deepseek_v3().with_hidden(1024).with_heads(8).with_max_position(4096);
    let b = Cpu;
    let ctx = MlaContext::new(&b, cfg, GemmPath::Reference)?;
    let layer = MlaWeights::random(&b, &cfg, 1)?;
    let (mut absorbed, mut expanded) =
        (PagedLatentCache::new(&b, CacheConfig::for_model(&cfg, 1, 32))?, PagedLatentCache::new(&b, CacheConfig::for_model(&cfg, 1, 32))?);
    let h = cfg.hidden;
    let input = |n: usize, seed: usize| -> Vec<f32> {
        (0..n * h).map(|i| (((i + 31 * seed) * 2_654_435_761 % 1009) as f32 - 504.0) / 504.0).collect()
    };

    // Prompts of 5, 70 (two pages) and 1 tokens, prefilled in one step on both caches.
    let lens = [5usize, 70, 1];
    let (sa, sb): (Vec<SeqId>, Vec<SeqId>) = lens.iter().map(|_| (absorbed.add_sequence(), expanded.add_sequence())).unzip();
    let total: usize = lens.iter().sum();
    let x = input(total, 0);
    for (cache, seqs) in [(&mut absorbed, &sa), (&mut expanded, &sb)] {
        let batch: Vec<(SeqId, usize)> = seqs.iter().copied().zip(lens).collect();
        let plan = cache.plan(&b, &batch)?;
        let mut out = vec![0f32; total * h];
        layer.prefill(&b, &ctx, &mut cache.layer(&plan, 0)?, &x, &mut out)?;
    }

    for step in 1..=4 {
        let x = input(lens.len(), step);
        let mut outs = Vec::new();
        for (cache, seqs, absorbed_form) in [(&mut absorbed, &sa, true), (&mut expanded, &sb, false)] {
            let batch: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, 1)).collect();
            let plan = cache.plan(&b, &batch)?;
            let mut out = vec![0f32; lens.len() * h];
            let mut lc = cache.layer(&plan, 0)?;
            if absorbed_form {
                layer.decode(&b, &ctx, &mut lc, &x, &mut out)?;
            } else {
                layer.prefill(&b, &ctx, &mut lc, &x, &mut out)?;
            }
            outs.push(out);
        }
        let scale = outs[1].iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = outs[0].iter().zip(&outs[1]).fold(0f32, |m, (a, e)| m.max((a - e).abs()));
        let lens_now: Vec<usize> = sa.iter().map(|&s| absorbed.seq_len(s)).collect::<Result<_, _>>()?;
        println!("step {step}: cached lengths {lens_now:?}, absorbed vs expanded: max |diff| / max |out| = {:.1e}", diff / scale);
        assert!(diff <= 1e-4 * scale, "the two forms disagree");
    }
    Ok(())
}
