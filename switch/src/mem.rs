//! Guest memory as the dataplane sees it: the frontend's regions mapped into
//! this process, with fast translation of guest-physical addresses (found in
//! descriptors) and frontend-virtual addresses (found in `SET_VRING_ADDR`) to
//! host pointers.
//!
//! The mappings are owned by vm-memory's [`MmapRegion`]; this module only
//! keeps a small table next to them so that a translation is a short linear
//! scan with no trait dispatch. A [`GuestMemory`] is immutable: a memory table
//! change builds a new one, and the worker swaps its `Arc` between batches.

use std::fs::File;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

use crate::mem_fault::Registration;

/// Most regions a frontend may register (QEMU uses a handful; `GET_MAX_MEM_SLOTS`).
pub const MAX_REGIONS: usize = 32;
/// Most guest memory one port may map (1 TiB): the daemon's address space
/// is shared by every port.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

/// Errors building guest memory from a frontend's table.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory region {index} is empty or its guest-physical range wraps")]
    BadRange { index: usize },
    #[error("memory regions {a} and {b} overlap in guest-physical space")]
    Overlap { a: usize, b: usize },
    #[error("more than {MAX_REGIONS} memory regions")]
    TooManyRegions,
    #[error("guest memory over {MAX_GUEST_MEMORY} bytes")]
    TooMuchMemory,
    #[error("cannot map memory region {index} (size {size:#x}, offset {offset:#x}): {source}")]
    Map {
        index: usize,
        size: u64,
        offset: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("no memory region at guest-physical address {0:#x}")]
    NotFound(u64),
    #[error("memory region {index} needs {needed:#x} bytes of its file, which has {size:#x}")]
    FileTooSmall {
        index: usize,
        needed: u64,
        size: u64,
    },
}

/// One region of the frontend's memory table, before mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the frontend has the region in its own address space.
    pub user_addr: u64,
    /// Offset of the region in the file descriptor.
    pub mmap_offset: u64,
}

/// A guest mapping, registered with the SIGBUS guard for its lifetime.
struct Mapping {
    // Dropped before `_map`: the registration goes before the mapping.
    guard: Option<Registration>,
    _map: MmapRegion,
}

/// A mapped region.
struct Region {
    spec: RegionSpec,
    /// Host address of the region's first byte.
    host: *mut u8,
    /// Keeps the mapping alive; `host` points into it.
    _map: Arc<Mapping>,
}

/// The guest memory of one port: an immutable set of mapped regions.
///
/// Invariant: regions do not overlap in guest-physical space, and each
/// `host` pointer is valid for `spec.size` bytes for as long as this value
/// lives (the mapping is owned by `_map`).
pub struct GuestMemory {
    regions: Vec<Region>,
}

// SAFETY: the raw pointers point into mappings owned by `Arc<MmapRegion>`s that
// live as long as the `GuestMemory`; nothing in it is tied to a thread.
unsafe impl Send for GuestMemory {}
// SAFETY: `GuestMemory` is immutable after construction; shared access only
// reads the table. Accesses to the guest bytes themselves go through raw
// pointers whose users synchronise through the virtio ring protocol.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.regions.iter().map(|r| r.spec))
            .finish()
    }
}

impl GuestMemory {
    /// Memory with no region: every translation fails.
    pub fn empty() -> Self {
        GuestMemory {
            regions: Vec::new(),
        }
    }

    /// Map the regions of a `SET_MEM_TABLE`.
    pub fn from_table(regions: Vec<(RegionSpec, File)>) -> Result<Self, MemoryError> {
        let mut mem = GuestMemory::empty();
        for (spec, file) in regions {
            mem = mem.with_region(spec, Arc::new(file))?;
        }
        Ok(mem)
    }

    /// A copy of this memory with one more region (`ADD_MEM_REG`).
    pub fn with_region(&self, spec: RegionSpec, file: Arc<File>) -> Result<Self, MemoryError> {
        let index = self.regions.len();
        if index >= MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        let end = spec.guest_phys_addr.checked_add(spec.size);
        if spec.size == 0 || end.is_none() || usize::try_from(spec.size).is_err() {
            return Err(MemoryError::BadRange { index });
        }
        let mapped: u64 = self.regions.iter().map(|r| r.spec.size).sum();
        if mapped.saturating_add(spec.size) > MAX_GUEST_MEMORY {
            return Err(MemoryError::TooMuchMemory);
        }
        for (i, r) in self.regions.iter().enumerate() {
            let a = &r.spec;
            if spec.guest_phys_addr < a.guest_phys_addr + a.size
                && a.guest_phys_addr < spec.guest_phys_addr + spec.size
            {
                return Err(MemoryError::Overlap { a: i, b: index });
            }
        }
        let map_err = |source| MemoryError::Map {
            index,
            size: spec.size,
            offset: spec.mmap_offset,
            source,
        };
        let io_err = |e| map_err(vm_memory::mmap::MmapRegionError::Mmap(e));
        // Pages past the end of the file would fault on first touch.
        let file_size = file.metadata().map_err(io_err)?.len();
        let needed = spec.mmap_offset.saturating_add(spec.size);
        if needed > file_size {
            return Err(MemoryError::FileTooSmall {
                index,
                needed,
                size: file_size,
            });
        }
        let dup = file.try_clone().map_err(io_err)?;
        let map = MmapRegion::from_file(FileOffset::new(dup, spec.mmap_offset), spec.size as usize)
            .map_err(map_err)?;
        let host = map.as_ptr();
        let guard = crate::mem_fault::register(host, map.size());
        let map = Mapping { guard, _map: map };
        let mut regions: Vec<Region> = self
            .regions
            .iter()
            .map(|r| Region {
                spec: r.spec,
                host: r.host,
                _map: r._map.clone(),
            })
            .collect();
        regions.push(Region {
            spec,
            host,
            _map: Arc::new(map),
        });
        Ok(GuestMemory { regions })
    }

