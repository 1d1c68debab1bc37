//! `vioctl`: command-line client of the vioswitch control socket.
//!
//! A thin client: each subcommand sends one request line and prints the
//! answer as a table, or as JSON with `--json`. Exit codes: 0 when the switch
//! answered ok, 1 when it answered with an error, 2 when it cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Control a running vioswitch: add, change and remove ports and disks, look
/// at counters, the MAC table and the workers, save the configuration, and
/// follow events.
///
/// Examples:
///   vioctl port add vm1                     # QEMU connects to RUN_DIR/vm1.sock
///   vioctl port add vm2 --mode client --socket /var/run/qemu/vm2.sock
///   vioctl port set vm1 --vlan 10
///   vioctl port stats vm1
///   vioctl disk add d0 --path /var/lib/images/vm1.raw   # RUN_DIR/d0.sock
///   vioctl disk resize d0 --size 20G
///   vioctl disk stats d0
///   vioctl --json port list
///   vioctl monitor
///
/// Exit codes: 0 ok, 1 the switch answered with an error, 2 the switch cannot
/// be reached.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    propagate_version = true,
    verbatim_doc_comment
)]
struct Cli {
    /// The switch's run directory (its control socket is RUN_DIR/control.sock)
    /// [default: /run/vioswitch for root, else $XDG_RUNTIME_DIR/vioswitch]
    #[arg(long, env = "VIOSWITCH_RUN_DIR", global = true)]
    run_dir: Option<PathBuf>,
    /// Print the switch's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the switch's version, uptime and workers.
    Info,
    /// Manage net ports.
    #[command(subcommand)]
    Port(PortCmd),
    /// Manage disks: raw image files or block devices served as virtio-blk
    ///
    /// A disk is served to one guest over vhost-user (QEMU's
    /// vhost-user-blk-pci), on a socket like a port's.
    ///
    /// Examples:
    ///   vioctl disk add d0 --path /var/lib/images/vm1.raw   # RUN_DIR/d0.sock
    ///   vioctl disk add d1 --path /dev/vg0/vm2 --direct --queues 4
    ///   vioctl disk list
    ///   vioctl disk stats d0
    ///   vioctl disk resize d0 --size 20G
    ///   vioctl disk del d1
    #[command(subcommand, verbatim_doc_comment)]
    Disk(DiskCmd),
    /// Show or flush the MAC learning table.
    #[command(subcommand)]
    Fdb(FdbCmd),
    /// Show the dataplane workers and move ports and disks between them.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Show or save the running configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the switch's events (ports and disks added, connected, broken,
    /// disks resized, ...) as they happen.
    Monitor,
    /// Print a shell completion script, e.g. `vioctl completions bash > /etc/bash_completion.d/vioctl`.
    Completions { shell: clap_complete::Shell },
    /// Send any command with JSON arguments, e.g. `vioctl raw port.show '{"name":"vm1"}'`.
    Raw {
        cmd: String,
        #[arg(default_value = "{}")]
        args: String,
    },
}

