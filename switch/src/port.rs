//! Ports (net ports and disks): their sockets, the session thread that
//! serves each one's vhost-user connection, and the table of ports of a
//! switch. What is particular to disks is in [`crate::disk`].
//!
//! Each server-mode port has one thread that waits for a connection on the
//! port's socket and then serves it to the end. When the connection ends the
//! port is detached from its worker (rings stopped, FDB entries flushed) before
//! the next connection is accepted, so a reconnecting guest always starts from
//! a clean port. An idle port's thread sleeps in `poll(2)` and costs no CPU.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};
use serde_json::json;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::Disk;
use crate::dataplane::{
    Dataplane, DataplaneError, PortSettings, MAX_FRAME_LEN, MAX_PORTS, MAX_QUEUE_PAIRS,
};
use crate::disk::DiskSpec;
use crate::events::EventBus;
use crate::fdb::PortIdx;
use crate::identity::addr::{check_mappings, AddrError, IpMapping, MacAddr};
use crate::identity::policy::PortPolicy;
use crate::qos::{QosError, QosSpec};
use crate::stats::DiskStats;
use crate::stats::PortStats;
use crate::vhost_user::blk::{BlkDevice, ConfigNotifier};
use crate::vhost_user::net::NetDevice;
use crate::vhost_user::{Device, PortBackend};

/// First wait before a client-mode port connects again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two connection attempts of a client-mode port.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Smallest MTU a port may have (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU: the largest frame less an Ethernet header and a VLAN tag.
pub const MAX_MTU: u16 = (MAX_FRAME_LEN - 18) as u16;

/// After this many refused requests in a row, a frontend is disconnected.
const MAX_CONSECUTIVE_REFUSALS: u32 = 16;
/// Longest port name.
pub const MAX_NAME_LEN: usize = 64;

/// Errors of port management.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("invalid port name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName(String),
    #[error("port {0:?} already exists")]
    Exists(String),
    #[error("no port named {0:?}")]
    NotFound(String),
    #[error(
        "socket {0} is already served by a running process; pick another path or stop that process"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {0} is already used by port {1:?}")]
    SocketTaken(PathBuf, String),
    #[error("cannot create socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queue pairs must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    BadQueues(u16),
    #[error("VLAN must be between 0 (none) and 4094, got {0}")]
    BadVlan(u16),
    #[error("MTU must be between {MIN_MTU} and {MAX_MTU}, got {0}")]
    BadMtu(u16),
    #[error("socket permissions must be an octal mode such as \"0660\", got {0:?}")]
    BadPerm(String),
    #[error("no user {0:?} on this host")]
    NoSuchUser(String),
    #[error("no group {0:?} on this host")]
    NoSuchGroup(String),
    #[error("cannot set owner or permissions of {path}: {source}")]
    Chown {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the switch has {MAX_PORTS} ports already")]
    TooManyPorts,
    #[error("{0:?} is a disk, not a net port: use the disk commands")]
    IsADisk(String),
    #[error("{0:?} is a net port, not a disk: use the port commands")]
    NotADisk(String),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Qos(#[from] QosError),
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error("cannot start the port's session thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Who opens the vhost-user connection.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// The switch listens on the socket; QEMU connects.
    #[default]
    Server,
    /// QEMU listens (`server=on`); the switch connects and reconnects.
    Client,
}

/// What a port is, as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub socket: PathBuf,
    #[serde(default)]
    pub mode: PortMode,
    #[serde(default = "one")]
    pub queue_pairs: u16,
    #[serde(default)]
    pub vlan: u16,
    /// Largest IP packet the port carries (frames over MTU + 18 bytes are
    /// dropped); none: only the switch's frame limit applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Worker to put the port on (round robin when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    /// Owner of a server-mode socket (user name or uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Group of a server-mode socket (group name or gid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Permissions of a server-mode socket, octal (default "0660").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perm: Option<String>,
    /// Limits and share (`qos.set`).
    #[serde(default, skip_serializing_if = "QosSpec::is_empty")]
    pub qos: QosSpec,
    /// No source checks on the identities the port carries (a router or
    /// an uplink); their mappings still apply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted: bool,
    /// The guest's own MAC, when it is not its identity's; none: learnt
    /// from the guest's frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// Identity addresses the guest is configured with another of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_map: Vec<IpMapping>,
}

fn one() -> u16 {
    1
}

impl PortSpec {
    /// A server-mode port with every default.
    pub fn server(name: &str, socket: PathBuf) -> Self {
        PortSpec {
            name: name.to_string(),
            socket,
            mode: PortMode::Server,
            queue_pairs: 1,
            vlan: 0,
            mtu: None,
            worker: None,
            owner: None,
            group: None,
            perm: None,
            qos: QosSpec::default(),
            trusted: false,
            guest_mac: None,
            ip_map: Vec::new(),
        }
    }

    /// Check every field but the socket.
    pub fn validate(&self) -> Result<(), PortError> {
        validate_name(&self.name)?;
        if self.queue_pairs == 0 || usize::from(self.queue_pairs) > MAX_QUEUE_PAIRS {
            return Err(PortError::BadQueues(self.queue_pairs));
        }
        if self.vlan > 4094 {
            return Err(PortError::BadVlan(self.vlan));
        }
        if let Some(m) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&m) {
                return Err(PortError::BadMtu(m));
            }
        }
        if let Some(m) = self.guest_mac {
            m.host()?;
        }
        check_mappings(&self.ip_map)?;
        self.socket_access()?;
        Ok(())
    }

    /// Check the QoS settings for this kind of port.
    pub fn validate_qos(&self, disk: bool) -> Result<(), PortError> {
        Ok(self.qos.validate(disk)?)
    }

    /// The dataplane settings of the port.
    pub fn settings(&self) -> PortSettings {
        PortSettings {
            vlan: self.vlan,
            mtu: self.mtu.unwrap_or(0),
            qos: self.qos,
            policy: None,
        }
    }

    /// Resolved owner, group and mode of a server-mode socket.
    fn socket_access(&self) -> Result<SocketAccess, PortError> {
        let mode = match &self.perm {
            None => 0o660,
            Some(p) => u32::from_str_radix(p.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| PortError::BadPerm(p.clone()))?,
        };
        let uid = match &self.owner {
            None => None,
            Some(o) => Some(match o.parse::<u32>() {
                Ok(n) => nix::unistd::Uid::from_raw(n),
                Err(_) => {
                    nix::unistd::User::from_name(o)
                        .ok()
                        .flatten()
                        .ok_or_else(|| PortError::NoSuchUser(o.clone()))?
                        .uid
                }
            }),
        };
        let gid = match &self.group {
            None => None,
            Some(g) => Some(match g.parse::<u32>() {
                Ok(n) => nix::unistd::Gid::from_raw(n),
                Err(_) => {
                    nix::unistd::Group::from_name(g)
                        .ok()
                        .flatten()
                        .ok_or_else(|| PortError::NoSuchGroup(g.clone()))?
                        .gid
                }
            }),
        };
        Ok(SocketAccess { mode, uid, gid })
    }
}

