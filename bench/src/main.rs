//! vioswitch-bench: port-to-port throughput and latency of vioswitch against
//! DPDK testpmd (vhost PMD, io forwarding) under the same traffic generator,
//! plus the generator alone into a sink. See bench/RESULTS.md.

mod dut;
mod gen;
mod hist;
mod run_control;
mod sysstat;

pub use run_control::{install_signals, pin_current_thread, stopped, STOP};

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig};

use dut::{DutCounters, PmdMode, SwitchDut, TestPmd};
use gen::{Generator, Phase};
use hist::Hist;
use sysstat::{CpuSnap, Interference};

/// Throughput and latency of vioswitch vs DPDK testpmd, same generator.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Ports (even): port 2k sends to port 2k+1.
    #[arg(long, default_value_t = 2)]
    ports: usize,
    /// Ethernet frame sizes in bytes, FCS included (RFC 2544 style: the
    /// virtio buffer carries size - 4 bytes).
    #[arg(long, value_delimiter = ',', default_value = "64,1518")]
    sizes: Vec<usize>,
    /// Seconds of the measurement window (per size and device).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of full load before the window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Core of the device under test (vioswitch or testpmd).
    #[arg(long, default_value_t = 1)]
    dut_core: usize,
    /// Core of the generator (this process).
    #[arg(long, default_value_t = 0)]
    gen_core: usize,
    /// The vioswitch binary [default: <workspace>/target/release/vioswitch].
    #[arg(long)]
    vioswitch: Option<PathBuf>,
    /// Extra vioswitch arguments, e.g. --switch-arg=--batch=64.
    #[arg(long = "switch-arg", allow_hyphen_values = true)]
    switch_args: Vec<String>,
    /// The testpmd binary.
    #[arg(long, default_value = "dpdk-testpmd")]
    testpmd: String,
    /// Devices to run: any of vioswitch, testpmd, sink.
    #[arg(long, value_delimiter = ',', default_value = "vioswitch,testpmd,sink")]
    only: Vec<String>,
    /// Entries per guest virtqueue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Under load, timestamp one data frame in this many.
    #[arg(long, default_value_t = 32)]
    lat_every: u64,
    /// Rate of the paced latency phase in Mpps (0: skip it).
    #[arg(long, default_value_t = 1.0)]
    pace_mpps: f64,
    /// Seconds of the paced latency phase.
    #[arg(long, default_value_t = 2.0)]
    pace_duration: f64,
    /// Frames of the unloaded (ping-pong) latency phase (0: skip it).
    #[arg(long, default_value_t = 20000)]
    pingpong: u64,
    /// Record `perf record -g` of the device under test during the window
    /// into this directory (perturbs the figures a little).
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Runs per size and device (interleaved); tables show the median run.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Switch,
    Pmd,
    Sink,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Switch => "vioswitch",
            Kind::Pmd => "testpmd io",
            Kind::Sink => "sink (testpmd rxonly)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Kind::Switch => "vioswitch",
            Kind::Pmd => "testpmd",
            Kind::Sink => "sink",
        }
    }
}

struct CaseResult {
    size: usize,
    kind: Kind,
    window: Phase,
    sat: Hist,
    paced: Option<(Phase, Hist)>,
    pingpong: Hist,
    pingpong_lost: u64,
    sent: u64,
    recv: u64,
    foreign: u64,
    counters: DutCounters,
    cmdline: String,
    interference: Interference,
}

impl CaseResult {
    /// The headline rate: delivered frames/s (the sink: frames/s it took).
    fn pps(&self) -> f64 {
        if self.kind == Kind::Sink {
            self.window.tx_pps()
        } else {
            self.window.rx_pps()
        }
    }
}

fn default_vioswitch() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release/vioswitch")
}

fn guest_config(args: &Args) -> NetGuestConfig {
    let qs = args.queue_size as usize;
    NetGuestConfig {
        queue_size: args.queue_size,
        mem_size: (32 << 20).max(qs * (9728 + 2048) + (8 << 20)),
        ..Default::default()
    }
}

fn connect_all(sockets: &[PathBuf], cfg: &NetGuestConfig) -> Result<Vec<NetGuest>, String> {
    sockets
        .iter()
        .map(|s| {
            NetGuest::connect(s, cfg.clone()).map_err(|e| format!("connect {}: {e}", s.display()))
        })
        .collect()
}

