#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one run: PyTorch + transformers eager and Corolla on the
# same device, one after the other (each in its own process, so each has the whole GPU).
#
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p corolla-cli --features cuda
#   bench/gpu_bench.sh [PATH_TO_COROLLA] [OUT_DIR]
#
# Writes OUT_DIR/results.jsonl (one JSON object a line, from both engines) and prints the
# table (bench/gpu_table.py). EXTRA="..." adds arguments to every corolla bench run;
# SKIP_TORCH=1 skips the PyTorch reference. The Llama-70B block is also run with
# COROLLA_KERNELS=off (burn's generic ops only) to show what the fused kernels bring.
set -uo pipefail
cd "$(dirname "$0")/.."
B="${1:-${CARGO_TARGET_DIR:-target}/release/corolla}"
OUT="${2:-$(mktemp -d)}"
mkdir -p "$OUT"
if [ -z "${CUDA_PATH:-}" ]; then
  inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
  export CUDA_PATH="$(dirname "$(dirname "$inc")")"
  export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
fi
export PYTHONUNBUFFERED=1
R="$OUT/results.jsonl"
: > "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ -z "${SKIP_TORCH:-}" ]; then
  python3 bench/torch_reference.py 2> "$OUT/torch.err" | tee -a "$R" || tail -20 "$OUT/torch.err"
fi
run() {
  echo "+ corolla bench $*" >&2
  "$B" bench --backend cuda --json "$@" ${EXTRA:-} 2>> "$OUT/corolla.err" | sed "s/^{/{\"kernels\":\"${COROLLA_KERNELS:-on}\",/" \
    | tee -a "$R" || tail -20 "$OUT/corolla.err"
}
run --shape llama-70b --dtype bf16 --model-tokens 0
COROLLA_KERNELS=off run --shape llama-70b --dtype bf16 --model-tokens 0
run --shape llama-8b --dtype bf16 --cached 512 --prefill 0
# Q4_0 weights, quantized on load, kept quantized on the GPU.
run --shape llama-70b --dtype bf16 --quant q4 --model-tokens 0
python3 bench/gpu_table.py "$R" "$OUT/device.txt" | tee "$OUT/table.md"
