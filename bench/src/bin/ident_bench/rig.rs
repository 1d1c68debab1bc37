//! What every line of the identity benchmark stands on: a fresh vioswitch
//! pinned to its core, guests of the project's driver on its ports, a
//! control connection that sends a command without waiting for the answer
//! (so that the guests are polled while the switch works on it), an event
//! subscription read at leisure (events carry the switch's own time), and
//! the frames of the benchmark.

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig};
use vioswitch_testkit::packets::udp4;
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

use crate::{pin_current_thread, stopped, BenchError};

/// UDP destination port of the benchmark's frames: tells them from the
/// switch's announcements and anything else a guest receives.
pub const UDP_PORT: u16 = 7;
/// Offset of the UDP payload in an untagged IPv4 frame without options.
const PAYLOAD: usize = 14 + 20 + 8;

/// A vioswitch with one worker; killed, its run directory removed, when
/// dropped.
pub struct Switch {
    proc: SwitchProcess,
}

impl Switch {
    /// Start `binary` on `core` (the child inherits the affinity of the
    /// thread that forks it), then pin this thread back to `home`. The
    /// switch logs to its run directory.
    pub fn start(binary: &Path, core: usize, home: usize) -> Result<Switch, BenchError> {
        pin_current_thread(core).map_err(BenchError)?;
        let spawned = SwitchProcess::spawn_logged(SwitchOptions {
            workers: 1,
            extra_args: Vec::new(),
            binary: Some(binary.to_path_buf()),
        });
        pin_current_thread(home).map_err(BenchError)?;
        Ok(Switch {
            proc: spawned.map_err(|e| BenchError(format!("starting vioswitch: {e}")))?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Move every thread of the switch but its worker to `core` (the
    /// worker stays where it started). Threads started later (sessions,
    /// control clients) inherit the affinity of the thread that starts
    /// them: the control thread's or a session's, on `core` now.
    pub fn split(&self, core: usize) -> Result<(), BenchError> {
        let dir = format!("/proc/{}/task", self.pid());
        let tasks = std::fs::read_dir(&dir).map_err(|e| BenchError(format!("{dir}: {e}")))?;
        let mut set = nix::sched::CpuSet::new();
        set.set(core)
            .map_err(|e| BenchError(format!("cpu {core}: {e}")))?;
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if !comm.starts_with("vioswitch-worke") {
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
                    .map_err(|e| BenchError(format!("thread {tid} ({}): {e}", comm.trim())))?;
            }
        }
        Ok(())
    }

    /// One command, waiting for its answer.
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, BenchError> {
        self.proc
            .call(cmd, args.clone())
            .map_err(|e| BenchError(format!("{cmd} {args}: {e}")))
    }

    /// `port.add` with `args`, and a guest with `cfg` on the new port.
    pub fn plug(
        &mut self,
        args: Value,
        cfg: &NetGuestConfig,
    ) -> Result<(PathBuf, NetGuest), BenchError> {
        let r = self.call("port.add", args)?;
        let sock = PathBuf::from(r["socket"].as_str().unwrap_or_default());
        let g = connect(&sock, cfg)?;
        Ok((sock, g))
    }

    /// A second control connection, for commands timed from the outside.
    pub fn lines(&self) -> Result<Lines, BenchError> {
        Lines::connect(&self.proc.control_path())
    }

    /// Subscribe to the switch's events.
    pub fn events(&self) -> Result<Lines, BenchError> {
        let mut l = self.lines()?;
        l.send("events.subscribe", json!({}))?;
        l.answer(Duration::from_secs(10))?;
        Ok(l)
    }

    /// The drop counters of port `name` that are not zero.
    pub fn drops(&mut self, name: &str) -> Result<Value, BenchError> {
        let s = self.call("port.stats", json!({ "name": name }))?;
        let mut out = serde_json::Map::new();
        if let Some(d) = s["drops"].as_object() {
            for (k, v) in d {
                if v.as_u64().is_some_and(|n| n > 0) {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(Value::Object(out))
    }

    /// What the switch logged.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(self.proc.run_dir());
    }
}

/// Connect a guest to `sock`.
pub fn connect(sock: &Path, cfg: &NetGuestConfig) -> Result<NetGuest, BenchError> {
    NetGuest::connect(sock, cfg.clone())
        .map_err(|e| BenchError(format!("guest on {}: {e}", sock.display())))
}

/// A non-blocking control connection: JSON lines written whole, answers
/// and events read as far as they have come.
pub struct Lines {
    conn: UnixStream,
    partial: Vec<u8>,
    next_id: u64,
}

impl Lines {
    fn connect(path: &Path) -> Result<Lines, BenchError> {
        let io = |e: std::io::Error| BenchError(format!("{}: {e}", path.display()));
        let conn = UnixStream::connect(path).map_err(io)?;
        conn.set_nonblocking(true).map_err(io)?;
        Ok(Lines {
            conn,
            partial: Vec::new(),
            next_id: 1,
        })
    }

    /// Write one command (a few hundred bytes: the socket takes it at
    /// once).
    pub fn send(&mut self, cmd: &str, args: Value) -> Result<(), BenchError> {
        let mut line = json!({ "id": self.next_id, "cmd": cmd, "args": args }).to_string();
        line.push('\n');
        self.next_id += 1;
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            match self.conn.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => return Err(BenchError(format!("control write: {e}"))),
            }
        }
        Ok(())
    }

    /// The next complete line, if one has come.
    pub fn poll(&mut self) -> Result<Option<Value>, BenchError> {
        loop {
            if let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=nl).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| BenchError(format!("control line: {e}")));
            }
            let mut buf = [0u8; 4096];
            match self.conn.read(&mut buf) {
                Ok(0) => return Err(BenchError("the control connection ended".into())),
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(BenchError(format!("control read: {e}"))),
            }
        }
    }