struct SocketAccess {
    mode: u32,
    uid: Option<nix::unistd::Uid>,
    gid: Option<nix::unistd::Gid>,
}

impl SocketAccess {
    fn apply(&self, path: &Path) -> Result<(), PortError> {
        let err = |source: std::io::Error| PortError::Chown {
            path: path.to_path_buf(),
            source,
        };
        if self.uid.is_some() || self.gid.is_some() {
            nix::unistd::chown(path, self.uid, self.gid).map_err(|e| err(e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode)).map_err(err)
    }
}

/// Whether `name` may name a port (or an identity): 1 to 64 letters,
/// digits, '-', '_' or '.', not starting with '.'.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Check a port name.
pub fn validate_name(name: &str) -> Result<(), PortError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(PortError::InvalidName(name.to_string()))
    }
}

/// Live state of a port's connection.
#[derive(Default)]
pub struct SessionStatus {
    connected: AtomicBool,
    /// The guest's connection has ended; the port is being torn down
    /// (`connected` turns false once it is).
    ending: AtomicBool,
    connections: AtomicU64,
    /// A clone of the current connection, so that removal can cut it.
    conn: Mutex<Option<UnixStream>>,
}

impl SessionStatus {
    /// A guest is connected and the port fully set up for it, or still
    /// being torn down after it left.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A guest is connected and has not left: what failover judges by.
    pub fn live(&self) -> bool {
        self.connected() && !self.ending.load(Ordering::Relaxed)
    }
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    fn cut(&self) {
        if let Ok(conn) = self.conn.lock() {
            if let Some(c) = conn.as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// What a port serves.
pub enum Kind {
    Net,
    Disk(Box<DiskPort>),
}

/// The disk behind a disk port.
pub struct DiskPort {
    pub spec: DiskSpec,
    pub disk: Arc<Disk>,
    /// Tells the connected frontend that the configuration changed.
    pub notifier: Arc<ConfigNotifier>,
}

/// A port of the switch. For a disk, `spec` holds the endpoint fields
/// (name, socket, mode, worker, owner, group, perm) and `kind` the rest.
pub struct Port {
    pub spec: PortSpec,
    pub kind: Kind,
    pub idx: PortIdx,
    pub stats: Arc<PortStats>,
    pub status: Arc<SessionStatus>,
    worker: Arc<AtomicUsize>,
    settings: Arc<Mutex<PortSettings>>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Port {
    /// The worker that polls the port.
    pub fn worker(&self) -> usize {
        self.worker.load(Ordering::Relaxed)
    }

    /// The disk, if this is a disk port.
    pub fn disk(&self) -> Option<&DiskPort> {
        match &self.kind {
            Kind::Disk(d) => Some(d),
            Kind::Net => None,
        }
    }

    /// Whether a guest fault stopped the port.
    pub fn broken(&self) -> bool {
        match &self.kind {
            Kind::Net => self.stats.is_broken(),
            Kind::Disk(d) => d.disk.stats.is_broken(),
        }
    }

    /// Stop the session thread and remove the server-mode socket it bound.
    /// A port whose session never started touches no file: its path may be
    /// anything the caller gave, including another program's socket.
    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.stop.write(1);
        self.status.cut();
        let _ = thread.join();
        if self.spec.mode == PortMode::Server {
            let _ = std::fs::remove_file(&self.spec.socket);
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Bind a listening socket at `path`, replacing a stale socket file but never
/// a live one or anything that is not a socket.
pub fn bind_socket(path: &Path) -> Result<UnixListener, PortError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(PortError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(PortError::SocketInUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| PortError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    listener
        .set_nonblocking(true)
        .map_err(|source| PortError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

/// Whether a vhost-user error ends the connection (rather than one request).
fn ends_connection(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_)
            | VhostError::SocketConnect(_)
            | VhostError::InvalidSocketFd(_)
            | VhostError::NotUnixSocket
            | VhostError::NotStreamSocket
            | VhostError::OversizedMsg
    )
}

/// Wait until `stop` fires (true) or `timeout` passes (false).
fn stopped_within(stop: &EventFd, timeout: Duration) -> bool {
    // SAFETY: the eventfd outlives this call; BorrowedFd only borrows it.
    let stop_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let mut fds = [PollFd::new(stop_fd, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// Wait until `fd` is readable or `stop` fires. Returns false on stop.
fn wait_readable(fd: &impl AsFd, stop: &EventFd) -> bool {
    loop {
        // SAFETY: the eventfd outlives this call; BorrowedFd only borrows it.
        let stop_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stop.as_raw_fd()) };
        let mut fds = [
            PollFd::new(fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop_fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                let stopped = fds[1].revents().is_some_and(|r| !r.is_empty());
                if stopped {
                    return false;
                }
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return true;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log::error!("poll failed: {e}");
                return false;
            }
        }
    }
}

/// Where a session gets its connections.
enum Endpoint {
    Listen(UnixListener),
    Connect(PathBuf),
}

/// What a session serves.
enum SessionDevice {
    Net {
        queue_pairs: u16,
    },
    Disk {
        disk: Arc<Disk>,
        queues: u16,
        queue_size: u16,
        notifier: Arc<ConfigNotifier>,
    },
}

struct Session {
    name: String,
    idx: PortIdx,
    worker: Arc<AtomicUsize>,
    device: SessionDevice,
    dp: Arc<Dataplane>,
    stats: Arc<PortStats>,
    status: Arc<SessionStatus>,
    settings: Arc<Mutex<PortSettings>>,
    stop: Arc<EventFd>,
    events: Arc<EventBus>,
    down: Sender<PortIdx>,
}

impl Session {
    fn run(self, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Listen(l) => self.run_server(l),
            Endpoint::Connect(path) => self.run_client(&path),
        }
    }

    /// Connect to the frontend's socket, serve, and connect again with
    /// backoff, until stopped.
    fn run_client(self, path: &Path) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    if !self.serve(stream) {
                        return;
                    }
                }
                Err(e) => {
                    log::debug!(
                        "port {}: cannot connect to {}: {e}",
                        self.name,
                        path.display()
                    );
                }
            }
            if stopped_within(&self.stop, backoff) {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Accept and serve connections until stopped.
    fn run_server(self, listener: UnixListener) {
        while wait_readable(&listener, &self.stop) {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    log::warn!("port {}: accept failed: {e}", self.name);
                    continue;
                }
            };
            if !self.serve(stream) {
                break;
            }
        }
    }

    /// Serve one connection. Returns false if the port is being removed.
    fn serve(&self, stream: UnixStream) -> bool {
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("port {}: {e}", self.name);
            return true;
        }
        let settings = self.settings.lock().map(|s| s.clone()).unwrap_or_default();
        let worker = self.worker.load(Ordering::Relaxed);
        let attached = match &self.device {
            SessionDevice::Net { .. } => {
                self.dp
                    .attach(self.idx, worker, self.stats.clone(), settings.clone())
            }
            SessionDevice::Disk { disk, .. } => {
                self.dp
                    .attach_disk(self.idx, worker, disk.clone(), settings.clone())
            }
        };
        if let Err(e) = attached {
            log::error!("port {}: cannot attach to worker {worker}: {e}", self.name);
            return true;
        }
        // Settings changed while the port was being attached found it
        // unattached and were only stored: apply the latest.
        let latest = self.settings.lock().map(|s| s.clone()).unwrap_or_default();
        if latest != settings {
            if let Err(e) = self.dp.set_settings(self.idx, latest) {
                log::error!("port {}: cannot apply its settings: {e}", self.name);
            }
        }
        let watch = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                log::error!("port {}: {e}", self.name);
                let _ = self.dp.detach(self.idx);
                return true;
            }
        };
        if let (Ok(mut c), Ok(clone)) = (self.status.conn.lock(), stream.try_clone()) {
            *c = Some(clone);
        }
        self.status.ending.store(false, Ordering::Relaxed);
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.connections.fetch_add(1, Ordering::Relaxed);
        log::info!("port {}: guest connected", self.name);
        self.events
            .emit("port.connected", json!({ "port": self.name }));
        // A move while the port was being attached went to the old worker's
        // absence: put the port where it is configured to be now.
        let now = self.worker.load(Ordering::Relaxed);
        if now != worker {
            if let Err(e) = self.dp.move_port(self.idx, now) {
                log::error!("port {}: cannot move to worker {now}: {e}", self.name);
            }
        }
        let stopping = match &self.device {
            SessionDevice::Net { queue_pairs } => {
                self.handle(stream, &watch, NetDevice::new(*queue_pairs), None)
            }
            SessionDevice::Disk {
                disk,
                queues,
                queue_size,
                notifier,
            } => {
                let device = BlkDevice::new(disk.clone(), *queues, *queue_size);
                let stopping = self.handle(stream, &watch, device, Some(notifier));
                notifier.set(None);
                stopping
            }
        };
        if let Err(e) = self.dp.detach(self.idx) {
            log::error!("port {}: detach failed: {e}", self.name);
        }
        if let Ok(mut c) = self.status.conn.lock() {
            *c = None;
        }
        self.status.connected.store(false, Ordering::Relaxed);
        self.events
            .emit("port.disconnected", json!({ "port": self.name }));
        !stopping
    }

    /// The guest went away by itself: tell the identity monitor at once,
    /// before the port's rings are torn down and it is detached (which
    /// waits for its worker), so that its identities fail over without
    /// that wait. The port shows as disconnected, and says so, once it is
    /// torn down.
    fn went_away(&self) {
        self.status.ending.store(true, Ordering::Relaxed);
        let _ = self.down.send(self.idx);
    }
}

impl Session {
    /// Answer the frontend's requests until it goes or the port is
    /// stopped. Returns true when stopped.
    fn handle<D: Device>(
        &self,
        stream: UnixStream,
        watch: &UnixStream,
        device: D,
        notifier: Option<&Arc<ConfigNotifier>>,
    ) -> bool {
        let backend = Arc::new(Mutex::new(PortBackend::new(
            &self.name,
            self.idx,
            self.dp.clone(),
            device,
        )));
        let mut handler = BackendReqHandler::from_stream(stream, backend);
        let mut refusals = 0;
        loop {
            if !wait_readable(watch, &self.stop) {
                return true;
            }
            if let Some(n) = notifier {
                if let Some(chan) = peek_backend_channel(watch) {
                    n.set(Some(chan));
                }
            }
            match handler.handle_request() {
                Ok(()) => refusals = 0,
                Err(e) if ends_connection(&e) => {
                    log::info!("port {}: guest disconnected ({e})", self.name);
                    self.went_away();
                    return false;
                }
                Err(e @ VhostError::InactiveFeature(_)) => {
                    // QEMU enables rings before it acks the features; harmless.
                    log::debug!(
                        "port {}: refused a request before feature negotiation: {e}",
                        self.name
                    );
                }
                Err(e) => {
                    refusals += 1;
                    log::warn!("port {}: refused a vhost-user request: {e}", self.name);
                    if refusals >= MAX_CONSECUTIVE_REFUSALS {
                        log::warn!(
                            "port {}: {refusals} refused requests in a row; dropping the connection",
                            self.name
                        );
                        self.went_away();
                        return false;
                    }
                }
            }
        }
    }
}

/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;

/// If the next message on `sock` is `SET_BACKEND_REQ_FD`, return a duplicate
/// of the channel it carries, leaving the message for the `vhost` crate.
///
/// The crate keeps that channel to itself and (in 0.18) has no way to send
/// a configuration-change message on it, so a disk needs its own handle: a
/// `MSG_PEEK` that receives the descriptor installs a duplicate without
/// consuming the message.
fn peek_backend_channel(sock: &UnixStream) -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    let mut hdr = [0u8; 12];
    // SAFETY: a peek of at most 12 bytes into a local buffer, without
    // control data (so no descriptor is installed), on a socket we own.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 4 || u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != SET_BACKEND_REQ_FD {
        return None;
    }
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // Room for one descriptor.
    let mut cmsg = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: recvmsg writes at most iov_len bytes into `hdr` and at most
    // msg_controllen bytes into `cmsg`, both live locals.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return None;
    }
    // SAFETY: CMSG_FIRSTHDR/CMSG_DATA walk the control buffer recvmsg filled,
    // within msg_controllen; the data of an SCM_RIGHTS message is an array
    // of descriptors, now installed in this process and owned by us.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return None;
        }
        let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
        let fds = libc::CMSG_DATA(c) as *const libc::c_int;
        let mut chan = None;
        for i in 0..count {
            let fd = std::ptr::read_unaligned(fds.add(i));
            if i == 0 {
                chan = Some(UnixStream::from_raw_fd(fd));
            } else {
                libc::close(fd);
            }
        }
        chan
    }
}

