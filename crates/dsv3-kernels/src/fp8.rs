//! FP8 E4M3 ("e4m3fn"): the codec, block-scaled weights and per-token activation quantisation
//! (docs/model.md §4).
//!
//! * Decoding is exact for all 256 codes; 0x7F and 0xFF are NaN (the format has no infinity).
//! * Encoding rounds to nearest, ties to even, and **saturates** at ±448: a finite value beyond
//!   the range encodes as ±448 rather than NaN. This is CUDA's `__NV_SATFINITE` behaviour, the
//!   one the GPU kernels use; the activation scale (amax / 448) keeps every quantised value in
//!   range anyway. NaN encodes as NaN (0x7F / 0xFF); ±inf saturates to ±448.
//! * A weight is `[rows, cols]` codes with an f32 `scale_inv` of `[ceil(rows/128), ceil(cols/128)]`
//!   that **multiplies** the decoded value (docs/model.md §2); partial edge blocks just use `floor`.
//! * Activations are quantised per row in 1x128 tiles with scale = max(amax, 1e-4) / 448,
//!   optionally rounded up to a power of two ("ue8m0", V3.1 and later).

use crate::cpu::dispatch;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};
use crate::mmap::Storage;
use rayon::prelude::*;

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Edge of the square weight blocks and of the activation tiles.
pub const BLOCK: usize = 128;
/// Lower clamp of a tile's amax, so an all-zero tile gets a finite, non-zero scale.
pub const AMAX_FLOOR: f32 = 1e-4;
/// Inputs up to this many elements are quantised on the calling thread.
const PAR_MIN_ELEMS: usize = 64 * 1024;

/// Decodes one E4M3 byte exactly, following the definition of the format (docs/model.md §4.1).
pub const fn decode_e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 0xF && (b & 7) == 7 {
        return f32::NAN;
    }
    if e == 0 {
        // Subnormal: (m/8) * 2^-6.
        return sign * (m / 8.0) * (1.0 / 64.0);
    }
    let mut p = 1.0f32;
    let mut i = 0;
    // 2^(e-7) by repeated multiplication (const fn has no powi); exact in f32.
    while i < (e - 7).abs() {
        p *= 2.0;
        i += 1;
    }
    let pow = if e >= 7 { p } else { 1.0 / p };
    sign * (1.0 + m / 8.0) * pow
}

/// All 256 codes decoded, built at compile time from [`decode_e4m3`].
pub static E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_e4m3(i as u8);
        i += 1;
    }
    t
};

/// DeepGEMM's `calc_diff`, the similarity measure its FP8 tests (and ours) bound:
/// `1 - 2<a,b> / (<a,a> + <b,b>)` in f64; 0 for identical inputs (two zero vectors included).
pub fn calc_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        xy += x as f64 * y as f64;
        xx += x as f64 * x as f64;
        yy += y as f64 * y as f64;
    }
    if xx + yy == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / (xx + yy) }
}

/// True for the two NaN codes.
#[inline(always)]
pub fn is_nan_code(b: u8) -> bool {
    b & 0x7F == 0x7F
}

/// Branch-free decode used by the fast kernels; exact for every non-NaN code (NaN codes are
/// rejected when a weight is built, and never produced by the encoder from finite input).
#[inline(always)]
pub fn decode_fast(b: u8) -> f32 {
    let em = (b & 0x7F) as u32;
    let sign = ((b & 0x80) as u32) << 24;
    // Normal: move exponent and mantissa into f32 position and rebias (+120 = 127 - 7).
    let normal = f32::from_bits((em << 20) + (120 << 23));
    // Subnormal (exponent field 0): m * 2^-9, exact.
    let sub = em as f32 * (1.0 / 512.0);
    let mag = if em >= 8 { normal } else { sub };
    f32::from_bits(mag.to_bits() | sign)
}

