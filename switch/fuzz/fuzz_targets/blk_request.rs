//! Fuzz virtio-blk request parsing: any chain shape (buffer count, sizes,
//! directions) and contents go through `vioswitch::blk::parse` and the
//! accessors a worker uses; it must never panic or read or write outside the
//! chain (see `src/blk_input.rs` for the invariants checked).
//!
//! Run from `switch/`: `cargo +nightly fuzz run blk_request`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/blk_input.rs"]
mod blk_input;

fuzz_target!(|data: &[u8]| {
    if let blk_input::Outcome::Parsed(r) = blk_input::run(data) {
        std::hint::black_box(r);
    }
});
