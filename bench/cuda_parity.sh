#!/usr/bin/env bash
# CPU vs CUDA on every fixture family: greedy tokens, and the relative difference of each
# block's output and the logits. Run on a machine with an NVIDIA GPU and the CUDA runtime:
#
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p corolla-cli --features cuda
#   bench/cuda_parity.sh [PATH_TO_COROLLA] [OUT_DIR]
#
# burn-cuda compiles kernels with NVRTC at run time and needs the CUDA headers: CUDA_PATH is
# set from the first cuda_bf16.h found if it is not set already.
set -euo pipefail
cd "$(dirname "$0")/.."
B="${1:-${CARGO_TARGET_DIR:-target}/release/corolla}"
OUT="${2:-$(mktemp -d)}"
if [ -z "${CUDA_PATH:-}" ]; then
  inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
  export CUDA_PATH="$(dirname "$(dirname "$inc")")"
  export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
fi
IDS=359,310,172,47,105,300,235,357,169,40,181,303
for fam in llama mistral mixtral qwen2 bloom falcon; do
  for be in cpu cuda; do
    printf "%-8s %-4s " "$fam" "$be"
    "$B" generate --model "tests/fixtures/$fam" --token-ids $IDS --max-new-tokens 10 --ignore-eos --json --backend $be
    "$B" forward --model "tests/fixtures/$fam" --token-ids $IDS --out "$OUT/${fam}_$be.safetensors" --backend $be
  done
done
python3 - "$OUT" <<'PY'
import sys
from safetensors.numpy import load_file
out = sys.argv[1]
for fam in ["llama", "mistral", "mixtral", "qwen2", "bloom", "falcon"]:
    a, b = load_file(f"{out}/{fam}_cpu.safetensors"), load_file(f"{out}/{fam}_cuda.safetensors")
    worst = max(abs(a[k] - b[k]).max() / abs(a[k]).max() for k in a)
    print(f"{fam:8s} max |cuda - cpu| / max |cpu| over block outputs and logits: {worst:.2e}")
PY