/// Encodes an f32 to E4M3: round to nearest even, saturating at ±448, NaN to NaN.
/// Branch-free integer arithmetic and selects, so that a loop over it vectorises; exact.
#[inline(always)]
pub fn encode_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let b = bits & 0x7FFF_FFFF; // |x|
    // Below 2^-6 (subnormal codes and zero): multiples of 2^-9. Adding 2^23 rounds |x|·512
    // (< 8, exact) to an integer, ties to even, and leaves it in the low mantissa bits.
    // A result of 8 is 2^-6, which is exactly code 0x08.
    let sub = (f32::from_bits(b) * 512.0 + 8_388_608.0).to_bits().wrapping_sub(0x4B00_0000);
    // Otherwise round the 23-bit mantissa to 3 bits, ties to even; a carry bumps the exponent.
    let norm = (b.wrapping_add(0x7FFFF + ((b >> 20) & 1)) >> 20).wrapping_sub(120 << 3);
    let mut code = if b < 0x3C80_0000 { sub } else { norm };
    code = code.min(0x7E); // saturate (also ±inf)
    if b > 0x7F80_0000 {
        code = 0x7F; // NaN
    }
    (sign | code) as u8
}

/// How activation tile scales are represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleFmt {
    /// scale = amax / 448 as an f32 (V3, R1).
    #[default]
    Float,
    /// scale rounded up to a power of two (`scale_fmt = "ue8m0"`, V3.1 and later).
    Ue8m0,
}

/// Rounds a positive finite scale up to the next power of two (itself if it is one).
#[inline(always)]
pub fn ue8m0_round_up(s: f32) -> f32 {
    let b = s.to_bits();
    if b & 0x007F_FFFF == 0 { s } else { f32::from_bits((b & 0x7F80_0000) + 0x0080_0000) }
}

/// The scale of one activation tile from its amax.
#[inline(always)]
pub fn tile_scale(amax: f32, fmt: ScaleFmt) -> f32 {
    let s = amax.max(AMAX_FLOOR) / E4M3_MAX;
    match fmt {
        ScaleFmt::Float => s,
        ScaleFmt::Ue8m0 => ue8m0_round_up(s),
    }
}

/// Number of 128-blocks covering `n` (the last one may be partial).
#[inline]
pub const fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// A borrowed block-scaled FP8 weight `[rows, cols]` (the Linear convention `[out, in]`),
/// already validated; this is what the GEMM kernels take.
#[derive(Debug, Clone, Copy)]
pub struct Fp8WeightRef<'a> {
    rows: usize,
    cols: usize,
    data: &'a [u8],
    scale_inv: &'a [f32],
    /// The owned weight this is the view of ([`Fp8Weight::view`]), if any.
    source: Option<&'a Fp8Weight>,
}

impl<'a> Fp8WeightRef<'a> {
    /// Validates and wraps a weight: `data` has `rows*cols` codes with no NaN code, and
    /// `scale_inv` has `ceil(rows/128) * ceil(cols/128)` finite, positive scales.
    pub fn new(rows: usize, cols: usize, data: &'a [u8], scale_inv: &'a [f32]) -> Result<Self> {
        const OP: &str = "Fp8Weight";
        if rows == 0 || cols == 0 {
            return Err(shape_err(OP, format!("empty weight [{rows}, {cols}]")));
        }
        check_len(OP, "data", data.len(), checked_mul(OP, "data", rows, cols)?)?;
        check_len(OP, "scale_inv", scale_inv.len(), blocks(rows) * blocks(cols))?;
        if let Some(i) = scale_inv.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            let (br, bc) = (i / blocks(cols), i % blocks(cols));
            return Err(invalid(OP, "scale_inv", format!("block [{br}, {bc}] is {}, expected finite and > 0", scale_inv[i])));
        }
        if let Some(i) = data.par_chunks(1 << 16).position_first(|c| c.iter().any(|&b| is_nan_code(b))) {
            let off = i * (1 << 16) + data[i * (1 << 16)..].iter().position(|&b| is_nan_code(b)).unwrap_or(0);
            return Err(invalid(OP, "data", format!("NaN code at [{}, {}]", off / cols, off % cols)));
        }
        Ok(Fp8WeightRef { rows, cols, data, scale_inv, source: None })
    }
    /// The owned weight this view shows in full, when it was made by [`Fp8Weight::view`]:
    /// a backend that keeps weights in host memory can clone it instead of copying the
    /// slices, which for a memory-mapped weight shares the map ([`crate::Cpu`] does).
    pub fn source(&self) -> Option<&'a Fp8Weight> {
        self.source
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    pub fn scale_inv(&self) -> &'a [f32] {
        self.scale_inv
    }
    /// The scale of the block holding element `[r, c]`.
    #[inline(always)]
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        self.scale_inv[(r / BLOCK) * blocks(self.cols) + c / BLOCK]
    }
    /// The dequantised weight, row-major f32 (docs/model.md §4.2), computed in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols).enumerate().for_each(|(r, row)| {
            let src = &self.data[r * self.cols..(r + 1) * self.cols];
            for (c, (o, &b)) in row.iter_mut().zip(src).enumerate() {
                *o = E4M3_TABLE[b as usize] * self.scale_at(r, c);
            }
        });
        out
    }
}

