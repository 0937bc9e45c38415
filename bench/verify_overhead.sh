#!/usr/bin/env bash
# What spot checks cost: `corolla generate` through three servers that each hold every block,
# with --verify 0 (off), the default 0.05 and 1 (every answer), side by side in one run, same
# prompt, greedy. Prints ms/token (decode) and the checks made.
#
#   bench/verify_overhead.sh [PATH_TO_GGUF_OR_FIXTURE]       (default: SmolLM2-135M, 128 tokens)
#   N=200 PROMPT=1,2,3,4,5 BLOCKS=0:4 bench/verify_overhead.sh tests/fixtures/llama
#
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
N="${N:-128}"
PROMPT="${PROMPT:-Once upon a time, there was a little}"
BLOCKS="${BLOCKS:-0:30}"
RATES="${RATES:-0 0.05 1}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

if [ -d "$MODEL" ]; then INPUT=(--token-ids "$PROMPT"); else INPUT=(--prompt "$PROMPT"); fi
$T/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & pids+=($!)
while [ ! -s "$work/relay" ]; do sleep 0.1; done
RELAY=$(head -1 "$work/relay")
for n in 0 1 2; do
  $T/server --model "$MODEL" --blocks "$BLOCKS" --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
    --addr-file "$work/s$n" 2>/dev/null & pids+=($!)
done
for n in 0 1 2; do while [ ! -s "$work/s$n" ]; do sleep 0.1; done; done

cat > "$work/show.py" <<'PY'
import json, sys
j = json.loads(sys.argv[1])
v = j.get("verify", {})
t = j["timing"]
print("round %s  --verify %5s  %7.2f ms/token  first token %7.1f ms  checks %4d  mismatches %d"
      % (sys.argv[3], sys.argv[2], t["ms_per_token"], t["first_token_ms"], v.get("checks", 0),
         v.get("mismatches", 0)))
PY

# Each rate twice, interleaved, so that drift on a shared VM hits them alike.
for round in 1 2; do
  for rate in $RATES; do
    out=$($T/corolla generate --model "$MODEL" "${INPUT[@]}" --max-new-tokens "$N" --ignore-eos --json \
      --initial-peers "$RELAY" --verify "$rate" --verify-seed "$round" 2>/dev/null)
    python3 "$work/show.py" "$out" "$rate" "$round"
  done
done
