#!/usr/bin/env bash
# CPU decode speed of `corolla generate` on SmolLM2-135M-Instruct Q4_1, greedy, 128 new tokens,
# as (time of 129 tokens - time of 1 token) / 128: model loading and prefill cancel out.
#
#   bench/cpu_decode.sh [PATH_TO_GGUF]
#
# llama.cpp on the same file and prompt: bench/llamacpp_decode.py (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
PROMPT="Once upon a time, there was a little"
calc() { awk "BEGIN { print $1 }"; }
timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); calc "$e - $s"; }
for rep in 1 2 3; do
  one=$(timed $T/corolla generate --model "$MODEL" --prompt "$PROMPT" --ignore-eos --json --max-new-tokens 1)
  many=$(timed $T/corolla generate --model "$MODEL" --prompt "$PROMPT" --ignore-eos --json --max-new-tokens 129)
  printf "run %d: %.1f tok/s decode (%.1f ms/token)\n" "$rep" "$(calc "128 / ($many - $one)")" "$(calc "($many - $one) * 1000 / 128")"
done
