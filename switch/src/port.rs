//! Net ports: their sockets, the session thread that serves each one's
//! vhost-user connection, and the table of ports of a switch.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dataplane::{Dataplane, DataplaneError, PortSettings, MAX_PORTS, MAX_QUEUE_PAIRS};
use crate::fdb::PortIdx;
use crate::stats::PortStats;
use crate::vhost_user::NetBackend;

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
    #[error("the switch has {MAX_PORTS} ports already")]
    TooManyPorts,
    #[error("cannot start the port's session thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// What a port is, as configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub socket: PathBuf,
    #[serde(default = "one")]
    pub queue_pairs: u16,
    #[serde(default)]
    pub vlan: u16,
    /// Worker to put the port on (round robin when absent).
    #[serde(default)]
    pub worker: Option<usize>,
}

fn one() -> u16 {
    1
}

/// Check a port name.
pub fn validate_name(name: &str) -> Result<(), PortError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(PortError::InvalidName(name.to_string()))
    }
}

/// Live state of a port's connection.
#[derive(Default)]
pub struct SessionStatus {
    connected: AtomicBool,
    connections: AtomicU64,
    /// A clone of the current connection, so that removal can cut it.
    conn: Mutex<Option<UnixStream>>,
}

impl SessionStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
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

/// A port of the switch.
pub struct Port {
    pub spec: PortSpec,
    pub idx: PortIdx,
    pub worker: usize,
    pub stats: Arc<PortStats>,
    pub status: Arc<SessionStatus>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Port {
    /// Stop the session thread and remove the socket.
    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        self.status.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.spec.socket);
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

struct Session {
    name: String,
    idx: PortIdx,
    worker: usize,
    queue_pairs: u16,
    dp: Arc<Dataplane>,
    stats: Arc<PortStats>,
    status: Arc<SessionStatus>,
    settings: Arc<Mutex<PortSettings>>,
    stop: Arc<EventFd>,
}

impl Session {
    /// Accept and serve connections until stopped.
    fn run(self, listener: UnixListener) {
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
        let settings = self.settings.lock().map(|s| *s).unwrap_or_default();
        if let Err(e) = self
            .dp
            .attach(self.idx, self.worker, self.stats.clone(), settings)
        {
            log::error!(
                "port {}: cannot attach to worker {}: {e}",
                self.name,
                self.worker
            );
            return true;
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
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.connections.fetch_add(1, Ordering::Relaxed);
        log::info!("port {}: guest connected", self.name);
        let backend = Arc::new(Mutex::new(NetBackend::new(
            &self.name,
            self.idx,
            self.dp.clone(),
            self.queue_pairs,
        )));
        let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
        let mut stopping = false;
        let mut refusals = 0;
        loop {
            if !wait_readable(&watch, &self.stop) {
                stopping = true;
                break;
            }
            match handler.handle_request() {
                Ok(()) => refusals = 0,
                Err(e) if ends_connection(&e) => {
                    log::info!("port {}: guest disconnected ({e})", self.name);
                    break;
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
                        break;
                    }
                }
            }
        }
        drop(handler);
        drop(backend);
        if let Err(e) = self.dp.detach(self.idx) {
            log::error!("port {}: detach failed: {e}", self.name);
        }
        if let Ok(mut c) = self.status.conn.lock() {
            *c = None;
        }
        self.status.connected.store(false, Ordering::Relaxed);
        !stopping
    }
}

/// Summary of a port for listings.
#[derive(Debug, Clone, Serialize)]
pub struct PortInfo {
    pub name: String,
    pub socket: PathBuf,
    pub index: PortIdx,
    pub worker: usize,
    pub queue_pairs: u16,
    pub vlan: u16,
    pub connected: bool,
    pub broken: bool,
    pub connections: u64,
}

/// The ports of a switch.
pub struct PortTable {
    dp: Arc<Dataplane>,
    ports: BTreeMap<String, Port>,
    used: Vec<bool>,
    next_worker: usize,
}

impl PortTable {
    pub fn new(dp: Arc<Dataplane>) -> Self {
        PortTable {
            dp,
            ports: BTreeMap::new(),
            used: vec![false; MAX_PORTS],
            next_worker: 0,
        }
    }

    /// Create a server-mode port and start serving its socket.
    pub fn add(&mut self, spec: PortSpec) -> Result<PortInfo, PortError> {
        validate_name(&spec.name)?;
        if self.ports.contains_key(&spec.name) {
            return Err(PortError::Exists(spec.name));
        }
        if spec.queue_pairs == 0 || usize::from(spec.queue_pairs) > MAX_QUEUE_PAIRS {
            return Err(PortError::BadQueues(spec.queue_pairs));
        }
        if spec.vlan > 4094 {
            return Err(PortError::BadVlan(spec.vlan));
        }
        if let Some(p) = self.ports.values().find(|p| p.spec.socket == spec.socket) {
            return Err(PortError::SocketTaken(spec.socket, p.spec.name.clone()));
        }
        let workers = self.dp.worker_count();
        let worker = match spec.worker {
            Some(w) if w >= workers => {
                return Err(DataplaneError::NoSuchWorker(w, workers).into());
            }
            Some(w) => w,
            None => {
                let w = self.next_worker % workers;
                self.next_worker = self.next_worker.wrapping_add(1);
                w
            }
        };
        let idx = self
            .used
            .iter()
            .position(|u| !u)
            .ok_or(PortError::TooManyPorts)?;
        let listener = bind_socket(&spec.socket)?;
        let stats = Arc::new(PortStats::default());
        let status = Arc::new(SessionStatus::default());
        let settings = Arc::new(Mutex::new(PortSettings { vlan: spec.vlan }));
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(PortError::Thread)?);
        let session = Session {
            name: spec.name.clone(),
            idx: idx as PortIdx,
            worker,
            queue_pairs: spec.queue_pairs,
            dp: self.dp.clone(),
            stats: stats.clone(),
            status: status.clone(),
            settings,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("port-{}", spec.name))
            .spawn(move || session.run(listener))
            .map_err(|e| {
                let _ = std::fs::remove_file(&spec.socket);
                PortError::Thread(e)
            })?;
        self.used[idx] = true;
        let port = Port {
            spec: spec.clone(),
            idx: idx as PortIdx,
            worker,
            stats,
            status,
            stop,
            thread: Some(thread),
        };
        let info = Self::info(&port);
        self.ports.insert(spec.name.clone(), port);
        log::info!("port {} added on {}", spec.name, spec.socket.display());
        Ok(info)
    }

    /// Remove a port: its guest is disconnected and its socket removed.
    pub fn remove(&mut self, name: &str) -> Result<(), PortError> {
        let mut port = self
            .ports
            .remove(name)
            .ok_or_else(|| PortError::NotFound(name.to_string()))?;
        port.shutdown();
        self.used[usize::from(port.idx)] = false;
        log::info!("port {name} removed");
        Ok(())
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

    /// A port's summary.
    pub fn info(p: &Port) -> PortInfo {
        PortInfo {
            name: p.spec.name.clone(),
            socket: p.spec.socket.clone(),
            index: p.idx,
            worker: p.worker,
            queue_pairs: p.spec.queue_pairs,
            vlan: p.spec.vlan,
            connected: p.status.connected(),
            broken: p.stats.is_broken(),
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
