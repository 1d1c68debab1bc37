//! Split virtqueue access for the device side, written for the hot path.
//!
//! A [`Vring`] is owned by exactly one dataplane worker. It reads the avail
//! ring and descriptors the guest wrote and writes used entries, all through
//! host pointers into the guest's shared memory (see [`crate::mem`]). Used
//! entries are written in place and published once per batch
//! ([`Vring::publish_used`]), and notifications follow `VIRTIO_RING_F_EVENT_IDX`
//! when it was negotiated.
//!
//! Nothing the guest writes is trusted: an avail index that runs ahead by more
//! than the queue size or a head index out of range breaks the ring (the
//! caller stops polling it and reports the port), and a malformed descriptor
//! chain is reported as a [`ChainError`] so the caller can count the drop and
//! return the chain with length 0.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::mem::GuestMemory;

/// Descriptor flag: the buffer continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want kicks.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Avail ring flag: the driver does not want interrupts.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Largest queue size the spec allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most descriptors one chain may have before it counts as a loop or abuse.
pub const MAX_CHAIN_SEGS: usize = 64;

/// Ring addresses as the frontend gave them (its own virtual addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Why a ring could not be set up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingSetupError {
    #[error("queue size {0} is not a power of two between 1 and {MAX_QUEUE_SIZE}")]
    BadSize(u16),
    #[error("the {0} ring is misaligned")]
    Misaligned(&'static str),
    #[error("the {0} ring is not inside guest memory")]
    OutOfMemory(&'static str),
}

/// Why a ring is broken and no longer polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    #[error("avail index jumped {0} entries ahead (queue size {1})")]
    AvailJump(u16, u16),
    #[error("avail ring entry names descriptor {0}, queue size {1}")]
    HeadOutOfRange(u16, u16),
}

/// Why one descriptor chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index past the table.
    NextOutOfRange,
    /// More descriptors than [`MAX_CHAIN_SEGS`] (or a loop).
    TooLong,
    /// A buffer outside guest memory.
    BadAddress,
    /// A buffer of the wrong direction (device-writable where readable is required, or the reverse).
    WrongDirection,
    /// An indirect descriptor (the feature is not offered).
    Indirect,
    /// Total length over the limit the caller gave.
    TooBig,
}

/// One buffer of a chain, translated to a host pointer.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    pub ptr: *mut u8,
    pub len: u32,
    /// The device writes this buffer (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

impl Seg {
    const EMPTY: Seg = Seg {
        ptr: std::ptr::null_mut(),
        len: 0,
        writable: false,
    };
}

/// A walked descriptor chain: its buffers, in order.
pub struct Chain {
    pub head: u16,
    pub segs: [Seg; MAX_CHAIN_SEGS],
    pub nsegs: usize,
    pub total: u32,
}

impl Chain {
    pub fn new() -> Self {
        Chain {
            head: 0,
            segs: [Seg::EMPTY; MAX_CHAIN_SEGS],
            nsegs: 0,
            total: 0,
        }
    }

    /// The buffers walked.
    #[inline]
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..self.nsegs]
    }
}

// SAFETY: a `Chain` is scratch space: its pointers are a view into guest
// memory valid only during the batch that walked it, and they are never
// dereferenced after that batch. Moving the (stale) values across threads,
// as a worker's scratch space moves into its thread, is harmless.
unsafe impl Send for Chain {}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

/// Which direction a chain's buffers must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Driver-written (TX): no `WRITE` flag.
    Readable,
    /// Device-written (RX): every descriptor has `WRITE`.
    Writable,
    /// Driver-written buffers, then device-written ones (a block request).
    Mixed,
}

