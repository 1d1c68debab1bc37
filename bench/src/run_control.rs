//! What every benchmark binary does around its run: stop cleanly on
//! SIGINT/SIGTERM/SIGHUP (loops poll [`stopped`], servers and switches are
//! killed on the way out), and pin threads to cores. Shared by the net
//! benchmark (`mod run_control`) and the `blk_bench`/`qos_bench` binaries
//! (`#[path]`).

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGINT/SIGTERM/SIGHUP.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Whether a termination signal arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Route SIGINT, SIGTERM and SIGHUP to [`STOP`].
pub fn install_signals() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let sa = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &sa) }.map_err(|e| format!("sigaction: {e}"))?;
    }
    Ok(())
}

/// Pin the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    let bad = |e: nix::Error| format!("pinning to cpu {core}: {e}");
    set.set(core).map_err(bad)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(bad)
}
