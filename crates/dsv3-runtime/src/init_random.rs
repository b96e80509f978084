//! Random models in the real checkpoint format: `config.json`, FP8 weights with F32
//! `weight_scale_inv` in 128x128 blocks (partial edge blocks included), BF16 embeddings,
//! norms, router and lm_head, F32 `e_score_correction_bias`, the MTP module when the config
//! has one, and optionally the tokenizer files. Written into a new directory under a temporary
//! name and renamed at the end ([`crate::writer::OutputDir`]).
//!
//! Values (deterministic in the seed, independent of the thread count): projections
//! ~ N(0, 1/fan_in) (FP8 codes of a clipped normal times 112, i.e. |z| <= 4 maps to ±448, and
//! per-block scales `std/112 · 2^u`, u uniform in [-1/4, 1/4)); embeddings N(0, 1); lm_head,
//! router and eh_proj N(0, 1/fan_in); norms 1 + N(0, 0.1²); router bias N(0, 0.05²). The MTP
//! module's `embed_tokens` and `shared_head.head` are byte-identical copies of the main ones, as
//! in the real checkpoint. Every value is drawn from a 65536-entry quantile table by 16 random
//! bits, which is what makes a multi-GB preset fast to write.

use crate::checkpoint::{Checkpoint, Progress};
use crate::config::ModelConfig;
use crate::error::{Result, RuntimeError, output_err};
use crate::plan::{PlannedTensor, TensorRole, tensor_plan};
use crate::presets::Preset;
use crate::tensor_file::{Dtype, TensorSpec};
use crate::tokenizer::Tokenizer;
use crate::writer::{OutputDir, write_json, write_weights};
use dsv3_kernels::fp8::{E4M3_MAX, ScaleFmt, blocks, encode_e4m3, ue8m0_round_up};
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Options of [`init_random`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Seed of every value.
    pub seed: u64,
    /// A directory with `tokenizer.json` (and `tokenizer_config.json`) to copy into the model.
    pub tokenizer_dir: Option<PathBuf>,
    /// Rows of the embedding and `lm_head` instead of the preset's (or the tokenizer's) count;
    /// the tokenizer, if any, must fit in it.
    pub vocab_size: Option<usize>,
    /// Largest data size of one shard; beyond it the weights are sharded with an index.
    pub shard_max_bytes: u64,
    /// Progress bar on a terminal.
    pub progress: Progress,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { seed: 0, tokenizer_dir: None, vocab_size: None, shard_max_bytes: 4 << 30, progress: Progress::Auto }
    }
}

/// What [`init_random`] wrote.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub dir: PathBuf,
    /// Weight files (shards and index) inside `dir`.
    pub files: Vec<PathBuf>,
    /// Tensors stored (scales included).
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    pub config: ModelConfig,
}

/// Writes `preset` to `out`. With a tokenizer, the tiny presets take their vocabulary from it
/// (the token count rounded up to a multiple of 128) and BOS/EOS from its config. An explicit
/// [`InitOptions::vocab_size`] wins over both; the tokenizer must then fit in it.
pub fn init_random_preset(preset: Preset, out: &Path, opts: &InitOptions) -> Result<InitReport> {
    let mut cfg = preset.config();
    if let Some(v) = opts.vocab_size {
        if v == 0 {
            return Err(RuntimeError::Config { file: "--vocab".into(), field: "vocab_size".into(), detail: "must be at least 1".into() });
        }
        cfg.vocab_size = v;
    }
    if let Some(dir) = &opts.tokenizer_dir {
        let tok = Tokenizer::from_dir(dir)?.ok_or_else(|| output_err(dir, "has no tokenizer.json"))?;
        let need = tok.token_count();
        if preset.vocab_from_tokenizer() && opts.vocab_size.is_none() {
            cfg.vocab_size = need.next_multiple_of(128);
        } else if need > cfg.vocab_size {
            return Err(output_err(dir, format!("tokenizer has {need} tokens, more than the vocab_size {}", cfg.vocab_size)));
        }
        cfg.bos_token_id = tok.bos_id().or(cfg.bos_token_id);
        if let Some(e) = tok.eos_id() {
            cfg.eos_token_ids = vec![e];
        }
    }
    cfg.validate()?;
    init_random(&cfg, out, opts)
}

