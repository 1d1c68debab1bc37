//! virtio-blk: what a disk port offers (features and configuration space),
//! the backing file or block device behind it, and the parsing of guest
//! requests. The dataplane side lives in `dataplane::blk`.

mod backing;
mod request;

pub use backing::{Backing, BackingError, BackingKind, DiskParams};
pub use request::{parse, DiscardSeg, ParseError, ReqType, Request};

use std::sync::atomic::{AtomicBool, Ordering};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::stats::DiskStats;

/// One sector: the unit of `sector` fields and of capacity.
pub const SECTOR: u64 = 512;
/// Bytes of a request header (type, reserved, sector).
pub const HDR_LEN: usize = 16;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = 20;
/// Bytes of a discard / write-zeroes segment.
pub const DISCARD_SEG_LEN: usize = 16;
/// Most request queues per disk.
pub const MAX_DISK_QUEUES: usize = 16;
/// Most segments in a discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Largest range of one discard or write-zeroes segment, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Bytes of the configuration space served (up to the secure-erase fields).
pub const CONFIG_LEN: usize = 72;

/// Status byte: success.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request type is not supported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The virtio features a disk offers.
pub fn features(readonly: bool, queues: u16) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    if queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    f
}

/// Whether feature `bit` is in `features`.
#[inline]
pub fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// Most data segments a request may have: two descriptors of a chain go to
/// the header and the status byte.
pub fn seg_max(queue_size: u16) -> u32 {
    (u32::from(queue_size).min(crate::vring::MAX_CHAIN_SEGS as u32)).saturating_sub(2)
}

/// Largest data segment advertised (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;

/// What the configuration space says, in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    /// Physical block size as a power of two of logical blocks.
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: bool,
    pub num_queues: u16,
}

impl ConfigSpace {
    /// The little-endian `struct virtio_blk_config`.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // Geometry (16..20) stays zero: meaningless for a virtual disk.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let blk_sectors = self.blk_size / SECTOR as u32;
        b[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        b[44..48].copy_from_slice(&blk_sectors.to_le_bytes());
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        b[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        b[56] = 1; // write zeroes may unmap
        b
    }
}

// The served prefix is part of the kernel's struct.
const _: () = assert!(std::mem::size_of::<virtio_blk_config>() >= CONFIG_LEN);

/// Offset of the `writeback` byte in the configuration space.
pub const CONFIG_WRITEBACK_OFFSET: u32 = 32;

/// A disk as the control plane, its vhost-user session and its worker share
/// it: the open backing, the counters, and what the guest chose.
pub struct Disk {
    pub backing: Backing,
    pub stats: DiskStats,
    serial: [u8; ID_LEN],
    /// Writes are durable when acknowledged: the guest turned its write
    /// cache off (`writeback` = 0) or did not negotiate FLUSH.
    write_through: AtomicBool,
}

impl Disk {
    /// A disk on an open backing; `serial` is cut to 20 bytes.
    pub fn new(backing: Backing, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Disk {
            backing,
            stats: DiskStats::default(),
            serial: id,
            write_through: AtomicBool::new(false),
        }
    }

    /// The GET_ID answer: the serial, zero-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; ID_LEN] {
        &self.serial
    }

    #[inline]
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Relaxed)
    }

    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec() {
        let c = ConfigSpace {
            capacity_sectors: 0x1122_3344_5566_7788,
            seg_max: 126,
            blk_size: 4096,
            physical_block_exp: 0,
            min_io_size: 8,
            opt_io_size: 16,
            writeback: true,
            num_queues: 4,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(b[CONFIG_WRITEBACK_OFFSET as usize], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_only_disks_offer_no_discard() {
        let ro = features(true, 1);
        assert!(has(ro, VIRTIO_BLK_F_RO));
        assert!(!has(ro, VIRTIO_BLK_F_DISCARD));
        assert!(!has(ro, VIRTIO_BLK_F_MQ));
        let rw = features(false, 4);
        assert!(has(rw, VIRTIO_BLK_F_WRITE_ZEROES) && has(rw, VIRTIO_BLK_F_MQ));
        assert_eq!(seg_max(128), 62);
        assert_eq!(seg_max(4), 2);
    }
}