#[derive(Subcommand, Debug)]
enum PortCmd {
    /// Add a port. In server mode (default) the switch listens on the
    /// socket and QEMU connects; in client mode QEMU listens
    /// (`-chardev socket,...,server=on,wait=off`) and the switch connects,
    /// reconnecting whenever QEMU comes back.
    Add {
        name: String,
        /// Queue pairs (multiqueue when > 1).
        #[arg(long)]
        queues: Option<u16>,
        /// VLAN (broadcast domain) of the port; 0 = none.
        #[arg(long)]
        vlan: Option<u16>,
        /// MTU: larger frames are dropped [default: no limit but the switch's 16 KiB frames].
        #[arg(long)]
        mtu: Option<u16>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Change a port while it runs: VLAN and MTU apply at once, a new worker
    /// moves its rings, a new mode or socket reconnects its guest.
    Set {
        name: String,
        #[arg(long)]
        vlan: Option<u16>,
        /// 0 removes the limit.
        #[arg(long)]
        mtu: Option<u16>,
        #[arg(long)]
        worker: Option<usize>,
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Remove a port, disconnecting its guest.
    Del { name: String },
    /// List ports.
    List,
    /// Show a port with its counters.
    Show { name: String },
    /// Show counters of one port, or of all.
    Stats { name: Option<String> },
}

/// Where and how the switch serves a port's or disk's vhost-user socket.
#[derive(clap::Args, Debug)]
struct Endpoint {
    /// Socket path [default: RUN_DIR/NAME.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Who listens on the socket.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Worker that polls it [default: round robin].
    #[arg(long)]
    worker: Option<usize>,
    /// Owner of the socket file (server mode), e.g. libvirt-qemu.
    #[arg(long)]
    owner: Option<String>,
    /// Group of the socket file (server mode), e.g. kvm.
    #[arg(long)]
    group: Option<String>,
    /// Permissions of the socket file (server mode), octal [default: 0660].
    #[arg(long)]
    perm: Option<String>,
}

impl Endpoint {
    /// The arguments given, as `port.add` and `disk.add` name them.
    fn opts(&self) -> [(&'static str, Option<Value>); 6] {
        [
            ("socket", self.socket.as_ref().map(|v| json!(v))),
            ("mode", self.mode.map(|m| json!(m.as_str()))),
            ("worker", self.worker.map(|v| json!(v))),
            ("owner", self.owner.as_ref().map(|v| json!(v))),
            ("group", self.group.as_ref().map(|v| json!(v))),
            ("perm", self.perm.as_ref().map(|v| json!(v))),
        ]
    }
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Add a disk backed by a raw image file or a block device
    ///
    /// It is served on a vhost-user socket: in server mode (default) the
    /// switch listens and QEMU connects; in client mode QEMU listens.
    ///
    /// Examples:
    ///   vioctl disk add d0 --path /var/lib/images/vm1.raw
    ///   vioctl disk add d1 --path /dev/vg0/vm2 --direct --queues 4 --serial VM2-ROOT
    ///   vioctl disk add iso --path /srv/debian.iso --readonly --owner libvirt-qemu
    ///
    /// QEMU: -chardev socket,id=d0,path=RUN_DIR/d0.sock
    ///       -device vhost-user-blk-pci,chardev=d0,num-queues=1
    /// (guest memory shared: -object memory-backend-memfd,...,share=on)
    #[command(verbatim_doc_comment)]
    Add {
        /// 1-64 of A-Z a-z 0-9 - _ . (the default socket is RUN_DIR/NAME.sock).
        name: String,
        /// The raw image file or block device (a relative path is taken from
        /// the current directory).
        #[arg(long, value_hint = clap::ValueHint::AnyPath)]
        path: PathBuf,
        /// Serve the disk read-only (the backing is opened read-only).
        #[arg(long)]
        readonly: bool,
        /// Bypass the host page cache (O_DIRECT).
        #[arg(long)]
        direct: bool,
        /// Serial number the guest reads, up to 20 printable ASCII characters
        /// [default: the disk's name].
        #[arg(long)]
        serial: Option<String>,
        /// Request queues, 1-16 (QEMU's num-queues must not exceed it) [default: 1].
        #[arg(long)]
        queues: Option<u16>,
        /// Largest ring the guest may set up, a power of two 4-1024 [default: 256].
        #[arg(long)]
        queue_size: Option<u16>,
        /// Logical block size offered to the guest [default: 512].
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["512", "4096"])
            .map(|s| if s == "4096" { 4096u32 } else { 512 }))]
        block_size: Option<u32>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove a disk, disconnecting its guest.
    Del { name: String },
    /// List disks.
    List,
    /// Show a disk with its counters.
    Show { name: String },
    /// Show counters of one disk, or of all.
    ///
    /// Requests and bytes by kind (read, write, flush, discard, write_zeroes,
    /// get_id), failed requests by reason, requests in flight.
    Stats { name: Option<String> },
    /// Change a disk's size and tell its guest
    ///
    /// A file is grown (or, with --shrink, cut) to SIZE. A block device is
    /// resized by its owner (e.g. lvextend); then call resize without --size
    /// and the switch re-reads its size. The guest learns the new size from
    /// a config-change interrupt.
    ///
    /// Examples:
    ///   vioctl disk resize d0 --size 20G
    ///   vioctl disk resize d1            # after lvextend
    #[command(verbatim_doc_comment)]
    Resize {
        name: String,
        /// New size: bytes, or with a binary suffix K, M, G, T (10G = 10 GiB);
        /// a multiple of the block size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Allow making the disk smaller (cuts data the guest may use).
        #[arg(long)]
        shrink: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FdbCmd {
    /// List learnt MAC addresses.
    Show {
        #[arg(long)]
        port: Option<String>,
    },
    /// Forget learnt MAC addresses (of one port, or all).
    Flush {
        #[arg(long)]
        port: Option<String>,
    },
    /// Add a static entry: MAC always goes to PORT.
    Add {
        mac: String,
        port: String,
        #[arg(long, default_value_t = 0)]
        vlan: u16,
    },
    /// Remove a static entry.
    Del {
        mac: String,
        #[arg(long, default_value_t = 0)]
        vlan: u16,
    },
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// List workers with their ports and disks, and counters.
    List,
    /// Move a port or disk to another worker without disturbing its guest.
    Move { port: String, worker: usize },
    /// Spread the ports and disks evenly over the workers.
    Rebalance,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the running configuration (JSON, or TOML for --config).
    Show {
        #[arg(long)]
        toml: bool,
    },
    /// Save it: to the run directory's state (restored on restart), or as TOML
    /// to the file NAME in the run directory (for `vioswitch --config`).
    Save { name: Option<PathBuf> },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Mode {
    Server,
    Client,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Server => "server",
            Mode::Client => "client",
        }
    }
}

/// Put the `Some` options into an argument object.
fn with_opts(mut args: Value, opts: &[(&str, Option<Value>)]) -> Value {
    for (k, v) in opts {
        if let Some(v) = v {
            args[*k] = v.clone();
        }
    }
    args
}

fn default_run_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/vioswitch");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("vioswitch"),
        None => PathBuf::from(format!("/tmp/vioswitch-{uid}")),
    }
}