/// Writes a random model of `cfg` to the new directory `out` (see the module docs).
pub fn init_random(cfg: &ModelConfig, out: &Path, opts: &InitOptions) -> Result<InitReport> {
    cfg.validate()?;
    let outdir = OutputDir::create(out)?;
    let dir = outdir.path().to_path_buf();
    let items = recipes(cfg);
    let specs: Vec<TensorSpec> = items.iter().map(|(s, _)| s.clone()).collect();
    let bytes: u64 = specs.iter().map(|s| s.bytes().unwrap_or(0) as u64).sum();
    let bar = progress_bar(opts.progress, bytes);
    let mut files = write_weights(&dir, &specs, opts.shard_max_bytes.max(1), |i, w| {
        let (spec, recipe) = &items[i];
        fill(spec, recipe, cfg, opts.seed, w, &bar)
    })?;
    bar.finish_and_clear();
    write_json(&dir.join("config.json"), &cfg.to_json())?;
    if let Some(src) = &opts.tokenizer_dir {
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let from = src.join(name);
            if from.exists() {
                std::fs::copy(&from, dir.join(name)).map_err(crate::error::io_err(&from, "copy tokenizer file"))?;
            }
        }
    }
    // What was written must load: headers, names, dtypes and shapes against the config.
    Checkpoint::open_with(&dir, Progress::Never)?.validate(cfg)?;
    let final_dir = outdir.commit()?;
    for f in &mut files {
        if let Some(name) = f.file_name() {
            *f = final_dir.join(name);
        }
    }
    Ok(InitReport { dir: final_dir, files, tensors: specs.len(), bytes, config: cfg.clone() })
}

fn progress_bar(p: Progress, total: u64) -> ProgressBar {
    if p == Progress::Auto && std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        if let Ok(s) = ProgressStyle::with_template("writing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}") {
            b.set_style(s);
        }
        b
    } else {
        ProgressBar::hidden()
    }
}

/// How the values of one stored tensor are drawn.
#[derive(Debug, Clone, PartialEq)]
enum Recipe {
    /// FP8 codes of 112·z, z ~ N(0,1) clipped to ±4.
    Fp8Codes,
    /// Block scales std/112 · 2^u, u uniform in [-1/4, 1/4).
    Scale { std: f64 },
    /// BF16 N(0, std²); `seed_name` makes copies (MTP embed/head) byte-identical.
    Normal { std: f64, seed_name: String },
    /// BF16 1 + N(0, 0.01).
    Norm,
    /// F32 N(0, 0.0025).
    Bias,
}

fn recipes(cfg: &ModelConfig) -> Vec<(TensorSpec, Recipe)> {
    let plan = tensor_plan(cfg);
    let mut out = Vec::new();
    let spec = |p: &PlannedTensor, dtype| TensorSpec { name: p.name.clone(), dtype, shape: p.shape.clone() };
    for p in plan.iter() {
        let fan_in = *p.shape.last().unwrap_or(&1) as f64;
        match p.role {
            TensorRole::Linear if cfg.is_fp8() => {
                out.push((spec(p, Dtype::F8E4M3), Recipe::Fp8Codes));
                let s = TensorSpec {
                    name: format!("{}_scale_inv", p.name),
                    dtype: Dtype::F32,
                    shape: vec![blocks(p.shape[0]), blocks(p.shape[1])],
                };
                out.push((s, Recipe::Scale { std: fan_in.powf(-0.5) }));
            }
            TensorRole::Linear | TensorRole::Bf16 | TensorRole::Bf16OrFp8 => {
                let is_embed = p.name.ends_with("embed_tokens.weight");
                let seed_name = if is_embed {
                    "model.embed_tokens.weight".to_string()
                } else if p.name.ends_with("shared_head.head.weight") {
                    "lm_head.weight".to_string()
                } else {
                    p.name.clone()
                };
                out.push((spec(p, Dtype::Bf16), Recipe::Normal { std: if is_embed { 1.0 } else { fan_in.powf(-0.5) }, seed_name }));
            }
            TensorRole::Norm => out.push((spec(p, Dtype::Bf16), Recipe::Norm)),
            TensorRole::F32 => out.push((spec(p, Dtype::F32), Recipe::Bias)),
        }
    }
    out
}

/// Standard-normal quantiles at (i + 1/2) / 65536, clipped to ±4.
fn quantiles() -> &'static [f64] {
    static Q: OnceLock<Vec<f64>> = OnceLock::new();
    Q.get_or_init(|| (0..65536).map(|i| inv_normal_cdf((i as f64 + 0.5) / 65536.0).clamp(-4.0, 4.0)).collect())
}

/// Acklam's rational approximation of the inverse standard normal CDF (rel. error < 1.2e-9).
fn inv_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] =
        [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
    const B: [f64; 5] = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] =
        [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5]) / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The 65536 possible element encodings of `recipe`, `dtype.size()` bytes each.