/// What every session of a table shares.
struct SessionContext {
    dp: Arc<Dataplane>,
    events: Arc<EventBus>,
    down: Sender<PortIdx>,
}

/// Bind (server mode) and start the session thread of a port.
fn start_session(ctx: &SessionContext, port: &mut Port) -> Result<(), PortError> {
    let endpoint = prepare_endpoint(&port.spec)?;
    spawn_session(ctx, port, endpoint)
}

/// Bind a server-mode socket (with its owner and permissions), or note
/// where a client-mode port connects.
fn prepare_endpoint(spec: &PortSpec) -> Result<Endpoint, PortError> {
    match spec.mode {
        PortMode::Server => {
            let access = spec.socket_access()?;
            let listener = bind_socket(&spec.socket)?;
            if let Err(e) = access.apply(&spec.socket) {
                let _ = std::fs::remove_file(&spec.socket);
                return Err(e);
            }
            Ok(Endpoint::Listen(listener))
        }
        PortMode::Client => Ok(Endpoint::Connect(spec.socket.clone())),
    }
}

/// Start the session thread of a port on a prepared endpoint.
fn spawn_session(
    ctx: &SessionContext,
    port: &mut Port,
    endpoint: Endpoint,
) -> Result<(), PortError> {
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(PortError::Thread)?);
    let session = Session {
        name: port.spec.name.clone(),
        idx: port.idx,
        worker: port.worker.clone(),
        device: match &port.kind {
            Kind::Net => SessionDevice::Net {
                queue_pairs: port.spec.queue_pairs,
            },
            Kind::Disk(d) => SessionDevice::Disk {
                disk: d.disk.clone(),
                queues: d.spec.queues,
                queue_size: d.spec.queue_size,
                notifier: d.notifier.clone(),
            },
        },
        dp: ctx.dp.clone(),
        stats: port.stats.clone(),
        status: port.status.clone(),
        settings: port.settings.clone(),
        stop: stop.clone(),
        events: ctx.events.clone(),
        down: ctx.down.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("port-{}", port.spec.name))
        .spawn(move || session.run(endpoint))
        .map_err(|e| {
            if port.spec.mode == PortMode::Server {
                let _ = std::fs::remove_file(&port.spec.socket);
            }
            PortError::Thread(e)
        })?;
    port.stop = stop;
    port.thread = Some(thread);
    Ok(())
}

