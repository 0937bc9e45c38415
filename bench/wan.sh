#!/usr/bin/env bash
# Tokens/s over an emulated WAN (bench/wan: every peer in its own network namespace, every link
# with the asked RTT and a 100 Mbit/s cap, measured by the emulator before each cell): a relay,
# N servers splitting SmolLM2's 30 blocks, and `corolla generate` on its own peer, for
#   client     the client-driven chain (--no-push): 2N one-way delays a token
#   push       server-to-server push: N + 1 one-way delays a token
#   push+spec  push with speculative decoding (prompt lookup, --speculative K)
# on three real prompts (a chat answer, a code edit that repeats its input, a summary).
#
#   bench/wan.sh                                   the table: 1, 2, 4, 8 servers x 0, 25, 100, 200 ms
#   bench/wan.sh --rtt-ms R --servers N --json     one cell, as JSON lines
#
# Needs root (network namespaces) and the release binaries:
#   cargo build --release --workspace --bins
# Environment: COROLLA_SMOLLM2_GGUF (else `corolla fetch`), K (draft length, 4), N_TOKENS (32),
# MBIT (100), SPEC_FLAGS (more flags for push+spec, e.g. --adaptive-drafts); for the table,
# SERVERS_LIST ("1 2 4 8") and RTT_LIST ("0 25 100 200").
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:-target}/release"
K="${K:-4}"
N_TOKENS="${N_TOKENS:-32}"
MBIT="${MBIT:-100}"

rtt="" servers="" json=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rtt-ms) rtt="$2"; shift 2 ;;
    --servers) servers="$2"; shift 2 ;;
    --json) json=1; shift ;;
    *) echo "usage: $0 [--rtt-ms R --servers N [--json]]" >&2; exit 2 ;;
  esac
done
if [ -n "$rtt$servers" ] && { [ -z "$rtt" ] || [ -z "$servers" ]; }; then
  echo "--rtt-ms and --servers go together" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || { echo "bench/wan.sh needs root (it creates network namespaces)" >&2; exit 1; }
for b in wan relay server corolla; do
  [ -x "$T/$b" ] || { echo "missing $T/$b: cargo build --release --workspace --bins" >&2; exit 1; }
done
MODEL="${COROLLA_SMOLLM2_GGUF:-$($T/corolla fetch)}"
BLOCKS=30

chat="What is the capital of France? Answer in two sentences."
code='Rename the variable x to total in this Python function and show the whole function:
def add(items):
    x = 0
    for i in items:
        if i > 0:
            x += i
    return x'
summary='Summarize this paragraph in one sentence: The Rust programming language helps people write fast and reliable software. It has no garbage collector, and its ownership rules catch memory errors when the program is compiled. Cargo, its build tool, downloads libraries and builds projects with one command.'

pids=() work=""
# Stops the cell's processes (the emulator last: it removes its namespaces on SIGTERM).
stop_cell() {
  if [ ${#pids[@]} -gt 1 ]; then kill "${pids[@]:1}" 2>/dev/null || true; fi
  sleep 0.5
  if [ ${#pids[@]} -gt 0 ]; then kill "${pids[0]}" 2>/dev/null || true; fi
  wait 2>/dev/null || true
  pids=()
  [ -n "$work" ] && rm -rf "$work"
  work=""
}
trap stop_cell EXIT
peer() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["peers"][int(sys.argv[2])][sys.argv[3]])' "$work/wan.json" "$1" "$2"; }
ns() { peer "$1" ns; }
addr() { peer "$1" addr; }

# One cell: prints JSON lines (the emulator's check, then one line per mode and prompt).
cell() { # rtt servers
  local rtt=$1 n=$2 peers=$(($2 + 2))
  work=$(mktemp -d)
  "$T/wan" up --peers "$peers" --rtt-ms "$rtt" --mbit "$MBIT" --ready-file "$work/wan.json" 2>"$work/wan.log" &
  pids+=($!)
  while [ ! -s "$work/wan.json" ]; do
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/wan.log" >&2; return 1; }
    sleep 0.2
  done
  python3 - "$work/wan.json" "$rtt" "$n" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))
c = w["check"]
rtts = [r["median_ms"] for r in c["rtt"]]
print(json.dumps({"kind": "wan_check", "rtt_ms": float(sys.argv[2]), "servers": int(sys.argv[3]),
                  "measured_rtt_ms": [min(rtts), max(rtts)],
                  "measured_mbit": [r["measured_mbit"] for r in c["rate"]], "ok": c["ok"]}))
PY
  ip netns exec "$(ns 0)" "$T/relay" --listen "/ip4/$(addr 0)/tcp/0" --addr-file "$work/relay" 2>"$work/relay.log" &
  pids+=($!)
  while [ ! -s "$work/relay" ]; do sleep 0.1; done
  local relay i start end
  relay=$(head -1 "$work/relay")
  for i in $(seq 1 "$n"); do
    start=$(( (i - 1) * BLOCKS / n )); end=$(( i * BLOCKS / n ))
    ip netns exec "$(ns "$i")" "$T/server" --model "$MODEL" --blocks "$start:$end" --initial-peers "$relay" \
      --listen "/ip4/$(addr "$i")/tcp/0" --addr-file "$work/s$i" 2>"$work/s$i.log" &
    pids+=($!)
  done
  for i in $(seq 1 "$n"); do while [ ! -s "$work/s$i" ]; do sleep 0.1; done; done
  local client_ns name prompt mode
  client_ns=$(ns $((n + 1)))
  for name in chat code summary; do
    prompt="${!name}"
    for mode in client push push+spec; do
      local extra=()
      case "$mode" in
        client) extra=(--no-push) ;;
        push+spec) extra=(--speculative "$K" ${SPEC_FLAGS:-}) ;;
      esac
      ip netns exec "$client_ns" "$T/corolla" generate --model "$MODEL" --chat --prompt "$prompt" \
        --max-new-tokens "$N_TOKENS" --ignore-eos --json --initial-peers "$relay" "${extra[@]}" \
        >"$work/$name-$mode.json" 2>"$work/$name-$mode.log" || { cat "$work/$name-$mode.log" >&2; return 1; }
      python3 - "$work/$name-$mode.json" "$work/$name-client.json" "$mode" "$name" "$rtt" "$n" <<'PY'
