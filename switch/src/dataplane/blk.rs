//! Serving virtio-blk request queues on a dataplane worker.
//!
//! A worker takes requests from a disk's rings, checks them, and hands reads,
//! writes, flushes and hole punches to its asynchronous [`IoEngine`] with
//! iovecs that point straight into guest memory (no copy). Completions come
//! back in any order; a queue returns requests to the guest strictly in the
//! order it took them, so that its used index always equals the number of
//! requests finished from the front of the avail ring. A frontend that
//! reconnects after the switch restarts resumes from the used index and
//! re-issues exactly the requests that were not answered.
//!
//! Invariants:
//! - a slot with `pending > 0` holds a reference to the guest mapping its
//!   iovecs point into, and its queue (and the slot array) is not dropped
//!   until every slot is finished, so the kernel never writes into memory
//!   that was unmapped or reused;
//! - a queue holds at most `size` requests (its slots), and requests are
//!   left in the ring while the engine has no room, so nothing is dropped.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::qos::DiskQos;
use crate::blk::{
    self, Disk, ParseError, ReqType, Request, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_DISK_QUEUES, SECTOR, S_IOERR, S_OK, S_UNSUPP,
};
use crate::fdb::PortIdx;
use crate::io_engine::{IoEngine, IoKind, IoOp};
use crate::mem::GuestMemory;
use crate::stats::{BlkError, BlkOp};
use crate::vring::{Chain, Direction, Vring, MAX_CHAIN_SEGS};

/// Walk and parse space, one per worker.
pub(super) struct BlkScratch {
    chain: Chain,
    req: Request,
}

// SAFETY: scratch space: the pointers in the parsed request are a view into
// guest memory used only within the pass that parsed it, never after; moving
// the stale values with the worker into its thread is harmless.
unsafe impl Send for BlkScratch {}

impl BlkScratch {
    pub fn new() -> Box<Self> {
        Box::new(BlkScratch {
            chain: Chain::new(),
            req: Request::new(),
        })
    }
}

/// Engine `user_data` of a request's operation: which worker-local disk
/// generation, port, queue and slot it belongs to.
#[inline]
pub(super) fn user_data(gen: u16, idx: PortIdx, queue: usize, slot: usize) -> u64 {
    u64::from(gen) << 40 | u64::from(idx) << 24 | (queue as u64) << 16 | slot as u64
}

/// The parts of a `user_data`: (generation, port, queue, slot).
#[inline]
pub(super) fn split_user_data(ud: u64) -> (u16, PortIdx, usize, usize) {
    (
        (ud >> 40) as u16,
        (ud >> 24) as PortIdx,
        ((ud >> 16) & 0xff) as usize,
        (ud & 0xffff) as usize,
    )
}

/// One request between being taken from the ring and being returned.
struct Slot {
    head: u16,
    /// Engine operations still running; the request is finished at 0.
    pending: u16,
    status: u8,
    /// Where the status byte goes (null: nowhere, the chain was unusable).
    status_ptr: *mut u8,
    used_len: u32,
    /// Bytes each read or write operation must transfer.
    expect: u32,
    op: Option<BlkOp>,
    bytes: u64,
    error: Option<BlkError>,
    /// Keeps the guest mapping alive while the kernel may use it.
    mem: Option<Arc<GuestMemory>>,
    iov: [libc::iovec; MAX_CHAIN_SEGS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            head: 0,
            pending: 0,
            status: S_OK,
            status_ptr: std::ptr::null_mut(),
            used_len: 0,
            expect: 0,
            op: None,
            bytes: 0,
            error: None,
            mem: None,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_CHAIN_SEGS],
        }
    }

    fn fail(&mut self, status: u8, why: BlkError) {
        self.status = status;
        self.error = Some(why);
    }
}

/// One running request queue of a disk.
pub(super) struct DiskQueue {
    pub ring: Vring,
    slots: Box<[Slot]>,
    /// Avail position of the oldest request not yet returned.
    oldest: u16,
    /// Used entries written and not yet published.
    dirty: bool,
}

