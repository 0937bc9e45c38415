#!/usr/bin/env bash
# Speculative decoding (prompt lookup) on SmolLM2 with real prompts: a chat answer, a code
# edit that repeats its input, a summary. For each, greedy with --speculative 0 and K, run
# locally and through 2 servers on loopback (relay, servers, client on this machine); prints
# ms/token, steps, drafts kept per step, acceptance, and whether the tokens are the same.
#
#   bench/speculative.sh [PATH_TO_GGUF]        (K=4 N=96 by default)
#
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
K="${K:-4}"
N="${N:-96}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

chat="What is the capital of France? Answer in two sentences."
code='Rename the variable x to total in this Python function and show the whole function:
def add(items):
    x = 0
    for i in items:
        if i > 0:
            x += i
    return x'
summary='Summarize this paragraph in one sentence: The Rust programming language helps people write fast and reliable software. It has no garbage collector, and its ownership rules catch memory errors when the program is compiled. Cargo, its build tool, downloads libraries and builds projects with one command.'

$T/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & pids+=($!)
while [ ! -s "$work/relay" ]; do sleep 0.1; done
RELAY=$(head -1 "$work/relay")
n=0
for s in 0:15 15:30; do
  $T/server --model "$MODEL" --blocks "$s" --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
    --addr-file "$work/s$n" 2>/dev/null & pids+=($!)
  n=$((n + 1))
done
for i in 0 1; do while [ ! -s "$work/s$i" ]; do sleep 0.1; done; done

row() { # name where k json
  python3 - "$@" <<'PY'
import json, sys
name, where, k, path, base = sys.argv[1:6]
out = json.load(open(path))
t = out["timing"]
same = "" if path == base else ("same" if out["token_ids"] == json.load(open(base))["token_ids"] else "DIFFERENT")
rate = t.get("acceptance_rate")
print(f"| {name} | {where} | {k} | {len(out['token_ids'])} | {t['ms_per_token']:.1f} | {t['decode_steps']} "
      f"| {t['accepted_per_step']:.2f} | {'' if rate is None else f'{rate:.2f}'} | {same} |")
PY
}
echo "| prompt | where | K | tokens | ms/token | decode steps | kept/step | acceptance | tokens vs K=0 |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for name in chat code summary; do
  prompt="${!name}"
  for where in local swarm; do
    peers=(); [ "$where" = swarm ] && peers=(--initial-peers "$RELAY")
    for k in 0 "$K"; do
      $T/corolla generate --model "$MODEL" --chat --prompt "$prompt" --max-new-tokens "$N" \
        --speculative "$k" --json "${peers[@]}" > "$work/$name-$where-$k.json"
      row "$name" "$where" "$k" "$work/$name-$where-$k.json" "$work/$name-$where-0.json"
    done
  done
done