    /// A copy of this memory without the region at `guest_phys_addr` (`REM_MEM_REG`).
    pub fn without_region(&self, guest_phys_addr: u64, size: u64) -> Result<Self, MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.spec.guest_phys_addr == guest_phys_addr && r.spec.size == size)
            .ok_or(MemoryError::NotFound(guest_phys_addr))?;
        let regions = self
            .regions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, r)| Region {
                spec: r.spec,
                host: r.host,
                _map: r._map.clone(),
            })
            .collect();
        Ok(GuestMemory { regions })
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Whether the frontend truncated a region's file under us (see
    /// [`crate::mem_fault`]): the port must stop.
    #[inline]
    pub fn faulted(&self) -> bool {
        self.regions
            .iter()
            .any(|r| r._map.guard.as_ref().is_some_and(Registration::faulted))
    }

    /// Host pointer for `len` bytes at guest-physical `gpa`, if the whole range
    /// lies in one region. `len` may be 0.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.spec.guest_phys_addr);
            if gpa >= r.spec.guest_phys_addr && off <= r.spec.size && len <= r.spec.size - off {
                // `off + len <= size`, so the pointer stays inside the mapping.
                return Some(r.host.wrapping_add(off as usize));
            }
        }
        None
    }

    /// Host pointer for `len` bytes at the frontend's virtual address `uva`
    /// (the addresses of `SET_VRING_ADDR`).
    pub fn translate_user(&self, uva: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            let off = uva.wrapping_sub(r.spec.user_addr);
            if uva >= r.spec.user_addr && off <= r.spec.size && len <= r.spec.size - off {
                return Some(r.host.wrapping_add(off as usize));
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// A memfd of `size` bytes.
    pub(crate) fn memfd(size: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(
            c"vioswitch-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        let f = File::from(fd);
        f.set_len(size).expect("truncate");
        f
    }

    fn spec(gpa: u64, size: u64, uva: u64, off: u64) -> RegionSpec {
        RegionSpec {
            guest_phys_addr: gpa,
            size,
            user_addr: uva,
            mmap_offset: off,
        }
    }

    #[test]
    fn translates_inside_regions_only() {
        let mut f = memfd(0x3000);
        f.seek(SeekFrom::Start(0x1000)).unwrap();
        f.write_all(b"hello").unwrap();
        let mem = GuestMemory::from_table(vec![(spec(0x10_0000, 0x2000, 0x7000_0000, 0x1000), f)])
            .unwrap();
        let p = mem.translate(0x10_0000, 5).unwrap();
        // SAFETY: p points at 5 mapped bytes (translate checked the range).
        let got = unsafe { std::slice::from_raw_parts(p, 5) };
        assert_eq!(got, b"hello");
        assert!(mem.translate(0x10_0000, 0x2000).is_some());
        assert!(mem.translate(0x10_0000, 0x2001).is_none());
        assert!(mem.translate(0x10_1fff, 2).is_none());
        assert!(mem.translate(0x0f_ffff, 1).is_none());
        assert!(mem.translate(u64::MAX, 1).is_none());
        assert!(mem.translate(0x10_2000, 0).is_some());
        assert_eq!(mem.translate_user(0x7000_0000, 5), Some(p));
        assert!(mem.translate_user(0x6fff_ffff, 1).is_none());
    }

    #[test]
    fn rejects_overlap_empty_and_wrapping_regions() {
        let mem =
            GuestMemory::from_table(vec![(spec(0x1000, 0x1000, 0, 0), memfd(0x1000))]).unwrap();
        let f = Arc::new(memfd(0x1000));
        assert!(matches!(
            mem.with_region(spec(0x1800, 0x1000, 0, 0), f.clone()),
            Err(MemoryError::Overlap { .. })
        ));
        assert!(matches!(
            mem.with_region(spec(0x8000, 0, 0, 0), f.clone()),
            Err(MemoryError::BadRange { .. })
        ));
        assert!(matches!(
            mem.with_region(spec(u64::MAX - 10, 0x1000, 0, 0), f.clone()),
            Err(MemoryError::BadRange { .. })
        ));
        let two = mem.with_region(spec(0x2000, 0x1000, 0, 0), f).unwrap();
        assert_eq!(two.region_count(), 2);
        let one = two.without_region(0x1000, 0x1000).unwrap();
        assert!(one.translate(0x1000, 1).is_none());
        assert!(one.translate(0x2000, 1).is_some());
        assert!(one.without_region(0x5000, 0x1000).is_err());
    }
}
