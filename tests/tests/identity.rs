//! Identities in the dataplane, through the project's guest driver: port
//! security (what is dropped, by which counter, and what a user expects to
//! pass), identity mapping both ways (MAC and 1:1 IP, with checksums), and
//! a move: traffic for the identity follows it, nothing reaches the old port
//! after the move has returned.
//!
//! The control side (commands, refusals, announcements, failover) is
//! `control_identity`; the rewrites byte by byte are the unit tests of
//! `switch/src/identity/frame.rs`.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{json, Value};
use vioswitch_testkit::frames::{
    barrier, counters, mac, plug, plug_with, recv_n, send_all, small_config, wait_tx_done,
    BROADCAST,
};
use vioswitch_testkit::guest::NetGuest;
use vioswitch_testkit::packets::{
    arp, arp_addrs, macs, neighbour_advert, udp4, udp4_checked, udp6, udp6_checked,
};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

/// The identity's MAC and addresses.
const IDENT: [u8; 6] = [0x02, 0x1d, 0x00, 0x00, 0x00, 0x01];
const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// A standby guest's own MAC.
const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0xcc];

fn ip6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
}

fn peer6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)
}

fn switch(workers: usize) -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions {
        workers,
        ..Default::default()
    })
    .expect("start vioswitch")
}

fn call(sw: &mut SwitchProcess, cmd: &str, args: Value) -> Value {
    sw.call(cmd, args.clone())
        .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
}

/// Identity `svc` (IDENT, IP, ip6()) bound to `port`.
fn bind_svc(sw: &mut SwitchProcess, port: &str) {
    call(
        sw,
        "identity.add",
        json!({"name": "svc", "mac": "02:1d:00:00:00:01", "ips": [IP.to_string(), ip6().to_string()]}),
    );
    call(sw, "identity.bind", json!({"name": "svc", "port": port}));
}

/// A frame from the peer on `b` to the identity.
fn to_svc(tag: u64) -> Vec<u8> {
    udp4(IDENT, mac(2), (PEER_IP, 4000), (IP, 7), &tag.to_be_bytes())
}

/// Whether `f` is one of the switch's announcements of an identity (a
/// bind or move sends them, again 50 and 200 ms later): RARP, a gratuitous
/// ARP, an unsolicited neighbour advertisement to all nodes.
fn announcement(f: &[u8]) -> bool {
    match f.get(12..14) {
        Some([0x80, 0x35]) => true,
        Some([0x08, 0x06]) => f.len() >= 42 && f[28..32] == f[38..42],
        Some([0x86, 0xdd]) => f.len() >= 55 && f[..6] == [0x33, 0x33, 0, 0, 0, 1] && f[54] == 136,
        _ => false,
    }
}

/// Whatever `g` received before `sender`'s broadcast marker, announcements
/// left out.
fn drain(sender: &mut NetGuest, src: [u8; 6], g: &mut NetGuest, tag: u64) -> Vec<Vec<u8>> {
    let mut got = barrier(sender, src, tag, &mut [g]).remove(0);
    got.retain(|f| !announcement(f));
    got
}

/// The next `n` frames `g` receives, announcements left out.
fn recv_frames(g: &mut NetGuest, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        got.extend(recv_n(g, 1).into_iter().filter(|f| !announcement(f)));
    }
    got
}