/// Summary of a port for listings.
#[derive(Debug, Clone, Serialize)]
pub struct PortInfo {
    pub name: String,
    pub socket: PathBuf,
    pub mode: PortMode,
    pub index: PortIdx,
    pub worker: usize,
    pub queue_pairs: u16,
    pub vlan: u16,
    pub mtu: Option<u16>,
    pub trusted: bool,
    pub guest_mac: Option<MacAddr>,
    pub ip_map: Vec<IpMapping>,
    pub connected: bool,
    pub broken: bool,
    pub connections: u64,
}

/// Changes `port.set` can make to a port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortChanges {
    #[serde(default)]
    pub vlan: Option<u16>,
    /// 0 removes the MTU limit.
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub worker: Option<usize>,
    #[serde(default)]
    pub mode: Option<PortMode>,
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub trusted: Option<bool>,
    /// `null` removes the guest MAC (learnt again).
    #[serde(default, deserialize_with = "present")]
    pub guest_mac: Option<Option<MacAddr>>,
    /// Replaces the list; `[]` empties it.
    #[serde(default)]
    pub ip_map: Option<Vec<IpMapping>>,
}

impl PortChanges {
    /// Whether the changes touch what the port's identities' policy reads.
    pub fn touch_policy(&self) -> bool {
        self.trusted.is_some() || self.guest_mac.is_some() || self.ip_map.is_some()
    }
}