fn table(recipe: &Recipe, dtype: Dtype, fmt: ScaleFmt) -> Vec<u8> {
    let q = quantiles();
    let mut t = Vec::with_capacity(65536 * dtype.size());
    for (i, &z) in q.iter().enumerate() {
        match recipe {
            Recipe::Fp8Codes => t.push(encode_e4m3((z * (E4M3_MAX as f64 / 4.0)) as f32)),
            Recipe::Scale { std } => {
                let u = ((i as f64 + 0.5) / 65536.0 - 0.5) / 2.0;
                let s = (std / (E4M3_MAX as f64 / 4.0) * u.exp2()) as f32;
                let s = if fmt == ScaleFmt::Ue8m0 { ue8m0_round_up(s) } else { s };
                t.extend_from_slice(&s.to_le_bytes());
            }
            Recipe::Normal { std, .. } => t.extend_from_slice(&bf16::from_f64(z * std).to_bits().to_le_bytes()),
            Recipe::Norm => t.extend_from_slice(&bf16::from_f64(1.0 + 0.1 * z).to_bits().to_le_bytes()),
            Recipe::Bias => t.extend_from_slice(&((0.05 * z) as f32).to_le_bytes()),
        }
    }
    t
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let h = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
    splitmix(splitmix(seed) ^ h)
}

/// wyrand: small, fast, good enough for weights.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xE703_7ED1_A0B4_28DB) as u128);
        ((t >> 64) ^ t) as u64
    }
}

/// Elements per independently seeded chunk; chunks are generated in parallel.
const CHUNK: usize = 1 << 20;

fn fill(spec: &TensorSpec, recipe: &Recipe, cfg: &ModelConfig, seed: u64, w: &mut dyn Write, bar: &ProgressBar) -> Result<()> {
    let size = spec.dtype.size();
    let tab = table(recipe, spec.dtype, cfg.scale_fmt());
    let seed_name = match recipe {
        Recipe::Normal { seed_name, .. } => seed_name.as_str(),
        _ => spec.name.as_str(),
    };
    let tseed = name_seed(seed, seed_name);
    let numel = spec.bytes().unwrap_or(0) / size;
    let n_chunks = numel.div_ceil(CHUNK);
    let batch = rayon::current_num_threads().max(1) * 4;
    let mut buf = vec![0u8; CHUNK * size * batch.min(n_chunks.max(1))];
    let mut c0 = 0;
    while c0 < n_chunks {
        let c1 = (c0 + batch).min(n_chunks);
        let elems = (c1 * CHUNK).min(numel) - c0 * CHUNK;
        let out = &mut buf[..elems * size];
        out.par_chunks_mut(CHUNK * size).enumerate().for_each(|(k, chunk)| {
            let mut rng = Rng(splitmix(tseed ^ splitmix((c0 + k) as u64)));
            for quad in chunk.chunks_mut(4 * size) {
                let r = rng.next();
                for (j, el) in quad.chunks_exact_mut(size).enumerate() {
                    let idx = ((r >> (16 * j)) & 0xFFFF) as usize * size;
                    el.copy_from_slice(&tab[idx..idx + size]);
                }
            }
        });
        w.write_all(out).map_err(crate::error::io_err(Path::new(&spec.name), "write tensor data"))?;
        bar.inc(out.len() as u64);
        c0 = c1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_normal_cdf_matches_known_quantiles() {
        for (p, z) in [(0.5, 0.0), (0.975, 1.959_963_985), (0.841_344_746, 1.0), (0.001, -3.090_232_306), (0.02, -2.053_748_911)] {
            assert!((inv_normal_cdf(p) - z).abs() < 1e-6, "p = {p}");
        }
        let q = quantiles();
        let var = q.iter().map(|z| z * z).sum::<f64>() / q.len() as f64;
        assert!((var - 1.0).abs() < 0.01, "variance of the table {var}");
    }

    #[test]
    fn fp8_code_table_spans_the_e4m3_range() {
        let t = table(&Recipe::Fp8Codes, Dtype::F8E4M3, ScaleFmt::Float);
        assert!(t.contains(&0x7E) && t.contains(&0xFE), "±448 reached at |z| = 4");
        assert!(!t.iter().any(|&b| b & 0x7F == 0x7F), "no NaN codes");
    }

    #[test]
    fn ue8m0_scales_are_powers_of_two() {
        let t = table(&Recipe::Scale { std: 0.01 }, Dtype::F32, ScaleFmt::Ue8m0);
        for c in t.chunks_exact(4) {
            let s = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            assert!(s > 0.0 && s.to_bits() & 0x007F_FFFF == 0, "{s}");
        }
    }
}
