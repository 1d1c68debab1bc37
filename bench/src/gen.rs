//! The traffic generator: one thread driving every port's guest (the
//! testkit's `NetGuest`, allocation-free hot path) on one core.
//!
//! Flows are port pairs: port 2k sends to port 2k+1 (the MAC of port i is
//! `02:00:00:00:00:i+1`), which is also testpmd's default "paired" topology.
//! Every data frame carries, right after the Ethernet header, a magic, its
//! flow, a sequence number and (for sampled frames only) a send timestamp.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vioswitch_testkit::guest::{eth_frame, NetGuest};

use crate::hist::Hist;
use crate::STOP;

/// Frames per `send_burst` call (one kick decision per burst).
pub const BURST: usize = 32;
/// RX frames taken per guest per loop iteration.
const RX_BUDGET: usize = 256;
/// EtherType of benchmark frames (IEEE local experimental).
const ETHERTYPE: u16 = 0x88b5;
const MAGIC: u32 = 0x5653_5742; // "VSWB"
const OFF_MAGIC: usize = 14;
const OFF_FLOW: usize = 18;
const OFF_SEQ: usize = 20;
const OFF_TS: usize = 28;
/// Bytes of a received frame the generator reads: the Ethernet header and
/// our fields (the rest of the frame is not touched).
const PEEK: usize = OFF_TS + 8;
/// Smallest frame the generator builds (without FCS): the Ethernet minimum.
pub const MIN_FRAME: usize = 60;

/// The MAC address of port `i`.
pub fn mac(i: usize) -> [u8; 6] {
    let b = (i + 1).to_be_bytes();
    [0x02, 0, 0, 0, b[b.len() - 2], b[b.len() - 1]]
}

struct Flow {
    tx: usize,
    rx: usize,
    frames: Vec<Vec<u8>>,
    seq: u64,
}

/// What one load phase measured.
#[derive(Debug, Default, Clone)]
pub struct Phase {
    /// Data frames the TX rings accepted.
    pub sent: u64,
    /// Data frames received.
    pub recv: u64,
    /// Length of the phase.
    pub elapsed: Duration,
    /// `send_burst` calls that asked for frames.
    pub bursts: u64,
    /// Of those, calls that could not queue the whole burst (ring full).
    pub short_bursts: u64,
}

impl Phase {
    pub fn rx_pps(&self) -> f64 {
        self.recv as f64 / self.elapsed.as_secs_f64()
    }
    pub fn tx_pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
    /// Percentage of bursts that found the TX ring full: the generator
    /// waiting for the device under test.
    pub fn full_pct(&self) -> f64 {
        if self.bursts == 0 {
            0.0
        } else {
            100.0 * self.short_bursts as f64 / self.bursts as f64
        }
    }
}

/// The generator over a set of connected guests.
pub struct Generator {
    guests: Vec<NetGuest>,
    flows: Vec<Flow>,
    base: Instant,
    rxbuf: [u8; PEEK],
    /// Data frames sent and received since creation.
    pub total_sent: u64,
    pub total_recv: u64,
    /// Frames received that are not data frames of a flow ending there.
    pub foreign: u64,
    /// Timestamp one data frame in this many.
    lat_every: u64,
}

impl Generator {
    /// `guests[i]` is port i. With `sink`, a single flow from port 0 to a MAC
    /// no guest has and nothing is received.
    pub fn new(guests: Vec<NetGuest>, frame_len: usize, lat_every: u64, sink: bool) -> Self {
        assert!(frame_len >= MIN_FRAME);
        let pairs: Vec<(usize, usize)> = if sink {
            vec![(0, usize::MAX)]
        } else {
            (0..guests.len() / 2).map(|k| (2 * k, 2 * k + 1)).collect()
        };
        let flows = pairs
            .into_iter()
            .enumerate()
            .map(|(f, (tx, rx))| {
                let dst = if rx == usize::MAX {
                    mac(0xfffe)
                } else {
                    mac(rx)
                };
                let mut payload = vec![0u8; frame_len - 14];
                for (i, b) in payload.iter_mut().enumerate() {
                    *b = i as u8;
                }
                payload[OFF_MAGIC - 14..OFF_FLOW - 14].copy_from_slice(&MAGIC.to_be_bytes());
                payload[OFF_FLOW - 14..OFF_SEQ - 14].copy_from_slice(&(f as u16).to_be_bytes());
                let frame = eth_frame(dst, mac(tx), ETHERTYPE, &payload);
                Flow {
                    tx,
                    rx,
                    frames: vec![frame; BURST],
                    seq: 0,
                }
            })
            .collect();
        Generator {
            guests,
            flows,
            base: Instant::now(),
            rxbuf: [0; PEEK],
            total_sent: 0,
            total_recv: 0,
            foreign: 0,
            lat_every: lat_every.max(1),
        }
    }