/// A field that may be given as `null`: absent is `None` (the field's
/// default), present is `Some`, `null` included.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The ports of a switch.
pub struct PortTable {
    ctx: SessionContext,
    ports: BTreeMap<String, Port>,
    used: Vec<bool>,
    next_worker: usize,
}

impl PortTable {
    /// A table whose sessions report on `down` the ports whose guest went
    /// away by itself (disconnected, not removed), once the port is
    /// detached.
    pub fn new(dp: Arc<Dataplane>, events: Arc<EventBus>, down: Sender<PortIdx>) -> Self {
        PortTable {
            ctx: SessionContext { dp, events, down },
            ports: BTreeMap::new(),
            used: vec![false; MAX_PORTS],
            next_worker: 0,
        }
    }

    fn check_worker(&self, w: usize) -> Result<usize, PortError> {
        let workers = self.ctx.dp.worker_count();
        if w >= workers {
            return Err(DataplaneError::NoSuchWorker(w, workers).into());
        }
        Ok(w)
    }

    /// Bind (server mode) and start the session thread of a port.
    fn start_session(&self, port: &mut Port) -> Result<(), PortError> {
        start_session(&self.ctx, port)
    }

    /// Create a net port and start serving it.
    pub fn add(&mut self, spec: PortSpec) -> Result<PortInfo, PortError> {
        spec.validate()?;
        spec.validate_qos(false)?;
        let port = self.insert(spec, Kind::Net)?;
        Ok(Self::info(port))
    }

