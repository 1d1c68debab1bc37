//! Per-port and per-worker counters.
//!
//! Each counter has one writer, the worker that owns the port (a port moves
//! between workers only between batches), which adds with a plain load and
//! store (no locked instruction on the hot path); readers (the control
//! channel) load them with relaxed ordering.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A malformed TX descriptor chain (out of memory, loop, wrong direction, indirect).
    BadTxDescriptor,
    /// A TX chain with a frame shorter than an Ethernet header (or empty).
    ShortFrame,
    /// A frame over the switch's maximum frame size.
    OversizedFrame,
    /// The destination guest had no RX buffer (ring empty or not refilled).
    NoRxBuffer,
    /// A malformed RX descriptor chain.
    BadRxDescriptor,
    /// The destination's RX buffers were too small (no mergeable buffers).
    RxBufferTooSmall,
    /// The queue to another worker was full, or its buffer pool empty.
    RemoteQueueFull,
    /// The destination is the port the frame came from.
    SamePort,
    /// The frame exceeds the sending or receiving port's MTU.
    MtuExceeded,
    /// Over the port's ingress (guest to switch) policer.
    IngressPoliced,
    /// Over the port's egress (switch to guest) policer.
    EgressPoliced,
    /// The port's egress shaping queue was full.
    EgressQueueFull,
    /// Port security: a source MAC that is not the port's identity's.
    SpoofedMac,
    /// Port security: an ARP sender (MAC or IPv4) not the port's.
    SpoofedArp,
    /// Port security: an IPv4 source address not the port's.
    SpoofedIpv4,
    /// Port security: an IPv6 source address not the port's.
    SpoofedIpv6,
    /// Port security: a neighbour discovery target or link-layer address
    /// option not the port's.
    SpoofedNd,
    /// Switched to a port before its identity moved away; not delivered.
    IdentityMoved,
    /// The destination port has no guest attached (counted at the sender).
    PortDown,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 19] = [
        DropReason::BadTxDescriptor,
        DropReason::ShortFrame,
        DropReason::OversizedFrame,
        DropReason::NoRxBuffer,
        DropReason::BadRxDescriptor,
        DropReason::RxBufferTooSmall,
        DropReason::RemoteQueueFull,
        DropReason::SamePort,
        DropReason::MtuExceeded,
        DropReason::IngressPoliced,
        DropReason::EgressPoliced,
        DropReason::EgressQueueFull,
        DropReason::SpoofedMac,
        DropReason::SpoofedArp,
        DropReason::SpoofedIpv4,
        DropReason::SpoofedIpv6,
        DropReason::SpoofedNd,
        DropReason::IdentityMoved,
        DropReason::PortDown,
    ];

    /// The name used in statistics output.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadTxDescriptor => "bad_tx_descriptor",
            DropReason::ShortFrame => "short_frame",
            DropReason::OversizedFrame => "oversized_frame",
            DropReason::NoRxBuffer => "no_rx_buffer",
            DropReason::BadRxDescriptor => "bad_rx_descriptor",
            DropReason::RxBufferTooSmall => "rx_buffer_too_small",
            DropReason::RemoteQueueFull => "remote_queue_full",
            DropReason::SamePort => "same_port",
            DropReason::MtuExceeded => "mtu_exceeded",
            DropReason::IngressPoliced => "ingress_policed",
            DropReason::EgressPoliced => "egress_policed",
            DropReason::EgressQueueFull => "egress_queue_full",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::SpoofedIpv4 => "spoofed_ipv4",
            DropReason::SpoofedIpv6 => "spoofed_ipv6",
            DropReason::SpoofedNd => "spoofed_nd",
            DropReason::IdentityMoved => "identity_moved",
            DropReason::PortDown => "port_down",
        }
    }
}

/// Add `n` to a counter that has a single writer.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Counters of one port. "rx" is what the switch received from the guest
/// (the guest's transmit ring), "tx" what it delivered to the guest.
#[repr(align(64))]
#[derive(Default)]
pub struct PortStats {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    qos: [AtomicU64; QosCounter::ALL.len()],
    broken: AtomicBool,
    /// Switch clock (ms, plus one) when frames for the guest last found
    /// its RX ring without buffers after a delivery succeeded; 0 while it
    /// drains.
    rx_stalled_since: AtomicU64,
}

/// What a port's QoS counts (besides its drops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum QosCounter {
    /// Frames and bytes from the guest that passed its ingress limit.
    IngressPackets,
    IngressBytes,
    /// Nanoseconds the ingress shaper held the guest's TX ring.
    IngressThrottledNs,
    /// Frames and bytes to the guest that passed its egress limit.
    EgressPackets,
    EgressBytes,
    /// Nanoseconds the egress shaper held frames back.
    EgressThrottledNs,
}

