//! The virtio-net guest: feature negotiation, queue set-up, frame TX and RX.
//!
//! Queue `2k` is the RX queue of pair `k` (the device writes into it) and
//! `2k + 1` its TX queue. Every descriptor owns one buffer slot in guest
//! memory, fixed at set-up: a TX frame is copied, after an all-zero
//! `virtio_net_hdr_v1`, into the slot of the descriptor it gets from the free
//! list; RX descriptors point at `rx_buf_len`-byte slots. `send`,
//! `send_burst`, `recv_into` and `reclaim_tx` allocate nothing.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VHOST_USER_MAX_VRINGS};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;
use super::ring::{RawQueue, SplitQueue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::{connect_retry, open_frontend, setup_vring, GuestError};

/// Length of `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 is always negotiated).
pub const NET_HDR_LEN: usize = 12;

/// Size of each TX descriptor's buffer slot: the header plus a frame of up to
/// `TX_BUF_LEN - NET_HDR_LEN` (9716) bytes, enough for jumbo frames.
pub const TX_BUF_LEN: usize = 9728;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFF: usize = 10;

const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
const F_MRG_RXBUF: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
const F_MQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// How long `connect` keeps trying while the socket is absent or refusing.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on waiting for one reply from the backend (only bounds a hang).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What kind of guest to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetGuestConfig {
    /// Entries per virtqueue (power of two, at most 32768).
    pub queue_size: u16,
    /// Bytes of guest memory.
    pub mem_size: usize,
    /// Ask for VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Ask for VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Size of each RX buffer (the first one of a frame holds the 12-byte
    /// header too).
    pub rx_buf_len: u32,
    /// Queue pairs; more than 1 needs VIRTIO_NET_F_MQ.
    pub queue_pairs: u16,
    /// Memory regions (memfds); more than 1 puts holes between them.
    pub mem_regions: usize,
}

impl Default for NetGuestConfig {
    fn default() -> Self {
        NetGuestConfig {
            queue_size: 256,
            mem_size: 32 << 20,
            mrg_rxbuf: true,
            event_idx: true,
            rx_buf_len: 2048,
            queue_pairs: 1,
            mem_regions: 1,
        }
    }
}

impl NetGuestConfig {
    fn validate(&self) -> Result<(), GuestError> {
        let bad = |m: String| Err(GuestError::InvalidConfig(m));
        if self.queue_pairs == 0 || u64::from(self.queue_pairs) * 2 > VHOST_USER_MAX_VRINGS {
            return bad(format!("queue_pairs {} out of range", self.queue_pairs));
        }
        if (self.rx_buf_len as usize) < NET_HDR_LEN {
            return bad(format!(
                "rx_buf_len {} cannot hold the {NET_HDR_LEN}-byte header",
                self.rx_buf_len
            ));
        }
        Ok(())
    }
}

/// What a peek at the next used RX entries found.
enum Peek {
    /// No complete frame.
    Nothing,
    /// A frame of `len` bytes (header excluded) in `bufs` used entries.
    Frame { bufs: u16, len: usize },
    /// `entries` used entries that do not make a valid frame.
    Bad { entries: u16 },
}

/// A virtio-net guest connected to a vhost-user backend.
pub struct NetGuest {
    // Field order is drop order: close the socket first.
    frontend: Frontend,
    rx: Vec<SplitQueue>,
    tx: Vec<SplitQueue>,
    mem: GuestMemory,
    cfg: NetGuestConfig,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    mrg: bool,
    refill: bool,
    tx_pair: usize,
    rx_turn: usize,
}

impl std::fmt::Debug for NetGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetGuest")
            .field("cfg", &self.cfg)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("mem", &self.mem)
            .finish_non_exhaustive()
    }
}

impl NetGuest {
    /// Connect to the backend listening on `path` (retrying for about 10 s
    /// while the socket is missing or refuses) and bring the device up.
    pub fn connect(path: &Path, cfg: NetGuestConfig) -> Result<Self, GuestError> {
        cfg.validate()?;
        let stream = connect_retry(path, CONNECT_DEADLINE)?;
        Self::from_stream(stream, cfg)
    }

