//! Guest memory: memfd-backed regions shared with the vhost-user backend.
//!
//! Guest-physical addresses start at [`GUEST_PHYS_BASE`] (not 0) so that a
//! backend that mixes up the frontend's virtual addresses, guest-physical
//! addresses and its own mapping fails loudly. With several regions, a hole of
//! [`REGION_GAP`] bytes separates them in guest-physical space, and each
//! region is its own memfd with its own mapping, so the backend's translation
//! must look the region up for every address.
//!
//! All accesses to the mapping go through raw pointers (never Rust
//! references), since the backend process reads and writes the same pages
//! concurrently.

use std::ffi::CStr;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vhost::VhostUserMemoryRegionInfo;

use super::GuestError;

/// Guest-physical address of the first byte of guest memory.
pub const GUEST_PHYS_BASE: u64 = 0x1000_0000;

/// Unmapped guest-physical hole between two consecutive regions.
pub const REGION_GAP: u64 = 0x20_0000;

/// Most regions one guest may have (what one SET_MEM_TABLE can carry).
pub const MAX_REGIONS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

const PAGE: usize = 4096;

/// Default alignment of [`GuestMemory::alloc`] (a cache line).
pub const ALLOC_ALIGN: usize = 64;

/// One region as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// First guest-physical address of the region.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub size: usize,
    /// Where the region is mapped in this process (the `userspace_addr` sent
    /// to the backend).
    pub host_addr: u64,
}