// SAFETY: the raw pointers in the slots point into guest memory that the
// slot's own `Arc<GuestMemory>` keeps mapped; a queue moves between workers
// only while none of its requests is in flight (see `DiskPort::idle`), and
// is then used by one thread at a time.
unsafe impl Send for DiskQueue {}

impl DiskQueue {
    pub fn new(ring: Vring) -> Self {
        let size = usize::from(ring.size());
        DiskQueue {
            oldest: ring.next_avail(),
            slots: (0..size).map(|_| Slot::new()).collect(),
            ring,
            dirty: false,
        }
    }

    /// Requests taken and not yet returned.
    #[inline]
    pub fn in_flight(&self) -> u16 {
        self.ring.next_avail().wrapping_sub(self.oldest)
    }

    #[inline]
    fn mask(&self) -> u16 {
        self.ring.size() - 1
    }

    /// Return finished requests to the guest, in the order they were taken.
    fn retire(&mut self, disk: &Disk) {
        while self.oldest != self.ring.next_avail() {
            let s = &mut self.slots[usize::from(self.oldest & self.mask())];
            if s.pending != 0 {
                break;
            }
            if !s.status_ptr.is_null() {
                // SAFETY: the status byte was translated into the guest
                // mapping that `s.mem` keeps alive; it is device-writable.
                unsafe { std::ptr::write_volatile(s.status_ptr, s.status) };
            }
            if let Some(op) = s.op {
                disk.stats
                    .count_op(op, if s.error.is_none() { s.bytes } else { 0 });
            }
            if let Some(e) = s.error {
                disk.stats.count_error(e);
            }
            s.mem = None;
            let (head, len) = (s.head, s.used_len);
            self.ring.push_used(head, len);
            self.oldest = self.oldest.wrapping_add(1);
            self.dirty = true;
        }
    }
}

/// A disk as its worker holds it.
pub(super) struct DiskPort {
    pub idx: PortIdx,
    /// Distinguishes this attachment's completions from an earlier one's.
    pub gen: u16,
    pub disk: Arc<Disk>,
    pub mem: Arc<GuestMemory>,
    pub event_idx: bool,
    pub queues: [Option<DiskQueue>; MAX_DISK_QUEUES],
    pub kicks: [Option<EventFd>; MAX_DISK_QUEUES],
    /// A guest fault stopped the disk until its rings are set up again.
    pub broken: bool,
    /// Bit q: queue q is being stopped, take nothing more from it.
    pub stopping: u32,
    /// The port is leaving this worker: take no new requests.
    pub quiescing: bool,
    /// Limits and share, when set.
    pub qos: Option<Box<DiskQos>>,
    faults: crossbeam_channel::Sender<PortIdx>,
}

impl DiskPort {
    pub fn new(
        idx: PortIdx,
        gen: u16,
        disk: Arc<Disk>,
        faults: crossbeam_channel::Sender<PortIdx>,
    ) -> Self {
        disk.stats.set_broken(false);
        DiskPort {
            idx,
            gen,
            disk,
            mem: Arc::new(GuestMemory::empty()),
            event_idx: false,
            queues: std::array::from_fn(|_| None),
            kicks: std::array::from_fn(|_| None),
            broken: false,
            stopping: 0,
            quiescing: false,
            qos: None,
            faults,
        }
    }

    /// Apply a QoS spec (limits and weight), keeping what buckets hold.
    pub fn set_qos(&mut self, spec: &crate::qos::QosSpec, now: u64) {
        DiskQos::update(&mut self.qos, spec, now);
    }

    /// Nanoseconds until a disk held by its limits may go on.
    pub fn qos_wait(&mut self, now: u64) -> Option<u64> {
        self.qos.as_deref_mut().and_then(|q| q.wait(now))
    }

    /// Requests in flight on every queue.
    pub fn in_flight(&self) -> usize {
        self.queues
            .iter()
            .flatten()
            .map(|q| usize::from(q.in_flight()))
            .sum()
    }

    /// No request in flight: the port may be stopped, moved or dropped.
    pub fn idle(&self) -> bool {
        self.in_flight() == 0
    }

