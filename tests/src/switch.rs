//! Run a `vioswitch` daemon as a child process and talk to its control socket.
//!
//! The binary is found through `VIOSWITCH_BIN`, else in the workspace's target
//! directory (`CARGO_TARGET_DIR` or `target/`), debug before release. The test
//! command builds it first (`cargo build --workspace --bins`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("vioswitch binary not found (looked at {0:?}): run `cargo build --workspace --bins` or set VIOSWITCH_BIN")]
    BinaryNotFound(Vec<PathBuf>),
    #[error("cannot start vioswitch: {0}")]
    Spawn(std::io::Error),
    #[error("vioswitch did not create its control socket at {0} within the deadline")]
    NoControlSocket(PathBuf),
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control command {cmd} failed: {error}")]
    Command { cmd: String, error: Value },
}

/// Where the `vioswitch` binary is.
pub fn vioswitch_bin() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("VIOSWITCH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let candidates = vec![
        target.join("debug/vioswitch"),
        target.join("release/vioswitch"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(HarnessError::BinaryNotFound(candidates))
}

/// File in the run directory that [`SwitchProcess::spawn_logged`] logs to.
pub const LOG_FILE: &str = "vioswitch.log";

/// Options of a spawned switch.
#[derive(Debug, Clone)]
pub struct SwitchOptions {
    /// Number of dataplane workers.
    pub workers: usize,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// Use this binary instead of [`vioswitch_bin`].
    pub binary: Option<PathBuf>,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            workers: 1,
            extra_args: Vec::new(),
            binary: None,
        }
    }
}

/// A running `vioswitch` with its own temporary run directory; killed on drop.
pub struct SwitchProcess {
    child: Child,
    run_dir: PathBuf,
    control: Option<ControlClient>,
}

impl SwitchProcess {
    /// Start a switch in a fresh temporary run directory.
    pub fn spawn(opts: SwitchOptions) -> Result<Self, HarnessError> {
        let run_dir = crate::temp_dir("vioswitch-run")?;
        Self::spawn_in(&run_dir, opts)
    }

    /// Start a switch on the given run directory.
    pub fn spawn_in(run_dir: &Path, opts: SwitchOptions) -> Result<Self, HarnessError> {
        Self::spawn_with(run_dir, opts, Stdio::inherit())
    }

    /// Start a switch in a fresh temporary run directory with its standard
    /// error (its log) going to [`log_path`](Self::log_path), so that a test
    /// can read what it logged with [`log_text`](Self::log_text).
    pub fn spawn_logged(opts: SwitchOptions) -> Result<Self, HarnessError> {
        let run_dir = crate::temp_dir("vioswitch-run")?;
        let log = std::fs::File::create(run_dir.join(LOG_FILE))?;
        Self::spawn_with(&run_dir, opts, Stdio::from(log))
    }

