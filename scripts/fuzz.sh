#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of everything Corolla reads from peers and
# files: see docs/ARCHITECTURE.md "Fuzzing". Installs cargo-fuzz once into $COROLLA_TOOLS.
#
#   scripts/fuzz.sh ci                 build every target, run each for $FUZZ_SECONDS (30) on its
#                                      committed corpus; fails on any crash, OOM or timeout
#   scripts/fuzz.sh run TARGET [ARGS]  fuzz one target until stopped (ARGS go to libFuzzer,
#                                      e.g. -runs=10000000); new inputs go to fuzz/work/TARGET
#   scripts/fuzz.sh merge TARGET       minimise fuzz/corpus/TARGET plus fuzz/work/TARGET back
#                                      into fuzz/corpus/TARGET
#   scripts/fuzz.sh seeds              regenerate the seed inputs and merge them into the corpora
#   scripts/fuzz.sh build              build the targets only
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

TARGETS=(wire dht_record gguf safetensors config chat)
CARGO_FUZZ_VERSION=0.13.2
COROLLA_TOOLS="${COROLLA_TOOLS:-$HOME/.cache/corolla/tools}"
export PATH="$COROLLA_TOOLS/bin:$PATH"
# Not the workspace's target directory: every crate here is built with coverage instrumentation.
FUZZ_TARGET_DIR="${COROLLA_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz}"
export CARGO_TARGET_DIR="$FUZZ_TARGET_DIR"
BIN="$FUZZ_TARGET_DIR/x86_64-unknown-linux-gnu/release"

# Largest input per target: a few of its real files or messages, no more (libFuzzer's cost per
# execution grows with the input; nothing deeper hides behind longer ones).
max_len() {
  case "$1" in
    wire) echo 16384 ;;
    dht_record | config) echo 4096 ;;
    # A conversation of a few short messages: the templates' and tokenizer's branches are all
    # reached by then, and longer ones only cost time (the tokenizer's work grows with the
    # text; at 1 KiB this target ran under 1,000 executions a second).
    chat) echo 256 ;;
    gguf) echo 32768 ;;
    safetensors) echo 65536 ;;
    *) echo "unknown target $1" >&2; exit 2 ;;
  esac
}

# Every run: a hard memory cap (an input costing more is a finding) and a per-input time limit
# (a slow input is a finding too).
libfuzzer_flags() {
  local flags="-max_len=$(max_len "$1") -rss_limit_mb=2048 -timeout=10 -print_final_stats=1"
  [ -f "$root/fuzz/dicts/$1.dict" ] && flags="$flags -dict=$root/fuzz/dicts/$1.dict"
  echo "$flags"
}

install() {
  if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $COROLLA_TOOLS (once, about a minute)" >&2
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=0 \
      CARGO_TARGET_DIR="$FUZZ_TARGET_DIR/install" \
      cargo install --locked --quiet --root "$COROLLA_TOOLS" --force cargo-fuzz --version "$CARGO_FUZZ_VERSION"
  fi
}

build() {
  install
  # No sanitizer: the code is safe Rust, the findings wanted are panics, aborts, OOMs and hangs,
  # and without ASan this builds on stable and runs about twice as fast. Debug assertions and
  # overflow checks stay on. 16 codegen units build several times faster than cargo-fuzz's 1.
  # FUZZ_BUILD_FLAGS adds cargo-fuzz flags, e.g. --no-trace-compares for a long campaign of a
  # slow target (give it its own COROLLA_FUZZ_TARGET_DIR).
  # shellcheck disable=SC2086
  cargo fuzz build -O --debug-assertions --sanitizer none --codegen-units 16 ${FUZZ_BUILD_FLAGS:-} \
    --target-dir "$FUZZ_TARGET_DIR" "$@"
}

case "${1:-ci}" in
  build)
    build
    ;;
  ci)
    build
    seconds="${FUZZ_SECONDS:-30}"
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    for t in "${TARGETS[@]}"; do
      mkdir -p "$scratch/$t"
      echo "fuzz: $t for ${seconds}s" >&2
      # New inputs go to the scratch folder; the committed corpus is only read.
      # shellcheck disable=SC2046
      if ! (cd "$scratch" && "$BIN/$t" $(libfuzzer_flags "$t") -max_total_time="$seconds" \
        -artifact_prefix="$scratch/$t-" "$scratch/$t" "$root/fuzz/corpus/$t" 2>"$scratch/$t.log"); then
        tail -n 60 "$scratch/$t.log" >&2
        for a in "$scratch/$t"-*; do
          [ -e "$a" ] && { echo "fuzz: $t failed on $a (base64):" >&2; base64 -w0 "$a" >&2; echo >&2; }
        done
        exit 1
      fi
      grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$scratch/$t.log" | tail -n 2 >&2 || true
    done
    ;;
  run)
    t="${2:?usage: fuzz.sh run TARGET [libFuzzer args]}"
    shift 2
    build "$t"
    mkdir -p "work/$t" artifacts
    # shellcheck disable=SC2046
    exec "$BIN/$t" $(libfuzzer_flags "$t") -artifact_prefix="artifacts/$t-" "$@" "work/$t" "corpus/$t"
    ;;
  merge)
    t="${2:?usage: fuzz.sh merge TARGET}"
    build "$t"
    mkdir -p "work/$t"
    merged="$(mktemp -d)"
    # shellcheck disable=SC2046
    "$BIN/$t" $(libfuzzer_flags "$t") -merge=1 "$merged" "corpus/$t" "work/$t"
    rm -rf "corpus/$t"
    mv "$merged" "corpus/$t"
    ;;
  seeds)
    build
    # The seed writer is built with the targets' own flags, so it reuses their compiled
    # dependencies (these are cargo-fuzz 0.13's flags for the `build` above).
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
-Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=16" \
      cargo build --target x86_64-unknown-linux-gnu --release --config 'profile.release.debug="line-tables-only"' \
      --target-dir "$FUZZ_TARGET_DIR" --example seeds
    seeds="$(mktemp -d)"
    "$BIN/examples/seeds" "$seeds"
    for t in "${TARGETS[@]}"; do
      mkdir -p "corpus/$t"
      merged="$(mktemp -d)"
      # shellcheck disable=SC2046
      "$BIN/$t" $(libfuzzer_flags "$t") -merge=1 "$merged" "corpus/$t" "$seeds/$t"
      rm -rf "corpus/$t"
      mv "$merged" "corpus/$t"
    done
    rm -rf "$seeds"
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
