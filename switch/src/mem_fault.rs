//! Surviving a frontend that shrinks guest memory under the switch.
//!
//! Guest memory is a file the frontend shares with us. If the frontend
//! truncates it after we mapped it, touching the lost pages raises SIGBUS,
//! which would kill the daemon and every other guest's traffic with it. So
//! every guest mapping is registered here, and a SIGBUS handler that finds the
//! faulting address inside a registered mapping puts an anonymous zero page
//! over the faulting page and flags the mapping; the faulting access then
//! completes on that page, and the dataplane, seeing the flag, stops the
//! port. A SIGBUS anywhere else keeps its default action.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Most guest mappings at once (ports × regions).
const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();

/// A registered mapping; unregistered on drop (before the mapping goes).
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

impl Registration {
    /// Whether a page of the mapping was lost to a truncation.
    #[inline]
    pub fn faulted(&self) -> bool {
        REGISTRY[self.slot].faulted.load(Ordering::Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &REGISTRY[self.slot];
        s.len.store(0, Ordering::Release);
        s.faulted.store(false, Ordering::Relaxed);
        s.start.store(0, Ordering::Release);
    }
}

/// Register a guest mapping of `len` bytes at `start`. `None` if the
/// registry is full (the mapping then has no protection; logged).
pub fn register(start: *mut u8, len: usize) -> Option<Registration> {
    INSTALL.call_once(install_handler);
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.start
            .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.faulted.store(false, Ordering::Relaxed);
            s.len.store(len, Ordering::Release);
            return Some(Registration { slot: i });
        }
    }
    log::warn!("more than {SLOTS} guest mappings: a truncated guest file would crash the switch");
    None
}

fn install_handler() {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the
    // handler, SA_SIGINFO and SA_NODEFER (the handler may fault on the next
    // page right after returning) and install it for SIGBUS only.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        sa.sa_sigaction = handler as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            log::warn!(
                "cannot install the SIGBUS handler: a truncated guest file would crash the switch"
            );
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: sysconf is async-signal-safe in practice (it reads a constant).
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    for s in REGISTRY.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= len {
            continue;
        }
        // The mapping's page may be a huge page (hugetlbfs guest memory),
        // where only a whole, aligned huge page can be replaced: try the
        // base page size, then 2 MiB, then 1 GiB.
        for size in [page, 2 << 20, 1 << 30] {
            let base = addr & !(size - 1);
            if base < start || base + size > start + len {
                continue;
            }
            // SAFETY: `base..base+size` lies inside a registered guest
            // mapping (checked just above), which is alive: the faulting
            // thread is accessing it through an `Arc` it holds, and
            // registrations go before their mapping. Only guest bytes,
            // already lost to the truncation, are replaced; mmap is a plain
            // system call, safe to make in a signal handler.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                s.faulted.store(true, Ordering::Relaxed);
                return;
            }
        }
        break;
    }
    // Not a guest page: let the fault take its default action when the
    // instruction runs again.
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_flagged() {
        let f = crate::mem::tests::memfd(3 * 4096);
        let map = vm_memory::MmapRegion::<()>::from_file(
            vm_memory::FileOffset::new(f.try_clone().unwrap(), 0),
            3 * 4096,
        )
        .unwrap();
        let reg = register(map.as_ptr(), map.size()).unwrap();
        // SAFETY: inside the mapping.
        unsafe { map.as_ptr().add(2 * 4096).write_volatile(7) };
        assert!(!reg.faulted());
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping; the page is gone and the handler replaces it.
        let v = unsafe { map.as_ptr().add(2 * 4096 + 5).read_volatile() };
        assert_eq!(v, 0);
        assert!(reg.faulted());
        drop(reg);
    }
}
