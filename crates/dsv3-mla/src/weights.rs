//! The weights of one MLA layer: host tensors as the checkpoint stores them (docs/model.md §2), and
//! their backend-resident form.
//!
//! `kv_b_proj` (FP8, `[H·(nope + v), kv_lora]`, rows `h·(nope+v) + j` with `j < nope` the key
//! half and the rest the value half, docs/model.md §2) is split once at load into the absorbed
//! matrices `W_UK [H·nope, kv_lora]` and `W_UV [H·v, kv_lora]`, dequantised exactly
//! (fp8 × scale_inv in f32). The backend's dense-weight form is bf16, so each matrix is held
//! as a **bf16 pair** `hi = bf16(w)`, `lo = bf16(w − hi)` and every product with it is
//! `x·hi + x·lo`: 16 significant bits, within 2⁻¹⁷ of the exact dequantised weight, so the
//! reference path really multiplies by the checkpoint's weights. (Rounding to a single bf16,
//! as DeepSeek's own code does, moves V3-like logits by ~2e-3 × max|logit| against an f32
//! reference; the pair costs 2 × 16 MiB more per V3 layer.) Both forms of attention, expanded
//! and absorbed, use the same pairs, so they compute the same function.

use crate::config::MlaConfig;
use crate::error::{MlaError, Result};
use dsv3_kernels::Backend;
use dsv3_kernels::bf16_gemm::Bf16WeightRef;
use dsv3_kernels::fp8::Fp8Weight;
use half::bf16;
use rayon::prelude::*;

/// The query projection as stored: LoRA-compressed (V3) or direct (V2-Lite, Moonlight).
#[derive(Debug, Clone, PartialEq)]
pub enum HostQProj {
    /// `q_a_proj [q_lora, hidden]`, `q_a_layernorm [q_lora]`, `q_b_proj [H·(nope+rope), q_lora]`.
    Lora { q_a_proj: Fp8Weight, q_a_layernorm: Vec<f32>, q_b_proj: Fp8Weight },
    /// `q_proj [H·(nope+rope), hidden]`.
    Direct { q_proj: Fp8Weight },
}

/// One layer's attention tensors on the host, named as in the checkpoint (without the
/// `model.layers.N.self_attn.` prefix). Norm weights are f32 (upcast from bf16 by the loader).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaHostWeights {
    pub q: HostQProj,
    /// `[kv_lora + rope, hidden]`, output ordered `[latent | k_rope]`.
    pub kv_a_proj_with_mqa: Fp8Weight,
    /// `[kv_lora]`.
    pub kv_a_layernorm: Vec<f32>,
    /// `[H·(nope + v), kv_lora]`.
    pub kv_b_proj: Fp8Weight,
    /// `[hidden, H·v]`.
    pub o_proj: Fp8Weight,
}

fn check_fp8(tensor: &'static str, w: &Fp8Weight, rows: usize, cols: usize) -> Result<()> {
    if w.rows() == rows && w.cols() == cols {
        Ok(())
    } else {
        Err(MlaError::TensorShape { tensor, expected: format!("[{rows}, {cols}]"), got: format!("[{}, {}]", w.rows(), w.cols()) })
    }
}

fn check_norm(tensor: &'static str, w: &[f32], len: usize) -> Result<()> {
    if w.len() != len {
        return Err(MlaError::TensorShape { tensor, expected: format!("[{len}]"), got: format!("[{}]", w.len()) });
    }
    match w.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(MlaError::TensorShape { tensor, expected: "finite values".into(), got: format!("{} at [{i}]", w[i]) }),
        None => Ok(()),
    }
}

