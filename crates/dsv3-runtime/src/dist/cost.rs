//! What a layout costs: the bytes each rank holds (weights as the loaders keep them, latent
//! cache per token) and a per-step time model of decoding — weight and cache reads, the
//! expert-parallel all-to-alls over the links between GPUs (or sockets), the pipeline
//! hand-off — on stated hardware. `dsv3 plan` prints it; docs/parallelism.md explains the
//! terms and checks them against what the single-device benchmarks measured.
//!
//! Resident bytes follow the loaders: every projection FP8 with f32 128x128 block scales
//! (BF16 checkpoints are quantised at load), `kv_b` as the two absorbed bf16 *pairs*
//! (`dsv3_mla::weights`: 4 bytes per element), router and `lm_head` and the embedding bf16,
//! norms and the router bias f32, the latent cache f32 (`kv_lora + rope` values per token and
//! layer). The MTP module is not loaded by a plain `generate` and is not counted.

use super::Layout;
use crate::config::{LayerKind, ModelConfig};
use std::ops::Range;

/// Bytes of an FP8 `[rows, cols]` projection: the codes and the f32 block scales.
fn fp8(rows: usize, cols: usize) -> f64 {
    (rows * cols + rows.div_ceil(128) * cols.div_ceil(128) * 4) as f64
}

/// Per-layer bytes by how they are read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LayerBytes {
    /// FP8 projections every token of a step reads (attention, dense MLP, shared experts).
    fp8: f64,
    /// The absorbed `kv_b` as bf16 pairs (read by the attention's absorb kernels).
    pairs: f64,
    /// The router (bf16).
    bf16: f64,
    /// Small f32 vectors (norms, router bias).
    small: f64,
    /// One routed expert (0 for a dense layer).
    expert: f64,
    /// Routed experts of the layer.
    experts: usize,
}

fn layer_bytes(c: &ModelConfig, l: usize) -> LayerBytes {
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let q = match c.q_lora_rank {
        Some(r) => fp8(r, h) + fp8(heads * c.qk_head_dim(), r),
        None => fp8(heads * c.qk_head_dim(), h),
    };
    let attn = q + fp8(c.kv_lora_rank + c.qk_rope_head_dim, h) + fp8(h, heads * c.v_head_dim);
    let pairs = 4.0 * (heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank) as f64;
    let norms = (2 * h + c.kv_lora_rank + c.q_lora_rank.unwrap_or(0)) * 4;
    let mlp = |i: usize| fp8(i, h) * 2.0 + fp8(h, i);
    match c.layer_kind(l) {
        LayerKind::Dense => {
            LayerBytes { fp8: attn + mlp(c.intermediate_size), pairs, bf16: 0.0, small: norms as f64, expert: 0.0, experts: 0 }
        }
        LayerKind::Moe => {
            let shared = if c.n_shared_experts > 0 { mlp(c.shared_intermediate()) } else { 0.0 };
            LayerBytes {
                fp8: attn + shared,
                pairs,
                bf16: (2 * c.n_routed_experts * h) as f64,
                small: (norms + 4 * c.n_routed_experts) as f64,
                expert: mlp(c.moe_intermediate_size),
                experts: c.n_routed_experts,
            }
        }
    }
}

/// What one rank of a layout holds.
#[derive(Debug, Clone, PartialEq)]
pub struct RankMemory {
    pub stage: usize,
    pub layers: Range<usize>,
    /// Its routed experts (all MoE layers of its stage).
    pub experts: f64,
    /// Everything else of its layers: attention, dense MLPs, shared experts, routers, norms.
    pub replicated: f64,
    /// Embedding (first stage) and `lm_head` (last stage), bf16.
    pub embed_head: f64,
    /// Latent cache per token of context, over its layers.
    pub cache_per_token: f64,
}

impl RankMemory {
    pub fn weights(&self) -> f64 {
        self.experts + self.replicated + self.embed_head
    }
}

