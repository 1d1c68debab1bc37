//! The virtio-blk device model of a disk port, and the channel that tells
//! the frontend when the disk's configuration (its capacity) changed.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Error as VhostError, Result as VhostResult};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::Device;
use crate::blk::{self, ConfigSpace, Disk, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET, MAX_DISK_QUEUES};
use crate::dataplane::{Dataplane, DataplaneError, DiskFeatures};
use crate::fdb::PortIdx;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 1;

/// The backend-to-frontend channel of a disk's current connection, for
/// telling the frontend that the configuration space changed.
#[derive(Default)]
pub struct ConfigNotifier {
    chan: Mutex<Option<UnixStream>>,
}

impl ConfigNotifier {
    /// Use `chan` from now on (None: the connection ended).
    pub fn set(&self, chan: Option<UnixStream>) {
        if let Ok(mut c) = self.chan.lock() {
            *c = chan;
        }
    }

    /// Send a configuration-change message. Returns false when no frontend
    /// set up the channel (nobody to tell).
    pub fn notify(&self) -> std::io::Result<bool> {
        let mut guard = self
            .chan
            .lock()
            .map_err(|_| std::io::Error::other("notifier lock poisoned"))?;
        let Some(chan) = guard.as_mut() else {
            return Ok(false);
        };
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // Size 0: the message has no body.
        chan.write_all(&msg)?;
        Ok(true)
    }
}

/// A virtio-blk disk with `queues` request queues of at most `queue_size`.
pub struct BlkDevice {
    disk: Arc<Disk>,
    queues: u16,
    queue_size: u16,
    acked: u64,
}

impl BlkDevice {
    pub fn new(disk: Arc<Disk>, queues: u16, queue_size: u16) -> Self {
        // A new connection starts with the guest's write cache on.
        disk.set_write_through(false);
        BlkDevice {
            disk,
            queues: queues.clamp(1, MAX_DISK_QUEUES as u16),
            queue_size,
            acked: 0,
        }
    }

    fn config(&self) -> ConfigSpace {
        let b = &self.disk.backing;
        let blocks_per_physical = (b.physical_block() / b.block_size()).max(1);
        ConfigSpace {
            capacity_sectors: b.sectors(),
            seg_max: blk::seg_max(self.queue_size),
            blk_size: b.block_size(),
            physical_block_exp: blocks_per_physical.trailing_zeros() as u8,
            min_io_size: (b.physical_block() / b.block_size()).max(1) as u16,
            opt_io_size: 0,
            writeback: !self.disk.write_through(),
            num_queues: self.queues,
        }
    }
}

impl Device for BlkDevice {
    fn features(&self) -> u64 {
        blk::features(self.disk.backing.readonly(), self.queues)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn queues(&self) -> usize {
        usize::from(self.queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn apply_features(
        &mut self,
        dp: &Dataplane,
        idx: PortIdx,
        features: u64,
    ) -> Result<(), DataplaneError> {
        self.acked = features;
        // Without FLUSH the guest cannot ask for durability: every write
        // must be durable when acknowledged.
        self.disk
            .set_write_through(!blk::has(features, VIRTIO_BLK_F_FLUSH));
        dp.set_disk_features(
            idx,
            DiskFeatures {
                event_idx: blk::has(features, VIRTIO_RING_F_EVENT_IDX),
            },
        )
    }

    fn get_config(&mut self, offset: u32, size: u32) -> VhostResult<Vec<u8>> {
        let bytes = self.config().to_bytes();
        let (start, len) = (offset as usize, size as usize);
        if len > 256 || start > 256 {
            return Err(VhostError::InvalidParam);
        }
        // Fields past what is served read as zero.
        let mut out = vec![0u8; len];
        if start < CONFIG_LEN {
            let n = (CONFIG_LEN - start).min(len);
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        Ok(out)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> VhostResult<()> {
        // Only the write-cache byte is writable, and only with CONFIG_WCE.
        if offset != CONFIG_WRITEBACK_OFFSET
            || buf.len() != 1
            || !blk::has(self.acked, VIRTIO_BLK_F_CONFIG_WCE)
        {
            log::warn!(
                "disk: refused a write of {} config bytes at offset {offset}",
                buf.len()
            );
            return Err(VhostError::InvalidParam);
        }
        let writeback = buf[0] != 0;
        self.disk
            .set_write_through(!writeback || !blk::has(self.acked, VIRTIO_BLK_F_FLUSH));
        log::info!(
            "disk: guest turned its write cache {}",
            if writeback { "on" } else { "off" }
        );
        Ok(())
    }
}
