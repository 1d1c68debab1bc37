//! Real QEMU guests for the end-to-end tests.
//!
//! [`GuestImage::ensure`] builds (once, cached) the guest image with
//! `scripts/guest-kernel.sh`: an uncompressed Debian 12 kernel and a busybox
//! initramfs whose `/init` loads the virtio modules, configures `eth0` from
//! the kernel command line, runs one job and powers off. [`QemuGuest::spawn`]
//! boots it under TCG with a virtio-net device on a vhost-user socket (or a
//! UDP link to another QEMU, or no network) and any number of
//! vhost-user-blk disks ([`DiskAttach`]), and the test reads the job's
//! marker lines from the serial console:
//!
//! ```text
//! VIOTEST-BOOT <uptime>             /init started
//! VIOTEST-READY ip=... mac=...      network configured
//! VIOTEST-PROGRESS <what>           job progress
//! VIOTEST-RESULT: ok <k=v ...>      the job succeeded
//! VIOTEST-RESULT: fail <why>        the job failed
//! ```
//!
//! Jobs (`vio.job=`): `boot`, `ping`, `ping-loop`, `tcp-send`, `tcp-recv`,
//! `serve`, `driver-reload` (ping, unload and reload virtio_net, ping
//! again), `mq-send` (check eth0's queues, ping from every CPU, send a
//! payload), `ping-watch` (ping until the peer goes silent, printing each
//! reply and each change of the peer's ARP entry; counts the requests lost
//! between the first and the last reply), `standby` (hold an address
//! without answering ARP for it until an echo request for it arrives);
//! their parameters are `vio.*` kernel arguments, documented at the top of
//! `scripts/guest-kernel.sh` (e.g. `vio.ip=10.0.0.1/24`,
//! `vio.peer=10.0.0.2`, `vio.count=5`, `vio.bytes=1048576`).
//!
//! Disk jobs ([`BlkJob`], on `/dev/vda`): `blk-sum` (sha256 of the disk),
//! `blk-write` (write a range with fsync), `blk-fs` (ext2 file written, guest
//! rebooted, file read back); each prints its sha256 on a marker line
//! ([`BLK_SUM_MARKER`], ...; see [`QemuGuest::marker_values`]).
//! [`StorageDaemon`] serves a disk image with `qemu-storage-daemon`, a
//! known-good vhost-user-blk backend.
//!
//! Judge a guest by its marker lines, never by QEMU's exit status (a kernel
//! panic exits 0 with `panic=-1 -no-reboot`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Environment variable: where the guest image is cached (default
/// `<workspace>/target/guest`).
pub const GUEST_DIR_ENV: &str = "VIOSWITCH_GUEST_DIR";
/// Environment variable: the QEMU binary (default `qemu-system-x86_64`).
pub const QEMU_ENV: &str = "VIOSWITCH_QEMU";
/// Environment variable: keep each guest's log directory after the guest is
/// dropped (set to anything).
pub const KEEP_LOGS_ENV: &str = "VIOSWITCH_KEEP_GUEST_LOGS";

/// The prefix of a job's result line on the serial console.
pub const RESULT_MARKER: &str = "VIOTEST-RESULT:";
/// Printed once the guest's network is configured.
pub const READY_MARKER: &str = "VIOTEST-READY";
/// Printed before the guest reboots.
pub const REBOOT_MARKER: &str = "VIOTEST-REBOOT";
/// `blk-sum`: `VIO-BLK-SUM <sha256>` of the bytes read.
pub const BLK_SUM_MARKER: &str = "VIO-BLK-SUM";
/// `blk-write`: `VIO-BLK-WRITTEN <sha256>` of the bytes written (and read
/// back past the guest's page cache).
pub const BLK_WRITTEN_MARKER: &str = "VIO-BLK-WRITTEN";
/// `blk-fs`, first boot: `VIO-FS-WRITTEN <sha256>` of the test file.
pub const FS_WRITTEN_MARKER: &str = "VIO-FS-WRITTEN";
/// `blk-fs`, next boot: `VIO-FS-READ <sha256>` of the test file read back.
pub const FS_READ_MARKER: &str = "VIO-FS-READ";
/// Environment variable: the `qemu-storage-daemon` binary.
pub const QSD_ENV: &str = "VIOSWITCH_QSD";

