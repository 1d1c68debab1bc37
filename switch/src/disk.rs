//! Disk ports: what a disk is as configured, and its checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::blk::{BackingError, DiskParams, ID_LEN, MAX_DISK_QUEUES};
use crate::port::{PortMode, PortSpec};
use crate::qos::QosSpec;

/// Default largest ring a disk accepts (QEMU's vhost-user-blk uses 128 or 256).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest ring a disk accepts at most.
pub const MAX_DISK_QUEUE_SIZE: u16 = 1024;

/// Why a disk cannot be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("queues must be between 1 and {MAX_DISK_QUEUES}, got {0}")]
    BadQueues(u16),
    #[error("queue size must be a power of two between 4 and {MAX_DISK_QUEUE_SIZE}, got {0}")]
    BadQueueSize(u16),
    #[error("serial must be at most {ID_LEN} printable ASCII characters, got {0:?}")]
    BadSerial(String),
    #[error("{path} is already served by disk {by:?}; two disks may share a backing only if both are read-only")]
    BackingInUse { path: PathBuf, by: String },
    #[error(transparent)]
    Backing(#[from] BackingError),
}

/// A disk port as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: String,
    /// The raw image file or block device.
    pub path: PathBuf,
    pub socket: PathBuf,
    #[serde(default)]
    pub mode: PortMode,
    #[serde(default)]
    pub readonly: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    #[serde(default)]
    pub direct: bool,
    /// GET_ID answer (default: the disk's name, cut to 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default = "one")]
    pub queues: u16,
    /// Largest ring the frontend may set up.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Logical block size offered to the guest.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<String>,
    /// Limits and share (`qos.set`).
    #[serde(default, skip_serializing_if = "QosSpec::is_empty")]
    pub qos: QosSpec,
}

fn one() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    DEFAULT_QUEUE_SIZE
}

fn default_block_size() -> u32 {
    512
}

impl DiskSpec {
    /// A disk with every default.
    pub fn new(name: &str, path: PathBuf, socket: PathBuf) -> Self {
        DiskSpec {
            name: name.to_string(),
            path,
            socket,
            mode: PortMode::Server,
            readonly: false,
            direct: false,
            serial: None,
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            block_size: 512,
            worker: None,
            owner: None,
            group: None,
            perm: None,
            qos: QosSpec::default(),
        }
    }

    /// Check the disk's own fields (the endpoint is checked as a port's).
    pub fn validate(&self) -> Result<(), DiskError> {
        if self.queues == 0 || usize::from(self.queues) > MAX_DISK_QUEUES {
            return Err(DiskError::BadQueues(self.queues));
        }
        if !self.queue_size.is_power_of_two()
            || !(4..=MAX_DISK_QUEUE_SIZE).contains(&self.queue_size)
        {
            return Err(DiskError::BadQueueSize(self.queue_size));
        }
        if let Some(s) = &self.serial {
            if s.len() > ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(DiskError::BadSerial(s.clone()));
            }
        }
        Ok(())
    }

    /// The GET_ID answer.
    pub fn serial(&self) -> &str {
        match &self.serial {
            Some(s) => s,
            None => &self.name[..self.name.len().min(ID_LEN)],
        }
    }

    /// How to open the backing.
    pub fn params(&self) -> DiskParams {
        DiskParams {
            path: self.path.clone(),
            readonly: self.readonly,
            direct: self.direct,
            block_size: self.block_size,
        }
    }

    /// The endpoint part, as a port spec.
    pub fn endpoint(&self) -> PortSpec {
        PortSpec {
            worker: self.worker,
            owner: self.owner.clone(),
            group: self.group.clone(),
            perm: self.perm.clone(),
            mode: self.mode,
            qos: self.qos,
            ..PortSpec::server(&self.name, self.socket.clone())
        }
    }
}

/// Summary of a disk for listings.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub path: PathBuf,
    pub socket: PathBuf,
    pub mode: PortMode,
    pub index: u16,
    pub worker: usize,
    pub kind: crate::blk::BackingKind,
    pub size: u64,
    pub block_size: u32,
    pub readonly: bool,
    pub direct: bool,
    pub serial: String,
    pub queues: u16,
    pub queue_size: u16,
    pub connected: bool,
    pub broken: bool,
    pub connections: u64,
    /// The guest's write cache is off: writes are durable when acknowledged.
    pub write_through: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_defaults() {
        let mut d = DiskSpec::new("d0", "/x".into(), "/run/d0.sock".into());
        d.validate().unwrap();
        assert_eq!(d.serial(), "d0");
        d.queues = 0;
        assert!(matches!(d.validate(), Err(DiskError::BadQueues(0))));
        d.queues = 17;
        assert!(d.validate().is_err());
        d.queues = 2;
        d.queue_size = 100;
        assert!(matches!(d.validate(), Err(DiskError::BadQueueSize(100))));
        d.queue_size = 2048;
        assert!(d.validate().is_err());
        d.queue_size = 128;
        d.serial = Some("x".repeat(21));
        assert!(matches!(d.validate(), Err(DiskError::BadSerial(_))));
        d.serial = Some("bad\n".into());
        assert!(d.validate().is_err());
        d.serial = Some("SN-0001".into());
        d.validate().unwrap();
        assert_eq!(d.serial(), "SN-0001");
        let long = DiskSpec::new(&"n".repeat(30), "/x".into(), "/s".into());
        assert_eq!(long.serial().len(), ID_LEN);
        let e = long.endpoint();
        assert_eq!((e.name.as_str(), e.queue_pairs), (long.name.as_str(), 1));
    }

    #[test]
    fn parses_with_defaults_and_refuses_unknown_fields() {
        let d: DiskSpec =
            serde_json::from_str(r#"{"name":"d","path":"/img","socket":"/s"}"#).unwrap();
        assert_eq!(
            (d.queues, d.queue_size, d.block_size),
            (1, DEFAULT_QUEUE_SIZE, 512)
        );
        assert!(serde_json::from_str::<DiskSpec>(
            r#"{"name":"d","path":"/img","socket":"/s","color":1}"#
        )
        .is_err());
    }
}
