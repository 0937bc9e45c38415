"""Turns bench/gpu_bench.sh's results.jsonl into the Markdown table of BENCHMARKS.md."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
device = open(sys.argv[2]).read().strip() if len(sys.argv) > 2 else "?"
copy = next((r["bytes_per_s"] for r in rows if r.get("what") == "copy"), None)


def engine(r):
    if r.get("engine"):
        return "PyTorch eager (transformers %s)" % r.get("transformers", "?")
    name = "Corolla (burn-cuda" + ("" if r.get("kernels", "on") == "on" else ", kernels off") + ")"
    return name + ("" if r.get("quant", "none") == "none" else ", " + r["quant"] + " weights")


print(f"Device: {device}. Copy rate (read + write): " + (f"{copy / 1e12:.2f} TB/s" if copy else "not measured"))
print()
print("| engine | dtype | shape | measurement | result | bandwidth limit |")
print("| --- | --- | --- | --- | --- | --- |")
load = {}
for r in rows:
    if r.get("what") == "load":
        load[(r.get("shape"), r.get("quant", "none"))] = r.get("weight_bytes_per_block")
model_limit = {r["shape"]: r["limit_tokens_per_s"] for r in rows if "limit_tokens_per_s" in r}
for r in rows:
    what = r.get("what")
    e = engine(r)
    wb = load.get((r.get("shape"), r.get("quant", "none")))
    limit = f"{wb / copy * 1e3:.3f} ms" if (wb and copy) else ""
    if what == "decode":
        print(f"| {e} | {r['dtype']} | {r['shape']} block | decode, {r['cached']} cached | "
              f"{r['ms_per_block']:.3f} ms | {limit} |")
    elif what == "prefill":
        print(f"| {e} | {r['dtype']} | {r['shape']} block | prefill {r['tokens']} tokens | "
              f"{r['ms_per_block']:.2f} ms | |")
    elif what == "model_decode" and "tokens_per_s" in r:
        lim = model_limit.get(r["shape"]) if r.get("quant", "none") == "none" else None
        print(f"| {e} | {r['dtype']} | {r['shape']} model | greedy decode | {r['tokens_per_s']:.1f} tok/s | "
              + (f"{lim:.0f} tok/s" if lim else "") + " |")