/// Errors of the QEMU harness.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("guest image script {0} not found")]
    ScriptNotFound(PathBuf),
    #[error("building the guest image failed ({status}); run scripts/install-deps.sh first? Output:\n{output}")]
    ImageBuild { status: ExitStatus, output: String },
    #[error("guest image incomplete after the build: {0} missing")]
    ImageMissing(PathBuf),
    #[error(
        "cannot start {program} (run scripts/install-deps.sh, or set VIOSWITCH_QEMU): {source}"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest {guest}: no line with {marker:?} within {timeout:?}\n{logs}")]
    Timeout {
        guest: String,
        marker: String,
        timeout: Duration,
        logs: String,
    },
    #[error("guest {guest}: QEMU exited ({status}) before a line with {marker:?}\n{logs}")]
    Exited {
        guest: String,
        marker: String,
        status: ExitStatus,
        logs: String,
    },
    #[error("malformed result line: {0:?}")]
    BadResult(String),
    #[error("guest {guest}: monitor: {what}")]
    Monitor { guest: String, what: String },
    #[error("qemu-storage-daemon: {0}")]
    StorageDaemon(String),
}

/// Result alias of this module.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The built guest image: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The cache directory.
    pub dir: PathBuf,
    /// Uncompressed kernel (`vmlinux`), booted through PVH.
    pub kernel: PathBuf,
    /// The busybox initramfs.
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
}

impl GuestImage {
    /// The cache directory: `$VIOSWITCH_GUEST_DIR`, else `<workspace>/target/guest`.
    pub fn default_dir() -> PathBuf {
        std::env::var_os(GUEST_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target/guest"))
    }

    /// Build the image in [`GuestImage::default_dir`] if needed and return it.
    ///
    /// Runs `scripts/guest-kernel.sh` (once per process), which returns at
    /// once when its cache is complete and was built by the same script; on
    /// a fresh machine it downloads the kernel package and may install the
    /// tools it needs (`scripts/install-deps.sh`).
    pub fn ensure() -> Result<GuestImage> {
        static BUILT: Mutex<Option<GuestImage>> = Mutex::new(None);
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(img) = built.as_ref() {
            return Ok(img.clone());
        }
        let img = Self::ensure_in(&Self::default_dir())?;
        *built = Some(img.clone());
        Ok(img)
    }

    /// Build the image in `dir` if needed and return it.
    pub fn ensure_in(dir: &Path) -> Result<GuestImage> {
        let script = workspace_root().join("scripts/guest-kernel.sh");
        if !script.is_file() {
            return Err(QemuError::ScriptNotFound(script));
        }
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| QemuError::Spawn {
                program: "bash".into(),
                source,
            })?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(QemuError::ImageBuild {
                status: out.status,
                output,
            });
        }
        let img = GuestImage {
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio.gz"),
            kernel_version: std::fs::read_to_string(dir.join("kernel-version"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        };
        for p in [&img.kernel, &img.initrd] {
            if !p.is_file() {
                return Err(QemuError::ImageMissing(p.clone()));
            }
        }
        Ok(img)
    }
}

/// A guest's network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestNet {
    /// No network device.
    None,
    /// virtio-net over vhost-user: QEMU connects to the switch's port socket.
    VhostUser { socket: PathBuf, mac: String },
    /// A plain virtio-net device whose frames go over UDP on the loopback to
    /// another QEMU (`-netdev socket,udp=REMOTE,localaddr=LOCAL`): two guests
    /// on a wire, no switch. See [`GuestNet::udp_pair`].
    Udp {
        local: SocketAddr,
        remote: SocketAddr,
        mac: String,
    },
}

impl GuestNet {
    /// Two ends of a UDP wire on 127.0.0.1 (ports picked free by the OS).
    pub fn udp_pair(mac_a: &str, mac_b: &str) -> std::io::Result<(GuestNet, GuestNet)> {
        let a = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let b = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        Ok((
            GuestNet::Udp {
                local: a,
                remote: b,
                mac: mac_a.to_string(),
            },
            GuestNet::Udp {
                local: b,
                remote: a,
                mac: mac_b.to_string(),
            },
        ))
    }
}

/// A virtio-blk disk over vhost-user: QEMU connects to the backend's
/// socket (`-chardev socket` and `-device vhost-user-blk-pci`). The guest
/// sees the disks as `/dev/vda`, `/dev/vdb`, ... in the order of
/// [`GuestConfig::disks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAttach {
    /// The backend's vhost-user socket (the backend listens on it).
    pub socket: PathBuf,
    /// Request queues (`num-queues=`; the backend must offer as many).
    pub num_queues: u16,
    /// With N > 0, `reconnect=N` on the chardev: QEMU reconnects to a
    /// backend that went away, trying every N seconds.
    pub reconnect_secs: u32,
}

