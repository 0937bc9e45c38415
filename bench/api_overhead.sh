#!/usr/bin/env bash
# What `corolla api` adds per token over `corolla generate`, on the same swarm in the same run:
# a relay and SmolLM2 over two servers (0:15 with the client bundle, 15:30) on 127.0.0.1, both
# clients running the model from its bundle (`generate --model FINGERPRINT`), greedy, the same
# completion prompt, RUNS (3) runs each, alternating. `generate` reports its own timing
# (`--json`); the API is timed by an HTTP client (Python's standard library) as chunks arrive,
# so the API's figure includes its HTTP, SSE and JSON.
#
#   bench/api_overhead.sh [PATH_TO_GGUF]
#
# Build first: cargo build --release --workspace --bins
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
MODEL="${1:-${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}}"
N="${N:-64}"
RUNS="${RUNS:-3}"
PROMPT="${PROMPT:-Once upon a time, there was a little}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

$T/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file "$work/relay" 2>/dev/null & pids+=($!)
while [ ! -s "$work/relay" ]; do sleep 0.1; done
RELAY=$(head -1 "$work/relay")
$T/server --model "$MODEL" --blocks 0:15 --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
  --http-listen 127.0.0.1:0 --addr-file "$work/s0" 2>"$work/s0.log" & pids+=($!)
$T/server --model "$MODEL" --blocks 15:30 --initial-peers "$RELAY" --listen /ip4/127.0.0.1/tcp/0 \
  --addr-file "$work/s1" 2>/dev/null & pids+=($!)
while [ ! -s "$work/s0" ] || [ ! -s "$work/s1" ]; do sleep 0.1; done
FP=$(grep -o 'fingerprint=[0-9a-f]*' "$work/s0.log" | head -1 | cut -d= -f2)
$T/corolla api --initial-peers "$RELAY" --listen 127.0.0.1:0 --addr-file "$work/api" 2>/dev/null & pids+=($!)
while [ ! -s "$work/api" ]; do sleep 0.1; done
API="http://$(cat "$work/api")"

api_run() {
  python3 - "$API" "$FP" "$PROMPT" "$N" <<'PY'
import json, sys, time, urllib.request
base, model, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}
req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
start, stamps, tokens = time.time(), [], 0
with urllib.request.urlopen(req) as r:
    for line in r:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["text"]:
            stamps.append(time.time())
per = (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)
print(f"{(stamps[0] - start) * 1000:.1f} {per:.2f} {tokens}")
PY
}
gen_run() {
  $T/corolla generate --model "$FP" --initial-peers "$RELAY" --prompt "$PROMPT" --temperature 0 \
    --max-new-tokens "$N" --json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin); t=j["timing"]; print("%.1f %.2f %d" % (t["first_token_ms"], t["ms_per_token"], len(j["token_ids"])))'
}
api_run > /dev/null  # loads the bundle into the API
printf "%-22s %14s %12s %7s\n" client first_token_ms ms/token tokens
for r in $(seq "$RUNS"); do
  read -r f p k < <(gen_run); printf "%-22s %14s %12s %7s\n" "corolla generate" "$f" "$p" "$k"
  read -r f p k < <(api_run); printf "%-22s %14s %12s %7s\n" "corolla api (SSE)" "$f" "$p" "$k"
done
