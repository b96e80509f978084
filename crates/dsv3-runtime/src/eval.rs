//! Perplexity and bits per byte: the negative log-likelihood of each next token, summed in f64.

use crate::error::{Result, RuntimeError};
use crate::model::Model;
use dsv3_kernels::Backend;

/// The summed negative log-likelihood (nats) of `ids[1..]`, each predicted from the tokens
/// before it, run in chunks of `chunk` tokens (chunked prefill on one sequence).
/// `on_progress` sees the number of tokens scored so far.
pub fn nll<B: Backend>(b: &B, model: &Model<B>, ids: &[u32], chunk: usize, mut on_progress: impl FnMut(usize)) -> Result<(f64, usize)> {
    if ids.len() < 2 || chunk == 0 {
        return Err(RuntimeError::Request("need at least 2 tokens and a chunk of at least 1".into()));
    }
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(b, ids.len())?;
    let seq = cache.add_sequence();
    let (mut total, mut count) = (0f64, 0usize);
    for start in (0..ids.len() - 1).step_by(chunk) {
        let end = (start + chunk).min(ids.len() - 1);
        let hidden = model.forward_hidden(b, &mut cache, &[(seq, &ids[start..end])])?;
        let logits = model.logits(b, &hidden, &(0..end - start).collect::<Vec<_>>())?;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total += lse - row[ids[start + i + 1] as usize] as f64;
            count += 1;
        }
        on_progress(count);
    }
    Ok((total, count))
}
