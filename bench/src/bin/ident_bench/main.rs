//! ident_bench: how fast vioswitch moves a network identity, by command
//! and by failover, and what port security and identity mapping cost. See
//! bench/RESULTS.md, section "Identities".
//!
//! `cargo run --release -p vioswitch-bench --bin ident_bench -- [options]`
//!
//! Every line starts a fresh vioswitch (one worker) pinned to the switch
//! core and drives the project's guest drivers and the control socket from
//! this process, pinned to the generator core:
//!
//! - `move`: a steady stream from b to identity `svc` while it moves
//!   between a and c (`identity.move`) `--moves` times: from just before
//!   the command is written to the first stream frame delivered to the new
//!   port addressed to its guest; the command's round trip.
//! - `failover`: the same stream while the bound guest's connection closes
//!   and the identity fails over to its standby, `--moves` times (the
//!   guest connects again and is the standby of the next one): from the
//!   close to that first frame, and from the switch's `port.disconnected`
//!   (its own clock) to it.
//! - `cost`: one flow p0 -> p1 flooded, without identities, with port
//!   security on p0, and with security and mapping both ways; medians of
//!   `--repeat` interleaved runs.
//!
//! A line during which other processes or the hypervisor took 5% or more
//! of the machine's CPU is run again (`--retries`); the tables say how
//! busy the machine was.

#[path = "../../rig_args.rs"]
mod rig_args;
#[path = "../../run_control.rs"]
mod run_control;
#[path = "../../sysstat.rs"]
mod sysstat;

pub use run_control::{install_signals, pin_current_thread, stopped};

mod flood;
mod live;
mod rig;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rig_args::RigArgs;
use serde_json::{json, Value};

use flood::{Config, Flood};
use live::{Live, Sample};
use stats::{percentile, spread};
use sysstat::{CpuSnap, Interference};

/// What went wrong, said whole.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(pub String);

impl BenchError {
    pub fn interrupted() -> BenchError {
        BenchError("interrupted".into())
    }
}

/// The measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Move,
    Failover,
    Cost,
}

/// Where the switch's threads run in the move and failover lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Placement {
    /// All on the switch core, with its busy-polling worker (as in the
    /// cost lines and qos_bench).
    Shared,
    /// The worker alone on the switch core; the control, session and
    /// monitor threads on the generator core, where this process runs at
    /// SCHED_IDLE so that they get the core as soon as they wake (a
    /// housekeeping core).
    Split,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Shared => "all switch threads on the switch core",
            Placement::Split => {
                "worker alone on the switch core, other switch threads on the generator core"
            }
        }
    }
}

/// This thread at SCHED_IDLE until dropped (then SCHED_OTHER again).
struct IdleGuard;

impl IdleGuard {
    fn new() -> Result<IdleGuard, BenchError> {
        set_policy(libc::SCHED_IDLE)?;
        Ok(IdleGuard)
    }
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        let _ = set_policy(libc::SCHED_OTHER);
    }
}

fn set_policy(policy: libc::c_int) -> Result<(), BenchError> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is this thread.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(BenchError(format!(
            "sched_setscheduler: {}",
            std::io::Error::last_os_error()
        ))),
    }
}

/// Identity moves, failovers and the cost of port security and mapping.
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    /// Measurements to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "move,failover,cost"
    )]
    only: Vec<Part>,
    /// Where the switch's threads run in the move and failover lines, one
    /// line each.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "shared,split"
    )]
    placement: Vec<Placement>,
    /// Moves (and failovers) per line, back and forth between a and c.
    #[arg(long, default_value_t = 100)]
    moves: usize,
    /// Microseconds between two frames of the stream to the identity.
    #[arg(long, default_value_t = 2.0)]
    gap_us: f64,
    /// Milliseconds between two moves (the later announcement rounds go
    /// out 50 and 200 ms after a move).
    #[arg(long, default_value_t = 300)]
    settle_ms: u64,
    /// The identity's `stall_ms` in the failover line. A standby is
    /// healthy only while its RX ring has not been stalled this long (1 s
    /// when 0), and a port's stall clock outlives its guest's connection:
    /// it starts when the old guest's ring fills, before the switch has
    /// seen the end, and a guest that connects again has it running (so
    /// with 0, the second failover back to a port finds no healthy
    /// standby). The default, an hour, keeps the clock out of the way.
    #[arg(long, default_value_t = 3_600_000)]
    stall_ms: u64,
    /// Seconds measured per cost run (1 s windows).
    #[arg(long, default_value_t = 5)]
    duration: usize,
    /// Seconds of load before the windows.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Runs of each cost line (the three configurations interleaved).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Frame sizes of the cost lines in bytes, FCS included.
    #[arg(long, value_delimiter = ',', default_value = "64,1518")]
    cost_sizes: Vec<usize>,
    /// Entries per guest virtqueue of the cost lines.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    #[command(flatten)]
    rig: RigArgs,
}