impl QosCounter {
    pub const ALL: [QosCounter; 6] = [
        QosCounter::IngressPackets,
        QosCounter::IngressBytes,
        QosCounter::IngressThrottledNs,
        QosCounter::EgressPackets,
        QosCounter::EgressBytes,
        QosCounter::EgressThrottledNs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QosCounter::IngressPackets => "ingress_packets",
            QosCounter::IngressBytes => "ingress_bytes",
            QosCounter::IngressThrottledNs => "ingress_throttled_ns",
            QosCounter::EgressPackets => "egress_packets",
            QosCounter::EgressBytes => "egress_bytes",
            QosCounter::EgressThrottledNs => "egress_throttled_ns",
        }
    }
}

/// A snapshot of [`PortStats`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PortStatsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub qos: std::collections::BTreeMap<&'static str, u64>,
    pub broken: bool,
}

impl PortStats {
    /// Add to a QoS counter (by the port's own worker).
    #[inline]
    pub fn add_qos(&self, c: QosCounter, n: u64) {
        bump(&self.qos[c as usize], n);
    }

    /// A QoS counter.
    pub fn qos(&self, c: QosCounter) -> u64 {
        self.qos[c as usize].load(Ordering::Relaxed)
    }

    #[inline]
    pub fn add_rx(&self, bytes: u64) {
        bump(&self.rx_packets, 1);
        bump(&self.rx_bytes, bytes);
    }

    #[inline]
    pub fn add_tx(&self, bytes: u64) {
        bump(&self.tx_packets, 1);
        bump(&self.tx_bytes, bytes);
    }

    /// Count a drop (by the port's own worker).
    #[inline]
    pub fn count_drop(&self, why: DropReason) {
        bump(&self.drops[why as usize], 1);
    }

    /// Mark the port broken (or repaired, on reconnect).
    pub fn set_broken(&self, broken: bool) {
        self.broken.store(broken, Ordering::Relaxed);
    }

    /// Whether a guest fault stopped the port.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Note that a frame for the guest found no RX buffer at `now_ms`
    /// (the switch clock): the start of a stall unless one is running.
    #[inline]
    pub fn rx_stalled(&self, now_ms: u64) {
        if self.rx_stalled_since.load(Ordering::Relaxed) == 0 {
            self.rx_stalled_since
                .store(now_ms.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Note that the guest's RX ring took a frame: no stall.
    #[inline]
    pub fn rx_drained(&self) {
        self.rx_stalled_since.store(0, Ordering::Relaxed);
    }

    /// Since when (switch clock, ms) frames for the guest have found no RX
    /// buffer, with none delivered since; `None` while the guest drains.
    pub fn rx_stalled_since(&self) -> Option<u64> {
        match self.rx_stalled_since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    /// Drops for one reason.
    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }

    /// Read every counter.
    pub fn snapshot(&self) -> PortStatsSnapshot {
        PortStatsSnapshot {
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            drops: DropReason::ALL
                .iter()
                .map(|d| (d.name(), self.drops(*d)))
                .collect(),
            qos: QosCounter::ALL
                .iter()
                .map(|c| (c.name(), self.qos(*c)))
                .collect(),
            broken: self.is_broken(),
        }
    }
}

/// Why a disk request failed (answered `S_IOERR` or `S_UNSUPP`, or, with
/// no status byte to answer in, returned with length 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum BlkError {
    /// A malformed descriptor chain (out of memory, loop, readable after writable, indirect).
    BadDescriptor,
    /// No device-writable status byte at the end of the chain.
    NoStatus,
    /// A header shorter than 16 bytes.
    ShortHeader,
    /// Data buffers of the wrong direction for the request.
    WrongDirection,
    /// Sectors past the end of the disk.
    OutOfRange,
    /// A length not a multiple of 512, or direct I/O out of alignment.
    Unaligned,
    /// A write, discard or write-zeroes request to a read-only disk.
    ReadOnly,
    /// A request type or flag the disk does not serve.
    Unsupported,
    /// The host file or device failed the operation.
    IoError,
}

impl BlkError {
    /// Every reason, in counter order.
    pub const ALL: [BlkError; 9] = [
        BlkError::BadDescriptor,
        BlkError::NoStatus,
        BlkError::ShortHeader,
        BlkError::WrongDirection,
        BlkError::OutOfRange,
        BlkError::Unaligned,
        BlkError::ReadOnly,
        BlkError::Unsupported,
        BlkError::IoError,
    ];

    /// The name used in statistics output.
    pub fn name(self) -> &'static str {
        match self {
            BlkError::BadDescriptor => "bad_descriptor",
            BlkError::NoStatus => "no_status",
            BlkError::ShortHeader => "short_header",
            BlkError::WrongDirection => "wrong_direction",
            BlkError::OutOfRange => "out_of_range",
            BlkError::Unaligned => "unaligned",
            BlkError::ReadOnly => "read_only",
            BlkError::Unsupported => "unsupported",
            BlkError::IoError => "io_error",
        }
    }
}

/// Request kinds counted per disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum BlkOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

impl BlkOp {
    const ALL: [BlkOp; 6] = [
        BlkOp::Read,
        BlkOp::Write,
        BlkOp::Flush,
        BlkOp::Discard,
        BlkOp::WriteZeroes,
        BlkOp::GetId,
    ];

