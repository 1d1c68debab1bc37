//! Frame switching for virtio-net ports: draining a guest's TX ring, the L2
//! forwarding decision, and copying a frame into another guest's RX buffers
//! (mergeable when negotiated). One copy guest to guest on the same worker.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::qos::{BatchSums, Gate, NetQos};
use super::{
    Frame, NetFeatures, PortSettings, Shared, FLOOD, MAX_BATCH, MAX_FRAME_LEN, MAX_QUEUE_PAIRS,
};
use crate::cpu::prefetch;
use crate::fdb::PortIdx;
use crate::identity::frame::{self as idframe, WINDOW};
use crate::identity::policy::Mac;
use crate::mem::GuestMemory;
use crate::stats::{DropReason, PortStats, QosCounter};
use crate::vring::{Chain, ChainError, Direction, RingFault, Seg, Vring};

/// Most RX buffers (chains) one frame may be spread over.
pub(super) const MAX_RX_CHAINS: usize = 32;
/// Position value of a port this worker does not own.
pub(super) const NOT_LOCAL: u16 = u16::MAX;
const ETH_HLEN: u32 = 14;

/// A port as its worker holds it.
pub(super) struct NetPort {
    pub idx: PortIdx,
    pub stats: Arc<PortStats>,
    pub settings: PortSettings,
    pub features: NetFeatures,
    pub hdr_len: u32,
    pub mem: Arc<GuestMemory>,
    pub rx: [Option<Vring>; MAX_QUEUE_PAIRS],
    pub tx: [Option<Vring>; MAX_QUEUE_PAIRS],
    pub kicks: [Option<EventFd>; 2 * MAX_QUEUE_PAIRS],
    /// Queue-pair numbers of the running RX rings.
    rx_active: [u8; MAX_QUEUE_PAIRS],
    n_rx_active: usize,
    /// Bit q set: RX ring q has used entries to publish.
    pub rx_dirty: u32,
    /// A guest fault stopped the port until its rings are set up again.
    pub broken: bool,
    /// Limits and share, when set.
    pub qos: Option<Box<NetQos>>,
    /// Frames for the guest last found its RX ring without buffers (the
    /// port's stall clock runs; see [`PortStats::rx_stalled_since`]).
    stalled: bool,
    faults: crossbeam_channel::Sender<PortIdx>,
}

impl NetPort {
    pub fn new(
        idx: PortIdx,
        stats: Arc<PortStats>,
        settings: PortSettings,
        faults: crossbeam_channel::Sender<PortIdx>,
        now_ns: u64,
    ) -> Self {
        stats.set_broken(false);
        // A new guest starts with a clean stall clock (the last one may
        // have left with frames coming).
        stats.rx_drained();
        NetPort {
            qos: NetQos::new(&settings.qos, now_ns),
            idx,
            stats,
            settings,
            features: NetFeatures::default(),
            hdr_len: NetFeatures::default().hdr_len() as u32,
            mem: Arc::new(GuestMemory::empty()),
            rx: std::array::from_fn(|_| None),
            tx: std::array::from_fn(|_| None),
            kicks: std::array::from_fn(|_| None),
            rx_active: [0; MAX_QUEUE_PAIRS],
            n_rx_active: 0,
            rx_dirty: 0,
            broken: false,
            stalled: false,
            faults,
        }
    }

    /// The guest's own MAC, when its identity's MAC is mapped to it.
    #[inline]
    fn guest_mac(&self) -> Option<Mac> {
        Some(self.settings.policy.as_deref()?.mac_map?.guest)
    }

    /// Recompute the list of running RX rings.
    pub fn update_rx_active(&mut self) {
        self.n_rx_active = 0;
        for (q, r) in self.rx.iter().enumerate() {
            if r.is_some() {
                self.rx_active[self.n_rx_active] = q as u8;
                self.n_rx_active += 1;
            }
        }
    }

    /// Stop polling the port after a guest fault.
    pub fn mark_broken(&mut self, what: &str) {
        if !self.broken {
            log::error!(
                "port {}: {what}; the port is stopped until the guest resets its rings",
                self.idx
            );
            let _ = self.faults.send(self.idx);
        }
        self.broken = true;
        self.stats.set_broken(true);
    }

    /// Publish the used entries of the RX rings written since the last call,
    /// and the QoS counters.
    pub fn publish_rx(&mut self) {
        if let Some(q) = self.qos.as_deref_mut() {
            q.flush_counters(&self.stats);
        }
        let mut dirty = std::mem::take(&mut self.rx_dirty);
        while dirty != 0 {
            let q = dirty.trailing_zeros() as usize;
            dirty &= dirty - 1;
            if let Some(r) = self.rx[q].as_mut() {
                r.publish_used();
            }
        }
    }
}