/// Share of the machine's CPU at which a line is not quiet.
const BUSY_PCT: f64 = 5.0;

/// A line's value, how busy the machine was, and the tries it took.
struct Quiet<T> {
    value: T,
    cpu: Interference,
    tries: usize,
}

impl<T> Quiet<T> {
    fn busy_pct(&self) -> f64 {
        self.cpu.steal_pct + self.cpu.other_pct
    }

    /// "0.3%", "0.3%, try 2", "7.1% (busy)".
    fn busy(&self) -> String {
        let mut s = format!("{:.1}%", self.busy_pct());
        if self.tries > 1 {
            s += &format!(", try {}", self.tries);
        }
        if self.busy_pct() >= BUSY_PCT {
            s += " (busy)";
        }
        s
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
    /// Run `line` (its value, and how busy the others kept the machine
    /// while it measured) until a quiet try or out of retries.
    fn quiet<T>(
        &self,
        mut line: impl FnMut() -> Result<(T, Interference), BenchError>,
    ) -> Result<Quiet<T>, BenchError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (value, cpu) = line()?;
            let q = Quiet { value, cpu, tries };
            if q.busy_pct() < BUSY_PCT || tries > self.args.rig.retries {
                return Ok(q);
            }
            eprintln!("   busy ({:.1}% of the CPU to others): again", q.busy_pct());
        }
    }

    fn gap(&self) -> Duration {
        Duration::from_secs_f64(self.args.gap_us / 1e6)
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(self.args.settle_ms)
    }

    /// One line of moves or failovers: samples, frames sent and delivered,
    /// strays, drops.
    fn live_line(&self, failover: bool, split: bool) -> Result<Quiet<LiveRun>, BenchError> {
        let a = &self.args;
        self.quiet(|| {
            let mut live = Live::start(
                &self.binary,
                (a.rig.dut_core, a.rig.gen_core, split),
                self.gap(),
                failover,
                a.stall_ms,
            )?;
            let _idle = split.then(IdleGuard::new).transpose()?;
            live.run_for(Duration::from_secs(1))?;
            let before = CpuSnap::take(live.pid());
            let samples = match live.rounds(a.moves, self.settle(), failover) {
                Ok(s) => s,
                Err(e) => {
                    let log = live.log();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    eprintln!("   switch log (last lines):");
                    for l in tail.iter().rev() {
                        eprintln!("     {l}");
                    }
                    return Err(e);
                }
            };
            let cpu = before.until(&CpuSnap::take(live.pid()));
            let run = LiveRun {
                samples,
                sent: live.sent(),
                delivered: live.delivered(),
                stray: live.stray,
                misaddressed_outside: live.misaddressed_outside,
                drops: live.drops()?,
            };
            Ok((run, cpu))
        })
    }

    /// The move or failover lines, one per placement.
    fn live(&mut self, failover: bool) -> Result<(), BenchError> {
        let (part, what) = if failover {
            ("failover", "failovers")
        } else {
            ("move", "moves")
        };
        for placement in self.args.placement.clone() {
            let split = placement == Placement::Split;
            eprintln!(
                "== {part}: {} {what}, {}",
                self.args.moves,
                placement.name()
            );
            let m = self.live_line(failover, split)?;
            let s = &m.value.samples;
            println!(
                "\n### {} ({} {what} a <-> c, one worker, {}; a 60 B frame from b to the identity every {} µs)\n",
                if failover { "Failovers" } else { "Moves by command" },
                s.len(),
                placement.name(),
                self.args.gap_us
            );
            let seen = |x: &Sample| x.seen_us.unwrap_or(f64::NAN);
            let opt = |v: Option<f64>| v.unwrap_or(f64::NAN);
            let t0 = if failover {
                "guest's socket closed"
            } else {
                "command written"
            };
            let mut rows = vec![
                (
                    format!("{t0} -> first frame to the new port's guest"),
                    col(s, |x| x.first_us),
                ),
                (
                    format!("{t0} -> first frame on the new port (any address)"),
                    col(s, |x| x.first_any_us),
                ),
            ];
            if failover {
                rows.push((
                    format!("{t0} -> `port.disconnected` (switch clock: end seen, port detached)"),
                    col(s, seen),
                ));
                rows.push((
                    "`port.disconnected` -> first frame to the new port's guest".into(),
                    col(s, |x| x.first_us - seen(x)),
                ));
            } else {
                rows.push((
                    "command round trip (answer read)".into(),
                    col(s, |x| opt(x.answer_us)),
                ));
            }
            rows.push((
                format!("{t0} -> `identity.moved` (switch clock, after the save)"),
                col(s, |x| opt(x.moved_event_us)),
            ));
            print_spreads(&rows);
            m.value.print_counts(self.args.gap_us);
            println!("Others CPU: {}.", m.busy());
            let mut j = m.value.json(part, &m);
            j["placement"] = json!(placement.name());
            self.json.push(j);
        }
        Ok(())
    }

    /// Frames per second delivered in one cost run.
    fn cost_run(&self, config: Config, size: usize) -> Result<Quiet<(f64, Value)>, BenchError> {
        let a = &self.args;
        self.quiet(|| {
            let mut f = Flood::start(
                &self.binary,
                a.rig.dut_core,
                a.rig.gen_core,
                config,
                size,
                a.queue_size,
            )?;
            let before = CpuSnap::take(f.pid());
            let w = f.run(
                Duration::from_secs_f64(a.warmup),
                Duration::from_secs(1),
                a.duration,
            )?;
            let cpu = before.until(&CpuSnap::take(f.pid()));
            let secs: f64 = w.iter().map(|x| x.0).sum();
            let frames: u64 = w.iter().map(|x| x.1).sum();
            if f.foreign > 0 {
                eprintln!("   {} frames not of the flow", f.foreign);
            }
            Ok(((frames as f64 / secs.max(1e-9), f.drops()?), cpu))
        })
    }

    fn cost(&mut self) -> Result<(), BenchError> {
        println!(
            "\n### Cost of port security and mapping (one flow p0 -> p1 of IPv4/UDP frames, one worker; medians of {} interleaved runs of {} x 1 s)\n",
            self.args.repeat, self.args.duration
        );
        println!("| size | plain Mpps | security Mpps | cost | security + mapping Mpps | cost | runs plain | runs security | runs security + mapping | others CPU (max) |");
        println!("|---:|---:|---:|---:|---:|---:|---|---|---|---:|");
        let mut lines = Vec::new();
        for &size in &self.args.cost_sizes.clone() {
            let mut runs: [Vec<f64>; 3] = Default::default();
            let mut busiest = 0.0f64;
            let mut drops = Vec::new();
            for i in 0..self.args.repeat.max(1) {
                eprintln!("== cost {size} B, run {}", i + 1);
                for (k, c) in Config::ALL.into_iter().enumerate() {
                    let q = self.cost_run(c, size)?;
                    busiest = busiest.max(q.busy_pct());
                    eprintln!(
                        "   {}: {:.3} Mpps ({})",
                        c.name(),
                        q.value.0 / 1e6,
                        q.busy()
                    );
                    runs[k].push(q.value.0);
                    drops.push(json!({"config": c.name(), "run": i + 1, "drops": q.value.1}));
                }
            }
            let med = runs.each_ref().map(|r| percentile(r, 50.0));
            let cost = |m: f64| 100.0 * (med[0] - m) / med[0];
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{:.3}", x / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "| {size} B | {:.3} | {:.3} | {:+.1}% | {:.3} | {:+.1}% | {} | {} | {} | {busiest:.1}% |",
                med[0] / 1e6,
                med[1] / 1e6,
                cost(med[1]),
                med[2] / 1e6,
                cost(med[2]),
                list(&runs[0]),
                list(&runs[1]),
                list(&runs[2])
            );
            lines.push(
                json!({"size": size, "plain_pps": runs[0], "security_pps": runs[1],
                "mapping_pps": runs[2], "median_pps": med,
                "security_cost_pct": cost(med[1]), "mapping_cost_pct": cost(med[2]),
                "max_busy_pct": busiest, "drops": drops}),
            );
        }
        println!("\n(cost: how much less than plain, in % of plain.)");
        self.json.push(json!({"part": "cost", "lines": lines}));
        Ok(())
    }
}

