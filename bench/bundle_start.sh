#!/usr/bin/env bash
# What serving the client bundle (`server --http-listen`) costs a server's start: peak memory
# (max RSS) and time to ready, on a first start (empty cache: the bundle is built) and a
# second (the bundle is there), for each server binary given, side by side in one run.
#
#   bench/bundle_start.sh CHECKPOINT_DIR SERVER_BIN [SERVER_BIN...]
#
# CHECKPOINT_DIR: one with large embeddings, e.g.
#   python3 bench/make_sharded_checkpoint.py /tmp/ckpt --layers 4 --hidden 2048 \
#     --intermediate 5632 --vocab 128256 --blocks-per-shard 2
# (a Llama-3-sized vocabulary: embeddings and head of 1.05 GB each in f32).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
CKPT="${1:?usage: bench/bundle_start.sh CHECKPOINT_DIR SERVER_BIN...}"
shift
[ $# -gt 0 ] || { echo "name at least one server binary" >&2; exit 2; }
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$T/relay" --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay.addrs" >"$work/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do [ -s "$work/relay.addrs" ] && break; sleep 0.1; done
relay=$(grep /tcp/ "$work/relay.addrs" | head -1)

echo "| server | start | bundle | max RSS | ready |"
echo "| --- | --- | --- | --- | --- |"
start() { # binary, cache dir, label
  local bin=$1 cache=$2 label=$3
  rm -f "$work/server.addrs"
  local t0 t1
  t0=$(date +%s.%N)
  COROLLA_CACHE="$cache" /usr/bin/time -f "%M" -o "$work/rss" \
    "$bin" --model "$CKPT" --blocks 0:1 --initial-peers "$relay" --listen /ip4/127.0.0.1/tcp/0 \
    --http-listen 127.0.0.1:0 --addr-file "$work/server.addrs" >"$work/server.log" 2>&1 &
  local pid=$!
  until [ -s "$work/server.addrs" ]; do
    kill -0 $pid 2>/dev/null || { echo "server failed:" >&2; tail -5 "$work/server.log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N)
  # The server's own pid is time's child; stop it, then time reports.
  pkill -TERM -P $pid || true
  wait $pid 2>/dev/null || true
  local bytes
  bytes=$(grep 'serving the client bundle' "$work/server.log" | grep -o ' bytes=[0-9]*' | head -1 | cut -d= -f2)
  printf '| %s | %s | %s MB | %.2f GB | %.1f s |\n' "$(basename "$(dirname "$bin")")/$(basename "$bin")" "$label" \
    "$(( ${bytes:-0} / 1000000 ))" "$(echo "$(tail -1 "$work/rss") / 1048576" | bc -l)" "$(echo "$t1 - $t0" | bc -l)"
}
for bin in "$@"; do
  cache="$work/cache-$(echo "$bin" | sha256sum | cut -c1-8)"
  start "$bin" "$cache" "first (builds the bundle)"
  start "$bin" "$cache" "second (bundle on disk)"
done
