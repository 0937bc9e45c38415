#!/usr/bin/env bash
# Device-side driver for issue 18, item 0 (one call): where a token's time goes on the
# serving path. Two Llama-70B-shaped blocks (bench/make_checkpoint.py), bf16 and q4:
# `corolla bench` (blocks alone), `corolla generate --backend cuda` in-process, and a real
# `server --backend cuda` + relay + `corolla generate --initial-peers`, each with its phase
# timings (COROLLA_LOG debug: the generation loop's embed/blocks/head/sample, the server's
# compute/read-back per step; trace: the same with a device wait at each mark) and CubeCL's
# compilation/autotune log, to see whether kernels compile during decoding.
# Binaries come as one tar.xz in .device/ (stripped x86-64 builds with --features cuda; one
# archive compresses the code the three share once).
set -uo pipefail
D=.device
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=/tmp/b
mkdir -p $B
xz -dc $D/bins.tar.xz | tar xf - -C $B
R=$OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
nproc >> $OUT/device.txt
M=/tmp/m70
LAYERS=${LAYERS:-2}
N=${N:-32}
PROMPT_LEN=${PROMPT_LEN:-256}
since() { python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }
s=$(date +%s.%N)
python3 bench/make_checkpoint.py $M --layers $LAYERS > $OUT/make.log 2>&1
echo "checkpoint_s $(since $s)" | tee -a $OUT/device.txt
PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range($PROMPT_LEN)))")
# CubeCL logs compilations and autotune runs to a file named here (read from the cwd).
cat > cubecl.toml <<EOF
[compilation]
logger = { level = "basic", file = "$OUT/cubecl-compile.log" }
[autotune]
logger = { level = "minimal", file = "$OUT/cubecl-autotune.log" }
EOF
mark() { echo "=== $*" >> $OUT/cubecl-compile.log; echo "=== $*" >> $OUT/cubecl-autotune.log; echo "== $*" >&2; }

mark bench
timeout 120 $B/corolla bench --backend cuda --json --shape llama-70b --blocks $LAYERS --dtype bf16 --cached $PROMPT_LEN \
  --iters 20 --model-tokens 0 2>> $OUT/bench.err | sed 's/^{/{"build":"bf16",/' | tee -a $R
timeout 120 $B/corolla bench --backend cuda --json --shape llama-70b --blocks $LAYERS --dtype bf16 --quant q4 \
  --cached $PROMPT_LEN --iters 20 --model-tokens 0 2>> $OUT/bench.err | sed 's/^{/{"build":"q4",/' | tee -a $R

GEN=(generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens $((N + 1)))
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'tokens':len(d['token_ids']),'first_token_ms':t.get('first_token_ms'),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
# In-process: three runs (cold, warm, warm with device waits at each phase mark).
for q in none q4; do
  for run in 1 2; do
    mark "local $q $run"
    COROLLA_LOG=shared_model::generate=debug timeout 150 $B/corolla "${GEN[@]}" --backend cuda --dtype bf16 --quant $q \
      2> $OUT/local-$q-$run.log | timing "local-$q-$run" | tee -a $R
  done
  mark "local $q synced"
  COROLLA_LOG=shared_model::generate=trace timeout 150 $B/corolla "${GEN[@]}" --backend cuda --dtype bf16 --quant $q \
    2> $OUT/local-$q-synced.log | timing "local-$q-synced" | tee -a $R
  # The same without the matrix-vector kernel: does the dense path use it?
  COROLLA_KERNELS=-matvec COROLLA_LOG=shared_model::generate=debug timeout 150 $B/corolla "${GEN[@]}" --backend cuda \
    --dtype bf16 --quant $q 2> $OUT/local-$q-nomatvec.log | timing "local-$q-nomatvec" | tee -a $R
done

# A real server over loopback, the client on the CPU.
for q in none q4; do
  rm -f /tmp/relay.addr /tmp/server.addr
  $B/relay --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/relay.addr > $OUT/relay-$q.log 2>&1 & rpid=$!
  for i in $(seq 50); do [ -s /tmp/relay.addr ] && break; sleep 0.2; done
  ADDR=$(head -1 /tmp/relay.addr)
  mark "server $q start"
  s=$(date +%s.%N)
  COROLLA_LOG=info,corolla_server::session=debug $B/server --model $M --blocks 0:$LAYERS --backend cuda --dtype bf16 \
    --quant $q --initial-peers $ADDR --listen /ip4/127.0.0.1/tcp/0 --addr-file /tmp/server.addr > $OUT/server-$q.log 2>&1 & spid=$!
  for i in $(seq 600); do [ -s /tmp/server.addr ] && break; kill -0 $spid 2>/dev/null || break; sleep 0.2; done
  echo "{\"what\":\"server_ready\",\"quant\":\"$q\",\"s\":$(since $s)}" | tee -a $R
  for run in 1 2; do
    mark "server $q client $run"
    echo "=== client $run" >> $OUT/server-$q.log
    COROLLA_LOG=shared_model::generate=debug timeout 150 $B/corolla "${GEN[@]}" --initial-peers $ADDR \
      2> $OUT/client-$q-$run.log | timing "server-$q-$run" | tee -a $R
  done
  # The client's embeddings and head on the GPU too.
  mark "server $q client cuda"
  COROLLA_LOG=shared_model::generate=debug timeout 150 $B/corolla "${GEN[@]}" --initial-peers $ADDR --backend cuda \
    --dtype bf16 2> $OUT/client-$q-cuda.log | timing "server-$q-client-cuda" | tee -a $R
  kill $spid $rpid; wait $spid $rpid 2>/dev/null
done
rm -f cubecl.toml
# At most 8 files come back: the logs travel as one archive.
(cd $OUT && tar czf logs.tgz *.log && rm -f *.log)
