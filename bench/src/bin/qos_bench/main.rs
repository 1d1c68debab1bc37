//! qos_bench: how well vioswitch's per-port QoS holds its settings, and
//! what it costs. See bench/RESULTS.md, section "QoS".
//!
//! `cargo run --release -p vioswitch-bench --bin qos_bench -- [options]`
//!
//! Every line starts a fresh vioswitch (one worker) pinned to the switch
//! core, connects the project's guest drivers from this process on the
//! generator core, sets the QoS over the control socket (`qos.set`),
//! floods for a warm-up, then measures in 1 s windows:
//!
//! - `rate`: one flow p0 -> p1 of `--size` frames, limited by ingress
//!   shaping on p0, egress shaping on p1, or policing; the achieved rate
//!   (frame bytes delivered to p1's guest, no FCS: what the meters count)
//!   against the configured one, whole measurement and worst window. The
//!   sweep runs by decades from 1 Mbit/s up to the unshaped maximum,
//!   measured first, plus one point at 80% of it.
//! - `fair`: equal weights, Jain's index over `--flows` flows contending
//!   for the one worker (pN -> pN+flows), and over the same number of
//!   sources sending to one egress-shaped destination.
//! - `weights`: the same two cases with unequal weights (`--weights`); the
//!   achieved rate ratios against the configured ones.
//! - `cost`: one flow p0 -> p1 with no limit binding, without QoS and with
//!   QoS on both ports (ingress and egress shaping far above the reachable
//!   rate, and a weight), interleaved, median of `--repeat`.
//! - `disk`: 4 KiB random reads kept `--depth` deep on a page-cached image;
//!   the IOPS limit against the achieved IOPS, by decades from 100 up to
//!   the unlimited maximum, plus 80% of it.
//!
//! A line during which other processes or the hypervisor took more than
//! 5% of the machine's CPU is run again (`--retries`); the tables say how
//! busy the machine was.

#[path = "../../rig_args.rs"]
mod rig_args;
#[path = "../../run_control.rs"]
mod run_control;
#[path = "../../sysstat.rs"]
mod sysstat;

pub use run_control::{install_signals, pin_current_thread, stopped};

mod disk;
mod metrics;
mod net;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rig_args::RigArgs;
use serde_json::{json, Value};
use vioswitch_testkit::guest::GuestError;
use vioswitch_testkit::switch::{HarnessError, SwitchOptions, SwitchProcess};

use disk::DiskRig;
use metrics::{error_pct, jain, median, rate_errors, ratio_errors};
use net::{Flow, NetRig, Window};
use sysstat::{CpuSnap, Interference};

/// Errors of the QoS benchmark.
#[derive(Debug, thiserror::Error)]
pub enum QosBenchError {
    #[error("vioswitch {what}: {source}")]
    Switch { what: String, source: HarnessError },
    #[error("guest {what}: {source}")]
    Guest { what: String, source: GuestError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("interrupted")]
    Interrupted,
}

impl QosBenchError {
    /// A failed call to the switch.
    pub fn switch(what: &str, source: HarnessError) -> QosBenchError {
        QosBenchError::Switch {
            what: what.to_string(),
            source,
        }
    }
}

/// A vioswitch with one worker, killed and its run directory removed when
/// dropped.
pub struct Daemon(pub SwitchProcess);

impl Daemon {
    /// Start `binary` pinned to `core`; this thread goes back to `home`.
    pub fn start(binary: &Path, core: usize, home: usize) -> Result<Daemon, QosBenchError> {
        // The child inherits the affinity of the thread that forks it.
        pin_current_thread(core).map_err(QosBenchError::Setup)?;
        let spawned = SwitchProcess::spawn(SwitchOptions {
            workers: 1,
            extra_args: Vec::new(),
            binary: Some(binary.to_path_buf()),
        });
        pin_current_thread(home).map_err(QosBenchError::Setup)?;
        spawned
            .map(Daemon)
            .map_err(|e| QosBenchError::switch("start", e))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.0.kill();
        let _ = std::fs::remove_dir_all(self.0.run_dir());
    }
}

