//! Moves and failovers under a steady stream: ports a, b and c, identity
//! `svc` (MAC [`IDENT`], [`IP`]) bound to a. The guests on a and c have
//! their own MACs and addresses (`guest_mac` and `ip_map`), so that the
//! switch maps the identity to the guest it is bound to, and only then:
//! a frame for the identity reaches a guest addressed to it only once the
//! port has the identity's policy. The guest on b sends one small frame
//! to the identity every `gap`, each with a sequence number; this thread
//! sends them and polls a's and c's RX rings in one loop, so a frame is
//! seen within a pass of the loop (well under a microsecond) of its
//! delivery.
//!
//! A round starts at t0, just before the move command is written on the
//! control socket (or before the bound guest's connection is closed) and
//! ends at the first stream frame delivered to the identity's new port
//! *addressed to its guest*: the first the new guest takes. That frame may
//! have been sent before t0: sent while the move was under way, it was
//! switched to the new port all the same. Frames that reach the new port
//! unmapped (switched there before its policy had the identity, or flooded
//! while the old port is detached) are counted apart: its guest drops
//! them.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::guest::{GuestError, NetGuest, NetGuestConfig};

use crate::rig::{connect, dst_of, seq_of, udp_frame, Lines, Stamp, Switch};
use crate::{stopped, BenchError};
use vioswitch_testkit::frames::mac_str;

/// The identity's MAC and address.
pub const IDENT: [u8; 6] = [0x02, 0x1d, 0, 0, 0, 0x01];
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The sender on b.
const PEER: [u8; 6] = [0x02, 0x1d, 0, 0, 0, 0x02];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The ports that take the identity in turn, and their guests' own MACs
/// and addresses.
const SIDES: [&str; 2] = ["a", "c"];
const EXPECT: [[u8; 6]; 2] = [[0x52, 0x54, 0, 0, 0, 0xaa], [0x52, 0x54, 0, 0, 0, 0xcc]];
const GUEST_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 168, 7, 1), Ipv4Addr::new(192, 168, 7, 3)];
/// Frames of the stream (no FCS).
const FRAME_LEN: usize = 60;
/// Send times kept, by sequence number modulo this.
const SENT_RING: usize = 1 << 20;
/// How long a round may take before it counts as failed.
const ROUND_LIMIT: Duration = Duration::from_secs(3);

/// What one move or failover measured, microseconds from t0.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// t0 on CLOCK_MONOTONIC, seconds.
    pub t0_mono: f64,
    pub from: &'static str,
    pub to: &'static str,
    /// The first stream frame on the new port that its guest takes.
    pub first_us: f64,
    /// Writing the command, or closing the guest (its memory freed too):
    /// this loop was not polling meanwhile.
    pub start_us: f64,
    /// When that frame was sent (negative: before t0).
    pub first_sent_us: f64,
    /// The first stream frame on the new port, whatever its address.
    pub first_any_us: f64,
    /// Stream frames on the new port not addressed to its guest.
    pub misaddressed: u64,
    /// The command's answer (moves).
    pub answer_us: Option<f64>,
    /// `port.disconnected` (failovers) by the switch's clock: the guest's
    /// end seen and the port detached, just before the failover starts.
    pub seen_us: Option<f64>,
    /// `identity.moved` by the switch's clock (sent once the state is
    /// saved).
    pub moved_event_us: Option<f64>,
    /// Stream frames on the old port after t0, and of those, frames sent
    /// after the command had returned.
    pub old_after: u64,
    pub late_old: u64,
    /// Frames sent from 1 ms before t0 until the next round's boundary
    /// that reached no port (filled in at the end).
    pub lost: u64,
}

impl Sample {
    pub fn json(&self) -> Value {
        json!({"t0_mono": self.t0_mono, "from": self.from, "to": self.to, "first_us": self.first_us, "start_us": self.start_us,
            "first_sent_us": self.first_sent_us, "first_any_us": self.first_any_us,
            "misaddressed": self.misaddressed, "answer_us": self.answer_us,
            "seen_us": self.seen_us, "moved_event_us": self.moved_event_us,
            "old_after": self.old_after, "late_old": self.late_old, "lost": self.lost})
    }
}