    /// Wait up to `timeout` for a backend to connect to `listener` (a switch
    /// port in client mode), then bring the device up over that connection.
    pub fn accept(
        listener: &UnixListener,
        cfg: NetGuestConfig,
        timeout: Duration,
    ) -> Result<Self, GuestError> {
        cfg.validate()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout(left)) {
                Ok(0) => return Err(GuestError::Timeout),
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let (stream, _) = listener.accept()?;
        Self::from_stream(stream, cfg)
    }

    /// Bring the device up over an already connected vhost-user socket:
    /// SET_OWNER, feature and protocol-feature negotiation, SET_MEM_TABLE,
    /// then per queue SET_VRING_NUM/ADDR/BASE/CALL/KICK, and finally
    /// SET_VRING_ENABLE on every queue, with the RX rings already full.
    pub fn from_stream(stream: UnixStream, cfg: NetGuestConfig) -> Result<Self, GuestError> {
        cfg.validate()?;
        let pairs = cfg.queue_pairs as usize;
        let (mut fe, offered) = open_frontend(stream, REPLY_TIMEOUT)?;
        let mut want = F_VERSION_1 | F_PROTOCOL_FEATURES;
        if cfg.mrg_rxbuf {
            want |= F_MRG_RXBUF;
        }
        if cfg.event_idx {
            want |= F_EVENT_IDX;
        }
        if pairs > 1 {
            if offered & F_MQ == 0 {
                return Err(GuestError::Unsupported("VIRTIO_NET_F_MQ".into()));
            }
            want |= F_MQ;
        }
        let features = want & offered;
        fe.set_features(features)?;

        let pf_offered = fe.get_protocol_features()?;
        let protocol_features = pf_offered
            & (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        fe.set_protocol_features(protocol_features)?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request waits for the backend's verdict, so a
            // refused request fails here and `connect` returning means the
            // backend has taken the whole set-up.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if pairs > 1 {
            if !protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                return Err(GuestError::Unsupported("VHOST_USER_PROTOCOL_F_MQ".into()));
            }
            let n = fe.get_queue_num()?;
            if n < 2 * pairs as u64 {
                return Err(GuestError::Unsupported(format!(
                    "{} queues (backend has {n})",
                    2 * pairs
                )));
            }
        }

