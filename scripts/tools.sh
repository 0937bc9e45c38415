#!/usr/bin/env bash
# Puts the web build tools on PATH, installing them once into $COROLLA_TOOLS (default
# ~/.cache/corolla/tools): the wasm32 target and the wasm-bindgen CLI whose version equals the
# wasm-bindgen crate in Cargo.lock (it builds the page's glue and runs the browser-side unit
# tests). Source it: `. scripts/tools.sh`.
set -euo pipefail

COROLLA_TOOLS="${COROLLA_TOOLS:-$HOME/.cache/corolla/tools}"
export PATH="$COROLLA_TOOLS/bin:$PATH"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_wbg="$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/, ""); print; exit}' "$_root/Cargo.lock")"

# wasm-bindgen-cli ships with fat LTO and one codegen unit; a plain optimised build installs several
# times faster and runs just as well for this.
_fast_install() {
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo install --locked --quiet --root "$COROLLA_TOOLS" --force "$@"
}

rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || rustup target add wasm32-unknown-unknown
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$_wbg" ]; then
  echo "installing wasm-bindgen-cli $_wbg into $COROLLA_TOOLS (once, a few minutes)" >&2
  _fast_install wasm-bindgen-cli --version "$_wbg"
fi
