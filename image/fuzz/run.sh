#!/bin/sh
# Coverage-guided fuzzing of the layer applier with libFuzzer, on the stable
# toolchain (no cargo-fuzz, no nightly), as vmm/fuzz/run.sh does for the VMM.
#
#   image/fuzz/run.sh [SECONDS] [libFuzzer flags...]   (default 300 s)
#
# New inputs go to corpus/layers (not committed); seeds/layers (hand-made
# layers, first byte 0 = plain tar) is read, never written. Findings land in
# artifacts/layers/; replay one with
#   target/<host>/release/layers artifacts/layers/crash-...
set -eu
cd "$(dirname "$0")"
secs=${1:-300}
[ $# -gt 0 ] && shift
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="--cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares" \
    cargo build --release --target "$host" --bin layers
mkdir -p corpus/layers artifacts/layers
exec "target/$host/release/layers" corpus/layers seeds/layers \
    -artifact_prefix=artifacts/layers/ -max_total_time="$secs" \
    -max_len=65536 -timeout=10 -rss_limit_mb=2048 "$@"
