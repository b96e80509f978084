//! Rotary position embedding with YaRN, exactly as docs/model.md §3.4–3.6 and the official
//! DeepSeek `model.py` compute it.
//!
//! * **Layout** (docs/model.md §3.4): the `rope_head_dim` values form adjacent pairs `(u[2i], u[2i+1])`,
//!   rotated in place: `u'[2i] = u[2i]·cos φ_i − u[2i+1]·sin φ_i`,
//!   `u'[2i+1] = u[2i]·sin φ_i + u[2i+1]·cos φ_i` (the official complex multiply). HF's
//!   de-interleave + rotate-half gives the same numbers permuted (evens first, then odds);
//!   never apply rotate-half to the un-permuted vector.
//! * **Frequencies** (docs/model.md §3.5, [`inv_freq`]): θ_i = 1 / b^(2i/d) in f32; with YaRN,
//!   `θ'_i = (θ_i / s)·(1 − smooth_i) + θ_i·smooth_i` in f32 with `smooth = 1 − ramp`, the
//!   official code's form (equal to the spec's `θ(1−ramp) + (θ/s)·ramp` up to f32 rounding).
//!   The correction range is computed in f64 (Python floats in the reference).
//! * **Angles**: `φ_i = (p as f32) · θ'_i` in f32, then `cos`/`sin` in f32, then both times the
//!   attention factor `mscale(s, mscale) / mscale(s, mscale_all_dim)` (HF's form; exactly 1.0
//!   for V3 and V2-Lite, so the official code, which never scales, agrees). [`RopeTable`]
//!   precomputes exactly these f32 values, so the table-driven [`apply_rope`] equals
//!   [`reference::apply_rope`] (which forms the angle on the fly) bit for bit.
//! * **Softmax scale** (docs/model.md §3.6, [`softmax_scale`]): `qk_head_dim^-1/2 · mscale(s, mscale_all_dim)²`
//!   in f64, YaRN always applied when configured (docs/model.md §8 item 2), rounded to f32 once.

use rayon::prelude::*;

use crate::cpu::dispatch;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};

/// Rotated values above which [`apply_rope`] splits tokens over rayon's pool.
const PAR_MIN_ELEMS: usize = 32 * 1024;

/// YaRN parameters (HF `rope_scaling` with `type = "yarn"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// Context extension factor `s` (40 for V3).
    pub factor: f64,
    /// Pre-extension context `L₀` (4096 for V3).
    pub original_max_position_embeddings: usize,
    /// Rotations that mark the extrapolated (high-frequency) end, β_fast (32).
    pub beta_fast: f64,
    /// Rotations that mark the interpolated (low-frequency) end, β_slow (1).
    pub beta_slow: f64,
    /// `mscale` (numerator of the cos/sin attention factor).
    pub mscale: f64,
    /// `mscale_all_dim` (softmax-scale factor, and denominator of the attention factor).
    pub mscale_all_dim: f64,
}

/// RoPE configuration of one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeCfg {
    /// Rotated dims per head, `qk_rope_head_dim` (64); even and > 0.
    pub rope_head_dim: usize,
    /// Base `b`, `rope_theta` (10000 for V3, 50000 for Moonlight); finite and > 1.
    pub theta: f64,
    /// YaRN scaling, `None` for plain RoPE (Moonlight).
    pub yarn: Option<Yarn>,
}

impl RopeCfg {
    /// DeepSeek-V3 / R1: d = 64, b = 10000, YaRN s = 40, L₀ = 4096, β = 32/1, mscale 1/1.
    pub const DEEPSEEK_V3: RopeCfg = RopeCfg {
        rope_head_dim: 64,
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        }),
    };
    /// DeepSeek-V2-Lite: as V3 with mscale = mscale_all_dim = 0.707.
    pub const DEEPSEEK_V2_LITE: RopeCfg = RopeCfg {
        rope_head_dim: 64,
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        }),
    };
    /// Moonlight-16B-A3B: plain RoPE, b = 50000.
    pub const MOONLIGHT: RopeCfg = RopeCfg { rope_head_dim: 64, theta: 50000.0, yarn: None };

    /// Checks every field (ranges above); `op` names the caller in the error.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let d = self.rope_head_dim;
        if d == 0 || !d.is_multiple_of(2) {
            return Err(shape_err(op, format!("rope_head_dim must be even and > 0, got {d}")));
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(invalid(op, "theta", format!("must be finite and > 1, got {}", self.theta)));
        }
        if let Some(y) = &self.yarn {
            let pos = |v: f64| v.is_finite() && v > 0.0;
            if !pos(y.factor) {
                return Err(invalid(op, "yarn.factor", format!("must be finite and > 0, got {}", y.factor)));
            }
            if y.original_max_position_embeddings == 0 {
                return Err(invalid(op, "yarn.original_max_position_embeddings", "must be > 0"));
            }
            if !pos(y.beta_fast) || !pos(y.beta_slow) {
                return Err(invalid(op, "yarn.beta", format!("must be finite and > 0, got {}/{}", y.beta_fast, y.beta_slow)));
            }
            if !y.mscale.is_finite() || !y.mscale_all_dim.is_finite() {
                return Err(invalid(op, "yarn.mscale", "must be finite"));
            }
        }
        Ok(())
    }
}

