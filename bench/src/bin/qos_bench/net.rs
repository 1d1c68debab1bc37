//! Net ports under QoS: a vioswitch with one worker and `n` ports, the
//! project's guest driver on each port, and a generator that floods flows
//! (source port to destination port) and counts, per flow and per window,
//! the frames and bytes delivered to the destination guest.
//!
//! A delivered frame is attributed to its flow by its source MAC (port `i`
//! sends from `02:00:00:00:hi:lo` with `hi:lo = i + 1`), so several flows may
//! share one destination.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::guest::{eth_frame, NetGuest, NetGuestConfig};
use vioswitch_testkit::switch::SwitchProcess;

use crate::{stopped, Daemon, QosBenchError};

/// Frames per `send_burst` call.
const BURST: usize = 32;
/// Most bursts sent to one port per pass of the generator.
const FILL_BURSTS: usize = 8;
/// Frames taken from one destination per pass of the generator.
const RX_BUDGET: usize = 1024;
/// EtherType of benchmark frames (IEEE local experimental).
const ETHERTYPE: u16 = 0x88b5;
/// EtherType of the frames that teach the switch the destinations' MACs.
const LEARN_ETHERTYPE: u16 = 0x88b6;
/// Bytes of a received frame the generator reads: the Ethernet header.
const PEEK: usize = 14;

/// The MAC address of port `i`.
pub fn mac(i: usize) -> [u8; 6] {
    let b = (i + 1).to_be_bytes();
    [0x02, 0, 0, 0, b[b.len() - 2], b[b.len() - 1]]
}

/// The port whose MAC is `src`, if it is one of ours.
fn port_of(src: &[u8]) -> Option<usize> {
    match src {
        [0x02, 0, 0, 0, hi, lo] => usize::from(u16::from_be_bytes([*hi, *lo])).checked_sub(1),
        _ => None,
    }
}

/// One flow: every frame port `src` sends goes to port `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: usize,
    pub dst: usize,
}

/// What the destinations received in one window, per flow.
#[derive(Debug, Clone, Default)]
pub struct Window {
    /// Length of the window in seconds.
    pub secs: f64,
    /// Frame bytes (Ethernet header to payload end, no FCS: what the
    /// switch's meters count) delivered per flow.
    pub bytes: Vec<u64>,
    /// Frames delivered per flow.
    pub frames: Vec<u64>,
    /// Frame bytes the switch took from each flow's source ring (its
    /// `rx_bytes` counter): the worker's service, before any drop.
    pub taken: Vec<u64>,
    /// Passes of the generator, and of those, per flow, the passes that
    /// found the source's TX ring full (the switch, not the generator,
    /// held the flow back).
    pub passes: u64,
    pub full: Vec<u64>,
}

impl Window {
    /// Delivered bits per second of flow `f`.
    pub fn bps(&self, f: usize) -> f64 {
        self.bytes[f] as f64 * 8.0 / self.secs.max(1e-9)
    }

    /// Bits per second the switch took from flow `f`'s source.
    pub fn taken_bps(&self, f: usize) -> f64 {
        self.taken[f] as f64 * 8.0 / self.secs.max(1e-9)
    }
}

/// vioswitch (one worker) with ports `p0..pN`, a guest on each, and the
/// generator's state.
pub struct NetRig {
    sw: Daemon,
    guests: Vec<NetGuest>,
    flows: Vec<Flow>,
    /// The flow of each source port (usize::MAX: the port sends nothing).
    flow_of_src: Vec<usize>,
    /// Ports that receive (each once).
    receivers: Vec<usize>,
    /// One frame per sending port, ready to go.
    frames: Vec<Vec<u8>>,
    rxbuf: [u8; PEEK],
    /// Frames not of any flow (learning frames, floods).
    pub foreign: u64,
}