    /// Create a disk port: open its backing and start serving it.
    pub fn add_disk(&mut self, spec: DiskSpec) -> Result<crate::disk::DiskInfo, PortError> {
        spec.validate()?;
        let endpoint = spec.endpoint();
        endpoint.validate()?;
        endpoint.validate_qos(true)?;
        self.check_free(&endpoint)?;
        let backing =
            crate::blk::Backing::open(&spec.params()).map_err(crate::disk::DiskError::from)?;
        // Two writers (or a writer and a reader) of one file would corrupt
        // each other's view: only read-only disks may share a backing.
        if let Some(other) = self.ports.values().find(|p| {
            p.disk().is_some_and(|d| {
                d.disk.backing.same_file(&backing) && !(spec.readonly && d.spec.readonly)
            })
        }) {
            return Err(crate::disk::DiskError::BackingInUse {
                path: spec.path.clone(),
                by: other.spec.name.clone(),
            }
            .into());
        }
        let disk = Arc::new(Disk::new(backing, spec.serial()));
        let kind = Kind::Disk(Box::new(DiskPort {
            spec,
            disk,
            notifier: Arc::new(ConfigNotifier::default()),
        }));
        let port = self.insert(endpoint, kind)?;
        Self::disk_info(port).ok_or_else(|| PortError::NotADisk(String::new()))
    }

    /// Refuse a name or socket that another port has.
    fn check_free(&self, spec: &PortSpec) -> Result<(), PortError> {
        if self.ports.contains_key(&spec.name) {
            return Err(PortError::Exists(spec.name.clone()));
        }
        if let Some(p) = self.ports.values().find(|p| p.spec.socket == spec.socket) {
            return Err(PortError::SocketTaken(
                spec.socket.clone(),
                p.spec.name.clone(),
            ));
        }
        Ok(())
    }