/// A round under way.
struct Round {
    t0: Stamp,
    from: usize,
    to: usize,
    /// First delivery on the new port: any, and taken by its guest (when,
    /// which frame).
    first_any: Option<Instant>,
    first: Option<(Instant, u64)>,
    misaddressed: u64,
    answered: Option<Instant>,
    old_after: u64,
    late_old: u64,
}

/// The switch, its three guests and the stream.
pub struct Live {
    sw: Switch,
    ctl: Lines,
    events: Lines,
    /// a's and c's guests (none while disconnected) and sockets.
    sides: [Option<NetGuest>; 2],
    socks: [PathBuf; 2],
    b: NetGuest,
    cfg: NetGuestConfig,
    /// Where the identity is bound.
    bound: usize,
    gap: Duration,
    seq: u64,
    next_send: Instant,
    sent_at: Vec<Instant>,
    /// One bit per sequence number: delivered to a or c.
    got: Vec<u64>,
    round: Option<Round>,
    /// Stream frames outside rounds on the port without the identity, or
    /// not addressed to the guest.
    pub stray: u64,
    pub misaddressed_outside: u64,
    buf: [u8; 64],
    last_ctl_poll: Instant,
}

impl Live {
    /// Start the switch and the guests; `standby` makes the identity fail
    /// over between a and c by itself, with `stall_ms`. `split` leaves the
    /// switch's worker alone on `core` and puts its other threads on
    /// `home`.
    pub fn start(
        binary: &std::path::Path,
        (core, home, split): (usize, usize, bool),
        gap: Duration,
        standby: bool,
        stall_ms: u64,
    ) -> Result<Live, BenchError> {
        let mut sw = Switch::start(binary, core, home)?;
        if split {
            sw.split(home)?;
        }
        let cfg = NetGuestConfig::default();
        let mut side = |i: usize| {
            let args = json!({"name": SIDES[i], "guest_mac": mac_str(&EXPECT[i]),
                "ip_map": [format!("{IP}={}", GUEST_IPS[i])]});
            sw.plug(args, &cfg)
        };
        let (sa, a) = side(0)?;
        let (sc, c) = side(1)?;
        let (_, b) = sw.plug(json!({"name": "b"}), &cfg)?;
        let standby: Vec<&str> = if standby { SIDES.to_vec() } else { Vec::new() };
        sw.call(
            "identity.add",
            json!({"name": "svc", "mac": mac_str(&IDENT), "ips": [IP.to_string()],
                "standby": standby, "stall_ms": stall_ms}),
        )?;
        sw.call("identity.bind", json!({"name": "svc", "port": "a"}))?;
        let ctl = sw.lines()?;
        let events = sw.events()?;
        let now = Instant::now();
        Ok(Live {
            sw,
            ctl,
            events,
            sides: [Some(a), Some(c)],
            socks: [sa, sc],
            b,
            cfg,
            bound: 0,
            gap,
            seq: 0,
            next_send: now,
            sent_at: vec![now; SENT_RING],
            got: Vec::new(),
            round: None,
            stray: 0,
            misaddressed_outside: 0,
            buf: [0; 64],
            last_ctl_poll: now,
        })
    }

