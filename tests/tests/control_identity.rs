//! Identities through the control channel and with guests on the ports:
//! - every `identity.*` command, and what each refuses (with which error
//!   code), a refusal leaving the configuration, the identities and the FDB
//!   as they were;
//! - bind and move point the identity's MAC at its port (a static FDB
//!   entry); removing a port or an identity takes what they held away;
//! - identities and port options are saved and come back after a SIGKILL;
//! - a move announces the identity from the new port (RARP, gratuitous
//!   ARP, neighbour advertisement) to the other guests, not to the new
//!   port's guest;
//! - failover: a guest that disconnects hands its identity to the first
//!   healthy standby; with none, `identity.failover_failed`, and the move
//!   once a standby connects; a guest that stops taking frames hands it
//!   over after `stall_ms`.

use serde_json::{json, Value};
use vioswitch::identity::announce::{gratuitous_arp, neighbour_advertisement, rarp};
use vioswitch_testkit::frames::{
    barrier, frame, mac, recv_one, send_all, small_config, wait_until, DEADLINE,
};
use vioswitch_testkit::guest::NetGuest;
use vioswitch_testkit::switch::{EventStream, HarnessError, SwitchOptions, SwitchProcess};

/// The identity the tests move around.
const WEB_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x10];
const WEB_MAC_STR: &str = "52:54:00:00:00:10";
const WEB_V4: &str = "192.0.2.10";
const WEB_V6: &str = "2001:db8::10";

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

fn add_web(sw: &mut SwitchProcess, extra: Value) -> Value {
    let mut args = json!({"name": "web", "mac": WEB_MAC_STR, "ips": [WEB_V4, WEB_V6]});
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    sw.call("identity.add", args).expect("identity.add web")
}

