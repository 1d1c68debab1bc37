//! The virtio-blk guest: feature negotiation, config space, request queues,
//! synchronous and pipelined block requests, and config-change notices.
//!
//! Every descriptor owns one `segment_size`-byte buffer slot in guest memory,
//! fixed at set-up and aligned to the largest power of two (up to 4096) that
//! divides `segment_size`, so that whole-page segments suit a backend doing
//! direct I/O. A request is one chain: the 16-byte `virtio_blk_outhdr`
//! in the head's slot, one descriptor per data segment (device-readable
//! segments are copied into their slots, device-writable ones are read back
//! at completion), and a last one-byte device-writable descriptor for the
//! status, which is preset to [`STATUS_UNWRITTEN`] so that a device that
//! completes a request without writing it is visible. Requests complete in
//! any order; each gets a tag of its own.
//!
//! Config changes arrive on the backend request channel
//! (VHOST_USER_PROTOCOL_F_BACKEND_REQ), set up with the `vhost` crate's
//! [`FrontendReqHandler`] when the backend offers it.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VHOST_USER_MAX_VRINGS,
};
use vhost::vhost_user::{
    Error as VuError, Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend,
    VhostUserFrontendReqHandler, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk as vb;

use super::memory::GuestMemory;
use super::ring::{RawQueue, SplitQueue, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::GuestError;

/// Bytes of a virtio-blk sector (the unit of `sector` and of `capacity`).
pub const SECTOR_SIZE: u64 = 512;
/// Length of `virtio_blk_outhdr` (type, ioprio, sector).
pub const BLK_HDR_LEN: usize = 16;
/// Length of a GET_ID answer.
pub const BLK_ID_BYTES: usize = 20;
/// Length of one discard / write-zeroes segment.
pub const BLK_RANGE_LEN: usize = 16;
/// Bytes of config space read: `virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding.
pub const BLK_CONFIG_LEN: usize = 60;
/// Offset of `writeback` in `virtio_blk_config`.
pub const WRITEBACK_OFFSET: u32 = 32;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = vb::VIRTIO_BLK_T_IN;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
/// Request type: get the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
/// Request type: discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
/// Request type: write zeroes to ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// Status: I/O error (or a request the device refuses).
pub const VIRTIO_BLK_S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
/// What the status byte holds until the device writes it.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// Feature bit: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = vb::VIRTIO_BLK_F_SIZE_MAX;
/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = vb::VIRTIO_BLK_F_SEG_MAX;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = vb::VIRTIO_BLK_F_RO;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = vb::VIRTIO_BLK_F_BLK_SIZE;
/// Feature bit: flush is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = vb::VIRTIO_BLK_F_FLUSH;
/// Feature bit: the topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = vb::VIRTIO_BLK_F_TOPOLOGY;
/// Feature bit: `writeback` can be set.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = vb::VIRTIO_BLK_F_CONFIG_WCE;
/// Feature bit: several request queues (`num_queues`).
pub const VIRTIO_BLK_F_MQ: u32 = vb::VIRTIO_BLK_F_MQ;
/// Feature bit: discard is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = vb::VIRTIO_BLK_F_DISCARD;
/// Feature bit: write-zeroes is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_F_WRITE_ZEROES;
/// Feature bit: VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const F_MQ: u64 = 1 << VIRTIO_BLK_F_MQ;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// The device features this driver takes when offered (besides VERSION_1,
/// EVENT_IDX and PROTOCOL_FEATURES).
const F_BLK_WANTED: u64 = 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_CONFIG_WCE
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// How long `connect` keeps trying while the socket is absent or refusing.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on waiting for one reply from the backend (only bounds a hang).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one synchronous request (only bounds a hang).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What kind of guest to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkGuestConfig {
    /// Request queues (more than 1 needs VIRTIO_BLK_F_MQ and the MQ protocol
    /// feature).
    pub queues: u16,
    /// Entries per virtqueue (power of two, at most 32768).
    pub queue_size: u16,
    /// Bytes of guest memory. Each queue needs `queue_size * segment_size`
    /// bytes of buffers plus its ring.
    pub mem_size: usize,
    /// Ask for VIRTIO_RING_F_EVENT_IDX (negotiated only if offered).
    pub event_idx: bool,
    /// Set up the backend request channel if the backend offers
    /// VHOST_USER_PROTOCOL_F_BACKEND_REQ, so that config changes are heard.
    pub backend_req: bool,
    /// Size of each descriptor's buffer slot: the largest data segment.
    pub segment_size: u32,
    /// Virtio feature bits never to negotiate, even when offered.
    pub mask_features: u64,
}

impl Default for BlkGuestConfig {
    fn default() -> Self {
        BlkGuestConfig {
            queues: 1,
            queue_size: 128,
            mem_size: 64 << 20,
            event_idx: true,
            backend_req: true,
            segment_size: 64 << 10,
            mask_features: 0,
        }
    }
}

impl BlkGuestConfig {
    fn validate(&self) -> Result<(), GuestError> {
        let bad = |m: String| Err(GuestError::InvalidConfig(m));
        if self.queues == 0 || u64::from(self.queues) > VHOST_USER_MAX_VRINGS {
            return bad(format!("queues {} out of range", self.queues));
        }
        if (self.segment_size as usize) < BLK_HDR_LEN {
            return bad(format!(
                "segment_size {} cannot hold the {BLK_HDR_LEN}-byte header",
                self.segment_size
            ));
        }
        if self.queue_size < 3 {
            return bad(format!(
                "queue_size {} cannot hold a request with data",
                self.queue_size
            ));
        }
        Ok(())
    }
}

/// The device's `virtio_blk_config`, as read with GET_CONFIG. Fields whose
/// feature was not negotiated are reported as the device wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest data segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size in blocks.
    pub opt_io_size: u32,
    /// Write-back (1) or write-through (0) cache (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest discard in sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most discard segments in one request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments in one request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parse the first [`BLK_CONFIG_LEN`] bytes of config space (shorter
    /// input reads as zeroes past its end).
    pub fn parse(raw: &[u8]) -> Self {
        let mut b = [0u8; BLK_CONFIG_LEN];
        let n = raw.len().min(BLK_CONFIG_LEN);
        b[..n].copy_from_slice(&raw[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        BlkConfig {
            capacity: u64::from(u32_at(0)) | u64::from(u32_at(4)) << 32,
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        }
    }
}

/// One data segment of a request: one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Device-readable bytes (write data, discard ranges...).
    ToDevice(Vec<u8>),
    /// A device-writable buffer of this many bytes (read data, the id...).
    FromDevice(u32),
}

impl Segment {
    /// Bytes of the buffer.
    pub fn len(&self) -> usize {
        match self {
            Segment::ToDevice(d) => d.len(),
            Segment::FromDevice(n) => *n as usize,
        }
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A virtio-blk request: header fields and data segments, in chain order
/// (header first, status last, both added by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    /// `type` of the header (any value, e.g. [`VIRTIO_BLK_T_IN`]).
    pub kind: u32,
    /// `sector` of the header.
    pub sector: u64,
    /// Data descriptors, each at most the guest's segment size.
    pub segments: Vec<Segment>,
}

impl BlkRequest {
    /// Read `len` bytes at `sector` into one segment.
    pub fn read(sector: u64, len: u32) -> Self {
        Self::read_segments(sector, &[len])
    }

    /// Read at `sector` into one device-writable segment per length.
    pub fn read_segments(sector: u64, lens: &[u32]) -> Self {
        BlkRequest {
            kind: VIRTIO_BLK_T_IN,
            sector,
            segments: lens.iter().map(|&n| Segment::FromDevice(n)).collect(),
        }
    }

    /// Write `data` at `sector` from one segment.
    pub fn write(sector: u64, data: &[u8]) -> Self {
        Self::write_segments(sector, &[data])
    }

    /// Write at `sector` from one device-readable segment per slice.
    pub fn write_segments(sector: u64, segments: &[&[u8]]) -> Self {
        BlkRequest {
            kind: VIRTIO_BLK_T_OUT,
            sector,
            segments: segments
                .iter()
                .map(|s| Segment::ToDevice(s.to_vec()))
                .collect(),
        }
    }

    /// Flush (no data).
    pub fn flush() -> Self {
        BlkRequest {
            kind: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            segments: Vec::new(),
        }
    }

    /// Get the 20-byte id string.
    pub fn get_id() -> Self {
        BlkRequest {
            kind: VIRTIO_BLK_T_GET_ID,
            sector: 0,
            segments: vec![Segment::FromDevice(BLK_ID_BYTES as u32)],
        }
    }

    /// Discard `(sector, num_sectors)` ranges, all in one segment.
    pub fn discard(ranges: &[(u64, u32)]) -> Self {
        let r: Vec<_> = ranges.iter().map(|&(s, n)| (s, n, false)).collect();
        Self::ranges(VIRTIO_BLK_T_DISCARD, &r)
    }

    /// Write zeroes to `(sector, num_sectors, unmap)` ranges, all in one
    /// segment.
    pub fn write_zeroes(ranges: &[(u64, u32, bool)]) -> Self {
        Self::ranges(VIRTIO_BLK_T_WRITE_ZEROES, ranges)
    }

    fn ranges(kind: u32, ranges: &[(u64, u32, bool)]) -> Self {
        let mut d = Vec::with_capacity(ranges.len() * BLK_RANGE_LEN);
        for &(sector, num, unmap) in ranges {
            d.extend_from_slice(&sector.to_le_bytes());
            d.extend_from_slice(&num.to_le_bytes());
            d.extend_from_slice(&u32::from(unmap).to_le_bytes());
        }
        BlkRequest {
            kind,
            sector: 0,
            segments: vec![Segment::ToDevice(d)],
        }
    }

    /// Cut every segment into pieces of at most `max` bytes (same
    /// direction, same order). `max` 0 leaves the request as it is.
    pub fn split(mut self, max: u32) -> Self {
        if max == 0 {
            return self;
        }
        let max = max as usize;
        let mut out = Vec::with_capacity(self.segments.len());
        for s in self.segments {
            match s {
                Segment::ToDevice(d) if d.len() > max => {
                    out.extend(d.chunks(max).map(|c| Segment::ToDevice(c.to_vec())));
                }
                Segment::FromDevice(n) if n as usize > max => {
                    let mut left = n as usize;
                    while left > 0 {
                        let k = left.min(max);
                        out.push(Segment::FromDevice(k as u32));
                        left -= k;
                    }
                }
                s => out.push(s),
            }
        }
        self.segments = out;
        self
    }
}

/// How the device completed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkResult {
    /// The status byte ([`VIRTIO_BLK_S_OK`], [`VIRTIO_BLK_S_IOERR`],
    /// [`VIRTIO_BLK_S_UNSUPP`], or [`STATUS_UNWRITTEN`] if the device did
    /// not write it).
    pub status: u8,
    /// The used entry's `len`: bytes the device says it wrote, status
    /// included.
    pub used_len: u32,
    /// The device-writable segments' contents, concatenated, whole (not cut
    /// at `used_len`).
    pub data: Vec<u8>,
}

impl BlkResult {
    /// Whether the status is [`VIRTIO_BLK_S_OK`].
    pub fn is_ok(&self) -> bool {
        self.status == VIRTIO_BLK_S_OK
    }
}

/// A completed request submitted with [`BlkGuest::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkCompletion {
    /// What `submit` returned.
    pub tag: u64,
    /// The outcome.
    pub result: BlkResult,
}

