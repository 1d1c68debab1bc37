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

/// Rounds that lost more than this share of both cores' time to other
/// processes or to the hypervisor are left out of a line's median when the
/// line has quieter rounds (as in the net benchmark).
pub const BUSY_PCT: f64 = 5.0;

/// The median run (by IOPS) of one case, over its quiet rounds if it has
/// any, else over all, with the lowest and highest IOPS of those.
struct Median<'a> {
    run: &'a Run,
    lo: f64,
    hi: f64,
    /// Which rounds were counted, e.g. "2 quiet of 3".
    counted: String,
}

impl Run {
    /// CPU share of both cores lost to other processes and steal.
    fn lost_pct(&self) -> f64 {
        self.interference.other_pct + self.interference.steal_pct
    }
}

/// The median of each (target, job), in the order first run.
fn medians(runs: &[Run]) -> Vec<Median<'_>> {
    let mut out: Vec<Median> = Vec::new();
    for r in runs {
        if out.iter().any(|m| m.run.same_case(r)) {
            continue;
        }
        let all: Vec<&Run> = runs.iter().filter(|o| o.same_case(r)).collect();
        let quiet: Vec<&Run> = all
            .iter()
            .copied()
            .filter(|o| o.lost_pct() < BUSY_PCT)
            .collect();
        let counted = if quiet.is_empty() {
            format!("{} busy", all.len())
        } else {
            format!("{} quiet of {}", quiet.len(), all.len())
        };
        let mut used = if quiet.is_empty() { all } else { quiet };
        used.sort_by(|a, b| a.stats.iops().total_cmp(&b.stats.iops()));
        out.push(Median {
            run: used[(used.len() - 1) / 2],
            lo: used[0].stats.iops(),
            hi: used[used.len() - 1].stats.iops(),
            counted,
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
    println!("Median run of each line over its quiet rounds (other processes and steal took under {BUSY_PCT}% of both");
    println!("cores), over all {repeats} if none was quiet; min–max over the same rounds. MB/s = 10^6 B/s; latency from");
    println!("submission to completion in the client; server CPU in % of one core; \"others\" = CPU share of both");
    println!("cores lost to other processes and steal in the median run:");
    println!();
    println!("| target | backing | job | depth | IOPS | min–max IOPS | rounds | MB/s | mean µs | p50 µs | p99 µs | server CPU % | others % |");
    println!("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for m in &med {
        let r = m.run;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0}–{:.0} | {} | {:.1} | {} | {} | {} | {:.0} | {:.1} |",
            r.target.key(),
            r.target.backing(),
            r.job.name,
            r.job.depth,
            r.stats.iops(),
            m.lo,
            m.hi,
            m.counted,
            r.mbps(),
            us(Some(r.stats.mean_ns())),
            us(r.stats.lat.percentile(50.0)),
            us(r.stats.lat.percentile(99.0)),
            r.server_cpu_pct,
            r.lost_pct(),
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
            v["rounds"] = json!(m.counted);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::Hist;

    fn run(repeat: usize, ios: u64, other_pct: f64) -> Run {
        let mut lat = Hist::default();
        for _ in 0..ios {
            lat.record(1000);
        }
        Run {
            target: Target::QsdNull,
            job: Job {
                name: "randread-4k-qd1",
                block: 4096,
                depth: 1,
                random: true,
                write: false,
            },
            repeat,
            stats: JobStats {
                lat,
                lat_sum_ns: 1000 * ios,
                secs: 1.0,
            },
            server_cpu_pct: 50.0,
            interference: Interference {
                steal_pct: 0.0,
                other_pct,
            },
            cmdline: String::new(),
        }
    }

    #[test]
    fn median_prefers_quiet_rounds() {
        let runs = [
            run(0, 10, 40.0),
            run(1, 30, 0.5),
            run(2, 20, 1.0),
            run(3, 5, 0.0),
        ];
        let med = medians(&runs);
        assert_eq!(med.len(), 1);
        assert_eq!(med[0].run.repeat, 2);
        assert_eq!((med[0].lo, med[0].hi), (5.0, 30.0));
        assert_eq!(med[0].counted, "3 quiet of 4");
        let busy = [run(0, 10, 40.0), run(1, 30, 50.0)];
        let med = medians(&busy);
        assert_eq!(med[0].run.repeat, 0);
        assert_eq!(med[0].counted, "2 busy");
    }
}
