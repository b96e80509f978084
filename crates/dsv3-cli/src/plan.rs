//! `dsv3 plan`: the memory each rank of a multi-process layout holds, and a time model of a
//! decode step, for a model config on stated hardware (no weights needed):
//!
//! ```text
//! dsv3 plan --model configs/deepseek-v3 --hw h200 --gpus 8
//! dsv3 plan --model configs/deepseek-v3 --hw h100 --gpus 16 --batch 8
//! dsv3 plan --model configs/deepseek-v3 --hw cpu --gpus 2 --gpu-mem 768GB
//! ```
//!
//! Every layout `--pp P --ep E` with `P x E` = the ranks is listed (or the one asked for).
//! The terms are explained in docs/parallelism.md.

use dsv3_runtime::dist::Layout;
use dsv3_runtime::dist::cost::{Hardware, decode_step, rank_memory, step_time};
use dsv3_runtime::{LayerKind, ModelConfig, Preset, Result, RuntimeError};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A model directory (only its config.json is read), e.g. configs/deepseek-v3.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A built-in preset's config (tiny, tiny-v2lite, tiny-moonlight, small, bench).
    #[arg(long)]
    pub preset: Option<String>,
    /// Hardware of one rank: h200, h100 (GPUs) or cpu (one socket); docs/parallelism.md
    /// states their figures.
    #[arg(long, default_value = "h200")]
    pub hw: String,
    /// Ranks (GPUs or sockets) in the job.
    #[arg(long, default_value_t = 8)]
    pub gpus: usize,
    /// Memory per rank, e.g. 141GB, 80GB, 768GiB [default: the hardware's].
    #[arg(long)]
    pub gpu_mem: Option<String>,
    /// Memory bandwidth per rank, e.g. 23GB (per second) [default: the hardware's]; dsv3's
    /// measured rates scale with it.
    #[arg(long)]
    pub mem_bw: Option<String>,
    /// Only this pipeline depth.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Only this expert-parallel width.
    #[arg(long)]
    pub ep: Option<usize>,
    /// Decode sequences per lane (data-parallel attention) in one step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens of context per sequence (latent cache read per step).
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Memory kept free per rank for activations and workspaces, in % of it.
    #[arg(long, default_value_t = 5.0)]
    pub reserve_percent: f64,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `141GB`, `80G`, `768GiB`, `1.5e11`: bytes (GB = 1e9, GiB = 2^30).
fn parse_bytes(s: &str) -> Result<f64> {
    const UNITS: [(&str, f64); 13] = [
        ("kib", 1024.0),
        ("mib", 1048576.0),
        ("gib", 1073741824.0),
        ("tib", 1099511627776.0),
        ("kb", 1e3),
        ("mb", 1e6),
        ("gb", 1e9),
        ("tb", 1e12),
        ("k", 1e3),
        ("m", 1e6),
        ("g", 1e9),
        ("t", 1e12),
        ("b", 1.0),
    ];
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = UNITS.iter().find_map(|&(u, m)| t.strip_suffix(u).map(|n| (n, m))).unwrap_or((&t, 1.0));
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * mult),
        _ => Err(RuntimeError::Request(format!("`{s}`: expected a positive size like 141GB, 768GiB or 1.5e11"))),
    }
}

const GB: f64 = 1e9;

impl PlanArgs {
    fn config(&self) -> Result<(ModelConfig, String)> {
        match (&self.model, &self.preset) {
            (Some(dir), _) => {
                let path = if dir.is_dir() { dir.join("config.json") } else { dir.clone() };
                Ok((ModelConfig::from_file(&path)?, path.display().to_string()))
            }
            (None, Some(p)) => Ok((Preset::from_name(p)?.config(), format!("preset {p}"))),
            (None, None) => Err(RuntimeError::Request("give --model DIR (a config.json is enough) or --preset NAME".into())),
        }
    }

