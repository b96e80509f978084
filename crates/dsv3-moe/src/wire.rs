//! What an expert-parallel transport between processes puts on the wire for the dispatch.
//!
//! [`dsv3_kernels::a2a::pack`] makes one row per `(token, j)` pair, ordered by destination
//! rank and then by token, so a token routed to several experts of one rank appears as
//! consecutive, identical rows of that rank's segment. On the wire each segment sends a row
//! only where it differs from the row before it ([`dedup`]): **a token's hidden state
//! crosses to each destination rank once**, however many of its experts live there, and the
//! receiver rebuilds the buffer row for row ([`expand`]). With group-limited routing
//! (`topk_group` of `n_group` expert groups per token) and each rank holding whole groups or
//! each group spread over its own ranks, a token's rows go to at most `topk_group` groups of
//! ranks (the node limit of DeepSeek's deployment); [`crossings`] counts both.
//!
//! The metadata (expert id, weight, source slot, repeat flag) travels as four u32 per row
//! ([`meta`], [`unmeta`]).

use crate::error::{MoeError, Result};
use dsv3_kernels::a2a::{DispatchBuf, EpLayout};

fn wire_err(detail: impl Into<String>) -> MoeError {
    MoeError::Input { what: "wire", detail: detail.into() }
}

/// The rows of `send` that cross: per segment, each row that differs (bitwise) from the row
/// before it in the same segment. Returns the rows `[unique, hidden]`, the unique rows per
/// destination, and per row of `send` a flag: 1 if it repeats the row before it.
pub fn dedup(send: &DispatchBuf) -> Result<(Vec<f32>, Vec<u32>, Vec<u32>)> {
    let h = send.hidden;
    send.validate(send.counts.len())?;
    let mut rows = Vec::new();
    let mut unique = Vec::with_capacity(send.counts.len());
    let mut repeat = vec![0u32; send.len()];
    for (&c, &d) in send.counts.iter().zip(&send.displs) {
        let (c, d) = (c as usize, d as usize);
        let mut n = 0u32;
        let mut prev: Option<&[f32]> = None;
        for (k, row) in send.rows[d * h..(d + c) * h].chunks_exact(h.max(1)).enumerate() {
            if prev.is_some_and(|p| same_bits(p, row)) {
                repeat[d + k] = 1;
            } else {
                rows.extend_from_slice(row);
                n += 1;
            }
            prev = Some(row);
        }
        unique.push(n);
    }
    Ok((rows, unique, repeat))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The receiver's side of [`dedup`]: `unique` rows `[_, hidden]` and the repeat flag of every
/// received row (segments `counts`, in source order) → every received row. A segment whose
/// first row claims to repeat, or flags that do not match the unique rows, are an error.
pub fn expand(hidden: usize, unique: &[f32], repeat: &[u32], counts: &[u32]) -> Result<Vec<f32>> {
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    if repeat.len() != total || hidden == 0 {
        return Err(wire_err(format!("{} repeat flags for {total} rows", repeat.len())));
    }
    let fresh = repeat.iter().filter(|&&r| r == 0).count();
    if unique.len() != fresh * hidden {
        return Err(wire_err(format!("{} values for {fresh} distinct rows of {hidden}", unique.len())));
    }
    let mut firsts = counts.iter().scan(0usize, |at, &c| {
        let first = (c > 0).then_some(*at);
        *at += c as usize;
        Some(first)
    });
    if firsts.any(|f| f.is_some_and(|i| repeat[i] != 0)) {
        return Err(wire_err("a segment's first row is flagged as a repeat"));
    }
    let mut out = Vec::with_capacity(total * hidden);
    let mut next = unique.chunks_exact(hidden);
    for (i, &r) in repeat.iter().enumerate() {
        if r == 0 {
            out.extend_from_slice(next.next().unwrap_or_default());
        } else {
            out.extend_from_within((i - 1) * hidden..i * hidden);
        }
    }
    Ok(out)
}

/// Four u32 per row of `send`: expert id, weight bits, source slot, repeat flag.
pub fn meta(send: &DispatchBuf, repeat: &[u32]) -> Vec<u32> {
    (0..send.len()).flat_map(|i| [send.expert[i], send.weight[i].to_bits(), send.src_slot[i], repeat[i]]).collect()
}

/// The per-row metadata of a received dispatch, from [`meta`].
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub expert: Vec<u32>,
    pub weight: Vec<f32>,
    pub src_slot: Vec<u32>,
    pub repeat: Vec<u32>,
}

/// Splits [`meta`] back into expert ids, weights, source slots and repeat flags.
pub fn unmeta(m: &[u32]) -> Result<Meta> {
    if !m.len().is_multiple_of(4) {
        return Err(wire_err(format!("{} metadata words, expected four per row", m.len())));
    }
    let rows = m.chunks_exact(4);
    Ok(Meta {
        expert: rows.clone().map(|r| r[0]).collect(),
        weight: rows.clone().map(|r| f32::from_bits(r[1])).collect(),
        src_slot: rows.clone().map(|r| r[2]).collect(),
        repeat: rows.map(|r| r[3]).collect(),
    })
}

/// For a batch routed with `topk_ids` (`[tokens, top_k]`) over `layout`, with ranks in
/// consecutive groups of `ranks_per_group`: the most destination ranks and the most groups of
/// ranks any one token's hidden state crosses to.
pub fn crossings(layout: &EpLayout, topk_ids: &[u32], top_k: usize, ranks_per_group: usize) -> (usize, usize) {
    let (mut ranks, mut groups) = (0, 0);
    for ids in topk_ids.chunks(top_k.max(1)) {
        let mut r: Vec<usize> = ids.iter().map(|&e| layout.owner(e as usize)).collect();
        r.sort_unstable();
        r.dedup();
        let mut g: Vec<usize> = r.iter().map(|&x| x / ranks_per_group.max(1)).collect();
        g.dedup();
        ranks = ranks.max(r.len());
        groups = groups.max(g.len());
    }
    (ranks, groups)
}