impl MlaHostWeights {
    /// Checks every tensor against `cfg`; the error names the first bad tensor.
    pub fn validate(&self, cfg: &MlaConfig) -> Result<()> {
        cfg.validate()?;
        match (&self.q, cfg.q_lora_rank) {
            (HostQProj::Lora { q_a_proj, q_a_layernorm, q_b_proj }, Some(r)) => {
                check_fp8("q_a_proj", q_a_proj, r, cfg.hidden)?;
                check_norm("q_a_layernorm", q_a_layernorm, r)?;
                check_fp8("q_b_proj", q_b_proj, cfg.q_dim(), r)?;
            }
            (HostQProj::Direct { q_proj }, None) => check_fp8("q_proj", q_proj, cfg.q_dim(), cfg.hidden)?,
            (HostQProj::Lora { .. }, None) => {
                return Err(MlaError::TensorShape {
                    tensor: "q_proj",
                    expected: "q_proj (q_lora_rank is None)".into(),
                    got: "q_a_proj/q_b_proj".into(),
                });
            }
            (HostQProj::Direct { .. }, Some(_)) => {
                return Err(MlaError::TensorShape {
                    tensor: "q_a_proj",
                    expected: "q_a_proj/q_b_proj (q_lora_rank is set)".into(),
                    got: "q_proj".into(),
                });
            }
        }
        check_fp8("kv_a_proj_with_mqa", &self.kv_a_proj_with_mqa, cfg.latent_dim(), cfg.hidden)?;
        check_norm("kv_a_layernorm", &self.kv_a_layernorm, cfg.kv_lora_rank)?;
        check_fp8("kv_b_proj", &self.kv_b_proj, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)?;
        check_fp8("o_proj", &self.o_proj, cfg.hidden, cfg.o_dim())
    }

    /// Random weights for tests and benchmarks: every projection `N(0, 1/sqrt(in_features))`
    /// (approximately: see `normal_vec`), quantised to FP8 per 128x128 block as the checkpoints are; norm weights
    /// `1 + 0.05·N(0, 1)`. Deterministic in `seed` (independent of the thread count).
    pub fn random(cfg: &MlaConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut stream = 0u64;
        let mut proj = |rows: usize, cols: usize| -> Result<Fp8Weight> {
            stream += 1;
            let w = normal_vec(seed, stream, rows * cols, 1.0 / (cols as f32).sqrt());
            quantize_par(rows, cols, &w)
        };
        let q = match cfg.q_lora_rank {
            Some(r) => {
                HostQProj::Lora { q_a_proj: proj(r, cfg.hidden)?, q_a_layernorm: norm_vec(seed, 101, r), q_b_proj: proj(cfg.q_dim(), r)? }
            }
            None => HostQProj::Direct { q_proj: proj(cfg.q_dim(), cfg.hidden)? },
        };
        let w = MlaHostWeights {
            q,
            kv_a_proj_with_mqa: proj(cfg.latent_dim(), cfg.hidden)?,
            kv_a_layernorm: norm_vec(seed, 102, cfg.kv_lora_rank),
            kv_b_proj: proj(cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)?,
            o_proj: proj(cfg.hidden, cfg.o_dim())?,
        };
        w.validate(cfg)?;
        Ok(w)
    }

    /// `(W_UK [H·nope, kv_lora], W_UV [H·v, kv_lora])`: `kv_b_proj` dequantised and split per
    /// head (module docs), as the f32 values `hi + lo` of the bf16 pairs the backend holds.
    pub fn absorbed(&self, cfg: &MlaConfig) -> Result<(Vec<f32>, Vec<f32>)> {
        let [uk_hi, uk_lo, uv_hi, uv_lo] = self.absorbed_pairs(cfg)?;
        let sum = |hi: &[bf16], lo: &[bf16]| hi.iter().zip(lo).map(|(h, l)| h.to_f32() + l.to_f32()).collect();
        Ok((sum(&uk_hi, &uk_lo), sum(&uv_hi, &uv_lo)))
    }

