#!/usr/bin/env python3
"""dsv3 and HF transformers side by side on the same checkpoint: the same greedy generation,
its tokens/s on each, and how many generated tokens agree.

Usage (through scripts/bench-hf/run.sh, which makes the venv and builds dsv3):
  compare.py MODEL_DIR DSV3_BINARY [--prompt-tokens N] [--new-tokens N] [--threads N] [--dtype float32|bfloat16]

HF runs DeepseekV3ForCausalLM (or V2) in eager mode on the dequantised weights (FP8 times
its 128x128 block scale, as scripts/fixtures/gen.py does; HF's own fp8 loader needs a GPU),
with a KV cache: one forward over the prompt (prefill), then one token per forward. dsv3 runs
`dsv3 generate --json` with the reference GEMM path (the same exact dequantised weights). Both
use the same number of threads. The MTP layer, if any, is not loaded into HF.
"""
import argparse
import json
import os
import subprocess
import time

import torch
from safetensors import safe_open

import transformers
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

BLOCK = 128


def load_state(model_dir, n_layers, dtype):
    """Every main-model tensor of the checkpoint, FP8 weights dequantised with their scales,
    read one tensor at a time (peak memory: the converted model plus one tensor)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        where = json.load(open(index))["weight_map"]
    else:
        with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as st:
            where = {k: "model.safetensors" for k in st.keys()}
    handles = {f: safe_open(os.path.join(model_dir, f), "pt") for f in sorted(set(where.values()))}

    def get(k):
        return handles[where[k]].get_tensor(k)

    state = {}
    for k in sorted(where):
        parts = k.split(".")
        if k.endswith("_scale_inv") or (parts[:2] == ["model", "layers"] and int(parts[2]) >= n_layers):
            continue  # scales are applied below; layers >= n_layers are the MTP module
        t = get(k)
        if t.dtype == torch.float8_e4m3fn:
            s = get(k + "_scale_inv")
            rows, cols = t.shape
            full = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
            t = (t.to(torch.float32) * full).to(dtype)
        elif t.is_floating_point() and not k.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        state[k] = t
    return state


def hf_model(model_dir, dtype):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type", "torch_dtype", "auto_map")}
    if cfg["model_type"] == "deepseek_v3":
        config, cls = DeepseekV3Config(**hf_cfg), DeepseekV3ForCausalLM
    else:
        config, cls = DeepseekV2Config(**hf_cfg), DeepseekV2ForCausalLM
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = cls(config)
    state = load_state(model_dir, cfg["num_hidden_layers"], dtype)
    model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    for name, mod in model.named_modules():
        if hasattr(mod, "rope_init_fn"):
            inv, scaling = mod.rope_init_fn(mod.config, torch.device("cpu"))
            mod.register_buffer("inv_freq", inv, persistent=False)
            mod.original_inv_freq = inv
            mod.attention_scaling = scaling
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not left, f"not loaded: {left[:5]}"
    return model.eval(), config


def hf_generate(model, ids, new_tokens):
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        nxt = int(out.logits[0, -1].float().argmax())
        prefill = time.perf_counter() - t0
        past, gen = out.past_key_values, [nxt]
        t0 = time.perf_counter()
        while len(gen) < new_tokens:
            out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            gen.append(int(out.logits[0, -1].float().argmax()))
        decode = time.perf_counter() - t0
    return gen, len(ids) / prefill, (len(gen) - 1) / max(decode, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("dsv3")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.load(open(os.path.join(a.model_dir, "config.json")))
    vocab = min(cfg["vocab_size"], 100_000)
    ids = [(i * 7919 + 3) % vocab for i in range(a.prompt_tokens)]

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = [a.dsv3, "generate", "--model", a.model_dir, "--prompt-ids", ",".join(map(str, ids)),
           "--max-tokens", str(a.new_tokens), "--json", "--gemm", "reference"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    dsv3_wall = time.perf_counter() - t0
    d = json.loads(r.stdout.strip().splitlines()[-1])

    t0 = time.perf_counter()
    model, _ = hf_model(a.model_dir, getattr(torch, a.dtype))
    hf_load = time.perf_counter() - t0
    hf_ids, hf_prefill, hf_decode = hf_generate(model, ids, len(d["ids"]))

    agree = 0
    for x, y in zip(d["ids"], hf_ids):
        if x != y:
            break
        agree += 1
    report = {
        "model_dir": a.model_dir,
        "threads": a.threads,
        "prompt_tokens": len(ids),
        "new_tokens": len(d["ids"]),
        "hf_dtype": a.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dsv3": {"prefill_tokens_per_s": d["prefill_tokens_per_s"], "decode_tokens_per_s": d["decode_tokens_per_s"], "wall_s_incl_load": dsv3_wall},
        "hf": {"prefill_tokens_per_s": hf_prefill, "decode_tokens_per_s": hf_decode, "load_s": hf_load},
        "decode_speedup_dsv3_over_hf": d["decode_tokens_per_s"] / hf_decode,
        "prefill_speedup_dsv3_over_hf": d["prefill_tokens_per_s"] / hf_prefill,
        "greedy_tokens_identical_prefix": agree,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
