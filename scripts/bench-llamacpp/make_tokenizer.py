#!/usr/bin/env python3
"""A DeepSeek-V3 tokenizer cut down to its first N ids, for a model with an N-row vocabulary.

Usage: make_tokenizer.py SRC_DIR N OUT_DIR   (stdlib only; OUT_DIR must not exist)

From SRC_DIR's tokenizer.json / tokenizer_config.json (the fetched DeepSeek-V3 tokenizer,
scripts/fetch-tokenizer.sh) it keeps:
- the BPE vocabulary entries with id < N (ids unchanged: 0..2 are BOS, EOS, pad; the 256
  byte-level symbols are ids 3..258, so every byte stays encodable for N >= 259);
- the merges whose two parts and result are all kept (a kept token whose merge needs a dropped
  part just becomes unreachable);
- the added tokens with id < N (the chat markers at 128000+ go);
- the normalizer, pre-tokenizer, post-processor and decoder as they are (so llama.cpp's
  "deepseek-v3" pre-tokenizer is the right one: see convert.py).
tokenizer_config.json loses its chat template (it names markers that are gone); BOS and EOS
(ids 0 and 1) stay. Refuses N that would drop BOS, EOS or a byte symbol.
"""
import json
import os
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        sys.exit(f"{src}/tokenizer.json: model type {model.get('type')!r}, expected BPE")
    vocab = {t: i for t, i in model["vocab"].items() if i < n}
    need = 259  # BOS, EOS, pad, then the 256 byte symbols
    if n < need or len(vocab) < min(n, need):
        sys.exit(f"N = {n}: ids 0..{need - 1} (BOS, EOS, pad, the 256 bytes) must all be kept")
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < n]
    cfg.pop("chat_template", None)
    for key in ("bos_token", "eos_token"):
        content = cfg.get(key)
        content = content.get("content") if isinstance(content, dict) else content
        ids = [t["id"] for t in tok["added_tokens"] if t["content"] == content]
        if content is not None and not ids:
            sys.exit(f"{key} {content!r} is not among the first {n} ids")
    os.makedirs(out)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    print(f"{out}: {len(vocab)} tokens (ids < {n}), {len(merges)} merges, {len(tok['added_tokens'])} added tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