#[test]
fn port_security_drops_what_the_port_does_not_own_and_lets_through_what_a_guest_needs() {
    let mut sw = switch(1);
    let mut a = plug(&mut sw, "a", small_config());
    let mut b = plug(&mut sw, "b", small_config());
    bind_svc(&mut sw, "a");
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let dhcp = udp4(
        BROADCAST,
        IDENT,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        b"discover",
    );
    let good = vec![
        udp4(mac(2), IDENT, (IP, 9), (PEER_IP, 9), b"v4"),
        udp6(mac(2), IDENT, (ip6(), 9), (peer6(), 9), b"v6"),
        arp(BROADCAST, IDENT, 1, IDENT, IP, [0; 6], PEER_IP),
        // An ARP probe (sender 0.0.0.0), DHCP, link-local IPv6.
        arp(
            BROADCAST,
            IDENT,
            1,
            IDENT,
            Ipv4Addr::UNSPECIFIED,
            [0; 6],
            IP,
        ),
        dhcp,
        udp6(mac(2), IDENT, (link_local, 546), (peer6(), 547), b"ll"),
        neighbour_advert(mac(2), IDENT, ip6(), peer6(), ip6(), IDENT),
    ];
    let bad = [
        (
            "spoofed_mac",
            udp4(mac(2), mac(9), (IP, 9), (PEER_IP, 9), b"x"),
        ),
        (
            "spoofed_ipv4",
            udp4(
                mac(2),
                IDENT,
                (Ipv4Addr::new(10, 0, 0, 9), 9),
                (PEER_IP, 9),
                b"x",
            ),
        ),
        (
            "spoofed_arp",
            arp(
                BROADCAST,
                IDENT,
                2,
                IDENT,
                Ipv4Addr::new(10, 0, 0, 9),
                mac(2),
                PEER_IP,
            ),
        ),
        (
            "spoofed_arp",
            arp(BROADCAST, IDENT, 2, mac(9), IP, mac(2), PEER_IP),
        ),
        (
            "spoofed_ipv6",
            udp6(mac(2), IDENT, (peer6(), 9), (ip6(), 9), b"x"),
        ),
        (
            "spoofed_nd",
            neighbour_advert(mac(2), IDENT, ip6(), peer6(), peer6(), IDENT),
        ),
        (
            "spoofed_nd",
            neighbour_advert(mac(2), IDENT, ip6(), peer6(), ip6(), mac(9)),
        ),
    ];
    let mut all = good.clone();
    all.extend(bad.iter().map(|(_, f)| f.clone()));
    send_all(&mut a, &all);
    let got = drain(&mut a, IDENT, &mut b, 1);
    assert_eq!(got, good, "b receives exactly what a owns, in order");
    let c = counters(&mut sw, "a");
    for reason in [
        "spoofed_mac",
        "spoofed_ipv4",
        "spoofed_arp",
        "spoofed_ipv6",
        "spoofed_nd",
    ] {
        let n = bad.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(c.dropped(reason), n, "{reason}: {:?}", c.nonzero_drops());
    }
    assert_eq!(c.total_drops(), bad.len() as u64, "{:?}", c.nonzero_drops());

    // A trusted port (a router) is not checked.
    call(&mut sw, "port.set", json!({"name": "a", "trusted": true}));
    let spoofed: Vec<Vec<u8>> = bad.iter().map(|(_, f)| f.clone()).collect();
    send_all(&mut a, &spoofed);
    assert_eq!(drain(&mut a, IDENT, &mut b, 2), spoofed);
    assert_eq!(counters(&mut sw, "a").total_drops(), bad.len() as u64);

    // Without identities a port is a plain switch port again.
    call(&mut sw, "port.set", json!({"name": "a", "trusted": false}));
    call(&mut sw, "identity.unbind", json!({"name": "svc"}));
    send_all(&mut a, &spoofed);
    assert_eq!(drain(&mut a, IDENT, &mut b, 3), spoofed);
}