        let event_idx = features & F_EVENT_IDX != 0;
        let mrg = features & F_MRG_RXBUF != 0;
        let mem = GuestMemory::new(cfg.mem_size, cfg.mem_regions)?;
        let mut rx = Vec::with_capacity(pairs);
        let mut tx = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            let mut q = SplitQueue::new(&mem, cfg.queue_size, cfg.rx_buf_len, event_idx)?;
            while let Some(id) = q.free.pop() {
                q.post_slot(id, cfg.rx_buf_len, VRING_DESC_F_WRITE);
                q.push_avail(id);
            }
            q.publish();
            rx.push(q);
            tx.push(SplitQueue::new(
                &mem,
                cfg.queue_size,
                TX_BUF_LEN as u32,
                event_idx,
            )?);
        }

        fe.set_mem_table(&mem.vhost_regions())?;
        for k in 0..2 * pairs {
            let q = if k % 2 == 0 { &rx[k / 2] } else { &tx[k / 2] };
            setup_vring(&mut fe, &mem, k, q)?;
        }
        for k in 0..2 * pairs {
            fe.set_vring_enable(k, true)?;
        }
        // Tell the device about the RX buffers, as a driver does after
        // filling its rings (subject to the device's suppression wishes).
        for q in &mut rx {
            q.notify();
        }
        log::debug!(
            "guest up: features {features:#x}, protocol features {:#x}, {pairs} pair(s)",
            protocol_features.bits()
        );
        Ok(NetGuest {
            frontend: fe,
            rx,
            tx,
            mem,
            cfg,
            features,
            protocol_features,
            mrg,
            refill: true,
            tx_pair: 0,
            rx_turn: 0,
        })
    }

    /// The configuration this guest was made with.
    pub fn config(&self) -> &NetGuestConfig {
        &self.cfg
    }

    /// Virtio features acked with SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.rx.len()
    }

    /// Make `send`, `send_burst` and `send_chain` use the TX queue of pair
    /// `pair` (default 0).
    ///
    /// # Panics
    ///
    /// If `pair` is not below [`queue_pairs`](Self::queue_pairs).
    pub fn set_tx_queue_pair(&mut self, pair: usize) {
        assert!(pair < self.tx.len(), "no queue pair {pair}");
        self.tx_pair = pair;
    }

    /// Send one frame: reclaims completed TX buffers first, copies an
    /// all-zero header and `frame` into one descriptor, publishes it and
    /// kicks if the device asked for it.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), GuestError> {
        let q = &mut self.tx[self.tx_pair];
        q.reclaim();
        enqueue_tx(q, frame)?;
        q.notify();
        Ok(())
    }

    /// Queue as many of `frames` as fit (stopping at the first that does
    /// not: ring full or frame too large), then publish and kick once.
    /// Returns how many were queued.
    pub fn send_burst(&mut self, frames: &[&[u8]]) -> usize {
        let q = &mut self.tx[self.tx_pair];
        q.reclaim();
        let mut n = 0;
        for f in frames {
            if enqueue_tx(q, f).is_err() {
                break;
            }
            n += 1;
        }
        if n > 0 {
            q.notify();
        }
        n
    }

    /// Queue as many of `frames` as fit on the TX queue without publishing
    /// them: the device sees them only after [`publish_tx`](Self::publish_tx)
    /// (or the next send). Staging a backlog on several guests and
    /// publishing them together makes them all backlogged from the
    /// device's first look. Returns how many were queued.
    pub fn stage_tx(&mut self, frames: &[&[u8]]) -> usize {
        let q = &mut self.tx[self.tx_pair];
        q.reclaim();
        frames
            .iter()
            .take_while(|f| enqueue_tx(q, f).is_ok())
            .count()
    }

    /// Publish the frames staged with [`stage_tx`](Self::stage_tx), without
    /// kicking; [`kick`](Self::kick) the TX queue (`2 * pair + 1`) next.
    pub fn publish_tx(&mut self) {
        self.tx[self.tx_pair].publish();
    }

    /// Send one frame split over one descriptor per segment. The header is
    /// prepended to the first segment, so an empty first segment makes a
    /// header-only first descriptor: `send_chain(&[&[], frame])`.
    pub fn send_chain(&mut self, segments: &[&[u8]]) -> Result<(), GuestError> {
        let q = &mut self.tx[self.tx_pair];
        q.reclaim();
        let k = segments.len().max(1);
        if k > q.free.len() {
            return Err(GuestError::RingFull);
        }
        let first = segments.first().copied().unwrap_or(&[]);
        for (i, s) in segments.iter().enumerate() {
            let len = s.len() + if i == 0 { NET_HDR_LEN } else { 0 };
            if len > TX_BUF_LEN {
                return Err(GuestError::FrameTooLarge {
                    len,
                    max: TX_BUF_LEN,
                });
            }
        }
        let Some(head) = q.free.pop() else {
            return Err(GuestError::RingFull);
        };
        fill_slot(q, head, NET_HDR_LEN, first);
        let (mut prev, mut prev_len) = (head, NET_HDR_LEN + first.len());
        for s in segments.iter().skip(1) {
            let Some(d) = q.free.pop() else {
                // Cannot happen (k descriptors were free), but if it did,
                // give the partial chain back rather than leak it.
                let mut x = head;
                loop {
                    let nx = q.next[x as usize];
                    q.free.push(x);
                    if x == prev {
                        break;
                    }
                    x = nx;
                }
                return Err(GuestError::RingFull);
            };
            fill_slot(q, d, 0, s);
            let gpa = q.slots[prev as usize].gpa;
            q.write_desc(prev, gpa, prev_len as u32, VRING_DESC_F_NEXT, d);
            q.next[prev as usize] = d;
            (prev, prev_len) = (d, s.len());
        }
        let gpa = q.slots[prev as usize].gpa;
        q.write_desc(prev, gpa, prev_len as u32, 0, 0);
        q.chain[head as usize] = k as u16;
        q.push_avail(head);
        q.notify();
        Ok(())
    }

    /// Take back the buffers of every TX queue that the device has used.
    /// Returns how many frames completed.
    pub fn reclaim_tx(&mut self) -> usize {
        self.tx.iter_mut().map(SplitQueue::reclaim).sum()
    }

    /// Frames queued on TX queues and not yet completed by the device.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.iter().map(SplitQueue::in_flight).sum()
    }

    /// Used RX entries published by the device and not yet consumed (a
    /// mergeable frame counts once per buffer).
    pub fn rx_pending(&self) -> usize {
        self.rx.iter().map(|q| q.pending() as usize).sum()
    }

    /// Receive one frame (without its header) if one is complete, from any
    /// RX queue. Consumed RX buffers are given back to the device unless
    /// refill is paused.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        loop {
            let (qi, bufs, len) = self.next_frame()?;
            let mut v = vec![0; len];
            let (n, bad) = self.consume(qi, bufs, &mut v);
            if bad == 0 && n == len {
                return Some(v);
            }
            // The device changed the entries under us; count and move on.
            self.rx[qi].errors += 1;
        }
    }

    /// [`try_recv`](Self::try_recv) into `buf`, without allocating. Returns
    /// the frame's length; if that exceeds `buf.len()`, only the first
    /// `buf.len()` bytes were copied.
    pub fn recv_into(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let (qi, bufs, len) = self.next_frame()?;
            let (n, bad) = self.consume(qi, bufs, buf);
            if bad == 0 && n == len {
                return Some(len);
            }
            self.rx[qi].errors += 1;
        }
    }

    /// Wait up to `timeout` for a frame, sleeping on the RX call eventfds
    /// (with guest interrupts enabled only while asleep).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut stalled = false;
        loop {
            if let Some(f) = self.try_recv() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pending = false;
            for q in &mut self.rx {
                pending |= q.enable_interrupts();
            }
            if pending {
                // Entries arrived meanwhile, or the device published part of
                // a frame only: retry, but do not spin on the latter.
                if stalled {
                    std::thread::sleep(Duration::from_millis(1));
                }
                stalled = true;
            } else {
                stalled = false;
                self.wait_call(left);
            }
            for q in &mut self.rx {
                drain(&q.call);
                q.disable_interrupts();
            }
        }
    }

    fn wait_call(&self, left: Duration) {
        let timeout = poll_timeout(left);
        let mut fds: Vec<PollFd> = self
            .rx
            .iter()
            .map(|q| {
                // SAFETY: the eventfd is owned by the queue, which outlives
                // `fds` (both live only during this call, borrowed from self).
                let fd = unsafe { BorrowedFd::borrow_raw(q.call.as_raw_fd()) };
                PollFd::new(fd, PollFlags::POLLIN)
            })
            .collect();
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                log::warn!("poll on call eventfds failed: {e}");
            }
        }
    }

    /// Pause (`false`) or resume (`true`) giving consumed RX buffers back:
    /// a guest that stops refilling its RX ring. Resuming posts every
    /// buffer taken meanwhile.
    pub fn set_rx_refill(&mut self, on: bool) {
        self.refill = on;
        if !on {
            return;
        }
        let len = self.cfg.rx_buf_len;
        for q in &mut self.rx {
            let mut any = false;
            while let Some(id) = q.free.pop() {
                q.post_slot(id, len, VRING_DESC_F_WRITE);
                q.push_avail(id);
                any = true;
            }
            if any {
                q.notify();
            }
        }
    }

    /// Direct access to pair 0's TX queue.
    pub fn raw_tx(&mut self) -> RawQueue<'_> {
        RawQueue { q: &mut self.tx[0] }
    }

    /// Direct access to pair 0's RX queue.
    pub fn raw_rx(&mut self) -> RawQueue<'_> {
        RawQueue { q: &mut self.rx[0] }
    }

    /// Direct access to vhost-user queue `queue` (even: RX, odd: TX).
    pub fn raw_queue(&mut self, queue: usize) -> Option<RawQueue<'_>> {
        self.queue_mut(queue).map(|q| RawQueue { q })
    }

    fn queue(&self, queue: usize) -> Option<&SplitQueue> {
        let v = if queue % 2 == 0 { &self.rx } else { &self.tx };
        v.get(queue / 2)
    }

    fn queue_mut(&mut self, queue: usize) -> Option<&mut SplitQueue> {
        let v = if queue % 2 == 0 {
            &mut self.rx
        } else {
            &mut self.tx
        };
        v.get_mut(queue / 2)
    }

    /// Guest memory (shared with the backend).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The vhost-user connection, for protocol-level tests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// GET_VRING_BASE for `queue` (which stops the ring in the backend).
    pub fn get_vring_base(&mut self, queue: usize) -> Result<u32, GuestError> {
        Ok(self.frontend.get_vring_base(queue)?)
    }

    /// Kick queue `queue` unconditionally (no-op for a queue that does not
    /// exist).
    pub fn kick(&mut self, queue: usize) {
        if let Some(q) = self.queue_mut(queue) {
            q.kick_now();
        }
    }

    /// Kicks this guest has sent on `queue` (0 for a queue that does not
    /// exist).
    pub fn kicks(&self, queue: usize) -> u64 {
        self.queue(queue).map_or(0, |q| q.kicks)
    }

    /// The call eventfd of `queue`: what the backend signals. Reading it
    /// returns (and resets) the count of signals not yet drained.
    pub fn call_fd(&self, queue: usize) -> Option<&EventFd> {
        self.queue(queue).map(|q| &q.call)
    }

    /// The kick eventfd of `queue`.
    pub fn kick_fd(&self, queue: usize) -> Option<&EventFd> {
        self.queue(queue).map(|q| &q.kick)
    }

    /// Device misbehaviour seen so far: used entries naming descriptors the
    /// device does not own, lengths beyond the buffer, bad `num_buffers`.
    pub fn device_errors(&self) -> u64 {
        self.rx.iter().chain(&self.tx).map(|q| q.errors).sum()
    }

    /// Close the connection and free guest memory.
    pub fn disconnect(self) {
        drop(self);
    }

    /// Find the next complete frame, consuming (and counting) bad entries on
    /// the way. Returns (RX queue, used entries, frame length).
    fn next_frame(&mut self) -> Option<(usize, u16, usize)> {
        let n = self.rx.len();
        for k in 0..n {
            let qi = (self.rx_turn + k) % n;
            loop {
                match peek(&self.rx[qi], self.mrg) {
                    Peek::Nothing => break,
                    Peek::Frame { bufs, len } => {
                        self.rx_turn = (qi + 1) % n;
                        return Some((qi, bufs, len));
                    }
                    Peek::Bad { entries } => {
                        self.rx[qi].errors += 1;
                        self.consume(qi, entries, &mut []);
                    }
                }
            }
        }
        None
    }

    /// Consume `bufs` used entries of RX queue `qi`, copying the frame they
    /// hold (header skipped) into `out` as far as it fits, and give the
    /// buffers back. Returns (frame length, entries that were not valid).
    fn consume(&mut self, qi: usize, bufs: u16, out: &mut [u8]) -> (usize, u16) {
        let refill = self.refill;
        let q = &mut self.rx[qi];
        let (mut total, mut bad) = (0usize, 0u16);
        for k in 0..bufs {
            let (id, len) = q.used_elem(q.last_used);
            q.last_used = q.last_used.wrapping_add(1);
            if !rx_entry_ok(q, id, len) {
                bad += 1;
                continue;
            }
            let skip = if k == 0 { NET_HDR_LEN } else { 0 };
            let data = (len as usize).saturating_sub(skip);
            let slot = q.slots[id as usize];
            let room = out.len().saturating_sub(total).min(data);
            if room > 0 {
                // SAFETY: the device returned descriptor `id`, so its slot
                // (`slot.len` mapped bytes, kept alive by the queue's
                // GuestMemory) is ours again; `skip + room <= len <=
                // slot.len` (checked by `rx_entry_ok`); `out[total..total +
                // room]` is in bounds because `room <= out.len() - total`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        slot.host.add(skip),
                        out.as_mut_ptr().add(total),
                        room,
                    )
                };
            }
            total += data;
            q.chain[id as usize] = 0;
            if refill {
                q.post_slot(id as u16, slot.len, VRING_DESC_F_WRITE);
                q.push_avail(id as u16);
            } else {
                q.free.push(id as u16);
            }
        }
        q.refresh_used_event();
        if refill {
            q.notify();
        }
        (total, bad)
    }
}