/// The FDB's static entries as `(mac, vlan, port)`.
fn statics(sw: &mut SwitchProcess) -> Vec<(String, u64, String)> {
    let entries = sw.call("fdb.show", json!({})).expect("fdb.show");
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["static"] == true)
        .map(|e| {
            (
                e["mac"].as_str().unwrap().to_string(),
                e["vlan"].as_u64().unwrap(),
                e["port"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn web_at(port: &str) -> Vec<(String, u64, String)> {
    vec![(WEB_MAC_STR.to_string(), 0, port.to_string())]
}

/// What a refused command must leave as it was.
fn snapshot(sw: &mut SwitchProcess) -> (Value, Value, Vec<(String, u64, String)>) {
    (
        sw.call("config.show", json!({})).expect("config.show"),
        sw.call("identity.list", json!({})).expect("identity.list"),
        statics(sw),
    )
}

/// Send `cmd` and check that it is refused with `code`, a message, and no
/// change.
fn refused(sw: &mut SwitchProcess, cmd: &str, args: Value, code: &str) {
    let before = snapshot(sw);
    match sw.call(cmd, args.clone()) {
        Err(HarnessError::Command { error, .. }) => {
            assert_eq!(error["code"], code, "{cmd} {args}: {error}");
            assert!(
                error["message"].as_str().is_some_and(|m| m.len() > 10),
                "{cmd} {args}: {error}"
            );
        }
        other => panic!("{cmd} {args} was not refused: {other:?}"),
    }
    assert_eq!(snapshot(sw), before, "{cmd} {args} changed something");
}

/// Wait for web's `identity.moved` and check where from, where to and why.
fn expect_move(events: &mut EventStream, from: &str, to: &str, reason: &str) {
    let moved = events
        .find("identity.moved", DEADLINE, |e| e["identity"] == "web")
        .expect("events")
        .unwrap_or_else(|| panic!("no identity.moved ({reason})"));
    assert_eq!(
        [&moved["from"], &moved["to"], &moved["reason"]],
        [from, to, reason],
        "{moved}"
    );
}

fn show(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("identity.show", json!({ "name": name }))
        .unwrap_or_else(|e| panic!("identity.show {name}: {e}"))
}

#[test]
fn identity_commands_and_their_refusals() {
    let mut sw = switch();
    for p in ["a", "b", "c"] {
        sw.add_port(p).expect("port.add");
    }
    sw.call("port.add", json!({"name": "v10", "vlan": 10}))
        .expect("port.add v10");
    let img = sw.run_dir().join("d0.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    sw.call("disk.add", json!({"name": "d0", "path": img}))
        .expect("disk.add");

    let info = sw.call("switch.info", json!({})).unwrap();
    assert!(info["features"]
        .as_array()
        .unwrap()
        .contains(&json!("identity")));
    for c in ["identity.add", "identity.move", "identity.set"] {
        assert!(info["commands"].as_array().unwrap().contains(&json!(c)));
    }

    let web = add_web(&mut sw, json!({"standby": ["c"]}));
    assert_eq!(
        web,
        json!({
            "name": "web", "mac": WEB_MAC_STR, "ips": [WEB_V4, WEB_V6], "vlan": 0,
            "port": null, "health": null, "stall_ms": 1000,
            "standby": [{"port": "c", "health": "disconnected"}], "failover_pending": null,
        })
    );
    assert_eq!(show(&mut sw, "web"), web);
    assert_eq!(
        sw.call("identity.list", json!({})).unwrap(),
        json!([web.clone()])
    );
    assert!(
        statics(&mut sw).is_empty(),
        "an unbound identity is nowhere"
    );

    let add = |extra: Value| {
        let mut a = json!({"name": "x", "mac": "52:54:00:00:00:20", "ips": ["192.0.2.20"]});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        a
    };
    let bad_adds = [
        (json!({"mac": "zz"}), "invalid_argument"),
        (json!({"mac": "01:00:5e:00:00:01"}), "invalid_argument"),
        (json!({"mac": "00:00:00:00:00:00"}), "invalid_argument"),
        (json!({"ips": []}), "invalid_argument"),
        (json!({"ips": ["192.0.2.300"]}), "invalid_argument"),
        (json!({"ips": ["127.0.0.1"]}), "invalid_argument"),
        (json!({"ips": ["224.0.0.1"]}), "invalid_argument"),
        (json!({"ips": ["::"]}), "invalid_argument"),
        (
            json!({"ips": ["192.0.2.20", "192.0.2.20"]}),
            "invalid_argument",
        ),
        (json!({"vlan": 4095}), "invalid_argument"),
        (json!({"stall_ms": 10}), "invalid_argument"),
        (json!({"name": "../x"}), "invalid_argument"),
        (json!({"colour": "red"}), "invalid_argument"),
        (json!({"name": "web"}), "exists"),
        (json!({"mac": WEB_MAC_STR}), "conflict"),
        (json!({"ips": ["192.0.2.21", WEB_V6]}), "conflict"),
        (json!({"standby": ["zz"]}), "not_found"),
        (json!({"standby": ["d0"]}), "wrong_kind"),
        (json!({"standby": ["v10"]}), "conflict"),
        (json!({"standby": ["a", "a"]}), "invalid_argument"),
    ];
    for (extra, code) in bad_adds {
        refused(&mut sw, "identity.add", add(extra), code);
    }
    // The same addresses in another VLAN are another identity.
    let x10 = sw
        .call(
            "identity.add",
            json!({"name": "x10", "mac": WEB_MAC_STR, "ips": [WEB_V4], "vlan": 10}),
        )
        .expect("identity.add x10");
    assert_eq!(x10["vlan"], 10);

    refused(
        &mut sw,
        "identity.unbind",
        json!({"name": "web"}),
        "conflict",
    );
    refused(
        &mut sw,
        "identity.move",
        json!({"name": "web", "to": "b"}),
        "conflict",
    );
    for (args, code) in [
        (json!({"name": "nope", "port": "a"}), "not_found"),
        (json!({"name": "web", "port": "zz"}), "not_found"),
        (json!({"name": "web", "port": "d0"}), "wrong_kind"),
        (json!({"name": "web", "port": "v10"}), "conflict"),
        (json!({"name": "web"}), "invalid_argument"),
    ] {
        refused(&mut sw, "identity.bind", args, code);
    }

    // Bind: the MAC goes to the port, for good (a static entry).
    let bound = sw
        .call("identity.bind", json!({"name": "web", "port": "a"}))
        .expect("identity.bind");
    assert_eq!(bound["port"], "a");
    assert_eq!(bound["health"], "disconnected");
    assert_eq!(statics(&mut sw), web_at("a"));
    // Again to the same port: nothing to do.
    sw.call("identity.bind", json!({"name": "web", "port": "a"}))
        .expect("identity.bind again");
    refused(
        &mut sw,
        "identity.bind",
        json!({"name": "web", "port": "b"}),
        "conflict",
    );
    for (to, code) in [
        ("v10", "conflict"),
        ("d0", "wrong_kind"),
        ("zz", "not_found"),
    ] {
        refused(
            &mut sw,
            "identity.move",
            json!({"name": "web", "to": to}),
            code,
        );
    }
    // Its MAC is not for static entries; its ports keep their VLAN.
    refused(
        &mut sw,
        "fdb.add",
        json!({"mac": WEB_MAC_STR, "port": "b"}),
        "conflict",
    );
    refused(
        &mut sw,
        "port.set",
        json!({"name": "a", "vlan": 3}),
        "conflict",
    );
    refused(
        &mut sw,
        "port.set",
        json!({"name": "c", "vlan": 3}),
        "conflict",
    );
    sw.call("port.set", json!({"name": "b", "vlan": 3}))
        .expect("b carries nothing");
    sw.call("port.set", json!({"name": "b", "vlan": 0}))
        .expect("port.set b back");

    // Move: the static entry follows.
    let moved = sw
        .call("identity.move", json!({"name": "web", "to": "b"}))
        .expect("identity.move");
    assert_eq!(moved["port"], "b");
    assert_eq!(statics(&mut sw), web_at("b"));
    sw.call("identity.move", json!({"name": "web", "to": "b"}))
        .expect("a move to where it is");
    assert_eq!(statics(&mut sw), web_at("b"));

    // Set: standbys replaced or emptied, stall time.
    for (args, code) in [
        (json!({"name": "web", "stall_ms": 20}), "invalid_argument"),
        (
            json!({"name": "web", "standby": ["a", "a"]}),
            "invalid_argument",
        ),
        (json!({"name": "web", "standby": ["zz"]}), "not_found"),
        (json!({"name": "web", "standby": ["v10"]}), "conflict"),
        (json!({"name": "nope", "stall_ms": 200}), "not_found"),
        (json!({"name": "web", "port": "a"}), "invalid_argument"),
    ] {
        refused(&mut sw, "identity.set", args, code);
    }
    let set = sw
        .call(
            "identity.set",
            json!({"name": "web", "standby": ["c", "a"], "stall_ms": 0}),
        )
        .expect("identity.set");
    assert_eq!(
        (set["standby"].clone(), set["stall_ms"].clone()),
        (
            json!([{"port": "c", "health": "disconnected"}, {"port": "a", "health": "disconnected"}]),
            json!(0)
        )
    );
    let set = sw
        .call("identity.set", json!({"name": "web", "standby": []}))
        .expect("identity.set standby []");
    assert_eq!(set["standby"], json!([]));
    assert_eq!(set["stall_ms"], 0, "what is not given stays");

    // A static entry of the user's for a MAC stands in the way of a bind.
    sw.call(
        "identity.add",
        json!({"name": "db", "mac": "52:54:00:00:00:30", "ips": ["192.0.2.30"], "standby": ["b", "c"]}),
    )
    .expect("identity.add db");
    sw.call("fdb.del", json!({"mac": "52:54:00:00:00:30", "vlan": 0}))
        .expect_err("no static entry yet");
    refused(
        &mut sw,
        "fdb.add",
        json!({"mac": "52:54:00:00:00:30", "port": "a"}),
        "conflict",
    );

    // Unbind: the MAC is learnt again like any other.
    let unbound = sw
        .call("identity.unbind", json!({"name": "web"}))
        .expect("identity.unbind");
    assert_eq!(unbound["port"], Value::Null);
    assert!(statics(&mut sw).is_empty());

    // Removing a port unbinds what it carries and takes it out of standby
    // lists; the identities stay.
    sw.call("identity.bind", json!({"name": "db", "port": "c"}))
        .expect("identity.bind db");
    sw.del_port("b").expect("port.del b");
    let db = show(&mut sw, "db");
    assert_eq!(db["port"], "c");
    assert_eq!(
        db["standby"],
        json!([{"port": "c", "health": "disconnected"}])
    );
    sw.del_port("c").expect("port.del c");
    let db = show(&mut sw, "db");
    assert_eq!(
        (db["port"].clone(), db["standby"].clone()),
        (Value::Null, json!([]))
    );
    assert!(statics(&mut sw).is_empty());

    // Removing an identity unbinds it first.
    sw.call("identity.bind", json!({"name": "web", "port": "a"}))
        .expect("identity.bind web");
    refused(
        &mut sw,
        "identity.del",
        json!({"name": "nope"}),
        "not_found",
    );
    sw.call("identity.del", json!({"name": "web"}))
        .expect("identity.del");
    refused(
        &mut sw,
        "identity.show",
        json!({"name": "web"}),
        "not_found",
    );
    assert!(statics(&mut sw).is_empty());
    let list = sw.call("identity.list", json!({})).unwrap();
    assert_eq!(
        (
            &list[0]["name"],
            &list[1]["name"],
            list.as_array().map(Vec::len)
        ),
        (&json!("db"), &json!("x10"), Some(2))
    );
}

#[test]
fn port_identity_options_are_checked_and_shown() {
    let mut sw = switch();
    let r = sw
        .call(
            "port.add",
            json!({"name": "r", "trusted": true, "guest_mac": "52:54:00:AA:00:01",
                   "ip_map": ["192.0.2.10=10.0.0.10", "2001:db8::10=fd00::10"]}),
        )
        .expect("port.add with options");
    assert_eq!(
        (
            r["trusted"].clone(),
            r["guest_mac"].clone(),
            r["ip_map"].clone()
        ),
        (
            json!(true),
            json!("52:54:00:aa:00:01"),
            json!(["192.0.2.10=10.0.0.10", "2001:db8::10=fd00::10"])
        )
    );
    let plain = sw.call("port.add", json!({"name": "p"})).expect("port.add");
    assert_eq!(
        (
            plain["trusted"].clone(),
            plain["guest_mac"].clone(),
            plain["ip_map"].clone()
        ),
        (json!(false), Value::Null, json!([]))
    );
    for args in [
        json!({"name": "q", "guest_mac": "ff:ff:ff:ff:ff:ff"}),
        json!({"name": "q", "guest_mac": "nope"}),
        json!({"name": "q", "ip_map": ["192.0.2.10"]}),
        json!({"name": "q", "ip_map": ["192.0.2.10=fd00::1"]}),
        json!({"name": "q", "ip_map": ["192.0.2.10=192.0.2.10"]}),
        json!({"name": "q", "ip_map": ["192.0.2.10=10.0.0.1", "192.0.2.10=10.0.0.2"]}),
        json!({"name": "q", "trusted": "yes"}),
    ] {
        refused(&mut sw, "port.add", args, "invalid_argument");
    }
    for args in [
        json!({"name": "r", "guest_mac": "01:00:00:00:00:01"}),
        json!({"name": "r", "ip_map": ["10.0.0.1=10.0.0.2", "10.0.0.3=10.0.0.2"]}),
    ] {
        refused(&mut sw, "port.set", args, "invalid_argument");
    }
    let r = sw
        .call(
            "port.set",
            json!({"name": "r", "trusted": false, "guest_mac": null, "ip_map": []}),
        )
        .expect("port.set clears");
    assert_eq!(
        (
            r["trusted"].clone(),
            r["guest_mac"].clone(),
            r["ip_map"].clone()
        ),
        (json!(false), Value::Null, json!([]))
    );
    let r = sw
        .call(
            "port.set",
            json!({"name": "r", "guest_mac": "52:54:00:aa:00:02"}),
        )
        .expect("port.set guest_mac");
    assert_eq!(r["guest_mac"], "52:54:00:aa:00:02");
    assert_eq!(r["ip_map"], json!([]), "what is not given stays");
}

#[test]
fn identities_and_port_options_survive_a_crash() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-identity-persist").unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("start");
    for p in ["a", "b", "c"] {
        sw.add_port(p).expect("port.add");
    }
    sw.call(
        "port.set",
        json!({"name": "b", "trusted": true, "guest_mac": "52:54:00:aa:00:01",
               "ip_map": ["192.0.2.10=10.0.0.10"]}),
    )
    .expect("port.set b");
    add_web(&mut sw, json!({"standby": ["c", "b"], "stall_ms": 300}));
    sw.call(
        "identity.add",
        json!({"name": "db", "mac": "52:54:00:00:00:30", "ips": ["192.0.2.30"]}),
    )
    .expect("identity.add db");
    sw.call(
        "identity.add",
        json!({"name": "spare", "mac": "52:54:00:00:00:40", "ips": ["192.0.2.40"]}),
    )
    .expect("identity.add spare");
    sw.call("identity.bind", json!({"name": "db", "port": "b"}))
        .expect("bind db");
    sw.call("identity.bind", json!({"name": "web", "port": "a"}))
        .expect("bind web");
    sw.call("identity.move", json!({"name": "web", "to": "b"}))
        .expect("move web");
    let before = snapshot(&mut sw);
    assert_eq!(before.2.len(), 2);
    // Saved in binding order: db was bound to b before web.
    let saved: Vec<Value> = before.0["identity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].clone())
        .collect();
    assert_eq!(saved, [json!("spare"), json!("db"), json!("web")]);

    sw.kill();
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart");
    assert_eq!(snapshot(&mut sw), before);
    let web = show(&mut sw, "web");
    assert_eq!(
        (web["port"].clone(), web["stall_ms"].clone()),
        (json!("b"), json!(300))
    );
}

/// Ports a, b and c with a guest on each; identity web bound to `at` with
/// `standby`, the bind's announcements received by the other guests.
struct Setup {
    sw: SwitchProcess,
    guests: Vec<(String, NetGuest)>,
}

impl Setup {
    fn new(at: &str, standby: &[&str], stall_ms: u64) -> Setup {
        let mut sw = switch();
        let mut guests = Vec::new();
        for p in ["a", "b", "c"] {
            let sock = sw.add_port(p).expect("port.add");
            let g = NetGuest::connect(&sock, small_config()).expect("guest");
            guests.push((p.to_string(), g));
        }
        wait_until("the guests to be attached", || {
            let ports = sw.call("port.list", json!({})).unwrap();
            ports
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["connected"] == true)
        });
        add_web(&mut sw, json!({"standby": standby, "stall_ms": stall_ms}));
        sw.call("identity.bind", json!({"name": "web", "port": at}))
            .expect("identity.bind");
        let mut s = Setup { sw, guests };
        for p in ["a", "b", "c"].into_iter().filter(|p| *p != at) {
            s.take_announcements(p);
        }
        s
    }

    fn guest(&mut self, port: &str) -> &mut NetGuest {
        &mut self
            .guests
            .iter_mut()
            .find(|(p, _)| p == port)
            .expect("a guest on that port")
            .1
    }

    /// The announcements of web that the guest on `port` receives: all
    /// three rounds, each a RARP, a gratuitous ARP and a neighbour
    /// advertisement, byte for byte. Nothing else may come.
    fn take_announcements(&mut self, port: &str) {
        let want = [
            rarp(WEB_MAC),
            gratuitous_arp(WEB_MAC, WEB_V4.parse().unwrap()),
            neighbour_advertisement(WEB_MAC, WEB_V6.parse().unwrap()),
        ];
        let mut seen = [0; 3];
        while seen != [3; 3] {
            let f = recv_one(self.guest(port));
            let i = want
                .iter()
                .position(|w| *w == f)
                .unwrap_or_else(|| panic!("{port} got a frame that is no announcement: {f:02x?}"));
            seen[i] += 1;
        }
    }
}

#[test]
fn a_move_announces_the_identity_from_its_new_port() {
    let mut s = Setup::new("a", &[], 1000);
    // What goes out is what a peer must see: checked here field by field
    // too, not only against the switch's own builders.
    let garp = gratuitous_arp(WEB_MAC, WEB_V4.parse().unwrap());
    assert_eq!(&garp[12..14], &[0x08, 0x06]);
    assert_eq!(&garp[20..22], &[0, 1], "a request");
    assert_eq!(&garp[28..32], &[192, 0, 2, 10], "sender");
    assert_eq!(&garp[38..42], &[192, 0, 2, 10], "target");
    let na = neighbour_advertisement(WEB_MAC, WEB_V6.parse().unwrap());
    assert_eq!(&na[..6], &[0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!((na[20], na[21], na[54], na[58]), (58, 255, 136, 0x20));
    assert_eq!(&na[80..86], &WEB_MAC, "target link-layer address");
    let r = rarp(WEB_MAC);
    assert_eq!((&r[12..14], &r[20..22]), (&[0x80, 0x35][..], &[0, 3][..]));

    s.sw.call("identity.move", json!({"name": "web", "to": "c"}))
        .expect("identity.move");
    assert_eq!(statics(&mut s.sw), web_at("c"));
    s.take_announcements("b");
    // c sent them: they must not come back to it. Each round reached b in
    // the pass that would have reached c, and a broadcast from b comes to
    // c after it (one worker, in order).
    let marker_src = mac(0xb);
    let mut b = s.guests.remove(1).1;
    let before = barrier(&mut b, marker_src, 7, &mut [s.guest("c")]);
    assert_eq!(
        before[0],
        Vec::<Vec<u8>>::new(),
        "c got frames before the marker"
    );
}

#[test]
fn a_guest_that_disconnects_hands_its_identity_to_the_first_healthy_standby() {
    let mut s = Setup::new("a", &["b", "c"], 0);
    let mut events = EventStream::subscribe(&s.sw.control_path()).expect("subscribe");
    // b is the first standby, but broken: its guest wrote an avail index
    // far ahead of the ring.
    {
        let mut tx = s.guest("b").raw_tx();
        let idx = tx.avail_idx();
        let size = tx.size();
        tx.set_avail_idx(idx.wrapping_add(size + 1));
        tx.kick();
    }
    wait_until("b broken", || {
        s.sw.call("port.show", json!({"name": "b"})).unwrap()["broken"] == true
    });
    let (_, a) = s.guests.remove(0);
    a.disconnect();
    expect_move(&mut events, "a", "c", "disconnected");
    let web = show(&mut s.sw, "web");
    assert_eq!(web["port"], "c");
    assert_eq!(web["failover_pending"], Value::Null);
    assert_eq!(statics(&mut s.sw), web_at("c"));
    // The event comes once the state on disk says so.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(s.sw.run_dir().join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["identity"][0]["port"], "c");
}

#[test]
fn a_failover_waits_for_a_standby_to_be_healthy() {
    let mut sw = switch();
    let a_sock = sw.add_port("a").expect("port.add a");
    let c_sock = sw.add_port("c").expect("port.add c");
    let a = NetGuest::connect(&a_sock, small_config()).expect("guest a");
    add_web(&mut sw, json!({"standby": ["c"]}));
    sw.call("identity.bind", json!({"name": "web", "port": "a"}))
        .expect("identity.bind");
    let mut events = EventStream::subscribe(&sw.control_path()).expect("subscribe");
    a.disconnect();
    let failed = events
        .find("identity.failover_failed", DEADLINE, |e| {
            e["identity"] == "web"
        })
        .expect("events")
        .expect("identity.failover_failed");
    assert_eq!(
        (
            failed["port"].clone(),
            failed["reason"].clone(),
            failed["standby"].clone()
        ),
        (
            json!("a"),
            json!("disconnected"),
            json!([{"port": "c", "health": "disconnected"}])
        )
    );
    let web = show(&mut sw, "web");
    assert_eq!(
        (web["port"].clone(), web["failover_pending"].clone()),
        (json!("a"), json!("disconnected"))
    );
    assert_eq!(statics(&mut sw), web_at("a"));
    let _c = NetGuest::connect(&c_sock, small_config()).expect("guest c");
    expect_move(&mut events, "a", "c", "disconnected");
    assert_eq!(show(&mut sw, "web")["failover_pending"], Value::Null);
    assert_eq!(statics(&mut sw), web_at("c"));
}

#[test]
fn a_guest_that_stops_taking_frames_hands_its_identity_over() {
    let mut s = Setup::new("a", &["c"], 200);
    let mut events = EventStream::subscribe(&s.sw.control_path()).expect("subscribe");
    s.guest("a").set_rx_refill(false);
    let to_web: Vec<Vec<u8>> = (0..16).map(|i| frame(WEB_MAC, mac(0xb), 64, i)).collect();
    // Keep frames coming for web until the switch gives up on a.
    let deadline = std::time::Instant::now() + DEADLINE;
    while s.sw.call("identity.show", json!({"name": "web"})).unwrap()["port"] == "a" {
        assert!(std::time::Instant::now() < deadline, "no failover");
        send_all(s.guest("b"), &to_web);
        s.guest("b").reclaim_tx();
    }
    expect_move(&mut events, "a", "c", "rx_stalled");
    assert_eq!(statics(&mut s.sw), web_at("c"));
    assert_eq!(show(&mut s.sw, "web")["port"], "c");
}
