#!/usr/bin/env bash
# Device-side driver for issue 18, fifth call (one call, ~9 min): the serving path beside the
# block benchmark at 8 Llama-2-70B-shaped blocks with Llama-2's 32000-token vocabulary
# (bench/make_checkpoint.py --layers 8 --vocab 32000, bf16): `corolla bench` of the 8 blocks,
# `server --backend cuda` (bf16, then --quant q4) + relay + `corolla generate --initial-peers`
# with the client's embeddings and head on the CPU and on the GPU, and the server's start-up.
set -uo pipefail
cd "$(dirname "$0")/../.."
. bench/device-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
N=32
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range(256)))")
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'tokens':len(d['token_ids']),'first_token_ms':t.get('first_token_ms'),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
since() { python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }
M=/tmp/m70-8
s=$(date +%s.%N)
python3 bench/make_checkpoint.py $M --layers 8 --vocab 32000 > $OUT/make.log 2>&1
echo "{\"what\":\"checkpoint\",\"s\":$(since $s)}" | tee -a $R
for q in none q4; do
  timeout 150 $B/corolla bench --backend cuda --json --shape llama-70b --blocks 8 --dtype bf16 --quant $q --cached 256 \
    --iters 20 --model-tokens 0 2>> $OUT/bench.err | sed "s/^{/{\"build\":\"$q\",/" | tee -a $R
done
GEN=(generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens $N)
rm -f /tmp/relay.addr
$B/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > /dev/null 2>&1 & rpid=$!
for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
ADDR=$(head -1 /tmp/relay.addr)
for q in none q4; do
  rm -f /tmp/server.addr
  s=$(date +%s.%N)
  COROLLA_LOG=info,corolla_server::session=debug $B/server --model $M --blocks 0:8 --backend cuda --dtype bf16 --quant $q \
    --initial-peers $ADDR --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $OUT/server-$q.log 2>&1 & spid=$!
  for i in $(seq 1200); do [ -s /tmp/server.addr ] && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
  echo "{\"what\":\"server_ready\",\"quant\":\"$q\",\"s\":$(since $s)}" | tee -a $R
  for client in cuda cpu; do
    for run in 1 2 3; do
      COROLLA_LOG=shared_model::generate=debug timeout 100 $B/corolla "${GEN[@]}" --initial-peers $ADDR --backend $client \
        2> $OUT/client-$q-$client-$run.log | timing "server-$q-client-$client-$run" | tee -a $R
    done
  done
  kill $spid; wait $spid 2>/dev/null
done
kill $rpid
(cd $OUT && tar czf logs.tgz *.log *.err 2>/dev/null && rm -f *.log *.err)
