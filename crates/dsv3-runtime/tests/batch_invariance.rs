//! Batch invariance of the whole model on the CPU backend: what continuous batching needs to
//! give every request the bits it gets alone. On the tiny presets (and both GEMM paths of
//! `tiny`), bit for bit on the final hidden states:
//! * one step prefilling 32 prompts of different lengths == each prompt prefilled alone;
//! * one decode step of those 32 sequences == each sequence's decode step alone (and so are
//!   the logits);
//! * prompts fed in chunks, several sequences per step, == each prompt in one step;
//! * an absorbed multi-token step (speculative verification) == one-token steps.
//!
//! `scripts/test.sh` runs this file at every ISA level (AVX-512, AVX2, portable).

mod common;

use common::load_model;
use dsv3_kernels::Cpu;
use dsv3_kernels::gemm::GemmPath;
use dsv3_mla::SeqId;
use dsv3_runtime::Preset;
use dsv3_runtime::model::{AttnForm, Model};

const SEQS: usize = 32;

/// Prompt lengths from 2 to 330: short ones, and ones past a page (64 tokens) and past a
/// decode key range (256), so that decode attention splits them.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    (0..SEQS).map(|i| (0..2 + (i * 97) % 329).map(|j| ((j * 13 + i * 7 + 1) as u32) % vocab).collect()).collect()
}

/// The tokens each sequence decodes after its prompt: the first alone and in a 32-row step,
/// the other two as one-token steps alone and as one absorbed step in the batch.
fn next_tokens(i: usize, vocab: u32) -> [u32; 3] {
    [(i as u32 * 5 + 2) % vocab, (i as u32 * 11 + 3) % vocab, (i as u32 * 17 + 4) % vocab]
}

fn rows(h: &[f32], width: usize, r0: usize, n: usize) -> &[f32] {
    &h[r0 * width..(r0 + n) * width]
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(bad.is_none(), "{what}: first difference at value {bad:?}");
}

/// One sequence run alone: the prompt in one step, then three one-token steps.
struct Alone {
    prefill: Vec<f32>,
    steps: [Vec<f32>; 3],
    logits: Vec<f32>,
}

fn alone(m: &Model<Cpu>, prompt: &[u32], next: [u32; 3]) -> Alone {
    let mut cache = m.new_cache(&Cpu, prompt.len() + 3).unwrap();
    let s = cache.add_sequence();
    let prefill = m.forward_hidden(&Cpu, &mut cache, &[(s, prompt)]).unwrap();
    let steps = next.map(|t| m.forward_hidden(&Cpu, &mut cache, &[(s, &[t][..])]).unwrap());
    let logits = m.logits(&Cpu, &steps[0], &[0]).unwrap();
    Alone { prefill, steps, logits }
}

