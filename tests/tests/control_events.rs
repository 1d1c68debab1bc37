//! Events on the control socket: a subscriber sees ports added, connected,
//! broken, disconnected and removed, and the configuration saved, in the
//! order they happen; a subscriber that leaves is forgotten; one that does
//! not read holds nothing up and is told what it lost.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vioswitch_testkit::frames::{small_config, thread_count, wait_until};
use vioswitch_testkit::guest::NetGuest;
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

/// An event stream.
struct Events {
    reader: BufReader<UnixStream>,
    _conn: UnixStream,
}

impl Events {
    fn subscribe(sock: &Path) -> Events {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        writeln!(s, r#"{{"id":"sub","cmd":"events.subscribe"}}"#).unwrap();
        let mut ev = Events {
            reader: BufReader::new(s.try_clone().unwrap()),
            _conn: s,
        };
        let a = ev.next().expect("an answer to events.subscribe");
        assert_eq!(a, json!({"id": "sub", "ok": true, "result": {}}));
        ev
    }

    /// The next line, or `None` at end of stream or after 30 s.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("an event is JSON")),
        }
    }

    /// The next `n` events, as `(event, port or path)`, checking their time.
    fn take(&mut self, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| {
                let e = self
                    .next()
                    .unwrap_or_else(|| panic!("event {} of {n} did not come", i + 1));
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64();
                let t = e["time"].as_f64().unwrap_or_else(|| panic!("no time: {e}"));
                assert!(
                    t <= now + 1.0 && t > now - 600.0,
                    "event time {t} is not now ({now}): {e}"
                );
                let what = e["port"]
                    .as_str()
                    .or_else(|| e["path"].as_str())
                    .unwrap_or_else(|| panic!("an event without port or path: {e}"));
                (
                    e["event"].as_str().unwrap_or_default().to_string(),
                    what.to_string(),
                )
            })
            .collect()
    }
}

fn ev(event: &str, what: &str) -> (String, String) {
    (event.to_string(), what.to_string())
}

#[test]
fn a_subscriber_sees_a_port_s_life_in_order() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let mut events = Events::subscribe(&sw.control_path());
    let mut second = Events::subscribe(&sw.control_path());
    let state = sw.run_dir().join("state.json");
    let state = state.to_str().unwrap();

    let sock = sw.add_port("e1").expect("port.add");
    let g = NetGuest::connect(&sock, small_config()).expect("guest");
    wait_until("e1 connected", || {
        sw.call("port.show", json!({"name": "e1"})).unwrap()["connected"] == true
    });
    g.disconnect();
    wait_until("e1 disconnected", || {
        sw.call("port.show", json!({"name": "e1"})).unwrap()["connected"] == false
    });
    sw.call("port.set", json!({"name": "e1", "vlan": 3}))
        .expect("port.set");
    // A guest that breaks its TX ring, then a removal while connected.
    let mut g = NetGuest::connect(&sock, small_config()).expect("guest");
    {
        let mut tx = g.raw_tx();
        let size = tx.size();
        let idx = tx.avail_idx();
        tx.set_avail_idx(idx.wrapping_add(size + 1));
        tx.kick();
    }
    wait_until("e1 broken", || {
        sw.call("port.show", json!({"name": "e1"})).unwrap()["broken"] == true
    });
    sw.del_port("e1").expect("port.del");
    sw.call("config.save", json!({})).expect("config.save");

    let want = vec![
        ev("port.added", "e1"),
        ev("config.saved", state),
        ev("port.connected", "e1"),
        ev("port.disconnected", "e1"),
        ev("config.saved", state),
        ev("port.connected", "e1"),
        ev("port.broken", "e1"),
        ev("port.disconnected", "e1"),
        ev("port.removed", "e1"),
        ev("config.saved", state),
        ev("config.saved", state),
    ];
    assert_eq!(events.take(want.len()), want);
    assert_eq!(second.take(want.len()), want);
    drop(g);
}

#[test]
fn subscribers_that_leave_are_forgotten() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let sock = sw.control_path();
    let pid = sw.pid();
    // (Once answered, the harness's own client has its thread.)
    sw.call("switch.info", json!({})).expect("switch.info");
    let base = thread_count(pid);
    // 3 × 100 subscribers: more than the 256 clients the switch serves at
    // once, so forgotten ones must also have given their place back.
    for round in 0..3 {
        let subs: Vec<Events> = (0..100).map(|_| Events::subscribe(&sock)).collect();
        assert!(thread_count(pid) >= base + 100, "a thread per subscriber");
        sw.add_port(&format!("r{round}")).expect("port.add");
        drop(subs);
        // Each stream thread notices its client left within about a second.
        // (Each port added has a session thread.)
        let want = base + round + 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while thread_count(pid) > want {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {} threads, not {want}, after the subscribers left",
                thread_count(pid)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Changes and new subscribers are served as before.
    let mut events = Events::subscribe(&sock);
    sw.del_port("r0").expect("port.del");
    assert_eq!(events.take(1), vec![ev("port.removed", "r0")]);
}

#[test]
fn a_subscriber_that_does_not_read_holds_nothing_up_and_learns_what_it_lost() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let mut slow = Events::subscribe(&sw.control_path());
    // 700 add/del pairs: 2800 events, more than the subscriber's queue
    // (1024) and its socket buffer hold.
    for i in 0..700 {
        let name = format!("s{}", i % 7);
        sw.add_port(&name).expect("port.add");
        sw.del_port(&name).expect("port.del");
    }
    assert_eq!(
        sw.call("port.list", json!({})).unwrap(),
        json!([]),
        "every change was answered"
    );
    let mut seen = 0u64;
    let mut lost = 0u64;
    while seen + lost < 2800 {
        let e = slow.next().unwrap_or_else(|| {
            panic!("the stream ended after {seen} events and {lost} lost of 2800")
        });
        if e["event"] == "events.lost" {
            lost += e["count"].as_u64().expect("a count of lost events");
        } else {
            seen += 1;
        }
    }
    assert!(lost > 0, "no loss was reported");
    assert_eq!(seen + lost, 2800, "events seen and lost add up");
}