/// `perf record` of `pid` for `secs`, when asked for.
fn start_perf(args: &Args, pid: u32, name: &str, secs: f64) -> Option<Child> {
    let dir = args.perf_dir.as_ref()?;
    let _ = std::fs::create_dir_all(dir);
    let out = dir.join(format!("{name}.perf.data"));
    Command::new("perf")
        .args(["record", "-g", "-F", "999", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string(), "--", "sleep", &format!("{secs}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("perf: {e}"))
        .ok()
}

fn run_case(
    args: &Args,
    size: usize,
    kind: Kind,
    work: &std::path::Path,
) -> Result<CaseResult, String> {
    let frame_len = size - 4;
    let cfg = guest_config(args);
    let nports = if kind == Kind::Sink { 1 } else { args.ports };
    eprintln!("== {} B, {}", size, kind.name());

    enum Dut {
        Switch(SwitchDut),
        Pmd(TestPmd),
    }
    let mut dut = match kind {
        Kind::Switch => Dut::Switch(SwitchDut::start(
            &args.vioswitch.clone().unwrap_or_else(default_vioswitch),
            nports,
            args.dut_core,
            args.gen_core,
            &args.switch_args,
        )?),
        Kind::Pmd | Kind::Sink => Dut::Pmd(TestPmd::start(
            &args.testpmd,
            nports,
            if kind == Kind::Sink {
                PmdMode::RxOnly
            } else {
                PmdMode::Io
            },
            args.dut_core,
            work,
        )?),
    };
    let (sockets, pid, cmdline) = match &dut {
        Dut::Switch(s) => (s.sockets().to_vec(), s.pid(), String::new()),
        Dut::Pmd(p) => (p.sockets().to_vec(), p.pid(), p.cmdline.clone()),
    };
    let guests = connect_all(&sockets, &cfg)?;
    let mut g = Generator::new(guests, frame_len, args.lat_every, kind == Kind::Sink);

    let mut pingpong = Hist::default();
    let mut pingpong_lost = 0;
    let mut paced = None;
    if kind != Kind::Sink {
        let t = g.learn(Duration::from_secs(15))?;
        eprintln!("   path up after {t:.1?}");
        if args.pingpong > 0 {
            pingpong_lost = g.ping_pong(args.pingpong, Duration::from_secs(5), &mut pingpong);
        }
        if args.pace_mpps > 0.0 {
            let mut h = Hist::default();
            let ph = g.load(
                Duration::from_secs_f64(args.pace_duration),
                Some(args.pace_mpps * 1e6),
                Some(&mut h),
            );
            paced = Some((ph, h));
        }
    }
    let _ = g.load(Duration::from_secs_f64(args.warmup), None, None);
    let perf = start_perf(args, pid, &format!("{}-{size}", kind.key()), args.duration);
    let mut sat = Hist::default();
    let before = CpuSnap::take(pid);
    let window = g.load(Duration::from_secs_f64(args.duration), None, Some(&mut sat));
    let interference = before.until(&CpuSnap::take(pid));
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    g.drain(Duration::from_secs(2));
    if stopped() {
        return Err("interrupted".into());
    }
    let counters = match &mut dut {
        Dut::Switch(s) => s.counters()?,
        Dut::Pmd(p) => p.finish()?,
    };
    let (sent, recv, foreign) = (g.total_sent, g.total_recv, g.foreign);
    drop(g.into_guests());
    drop(dut);
    let r = CaseResult {
        size,
        kind,
        window,
        sat,
        paced,
        pingpong,
        pingpong_lost,
        sent,
        recv,
        foreign,
        counters,
        cmdline,
        interference,
    };
    eprintln!(
        "   {:.3} Mpps delivered, {:.3} Mpps sent, ring full {:.0}% of bursts, steal {:.1}%, other processes {:.1}%",
        r.window.rx_pps() / 1e6,
        r.window.tx_pps() / 1e6,
        r.window.full_pct(),
        r.interference.steal_pct,
        r.interference.other_pct,
    );
    Ok(r)
}

fn us(v: Option<u64>) -> String {
    v.map_or("-".into(), |ns| format!("{:.1}", ns as f64 / 1000.0))
}

fn lat(h: &Hist) -> String {
    format!("{} / {}", us(h.percentile(50.0)), us(h.percentile(99.0)))
}

/// Runs that lost more than this share of both cores' time to the
/// hypervisor (steal) or to other processes are left out of the medians
/// when the same size and device has quieter runs.
const BUSY_PCT: f64 = 5.0;

/// The median run (by headline rate) of each (size, device), over its runs
/// without interference from other processes (all its runs if none is
/// quiet): (median run, min, max, which runs were counted).
fn medians(results: &[CaseResult]) -> Vec<(&CaseResult, f64, f64, String)> {
    let mut out: Vec<(&CaseResult, f64, f64, String)> = Vec::new();
    for r in results {
        if out
            .iter()
            .any(|(o, ..)| o.size == r.size && o.kind == r.kind)
        {
            continue;
        }
        let all: Vec<&CaseResult> = results
            .iter()
            .filter(|o| o.size == r.size && o.kind == r.kind)
            .collect();
        let quiet: Vec<&CaseResult> = all
            .iter()
            .copied()
            .filter(|o| o.interference.steal_pct + o.interference.other_pct < BUSY_PCT)
            .collect();
        let counted = if quiet.is_empty() {
            format!("{} runs, none quiet", all.len())
        } else {
            format!("{} quiet of {}", quiet.len(), all.len())
        };
        let mut runs = if quiet.is_empty() { all.clone() } else { quiet };
        runs.sort_by(|a, b| a.pps().total_cmp(&b.pps()));
        let (lo, hi) = (runs[0].pps(), runs[runs.len() - 1].pps());
        out.push((runs[(runs.len() - 1) / 2], lo, hi, counted));
    }
    out.sort_by_key(|(r, ..)| r.size);
    out
}

fn print_tables(results: &[CaseResult]) {
    let med = medians(results);
    println!();
    println!("Throughput, median run of each size and device (runs that lost over {BUSY_PCT}% of the CPU to steal or");
    println!("other processes left out when quieter runs exist; Mpps delivered to the receiving guest in the window;");
    println!("Gbit/s = frame bits incl. 4 B FCS, no preamble/IFG; \"L1\" adds 20 B/frame):");
    println!();
    println!("| size B | device | Mpps | min–max (runs) | Gbit/s | Gbit/s L1 | ratio vs testpmd | ring-full bursts | sent (gen) | received (gen) | lost (gen) | device drops |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (r, lo, hi, counted) in &med {
        let (r, lo, hi) = (*r, *lo, *hi);
        let pps = r.pps();
        let ratio = if r.kind == Kind::Switch {
            med.iter()
                .find(|(o, ..)| o.size == r.size && o.kind == Kind::Pmd)
                .map_or("-".into(), |(o, ..)| format!("{:.2}", pps / o.pps()))
        } else {
            "-".into()
        };
        let lost = if r.kind == Kind::Sink {
            "-".into()
        } else {
            (r.sent as i64 - r.recv as i64).to_string()
        };
        let drops = if r.counters.detail.is_empty() {
            r.counters.dropped.to_string()
        } else {
            format!("{} ({})", r.counters.dropped, r.counters.detail)
        };
        println!(
            "| {} | {} | {:.3} | {:.2}–{:.2} ({counted}) | {:.2} | {:.2} | {} | {:.0}% | {} | {} | {} | {} |",
            r.size,
            r.kind.name(),
            pps / 1e6,
            lo / 1e6,
            hi / 1e6,
            pps * (r.size * 8) as f64 / 1e9,
            pps * ((r.size + 20) * 8) as f64 / 1e9,
            ratio,
            r.window.full_pct(),
            r.sent,
            if r.kind == Kind::Sink {
                format!("({} taken by sink)", r.counters.rx)
            } else {
                r.recv.to_string()
            },
            lost,
            drops
        );
    }
    println!();
    println!("Latency p50 / p99 in µs (generator send to generator receive), same median runs:");
    println!();
    println!(
        "| size B | device | unloaded (ping-pong) | paced | saturated | samples (pp/paced/sat) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for &(r, ..) in med.iter().filter(|(r, ..)| r.kind != Kind::Sink) {
        let (paced, pn, rate) = match &r.paced {
            Some((ph, h)) => (
                lat(h),
                h.count(),
                format!(" @ {:.2} Mpps", ph.rx_pps() / 1e6),
            ),
            None => ("-".into(), 0, String::new()),
        };
        println!(
            "| {} | {} | {}{} | {}{} | {} | {}/{}/{} |",
            r.size,
            r.kind.name(),
            lat(&r.pingpong),
            if r.pingpong_lost > 0 {
                format!(" ({} lost)", r.pingpong_lost)
            } else {
                String::new()
            },
            paced,
            rate,
            lat(&r.sat),
            r.pingpong.count(),
            pn,
            r.sat.count()
        );
    }
    println!();
    println!(
        "Every run, in order (steal and other processes in % of both cores during the window):"
    );
    println!();
    println!("| # | size B | device | Mpps | ring-full bursts | steal | other processes |");
    println!("|---:|---:|---|---:|---:|---:|---:|");
    for (i, r) in results.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.3} | {:.0}% | {:.1}% | {:.1}% |",
            i + 1,
            r.size,
            r.kind.name(),
            r.pps() / 1e6,
            r.window.full_pct(),
            r.interference.steal_pct,
            r.interference.other_pct
        );
    }
    for r in results {
        if r.foreign > 0 {
            println!(
                "\nnote: {} B {}: {} non-benchmark frames received (flooded learning frames)",
                r.size,
                r.kind.name(),
                r.foreign
            );
        }
    }
    if let Some(r) = results.iter().find(|r| !r.cmdline.is_empty()) {
        println!("\ntestpmd: {}", r.cmdline);
    }
}

