#!/usr/bin/env bash
# The server's own inference path on a GPU: one decode token through a real
# `server --backend cuda` over loopback (relay, server, `corolla generate --initial-peers` as
# the client), against the same blocks run in-process by `corolla generate --backend cuda`.
#
#   bench/gpu_server.sh MODEL_DIR [LABEL SERVER_BINARY [--client CLIENT] [SERVER_ARGS...] --]...
#   e.g. bench/gpu_server.sh /tmp/m70 bf16 target/release/server -- q4 target/release/server --quant q4 --
# (`--client` runs that setup with another `corolla` binary, e.g. an older build's own client).
# LOCAL=1 also times `corolla generate --backend cuda` in-process (no swarm).
#
# MODEL_DIR: e.g. from bench/make_checkpoint.py (Llama-70B-shaped blocks, small vocabulary).
# COROLLA, RELAY: the client and relay binaries (default: $CARGO_TARGET_DIR/release/...).
# A token's time is (time of N+1 new tokens - time of 1) / N, after a PROMPT_LEN-token prompt,
# so loading and prefill cancel out; the client's embeddings and head run on the CPU.
# Prints one JSON object a line.
set -uo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
COROLLA="${COROLLA:-$T/corolla}"
RELAY="${RELAY:-$T/relay}"
MODEL="$1"; shift
N="${N:-64}"
PROMPT_LEN="${PROMPT_LEN:-512}"
LAYERS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$MODEL/config.json")
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range($PROMPT_LEN)))")
work=$(mktemp -d)
spid= rpid=
cleanup() { kill $spid $rpid 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

calc() { awk "BEGIN { print $1 }"; }
timed() {
  local s e; s=$(date +%s.%N)
  "$@" > /dev/null 2> "$work/client.err" || { echo "client failed:" >&2; tail -5 "$work/client.err" >&2; }
  e=$(date +%s.%N); calc "$e - $s"
}
per_token_ms() {
  local one many
  # Untimed first: kernels compile, and burn's matmul autotunes each new shape, at first use.
  timed "$@" --max-new-tokens 2 > /dev/null
  one=$(timed "$@" --max-new-tokens 1)
  many=$(timed "$@" --max-new-tokens $((N + 1)))
  calc "($many - $one) * 1000 / $N"
}
GEN=("$COROLLA" generate --model "$MODEL" --token-ids "$PROMPT" --ignore-eos --json)
emit() { echo "{\"what\":\"server_path\",\"setup\":\"$1\",\"blocks\":$LAYERS,\"cached\":$PROMPT_LEN,\"ms_per_token\":$2}"; }

# In-process: the whole model on the GPU (blocks, embeddings and head), no swarm.
[ "${LOCAL:-0}" = 1 ] && emit "local-cuda" "$(per_token_ms "${GEN[@]}" --backend cuda --dtype bf16)"

while [ $# -ge 2 ]; do
  label="$1"; server="$2"; shift 2
  args=() client="$COROLLA"
  if [ "${1:-}" = --client ]; then client="$2"; shift 2; fi
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  # A relay of its own per setup: no DHT record of an earlier server is left to route to.
  rm -f "$work/s" "$work/relay"
  "$RELAY" --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & rpid=$!
  while [ ! -s "$work/relay" ]; do sleep 0.1; done
  ADDR=$(head -1 "$work/relay")
  start=$(date +%s.%N)
  "$server" --model "$MODEL" --blocks "0:$LAYERS" --backend cuda --dtype bf16 --initial-peers "$ADDR" \
    --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/s" "${args[@]}" 2> "$work/$label.log" & spid=$!
  while [ ! -s "$work/s" ] && kill -0 $spid 2>/dev/null; do sleep 0.2; done
  ready=$(calc "$(date +%s.%N) - $start")
  grep -o 'throughput=[0-9.]*' "$work/$label.log" | head -1 >&2
  ms=$(per_token_ms "$client" "${GEN[@]:1}" --initial-peers "$ADDR")
  emit "$label" "$ms" | sed "s/}\$/,\"server_ready_s\":$ready}/"
  kill $spid $rpid; wait $spid $rpid 2>/dev/null
  grep -E "ERROR|WARN|serving" "$work/$label.log" | tail -5 >&2
done
