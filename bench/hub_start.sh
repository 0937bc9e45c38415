#!/usr/bin/env bash
# A server of 2 blocks of a Hub model (issue 17, "Hub model ids"): `server --blocks 0:2
# --model corolla-bench/big` of a many-block sharded checkpoint served by bench/local_hub.py on
# 127.0.0.1, into an empty Hugging Face cache, then again with the cache filled, then with
# HF_HUB_OFFLINE=1. One row per start: what the Hub sent (whole files, range requests and
# their bytes, all bytes) and the time from launch to the address file the server writes once
# it has loaded its span, fingerprinted the model and announced itself.
#
#   bench/hub_start.sh CHECKPOINT_DIR
#
# CHECKPOINT_DIR: e.g. python3 bench/make_sharded_checkpoint.py /tmp/ckpt (80 blocks, 3.8 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
CKPT="${1:?usage: bench/hub_start.sh CHECKPOINT_DIR}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

python3 bench/local_hub.py "$CKPT" "$work/hub.port" "$work/hub.json" &
pids+=($!)
"$T/relay" --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay.addrs" >"$work/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 1200); do [ -s "$work/hub.port" ] && [ -s "$work/relay.addrs" ] && break; sleep 0.1; done
relay=$(grep /tcp/ "$work/relay.addrs" | head -1)
endpoint="http://127.0.0.1:$(cat "$work/hub.port")"
ckpt_bytes=$(du -cb "$CKPT"/*.safetensors | tail -1 | cut -f1)

echo "| start | whole files | range requests | bytes by range | bytes sent | of the checkpoint | ready |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
start_server() { # label, extra env
  local label=$1
  shift
  echo '{}' >"$work/before.json"
  cp "$work/hub.json" "$work/before.json"
  rm -f "$work/server.addrs"
  local t0
  t0=$(date +%s.%N)
  env HF_HOME="$work/hf" COROLLA_CACHE="$work/corolla" HF_ENDPOINT="$endpoint" "$@" \
    "$T/server" --model corolla-bench/big --blocks 0:2 --initial-peers "$relay" \
    --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/server.addrs" >"$work/server-$label.log" 2>&1 &
  local pid=$!
  until [ -s "$work/server.addrs" ]; do
    kill -0 $pid 2>/dev/null || { echo "server failed:" >&2; tail -5 "$work/server-$label.log" >&2; exit 1; }
    sleep 0.05
  done
  local t1
  t1=$(date +%s.%N)
  kill $pid; wait $pid 2>/dev/null || true
  # Where the time went (to stderr): the log's milestones, seconds after launch.
  python3 - "$work/server-$label.log" "$t0" <<'PY' >&2
import datetime, re, sys
t0 = float(sys.argv[2])
for line in open(sys.argv[1]):
    m = re.match(r"(\S+Z)\s+\w+\s+\S+: (opened from the Hub|downloading|serving|announced in the DHT)", line)
    if m:
        t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        print(f"  {t - t0:6.2f} s  {m.group(2)} {line.split('file=')[1].split()[0] if 'file=' in line else ''}")
PY
  python3 - "$work/before.json" "$work/hub.json" "$label" "$t0" "$t1" "$ckpt_bytes" <<'PY'
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
label, t0, t1, total = sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
d = {k: {f: after[k].get(f, 0) - before.get(k, {}).get(f, 0) for f in after[k]} for k in after}
whole = sum(v["download"] for v in d.values())
ranges = sum(v["range"] for v in d.values())
range_bytes = sum(v["bytes"] for k, v in d.items() if v["download"] == 0)
sent = sum(v["bytes"] for v in d.values())
print(f"| {label} | {whole} | {ranges:,} | {range_bytes / 1e6:.2f} MB | {sent / 1e6:,.1f} MB | {100 * sent / total:.2f}% | {t1 - t0:.1f} s |")
PY
}
start_server "first (empty cache)"
start_server "second (cache filled)"
start_server "offline (HF_HUB_OFFLINE=1)" HF_HUB_OFFLINE=1
