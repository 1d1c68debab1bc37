//! The switch as a whole: run directory, dataplane, ports, identities
//! ([`identity`]), saved state and housekeeping.

mod identity;

pub use identity::{IdentityInfo, StandbyInfo};

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use serde_json::{json, Value};

use crate::config::{ConfigError, StaticEntry, SwitchState, STATE_FILE};
use crate::dataplane::{Dataplane, DataplaneError, WorkerConfig};
use crate::disk::DiskSpec;
use crate::events::EventBus;
use crate::fdb::{Learn, PortIdx};
use crate::identity::registry::{IdentityError, IdentitySpec, Registry};
use crate::port::{PortError, PortSpec, PortTable};

/// Most workers.
pub const MAX_WORKERS: usize = 64;
/// Default FDB ageing time.
pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);

/// Errors starting or changing the switch.
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
    #[error("invalid MAC address {0:?}: use six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("{0} is a multicast MAC address; static entries are for unicast addresses")]
    MulticastMac(String),
    #[error("the FDB has no room near this address")]
    FdbFull,
    #[error("no static entry for {0} in VLAN {1}")]
    NoStatic(String, u16),
    #[error("--worker-cpus: {0}")]
    Cpu(#[from] crate::cpu::CpuError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot start a background thread: {0}")]
    Thread(std::io::Error),
}

/// Start-up settings. `None` fields come from the saved state, else defaults.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    pub run_dir: PathBuf,
    pub workers: Option<usize>,
    pub worker: WorkerConfig,
    /// CPUs of the polling workers (worker `i` on `worker_cpus[i % len]`);
    /// the switch's other threads keep off them. Empty: anywhere.
    pub worker_cpus: Vec<usize>,
    pub fdb_capacity: usize,
    pub ageing: Option<Duration>,
    /// The declarative configuration, used when the run directory has no saved state.
    pub initial: Option<SwitchState>,
}