    /// Add a checked port and start its session.
    fn insert(&mut self, spec: PortSpec, kind: Kind) -> Result<&Port, PortError> {
        self.check_free(&spec)?;
        let worker = match spec.worker {
            Some(w) => self.check_worker(w)?,
            None => {
                let w = self.next_worker % self.ctx.dp.worker_count();
                self.next_worker = self.next_worker.wrapping_add(1);
                w
            }
        };
        let idx = self
            .used
            .iter()
            .position(|u| !u)
            .ok_or(PortError::TooManyPorts)?;
        let mut port = Port {
            idx: idx as PortIdx,
            kind,
            stats: Arc::new(PortStats::default()),
            status: Arc::new(SessionStatus::default()),
            worker: Arc::new(AtomicUsize::new(worker)),
            settings: Arc::new(Mutex::new(spec.settings())),
            stop: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(PortError::Thread)?),
            thread: None,
            spec,
        };
        self.start_session(&mut port)?;
        self.used[idx] = true;
        let what = if port.disk().is_some() {
            "disk"
        } else {
            "port"
        };
        log::info!(
            "{what} {} added ({:?} mode, {})",
            port.spec.name,
            port.spec.mode,
            port.spec.socket.display()
        );
        self.ctx.events.emit(
            "port.added",
            json!({ "port": port.spec.name, "kind": what }),
        );
        let name = port.spec.name.clone();
        Ok(self.ports.entry(name).or_insert(port))
    }

    /// Replace a port's or disk's QoS. It applies between two batches of
    /// its worker, keeping the tokens its buckets hold and what is queued.
    pub fn set_qos(&mut self, name: &str, qos: QosSpec) -> Result<QosSpec, PortError> {
        let port = self
            .ports
            .get_mut(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))?;
        let disk = port.disk().is_some();
        qos.validate(disk)?;
        port.spec.qos = qos;
        if let Kind::Disk(d) = &mut port.kind {
            d.spec.qos = qos;
        }
        self.update_settings(name, |s| s.qos = qos)?;
        log::info!(
            "{name}: QoS {}",
            serde_json::to_string(&qos).unwrap_or_default()
        );
        Ok(qos)
    }

    /// Replace the policy a net port enforces for the identities it
    /// carries (see [`crate::identity`]). It applies between two batches of
    /// the port's worker, or when its guest attaches.
    pub fn set_policy(&self, name: &str, policy: Option<PortPolicy>) -> Result<(), PortError> {
        let policy = policy.map(Arc::new);
        self.update_settings(name, |s| s.policy = policy)
    }

    /// Change a port's dataplane settings with `change` and hand them to
    /// its worker; an unattached port's worker gets them when its guest
    /// attaches. Nothing is sent when nothing changed.
    fn update_settings(
        &self,
        name: &str,
        change: impl FnOnce(&mut PortSettings),
    ) -> Result<(), PortError> {
        let port = self.get(name)?;
        let settings = {
            let mut s = port.settings.lock().unwrap_or_else(|p| p.into_inner());
            let before = s.clone();
            change(&mut s);
            if *s == before {
                return Ok(());
            }
            s.clone()
        };
        match self.ctx.dp.set_settings(port.idx, settings) {
            Ok(()) | Err(DataplaneError::NotAttached(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Change a disk's capacity (see [`crate::blk::Backing::resize`]) and tell
    /// its guest. Returns the new size in bytes.
    pub fn resize_disk(
        &mut self,
        name: &str,
        size: Option<u64>,
        shrink: bool,
    ) -> Result<u64, PortError> {
        let port = self.get(name)?;
        let d = port
            .disk()
            .ok_or_else(|| PortError::NotADisk(name.to_string()))?;
        let size = d
            .disk
            .backing
            .resize(size, shrink)
            .map_err(crate::disk::DiskError::from)?;
        match d.notifier.notify() {
            Ok(true) => log::info!("disk {name}: resized to {size} bytes; guest notified"),
            Ok(false) => log::info!("disk {name}: resized to {size} bytes (no guest to notify)"),
            Err(e) => {
                log::warn!("disk {name}: resized to {size} bytes; cannot notify the guest: {e}")
            }
        }
        self.ctx
            .events
            .emit("disk.resized", json!({ "port": name, "size": size }));
        Ok(size)
    }

    /// Remove a port: its guest is disconnected, its FDB entries (static ones
    /// too) forgotten and its server socket removed.
    pub fn remove(&mut self, name: &str) -> Result<(), PortError> {
        let mut port = self
            .ports
            .remove(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))?;
        port.shutdown();
        self.ctx.dp.fdb().flush_port(port.idx, true);
        self.used[usize::from(port.idx)] = false;
        log::info!("port {name} removed");
        self.ctx
            .events
            .emit("port.removed", json!({ "port": name }));
        Ok(())
    }

    /// Change a port. VLAN and MTU apply at once without disturbing the
    /// guest; a new worker moves the rings between two batches; a new mode
    /// or socket restarts the port's session (the guest reconnects).
    pub fn set(&mut self, name: &str, ch: PortChanges) -> Result<PortInfo, PortError> {
        let port = self
            .ports
            .get(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))?;
        let mut spec = port.spec.clone();
        if let Some(v) = ch.vlan {
            spec.vlan = v;
        }
        if let Some(m) = ch.mtu {
            spec.mtu = (m != 0).then_some(m);
        }
        if let Some(m) = ch.mode {
            spec.mode = m;
        }
        if let Some(s) = &ch.socket {
            spec.socket = s.clone();
            if let Some(p) = self
                .ports
                .values()
                .find(|p| p.spec.socket == *s && p.spec.name != name)
            {
                return Err(PortError::SocketTaken(s.clone(), p.spec.name.clone()));
            }
        }
        if let Some(w) = ch.worker {
            spec.worker = Some(self.check_worker(w)?);
        }
        if let Some(t) = ch.trusted {
            spec.trusted = t;
        }
        if let Some(m) = ch.guest_mac {
            spec.guest_mac = m;
        }
        if let Some(m) = &ch.ip_map {
            spec.ip_map = m.clone();
        }
        spec.validate()?;
        let restart = spec.mode != port.spec.mode || spec.socket != port.spec.socket;
        let vlan_changed = spec.vlan != port.spec.vlan;
        let idx = port.idx;
        let Some(port) = self.ports.get_mut(name) else {
            return Err(PortError::NotFound(name.to_string()));
        };
        // What can fail comes first, and a failure puts everything back.
        let old_settings = port.settings.lock().map(|s| s.clone()).unwrap_or_default();
        // The identities the port carries stay.
        let settings = PortSettings {
            policy: old_settings.policy.clone(),
            ..spec.settings()
        };
        if let Ok(mut s) = port.settings.lock() {
            *s = settings.clone();
        }
        if restart {
            // The new endpoint first: if it cannot be had, the guest stays
            // connected on the old one and nothing changes.
            let endpoint = match prepare_endpoint(&spec) {
                Ok(e) => e,
                Err(e) => {
                    if let Ok(mut s) = port.settings.lock() {
                        *s = old_settings;
                    }
                    return Err(e);
                }
            };
            port.shutdown();
            let previous = std::mem::replace(&mut port.spec, spec.clone());
            if let Err(e) = spawn_session(&self.ctx, port, endpoint) {
                port.spec = previous;
                if let Ok(mut s) = port.settings.lock() {
                    *s = old_settings;
                }
                if let Err(e2) = start_session(&self.ctx, port) {
                    log::error!("port {name}: cannot restart with its old settings either: {e2}");
                }
                return Err(e);
            }
        }
        match self.ctx.dp.set_settings(idx, settings) {
            Ok(()) | Err(DataplaneError::NotAttached(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if vlan_changed {
            self.ctx.dp.fdb().flush_port(idx, false);
        }
        if let Some(port) = self.ports.get_mut(name) {
            port.spec = PortSpec {
                worker: port.spec.worker,
                ..spec
            };
        }
        if let Some(w) = ch.worker {
            self.move_port(name, w)?;
        }
        let port = self.get(name)?;
        Ok(Self::info(port))
    }

    /// Move a port to another worker. A connected port is handed over
    /// between two batches, rings and all (see [`Dataplane::move_port`]).
    pub fn move_port(&mut self, name: &str, worker: usize) -> Result<(), PortError> {
        let worker = self.check_worker(worker)?;
        let port = self
            .ports
            .get_mut(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))?;
        if port.worker() == worker {
            return Ok(());
        }
        port.worker.store(worker, Ordering::Relaxed);
        port.spec.worker = Some(worker);
        match self.ctx.dp.move_port(port.idx, worker) {
            // Not connected: it attaches to the new worker when it connects.
            Ok(()) | Err(DataplaneError::NotAttached(_)) => {}
            Err(e) => return Err(e.into()),
        }
        log::info!("port {name} moved to worker {worker}");
        Ok(())
    }

    /// Spread ports over the workers so that their counts differ by at most one.
    pub fn rebalance(&mut self) -> Result<usize, PortError> {
        let workers = self.ctx.dp.worker_count();
        let mut moved = 0;
        loop {
            let mut count = vec![0usize; workers];
            for p in self.ports.values() {
                count[p.worker()] += 1;
            }
            let (max_w, max) = count
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| **c)
                .unwrap_or((0, &0));
            let (min_w, min) = count
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| **c)
                .unwrap_or((0, &0));
            if max - min <= 1 {
                return Ok(moved);
            }
            let Some(name) = self
                .ports
                .values()
                .rev()
                .find(|p| p.worker() == max_w)
                .map(|p| p.spec.name.clone())
            else {
                return Ok(moved);
            };
            self.move_port(&name, min_w)?;
            moved += 1;
        }
    }

    /// Look a port up.
    pub fn get(&self, name: &str) -> Result<&Port, PortError> {
        self.ports
            .get(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))
    }

    /// Find a port by index.
    pub fn by_index(&self, idx: PortIdx) -> Option<&Port> {
        self.ports.values().find(|p| p.idx == idx)
    }

    /// Every port, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Port> {
        self.ports.values()
    }

    /// The net port specs to save: with the worker each port is on now.
    pub fn specs(&self) -> Vec<PortSpec> {
        self.ports
            .values()
            .filter(|p| p.disk().is_none())
            .map(|p| PortSpec {
                worker: Some(p.worker()),
                ..p.spec.clone()
            })
            .collect()
    }

    /// The disk specs to save: with the worker each disk is on now.
    pub fn disk_specs(&self) -> Vec<DiskSpec> {
        self.ports
            .values()
            .filter_map(|p| {
                p.disk().map(|d| DiskSpec {
                    worker: Some(p.worker()),
                    ..d.spec.clone()
                })
            })
            .collect()
    }

    /// A disk's summary (None for a net port).
    pub fn disk_info(p: &Port) -> Option<crate::disk::DiskInfo> {
        let d = p.disk()?;
        let b = &d.disk.backing;
        Some(crate::disk::DiskInfo {
            name: p.spec.name.clone(),
            path: d.spec.path.clone(),
            socket: p.spec.socket.clone(),
            mode: p.spec.mode,
            index: p.idx,
            worker: p.worker(),
            kind: b.kind(),
            size: b.size(),
            block_size: b.block_size(),
            readonly: b.readonly(),
            direct: b.direct(),
            serial: d.spec.serial().to_string(),
            queues: d.spec.queues,
            queue_size: d.spec.queue_size,
            connected: p.status.connected(),
            broken: p.broken(),
            connections: p.status.connections(),
            write_through: d.disk.write_through(),
        })
    }

    /// A disk's counters.
    pub fn disk_stats(&self, name: &str) -> Result<&DiskStats, PortError> {
        self.get(name)?
            .disk()
            .map(|d| &d.disk.stats)
            .ok_or_else(|| PortError::NotADisk(name.to_string()))
    }

    /// A port's summary.
    pub fn info(p: &Port) -> PortInfo {
        PortInfo {
            name: p.spec.name.clone(),
            socket: p.spec.socket.clone(),
            mode: p.spec.mode,
            index: p.idx,
            worker: p.worker(),
            queue_pairs: p.spec.queue_pairs,
            vlan: p.spec.vlan,
            mtu: p.spec.mtu,
            trusted: p.spec.trusted,
            guest_mac: p.spec.guest_mac,
            ip_map: p.spec.ip_map.clone(),
            connected: p.status.connected(),
            broken: p.broken(),
            connections: p.status.connections(),
        }
    }

    /// Remove every port.
    pub fn clear(&mut self) {
        let names: Vec<String> = self.ports.keys().cloned().collect();
        for n in names {
            let _ = self.remove(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["vm1", "a", "web-01.eth0", "x_y"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in ["", ".hidden", "a/b", "a b", "é", long.as_str(), "../x"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bind_refuses_live_sockets_and_files_and_replaces_stale_ones() {
        let dir = std::env::temp_dir().join(format!("vioswitch-port-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind_socket(&file), Err(PortError::NotASocket(_))));
        let live = dir.join("live.sock");
        let l = bind_socket(&live).unwrap();
        assert!(matches!(bind_socket(&live), Err(PortError::SocketInUse(_))));
        drop(l); // the file stays: a stale socket
        assert!(live.exists());
        assert!(bind_socket(&live).is_ok());
        assert!(matches!(
            bind_socket(&dir.join("missing/x.sock")),
            Err(PortError::Bind { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