/// What a line of moves or failovers gives.
struct LiveRun {
    samples: Vec<Sample>,
    sent: u64,
    delivered: u64,
    stray: u64,
    misaddressed_outside: u64,
    drops: Value,
}

impl LiveRun {
    /// The counts under a table of moves or failovers.
    fn print_counts(&self, gap_us: f64) {
        let s = &self.samples;
        let sum = |f: fn(&Sample) -> u64| s.iter().map(f).sum::<u64>();
        let most = |f: fn(&Sample) -> u64| s.iter().map(f).max().unwrap_or(0);
        let before = s.iter().filter(|x| x.first_sent_us < 0.0).count();
        println!(
            "\nStream: {} frames sent, {} delivered to a or c, {} lost (most in one round: {}; a lost frame is {gap_us} µs of stream).",
            self.sent,
            self.delivered,
            sum(|x| x.lost),
            most(|x| x.lost)
        );
        println!(
            "The first frame taken by the new guest was sent before t0 in {before} of {} rounds. Frames on the new port not addressed to its guest: {} (in {} rounds). On the old port after t0: {}, of which sent after the command's answer: {}. Outside rounds, on the port without the identity: {}, misaddressed: {}.",
            s.len(),
            sum(|x| x.misaddressed),
            s.iter().filter(|x| x.misaddressed > 0).count(),
            sum(|x| x.old_after),
            sum(|x| x.late_old),
            self.stray,
            self.misaddressed_outside
        );
        let [p50, _, max] = spread(&col(s, |x| x.start_us));
        println!(
            "Writing the command, or closing the guest, kept this loop from polling for {} (p50), {} (max). Port drops: {}.",
            us(p50),
            us(max),
            self.drops
        );
    }