struct Region {
    gpa: u64,
    size: usize,
    host: NonNull<u8>,
    fd: OwnedFd,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` are exactly what mmap returned for this
        // region, and the mapping is unmapped only here, once, when the last
        // `GuestMemory` clone (and so every queue holding pointers into it)
        // is gone.
        if let Err(e) = unsafe { munmap(self.host.cast(), self.size) } {
            log::warn!("munmap of guest memory region failed: {e}");
        }
    }
}

struct Inner {
    regions: Vec<Region>,
    /// Per region: offset of the first unallocated byte; then the region the
    /// next allocation tries first (allocations rotate over the regions).
    alloc: Mutex<(Vec<usize>, usize)>,
}

// SAFETY: `Inner` owns its mappings and fds; the raw pointers are not tied to
// any thread. The mapped bytes are shared memory that another process writes
// concurrently anyway, and every access goes through raw pointers with
// `read`/`write`-style copies or atomics, never through Rust references, so
// sharing `Inner` between threads adds no aliasing that does not already
// exist with the backend.
unsafe impl Send for Inner {}
// SAFETY: see `Send` above; the allocator state is behind a mutex.
unsafe impl Sync for Inner {}

/// memfd-backed guest memory, cheap to clone (the mapping is shared and lives
/// until the last clone is dropped).
#[derive(Clone)]
pub struct GuestMemory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.regions()).finish()
    }
}

impl GuestMemory {
    /// Create `size` bytes of guest memory split into `regions` memfd regions
    /// of equal size (each rounded down to whole pages), the first at
    /// [`GUEST_PHYS_BASE`], each following one [`REGION_GAP`] after the end of
    /// the previous one.
    pub fn new(size: usize, regions: usize) -> Result<Self, GuestError> {
        if regions == 0 || regions > MAX_REGIONS {
            return Err(GuestError::InvalidConfig(format!(
                "mem_regions must be 1..={MAX_REGIONS}, not {regions}"
            )));
        }
        let region_size = (size / regions) & !(PAGE - 1);
        let len = NonZeroUsize::new(region_size).ok_or_else(|| {
            GuestError::InvalidConfig(format!(
                "mem_size {size} is too small for {regions} region(s)"
            ))
        })?;
        let name: &CStr = c"vioswitch-guest";
        let mut out = Vec::with_capacity(regions);
        let mut gpa = GUEST_PHYS_BASE;
        for _ in 0..regions {
            let fd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC)?;
            nix::unistd::ftruncate(&fd, region_size as libc::off_t)?;
            // SAFETY: a fresh shared mapping of a file we just sized to `len`
            // bytes, at an address of the kernel's choosing, so it overlaps
            // nothing that Rust code owns. It is unmapped in `Region::drop`.
            let host = unsafe {
                mmap(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    &fd,
                    0,
                )
            }?;
            out.push(Region {
                gpa,
                size: region_size,
                host: host.cast(),
                fd,
            });
            gpa += region_size as u64 + REGION_GAP;
        }
        Ok(GuestMemory {
            inner: Arc::new(Inner {
                regions: out,
                alloc: Mutex::new((vec![0; regions], 0)),
            }),
        })
    }

    /// Guest-physical address of the first byte of guest memory.
    pub fn base(&self) -> u64 {
        GUEST_PHYS_BASE
    }

    /// Total bytes of guest memory (holes not counted).
    pub fn size(&self) -> usize {
        self.inner.regions.iter().map(|r| r.size).sum()
    }

    /// First guest-physical address past the last region: never mapped.
    pub fn end(&self) -> u64 {
        self.inner
            .regions
            .last()
            .map_or(GUEST_PHYS_BASE, |r| r.gpa + r.size as u64)
    }

    /// The regions, in guest-physical order.
    pub fn regions(&self) -> impl Iterator<Item = RegionInfo> + '_ {
        self.inner.regions.iter().map(|r| RegionInfo {
            guest_phys_addr: r.gpa,
            size: r.size,
            host_addr: r.host.as_ptr() as u64,
        })
    }

    /// The region table as SET_MEM_TABLE / ADD_MEM_REG want it. The fds stay
    /// owned by this object and must not be closed by the caller.
    // The struct has more fields with vhost's `xen` feature.
    #[allow(clippy::needless_update)]
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.inner
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size as u64,
                userspace_addr: r.host.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: r.fd.as_raw_fd(),
                ..Default::default()
            })
            .collect()
    }

    /// Whether `[gpa, gpa + len)` lies inside a single region.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        self.translate(gpa, len).is_some()
    }

    /// Where `[gpa, gpa + len)` is mapped in this process, if it lies inside a
    /// single region.
    pub fn host_addr(&self, gpa: u64, len: usize) -> Option<u64> {
        self.translate(gpa, len).map(|p| p.as_ptr() as u64)
    }

    /// Pointer to `gpa` in this process, checked to have `len` mapped bytes.
    pub(crate) fn translate(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let r = self
            .inner
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size as u64)?;
        let off = (gpa - r.gpa) as usize;
        if len > r.size - off {
            return None;
        }
        // SAFETY: `off < r.size`, so the result stays inside the mapping.
        Some(unsafe { r.host.add(off) })
    }

    fn checked(&self, gpa: u64, len: usize) -> Result<NonNull<u8>, GuestError> {
        self.translate(gpa, len)
            .ok_or(GuestError::BadAddress { addr: gpa, len })
    }

    /// Copy `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        let dst = self.checked(gpa, data.len())?;
        // SAFETY: `dst` has `data.len()` mapped, writable bytes (checked
        // above); the mapping is shared memory that no Rust reference points
        // into, so it cannot overlap `data` as seen by the borrow checker,
        // and any byte pattern is valid there.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.as_ptr(), data.len()) };
        Ok(())
    }

    /// Copy guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let src = self.checked(gpa, buf.len())?;
        // SAFETY: `src` has `buf.len()` mapped bytes (checked above); `buf`
        // is our own memory, distinct from the mapping; u8 has no invalid
        // values, so even bytes the backend changes meanwhile are fine.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// `len` bytes of guest memory at `gpa`.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Result<Vec<u8>, GuestError> {
        let mut v = vec![0; len];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Set `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), GuestError> {
        let dst = self.checked(gpa, len)?;
        // SAFETY: `dst` has `len` mapped, writable bytes (checked above).
        unsafe { std::ptr::write_bytes(dst.as_ptr(), byte, len) };
        Ok(())
    }

    /// Allocate `len` zeroed bytes (cache-line aligned) that lie within one
    /// region, for buffers and scratch data. Allocations rotate over the
    /// regions so that a multi-region guest spreads rings and buffers over all
    /// of them. Memory is never freed before the `GuestMemory` is dropped.
    pub fn alloc(&self, len: usize) -> Result<u64, GuestError> {
        self.alloc_aligned(len, ALLOC_ALIGN)
    }

    /// [`alloc`](Self::alloc) with an explicit power-of-two alignment.
    pub fn alloc_aligned(&self, len: usize, align: usize) -> Result<u64, GuestError> {
        if !align.is_power_of_two() {
            return Err(GuestError::InvalidConfig(format!(
                "alignment {align} is not a power of two"
            )));
        }
        let regions = &self.inner.regions;
        let gpa = {
            let mut guard = self
                .inner
                .alloc
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (next, turn) = &mut *guard;
            let n = regions.len();
            let mut found = None;
            for k in 0..n {
                let i = (*turn + k) % n;
                let start = next[i].next_multiple_of(align);
                if start <= regions[i].size && len <= regions[i].size - start {
                    next[i] = start + len;
                    *turn = (i + 1) % n;
                    found = Some(regions[i].gpa + start as u64);
                    break;
                }
            }
            found.ok_or(GuestError::OutOfMemory(len))?
        };
        self.fill(gpa, len, 0)?;
        Ok(gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_region_layout_and_io() {
        let m = GuestMemory::new(1 << 20, 1).unwrap();
        assert_eq!(m.base(), GUEST_PHYS_BASE);
        assert_eq!(m.size(), 1 << 20);
        assert_eq!(m.end(), GUEST_PHYS_BASE + (1 << 20));
        assert!(m.contains(GUEST_PHYS_BASE, 1 << 20));
        assert!(!m.contains(GUEST_PHYS_BASE, (1 << 20) + 1));
        assert!(!m.contains(GUEST_PHYS_BASE - 1, 1));
        assert!(!m.contains(0, 1));
        m.write(GUEST_PHYS_BASE + 100, b"hello").unwrap();
        assert_eq!(m.read_vec(GUEST_PHYS_BASE + 100, 5).unwrap(), b"hello");
        assert!(matches!(
            m.write(m.end() - 2, b"abc"),
            Err(GuestError::BadAddress { .. })
        ));
        let r = m.vhost_regions();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].guest_phys_addr, GUEST_PHYS_BASE);
        assert_eq!(
            r[0].userspace_addr,
            m.host_addr(GUEST_PHYS_BASE, 1).unwrap()
        );
        assert_ne!(r[0].userspace_addr, GUEST_PHYS_BASE);
    }

    #[test]
    fn regions_have_holes_and_allocations_rotate() {
        let m = GuestMemory::new(3 << 20, 3).unwrap();
        let regs: Vec<_> = m.regions().collect();
        assert_eq!(regs.len(), 3);
        for w in regs.windows(2) {
            assert_eq!(
                w[1].guest_phys_addr,
                w[0].guest_phys_addr + w[0].size as u64 + REGION_GAP
            );
        }
        // The hole is not memory; a range straddling a region end is refused.
        let hole = regs[0].guest_phys_addr + regs[0].size as u64;
        assert!(!m.contains(hole, 1));
        assert!(!m.contains(hole - 4, 8));
        let a = m.alloc(100).unwrap();
        let b = m.alloc(100).unwrap();
        let c = m.alloc(100).unwrap();
        let d = m.alloc(100).unwrap();
        assert_eq!(a, regs[0].guest_phys_addr);
        assert_eq!(b, regs[1].guest_phys_addr);
        assert_eq!(c, regs[2].guest_phys_addr);
        assert_eq!(d, regs[0].guest_phys_addr + 128);
        // Too big for any region.
        assert!(matches!(m.alloc(2 << 20), Err(GuestError::OutOfMemory(_))));
        // Allocations are zeroed even if the memory was written before.
        m.fill(regs[1].guest_phys_addr + 128, 64, 0xff).unwrap();
        let e = m.alloc_aligned(64, 128).unwrap();
        assert_eq!(e, regs[1].guest_phys_addr + 128);
        assert_eq!(m.read_vec(e, 64).unwrap(), vec![0; 64]);
    }

    #[test]
    fn bad_configs() {
        assert!(GuestMemory::new(1 << 20, 0).is_err());
        assert!(GuestMemory::new(4096, 2).is_err());
        assert!(GuestMemory::new(1 << 20, MAX_REGIONS + 1).is_err());
    }
}