    /// `[W_UK hi, W_UK lo, W_UV hi, W_UV lo]`, the bf16 pairs of the module docs.
    pub fn absorbed_pairs(&self, cfg: &MlaConfig) -> Result<[Vec<bf16>; 4]> {
        check_fp8("kv_b_proj", &self.kv_b_proj, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)?;
        let (n, v, l) = (cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let full = self.kv_b_proj.view().dequantize();
        let mut out: [Vec<bf16>; 4] = Default::default();
        let hi_lo = |x: f32| {
            let hi = bf16::from_f32(x);
            (hi, bf16::from_f32(x - hi.to_f32()))
        };
        for head in full.chunks_exact((n + v) * l) {
            for (j, &x) in head.iter().enumerate() {
                let (hi, lo) = hi_lo(x);
                let base = if j < n * l { 0 } else { 2 };
                out[base].push(hi);
                out[base + 1].push(lo);
            }
        }
        Ok(out)
    }
}

/// The query projection on the backend.
enum QProj<B: Backend> {
    Lora { a: B::Weight, norm: B::Buf<f32>, b: B::Weight },
    Direct { q: B::Weight },
}

/// One layer's attention weights resident on a backend (see the module docs for `W_UK`/`W_UV`).
pub struct MlaWeights<B: Backend> {
    pub(crate) cfg: MlaConfig,
    q: QProj<B>,
    pub(crate) kv_a: B::Weight,
    pub(crate) kv_norm: B::Buf<f32>,
    /// `W_UK` as a bf16 pair `[hi, lo]` (module docs).
    pub(crate) w_uk: [B::DenseWeight; 2],
    /// `W_UV` as a bf16 pair `[hi, lo]`.
    pub(crate) w_uv: [B::DenseWeight; 2],
    pub(crate) o_proj: B::Weight,
}

impl<B: Backend> std::fmt::Debug for MlaWeights<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlaWeights").field("cfg", &self.cfg).field("backend", &std::any::type_name::<B>()).finish_non_exhaustive()
    }
}

/// The query path as the forward pass uses it.
pub(crate) enum QPath<'a, B: Backend> {
    Lora { a: &'a B::Weight, norm: &'a B::Buf<f32>, b: &'a B::Weight },
    Direct { q: &'a B::Weight },
}

impl<B: Backend> MlaWeights<B> {
    /// Validates `host` against `cfg` (errors name the tensor) and uploads it; `kv_b_proj` is
    /// split into the bf16 pairs of `W_UK` / `W_UV` (module docs).
    pub fn new(b: &B, cfg: &MlaConfig, host: &MlaHostWeights) -> Result<Self> {
        host.validate(cfg)?;
        let q = match &host.q {
            HostQProj::Lora { q_a_proj, q_a_layernorm, q_b_proj } => {
                QProj::Lora { a: b.upload_weight(q_a_proj.view())?, norm: b.upload(q_a_layernorm)?, b: b.upload_weight(q_b_proj.view())? }
            }
            HostQProj::Direct { q_proj } => QProj::Direct { q: b.upload_weight(q_proj.view())? },
        };
        let [uk_hi, uk_lo, uv_hi, uv_lo] = host.absorbed_pairs(cfg)?;
        let (h, l) = (cfg.n_heads, cfg.kv_lora_rank);
        let dense = |rows: usize, w: &[bf16]| -> Result<B::DenseWeight> { Ok(b.upload_dense_weight(Bf16WeightRef::new(rows, l, w)?)?) };
        let (uk_rows, uv_rows) = (h * cfg.qk_nope_head_dim, h * cfg.v_head_dim);
        Ok(MlaWeights {
            cfg: *cfg,
            q,
            kv_a: b.upload_weight(host.kv_a_proj_with_mqa.view())?,
            kv_norm: b.upload(&host.kv_a_layernorm)?,
            w_uk: [dense(uk_rows, &uk_hi)?, dense(uk_rows, &uk_lo)?],
            w_uv: [dense(uv_rows, &uv_hi)?, dense(uv_rows, &uv_lo)?],
            o_proj: b.upload_weight(host.o_proj.view())?,
        })
    }

    /// [`MlaHostWeights::random`] uploaded.
    pub fn random(b: &B, cfg: &MlaConfig, seed: u64) -> Result<Self> {
        MlaWeights::new(b, cfg, &MlaHostWeights::random(cfg, seed)?)
    }

    /// The configuration the weights were checked against.
    pub fn config(&self) -> &MlaConfig {
        &self.cfg
    }

    pub(crate) fn q_path(&self) -> QPath<'_, B> {
        match &self.q {
            QProj::Lora { a, norm, b } => QPath::Lora { a, norm, b },
            QProj::Direct { q } => QPath::Direct { q },
        }
    }

    /// Bytes of weights one forward pass reads: FP8 codes + f32 block scales of the four FP8
    /// projections, `W_UK`/`W_UV` as the bf16 pairs they are held as (4 bytes a value, instead
    /// of `kv_b_proj`), and the f32 norms.
    pub fn bytes(&self) -> usize {
        let c = &self.cfg;
        let fp8 = |r: usize, k: usize| r * k + 4 * r.div_ceil(128) * k.div_ceil(128);
        let q = match c.q_lora_rank {
            Some(r) => fp8(r, c.hidden) + 4 * r + fp8(c.q_dim(), r),
            None => fp8(c.q_dim(), c.hidden),
        };
        q + fp8(c.latent_dim(), c.hidden)
            + 4 * c.kv_lora_rank
            + 4 * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank
            + fp8(c.hidden, c.o_dim())
    }
}