impl DiskAttach {
    /// One queue, no reconnection.
    pub fn new(socket: impl Into<PathBuf>) -> DiskAttach {
        DiskAttach {
            socket: socket.into(),
            num_queues: 1,
            reconnect_secs: 0,
        }
    }
}

/// What the disk jobs write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pattern {
    /// Bytes of `/dev/urandom` (`vio.pattern=random`).
    #[default]
    Random,
    /// The `tcp-send` payload, see [`payload`] (`vio.pattern=seq`).
    Seq,
}

impl Pattern {
    fn arg(self) -> &'static str {
        match self {
            Pattern::Random => "vio.pattern=random",
            Pattern::Seq => "vio.pattern=seq",
        }
    }
}

/// A disk job of the guest image, on `/dev/vda` (another disk with the
/// kernel argument `vio.disk=vdb`). Every one ends with a
/// `VIOTEST-RESULT:` line whose `sha256=` field is the sum of its marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkJob {
    /// `blk-sum`: sha256 of the first `bytes` bytes of the disk (all of it
    /// with `None`), printed as [`BLK_SUM_MARKER`].
    Sum { bytes: Option<u64> },
    /// `blk-write`: write `bytes` bytes of `pattern` at `offset` with fsync,
    /// read them back past the page cache, print their sha256 as
    /// [`BLK_WRITTEN_MARKER`]; the host then compares that range of its
    /// backing file (see [`sha256_file_range`]).
    Write {
        offset: u64,
        bytes: u64,
        pattern: Pattern,
    },
    /// `blk-fs`: on a disk without the test file, make an ext2 filesystem
    /// (when none mounts), write a file of `bytes` bytes of `pattern`,
    /// umount, print [`FS_WRITTEN_MARKER`] and reboot; on the next boot
    /// read the file back, print [`FS_READ_MARKER`] and power off. QEMU
    /// must allow the reboot ([`GuestConfig::reboot`]).
    Fs { bytes: u64, pattern: Pattern },
}

impl BlkJob {
    /// The job's name (`vio.job=`).
    pub fn name(&self) -> &'static str {
        match self {
            BlkJob::Sum { .. } => "blk-sum",
            BlkJob::Write { .. } => "blk-write",
            BlkJob::Fs { .. } => "blk-fs",
        }
    }

    /// The job's parameters as kernel arguments.
    pub fn kernel_args(&self) -> Vec<String> {
        match *self {
            BlkJob::Sum { bytes } => bytes
                .map(|b| vec![format!("vio.bytes={b}")])
                .unwrap_or_default(),
            BlkJob::Write {
                offset,
                bytes,
                pattern,
            } => vec![
                format!("vio.offset={offset}"),
                format!("vio.bytes={bytes}"),
                pattern.arg().into(),
            ],
            BlkJob::Fs { bytes, pattern } => {
                vec![format!("vio.bytes={bytes}"), pattern.arg().into()]
            }
        }
    }

    /// The marker line(s) the job prints its sha256 on, in order.
    pub fn markers(&self) -> &'static [&'static str] {
        match self {
            BlkJob::Sum { .. } => &[BLK_SUM_MARKER],
            BlkJob::Write { .. } => &[BLK_WRITTEN_MARKER],
            BlkJob::Fs { .. } => &[FS_WRITTEN_MARKER, FS_READ_MARKER],
        }
    }
}

/// The usual way to start a guest on a switch port (vhost-user).
#[derive(Debug, Clone)]
pub struct QemuNetOpts {
    /// The port's vhost-user socket (the switch listens on it).
    pub socket: PathBuf,
    /// The guest's MAC, `52:54:00:..`; see [`mac`].
    pub mac: String,
    /// The job (`vio.job=`).
    pub job: String,
    /// More kernel arguments, e.g. `vio.ip=10.0.0.1/24`.
    pub kernel_args: Vec<String>,
}