fn to_json(args: &Args, results: &[CaseResult]) -> serde_json::Value {
    let h = |h: &Hist| json!({"samples": h.count(), "p50_ns": h.percentile(50.0), "p99_ns": h.percentile(99.0)});
    json!({
        "args": format!("{args:?}"),
        "results": results.iter().map(|r| json!({
            "size": r.size,
            "device": r.kind.key(),
            "window_s": r.window.elapsed.as_secs_f64(),
            "delivered_pps": r.window.rx_pps(),
            "sent_pps": r.window.tx_pps(),
            "ring_full_pct": r.window.full_pct(),
            "sent": r.sent,
            "received": r.recv,
            "foreign": r.foreign,
            "device": {"rx": r.counters.rx, "tx": r.counters.tx, "dropped": r.counters.dropped, "detail": r.counters.detail},
            "latency": {
                "pingpong": h(&r.pingpong),
                "pingpong_lost": r.pingpong_lost,
                "paced": r.paced.as_ref().map(|(p, x)| json!({"pps": p.rx_pps(), "hist": h(x)})),
                "saturated": h(&r.sat),
            },
            "cmdline": r.cmdline,
            "steal_pct": r.interference.steal_pct,
            "other_pct": r.interference.other_pct,
        })).collect::<Vec<_>>(),
    })
}

