//! A virtio-net guest driver of the project's own: a vhost-user *frontend*
//! that plays the part of a guest.
//!
//! It connects to a port socket with the `vhost` crate's [`Frontend`], shares
//! memfd-backed guest memory ([`GuestMemory`]), lays out split virtqueues
//! ([`ring`]) and sends and receives Ethernet frames ([`NetGuest`]). The
//! integration tests drive the switch with it, and the benchmark uses its
//! allocation-free hot path (`send_burst`, `recv_into`, `reclaim_tx`) as a
//! traffic generator.
//!
//! [`Frontend`]: vhost::vhost_user::Frontend

pub mod memory;
pub mod net;
pub mod ring;

#[cfg(test)]
mod test_backend;

use std::path::PathBuf;

pub use memory::{GuestMemory, RegionInfo, GUEST_PHYS_BASE, REGION_GAP};
pub use net::{eth_frame, NetGuest, NetGuestConfig, NET_HDR_LEN, TX_BUF_LEN};
pub use ring::{RawQueue, RingLayout};

/// Errors of the guest driver.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The vhost-user socket could not be connected to within the deadline.
    #[error("cannot connect to vhost-user socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A vhost-user request failed (the backend refused it or the socket broke).
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// A system call failed (memfd, mmap, eventfd, poll).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The backend does not offer something the configuration needs.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// The configuration is not usable.
    #[error("invalid guest configuration: {0}")]
    InvalidConfig(String),
    /// Guest memory has no room left for an allocation of this many bytes.
    #[error("guest memory exhausted (allocating {0} bytes): raise NetGuestConfig::mem_size")]
    OutOfMemory(usize),
    /// A guest-physical range is not (entirely) inside one memory region.
    #[error("guest-physical range {addr:#x}+{len:#x} is not inside guest memory")]
    BadAddress { addr: u64, len: usize },
    /// No free descriptor (or not enough for the chain) in the TX ring.
    #[error("TX ring full")]
    RingFull,
    /// The frame (plus its virtio-net header) does not fit a descriptor buffer.
    #[error("frame of {len} bytes does not fit a {max}-byte buffer")]
    FrameTooLarge { len: usize, max: usize },
    /// Nothing happened before the deadline.
    #[error("timed out")]
    Timeout,
}

impl From<nix::Error> for GuestError {
    fn from(e: nix::Error) -> Self {
        GuestError::Io(e.into())
    }
}