/// A request to send: command and arguments.
fn request(cmd: &Cmd) -> Result<(String, Value), String> {
    let r = match cmd {
        Cmd::Info => ("switch.info", json!({})),
        Cmd::Port(p) => match p {
            PortCmd::Add {
                name,
                queues,
                vlan,
                mtu,
                endpoint,
            } => (
                "port.add",
                with_opts(
                    with_opts(json!({ "name": name }), &endpoint.opts()),
                    &[
                        ("queues", queues.map(|v| json!(v))),
                        ("vlan", vlan.map(|v| json!(v))),
                        ("mtu", mtu.map(|v| json!(v))),
                    ],
                ),
            ),
            PortCmd::Set {
                name,
                vlan,
                mtu,
                worker,
                mode,
                socket,
            } => (
                "port.set",
                with_opts(
                    json!({ "name": name }),
                    &[
                        ("vlan", vlan.map(|v| json!(v))),
                        ("mtu", mtu.map(|v| json!(v))),
                        ("worker", worker.map(|v| json!(v))),
                        ("mode", mode.map(|m| json!(m.as_str()))),
                        ("socket", socket.as_ref().map(|v| json!(v))),
                    ],
                ),
            ),
            PortCmd::Del { name } => ("port.del", json!({ "name": name })),
            PortCmd::List => ("port.list", json!({})),
            PortCmd::Show { name } => ("port.show", json!({ "name": name })),
            PortCmd::Stats { name } => ("port.stats", opt_name(name)),
        },
        Cmd::Disk(d) => match d {
            DiskCmd::Add {
                name,
                path,
                readonly,
                direct,
                serial,
                queues,
                queue_size,
                block_size,
                endpoint,
            } => {
                // The daemon runs elsewhere: a relative path means here.
                let path = std::path::absolute(path)
                    .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
                (
                    "disk.add",
                    with_opts(
                        with_opts(json!({ "name": name, "path": path }), &endpoint.opts()),
                        &[
                            ("readonly", readonly.then_some(json!(true))),
                            ("direct", direct.then_some(json!(true))),
                            ("serial", serial.as_ref().map(|v| json!(v))),
                            ("queues", queues.map(|v| json!(v))),
                            ("queue_size", queue_size.map(|v| json!(v))),
                            ("block_size", block_size.map(|v| json!(v))),
                        ],
                    ),
                )
            }
            DiskCmd::Del { name } => ("disk.del", json!({ "name": name })),
            DiskCmd::List => ("disk.list", json!({})),
            DiskCmd::Show { name } => ("disk.show", json!({ "name": name })),
            DiskCmd::Stats { name } => ("disk.stats", opt_name(name)),
            DiskCmd::Resize { name, size, shrink } => (
                "disk.resize",
                with_opts(
                    json!({ "name": name }),
                    &[
                        ("size", size.map(|v| json!(v))),
                        ("shrink", shrink.then_some(json!(true))),
                    ],
                ),
            ),
        },
        Cmd::Fdb(f) => match f {
            FdbCmd::Show { port } => ("fdb.show", opt_port(port)),
            FdbCmd::Flush { port } => ("fdb.flush", opt_port(port)),
            FdbCmd::Add { mac, port, vlan } => {
                ("fdb.add", json!({ "mac": mac, "port": port, "vlan": vlan }))
            }
            FdbCmd::Del { mac, vlan } => ("fdb.del", json!({ "mac": mac, "vlan": vlan })),
        },
        Cmd::Worker(WorkerCmd::List) => ("worker.list", json!({})),
        Cmd::Worker(WorkerCmd::Move { port, worker }) => {
            ("worker.move", json!({ "port": port, "worker": worker }))
        }
        Cmd::Worker(WorkerCmd::Rebalance) => ("worker.rebalance", json!({})),
        Cmd::Config(ConfigCmd::Show { toml }) => (
            "config.show",
            json!({ "format": if *toml { "toml" } else { "json" } }),
        ),
        Cmd::Config(ConfigCmd::Save { name }) => match name {
            Some(p) => ("config.save", json!({ "path": p })),
            None => ("config.save", json!({})),
        },
        Cmd::Monitor => ("events.subscribe", json!({})),
        Cmd::Completions { .. } => return Err("completions are printed locally".into()),
        Cmd::Raw { cmd, args } => {
            let v: Value =
                serde_json::from_str(args).map_err(|e| format!("arguments are not JSON: {e}"))?;
            return Ok((cmd.clone(), v));
        }
    };
    Ok((r.0.to_string(), r.1))
}