impl SwitchConfig {
    pub fn new(run_dir: PathBuf) -> Self {
        SwitchConfig {
            run_dir,
            workers: None,
            worker: WorkerConfig::default(),
            worker_cpus: Vec::new(),
            fdb_capacity: 1 << 16,
            ageing: None,
            initial: None,
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

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], SwitchError> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bad = || SwitchError::BadMac(s.to_string());
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Format a MAC address.
pub fn mac_string(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A running switch.
pub struct Switch {
    run_dir: PathBuf,
    dp: Arc<Dataplane>,
    /// Identities and their bindings. Taken before `ports`.
    identities: Mutex<Registry>,
    /// Events of identity changes not saved yet, queued with the registry
    /// held: [`save`](Self::save) sends them once the state that holds
    /// their change is on disk. Every change of identities is followed by
    /// a save (the command's, or the monitor's after a failover).
    unsaved_events: Mutex<Vec<(&'static str, Value)>>,
    ports: Mutex<PortTable>,
    statics: Mutex<Vec<StaticEntry>>,
    /// Saved ports and static entries that could not be brought back at
    /// start (e.g. a socket directory missing for now). They stay in the
    /// saved state, so a later restart retries them, until the user adds or
    /// removes a port of that name.
    unrestored: Mutex<Unrestored>,
    events: Arc<EventBus>,
    started: Instant,
    ageing_s: u64,
    /// Serialises writers of the saved state.
    save_lock: Mutex<()>,
    /// Tells the identity monitor about bindings and announcements.
    notices: Sender<identity::Notice>,
    /// The housekeeping and identity monitor threads, with what stops each.
    background: Mutex<Vec<(Sender<()>, JoinHandle<()>)>>,
    /// Holds the run directory's lock for the switch's lifetime.
    _lock: File,
}

/// Saved things that could not be brought back at start.
#[derive(Default)]
struct Unrestored {
    ports: Vec<PortSpec>,
    disks: Vec<DiskSpec>,
    statics: Vec<StaticEntry>,
    identities: Vec<IdentitySpec>,
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
    /// Take the run directory, start the dataplane and bring back the saved
    /// state (or the initial configuration when there is none).
    pub fn start(cfg: SwitchConfig) -> Result<Arc<Self>, SwitchError> {
        let lock = lock_run_dir(&cfg.run_dir)?;
        // The run directory is ours: what an earlier, killed switch was
        // writing when it died is garbage.
        crate::config::remove_stale_temporaries(&cfg.run_dir.join(STATE_FILE));
        let saved = SwitchState::load(&cfg.run_dir.join(STATE_FILE))?;
        let from_saved = saved.is_some();
        let state = saved.or(cfg.initial).unwrap_or_default();
        let workers = cfg.workers.or(state.workers).unwrap_or(1);
        if workers == 0 || workers > MAX_WORKERS {
            return Err(SwitchError::BadWorkers(workers));
        }
        let ageing = cfg
            .ageing
            .or(state.fdb_ageing_s.map(Duration::from_secs))
            .unwrap_or(DEFAULT_AGEING);
        let (faults_tx, faults_rx) = unbounded();
        crate::cpu::check_cpus(&cfg.worker_cpus)?;
        let dp = Arc::new(Dataplane::start(
            workers,
            cfg.worker,
            &cfg.worker_cpus,
            cfg.fdb_capacity,
            ageing.as_millis() as u64,
            faults_tx,
        )?);
        // The control server, the sessions and the monitors start after
        // this and keep off the workers' CPUs (a busy-polling worker never
        // gives its core up: a thread that shares it waits milliseconds).
        if !cfg.worker_cpus.is_empty() && !crate::cpu::avoid_cpus(&cfg.worker_cpus)? {
            log::warn!("every CPU runs a worker: the switch's other threads share them");
        }
        let events = Arc::new(EventBus::default());
        let (down_tx, down_rx) = unbounded();
        let (notices_tx, notices_rx) = unbounded();
        let sw = Arc::new(Switch {
            run_dir: cfg.run_dir,
            identities: Mutex::new(Registry::default()),
            unsaved_events: Mutex::new(Vec::new()),
            ports: Mutex::new(PortTable::new(dp.clone(), events.clone(), down_tx)),
            statics: Mutex::new(Vec::new()),
            unrestored: Mutex::new(Unrestored::default()),
            dp,
            events,
            started: Instant::now(),
            ageing_s: ageing.as_secs(),
            save_lock: Mutex::new(()),
            notices: notices_tx,
            background: Mutex::new(Vec::new()),
            _lock: lock,
        });
        let hk_sw = Arc::downgrade(&sw);
        sw.spawn_background("housekeeping", move |stop| {
            housekeeping(hk_sw, stop, faults_rx)
        })?;
        let mon_sw = Arc::downgrade(&sw);
        sw.spawn_background("identity-monitor", move |stop| {
            identity::monitor(mon_sw, stop, down_rx, notices_rx)
        })?;
        sw.restore(&state);
        if from_saved {
            log::info!(
                "restored {} port(s) and {} disk(s) from the saved state",
                state.ports.len(),
                state.disks.len()
            );
        }
        if let Err(e) = sw.save() {
            log::error!("{e}");
        }
        Ok(sw)
    }

    /// Start a background thread that runs `f` until the receiver it is
    /// given fires; [`shutdown`](Self::shutdown) stops and joins it.
    fn spawn_background(
        &self,
        name: &str,
        f: impl FnOnce(Receiver<()>) + Send + 'static,
    ) -> Result<(), SwitchError> {
        let (stop_tx, stop_rx) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(stop_rx))
            .map_err(SwitchError::Thread)?;
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stop_tx, thread));
        Ok(())
    }

    /// Add the ports, static entries and identities of `state`. Failures
    /// are logged and kept in the saved state (see `unrestored`).
    fn restore(&self, state: &SwitchState) {
        let mut failed = Unrestored::default();
        for spec in &state.ports {
            if let Err(e) = self.ports().add(spec.clone()) {
                log::error!(
                    "cannot restore port {}: {e}; it stays in the saved state",
                    spec.name
                );
                failed.ports.push(spec.clone());
            }
        }
        for spec in &state.disks {
            if let Err(e) = self.ports().add_disk(spec.clone()) {
                log::error!(
                    "cannot restore disk {}: {e}; it stays in the saved state",
                    spec.name
                );
                failed.disks.push(spec.clone());
            }
        }
        for e in &state.fdb_static {
            if let Err(err) = self.add_static(&e.mac, e.vlan, &e.port) {
                log::error!(
                    "cannot restore static FDB entry {} → {}: {err}",
                    e.mac,
                    e.port
                );
                failed.statics.push(e.clone());
            }
        }
        failed.identities = self.restore_identities(&state.identities);
        *self.unrestored() = failed;
        // The monitor looks at what to watch now.
        let _ = self.notices.send(identity::Notice::Changed);
    }

    fn unrestored(&self) -> MutexGuard<'_, Unrestored> {
        self.unrestored.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A port of this name was added or removed by the user: a saved port
    /// of that name that could not be restored is no longer wanted.
    pub fn settle_port_name(&self, name: &str) {
        let mut u = self.unrestored();
        u.ports.retain(|p| p.name != name);
        u.disks.retain(|p| p.name != name);
        u.statics.retain(|e| e.port != name);
    }

    /// Whether a saved port or disk of this name waits to be restored.
    pub fn is_unrestored(&self, name: &str) -> bool {
        let u = self.unrestored();
        u.ports.iter().any(|p| p.name == name) || u.disks.iter().any(|p| p.name == name)
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// Events for subscribers.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The port table, locked.
    pub fn ports(&self) -> MutexGuard<'_, PortTable> {
        // A panic while holding the lock would be a bug; the table stays usable.
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn statics(&self) -> MutexGuard<'_, Vec<StaticEntry>> {
        self.statics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Add a port with its socket in the run directory.
    pub fn add_default_port(&self, name: &str) -> Result<(), PortError> {
        let spec = PortSpec::server(name, self.run_dir.join(format!("{name}.sock")));
        self.ports().add(spec).map(|_| ())
    }

    /// Add (or replace) a static FDB entry, unless an identity has the
    /// address (its binding decides where it goes).
    pub fn add_static(&self, mac: &str, vlan: u16, port: &str) -> Result<(), SwitchError> {
        let m = parse_mac(mac)?;
        if m[0] & 1 != 0 {
            return Err(SwitchError::MulticastMac(mac.to_string()));
        }
        self.check_static_free(m, vlan)?;
        let idx = {
            let ports = self.ports();
            let p = ports.get(port)?;
            if p.disk().is_some() {
                return Err(PortError::IsADisk(port.to_string()).into());
            }
            p.idx
        };
        let fdb = self.dp.fdb();
        fdb.remove(&m, vlan);
        if fdb.add_static(&m, vlan, idx) == Learn::Full {
            return Err(SwitchError::FdbFull);
        }
        let mut statics = self.statics();
        let canon = mac_string(&m);
        statics.retain(|e| !(e.mac == canon && e.vlan == vlan));
        statics.push(StaticEntry {
            mac: canon,
            vlan,
            port: port.to_string(),
        });
        Ok(())
    }

    /// Remove a static FDB entry.
    pub fn del_static(&self, mac: &str, vlan: u16) -> Result<(), SwitchError> {
        let m = parse_mac(mac)?;
        let canon = mac_string(&m);
        let mut statics = self.statics();
        let before = statics.len();
        statics.retain(|e| !(e.mac == canon && e.vlan == vlan));
        if statics.len() == before {
            return Err(SwitchError::NoStatic(canon, vlan));
        }
        self.dp.fdb().remove(&m, vlan);
        Ok(())
    }

    /// Forget the static entries of a removed port.
    pub fn forget_statics_of(&self, port: &str) {
        self.statics().retain(|e| e.port != port);
    }

    /// The running configuration, with what could not be restored.
    pub fn state(&self) -> SwitchState {
        self.snapshot(false).0
    }

    /// The running configuration and, with `take_events`, the events of the
    /// identity changes it holds that are not saved yet.
    fn snapshot(&self, take_events: bool) -> (SwitchState, Vec<(&'static str, Value)>) {
        // The identities and the ports of one moment: an identity is never
        // saved bound to a port that is not saved.
        let (mut identities, mut ports, mut disks, events) = {
            let reg = self.identities();
            let table = self.ports();
            let events = if take_events {
                std::mem::take(&mut *self.unsaved_events())
            } else {
                Vec::new()
            };
            (reg.specs(), table.specs(), table.disk_specs(), events)
        };
        let mut fdb_static = self.statics().clone();
        {
            let u = self.unrestored();
            ports.extend(u.ports.iter().cloned());
            disks.extend(u.disks.iter().cloned());
            fdb_static.extend(u.statics.iter().cloned());
            identities.extend(u.identities.iter().cloned());
        }
        ports.sort_by(|a, b| a.name.cmp(&b.name));
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        let state = SwitchState {
            workers: Some(self.dp.worker_count()),
            fdb_ageing_s: Some(self.ageing_s),
            ports,
            disks,
            fdb_static,
            identities,
            ..SwitchState::default()
        };
        (state, events)
    }

    fn unsaved_events(&self) -> MutexGuard<'_, Vec<(&'static str, Value)>> {
        self.unsaved_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Save the running configuration to the run directory, atomically.
    pub fn save(&self) -> Result<(), ConfigError> {
        let _guard = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.run_dir.join(STATE_FILE);
        let (state, events) = self.snapshot(true);
        let saved = state.save(&path);
        // The changes are made, saved or not: say so.
        for (event, fields) in events {
            self.events.emit(event, fields);
        }
        saved?;
        self.events.emit("config.saved", json!({ "path": path }));
        Ok(())
    }

    /// Write the running configuration as TOML (for `--config`), atomically.
    pub fn save_toml(&self, path: &Path) -> Result<(), ConfigError> {
        let _guard = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let text = self.state().to_toml()?;
        crate::config::write_atomic(path, text.as_bytes())
    }

    /// Disconnect every guest and remove every port socket. The saved state
    /// is kept, so the next start brings the ports back.
    pub fn shutdown(&self) {
        let threads =
            std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for (stop, thread) in threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
        self.ports().clear();
    }
}

/// Age the FDB once a second and report ports whose guest broke a ring.
fn housekeeping(sw: std::sync::Weak<Switch>, stop: Receiver<()>, faults: Receiver<PortIdx>) {
    let tick = crossbeam_channel::tick(Duration::from_secs(1));
    loop {
        select! {
            recv(stop) -> _ => return,
            recv(faults) -> idx => {
                let (Ok(idx), Some(sw)) = (idx, sw.upgrade()) else { return };
                let name = sw.ports().by_index(idx).map(|p| p.spec.name.clone());
                if let Some(name) = name {
                    sw.events.emit("port.broken", json!({ "port": name }));
                }
            }
            recv(tick) -> _ => {
                let Some(sw) = sw.upgrade() else { return };
                sw.dp.fdb().sweep(sw.dp.now_ms());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        assert_eq!(
            parse_mac("52-54-00-ab-cd-0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            mac_string(&[0x52, 0x54, 0, 0xab, 0xcd, 0x0f]),
            "52:54:00:ab:cd:0f"
        );
    }
}
