//! Measure the CPU a switch uses while idle: a switch with connected guests
//! that send nothing, then the same after a burst of traffic (so that the
//! workers have polled and must fall back to sleeping).
//!
//! `cargo run --release -p vioswitch-bench --bin idle_cpu -- [--ports N] [--seconds S]`
//!
//! CPU is read from /proc/PID/stat (utime + stime of all the daemon's threads).

use std::time::{Duration, Instant};

use clap::Parser;
use vioswitch_testkit::guest::{eth_frame, NetGuest, NetGuestConfig};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

#[derive(Parser)]
struct Args {
    /// Connected ports.
    #[arg(long, default_value_t = 8)]
    ports: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// vioswitch binary [default: target/release/vioswitch].
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
}

/// CPU seconds used by `pid` so far (all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: find the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn measure(pid: u32, secs: u64) -> f64 {
    let c0 = cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    100.0 * (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let binary = args.binary.unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vioswitch")
    });
    let mut sw = SwitchProcess::spawn(SwitchOptions {
        binary: Some(binary),
        ..SwitchOptions::default()
    })?;
    let pid = sw.pid();
    println!(
        "vioswitch pid {pid}: {} ports, {} s windows",
        args.ports, args.seconds
    );
    println!(
        "no guest:           {:6.2} % of one core",
        measure(pid, args.seconds)
    );
    let mut guests = Vec::new();
    for i in 0..args.ports {
        let sock = sw.add_port(&format!("p{i}"))?;
        guests.push(NetGuest::connect(&sock, NetGuestConfig::default())?);
    }
    println!(
        "{} idle guests:    {:6.2} % of one core",
        args.ports,
        measure(pid, args.seconds)
    );
    // A burst through every port, then idle again.
    let frame = eth_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], 0x0800, &[0u8; 46]);
    for _ in 0..100 {
        for g in guests.iter_mut() {
            g.send_burst(&[frame.as_slice(); 8]);
            g.reclaim_tx();
            while g.try_recv().is_some() {}
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    for g in guests.iter_mut() {
        while g.try_recv().is_some() {}
    }
    println!(
        "idle after traffic: {:6.2} % of one core",
        measure(pid, args.seconds)
    );
    Ok(())
}