impl NetRig {
    /// Start `binary` pinned to `core` with `ports` ports, connect a guest
    /// with `queue_size`-entry rings to each, and make the switch learn
    /// every destination of `flows`. Frames are `size` bytes with the FCS
    /// (the rings carry `size - 4`). This thread is pinned to `gen_core`.
    pub fn start(
        binary: &Path,
        ports: usize,
        flows: &[Flow],
        size: usize,
        queue_size: u16,
        core: usize,
        gen_core: usize,
    ) -> Result<NetRig, QosBenchError> {
        let mut sw = Daemon::start(binary, core, gen_core)?;
        let qs = usize::from(queue_size);
        let cfg = NetGuestConfig {
            queue_size,
            mem_size: (32 << 20).max(qs * (9728 + 2048) + (8 << 20)),
            ..Default::default()
        };
        let mut guests = Vec::with_capacity(ports);
        for i in 0..ports {
            let name = format!("p{i}");
            let sock =
                sw.0.add_port(&name)
                    .map_err(|e| QosBenchError::switch(&format!("port.add {name}"), e))?;
            guests.push(NetGuest::connect(&sock, cfg.clone()).map_err(|source| {
                QosBenchError::Guest {
                    what: format!("connect {}", sock.display()),
                    source,
                }
            })?);
        }
        let mut flow_of_src = vec![usize::MAX; ports];
        let mut receivers = Vec::new();
        let mut frames = vec![Vec::new(); ports];
        for (f, fl) in flows.iter().enumerate() {
            if fl.src >= ports || fl.dst >= ports || flow_of_src[fl.src] != usize::MAX {
                return Err(QosBenchError::Setup(format!(
                    "bad flow {fl:?} ({ports} ports, one flow per source)"
                )));
            }
            flow_of_src[fl.src] = f;
            if !receivers.contains(&fl.dst) {
                receivers.push(fl.dst);
            }
            let payload: Vec<u8> = (0..size - 4 - 14).map(|i| i as u8).collect();
            frames[fl.src] = eth_frame(mac(fl.dst), mac(fl.src), ETHERTYPE, &payload);
        }
        let mut rig = NetRig {
            sw,
            guests,
            flows: flows.to_vec(),
            flow_of_src,
            receivers,
            frames,
            rxbuf: [0; PEEK],
            foreign: 0,
        };
        rig.learn(Duration::from_secs(15))?;
        Ok(rig)
    }

    /// The switch's process id.
    pub fn pid(&self) -> u32 {
        self.sw.0.pid()
    }

    /// `qos.set` on port `p{port}` with the fields of `spec` (a QosSpec as
    /// JSON).
    pub fn set_qos(&mut self, port: usize, spec: &Value) -> Result<(), QosBenchError> {
        set_qos(&mut self.sw.0, &format!("p{port}"), spec)
    }

    /// The `port.stats` of port `p{port}`.
    pub fn port_stats(&mut self, port: usize) -> Result<Value, QosBenchError> {
        let name = format!("p{port}");
        self.sw
            .0
            .port_stats(&name)
            .map_err(|e| QosBenchError::switch(&format!("port.stats {name}"), e))
    }