import json, sys
path, base, mode, name, rtt, n = sys.argv[1:7]
out = json.load(open(path)); t = out["timing"]
rtt, n = float(rtt), int(n)
one_way = rtt / 2
delays = 2 * n if mode == "client" else n + 1
print(json.dumps({
    "mode": mode, "rtt_ms": rtt, "servers": n, "prompt": name,
    "tokens_per_s": 1000.0 / t["ms_per_token"], "ms_per_token": t["ms_per_token"],
    "network_ms_per_step": delays * one_way,
    "accepted_per_step": t["accepted_per_step"], "acceptance_rate": t.get("acceptance_rate"),
    "same_tokens_as_client": out["token_ids"] == json.load(open(base))["token_ids"],
}))
PY
    done
  done
  stop_cell
}

if [ -n "$rtt" ]; then
  one=$(mktemp)
  cell "$rtt" "$servers" >"$one"
  if [ "$json" = 1 ]; then cat "$one"; else python3 -m json.tool --json-lines "$one"; fi
  rm -f "$one"
  exit 0
fi

all=$(mktemp)
for n in ${SERVERS_LIST:-1 2 4 8}; do
  for r in ${RTT_LIST:-0 25 100 200}; do
    echo "cell: $n servers, $r ms RTT" >&2
    cell "$r" "$n" >>"$all"
  done
done
python3 - "$all" "$K" "$MBIT" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
K, mbit = sys.argv[2], sys.argv[3]
checks = {(r["servers"], r["rtt_ms"]): r for r in rows if r.get("kind") == "wan_check"}
cells = collections.defaultdict(dict)
for r in rows:
    if "mode" in r:
        cells[(r["servers"], r["rtt_ms"])].setdefault(r["mode"], []).append(r)
print(f"| servers | RTT ms (measured) | client tok/s | push tok/s | push+spec (K={K}) tok/s | push / client | push+spec / client | ms/token client / push / push+spec | network ms a step: client (2n) / push (n+1) | acceptance | same tokens |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (n, rtt), modes in sorted(cells.items()):
    c = checks.get((n, rtt), {})
    lo, hi = c.get("measured_rtt_ms", [0, 0])
    mean = lambda m, k: sum(r[k] for r in modes[m]) / len(modes[m])
    tc, tp, ts = (mean(m, "tokens_per_s") for m in ("client", "push", "push+spec"))
    acc = [r["acceptance_rate"] for r in modes["push+spec"] if r["acceptance_rate"] is not None]
    same = all(r["same_tokens_as_client"] for m in modes.values() for r in m)
    print(f"| {n} | {rtt:g} ({lo:.1f}-{hi:.1f}) | {tc:.2f} | {tp:.2f} | {ts:.2f} | {tp/tc:.2f}x | {ts/tc:.2f}x "
          f"| {mean('client','ms_per_token'):.0f} / {mean('push','ms_per_token'):.0f} / {mean('push+spec','ms_per_token'):.0f} "
          f"| {mean('client','network_ms_per_step'):.0f} / {mean('push','network_ms_per_step'):.0f} "
          f"| {sum(acc)/len(acc) if acc else 0:.2f} | {'yes' if same else 'NO'} |")
print()
print("Per prompt, push+spec: tokens/s (acceptance)")
for (n, rtt), modes in sorted(cells.items()):
    per = ", ".join(f"{r['prompt']} {r['tokens_per_s']:.2f} ({(r['acceptance_rate'] or 0):.2f})" for r in modes["push+spec"])
    print(f"- {n} servers, {rtt:g} ms: {per}")
print(f"\n(bandwidth cap {mbit} Mbit/s each way on every link, measured by the emulator in each cell)")
PY
rm -f "$all"
