#!/usr/bin/env bash
# Per-token overhead of the swarm on loopback: SmolLM2 split over 1, 2 and 3 servers vs the
# local run, same prompt, greedy, 128 new tokens. Prints one line per setup.
#
#   bench/swarm_overhead.sh [PATH_TO_GGUF]
#
# The protocol's own cost, with compute made negligible (a 4-block fixture model):
#
#   N=200 PROMPT=1,2,3,4,5 SPLITS="0:4|0:2 2:4|0:1 1:3 3:4" bench/swarm_overhead.sh tests/fixtures/llama
#
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
N="${N:-128}"
PROMPT="${PROMPT:-Once upon a time, there was a little}"
SPLITS="${SPLITS:-0:30|0:15 15:30|0:10 10:20 20:30}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Decode time of N tokens = time(N + 1 tokens) - time(1 token): load and prefill cancel out.
calc() { awk "BEGIN { print $1 }"; }
timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); calc "$e - $s"; }
per_token_ms() {
  local one many
  one=$(timed "$@" --max-new-tokens 1)
  many=$(timed "$@" --max-new-tokens $((N + 1)))
  calc "($many - $one) * 1000 / $N"
}

# A folder model without a tokenizer takes the prompt as token ids.
if [ -d "$MODEL" ]; then INPUT=(--token-ids "$PROMPT"); else INPUT=(--prompt "$PROMPT"); fi
local_ms=$(per_token_ms $T/corolla generate --model "$MODEL" "${INPUT[@]}" --ignore-eos --json)
printf "local            %6.2f ms/token\n" "$local_ms"

$T/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & pids+=($!)
while [ ! -s "$work/relay" ]; do sleep 0.1; done
RELAY=$(head -1 "$work/relay")

IFS='|' read -r -a setups <<< "$SPLITS"
for spans in "${setups[@]}"; do
  kill "${pids[@]:1}" 2>/dev/null || true
  pids=("${pids[0]}")
  n=0
  for s in $spans; do
    $T/server --model "$MODEL" --blocks "$s" --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
      --addr-file "$work/s$n" 2>/dev/null & pids+=($!)
    n=$((n + 1))
  done
  for i in $(seq 0 $((n - 1))); do while [ ! -s "$work/s$i" ]; do sleep 0.1; done; done
  ms=$(per_token_ms $T/corolla generate --model "$MODEL" "${INPUT[@]}" --ignore-eos --json --initial-peers "$RELAY")
  over=$(calc "$ms - $local_ms")
  printf "%d server(s)      %6.2f ms/token  (+%5.2f ms, %5.2f ms per hop)\n" "$n" "$ms" "$over" "$(calc "$over / $n")"
  rm -f "$work"/s*
done