    /// Stop serving the disk after a guest fault.
    pub fn mark_broken(&mut self, what: &str) {
        if !self.broken {
            log::error!(
                "disk port {}: {what}; the disk is stopped until the guest resets its rings",
                self.idx
            );
            let _ = self.faults.send(self.idx);
        }
        self.broken = true;
        self.disk.stats.set_broken(true);
    }

    /// Take queue `q` out once it has nothing in flight; returns its next
    /// avail index (None if it was not running).
    pub fn take_queue(&mut self, q: usize) -> Option<u16> {
        let mut dq = self.queues.get_mut(q)?.take()?;
        dq.retire(&self.disk);
        dq.ring.publish_used();
        self.stopping &= !(1 << q);
        Some(dq.ring.next_avail())
    }

    /// Complete one engine operation of slot `slot` in queue `q`.
    pub fn complete(&mut self, q: usize, slot: usize, result: i32) {
        let Some(dq) = self.queues.get_mut(q).and_then(|x| x.as_mut()) else {
            return;
        };
        let Some(s) = dq.slots.get_mut(slot) else {
            return;
        };
        if s.pending == 0 {
            return;
        }
        s.pending -= 1;
        if result < 0 {
            let unsupported = result == -libc::EOPNOTSUPP
                && matches!(s.op, Some(BlkOp::Discard | BlkOp::WriteZeroes));
            if unsupported {
                s.fail(S_UNSUPP, BlkError::Unsupported);
            } else {
                if s.error.is_none() {
                    log::warn!(
                        "disk port {}: {:?} failed on the host: {}",
                        self.idx,
                        s.op,
                        std::io::Error::from_raw_os_error(-result)
                    );
                }
                s.fail(S_IOERR, BlkError::IoError);
            }
        } else if s.expect != 0 && result as u32 != s.expect {
            // A short transfer: the file shrank under the disk.
            s.fail(S_IOERR, BlkError::IoError);
        }
    }

    /// Return finished requests, take new ones (up to `batch` per queue)
    /// and queue their I/O. Returns the requests taken.
    pub fn poll(
        &mut self,
        engine: &mut IoEngine,
        scratch: &mut BlkScratch,
        batch: u16,
        now: u64,
    ) -> usize {
        let mut taken = 0;
        if let Some(q) = self.qos.as_deref_mut() {
            q.budget.start_visit(batch);
        }
        for q in 0..MAX_DISK_QUEUES {
            let Some(dq) = self.queues[q].as_mut() else {
                continue;
            };
            dq.retire(&self.disk);
            if self.broken || self.quiescing || self.stopping & (1 << q) != 0 {
                continue;
            }
            let pending = match dq.ring.avail_pending() {
                Ok(n) => n,
                Err(f) => {
                    self.mark_broken(&format!("queue {q}: {f}"));
                    continue;
                }
            };
            let mut ctx = Serve {
                disk: &self.disk,
                mem: &self.mem,
                gen: self.gen,
                idx: self.idx,
                queue: q,
                qos: self.qos.as_deref_mut(),
                now,
            };
            // A weighted disk takes its whole budget in this visit, batch
            // after batch (as a net port does): a batch alone would cap
            // every weight at the same number of requests.
            let weighted = ctx.qos.as_deref().is_some_and(|q| q.budget.weighted());
            let mut left = pending;
            let res = loop {
                match serve_queue(dq, &mut ctx, left.min(batch), engine, scratch) {
                    Ok(n) => {
                        taken += n;
                        // Until the ring is empty (as the guest's index says
                        // now, not as it was cached) or the budget spent.
                        let more = weighted
                            && n > 0
                            && ctx.qos.as_deref().is_some_and(|q| q.budget.open());
                        if !more {
                            break Ok(());
                        }
                        match dq.ring.avail_pending() {
                            Ok(0) => break Ok(()),
                            Ok(p) => left = p,
                            Err(f) => break Err(f),
                        }
                    }
                    Err(f) => break Err(f),
                }
            };
            if let Err(f) = res {
                self.mark_broken(&format!("queue {q}: {f}"));
            }
            if let Some(dq) = self.queues[q].as_mut() {
                // Requests answered at once go back in this pass.
                dq.retire(&self.disk);
            }
        }
        self.disk.stats.set_in_flight(self.in_flight() as u64);
        taken
    }