fn run(args: Args) -> Result<(), String> {
    if args.ports == 0 || args.ports % 2 != 0 {
        return Err("--ports must be even (port 2k sends to port 2k+1)".into());
    }
    for &s in &args.sizes {
        if !(gen::MIN_FRAME + 4..=9000).contains(&s) {
            return Err(format!("frame size {s} out of 64..=9000"));
        }
    }
    let kinds: Vec<Kind> = [Kind::Switch, Kind::Pmd, Kind::Sink]
        .into_iter()
        .filter(|k| args.only.iter().any(|o| o == k.key()))
        .collect();
    install_signals()?;
    pin_current_thread(args.gen_core)?;
    let work = vioswitch_testkit::temp_dir("vioswitch-bench").map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut results = Vec::new();
    let mut err = None;
    'outer: for &size in &args.sizes {
        for _ in 0..args.repeat.max(1) {
            for &k in &kinds {
                match run_case(&args, size, k, &work) {
                    Ok(r) => results.push(r),
                    Err(e) => {
                        err = Some(format!("{size} B {}: {e}", k.name()));
                        break 'outer;
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    print_tables(&results);
    println!("\n(total {:.0?})", t0.elapsed());
    if let Some(p) = &args.json {
        let text =
            serde_json::to_string_pretty(&to_json(&args, &results)).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vioswitch-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