/// A request the device owns: where to read its outcome.
#[derive(Debug)]
struct InFlight {
    tag: u64,
    /// Device-writable data descriptors and their lengths, in order.
    writable: Vec<(u16, u32)>,
    status_desc: u16,
}

/// One request queue and its bookkeeping.
struct BlkQueue {
    q: SplitQueue,
    /// Per head descriptor: the request it heads, while the device owns it.
    inflight: Vec<Option<InFlight>>,
    /// Completions reaped but not yet handed out.
    done: VecDeque<BlkCompletion>,
    /// Used entries (id, len) of chains posted through [`RawQueue`].
    raw_done: VecDeque<(u32, u32)>,
}

/// Counts config-change notices from the backend request channel.
#[derive(Debug, Default)]
struct ConfigWatch {
    changes: AtomicU64,
}

impl VhostUserFrontendReqHandler for ConfigWatch {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// The frontend's end of the backend request channel: reads the backend's
/// messages, answers those that ask for a reply (with REPLY_ACK), and counts
/// config-change notices. Anything else is refused with an error reply.
struct ConfigChannel {
    handler: FrontendReqHandler<ConfigWatch>,
    watch: Arc<ConfigWatch>,
}

impl ConfigChannel {
    fn new(reply_ack: bool) -> Result<Self, GuestError> {
        let watch = Arc::new(ConfigWatch::default());
        let mut handler = FrontendReqHandler::new(watch.clone()).map_err(vhost::Error::from)?;
        handler.set_reply_ack_flag(reply_ack);
        Ok(ConfigChannel { handler, watch })
    }