    /// Where [`spawn_logged`](Self::spawn_logged) sends the daemon's log.
    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join(LOG_FILE)
    }

    /// What the daemon has logged so far (empty unless started with
    /// [`spawn_logged`](Self::spawn_logged)).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start a switch on `run_dir` with exactly `--run-dir DIR` and `args`:
    /// no `--workers`, so that the saved state (or `--config`) decides. Its
    /// log is appended to [`LOG_FILE`] in the run directory, so that a
    /// switch restarted on the same directory adds to the same log.
    pub fn spawn_args(run_dir: &Path, args: &[String]) -> Result<Self, HarnessError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(LOG_FILE))?;
        Self::spawn_cmd(run_dir, None, args, None, Stdio::from(log))
    }

    fn spawn_with(
        run_dir: &Path,
        opts: SwitchOptions,
        stderr: Stdio,
    ) -> Result<Self, HarnessError> {
        Self::spawn_cmd(
            run_dir,
            Some(opts.workers),
            &opts.extra_args,
            opts.binary,
            stderr,
        )
    }

    fn spawn_cmd(
        run_dir: &Path,
        workers: Option<usize>,
        args: &[String],
        binary: Option<PathBuf>,
        stderr: Stdio,
    ) -> Result<Self, HarnessError> {
        let bin = match binary {
            Some(b) => b,
            None => vioswitch_bin()?,
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--run-dir").arg(run_dir);
        if let Some(w) = workers {
            cmd.arg("--workers").arg(w.to_string());
        }
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(HarnessError::Spawn)?;
        let mut sw = SwitchProcess {
            child,
            run_dir: run_dir.to_path_buf(),
            control: None,
        };
        let sock = sw.control_path();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = ControlClient::connect(&sock) {
                sw.control = Some(c);
                return Ok(sw);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NoControlSocket(sock));
            }
            if let Ok(Some(status)) = sw.child.try_wait() {
                return Err(HarnessError::Spawn(std::io::Error::other(format!(
                    "vioswitch exited with {status}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The control socket path.
    pub fn control_path(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send one control command; returns `result` or the error answer.
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, HarnessError> {
        match &mut self.control {
            Some(c) => c.call(cmd, args),
            None => Err(HarnessError::NoControlSocket(self.control_path())),
        }
    }

    /// Add a server-mode net port; returns its socket path.
    pub fn add_port(&mut self, name: &str) -> Result<PathBuf, HarnessError> {
        let r = self.call("port.add", json!({ "name": name }))?;
        Ok(PathBuf::from(r["socket"].as_str().unwrap_or_default()))
    }

    /// Remove a port.
    pub fn del_port(&mut self, name: &str) -> Result<(), HarnessError> {
        self.call("port.del", json!({ "name": name })).map(|_| ())
    }

    /// The statistics of a port, as the control socket answers them.
    pub fn port_stats(&mut self, name: &str) -> Result<Value, HarnessError> {
        self.call("port.stats", json!({ "name": name }))
    }

    /// Kill the daemon (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How the daemon ended, if it has (e.g. killed by a signal).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for SwitchProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A control-socket client: one JSON object per line each way.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl ControlClient {
    /// Connect to a control socket.
    pub fn connect(path: &Path) -> Result<Self, HarnessError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(ControlClient {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        })
    }

    /// Send a raw line and read one answer line.
    pub fn raw(&mut self, line: &str) -> Result<Value, HarnessError> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(HarnessError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "control socket closed",
            )));
        }
        Ok(serde_json::from_str(&answer)?)
    }

    /// Send a command and return its `result`, or its error as [`HarnessError::Command`].
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, HarnessError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({ "id": id, "cmd": cmd, "args": args });
        let answer = self.raw(&req.to_string())?;
        if answer["ok"].as_bool() == Some(true) {
            Ok(answer["result"].clone())
        } else {
            Err(HarnessError::Command {
                cmd: cmd.to_string(),
                error: answer["error"].clone(),
            })
        }
    }
}

/// A control connection subscribed to the switch's events
/// (`events.subscribe`).
pub struct EventStream {
    conn: UnixStream,
    /// Bytes of a line not yet complete.
    partial: Vec<u8>,
}

impl EventStream {
    /// Subscribe on the control socket at `path`.
    pub fn subscribe(path: &Path) -> Result<Self, HarnessError> {
        let mut conn = UnixStream::connect(path)?;
        writeln!(conn, "{}", json!({ "id": 1, "cmd": "events.subscribe" }))?;
        let mut s = EventStream {
            conn,
            partial: Vec::new(),
        };
        match s.next_within(Duration::from_secs(30))? {
            Some(a) if a["ok"] == json!(true) => Ok(s),
            other => Err(HarnessError::Command {
                cmd: "events.subscribe".into(),
                error: other.unwrap_or(Value::Null),
            }),
        }
    }

    /// The next line (an event), or `None` if none is complete within
    /// `timeout`.
    pub fn next_within(&mut self, timeout: Duration) -> Result<Option<Value>, HarnessError> {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=nl).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.conn.set_read_timeout(Some(left))?;
            let mut buf = [0u8; 4096];
            match self.conn.read(&mut buf) {
                Ok(0) => {
                    return Err(HarnessError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the event stream ended",
                    )))
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The first event named `name` for which `pred` holds, skipping
    /// others, waiting up to `timeout`.
    pub fn find(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Option<Value>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left)? {
                Some(e) if e["event"] == name && pred(&e) => return Ok(Some(e)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}
