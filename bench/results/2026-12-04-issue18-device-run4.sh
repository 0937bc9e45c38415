#!/usr/bin/env bash
# Device-side driver for issue 18, fourth call (one call, ~8 min):
#  1. is the fixed ~250-300 ms of an in-process prompt step, and the one slow decode step
#     after it, cuBLAS's? In-process generation with cuBLAS on (default) and off
#     (COROLLA_KERNELS=-gemm), phases synced (trace);
#  2. the swarm client's embeddings and head on the GPU (`corolla generate --initial-peers
#     --backend cuda`, new) beside the CPU client, through one `server --backend cuda`;
#  3. `corolla bench` of the same blocks in the same call.
# Two Llama-2-70B-shaped blocks (bench/make_checkpoint.py --layers 2, vocabulary 1024) and a
# variant with Llama-2's 32000-token vocabulary (VOCAB), where the client's head matters.
set -uo pipefail
D=.device
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=/tmp/b; mkdir -p $B; xz -dc $D/bins.tar.xz | tar xf - -C $B
R=$OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
N=32
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range(256)))")
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'tokens':len(d['token_ids']),'first_token_ms':t.get('first_token_ms'),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
since() { python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }

timeout 120 $B/corolla bench --backend cuda --json --shape llama-70b --blocks 2 --dtype bf16 --cached 256 \
  --iters 20 --model-tokens 0 2>> $OUT/bench.err | sed 's/^{/{"build":"bf16",/' | tee -a $R

for vocab in 1024 32000; do
  M=/tmp/m70-$vocab
  s=$(date +%s.%N)
  python3 bench/make_checkpoint.py $M --layers 2 --vocab $vocab > $OUT/make-$vocab.log 2>&1
  echo "{\"what\":\"checkpoint\",\"vocab\":$vocab,\"s\":$(since $s)}" | tee -a $R
  GEN=(generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens $N)
  if [ $vocab = 1024 ]; then
    for k in default -gemm; do
      for run in 1 2; do
        COROLLA_KERNELS=$k COROLLA_LOG=shared_model::generate=trace timeout 120 $B/corolla "${GEN[@]}" --backend cuda \
          --dtype bf16 2> $OUT/local-$k-$run.log | timing "local-$vocab-$k-$run" | tee -a $R
      done
    done
  fi
  rm -f /tmp/relay.addr /tmp/server.addr
  $B/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > /dev/null 2>&1 & rpid=$!
  for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
  ADDR=$(head -1 /tmp/relay.addr)
  s=$(date +%s.%N)
  COROLLA_LOG=info,corolla_server::session=debug $B/server --model $M --blocks 0:2 --backend cuda \
    --dtype bf16 --initial-peers $ADDR --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $OUT/server-$vocab.log 2>&1 & spid=$!
  for i in $(seq 900); do [ -s /tmp/server.addr ] && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
  echo "{\"what\":\"server_ready\",\"vocab\":$vocab,\"s\":$(since $s)}" | tee -a $R
  for client in cpu cuda; do
    for run in 1 2 3; do
      COROLLA_LOG=shared_model::generate=debug timeout 120 $B/corolla "${GEN[@]}" --initial-peers $ADDR --backend $client \
        2> $OUT/client-$vocab-$client-$run.log | timing "server-$vocab-client-$client-$run" | tee -a $R
    done
  done
  kill $spid $rpid; wait $spid $rpid 2>/dev/null
done
(cd $OUT && tar czf logs.tgz *.log *.err 2>/dev/null && rm -f *.log *.err)