/// Whether used entry (`id`, `len`) returns an RX buffer the device owns,
/// within its size.
fn rx_entry_ok(q: &SplitQueue, id: u32, len: u32) -> bool {
    id < u32::from(q.size()) && q.chain[id as usize] != 0 && len <= q.slots[id as usize].len
}

fn peek(q: &SplitQueue, mrg: bool) -> Peek {
    let pending = q.pending();
    if pending == 0 {
        return Peek::Nothing;
    }
    let first = q.last_used;
    let (id, len) = q.used_elem(first);
    if !rx_entry_ok(q, id, len) || (len as usize) < NET_HDR_LEN {
        return Peek::Bad { entries: 1 };
    }
    let bufs = if mrg {
        let slot = q.slots[id as usize];
        // SAFETY: the buffer is ours (returned by the device) and holds at
        // least NET_HDR_LEN bytes (checked above); slots are 64-byte aligned
        // so the u16 at offset 10 is aligned.
        u16::from_le(unsafe { slot.host.add(NUM_BUFFERS_OFF).cast::<u16>().read_volatile() })
    } else {
        1
    };
    if bufs == 0 || bufs > q.size() {
        return Peek::Bad { entries: 1 };
    }
    if bufs > pending {
        // A device publishes a frame's buffers together; wait for the rest.
        return Peek::Nothing;
    }
    let mut total = len as usize - NET_HDR_LEN;
    for k in 1..bufs {
        let (id, len) = q.used_elem(first.wrapping_add(k));
        if !rx_entry_ok(q, id, len) {
            return Peek::Bad { entries: bufs };
        }
        total += len as usize;
    }
    Peek::Frame { bufs, len: total }
}

