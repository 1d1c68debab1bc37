//! The virtio-net device model of a port.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostError, Result as VhostResult};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::Device;
use crate::dataplane::{Dataplane, DataplaneError, NetFeatures, MAX_QUEUE_PAIRS};
use crate::fdb::PortIdx;

/// The virtio features a net port offers.
pub fn net_features(queue_pairs: u16) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_F_NOTIFY_ON_EMPTY
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if queue_pairs > 1 {
        f |= 1 << VIRTIO_NET_F_MQ;
    }
    f
}

/// The vhost-user protocol features a net port offers.
pub fn net_protocol_features(queue_pairs: u16) -> VhostUserProtocolFeatures {
    let mut f =
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if queue_pairs > 1 {
        f |= VhostUserProtocolFeatures::MQ;
    }
    f
}

/// A virtio-net port with `queue_pairs` RX/TX pairs.
pub struct NetDevice {
    queue_pairs: u16,
}

impl NetDevice {
    pub fn new(queue_pairs: u16) -> Self {
        NetDevice {
            queue_pairs: queue_pairs.clamp(1, MAX_QUEUE_PAIRS as u16),
        }
    }
}

impl Device for NetDevice {
    fn features(&self) -> u64 {
        net_features(self.queue_pairs)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        net_protocol_features(self.queue_pairs)
    }

    fn queues(&self) -> usize {
        2 * usize::from(self.queue_pairs)
    }

    fn apply_features(
        &mut self,
        dp: &Dataplane,
        idx: PortIdx,
        features: u64,
    ) -> Result<(), DataplaneError> {
        let has = |bit: u32| features & (1 << bit) != 0;
        dp.set_features(
            idx,
            NetFeatures {
                mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
                event_idx: has(VIRTIO_RING_F_EVENT_IDX),
                version_1: has(VIRTIO_F_VERSION_1),
                notify_on_empty: has(VIRTIO_F_NOTIFY_ON_EMPTY),
            },
        )
    }

    fn get_config(&mut self, _offset: u32, _size: u32) -> VhostResult<Vec<u8>> {
        Err(VhostError::InvalidOperation(
            "net ports have no vhost-user config space",
        ))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8]) -> VhostResult<()> {
        Err(VhostError::InvalidOperation(
            "net ports have no vhost-user config space",
        ))
    }
}
