#!/bin/sh
# Checks that a release runv-agent carries no developer tooling: no test
# fakes (host::fake, testing), no `cargo build` of runv-vmm and no installer
# of the in-repo test guest (crate::dev). Those are compiled only into debug
# builds (`cargo run`) and with the `testing` feature (tests, benchmark).
#
#   node-agent/scripts/check-release.sh [path/to/runv-agent]
#
# Without an argument it checks target/release/runv-agent, building it first
# (`cargo build --release -p runv-node-agent`) when it is missing. Run it on a
# debug binary to see it fail.
set -eu
bin=${1:-target/release/runv-agent}
if [ ! -x "$bin" ]; then
    cargo build --release -p runv-node-agent
fi
found=0
for marker in FakeHost FakeState FakeCgroup provide_test_guest find_test_guest \
    install_guest build_vmm_from_source "building runv-vmm" runv-test-guest \
    RUNV_REQUIRE_KVM; do
    if strings -a "$bin" | grep -q -F -- "$marker"; then
        echo "$bin contains developer tooling: $marker" >&2
        found=1
    fi
done
if [ "$found" -ne 0 ]; then
    exit 1
fi
echo "$bin: no developer tooling"
