//! The switch as a whole: run directory, dataplane, ports and housekeeping.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use crate::dataplane::{Dataplane, DataplaneError, WorkerConfig};
use crate::port::{PortError, PortSpec, PortTable};

/// Most workers.
pub const MAX_WORKERS: usize = 64;

/// Errors starting the switch.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("cannot create run directory {path}: {source}; pick another with --run-dir")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another vioswitch (pid {pid}) is running on {path}; stop it or use another --run-dir"
    )]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("--workers must be between 1 and {MAX_WORKERS}, got {0}")]
    BadWorkers(usize),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("cannot start housekeeping thread: {0}")]
    Thread(std::io::Error),
}

/// Start-up settings.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    pub run_dir: PathBuf,
    pub workers: usize,
    pub worker: WorkerConfig,
    pub fdb_capacity: usize,
    pub ageing: Duration,
}

impl SwitchConfig {
    pub fn new(run_dir: PathBuf) -> Self {
        SwitchConfig {
            run_dir,
            workers: 1,
            worker: WorkerConfig::default(),
            fdb_capacity: 1 << 16,
            ageing: Duration::from_millis(crate::fdb::DEFAULT_AGEING_MS),
        }
    }
}

/// The default run directory: `/run/vioswitch` for root, else
/// `$XDG_RUNTIME_DIR/vioswitch`, else `/tmp/vioswitch-UID`.
pub fn default_run_dir() -> PathBuf {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/vioswitch");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("vioswitch"),
        None => PathBuf::from(format!("/tmp/vioswitch-{uid}")),
    }
}

/// A running switch.
pub struct Switch {
    run_dir: PathBuf,
    dp: Arc<Dataplane>,
    ports: Mutex<PortTable>,
    started: Instant,
    housekeeping: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// Holds the run directory's lock for the switch's lifetime.
    _lock: File,
}

fn lock_run_dir(dir: &Path) -> Result<File, SwitchError> {
    let run_dir_err = |source| SwitchError::RunDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(run_dir_err)?;
    let path = dir.join("vioswitch.pid");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(run_dir_err)?;
    // SAFETY: flock on an fd we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(SwitchError::AlreadyRunning {
            path: dir.to_path_buf(),
            pid: pid.trim().to_string(),
        });
    }
    f.set_len(0).map_err(run_dir_err)?;
    f.rewind().map_err(run_dir_err)?;
    writeln!(f, "{}", std::process::id()).map_err(run_dir_err)?;
    Ok(f)
}

impl Switch {
    /// Take the run directory and start the dataplane.
    pub fn start(cfg: SwitchConfig) -> Result<Arc<Self>, SwitchError> {
        if cfg.workers == 0 || cfg.workers > MAX_WORKERS {
            return Err(SwitchError::BadWorkers(cfg.workers));
        }
        let lock = lock_run_dir(&cfg.run_dir)?;
        let dp = Arc::new(Dataplane::start(
            cfg.workers,
            cfg.worker,
            cfg.fdb_capacity,
            cfg.ageing.as_millis() as u64,
        )?);
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let hk_dp = dp.clone();
        let hk = std::thread::Builder::new()
            .name("housekeeping".into())
            .spawn(move || {
                // Age the FDB once a second until told to stop.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(Duration::from_secs(1))
                {
                    hk_dp.fdb().sweep(hk_dp.now_ms());
                }
            })
            .map_err(SwitchError::Thread)?;
        Ok(Arc::new(Switch {
            run_dir: cfg.run_dir,
            ports: Mutex::new(PortTable::new(dp.clone())),
            dp,
            started: Instant::now(),
            housekeeping: Mutex::new(Some((stop_tx, hk))),
            _lock: lock,
        }))
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// The port table, locked.
    pub fn ports(&self) -> MutexGuard<'_, PortTable> {
        // A panic while holding the lock would be a bug; the table stays usable.
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Add a port with its socket in the run directory.
    pub fn add_default_port(&self, name: &str) -> Result<(), PortError> {
        let spec = PortSpec {
            name: name.to_string(),
            socket: self.run_dir.join(format!("{name}.sock")),
            queue_pairs: 1,
            vlan: 0,
            worker: None,
        };
        self.ports().add(spec).map(|_| ())
    }

    /// Disconnect every guest and remove every port socket.
    pub fn shutdown(&self) {
        self.ports().clear();
        let hk = self
            .housekeeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((stop, thread)) = hk {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
