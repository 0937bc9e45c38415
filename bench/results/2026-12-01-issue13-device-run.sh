#!/usr/bin/env bash
# Device-side driver for issue 13 (one call): after chunked prompts, tiled attention and the
# capped KV cache, (1) a Llama-70B-shaped block's decode and prefill as before (unchanged
# paths), plus an 8192-token prefill (tiled), (2) long
# prompts on CUDA: greedy tokens of a 6000-token prompt on the llama fixture (context raised)
# equal the CPU's, in-process and through a CUDA server with its admission.
# Binaries come xz-compressed in .device/ (stripped x86-64 builds with --features cuda).
set -uo pipefail
D=.device
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
mkdir -p /tmp/b
for f in corolla server relay; do
  [ -f $D/$f.xz ] && xz -dc $D/$f.xz > /tmp/b/$f && chmod +x /tmp/b/$f
done
R=$OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
tag() { sed "s/^{/{\"build\":\"$1\",/"; }

echo "== 70B block" >&2
timeout 200 /tmp/b/corolla bench --backend cuda --json --shape llama-70b --dtype bf16 --cached 512,4096 \
  --prefill 2048 --model-tokens 0 2>> $OUT/bench.err | tag issue13 | tee -a $R
timeout 150 /tmp/b/corolla bench --backend cuda --json --shape llama-70b --dtype bf16 --cached 512 \
  --prefill 8192 --model-tokens 0 2>> $OUT/bench.err | tag issue13-prefill8192 | tee -a $R

echo "== long prompt on CUDA vs CPU" | tee -a $OUT/long.txt
M=/tmp/llama-long
mkdir -p $M && cp tests/fixtures/llama/* $M/
python3 - <<'EOF'
import json
p = "/tmp/llama-long/config.json"
c = json.load(open(p)); c["max_position_embeddings"] = 32768; json.dump(c, open(p, "w"))
EOF
IDS=$(python3 -c "import random; random.seed(13); print(','.join(str(random.randrange(384)) for _ in range(6000)))")
gen() { timeout 300 /tmp/b/corolla generate --model $M --token-ids "$IDS" --max-new-tokens 24 --ignore-eos --json "$@" \
  2>> $OUT/long.err | python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'tokens': d['token_ids'], 'timing': {k: d['timing'][k] for k in ('first_token_ms','ms_per_token')}}))"; }
cpu=$(gen); echo "cpu $cpu" | tee -a $OUT/long.txt
cuda=$(gen --backend cuda); echo "cuda $cuda" | tee -a $OUT/long.txt
# Through a CUDA server (relay and client on the CPU).
/tmp/b/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > $OUT/relay.log 2>&1 &
for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
/tmp/b/server --model $M --blocks 0:4 --backend cuda --initial-peers $(head -1 /tmp/relay.addr) \
  --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $OUT/server.log 2>&1 &
for i in $(seq 300); do [ -s /tmp/server.addr ] && break; sleep 0.2; done
served=$(gen --initial-peers $(head -1 /tmp/relay.addr)); echo "server $served" | tee -a $OUT/long.txt
python3 - "$cpu" "$cuda" "$served" <<'EOF' | tee -a $OUT/long.txt
import json, sys
cpu, cuda, served = (json.loads(a)["tokens"] for a in sys.argv[1:])
print(json.dumps({"cuda_equals_cpu": cuda == cpu, "server_equals_cpu": served == cpu}))
EOF
grep -E "memory ceiling|budgets" $OUT/server.log | head -3