/// Per-worker scratch space, allocated once.
pub(super) struct Scratch {
    pub tx_chains: Box<[Chain; MAX_BATCH]>,
    pub tx_walked: [Result<(), ChainError>; MAX_BATCH],
    pub rx_chains: Box<[Chain; MAX_RX_CHAINS]>,
    pub rx_used: [u32; MAX_RX_CHAINS],
}

impl Scratch {
    pub fn new() -> Box<Self> {
        Box::new(Scratch {
            tx_chains: Box::new(std::array::from_fn(|_| Chain::new())),
            tx_walked: [Ok(()); MAX_BATCH],
            rx_chains: Box::new(std::array::from_fn(|_| Chain::new())),
            rx_used: [0; MAX_RX_CHAINS],
        })
    }
}

/// What the forwarding loop needs besides the ports.
pub(super) struct Ctx<'a> {
    pub shared: &'a Shared,
    /// Port index → position in this worker's port list, or [`NOT_LOCAL`].
    pub local: &'a [u16],
    pub scratch: &'a mut Scratch,
    pub worker: usize,
    pub now_ms: u64,
    /// Nanoseconds since the switch started, at the start of the pass (QoS).
    pub now_ns: u64,
    pub batch: u16,
    /// Positions of ports with RX used entries to publish.
    pub dirty: &'a mut Vec<u16>,
    /// Bit w set: worker w was sent frames and may need waking.
    pub remote_wake: u64,
    /// [`Shared::ident_gen`] at the start of the pass, before any lookup.
    pub gen: u32,
}

impl Ctx<'_> {
    #[inline]
    fn mark_dirty(&mut self, ports: &mut [NetPort], pos: usize, q: usize) {
        let p = &mut ports[pos];
        if p.rx_dirty == 0 {
            self.dirty.push(pos as u16);
        }
        p.rx_dirty |= 1 << q;
    }
}

/// Reads a frame scattered over guest buffers.
struct Cursor<'a> {
    segs: &'a [Seg],
    i: usize,
    off: u32,
}

impl<'a> Cursor<'a> {
    /// A cursor `skip` bytes into `segs`. The caller checked the total length.
    #[inline]
    fn new(segs: &'a [Seg], mut skip: u32) -> Self {
        let mut i = 0;
        while i < segs.len() && skip >= segs[i].len {
            skip -= segs[i].len;
            i += 1;
        }
        Cursor { segs, i, off: skip }
    }

    /// Copy `n` bytes to `dst` and advance. The caller checked that `n` bytes remain.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `n` bytes, and the segments valid for
    /// reads of their lengths.
    #[inline]
    unsafe fn copy_to(&mut self, mut dst: *mut u8, mut n: u32) {
        while n > 0 && self.i < self.segs.len() {
            let s = self.segs[self.i];
            let t = (s.len - self.off).min(n);
            // SAFETY: the caller guarantees both ranges; `std::ptr::copy` allows
            // overlap, which a hostile frontend could arrange by sharing memory
            // between guests. Guest memory is shared with another process
            // that may write the same bytes while we copy; like every
            // vhost-user backend we treat it as memory we do not own: the
            // copy may read torn values, which only changes what the guest
            // receives, and no Rust reference to these bytes ever exists, so
            // no invariant of ours depends on their contents.
            unsafe {
                std::ptr::copy(s.ptr.add(self.off as usize), dst, t as usize);
                dst = dst.add(t as usize);
            }
            n -= t;
            self.off += t;
            if self.off == s.len {
                self.i += 1;
                self.off = 0;
            }
        }
    }
}

/// Reads a frame whose first bytes may have been rewritten: `head`, then
/// the rest of the frame from the guest's buffers.
struct FrameCursor<'a> {
    head: &'a [u8],
    rest: Cursor<'a>,
}

impl<'a> FrameCursor<'a> {
    #[inline]
    fn new(f: &FrameRef<'a>) -> Self {
        FrameCursor {
            head: f.head,
            rest: Cursor::new(f.segs, f.skip + f.head.len() as u32),
        }
    }

    /// Copy `n` bytes to `dst` and advance. The caller checked that `n`
    /// bytes remain.
    ///
    /// # Safety
    /// As [`Cursor::copy_to`].
    #[inline]
    unsafe fn copy_to(&mut self, mut dst: *mut u8, mut n: u32) {
        if !self.head.is_empty() {
            let t = (self.head.len() as u32).min(n);
            // SAFETY: `head` holds `t` bytes, `dst` is valid for `n >= t`
            // bytes (the caller's promise), and a local array cannot
            // overlap guest memory.
            unsafe {
                std::ptr::copy_nonoverlapping(self.head.as_ptr(), dst, t as usize);
                dst = dst.add(t as usize);
            }
            self.head = &self.head[t as usize..];
            n -= t;
        }
        if n > 0 {
            // SAFETY: forwarded from the caller.
            unsafe { self.rest.copy_to(dst, n) };
        }
    }
}