#[test]
fn a_guest_with_its_own_addresses_carries_the_identity_and_peers_see_only_the_identity() {
    let mut sw = switch(1);
    let guest_ip = Ipv4Addr::new(192, 168, 7, 7);
    let guest_ip6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);
    let mut c = plug_with(
        &mut sw,
        json!({"name": "c", "guest_mac": "52:54:00:00:00:cc",
               "ip_map": [format!("{IP}={guest_ip}"), format!("{}={guest_ip6}", ip6())]}),
        small_config(),
    );
    let mut b = plug(&mut sw, "b", small_config());
    bind_svc(&mut sw, "c");

    // Guest to network: its MAC and addresses become the identity's.
    let out = vec![
        arp(mac(2), GUEST, 2, GUEST, guest_ip, mac(2), PEER_IP),
        udp4(mac(2), GUEST, (guest_ip, 53), (PEER_IP, 4000), b"answer"),
        udp6(mac(2), GUEST, (guest_ip6, 53), (peer6(), 4000), b"answer6"),
    ];
    send_all(&mut c, &out);
    let got = recv_frames(&mut b, out.len());
    for f in &got {
        assert_eq!(macs(f), (mac(2), IDENT), "source MAC");
    }
    assert_eq!(arp_addrs(&got[0]), (IDENT, IP, mac(2), PEER_IP));
    assert_eq!(udp4_checked(&got[1]), (IP, PEER_IP));
    assert_eq!(udp6_checked(&got[2]), (ip6(), peer6()));
    assert_eq!(
        counters(&mut sw, "c").total_drops(),
        0,
        "mapped frames pass the checks"
    );

    // Network to guest: the identity's MAC and addresses become the guest's.
    let inbound = vec![
        arp(IDENT, mac(2), 1, mac(2), PEER_IP, IDENT, IP),
        to_svc(1),
        udp6(IDENT, mac(2), (peer6(), 4000), (ip6(), 53), b"query6"),
    ];
    send_all(&mut b, &inbound);
    let got = recv_frames(&mut c, inbound.len());
    for f in &got {
        assert_eq!(macs(f), (GUEST, mac(2)), "destination MAC");
    }
    assert_eq!(arp_addrs(&got[0]), (mac(2), PEER_IP, GUEST, guest_ip));
    assert_eq!(udp4_checked(&got[1]), (PEER_IP, guest_ip));
    assert_eq!(udp6_checked(&got[2]), (peer6(), guest_ip6));
}

#[test]
fn a_guest_mac_not_given_is_not_guessed_from_the_guests_frames() {
    // A guest sending from a MAC that is not the identity's is dropped, not
    // mapped: mapping needs the port's `guest_mac`.
    let mut sw = switch(1);
    let mut c = plug(&mut sw, "c", small_config());
    let mut b = plug(&mut sw, "b", small_config());
    bind_svc(&mut sw, "c");
    send_all(&mut c, &[udp4(mac(2), GUEST, (IP, 1), (PEER_IP, 1), b"hi")]);
    assert!(drain(&mut c, IDENT, &mut b, 1).is_empty());
    assert_eq!(counters(&mut sw, "c").dropped("spoofed_mac"), 1);
}

#[test]
fn after_a_move_returns_the_identity_s_traffic_reaches_only_its_new_port() {
    // Two workers: the sender's frames for the identity cross a mailbox.
    let mut sw = switch(2);
    let mut a = plug_with(&mut sw, json!({"name": "a", "worker": 0}), small_config());
    let mut b = plug_with(&mut sw, json!({"name": "b", "worker": 1}), small_config());
    let mut c = plug_with(
        &mut sw,
        json!({"name": "c", "worker": 0, "guest_mac": "52:54:00:00:00:cc"}),
        small_config(),
    );
    bind_svc(&mut sw, "a");
    let tag_of = |f: &[u8]| -> Option<u64> {
        (f.len() >= 50 && f[12..14] == [8, 0] && f[36..38] == [0, 7])
            .then(|| u64::from_be_bytes(f[f.len() - 8..].try_into().unwrap_or([0; 8])))
    };
    for round in 0..6u64 {
        let (from, to) = if round % 2 == 0 {
            ("a", "c")
        } else {
            ("c", "a")
        };
        // Frames in flight while the identity moves, then frames switched
        // after it has returned.
        let burst: Vec<Vec<u8>> = (0..40).map(|i| to_svc(round * 1000 + i)).collect();
        send_all(&mut b, &burst);
        call(&mut sw, "identity.move", json!({"name": "svc", "to": to}));
        let after: Vec<u64> = (500..520).map(|i| round * 1000 + i).collect();
        let frames: Vec<Vec<u8>> = after.iter().map(|t| to_svc(*t)).collect();
        send_all(&mut b, &frames);
        wait_tx_done(&mut b);
        let (new, old) = if to == "c" {
            (&mut c, &mut a)
        } else {
            (&mut a, &mut c)
        };
        let new_mac = if to == "c" { GUEST } else { IDENT };
        let mut got = Vec::new();
        while got.len() < after.len() {
            let f = recv_n(new, 1).remove(0);
            if let Some(t) = tag_of(&f) {
                assert_eq!(
                    macs(&f).0,
                    new_mac,
                    "round {round}: mapped for the new port's guest"
                );
                if t % 1000 >= 500 {
                    got.push(t);
                }
            }
        }
        assert_eq!(got, after, "round {round}: all of it, in order, on {to}");
        // The old port: a broadcast marker from b proves all b sent has
        // been switched; none of what followed the move is there.
        let before_marker = drain(&mut b, mac(2), old, 99);
        let late: Vec<u64> = before_marker
            .iter()
            .filter_map(|f| tag_of(f))
            .filter(|t| t % 1000 >= 500)
            .collect();
        assert!(
            late.is_empty(),
            "round {round}: {from} got {late:?} after the move"
        );
        drain(&mut b, mac(2), new, 98);
    }
}