/// Everything about a guest to start.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// A name for messages and log files.
    pub name: String,
    /// The network device.
    pub net: GuestNet,
    /// The job (`vio.job=`).
    pub job: String,
    /// More kernel arguments (`vio.*` job parameters).
    pub kernel_args: Vec<String>,
    /// Guest memory in MiB (memfd-backed and shared, as vhost-user needs).
    pub memory_mib: u32,
    /// vhost-user-blk disks, `/dev/vda` first.
    pub disks: Vec<DiskAttach>,
    /// More QEMU arguments.
    pub extra_qemu_args: Vec<String>,
    /// Virtual CPUs (`-smp`).
    pub cpus: u32,
    /// Queue pairs of a vhost-user NIC: above 1, `queues=N` on the netdev
    /// and `mq=on` on the device (the port must have as many).
    pub queue_pairs: u16,
    /// Let the guest reboot: without `-no-reboot`, a guest reboot or a
    /// monitor `system_reset` restarts the guest instead of ending QEMU.
    pub reboot: bool,
    /// An HMP monitor on a unix socket in the guest's log directory, for
    /// [`QemuGuest::monitor`].
    pub monitor: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            name: "guest".into(),
            net: GuestNet::None,
            job: "boot".into(),
            kernel_args: Vec::new(),
            memory_mib: 256,
            disks: Vec::new(),
            extra_qemu_args: Vec::new(),
            cpus: 1,
            queue_pairs: 1,
            reboot: false,
            monitor: false,
        }
    }
}

impl From<QemuNetOpts> for GuestConfig {
    fn from(o: QemuNetOpts) -> Self {
        let name = o
            .socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into());
        GuestConfig {
            name,
            net: GuestNet::VhostUser {
                socket: o.socket,
                mac: o.mac,
            },
            job: o.job,
            kernel_args: o.kernel_args,
            ..GuestConfig::default()
        }
    }
}

impl GuestConfig {
    /// A guest named `name` on `net` running `job` with `args` (`vio.*`
    /// kernel arguments), the rest as by default.
    pub fn net_job(name: &str, net: GuestNet, job: &str, args: &[&str]) -> GuestConfig {
        GuestConfig {
            name: name.into(),
            net,
            job: job.into(),
            kernel_args: args.iter().map(|s| s.to_string()).collect(),
            ..GuestConfig::default()
        }
    }

    /// A guest without network running the disk job `job` on one disk
    /// (`/dev/vda`); for [`BlkJob::Fs`] the guest may reboot.
    pub fn blk(name: &str, disk: DiskAttach, job: &BlkJob) -> GuestConfig {
        GuestConfig {
            name: name.into(),
            disks: vec![disk],
            ..GuestConfig::default()
        }
        .with_blk_job(job)
    }

    /// Run the disk job `job`: sets the job, appends its parameters to the
    /// kernel arguments, and lets the guest reboot for [`BlkJob::Fs`].
    pub fn with_blk_job(mut self, job: &BlkJob) -> GuestConfig {
        self.job = job.name().into();
        self.kernel_args.extend(job.kernel_args());
        if matches!(job, BlkJob::Fs { .. }) {
            self.reboot = true;
        }
        self
    }
}

/// Hold this while a test runs QEMU guests, so that the tests of one test
/// binary run them one at a time (the machines have 2 cores). A test that
/// panicked leaves it usable.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `path` as a QEMU option value: commas doubled.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A locally administered MAC `52:54:00:00:00:NN`.
pub fn mac(n: u8) -> String {
    format!("52:54:00:00:00:{n:02x}")
}

/// The monitor socket of a guest whose logs are in `dir` (see
/// [`GuestConfig::monitor`]).
pub fn monitor_path(dir: &Path) -> PathBuf {
    dir.join("monitor.sock")
}