/// The bytes rank `rank` of `layout` holds for model `c`.
pub fn rank_memory(c: &ModelConfig, layout: Layout, rank: usize) -> RankMemory {
    let stage = layout.stage(rank);
    let layers = layout.layers(stage, c.num_hidden_layers);
    let (mut experts, mut replicated) = (0.0, 0.0);
    for l in layers.clone() {
        let b = layer_bytes(c, l);
        experts += b.expert * (b.experts / layout.ep) as f64;
        replicated += b.fp8 + b.pairs + b.bf16 + b.small;
    }
    let table = (2 * c.vocab_size * c.hidden_size) as f64;
    let embed_head = table * ((stage == 0) as u8 + (stage + 1 == layout.pp) as u8) as f64 + (4 * c.hidden_size) as f64;
    let cache_per_token = (layers.len() * (c.kv_lora_rank + c.qk_rope_head_dim) * 4) as f64;
    RankMemory { stage, layers, experts, replicated, embed_head, cache_per_token }
}

/// The machine a layout runs on (per rank), and dsv3's measured speed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    pub name: &'static str,
    /// Memory per rank (bytes).
    pub mem: f64,
    /// Memory bandwidth per rank (bytes/s): the roofline of weight and cache reads.
    pub mem_bw: f64,
    /// Ranks per node: all-to-all traffic between them uses `intra_bw`, the rest `inter_bw`.
    pub per_node: usize,
    /// Per rank and direction (bytes/s): NVLink between GPUs of a node, UPI between sockets.
    pub intra_bw: f64,
    /// Per rank and direction (bytes/s): InfiniBand between nodes.
    pub inter_bw: f64,
    /// Seconds per message exchange (latency), each all-to-all is three (counts, metadata, rows).
    pub latency: f64,
    /// Host link (bytes/s) the expert-parallel rows are staged through (PCIe on a GPU).
    pub staging_bw: Option<f64>,
    /// dsv3's measured read rates on this hardware (bytes/s): FP8 GEMMs, bf16 GEMMs, the
    /// attention's absorb kernels on the `kv_b` pairs; and the rest of a measured step per
    /// layer (small kernels and host time), from the single-device runs.
    pub today_fp8_bw: f64,
    pub today_bf16_bw: f64,
    pub today_pairs_bw: f64,
    pub today_layer_overhead: f64,
}

