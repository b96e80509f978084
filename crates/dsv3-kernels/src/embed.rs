//! Token embedding (docs/model.md §3.1): a plain row gather `out[t] = table[ids[t]]`, no
//! scaling, upcast to f32. The table is `[vocab, dim]` row-major in f32 or in bf16 (the
//! checkpoint's dtype, converted exactly: bf16 is the top half of an f32).
//!
//! Every id is checked against `vocab` before anything is written; the first bad one is
//! reported with its position.

use half::bf16;
use rayon::prelude::*;

use crate::cpu::dispatch;
use crate::error::{Result, check_len, checked_mul, invalid, shape_err};

/// Output elements above which the gather is split over rayon's pool (prefill batches).
const PAR_MIN_ELEMS: usize = 32 * 1024;

/// The shape of an embedding table: `vocab` rows of `dim` values, both > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    /// Rows of the table (token ids `0..vocab`).
    pub vocab: usize,
    /// Values per row (the hidden size).
    pub dim: usize,
}

impl EmbedShape {
    /// A validated shape: both sizes > 0 and `vocab * dim` fits `usize`.
    pub fn new(vocab: usize, dim: usize) -> Result<Self> {
        let s = EmbedShape { vocab, dim };
        s.table_len("EmbedShape")?;
        Ok(s)
    }

    /// `vocab * dim`, checking both > 0 and overflow.
    pub fn table_len(self, op: &'static str) -> Result<usize> {
        if self.vocab == 0 || self.dim == 0 {
            return Err(shape_err(op, format!("vocab ({}) and dim ({}) must be > 0", self.vocab, self.dim)));
        }
        checked_mul(op, "vocab * dim", self.vocab, self.dim)
    }
}

/// An element type an embedding table can be stored in; widened to f32 exactly.
pub trait TableElem: Copy + Send + Sync + 'static {
    /// This value as f32 (exact for f32 and bf16).
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i].to_f32()` for a whole row (same length), the fast path.
    fn widen_row(src: &[Self], dst: &mut [f32]);
}

impl TableElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn widen_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

#[inline(always)]
fn bf16_row_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

dispatch!(fn bf16_row(src: &[bf16], dst: &mut [f32]) = bf16_row_body;);

impl TableElem for bf16 {
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn widen_row(src: &[bf16], dst: &mut [f32]) {
        bf16_row(src, dst);
    }
}

/// Checks lengths and every id; returns `ids.len() * dim`.
fn validate<T>(op: &'static str, table: &[T], shape: EmbedShape, ids: &[u32], out_len: usize) -> Result<usize> {
    let tl = shape.table_len(op)?;
    check_len(op, "table", table.len(), tl)?;
    let n = checked_mul(op, "ids.len() * dim", ids.len(), shape.dim)?;
    check_len(op, "out", out_len, n)?;
    if let Some((pos, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= shape.vocab) {
        return Err(invalid(op, "ids", format!("token id {id} at position {pos} is >= vocab {}", shape.vocab)));
    }
    Ok(n)
}

/// Gathers `out[t, :] = table[ids[t], :]` as f32; `table` is `[vocab, dim]` in f32 or bf16,
/// `out` is `[ids.len(), dim]`.
///
/// Errors: a zero size, a length mismatch, or an id `>= vocab` (naming its position and value);
/// all are checked before any write.
pub fn embedding<T: TableElem>(table: &[T], shape: EmbedShape, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let n = validate("embedding", table, shape, ids, out.len())?;
    let d = shape.dim;
    let row = |(o, &id): (&mut [f32], &u32)| {
        let start = id as usize * d;
        T::widen_row(&table[start..start + d], o);
    };
    if ids.len() > 1 && n > PAR_MIN_ELEMS {
        out.par_chunks_mut(d).zip(ids.par_iter()).for_each(row);
    } else {
        out.chunks_mut(d).zip(ids.iter()).for_each(row);
    }
    Ok(())
}

/// The naive gather, element by element with [`TableElem::to_f32`]: the oracle.
pub mod reference {
    use super::{EmbedShape, TableElem, validate};
    use crate::error::Result;

    /// Reference of [`super::embedding`]; same contract.
    pub fn embedding<T: TableElem>(table: &[T], shape: EmbedShape, ids: &[u32], out: &mut [f32]) -> Result<()> {
        validate("reference::embedding", table, shape, ids, out.len())?;
        let d = shape.dim;
        for (t, &id) in ids.iter().enumerate() {
            for j in 0..d {
                out[t * d + j] = table[id as usize * d + j].to_f32();
            }
        }
        Ok(())
    }
}