/// `identity.show`'s health of standby `port`.
fn standby_health(sw: &mut SwitchProcess, port: &str) -> String {
    let v = call(sw, "identity.show", json!({"name": "svc"}));
    v["standby"]
        .as_array()
        .and_then(|s| s.iter().find(|e| e["port"] == port))
        .map(|e| e["health"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn a_new_guest_on_a_port_does_not_inherit_the_last_one_s_rx_stall() {
    let mut sw = switch(1);
    let mut b = plug(&mut sw, "b", small_config());
    let sock = sw.add_port("a").expect("port.add a");
    let mut a = NetGuest::connect(&sock, small_config()).expect("guest on a");
    let _c = plug(&mut sw, "c", small_config());
    call(
        &mut sw,
        "identity.add",
        json!({"name": "svc", "mac": "02:1d:00:00:00:01", "ips": [IP.to_string()],
               "standby": ["a"], "stall_ms": 100}),
    );
    call(
        &mut sw,
        "identity.bind",
        json!({"name": "svc", "port": "c"}),
    );
    // a's guest (MAC 5, learnt) stops taking frames while frames for it
    // keep coming: its stall clock runs past the stall time; then it goes
    // away with the clock running.
    send_all(
        &mut a,
        &[udp4(mac(2), mac(5), (PEER_IP, 1), (IP, 1), b"hi")],
    );
    recv_frames(&mut b, 1);
    a.set_rx_refill(false);
    let to_a: Vec<Vec<u8>> = (0..100)
        .map(|i| udp4(mac(5), mac(2), (PEER_IP, 1), (IP, 1), &[i as u8]))
        .collect();
    send_all(&mut b, &to_a);
    wait_tx_done(&mut b);
    assert!(counters(&mut sw, "a").dropped("no_rx_buffer") > 0);
    vioswitch_testkit::frames::wait_until("a stalled", || {
        standby_health(&mut sw, "a") == "rx_stalled"
    });
    a.disconnect();
    // A new guest that takes everything is healthy, however long it has
    // been connected, and takes what comes.
    let mut a = NetGuest::connect(&sock, small_config()).expect("guest on a again");
    vioswitch_testkit::frames::wait_until("a attached", || {
        call(&mut sw, "port.show", json!({"name": "a"}))["connected"] == true
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(standby_health(&mut sw, "a"), "healthy");
    send_all(&mut b, &to_a[..10]);
    recv_frames(&mut a, 10);
    assert_eq!(standby_health(&mut sw, "a"), "healthy");
}

#[test]
fn frames_for_an_identity_whose_guest_is_gone_are_dropped_not_flooded() {
    let mut sw = switch(1);
    let a = plug(&mut sw, "a", small_config());
    let mut b = plug(&mut sw, "b", small_config());
    let mut c = plug(&mut sw, "c", small_config());
    bind_svc(&mut sw, "a");
    a.disconnect();
    // The port shows as disconnected as soon as the switch reads the end;
    // it leaves its worker a moment later: until then frames for it find
    // no RX buffer. Probe until one is dropped as port_down.
    let mut probes = 0;
    vioswitch_testkit::frames::wait_until("a detached", || {
        send_all(&mut b, &[to_svc(1000 + probes)]);
        wait_tx_done(&mut b);
        probes += 1;
        counters(&mut sw, "b").dropped("port_down") > 0
    });
    let frames: Vec<Vec<u8>> = (0..20).map(to_svc).collect();
    send_all(&mut b, &frames);
    assert!(drain(&mut b, mac(2), &mut c, 5).is_empty(), "flooded to c");
    assert_eq!(counters(&mut sw, "b").dropped("port_down"), 21);
}