/// The measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Rate,
    Fair,
    Weights,
    Cost,
    Disk,
}

/// How the rate lines limit the flow p0 -> p1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Lossless shaping of what p0's guest sends.
    IngressShape,
    /// Shaping (queue, then drop) of what p1's guest receives.
    EgressShape,
    /// Policing (drop) of what p0's guest sends.
    IngressPolice,
    /// Policing of what p1's guest receives.
    EgressPolice,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::IngressShape => "ingress shape",
            Mode::EgressShape => "egress shape",
            Mode::IngressPolice => "ingress police",
            Mode::EgressPolice => "egress police",
        }
    }

    /// The port limited (p0 or p1) and its `qos.set` fields at `bps`.
    fn spec(self, bps: u64) -> (usize, Value) {
        let (port, dir, mode) = match self {
            Mode::IngressShape => (0, "ingress", "shape"),
            Mode::EgressShape => (1, "egress", "shape"),
            Mode::IngressPolice => (0, "ingress", "police"),
            Mode::EgressPolice => (1, "egress", "police"),
        };
        (port, json!({ dir: { "mode": mode, "rate": bps } }))
    }
}

/// A part of QoS the cost lines enable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CostPart {
    Ingress,
    Egress,
    Weight,
}

/// QoS accuracy, fairness and overhead of vioswitch's per-port QoS.
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    /// Measurements to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rate,fair,weights,cost,disk"
    )]
    only: Vec<Part>,
    /// Seconds measured per line (1 s windows).
    #[arg(long, default_value_t = 5)]
    duration: usize,
    /// Seconds of load before the windows (bursts drain, queues fill).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Frame size of the rate lines in bytes, FCS included.
    #[arg(long, default_value_t = 1518)]
    size: usize,
    /// How the rate lines are limited.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ingress-shape,egress-shape,ingress-police"
    )]
    modes: Vec<Mode>,
    /// Rates of the rate lines in bit/s [default: decades from 1 Mbit/s
    /// below the unshaped maximum, and 80% of it].
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
    /// Flows of the fairness and weights lines.
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Weight sets of the weights lines, e.g. 1:2:3,1:3.
    #[arg(long, value_delimiter = ',', default_value = "1:2:3,1:3")]
    weights: Vec<String>,
    /// Frame size of the fairness and weights lines (small frames make the
    /// worker the bottleneck).
    #[arg(long, default_value_t = 64)]
    fair_size: usize,
    /// Entries per guest virtqueue of the fairness and weights lines: a
    /// ring must hold more than a visit's budget (weight x 64 KiB).
    #[arg(long, default_value_t = 4096)]
    fair_queue_size: u16,
    /// Egress shaping rate of the shared destination, bit/s.
    #[arg(long, default_value_t = 100_000_000)]
    dest_rate: u64,
    /// Frame sizes of the cost lines.
    #[arg(long, value_delimiter = ',', default_value = "64,1518")]
    cost_sizes: Vec<usize>,
    /// Runs of each cost line (interleaved without / with QoS).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// What the cost lines enable: `ingress` (p0 shaped), `egress` (p1
    /// shaped), `weight` (weight 1 on both); all three by default.
    #[arg(long, value_delimiter = ',', default_value = "ingress,egress,weight")]
    cost_qos: Vec<CostPart>,
    /// Entries per guest virtqueue of the rate and cost lines.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// IOPS limits of the disk lines [default: decades from 100 below the
    /// unlimited maximum, and 80% of it].
    #[arg(long, value_delimiter = ',')]
    iops: Vec<u64>,
    /// Disk requests kept in flight.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    #[command(flatten)]
    rig: RigArgs,
}

/// Share of the machine's CPU above which a line is not quiet.
const BUSY_PCT: f64 = 5.0;
/// The measurement window.
const WINDOW: Duration = Duration::from_secs(1);