    /// Publish the used entries written since the last call.
    pub fn publish(&mut self) {
        for dq in self.queues.iter_mut().flatten() {
            if std::mem::take(&mut dq.dirty) {
                dq.ring.publish_used();
            }
        }
    }
}

/// What serving one queue needs from its port.
struct Serve<'a> {
    disk: &'a Disk,
    mem: &'a Arc<GuestMemory>,
    gen: u16,
    idx: PortIdx,
    queue: usize,
    qos: Option<&'a mut DiskQos>,
    now: u64,
}

/// What became of a request taken from the ring.
#[derive(PartialEq, Eq)]
enum Taken {
    /// Started, or answered at once.
    Served,
    /// Over the disk's limits: to be given back to the ring.
    Held,
}

/// Take up to `max` requests from a queue. A ring fault is returned.
fn serve_queue(
    dq: &mut DiskQueue,
    ctx: &mut Serve<'_>,
    max: u16,
    engine: &mut IoEngine,
    scratch: &mut BlkScratch,
) -> Result<usize, crate::vring::RingFault> {
    let mut taken = 0;
    let size = dq.ring.size();
    while taken < usize::from(max) {
        // Every slot busy, or no room for the largest request's operations:
        // leave the rest in the ring until completions free room.
        if dq.in_flight() >= size || !engine.has_room(MAX_DISCARD_SEG as usize) {
            break;
        }
        if ctx.qos.as_deref().is_some_and(|q| !q.budget.open()) {
            break;
        }
        let seq = dq.ring.next_avail();
        let head = dq.ring.pop_head()?;
        taken += 1;
        if let Some(q) = ctx.qos.as_deref_mut() {
            // Malformed requests cost their visit too (a guest flooding
            // its ring with them cannot outstay its weight).
            q.budget.charge_min();
        }
        let slot_idx = usize::from(seq & dq.mask());
        let slot = &mut dq.slots[slot_idx];
        slot.head = head;
        slot.pending = 0;
        slot.status = S_OK;
        slot.status_ptr = std::ptr::null_mut();
        slot.used_len = 0;
        slot.expect = 0;
        slot.op = None;
        slot.bytes = 0;
        slot.error = None;
        // Held until the request is returned: its status byte and buffers
        // stay mapped even if the memory table changes meanwhile.
        slot.mem = Some(ctx.mem.clone());
        if dq
            .ring
            .walk(head, Direction::Mixed, u32::MAX, &mut scratch.chain)
            .is_err()
        {
            slot.error = Some(BlkError::BadDescriptor);
            continue;
        }
        let ud = user_data(ctx.gen, ctx.idx, ctx.queue, slot_idx);
        if serve_request(slot, ctx, ud, engine, &scratch.chain, &mut scratch.req) == Taken::Held {
            // Lossless: the request waits in the guest's ring.
            slot.mem = None;
            dq.ring.unpop();
            taken -= 1;
            break;
        }
    }
    Ok(taken)
}

/// Check one walked request and start it (or answer it at once).
fn serve_request(
    slot: &mut Slot,
    ctx: &mut Serve<'_>,
    ud: u64,
    engine: &mut IoEngine,
    chain: &Chain,
    req: &mut Request,
) -> Taken {
    match blk::parse(chain.segs(), req) {
        Ok(()) => {}
        Err(ParseError::NoStatus) => {
            slot.error = Some(BlkError::NoStatus);
            return Taken::Served;
        }
        Err(ParseError::ShortHeader) => {
            // No header: the request type is unknown.
            slot.status_ptr = req.status;
            slot.used_len = 1;
            slot.fail(S_IOERR, BlkError::ShortHeader);
            return Taken::Served;
        }
        Err(ParseError::WrongDirection) => {
            slot.status_ptr = req.status;
            slot.used_len = 1;
            slot.op = op_of(req.ty);
            slot.fail(S_IOERR, BlkError::WrongDirection);
            return Taken::Served;
        }
    }
    if let Some(q) = ctx.qos.as_deref_mut() {
        if !q.admit(req.ty, req.data_len, ctx.now, &ctx.disk.stats) {
            return Taken::Held;
        }
    }
    slot.status_ptr = req.status;
    slot.used_len = 1;
    slot.op = op_of(req.ty);
    dispatch(slot, ctx, ud, engine, req);
    Taken::Served
}

