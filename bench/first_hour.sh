#!/usr/bin/env bash
# A newcomer's first hour, timed by phase: from a fresh clone with cold caches to the chat
# page's first reply, doing what `scripts/demo.sh` does, one step at a time.
#
#   bench/first_hour.sh [REPO]      (default: this checkout)
#
# Cold means: a new clone, an empty cargo registry (its own CARGO_HOME), an empty target
# folder, no web tools, no model. What stays is what a newcomer's machine has before the
# README: the Rust toolchain and its wasm32 target (rustup's, shared by every project),
# Debian's packages, and, for the measurement only, Node.js with playwright-core (in
# tests/browser, installed before the clock starts) to drive headless Chromium.
#
# Prints one line per phase and a Markdown table; the files stay under $FIRST_HOUR_DIR
# (default a new folder in /tmp) for a look at the logs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="${1:-$here}"
work="${FIRST_HOUR_DIR:-$(mktemp -d /tmp/first-hour.XXXXXX)}"
mkdir -p "$work"
log="$work/log"
mkdir -p "$log"

# Everything cold lives under $work.
export CARGO_HOME="$work/cargo-home"
export CARGO_TARGET_DIR="$work/clone/target"
export COROLLA_TOOLS="$work/tools"
export COROLLA_CACHE="$work/cache"
export XDG_CACHE_HOME="$work/xdg-cache"
export CARGO_TERM_COLOR=never
unset RUSTC_WRAPPER
mkdir -p "$CARGO_HOME"
# The rustup proxies (cargo, rustc) stay where the toolchain put them.
export PATH="$HOME/.cargo/bin:$PATH"

phases=()
add() { phases+=("$1|$2"); printf '%-34s %7.1f s\n' "$1" "$2" >&2; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

t0=$(now)
git clone -q "$repo" "$work/clone"
add "clone" "$(since "$t0")"
cd "$work/clone"

# The page's driver, outside the clock: the measurement's tool, not the newcomer's.
(cd tests/browser && npm ci --silent --no-audit --no-fund >"$log/npm.log" 2>&1)

t=$(now)
# shellcheck source=/dev/null
bash -c '. scripts/tools.sh' >"$log/tools.log" 2>&1
add "web tools (wasm-bindgen-cli)" "$(since "$t")"

t=$(now)
scripts/build-web.sh >"$log/page.log" 2>&1
add "chat page (wasm32 release)" "$(since "$t")"

t=$(now)
cargo build --release --locked --bin corolla >"$log/native.log" 2>&1
add "native binary (corolla)" "$(since "$t")"

t=$(now)
# demo.sh's last line; the URL comes on stdout once the swarm is up.
cargo run --release --locked --bin corolla -- demo --web-root dist >"$log/demo.out" 2>"$log/demo.err" &
demo=$!
trap 'kill $demo 2>/dev/null || true; wait $demo 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 1200); do
  url="$(head -n1 "$log/demo.out" 2>/dev/null || true)"
  [ -n "$url" ] && break
  kill -0 $demo 2>/dev/null || { cat "$log/demo.err" >&2; echo "the demo exited" >&2; exit 1; }
  sleep 0.5
done
[ -n "$url" ] || { echo "the demo printed no URL within 10 minutes" >&2; exit 1; }
add "model download + local swarm up" "$(since "$t")"

t=$(now)
PAGE_URL="$url?prompt=What%20is%20the%20capital%20of%20France%3F&send=1&temperature=0&max_tokens=16" \
  SCREENSHOT="$log/first-reply.png" TIMEOUT_MS=600000 node tests/browser/chat.mjs >"$log/page-run.log" 2>&1
result="$(sed -n 's/^RESULT //p' "$log/page-run.log")"
[ -n "$result" ] || { cat "$log/page-run.log" >&2; exit 1; }
python3 - "$result" <<'PY' >&2
import json, sys
r = json.loads(sys.argv[1])
if r.get("failure"):
    sys.exit(f"the page failed: {r['failure']}")
print(f"page: {r['text']!r} on {r['device']}, time to first token {r['ttft']} (after the bundle), {len(r['tokens'])} tokens")
PY
reply_ms="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["total_ms"])' "$result")"
add "page open to whole reply (max 16 tokens)" "$(echo "$reply_ms / 1000" | bc -l)"

total="$(since "$t0")"
echo
echo "| phase | seconds |"
echo "|---|---:|"
for p in "${phases[@]}"; do
  printf '| %s | %.1f |\n' "${p%%|*}" "${p##*|}"
done
printf '| **fresh clone to whole first reply** | **%.1f** (%.1f min) |\n' "$total" "$(echo "$total / 60" | bc -l)"
echo
echo "logs: $log" >&2
