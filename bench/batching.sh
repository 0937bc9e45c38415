#!/usr/bin/env bash
# Continuous batching on the path users take: a relay, ONE server of the whole model, and N
# concurrent `corolla generate --initial-peers` clients (greedy, --ignore-eos, NEW tokens each,
# started together), with the server's batching on (the default) and off (--max-batch-tokens 1,
# one session's step a forward), side by side in one run. Prints one line per cell: the
# clients' summed decode rate (each client's tokens after its first / their time), the wall
# time from the first start to the last exit, the server's mean steps per forward, and the
# server's time in the blocks per step (from its /metrics: what the server's capacity is,
# whatever the clients on the same machine cost).
#
#   bench/batching.sh [PATH_TO_GGUF]          SESSIONS="1 8 32" NEW=32 by default
#
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
SESSIONS="${SESSIONS:-1 8 32}"
NEW="${NEW:-32}"
BLOCKS="${BLOCKS:-0:30}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
calc() { awk "BEGIN { print $1 }"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }

# A folder model without a tokenizer takes the prompt as token ids.
prompt() { if [ -d "$MODEL" ]; then input=(--token-ids "1,2,3,$1"); else input=(--prompt "Story number $1: once upon a time"); fi; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $MODEL, blocks $BLOCKS, $NEW new tokens a client"
for mode in batched unbatched; do
  extra=()
  [ "$mode" = unbatched ] && extra=(--max-batch-tokens 1)
  # A relay of its own: no record of the other mode's server is left to try.
  rm -f "$work/relay"
  $T/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & relay=$!
  pids+=("$relay")
  while [ ! -s "$work/relay" ]; do sleep 0.1; done
  RELAY=$(head -1 "$work/relay")
  port=$(free_port)
  rm -f "$work/server"
  $T/server --model "$MODEL" --blocks "$BLOCKS" --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
    --addr-file "$work/server" --metrics-listen "127.0.0.1:$port" --max-sessions 128 \
    --max-sessions-per-peer 128 "${extra[@]}" 2>/dev/null & server=$!
  pids+=("$server")
  while [ ! -s "$work/server" ]; do sleep 0.1; done
  sleep 1
  for n in $SESSIONS; do
    forwards0=$(metric "$port" corolla_server_batch_size_count)
    steps0=$(metric "$port" corolla_server_batch_size_sum)
    busy0=$(metric "$port" corolla_server_forward_seconds_sum)
    start=$(date +%s.%N)
    cpids=()
    for i in $(seq 1 "$n"); do
      prompt "$i"
      $T/corolla generate --model "$MODEL" "${input[@]}" --max-new-tokens "$NEW" --ignore-eos --json \
        --initial-peers "$RELAY" > "$work/out.$i" 2>/dev/null & cpids+=($!)
    done
    wait "${cpids[@]}"
    end=$(date +%s.%N)
    rate=0
    for i in $(seq 1 "$n"); do
      ms=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["timing"]["ms_per_token"])' "$work/out.$i")
      rate=$(calc "$rate + 1000 / $ms")
    done
    forwards=$(calc "$(metric "$port" corolla_server_batch_size_count) - $forwards0")
    steps=$(calc "$(metric "$port" corolla_server_batch_size_sum) - $steps0")
    busy=$(calc "$(metric "$port" corolla_server_forward_seconds_sum) - $busy0")
    printf "%-9s sessions %3d  %7.1f tokens/s summed  wall %5.1f s  %5.2f steps a forward  server %6.2f ms of blocks a step  (%6.1f steps/s of server time)\n" \
      "$mode" "$n" "$rate" "$(calc "$end - $start")" "$(calc "$steps / $forwards")" "$(calc "$busy * 1000 / $steps")" "$(calc "$steps / $busy")"
  done
  kill "$server" "$relay"; wait "$server" "$relay" 2>/dev/null || true
done
