#!/usr/bin/env bash
# The demo: builds the chat page (installing wasm-bindgen-cli on first use), then runs
# a local swarm (a relay and two servers sharing SmolLM2-135M-Instruct, fetched on first use)
# and serves the page; open the URL it prints. Arguments go to `corolla demo`
# (e.g. --http-port 8081, --servers 3, --bind 0.0.0.0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-web.sh
exec cargo run --release --locked --bin corolla -- demo --web-root dist "$@"
