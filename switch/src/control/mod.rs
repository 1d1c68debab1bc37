//! The control channel: JSON lines over a Unix socket.
//!
//! Each request is one JSON object on one line,
//! `{"id": 7, "cmd": "port.add", "args": {...}}`, answered by one line,
//! `{"id": 7, "ok": true, "result": {...}}` or
//! `{"id": 7, "ok": false, "error": {"code": "not_found", "message": "..."}}`.
//! The protocol is written down in `docs/control-protocol.md`.
//!
//! Every client has its own thread, so a slow or stuck client holds nothing
//! but itself; a line over [`MAX_LINE`] bytes or a half line left for
//! [`STALL_TIMEOUT`] ends that client's connection.

mod commands;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Uid};
use serde_json::{json, Value};

pub use commands::dispatch;

use crate::daemon::Switch;
use crate::events::Subscription;

/// Longest request line.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may leave a request half sent.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most clients served at once.
pub const MAX_CLIENTS: usize = 256;
/// Version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub code: &'static str,
    pub message: String,
}

impl ControlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
        }
    }
}

/// What a request line asks of the connection.
pub enum Outcome {
    /// Write this answer and read the next request.
    Answer(Value),
    /// Write this answer, then stream events on the connection.
    Subscribe(Value),
}

/// Parse one request line and run it. Never fails: errors become answers.
pub fn handle_line(sw: &Switch, line: &[u8]) -> Value {
    match handle_request(sw, line) {
        Outcome::Answer(v) | Outcome::Subscribe(v) => v,
    }
}

fn handle_request(sw: &Switch, line: &[u8]) -> Outcome {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Answer(error_answer(
                Value::Null,
                &ControlError::new("parse_error", format!("request is not valid JSON: {e}")),
            ))
        }
    };
    if req.get("cmd").and_then(Value::as_str) == Some("events.subscribe") {
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let no_args = match req.get("args") {
            None | Some(Value::Null) => true,
            Some(Value::Object(m)) => m.is_empty(),
            Some(_) => false,
        };
        if !no_args {
            let e = ControlError::new("invalid_argument", "events.subscribe takes no arguments");
            return Outcome::Answer(error_answer(id, &e));
        }
        return Outcome::Subscribe(json!({ "id": id, "ok": true, "result": {} }));
    }
    Outcome::Answer(answer(sw, req))
}

fn answer(sw: &Switch, req: Value) -> Value {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let Some(obj) = req.as_object() else {
        return error_answer(
            id,
            &ControlError::new("invalid_request", "a request is a JSON object"),
        );
    };
    let Some(cmd) = obj.get("cmd").and_then(Value::as_str) else {
        return error_answer(
            id,
            &ControlError::new("invalid_request", "the request has no \"cmd\" string"),
        );
    };
    let args = match obj.get("args") {
        None | Some(Value::Null) => json!({}),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            return error_answer(
                id,
                &ControlError::new("invalid_request", "\"args\" must be an object"),
            );
        }
    };
    match dispatch(sw, cmd, args) {
        Ok(result) => json!({ "id": id, "ok": true, "result": result }),
        Err(e) => error_answer(id, &e),
    }
}

fn error_answer(id: Value, e: &ControlError) -> Value {
    json!({ "id": id, "ok": false, "error": { "code": e.code, "message": e.message } })
}

/// The control socket's accept loop.
pub struct ControlServer {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

/// Who may use the control socket: root, the daemon's own user, and members
/// of the configured group.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub group: Option<Gid>,
}

impl Access {
    /// Whether the peer of `conn` may talk to the switch.
    fn allows(&self, conn: &UnixStream) -> Result<(), String> {
        let cred = getsockopt(&conn.as_fd(), PeerCredentials)
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        let uid = Uid::from_raw(cred.uid());
        if uid.is_root() || uid == Uid::effective() {
            return Ok(());
        }
        if let Some(g) = self.group {
            if Gid::from_raw(cred.gid()) == g || peer_in_group(cred.pid(), g) {
                return Ok(());
            }
        }
        Err(format!(
            "uid {} (pid {}) is neither root, the daemon's user, nor in the control group",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Whether process `pid` has `group` among its supplementary groups.
fn peer_in_group(pid: i32, group: Gid) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok())
                .any(|g| g == group.as_raw())
        })
}