    /// The socket to send with SET_BACKEND_REQ_FD.
    fn backend_fd(&self) -> RawFd {
        self.handler.get_tx_raw_fd()
    }

    fn pending(&self) -> u64 {
        self.watch.changes.load(Ordering::SeqCst)
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.watch.changes.swap(0, Ordering::SeqCst) > 0 {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // SAFETY: the socket is owned by `self.handler`, which outlives
            // `fds` (both live only in this iteration, borrowed from self).
            let fd = unsafe { BorrowedFd::borrow_raw(self.handler.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, super::poll_timeout(left)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                Ok(_) => match self.handler.handle_request() {
                    Ok(_) => {}
                    // A request we do not serve (answered with an error if
                    // the backend asked for a reply) is no failure of ours;
                    // a broken channel is.
                    Err(e @ (VuError::ReqHandlerError(_) | VuError::InvalidMessage)) => {
                        log::warn!("backend request refused: {e}");
                    }
                    Err(e) => return Err(vhost::Error::from(e).into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A virtio-blk guest connected to a vhost-user-blk backend.
pub struct BlkGuest {
    // Field order is drop order: close the sockets first.
    frontend: Frontend,
    backend_req: Option<ConfigChannel>,
    queues: Vec<BlkQueue>,
    mem: GuestMemory,
    cfg: BlkGuestConfig,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config: BlkConfig,
    next_tag: u64,
}

impl std::fmt::Debug for BlkGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkGuest")
            .field("cfg", &self.cfg)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol_features", &self.protocol_features)
            .field("config", &self.config)
            .field("mem", &self.mem)
            .finish_non_exhaustive()
    }
}

impl BlkGuest {
    /// Connect to the backend listening on `path` (retrying for about 10 s
    /// while the socket is missing or refuses) and bring the device up.
    pub fn connect(path: &Path, cfg: BlkGuestConfig) -> Result<Self, GuestError> {
        cfg.validate()?;
        let stream = super::connect_retry(path, CONNECT_DEADLINE)?;
        Self::from_stream(stream, cfg)
    }

    /// Bring the device up over an already connected vhost-user socket:
    /// SET_OWNER, feature and protocol-feature negotiation, the backend
    /// request channel, GET_CONFIG, SET_MEM_TABLE, per queue
    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK, and SET_VRING_ENABLE on every
    /// queue.
    pub fn from_stream(stream: UnixStream, cfg: BlkGuestConfig) -> Result<Self, GuestError> {
        cfg.validate()?;
        let nq = cfg.queues as usize;
        let (mut fe, offered) = super::open_frontend(stream, REPLY_TIMEOUT)?;
        let mut want = F_VERSION_1 | F_PROTOCOL_FEATURES | F_BLK_WANTED;
        if cfg.event_idx {
            want |= F_EVENT_IDX;
        }
        let features = want & offered & !(cfg.mask_features & !F_PROTOCOL_FEATURES);
        if features & F_VERSION_1 == 0 {
            return Err(GuestError::InvalidConfig(
                "mask_features cannot mask VIRTIO_F_VERSION_1".into(),
            ));
        }
        if nq > 1 && features & F_MQ == 0 {
            return Err(GuestError::Unsupported("VIRTIO_BLK_F_MQ".into()));
        }
        fe.set_features(features)?;

        let pf_offered = fe.get_protocol_features()?;
        if !pf_offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(GuestError::Unsupported(
                "VHOST_USER_PROTOCOL_F_CONFIG".into(),
            ));
        }
        let mut pf_wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if cfg.backend_req {
            pf_wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        let protocol_features = pf_offered & pf_wanted;
        fe.set_protocol_features(protocol_features)?;
        let reply_ack = protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            // Every later request waits for the backend's verdict, so a
            // refused request fails here.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if nq > 1 {
            if !protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                return Err(GuestError::Unsupported("VHOST_USER_PROTOCOL_F_MQ".into()));
            }
            let n = fe.get_queue_num()?;
            if n < nq as u64 {
                return Err(GuestError::Unsupported(format!(
                    "{nq} queues (backend has {n})"
                )));
            }
        }
        let backend_req = if protocol_features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let ch = ConfigChannel::new(reply_ack)?;
            fe.set_backend_request_fd(&ch.backend_fd())?;
            Some(ch)
        } else {
            None
        };
        let config = read_config(&mut fe)?;

        let event_idx = features & F_EVENT_IDX != 0;
        let mem = GuestMemory::new(cfg.mem_size, 1)?;
        let mut queues = Vec::with_capacity(nq);
        for _ in 0..nq {
            let q = SplitQueue::new(&mem, cfg.queue_size, cfg.segment_size, event_idx)?;
            queues.push(BlkQueue {
                inflight: (0..q.size()).map(|_| None).collect(),
                q,
                done: VecDeque::new(),
                raw_done: VecDeque::new(),
            });
        }

        fe.set_mem_table(&mem.vhost_regions())?;
        for (k, bq) in queues.iter().enumerate() {
            super::setup_vring(&mut fe, &mem, k, &bq.q)?;
        }
        for k in 0..nq {
            fe.set_vring_enable(k, true)?;
        }
        log::debug!(
            "blk guest up: features {features:#x}, protocol features {:#x}, {nq} queue(s), {config:?}",
            protocol_features.bits()
        );
        Ok(BlkGuest {
            frontend: fe,
            backend_req,
            queues,
            mem,
            cfg,
            features,
            protocol_features,
            config,
            next_tag: 0,
        })
    }

    /// The configuration this guest was made with.
    pub fn guest_config(&self) -> &BlkGuestConfig {
        &self.cfg
    }

    /// The device's config space as last read (at connect or by
    /// [`reread_config`](Self::reread_config)).
    pub fn config(&self) -> BlkConfig {
        self.config
    }

    /// Read the config space again with GET_CONFIG (after a config change).
    pub fn reread_config(&mut self) -> Result<BlkConfig, GuestError> {
        self.config = read_config(&mut self.frontend)?;
        Ok(self.config)
    }

    /// Virtio features acked with SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether virtio feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }

    /// Protocol features acked with SET_PROTOCOL_FEATURES.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Number of request queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Bytes of each descriptor's buffer: the largest data segment.
    pub fn segment_size(&self) -> u32 {
        self.cfg.segment_size
    }

    /// Queue `req` on `queue` and kick the device if it asked for it.
    /// Returns the tag its completion will carry.
    pub fn submit(&mut self, queue: usize, req: &BlkRequest) -> Result<u64, GuestError> {
        let tag = self.stage(queue, req)?;
        self.queues[queue].q.notify();
        Ok(tag)
    }

    /// Queue `req` on `queue` without publishing it: the device sees it
    /// only after [`publish`](Self::publish) (or the next `submit`). Staging
    /// a backlog on several devices and publishing them together makes
    /// them all backlogged from the device's first look.
    pub fn stage(&mut self, queue: usize, req: &BlkRequest) -> Result<u64, GuestError> {
        let max = self.cfg.segment_size;
        let bq = self
            .queues
            .get_mut(queue)
            .ok_or(GuestError::NoQueue(queue))?;
        if let Some(s) = req.segments.iter().find(|s| s.len() > max as usize) {
            return Err(GuestError::SegmentTooLarge {
                len: s.len(),
                max: max as usize,
            });
        }
        let n = req.segments.len() + 2;
        if n > bq.q.free.len() {
            return Err(GuestError::RingFull);
        }
        let q = &mut bq.q;
        let ids: Vec<u16> = (0..n).filter_map(|_| q.free.pop()).collect();
        let mem = q.memory().clone();
        let slot = |q: &SplitQueue, d: u16| q.slots[d as usize].gpa;

        let mut hdr = [0u8; BLK_HDR_LEN];
        hdr[..4].copy_from_slice(&req.kind.to_le_bytes());
        hdr[8..].copy_from_slice(&req.sector.to_le_bytes());
        mem.write(slot(q, ids[0]), &hdr)?;
        let mut descs = vec![(ids[0], BLK_HDR_LEN as u32, 0)];
        let mut writable = Vec::new();
        for (s, &d) in req.segments.iter().zip(&ids[1..]) {
            match s {
                Segment::ToDevice(data) => {
                    mem.write(slot(q, d), data)?;
                    descs.push((d, data.len() as u32, 0));
                }
                Segment::FromDevice(len) => {
                    writable.push((d, *len));
                    descs.push((d, *len, VRING_DESC_F_WRITE));
                }
            }
        }
        let status_desc = ids[n - 1];
        mem.write(slot(q, status_desc), &[STATUS_UNWRITTEN])?;
        descs.push((status_desc, 1, VRING_DESC_F_WRITE));

        for (i, &(d, len, flags)) in descs.iter().enumerate() {
            match descs.get(i + 1) {
                Some(&(nx, _, _)) => {
                    q.write_desc(d, slot(q, d), len, flags | VRING_DESC_F_NEXT, nx);
                    q.next[d as usize] = nx;
                }
                None => q.write_desc(d, slot(q, d), len, flags, 0),
            }
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        q.chain[ids[0] as usize] = n as u16;
        bq.inflight[ids[0] as usize] = Some(InFlight {
            tag,
            writable,
            status_desc,
        });
        q.push_avail(ids[0]);
        Ok(tag)
    }

    /// Publish the requests staged on `queue`, without kicking the device
    /// ([`kick`](Self::kick) next).
    pub fn publish(&mut self, queue: usize) {
        if let Some(bq) = self.queues.get_mut(queue) {
            bq.q.publish();
        }
    }

    /// Kick queue `queue` unconditionally (no-op for a queue that does not
    /// exist).
    pub fn kick(&mut self, queue: usize) {
        if let Some(bq) = self.queues.get_mut(queue) {
            bq.q.kick_now();
        }
    }

    /// The device's `used.idx` of `queue`: requests it has completed, mod
    /// 2^16 (0 for a queue that does not exist). One atomic load, so that
    /// a test can sample several devices' progress at one instant.
    pub fn used_idx(&self, queue: usize) -> u16 {
        self.queues.get(queue).map_or(0, |bq| bq.q.used_idx())
    }

    /// Requests queued on `queue` and not yet completed (0 for a queue that
    /// does not exist).
    pub fn in_flight(&self, queue: usize) -> usize {
        self.queues
            .get(queue)
            .map_or(0, |bq| bq.inflight.iter().flatten().count())
    }

    /// Every completion of `queue` available now, without waiting.
    pub fn poll_completions(&mut self, queue: usize) -> Result<Vec<BlkCompletion>, GuestError> {
        let bq = self
            .queues
            .get_mut(queue)
            .ok_or(GuestError::NoQueue(queue))?;
        reap(bq);
        Ok(bq.done.drain(..).collect())
    }

    /// Wait up to `timeout` until `n` completions of `queue` are available
    /// and return them all (possibly more than `n`). On timeout nothing is
    /// lost: what did complete stays for the next call.
    pub fn wait_completions(
        &mut self,
        queue: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<BlkCompletion>, GuestError> {
        self.wait_until(queue, timeout, |bq| bq.done.len() >= n)?;
        Ok(self.queues[queue].done.drain(..).collect())
    }

    /// Submit `req` on `queue` and wait for its completion (other
    /// completions stay queued for `poll_completions`).
    pub fn run(&mut self, queue: usize, req: &BlkRequest) -> Result<BlkResult, GuestError> {
        let tag = self.submit(queue, req)?;
        self.wait_until(queue, IO_TIMEOUT, |bq| bq.done.iter().any(|c| c.tag == tag))?;
        let done = &mut self.queues[queue].done;
        let i = done.iter().position(|c| c.tag == tag);
        match i.and_then(|i| done.remove(i)) {
            Some(c) => Ok(c.result),
            None => Err(GuestError::Timeout),
        }
    }

    /// Read `len` bytes at `sector` on queue 0, in segments of at most
    /// [`segment_size`](Self::segment_size) bytes.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<BlkResult, GuestError> {
        let req = BlkRequest::read(sector, len).split(self.cfg.segment_size);
        self.run(0, &req)
    }

    /// Write `data` at `sector` on queue 0, in segments of at most
    /// [`segment_size`](Self::segment_size) bytes.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<BlkResult, GuestError> {
        let req = BlkRequest::write(sector, data).split(self.cfg.segment_size);
        self.run(0, &req)
    }

    /// Flush on queue 0.
    pub fn flush(&mut self) -> Result<BlkResult, GuestError> {
        self.run(0, &BlkRequest::flush())
    }

    /// Discard `(sector, num_sectors)` ranges on queue 0.
    pub fn discard(&mut self, ranges: &[(u64, u32)]) -> Result<BlkResult, GuestError> {
        self.run(0, &BlkRequest::discard(ranges))
    }

    /// Write zeroes to `(sector, num_sectors, unmap)` ranges on queue 0.
    pub fn write_zeroes(&mut self, ranges: &[(u64, u32, bool)]) -> Result<BlkResult, GuestError> {
        self.run(0, &BlkRequest::write_zeroes(ranges))
    }

    /// GET_ID on queue 0: on success `data` holds the 20-byte id string.
    pub fn get_id(&mut self) -> Result<BlkResult, GuestError> {
        self.run(0, &BlkRequest::get_id())
    }

    /// Set the `writeback` byte of config space with SET_CONFIG, then read
    /// the config space again.
    pub fn set_writeback(&mut self, on: bool) -> Result<BlkConfig, GuestError> {
        self.frontend.set_config(
            WRITEBACK_OFFSET,
            VhostUserConfigFlags::empty(),
            &[u8::from(on)],
        )?;
        self.reread_config()
    }

    /// Wait up to `timeout` for a config-change notice
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG) on the backend request
    /// channel, answering every message that asks for a reply. True if one
    /// arrived since the last call; then call
    /// [`reread_config`](Self::reread_config). Fails if the channel was not
    /// set up (not offered, or [`BlkGuestConfig::backend_req`] off) or broke.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<bool, GuestError> {
        match self.backend_req.as_mut() {
            Some(ch) => ch.wait(timeout),
            None => Err(GuestError::Unsupported(
                "VHOST_USER_PROTOCOL_F_BACKEND_REQ (backend request channel not set up)".into(),
            )),
        }
    }

