//! Results: one [`Run`] per (repeat, target, job), the median run of each
//! (target, job), the markdown tables and the JSON.

use serde_json::{json, Value};

use crate::client::{Job, JobStats};
use crate::sysstat::Interference;
use crate::Target;

/// One measured job of one server session.
pub struct Run {
    pub target: Target,
    pub job: Job,
    pub repeat: usize,
    pub stats: JobStats,
    /// CPU time of the server, in percent of one core.
    pub server_cpu_pct: f64,
    /// CPU lost to steal and other processes while the job ran.
    pub interference: Interference,
    /// How the server was started.
    pub cmdline: String,
}

fn us(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |ns| format!("{:.1}", ns as f64 / 1000.0))
}

impl Run {
    /// Megabytes (10^6) per second.
    pub fn mbps(&self) -> f64 {
        self.stats.iops() * self.job.block as f64 / 1e6
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        format!(
            "{:<17} {:>9.0} IOPS {:>8.1} MB/s  mean {} p50 {} p99 {} µs  server CPU {:.0}%  steal {:.1}% other {:.1}%",
            self.job.name,
            self.stats.iops(),
            self.mbps(),
            us(Some(self.stats.mean_ns())),
            us(self.stats.lat.percentile(50.0)),
            us(self.stats.lat.percentile(99.0)),
            self.server_cpu_pct,
            self.interference.steal_pct,
            self.interference.other_pct,
        )
    }

    fn same_case(&self, o: &Run) -> bool {
        self.target == o.target && self.job.name == o.job.name
    }
}

/// The median run (by IOPS) of one case, with the lowest and highest IOPS.
struct Median<'a> {
    run: &'a Run,
    lo: f64,
    hi: f64,
    /// The most CPU lost to other processes and steal in any of its runs.
    worst_other_pct: f64,
}

/// The median of each (target, job), in the order first run.
fn medians(runs: &[Run]) -> Vec<Median<'_>> {
    let mut out: Vec<Median> = Vec::new();
    for r in runs {
        if out.iter().any(|m| m.run.same_case(r)) {
            continue;
        }
        let mut all: Vec<&Run> = runs.iter().filter(|o| o.same_case(r)).collect();
        all.sort_by(|a, b| a.stats.iops().total_cmp(&b.stats.iops()));
        let worst_other_pct = all
            .iter()
            .map(|o| o.interference.other_pct + o.interference.steal_pct)
            .fold(0.0, f64::max);
        out.push(Median {
            run: all[(all.len() - 1) / 2],
            lo: all[0].stats.iops(),
            hi: all[all.len() - 1].stats.iops(),
            worst_other_pct,
        });
    }
    out
}

fn find<'a>(med: &'a [Median<'a>], target: Target, job: &str) -> Option<&'a Median<'a>> {
    med.iter()
        .find(|m| m.run.target == target && m.run.job.name == job)
}

/// Print the tables (markdown) on stdout.
pub fn print_tables(runs: &[Run], repeats: usize) {
    let med = medians(runs);
    println!();
    println!("Median of {repeats} runs per line (IOPS; MB/s = 10^6 B/s; latency from submission to completion in");
    println!("the client; server CPU in % of one core; \"others\" = most CPU of both cores lost to other processes");
    println!("and steal in any of the line's runs):");
    println!();
    println!("| target | backing | job | depth | IOPS | min–max IOPS | MB/s | mean µs | p50 µs | p99 µs | server CPU % | others % |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &med {
        let r = m.run;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.1} | {} | {} | {} | {:.0} | {:.1} |",
            r.target.key(),
            r.target.backing(),
            r.job.name,
            r.job.depth,
            r.stats.iops(),
            m.lo,
            m.hi,
            r.mbps(),
            us(Some(r.stats.mean_ns())),
            us(r.stats.lat.percentile(50.0)),
            us(r.stats.lat.percentile(99.0)),
            r.server_cpu_pct,
            m.worst_other_pct,
        );
    }
    println!();
    println!("vioswitch / qsd on the same page-cached image, per qsd aio mode (qsd-null: qsd on null-co, the");
    println!("vhost-user ceiling without file I/O, not a like-for-like reference):");
    println!();
    println!("| job | vioswitch IOPS | qsd-threads IOPS | vioswitch / qsd-threads | qsd-io_uring IOPS | vioswitch / qsd-io_uring | qsd-null IOPS | QD1 p50 µs vioswitch / qsd-threads / qsd-io_uring |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let mut jobs: Vec<&Job> = Vec::new();
    for m in &med {
        if !jobs.iter().any(|j| j.name == m.run.job.name) {
            jobs.push(&m.run.job);
        }
    }
    let iops = |m: Option<&Median>| m.map_or("-".into(), |m| format!("{:.0}", m.run.stats.iops()));
    let ratio = |v: Option<&Median>, q: Option<&Median>| match (v, q) {
        (Some(v), Some(q)) => format!("{:.2}", v.run.stats.iops() / q.run.stats.iops().max(1e-9)),
        _ => "-".into(),
    };
    let p50 = |m: Option<&Median>| us(m.and_then(|m| m.run.stats.lat.percentile(50.0)));
    for job in jobs {
        let v = find(&med, Target::Vioswitch, job.name);
        let t = find(&med, Target::QsdThreads, job.name);
        let u = find(&med, Target::QsdIoUring, job.name);
        let n = find(&med, Target::QsdNull, job.name);
        let lat = if job.depth == 1 {
            format!("{} / {} / {}", p50(v), p50(t), p50(u))
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            job.name,
            iops(v),
            iops(t),
            ratio(v, t),
            iops(u),
            ratio(v, u),
            iops(n),
            lat,
        );
    }
    println!();
    let mut cmdlines: Vec<&str> = runs.iter().map(|r| r.cmdline.as_str()).collect();
    cmdlines.sort_unstable();
    cmdlines.dedup();
    println!("Servers:");
    println!();
    for c in cmdlines {
        println!("    {c}");
    }
}

fn run_json(r: &Run) -> Value {
    json!({
        "target": r.target.key(),
        "backing": r.target.backing(),
        "job": r.job.name,
        "block": r.job.block,
        "depth": r.job.depth,
        "write": r.job.write,
        "random": r.job.random,
        "repeat": r.repeat,
        "ios": r.stats.lat.count(),
        "secs": r.stats.secs,
        "iops": r.stats.iops(),
        "mbps": r.mbps(),
        "lat_mean_ns": r.stats.mean_ns(),
        "lat_p50_ns": r.stats.lat.percentile(50.0),
        "lat_p99_ns": r.stats.lat.percentile(99.0),
        "server_cpu_pct": r.server_cpu_pct,
        "steal_pct": r.interference.steal_pct,
        "other_pct": r.interference.other_pct,
        "server": r.cmdline,
    })
}

/// Every run and the medians, with the arguments of the benchmark.
pub fn to_json(runs: &[Run], args: &str) -> Value {
    let med = medians(runs);
    json!({
        "args": args,
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        "medians": med.iter().map(|m| {
            let mut v = run_json(m.run);
            v["min_iops"] = json!(m.lo);
            v["max_iops"] = json!(m.hi);
            if m.run.target == Target::Vioswitch {
                for q in [Target::QsdThreads, Target::QsdIoUring] {
                    if let Some(q) = find(&med, q, m.run.job.name) {
                        v[format!("ratio_vs_{}", q.run.target.key())] =
                            json!(m.run.stats.iops() / q.run.stats.iops().max(1e-9));
                    }
                }
            }
            v
        }).collect::<Vec<_>>(),
    })
}
