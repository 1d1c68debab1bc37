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

/// Control a running vioswitch.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
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
    /// Show the dataplane workers.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Send any command with JSON arguments, e.g. `vioctl raw port.show '{"name":"vm1"}'`.
    Raw {
        cmd: String,
        #[arg(default_value = "{}")]
        args: String,
    },
}

#[derive(Subcommand, Debug)]
enum PortCmd {
    /// Add a server-mode port; QEMU connects to its socket.
    Add {
        name: String,
        /// Socket path [default: RUN_DIR/NAME.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Queue pairs (multiqueue when > 1).
        #[arg(long)]
        queues: Option<u16>,
        /// VLAN (broadcast domain) of the port; 0 = none.
        #[arg(long)]
        vlan: Option<u16>,
        /// Worker that polls the port [default: round robin].
        #[arg(long)]
        worker: Option<usize>,
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
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// List workers with their ports and counters.
    List,
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
                queues,
                vlan,
                worker,
            } => {
                let mut a = json!({ "name": name });
                if let Some(s) = socket {
                    a["socket"] = json!(s);
                }
                if let Some(q) = queues {
                    a["queues"] = json!(q);
                }
                if let Some(v) = vlan {
                    a["vlan"] = json!(v);
                }
                if let Some(w) = worker {
                    a["worker"] = json!(w);
                }
                ("port.add", a)
            }
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
        },
        Cmd::Worker(WorkerCmd::List) => ("worker.list", json!({})),
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
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
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
        Cmd::Worker(_) => table(
            result.as_array().map(Vec::as_slice).unwrap_or_default(),
            &[
                "id", "ports", "frames", "batches", "busy_ns", "idle_ns", "wakeups",
            ],
        ),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (cmd, args) = match request(&cli.cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vioctl: {e}");
            return ExitCode::from(1);
        }
    };
    let sock = cli
        .run_dir
        .clone()
        .unwrap_or_else(default_run_dir)
        .join("control.sock");
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