    /// Config-change notices received and not yet reported by
    /// [`wait_config_change`](Self::wait_config_change).
    pub fn pending_config_changes(&self) -> u64 {
        self.backend_req.as_ref().map_or(0, ConfigChannel::pending)
    }

    /// Direct access to queue `queue`, for hand-written descriptors.
    /// Chains taken with [`RawQueue::alloc_desc`] or
    /// [`RawQueue::alloc_chain`] come back through
    /// [`wait_raw_used`](Self::wait_raw_used).
    pub fn raw_queue(&mut self, queue: usize) -> Option<RawQueue<'_>> {
        self.queues
            .get_mut(queue)
            .map(|bq| RawQueue { q: &mut bq.q })
    }

    /// Wait up to `timeout` for the device to use a chain posted through
    /// [`raw_queue`](Self::raw_queue) and return its used entry (id, len).
    /// The chain's descriptors return to the driver; scratch buffers stay
    /// readable through [`memory`](Self::memory). Completions of ordinary
    /// requests seen meanwhile stay queued.
    pub fn wait_raw_used(
        &mut self,
        queue: usize,
        timeout: Duration,
    ) -> Result<(u32, u32), GuestError> {
        self.wait_until(queue, timeout, |bq| !bq.raw_done.is_empty())?;
        self.queues[queue]
            .raw_done
            .pop_front()
            .ok_or(GuestError::Timeout)
    }