/// `{key: value}`, or `{}` without a value.
fn opt_arg(key: &str, value: &Option<String>) -> Value {
    with_opts(json!({}), &[(key, value.as_ref().map(|v| json!(v)))])
}

fn opt_port(port: &Option<String>) -> Value {
    opt_arg("port", port)
}

fn opt_name(name: &Option<String>) -> Value {
    opt_arg("name", name)
}

const SIZE_UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// A size in bytes: digits, optionally followed by a binary suffix K, M, G
/// or T (also KiB, MiB, GiB, TiB; any case).
fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let bad =
        || format!("{s:?} is not a size: give bytes, or a number with K, M, G or T (e.g. 10G)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Bytes for people: `512 B`, `64 MiB`, `1.5 GiB`: exact on unit
/// boundaries, else one decimal.
fn human_size(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < SIZE_UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, SIZE_UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, SIZE_UNITS[unit])
    }
}

#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error(
        "cannot reach vioswitch at {0}: {1} (is it running? set --run-dir or VIOSWITCH_RUN_DIR)"
    )]
    Connect(PathBuf, std::io::Error),
    #[error("lost the connection to vioswitch: {0}")]
    Io(#[from] std::io::Error),
    #[error("vioswitch answered something that is not JSON: {0}")]
    Garbled(#[from] serde_json::Error),
}

fn call(sock: &PathBuf, cmd: &str, args: Value) -> Result<Value, Unreachable> {
    let mut s = UnixStream::connect(sock).map_err(|e| Unreachable::Connect(sock.clone(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = json!({ "id": 1, "cmd": cmd, "args": args });
    // The switch may answer and close before reading (a refused peer): read
    // its answer even if the request could not be written whole.
    let sent = writeln!(s, "{req}");
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Ok(serde_json::from_str(&line)?),
        Ok(_) => Err(sent.err().map_or_else(
            || Unreachable::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Unreachable::Io,
        )),
        Err(e) => Err(Unreachable::Io(e)),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The elements of an array result (none for anything else).
fn rows(result: &Value) -> &[Value] {
    result.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Rows of objects as aligned lines with the given columns, under a header.
fn table_lines(rows: &[Value], cols: &[&str]) -> Vec<String> {
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |items: Vec<String>| {
        let s: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.join("  ").trim_end().to_string()
    };
    std::iter::once(line(cols.iter().map(|c| c.to_uppercase()).collect()))
        .chain(cells.into_iter().map(line))
        .collect()
}

/// Print rows of objects as an aligned table with the given columns.
fn table(rows: &[Value], cols: &[&str]) {
    for l in table_lines(rows, cols) {
        println!("{l}");
    }
}

fn print_stats(name: &str, s: &Value) {
    println!("{name}:");
    for k in ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "broken"] {
        println!("  {k:<22} {}", cell(&s[k]));
    }
    if let Some(d) = s["drops"].as_object() {
        for (k, v) in d {
            println!("  drop.{k:<17} {}", cell(v));
        }
    }
}

fn print_disk_stats(name: &str, s: &Value) {
    println!("{name}:");
    let ops: Vec<Value> = s["ops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| json!({ "request": k, "ops": n, "bytes": s["bytes"][k] }))
                .collect()
        })
        .unwrap_or_default();
    for l in table_lines(&ops, &["request", "ops", "bytes"]) {
        println!("  {l}");
    }
    for k in ["in_flight", "broken"] {
        println!("  {k:<22} {}", cell(&s[k]));
    }
    if let Some(e) = s["errors"].as_object() {
        for (k, v) in e {
            println!("  error.{k:<16} {}", cell(v));
        }
    }
}

/// Print the counters of the one object named, or of every object in a map
/// of them (`port.stats`, `disk.stats`).
fn print_each(name: &Option<String>, result: &Value, print: fn(&str, &Value)) {
    match name {
        Some(n) => print(n, result),
        None => {
            if let Some(m) = result.as_object() {
                for (n, s) in m {
                    print(n, s);
                }
            }
        }
    }
}

/// Print an object's fields, then its counters (`port.show`, `disk.show`).
fn print_show(name: &str, result: &Value, print: fn(&str, &Value)) {
    if let Some(m) = result.as_object() {
        for (k, v) in m.iter().filter(|(k, _)| *k != "stats") {
            println!("{k:<14} {}", cell(v));
        }
    }
    print(&format!("{name} counters"), &result["stats"]);
}

/// A disk's `size` for people: `64 MiB`, with the bytes too if `exact`.
fn disk_size(d: &Value, exact: bool) -> Value {
    match d["size"].as_u64() {
        Some(b) if exact => json!(format!("{} ({b} bytes)", human_size(b))),
        Some(b) => json!(human_size(b)),
        None => d["size"].clone(),
    }
}

/// A `disk.list` entry as the table shows it.
fn disk_row(d: &Value) -> Value {
    let mut r = d.clone();
    r["size"] = disk_size(d, false);
    r["ro"] = d["readonly"].clone();
    r
}

fn print_human(cmd: &Cmd, result: &Value) {
    match cmd {
        Cmd::Port(PortCmd::List) => table(
            rows(result),
            &[
                "name",
                "worker",
                "vlan",
                "queue_pairs",
                "connected",
                "broken",
                "socket",
            ],
        ),
        Cmd::Port(PortCmd::Stats { name }) => print_each(name, result, print_stats),
        Cmd::Port(PortCmd::Show { name }) => print_show(name, result, print_stats),
        Cmd::Disk(DiskCmd::List) => table(
            &rows(result).iter().map(disk_row).collect::<Vec<_>>(),
            &[
                "name",
                "path",
                "size",
                "block_size",
                "ro",
                "direct",
                "queues",
                "worker",
                "connected",
                "broken",
            ],
        ),
        Cmd::Disk(DiskCmd::Stats { name }) => print_each(name, result, print_disk_stats),
        Cmd::Disk(DiskCmd::Show { name }) => {
            let mut d = result.clone();
            d["size"] = disk_size(result, true);
            print_show(name, &d, print_disk_stats)
        }
        Cmd::Disk(DiskCmd::Add { .. }) => println!(
            "disk {} added ({}, {}); attach QEMU to {}",
            cell(&result["name"]),
            cell(&disk_size(result, false)),
            cell(&result["path"]),
            cell(&result["socket"])
        ),
        Cmd::Disk(DiskCmd::Resize { name, .. }) => {
            println!("disk {name} resized to {}", cell(&disk_size(result, true)))
        }
        Cmd::Fdb(FdbCmd::Show { .. }) => {
            table(rows(result), &["mac", "vlan", "port", "age_s", "static"])
        }
        Cmd::Worker(WorkerCmd::List) => table(
            rows(result),
            &[
                "id", "ports", "frames", "batches", "busy_ns", "idle_ns", "wakeups",
            ],
        ),
        Cmd::Config(ConfigCmd::Show { toml: true }) => print!("{}", cell(&result["toml"])),
        Cmd::Config(ConfigCmd::Show { toml: false }) => {
            println!(
                "{}",
                serde_json::to_string_pretty(result).unwrap_or_default()
            )
        }
        Cmd::Port(PortCmd::Add { .. }) => {
            println!(
                "port {} added; attach QEMU to {}",
                cell(&result["name"]),
                cell(&result["socket"])
            )
        }
        _ => match result.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    println!("{k:<12} {}", cell(v));
                }
            }
            Some(_) => {}
            None => println!("{}", cell(result)),
        },
    }
}

/// Follow the event stream until the switch goes away.
fn monitor(sock: &PathBuf, json_out: bool) -> ExitCode {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vioctl: {}", Unreachable::Connect(sock.clone(), e));
            return ExitCode::from(2);
        }
    };
    if writeln!(s, "{}", json!({ "id": 1, "cmd": "events.subscribe" })).is_err() {
        eprintln!("vioctl: lost the connection to vioswitch");
        return ExitCode::from(2);
    }
    let mut lines = BufReader::new(s).lines();
    match lines.next() {
        Some(Ok(l)) if serde_json::from_str::<Value>(&l).is_ok_and(|v| v["ok"] == json!(true)) => {}
        Some(Ok(l)) => {
            eprintln!("vioctl: the switch refused to stream events: {l}");
            return ExitCode::from(1);
        }
        _ => {
            eprintln!("vioctl: lost the connection to vioswitch");
            return ExitCode::from(2);
        }
    }
    for line in lines {
        let Ok(line) = line else { break };
        if json_out {
            println!("{line}");
            continue;
        }
        let Ok(ev) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let mut rest: Vec<String> = ev
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| *k != "event" && *k != "time")
                    .map(|(k, v)| format!("{k}={}", cell(v)))
                    .collect()
            })
            .unwrap_or_default();
        rest.sort();
        println!(
            "{:.3}  {:<18} {}",
            ev["time"].as_f64().unwrap_or_default(),
            cell(&ev["event"]),
            rest.join(" ")
        );
    }
    eprintln!("vioctl: the switch closed the event stream");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "vioctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let sock = cli
        .run_dir
        .clone()
        .unwrap_or_else(default_run_dir)
        .join("control.sock");
    if let Cmd::Monitor = cli.cmd {
        return monitor(&sock, cli.json);
    }
    let (cmd, args) = match request(&cli.cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vioctl: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = match call(&sock, &cmd, args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vioctl: {e}");
            return ExitCode::from(2);
        }
    };
    if answer["ok"].as_bool() != Some(true) {
        if cli.json {
            println!("{answer}");
        }
        eprintln!(
            "vioctl: {} ({})",
            cell(&answer["error"]["message"]),
            cell(&answer["error"]["code"])
        );
        return ExitCode::from(1);
    }
    if cli.json {
        println!("{}", answer["result"]);
    } else {
        print_human(&cli.cmd, &answer["result"]);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The request a command line sends.
    fn req(argv: &[&str]) -> (String, Value) {
        let cli = Cli::try_parse_from(std::iter::once("vioctl").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        request(&cli.cmd).unwrap()
    }

    fn refused(argv: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("vioctl").chain(argv.iter().copied())).is_err()
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("67108864"), Ok(64 << 20));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "10X",
            "G",
            "-1",
            "1.5G",
            "10 G",
            "10GB",
            "0x10",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("10X").unwrap_err().contains("10G"));
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(5 << 40), "5 TiB");
        assert_eq!(human_size(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn disk_add_sends_only_what_is_given() {
        assert_eq!(
            req(&["disk", "add", "d0", "--path", "/img/a.raw"]),
            (
                "disk.add".into(),
                json!({ "name": "d0", "path": "/img/a.raw" })
            )
        );
        let (cmd, args) = req(&[
            "disk",
            "add",
            "d1",
            "--path",
            "/dev/vg0/d1",
            "--readonly",
            "--direct",
            "--serial",
            "SN-1",
            "--queues",
            "4",
            "--queue-size",
            "128",
            "--block-size",
            "4096",
            "--socket",
            "/s/d1.sock",
            "--mode",
            "client",
            "--worker",
            "1",
            "--owner",
            "libvirt-qemu",
            "--group",
            "kvm",
            "--perm",
            "0600",
        ]);
        assert_eq!(cmd, "disk.add");
        assert_eq!(
            args,
            json!({
                "name": "d1", "path": "/dev/vg0/d1", "readonly": true, "direct": true,
                "serial": "SN-1", "queues": 4, "queue_size": 128, "block_size": 4096,
                "socket": "/s/d1.sock", "mode": "client", "worker": 1,
                "owner": "libvirt-qemu", "group": "kvm", "perm": "0600",
            })
        );
    }

    #[test]
    fn disk_add_makes_the_path_absolute() {
        let (_, args) = req(&["disk", "add", "d0", "--path", "x.img"]);
        let want = std::env::current_dir().unwrap().join("x.img");
        assert_eq!(args["path"], json!(want));
    }

    #[test]
    fn disk_add_refuses_bad_arguments() {
        assert!(refused(&["disk", "add", "d0"]));
        assert!(refused(&[
            "disk",
            "add",
            "d0",
            "--path",
            "/x",
            "--block-size",
            "1024"
        ]));
        assert!(refused(&[
            "disk", "add", "d0", "--path", "/x", "--queues", "x"
        ]));
        assert!(refused(&[
            "disk", "add", "d0", "--path", "/x", "--mode", "both"
        ]));
        assert_eq!(
            req(&["disk", "add", "d0", "--path", "/x", "--block-size", "512"]).1["block_size"],
            json!(512)
        );
    }

    #[test]
    fn disk_resize_and_the_rest() {
        assert_eq!(
            req(&["disk", "resize", "d0", "--size", "10G", "--shrink"]),
            (
                "disk.resize".into(),
                json!({ "name": "d0", "size": 10u64 << 30, "shrink": true })
            )
        );
        assert_eq!(
            req(&["disk", "resize", "d0"]),
            ("disk.resize".into(), json!({ "name": "d0" }))
        );
        assert!(refused(&["disk", "resize", "d0", "--size", "10X"]));
        assert_eq!(req(&["disk", "list"]), ("disk.list".into(), json!({})));
        assert_eq!(
            req(&["disk", "show", "d0"]),
            ("disk.show".into(), json!({ "name": "d0" }))
        );
        assert_eq!(req(&["disk", "stats"]), ("disk.stats".into(), json!({})));
        assert_eq!(
            req(&["disk", "stats", "d0"]),
            ("disk.stats".into(), json!({ "name": "d0" }))
        );
        assert_eq!(
            req(&["disk", "del", "d0"]),
            ("disk.del".into(), json!({ "name": "d0" }))
        );
    }

    #[test]
    fn port_add_is_unchanged() {
        assert_eq!(
            req(&[
                "port", "add", "vm1", "--queues", "2", "--vlan", "10", "--mtu", "9000", "--socket",
                "/s.sock", "--mode", "server", "--worker", "0", "--perm", "0660",
            ]),
            (
                "port.add".into(),
                json!({
                    "name": "vm1", "queues": 2, "vlan": 10, "mtu": 9000, "socket": "/s.sock",
                    "mode": "server", "worker": 0, "perm": "0660",
                })
            )
        );
        assert_eq!(req(&["port", "stats"]), ("port.stats".into(), json!({})));
        assert_eq!(
            req(&["fdb", "show", "--port", "vm1"]),
            ("fdb.show".into(), json!({ "port": "vm1" }))
        );
    }

    #[test]
    fn disk_list_rows_are_readable() {
        let d = json!({ "name": "d0", "size": 64u64 << 20, "readonly": true });
        let r = disk_row(&d);
        assert_eq!(
            (r["size"].clone(), r["ro"].clone()),
            (json!("64 MiB"), json!(true))
        );
        assert_eq!(
            disk_size(&d, true),
            json!(format!("64 MiB ({} bytes)", 64u64 << 20))
        );
        let lines = table_lines(&[r], &["name", "size", "ro"]);
        assert_eq!(lines, ["NAME  SIZE    RO", "d0    64 MiB  true"]);
    }
}