    fn name(self) -> &'static str {
        match self {
            BlkOp::Read => "read",
            BlkOp::Write => "write",
            BlkOp::Flush => "flush",
            BlkOp::Discard => "discard",
            BlkOp::WriteZeroes => "write_zeroes",
            BlkOp::GetId => "get_id",
        }
    }
}

/// Counters of one disk, written by the worker that serves it.
#[repr(align(64))]
#[derive(Default)]
pub struct DiskStats {
    ops: [AtomicU64; BlkOp::ALL.len()],
    bytes: [AtomicU64; BlkOp::ALL.len()],
    errors: [AtomicU64; BlkError::ALL.len()],
    in_flight: AtomicU64,
    throttled_ns: AtomicU64,
    broken: AtomicBool,
}

/// A snapshot of [`DiskStats`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DiskStatsSnapshot {
    /// Completed requests by kind (successful or not).
    pub ops: std::collections::BTreeMap<&'static str, u64>,
    /// Bytes moved by successful requests, by kind.
    pub bytes: std::collections::BTreeMap<&'static str, u64>,
    /// Failed requests by reason.
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub in_flight: u64,
    /// Nanoseconds the disk's limits left requests in its rings.
    pub throttled_ns: u64,
    pub broken: bool,
}

impl DiskStats {
    /// Add time the limits held requests back.
    #[inline]
    pub fn add_throttled(&self, ns: u64) {
        bump(&self.throttled_ns, ns);
    }

    /// Count a completed request and the bytes it moved.
    #[inline]
    pub fn count_op(&self, op: BlkOp, bytes: u64) {
        bump(&self.ops[op as usize], 1);
        bump(&self.bytes[op as usize], bytes);
    }

    /// Count a failed request.
    #[inline]
    pub fn count_error(&self, why: BlkError) {
        bump(&self.errors[why as usize], 1);
    }

    /// Requests taken from the rings and not yet answered.
    #[inline]
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    pub fn set_broken(&self, broken: bool) {
        self.broken.store(broken, Ordering::Relaxed);
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Failed requests for one reason.
    pub fn errors(&self, why: BlkError) -> u64 {
        self.errors[why as usize].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> DiskStatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiskStatsSnapshot {
            ops: BlkOp::ALL
                .iter()
                .map(|o| (o.name(), load(&self.ops[*o as usize])))
                .collect(),
            bytes: BlkOp::ALL
                .iter()
                .map(|o| (o.name(), load(&self.bytes[*o as usize])))
                .collect(),
            errors: BlkError::ALL
                .iter()
                .map(|e| (e.name(), self.errors(*e)))
                .collect(),
            in_flight: load(&self.in_flight),
            throttled_ns: load(&self.throttled_ns),
            broken: self.is_broken(),
        }
    }
}

/// Counters of one worker.
#[repr(align(64))]
#[derive(Default)]
pub struct WorkerStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    batches: AtomicU64,
    frames: AtomicU64,
    wakeups: AtomicU64,
}

/// A snapshot of [`WorkerStats`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerStatsSnapshot {
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub batches: u64,
    pub frames: u64,
    pub wakeups: u64,
}

impl WorkerStats {
    pub fn add_busy(&self, ns: u64) {
        bump(&self.busy_ns, ns);
    }
    pub fn add_idle(&self, ns: u64) {
        bump(&self.idle_ns, ns);
    }
    pub fn add_batch(&self, frames: u64) {
        bump(&self.batches, 1);
        bump(&self.frames, frames);
    }
    pub fn add_wakeup(&self) {
        bump(&self.wakeups, 1);
    }
    pub fn snapshot(&self) -> WorkerStatsSnapshot {
        WorkerStatsSnapshot {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            idle_ns: self.idle_ns.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            wakeups: self.wakeups.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshots() {
        let s = PortStats::default();
        s.add_rx(60);
        s.add_rx(40);
        s.add_tx(10);
        s.count_drop(DropReason::NoRxBuffer);
        s.count_drop(DropReason::RemoteQueueFull);
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.rx_packets,
                snap.rx_bytes,
                snap.tx_packets,
                snap.tx_bytes
            ),
            (2, 100, 1, 10)
        );
        assert_eq!(snap.drops["no_rx_buffer"], 1);
        assert_eq!(snap.drops["remote_queue_full"], 1);
        assert_eq!(snap.drops["short_frame"], 0);
    }

    #[test]
    fn disk_counters() {
        let d = DiskStats::default();
        d.count_op(BlkOp::Read, 4096);
        d.count_op(BlkOp::Read, 512);
        d.count_op(BlkOp::Flush, 0);
        d.count_error(BlkError::OutOfRange);
        d.set_in_flight(3);
        let s = d.snapshot();
        assert_eq!(
            (s.ops["read"], s.bytes["read"], s.ops["flush"]),
            (2, 4608, 1)
        );
        assert_eq!((s.errors["out_of_range"], s.errors["io_error"]), (1, 0));
        assert_eq!(s.in_flight, 3);
    }
}
