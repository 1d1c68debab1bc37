//! End-to-end: a network identity fails over between real QEMU guests (TCG).
//!
//! Three guests on a switch, one port each (server mode):
//!
//! - A on port `a`, with the identity's MAC as its own: serves the
//!   identity's address 10.0.0.1 (its kernel answers pings);
//! - B on port `b` (10.0.0.2): pings 10.0.0.1 every 0.2 s (`ping-watch`)
//!   and reports every reply and every change of its ARP entry for it;
//! - C on port `c`, whose own MAC differs from the identity's (the port's
//!   `guest_mac`): holds the same address 10.0.0.1 as a standby
//!   (`standby`: it answers no ARP for it until the first echo request for it
//!   arrives, so that it cannot claim the address while A has it: a port
//!   with no identity bound passes its guest's frames unchecked, and C's
//!   answer to B's ARP request would race A's and could leave C's own MAC
//!   in B's cache, as a run with C answering ARP showed).
//!
//! The identity `svc` (A's MAC, 10.0.0.1) is bound to `a` with `c` as
//! standby. Once B gets steady replies from A, A's QEMU is killed; the switch
//! must move `svc` to `c` by itself and announce it, and map C's MAC to the
//! identity's both ways. Then B's pings resume, answered by C, with at most
//! [`MAX_LOST`] lost, and B's ARP entry for 10.0.0.1 holds the identity's MAC
//! throughout: B never sees C's own MAC.
//!
//! The guest jobs are in `scripts/guest-kernel.sh`; `ping-watch` is checked
//! on its own (on a UDP wire, without the switch) by
//! `ping_watch_counts_the_replies_of_a_peer_on_a_wire`: when that passes and
//! the failover test fails, look at the switch.
//!
//! One test at a time (a lock: the machines have 2 cores); the deadlines
//! only bound a hang.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::qemu::{
    mac, one_at_a_time, GuestConfig, GuestImage, GuestNet, GuestResult, QemuGuest,
};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(120);
/// The switch notices the dead guest and moves the identity.
const FAILOVER: Duration = Duration::from_secs(30);

/// B's ping interval (seconds, as the guest's `ping -i` takes it).
const INTERVAL: &str = "0.2";
/// Replies B must get from A before A is killed, and from C after.
const STEADY: usize = 10;
/// Echo requests B may lose around the failover: 10 at 0.2 s, about 2 s of
/// silence under TCG for the switch to see A's QEMU gone, move the
/// identity and forward to C ("at most a few lost").
const MAX_LOST: u64 = 10;
/// B stops once 10.0.0.1 has been silent this long (after C is killed at
/// the end); longer than any outage worth reporting as such.
const SILENCE: &str = "5";

const IDENTITY: &str = "svc";
const IDENTITY_IP: &str = "10.0.0.1";

fn image() -> GuestImage {
    GuestImage::ensure().expect("guest image (scripts/guest-kernel.sh)")
}

fn vhost(socket: &Path, mac: &str) -> GuestNet {
    GuestNet::VhostUser {
        socket: socket.to_path_buf(),
        mac: mac.to_string(),
    }
}

// ------------------------------------------- the identity control JSON ----
// Kept here, in a few helpers, so that a renamed field is changed once.

/// `port.add` of a server-mode net port with extra options (e.g.
/// `guest_mac`); returns its socket.
fn add_port(sw: &mut SwitchProcess, name: &str, extra: Value) -> PathBuf {
    let mut args = json!({ "name": name });
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    let r = sw
        .call("port.add", args)
        .unwrap_or_else(|e| panic!("port.add {name}: {e}"));
    PathBuf::from(
        r["socket"]
            .as_str()
            .unwrap_or_else(|| panic!("port.add {name}: no socket in {r}")),
    )
}

/// `identity.add NAME {mac, ips, standby}`.
fn add_identity(sw: &mut SwitchProcess, name: &str, mac: &str, ips: &[&str], standby: &[&str]) {
    let r = sw.call(
        "identity.add",
        json!({ "name": name, "mac": mac, "ips": ips, "standby": standby }),
    );
    r.unwrap_or_else(|e| panic!("identity.add {name}: {e}"));
}

/// `identity.bind NAME PORT`.
fn bind_identity(sw: &mut SwitchProcess, name: &str, port: &str) {
    sw.call("identity.bind", json!({ "name": name, "port": port }))
        .unwrap_or_else(|e| panic!("identity.bind {name} {port}: {e}"));
}