    pub fn pid(&self) -> u32 {
        self.sw.pid()
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u64 {
        self.seq
    }

    /// Frames sent that reached a or c.
    pub fn delivered(&self) -> u64 {
        self.got.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The drop counters of every port that are not zero.
    pub fn drops(&mut self) -> Result<Value, BenchError> {
        let mut out = serde_json::Map::new();
        for p in ["a", "b", "c"] {
            let d = self.sw.drops(p)?;
            if d.as_object().is_some_and(|m| !m.is_empty()) {
                out.insert(p.to_string(), d);
            }
        }
        Ok(Value::Object(out))
    }

    /// The switch's log.
    pub fn log(&self) -> String {
        self.sw.log()
    }

    /// One pass: send the next frame when due, take what a, b and c got.
    fn pass(&mut self) -> Result<(), BenchError> {
        let now = Instant::now();
        if now >= self.next_send {
            let f = udp_frame(IDENT, PEER, PEER_IP, IP, FRAME_LEN, self.seq);
            match self.b.send(&f) {
                Ok(()) => {
                    self.sent_at[self.seq as usize % SENT_RING] = now;
                    self.seq += 1;
                }
                // The switch is behind: try again next pass.
                Err(GuestError::RingFull) => {}
                Err(e) => return Err(BenchError(format!("send on b: {e}"))),
            }
            // No catching up in bursts after a pause.
            self.next_send = (self.next_send + self.gap).max(now);
        }
        for (side, expect) in EXPECT.iter().enumerate() {
            while let Some(n) = self.sides[side]
                .as_mut()
                .and_then(|g| g.recv_into(&mut self.buf))
            {
                if let Some(seq) = seq_of(&self.buf, n.min(self.buf.len())) {
                    let ok = dst_of(&self.buf) == *expect;
                    self.on_stream(side, seq, ok, Instant::now());
                }
            }
        }
        // b gets the announcements and nothing else.
        while self.b.recv_into(&mut self.buf).is_some() {}
        if let Some(r) = &mut self.round {
            if r.answered.is_none()
                && now.duration_since(self.last_ctl_poll) >= Duration::from_micros(10)
            {
                self.last_ctl_poll = now;
                if let Some(v) = self.ctl.poll()? {
                    r.answered = Some(Instant::now());
                    crate::rig::ok_result(v)?;
                }
            }
        }
        Ok(())
    }

    fn on_stream(&mut self, side: usize, seq: u64, ok: bool, now: Instant) {
        let (w, bit) = ((seq / 64) as usize, seq % 64);
        if self.got.len() <= w {
            self.got.resize(w + 1, 0);
        }
        self.got[w] |= 1 << bit;
        let sent = self.sent_at[seq as usize % SENT_RING];
        match &mut self.round {
            Some(r) if side == r.to => {
                r.first_any.get_or_insert(now);
                if ok {
                    r.first.get_or_insert((now, seq));
                } else {
                    r.misaddressed += 1;
                }
            }
            Some(r) => {
                r.old_after += 1;
                if r.answered.is_some_and(|t| sent > t) {
                    r.late_old += 1;
                }
            }
            None if side != self.bound => self.stray += 1,
            None if !ok => self.misaddressed_outside += 1,
            None => {}
        }
    }

    /// Keep the stream going for `d`.
    pub fn run_for(&mut self, d: Duration) -> Result<(), BenchError> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if stopped() {
                return Err(BenchError::interrupted());
            }
            self.pass()?;
        }
        Ok(())
    }

