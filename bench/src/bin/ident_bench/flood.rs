//! Throughput of one flow p0 -> p1 of IPv4/UDP frames, with and without
//! identities on the ports: the guest on p0 keeps its TX ring full, the
//! frames delivered to p1's guest are counted in 1 s windows.
//!
//! - `plain`: no identity; p1's MAC is learnt.
//! - `security`: identity `src` (p0's MAC and address) bound to p0, so
//!   every frame p0 sends is checked (source MAC and IPv4 address); p1 is
//!   plain.
//! - `mapping`: as `security`, but p0's guest has its own MAC and address
//!   (`guest_mac`, `ip_map`): every frame is rewritten on ingress (source
//!   MAC, source address, both checksums) then checked; and p1 carries
//!   identity `dst` with its own guest MAC and address, so every frame is
//!   rewritten on egress too (destination MAC and address, checksums).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig};

use crate::rig::{dst_of, seq_of, udp_frame, Switch};
use crate::{stopped, BenchError};
use vioswitch_testkit::frames::mac_str;

/// Frames per `send_burst`, bursts per pass at most, frames taken from
/// p1 per pass at most.
const BURST: usize = 32;
const FILL_BURSTS: usize = 8;
const RX_BUDGET: usize = 1024;

/// The identities' MACs and addresses, and their guests' own.
const SRC_MAC: [u8; 6] = [0x02, 0x1d, 0, 0, 0, 0x10];
const SRC_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const SRC_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const SRC_GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const DST_MAC: [u8; 6] = [0x02, 0x1d, 0, 0, 0, 0x20];
const DST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const DST_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x20];
const DST_GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

/// What the ports carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Plain,
    Security,
    Mapping,
}

impl Config {
    pub const ALL: [Config; 3] = [Config::Plain, Config::Security, Config::Mapping];

    pub fn name(self) -> &'static str {
        match self {
            Config::Plain => "plain",
            Config::Security => "security",
            Config::Mapping => "security + mapping",
        }
    }

    /// What p0's guest sends from, and what p1's guest sees as the
    /// destination.
    fn guest_addrs(self) -> (([u8; 6], Ipv4Addr), [u8; 6]) {
        match self {
            Config::Mapping => ((SRC_GUEST_MAC, SRC_GUEST_IP), DST_GUEST_MAC),
            _ => ((SRC_MAC, SRC_IP), DST_MAC),
        }
    }
}

/// A switch with p0 and p1 set up for `config`, a guest on each.
pub struct Flood {
    sw: Switch,
    tx: NetGuest,
    rx: NetGuest,
    frame: Vec<u8>,
    /// The destination MAC of the frames as p1's guest gets them.
    want: [u8; 6],
    buf: [u8; 64],
    /// Frames p1 got that are not the flow's as they should be (the
    /// announcements of the identities' binding, 50 and 200 ms after it).
    pub foreign: u64,
}

impl Flood {
    pub fn start(
        binary: &Path,
        core: usize,
        home: usize,
        config: Config,
        size: usize,
        queue_size: u16,
    ) -> Result<Flood, BenchError> {
        let mut sw = Switch::start(binary, core, home)?;
        let cfg = NetGuestConfig {
            queue_size,
            mem_size: (32 << 20).max(usize::from(queue_size) * (9728 + 2048) + (8 << 20)),
            ..Default::default()
        };
        let (p0, p1) = match config {
            Config::Mapping => (
                json!({"name": "p0", "guest_mac": mac_str(&SRC_GUEST_MAC),
                    "ip_map": [format!("{SRC_IP}={SRC_GUEST_IP}")]}),
                json!({"name": "p1", "guest_mac": mac_str(&DST_GUEST_MAC),
                    "ip_map": [format!("{DST_IP}={DST_GUEST_IP}")]}),
            ),
            _ => (json!({"name": "p0"}), json!({"name": "p1"})),
        };
        let (_, tx) = sw.plug(p0, &cfg)?;
        let (_, rx) = sw.plug(p1, &cfg)?;
        let mut bind = |name: &str, mac: [u8; 6], ip: Ipv4Addr, port: &str| {
            sw.call(
                "identity.add",
                json!({"name": name, "mac": mac_str(&mac), "ips": [ip.to_string()]}),
            )?;
            sw.call("identity.bind", json!({"name": name, "port": port}))
        };
        if config != Config::Plain {
            bind("src", SRC_MAC, SRC_IP, "p0")?;
        }
        if config == Config::Mapping {
            bind("dst", DST_MAC, DST_IP, "p1")?;
        }
        let ((smac, sip), want) = config.guest_addrs();
        // The frames go to the identity's MAC and address: the mapping
        // gives p1's guest its own.
        let frame = udp_frame(DST_MAC, smac, sip, DST_IP, size - 4, 0);
        let mut f = Flood {
            sw,
            tx,
            rx,
            frame,
            want,
            buf: [0; 64],
            foreign: 0,
        };
        f.reach(config, Duration::from_secs(15))?;
        Ok(f)
    }