/// `mscale(s, m) = 1` if `s ≤ 1`, else `0.1 · m · ln s + 1` (docs/model.md §3.5 item 4), in f64.
pub fn yarn_mscale(s: f64, m: f64) -> f64 {
    if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 }
}

/// `corr(r) = d · ln(L₀ / (2π r)) / (2 ln b)`, in f64 in the official code's operation order.
pub fn correction_dim(num_rotations: f64, dim: usize, theta: f64, original_max_pos: usize) -> f64 {
    dim as f64 * (original_max_pos as f64 / (num_rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
}

/// YaRN's `(low, high)`: `max(floor(corr(β_fast)), 0)` and `min(ceil(corr(β_slow)), d − 1)`,
/// before the `+0.001` for `low == high` (which [`inv_freq`] applies). (10, 23) for V3.
pub fn correction_range(cfg: &RopeCfg) -> Result<Option<(i64, i64)>> {
    cfg.validate("correction_range")?;
    Ok(cfg.yarn.map(|y| {
        let (d, b, l0) = (cfg.rope_head_dim, cfg.theta, y.original_max_position_embeddings);
        let low = correction_dim(y.beta_fast, d, b, l0).floor() as i64;
        let high = correction_dim(y.beta_slow, d, b, l0).ceil() as i64;
        (low.max(0), high.min(d as i64 - 1))
    }))
}

/// The inverse frequencies θ'_i, i = 0..d/2, of docs/model.md §3.5 (see the module docs for the exact f32
/// operation order). Errors: an invalid `cfg`.
pub fn inv_freq(cfg: &RopeCfg) -> Result<Vec<f32>> {
    let range = correction_range(cfg)?;
    let d = cfg.rope_head_dim;
    let base = cfg.theta as f32;
    let mut freqs: Vec<f32> = (0..d / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32)).collect();
    if let (Some(y), Some((low, high))) = (cfg.yarn, range) {
        let denom = if low == high { 0.001f64 } else { (high - low) as f64 };
        let (low, denom, s) = (low as f32, denom as f32, y.factor as f32);
        for (i, f) in freqs.iter_mut().enumerate() {
            let ramp = ((i as f32 - low) / denom).clamp(0.0, 1.0);
            let smooth = 1.0 - ramp;
            *f = *f / s * (1.0 - smooth) + *f * smooth;
        }
    }
    Ok(freqs)
}

/// The cos/sin attention factor `mscale(s, mscale) / mscale(s, mscale_all_dim)` (1.0 without
/// YaRN, and exactly 1.0 for V3 and V2-Lite), computed in f64 and rounded to f32.
pub fn attn_factor(yarn: Option<&Yarn>) -> f32 {
    yarn.map_or(1.0, |y| (yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)) as f32)
}

/// `qk_head_dim^(-1/2) · mscale(s, mscale_all_dim)²` in f64 (docs/model.md §3.6; 0.1352337789 for V3).
/// Errors: `qk_head_dim == 0` or a non-finite result.
pub fn softmax_scale_f64(qk_head_dim: usize, yarn: Option<&Yarn>) -> Result<f64> {
    if qk_head_dim == 0 {
        return Err(shape_err("softmax_scale", "qk_head_dim must be > 0"));
    }
    let m = yarn.map_or(1.0, |y| yarn_mscale(y.factor, y.mscale_all_dim));
    let scale = (qk_head_dim as f64).powf(-0.5) * m * m;
    if scale.is_finite() { Ok(scale) } else { Err(invalid("softmax_scale", "yarn", "scale is not finite")) }
}

/// [`softmax_scale_f64`] rounded once to f32, the value kernels multiply scores by.
pub fn softmax_scale(qk_head_dim: usize, yarn: Option<&Yarn>) -> Result<f32> {
    Ok(softmax_scale_f64(qk_head_dim, yarn)? as f32)
}

/// Where the rope vectors lie in a `[tokens, row_stride]` f32 buffer: for token `t` and head
/// `h` the `rope_dim` values start at `t·row_stride + offset + h·head_stride`. Validated so
/// that vectors never overlap and every row holds all its heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeLayout {
    /// Tokens (rows); 0 means no work.
    pub tokens: usize,
    /// Vectors per token; > 0.
    pub heads: usize,
    /// Elements per token row (the buffer is `tokens * row_stride` long).
    pub row_stride: usize,
    /// Distance between consecutive heads' vectors (≥ `rope_dim` when `heads > 1`).
    pub head_stride: usize,
    /// Start of head 0's vector within a row.
    pub offset: usize,
}