    /// Wait up to `timeout` for the answer to the last command; an error
    /// answer is an error.
    pub fn answer(&mut self, timeout: Duration) -> Result<Value, BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.poll()? {
                return ok_result(v);
            }
            if Instant::now() > deadline || stopped() {
                return Err(BenchError("no answer on the control socket".into()));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Every complete line that has come.
    pub fn drain(&mut self) -> Result<Vec<Value>, BenchError> {
        let mut out = Vec::new();
        while let Some(v) = self.poll()? {
            out.push(v);
        }
        Ok(out)
    }
}

/// The `result` of an answer, or its error.
pub fn ok_result(v: Value) -> Result<Value, BenchError> {
    if v["ok"] == json!(true) {
        Ok(v["result"].clone())
    } else {
        Err(BenchError(format!("control answer: {v}")))
    }
}

/// Now on both clocks: the monotonic one for intervals measured here (and,
/// in seconds, to place a round in a `perf record -k CLOCK_MONOTONIC`
/// trace), the wall clock to place the switch's event times (Unix seconds)
/// against it.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub at: Instant,
    pub mono: f64,
    unix: f64,
}

impl Stamp {
    pub fn now() -> Stamp {
        let at = Instant::now();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        Stamp { at, mono, unix }
    }

    /// Microseconds from this stamp to `t`.
    pub fn us_to(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.at).as_secs_f64() * 1e6
    }

    /// Microseconds from this stamp to an event's `time` (negative when
    /// the event came first).
    pub fn us_to_event(&self, event: &Value) -> Option<f64> {
        event["time"].as_f64().map(|t| (t - self.unix) * 1e6)
    }
}

/// An IPv4/UDP frame of `len` bytes (no FCS) to [`UDP_PORT`], its payload
/// starting with `seq`.
pub fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    from: Ipv4Addr,
    to: Ipv4Addr,
    len: usize,
    seq: u64,
) -> Vec<u8> {
    let mut payload = vec![0u8; len.saturating_sub(PAYLOAD).max(8)];
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    udp4(dst, src, (from, 4000), (to, UDP_PORT), &payload)
}

/// The sequence number of a benchmark frame whose first `n` bytes are in
/// `f`, or `None` for anything else.
pub fn seq_of(f: &[u8], n: usize) -> Option<u64> {
    let f = f.get(..n)?;
    if f.get(12..14) != Some(&[8, 0]) || f.get(36..38) != Some(&UDP_PORT.to_be_bytes()) {
        return None;
    }
    Some(u64::from_be_bytes(
        f.get(PAYLOAD..PAYLOAD + 8)?.try_into().ok()?,
    ))
}

/// The destination MAC of `f`.
pub fn dst_of(f: &[u8]) -> [u8; 6] {
    let mut d = [0u8; 6];
    d.copy_from_slice(&f[..6]);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use vioswitch_testkit::frames::mac_str;

    #[test]
    fn frames_carry_their_sequence_and_size() {
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = |x| Ipv4Addr::new(10, 0, 0, x);
        for len in [60, 1514] {
            let f = udp_frame(a, b, ip(1), ip(2), len, 77);
            assert_eq!(f.len(), len);
            assert_eq!(seq_of(&f, f.len()), Some(77));
            assert_eq!(dst_of(&f), a);
        }
        let f = udp_frame(a, b, ip(1), ip(2), 60, 5);
        assert_eq!(seq_of(&f, 20), None, "cut short");
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[8, 6]);
        assert_eq!(seq_of(&arp, arp.len()), None);
        assert_eq!(mac_str(&a), "02:00:00:00:00:01");
    }
}