fn check(preset: Preset, path: GemmPath) {
    let tmp = tempfile::tempdir().unwrap();
    common::write_preset(tmp.path(), "m", preset, None);
    let m = load_model(&tmp.path().join("m"), path);
    let (vocab, h) = (m.config().vocab_size as u32, m.config().hidden_size);
    let prompts = prompts(vocab);
    let total: usize = prompts.iter().map(Vec::len).sum();
    let solo: Vec<Alone> = prompts.iter().enumerate().map(|(i, p)| alone(&m, p, next_tokens(i, vocab))).collect();
    let tag = format!("{preset:?} {path:?}");

    // All prompts in one step, then one decode step of all sequences.
    // Room for every token plus a partly used page per sequence.
    let room = total + SEQS * (dsv3_mla::PAGE_SIZE + 3);
    let mut cache = m.new_cache(&Cpu, room).unwrap();
    let seqs: Vec<SeqId> = (0..SEQS).map(|_| cache.add_sequence()).collect();
    let step: Vec<(SeqId, &[u32])> = seqs.iter().zip(&prompts).map(|(&s, p)| (s, &p[..])).collect();
    let hid = m.forward_hidden(&Cpu, &mut cache, &step).unwrap();
    let mut at = 0;
    for (i, p) in prompts.iter().enumerate() {
        assert_bits(rows(&hid, h, at, p.len()), &solo[i].prefill, &format!("{tag}: prompt {i} prefilled with 31 others"));
        at += p.len();
    }
    let next: Vec<[u32; 3]> = (0..SEQS).map(|i| next_tokens(i, vocab)).collect();
    let step: Vec<(SeqId, &[u32])> = seqs.iter().zip(&next).map(|(&s, t)| (s, &t[..1])).collect();
    let hid = m.forward_hidden(&Cpu, &mut cache, &step).unwrap();
    let logits = m.logits(&Cpu, &hid, &(0..SEQS).collect::<Vec<_>>()).unwrap();
    for (i, a) in solo.iter().enumerate() {
        assert_bits(rows(&hid, h, i, 1), &a.steps[0], &format!("{tag}: decode row {i} of {SEQS}"));
        assert_bits(rows(&logits, vocab as usize, i, 1), &a.logits, &format!("{tag}: logits of decode row {i} of {SEQS}"));
    }

    // Absorbed multi-token step (speculative verification): sequence i feeds 1 or 2 tokens.
    let step: Vec<(SeqId, &[u32])> = seqs.iter().zip(&next).enumerate().map(|(i, (&s, t))| (s, &t[1..2 + i % 2])).collect();
    let hid = m.forward_hidden_with(&Cpu, &mut cache, &step, AttnForm::Absorbed).unwrap();
    let mut at = 0;
    for (i, a) in solo.iter().enumerate() {
        for j in 0..1 + i % 2 {
            assert_bits(rows(&hid, h, at, 1), &a.steps[1 + j], &format!("{tag}: absorbed step, sequence {i} token {j}"));
            at += 1;
        }
    }

    // Chunked prefill, several sequences per step, each with its own cut points (chunks of at
    // least 2 tokens, so that every step takes the prefill form).
    const SIZES: [usize; 6] = [17, 64, 2, 40, 100, 5];
    let mut cache = m.new_cache(&Cpu, room).unwrap();
    let picked: Vec<usize> = (0..SEQS).step_by(3).collect();
    let ids: Vec<SeqId> = picked.iter().map(|_| cache.add_sequence()).collect();
    let (mut done, mut got) = (vec![0usize; picked.len()], vec![Vec::new(); picked.len()]);
    for round in 0.. {
        let mut step: Vec<(SeqId, &[u32])> = Vec::new();
        let mut fed = Vec::new();
        for (j, &i) in picked.iter().enumerate() {
            let left = prompts[i].len() - done[j];
            if left == 0 {
                continue;
            }
            let mut n = SIZES[(round + j) % SIZES.len()].min(left);
            if left - n == 1 {
                n += 1;
            }
            step.push((ids[j], &prompts[i][done[j]..done[j] + n]));
            fed.push((j, n));
            done[j] += n;
        }
        if step.is_empty() {
            break;
        }
        let hid = m.forward_hidden(&Cpu, &mut cache, &step).unwrap();
        let mut at = 0;
        for (j, n) in fed {
            got[j].extend_from_slice(rows(&hid, h, at, n));
            at += n;
        }
    }
    for (j, &i) in picked.iter().enumerate() {
        assert_bits(&got[j], &solo[i].prefill, &format!("{tag}: prompt {i} in chunks"));
    }
}

#[test]
fn tiny_reference() {
    check(Preset::Tiny, GemmPath::Reference);
}

#[test]
fn tiny_fp8() {
    check(Preset::Tiny, GemmPath::Fp8);
}

#[test]
fn tiny_v2lite_reference() {
    check(Preset::TinyV2Lite, GemmPath::Reference);
}

#[test]
fn tiny_moonlight_reference() {
    check(Preset::TinyMoonlight, GemmPath::Reference);
}