    /// Every layout of `gpus` ranks the model allows (or the one asked for).
    fn layouts(&self, c: &ModelConfig) -> Vec<Layout> {
        (1..=self.gpus)
            .filter(|pp| self.gpus.is_multiple_of(*pp))
            .map(|pp| Layout { pp, ep: self.gpus / pp })
            .filter(|l| l.check(c, self.gpus).is_ok())
            .filter(|l| self.pp.is_none_or(|p| p == l.pp) && self.ep.is_none_or(|e| e == l.ep))
            .collect()
    }

    pub fn run(self) -> Result<()> {
        let (c, source) = self.config()?;
        let mut hw = Hardware::preset(&self.hw)
            .ok_or_else(|| RuntimeError::Request(format!("--hw {}: expected one of {}", self.hw, Hardware::NAMES.join(", "))))?;
        if let Some(m) = &self.gpu_mem {
            hw.mem = parse_bytes(m)?;
        }
        if let Some(bw) = &self.mem_bw {
            hw = hw.with_mem_bw(parse_bytes(bw)?);
        }
        if self.gpus == 0 || self.batch == 0 || !(0.0..100.0).contains(&self.reserve_percent) {
            return Err(RuntimeError::Request("--gpus and --batch must be at least 1, --reserve-percent in [0, 100)".into()));
        }
        let layouts = self.layouts(&c);
        if layouts.is_empty() {
            return Err(RuntimeError::Request(format!(
                "no layout of {} ranks fits this model (--ep must divide its {} experts, --pp at most its {} layers)",
                self.gpus, c.n_routed_experts, c.num_hidden_layers
            )));
        }
        let reserve = hw.mem * self.reserve_percent / 100.0;
        let one = rank_memory(&c, Layout::SINGLE, 0);
        let moe = (0..c.num_hidden_layers).filter(|&l| c.layer_kind(l) == LayerKind::Moe).count();
        let mut rows = Vec::new();
        if !self.json {
            println!(
                "{source}: {} layers ({} dense, {moe} MoE of {} experts, top-{} from {} of {} groups), hidden {}, vocab {}",
                c.num_hidden_layers,
                c.num_hidden_layers - moe,
                c.n_routed_experts,
                c.num_experts_per_tok,
                c.topk_group,
                c.n_group,
                c.hidden_size,
                c.vocab_size
            );
            println!(
                "weights as loaded: {:.1} GB (routed experts {:.1} GB, the rest {:.1} GB of which embedding + lm_head {:.1} GB); latent cache {:.1} KB per token",
                one.weights() / GB,
                one.experts / GB,
                (one.replicated + one.embed_head) / GB,
                one.embed_head / GB,
                one.cache_per_token / 1e3
            );
            println!(
                "hardware: {} x {}: {:.1} GB and {:.0} GB/s memory per rank ({:.1} GB kept free), {} per node, {:.0} GB/s within a node, {:.0} GB/s between nodes{}",
                self.gpus,
                hw.name,
                hw.mem / GB,
                hw.mem_bw / GB,
                reserve / GB,
                hw.per_node,
                hw.intra_bw / GB,
                hw.inter_bw / GB,
                hw.staging_bw.map_or(String::new(), |b| format!(", host staging {:.0} GB/s", b / GB))
            );
            println!("decode step: {} sequence(s) per lane, {} tokens of context each\n", self.batch, self.context);
        }
        for l in layouts {
            let ranks: Vec<_> = (0..l.pp).map(|s| rank_memory(&c, l, l.rank(s, 0))).collect();
            let worst = ranks.iter().map(|m| m.weights()).fold(0.0, f64::max);
            let fits = worst + reserve <= hw.mem;
            let room: Vec<f64> = ranks.iter().map(|m| (hw.mem - reserve - m.weights()).max(0.0)).collect();
            // A sequence occupies every stage: the stage with the least room per token bounds it.
            let tokens_per_lane = ranks.iter().zip(&room).map(|(m, r)| r / m.cache_per_token).fold(f64::INFINITY, f64::min);
            let s = decode_step(&c, l, &hw, self.batch, self.context);
            let t = step_time(&s, &hw, l.pp);
            let step_tokens = (self.batch * l.ep) as f64;
            let rate = |secs: f64| step_tokens / secs;
            let per_seq = |secs: f64| 1.0 / (secs * l.pp as f64);
            if !self.json {
                println!("--pp {} --ep {}: {}", l.pp, l.ep, if fits { "fits" } else { "does NOT fit" });
                for (m, r) in ranks.iter().zip(&room) {
                    println!(
                        "  stage {} (layers {:?}), each of {} ranks: experts {:.1} GB + rest {:.1} GB + embedding/lm_head {:.1} GB = {:.1} GB; {:.1} GB left for the cache",
                        m.stage,
                        m.layers,
                        l.ep,
                        m.experts / GB,
                        m.replicated / GB,
                        m.embed_head / GB,
                        m.weights() / GB,
                        r / GB
                    );
                }
                println!("  cache room: {:.0} tokens per lane, {:.0} in all", tokens_per_lane, tokens_per_lane * l.ep as f64);
                println!(
                    "  step of the last stage ({} tokens): reads {:.2} GB FP8 + {:.2} GB bf16 + {:.2} GB kv_b pairs + {:.2} GB cache; all-to-all {:.2} MB in-node + {:.2} MB between nodes ({:.1} ranks per token), {:.2} MB host staging, {:.2} MB hand-off",
                    step_tokens,
                    s.fp8 / GB,
                    s.bf16 / GB,
                    s.pairs / GB,
                    s.cache / GB,
                    s.a2a_intra / 1e6,
                    s.a2a_inter / 1e6,
                    s.dests_per_token,
                    s.staged / 1e6,
                    s.handoff / 1e6
                );
                for (name, today) in [("roofline  ", false), ("dsv3 today", true)] {
                    println!(
                        "  {name}: reads {:.2} ms, communication {:.2} ms: step {:.2} ms in sequence, {:.2} ms with two-micro-batch overlap -> {:.0} (overlapped {:.0}) tokens/s, {:.1} per sequence",
                        if today { t.reads_today } else { t.reads_roofline } * 1e3,
                        t.comm * 1e3,
                        t.serial(today) * 1e3,
                        t.overlapped(today) * 1e3,
                        rate(t.serial(today)),
                        rate(t.overlapped(today)),
                        per_seq(t.serial(today))
                    );
                }
                println!();
            }
            rows.push(serde_json::json!({
                "pp": l.pp, "ep": l.ep, "fits": fits,
                "stages": ranks.iter().zip(&room).map(|(m, r)| serde_json::json!({
                    "stage": m.stage, "layers": [m.layers.start, m.layers.end], "experts_bytes": m.experts,
                    "replicated_bytes": m.replicated, "embed_head_bytes": m.embed_head, "weights_bytes": m.weights(),
                    "cache_room_bytes": r, "cache_bytes_per_token": m.cache_per_token,
                })).collect::<Vec<_>>(),
                "cache_tokens_per_lane": tokens_per_lane,
                "step": {
                    "tokens": step_tokens, "fp8_bytes": s.fp8, "bf16_bytes": s.bf16, "pairs_bytes": s.pairs, "cache_bytes": s.cache,
                    "a2a_intra_bytes": s.a2a_intra, "a2a_inter_bytes": s.a2a_inter, "staged_bytes": s.staged,
                    "handoff_bytes": s.handoff, "dests_per_token": s.dests_per_token,
                    "roofline": {"reads_s": t.reads_roofline, "comm_s": t.comm, "serial_s": t.serial(false), "overlapped_s": t.overlapped(false)},
                    "dsv3_today": {"reads_s": t.reads_today, "comm_s": t.comm, "serial_s": t.serial(true), "overlapped_s": t.overlapped(true)},
                },
            }));
        }
        if self.json {
            println!(
                "{}",
                serde_json::json!({ "config": source, "hardware": hw.name, "ranks": self.gpus, "mem_bytes": hw.mem, "layouts": rows })
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_bytes("141GB").unwrap(), 141e9);
        assert_eq!(parse_bytes("80G").unwrap(), 80e9);
        assert_eq!(parse_bytes("768GiB").unwrap(), 768.0 * 1024f64.powi(3));
        assert_eq!(parse_bytes("1.5e11").unwrap(), 1.5e11);
        for bad in ["", "GB", "-3GB", "12XB", "nanGB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
