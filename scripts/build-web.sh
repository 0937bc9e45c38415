#!/usr/bin/env bash
# Builds the chat page into dist/ with Trunk (installing the tools on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
COROLLA_NEED_TRUNK=1 . scripts/tools.sh
trunk build --release "$@"