impl RopeLayout {
    /// `q_pe` inside `q [tokens, heads, nope + rope]`: the last `rope` values of each head.
    pub fn q_pe(tokens: usize, heads: usize, qk_nope_head_dim: usize, qk_rope_head_dim: usize) -> Self {
        let hd = qk_nope_head_dim.saturating_add(qk_rope_head_dim);
        RopeLayout { tokens, heads, row_stride: heads.saturating_mul(hd), head_stride: hd, offset: qk_nope_head_dim }
    }

    /// `k_pe` inside a `[tokens, kv_lora_rank + rope]` kv row (offset 512 of 576 for V3).
    pub fn k_pe(tokens: usize, kv_lora_rank: usize, qk_rope_head_dim: usize) -> Self {
        let w = kv_lora_rank.saturating_add(qk_rope_head_dim);
        RopeLayout { tokens, heads: 1, row_stride: w, head_stride: qk_rope_head_dim, offset: kv_lora_rank }
    }

    /// Densely packed `[tokens, heads, rope_dim]` vectors.
    pub fn contiguous(tokens: usize, heads: usize, rope_dim: usize) -> Self {
        RopeLayout { tokens, heads, row_stride: heads.saturating_mul(rope_dim), head_stride: rope_dim, offset: 0 }
    }

    /// Checks the layout for vectors of `rope_dim` values; returns the buffer length.
    pub fn check(&self, op: &'static str, rope_dim: usize) -> Result<usize> {
        if self.heads == 0 {
            return Err(shape_err(op, "heads must be > 0"));
        }
        if self.heads > 1 && self.head_stride < rope_dim {
            return Err(shape_err(op, format!("head_stride {} < rope_dim {rope_dim}: vectors overlap", self.head_stride)));
        }
        let last = checked_mul(op, "(heads - 1) * head_stride", self.heads - 1, self.head_stride)?;
        let need = self.offset.checked_add(last).and_then(|v| v.checked_add(rope_dim));
        match need {
            Some(need) if need <= self.row_stride => checked_mul(op, "tokens * row_stride", self.tokens, self.row_stride),
            Some(need) => Err(shape_err(op, format!("row_stride {} < {need} needed by offset, heads and rope_dim", self.row_stride))),
            None => Err(crate::error::KernelError::Overflow { op, what: "row extent" }),
        }
    }
}

/// Precomputed `cos φ · f` and `sin φ · f` for positions `0..max_pos` (`f` the attention
/// factor), bit-identical to the on-the-fly values of [`reference::apply_rope`].
#[derive(Debug, Clone)]
pub struct RopeTable {
    rope_dim: usize,
    max_pos: usize,
    inv_freq: Vec<f32>,
    attn_factor: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table for positions `0..max_pos` (256 bytes per position for d = 64).
    /// Errors: an invalid `cfg` or a size overflow.
    pub fn new(cfg: &RopeCfg, max_pos: usize) -> Result<Self> {
        const OP: &str = "RopeTable::new";
        let inv_freq = inv_freq(cfg)?;
        if max_pos as u64 > u64::from(u32::MAX) + 1 {
            return Err(shape_err(OP, format!("max_pos {max_pos} exceeds the u32 position range")));
        }
        let af = attn_factor(cfg.yarn.as_ref());
        let half = inv_freq.len();
        let n = checked_mul(OP, "max_pos * rope_dim / 2", max_pos, half)?;
        let (mut cos, mut sin) = (vec![0f32; n], vec![0f32; n]);
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).enumerate().for_each(|(p, (c, s))| {
            for i in 0..half {
                let (cv, sv) = angle_cos_sin(p as u32, inv_freq[i], af);
                c[i] = cv;
                s[i] = sv;
            }
        });
        Ok(RopeTable { rope_dim: cfg.rope_head_dim, max_pos, inv_freq, attn_factor: af, cos, sin })
    }

    /// Rotated dims per vector (`rope_head_dim`).
    pub fn rope_dim(&self) -> usize {
        self.rope_dim
    }
    /// Positions covered: `0..max_pos`.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
    /// θ'_i, as [`inv_freq`] returns them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
    /// The cos/sin attention factor applied to the table.
    pub fn attn_factor(&self) -> f32 {
        self.attn_factor
    }
    /// `(cos, sin)` rows of length `rope_dim / 2` for position `p`, if `p < max_pos`.
    pub fn cos_sin(&self, p: usize) -> Option<(&[f32], &[f32])> {
        let h = self.inv_freq.len();
        let r = p.checked_mul(h).filter(|_| p < self.max_pos)?;
        Some((&self.cos[r..r + h], &self.sin[r..r + h]))
    }
}

