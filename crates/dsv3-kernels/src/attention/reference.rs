//! Plain-loop references of every op (the formulas of `docs/model.md` in f64, one rounding):
//! the oracles of the fast kernels. Same contracts and errors.

use super::checks::{PrefillCheck, check_absorb, check_cache_write, check_decode, check_expand, check_gather, check_prefill, slot_of};
use super::{CacheWriteShape, DecodeParams, GatherShape, MlaDims, PrefillInputs, PrefillParams};
use crate::bf16_gemm::Bf16WeightRef;
use crate::error::Result;

/// Reference of [`super::cache_write`]: RMSNorm of the latent with an f64 sum of squares
/// (as [`crate::norm::reference::rms_norm`]), `k_pe` copied.
pub fn cache_write(kv: &[f32], norm_w: &[f32], eps: f32, slots: &[u32], s: CacheWriteShape, pool: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::cache_write";
    check_cache_write(OP, kv.len(), norm_w.len(), eps, slots, s, pool.len())?;
    let (w, l) = (s.pool.width(), s.pool.kv_lora);
    for t in 0..s.tokens {
        let row = &kv[t * w..(t + 1) * w];
        let mut sum = 0f64;
        for &v in &row[..l] {
            sum += v as f64 * v as f64;
        }
        let inv = 1.0 / (sum as f32 / l as f32 + eps).sqrt();
        let dst = slots[t] as usize * w;
        for i in 0..l {
            pool[dst + i] = norm_w[i] * (row[i] * inv);
        }
        pool[dst + l..dst + w].copy_from_slice(&row[l..]);
    }
    Ok(())
}

/// Reference of [`super::gather`].
pub fn gather(pool: &[f32], table: &[u32], lens: &[u32], s: GatherShape, c_kv: &mut [f32], k_pe: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::gather";
    check_gather(OP, pool.len(), table, lens, s, c_kv.len(), k_pe.len())?;
    let (w, l, r) = (s.pool.width(), s.pool.kv_lora, s.pool.rope);
    let mut k = 0;
    for i in 0..s.seqs {
        let row = &table[i * s.max_blocks..(i + 1) * s.max_blocks];
        for pos in 0..lens[i] as usize {
            let src = slot_of(row, s.pool.page_size, pos) * w;
            c_kv[k * l..(k + 1) * l].copy_from_slice(&pool[src..src + l]);
            k_pe[k * r..(k + 1) * r].copy_from_slice(&pool[src + l..src + w]);
            k += 1;
        }
    }
    Ok(())
}

/// Reference of [`super::absorb_q`]: `out[t,h,c] = Σ_d q[t,h,d] · W_UK[h·nope + d, c]` for
/// `c < kv_lora`, then `q_pe` copied.
pub fn absorb_q(q: &[f32], w_uk: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::absorb_q";
    check_absorb(OP, q.len(), (w_uk.rows(), w_uk.cols()), d, rows, out.len())?;
    let (qh, oh, l) = (d.qk_head(), d.latent(), d.kv_lora);
    let w = w_uk.data();
    for t in 0..rows {
        for h in 0..d.heads {
            let qb = (t * d.heads + h) * qh;
            let ob = (t * d.heads + h) * oh;
            for c in 0..l {
                let mut acc = 0f64;
                for e in 0..d.qk_nope {
                    acc += q[qb + e] as f64 * w[(h * d.qk_nope + e) * l + c].to_f64();
                }
                out[ob + c] = acc as f32;
            }
            out[ob + l..ob + oh].copy_from_slice(&q[qb + d.qk_nope..qb + qh]);
        }
    }
    Ok(())
}

