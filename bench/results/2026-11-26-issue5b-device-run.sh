#!/usr/bin/env bash
# Device-side driver for the issue-5b measurements. PHASE=1: block benches (PyTorch, new build
# with autotune x2, previous build); PHASE=2: the server path over loopback.
set -uo pipefail
D=.device/wt5b
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/b
for f in corolla server relay corolla-old server-old; do
  [ -f $D/$f.xz ] && [ ! -x /tmp/b/$f ] && xz -dc $D/$f.xz > /tmp/b/$f && chmod +x /tmp/b/$f
done
R=$OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
tag() { sed "s/^{/{\"build\":\"$1\",/"; }
bench() { local t=$1 b=$2 label=$3; shift 3; echo "+ $label corolla bench $*" >&2
  timeout $t /tmp/b/$b bench --backend cuda --json "$@" 2>> $OUT/corolla.err | tag "$label" | tee -a $R; }
if [ "${PHASE:-1}" = 1 ]; then
  timeout 150 python3 bench/torch_reference.py --cached 512,4096 --prefill 2048 --model-tokens 0 2> $OUT/torch.err | tag torch | tee -a $R
  bench 180 corolla new-autotune --shape llama-70b --dtype bf16 --cached 512,4096 --prefill 2048 --model-tokens 0
  bench 90 corolla new-autotune-2nd-process --shape llama-70b --dtype bf16 --cached 512 --prefill 2048 --model-tokens 0
  bench 90 corolla-old previous --shape llama-70b --dtype bf16 --cached 512 --prefill 2048 --model-tokens 0
  bench 80 corolla new-autotune-q4 --shape llama-70b --dtype bf16 --quant q4 --cached 512 --prefill 0 --model-tokens 0
  ls -la ~/.cache/corolla/kernels | head; du -sh ~/.cache/corolla/kernels/* | tee $OUT/cache.txt
fi
if [ "${PHASE:-1}" = 3 ]; then
  [ -f /tmp/m70/model.safetensors ] || timeout 200 python3 $D/bench/make_checkpoint.py /tmp/m70 --layers 2
  bench 90 corolla new-q4 --shape llama-70b --dtype bf16 --quant q4 --cached 512 --prefill 0 --model-tokens 0 --blocks 2
  bench 90 corolla new-bf16 --shape llama-70b --dtype bf16 --cached 512 --prefill 0 --model-tokens 0 --blocks 2
  COROLLA=/tmp/b/corolla RELAY=/tmp/b/relay timeout 420 $D/bench/gpu_server.sh /tmp/m70 \
    new-bf16 /tmp/b/server -- new-q4 /tmp/b/server --quant q4 -- 2> $OUT/server.err | tee -a $R
  tail -40 $OUT/server.err
fi
if [ "${PHASE:-1}" = 4 ]; then
  [ -f /tmp/m70/model.safetensors ] || timeout 200 python3 $D/bench/make_checkpoint.py /tmp/m70 --layers 2
  COROLLA=/tmp/b/corolla-old RELAY=/tmp/b/relay timeout 420 $D/bench/gpu_server.sh /tmp/m70 \
    previous-bf16 /tmp/b/server-old -- 2> $OUT/server.err | tee -a $R
  tail -40 $OUT/server.err
fi
if [ "${PHASE:-1}" = 2 ]; then
  [ -f /tmp/m70/model.safetensors ] || timeout 200 python3 $D/bench/make_checkpoint.py /tmp/m70 --layers 2
  ls -la /tmp/m70
  COROLLA=/tmp/b/corolla RELAY=/tmp/b/relay timeout 500 $D/bench/gpu_server.sh /tmp/m70 \
    new-bf16 /tmp/b/server -- previous-bf16 /tmp/b/server-old -- new-q4 /tmp/b/server --quant q4 -- 2> $OUT/server.err | tee -a $R
  tail -40 $OUT/server.err
fi