impl ControlServer {
    /// Bind the control socket and serve it: mode 0600, or 0660 owned by
    /// `group` when one is given.
    pub fn start(
        sw: Arc<Switch>,
        path: &Path,
        group: Option<Gid>,
    ) -> Result<Self, crate::port::PortError> {
        let listener = crate::port::bind_socket(path)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        let chown = |source: std::io::Error| crate::port::PortError::Chown {
            path: path.to_path_buf(),
            source,
        };
        if group.is_some() {
            nix::unistd::chown(path, None, group).map_err(|e| chown(e.into()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(chown)?;
        listener
            .set_nonblocking(false)
            .map_err(crate::port::PortError::Thread)?;
        let clients = Arc::new(AtomicUsize::new(0));
        let access = Access { group };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(sw, listener, clients, access))
            .map_err(crate::port::PortError::Thread)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The accept loop blocks in accept(); the process is exiting, so the
        // thread is left to end with it.
        drop(self.thread.take());
    }
}

fn accept_loop(sw: Arc<Switch>, listener: UnixListener, clients: Arc<AtomicUsize>, access: Access) {
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control: accept failed: {e}");
                continue;
            }
        };
        if let Err(why) = access.allows(&conn) {
            log::warn!("control: refused a connection: {why}");
            let e = ControlError::new("permission_denied", why);
            let _ = writeln!(conn, "{}", error_answer(Value::Null, &e));
            continue;
        }
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let e = ControlError::new(
                "busy",
                format!("more than {MAX_CLIENTS} control clients; try again later"),
            );
            let _ = writeln!(conn, "{}", error_answer(Value::Null, &e));
            continue;
        }
        let sw = sw.clone();
        let counter = clients.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(&sw, conn);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            clients.fetch_sub(1, Ordering::SeqCst);
            log::error!("control: cannot start a client thread: {e}");
        }
    }
}

fn serve_client(sw: &Switch, mut conn: UnixStream) {
    if conn.set_read_timeout(Some(STALL_TIMEOUT)).is_err()
        || conn.set_write_timeout(Some(STALL_TIMEOUT)).is_err()
    {
        return;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete line in the buffer.
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.len() > MAX_LINE {
                let e = ControlError::new(
                    "line_too_long",
                    format!("a request line may hold at most {MAX_LINE} bytes"),
                );
                let _ = writeln!(conn, "{}", error_answer(Value::Null, &e));
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match handle_request(sw, line) {
                Outcome::Answer(answer) => {
                    if writeln!(conn, "{answer}").is_err() {
                        return;
                    }
                }
                Outcome::Subscribe(answer) => {
                    let sub = sw.events().subscribe();
                    if writeln!(conn, "{answer}").is_ok() {
                        stream_events(conn, sub);
                    }
                    return;
                }
            }
        }
        if buf.len() > MAX_LINE {
            let e = ControlError::new(
                "line_too_long",
                format!("a request line may hold at most {MAX_LINE} bytes"),
            );
            let _ = writeln!(conn, "{}", error_answer(Value::Null, &e));
            return;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if !buf.is_empty() {
                    log::warn!("control: client left a request half sent for {STALL_TIMEOUT:?}; dropping it");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Write events to a subscribed client until it goes away.
fn stream_events(mut conn: UnixStream, sub: Subscription) {
    let mut probe = [0u8; 256];
    if conn.set_nonblocking(true).is_err() {
        return;
    }
    loop {
        match sub.events.recv_timeout(Duration::from_secs(1)) {
            Ok(ev) => {
                let lost = sub.take_lost();
                if lost > 0 {
                    let note = json!({ "event": "events.lost", "count": lost });
                    if write_line(&mut conn, &note).is_err() {
                        return;
                    }
                }
                if write_line(&mut conn, &ev).is_err() {
                    return;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        // Input after subscribing is ignored; end of input ends the stream.
        match conn.read(&mut probe) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Write one line to a non-blocking socket, waiting up to the stall timeout.
fn write_line(conn: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    let mut buf = line.as_bytes();
    let deadline = std::time::Instant::now() + STALL_TIMEOUT;
    while !buf.is_empty() {
        match conn.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