/// The QEMU command line for `cfg` (without the program name).
pub fn qemu_args(img: &GuestImage, cfg: &GuestConfig, serial_log: &Path) -> Vec<String> {
    let mem = cfg.memory_mib;
    let mut a: Vec<String> = vec![
        "-name".into(),
        cfg.name.clone(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-smp".into(),
        cfg.cpus.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
    ];
    if !cfg.reboot {
        a.push("-no-reboot".into());
    }
    a.extend([
        "-accel".into(),
        "tcg".into(),
        "-serial".into(),
        format!("file:{}", serial_log.display()),
    ]);
    if cfg.monitor {
        let dir = serial_log.parent().unwrap_or_else(|| Path::new("."));
        a.push("-monitor".into());
        a.push(format!(
            "unix:{},server=on,wait=off",
            monitor_path(dir).display()
        ));
    }
    match &cfg.net {
        GuestNet::None => {}
        GuestNet::VhostUser { socket, mac } => {
            a.push("-chardev".into());
            a.push(format!("socket,id=c0,path={}", socket.display()));
            // MSI-X with vhost-user-net crashes QEMU 7.2 under TCG: vectors=0
            // (multiqueue included: the queues share the INTx line).
            let (queues, mq) = match cfg.queue_pairs {
                0 | 1 => (String::new(), ""),
                q => (format!(",queues={q}"), ",mq=on"),
            };
            a.push("-netdev".into());
            a.push(format!("vhost-user,id=n0,chardev=c0{queues}"));
            a.push("-device".into());
            a.push(format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0{mq}"));
        }
        GuestNet::Udp { local, remote, mac } => {
            a.push("-netdev".into());
            a.push(format!("socket,id=n0,udp={remote},localaddr={local}"));
            a.push("-device".into());
            a.push(format!("virtio-net-pci,netdev=n0,mac={mac}"));
        }
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        let reconnect = match d.reconnect_secs {
            0 => String::new(),
            n => format!(",reconnect={n}"),
        };
        a.push("-chardev".into());
        a.push(format!(
            "socket,id=blk{i},path={}{reconnect}",
            opt_path(&d.socket)
        ));
        // vhost-user-blk is fine with MSI-X under TCG (unlike -net).
        a.push("-device".into());
        a.push(format!(
            "vhost-user-blk-pci,chardev=blk{i},num-queues={}",
            d.num_queues.max(1)
        ));
    }
    a.extend(cfg.extra_qemu_args.iter().cloned());
    let mut append = format!("console=ttyS0 panic=-1 quiet vio.job={}", cfg.job);
    for k in &cfg.kernel_args {
        append.push(' ');
        append.push_str(k);
    }
    a.push("-kernel".into());
    a.push(img.kernel.display().to_string());
    a.push("-initrd".into());
    a.push(img.initrd.display().to_string());
    a.push("-append".into());
    a.push(append);
    a
}

/// A job's result, parsed from its `VIOTEST-RESULT:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResult {
    /// `ok` or not.
    pub ok: bool,
    /// Everything after `ok`/`fail`.
    pub details: String,
    /// The `key=value` words of the details.
    pub fields: BTreeMap<String, String>,
    /// The whole line.
    pub line: String,
}

impl GuestResult {
    /// Parse a line holding `VIOTEST-RESULT: ok|fail ...`.
    pub fn parse(line: &str) -> Result<GuestResult> {
        let bad = || QemuError::BadResult(line.to_string());
        let at = line.find(RESULT_MARKER).ok_or_else(bad)?;
        let rest = line[at + RESULT_MARKER.len()..].trim();
        let (verdict, details) = rest.split_once(' ').unwrap_or((rest, ""));
        let ok = match verdict {
            "ok" => true,
            "fail" => false,
            _ => return Err(bad()),
        };
        let fields = details
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(GuestResult {
            ok,
            details: details.trim().to_string(),
            fields,
            line: line.to_string(),
        })
    }

    /// A `key=value` field of the details.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// A running QEMU guest; killed and reaped on drop.
///
/// QEMU gets SIGKILL if the thread that spawned it ends (PR_SET_PDEATHSIG),
/// so no guest outlives a test that dies: spawn guests from the thread that
/// keeps them.
pub struct QemuGuest {
    name: String,
    child: Child,
    dir: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
    monitor: Option<PathBuf>,
    started: Instant,
}

impl QemuGuest {
    /// Boot `img` with `cfg` (a [`GuestConfig`] or [`QemuNetOpts`]).
    pub fn spawn(img: &GuestImage, cfg: impl Into<GuestConfig>) -> Result<QemuGuest> {
        let cfg = cfg.into();
        let dir = crate::temp_dir(&format!("vioswitch-qemu-{}", cfg.name))?;
        let serial = dir.join("serial.log");
        let stderr = dir.join("qemu.log");
        // Exists from the start, so reading it before QEMU opens it works.
        File::create(&serial)?;
        let args = qemu_args(img, &cfg, &serial);
        let program = std::env::var(QEMU_ENV).unwrap_or_else(|_| "qemu-system-x86_64".into());
        let mut cmdline = File::create(dir.join("cmdline"))?;
        writeln!(cmdline, "{program} {}", args.join(" "))?;
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr)?);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| QemuError::Spawn {
            program: program.clone(),
            source,
        })?;
        log::debug!(
            "guest {}: QEMU pid {} in {}",
            cfg.name,
            child.id(),
            dir.display()
        );
        let monitor = cfg.monitor.then(|| monitor_path(&dir));
        Ok(QemuGuest {
            name: cfg.name,
            child,
            dir,
            serial,
            stderr,
            monitor,
            started: Instant::now(),
        })
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the spawn.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The directory of the guest's logs.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// The serial console output so far.
    pub fn serial_log(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// QEMU's own stderr so far.
    pub fn qemu_stderr(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} serial console ---\n{}--- {} QEMU stderr ---\n{}",
            self.name,
            self.serial_log(),
            self.name,
            self.qemu_stderr()
        )
    }

    /// The first complete serial line containing `marker`, if any yet.
    pub fn find_line(&self, marker: &str) -> Option<String> {
        let log = self.serial_log();
        let complete = match log.rfind('\n') {
            Some(end) => &log[..end],
            None => return None,
        };
        complete
            .lines()
            .find(|l| l.contains(marker))
            .map(|l| l.trim().to_string())
    }

    /// The complete serial lines containing `marker` so far, in order.
    pub fn find_lines(&self, marker: &str) -> Vec<String> {
        let log = self.serial_log();
        let complete = match log.rfind('\n') {
            Some(end) => &log[..end],
            None => return Vec::new(),
        };
        complete
            .lines()
            .filter(|l| l.contains(marker))
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// The first word after `marker` on each complete serial line holding
    /// it, in order: e.g. the sha256 of [`FS_WRITTEN_MARKER`] and
    /// [`FS_READ_MARKER`] lines.
    pub fn marker_values(&self, marker: &str) -> Vec<String> {
        self.find_lines(marker)
            .iter()
            .filter_map(|l| {
                let at = l.find(marker)? + marker.len();
                l[at..].split_whitespace().next().map(str::to_string)
            })
            .collect()
    }

    /// Wait for a serial line containing `marker` (searched from the start
    /// of the log) and return it. Fails when QEMU exits first or the
    /// timeout passes; the error carries the logs.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        self.wait_for_nth(marker, 1, timeout)
    }

    /// Wait for the `n`th serial line (from 1) containing `marker`, e.g.
    /// the result of the job's second run after a reboot.
    pub fn wait_for_nth(&mut self, marker: &str, n: usize, timeout: Duration) -> Result<String> {
        let n = n.max(1);
        let nth = |g: &Self| g.find_lines(marker).into_iter().nth(n - 1);
        let what = if n == 1 {
            marker.to_string()
        } else {
            format!("{marker} (occurrence {n})")
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = nth(self) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                // Whatever it wrote before exiting is in the file now.
                if let Some(line) = nth(self) {
                    return Ok(line);
                }
                return Err(QemuError::Exited {
                    guest: self.name.clone(),
                    marker: what,
                    status,
                    logs: self.logs(),
                });
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    guest: self.name.clone(),
                    marker: what,
                    timeout,
                    logs: self.logs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the job's result line and parse it.
    pub fn result(&mut self, timeout: Duration) -> Result<GuestResult> {
        self.result_nth(1, timeout)
    }

    /// Wait for the `n`th result line (from 1; a guest that reboots runs
    /// its job again) and parse it.
    pub fn result_nth(&mut self, n: usize, timeout: Duration) -> Result<GuestResult> {
        let line = self.wait_for_nth(RESULT_MARKER, n, timeout)?;
        GuestResult::parse(&line)
    }

    /// Run one command on the guest's HMP monitor (the guest needs
    /// [`GuestConfig::monitor`]) and return what the monitor printed before
    /// its next prompt, e.g. for `system_reset` or `info status`.
    pub fn monitor(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let guest = self.name.clone();
        let err = |what: String| QemuError::Monitor {
            guest: guest.clone(),
            what,
        };
        let path = self
            .monitor
            .clone()
            .ok_or_else(|| err("started without a monitor".into()))?;
        let deadline = Instant::now() + timeout;
        // QEMU creates the socket while it starts.
        let mut sock = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() >= deadline || !self.is_running() {
                        return Err(err(format!("cannot connect to {}: {e}", path.display())));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut out = Vec::new();
        read_to_prompt(&mut sock, &mut out, 0, deadline).map_err(err)?;
        let start = out.len();
        sock.write_all(format!("{command}\n").as_bytes())?;
        read_to_prompt(&mut sock, &mut out, start, deadline).map_err(err)?;
        let text = String::from_utf8_lossy(&out[start..]).into_owned();
        let text = text.strip_suffix(MONITOR_PROMPT).unwrap_or(&text);
        // The monitor echoes the command line (with terminal escapes).
        Ok(text
            .lines()
            .filter(|l| !l.contains(command))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for QEMU to exit by itself (the guest powers off after its job).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    guest: self.name.clone(),
                    marker: "<QEMU exit>".into(),
                    timeout,
                    logs: self.logs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill QEMU (SIGKILL) and reap it. Idempotent.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

const MONITOR_PROMPT: &str = "(qemu) ";

/// Read from an HMP monitor until what came after `out[from..]` ends with
/// its prompt.
fn read_to_prompt(
    sock: &mut UnixStream,
    out: &mut Vec<u8>,
    from: usize,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        if String::from_utf8_lossy(&out[from..]).ends_with(MONITOR_PROMPT) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no prompt in time; got {:?}",
                String::from_utf8_lossy(out)
            ));
        }
        match sock.read(&mut buf) {
            Ok(0) => return Err(format!("closed; got {:?}", String::from_utf8_lossy(out))),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os(KEEP_LOGS_ENV).is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The payload the `tcp-send` job sends: `1\n2\n3\n...` cut at `n` bytes
/// (the guest makes it with `seq 1 $((n/2+1)) | head -c n`).
pub fn payload(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 16);
    let mut i = 1u64;
    while v.len() < n {
        v.extend_from_slice(i.to_string().as_bytes());
        v.push(b'\n');
        i += 1;
    }
    v.truncate(n);
    v
}

/// SHA-256 of `data` as lowercase hex, computed by `sha256sum` (coreutils).
pub fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| QemuError::Spawn {
            program: "sha256sum".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// SHA-256 (lowercase hex) of `len` bytes of the file at `path` from
/// `offset`, e.g. of a disk image after a guest wrote to it. Fails if the
/// file is shorter.
pub fn sha256_file_range(path: &Path, offset: u64, len: u64) -> Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::new();
    f.take(len).read_to_end(&mut data)?;
    if data.len() as u64 != len {
        return Err(QemuError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "{}: {} bytes at {offset}, wanted {len}",
                path.display(),
                data.len()
            ),
        )));
    }
    sha256_hex(&data)
}