/// An owned block-scaled FP8 weight. Build it from codes + scales ([`Fp8Weight::new`]), from
/// codes read in place from a memory-mapped checkpoint ([`Fp8Weight::from_storage`]), or by
/// quantising an f32 matrix ([`Fp8Weight::quantize`], for random models and tests).
///
/// The codes are a [`Storage`]: an owned `Vec` or a range of a map, so cloning a mapped
/// weight shares the map; the scales (a few KiB) are always owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    rows: usize,
    cols: usize,
    data: Storage<u8>,
    scale_inv: Vec<f32>,
    /// The scale format of the activations this weight meets on the fp8 path.
    act_fmt: ScaleFmt,
}

impl Fp8Weight {
    /// Validates as [`Fp8WeightRef::new`] does and takes ownership.
    pub fn new(rows: usize, cols: usize, data: Vec<u8>, scale_inv: Vec<f32>) -> Result<Self> {
        Self::from_storage(rows, cols, Storage::from(data), scale_inv)
    }

    /// Validates as [`Fp8WeightRef::new`] does (every code is read, so a mapped weight's pages
    /// are faulted in here) and takes ownership of codes that may live in a map.
    pub fn from_storage(rows: usize, cols: usize, data: Storage<u8>, scale_inv: Vec<f32>) -> Result<Self> {
        Fp8WeightRef::new(rows, cols, &data, &scale_inv)?;
        Ok(Fp8Weight { rows, cols, data, scale_inv, act_fmt: ScaleFmt::Float })
    }

    /// Quantises an f32 matrix per 128x128 block, as the checkpoints were made:
    /// scale_inv = max(amax, 1e-4) / 448 per block, codes = encode(w / scale_inv).
    pub fn quantize(rows: usize, cols: usize, w: &[f32]) -> Result<Self> {
        const OP: &str = "Fp8Weight::quantize";
        check_len(OP, "w", w.len(), checked_mul(OP, "w", rows, cols)?)?;
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(invalid(OP, "w", format!("non-finite value at [{}, {}]", i / cols, i % cols)));
        }
        let (br, bc) = (blocks(rows), blocks(cols));
        let mut scale_inv = vec![0f32; br * bc];
        for (i, s) in scale_inv.iter_mut().enumerate() {
            let (r0, c0) = ((i / bc) * BLOCK, (i % bc) * BLOCK);
            let mut amax = 0f32;
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            *s = amax.max(AMAX_FLOOR) / E4M3_MAX;
        }
        let data = (0..rows * cols).map(|i| encode_e4m3(w[i] / scale_inv[(i / cols / BLOCK) * bc + (i % cols) / BLOCK])).collect();
        Fp8Weight::new(rows, cols, data, scale_inv)
    }

    /// This weight zero-padded to `[rows, cols]`, each at least the current size and covering
    /// the same number of 128-blocks, so the scales are unchanged. The new entries are code 0
    /// (+0.0): a GEMM whose K is padded this way, with an activation padded by zeros, adds
    /// exact zeros and gives what the unpadded weight gives. This is how a K that is not a
    /// multiple of 128 (DeepSeek-V2-Lite's dense MLP: 10944) runs on the fp8 path. Copies
    /// the codes.
    pub fn zero_padded(&self, rows: usize, cols: usize) -> Result<Fp8Weight> {
        const OP: &str = "Fp8Weight::zero_padded";
        if rows < self.rows || cols < self.cols || blocks(rows) != blocks(self.rows) || blocks(cols) != blocks(self.cols) {
            return Err(shape_err(
                OP,
                format!("[{}, {}] cannot be padded to [{rows}, {cols}] in the same 128-blocks", self.rows, self.cols),
            ));
        }
        let mut data = vec![0u8; checked_mul(OP, "data", rows, cols)?];
        for (dst, src) in data.chunks_exact_mut(cols).zip(self.data.chunks_exact(self.cols)) {
            dst[..self.cols].copy_from_slice(src);
        }
        Ok(Fp8Weight::new(rows, cols, data, self.scale_inv.clone())?.with_act_scale_fmt(self.act_fmt))
    }

    /// This weight with the activation scale format of its checkpoint: on the fp8 GEMM path
    /// the activation it multiplies is quantised with `fmt` (`Ue8m0` for `scale_fmt: "ue8m0"`
    /// checkpoints, V3.1 and later; `Float` by default). A model sets it when it loads its
    /// weights; a backend that cannot honour it says so ([`crate::Backend::supports_act_scale_fmt`]).
    pub fn with_act_scale_fmt(mut self, fmt: ScaleFmt) -> Self {
        self.act_fmt = fmt;
        self
    }

    /// See [`Fp8Weight::with_act_scale_fmt`].
    pub fn act_scale_fmt(&self) -> ScaleFmt {
        self.act_fmt
    }

    /// The borrowed view the kernels take.
    pub fn view(&self) -> Fp8WeightRef<'_> {
        Fp8WeightRef { rows: self.rows, cols: self.cols, data: &self.data, scale_inv: &self.scale_inv, source: Some(self) }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The codes: owned, or read in place from a map.
    pub fn storage(&self) -> &Storage<u8> {
        &self.data
    }
    /// Whether the codes are read in place from a memory map.
    pub fn is_mapped(&self) -> bool {
        self.data.is_mapped()
    }
}

