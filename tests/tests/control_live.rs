//! Control-plane changes under traffic. Two guests exchange a numbered
//! stream both ways, paced in windows that never overflow an RX ring, so
//! that any loss, duplicate, reordering or corruption is the switch's:
//! - while other ports are added and removed a thousand times (some with a
//!   guest, moved between workers, given VLANs and static entries) and the
//!   switch is queried without pause, the pair loses nothing;
//! - while the pair's own ports change MTU and move between workers
//!   (`port.set`, `worker.move`, `worker.rebalance`), it loses nothing;
//! - a VLAN change moves a port between broadcast domains at once, and an
//!   MTU change applies at once, without reconnecting the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::frames::{
    counters, frame, mac, mac_str, plug, plug_with, recv_n, send_all, small_config, tag,
    wait_tx_done, PortCounters, BROADCAST,
};
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig};
use vioswitch_testkit::switch::{ControlClient, SwitchOptions, SwitchProcess};

/// Frames per window and direction: well under the RX ring (256 buffers).
const WINDOW: u64 = 64;
/// Frames per direction at least.
const FRAMES: u64 = 20_000;

const A: u32 = 0xa;
const B: u32 = 0xb;

/// The frame numbered `seq` of a stream from `src` to `dst`: 60 to 1514 bytes.
fn seq_frame(dst: u32, src: u32, seq: u64) -> Vec<u8> {
    frame(mac(dst), mac(src), 60 + (seq * 37 % 1455) as usize, seq)
}

/// Two guests and where their streams are.
struct Pair {
    a: NetGuest,
    b: NetGuest,
    /// Next sequence number a → b and b → a.
    ab: u64,
    ba: u64,
    /// Frames each guest sent (and received) in all.
    a_sent: u64,
    b_sent: u64,
}

impl Pair {
    fn new(a: NetGuest, b: NetGuest) -> Pair {
        let mut p = Pair {
            a,
            b,
            ab: 0,
            ba: 0,
            a_sent: 0,
            b_sent: 0,
        };
        p.introduce();
        p
    }

    /// A broadcast each way, so that both MACs are learnt.
    fn introduce(&mut self) {
        let ha = frame(BROADCAST, mac(A), 60, u64::MAX);
        send_all(&mut self.a, std::slice::from_ref(&ha));
        assert_eq!(recv_n(&mut self.b, 1), vec![ha], "hello a -> b");
        let hb = frame(BROADCAST, mac(B), 60, u64::MAX - 1);
        send_all(&mut self.b, std::slice::from_ref(&hb));
        assert_eq!(recv_n(&mut self.a, 1), vec![hb], "hello b -> a");
        self.a_sent += 1;
        self.b_sent += 1;
    }

    /// One window each way: send, then wait until the peer has it all.
    fn window(&mut self) -> Result<(), String> {
        let to_b: Vec<Vec<u8>> = (self.ab..self.ab + WINDOW)
            .map(|s| seq_frame(B, A, s))
            .collect();
        let to_a: Vec<Vec<u8>> = (self.ba..self.ba + WINDOW)
            .map(|s| seq_frame(A, B, s))
            .collect();
        send_all(&mut self.a, &to_b);
        send_all(&mut self.b, &to_a);
        self.a_sent += WINDOW;
        self.b_sent += WINDOW;
        expect(&mut self.b, &to_b, "a -> b")?;
        expect(&mut self.a, &to_a, "b -> a")?;
        self.ab += WINDOW;
        self.ba += WINDOW;
        Ok(())
    }
}

/// Receive exactly `want`, in order.
fn expect(g: &mut NetGuest, want: &[Vec<u8>], dir: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, w) in want.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = g.recv_timeout(left) else {
            return Err(format!(
                "{dir}: got {i} of {} frames of the window starting at {:?}; next missing {:?}",
                want.len(),
                tag(&want[0]),
                tag(w)
            ));
        };
        if &f != w {
            return Err(format!(
                "{dir}: expected frame {:?} ({} bytes), got {:?} ({} bytes)",
                tag(w),
                w.len(),
                tag(&f),
                f.len()
            ));
        }
    }
    Ok(())
}