/// Copy the Ethernet header of a frame that starts `skip` bytes into `segs`.
#[inline]
fn eth_header(segs: &[Seg], skip: u32) -> [u8; ETH_HLEN as usize] {
    let mut eth = [0u8; ETH_HLEN as usize];
    if let Some(first) = segs.first() {
        if first.len >= skip + ETH_HLEN {
            // SAFETY: the first buffer holds skip + ETH_HLEN bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    first.ptr.add(skip as usize),
                    eth.as_mut_ptr(),
                    ETH_HLEN as usize,
                )
            };
            return eth;
        }
    }
    // SAFETY: `eth` holds ETH_HLEN bytes and the caller checked that the chain
    // holds at least skip + ETH_HLEN bytes.
    unsafe { Cursor::new(segs, skip).copy_to(eth.as_mut_ptr(), ETH_HLEN) };
    eth
}

#[inline]
fn flow_hash(eth: &[u8; 14]) -> usize {
    usize::from(eth[5] ^ eth[11] ^ eth[4] ^ eth[10])
}

/// A frame being switched: where it lies and where it comes from.
#[derive(Clone, Copy)]
struct FrameRef<'a> {
    /// The frame's first bytes as rewritten by identity mapping (they
    /// replace as many bytes of `segs`), or empty.
    head: &'a [u8],
    /// The buffers holding the frame, `skip` bytes in, `len` bytes long.
    segs: &'a [Seg],
    skip: u32,
    len: u32,
    src: PortIdx,
    vlan: u16,
    /// Picks the destination's RX queue.
    hash: usize,
    /// [`Shared::ident_gen`] when the frame was switched.
    gen: u32,
}

impl<'a> FrameRef<'a> {
    /// The frame's Ethernet header.
    #[inline]
    fn eth(&self) -> [u8; ETH_HLEN as usize] {
        match self.head.get(..ETH_HLEN as usize) {
            Some(h) => h.try_into().unwrap_or([0xff; ETH_HLEN as usize]),
            None => eth_header(self.segs, self.skip),
        }
    }

    /// Copy the frame's first `win.len()` bytes (at most `len`) to `win`.
    #[inline]
    fn copy_head(&self, win: &mut [u8]) {
        let n = win.len() as u32;
        // Usually the frame's head lies in one buffer (its first, or the
        // rewritten head): one copy, no cursor.
        let one = match (self.head.is_empty(), self.segs.first()) {
            (true, Some(first)) if first.len >= self.skip + n => {
                // SAFETY: the first segment holds `skip + n` readable
                // bytes (checked just above).
                Some(unsafe { first.ptr.add(self.skip as usize) } as *const u8)
            }
            (false, _) if self.head.len() as u32 >= n => Some(self.head.as_ptr()),
            _ => None,
        };
        match one {
            // SAFETY: `src` has `n` readable bytes (above), `win` is a
            // local buffer of `n` bytes, which guest memory cannot overlap.
            Some(src) => unsafe {
                std::ptr::copy_nonoverlapping(src, win.as_mut_ptr(), n as usize)
            },
            // SAFETY: `win` holds `n` bytes, at most `len` (the caller's
            // slice), which the frame holds.
            None => unsafe { FrameCursor::new(self).copy_to(win.as_mut_ptr(), n) },
        }
    }
}

/// Whether a frame switched under an older identity generation to `dst`
/// would now go elsewhere: its destination's identity moved away.
#[inline]
fn moved_away(eth: &[u8; ETH_HLEN as usize], vlan: u16, dst: PortIdx, ctx: &Ctx<'_>) -> bool {
    let dst_mac: &[u8; 6] = eth[0..6].try_into().unwrap_or(&[0xff; 6]);
    dst_mac[0] & 1 == 0
        && ctx
            .shared
            .fdb
            .lookup(dst_mac, vlan, ctx.now_ms)
            .is_some_and(|p| p != dst)
}

/// Hand a frame to `ports[pos]`: translated for its guest's identity,
/// through its egress limit, into its guest's RX buffers (or its egress
/// queue).
#[inline]
fn deliver(
    ports: &mut [NetPort],
    pos: usize,
    f: FrameRef<'_>,
    ctx: &mut Ctx<'_>,
) -> Result<(), DropReason> {
    let port = &ports[pos];
    if port.settings.over_mtu(f.len) {
        return Err(DropReason::MtuExceeded);
    }
    match port.settings.policy.as_deref() {
        Some(policy) if policy.translates() => {
            let mut win = [0u8; WINDOW];
            let w = (f.len as usize).min(WINDOW);
            f.copy_head(&mut win[..w]);
            idframe::map_egress(&mut win[..w], f.len as usize, policy, port.guest_mac());
            let f = FrameRef {
                head: &win[..w],
                ..f
            };
            deliver_gated(ports, pos, f, ctx)
        }
        _ => deliver_gated(ports, pos, f, ctx),
    }
}

