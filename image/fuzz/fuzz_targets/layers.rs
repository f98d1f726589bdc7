//! libFuzzer target: any byte string is an image layer (its first byte picks
//! the media type) applied into a fresh root beside a sentinel directory (see
//! runv_image::unpack::fuzz). A panic, or any change outside the root, is a
//! finding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runv_image::unpack::fuzz;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = fuzz::run_bytes(data) {
        panic!("invariant broken: {v}");
    }
});