/// No drop of any kind, and exactly the frames sent and received.
fn check_counters(c: &PortCounters, name: &str, sent: u64, received: u64) {
    assert_eq!(c.nonzero_drops(), Default::default(), "{name}: {c:?}");
    assert_eq!(
        c.rx_packets, sent,
        "{name} frames taken from the guest: {c:?}"
    );
    assert_eq!(c.tx_packets, received, "{name} frames delivered: {c:?}");
}

fn connections(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("port.show", json!({"name": name}))
        .expect("port.show")["connections"]
        .clone()
}

fn ok(c: &mut ControlClient, cmd: &str, args: Value) -> Value {
    c.call(cmd, args.clone())
        .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
}

/// A switch with two workers, and a pair of guests: a on worker 0, b on worker 1.
fn pair_on_two_workers() -> (SwitchProcess, Pair) {
    let mut sw = SwitchProcess::spawn(SwitchOptions {
        workers: 2,
        ..Default::default()
    })
    .expect("start vioswitch");
    let cfg = NetGuestConfig::default();
    let a = plug_with(&mut sw, json!({"name": "a", "worker": 0}), cfg.clone());
    let b = plug_with(&mut sw, json!({"name": "b", "worker": 1}), cfg);
    (sw, Pair::new(a, b))
}

