#!/usr/bin/env bash
# Builds the native libFuzzer harnesses (csrc/fuzz/) with clang's libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer, and optionally runs one.
#
#   tools/fuzz-native.sh build [OUTDIR [TARGET...]]  # every harness (or those named) into OUTDIR (build/fuzz)
#   tools/fuzz-native.sh run TARGET [LIBFUZZER ARGS] # build, then run TARGET from its corpus
#
# Targets: ring, blk, net, vsock (vsock builds capture.c into its harness,
# which empties the capture ring for every input).  `run` keeps new inputs in
# build/fuzz/corpus/TARGET (not committed) and starts from them and from
# fuzz/regressions/native-TARGET/, e.g.
#   tools/fuzz-native.sh run blk -runs=10000000 -print_final_stats=1
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cc=${CC:-$(command -v clang-16 || command -v clang || true)}
[ -n "$cc" ] || { echo "fuzz-native.sh: error: clang (clang-16) is not installed" >&2; exit 1; }

core="csrc/vring.c csrc/packed.c csrc/memory.c csrc/inflight.c csrc/inflight_packed.c csrc/dirtylog.c"
trace="csrc/fuzz/fuzz_trace.c -Wl,--wrap=vr_pop,--wrap=vr_pop_batch"
blk=backends/blk net=backends/net vsock=backends/vsock  # each device's C sits in its folder
declare -A sources=(
  [ring]="csrc/fuzz/fuzz_ring.c $core"
  [blk]="csrc/fuzz/fuzz_blk.c $blk/blk.c $blk/blk_pool.c $core $trace -lpthread"
  [net]="csrc/fuzz/fuzz_net.c $net/net.c $net/net_mac.c $net/net_rx.c $net/net_offload.c $net/net_filter.c csrc/capture.c $core $trace -lpthread"
  [vsock]="csrc/fuzz/fuzz_vsock.c $vsock/vsock.c $core $trace -lpthread"
)
flags="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fsanitize-coverage-ignorelist=csrc/fuzz/coverage-ignore.txt -Icsrc -I$blk -I$net -I$vsock"

build() {  # build OUTDIR TARGET...
  local out=$1; shift
  mkdir -p "$out"
  for t in "$@"; do
    [ -n "${sources[$t]:-}" ] || { echo "fuzz-native.sh: error: $t: no such target (ring blk net vsock)" >&2; exit 2; }
    (cd "$repo" && $cc $flags ${sources[$t]} -o "$out/$t")
  done
}

case "${1:-}" in
  build)
    out=${2:-$repo/build/fuzz}; shift $(($# < 2 ? $# : 2))
    [ $# -gt 0 ] || set -- ring blk net vsock
    build "$out" "$@" ;;
  run)
    t=${2:?usage: fuzz-native.sh run TARGET [ARGS]}; shift 2
    build "$repo/build/fuzz" "$t"
    corpus="$repo/build/fuzz/corpus/$t"; mkdir -p "$corpus"
    seeds=()
    [ -d "$repo/fuzz/regressions/native-$t" ] && seeds+=("$repo/fuzz/regressions/native-$t")
    exec "$repo/build/fuzz/$t" "$@" "$corpus" "${seeds[@]}" ;;
  *)
    echo "usage: fuzz-native.sh build [OUTDIR [TARGET...]] | run TARGET [LIBFUZZER ARGS]" >&2; exit 2 ;;
esac
