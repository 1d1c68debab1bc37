//! Cache hints for the hot path, and where threads run.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Ask the CPU to bring the cache line at `p` in; a hint, never a fault.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Ask the CPU to bring the cache line at `p` in, ready to be written.
#[inline(always)]
pub fn prefetch_for_write(p: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW is a hint: it never faults, whatever the address, and
    // touches no register or flag (a NOP on CPUs without it).
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Errors placing threads on CPUs.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("CPU {0} does not exist or is not allowed to this process (see `taskset -p $$` and `nproc`)")]
    NoSuchCpu(usize),
    #[error("cannot set the CPU affinity: {0}")]
    Affinity(#[from] nix::Error),
}

/// Check that every CPU of `cpus` is one this process may run on.
pub fn check_cpus(cpus: &[usize]) -> Result<(), CpuError> {
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    match cpus.iter().find(|&&c| !allowed.is_set(c).unwrap_or(false)) {
        Some(&c) => Err(CpuError::NoSuchCpu(c)),
        None => Ok(()),
    }
}

/// Run the calling thread on `cpu` only.
pub fn pin_current_thread(cpu: usize) -> Result<(), CpuError> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|_| CpuError::NoSuchCpu(cpu))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| match e {
        nix::Error::EINVAL => CpuError::NoSuchCpu(cpu),
        e => CpuError::Affinity(e),
    })
}

/// Keep the calling thread, and the threads it starts from now on, off
/// `cpus` (the polling workers' own), unless that leaves no CPU. Returns
/// whether any CPU was left.
pub fn avoid_cpus(cpus: &[usize]) -> Result<bool, CpuError> {
    let mut set = sched_getaffinity(Pid::from_raw(0))?;
    for &c in cpus {
        let _ = set.unset(c);
    }
    let left = (0..CpuSet::count()).any(|c| set.is_set(c).unwrap_or(false));
    if left {
        sched_setaffinity(Pid::from_raw(0), &set)?;
    }
    Ok(left)
}