#[test]
fn a_thousand_port_changes_and_a_flood_of_queries_do_not_disturb_a_running_pair() {
    let (mut sw, mut pair) = pair_on_two_workers();
    let sock = sw.control_path();
    let stop = Arc::new(AtomicBool::new(false));

    let churn = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut c = ControlClient::connect(&sock).expect("connect");
            for i in 0..1000u32 {
                let name = format!("churn{}", i % 4);
                let info = ok(&mut c, "port.add", json!({"name": name}));
                if i % 10 == 3 {
                    ok(
                        &mut c,
                        "port.set",
                        json!({"name": name, "vlan": 1 + i % 4000}),
                    );
                    ok(
                        &mut c,
                        "fdb.add",
                        json!({"mac": mac_str(&mac(0x1000 + i)), "port": name}),
                    );
                }
                let guest = (i % 25 == 7).then(|| {
                    let sock = std::path::PathBuf::from(info["socket"].as_str().unwrap());
                    let g = NetGuest::connect(&sock, small_config()).expect("churn guest");
                    let w = info["worker"].as_u64().unwrap();
                    ok(
                        &mut c,
                        "worker.move",
                        json!({"port": name, "worker": 1 - w}),
                    );
                    g
                });
                ok(&mut c, "port.del", json!({"name": name}));
                drop(guest);
            }
        })
    };
    let queries = Arc::new(AtomicU64::new(0));
    let query = {
        let (sock, stop, queries) = (sock.clone(), stop.clone(), queries.clone());
        std::thread::spawn(move || {
            let mut c = ControlClient::connect(&sock).expect("connect");
            let cmds = [
                ("port.stats", json!({})),
                ("port.list", json!({})),
                ("worker.list", json!({})),
                ("port.stats", json!({"name": "a"})),
                ("fdb.show", json!({})),
                ("switch.info", json!({})),
                ("config.show", json!({})),
            ];
            while !stop.load(Ordering::Relaxed) {
                for (cmd, args) in &cmds {
                    ok(&mut c, cmd, args.clone());
                    queries.fetch_add(1, Ordering::Relaxed);
                }
                // A flood, but one that leaves the churn some CPU.
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    while pair.ab < FRAMES || !churn.is_finished() {
        // Continuous, but not flat out: the machine is shared.
        std::thread::sleep(Duration::from_millis(1));
        if let Err(e) = pair.window() {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "{e}\na: {:?}\nb: {:?}",
                counters(&mut sw, "a"),
                counters(&mut sw, "b")
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("the churn thread failed");
    query.join().expect("the query thread failed");
    assert!(queries.load(Ordering::Relaxed) > 0);
    assert!(pair.a.try_recv().is_none() && pair.b.try_recv().is_none());
    check_counters(&counters(&mut sw, "a"), "a", pair.a_sent, pair.b_sent);
    check_counters(&counters(&mut sw, "b"), "b", pair.b_sent, pair.a_sent);
    assert_eq!(connections(&mut sw, "a"), 1);
    assert_eq!(connections(&mut sw, "b"), 1);
    let names: Vec<Value> = sw
        .call("port.list", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("a"), json!("b")]);
}

/// Run `cycle` over and over on a pair under traffic (a on worker 0, b on
/// worker 1): nothing may be lost, reordered or counted as dropped, and
/// neither guest reconnects.
fn changes_under_traffic(cycle: Vec<(&'static str, Value)>) {
    let (mut sw, mut pair) = pair_on_two_workers();
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let changer = {
        let (sock, stop, changes) = (sw.control_path(), stop.clone(), changes.clone());
        std::thread::spawn(move || {
            let mut c = ControlClient::connect(&sock).expect("connect");
            while !stop.load(Ordering::Relaxed) {
                for (cmd, args) in &cycle {
                    ok(&mut c, cmd, args.clone());
                    changes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    while pair.ab < FRAMES || changes.load(Ordering::Relaxed) < 300 {
        std::thread::sleep(Duration::from_millis(1));
        if let Err(e) = pair.window() {
            stop.store(true, Ordering::Relaxed);
            let _ = changer.join();
            panic!(
                "after {} changes: {e}\na: {:?}\nb: {:?}",
                changes.load(Ordering::Relaxed),
                counters(&mut sw, "a"),
                counters(&mut sw, "b")
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    changer.join().expect("the changer failed");
    assert!(pair.a.try_recv().is_none() && pair.b.try_recv().is_none());
    check_counters(&counters(&mut sw, "a"), "a", pair.a_sent, pair.b_sent);
    check_counters(&counters(&mut sw, "b"), "b", pair.b_sent, pair.a_sent);
    assert_eq!(connections(&mut sw, "a"), 1, "a's guest reconnected");
    assert_eq!(connections(&mut sw, "b"), 1, "b's guest reconnected");
}

#[test]
fn mtu_and_vlan_settings_of_ports_under_traffic_lose_nothing() {
    changes_under_traffic(vec![
        ("port.set", json!({"name": "a", "mtu": 1500})),
        ("port.set", json!({"name": "b", "mtu": 9000})),
        ("port.set", json!({"name": "a", "mtu": 0, "vlan": 0})),
        ("port.set", json!({"name": "b", "mtu": 1496})),
        ("port.set", json!({"name": "b", "mtu": 0, "vlan": 0})),
    ]);
}

#[test]
fn worker_moves_of_ports_under_traffic_lose_nothing() {
    changes_under_traffic(vec![
        ("worker.move", json!({"port": "a", "worker": 1})),
        ("worker.move", json!({"port": "b", "worker": 0})),
        ("port.set", json!({"name": "a", "worker": 0, "mtu": 1500})),
        ("worker.rebalance", json!({})),
        ("worker.move", json!({"port": "b", "worker": 1})),
        ("port.set", json!({"name": "a", "worker": 1, "mtu": 0})),
        ("worker.move", json!({"port": "a", "worker": 0})),
        ("worker.rebalance", json!({})),
    ]);
}

/// Frames queued in a port's TX ring while it moves between workers are all
/// switched afterwards, in order.
#[test]
fn frames_queued_in_the_rings_survive_a_worker_move() {
    let (mut sw, mut pair) = pair_on_two_workers();
    for round in 0..50u64 {
        // A full TX ring's worth (200 frames, in bursts) from a, and a
        // window from b, with the move issued in the middle.
        let to_b: Vec<Vec<u8>> = (pair.ab..pair.ab + 200)
            .map(|s| seq_frame(B, A, s))
            .collect();
        let to_a: Vec<Vec<u8>> = (pair.ba..pair.ba + WINDOW)
            .map(|s| seq_frame(A, B, s))
            .collect();
        let refs: Vec<&[u8]> = to_b.iter().map(Vec::as_slice).collect();
        let queued = pair.a.send_burst(&refs[..100]);
        sw.call(
            "worker.move",
            json!({"port": if round % 2 == 0 { "a" } else { "b" }, "worker": (round / 2 + 1) % 2}),
        )
        .expect("worker.move");
        send_all(&mut pair.a, &to_b[queued..]);
        send_all(&mut pair.b, &to_a);
        pair.a_sent += 200;
        pair.b_sent += WINDOW;
        let r = expect(&mut pair.b, &to_b, "a -> b")
            .and_then(|()| expect(&mut pair.a, &to_a, "b -> a"));
        if let Err(e) = r {
            panic!(
                "round {round}: {e}\na: {:?}\nb: {:?}",
                counters(&mut sw, "a"),
                counters(&mut sw, "b")
            );
        }
        pair.ab += 200;
        pair.ba += WINDOW;
    }
    check_counters(&counters(&mut sw, "a"), "a", pair.a_sent, pair.b_sent);
    check_counters(&counters(&mut sw, "b"), "b", pair.b_sent, pair.a_sent);
}

#[test]
fn vlan_and_mtu_changes_apply_at_once_without_reconnecting() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let cfg = NetGuestConfig::default();
    let a = plug(&mut sw, "a", cfg.clone());
    let b = plug(&mut sw, "b", cfg);
    let mut c = plug_with(&mut sw, json!({"name": "c", "vlan": 10}), small_config());
    let mut pair = Pair::new(a, b);
    for _ in 0..10 {
        pair.window().unwrap();
    }
    // a joins VLAN 10: its frames (to b's MAC, unknown there) reach c, not b.
    sw.call("port.set", json!({"name": "a", "vlan": 10}))
        .expect("port.set vlan");
    let lost: Vec<Vec<u8>> = (0..5).map(|k| seq_frame(B, A, 1_000_000 + k)).collect();
    send_all(&mut pair.a, &lost);
    wait_tx_done(&mut pair.a);
    assert_eq!(recv_n(&mut c, 5), lost, "c, now in a's VLAN");
    assert!(pair.b.try_recv().is_none(), "b got a frame across VLANs");
    // b joins too: the stream goes on.
    sw.call("port.set", json!({"name": "b", "vlan": 10}))
        .expect("port.set vlan");
    pair.a_sent += 5;
    for _ in 0..10 {
        pair.window().unwrap();
    }
    while c.try_recv().is_some() {} // the first frame of each, flooded
                                    // MTU 1000 on a: frames up to 1018 bytes pass, longer ones are dropped
                                    // and counted, both ways.
    sw.call("port.set", json!({"name": "a", "mtu": 1000}))
        .expect("port.set mtu");
    let before = counters(&mut sw, "a");
    let fit = frame(mac(B), mac(A), 1018, 7);
    let over = frame(mac(B), mac(A), 1019, 8);
    send_all(&mut pair.a, &[over.clone(), fit.clone()]);
    assert_eq!(recv_n(&mut pair.b, 1), vec![fit.clone()]);
    let back_over = frame(mac(A), mac(B), 1500, 9);
    let back_fit = frame(mac(A), mac(B), 1000, 10);
    send_all(&mut pair.b, &[back_over.clone(), back_fit.clone()]);
    assert_eq!(recv_n(&mut pair.a, 1), vec![back_fit]);
    let after = counters(&mut sw, "a");
    assert_eq!(
        after.dropped("mtu_exceeded") - before.dropped("mtu_exceeded"),
        2,
        "{after:?}"
    );
    // MTU off again: everything passes.
    sw.call("port.set", json!({"name": "a", "mtu": 0}))
        .expect("port.set mtu 0");
    send_all(&mut pair.a, std::slice::from_ref(&over));
    assert_eq!(recv_n(&mut pair.b, 1), vec![over]);
    send_all(&mut pair.b, std::slice::from_ref(&back_over));
    assert_eq!(recv_n(&mut pair.a, 1), vec![back_over]);
    let shown = sw.call("port.show", json!({"name": "a"})).unwrap();
    assert_eq!(
        (shown["vlan"].clone(), shown["mtu"].clone()),
        (json!(10), Value::Null)
    );
    assert_eq!(connections(&mut sw, "a"), 1);
    assert_eq!(connections(&mut sw, "b"), 1);
    let _ = fit;
}