    /// Reap `queue` until `cond` holds, sleeping on its call eventfd (with
    /// interrupts enabled only while asleep).
    fn wait_until(
        &mut self,
        queue: usize,
        timeout: Duration,
        cond: impl Fn(&BlkQueue) -> bool,
    ) -> Result<(), GuestError> {
        let bq = self
            .queues
            .get_mut(queue)
            .ok_or(GuestError::NoQueue(queue))?;
        let deadline = Instant::now() + timeout;
        loop {
            reap(bq);
            if cond(bq) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Timeout);
            }
            if !bq.q.enable_interrupts() {
                // SAFETY: the eventfd is owned by the queue, which outlives `fds`
                // (borrowed from self for this iteration only).
                let fd = unsafe { BorrowedFd::borrow_raw(bq.q.call.as_raw_fd()) };
                let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                match poll(&mut fds, super::poll_timeout(left)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Non-blocking: WouldBlock just means no signal was pending.
            let _ = bq.q.call.read();
            bq.q.disable_interrupts();
        }
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

    /// Device misbehaviour seen so far: used entries naming descriptors the
    /// device does not own, or lengths beyond the writable buffers.
    pub fn device_errors(&self) -> u64 {
        self.queues.iter().map(|bq| bq.q.errors).sum()
    }

    /// Close the connection and free guest memory.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// GET_CONFIG of the first [`BLK_CONFIG_LEN`] bytes.
fn read_config(fe: &mut Frontend) -> Result<BlkConfig, GuestError> {
    let (_, raw) = fe.get_config(
        0,
        BLK_CONFIG_LEN as u32,
        VhostUserConfigFlags::empty(),
        &[0; BLK_CONFIG_LEN],
    )?;
    Ok(BlkConfig::parse(&raw))
}

/// Consume every used entry of `bq`: requests become completions, raw
/// chains go to `raw_done`, anything else counts as a device error.
fn reap(bq: &mut BlkQueue) {
    let q = &mut bq.q;
    let used = q.used_idx();
    while q.last_used != used {
        let (id, len) = q.used_elem(q.last_used);
        q.last_used = q.last_used.wrapping_add(1);
        let req = bq.inflight.get_mut(id as usize).and_then(Option::take);
        let Some(f) = req else {
            if q.release_chain(id) {
                bq.raw_done.push_back((id, len));
            } else {
                q.errors += 1;
            }
            continue;
        };
        // The slots were allocated in guest memory, so reading them cannot
        // fail; each descriptor's length is at most its slot's (checked by
        // `submit`).
        let mem = q.memory().clone();
        let mut data = vec![0; f.writable.iter().map(|w| w.1 as usize).sum()];
        let mut at = 0;
        for &(d, n) in &f.writable {
            let n = n as usize;
            let _ = mem.read(q.slots[d as usize].gpa, &mut data[at..at + n]);
            at += n;
        }
        let mut status = [STATUS_UNWRITTEN];
        let _ = mem.read(q.slots[f.status_desc as usize].gpa, &mut status);
        if len as usize > data.len() + 1 {
            q.errors += 1;
        }
        q.release_chain(id);
        bq.done.push_back(BlkCompletion {
            tag: f.tag,
            result: BlkResult {
                status: status[0],
                used_len: len,
                data,
            },
        });
    }
    q.refresh_used_event();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parse_layout() {
        let mut raw = vec![0u8; BLK_CONFIG_LEN];
        raw[0..8].copy_from_slice(&0x1_0000_0002u64.to_le_bytes());
        raw[8..12].copy_from_slice(&65536u32.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&4096u32.to_le_bytes());
        raw[24] = 3;
        raw[25] = 1;
        raw[26..28].copy_from_slice(&8u16.to_le_bytes());
        raw[28..32].copy_from_slice(&64u32.to_le_bytes());
        raw[32] = 1;
        raw[34..36].copy_from_slice(&4u16.to_le_bytes());
        raw[36..40].copy_from_slice(&1000u32.to_le_bytes());
        raw[40..44].copy_from_slice(&2u32.to_le_bytes());
        raw[44..48].copy_from_slice(&8u32.to_le_bytes());
        raw[48..52].copy_from_slice(&2000u32.to_le_bytes());
        raw[52..56].copy_from_slice(&3u32.to_le_bytes());
        raw[56] = 1;
        let c = BlkConfig::parse(&raw);
        assert_eq!(
            c,
            BlkConfig {
                capacity: 0x1_0000_0002,
                size_max: 65536,
                seg_max: 126,
                blk_size: 4096,
                physical_block_exp: 3,
                alignment_offset: 1,
                min_io_size: 8,
                opt_io_size: 64,
                writeback: 1,
                num_queues: 4,
                max_discard_sectors: 1000,
                max_discard_seg: 2,
                discard_sector_alignment: 8,
                max_write_zeroes_sectors: 2000,
                max_write_zeroes_seg: 3,
                write_zeroes_may_unmap: 1,
            }
        );
        // Short input reads as zeroes.
        assert_eq!(BlkConfig::parse(&raw[..8]).seg_max, 0);
        assert_eq!(BlkConfig::parse(&[]), BlkConfig::default());
    }

    #[test]
    fn requests_and_split() {
        let r = BlkRequest::read(7, 10_000).split(4096);
        assert_eq!((r.kind, r.sector), (VIRTIO_BLK_T_IN, 7));
        assert_eq!(
            r.segments,
            [4096, 4096, 1808].map(Segment::FromDevice).to_vec()
        );
        let data: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
        let w = BlkRequest::write(1, &data).split(4000);
        assert_eq!(w.segments.len(), 3);
        let joined: Vec<u8> = w
            .segments
            .iter()
            .flat_map(|s| match s {
                Segment::ToDevice(d) => d.clone(),
                Segment::FromDevice(_) => panic!("direction changed"),
            })
            .collect();
        assert_eq!(joined, data);
        assert_eq!(BlkRequest::read(0, 512).split(0).segments.len(), 1);
        let d = BlkRequest::write_zeroes(&[(8, 16, true), (1 << 40, 1, false)]);
        assert_eq!(d.kind, VIRTIO_BLK_T_WRITE_ZEROES);
        let Segment::ToDevice(b) = &d.segments[0] else {
            panic!("ranges are device-readable")
        };
        assert_eq!(b.len(), 2 * BLK_RANGE_LEN);
        assert_eq!(&b[0..8], &8u64.to_le_bytes());
        assert_eq!(&b[8..12], &16u32.to_le_bytes());
        assert_eq!(&b[12..16], &1u32.to_le_bytes());
        assert_eq!(&b[16..24], &(1u64 << 40).to_le_bytes());
        assert_eq!(&b[28..32], &0u32.to_le_bytes());
        assert_eq!(BlkRequest::discard(&[(1, 2)]).kind, VIRTIO_BLK_T_DISCARD);
        assert_eq!(
            BlkRequest::get_id().segments,
            [Segment::FromDevice(20)].to_vec()
        );
        assert!(BlkRequest::flush().segments.is_empty());
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = BlkGuestConfig::default();
        assert_eq!((c.queues, c.queue_size), (1, 128));
        assert!(c.event_idx && c.backend_req);
        assert!(c.validate().is_ok());
        for bad in [
            BlkGuestConfig {
                queues: 0,
                ..Default::default()
            },
            BlkGuestConfig {
                segment_size: 8,
                ..Default::default()
            },
            BlkGuestConfig {
                queue_size: 2,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    /// The backend's side of the channel, written by hand: vhost 0.18's
    /// `Backend` cannot send CONFIG_CHANGE_MSG.
    fn send_backend_msg(s: &mut UnixStream, code: u32, flags: u32) {
        use std::io::Write;
        let mut m = code.to_le_bytes().to_vec();
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&m).unwrap();
    }

    fn read_reply(s: &mut UnixStream) -> (u32, u32, u32, u64) {
        use std::io::Read;
        let mut b = [0u8; 20];
        s.read_exact(&mut b).unwrap();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        (
            u32_at(0),
            u32_at(4),
            u32_at(8),
            u64::from_le_bytes(b[12..20].try_into().unwrap()),
        )
    }

    #[test]
    fn config_change_channel() {
        const VERSION: u32 = 1;
        const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
        const REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
        let mut ch = ConfigChannel::new(true).unwrap();
        let fd = nix::unistd::dup(ch.backend_fd()).unwrap();
        // SAFETY: `fd` is a fresh duplicate that nothing else owns.
        let mut be = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        be.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

        assert!(!ch.wait(Duration::ZERO).unwrap());
        // A notice that asks for a reply is acked with 0.
        send_backend_msg(&mut be, 2, VERSION | NEED_REPLY);
        assert!(ch.wait(Duration::from_secs(30)).unwrap());
        assert_eq!(read_reply(&mut be), (2, REPLY | VERSION, 8, 0));
        assert_eq!(ch.pending(), 0);
        // Without NEED_REPLY (as QEMU's libvhost-user sends it): no reply.
        send_backend_msg(&mut be, 2, VERSION);
        send_backend_msg(&mut be, 2, VERSION);
        assert!(ch.wait(Duration::from_secs(30)).unwrap());
        assert!(ch.wait(Duration::from_secs(30)).unwrap());
        // A request the frontend does not serve (VRING_HOST_NOTIFIER_MSG)
        // is refused with an error reply, not fatal.
        send_backend_msg(&mut be, 3, VERSION | NEED_REPLY);
        assert!(!ch.wait(Duration::from_millis(50)).unwrap());
        let (code, flags, size, val) = read_reply(&mut be);
        assert_eq!((code, flags, size), (3, REPLY | VERSION, 8));
        assert_ne!(val, 0);
        // An unknown request code is dropped by the crate without a reply.
        send_backend_msg(&mut be, 99, VERSION | NEED_REPLY);
        assert!(!ch.wait(Duration::from_millis(50)).unwrap());
        send_backend_msg(&mut be, 2, VERSION);
        assert!(ch.wait(Duration::from_secs(30)).unwrap());
    }

    #[test]
    fn guest_is_send() {
        fn send<T: Send>() {}
        send::<BlkGuest>();
    }
}