/// What one run of a line measured.
struct Measured<T> {
    value: T,
    cpu: Interference,
    /// Runs it took to get a quiet one (or the last, none quiet).
    tries: usize,
}

impl<T> Measured<T> {
    fn busy_pct(&self) -> f64 {
        self.cpu.steal_pct + self.cpu.other_pct
    }

    /// "0.3%" or "7.1% (busy)".
    fn busy(&self) -> String {
        let b = self.busy_pct();
        let tries = if self.tries > 1 {
            format!(", try {}", self.tries)
        } else {
            String::new()
        };
        if b < BUSY_PCT {
            format!("{b:.1}%{tries}")
        } else {
            format!("{b:.1}% (busy{tries})")
        }
    }

    fn cpu_json(&self) -> Value {
        json!({"steal_pct": self.cpu.steal_pct, "other_pct": self.cpu.other_pct, "tries": self.tries})
    }
}

struct Bench {
    args: Args,
    binary: PathBuf,
    json: Vec<Value>,
}

impl Bench {
    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.args.warmup)
    }

    /// Run `f` (which returns its value and the switch's pid range of CPU
    /// snapshots) until a quiet run or out of retries.
    fn quiet<T>(
        &self,
        mut f: impl FnMut() -> Result<(T, Interference), QosBenchError>,
    ) -> Result<Measured<T>, QosBenchError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (value, cpu) = f()?;
            let m = Measured { value, cpu, tries };
            if m.busy_pct() < BUSY_PCT || tries > self.args.rig.retries {
                return Ok(m);
            }
            eprintln!("   busy ({:.1}% of the CPU to others): again", m.busy_pct());
        }
    }

    /// Start a rig of `ports` ports with `flows`, set `specs` (port, spec),
    /// and measure.
    fn net_line(
        &self,
        ports: usize,
        flows: &[Flow],
        size: usize,
        queue_size: u16,
        specs: &[(usize, Value)],
    ) -> Result<(Vec<Window>, Interference, Vec<Value>), QosBenchError> {
        let a = &self.args;
        let mut rig = NetRig::start(
            &self.binary,
            ports,
            flows,
            size,
            queue_size,
            a.rig.dut_core,
            a.rig.gen_core,
        )?;
        for (p, s) in specs {
            rig.set_qos(*p, s)?;
        }
        let before = CpuSnap::take(rig.pid());
        let windows = rig.run(self.warmup(), WINDOW, a.duration)?;
        let cpu = before.until(&CpuSnap::take(rig.pid()));
        let mut stats = Vec::new();
        for p in 0..ports {
            let s = rig.port_stats(p)?;
            stats.push(json!({"port": p, "qos": s.get("qos"), "drops": s.get("drops")}));
        }
        if rig.foreign > 0 {
            eprintln!("   {} frames not of a flow", rig.foreign);
        }
        Ok((windows, cpu, stats))
    }

    /// Unshaped rate of one flow p0 -> p1 of `size` frames, bit/s and
    /// frames/s, over `windows`.
    fn unshaped(
        &self,
        size: usize,
        specs: &[(usize, Value)],
    ) -> Result<Measured<(f64, f64)>, QosBenchError> {
        let flows = [Flow { src: 0, dst: 1 }];
        self.quiet(|| {
            let (w, cpu, _) = self.net_line(2, &flows, size, self.args.queue_size, specs)?;
            let secs: f64 = w.iter().map(|w| w.secs).sum();
            let bytes: u64 = w.iter().map(|w| w.bytes[0]).sum();
            let frames: u64 = w.iter().map(|w| w.frames[0]).sum();
            Ok(((bytes as f64 * 8.0 / secs, frames as f64 / secs), cpu))
        })
    }

    fn rate(&mut self) -> Result<(), QosBenchError> {
        let size = self.args.size;
        eprintln!("== rate: unshaped maximum, {size} B");
        let max = self.unshaped(size, &[])?;
        let max_bps = max.value.0;
        eprintln!("   {:.3} Gbit/s ({})", max_bps / 1e9, max.busy());
        let rates = if self.args.rates.is_empty() {
            sweep(1_000_000, max_bps)
        } else {
            self.args.rates.clone()
        };
        println!("\n### Rate accuracy ({size} B frames, one flow p0 -> p1, {} x 1 s windows after {} s warm-up)\n", self.args.duration, self.args.warmup);
        println!(
            "Unshaped maximum: {:.3} Gbit/s ({:.3} Mpps; others {}).\n",
            max_bps / 1e9,
            max.value.1 / 1e6,
            max.busy()
        );
        println!(
            "| limit | configured | achieved | error (whole) | worst 1 s window | others CPU |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let mut lines = Vec::new();
        for &mode in &self.args.modes.clone() {
            for &r in &rates {
                eprintln!("== rate: {} at {}", mode.name(), fmt_bps(r as f64));
                let flows = [Flow { src: 0, dst: 1 }];
                let spec = mode.spec(r);
                let mut stats = Vec::new();
                let m = self.quiet(|| {
                    let (w, cpu, s) = self.net_line(
                        2,
                        &flows,
                        size,
                        self.args.queue_size,
                        std::slice::from_ref(&spec),
                    )?;
                    stats = s;
                    Ok((w, cpu))
                })?;
                let wins: Vec<(f64, f64)> = m
                    .value
                    .iter()
                    .map(|w| (w.secs, w.bytes[0] as f64 * 8.0))
                    .collect();
                let (mean, worst) = rate_errors(&wins, r as f64);
                let achieved = r as f64 * (1.0 + mean / 100.0);
                println!(
                    "| {} | {} | {} | {mean:+.2}% | {worst:+.2}% | {} |",
                    mode.name(),
                    fmt_bps(r as f64),
                    fmt_bps(achieved),
                    m.busy()
                );
                lines.push(json!({
                    "mode": mode.name(), "configured_bps": r, "achieved_bps": achieved,
                    "error_pct": mean, "worst_window_error_pct": worst,
                    "windows_bps": m.value.iter().map(|w| w.bps(0)).collect::<Vec<_>>(),
                    "ports": stats, "cpu": m.cpu_json(),
                }));
            }
        }
        self.json.push(json!({"part": "rate", "size": size,
            "unshaped_bps": max_bps, "unshaped_pps": max.value.1, "unshaped_cpu": max.cpu_json(),
            "lines": lines}));
        Ok(())
    }

    /// Flows of the worker case (pI -> pI+n: what the worker takes from
    /// each source counts) and of the destination case (pI -> pn: what
    /// the destination's guest receives counts), with `n` sources.
    fn fair_cases(n: usize) -> [Case; 2] {
        [
            Case {
                name: "one worker",
                ports: 2 * n,
                flows: (0..n).map(|i| Flow { src: i, dst: n + i }).collect(),
                by_taken: true,
            },
            Case {
                name: "one shaped destination",
                ports: n + 1,
                flows: (0..n).map(|i| Flow { src: i, dst: n }).collect(),
                by_taken: false,
            },
        ]
    }

    /// Measure `weights` over both cases: (case, windows) per case.
    fn weighted(&self, weights: &[u32]) -> Result<Vec<CaseRun>, QosBenchError> {
        let n = weights.len();
        let mut out = Vec::new();
        for case in Self::fair_cases(n) {
            let (ports, flows) = (case.ports, &case.flows);
            eprintln!("== weights {weights:?}: {}", case.name);
            let mut specs: Vec<(usize, Value)> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| (i, json!({ "weight": w })))
                .collect();
            if ports == n + 1 {
                specs.push((
                    n,
                    json!({"egress": {"mode": "shape", "rate": self.args.dest_rate}}),
                ));
            }
            let mut stats = Vec::new();
            let m = self.quiet(|| {
                let (w, cpu, s) = self.net_line(
                    ports,
                    flows,
                    self.args.fair_size,
                    self.args.fair_queue_size,
                    &specs,
                )?;
                stats = s;
                Ok((w, cpu))
            })?;
            out.push((case, m, stats));
        }
        Ok(out)
    }

    fn fair(&mut self) -> Result<(), QosBenchError> {
        let n = self.args.flows;
        let weights = vec![1; n];
        let res = self.weighted(&weights)?;
        println!(
            "\n### Fairness, equal weights ({n} flows, weight 1 each, {} B frames, rings of {}; destination shaped at {})\n",
            self.args.fair_size,
            self.args.fair_queue_size,
            fmt_bps(self.args.dest_rate as f64)
        );
        println!("| case | per-flow Mbit/s (whole) | total | Jain (whole) | worst 1 s window Jain | source ring full % of passes | others CPU |");
        println!("|---|---|---:|---:|---:|---|---:|");
        let mut lines = Vec::new();
        for (case, m, stats) in &res {
            let rates = whole_rates(&m.value, n, case.by_taken);
            let j = jain(&rates);
            let worst = m
                .value
                .iter()
                .map(|w| jain(&case.rates(w, n)))
                .fold(1.0f64, f64::min);
            println!(
                "| {} | {} | {} | {j:.4} | {worst:.4} | {} | {} |",
                case.label(),
                mbps_list(&rates),
                fmt_bps(rates.iter().sum()),
                full_pcts(&m.value, n),
                m.busy()
            );
            lines.push(
                json!({"case": case.name, "measured": case.measured(), "flows_bps": rates,
                "delivered_bps": whole_rates(&m.value, n, false), "jain": j, "worst_window_jain": worst,
                "ports": stats, "cpu": m.cpu_json()}),
            );
        }
        self.json
            .push(json!({"part": "fair", "flows": n, "size": self.args.fair_size, "lines": lines}));
        Ok(())
    }

    fn weights(&mut self) -> Result<(), QosBenchError> {
        println!(
            "\n### Unequal weights ({} B frames, rings of {}; destination shaped at {})\n",
            self.args.fair_size,
            self.args.fair_queue_size,
            fmt_bps(self.args.dest_rate as f64)
        );
        println!("| case | weights | per-flow Mbit/s (whole) | achieved ratio | worst ratio error (whole) | worst 1 s window | source ring full % of passes | others CPU |");
        println!("|---|---|---|---|---:|---:|---|---:|");
        let mut lines = Vec::new();
        for set in self.args.weights.clone() {
            let weights: Vec<u32> = set
                .split(':')
                .map(|w| w.trim().parse::<u32>())
                .collect::<Result<_, _>>()
                .map_err(|e| QosBenchError::Setup(format!("--weights {set}: {e}")))?;
            if weights.len() < 2 {
                return Err(QosBenchError::Setup(format!(
                    "--weights {set}: at least two weights"
                )));
            }
            let n = weights.len();
            for (case, m, stats) in self.weighted(&weights)? {
                let rates = whole_rates(&m.value, n, case.by_taken);
                let (ratios, err) = ratio_errors(&rates, &weights);
                let worst = m
                    .value
                    .iter()
                    .map(|w| ratio_errors(&case.rates(w, n), &weights).1)
                    .fold(0.0f64, |m, e| if e.abs() > m.abs() { e } else { m });
                println!(
                    "| {} | {set} | {} | {} | {err:+.2}% | {worst:+.2}% | {} | {} |",
                    case.label(),
                    mbps_list(&rates),
                    ratios
                        .iter()
                        .map(|r| format!("{r:.3}"))
                        .collect::<Vec<_>>()
                        .join(" : "),
                    full_pcts(&m.value, n),
                    m.busy()
                );
                lines.push(
                    json!({"case": case.name, "measured": case.measured(), "weights": weights,
                    "delivered_bps": whole_rates(&m.value, n, false), "flows_bps": rates, "ratios": ratios,
                    "ratio_error_pct": err, "worst_window_ratio_error_pct": worst,
                    "ports": stats, "cpu": m.cpu_json()}),
                );
            }
        }
        self.json
            .push(json!({"part": "weights", "size": self.args.fair_size, "lines": lines}));
        Ok(())
    }

    fn cost(&mut self) -> Result<(), QosBenchError> {
        // Far above anything the machine reaches: the limits never bind.
        let far = 400_000_000_000u64;
        let on = |p: CostPart| self.args.cost_qos.contains(&p);
        let mut specs = [(0, json!({})), (1, json!({}))];
        if on(CostPart::Ingress) {
            specs[0].1["ingress"] = json!({"mode": "shape", "rate": far});
        }
        if on(CostPart::Egress) {
            specs[1].1["egress"] = json!({"mode": "shape", "rate": far});
        }
        if on(CostPart::Weight) {
            for s in &mut specs {
                s.1["weight"] = json!(1);
            }
        }
        let qos: Vec<(usize, Value)> = specs
            .into_iter()
            .filter(|(_, v)| v.as_object().is_some_and(|o| !o.is_empty()))
            .collect();
        let what: Vec<String> = qos.iter().map(|(p, v)| format!("p{p} {v}")).collect();
        println!(
            "\n### Cost of QoS when no limit binds (one flow p0 -> p1; with QoS: {} (rates {}); medians of {} interleaved runs)\n",
            what.join(", "),
            fmt_bps(far as f64),
            self.args.repeat
        );
        println!("| size | without QoS Mpps | with QoS Mpps | cost | runs without | runs with | others CPU (max) |");
        println!("|---:|---:|---:|---:|---|---|---:|");
        let mut lines = Vec::new();
        for &size in &self.args.cost_sizes.clone() {
            let (mut base, mut with) = (Vec::new(), Vec::new());
            let mut busiest = 0.0f64;
            for i in 0..self.args.repeat.max(1) {
                eprintln!("== cost {size} B, run {}", i + 1);
                let b = self.unshaped(size, &[])?;
                let q = self.unshaped(size, &qos)?;
                busiest = busiest.max(b.busy_pct()).max(q.busy_pct());
                eprintln!("   {:.3} / {:.3} Mpps", b.value.1 / 1e6, q.value.1 / 1e6);
                base.push(b.value.1);
                with.push(q.value.1);
            }
            let (mb, mq) = (median(&base), median(&with));
            let cost = -error_pct(mq, mb);
            let runs = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{:.3}", x / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "| {size} B | {:.3} | {:.3} | {cost:+.1}% | {} | {} | {busiest:.1}% |",
                mb / 1e6,
                mq / 1e6,
                runs(&base),
                runs(&with)
            );
            lines.push(json!({"size": size, "without_pps": base, "with_pps": with,
                "median_without_pps": mb, "median_with_pps": mq, "cost_pct": cost, "max_busy_pct": busiest}));
        }
        self.json
            .push(json!({"part": "cost", "limit_bps": far, "qos": what, "lines": lines}));
        Ok(())
    }

    fn disk(&mut self) -> Result<(), QosBenchError> {
        let dir = vioswitch_testkit::temp_dir("vioswitch-qos-bench").map_err(|source| {
            QosBenchError::Io {
                path: std::env::temp_dir(),
                source,
            }
        })?;
        let image = dir.join("disk.img");
        let res = disk::make_image(&image).and_then(|()| self.disk_lines(&image));
        let _ = std::fs::remove_dir_all(&dir);
        res
    }

    /// IOPS of one disk line with `spec` (None: no QoS).
    fn disk_line(
        &self,
        image: &Path,
        spec: Option<&Value>,
    ) -> Result<Measured<Vec<(f64, u64)>>, QosBenchError> {
        let a = &self.args;
        self.quiet(|| {
            let mut rig =
                DiskRig::start(&self.binary, image, a.depth, a.rig.dut_core, a.rig.gen_core)?;
            if let Some(s) = spec {
                rig.set_qos(s)?;
            }
            let before = CpuSnap::take(rig.pid());
            let w = rig.run(a.depth, self.warmup(), WINDOW, a.duration)?;
            Ok((w, before.until(&CpuSnap::take(rig.pid()))))
        })
    }

    fn disk_lines(&mut self, image: &Path) -> Result<(), QosBenchError> {
        eprintln!("== disk: unlimited");
        let max = self.disk_line(image, None)?;
        let iops_of = |w: &[(f64, u64)]| {
            w.iter().map(|x| x.1 as f64).sum::<f64>() / w.iter().map(|x| x.0).sum::<f64>()
        };
        let max_iops = iops_of(&max.value);
        let limits = if self.args.iops.is_empty() {
            sweep(100, max_iops)
        } else {
            self.args.iops.clone()
        };
        println!(
            "\n### Disk IOPS limits (4 KiB random reads, {} in flight, page-cached image; `iops` limit, burst 10 ms at the rate)\n",
            self.args.depth
        );
        println!("Unlimited: {max_iops:.0} IOPS (others {}).\n", max.busy());
        println!("| limit IOPS | achieved IOPS | error (whole) | worst 1 s window | others CPU |");
        println!("|---:|---:|---:|---:|---:|");
        let mut lines = Vec::new();
        for &l in &limits {
            eprintln!("== disk: {l} IOPS");
            // A burst of 10 ms at the rate: the default (1 s) would take
            // seconds to drain at a limit close to the maximum and count as
            // rate error in the first windows.
            let spec = json!({"iops": {"rate": l, "burst": (l / 100).max(1)}});
            let m = self.disk_line(image, Some(&spec))?;
            let wins: Vec<(f64, f64)> = m.value.iter().map(|&(s, n)| (s, n as f64)).collect();
            let (mean, worst) = rate_errors(&wins, l as f64);
            println!(
                "| {l} | {:.0} | {mean:+.2}% | {worst:+.2}% | {} |",
                iops_of(&m.value),
                m.busy()
            );
            lines.push(
                json!({"limit_iops": l, "achieved_iops": iops_of(&m.value), "error_pct": mean,
                "worst_window_error_pct": worst, "windows": m.value, "cpu": m.cpu_json()}),
            );
        }
        self.json
            .push(json!({"part": "disk", "depth": self.args.depth,
            "unlimited_iops": max_iops, "unlimited_cpu": max.cpu_json(), "lines": lines}));
        Ok(())
    }
}