/// [`Fp8Weight::quantize`] (bit-identical: `scale_inv = max(amax, 1e-4) / 448` per 128x128
/// block, `code = encode(w / scale_inv)`), in parallel over bands of 128 rows: random V3-width
/// layers are ~190 MB of FP8.
pub fn quantize_par(rows: usize, cols: usize, w: &[f32]) -> Result<Fp8Weight> {
    use dsv3_kernels::fp8::{AMAX_FLOOR, BLOCK, E4M3_MAX, encode_e4m3};
    let n = rows.checked_mul(cols).filter(|&n| n == w.len());
    if n.is_none() || rows == 0 || cols == 0 {
        return Err(MlaError::TensorShape {
            tensor: "quantize_par",
            expected: format!("[{rows}, {cols}]"),
            got: format!("{} values", w.len()),
        });
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(MlaError::TensorShape { tensor: "quantize_par", expected: "finite values".into(), got: format!("{} at {i}", w[i]) });
    }
    let bc = cols.div_ceil(BLOCK);
    let mut data = vec![0u8; rows * cols];
    let mut scale_inv = vec![0f32; rows.div_ceil(BLOCK) * bc];
    data.par_chunks_mut(BLOCK * cols).zip(scale_inv.par_chunks_mut(bc)).zip(w.par_chunks(BLOCK * cols)).for_each(
        |((codes, scales), src)| {
            for (j, s) in scales.iter_mut().enumerate() {
                let c1 = ((j + 1) * BLOCK).min(cols);
                let amax = src.chunks(cols).flat_map(|row| &row[j * BLOCK..c1]).fold(0f32, |m, v| m.max(v.abs()));
                *s = amax.max(AMAX_FLOOR) / E4M3_MAX;
            }
            for (o, (i, &x)) in codes.iter_mut().zip(src.iter().enumerate()) {
                *o = encode_e4m3(x / scales[(i % cols) / BLOCK]);
            }
        },
    );
    Ok(Fp8Weight::new(rows, cols, data, scale_inv)?)
}

// --- deterministic random numbers (no extra dependency) ---------------------------------------

/// SplitMix64.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` samples of approximately `N(0, std²)`: Irwin–Hall with four 16-bit uniforms per 64-bit
/// draw, `(Σ u_i − 2)·√3·std` (unit variance, tails cut at ±3.46σ; ten times cheaper than
/// Box–Muller, which matters for 150 M values per random V3 layer). Generated in parallel
/// chunks whose streams depend only on `(seed, stream, chunk index)`.
pub(crate) fn normal_vec(seed: u64, stream: u64, n: usize, std: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let k = 3f32.sqrt() * std / 65536.0;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut s = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (c as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
        for x in chunk.iter_mut() {
            let b = splitmix(&mut s);
            let sum = (b & 0xFFFF) + ((b >> 16) & 0xFFFF) + ((b >> 32) & 0xFFFF) + (b >> 48);
            // Each 16-bit value is a uniform on [0, 65536); the sum's mean is 2·65536 - 2.
            *x = (sum as f32 - 131_070.0) * k;
        }
    });
    out
}

fn norm_vec(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    normal_vec(seed, stream, n, 0.05).into_iter().map(|v| 1.0 + v).collect()
}
