//! Devices under test: vioswitch (through the testkit's harness) and DPDK
//! testpmd, each pinned to its own core and killed when dropped.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

use crate::pin_current_thread;

/// What a device counted over its whole session.
#[derive(Debug, Default, Clone)]
pub struct DutCounters {
    /// Frames the device took from the guests' TX rings.
    pub rx: u64,
    /// Frames the device put in the guests' RX rings.
    pub tx: u64,
    /// Frames the device dropped (its own counters).
    pub dropped: u64,
    /// Drop reasons or other remarks.
    pub detail: String,
}

/// vioswitch with `ports` ports, one worker, pinned to `core`.
pub struct SwitchDut {
    sw: SwitchProcess,
    names: Vec<String>,
    sockets: Vec<PathBuf>,
}

impl SwitchDut {
    pub fn start(
        binary: &Path,
        ports: usize,
        core: usize,
        gen_core: usize,
        extra: &[String],
    ) -> Result<Self, String> {
        // The child inherits the affinity of the thread that forks it.
        pin_current_thread(core)?;
        let spawned = SwitchProcess::spawn(SwitchOptions {
            workers: 1,
            extra_args: extra.to_vec(),
            binary: Some(binary.to_path_buf()),
        });
        pin_current_thread(gen_core)?;
        let mut sw = spawned.map_err(|e| format!("vioswitch: {e}"))?;
        let mut names = Vec::new();
        let mut sockets = Vec::new();
        for i in 0..ports {
            let name = format!("p{i}");
            sockets.push(
                sw.add_port(&name)
                    .map_err(|e| format!("vioswitch port.add {name}: {e}"))?,
            );
            names.push(name);
        }
        Ok(SwitchDut { sw, names, sockets })
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    pub fn pid(&self) -> u32 {
        self.sw.pid()
    }

    /// Sum of the ports' counters (port.stats).
    pub fn counters(&mut self) -> Result<DutCounters, String> {
        let mut c = DutCounters::default();
        let mut reasons = std::collections::BTreeMap::<String, u64>::new();
        for name in &self.names {
            let s = self
                .sw
                .port_stats(name)
                .map_err(|e| format!("port.stats {name}: {e}"))?;
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            c.rx += n("rx_packets");
            c.tx += n("tx_packets");
            if let Some(Value::Object(d)) = s.get("drops") {
                for (k, v) in d {
                    let v = v.as_u64().unwrap_or(0);
                    c.dropped += v;
                    if v > 0 {
                        *reasons.entry(k.clone()).or_default() += v;
                    }
                }
            }
        }
        c.detail = reasons
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(c)
    }
}

/// How testpmd forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmdMode {
    /// `--forward-mode=io` between vhost port pairs.
    Io,
    /// `--forward-mode=rxonly` on one vhost port: a sink.
    RxOnly,
}

/// DPDK testpmd with vhost-user server ports, one forwarding lcore.
pub struct TestPmd {
    child: Option<Child>,
    dir: PathBuf,
    prefix: String,
    sockets: Vec<PathBuf>,
    log: PathBuf,
    /// The command line, for the report.
    pub cmdline: String,
}

impl TestPmd {
    pub fn start(
        binary: &str,
        ports: usize,
        mode: PmdMode,
        core: usize,
        dir: &Path,
    ) -> Result<Self, String> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("vioswitch-bench-{}-{seq}", std::process::id());
        let sockets: Vec<PathBuf> = (0..ports)
            .map(|i| dir.join(format!("pmd{seq}-{i}.sock")))
            .collect();
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        let mut args: Vec<String> = vec![
            // Main lcore 0 (the idle command loop) and forwarding lcore 1
            // share the one physical core.
            format!("--lcores=(0,1)@{core}"),
            "--main-lcore=0".into(),
            "--no-huge".into(),
            "-m".into(),
            "1024".into(),
            "--no-pci".into(),
            "--iova-mode=va".into(),
            format!("--file-prefix={prefix}"),
        ];
        for (i, s) in sockets.iter().enumerate() {
            args.push(format!(
                "--vdev=net_vhost{i},iface={},queues=1",
                s.display()
            ));
        }
        args.push("--".into());
        args.extend(
            [
                match mode {
                    PmdMode::Io => "--forward-mode=io",
                    PmdMode::RxOnly => "--forward-mode=rxonly",
                },
                "--nb-cores=1",
                "--auto-start",
                "--no-mlockall",
                "--stats-period=0",
            ]
            .map(String::from),
        );
        if mode == PmdMode::RxOnly {
            args.push("--port-topology=loop".into());
        }
        let log = dir.join(format!("testpmd{seq}.log"));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let cmdline = format!("{binary} {}", shell_words(&args));
        let mut cmd = Command::new(binary);
        cmd.args(&args)
            // testpmd runs until it reads a line (or EOF) on stdin.
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the benchmark, and start on the DUT core so that
                // EAL's control threads stay there too.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{binary}: {e} (bench/run.sh installs dpdk)"))?;
        let mut pmd = TestPmd {
            child: Some(child),
            dir: dir.to_path_buf(),
            prefix,
            sockets,
            log,
            cmdline,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pmd.sockets.iter().all(|s| s.exists()) {
            if let Some(Ok(Some(st))) = pmd.child.as_mut().map(Child::try_wait) {
                return Err(format!("testpmd exited ({st}):\n{}", pmd.log_text()));
            }
            if Instant::now() > deadline || crate::stopped() {
                return Err(format!("testpmd made no sockets:\n{}", pmd.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pmd)
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop forwarding (a line on stdin), wait for testpmd to print its
    /// forward statistics and exit, and parse them.
    pub fn finish(&mut self) -> Result<DutCounters, String> {
        let Some(mut child) = self.child.take() else {
            return Err("testpmd already finished".into());
        };
        if let Some(stdin) = child.stdin.as_mut() {
            let _ = stdin.write_all(b"\n");
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        let text = self.log_text();
        parse_testpmd_stats(&text)
            .ok_or_else(|| format!("no forward statistics in testpmd output:\n{text}"))
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        let _ = &self.dir;
        // EAL's runtime directory (root: /var/run/dpdk/PREFIX).
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|_| !nix::unistd::Uid::effective().is_root())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/run"));
        let _ = std::fs::remove_dir_all(runtime.join("dpdk").join(&self.prefix));
    }
}

/// Parse the "Accumulated forward statistics for all ports" block.
fn parse_testpmd_stats(text: &str) -> Option<DutCounters> {
    let start = text.find("Accumulated forward statistics")?;
    let block = &text[start..];
    let field = |name: &str| -> Option<u64> {
        let i = block.find(name)? + name.len();
        block[i..].split_whitespace().next()?.parse().ok()
    };
    let rx = field("RX-packets:")?;
    let tx = field("TX-packets:")?;
    let rx_drop = field("RX-dropped:")?;
    let tx_drop = field("TX-dropped:")?;
    Some(DutCounters {
        rx,
        tx,
        dropped: rx_drop + tx_drop,
        detail: format!("rx_dropped={rx_drop},tx_dropped={tx_drop}"),
    })
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars().any(|c| "()' \"*?$".contains(c)) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accumulated_stats() {
        let text = "
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 7              RX-dropped: 0             RX-total: 7
  TX-packets: 1              TX-dropped: 0             TX-total: 1
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 1234567        RX-dropped: 3             RX-total: 1234570
  TX-packets: 1234000        TX-dropped: 567           TX-total: 1234567
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
        let c = parse_testpmd_stats(text).unwrap();
        assert_eq!((c.rx, c.tx, c.dropped), (1234567, 1234000, 570));
    }
}