/// [`deliver`] after translation.
#[inline(always)]
fn deliver_gated(
    ports: &mut [NetPort],
    pos: usize,
    f: FrameRef<'_>,
    ctx: &mut Ctx<'_>,
) -> Result<(), DropReason> {
    let port = &mut ports[pos];
    if let Some(q) = port.qos.as_deref_mut() {
        match q.egress_gate(f.len, ctx.now_ns) {
            Gate::Pass => {}
            Gate::Drop => return Err(DropReason::EgressPoliced),
            Gate::Queue => {
                let weight = ctx.shared.weight(f.src);
                let Some(queue) = q.queue.as_mut() else {
                    return Err(DropReason::EgressQueueFull);
                };
                let queued = queue.push(f.src, weight, f.len, f.hash as u32, f.gen, |buf| {
                    // SAFETY: `buf` is `f.len` bytes long, and the frame
                    // holds `f.len` bytes (checked by the caller when it
                    // took the frame).
                    unsafe { FrameCursor::new(&f).copy_to(buf.as_mut_ptr(), f.len) };
                });
                return if queued {
                    Ok(())
                } else {
                    Err(DropReason::EgressQueueFull)
                };
            }
        }
    }
    deliver_now(ports, pos, f, ctx)
}

/// Send the frames queued for `ports[pos]` that its egress tokens allow.
/// Returns the frames taken from the queue.
pub(super) fn drain_egress(ports: &mut [NetPort], pos: usize, ctx: &mut Ctx<'_>) -> usize {
    let Some(q) = ports[pos].qos.as_deref_mut() else {
        return 0;
    };
    let Some(queue) = q.queue.as_mut() else {
        return 0;
    };
    if queue.is_empty() {
        return 0;
    }
    // The frames are read from the buffer while the port is borrowed
    // mutably: take it out for the while (a pointer move).
    let buf = queue.take_buf();
    let mut sent = 0;
    loop {
        let port = &mut ports[pos];
        let Some(q) = port.qos.as_deref_mut() else {
            break;
        };
        let Some(front) = q.queue.as_ref().and_then(|x| x.front()) else {
            break;
        };
        // A frame the guest had no room for has paid already.
        if !q.rx_blocked && !q.release_queued(front.len, ctx.now_ns, &port.stats) {
            break;
        }
        let seg = [Seg {
            // SAFETY: `front` lies inside `buf` (the queue placed it there).
            ptr: unsafe { buf.as_ptr().add(front.off as usize) } as *mut u8,
            len: front.len,
            writable: false,
        }];
        let f = FrameRef {
            head: &[],
            segs: &seg,
            skip: 0,
            len: front.len,
            src: front.src,
            vlan: port.settings.vlan,
            hash: front.hash as usize,
            gen: front.gen,
        };
        let res = if f.gen != ctx.gen && moved_away(&f.eth(), f.vlan, port.idx, ctx) {
            Err(DropReason::IdentityMoved)
        } else {
            deliver_now(ports, pos, f, ctx)
        };
        let port = &mut ports[pos];
        let Some(q) = port.qos.as_deref_mut() else {
            break;
        };
        match res {
            Err(DropReason::NoRxBuffer) => {
                // Keep it for when the guest posts buffers (its tokens are
                // spent: it goes first then).
                q.rx_blocked = true;
                break;
            }
            Err(why) => port.stats.count_drop(why),
            Ok(()) => {}
        }
        q.rx_blocked = false;
        if let Some(queue) = q.queue.as_mut() {
            queue.pop();
        }
        sent += 1;
    }
    if let Some(queue) = ports[pos].qos.as_deref_mut().and_then(|q| q.queue.as_mut()) {
        queue.put_buf(buf);
    }
    sent
}

/// Copy a frame into the RX buffers of `ports[pos]`, keeping the port's
/// RX stall clock.
#[inline]
fn deliver_now(
    ports: &mut [NetPort],
    pos: usize,
    f: FrameRef<'_>,
    ctx: &mut Ctx<'_>,
) -> Result<(), DropReason> {
    let res = copy_to_guest(ports, pos, f, ctx);
    let port = &mut ports[pos];
    match res {
        Ok(()) if port.stalled => {
            port.stalled = false;
            port.stats.rx_drained();
        }
        Err(DropReason::NoRxBuffer) if !port.stalled => {
            port.stalled = true;
            port.stats.rx_stalled(ctx.now_ms);
        }
        _ => {}
    }
    res
}