    /// Make the device under test ready: each receiving port sends a frame
    /// to its peer (so a learning switch knows its MAC), until every sender
    /// has seen its peer's frame come through (the path works both ways).
    /// Returns how long it took.
    pub fn learn(&mut self, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let mut seen = vec![false; self.flows.len()];
        let mut last_send: Option<Instant> = None;
        while seen.iter().any(|s| !s) {
            if STOP.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            if t0.elapsed() > timeout {
                return Err(format!("no path through the device after {timeout:?}"));
            }
            if last_send.is_none_or(|t| t.elapsed() > Duration::from_millis(200)) {
                for (f, fl) in self.flows.iter().enumerate() {
                    if seen[f] {
                        continue;
                    }
                    let frame = eth_frame(mac(fl.tx), mac(fl.rx), 0x88b6, &[0u8; 46]);
                    let g = &mut self.guests[fl.rx];
                    g.reclaim_tx();
                    // A full ring here means the device is not draining yet.
                    let _ = g.send(&frame);
                }
                last_send = Some(Instant::now());
            }
            for (f, fl) in self.flows.iter().enumerate() {
                let g = &mut self.guests[fl.tx];
                while let Some(len) = g.recv_into(&mut self.rxbuf) {
                    let b = &self.rxbuf[..len.min(PEEK)];
                    if b.len() >= 14 && b[12..14] == 0x88b6u16.to_be_bytes() {
                        seen[f] = true;
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(t0.elapsed())
    }

    /// Stamp and send one burst on flow `f`; returns frames queued.
    #[inline]
    fn send_flow(&mut self, f: usize, want: usize) -> usize {
        let every = self.lat_every;
        let fl = &mut self.flows[f];
        let mut ts = 0;
        for (i, fr) in fl.frames[..want].iter_mut().enumerate() {
            let seq = fl.seq + i as u64;
            fr[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_ne_bytes());
            let stamp = if seq % every == 0 {
                if ts == 0 {
                    ts = self.base.elapsed().as_nanos() as u64 | 1;
                }
                ts
            } else {
                0
            };
            fr[OFF_TS..OFF_TS + 8].copy_from_slice(&stamp.to_ne_bytes());
        }
        let mut refs: [&[u8]; BURST] = [&[]; BURST];
        for (r, fr) in refs.iter_mut().zip(&fl.frames[..want]) {
            *r = fr;
        }
        let n = self.guests[fl.tx].send_burst(&refs[..want]);
        fl.seq += n as u64;
        n
    }

    /// Receive what port `g` has (up to a budget); returns data frames, and
    /// records the latency of stamped ones in `hist`.
    #[inline]
    fn recv_port(&mut self, g: usize, hist: Option<&mut Hist>) -> u64 {
        let mut n = 0;
        let mut foreign = 0;
        let mut hist = hist;
        for _ in 0..RX_BUDGET {
            let Some(len) = self.guests[g].recv_into(&mut self.rxbuf) else {
                break;
            };
            let b = &self.rxbuf;
            if len < OFF_TS + 8 || b[OFF_MAGIC..OFF_FLOW] != MAGIC.to_be_bytes() {
                foreign += 1;
                continue;
            }
            n += 1;
            if let Some(h) = hist.as_deref_mut() {
                let ts = u64::from_ne_bytes(b[OFF_TS..OFF_TS + 8].try_into().unwrap());
                if ts != 0 {
                    let now = self.base.elapsed().as_nanos() as u64;
                    h.record(now.saturating_sub(ts));
                }
            }
        }
        self.foreign += foreign;
        n
    }

    /// Offer load for `dur`: as fast as the TX rings take it, or paced to
    /// `pace_pps` frames/s in total. Latency of stamped frames goes to
    /// `hist` when given.
    pub fn load(
        &mut self,
        dur: Duration,
        pace_pps: Option<f64>,
        mut hist: Option<&mut Hist>,
    ) -> Phase {
        let mut ph = Phase::default();
        let t0 = Instant::now();
        let end = t0 + dur;
        let nflows = self.flows.len();
        let mut iter = 0u32;
        let mut now = t0;
        loop {
            iter = iter.wrapping_add(1);
            if iter % 16 == 0 || pace_pps.is_some() {
                now = Instant::now();
                if now >= end || STOP.load(Ordering::Relaxed) {
                    break;
                }
            }
            for f in 0..nflows {
                let want = match pace_pps {
                    None => BURST,
                    Some(pps) => {
                        let due = (pps * now.duration_since(t0).as_secs_f64()) as u64;
                        (due.saturating_sub(ph.sent) as usize).min(BURST)
                    }
                };
                if want > 0 {
                    let n = self.send_flow(f, want);
                    ph.sent += n as u64;
                    ph.bursts += 1;
                    if n < want {
                        ph.short_bursts += 1;
                    }
                }
                let rx = self.flows[f].rx;
                if rx != usize::MAX {
                    ph.recv += self.recv_port(rx, hist.as_deref_mut());
                }
            }
        }
        ph.elapsed = now.duration_since(t0);
        self.total_sent += ph.sent;
        self.total_recv += ph.recv;
        ph
    }

    /// Stop sending and receive what is still in flight: until the TX rings
    /// are empty and nothing arrived for 50 ms, at most `max`. Returns the
    /// data frames received meanwhile.
    pub fn drain(&mut self, max: Duration) -> u64 {
        let t0 = Instant::now();
        let mut last = Instant::now();
        let mut total = 0;
        while t0.elapsed() < max && last.elapsed() < Duration::from_millis(50) {
            let mut busy = false;
            for f in 0..self.flows.len() {
                let rx = self.flows[f].rx;
                if rx != usize::MAX {
                    let got = self.recv_port(rx, None);
                    total += got;
                    busy |= got > 0;
                }
                let tx = self.flows[f].tx;
                self.guests[tx].reclaim_tx();
                busy |= self.guests[tx].tx_in_flight() > 0;
            }
            if busy {
                last = Instant::now();
            }
        }
        self.total_recv += total;
        total
    }

    /// Unloaded latency: one frame at a time on flow 0, waiting for it
    /// before sending the next; `samples` frames or `max` time.
    pub fn ping_pong(&mut self, samples: u64, max: Duration, hist: &mut Hist) -> u64 {
        let t0 = Instant::now();
        let (tx, rx) = (self.flows[0].tx, self.flows[0].rx);
        let mut lost = 0;
        let saved = self.lat_every;
        self.lat_every = 1;
        for _ in 0..samples {
            if t0.elapsed() > max || STOP.load(Ordering::Relaxed) {
                break;
            }
            self.guests[tx].reclaim_tx();
            if self.send_flow(0, 1) != 1 {
                continue;
            }
            self.total_sent += 1;
            let sent_at = Instant::now();
            loop {
                let got = self.recv_port(rx, Some(hist));
                if got > 0 {
                    self.total_recv += got;
                    break;
                }
                if sent_at.elapsed() > Duration::from_millis(20) {
                    lost += 1;
                    break;
                }
            }
        }
        self.lat_every = saved;
        lost
    }

    /// Give the guests back (to disconnect them).
    pub fn into_guests(self) -> Vec<NetGuest> {
        self.guests
    }
}
