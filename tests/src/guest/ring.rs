//! Split virtqueues, driver side (virtio 1.x, section 2.7).
//!
//! A [`SplitQueue`] owns one ring in guest memory: the descriptor table, the
//! available ring (written by us) and the used ring (written by the device),
//! laid out by [`RingLayout`], plus one buffer slot per descriptor, a free
//! list of descriptors, and the kick and call eventfds.
//!
//! Shared index fields are accessed as atomics: `avail.idx` is published with
//! a Release store (after the descriptors and ring entries it covers),
//! `used.idx` is read with an Acquire load (before the used entries and
//! buffers it covers), and a SeqCst fence separates publishing from reading
//! the device's notification suppression (`avail_event` / `used.flags`), and
//! re-enabling interrupts from re-checking `used.idx`, as the spec requires.
//! Other shared fields are read and written with volatile accesses.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{GuestMemory, ALLOC_ALIGN};
use super::GuestError;

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// `used.flags`: the device asks not to be kicked (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
/// `avail.flags`: the driver asks not to be interrupted (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Largest split queue size.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESC_SIZE: usize = 16;

/// Where the three areas of one split ring of `size` entries live. The areas
/// always include the EVENT_IDX trailers (`used_event`, `avail_event`),
/// whether or not the feature is negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of entries.
    pub size: u16,
    /// Guest-physical address of the descriptor table (16 × size bytes).
    pub desc: u64,
    /// Guest-physical address of the available ring (6 + 2 × size bytes).
    pub avail: u64,
    /// Guest-physical address of the used ring (6 + 8 × size bytes), aligned
    /// to [`RingLayout::USED_ALIGN`].
    pub used: u64,
    /// Bytes from `desc` to the end of the used ring.
    pub len: usize,
}

impl RingLayout {
    /// Alignment of the used ring (the legacy requirement; 4 would do for 1.x).
    pub const USED_ALIGN: u64 = 4096;

    /// Size of the descriptor table.
    pub fn desc_bytes(size: u16) -> usize {
        DESC_SIZE * size as usize
    }

    /// Size of the available ring: flags, idx, ring\[size\], used_event.
    pub fn avail_bytes(size: u16) -> usize {
        6 + 2 * size as usize
    }

    /// Size of the used ring: flags, idx, ring\[size\] of (id, len), avail_event.
    pub fn used_bytes(size: u16) -> usize {
        6 + 8 * size as usize
    }

    /// The layout of a ring starting at `base` (which should be page aligned).
    pub fn at(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + Self::desc_bytes(size) as u64;
        let used = (avail + Self::avail_bytes(size) as u64).next_multiple_of(Self::USED_ALIGN);
        RingLayout {
            size,
            desc,
            avail,
            used,
            len: (used - base) as usize + Self::used_bytes(size),
        }
    }
}

/// The EVENT_IDX test (`vring_need_event`): whether moving an index from
/// `old` to `new` crosses `event`, i.e. the other side asked to be notified.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

const NIL: u16 = u16::MAX;

/// Free descriptors as a LIFO linked through an index array (no allocation
/// after construction).
#[derive(Debug, Clone)]
pub(crate) struct FreeList {
    next: Vec<u16>,
    head: u16,
    len: u16,
}

impl FreeList {
    /// All of `0..size` free, popped in ascending order.
    pub(crate) fn new(size: u16) -> Self {
        let next = (0..size)
            .map(|i| if i + 1 < size { i + 1 } else { NIL })
            .collect();
        FreeList {
            next,
            head: if size > 0 { 0 } else { NIL },
            len: size,
        }
    }

    pub(crate) fn pop(&mut self) -> Option<u16> {
        if self.head == NIL {
            return None;
        }
        let i = self.head;
        self.head = self.next[i as usize];
        self.len -= 1;
        Some(i)
    }

    /// Give `i` back. The caller guarantees that `i` is not already free.
    pub(crate) fn push(&mut self, i: u16) {
        self.next[i as usize] = self.head;
        self.head = i;
        self.len += 1;
    }

    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }
}

/// The buffer that belongs to one descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) gpa: u64,
    pub(crate) host: *mut u8,
    pub(crate) len: u32,
}

