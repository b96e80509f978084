#!/usr/bin/env python3
"""Medians, spreads and ratios of a run.sh results file, as a Markdown table (stdlib only).

Usage (run.sh calls all three):
  compare.py table RESULTS.jsonl [--prompts 16,128]          the Markdown table
  compare.py dsv3 RESULTS.jsonl ROUND PROMPT [--decode]       appends what `dsv3 bench` printed (stdin)
  compare.py llama RESULTS.jsonl ROUND ENGINE                 appends what `llama-bench -o json` printed (stdin)

Each line of RESULTS.jsonl is one measurement:
  {"round": 1, "engine": "dsv3" | "llama.cpp Q8_0" | "llama.cpp BF16", "metric": "decode" | "prefill@16" | ..., "tok_s": 104.2}
plus, for dsv3, optional extra lines with metric "decode_ratio_to_read_bandwidth".
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict

ENGINES = ["dsv3", "llama.cpp Q8_0", "llama.cpp BF16"]


def load(path):
    data = defaultdict(list)
    rounds = set()
    for line in open(path, encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            data[(r["engine"], r["metric"])].append(r["tok_s"])
            rounds.add(r["round"])
    return data, len(rounds)


def cell(v):
    if not v:
        return "–"
    return f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"


def ratio(data, metric, base):
    a, b = data.get(("dsv3", metric)), data.get((base, metric))
    if not a or not b:
        return "–"
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def table(data, rounds, prompts):
    metrics = ["decode"] + [f"prefill@{p}" for p in prompts]
    heads = ["decode tok/s"] + [f"prefill {p} tok/s" for p in prompts]
    out = [f"Medians of {rounds} alternating round(s), (min–max) in brackets.", ""]
    out.append("| engine | " + " | ".join(heads) + " |")
    out.append("|---|" + "---|" * len(heads))
    for e in ENGINES + sorted({e for e, _ in data} - set(ENGINES)):
        if any((e, m) in data for m in metrics):
            out.append(f"| {e} | " + " | ".join(cell(data.get((e, m))) for m in metrics) + " |")
    for base in ENGINES[1:]:
        out.append(f"| dsv3 / {base} | " + " | ".join(ratio(data, m, base) for m in metrics) + " |")
    bw = data.get(("dsv3", "decode_ratio_to_read_bandwidth"))
    if bw:
        out += ["", f"dsv3 decode, weight bytes read per second / this machine's measured read bandwidth (dsv3 bench): median {statistics.median(bw):.2f} ({min(bw):.2f}–{max(bw):.2f})."]
    return "\n".join(out)


def append(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def ingest_dsv3(a, text):
    """The JSON report is the last line of `dsv3 bench` stdout."""
    rep = json.loads(text.strip().splitlines()[-1])
    if rep["prompt_tokens"] != a.prompt:
        raise SystemExit(f"dsv3 bench ran {rep['prompt_tokens']} prompt tokens, asked {a.prompt}")
    rows = [{"round": a.round, "engine": "dsv3", "metric": f"prefill@{a.prompt}", "tok_s": rep["prefill_tokens_per_s"]}]
    if a.decode:
        rows.append({"round": a.round, "engine": "dsv3", "metric": "decode", "tok_s": rep["decode_tokens_per_s"]})
        rows.append({"round": a.round, "engine": "dsv3", "metric": "decode_ratio_to_read_bandwidth", "tok_s": rep["decode_ratio_to_read_bandwidth"]})
    return rows


def ingest_llama(a, text):
    """llama-bench -o json: a list of tests, pp (n_gen 0) or tg (n_prompt 0), with avg_ts."""
    rows = []
    for t in json.loads(text):
        metric = "decode" if t["n_gen"] > 0 else f"prefill@{t['n_prompt']}"
        rows.append({"round": a.round, "engine": a.engine, "metric": metric, "tok_s": t["avg_ts"]})
    if not rows:
        raise SystemExit("llama-bench printed no test")
    return rows


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--prompts", default="16,128")
    d = sub.add_parser("dsv3")
    d.add_argument("results")
    d.add_argument("round", type=int)
    d.add_argument("prompt", type=int)
    d.add_argument("--decode", action="store_true")
    ll = sub.add_parser("llama")
    ll.add_argument("results")
    ll.add_argument("round", type=int)
    ll.add_argument("engine")
    a = ap.parse_args()
    if a.cmd == "table":
        data, rounds = load(a.results)
        print(table(data, rounds, [p for p in a.prompts.split(",") if p]))
    else:
        text = sys.stdin.read()
        append(a.results, ingest_dsv3(a, text) if a.cmd == "dsv3" else ingest_llama(a, text))


if __name__ == "__main__":
    main()
