#!/usr/bin/env python3
"""A dsv3 model directory to GGUF with the converter of the vendored llama.cpp tree, unedited.

Usage: convert.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf --outtype bf16|q8_0
(run by convert.sh in .venv-llamacpp, made by build.sh; OUT.gguf must not exist)

- FP8 weights: the converter dequantises them itself. dsv3's config.json carries
  `quantization_config = {quant_method: fp8, weight_block_size: [128, 128]}`, and the converter
  then multiplies every F8_E4M3 weight by its `weight_scale_inv` repeated over its 128x128 block
  (edge blocks cut), in f32: the values of dsv3's reference path. They are then stored as BF16,
  or quantised to Q8_0 (32-value blocks, one f16 scale) by gguf-py. The MTP layer is skipped.
- Tokenizer fingerprint: the converter encodes a fixed text and looks the hash of the ids up in
  a table; DeepSeek-V3's entry ("deepseek-v3") was made with the hub tokenizer_config.json,
  which has `add_bos_token: true`. The converter reads the model from a staging directory of
  symlinks in which tokenizer_config.json is a copy with `add_bos_token: true`, so the real
  tokenizer matches as is. (Only the fingerprint sees that flag: the GGUF's add_bos follows
  tokenizer.json's post-processor, as gguf-py's SpecialVocab logs. llama-bench feeds token ids.)
- A tokenizer that does not match (the 32K cut of make_tokenizer.py: other ids, so another
  hash) but whose tokenizer.json has DeepSeek-V3's normalizer and pre-tokenizer, byte for byte
  (sha256 below), is declared "deepseek-v3": the one method `get_vocab_base_pre` is wrapped here
  to do that, and to re-raise the converter's own error for any other tokenizer.
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

# sha256 of json.dumps({"normalizer", "pre_tokenizer"} of DeepSeek-V3's tokenizer.json,
# sort_keys=True, separators=(",", ":")).
DEEPSEEK_V3_PRE = "53f6aa8be2ffb59ff98790b1586a93d58e87f0d647952061575b0402d1dfd1af"
log = logging.getLogger("bench-llamacpp")


def pre_fingerprint(model_dir: Path) -> str:
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    key = {"normalizer": tok.get("normalizer"), "pre_tokenizer": tok.get("pre_tokenizer")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stage(model_dir: Path, tmp: Path) -> Path:
    """Symlinks to every file of model_dir; tokenizer_config.json copied with add_bos_token."""
    if not (model_dir / "tokenizer.json").is_file():
        sys.exit(f"{model_dir}: no tokenizer.json (the GGUF needs the vocabulary)")
    staged = tmp / model_dir.name
    staged.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != "tokenizer_config.json":
            (staged / entry.name).symlink_to(entry.resolve())
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["add_bos_token"] = True
    (staged / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return staged


def patch_pre_tokenizer(text_model_cls) -> None:
    original = text_model_cls.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if pre_fingerprint(Path(self.dir_model)) != DEEPSEEK_V3_PRE:
                raise
            log.warning("tokenizer fingerprint unknown, but normalizer and pre-tokenizer are DeepSeek-V3's: pre = deepseek-v3")
            return "deepseek-v3"

    text_model_cls.get_vocab_base_pre = get_vocab_base_pre


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", required=True, choices=["bf16", "q8_0"])
    a = ap.parse_args()
    if a.out.exists():
        sys.exit(f"{a.out}: exists, not overwritten")
    sys.path.insert(0, str(a.llama_cpp))
    import convert_hf_to_gguf  # noqa: E402  (puts the tree's gguf-py on sys.path itself)
    from conversion.base import TextModel  # noqa: E402

    patch_pre_tokenizer(TextModel)
    partial = a.out.with_name(f".{a.out.name}.partial-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="dsv3-gguf-") as tmp:
        staged = stage(a.model_dir.resolve(), Path(tmp))
        sys.argv = ["convert_hf_to_gguf.py", str(staged), "--outtype", a.outtype, "--outfile", str(partial)]
        try:
            convert_hf_to_gguf.main()
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    if a.out.exists():
        partial.unlink()
        sys.exit(f"{a.out}: appeared while converting, not overwritten")
    partial.rename(a.out)
    log.warning("wrote %s (%.1f MB)", a.out, a.out.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