impl Hardware {
    pub const NAMES: [&'static str; 3] = ["h200", "h100", "cpu"];

    /// The stated figures of a hardware kind (docs/parallelism.md gives their sources).
    pub fn preset(name: &str) -> Option<Hardware> {
        // One H200: 141 GB HBM3e, 4.8 TB/s peak (4.25 TB/s measured copy); NVLink 4 at 450 GB/s
        // per direction; one 400 Gb/s InfiniBand NIC per GPU (50 GB/s); PCIe 5 x16 (~55 GB/s).
        // dsv3 measured on one H200 (bench preset, batch 1, a 13.6 ms step): FP8 GEMMs read at
        // ~1.9 TB/s, the bf16 lm_head at ~0.22 TB/s, the kv_b pairs at ~0.69 TB/s; the other
        // 0.89 ms per layer are small kernels and host time (launches, staging).
        let h200 = Hardware {
            name: "h200",
            mem: 141e9,
            mem_bw: 4.25e12,
            per_node: 8,
            intra_bw: 450e9,
            inter_bw: 50e9,
            latency: 10e-6,
            staging_bw: Some(55e9),
            today_fp8_bw: 1.9e12,
            today_bf16_bw: 0.22e12,
            today_pairs_bw: 0.69e12,
            today_layer_overhead: 0.89e-3,
        };
        match name {
            "h200" => Some(h200),
            // One H100 SXM: 80 GB HBM3, 3.35 TB/s; dsv3's rates scaled from the H200 by bandwidth.
            "h100" => Some(Hardware {
                name: "h100",
                mem: 80e9,
                mem_bw: 3.35e12 * (4.25 / 4.8),
                today_fp8_bw: 1.9e12 * 3.35 / 4.8,
                today_bf16_bw: 0.22e12 * 3.35 / 4.8,
                today_pairs_bw: 0.69e12 * 3.35 / 4.8,
                ..h200
            }),
            // One CPU socket: 768 GB DDR5 (8 channels of DDR5-4800: 307 GB/s peak, ~250 GB/s
            // read), two sockets per node linked by UPI (~60 GB/s per direction); dsv3's
            // decode reads at ~87 % of the measured read bandwidth
            // (benches/results/2026-11-29-model-bench-2core.md).
            "cpu" => Some(Hardware {
                name: "cpu",
                mem: 768e9,
                mem_bw: 250e9,
                per_node: 2,
                intra_bw: 60e9,
                inter_bw: 25e9,
                latency: 5e-6,
                staging_bw: None,
                today_fp8_bw: 0.87 * 250e9,
                today_bf16_bw: 0.87 * 250e9,
                today_pairs_bw: 0.87 * 250e9,
                today_layer_overhead: 0.0,
            }),
            _ => None,
        }
    }

    /// The same hardware with memory bandwidth `bw`; dsv3's measured rates scale with it.
    pub fn with_mem_bw(self, bw: f64) -> Hardware {
        let f = bw / self.mem_bw;
        Hardware {
            mem_bw: bw,
            today_fp8_bw: self.today_fp8_bw * f,
            today_bf16_bw: self.today_bf16_bw * f,
            today_pairs_bw: self.today_pairs_bw * f,
            ..self
        }
    }
}

/// One decode step of the last pipeline stage (the largest: the most layers, and `lm_head`):
/// every lane decodes `batch` sequences (one token each) at `context` tokens of context.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepCost {
    /// FP8 weight bytes read (projections, the activated local experts).
    pub fp8: f64,
    /// bf16 weight bytes read by GEMMs (routers, `lm_head` on the last stage).
    pub bf16: f64,
    /// The `kv_b` pairs the attention reads.
    pub pairs: f64,
    /// Latent cache bytes read.
    pub cache: f64,
    /// All-to-all bytes this rank sends (dispatch + combine) to ranks of its node, and of other
    /// nodes; bytes staged through the host; pipeline hand-off bytes.
    pub a2a_intra: f64,
    pub a2a_inter: f64,
    pub staged: f64,
    pub handoff: f64,
    /// MoE layers (each two all-to-alls) and layers of the stage.
    pub moe_layers: usize,
    pub layers: usize,
    /// Expected distinct destination ranks of one token's dispatch.
    pub dests_per_token: f64,
    /// Lanes per stage.
    pub ep: usize,
}