/// Copy a zero header (if `hdr` is NET_HDR_LEN, else nothing) and `data`
/// into descriptor `d`'s slot. The caller checked that it fits.
fn fill_slot(q: &mut SplitQueue, d: u16, hdr: usize, data: &[u8]) {
    let slot = q.slots[d as usize];
    debug_assert!(hdr + data.len() <= slot.len as usize);
    // SAFETY: descriptor `d` came off the free list, so the device does not
    // own its slot; the slot has `slot.len >= hdr + data.len()` mapped bytes
    // (checked by every caller), kept alive by the queue's GuestMemory;
    // `data` is ordinary memory, disjoint from the mapping.
    unsafe {
        std::ptr::write_bytes(slot.host, 0, hdr);
        std::ptr::copy_nonoverlapping(data.as_ptr(), slot.host.add(hdr), data.len());
    }
}

/// Put `frame` (after a zero header) in one descriptor and push it (not
/// published).
fn enqueue_tx(q: &mut SplitQueue, frame: &[u8]) -> Result<(), GuestError> {
    let len = NET_HDR_LEN + frame.len();
    if len > TX_BUF_LEN {
        return Err(GuestError::FrameTooLarge {
            len,
            max: TX_BUF_LEN,
        });
    }
    let head = q.free.pop().ok_or(GuestError::RingFull)?;
    fill_slot(q, head, NET_HDR_LEN, frame);
    q.post_slot(head, len as u32, 0);
    q.push_avail(head);
    Ok(())
}