/// Reference of [`super::expand_v`]: `out[t, h·v + e] = Σ_c W_UV[h·v + e, c] · o_lat[t,h,c]`.
pub fn expand_v(o_lat: &[f32], w_uv: Bf16WeightRef<'_>, d: MlaDims, rows: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::expand_v";
    check_expand(OP, o_lat.len(), (w_uv.rows(), w_uv.cols()), d, rows, out.len())?;
    let l = d.kv_lora;
    let w = w_uv.data();
    for t in 0..rows {
        for h in 0..d.heads {
            for e in 0..d.v {
                let mut acc = 0f64;
                for c in 0..l {
                    acc += w[(h * d.v + e) * l + c].to_f64() * o_lat[(t * d.heads + h) * l + c] as f64;
                }
                out[(t * d.heads + h) * d.v + e] = acc as f32;
            }
        }
    }
    Ok(())
}

/// Softmax-weighted sum in f64: `Σ_j softmax(scores)_j · value(j)[c]` for `c < width`.
fn attend(scores: &[f64], width: usize, value: impl Fn(usize, usize) -> f64, out: &mut [f32]) {
    let m = scores.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let p: Vec<f64> = scores.iter().map(|&s| (s - m).exp()).collect();
    let sum: f64 = p.iter().sum();
    for (c, o) in out.iter_mut().enumerate().take(width) {
        let mut acc = 0f64;
        for (j, &pj) in p.iter().enumerate() {
            acc += pj * value(j, c);
        }
        *o = (acc / sum) as f32;
    }
}

/// Reference of [`super::decode`].
pub fn decode(q: &[f32], pool: &[f32], table: &[u32], kv_lens: &[u32], p: &DecodeParams, out: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::decode";
    check_decode(OP, q.len(), pool.len(), table, kv_lens, p, out.len())?;
    let (w, l, ps) = (p.pool.width(), p.pool.kv_lora, p.pool.page_size);
    for b in 0..p.batch {
        let row = &table[b * p.max_blocks..(b + 1) * p.max_blocks];
        let len = kv_lens[b] as usize;
        let key = |j: usize| slot_of(row, ps, j) * w;
        for h in 0..p.heads {
            let qv = &q[(b * p.heads + h) * w..(b * p.heads + h + 1) * w];
            let o = &mut out[(b * p.heads + h) * l..(b * p.heads + h + 1) * l];
            if len == 0 {
                o.fill(0.0);
                continue;
            }
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let k = &pool[key(j)..key(j) + w];
                    qv.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * p.scale as f64
                })
                .collect();
            attend(&scores, l, |j, c| pool[key(j) + c] as f64, o);
        }
    }
    Ok(())
}

/// Reference of [`super::prefill`]: docs/model.md §3.3 steps 4–5 per query, head and visible key.
pub fn prefill(x: PrefillInputs<'_, [f32], [u32]>, p: &PrefillParams, out: &mut [f32]) -> Result<()> {
    const OP: &str = "reference::attention::prefill";
    check_prefill(OP, &PrefillCheck::of(&x), p, out.len())?;
    let d = p.dims;
    let (qh, h_n) = (d.qk_head(), d.heads);
    for i in 0..p.seqs {
        let kb = x.cu_k[i] as usize;
        for t in x.cu_q[i] as usize..x.cu_q[i + 1] as usize {
            let pos = x.q_pos[t] as usize;
            for h in 0..h_n {
                let qv = &x.q[(t * h_n + h) * qh..(t * h_n + h + 1) * qh];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let kn = &x.k_nope[((kb + j) * h_n + h) * d.qk_nope..][..d.qk_nope];
                        let kp = &x.k_pe[(kb + j) * d.qk_rope..][..d.qk_rope];
                        let mut acc = 0f64;
                        for e in 0..d.qk_nope {
                            acc += qv[e] as f64 * kn[e] as f64;
                        }
                        for e in 0..d.qk_rope {
                            acc += qv[d.qk_nope + e] as f64 * kp[e] as f64;
                        }
                        acc * p.scale as f64
                    })
                    .collect();
                let o = &mut out[(t * h_n + h) * d.v..(t * h_n + h + 1) * d.v];
                attend(&scores, d.v, |j, c| x.v[((kb + j) * h_n + h) * d.v + c] as f64, o);
            }
        }
    }
    Ok(())
}