/// Shape of a per-token activation quantisation: `rows` tokens of `cols` channels,
/// `cols` a multiple of 128 (every Linear input of the model is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActQuantShape {
    pub rows: usize,
    pub cols: usize,
}

impl ActQuantShape {
    /// Tiles per row.
    pub fn tiles(&self) -> usize {
        self.cols / BLOCK
    }
    fn validate(&self, op: &'static str, x: usize, q: usize, s: usize) -> Result<()> {
        if self.cols == 0 || !self.cols.is_multiple_of(BLOCK) {
            return Err(shape_err(op, format!("cols = {} must be a positive multiple of {BLOCK}", self.cols)));
        }
        let n = checked_mul(op, "x", self.rows, self.cols)?;
        check_len(op, "x", x, n)?;
        check_len(op, "q", q, n)?;
        check_len(op, "scales", s, self.rows * self.tiles())
    }
}

fn non_finite_err(op: &'static str, shape: ActQuantShape, tile_index: usize) -> crate::KernelError {
    let (r, t) = (tile_index / shape.tiles(), tile_index % shape.tiles());
    invalid(op, "x", format!("non-finite value in row {r}, columns {}..{}", t * BLOCK, (t + 1) * BLOCK))
}

/// Plain-loop references, the oracles of the fast kernels.
pub mod reference {
    use super::*;

    /// Per-token 1x128 quantisation (docs/model.md §4.3). A tile holding NaN or ±inf is an error (a plain
    /// `f32::max` would silently drop a NaN).
    pub fn act_quant(x: &[f32], shape: ActQuantShape, fmt: ScaleFmt, q: &mut [u8], scales: &mut [f32]) -> Result<()> {
        const OP: &str = "act_quant (reference)";
        shape.validate(OP, x.len(), q.len(), scales.len())?;
        for (ti, tile) in x.chunks(BLOCK).enumerate() {
            let mut amax = 0f32;
            for &v in tile {
                if !v.is_finite() {
                    return Err(non_finite_err(OP, shape, ti));
                }
                amax = amax.max(v.abs());
            }
            let s = tile_scale(amax, fmt);
            scales[ti] = s;
            for (j, &v) in tile.iter().enumerate() {
                q[ti * BLOCK + j] = encode_e4m3(v / s);
            }
        }
        Ok(())
    }