    /// Keep the stream going until `done` (looked at every 100 µs) or
    /// `limit`.
    fn run_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&mut Live) -> Result<bool, BenchError>,
    ) -> Result<(), BenchError> {
        let end = Instant::now() + limit;
        let mut look = Instant::now();
        loop {
            if stopped() {
                return Err(BenchError::interrupted());
            }
            self.pass()?;
            let now = Instant::now();
            if now >= look {
                if done(self)? {
                    return Ok(());
                }
                look = now + Duration::from_micros(100);
            }
            if now > end {
                return Err(BenchError(format!("{what}: nothing after {limit:?}")));
            }
        }
    }

    /// Settle for `settle` (the later announcement rounds of the last move
    /// go out 50 and 200 ms after it), then start a round towards the other
    /// port; returns the first sequence number of the round (sent 1 ms
    /// before t0).
    fn settle(&mut self, settle: Duration) -> Result<u64, BenchError> {
        self.run_for(settle.saturating_sub(Duration::from_millis(1)))?;
        let boundary = self.seq;
        self.run_for(Duration::from_millis(1))?;
        Ok(boundary)
    }

    fn begin(&mut self) -> Stamp {
        let t0 = Stamp::now();
        self.round = Some(Round {
            t0,
            from: self.bound,
            to: 1 - self.bound,
            first_any: None,
            first: None,
            misaddressed: 0,
            answered: None,
            old_after: 0,
            late_old: 0,
        });
        t0
    }

    /// Run the round until its first frame taken by the new guest (and for
    /// a move, the command's answer); the round's sample.
    fn finish(&mut self, what: &str, command: bool) -> Result<Sample, BenchError> {
        self.run_until(what, ROUND_LIMIT, |l| {
            Ok(l.round
                .as_ref()
                .is_some_and(|r| r.first.is_some() && (!command || r.answered.is_some())))
        })?;
        let Some(r) = self.round.take() else {
            return Err(BenchError("no round".into()));
        };
        self.bound = r.to;
        let (first, seq) = r.first.unwrap_or((r.t0.at, 0));
        let sent = self.sent_at[seq as usize % SENT_RING];
        let first_sent_us = if sent >= r.t0.at {
            r.t0.us_to(sent)
        } else {
            -(r.t0.at.duration_since(sent).as_secs_f64() * 1e6)
        };
        let mut s = Sample {
            t0_mono: r.t0.mono,
            from: SIDES[r.from],
            to: SIDES[r.to],
            first_us: r.t0.us_to(first),
            first_sent_us,
            first_any_us: r.t0.us_to(r.first_any.unwrap_or(first)),
            misaddressed: r.misaddressed,
            answer_us: r.answered.map(|t| r.t0.us_to(t)),
            old_after: r.old_after,
            late_old: r.late_old,
            ..Default::default()
        };
        // The events of the round, by the switch's clock.
        let (from, to) = (SIDES[r.from], SIDES[r.to]);
        let mut moved = None;
        let mut seen = None;
        self.run_until(&format!("{what}: identity.moved"), ROUND_LIMIT, |l| {
            for e in l.events.drain()? {
                if e["event"] == "identity.moved" && e["from"] == from && e["to"] == to {
                    moved = r.t0.us_to_event(&e);
                } else if e["event"] == "port.disconnected" && e["port"] == from {
                    seen = r.t0.us_to_event(&e);
                }
            }
            Ok(moved.is_some() && (command || seen.is_some()))
        })?;
        s.moved_event_us = moved;
        s.seen_us = seen;
        Ok(s)
    }

    /// `n` rounds, `settle` apart, back and forth between a and c: moves
    /// by command, or failovers (the bound guest's connection closes, the
    /// identity moves to the other port, its standby; the guest connects
    /// again and is a standby in turn).
    pub fn rounds(
        &mut self,
        n: usize,
        settle: Duration,
        failover: bool,
    ) -> Result<Vec<Sample>, BenchError> {
        let mut out = Vec::with_capacity(n);
        let mut bounds = Vec::with_capacity(n + 1);
        for i in 0..n {
            bounds.push(self.settle(settle)?);
            let (from, to) = (self.bound, SIDES[1 - self.bound]);
            let what = format!("round {} ({} -> {to})", i + 1, SIDES[from]);
            let t0 = self.begin();
            if failover {
                // The socket closes first (field order), then the memory
                // goes: this loop polls again after both.
                drop(self.sides[from].take());
            } else {
                self.ctl
                    .send("identity.move", json!({"name": "svc", "to": to}))?;
            }
            let busy = t0.us_to(Instant::now());
            let mut s = self.finish(&what, !failover)?;
            s.start_us = busy;
            out.push(s);
            if failover {
                self.sides[from] = Some(connect(&self.socks[from], &self.cfg)?);
                self.wait_healthy(SIDES[from])?;
            }
        }
        self.close(&mut out, bounds, settle)?;
        Ok(out)
    }

    /// Until `identity.show` says `port` is a healthy standby again.
    fn wait_healthy(&mut self, port: &str) -> Result<(), BenchError> {
        let mut next = Instant::now();
        let mut last = Value::Null;
        let res = self.run_until(&format!("{port} healthy"), ROUND_LIMIT, |l| {
            if Instant::now() < next {
                return Ok(false);
            }
            next = Instant::now() + Duration::from_millis(5);
            last = l.sw.call("identity.show", json!({"name": "svc"}))?;
            Ok(last["standby"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|x| x["port"] == port && x["health"] == "healthy")
            }))
        });
        res.map_err(|e| BenchError(format!("{e}; identity.show: {last}")))
    }

    /// After the last round: let the stream's tail arrive, stop it, and
    /// count each round's frames that reached no port.
    fn close(
        &mut self,
        out: &mut [Sample],
        mut bounds: Vec<u64>,
        settle: Duration,
    ) -> Result<(), BenchError> {
        self.run_for(settle)?;
        bounds.push(self.seq);
        let end = Instant::now() + Duration::from_millis(50);
        self.gap = Duration::from_secs(3600);
        self.next_send = end + self.gap;
        while Instant::now() < end {
            self.pass()?;
        }
        for (s, w) in out.iter_mut().zip(bounds.windows(2)) {
            s.lost = (w[0]..w[1])
                .filter(|&q| {
                    let (i, bit) = ((q / 64) as usize, q % 64);
                    self.got.get(i).is_none_or(|x| x & (1 << bit) == 0)
                })
                .count() as u64;
        }
        Ok(())
    }
}
