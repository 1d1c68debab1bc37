//! Guest drivers of the project's own: vhost-user *frontends* that play the
//! part of a guest.
//!
//! They connect to a socket with the `vhost` crate's [`Frontend`], share
//! memfd-backed guest memory ([`GuestMemory`]), lay out split virtqueues
//! ([`ring`]) and send and receive Ethernet frames ([`NetGuest`]) or block
//! requests ([`BlkGuest`]). The
//! integration tests drive the switch with it, and the benchmark uses its
//! allocation-free hot path (`send_burst`, `recv_into`, `reclaim_tx`) as a
//! traffic generator.
//!
//! [`Frontend`]: vhost::vhost_user::Frontend

pub mod blk;
pub mod memory;
pub mod net;
pub mod ring;

#[cfg(test)]
mod test_backend;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::PollTimeout;
use vhost::vhost_user::message::VHOST_USER_MAX_VRINGS;
use vhost::vhost_user::{Frontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VringConfigData};

pub use blk::{BlkCompletion, BlkConfig, BlkGuest, BlkGuestConfig, BlkRequest, BlkResult, Segment};
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
    #[error("guest memory exhausted (allocating {0} bytes): raise the guest config's mem_size")]
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
    /// A block request's data segment is larger than a descriptor buffer.
    #[error("segment of {len} bytes does not fit a {max}-byte buffer")]
    SegmentTooLarge { len: usize, max: usize },
    /// The guest has no such queue.
    #[error("no queue {0}")]
    NoQueue(usize),
    /// Nothing happened before the deadline.
    #[error("timed out")]
    Timeout,
}

impl From<nix::Error> for GuestError {
    fn from(e: nix::Error) -> Self {
        GuestError::Io(e.into())
    }
}

/// Connect to `path`, retrying until `deadline_in` has passed while the
/// socket is missing or refuses (the backend may still be starting).
pub(crate) fn connect_retry(path: &Path, deadline_in: Duration) -> Result<UnixStream, GuestError> {
    let deadline = Instant::now() + deadline_in;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(GuestError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Start a vhost-user session over `stream` (replies bounded by
/// `reply_timeout`): SET_OWNER and GET_FEATURES, checking that the backend
/// offers VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES. Returns the
/// frontend and the offered features.
pub(crate) fn open_frontend(
    stream: UnixStream,
    reply_timeout: Duration,
) -> Result<(Frontend, u64), GuestError> {
    stream.set_read_timeout(Some(reply_timeout))?;
    stream.set_write_timeout(Some(reply_timeout))?;
    let fe = Frontend::from_stream(stream, VHOST_USER_MAX_VRINGS);
    fe.set_owner()?;
    let offered = fe.get_features()?;
    for (mask, name) in [
        (
            1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
            "VIRTIO_F_VERSION_1",
        ),
        (
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ),
    ] {
        if offered & mask == 0 {
            return Err(GuestError::Unsupported(name.into()));
        }
    }
    Ok((fe, offered))
}

/// SET_VRING_NUM/ADDR/BASE/CALL/KICK for queue `k` (ring addresses as this
/// process's virtual addresses).
pub(crate) fn setup_vring(
    fe: &mut Frontend,
    mem: &GuestMemory,
    k: usize,
    q: &ring::SplitQueue,
) -> Result<(), GuestError> {
    let host = |gpa: u64, len: usize| {
        mem.host_addr(gpa, len)
            .ok_or(GuestError::BadAddress { addr: gpa, len })
    };
    let size = q.size();
    let l = q.layout;
    fe.set_vring_num(k, size)?;
    fe.set_vring_addr(
        k,
        &VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(l.desc, l.len)?,
            used_ring_addr: host(l.used, 1)?,
            avail_ring_addr: host(l.avail, 1)?,
            log_addr: None,
        },
    )?;
    fe.set_vring_base(k, 0)?;
    fe.set_vring_call(k, &q.call)?;
    fe.set_vring_kick(k, &q.kick)?;
    Ok(())
}

/// `d` as a poll timeout, rounded up to whole milliseconds.
pub(crate) fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}