/// The decode step of the last stage for `batch` sequences per lane at `context`.
pub fn decode_step(c: &ModelConfig, layout: Layout, hw: &Hardware, batch: usize, context: usize) -> StepCost {
    let stage = layout.pp - 1;
    let layers = layout.layers(stage, c.num_hidden_layers);
    let (ep, k, h, e) = (layout.ep as f64, c.num_experts_per_tok as f64, c.hidden_size as f64, c.n_routed_experts as f64);
    let (b, tokens) = (batch as f64, (batch * layout.ep) as f64);
    // Destination ranks per token: k experts spread uniformly over the ranks, but never more
    // than the ranks of `topk_group` expert groups (group-limited routing).
    let group_ranks = if layout.ep >= c.n_group { (c.topk_group * layout.ep / c.n_group) as f64 } else { ep.min(c.topk_group as f64) };
    let dests = (ep * (1.0 - (1.0 - 1.0 / ep).powf(k))).min(group_ranks).min(k);
    // Remote destinations: every rank equally likely; this rank's own share stays local.
    let rpn = layout.ep.min(hw.per_node) as f64;
    let (intra_frac, inter_frac) = ((rpn - 1.0) / ep, (ep - rpn) / ep);
    let mut s =
        StepCost { layers: layers.len(), ep: layout.ep, dests_per_token: if layout.ep > 1 { dests } else { 0.0 }, ..Default::default() };
    for l in layers.clone() {
        let lb = layer_bytes(c, l);
        s.fp8 += lb.fp8;
        s.pairs += lb.pairs;
        s.bf16 += lb.bf16;
        if lb.experts == 0 {
            continue;
        }
        s.moe_layers += 1;
        // Local experts some token of the stage's step activates (balanced routing).
        let active = (e / ep) * (1.0 - (1.0 - k / e).powf(tokens));
        s.fp8 += active * lb.expert;
        if layout.ep > 1 {
            // dsv3's wire: each token's f32 row once per destination rank plus 16 bytes of
            // metadata per (token, expert); the combine returns one f32 row per (token, expert).
            let bytes = b * (dests * h * 4.0 + k * 16.0) + b * k * h * 4.0;
            s.a2a_intra += bytes * intra_frac;
            s.a2a_inter += bytes * inter_frac;
            if hw.staging_bw.is_some() {
                // Down and up across the host link: what is sent and what is received.
                s.staged += 2.0 * bytes;
            }
        }
    }
    s.cache = b * context as f64 * (layers.len() * (c.kv_lora_rank + c.qk_rope_head_dim) * 4) as f64;
    if stage + 1 == layout.pp {
        s.bf16 += (2 * c.vocab_size * c.hidden_size) as f64;
    }
    if layout.pp > 1 {
        // x and residual, f32, to the next stage.
        s.handoff = b * h * 4.0 * 2.0;
    }
    s
}

/// Seconds of one stage step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    /// Weight and cache reads at the memory roofline.
    pub reads_roofline: f64,
    /// The same reads at dsv3's measured rates, plus its host overhead per layer.
    pub reads_today: f64,
    /// All-to-alls, staging and hand-off over the links, with per-message latency.
    pub comm: f64,
}

impl StepTime {
    /// A step with communication after compute (what dsv3 does now).
    pub fn serial(&self, today: bool) -> f64 {
        self.reads(today) + self.comm
    }
    /// A step whose all-to-alls overlap the compute of a second micro-batch (DeepSeek's
    /// two-micro-batch overlap): the longer of the two.
    pub fn overlapped(&self, today: bool) -> f64 {
        self.reads(today).max(self.comm)
    }
    fn reads(&self, today: bool) -> f64 {
        if today { self.reads_today } else { self.reads_roofline }
    }
}