/// `d` as a poll timeout, rounded up to whole milliseconds.
fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

fn drain(fd: &EventFd) {
    // Non-blocking: WouldBlock just means no signal was pending.
    let _ = fd.read();
}

/// An Ethernet frame: destination, source, EtherType, payload (no padding
/// to the 60-byte minimum, no FCS).
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eth_frame_layout() {
        let f = eth_frame([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], 0x0806, b"xyz");
        assert_eq!(f.len(), 17);
        assert_eq!(&f[0..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&f[6..12], &[7, 8, 9, 10, 11, 12]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..], b"xyz");
        assert_eq!(eth_frame([0xff; 6], [0; 6], 0x86dd, &[]).len(), 14);
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = NetGuestConfig::default();
        assert_eq!(
            (
                c.queue_size,
                c.mem_size,
                c.rx_buf_len,
                c.queue_pairs,
                c.mem_regions
            ),
            (256, 32 << 20, 2048, 1, 1)
        );
        assert!(c.mrg_rxbuf && c.event_idx);
        assert!(c.validate().is_ok());
        let bad = NetGuestConfig {
            rx_buf_len: 4,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = NetGuestConfig {
            queue_pairs: 0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn guest_is_send() {
        fn send<T: Send>() {}
        send::<NetGuest>();
    }
}