/// `qemu-storage-daemon` serving a disk image (file driver, writable) as a
/// vhost-user-blk export on a unix socket: a known-good backend for the
/// disk jobs. Killed and reaped on drop (and killed if the thread that
/// spawned it ends).
pub struct StorageDaemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl StorageDaemon {
    /// Serve `image` on `socket` with one queue.
    pub fn spawn(image: &Path, socket: &Path) -> Result<StorageDaemon> {
        Self::spawn_with(image, socket, 1)
    }

    /// Serve `image` on `socket` with `num_queues` request queues. Returns
    /// once the socket exists; the daemon's output goes to `SOCKET.log`.
    /// The binary is `$VIOSWITCH_QSD`, else `qemu-storage-daemon`.
    pub fn spawn_with(image: &Path, socket: &Path, num_queues: u16) -> Result<StorageDaemon> {
        let program = std::env::var(QSD_ENV).unwrap_or_else(|_| "qemu-storage-daemon".into());
        let log = PathBuf::from(format!("{}.log", socket.display()));
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mut cmd = Command::new(&program);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                opt_path(image)
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={}",
                opt_path(socket),
                num_queues.max(1)
            ))
            .stdin(Stdio::null());
        let out = File::create(&log)?;
        cmd.stdout(out.try_clone()?).stderr(out);
        // SAFETY: as in QemuGuest::spawn.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            QemuError::StorageDaemon(format!(
                "cannot start {program} (package qemu-system-common: run scripts/install-deps.sh, or set {QSD_ENV}): {e}"
            ))
        })?;
        let mut qsd = StorageDaemon {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !qsd.socket.exists() {
            if let Some(status) = qsd.child.try_wait()? {
                return Err(QemuError::StorageDaemon(format!(
                    "exited ({status}) before creating {}:\n{}",
                    qsd.socket.display(),
                    qsd.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(QemuError::StorageDaemon(format!(
                    "no socket {} after 30s:\n{}",
                    qsd.socket.display(),
                    qsd.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(qsd)
    }

    /// The export's vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A [`DiskAttach`] for this export (one queue).
    pub fn disk(&self) -> DiskAttach {
        DiskAttach::new(&self.socket)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kill the daemon (SIGKILL) and reap it. Idempotent.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let r =
            GuestResult::parse("\u{1b}[0mVIOTEST-RESULT: ok replies=5 sent=5 rtt=1/2/3").unwrap();
        assert!(r.ok);
        assert_eq!(r.get("replies"), Some("5"));
        assert_eq!(r.details, "replies=5 sent=5 rtt=1/2/3");
        let r = GuestResult::parse("VIOTEST-RESULT: fail peer 10.0.0.2 did not answer").unwrap();
        assert!(!r.ok);
        assert_eq!(r.details, "peer 10.0.0.2 did not answer");
        let r = GuestResult::parse("VIOTEST-RESULT: ok").unwrap();
        assert!(r.ok && r.details.is_empty());
        assert!(GuestResult::parse("VIOTEST-RESULT: maybe").is_err());
        assert!(GuestResult::parse("nothing here").is_err());
    }

    #[test]
    fn payload_matches_the_guest_generator() {
        assert_eq!(payload(0), b"");
        assert_eq!(payload(5), b"1\n2\n3");
        assert_eq!(payload(25), b"1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n1");
    }

    #[test]
    fn vhost_user_command_line() {
        let img = GuestImage {
            dir: "/g".into(),
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initramfs.cpio.gz".into(),
            kernel_version: String::new(),
        };
        let cfg: GuestConfig = QemuNetOpts {
            socket: "/run/vm1.sock".into(),
            mac: mac(1),
            job: "ping".into(),
            kernel_args: vec!["vio.ip=10.0.0.1/24".into()],
        }
        .into();
        assert_eq!(cfg.name, "vm1");
        let a = qemu_args(&img, &cfg, Path::new("/tmp/s.log")).join(" ");
        assert!(a.contains(
            "-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem"
        ));
        assert!(a.contains("-nodefaults -no-user-config -display none -no-reboot -accel tcg"));
        assert!(a.contains("-chardev socket,id=c0,path=/run/vm1.sock -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,vectors=0"));
        assert!(a.ends_with("-append console=ttyS0 panic=-1 quiet vio.job=ping vio.ip=10.0.0.1/24"));
        assert!(a.contains("-smp 1 "));
        assert!(!a.contains("-monitor"));

        let cfg = GuestConfig {
            cpus: 2,
            queue_pairs: 2,
            reboot: true,
            monitor: true,
            ..cfg
        };
        let a = qemu_args(&img, &cfg, Path::new("/tmp/g/serial.log")).join(" ");
        assert!(a.contains("-smp 2 "));
        assert!(!a.contains("-no-reboot"));
        assert!(a.contains("-monitor unix:/tmp/g/monitor.sock,server=on,wait=off"));
        assert!(a.contains("-netdev vhost-user,id=n0,chardev=c0,queues=2 -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,vectors=0,mq=on"));
    }

    #[test]
    fn disk_command_line() {
        let img = GuestImage {
            dir: "/g".into(),
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initramfs.cpio.gz".into(),
            kernel_version: String::new(),
        };
        let job = BlkJob::Write {
            offset: 4096,
            bytes: 512,
            pattern: Pattern::Seq,
        };
        let mut cfg = GuestConfig::blk("d", DiskAttach::new("/run/a,b.sock"), &job);
        cfg.disks.push(DiskAttach {
            socket: "/run/c.sock".into(),
            num_queues: 2,
            reconnect_secs: 1,
        });
        let a = qemu_args(&img, &cfg, Path::new("/tmp/s.log")).join(" ");
        assert!(a.contains("-no-reboot"));
        assert!(a.contains(
            "-chardev socket,id=blk0,path=/run/a,,b.sock -device vhost-user-blk-pci,chardev=blk0,num-queues=1 \
             -chardev socket,id=blk1,path=/run/c.sock,reconnect=1 -device vhost-user-blk-pci,chardev=blk1,num-queues=2 "
        ));
        assert!(!a.contains("virtio-net"));
        assert!(a.ends_with("vio.job=blk-write vio.offset=4096 vio.bytes=512 vio.pattern=seq"));

        let fs = GuestConfig::blk(
            "d",
            DiskAttach::new("/run/a.sock"),
            &BlkJob::Fs {
                bytes: 1 << 20,
                pattern: Pattern::Random,
            },
        );
        assert!(fs.reboot);
        let a = qemu_args(&img, &fs, Path::new("/tmp/s.log")).join(" ");
        assert!(!a.contains("-no-reboot"));
        assert!(a.ends_with("vio.job=blk-fs vio.bytes=1048576 vio.pattern=random"));
        let sum = GuestConfig::blk(
            "d",
            DiskAttach::new("/run/a.sock"),
            &BlkJob::Sum { bytes: None },
        );
        assert_eq!(sum.job, "blk-sum");
        assert!(sum.kernel_args.is_empty());
    }
}