/// `identity.show NAME`.
fn show_identity(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("identity.show", json!({ "name": name }))
        .unwrap_or_else(|e| panic!("identity.show {name}: {e}"))
}

/// The port an identity is bound to, as `identity.show` says.
fn identity_port(sw: &mut SwitchProcess, name: &str) -> Option<String> {
    show_identity(sw, name)["port"].as_str().map(str::to_string)
}

/// An event saying that identity `name` moved to port `to` (by command or
/// by failover).
fn is_move(ev: &Value, name: &str, to: &str) -> bool {
    ev["event"]
        .as_str()
        .is_some_and(|e| e.starts_with("identity."))
        && ev["identity"] == json!(name)
        && ev["to"] == json!(to)
}

// ------------------------------------------------------------- events ----

/// A subscription to the switch's events, read by a thread of its own.
struct Events {
    rx: Receiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    fn subscribe(sock: &Path) -> Events {
        let mut s = UnixStream::connect(sock).expect("connect to the control socket");
        writeln!(s, r#"{{"id":"sub","cmd":"events.subscribe"}}"#).expect("events.subscribe");
        let mut reader = BufReader::new(s);
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .expect("events.subscribe answer");
        let a: Value = serde_json::from_str(&answer).expect("answer is JSON");
        assert_eq!(a["ok"], json!(true), "events.subscribe: {a}");
        let (tx, rx) = mpsc::channel();
        // Ends when the switch closes the connection (at the latest when the
        // test kills it).
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let Ok(ev) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Events {
            rx,
            seen: Vec::new(),
        }
    }

    /// Wait for an event matching `want`; every event is kept in `seen`.
    fn wait(&mut self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(e) = self.seen.iter().find(|e| want(e)) {
            return Some(e.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => {
                    self.seen.push(ev.clone());
                    if want(&ev) {
                        return Some(ev);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Collect what arrived so far without waiting.
    fn drain(&mut self) -> &[Value] {
        while let Ok(ev) = self.rx.try_recv() {
            self.seen.push(ev);
        }
        &self.seen
    }
}

// --------------------------------------------------- ping-watch's lines ----

/// The sequence numbers of B's replies so far (duplicates left out).
fn replies(b: &QemuGuest) -> Vec<u64> {
    b.find_lines("VIOTEST-PROGRESS reply seq=")
        .iter()
        .filter(|l| !l.ends_with(" dup"))
        .filter_map(|l| {
            let at = l.find("seq=")? + 4;
            l[at..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// What B's ARP entry for the peer held, in order ("none": absent or
/// incomplete).
fn arp_macs(b: &QemuGuest) -> Vec<String> {
    b.find_lines("VIOTEST-PROGRESS arp ip=")
        .iter()
        .filter_map(|l| {
            let at = l.find("mac=")? + 4;
            l[at..].split_whitespace().next().map(str::to_string)
        })
        .collect()
}

/// Wait until `cond` holds; else, once a guest that must run ended or the
/// timeout passed, say why with the guests' logs.
fn wait_until(
    what: &str,
    timeout: Duration,
    guests: &mut [&mut QemuGuest],
    mut cond: impl FnMut(&[&mut QemuGuest]) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond(guests) {
            return Ok(());
        }
        let dead = guests.iter_mut().position(|g| !g.is_running());
        if dead.is_some() || Instant::now() >= deadline {
            let why = match dead {
                Some(i) => format!("guest {} ended", guests[i].name()),
                None => format!("not within {timeout:?}"),
            };
            let logs: Vec<String> = guests.iter().map(|g| g.logs()).collect();
            return Err(format!("{what}: {why}\n{}", logs.join("\n")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The switch's view for a failure message: the identity, the ports'
/// counters, its log.
fn switch_state(sw: &mut SwitchProcess) -> String {
    let identity = sw
        .call("identity.show", json!({ "name": IDENTITY }))
        .map_or_else(|e| e.to_string(), |v| v.to_string());
    let stats = sw
        .call("port.stats", json!({}))
        .map_or_else(|e| e.to_string(), |v| v.to_string());
    format!(
        "identity: {identity}\nport stats: {stats}\nswitch log:\n{}",
        sw.log_text()
    )
}

fn stat(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn field(r: &GuestResult, k: &str) -> u64 {
    r.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {k}= in B's result: {}", r.line))
}

// --------------------------------------------------------------- tests ----

#[test]
fn identity_fails_over_to_a_standby_guest_with_another_mac_and_pings_resume() {
    let _g = one_at_a_time();
    let img = image();
    let t0 = Instant::now();
    let (mac_a, mac_b, mac_c) = (mac(1), mac(2), mac(3));
    // The identity carries A's MAC: A holds it natively, C through mapping.
    let mac_i = mac_a.clone();

    let mut sw = SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
    let sa = add_port(&mut sw, "a", json!({}));
    let sb = add_port(&mut sw, "b", json!({}));
    let sc = add_port(&mut sw, "c", json!({ "guest_mac": mac_c }));
    add_identity(&mut sw, IDENTITY, &mac_i, &[IDENTITY_IP], &["c"]);
    bind_identity(&mut sw, IDENTITY, "a");
    assert_eq!(
        identity_port(&mut sw, IDENTITY).as_deref(),
        Some("a"),
        "{}",
        show_identity(&mut sw, IDENTITY)
    );
    let mut events = Events::subscribe(&sw.control_path());

    // A and C hold 10.0.0.1 before B asks for it, so that B's ARP requests
    // reach both (C must not answer them).
    let ip = format!("vio.ip={IDENTITY_IP}/24");
    let mut a = QemuGuest::spawn(
        &img,
        GuestConfig::net_job("a", vhost(&sa, &mac_a), "serve", &[&ip]),
    )
    .expect("start guest A");
    let mut c = QemuGuest::spawn(
        &img,
        GuestConfig::net_job("c", vhost(&sc, &mac_c), "standby", &[&ip]),
    )
    .expect("start guest C");
    a.wait_for("VIOTEST-SERVING", BOOT).expect("A serves");
    c.wait_for("VIOTEST-SERVING standby arp_ignore=8", BOOT)
        .expect("C stands by");
    let t_ab = t0.elapsed();

    let peer = format!("vio.peer={IDENTITY_IP}");
    let interval = format!("vio.interval={INTERVAL}");
    let silence = format!("vio.silence={SILENCE}");
    let mut b = QemuGuest::spawn(
        &img,
        GuestConfig::net_job(
            "b",
            vhost(&sb, &mac_b),
            "ping-watch",
            &["vio.ip=10.0.0.2/24", &peer, &interval, &silence],
        ),
    )
    .expect("start guest B");
    wait_until(
        "B's steady replies from A",
        BOOT,
        &mut [&mut a, &mut b, &mut c],
        |g| replies(g[1]).len() >= STEADY,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", switch_state(&mut sw)));
    let t_steady = t0.elapsed();
    assert_eq!(
        arp_macs(&b).last(),
        Some(&mac_i),
        "B's ARP entry for {IDENTITY_IP} before the failover\n{}",
        b.logs()
    );
    assert!(
        c.find_line("standby active").is_none(),
        "C was pinged while A held the identity\n{}",
        c.logs()
    );
    let c_before = sw.port_stats("c").expect("port.stats c");

    // A dies.
    let before_kill = replies(&b).len();
    a.kill();
    let t_kill = t0.elapsed();
    let moved = events.wait(FAILOVER, |e| is_move(e, IDENTITY, "c"));
    let t_moved = t0.elapsed();
    let moved = moved.unwrap_or_else(|| {
        panic!(
            "no event moving {IDENTITY} to c within {FAILOVER:?} of A's death; events: {:?}\n{}",
            events.drain(),
            switch_state(&mut sw)
        )
    });
    assert_eq!(
        (&moved["event"], &moved["from"], &moved["reason"]),
        (
            &json!("identity.moved"),
            &json!("a"),
            &json!("disconnected")
        ),
        "{moved}"
    );
    assert_eq!(
        identity_port(&mut sw, IDENTITY).as_deref(),
        Some("c"),
        "{}",
        show_identity(&mut sw, IDENTITY)
    );

    // B's pings resume, answered by C.
    let at_move = replies(&b).len();
    wait_until(
        "B's replies from C after the failover",
        JOB,
        &mut [&mut b, &mut c],
        |g| replies(g[0]).len() >= at_move + STEADY,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", switch_state(&mut sw)));
    let t_resumed = t0.elapsed();
    let active = c
        .find_line("standby active")
        .unwrap_or_else(|| panic!("C answered without being pinged?\n{}", c.logs()));
    let c_after = sw.port_stats("c").expect("port.stats c");
    let arp_before_end = arp_macs(&b);

    // The end: C goes too; B stops once 10.0.0.1 stays silent.
    c.kill();
    let r = b.result(JOB).expect("B's result");
    let ev_seen = events.drain().to_vec();
    eprintln!(
        "events: {}",
        ev_seen
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n        ")
    );
    eprintln!("port c before the failover: {c_before}\nport c after: {c_after}");
    eprintln!("identity: {}", show_identity(&mut sw, IDENTITY));
    assert!(r.ok, "B: {}\n{}", r.line, b.logs());
    let lost = field(&r, "lost");
    eprintln!(
        "A and C serving after {t_ab:?}, B steady after {t_steady:?}; A killed at {t_kill:?} \
         ({before_kill} replies), {IDENTITY} moved at {t_moved:?}, {STEADY} replies from C by \
         {t_resumed:?}; C: {active}\nB: {}\nlost {lost} (at most {MAX_LOST}), whole test {:?}",
        r.details,
        t0.elapsed()
    );

    // Replies came after A's death, and few were lost around it.
    assert!(
        field(&r, "last_seq") > *replies(&b)[..before_kill].iter().max().unwrap_or(&0),
        "{}",
        r.line
    );
    assert!(
        lost <= MAX_LOST,
        "B lost {lost} pings (gaps {:?}), at most {MAX_LOST} allowed\n{}",
        r.get("gaps"),
        b.logs()
    );
    // B's ARP entry for 10.0.0.1 held the identity's MAC from its first
    // resolution until C was killed, never C's own MAC nor nothing.
    let resolved: Vec<&String> = arp_before_end
        .iter()
        .skip_while(|m| m.as_str() == "none")
        .collect();
    assert!(
        !resolved.is_empty() && resolved.iter().all(|m| **m == mac_i),
        "B's ARP entry for {IDENTITY_IP} changed (identity {mac_i}, C {mac_c}): {arp_before_end:?}\n{}",
        b.logs()
    );
    assert_eq!(r.get("macs"), Some(mac_i.as_str()), "{}", r.line);
    assert_eq!(r.get("mac_changes"), Some("0"), "{}", r.line);
    // C's port carried the traffic: B's requests to C, C's replies back.
    let delta = |k: &str| stat(&c_after, k).saturating_sub(stat(&c_before, k));
    assert!(
        delta("tx_packets") >= STEADY as u64,
        "B's requests did not reach C: {c_before} -> {c_after}"
    );
    assert!(
        delta("rx_packets") >= STEADY as u64,
        "C's replies did not leave port c: {c_before} -> {c_after}"
    );
    assert!(sw.is_running(), "the switch died");
}

/// `ping-watch` on its own, without the switch: B pings A over a UDP wire,
/// A is killed, B stops after the silence and counts what it got.
#[test]
fn ping_watch_counts_the_replies_of_a_peer_on_a_wire() {
    let _g = one_at_a_time();
    let img = image();
    let t0 = Instant::now();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).expect("UDP wire");
    let mut a = QemuGuest::spawn(
        &img,
        GuestConfig::net_job("wire-a", na, "serve", &["vio.ip=10.0.0.1/24"]),
    )
    .expect("start guest A");
    a.wait_for("VIOTEST-SERVING", BOOT).expect("A serves");
    let interval = format!("vio.interval={INTERVAL}");
    let mut b = QemuGuest::spawn(
        &img,
        GuestConfig::net_job(
            "wire-b",
            nb,
            "ping-watch",
            &[
                "vio.ip=10.0.0.2/24",
                "vio.peer=10.0.0.1",
                &interval,
                "vio.silence=2",
            ],
        ),
    )
    .expect("start guest B");
    wait_until("B's replies", BOOT, &mut [&mut a, &mut b], |g| {
        replies(g[1]).len() >= STEADY
    })
    .unwrap_or_else(|e| panic!("{e}"));
    a.kill();
    let r = b.result(JOB).expect("B's result");
    assert!(r.ok, "{}\n{}", r.line, b.logs());
    let seen = replies(&b);
    assert_eq!(field(&r, "replies"), seen.len() as u64, "{}", r.line);
    assert!(seen.len() >= STEADY, "{}", r.line);
    assert_eq!(r.get("ended"), Some("silence"), "{}", r.line);
    // Nothing lost on a wire; the requests after A's death are not "lost"
    // but sent after the last reply.
    assert_eq!(r.get("lost"), Some("0"), "{}", r.line);
    assert!(field(&r, "sent") > field(&r, "last_seq") + 1, "{}", r.line);
    assert_eq!(r.get("macs"), Some(mac(1).as_str()), "{}", r.line);
    assert_eq!(
        arp_macs(&b).iter().filter(|m| m.as_str() != "none").count(),
        1,
        "{}",
        b.logs()
    );
    eprintln!(
        "ping-watch on a wire after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}
