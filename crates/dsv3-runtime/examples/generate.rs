//! Greedy, sampled and MTP speculative generation on a tiny random V3-architecture model
//! (written to a temporary directory in the real checkpoint format). Greedy output with MTP
//! equals greedy output without it, token for token.
//!
//! `cargo run --release -p dsv3-runtime --example generate`

use dsv3_runtime::prelude::*;

fn main() -> Result<(), RuntimeError> {
    let dir = std::env::temp_dir().join(format!("dsv3-example-{}", std::process::id()));
    init_random_preset(Preset::Tiny, &dir, &InitOptions { seed: 3, progress: Progress::Never, ..Default::default() })?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(&dir)?;
    ck.validate(&cfg)?;
    let model = Model::load(&Cpu, &ck, &cfg, GemmPath::Fp8)?;
    let mtp = Mtp::load(&Cpu, &ck, &cfg, &model)?;
    let prompt = [0u32, 17, 99, 400];
    let req = |sampling| Request { prompt: &prompt, max_tokens: 24, sampling, eos: &[], allowed: cfg.vocab_size };

    let greedy = generate(&Cpu, &model, &req(SamplingParams::default()), |_| Ok(()))?;
    let with_mtp = generate_mtp(&Cpu, &model, &mtp, &req(SamplingParams::default()), |_| Ok(()))?;
    println!("greedy:      {:?}", greedy.ids);
    println!("greedy, MTP: {:?} (acceptance {:.2})", with_mtp.ids, with_mtp.mtp.as_ref().map_or(0.0, |s| s.acceptance()));
    assert_eq!(greedy.ids, with_mtp.ids);

    let sampled = generate(&Cpu, &model, &req(SamplingParams { temperature: 0.8, top_k: 50, top_p: 0.9, seed: 7 }), |_| Ok(()))?;
    println!("sampled:     {:?}", sampled.ids);
    println!("prefill {:.0} tokens/s, decode {:.0} tokens/s", sampled.prefill_tokens_per_s(), sampled.decode_tokens_per_s());
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