/// Copy a frame into the RX buffers of `ports[pos]`.
#[inline]
fn copy_to_guest(
    ports: &mut [NetPort],
    pos: usize,
    f: FrameRef<'_>,
    ctx: &mut Ctx<'_>,
) -> Result<(), DropReason> {
    let (len, hash) = (f.len, f.hash);
    let port = &mut ports[pos];
    if port.broken || port.n_rx_active == 0 {
        return Err(DropReason::NoRxBuffer);
    }
    let q = usize::from(port.rx_active[hash % port.n_rx_active]);
    let hdr_len = port.hdr_len;
    let mrg = port.features.mrg_rxbuf;
    let Some(ring) = port.rx[q].as_mut() else {
        return Err(DropReason::NoRxBuffer);
    };
    let need = hdr_len + len;
    let chains = &mut ctx.scratch.rx_chains;
    let mut n = 0usize;
    let mut got = 0u32;
    let mut fault: Option<RingFault> = None;
    let mut consumed_bad = false;
    let mut result = Ok(());
    while got < need {
        if n == MAX_RX_CHAINS {
            result = Err(DropReason::RxBufferTooSmall);
            break;
        }
        match ring.avail_pending() {
            Ok(0) => {
                result = Err(DropReason::NoRxBuffer);
                break;
            }
            Ok(_) => {}
            Err(f) => {
                fault = Some(f);
                break;
            }
        }
        let head = match ring.pop_head() {
            Ok(h) => h,
            Err(f) => {
                fault = Some(f);
                break;
            }
        };
        let ok = ring
            .walk(head, Direction::Writable, u32::MAX, &mut chains[n])
            .is_ok()
            && chains[n].total > 0;
        if !ok {
            if n == 0 {
                // Consume the bad buffer so the ring moves on.
                ring.push_used(head, 0);
                consumed_bad = true;
            } else {
                ring.unpop();
            }
            result = Err(DropReason::BadRxDescriptor);
            break;
        }
        got = got.saturating_add(chains[n].total);
        n += 1;
        if !mrg && got < need {
            result = Err(DropReason::RxBufferTooSmall);
            break;
        }
    }
    if let Some(f) = fault {
        for _ in 0..n {
            ring.unpop();
        }
        port.mark_broken(&f.to_string());
        return Err(DropReason::BadRxDescriptor);
    }
    if let Err(e) = result {
        for _ in 0..n {
            ring.unpop();
        }
        if consumed_bad {
            ctx.mark_dirty(ports, pos, q);
        }
        return Err(e);
    }
    // Header: all zero but num_buffers.
    let mut hdr = [0u8; 12];
    if hdr_len == 12 {
        hdr[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    }
    let hdr_seg = [Seg {
        ptr: hdr.as_mut_ptr(),
        len: hdr_len,
        writable: false,
    }];
    let mut hdr_cur = Cursor::new(&hdr_seg, 0);
    let mut src_cur = FrameCursor::new(&f);
    let mut left_hdr = hdr_len;
    let mut left = len;
    // Usually the first buffer holds the whole header: write it in place.
    let mut first_off = 0u32;
    let first = chains[0].segs[0];
    if first.len >= hdr_len {
        // SAFETY: the first buffer has at least `hdr_len` (10 or 12, at most
        // `hdr.len()`) writable bytes; `hdr` is a local array.
        unsafe { std::ptr::copy_nonoverlapping(hdr.as_ptr(), first.ptr, hdr_len as usize) };
        left_hdr = 0;
        first_off = hdr_len;
    }
    for k in 0..n {
        let mut written = 0u32;
        for (i, s) in chains[k].segs().iter().enumerate() {
            let mut off = if k == 0 && i == 0 { first_off } else { 0 };
            while off < s.len && left_hdr + left > 0 {
                let room = s.len - off;
                // SAFETY: `s.ptr + off` has `room` writable bytes (the walk
                // translated the whole descriptor); the source cursors hold at
                // least `left_hdr` and `left` bytes.
                unsafe {
                    if left_hdr > 0 {
                        let t = room.min(left_hdr);
                        hdr_cur.copy_to(s.ptr.add(off as usize), t);
                        left_hdr -= t;
                        off += t;
                    } else {
                        let t = room.min(left);
                        src_cur.copy_to(s.ptr.add(off as usize), t);
                        left -= t;
                        off += t;
                    }
                }
            }
            written += off;
            if left_hdr + left == 0 {
                break;
            }
        }
        ctx.scratch.rx_used[k] = written;
    }
    let port = &mut ports[pos];
    let Some(ring) = port.rx[q].as_mut() else {
        return Err(DropReason::NoRxBuffer);
    };
    for k in 0..n {
        ring.push_used(ctx.scratch.rx_chains[k].head, ctx.scratch.rx_used[k]);
    }
    // Start fetching the next buffer now, in the shadow of other work.
    ring.prefetch_next();
    port.stats.add_tx(u64::from(len));
    ctx.mark_dirty(ports, pos, q);
    Ok(())
}

/// Hand a frame to the worker that owns `dst` (or, with [`FLOOD`], to a worker to flood).
#[inline]
fn send_remote(
    worker: usize,
    f: FrameRef<'_>,
    dst: PortIdx,
    ctx: &mut Ctx<'_>,
) -> Result<(), DropReason> {
    let mb = &ctx.shared.mailboxes[worker];
    let Some(mut buf) = mb.pool.pop() else {
        return Err(DropReason::RemoteQueueFull);
    };
    // SAFETY: pool buffers hold MAX_FRAME_LEN bytes and len <= MAX_FRAME_LEN
    // (checked when the chain was walked); the frame holds len bytes.
    unsafe { FrameCursor::new(&f).copy_to(buf.as_mut_ptr(), f.len) };
    let frame = Frame {
        buf,
        len: f.len,
        src: f.src,
        dst,
        vlan: f.vlan,
        gen: f.gen,
    };
    if let Err(f) = mb.frames.push(frame) {
        let _ = mb.pool.push(f.buf);
        return Err(DropReason::RemoteQueueFull);
    }
    ctx.remote_wake |= 1 << worker;
    Ok(())
}

/// Flood to every local port of `vlan` but `src_pos`, and to the other workers.
fn flood(
    ports: &mut [NetPort],
    src_pos: Option<usize>,
    f: FrameRef<'_>,
    to_remote: bool,
    ctx: &mut Ctx<'_>,
) {
    for pos in 0..ports.len() {
        if Some(pos) == src_pos || ports[pos].settings.vlan != f.vlan {
            continue;
        }
        if let Err(why) = deliver(ports, pos, f, ctx) {
            ports[pos].stats.count_drop(why);
        }
    }
    if to_remote {
        for w in 0..ctx.shared.mailboxes.len() {
            if w != ctx.worker {
                if let Err(why) = send_remote(w, f, FLOOD, ctx) {
                    if let Some(p) = src_pos {
                        ports[p].stats.count_drop(why);
                    }
                }
            }
        }
    }
}

/// Switch one frame that `ports[src_pos]` sent: its identities enforced
/// and translated first, when it carries any.
#[inline]
fn forward(
    ports: &mut [NetPort],
    src_pos: usize,
    src: &[Seg],
    skip: u32,
    len: u32,
    ctx: &mut Ctx<'_>,
) {
    let port = &ports[src_pos];
    let f = FrameRef {
        head: &[],
        segs: src,
        skip,
        len,
        src: port.idx,
        vlan: port.settings.vlan,
        hash: 0,
        gen: ctx.gen,
    };
    let Some(policy) = port.settings.policy.as_deref() else {
        return switch(ports, src_pos, f, ctx);
    };
    // The guest's addresses translated to its identity's, then its
    // sources checked, on a copy of the frame's head.
    let mut win = [0u8; WINDOW];
    let w = (len as usize).min(WINDOW);
    f.copy_head(&mut win[..w]);
    if let Err(v) = idframe::ingress(&mut win[..w], len as usize, policy, port.guest_mac()) {
        port.stats.count_drop(v.into());
        return;
    }
    let f = FrameRef {
        head: &win[..w],
        ..f
    };
    switch(ports, src_pos, f, ctx);
}

/// The L2 forwarding decision for a frame `ports[src_pos]` sent, and its
/// delivery.
#[inline(always)]
fn switch(ports: &mut [NetPort], src_pos: usize, f: FrameRef<'_>, ctx: &mut Ctx<'_>) {
    let eth = f.eth();
    let (src_idx, vlan) = (f.src, f.vlan);
    let dst_mac: &[u8; 6] = eth[0..6].try_into().unwrap_or(&[0xff; 6]);
    let src_mac: &[u8; 6] = eth[6..12].try_into().unwrap_or(&[0xff; 6]);
    if src_mac[0] & 1 == 0 {
        ctx.shared.fdb.learn(src_mac, vlan, src_idx, ctx.now_ms);
    }
    let f = FrameRef {
        hash: flow_hash(&eth),
        ..f
    };
    let known = if dst_mac[0] & 1 == 0 {
        ctx.shared.fdb.lookup(dst_mac, vlan, ctx.now_ms)
    } else {
        None
    };
    let Some(dst) = known else {
        flood(ports, Some(src_pos), f, true, ctx);
        return;
    };
    if dst == src_idx {
        ports[src_pos].stats.count_drop(DropReason::SamePort);
        return;
    }
    match ctx.local.get(usize::from(dst)).copied() {
        Some(pos) if pos != NOT_LOCAL => {
            let pos = usize::from(pos);
            if let Err(why) = deliver(ports, pos, f, ctx) {
                ports[pos].stats.count_drop(why);
            }
        }
        _ => match ctx.shared.owner(dst) {
            // Another worker's port, or one on its way to this worker (it
            // waits in this worker's mailbox until the port arrives).
            Some(w) => {
                if let Err(why) = send_remote(w, f, dst, ctx) {
                    ports[src_pos].stats.count_drop(why);
                }
            }
            // No guest on it (being detached, or an identity's port whose
            // guest is gone): dropped, as a switch does for a port whose
            // link is down, rather than flooded to every port (an
            // identity's traffic, unmapped, to all its neighbours).
            _ => ports[src_pos].stats.count_drop(DropReason::PortDown),
        },
    }
}

/// Take up to `pending` chains from a guest's TX ring and walk them, into
/// the scratch arrays. Their descriptor reads do not depend on each other,
/// so their cache misses overlap, and each frame's first bytes are
/// prefetched before they are switched. With `SUMS` (a port with QoS),
/// also add up what its budget and shaper need.
#[inline(always)]
fn take_batch<const SUMS: bool>(
    ring: &mut Vring,
    scratch: &mut Scratch,
    pending: usize,
    hdr_len: u32,
) -> (usize, Option<RingFault>, BatchSums) {
    let mut got = 0;
    let mut sums = BatchSums::default();
    while got < pending {
        let head = match ring.pop_head() {
            Ok(h) => h,
            Err(f) => return (got, Some(f), sums),
        };
        let chain = &mut scratch.tx_chains[got];
        let walked = ring.walk(
            head,
            Direction::Readable,
            hdr_len + MAX_FRAME_LEN as u32,
            chain,
        );
        if SUMS {
            sums.add(chain.total, walked.is_ok(), hdr_len);
        }
        scratch.tx_walked[got] = walked;
        if chain.nsegs > 0 {
            prefetch(chain.segs[0].ptr);
        }
        got += 1;
    }
    (got, None, sums)
}

/// Drain up to one batch from TX queue pair `q` of `ports[pos]`. Returns the
/// number of chains consumed.
pub(super) fn process_tx(ports: &mut [NetPort], pos: usize, q: usize, ctx: &mut Ctx<'_>) -> usize {
    let port = &mut ports[pos];
    if port.broken {
        return 0;
    }
    let hdr_len = port.hdr_len;
    if let Some(q) = port.qos.as_deref_mut() {
        q.flush_counters(&port.stats);
    }
    let Some(ring) = port.tx[q].as_mut() else {
        return 0;
    };
    let pending = match ring.avail_pending() {
        Ok(n) => usize::from(n.min(ctx.batch)).min(MAX_BATCH),
        Err(f) => {
            port.mark_broken(&f.to_string());
            return 0;
        }
    };
    // Pass 1: take the batch's chains and walk them.
    let (mut got, fault, sums) = if port.qos.is_some() {
        take_batch::<true>(ring, ctx.scratch, pending, hdr_len)
    } else {
        take_batch::<false>(ring, ctx.scratch, pending, hdr_len)
    };
    // The port's share and ingress shaper admit a prefix of the batch; the
    // rest goes back to the guest's ring (lossless), in order.
    if let Some(q) = port.qos.as_deref_mut() {
        let keep = q.admit_ingress(
            &sums,
            &ctx.scratch.tx_chains[..got],
            &ctx.scratch.tx_walked[..got],
            hdr_len,
            ctx.now_ns,
            &port.stats,
        );
        for _ in keep..got {
            ring.unpop();
        }
        got = keep;
    }
    if let Some(f) = fault {
        port.mark_broken(&f.to_string());
    }
    // Pass 2: switch them.
    let policing = port.qos.as_ref().is_some_and(|q| q.polices_ingress());
    let metered = port.qos.as_ref().is_some_and(|q| q.ingress.is_some());
    let (mut passed, mut passed_bytes) = (0u64, 0u64);
    for k in 0..got {
        let port = &mut ports[pos];
        let total = ctx.scratch.tx_chains[k].total;
        match ctx.scratch.tx_walked[k] {
            Err(ChainError::TooBig) => port.stats.count_drop(DropReason::OversizedFrame),
            Err(_) => port.stats.count_drop(DropReason::BadTxDescriptor),
            Ok(()) if total < hdr_len + ETH_HLEN => port.stats.count_drop(DropReason::ShortFrame),
            Ok(()) if port.settings.over_mtu(total - hdr_len) => {
                port.stats.count_drop(DropReason::MtuExceeded)
            }
            Ok(())
                if policing
                    && port
                        .qos
                        .as_deref_mut()
                        .is_some_and(|q| !q.police_ingress(total - hdr_len, ctx.now_ns)) =>
            {
                port.stats.count_drop(DropReason::IngressPoliced)
            }
            Ok(()) => {
                let len = total - hdr_len;
                port.stats.add_rx(u64::from(len));
                passed += 1;
                passed_bytes += u64::from(len);
                // The chain's segments point into this port's memory, which
                // stays mapped: memory changes are commands, handled between batches.
                let chain = &ctx.scratch.tx_chains[k];
                let (segs_ptr, nsegs) = (chain.segs.as_ptr(), chain.nsegs);
                // SAFETY: `tx_chains` is not written until the next batch,
                // and `forward` only writes `rx_chains`/`rx_used` of the
                // scratch, so this view of the segments stays valid.
                let segs = unsafe { std::slice::from_raw_parts(segs_ptr, nsegs) };
                forward(ports, pos, segs, hdr_len, len, ctx);
            }
        }
    }
    if metered {
        let stats = &ports[pos].stats;
        stats.add_qos(QosCounter::IngressPackets, passed);
        stats.add_qos(QosCounter::IngressBytes, passed_bytes);
    }
    let port = &mut ports[pos];
    let notify_on_empty = port.features.notify_on_empty;
    if let Some(ring) = port.tx[q].as_mut() {
        for chain in &ctx.scratch.tx_chains[..got] {
            ring.push_used(chain.head, 0);
        }
        let signalled = ring.publish_used();
        if got > 0 && notify_on_empty && !signalled && ring.avail_pending() == Ok(0) {
            ring.signal();
        }
    }
    got
}

/// Deliver a frame another worker handed over. Returns the buffer.
pub(super) fn deliver_remote(ports: &mut [NetPort], frame: &Frame, ctx: &mut Ctx<'_>) {
    let seg = [Seg {
        ptr: frame.buf.as_ptr() as *mut u8,
        len: frame.len,
        writable: false,
    }];
    let eth = eth_header(&seg, 0);
    let f = FrameRef {
        head: &[],
        segs: &seg,
        skip: 0,
        len: frame.len,
        src: frame.src,
        vlan: frame.vlan,
        hash: flow_hash(&eth),
        gen: frame.gen,
    };
    if frame.dst == FLOOD {
        let src_pos = ctx
            .local
            .get(usize::from(frame.src))
            .copied()
            .filter(|p| *p != NOT_LOCAL)
            .map(usize::from);
        flood(ports, src_pos, f, false, ctx);
        return;
    }
    if let Some(pos) = ctx
        .local
        .get(usize::from(frame.dst))
        .copied()
        .filter(|p| *p != NOT_LOCAL)
    {
        let pos = usize::from(pos);
        let res = if frame.gen != ctx.gen && moved_away(&eth, frame.vlan, frame.dst, ctx) {
            Err(DropReason::IdentityMoved)
        } else {
            deliver(ports, pos, f, ctx)
        };
        if let Err(why) = res {
            ports[pos].stats.count_drop(why);
        }
        return;
    }
    // The port moved on: pass the frame to its worker now.
    if let Some(w) = ctx.shared.owner(frame.dst).filter(|w| *w != ctx.worker) {
        let _ = send_remote(w, f, frame.dst, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(bufs: &mut [Vec<u8>]) -> Vec<Seg> {
        bufs.iter_mut()
            .map(|b| Seg {
                ptr: b.as_mut_ptr(),
                len: b.len() as u32,
                writable: false,
            })
            .collect()
    }

    #[test]
    fn cursor_copies_across_segments_after_a_skip() {
        let mut bufs = vec![vec![0u8, 1, 2], vec![], vec![3, 4, 5, 6], vec![7, 8, 9]];
        let s = segs(&mut bufs);
        let mut out = [0u8; 6];
        let mut cur = Cursor::new(&s, 2);
        // SAFETY: `out` has 6 bytes and the segments hold 10 - 2 bytes.
        unsafe { cur.copy_to(out.as_mut_ptr(), 6) };
        assert_eq!(out, [2, 3, 4, 5, 6, 7]);
        let mut rest = [0u8; 2];
        // SAFETY: 2 bytes remain.
        unsafe { cur.copy_to(rest.as_mut_ptr(), 2) };
        assert_eq!(rest, [8, 9]);
    }

    #[test]
    fn ethernet_header_may_straddle_descriptors() {
        // A 12-byte virtio header alone, then the frame split mid-MAC.
        let mut bufs = vec![vec![0u8; 12], (0u8..4).collect(), (4u8..20).collect()];
        let s = segs(&mut bufs);
        let eth = eth_header(&s, 12);
        assert_eq!(eth.to_vec(), (0u8..14).collect::<Vec<_>>());
    }
}
