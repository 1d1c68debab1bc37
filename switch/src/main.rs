//! `vioswitch`: the switch daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use vioswitch::config::SwitchState;
use vioswitch::control::ControlServer;
use vioswitch::daemon::{default_run_dir, Switch, SwitchConfig};

/// A userspace virtual switch: serves virtio-net ports to QEMU guests over
/// vhost-user and switches their frames with a polling L2 dataplane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory for the control socket, port sockets and the pid file
    /// [default: /run/vioswitch for root, else $XDG_RUNTIME_DIR/vioswitch]
    #[arg(long, env = "VIOSWITCH_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Number of dataplane worker threads [default: as saved, else 1].
    #[arg(long)]
    workers: Option<usize>,
    /// CPUs of the polling workers, e.g. `2,3` (worker i on the i-th,
    /// round robin); the switch's other threads keep off them. Default:
    /// anywhere (the scheduler's choice).
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    worker_cpus: Vec<usize>,
    /// Start-up configuration (TOML: workers, fdb_ageing_s, [[port]] and
    /// [[fdb_static]] tables), used when the run directory holds no saved
    /// state; `vioctl config show --toml` prints one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Let members of GROUP use the control socket (mode 0660) besides root
    /// and the daemon's own user.
    #[arg(long, value_name = "GROUP")]
    control_group: Option<String>,
    /// Create a port NAME with its socket at RUN_DIR/NAME.sock (repeatable).
    #[arg(long = "port", value_name = "NAME")]
    ports: Vec<String>,
    /// Microseconds a worker keeps polling after its last work before it sleeps.
    #[arg(long, default_value_t = 200)]
    idle_poll_us: u64,
    /// Frames a worker takes from one ring per visit.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=64))]
    batch: u16,
    /// Seconds before an unused MAC address is forgotten [default: as saved, else 300].
    #[arg(long)]
    fdb_ageing: Option<u64>,
    /// Disk I/O engine: auto (io_uring if the kernel allows it, else a
    /// thread pool), uring, or threads.
    #[arg(long, default_value = "auto", value_name = "ENGINE")]
    io_engine: vioswitch::io_engine::EngineKind,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Block the termination signals before any thread starts, so that every
    // thread inherits the mask and only the main thread receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block()?;

    let run_dir = args.run_dir.unwrap_or_else(default_run_dir);
    let group = match &args.control_group {
        Some(g) => Some(resolve_group(g)?),
        None => None,
    };
    let mut cfg = SwitchConfig::new(run_dir.clone());
    cfg.workers = args.workers;
    cfg.worker_cpus = args.worker_cpus;
    cfg.worker.idle_poll = Duration::from_micros(args.idle_poll_us);
    cfg.worker.batch = args.batch;
    cfg.worker.io_engine = args.io_engine;
    cfg.ageing = args.fdb_ageing.map(Duration::from_secs);
    if let Some(path) = &args.config {
        cfg.initial = Some(SwitchState::load_toml(path)?);
    }
    let sw = Switch::start(cfg)?;
    for name in &args.ports {
        if sw.ports().get(name).is_err() {
            sw.add_default_port(name)?;
        }
    }
    sw.save()?;
    let control_path = run_dir.join("control.sock");
    let control = ControlServer::start(sw.clone(), &control_path, group)?;
    log::info!(
        "vioswitch {} running: {} worker(s), control socket {}",
        env!("CARGO_PKG_VERSION"),
        sw.dataplane().worker_count(),
        control_path.display()
    );
    let sig = signals.wait()?;
    log::info!("{sig:?}: shutting down");
    drop(control);
    sw.shutdown();
    Ok(())
}

/// A group name or number.
fn resolve_group(g: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(grp)) => Ok(grp.gid),
        _ => Err(format!("no group {g:?} on this host (--control-group)")),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("vioswitch: {e}");
            ExitCode::FAILURE
        }
    }
}
