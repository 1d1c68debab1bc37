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

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Control a running vioswitch: add, change and remove ports, look at
/// counters, the MAC table and the workers, save the configuration, and
/// follow events.
///
/// Examples:
///   vioctl port add vm1                     # QEMU connects to RUN_DIR/vm1.sock
///   vioctl port add vm2 --mode client --socket /var/run/qemu/vm2.sock
///   vioctl port set vm1 --vlan 10
///   vioctl port stats vm1
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
    /// Show or flush the MAC learning table.
    #[command(subcommand)]
    Fdb(FdbCmd),
    /// Show the dataplane workers and move ports between them.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Show or save the running configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the switch's events (ports added, connected, broken, ...) as they happen.
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
        /// Socket path [default: RUN_DIR/NAME.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Who listens on the socket.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Queue pairs (multiqueue when > 1).
        #[arg(long)]
        queues: Option<u16>,
        /// VLAN (broadcast domain) of the port; 0 = none.
        #[arg(long)]
        vlan: Option<u16>,
        /// MTU: larger frames are dropped [default: no limit but the switch's 16 KiB frames].
        #[arg(long)]
        mtu: Option<u16>,
        /// Worker that polls the port [default: round robin].
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
    /// List workers with their ports and counters.
    List,
    /// Move a port to another worker without disturbing its guest.
    Move { port: String, worker: usize },
    /// Spread the ports evenly over the workers.
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
                socket,
                mode,
                queues,
                vlan,
                mtu,
                worker,
                owner,
                group,
                perm,
            } => (
                "port.add",
                with_opts(
                    json!({ "name": name }),
                    &[
                        ("socket", socket.as_ref().map(|v| json!(v))),
                        ("mode", mode.map(|m| json!(m.as_str()))),
                        ("queues", queues.map(|v| json!(v))),
                        ("vlan", vlan.map(|v| json!(v))),
                        ("mtu", mtu.map(|v| json!(v))),
                        ("worker", worker.map(|v| json!(v))),
                        ("owner", owner.as_ref().map(|v| json!(v))),
                        ("group", group.as_ref().map(|v| json!(v))),
                        ("perm", perm.as_ref().map(|v| json!(v))),
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
            PortCmd::Stats { name } => match name {
                Some(n) => ("port.stats", json!({ "name": n })),
                None => ("port.stats", json!({})),
            },
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

fn opt_port(port: &Option<String>) -> Value {
    match port {
        Some(p) => json!({ "port": p }),
        None => json!({}),
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

/// Print rows of objects as an aligned table with the given columns.
fn table(rows: &[Value], cols: &[&str]) {
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
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for row in cells {
        line(row);
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

fn print_human(cmd: &Cmd, result: &Value) {
    match cmd {
        Cmd::Port(PortCmd::List) => table(
            result.as_array().map(Vec::as_slice).unwrap_or_default(),
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
        Cmd::Port(PortCmd::Stats { name: Some(n) }) => print_stats(n, result),
        Cmd::Port(PortCmd::Stats { name: None }) => {
            if let Some(m) = result.as_object() {
                for (n, s) in m {
                    print_stats(n, s);
                }
            }
        }
        Cmd::Port(PortCmd::Show { name }) => {
            if let Some(m) = result.as_object() {
                for (k, v) in m.iter().filter(|(k, _)| *k != "stats") {
                    println!("{k:<12} {}", cell(v));
                }
            }
            print_stats(&format!("{name} counters"), &result["stats"]);
        }
        Cmd::Fdb(FdbCmd::Show { .. }) => table(
            result.as_array().map(Vec::as_slice).unwrap_or_default(),
            &["mac", "vlan", "port", "age_s", "static"],
        ),
        Cmd::Worker(WorkerCmd::List) => table(
            result.as_array().map(Vec::as_slice).unwrap_or_default(),
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
