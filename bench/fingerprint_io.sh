#!/usr/bin/env bash
# What a server reads from storage before it serves (issue 14, "A fingerprint that reads
# little"): `server --blocks 0:2` of a many-block sharded checkpoint, the page cache dropped
# first, for each server binary given. One row per run: bytes the server process made the
# kernel read (`read_bytes` of /proc/PID/io once it has announced itself, i.e. loaded its span
# and fingerprinted the model), their share of the checkpoint, the checkpoint's pages left in
# the page cache (fincore; the same thing seen from the files), those of the shards that hold
# none of blocks 0 and 1 (only the fingerprint has a reason to read them), and the time from
# launch to the address file the server writes once announced.
#
#   bench/fingerprint_io.sh CHECKPOINT_DIR [SERVER_BINARY...]
#
# CHECKPOINT_DIR: e.g. python3 bench/make_sharded_checkpoint.py /tmp/ckpt (80 blocks, 3.8 GB).
# Binaries default to $CARGO_TARGET_DIR/release/server; pass an old build first to compare
# (e.g. /tmp/server-old, copied aside before rebuilding). RUNS (2) runs per binary. Needs root
# to drop the page cache (`echo 3 > /proc/sys/vm/drop_caches`); without it the figures are
# those of a warm cache and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
CKPT="${1:?usage: bench/fingerprint_io.sh CHECKPOINT_DIR [SERVER_BINARY...]}"
shift
SERVERS=("$@")
[ ${#SERVERS[@]} -gt 0 ] || SERVERS=("$T/server")
RUNS="${RUNS:-2}"
RELAY_BIN="${RELAY_BIN:-$T/relay}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

ckpt_bytes=$(du -cb "$CKPT"/*.safetensors | tail -1 | cut -f1)
# Shards holding no tensor of blocks 0 and 1.
mapfile -t others < <(python3 - "$CKPT" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))["weight_map"]
span = {f for n, f in m.items() if n.startswith(("model.layers.0.", "model.layers.1."))}
print("\n".join(sorted({sys.argv[1] + "/" + f for f in m.values()} - {sys.argv[1] + "/" + f for f in span})))
PY
)
cached_bytes() { fincore -b -n -o RES "$@" | awk '{ s += $1 } END { print s + 0 }'; }

"$RELAY_BIN" --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & pids+=($!)
while [ ! -s "$work/relay" ]; do sleep 0.1; done
RELAY=$(head -1 "$work/relay")

printf "checkpoint %s: %d shards (%d without blocks 0-1), %.2f GB\n" "$CKPT" "$(ls "$CKPT"/*.safetensors | wc -l)" \
  "${#others[@]}" "$(awk "BEGIN { print $ckpt_bytes / 1e9 }")"
printf "%-24s %4s %10s %8s %10s %9s %8s\n" binary run read_MB share cached_MB other_MB ready_s
for bin in "${SERVERS[@]}"; do
  for run in $(seq 1 "$RUNS"); do
    sync
    if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then cold=""; else cold=" (page cache NOT dropped: not permitted)"; fi
    # Only the checkpoint is cold: the binary (a few hundred MB with line tables) is read back
    # into the cache, or its page faults would count as the server's reads.
    cat "$bin" > /dev/null
    rm -f "$work/addr"
    start=$(date +%s.%N)
    "$bin" --model "$CKPT" --blocks 0:2 --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
      --addr-file "$work/addr" > "$work/log" 2>&1 & pid=$!
    pids+=("$pid")
    while [ ! -s "$work/addr" ]; do
      if ! kill -0 "$pid" 2>/dev/null; then echo "server exited:"; tail -20 "$work/log"; exit 1; fi
      sleep 0.05
    done
    ready=$(awk "BEGIN { print $(date +%s.%N) - $start }")
    read_bytes=$(awk '/^read_bytes:/ { print $2 }' "/proc/$pid/io")
    cached=$(cached_bytes "$CKPT"/*.safetensors)
    other=$(cached_bytes "${others[@]}")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    printf "%-24s %4d %10.1f %7.2f%% %10.1f %9.1f %8.2f%s\n" "$bin" "$run" "$(awk "BEGIN { print $read_bytes / 1e6 }")" \
      "$(awk "BEGIN { print 100 * $read_bytes / $ckpt_bytes }")" "$(awk "BEGIN { print $cached / 1e6 }")" \
      "$(awk "BEGIN { print $other / 1e6 }")" "$ready" "$cold"
  done
done