/// One split virtqueue as the driver sees it.
pub(crate) struct SplitQueue {
    /// Keeps the mapping that every pointer below points into alive.
    mem: GuestMemory,
    pub(crate) layout: RingLayout,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    pub(crate) event_idx: bool,
    /// Our copy of `avail.idx`, including entries not yet published.
    pub(crate) next_avail: u16,
    /// `avail.idx` at the last kick decision.
    notified_avail: u16,
    /// The next used entry to consume.
    pub(crate) last_used: u16,
    pub(crate) free: FreeList,
    /// Per head: number of descriptors of its chain while the device owns it,
    /// 0 when the driver owns it.
    pub(crate) chain: Vec<u16>,
    /// Our copy of each descriptor's `next` (the shared one may be scribbled on).
    pub(crate) next: Vec<u16>,
    pub(crate) slots: Vec<Slot>,
    interrupts: bool,
    pub(crate) kick: EventFd,
    pub(crate) call: EventFd,
    /// Device misbehaviour seen (bad used ids or lengths, bad num_buffers).
    pub(crate) errors: u64,
    /// Kicks sent.
    pub(crate) kicks: u64,
}

// SAFETY: the raw pointers point into `mem`'s mapping, which `self.mem` keeps
// alive and which is not tied to a thread (`GuestMemory` is Send + Sync). The
// queue is used through `&mut self` only, so moving it to another thread
// cannot create unsynchronised access from this process.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Allocate a ring of `size` entries and one `buf_len`-byte buffer per
    /// descriptor in `mem`. Guest interrupts start disabled.
    pub(crate) fn new(
        mem: &GuestMemory,
        size: u16,
        buf_len: u32,
        event_idx: bool,
    ) -> Result<Self, GuestError> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(GuestError::InvalidConfig(format!(
                "queue size {size} is not a power of two in 1..={MAX_QUEUE_SIZE}"
            )));
        }
        let probe = RingLayout::at(0, size);
        let base = mem.alloc_aligned(probe.len, 4096)?;
        let layout = RingLayout::at(base, size);
        let ptr = |gpa: u64, len: usize| {
            mem.translate(gpa, len)
                .map(|p| p.as_ptr())
                .ok_or(GuestError::BadAddress { addr: gpa, len })
        };
        let desc = ptr(layout.desc, RingLayout::desc_bytes(size))?;
        let avail = ptr(layout.avail, RingLayout::avail_bytes(size))?;
        let used = ptr(layout.used, RingLayout::used_bytes(size))?;
        // Buffers are aligned to their size's largest power-of-two factor
        // (64 to 4096 bytes): buffers of whole sectors or pages are then
        // sector- or page-aligned, as direct I/O in a block backend needs.
        let align = (1usize << buf_len.trailing_zeros().min(31)).clamp(ALLOC_ALIGN, 4096);
        let mut slots = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let gpa = mem.alloc_aligned(buf_len as usize, align)?;
            slots.push(Slot {
                gpa,
                host: ptr(gpa, buf_len as usize)?,
                len: buf_len,
            });
        }
        let mut q = SplitQueue {
            mem: mem.clone(),
            layout,
            desc,
            avail,
            used,
            size,
            event_idx,
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
            free: FreeList::new(size),
            chain: vec![0; size as usize],
            next: vec![0; size as usize],
            slots,
            interrupts: true,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            errors: 0,
            kicks: 0,
        };
        q.disable_interrupts();
        Ok(q)
    }

    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Descriptors the device owns (or that were handed out raw).
    pub(crate) fn in_flight(&self) -> usize {
        self.size as usize - self.free.len()
    }

    /// An atomic view of the u16 at `p`.
    fn atomic(&self, p: *mut u8) -> &AtomicU16 {
        // SAFETY: every caller passes a pointer to a 2-aligned u16 field of
        // this ring (ring areas start page/16-byte aligned and the fields sit
        // at even offsets), inside the mapping that `self.mem` keeps alive for
        // at least as long as `&self`. The field is only ever accessed
        // atomically from this process; the device accesses it atomically
        // (or with aligned 16-bit accesses, which are atomic on our targets).
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    fn avail_flags(&self) -> &AtomicU16 {
        self.atomic(self.avail)
    }

    fn avail_idx_field(&self) -> &AtomicU16 {
        // SAFETY: offset 2 of the avail ring is inside it (6 + 2n bytes).
        self.atomic(unsafe { self.avail.add(2) })
    }

    fn used_event_field(&self) -> &AtomicU16 {
        // SAFETY: used_event is the last u16 of the avail ring, at 4 + 2n.
        self.atomic(unsafe { self.avail.add(4 + 2 * self.size as usize) })
    }

    fn used_flags_field(&self) -> &AtomicU16 {
        self.atomic(self.used)
    }

    fn used_idx_field(&self) -> &AtomicU16 {
        // SAFETY: offset 2 of the used ring is inside it (6 + 8n bytes).
        self.atomic(unsafe { self.used.add(2) })
    }

    fn avail_event_field(&self) -> &AtomicU16 {
        // SAFETY: avail_event is the last u16 of the used ring, at 4 + 8n.
        self.atomic(unsafe { self.used.add(4 + 8 * self.size as usize) })
    }

    /// Write descriptor `index % size`, any values.
    pub(crate) fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = (index & (self.size - 1)) as usize;
        // SAFETY: `i < size`, so the 16 bytes at `desc + 16 i` are inside the
        // descriptor table, which is 16-byte aligned; each field is written
        // with an aligned volatile store of a plain integer. The device only
        // reads descriptors we published, and this one is ours (or the caller
        // deliberately hands the device garbage, which is the point of raw
        // access and affects only the device's view).
        unsafe {
            let d = self.desc.add(i * DESC_SIZE);
            d.cast::<u64>().write_volatile(addr.to_le());
            d.add(8).cast::<u32>().write_volatile(len.to_le());
            d.add(12).cast::<u16>().write_volatile(flags.to_le());
            d.add(14).cast::<u16>().write_volatile(next.to_le());
        }
    }

    /// Read back descriptor `index % size`: (addr, len, flags, next).
    pub(crate) fn read_desc(&self, index: u16) -> (u64, u32, u16, u16) {
        let i = (index & (self.size - 1)) as usize;
        // SAFETY: as in `write_desc`, aligned volatile loads inside the table.
        unsafe {
            let d = self.desc.add(i * DESC_SIZE);
            (
                u64::from_le(d.cast::<u64>().read_volatile()),
                u32::from_le(d.add(8).cast::<u32>().read_volatile()),
                u16::from_le(d.add(12).cast::<u16>().read_volatile()),
                u16::from_le(d.add(14).cast::<u16>().read_volatile()),
            )
        }
    }

    /// Write descriptor `id` to describe its own buffer slot, whole, with
    /// `flags`, and mark it as a one-descriptor chain owned by the device.
    /// The caller then pushes it to the avail ring.
    pub(crate) fn post_slot(&mut self, id: u16, len: u32, flags: u16) {
        let slot = self.slots[id as usize];
        self.write_desc(id, slot.gpa, len, flags, 0);
        self.chain[id as usize] = 1;
    }

    /// Put `head` in the next avail ring entry (not yet published).
    pub(crate) fn push_avail(&mut self, head: u16) {
        let i = (self.next_avail & (self.size - 1)) as usize;
        // SAFETY: `i < size`, so the u16 at `avail + 4 + 2 i` is inside the
        // avail ring and 2-aligned. The device reads entries only below the
        // published `avail.idx`, and this one is above it.
        unsafe {
            self.avail
                .add(4 + 2 * i)
                .cast::<u16>()
                .write_volatile(head.to_le())
        };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Make every pushed entry visible to the device (Release store of
    /// `avail.idx`).
    pub(crate) fn publish(&mut self) {
        self.avail_idx_field()
            .store(self.next_avail.to_le(), Ordering::Release);
    }

    /// Publish any `avail.idx` value, and make it our own idea of it too.
    pub(crate) fn set_avail_idx(&mut self, idx: u16) {
        self.next_avail = idx;
        self.publish();
    }

    /// `used.idx`, Acquire: entries below it and their buffers are visible.
    pub(crate) fn used_idx(&self) -> u16 {
        u16::from_le(self.used_idx_field().load(Ordering::Acquire))
    }

    /// Used entry at position `pos % size`: (id, len).
    pub(crate) fn used_elem(&self, pos: u16) -> (u32, u32) {
        let i = (pos & (self.size - 1)) as usize;
        // SAFETY: `i < size`, so the 8 bytes at `used + 4 + 8 i` are inside
        // the used ring, 4-aligned. Volatile loads of plain integers: a
        // concurrent device write can give a stale value, never an invalid one.
        unsafe {
            let e = self.used.add(4 + 8 * i);
            (
                u32::from_le(e.cast::<u32>().read_volatile()),
                u32::from_le(e.add(4).cast::<u32>().read_volatile()),
            )
        }
    }

    /// Used entries published but not consumed yet.
    pub(crate) fn pending(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
    }

    /// The device's `avail_event` (meaningful with EVENT_IDX).
    pub(crate) fn avail_event(&self) -> u16 {
        u16::from_le(self.avail_event_field().load(Ordering::Relaxed))
    }

    /// The device's `used.flags`.
    pub(crate) fn used_flags(&self) -> u16 {
        u16::from_le(self.used_flags_field().load(Ordering::Relaxed))
    }

    /// Our `used_event` (meaningful with EVENT_IDX).
    pub(crate) fn used_event(&self) -> u16 {
        u16::from_le(self.used_event_field().load(Ordering::Relaxed))
    }

    pub(crate) fn set_used_event(&mut self, v: u16) {
        self.used_event_field().store(v.to_le(), Ordering::Relaxed);
    }

    /// Publish the pushed entries and kick the device if it asked for it:
    /// with EVENT_IDX when `avail.idx` moved past `avail_event` since the
    /// last decision, otherwise unless `used.flags` has NO_NOTIFY. Returns
    /// whether it kicked.
    pub(crate) fn notify(&mut self) -> bool {
        self.publish();
        let (old, new) = (self.notified_avail, self.next_avail);
        if old == new {
            return false;
        }
        self.notified_avail = new;
        // Order the avail.idx store before the load of the device's
        // suppression field (the device does the mirror image).
        fence(Ordering::SeqCst);
        let wanted = if self.event_idx {
            need_event(self.avail_event(), new, old)
        } else {
            self.used_flags() & VRING_USED_F_NO_NOTIFY == 0
        };
        if wanted {
            self.kick_now();
        }
        wanted
    }

    /// Kick the device regardless of its suppression wishes.
    pub(crate) fn kick_now(&mut self) {
        self.kicks += 1;
        if let Err(e) = self.kick.write(1) {
            log::warn!("kick eventfd write failed: {e}");
        }
    }

    /// Ask for an interrupt on the next used entry; returns whether used
    /// entries are already pending (then no interrupt may come for them).
    pub(crate) fn enable_interrupts(&mut self) -> bool {
        self.interrupts = true;
        if self.event_idx {
            self.set_used_event(self.last_used);
        } else {
            self.avail_flags().store(0, Ordering::Relaxed);
        }
        // Order the store above before re-reading used.idx.
        fence(Ordering::SeqCst);
        self.pending() != 0
    }

    /// Ask for no interrupts. With EVENT_IDX the flags must stay 0, so
    /// `used_event` is set half a ring-index space ahead, where no batch
    /// reaches it; [`refresh_used_event`](Self::refresh_used_event) keeps it
    /// there as `last_used` moves.
    pub(crate) fn disable_interrupts(&mut self) {
        self.interrupts = false;
        if self.event_idx {
            self.set_used_event(self.last_used.wrapping_add(0x8000));
        } else {
            self.avail_flags()
                .store(VRING_AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
        }
    }

    /// After consuming used entries with interrupts disabled, move
    /// `used_event` along so that it never comes within reach.
    pub(crate) fn refresh_used_event(&mut self) {
        if !self.interrupts && self.event_idx {
            self.set_used_event(self.last_used.wrapping_add(0x8000));
        }
    }

    /// Give the chain headed by `id` back to the free list. False (and
    /// nothing changes) if the device does not own such a chain.
    pub(crate) fn release_chain(&mut self, id: u32) -> bool {
        if id >= u32::from(self.size) || self.chain[id as usize] == 0 {
            return false;
        }
        let mut d = id as u16;
        let k = std::mem::replace(&mut self.chain[id as usize], 0);
        for _ in 0..k {
            let nx = self.next[d as usize];
            self.free.push(d);
            d = nx;
        }
        true
    }

    /// Consume every used entry, freeing the chains (the TX side). Entries
    /// that name no chain the device owns are counted in `errors` and
    /// skipped. Returns how many chains were freed.
    pub(crate) fn reclaim(&mut self) -> usize {
        let used = self.used_idx();
        if used == self.last_used {
            return 0;
        }
        let mut n = 0;
        while self.last_used != used {
            let (id, _len) = self.used_elem(self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            if self.release_chain(id) {
                n += 1;
            } else {
                self.errors += 1;
            }
        }
        self.refresh_used_event();
        n
    }
}

/// Direct access to one ring, for tests that feed the device bad input.
///
/// It shares the driver's state: entries pushed here advance the same
/// avail index that [`NetGuest`](super::NetGuest) (or
/// [`BlkGuest`](super::BlkGuest)) uses, so normal traffic can continue
/// afterwards. Used entries for heads the driver did not post are counted as
/// device errors and skipped, unless the head came from
/// [`alloc_desc`](Self::alloc_desc) or [`alloc_chain`](Self::alloc_chain).
pub struct RawQueue<'a> {
    pub(crate) q: &'a mut SplitQueue,
}

impl RawQueue<'_> {
    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.q.size()
    }

    /// Where the ring's areas are (guest-physical).
    pub fn layout(&self) -> RingLayout {
        self.q.layout
    }

    /// Write descriptor `index % size` with any values (addresses outside
    /// guest memory, loops, huge lengths...).
    pub fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q.write_desc(index, addr, len, flags, next);
    }

    /// Read descriptor `index % size`: (addr, len, flags, next).
    pub fn read_desc(&self, index: u16) -> (u64, u32, u16, u16) {
        self.q.read_desc(index)
    }

    /// Take a descriptor off the driver's free list and treat it as a
    /// one-descriptor chain owned by the device: the driver will not reuse it
    /// until a used entry returns it. Write it and push it yourself.
    pub fn alloc_desc(&mut self) -> Option<u16> {
        let d = self.q.free.pop()?;
        self.q.chain[d as usize] = 1;
        Some(d)
    }

    /// Take `n` descriptors (at least 1) off the free list as one chain owned
    /// by the device, in chain order: the first is the head to push, and a
    /// used entry naming it gives all `n` back. The descriptors are not
    /// written: link them yourself (`next` of each = the following id) or
    /// deliberately not. None (and nothing taken) if fewer than `n` are free.
    pub fn alloc_chain(&mut self, n: u16) -> Option<Vec<u16>> {
        if n == 0 || usize::from(n) > self.q.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..n).filter_map(|_| self.q.free.pop()).collect();
        for w in ids.windows(2) {
            self.q.next[w[0] as usize] = w[1];
        }
        self.q.chain[ids[0] as usize] = n;
        Some(ids)
    }

    /// `avail.ring[avail_idx % size] = head; avail_idx += 1` (not published).
    pub fn push_avail(&mut self, head: u16) {
        self.q.push_avail(head);
    }

    /// Publish any `avail.idx` (Release store); later pushes continue from it.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.q.set_avail_idx(idx);
    }

    /// Publish the pushed entries (no kick).
    pub fn publish(&mut self) {
        self.q.publish();
    }

    /// The driver's avail index, including pushed but unpublished entries.
    pub fn avail_idx(&self) -> u16 {
        self.q.next_avail
    }

    /// The device's `used.idx`.
    pub fn used_idx(&self) -> u16 {
        self.q.used_idx()
    }

    /// The next used entry the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.q.last_used
    }

    /// Used entry at ring position `i % size` (so a used index works too):
    /// (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        self.q.used_elem(i)
    }

    /// The device's `avail_event`.
    pub fn avail_event(&self) -> u16 {
        self.q.avail_event()
    }

    /// The device's `used.flags`.
    pub fn used_flags(&self) -> u16 {
        self.q.used_flags()
    }

    /// The driver's `used_event`.
    pub fn used_event(&self) -> u16 {
        self.q.used_event()
    }

    /// Set `used_event` to any value.
    pub fn set_used_event(&mut self, v: u16) {
        self.q.set_used_event(v);
    }

    /// Kick the device unconditionally.
    pub fn kick(&mut self) {
        self.q.kick_now();
    }

    /// Guest-physical address of a fresh zeroed scratch buffer of `len` bytes
    /// inside guest memory.
    ///
    /// # Panics
    ///
    /// If guest memory is exhausted (this is a test tool; raise the guest
    /// configuration's `mem_size`).
    pub fn scratch(&mut self, len: usize) -> u64 {
        match self.q.memory().alloc(len) {
            Ok(gpa) => gpa,
            Err(e) => panic!("RawQueue::scratch({len}): {e}"),
        }
    }

    /// The guest memory the ring lives in.
    pub fn memory(&self) -> &GuestMemory {
        self.q.memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let l = RingLayout::at(0x1000_0000, 256);
        assert_eq!(l.desc, 0x1000_0000);
        assert_eq!(l.avail, 0x1000_0000 + 4096);
        assert_eq!(l.used, 0x1000_0000 + 8192);
        assert_eq!(l.len, 8192 + 6 + 8 * 256);
        let l = RingLayout::at(0x1000_0000, 1);
        assert_eq!(
            (l.avail, l.used, l.len),
            (0x1000_0010, 0x1000_1000, 4096 + 14)
        );
        let l = RingLayout::at(0, MAX_QUEUE_SIZE);
        assert_eq!(l.avail, 16 * 32768);
        assert_eq!(
            l.used,
            (16 * 32768 + 6 + 2 * 32768u64).next_multiple_of(4096)
        );
        assert_eq!(RingLayout::avail_bytes(4), 14);
        assert_eq!(RingLayout::used_bytes(4), 38);
    }

    #[test]
    fn need_event_wraps() {
        // Moving 10 -> 12 crosses event 10 and 11, not 12 or 9.
        assert!(need_event(10, 12, 10));
        assert!(need_event(11, 12, 10));
        assert!(!need_event(12, 12, 10));
        assert!(!need_event(9, 12, 10));
        // Across the wrap: 65534 -> 2.
        assert!(need_event(65535, 2, 65534));
        assert!(need_event(0, 2, 65534));
        assert!(need_event(1, 2, 65534));
        assert!(!need_event(2, 2, 65534));
        assert!(!need_event(65533, 2, 65534));
        // A far-away event is never reached by a ring-sized batch.
        assert!(!need_event(100u16.wrapping_add(0x8000), 100 + 256, 100));
    }

    #[test]
    fn free_list() {
        let mut f = FreeList::new(4);
        assert_eq!(f.len(), 4);
        let got: Vec<_> = std::iter::from_fn(|| f.pop()).collect();
        assert_eq!(got, [0, 1, 2, 3]);
        assert_eq!((f.pop(), f.len()), (None, 0));
        f.push(2);
        f.push(0);
        assert_eq!(f.len(), 2);
        assert_eq!((f.pop(), f.pop(), f.pop()), (Some(0), Some(2), None));
        let mut f = FreeList::new(MAX_QUEUE_SIZE);
        for i in 0..MAX_QUEUE_SIZE {
            assert_eq!(f.pop(), Some(i));
        }
        assert_eq!(f.pop(), None);
        assert!(FreeList::new(0).pop().is_none());
    }

    /// The device's side, through guest-physical addresses only.
    struct Dev<'a> {
        mem: &'a GuestMemory,
        l: RingLayout,
        last_avail: u16,
        used: u16,
    }

    impl Dev<'_> {
        fn u16_at(&self, gpa: u64) -> u16 {
            let mut b = [0; 2];
            self.mem.read(gpa, &mut b).unwrap();
            u16::from_le_bytes(b)
        }
        fn avail_idx(&self) -> u16 {
            self.u16_at(self.l.avail + 2)
        }
        fn pop(&mut self) -> Option<u16> {
            if self.last_avail == self.avail_idx() {
                return None;
            }
            let pos = self.last_avail % self.l.size;
            self.last_avail = self.last_avail.wrapping_add(1);
            Some(self.u16_at(self.l.avail + 4 + 2 * pos as u64))
        }
        fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
            let b = self.mem.read_vec(self.l.desc + 16 * i as u64, 16).unwrap();
            (
                u64::from_le_bytes(b[0..8].try_into().unwrap()),
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
                u16::from_le_bytes(b[12..14].try_into().unwrap()),
                u16::from_le_bytes(b[14..16].try_into().unwrap()),
            )
        }
        fn push_used(&mut self, id: u32, len: u32) {
            let pos = (self.used % self.l.size) as u64;
            let mut e = id.to_le_bytes().to_vec();
            e.extend_from_slice(&len.to_le_bytes());
            self.mem.write(self.l.used + 4 + 8 * pos, &e).unwrap();
            self.used = self.used.wrapping_add(1);
            self.mem
                .write(self.l.used + 2, &self.used.to_le_bytes())
                .unwrap();
        }
        fn set_avail_event(&self, v: u16) {
            let at = self.l.used + 4 + 8 * self.l.size as u64;
            self.mem.write(at, &v.to_le_bytes()).unwrap();
        }
        fn used_event(&self) -> u16 {
            self.u16_at(self.l.avail + 4 + 2 * self.l.size as u64)
        }
    }

    fn kicks(q: &SplitQueue) -> u64 {
        q.kick.read().unwrap_or(0)
    }

    /// Drive a queue of 4 through the 16-bit index wrap: the avail ring slot
    /// is `idx % size`, indices wrap from 65535 to 0, chains are freed.
    #[test]
    fn indices_wrap_past_65535() {
        let mem = GuestMemory::new(1 << 20, 1).unwrap();
        let mut q = SplitQueue::new(&mem, 4, 64, true).unwrap();
        let start = 65533u16;
        q.next_avail = start;
        q.notified_avail = start;
        q.last_used = start;
        q.publish();
        let mut dev = Dev {
            mem: &mem,
            l: q.layout,
            last_avail: start,
            used: start,
        };
        dev.mem.write(dev.l.used + 2, &start.to_le_bytes()).unwrap();
        for round in 0..10u32 {
            // Fill the ring with 2-descriptor chains (2 per round).
            for k in 0..2u16 {
                let a = q.free.pop().unwrap();
                let b = q.free.pop().unwrap();
                let sa = q.slots[a as usize];
                let sb = q.slots[b as usize];
                q.write_desc(a, sa.gpa, 10 + k as u32, VRING_DESC_F_NEXT, b);
                q.write_desc(b, sb.gpa, 20, 0, 0);
                q.next[a as usize] = b;
                q.chain[a as usize] = 2;
                q.push_avail(a);
            }
            assert!(q.free.pop().is_none(), "ring of 4 holds two 2-chains");
            q.notify();
            assert_eq!(dev.avail_idx(), q.next_avail);
            // The device sees both chains, in order, at slot idx % size.
            let h1 = dev.pop().unwrap();
            let h2 = dev.pop().unwrap();
            assert!(dev.pop().is_none());
            let (_, len1, f1, n1) = dev.desc(h1);
            assert_eq!((len1, f1), (10, VRING_DESC_F_NEXT));
            assert_eq!(dev.desc(n1).1, 20);
            assert_eq!(dev.desc(h2).1, 11);
            // Complete them in reverse order.
            dev.push_used(h2 as u32, 0);
            dev.push_used(h1 as u32, 0);
            assert_eq!(q.pending(), 2);
            assert_eq!(q.reclaim(), 2);
            assert_eq!(q.in_flight(), 0);
            assert_eq!(q.last_used, start.wrapping_add(2 * (round as u16 + 1)));
            // With interrupts disabled, used_event stays half a space ahead.
            assert_eq!(dev.used_event(), q.last_used.wrapping_add(0x8000));
        }
        assert!(q.last_used < start, "indices wrapped");
        assert_eq!(q.errors, 0);
        // A used entry naming a descriptor the device does not own is counted.
        dev.push_used(3, 0);
        dev.push_used(1000, 0);
        assert_eq!(q.reclaim(), 0);
        assert_eq!(q.errors, 2);
    }

    #[test]
    fn kick_suppression_event_idx() {
        let mem = GuestMemory::new(1 << 20, 1).unwrap();
        let mut q = SplitQueue::new(&mem, 8, 64, true).unwrap();
        let dev = Dev {
            mem: &mem,
            l: q.layout,
            last_avail: 0,
            used: 0,
        };
        // avail_event 0: moving 0 -> 1 crosses it.
        q.push_avail(0);
        assert!(q.notify());
        assert_eq!(kicks(&q), 1);
        // Device wants a kick only once avail.idx passes 3.
        dev.set_avail_event(3);
        q.push_avail(1);
        assert!(!q.notify()); // 1 -> 2
        q.push_avail(2);
        assert!(!q.notify()); // 2 -> 3
        q.push_avail(3);
        q.push_avail(4);
        assert!(q.notify()); // 3 -> 5 crosses 3
        assert!(!q.notify(), "nothing new, no kick");
        assert_eq!(kicks(&q), 1);
        assert_eq!(q.kicks, 2);
    }

    #[test]
    fn kick_suppression_flags_and_interrupts() {
        let mem = GuestMemory::new(1 << 20, 1).unwrap();
        let mut q = SplitQueue::new(&mem, 8, 64, false).unwrap();
        let l = q.layout;
        // Interrupts start disabled with the flag.
        assert_eq!(mem.read_vec(l.avail, 2).unwrap(), [1, 0]);
        q.push_avail(0);
        assert!(q.notify());
        mem.write(l.used, &VRING_USED_F_NO_NOTIFY.to_le_bytes())
            .unwrap();
        q.push_avail(1);
        assert!(!q.notify());
        assert!(!q.enable_interrupts());
        assert_eq!(mem.read_vec(l.avail, 2).unwrap(), [0, 0]);
        mem.write(l.used + 2, &1u16.to_le_bytes()).unwrap();
        assert!(q.enable_interrupts(), "pending entry reported");
        q.disable_interrupts();
        assert_eq!(mem.read_vec(l.avail, 2).unwrap(), [1, 0]);

        let mut q = SplitQueue::new(&mem, 8, 64, true).unwrap();
        let l = q.layout;
        let used_event = l.avail + 4 + 2 * 8;
        assert_eq!(
            mem.read_vec(used_event, 2).unwrap(),
            0x8000u16.to_le_bytes()
        );
        q.last_used = 5;
        q.enable_interrupts();
        assert_eq!(mem.read_vec(used_event, 2).unwrap(), 5u16.to_le_bytes());
        assert_eq!(mem.read_vec(l.avail, 2).unwrap(), [0, 0], "flags stay 0");
    }

    #[test]
    fn raw_chain_is_freed_whole() {
        let mem = GuestMemory::new(1 << 20, 1).unwrap();
        let mut q = SplitQueue::new(&mem, 8, 64, true).unwrap();
        let mut raw = RawQueue { q: &mut q };
        assert!(raw.alloc_chain(0).is_none());
        assert!(raw.alloc_chain(9).is_none());
        let ids = raw.alloc_chain(3).unwrap();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(q.in_flight(), 3);
        assert_eq!(q.chain[0], 3);
        assert!(q.release_chain(0));
        assert_eq!(q.in_flight(), 0);
        assert!(!q.release_chain(1), "not a head");
    }

    #[test]
    fn bad_sizes() {
        let mem = GuestMemory::new(1 << 20, 1).unwrap();
        assert!(SplitQueue::new(&mem, 0, 64, true).is_err());
        assert!(SplitQueue::new(&mem, 6, 64, true).is_err());
    }

    #[test]
    fn buffers_are_aligned_to_their_size() {
        let mem = GuestMemory::new(4 << 20, 1).unwrap();
        for (len, align) in [
            (65536, 4096),
            (8192, 4096),
            (2048, 2048),
            (512, 512),
            (100, 64),
        ] {
            let q = SplitQueue::new(&mem, 8, len, true).unwrap();
            for s in &q.slots {
                assert_eq!(s.gpa % align, 0, "{len}-byte buffer at {:#x}", s.gpa);
            }
        }
    }
}