pub fn step_time(s: &StepCost, hw: &Hardware, pp: usize) -> StepTime {
    let reads = s.fp8 + s.bf16 + s.pairs + s.cache;
    let messages = (s.moe_layers * 6) as f64 + if pp > 1 { 1.0 } else { 0.0 };
    // Consecutive stages sit a whole expert-parallel group apart: on another node once a
    // group fills a node.
    let handoff_bw = if s.handoff == 0.0 {
        f64::INFINITY
    } else if s.ep >= hw.per_node {
        hw.inter_bw
    } else {
        hw.intra_bw
    };
    StepTime {
        reads_roofline: reads / hw.mem_bw,
        reads_today: s.fp8 / hw.today_fp8_bw
            + s.bf16 / hw.today_bf16_bw
            + s.pairs / hw.today_pairs_bw
            + s.cache / hw.mem_bw
            + s.layers as f64 * hw.today_layer_overhead,
        comm: s.a2a_intra / hw.intra_bw
            + s.a2a_inter / hw.inter_bw
            + hw.staging_bw.map_or(0.0, |bw| s.staged / bw)
            + s.handoff / handoff_bw
            + if s.dests_per_token > 0.0 || pp > 1 { messages * hw.latency } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Preset;

    fn v3() -> ModelConfig {
        let text = include_str!("../../tests/fixtures/config-deepseek-v3.json");
        ModelConfig::from_json_str(text, "config-deepseek-v3.json").unwrap()
    }

    #[test]
    fn ranks_split_the_experts_and_replicate_the_rest() {
        let c = v3();
        let one = rank_memory(&c, Layout::SINGLE, 0);
        // 58 MoE layers x 256 experts x 3 x 7168 x 2048 FP8 codes (+ scales): 653.5 GB.
        assert!((one.experts / 1e9 - 654.0).abs() < 1.0, "{}", one.experts / 1e9);
        for layout in [Layout { pp: 1, ep: 8 }, Layout { pp: 2, ep: 8 }, Layout { pp: 4, ep: 4 }] {
            let ranks: Vec<_> = (0..layout.world()).map(|r| rank_memory(&c, layout, r)).collect();
            let experts: f64 = ranks.iter().map(|m| m.experts).sum();
            let lanes = |f: fn(&RankMemory) -> f64| ranks.iter().map(f).sum::<f64>() / layout.ep as f64;
            assert!((experts - one.experts).abs() < 1.0, "{layout:?}");
            assert!((lanes(|m| m.replicated) - one.replicated).abs() < 1.0, "{layout:?}");
            assert!((lanes(|m| m.embed_head) - one.embed_head - (layout.pp - 1) as f64 * 4.0 * 7168.0).abs() < 1.0);
            assert!((lanes(|m| m.cache_per_token) - one.cache_per_token).abs() < 1e-6);
        }
        // 8 x H200, EP 8: ~82 GB of experts and ~20 GB of the rest per GPU.
        let m = rank_memory(&c, Layout { pp: 1, ep: 8 }, 3);
        assert!((m.experts / 1e9 - 81.7).abs() < 0.5 && (m.weights() / 1e9 - 102.0).abs() < 3.0, "{m:?}");
    }

    #[test]
    fn one_token_on_one_rank_reads_the_bench_decode_bytes() {
        // `Model::decode_weight_bytes` (what `dsv3 bench` divides by) counts the same tensors
        // with `kv_b` as one bf16 copy and no FP8 scales; the loaders hold the bf16 pair and
        // the scales, so the model reads 3-4 % more on the bench preset.
        let c = Preset::Bench.config();
        let hw = Hardware::preset("h200").unwrap();
        let s = decode_step(&c, Layout::SINGLE, &hw, 1, 0);
        let pair_extra = 2.0 * (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank * c.num_hidden_layers) as f64;
        let bench = crate::model::decode_weight_bytes(&c) as f64;
        let ratio = (s.fp8 + s.bf16 + s.pairs) / bench;
        assert!(ratio > 1.0 && ratio < 1.05, "{ratio}");
        assert!(((s.fp8 + s.bf16 + s.pairs - pair_extra) / bench - 1.0).abs() < 0.01);
        assert_eq!((s.a2a_intra, s.a2a_inter, s.handoff), (0.0, 0.0, 0.0));
    }

    #[test]
    fn group_limited_routing_bounds_the_destinations() {
        let c = v3();
        let hw = Hardware::preset("h100").unwrap();
        let s8 = decode_step(&c, Layout { pp: 1, ep: 8 }, &hw, 4, 1024);
        let s16 = decode_step(&c, Layout { pp: 1, ep: 16 }, &hw, 4, 1024);
        assert!(s8.dests_per_token <= 4.0 && s16.dests_per_token <= 8.0, "{} {}", s8.dests_per_token, s16.dests_per_token);
        // One node of 8: nothing crosses InfiniBand; two nodes: about half of it does.
        assert_eq!(s8.a2a_inter, 0.0);
        assert!(s16.a2a_inter > 0.9 * s16.a2a_intra);
        let t = step_time(&s16, &hw, 1);
        assert!(t.overlapped(false) <= t.serial(false) && t.overlapped(true) <= t.serial(true));
    }
}
