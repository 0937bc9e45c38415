#!/usr/bin/env bash
# Device-side driver for issue 18, second call: what the one slow decode step after a prompt
# is (168 ms in bf16, 56 ms in q4, on the first call: one step of 33). In-process
# `corolla generate --backend cuda` on two Llama-70B-shaped blocks with device waits at each
# phase mark, CubeCL's per-kernel profile (summed at each wait) and its memory log.
set -uo pipefail
D=.device
cd "$(dirname "$0")/../.."
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=/tmp/b; mkdir -p $B; xz -dc $D/bins.tar.xz | tar xf - -C $B
M=/tmp/m70; R=$OUT/results.jsonl
python3 bench/make_checkpoint.py $M --layers 2 > /dev/null 2>&1
timing() { python3 -c "import json,sys; d=json.load(sys.stdin); t=d['timing']; print(json.dumps({'what':'generate','setup':sys.argv[1],'tokens':len(d['token_ids']),'ms_per_token':t.get('ms_per_token')}))" "$1"; }
for len in 256 100; do
  PROMPT=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randrange(3, 1000)) for _ in range($len)))")
  for q in none q4; do
    # Warm the kernel caches first, then profile a run.
    timeout 100 $B/corolla generate --model $M --token-ids "$PROMPT" --ignore-eos --json --max-new-tokens 6 \
      --backend cuda --dtype bf16 --quant $q > /dev/null 2>&1
    cat > cubecl.toml <<EOT
[profiling]
logger = { level = "basic", file = "$OUT/profile-$q-$len.log" }
[memory]
logger = { level = "basic", file = "$OUT/memory-$q-$len.log" }
[compilation]
logger = { level = "basic", file = "$OUT/compile-$q-$len.log" }
EOT
    COROLLA_LOG=shared_model::generate=trace timeout 150 $B/corolla generate --model $M --token-ids "$PROMPT" \
      --ignore-eos --json --max-new-tokens 6 --backend cuda --dtype bf16 --quant $q 2> $OUT/phases-$q-$len.log \
      | timing "profiled-$q-$len" | tee -a $R
    rm -f cubecl.toml
  done
done
(cd $OUT && tar czf logs.tgz *.log && rm -f *.log)