/// The device side of one split virtqueue.
///
/// Invariant: `desc`, `avail` and `used` point into `mem`'s mappings, cover
/// the whole ring areas for `size` entries and are suitably aligned (checked
/// by [`Vring::new`]); `mem` keeps them alive.
pub struct Vring {
    size: u16,
    mask: u16,
    desc: *const u8,
    avail: *mut u8,
    used: *mut u8,
    addrs: RingAddrs,
    mem: Arc<GuestMemory>,
    event_idx: bool,
    /// Next avail entry to read.
    next_avail: u16,
    /// `avail.idx` as last read. Entries up to it are known to be there, so
    /// the guest's cache line is read again only when they are used up.
    avail_cached: u16,
    /// Next used entry to write (published with `publish_used`).
    next_used: u16,
    /// `used.idx` as last published.
    published_used: u16,
    /// `used.idx` when the guest was last signalled, for EVENT_IDX.
    signalled_used: u16,
    call: Option<EventFd>,
}

// SAFETY: the raw pointers point into guest memory owned by `mem`, which is
// `Send + Sync`; a `Vring` is used by one thread at a time (its worker).
unsafe impl Send for Vring {}

impl Vring {
    /// Set up a ring of `size` entries at `addrs` (frontend-virtual), starting
    /// at avail index `base`.
    pub fn new(
        mem: Arc<GuestMemory>,
        size: u16,
        addrs: RingAddrs,
        base: u16,
        event_idx: bool,
        call: Option<EventFd>,
    ) -> Result<Self, RingSetupError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(RingSetupError::BadSize(size));
        }
        let mut ring = Vring {
            size,
            mask: size - 1,
            desc: std::ptr::null(),
            avail: std::ptr::null_mut(),
            used: std::ptr::null_mut(),
            addrs,
            mem: Arc::new(GuestMemory::empty()),
            event_idx,
            next_avail: base,
            avail_cached: base,
            next_used: 0,
            published_used: 0,
            signalled_used: 0,
            call,
        };
        ring.remap(mem)?;
        let used_idx = ring.used_idx_in_memory();
        ring.next_used = used_idx;
        ring.published_used = used_idx;
        ring.signalled_used = used_idx;
        Ok(ring)
    }

    /// Point the ring at a new memory table (after `SET_MEM_TABLE` or a region change).
    pub fn remap(&mut self, mem: Arc<GuestMemory>) -> Result<(), RingSetupError> {
        let n = u64::from(self.size);
        let a = self.addrs;
        if a.desc % 16 != 0 {
            return Err(RingSetupError::Misaligned("descriptor"));
        }
        if a.avail % 2 != 0 {
            return Err(RingSetupError::Misaligned("avail"));
        }
        if a.used % 4 != 0 {
            return Err(RingSetupError::Misaligned("used"));
        }
        let desc = mem
            .translate_user(a.desc, 16 * n)
            .ok_or(RingSetupError::OutOfMemory("descriptor"))?;
        let avail = mem
            .translate_user(a.avail, 6 + 2 * n)
            .ok_or(RingSetupError::OutOfMemory("avail"))?;
        let used = mem
            .translate_user(a.used, 6 + 8 * n)
            .ok_or(RingSetupError::OutOfMemory("used"))?;
        // The frontend's addresses were aligned; the host pointers must be
        // too (a region's user_addr is the frontend's word, not checked).
        if (desc as usize) % 16 != 0 {
            return Err(RingSetupError::Misaligned("descriptor"));
        }
        if (avail as usize) % 2 != 0 {
            return Err(RingSetupError::Misaligned("avail"));
        }
        if (used as usize) % 4 != 0 {
            return Err(RingSetupError::Misaligned("used"));
        }
        self.desc = desc;
        self.avail = avail;
        self.used = used;
        self.mem = mem;
        Ok(())
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next avail index to consume: what `GET_VRING_BASE` reports once stopped.
    #[inline]
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    #[inline]
    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: `avail + 2` is inside the avail ring (checked in `remap`) and
        // 2-aligned (avail is 2-aligned); AtomicU16 has the layout of u16.
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
    }

    #[inline]
    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: `used + 2` is inside the used ring and 2-aligned (used is 4-aligned).
        unsafe { &*(self.used.add(2) as *const AtomicU16) }
    }

    fn used_idx_in_memory(&self) -> u16 {
        u16::from_le(self.used_idx_atomic().load(Ordering::Acquire))
    }

    /// How many avail entries wait to be consumed. Reads the guest's index
    /// only when the entries seen last time are used up.
    #[inline]
    pub fn avail_pending(&mut self) -> Result<u16, RingFault> {
        let n = self.avail_cached.wrapping_sub(self.next_avail);
        if n != 0 {
            return Ok(n);
        }
        self.refresh_avail()
    }

    /// Avail entries known to be there without reading the guest's index.
    #[inline]
    pub fn cached_pending(&self) -> u16 {
        self.avail_cached.wrapping_sub(self.next_avail)
    }

    /// Start bringing in the descriptor and the first buffer line of the next
    /// avail entry, if it is known to be there, without consuming it: when it
    /// is taken, everything is read again (from cache), so a guest rewriting
    /// it meanwhile changes nothing.
    #[inline]
    pub fn prefetch_next(&self) {
        if self.cached_pending() == 0 {
            return;
        }
        let slot = usize::from(self.next_avail & self.mask);
        // SAFETY: slot < size: inside the avail ring (checked in `remap`).
        let head = u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
        });
        if head >= self.size {
            return;
        }
        let (addr, len, _, _) = self.read_desc(head);
        if let Some(p) = self.mem.translate(addr, u64::from(len.min(64))) {
            crate::cpu::prefetch_for_write(p);
        }
    }

    /// Read the guest's avail index.
    #[inline]
    fn refresh_avail(&mut self) -> Result<u16, RingFault> {
        let idx = u16::from_le(self.avail_idx_atomic().load(Ordering::Acquire));
        let n = idx.wrapping_sub(self.next_avail);
        if n > self.size {
            return Err(RingFault::AvailJump(n, self.size));
        }
        self.avail_cached = idx;
        Ok(n)
    }

    /// Take the next avail head. The caller checked `avail_pending() > 0`.
    #[inline]
    pub fn pop_head(&mut self) -> Result<u16, RingFault> {
        let slot = usize::from(self.next_avail & self.mask);
        // SAFETY: slot < size, and avail ring entries 0..size lie at avail+4+2*slot
        // inside the avail ring (checked in `remap`); read_volatile because the
        // guest shares the memory.
        let head = u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(4 + 2 * slot) as *const u16)
        });
        if head >= self.size {
            return Err(RingFault::HeadOutOfRange(head, self.size));
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(head)
    }

    /// Give back the last popped head (it could not be served now).
    #[inline]
    pub fn unpop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    #[inline]
    fn read_desc(&self, index: u16) -> (u64, u32, u16, u16) {
        // SAFETY: index < size (callers check), so the 16 bytes at desc+16*index
        // are inside the descriptor table, and `desc` is 16-aligned (checked
        // in `remap`), so each field is naturally aligned; volatile reads of a
        // guest-shared table.
        unsafe {
            let p = self.desc.add(16 * usize::from(index));
            let addr = std::ptr::read_volatile(p as *const u64);
            let len = std::ptr::read_volatile(p.add(8) as *const u32);
            let flags = std::ptr::read_volatile(p.add(12) as *const u16);
            let next = std::ptr::read_volatile(p.add(14) as *const u16);
            (
                u64::from_le(addr),
                u32::from_le(len),
                u16::from_le(flags),
                u16::from_le(next),
            )
        }
    }

    /// Walk the chain at `head` into `out`, checking every descriptor.
    ///
    /// `max_total` bounds the sum of lengths. Zero-length descriptors are
    /// skipped but still count towards the chain length limit.
    #[inline]
    pub fn walk(
        &self,
        head: u16,
        dir: Direction,
        max_total: u32,
        out: &mut Chain,
    ) -> Result<(), ChainError> {
        out.head = head;
        out.nsegs = 0;
        out.total = 0;
        let mut index = head;
        let mut hops = 0usize;
        let mut seen_writable = false;
        loop {
            let (addr, len, flags, next) = self.read_desc(index);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let writable = flags & VIRTQ_DESC_F_WRITE != 0;
            let direction_ok = match dir {
                Direction::Readable => !writable,
                Direction::Writable => writable,
                // Readable buffers all come before writable ones.
                Direction::Mixed => writable || !seen_writable,
            };
            if !direction_ok {
                return Err(ChainError::WrongDirection);
            }
            seen_writable |= writable;
            if len > 0 {
                let total = out.total.checked_add(len).ok_or(ChainError::TooBig)?;
                if total > max_total {
                    return Err(ChainError::TooBig);
                }
                let ptr = self
                    .mem
                    .translate(addr, u64::from(len))
                    .ok_or(ChainError::BadAddress)?;
                out.segs[out.nsegs] = Seg { ptr, len, writable };
                out.nsegs += 1;
                out.total = total;
            }
            hops += 1;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if hops >= MAX_CHAIN_SEGS || hops >= usize::from(self.size) {
                return Err(ChainError::TooLong);
            }
            if next >= self.size {
                return Err(ChainError::NextOutOfRange);
            }
            index = next;
        }
    }

    /// Write a used entry (not yet visible to the guest).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used & self.mask);
        // SAFETY: slot < size; used ring entries lie at used+4+8*slot, inside
        // the used ring (checked in `remap`), 4-aligned.
        unsafe {
            let p = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(p as *mut u32, u32::from(head).to_le());
            std::ptr::write_volatile(p.add(4) as *mut u32, len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Publish the used entries written so far and signal the guest if it
    /// asked for it. Returns whether it was signalled.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        if self.next_used == self.published_used {
            return false;
        }
        // Release: the used entries and the buffers they describe are visible
        // before the index that publishes them.
        self.used_idx_atomic()
            .store(self.next_used.to_le(), Ordering::Release);
        self.published_used = self.next_used;
        if self.needs_notification() {
            self.signal();
            true
        } else {
            false
        }
    }

    fn needs_notification(&mut self) -> bool {
        // The guest's used_event / flags must be read after the used index is
        // visible (virtio spec 2.7.10): full fence.
        fence(Ordering::SeqCst);
        let new = self.published_used;
        if self.event_idx {
            let old = self.signalled_used;
            // SAFETY: used_event sits after the avail ring entries, inside the
            // 6+2*size bytes checked in `remap`; 2-aligned.
            let event = u16::from_le(unsafe {
                std::ptr::read_volatile(self.avail.add(4 + 2 * usize::from(self.size)) as *const u16)
            });
            self.signalled_used = new;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: avail.flags is the first u16 of the avail ring.
            let flags = u16::from_le(unsafe { std::ptr::read_volatile(self.avail as *const u16) });
            flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Replace the eventfd used to signal the guest.
    pub fn set_call(&mut self, call: Option<EventFd>) {
        self.call = call;
    }

    /// Signal the guest unconditionally (NOTIFY_ON_EMPTY, or after a fault).
    pub fn signal(&self) {
        if let Some(call) = &self.call {
            // A full eventfd counter only means an interrupt is already pending.
            let _ = call.write(1);
        }
    }

    /// Ask the guest to kick us when it adds buffers. The caller must check
    /// `avail_pending()` again afterwards, or a buffer added meanwhile is missed.
    pub fn enable_notification(&mut self) {
        if self.event_idx {
            let slot = 4 + 8 * usize::from(self.size);
            // SAFETY: avail_event sits after the used ring entries, inside the
            // 6+8*size bytes checked in `remap`; 2-aligned.
            unsafe {
                std::ptr::write_volatile(self.used.add(slot) as *mut u16, self.next_avail.to_le())
            };
        } else {
            // SAFETY: used.flags is the first u16 of the used ring.
            unsafe { std::ptr::write_volatile(self.used as *mut u16, 0) };
        }
        fence(Ordering::SeqCst);
    }

    /// Tell the guest not to kick (best effort: with EVENT_IDX the stale
    /// avail_event already keeps it quiet).
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            // SAFETY: used.flags is the first u16 of the used ring.
            unsafe {
                std::ptr::write_volatile(self.used as *mut u16, VIRTQ_USED_F_NO_NOTIFY.to_le())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::tests::memfd;
    use crate::mem::RegionSpec;

    const GPA: u64 = 0x4000_0000;
    const UVA: u64 = 0x7f00_0000_0000;
    const SIZE: u16 = 8;

    struct Guest {
        mem: Arc<GuestMemory>,
    }

    impl Guest {
        fn new() -> Self {
            let f = memfd(0x10000);
            let mem = GuestMemory::from_table(vec![(
                RegionSpec {
                    guest_phys_addr: GPA,
                    size: 0x10000,
                    user_addr: UVA,
                    mmap_offset: 0,
                },
                f,
            )])
            .unwrap();
            Guest { mem: Arc::new(mem) }
        }
        fn ptr(&self, gpa: u64) -> *mut u8 {
            self.mem.translate(gpa, 1).unwrap()
        }
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let p = self.ptr(GPA + 16 * u64::from(i));
            // SAFETY: test memory, inside the mapping.
            unsafe {
                (p as *mut u64).write_unaligned(addr);
                (p.add(8) as *mut u32).write_unaligned(len);
                (p.add(12) as *mut u16).write_unaligned(flags);
                (p.add(14) as *mut u16).write_unaligned(next);
            }
        }
        fn avail(&self, slot: u16, head: u16, idx: u16) {
            let p = self.ptr(GPA + 0x1000);
            // SAFETY: test memory, inside the mapping.
            unsafe {
                (p.add(4 + 2 * usize::from(slot)) as *mut u16).write(head);
                (p.add(2) as *mut u16).write(idx);
            }
        }
        fn used(&self, slot: u16) -> (u32, u32, u16) {
            let p = self.ptr(GPA + 0x2000);
            // SAFETY: test memory, inside the mapping.
            unsafe {
                (
                    (p.add(4 + 8 * usize::from(slot)) as *const u32).read(),
                    (p.add(8 + 8 * usize::from(slot)) as *const u32).read(),
                    (p.add(2) as *const u16).read(),
                )
            }
        }
        fn ring(&self) -> Vring {
            let addrs = RingAddrs {
                desc: UVA,
                avail: UVA + 0x1000,
                used: UVA + 0x2000,
            };
            Vring::new(self.mem.clone(), SIZE, addrs, 0, true, None).unwrap()
        }
    }

    #[test]
    fn pops_walks_and_publishes() {
        let g = Guest::new();
        let mut r = g.ring();
        g.desc(0, GPA + 0x8000, 12, VIRTQ_DESC_F_NEXT, 3);
        g.desc(3, GPA + 0x9000, 60, 0, 0);
        g.avail(0, 0, 1);
        assert_eq!(r.avail_pending(), Ok(1));
        let head = r.pop_head().unwrap();
        let mut c = Chain::new();
        r.walk(head, Direction::Readable, 65562, &mut c).unwrap();
        assert_eq!(c.nsegs, 2);
        assert_eq!(c.total, 72);
        assert_eq!(c.segs()[1].ptr, g.ptr(GPA + 0x9000));
        r.push_used(head, 0);
        assert_eq!(g.used(0).2, 0, "not published before publish_used");
        r.publish_used();
        assert_eq!(g.used(0), (0, 0, 1));
        assert_eq!(r.next_avail(), 1);
    }

    #[test]
    fn rejects_hostile_chains() {
        let g = Guest::new();
        let r = g.ring();
        let mut c = Chain::new();
        // Outside memory.
        g.desc(0, GPA + 0xfff0, 0x20, 0, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, 1 << 20, &mut c),
            Err(ChainError::BadAddress)
        );
        // Wrong direction both ways.
        g.desc(0, GPA + 0x8000, 0x20, VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, 1 << 20, &mut c),
            Err(ChainError::WrongDirection)
        );
        g.desc(0, GPA + 0x8000, 0x20, 0, 0);
        assert_eq!(
            r.walk(0, Direction::Writable, 1 << 20, &mut c),
            Err(ChainError::WrongDirection)
        );
        // A loop.
        g.desc(0, GPA + 0x8000, 0x20, VIRTQ_DESC_F_NEXT, 1);
        g.desc(1, GPA + 0x8000, 0x20, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, 1 << 20, &mut c),
            Err(ChainError::TooLong)
        );
        // Next out of range.
        g.desc(0, GPA + 0x8000, 0x20, VIRTQ_DESC_F_NEXT, SIZE);
        assert_eq!(
            r.walk(0, Direction::Readable, 1 << 20, &mut c),
            Err(ChainError::NextOutOfRange)
        );
        // Too big, and a length that wraps u32.
        g.desc(0, GPA + 0x8000, 0x2000, 0, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, 0x1000, &mut c),
            Err(ChainError::TooBig)
        );
        g.desc(0, GPA + 0x8000, u32::MAX, 0, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, u32::MAX, &mut c),
            Err(ChainError::BadAddress)
        );
        // Indirect.
        g.desc(0, GPA + 0x8000, 0x20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            r.walk(0, Direction::Readable, 1 << 20, &mut c),
            Err(ChainError::Indirect)
        );
    }

    #[test]
    fn detects_avail_jump_and_bad_head() {
        let g = Guest::new();
        let mut r = g.ring();
        g.avail(0, 0, SIZE + 1);
        assert_eq!(r.avail_pending(), Err(RingFault::AvailJump(SIZE + 1, SIZE)));
        g.avail(0, SIZE, 1);
        assert_eq!(r.avail_pending(), Ok(1));
        assert_eq!(r.pop_head(), Err(RingFault::HeadOutOfRange(SIZE, SIZE)));
    }

    #[test]
    fn event_idx_suppresses_and_requests_signals() {
        let g = Guest::new();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let addrs = RingAddrs {
            desc: UVA,
            avail: UVA + 0x1000,
            used: UVA + 0x2000,
        };
        let mut r = Vring::new(
            g.mem.clone(),
            SIZE,
            addrs,
            0,
            true,
            Some(call.try_clone().unwrap()),
        )
        .unwrap();
        let used_event = g.ptr(GPA + 0x1000 + 4 + 2 * u64::from(SIZE)) as *mut u16;
        // The guest wants a signal after the 2nd used entry (used_event = 1).
        // SAFETY: test memory.
        unsafe { used_event.write(1) };
        r.push_used(0, 0);
        assert!(!r.publish_used());
        r.push_used(1, 0);
        assert!(r.publish_used());
        assert_eq!(call.read().unwrap(), 1);
        r.push_used(2, 0);
        assert!(!r.publish_used(), "used_event passed already");
    }

    #[test]
    fn rejects_rings_whose_host_pointers_are_misaligned() {
        // The frontend's addresses are aligned, but its region's user_addr
        // is odd, so the host pointers would not be.
        let mem = GuestMemory::from_table(vec![(
            RegionSpec {
                guest_phys_addr: GPA,
                size: 0x10000,
                user_addr: UVA + 1,
                mmap_offset: 0,
            },
            memfd(0x10000),
        )])
        .unwrap();
        let addrs = RingAddrs {
            desc: UVA + 0x10,
            avail: UVA + 0x1000,
            used: UVA + 0x2000,
        };
        assert!(matches!(
            Vring::new(Arc::new(mem), SIZE, addrs, 0, true, None),
            Err(RingSetupError::Misaligned(_))
        ));
    }

    #[test]
    fn rejects_bad_setup() {
        let g = Guest::new();
        let ok = RingAddrs {
            desc: UVA,
            avail: UVA + 0x1000,
            used: UVA + 0x2000,
        };
        assert!(matches!(
            Vring::new(g.mem.clone(), 6, ok, 0, true, None),
            Err(RingSetupError::BadSize(6))
        ));
        let bad = RingAddrs {
            used: UVA + 0x2002,
            ..ok
        };
        assert!(matches!(
            Vring::new(g.mem.clone(), SIZE, bad, 0, true, None),
            Err(RingSetupError::Misaligned(_))
        ));
        let out = RingAddrs {
            used: UVA + 0xfff0,
            ..ok
        };
        assert!(matches!(
            Vring::new(g.mem.clone(), SIZE, out, 0, true, None),
            Err(RingSetupError::OutOfMemory(_))
        ));
    }
}