/// A case, its windows, and its ports' QoS counters and drops.
type CaseRun = (Case, Measured<Vec<Window>>, Vec<Value>);

/// A fairness or weights case.
struct Case {
    name: &'static str,
    ports: usize,
    flows: Vec<Flow>,
    /// Count what the switch took from each source (else what was
    /// delivered).
    by_taken: bool,
}

impl Case {
    /// What is counted.
    fn measured(&self) -> &'static str {
        if self.by_taken {
            "taken from the sources"
        } else {
            "delivered"
        }
    }

    /// "one worker (taken from the sources)".
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.measured())
    }

    /// Each flow's rate in window `w`, bit/s.
    fn rates(&self, w: &Window, flows: usize) -> Vec<f64> {
        (0..flows)
            .map(|f| {
                if self.by_taken {
                    w.taken_bps(f)
                } else {
                    w.bps(f)
                }
            })
            .collect()
    }
}

/// Per flow, the percentage of the generator's passes that found its
/// source ring full, over all windows ("99 / 98 / 100").
fn full_pcts(windows: &[Window], flows: usize) -> String {
    let passes: u64 = windows.iter().map(|w| w.passes).sum();
    (0..flows)
        .map(|f| {
            let full: u64 = windows.iter().map(|w| w.full[f]).sum();
            format!("{:.0}", 100.0 * full as f64 / passes.max(1) as f64)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Each flow's rate over all windows, bit/s: taken from its source
/// (`taken`) or delivered.
fn whole_rates(windows: &[Window], flows: usize, taken: bool) -> Vec<f64> {
    let secs: f64 = windows.iter().map(|w| w.secs).sum();
    (0..flows)
        .map(|f| {
            let bytes: u64 = windows
                .iter()
                .map(|w| if taken { w.taken[f] } else { w.bytes[f] })
                .sum();
            bytes as f64 * 8.0 / secs.max(1e-9)
        })
        .collect()
}

/// Decades from `from` below `max`, and 80% of `max` (rounded to two
/// significant digits) when above the last decade.
fn sweep(from: u64, max: f64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut r = from;
    while (r as f64) < max * 0.8 {
        out.push(r);
        r = r.saturating_mul(10);
    }
    let top = max * 0.8;
    if top >= 1.0 {
        let mag = 10f64.powi(top.log10().floor() as i32 - 1);
        let top = ((top / mag).floor() * mag) as u64;
        if out.last().is_none_or(|&l| top > l) {
            out.push(top);
        }
    }
    out
}

/// Rates in Mbit/s: "399.8 / 400.1".
fn mbps_list(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{:.1}", r / 1e6))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// "1.00 Gbit/s", "10.0 Mbit/s" and so on.
fn fmt_bps(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.3} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.3} Mbit/s", b / 1e6)
    } else {
        format!("{:.1} kbit/s", b / 1e3)
    }
}

fn run(args: Args) -> Result<(), QosBenchError> {
    for &s in std::iter::once(&args.size)
        .chain(&args.cost_sizes)
        .chain(std::iter::once(&args.fair_size))
    {
        if !(64..=9000).contains(&s) {
            return Err(QosBenchError::Setup(format!(
                "frame size {s} out of 64..=9000"
            )));
        }
    }
    if args.duration == 0 || args.flows < 2 || args.depth == 0 {
        return Err(QosBenchError::Setup(
            "--duration and --depth must be above 0, --flows at least 2".into(),
        ));
    }
    install_signals().map_err(QosBenchError::Setup)?;
    pin_current_thread(args.rig.gen_core).map_err(QosBenchError::Setup)?;
    let t0 = Instant::now();
    let mut bench = Bench {
        binary: args.rig.vioswitch(),
        json: Vec::new(),
        args: args.clone(),
    };
    println!(
        "## QoS (vioswitch at {}, switch core {}, generator core {})",
        bench.binary.display(),
        args.rig.dut_core,
        args.rig.gen_core
    );
    let mut res = Ok(());
    for part in &args.only {
        res = match part {
            Part::Rate => bench.rate(),
            Part::Fair => bench.fair(),
            Part::Weights => bench.weights(),
            Part::Cost => bench.cost(),
            Part::Disk => bench.disk(),
        };
        if res.is_err() {
            break;
        }
    }
    println!("\n(total {:.0?})", t0.elapsed());
    if let Some(p) = &args.rig.json {
        let doc = json!({"args": format!("{args:?}"), "parts": bench.json});
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| QosBenchError::Setup(format!("JSON: {e}")))?;
        std::fs::write(p, text).map_err(|source| QosBenchError::Io {
            path: p.clone(),
            source,
        })?;
    }
    res
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qos_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_by_decades_and_ends_near_the_maximum() {
        assert_eq!(
            sweep(1_000_000, 24.3e9),
            vec![
                1_000_000,
                10_000_000,
                100_000_000,
                1_000_000_000,
                10_000_000_000,
                19_000_000_000
            ]
        );
        assert_eq!(
            sweep(100, 590_000.0),
            vec![100, 1000, 10_000, 100_000, 470_000]
        );
        assert_eq!(sweep(100, 1000.0), vec![100, 800]);
    }
}