/// Start a well-formed, admitted request (or answer it at once).
fn dispatch(slot: &mut Slot, ctx: &Serve<'_>, ud: u64, engine: &mut IoEngine, req: &Request) {
    let backing = &ctx.disk.backing;
    match req.ty {
        ReqType::Read | ReqType::Write => {
            let write = req.ty == ReqType::Write;
            if let Err(e) = check_rw(req, backing, write) {
                slot.fail(S_IOERR, e);
                return;
            }
            if req.data_len == 0 {
                return;
            }
            for (i, s) in req.data().iter().enumerate() {
                slot.iov[i] = libc::iovec {
                    iov_base: s.ptr.cast(),
                    iov_len: s.len as usize,
                };
            }
            slot.expect = req.data_len as u32;
            slot.bytes = req.data_len;
            if !write {
                slot.used_len = slot.expect + 1;
            }
            let kind = if write {
                IoKind::Write {
                    dsync: ctx.disk.write_through(),
                }
            } else {
                IoKind::Read
            };
            let op = IoOp {
                kind,
                fd: backing.fd(),
                offset: req.sector * SECTOR,
                iov: slot.iov.as_ptr(),
                iovcnt: req.ndata as u32,
                len: 0,
                user_data: ud,
            };
            start(slot, engine, op);
        }
        ReqType::Flush => {
            if backing.readonly() {
                return;
            }
            let op = IoOp {
                kind: IoKind::Flush,
                fd: backing.fd(),
                offset: 0,
                iov: std::ptr::null(),
                iovcnt: 0,
                len: 0,
                user_data: ud,
            };
            start(slot, engine, op);
        }
        ReqType::GetId => {
            let n = req.fill_data(ctx.disk.serial());
            slot.bytes = n as u64;
            slot.used_len = n as u32 + 1;
        }
        ReqType::Discard | ReqType::WriteZeroes => discard(slot, ctx, ud, engine, req),
        ReqType::Unsupported(_) => slot.fail(S_UNSUPP, BlkError::Unsupported),
    }
}

fn op_of(ty: ReqType) -> Option<BlkOp> {
    match ty {
        ReqType::Read => Some(BlkOp::Read),
        ReqType::Write => Some(BlkOp::Write),
        ReqType::Flush => Some(BlkOp::Flush),
        ReqType::GetId => Some(BlkOp::GetId),
        ReqType::Discard => Some(BlkOp::Discard),
        ReqType::WriteZeroes => Some(BlkOp::WriteZeroes),
        ReqType::Unsupported(_) => None,
    }
}

/// Whether `[sector, sector + bytes)` lies inside the disk.
fn in_range(sector: u64, bytes: u64, size: u64) -> bool {
    sector
        .checked_mul(SECTOR)
        .and_then(|off| off.checked_add(bytes))
        .is_some_and(|end| end <= size)
}

/// Check a read or write against the disk.
fn check_rw(req: &Request, backing: &blk::Backing, write: bool) -> Result<(), BlkError> {
    if write && backing.readonly() {
        return Err(BlkError::ReadOnly);
    }
    if req.data_len % SECTOR != 0 || req.data_len > u64::from(u32::MAX) {
        return Err(BlkError::Unaligned);
    }
    if !in_range(req.sector, req.data_len, backing.size()) {
        return Err(BlkError::OutOfRange);
    }
    let (mem_align, off_align) = (
        u64::from(backing.mem_align()),
        u64::from(backing.offset_align()),
    );
    if off_align > 1 {
        // Direct I/O: the kernel refuses misaligned offsets and buffers.
        let aligned = (req.sector * SECTOR) % off_align == 0
            && req.data_len % off_align == 0
            && req
                .data()
                .iter()
                .all(|s| (s.ptr as u64) % mem_align == 0 && u64::from(s.len) % mem_align == 0);
        if !aligned {
            return Err(BlkError::Unaligned);
        }
    }
    Ok(())
}

