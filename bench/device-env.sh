# Sourced by the device drivers (bench/results/*-device-run*.sh) from the repository root on
# the device machine: finds the CUDA toolkit the device brings (burn-cuda compiles kernels with
# its NVRTC at run time), unpacks the binaries carried in .device/bins.tar.xz (stripped x86-64
# builds with --features cuda, packed as one archive so the code they share compresses once)
# into $B, and names the results file $R under $OUT.
inc=$(find / -name cuda_bf16.h -path '*include*' 2>/dev/null | head -1)
export CUDA_PATH="$(dirname "$(dirname "$inc")")"
export LD_LIBRARY_PATH="$CUDA_PATH/lib:$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}"
B=/tmp/b
mkdir -p $B
xz -dc .device/bins.tar.xz | tar xf - -C $B
R=$OUT/results.jsonl
