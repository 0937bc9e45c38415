#!/usr/bin/env bash
# Device-side driver for issue 18 (2026-12-04; one call of under 5 minutes, all the device time
# this session had left): the serving path beside the block benchmark at 4 Llama-2-70B-shaped
# blocks with Llama-2's 32000-token vocabulary (bench/make_checkpoint.py --layers 4 --vocab
# 32000, bf16, 256-token prompt, 32 greedy tokens):
#  1. `corolla bench` of the 4 blocks;
#  2. `server --backend cuda` + relay + `corolla generate --initial-peers`, the client's
#     embeddings and head on the GPU (`--backend cuda`, new) and on the CPU; server start-up;
#  3. in-process `corolla generate --backend cuda` with cuBLAS (default) and without
#     (COROLLA_KERNELS=-gemm), phases synced (trace): is the one-off stall around the prompt
#     cuBLAS's?
# Results go to results.jsonl as they come; logs are packed after each part, so a run cut
# short still brings back what it did.
set -uo pipefail
cd "$(dirname "$0")/../.."
. bench/device-env.sh
L=/tmp/logs; mkdir -p $L
pack() { tar czf $OUT/logs.tgz -C $L . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
N=32
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range(256)))")
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'tokens':len(d['token_ids']),'first_token_ms':t.get('first_token_ms'),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
since() { python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }
M=/tmp/m70
s=$(date +%s.%N)
python3 bench/make_checkpoint.py $M --layers 4 --vocab 32000 > $L/make.log 2>&1
echo "{\"what\":\"checkpoint\",\"s\":$(since $s)}" | tee -a $R
timeout 90 $B/corolla bench --backend cuda --json --shape llama-70b --blocks 4 --dtype bf16 --cached 256 \
  --iters 20 --model-tokens 0 2>> $L/bench.err | sed 's/^{/{"build":"bf16",/' | tee -a $R
GEN=(generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens $N)
rm -f /tmp/relay.addr /tmp/server.addr
$B/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > /dev/null 2>&1 & rpid=$!
for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
ADDR=$(head -1 /tmp/relay.addr)
s=$(date +%s.%N)
COROLLA_LOG=info,corolla_server::session=debug $B/server --model $M --blocks 0:4 --backend cuda --dtype bf16 \
  --initial-peers $ADDR --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $L/server.log 2>&1 & spid=$!
for i in $(seq 600); do [ -s /tmp/server.addr ] && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
echo "{\"what\":\"server_ready\",\"s\":$(since $s)}" | tee -a $R
for run in 1 2; do
  for client in cuda cpu; do
    COROLLA_LOG=shared_model::generate=debug timeout 60 $B/corolla "${GEN[@]}" --initial-peers $ADDR --backend $client \
      2> $L/client-$client-$run.log | timing "server-client-$client-$run" | tee -a $R
  done
done
kill $spid $rpid; wait $spid $rpid 2>/dev/null
pack
for k in default -gemm; do
  COROLLA_KERNELS=$k COROLLA_LOG=shared_model::generate=trace timeout 60 $B/corolla "${GEN[@]}" --backend cuda \
    --dtype bf16 2> $L/local-$k.log | timing "local-$k" | tee -a $R
  pack
done