    /// Inverse of [`act_quant`]: x ≈ decode(q) * scale.
    pub fn act_dequant(q: &[u8], scales: &[f32], shape: ActQuantShape, x: &mut [f32]) -> Result<()> {
        const OP: &str = "act_dequant (reference)";
        shape.validate(OP, x.len(), q.len(), scales.len())?;
        for (i, v) in x.iter_mut().enumerate() {
            *v = decode_e4m3(q[i]) * scales[i / BLOCK];
        }
        Ok(())
    }

    /// Encoding by exhaustive search over the 127 non-negative finite codes: the nearest value,
    /// ties to the even code; saturating. Slow and obviously right; tests compare against it.
    pub fn encode_by_search(x: f32) -> u8 {
        if x.is_nan() {
            return if x.is_sign_negative() { 0xFF } else { 0x7F };
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(E4M3_MAX) as f64;
        let mut best = 0u8;
        for c in 1..=0x7Eu8 {
            let (dc, db) = ((decode_e4m3(c) as f64 - a).abs(), (decode_e4m3(best) as f64 - a).abs());
            if dc < db || (dc == db && c % 2 == 0) {
                best = c;
            }
        }
        sign | best
    }
}

/// Fast per-token 1x128 quantisation: rows in parallel, tiles vectorised. Same results as
/// [`reference::act_quant`], bit for bit.
pub fn act_quant(x: &[f32], shape: ActQuantShape, fmt: ScaleFmt, q: &mut [u8], scales: &mut [f32]) -> Result<()> {
    const OP: &str = "act_quant";
    shape.validate(OP, x.len(), q.len(), scales.len())?;
    // Below a few hundred KiB, waking the thread pool costs more than the work.
    let bad = if x.len() <= PAR_MIN_ELEMS {
        quant_tiles(x, fmt, q, scales)
    } else {
        x.par_chunks(BLOCK * 32)
            .zip(q.par_chunks_mut(BLOCK * 32))
            .zip(scales.par_chunks_mut(32))
            .enumerate()
            .map(|(i, ((x, q), s))| quant_tiles(x, fmt, q, s).map(|t| i * 32 + t))
            .find_first(|r| r.is_some())
            .flatten()
    };
    match bad {
        Some(t) => Err(non_finite_err(OP, shape, t)),
        None => Ok(()),
    }
}

dispatch! {
    /// Quantises whole tiles; returns the index of the first non-finite tile, if any.
    fn quant_tiles(x: &[f32], fmt: ScaleFmt, q: &mut [u8], s: &mut [f32]) -> Option<usize> = quant_tiles_body;
}

#[inline(always)]
fn quant_tiles_body(x: &[f32], fmt: ScaleFmt, q: &mut [u8], s: &mut [f32]) -> Option<usize> {
    for (t, ((tile, qt), st)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(s.iter_mut()).enumerate() {
        // amax over lanes; `finite` catches NaN and inf without a branch per element.
        let mut amax = [0f32; 8];
        let mut finite = true;
        for c in tile.chunks_exact(8) {
            for l in 0..8 {
                let a = c[l].abs();
                finite &= a <= f32::MAX;
                amax[l] = amax[l].max(a);
            }
        }
        if !finite {
            return Some(t);
        }
        let scale = tile_scale(amax.iter().fold(0f32, |a, &b| a.max(b)), fmt);
        *st = scale;
        for (o, &v) in qt.iter_mut().zip(tile) {
            *o = encode_e4m3(v / scale);
        }
    }
    None
}

/// Fast inverse of [`act_quant`].
pub fn act_dequant(q: &[u8], scales: &[f32], shape: ActQuantShape, x: &mut [f32]) -> Result<()> {
    shape.validate("act_dequant", x.len(), q.len(), scales.len())?;
    x.par_chunks_mut(BLOCK * 64).zip(q.par_chunks(BLOCK * 64)).zip(scales.par_chunks(64)).for_each(|((x, q), s)| {
        for ((xt, qt), &st) in x.chunks_exact_mut(BLOCK).zip(q.chunks_exact(BLOCK)).zip(s) {
            for (o, &b) in xt.iter_mut().zip(qt) {
                *o = decode_fast(b) * st;
            }
        }
    });
    Ok(())
}
