//! libFuzzer target: any byte string is a guest driving one virtio device
//! (see runv_vmm::devices::virtio::fuzz). A panic, a broken invariant or an
//! input that runs past libFuzzer's -timeout is a finding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runv_vmm::devices::virtio::fuzz;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = fuzz::run_bytes(data) {
        panic!("invariant broken: {v}");
    }
});
