#!/usr/bin/env bash
# Device-side driver for issue 18, third call: is the fixed ~100-300 ms of a prompt step (and
# the one slow decode step after it) cuBLAS's? The same in-process generation and server as in
# the first call, with cuBLAS on (default) and off (COROLLA_KERNELS=-gemm), phases synced.
set -uo pipefail
D=.device
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=/tmp/b; mkdir -p $B; xz -dc $D/bins.tar.xz | tar xf - -C $B
M=/tmp/m70; R=$OUT/results.jsonl
python3 bench/make_checkpoint.py $M --layers 2 > /dev/null 2>&1
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range(256)))")
GEN=(generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens 12)
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'first_token_ms':t.get('first_token_ms'),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
for k in default -gemm; do
  for run in 1 2; do
    COROLLA_KERNELS=$k COROLLA_LOG=shared_model::generate=trace timeout 120 $B/corolla "${GEN[@]}" --backend cuda \
      --dtype bf16 2> $OUT/local-$k-$run.log | timing "local-$k-$run" | tee -a $R
  done
  rm -f /tmp/relay.addr /tmp/server.addr
  $B/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > /dev/null 2>&1 & rpid=$!
  for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
  ADDR=$(head -1 /tmp/relay.addr)
  COROLLA_KERNELS=$k COROLLA_LOG=info,corolla_server::session=debug $B/server --model $M --blocks 0:2 --backend cuda \
    --dtype bf16 --initial-peers $ADDR --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $OUT/server-$k.log 2>&1 & spid=$!
  for i in $(seq 600); do [ -s /tmp/server.addr ] && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
  for run in 1 2 3; do
    timeout 120 $B/corolla "${GEN[@]}" --initial-peers $ADDR 2>/dev/null | timing "server-$k-$run" | tee -a $R
  done
  kill $spid $rpid; wait $spid $rpid 2>/dev/null
done
(cd $OUT && tar czf logs.tgz *.log && rm -f *.log)
