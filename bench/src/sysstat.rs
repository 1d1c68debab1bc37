//! Interference during a measurement window: CPU time the hypervisor stole
//! and CPU time spent by processes other than the benchmark and the device
//! under test (from /proc/stat and /proc/PID/stat, in clock ticks).

/// A snapshot of the counters.
#[derive(Debug, Clone, Default)]
pub struct CpuSnap {
    /// All cores: (busy, steal, total) ticks.
    busy: u64,
    steal: u64,
    total: u64,
    /// utime + stime of the benchmark and the device under test.
    ours: u64,
}

/// What happened between two snapshots, in percent of all cores' time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Interference {
    pub steal_pct: f64,
    pub other_pct: f64,
}

/// utime + stime of `pid` (0: this process) in clock ticks, 0 if unknown.
pub fn proc_ticks(pid: u32) -> u64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0;
    };
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

impl CpuSnap {
    /// Take a snapshot; `dut` is the pid of the device under test.
    pub fn take(dut: u32) -> CpuSnap {
        let mut snap = CpuSnap {
            ours: proc_ticks(0) + proc_ticks(dut),
            ..Default::default()
        };
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let g = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal (guest* are in user)
            snap.busy = g(0) + g(1) + g(2) + g(5) + g(6);
            snap.steal = g(7);
            snap.total = (0..8).map(g).sum();
        }
        snap
    }

    /// Interference from `self` (earlier) to `later`.
    pub fn until(&self, later: &CpuSnap) -> Interference {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let busy = later.busy.saturating_sub(self.busy);
        let ours = later.ours.saturating_sub(self.ours);
        Interference {
            steal_pct: 100.0 * later.steal.saturating_sub(self.steal) as f64 / total,
            other_pct: 100.0 * busy.saturating_sub(ours) as f64 / total,
        }
    }
}