    fn json(&self, part: &str, q: &Quiet<LiveRun>) -> Value {
        json!({"part": part, "sent": self.sent, "delivered": self.delivered, "stray": self.stray,
            "misaddressed_outside": self.misaddressed_outside, "drops": self.drops,
            "cpu": q.cpu_json(), "samples": self.samples.iter().map(Sample::json).collect::<Vec<_>>()})
    }
}

/// One column of the samples.
fn col(s: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    s.iter().map(f).collect()
}

/// A table of p50 / p99 / max, microseconds.
fn print_spreads(rows: &[(String, Vec<f64>)]) {
    println!("| from -> to | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, v) in rows {
        let [p50, p99, max] = spread(v);
        println!("| {name} | {} | {} | {} |", us(p50), us(p99), us(max));
    }
}

/// "12.3 µs", "1.234 ms".
fn us(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{:.3} ms", x / 1000.0)
    } else {
        format!("{x:.1} µs")
    }
}

fn run(args: Args) -> Result<(), BenchError> {
    if let Some(s) = args.cost_sizes.iter().find(|s| !(64..=1518).contains(*s)) {
        return Err(BenchError(format!("cost size {s} out of 64..=1518")));
    }
    if args.duration == 0 || args.moves == 0 || args.gap_us.is_nan() || args.gap_us <= 0.0 {
        return Err(BenchError(
            "--duration, --moves and --gap-us must be above 0".into(),
        ));
    }
    install_signals().map_err(BenchError)?;
    pin_current_thread(args.rig.gen_core).map_err(BenchError)?;
    let t0 = Instant::now();
    let mut bench = Bench {
        binary: args.rig.vioswitch(),
        json: Vec::new(),
        args: args.clone(),
    };
    println!(
        "## Identities (vioswitch at {}, switch core {}, generator core {})",
        bench.binary.display(),
        args.rig.dut_core,
        args.rig.gen_core
    );
    let mut res = Ok(());
    for part in &args.only {
        res = match part {
            Part::Move => bench.live(false),
            Part::Failover => bench.live(true),
            Part::Cost => bench.cost(),
        };
        if res.is_err() {
            break;
        }
    }
    println!("\n(total {:.0?})", t0.elapsed());
    if let Some(p) = &args.rig.json {
        let doc = json!({"args": format!("{args:?}"), "parts": bench.json});
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| BenchError(format!("JSON: {e}")))?;
        std::fs::write(p, text).map_err(|e| BenchError(format!("{}: {e}", p.display())))?;
    }
    res
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ident_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
