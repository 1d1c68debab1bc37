//! Fuzz the control channel: any bytes, split into request lines as a
//! control connection splits them, go to `vioswitch::control::handle_line`
//! on one in-process switch (2 workers, run directory in /dev/shm when it
//! exists). The handler must never panic or hang and must always answer
//! with a well-formed object. Socket and file paths in requests are kept
//! inside the run directory (see `src/sandbox.rs`), and every input starts
//! from a switch without ports, so that a crash reproduces from its input.
//!
//! Run from `switch/`: `cargo +nightly fuzz run control_request`.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vioswitch::daemon::{Switch, SwitchConfig};

#[path = "../src/sandbox.rs"]
mod sandbox;

fn switch() -> &'static Arc<Switch> {
    static SWITCH: OnceLock<Arc<Switch>> = OnceLock::new();
    SWITCH.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vioswitch-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = SwitchConfig::new(dir);
        cfg.workers = Some(2);
        Switch::start(cfg).expect("start a switch for fuzzing")
    })
}

fuzz_target!(|data: &[u8]| {
    let sw = switch();
    for answer in sandbox::run(sw, data) {
        assert!(sandbox::well_formed(&answer), "malformed answer {answer}");
    }
    sandbox::reset(sw);
});
