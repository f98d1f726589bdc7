#!/bin/sh
# Coverage-guided fuzzing of the virtio queue code with libFuzzer, on the
# stable toolchain (no cargo-fuzz, no nightly: the coverage instrumentation
# is stable rustc's sancov pass; only sanitizers would need nightly).
#
#   vmm/fuzz/run.sh [SECONDS] [libFuzzer flags...]   (default 300 s)
#
# New inputs go to corpus/virtio_queues (not committed); seeds/virtio_queues
# (the hand-made cases and regressions) is read, never written. Findings land
# in artifacts/virtio_queues/; replay one with
#   target/<host>/release/virtio_queues artifacts/virtio_queues/crash-...
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
    cargo build --release --target "$host" --bin virtio_queues
mkdir -p corpus/virtio_queues artifacts/virtio_queues
exec "target/$host/release/virtio_queues" corpus/virtio_queues seeds/virtio_queues \
    -artifact_prefix=artifacts/virtio_queues/ -max_total_time="$secs" \
    -max_len=16384 -timeout=10 -rss_limit_mb=2048 "$@"