    pub fn pid(&self) -> u32 {
        self.sw.pid()
    }

    /// Drop counters of p0 and p1 that are not zero.
    pub fn drops(&mut self) -> Result<Value, BenchError> {
        Ok(json!({"p0": self.sw.drops("p0")?, "p1": self.sw.drops("p1")?}))
    }

    /// Until a frame of the flow reaches p1's guest as it should. Where p1
    /// carries no identity, its guest says first where its MAC is (so that
    /// the flow is switched, not flooded).
    fn reach(&mut self, config: Config, limit: Duration) -> Result<(), BenchError> {
        let end = Instant::now() + limit;
        let hello = udp_frame(SRC_MAC, DST_MAC, DST_IP, SRC_IP, 60, 0);
        loop {
            if stopped() {
                return Err(BenchError::interrupted());
            }
            if Instant::now() > end {
                return Err(BenchError(format!(
                    "{}: no frame of the flow reached p1 in {limit:?}",
                    config.name()
                )));
            }
            if config != Config::Mapping {
                self.rx.reclaim_tx();
                let _ = self.rx.send(&hello);
            }
            self.tx.reclaim_tx();
            let _ = self.tx.send(&self.frame);
            std::thread::sleep(Duration::from_millis(5));
            let mut ok = false;
            while let Some(n) = self.rx.recv_into(&mut self.buf) {
                ok |= n == self.frame.len() && dst_of(&self.buf) == self.want;
            }
            while self.tx.recv_into(&mut self.buf).is_some() {}
            if ok {
                return Ok(());
            }
        }
    }

    /// Flood for `warmup`, then count `windows` windows of `window`:
    /// (seconds, frames delivered) each.
    pub fn run(
        &mut self,
        warmup: Duration,
        window: Duration,
        windows: usize,
    ) -> Result<Vec<(f64, u64)>, BenchError> {
        let mut out = Vec::with_capacity(windows);
        let mut start = Instant::now() + warmup;
        let mut counting = false;
        let mut frames = 0u64;
        let refs: [&[u8]; BURST] = [self.frame.as_slice(); BURST];
        loop {
            let now = Instant::now();
            if stopped() {
                return Err(BenchError::interrupted());
            }
            if !counting && now >= start {
                (counting, frames, start) = (true, 0, now);
            } else if counting && now >= start + window {
                out.push((now.duration_since(start).as_secs_f64(), frames));
                if out.len() == windows {
                    return Ok(out);
                }
                (frames, start) = (0, now);
            }
            for _ in 0..FILL_BURSTS {
                if self.tx.send_burst(&refs) < BURST {
                    break;
                }
            }
            for _ in 0..RX_BUDGET {
                let Some(n) = self.rx.recv_into(&mut self.buf) else {
                    break;
                };
                if seq_of(&self.buf, n.min(self.buf.len())).is_some()
                    && dst_of(&self.buf) == self.want
                {
                    frames += 1;
                } else {
                    self.foreign += 1;
                }
            }
        }
    }
}