/// Queue `op` for `slot`.
fn start(slot: &mut Slot, engine: &mut IoEngine, op: IoOp) {
    // SAFETY: the fd belongs to the disk's backing, which the port holds
    // until every request has finished; the iovec array lives in the slot,
    // which is neither reused nor freed while `pending > 0`; the buffers are
    // inside the guest mapping that `slot.mem` keeps alive until then (see
    // the module invariants).
    match unsafe { engine.push(op) } {
        Ok(()) => slot.pending += 1,
        // The caller made room for the largest request before taking it.
        Err(_) => slot.fail(S_IOERR, BlkError::IoError),
    }
}

/// Start a discard or write-zeroes request: one `fallocate` per range.
fn discard(slot: &mut Slot, ctx: &Serve<'_>, ud: u64, engine: &mut IoEngine, req: &Request) {
    let backing = &ctx.disk.backing;
    let zeroes = req.ty == ReqType::WriteZeroes;
    if backing.readonly() {
        slot.fail(S_IOERR, BlkError::ReadOnly);
        return;
    }
    let n = req.data_len / blk::DISCARD_SEG_LEN as u64;
    if req.data_len % blk::DISCARD_SEG_LEN as u64 != 0 || n == 0 {
        // Not a list of ranges at all.
        slot.fail(S_IOERR, BlkError::Unsupported);
        return;
    }
    if n > u64::from(MAX_DISCARD_SEG) {
        // More ranges than the configuration allows: as QEMU answers it.
        slot.fail(S_UNSUPP, BlkError::Unsupported);
        return;
    }
    let block = u64::from(backing.block_size());
    // Check every range before starting any.
    for i in 0..n as usize {
        let Some(r) = req.discard_seg(i) else {
            slot.fail(S_IOERR, BlkError::WrongDirection);
            return;
        };
        let allowed_flags = if zeroes { 1 } else { 0 };
        if r.flags & !allowed_flags != 0 {
            slot.fail(S_UNSUPP, BlkError::Unsupported);
            return;
        }
        let bytes = u64::from(r.num_sectors) * SECTOR;
        if r.num_sectors > MAX_DISCARD_SECTORS {
            slot.fail(S_IOERR, BlkError::OutOfRange);
            return;
        }
        if !in_range(r.sector, bytes, backing.size()) {
            slot.fail(S_IOERR, BlkError::OutOfRange);
            return;
        }
        if (r.sector * SECTOR) % block != 0 || bytes % block != 0 {
            slot.fail(S_IOERR, BlkError::Unaligned);
            return;
        }
    }
    for i in 0..n as usize {
        let Some(r) = req.discard_seg(i) else { return };
        if r.num_sectors == 0 {
            continue;
        }
        let mode = if zeroes && r.flags & 1 == 0 {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            // Discard, or write zeroes that may unmap: punching a hole
            // frees the blocks and reads back as zeroes.
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        slot.bytes += u64::from(r.num_sectors) * SECTOR;
        let op = IoOp {
            kind: IoKind::Fallocate { mode },
            fd: backing.fd(),
            offset: r.sector * SECTOR,
            iov: std::ptr::null(),
            iovcnt: 0,
            len: u64::from(r.num_sectors) * SECTOR,
            user_data: ud,
        };
        start(slot, engine, op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(0xbeef, 4095, 15, 32767);
        assert_eq!(split_user_data(ud), (0xbeef, 4095, 15, 32767));
        assert_eq!(split_user_data(user_data(0, 0, 0, 0)), (0, 0, 0, 0));
    }

    #[test]
    fn ranges() {
        assert!(in_range(0, 512, 512));
        assert!(!in_range(1, 512, 512));
        assert!(!in_range(u64::MAX / 256, 512, u64::MAX));
        assert!(in_range(7, 0, 4096));
    }
}
