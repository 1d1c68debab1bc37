//! `vioswitch`: the switch daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

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
    /// Number of dataplane worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Create a port NAME with its socket at RUN_DIR/NAME.sock (repeatable).
    #[arg(long = "port", value_name = "NAME")]
    ports: Vec<String>,
    /// Microseconds a worker keeps polling after its last work before it sleeps.
    #[arg(long, default_value_t = 200)]
    idle_poll_us: u64,
    /// Frames a worker takes from one ring per visit.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=256))]
    batch: u16,
    /// Seconds before an unused MAC address is forgotten.
    #[arg(long, default_value_t = 300)]
    fdb_ageing: u64,
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
    let mut cfg = SwitchConfig::new(run_dir.clone());
    cfg.workers = args.workers;
    cfg.worker.idle_poll = Duration::from_micros(args.idle_poll_us);
    cfg.worker.batch = args.batch;
    cfg.ageing = Duration::from_secs(args.fdb_ageing);
    let sw = Switch::start(cfg)?;
    for name in &args.ports {
        sw.add_default_port(name)?;
    }
    let control_path = run_dir.join("control.sock");
    let control = ControlServer::start(sw.clone(), &control_path)?;
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