    /// Each destination sends a frame to each of its sources until every
    /// source has seen one: the switch knows every destination's MAC.
    fn learn(&mut self, timeout: Duration) -> Result<(), QosBenchError> {
        let t0 = Instant::now();
        let mut seen = vec![false; self.flows.len()];
        let mut last_send: Option<Instant> = None;
        while seen.iter().any(|s| !s) {
            if stopped() {
                return Err(QosBenchError::Interrupted);
            }
            if t0.elapsed() > timeout {
                return Err(QosBenchError::Setup(format!(
                    "no path through the switch after {timeout:?}"
                )));
            }
            if last_send.is_none_or(|t| t.elapsed() > Duration::from_millis(200)) {
                for (f, fl) in self.flows.iter().enumerate() {
                    if !seen[f] {
                        let frame =
                            eth_frame(mac(fl.src), mac(fl.dst), LEARN_ETHERTYPE, &[0u8; 46]);
                        let g = &mut self.guests[fl.dst];
                        g.reclaim_tx();
                        // A full ring here means the switch is not draining yet.
                        let _ = g.send(&frame);
                    }
                }
                last_send = Some(Instant::now());
            }
            for (f, fl) in self.flows.iter().enumerate() {
                while let Some(len) = self.guests[fl.src].recv_into(&mut self.rxbuf) {
                    if len >= PEEK && self.rxbuf[12..14] == LEARN_ETHERTYPE.to_be_bytes() {
                        seen[f] = true;
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Frames flooded to other ports while the switch learned.
        for g in &mut self.guests {
            while g.recv_into(&mut self.rxbuf).is_some() {}
        }
        Ok(())
    }

    /// Flood every flow as fast as the rings take it for `warmup`, then for
    /// `windows` windows of `window` each; returns what each window
    /// delivered per flow.
    pub fn run(
        &mut self,
        warmup: Duration,
        window: Duration,
        windows: usize,
    ) -> Result<Vec<Window>, QosBenchError> {
        let nflows = self.flows.len();
        let fresh = || Window {
            secs: 0.0,
            bytes: vec![0; nflows],
            frames: vec![0; nflows],
            taken: vec![0; nflows],
            passes: 0,
            full: vec![0; nflows],
        };
        let mut out = Vec::with_capacity(windows);
        let mut cur = fresh();
        let t0 = Instant::now();
        let mut measuring = false;
        let mut win_start = t0 + warmup;
        let mut taken = Vec::new();
        loop {
            let now = Instant::now();
            if stopped() {
                return Err(QosBenchError::Interrupted);
            }
            if !measuring && now >= win_start {
                // Start of the first window: forget the warm-up.
                measuring = true;
                cur = fresh();
                taken = self.rx_bytes()?;
                win_start = Instant::now();
            } else if measuring && now >= win_start + window {
                let t = self.rx_bytes()?;
                let end = Instant::now();
                cur.secs = end.duration_since(win_start).as_secs_f64();
                for (c, (t, t0)) in cur.taken.iter_mut().zip(t.iter().zip(&taken)) {
                    *c = t.saturating_sub(*t0);
                }
                taken = t;
                out.push(std::mem::replace(&mut cur, fresh()));
                win_start = end;
                if out.len() == windows {
                    return Ok(out);
                }
            }
            // Fill each TX ring (up to a bound per pass): a port the switch
            // serves faster gets more, so no ring the switch could take
            // from stays empty while the generator serves the others.
            cur.passes += 1;
            for (f, fl) in self.flows.iter().enumerate() {
                let s = fl.src;
                let refs: [&[u8]; BURST] = [self.frames[s].as_slice(); BURST];
                for _ in 0..FILL_BURSTS {
                    if self.guests[s].send_burst(&refs) < BURST {
                        cur.full[f] += 1;
                        break;
                    }
                }
            }
            for &r in &self.receivers {
                for _ in 0..RX_BUDGET {
                    let Some(len) = self.guests[r].recv_into(&mut self.rxbuf) else {
                        break;
                    };
                    let f = port_of(&self.rxbuf[6..12])
                        .and_then(|p| self.flow_of_src.get(p).copied())
                        .filter(|&f| f < nflows && self.flows[f].dst == r);
                    match f {
                        Some(f) if self.rxbuf[12..14] == ETHERTYPE.to_be_bytes() => {
                            cur.bytes[f] += len as u64;
                            cur.frames[f] += 1;
                        }
                        _ => self.foreign += 1,
                    }
                }
            }
        }
    }
}

impl NetRig {
    /// The switch's `rx_bytes` counter of each flow's source port.
    fn rx_bytes(&mut self) -> Result<Vec<u64>, QosBenchError> {
        let srcs: Vec<usize> = self.flows.iter().map(|f| f.src).collect();
        srcs.into_iter()
            .map(|p| {
                let s = self.port_stats(p)?;
                s.get("rx_bytes").and_then(Value::as_u64).ok_or_else(|| {
                    QosBenchError::Setup(format!("port.stats p{p} has no rx_bytes: {s}"))
                })
            })
            .collect()
    }
}

/// `qos.set {name, ...spec}` on `sw`; an unknown command is reported as such.
pub fn set_qos(sw: &mut SwitchProcess, name: &str, spec: &Value) -> Result<(), QosBenchError> {
    let mut args = json!({ "name": name });
    if let (Some(a), Some(s)) = (args.as_object_mut(), spec.as_object()) {
        a.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    sw.call("qos.set", args.clone())
        .map(drop)
        .map_err(|e| QosBenchError::switch(&format!("qos.set {args}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_map_back_to_ports() {
        for i in [0, 1, 7, 300] {
            assert_eq!(port_of(&mac(i)), Some(i));
        }
        assert_eq!(port_of(&[0xff; 6]), None);
        assert_eq!(port_of(&[0x02, 0, 0, 0, 0, 0]), None);
    }
}