/// The one definition of the rotation factors: `φ = (p as f32)·θ'` in f32, `cos φ·f, sin φ·f`.
#[inline]
fn angle_cos_sin(p: u32, inv_freq: f32, factor: f32) -> (f32, f32) {
    let phi = p as f32 * inv_freq;
    (phi.cos() * factor, phi.sin() * factor)
}

#[inline(always)]
fn rotate_pairs(v: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((p, &c), &s) in v.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (p[0], p[1]);
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
    }
}

#[inline(always)]
fn rope_row_body(row: &mut [f32], lay: RopeLayout, cos: &[f32], sin: &[f32]) {
    let d = 2 * cos.len();
    for h in 0..lay.heads {
        let st = lay.offset + h * lay.head_stride;
        rotate_pairs(&mut row[st..st + d], cos, sin);
    }
}

dispatch!(fn rope_row(row: &mut [f32], lay: RopeLayout, cos: &[f32], sin: &[f32]) = rope_row_body;);

/// Checks every position against `limit` before any write; names the first bad one.
fn check_positions(op: &'static str, positions: &[u32], limit: usize) -> Result<()> {
    match positions.iter().enumerate().find(|&(_, &p)| p as usize >= limit) {
        Some((t, &p)) => Err(invalid(op, "positions", format!("position {p} of token {t} is >= {limit}"))),
        None => Ok(()),
    }
}

/// Rotates, in place, every rope vector of `x` described by `layout` (token `t` at
/// `positions[t]`), with the precomputed `table`. E.g. `RopeLayout::q_pe(T, 128, 128, 64)` on
/// `q [T, 128·192]`, and `RopeLayout::k_pe(T, 512, 64)` on a `[T, 576]` kv buffer.
///
/// Errors (before any write): a bad layout, `x.len() != tokens·row_stride`,
/// `positions.len() != tokens`, or a position `>= table.max_pos()`.
pub fn apply_rope(x: &mut [f32], layout: RopeLayout, positions: &[u32], table: &RopeTable) -> Result<()> {
    const OP: &str = "apply_rope";
    let len = layout.check(OP, table.rope_dim)?;
    check_len(OP, "x", x.len(), len)?;
    check_len(OP, "positions", positions.len(), layout.tokens)?;
    check_positions(OP, positions, table.max_pos)?;
    if layout.tokens == 0 {
        return Ok(());
    }
    let row = |(r, &p): (&mut [f32], &u32)| {
        if let Some((c, s)) = table.cos_sin(p as usize) {
            rope_row(r, layout, c, s);
        }
    };
    let work = layout.tokens.saturating_mul(layout.heads).saturating_mul(table.rope_dim);
    if layout.tokens > 1 && work > PAR_MIN_ELEMS {
        x.par_chunks_mut(layout.row_stride).zip(positions.par_iter()).for_each(row);
    } else {
        x.chunks_mut(layout.row_stride).zip(positions.iter()).for_each(row);
    }
    Ok(())
}

/// Naive RoPE that forms every angle on the fly, like the spec: the oracle of [`apply_rope`].
pub mod reference {
    use super::{RopeLayout, angle_cos_sin};
    use crate::error::{Result, check_len, shape_err};

    /// Rotates pair `i` of every vector by `φ_i = p·inv_freq[i]` (f32) with cos/sin times
    /// `attn_factor`; `rope_dim = 2·inv_freq.len()`. Same layout contract as
    /// [`super::apply_rope`], with no position limit.
    pub fn apply_rope(x: &mut [f32], layout: RopeLayout, positions: &[u32], inv_freq: &[f32], attn_factor: f32) -> Result<()> {
        const OP: &str = "reference::apply_rope";
        if inv_freq.is_empty() {
            return Err(shape_err(OP, "inv_freq is empty"));
        }
        let d = 2 * inv_freq.len();
        let len = layout.check(OP, d)?;
        check_len(OP, "x", x.len(), len)?;
        check_len(OP, "positions", positions.len(), layout.tokens)?;
        for (t, &p) in positions.iter().enumerate() {
            for h in 0..layout.heads {
                let base = t * layout.row_stride + layout.offset + h * layout.head_stride;
                for (i, &theta) in inv_freq.iter().enumerate() {
                    let (c, s) = angle_cos_sin(p, theta, attn_factor);
                    let a = x[base + 2 * i];
                    let b = x[base + 2 * i + 1];
                    x[base + 2 * i] = a * c - b * s;
                    x[base + 2 * i + 1] = a * s + b * c;
                }
            }
        }
        Ok(())
    }
}
