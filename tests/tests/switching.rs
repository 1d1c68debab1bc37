//! L2 switching through the project's own guest driver: flooding, learning,
//! VLANs, ageing, MAC moves, exact counters, frame sizes, descriptor chains,
//! mergeable RX buffers, multi-queue ports and cross-worker traffic.
//!
//! Every test runs its own switch. "Did not arrive" is never judged by
//! waiting: a sender's TX chains come back only after the switch has
//! delivered their frames to the ports of its worker, and a broadcast marker
//! ([`barrier`]) proves that everything sent before it has reached a port.

use serde_json::json;
use vioswitch_testkit::frames::{
    barrier, counters, drops, frame, mac, mac_str, plug, plug_with, recv_n, recv_one, send_all,
    small_config, wait_tx_done, wait_until, PortCounters, BROADCAST, MULTICAST_V4, MULTICAST_V6,
};
use vioswitch_testkit::guest::{eth_frame, NetGuest, NetGuestConfig};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

fn switch_with(args: &[&str], workers: usize) -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions {
        workers,
        extra_args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .expect("start vioswitch")
}

/// The FDB as (mac, vlan, port name, static) tuples.
fn fdb(sw: &mut SwitchProcess, args: serde_json::Value) -> Vec<(String, u64, String, bool)> {
    let v = sw.call("fdb.show", args).expect("fdb.show");
    v.as_array()
        .expect("fdb.show answers an array")
        .iter()
        .map(|e| {
            (
                e["mac"].as_str().unwrap_or_default().to_string(),
                e["vlan"].as_u64().unwrap_or(u64::MAX),
                e["port"].as_str().unwrap_or_default().to_string(),
                e["static"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

fn learnt(m: u32, vlan: u64, port: &str) -> (String, u64, String, bool) {
    (mac_str(&mac(m)), vlan, port.to_string(), false)
}

fn assert_nothing_pending(name: &str, g: &mut NetGuest) {
    assert_eq!(g.try_recv(), None, "{name} received a frame it should not");
}

fn delivered(sw: &mut SwitchProcess, name: &str) -> u64 {
    counters(sw, name).tx_packets
}

#[test]
fn unknown_unicast_floods_to_every_other_port_but_not_back() {
    let mut sw = switch();
    let names = ["a", "b", "c", "d"];
    let mut g: Vec<NetGuest> = names
        .iter()
        .map(|n| plug(&mut sw, n, small_config()))
        .collect();
    let f = frame(mac(999), mac(1), 60, 1);
    send_all(&mut g[0], std::slice::from_ref(&f));
    wait_tx_done(&mut g[0]);
    for i in 1..4 {
        assert_eq!(recv_one(&mut g[i]), f, "port {}", names[i]);
    }
    assert_eq!(
        delivered(&mut sw, "a"),
        0,
        "a flooded frame came back to its sender"
    );
    assert_nothing_pending("a", &mut g[0]);
    let a = counters(&mut sw, "a");
    assert_eq!((a.rx_packets, a.rx_bytes, a.total_drops()), (1, 60, 0));
    for n in &names[1..] {
        let c = counters(&mut sw, n);
        assert_eq!((c.tx_packets, c.tx_bytes, c.rx_packets), (1, 60, 0), "{n}");
        assert_eq!(c.total_drops(), 0, "{n}: {c:?}");
    }
    assert!(sw.is_running());
}

#[test]
fn learnt_unicast_goes_only_to_the_learnt_port_and_the_fdb_shows_it() {
    let mut sw = switch();
    let names = ["a", "b", "c", "d"];
    let mut g: Vec<NetGuest> = names
        .iter()
        .map(|n| plug(&mut sw, n, small_config()))
        .collect();
    // a announces itself by flooding a frame to an unknown address.
    let f0 = frame(mac(999), mac(1), 60, 1);
    send_all(&mut g[0], std::slice::from_ref(&f0));
    for r in &mut g[1..] {
        assert_eq!(recv_one(r), f0);
    }
    // b answers a: only a gets it.
    let f1 = frame(mac(1), mac(2), 100, 2);
    send_all(&mut g[1], std::slice::from_ref(&f1));
    assert_eq!(recv_one(&mut g[0]), f1);
    wait_tx_done(&mut g[1]);
    // a talks to b: only b gets it.
    let f2 = frame(mac(2), mac(1), 200, 3);
    send_all(&mut g[0], std::slice::from_ref(&f2));
    assert_eq!(recv_one(&mut g[1]), f2);
    wait_tx_done(&mut g[0]);

    let expect = [(1, 100), (2, 260), (1, 60), (1, 60)];
    for (i, n) in names.iter().enumerate() {
        let c = counters(&mut sw, n);
        assert_eq!(
            (c.tx_packets, c.tx_bytes),
            expect[i],
            "{n} delivered: {c:?}"
        );
        assert_eq!(c.total_drops(), 0, "{n}: {c:?}");
        assert_nothing_pending(n, &mut g[i]);
    }
    assert_eq!(
        fdb(&mut sw, json!({})),
        vec![learnt(1, 0, "a"), learnt(2, 0, "b")]
    );
    assert_eq!(fdb(&mut sw, json!({"port": "b"})), vec![learnt(2, 0, "b")]);
    assert_eq!(fdb(&mut sw, json!({"port": "c"})), vec![]);
}

#[test]
fn broadcast_and_multicast_flood_and_group_sources_are_not_learnt() {
    let mut sw = switch();
    let names = ["a", "b", "c"];
    let mut g: Vec<NetGuest> = names
        .iter()
        .map(|n| plug(&mut sw, n, small_config()))
        .collect();
    let sent = vec![
        frame(BROADCAST, mac(1), 60, 1),
        frame(MULTICAST_V4, mac(1), 300, 2),
        frame(MULTICAST_V6, mac(1), 1514, 3),
    ];
    send_all(&mut g[0], &sent);
    for i in 1..3 {
        assert_eq!(recv_n(&mut g[i], 3), sent, "{} got them in order", names[i]);
    }
    wait_tx_done(&mut g[0]);
    assert_eq!(delivered(&mut sw, "a"), 0);
    assert_nothing_pending("a", &mut g[0]);
    // A frame with a group source address floods but teaches nothing.
    let bogus = frame(BROADCAST, MULTICAST_V4, 60, 4);
    send_all(&mut g[1], std::slice::from_ref(&bogus));
    assert_eq!(recv_one(&mut g[0]), bogus);
    assert_eq!(recv_one(&mut g[2]), bogus);
    assert_eq!(fdb(&mut sw, json!({})), vec![learnt(1, 0, "a")]);
}

/// Plug one guest per `(name, value)`, the port added with `key` set to the
/// value, and check that `port.list` shows it so.
fn plug_all_with(sw: &mut SwitchProcess, key: &str, specs: &[(&str, u64)]) -> Vec<NetGuest> {
    let guests = specs
        .iter()
        .map(|(n, v)| {
            let mut args = json!({ "name": n });
            args[key] = json!(v);
            plug_with(sw, args, small_config())
        })
        .collect();
    let list = sw.call("port.list", json!({})).expect("port.list");
    for (n, v) in specs {
        let p = list
            .as_array()
            .and_then(|l| l.iter().find(|p| p["name"] == *n))
            .unwrap_or_else(|| panic!("{n} in {list}"));
        assert_eq!(p[key], json!(v), "{n}: {key}");
    }
    guests
}

#[test]
fn vlans_are_isolated_broadcast_domains() {
    let mut sw = switch();
    let specs = [("a", 10), ("b", 10), ("c", 20), ("d", 20), ("e", 0)];
    let mut g = plug_all_with(&mut sw, "vlan", &specs);
    // Each port broadcasts once (e alone in VLAN 0 reaches nobody).
    let bc: Vec<Vec<u8>> = (0..5)
        .map(|i| frame(BROADCAST, mac(i + 1), 60, u64::from(i)))
        .collect();
    for i in 0..5 {
        send_all(&mut g[i], std::slice::from_ref(&bc[i]));
        wait_tx_done(&mut g[i]);
    }
    assert_eq!(recv_one(&mut g[1]), bc[0]);
    assert_eq!(recv_one(&mut g[0]), bc[1]);
    assert_eq!(recv_one(&mut g[3]), bc[2]);
    assert_eq!(recv_one(&mut g[2]), bc[3]);
    // a addresses c's MAC: c is known in VLAN 20 only, so in VLAN 10 it is
    // unknown and floods to b alone.
    let cross = frame(mac(3), mac(1), 80, 100);
    send_all(&mut g[0], std::slice::from_ref(&cross));
    wait_tx_done(&mut g[0]);
    assert_eq!(recv_one(&mut g[1]), cross);
    for (i, (n, _)) in specs.iter().enumerate() {
        let c = counters(&mut sw, n);
        let want = [1, 2, 1, 1, 0][i];
        assert_eq!(c.tx_packets, want, "{n}: {c:?}");
        assert_eq!(c.total_drops(), 0, "{n}: {c:?}");
        assert_nothing_pending(n, &mut g[i]);
    }
    assert_eq!(
        fdb(&mut sw, json!({})),
        vec![
            learnt(5, 0, "e"),
            learnt(1, 10, "a"),
            learnt(2, 10, "b"),
            learnt(3, 20, "c"),
            learnt(4, 20, "d"),
        ]
    );
}

#[test]
fn learnt_addresses_age_out_and_unicast_floods_again() {
    let mut sw = switch_with(&["--fdb-ageing", "1"], 1);
    let names = ["a", "b", "c"];
    let mut g: Vec<NetGuest> = names
        .iter()
        .map(|n| plug(&mut sw, n, small_config()))
        .collect();
    let hello = frame(BROADCAST, mac(1), 60, 1);
    send_all(&mut g[0], std::slice::from_ref(&hello));
    assert_eq!(recv_one(&mut g[1]), hello);
    assert_eq!(recv_one(&mut g[2]), hello);
    let u1 = frame(mac(1), mac(2), 60, 2);
    send_all(&mut g[1], std::slice::from_ref(&u1));
    assert_eq!(recv_one(&mut g[0]), u1);
    wait_tx_done(&mut g[1]);
    assert_eq!(delivered(&mut sw, "c"), 1, "learnt unicast leaked to c");
    assert!(fdb(&mut sw, json!({})).contains(&learnt(1, 0, "a")));

    wait_until("a's address to age out of the FDB", || {
        !fdb(&mut sw, json!({})).contains(&learnt(1, 0, "a"))
    });
    let u2 = frame(mac(1), mac(2), 60, 3);
    send_all(&mut g[1], std::slice::from_ref(&u2));
    assert_eq!(recv_one(&mut g[0]), u2);
    assert_eq!(
        recv_one(&mut g[2]),
        u2,
        "unicast to a forgotten address floods"
    );
    wait_tx_done(&mut g[1]);
    assert_eq!(delivered(&mut sw, "c"), 2);
}

#[test]
fn an_address_that_moves_is_learnt_on_its_new_port() {
    let mut sw = switch();
    let names = ["a", "b", "c"];
    let mut g: Vec<NetGuest> = names
        .iter()
        .map(|n| plug(&mut sw, n, small_config()))
        .collect();
    let roaming = 50;
    let hello = frame(BROADCAST, mac(roaming), 60, 1);
    send_all(&mut g[0], std::slice::from_ref(&hello));
    assert_eq!(recv_one(&mut g[1]), hello);
    assert_eq!(recv_one(&mut g[2]), hello);
    let to_a = frame(mac(roaming), mac(2), 60, 2);
    send_all(&mut g[1], std::slice::from_ref(&to_a));
    assert_eq!(recv_one(&mut g[0]), to_a);
    assert_eq!(
        fdb(&mut sw, json!({"port": "a"})),
        vec![learnt(roaming, 0, "a")]
    );

    // The address now speaks from c.
    let moved = frame(mac(2), mac(roaming), 60, 3);
    send_all(&mut g[2], std::slice::from_ref(&moved));
    assert_eq!(recv_one(&mut g[1]), moved);
    assert_eq!(
        fdb(&mut sw, json!({"port": "c"})),
        vec![learnt(roaming, 0, "c")]
    );
    assert_eq!(fdb(&mut sw, json!({"port": "a"})), vec![]);

    let to_c = frame(mac(roaming), mac(2), 60, 4);
    send_all(&mut g[1], std::slice::from_ref(&to_c));
    assert_eq!(recv_one(&mut g[2]), to_c);
    wait_tx_done(&mut g[1]);
    assert_eq!(
        delivered(&mut sw, "a"),
        1,
        "a still got frames for the moved address"
    );
    assert_nothing_pending("a", &mut g[0]);
}

#[test]
fn counters_match_exactly_what_was_sent_and_received() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut b = plug(&mut sw, "b", NetGuestConfig::default());
    // Learn both addresses.
    let ha = frame(BROADCAST, mac(1), 60, 0);
    let hb = frame(BROADCAST, mac(2), 60, 0);
    send_all(&mut a, std::slice::from_ref(&ha));
    assert_eq!(recv_one(&mut b), ha);
    send_all(&mut b, std::slice::from_ref(&hb));
    assert_eq!(recv_one(&mut a), hb);

    let sizes = [60usize, 61, 128, 500, 1514, 2000, 4000, 9000];
    let a_to_b: Vec<Vec<u8>> = (0..200)
        .map(|i| frame(mac(2), mac(1), sizes[i % sizes.len()], i as u64 + 1))
        .collect();
    let b_to_a: Vec<Vec<u8>> = (0..75)
        .map(|i| {
            frame(
                mac(1),
                mac(2),
                sizes[(i * 3) % sizes.len()],
                1000 + i as u64,
            )
        })
        .collect();
    // Interleave sending and receiving so that no RX ring overflows.
    let mut got_b = Vec::new();
    let mut got_a = Vec::new();
    for chunk in a_to_b.chunks(50) {
        send_all(&mut a, chunk);
        got_b.extend(recv_n(&mut b, chunk.len()));
    }
    for chunk in b_to_a.chunks(25) {
        send_all(&mut b, chunk);
        got_a.extend(recv_n(&mut a, chunk.len()));
    }
    assert!(
        got_b == a_to_b,
        "b did not get a's frames intact and in order"
    );
    assert!(
        got_a == b_to_a,
        "a did not get b's frames intact and in order"
    );
    wait_tx_done(&mut a);
    wait_tx_done(&mut b);

    let bytes = |v: &[Vec<u8>]| v.iter().map(|f| f.len() as u64).sum::<u64>();
    let ca = counters(&mut sw, "a");
    let cb = counters(&mut sw, "b");
    assert_eq!(
        ca,
        PortCounters {
            rx_packets: 201,
            rx_bytes: 60 + bytes(&a_to_b),
            tx_packets: 76,
            tx_bytes: 60 + bytes(&b_to_a),
            drops: ca.drops.clone(),
            broken: false,
        }
    );
    assert_eq!(
        cb,
        PortCounters {
            rx_packets: 76,
            rx_bytes: 60 + bytes(&b_to_a),
            tx_packets: 201,
            tx_bytes: 60 + bytes(&a_to_b),
            drops: cb.drops.clone(),
            broken: false,
        }
    );
    assert_eq!(ca.nonzero_drops(), drops(&[]));
    assert_eq!(cb.nonzero_drops(), drops(&[]));
    assert_eq!(a.device_errors() + b.device_errors(), 0);
}

#[test]
fn frames_of_every_size_arrive_byte_identical() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut b = plug(&mut sw, "b", NetGuestConfig::default());
    // The smallest frame the switch carries: a bare Ethernet header.
    let bare = eth_frame(mac(2), mac(1), 0x88b5, &[]);
    send_all(&mut a, std::slice::from_ref(&bare));
    assert_eq!(recv_one(&mut b), bare);
    for (i, len) in [60usize, 1514, 9000, 2036, 2037, 4084, 9716]
        .iter()
        .enumerate()
    {
        let f = frame(mac(2), mac(1), *len, i as u64);
        send_all(&mut a, std::slice::from_ref(&f));
        let got = recv_one(&mut b);
        assert_eq!(got.len(), *len);
        assert!(got == f, "{len}-byte frame changed on the way");
    }
    // The largest frame (16384 bytes) needs two TX descriptors here.
    let big = frame(mac(2), mac(1), 16384, 99);
    a.send_chain(&[&big[..8000], &big[8000..]])
        .expect("send_chain");
    assert!(
        recv_one(&mut b) == big,
        "16384-byte frame changed on the way"
    );
    wait_tx_done(&mut a);
    let c = counters(&mut sw, "b");
    assert_eq!(c.tx_packets, 9);
    assert_eq!(c.total_drops(), 0, "{c:?}");
}

#[test]
fn a_frame_spread_over_many_descriptors_arrives_intact() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut b = plug(&mut sw, "b", NetGuestConfig::default());
    let f = frame(mac(2), mac(1), 1514, 7);
    // Header alone in the first descriptor, the Ethernet header split.
    a.send_chain(&[&[], &f[..6], &f[6..14], &f[14..100], &f[100..]])
        .expect("send_chain");
    assert!(recv_one(&mut b) == f, "5-descriptor chain");
    // Zero-length descriptors in the middle are legal and carry nothing.
    a.send_chain(&[&f[..500], &[], &f[500..]])
        .expect("send_chain");
    assert!(recv_one(&mut b) == f, "chain with an empty descriptor");
    // 64 descriptors, the longest chain the switch accepts.
    let g = frame(mac(2), mac(1), 64 * 20, 8);
    let segs: Vec<&[u8]> = g.chunks(20).collect();
    assert_eq!(segs.len(), 64);
    a.send_chain(&segs).expect("send_chain");
    assert!(recv_one(&mut b) == g, "64-descriptor chain");
    wait_tx_done(&mut a);
    let c = counters(&mut sw, "a");
    assert_eq!((c.rx_packets, c.total_drops()), (3, 0), "{c:?}");
}

#[test]
fn jumbo_frames_fill_several_mergeable_rx_buffers() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut b = plug(
        &mut sw,
        "b",
        NetGuestConfig {
            rx_buf_len: 2048,
            ..Default::default()
        },
    );
    let mut c = plug(
        &mut sw,
        "c",
        NetGuestConfig {
            rx_buf_len: 1024,
            ..Default::default()
        },
    );
    assert!(b.features() & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0);
    let sent: Vec<Vec<u8>> = (0..20)
        .map(|i| frame(BROADCAST, mac(1), 9000 - i * 3, i as u64))
        .collect();
    send_all(&mut a, &sent);
    assert!(
        recv_n(&mut b, 20) == sent,
        "9000-byte frames in 2048-byte buffers"
    );
    assert!(
        recv_n(&mut c, 20) == sent,
        "9000-byte frames in 1024-byte buffers"
    );
    let big = frame(BROADCAST, mac(1), 16384, 77);
    a.send_chain(&[&big[..8192], &big[8192..]])
        .expect("send_chain");
    assert!(recv_one(&mut b) == big);
    assert!(recv_one(&mut c) == big, "16384 bytes in 17 buffers of 1024");
    assert_eq!(b.device_errors() + c.device_errors(), 0);
    for n in ["b", "c"] {
        let k = counters(&mut sw, n);
        assert_eq!((k.tx_packets, k.total_drops()), (21, 0), "{n}: {k:?}");
    }
}

#[test]
fn a_guest_without_mergeable_buffers_gets_what_fits_and_counts_the_rest() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut b = plug(
        &mut sw,
        "b",
        NetGuestConfig {
            mrg_rxbuf: false,
            event_idx: false,
            rx_buf_len: 2048,
            ..Default::default()
        },
    );
    assert_eq!(b.features() & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    let fits = frame(mac(2), mac(1), 2048 - 12, 1);
    let too_big = frame(mac(2), mac(1), 2048 - 11, 2);
    let after = frame(mac(2), mac(1), 60, 3);
    send_all(&mut a, &[fits.clone(), too_big, after.clone()]);
    assert!(recv_one(&mut b) == fits);
    assert!(recv_one(&mut b) == after);
    wait_tx_done(&mut a);
    let k = counters(&mut sw, "b");
    assert_eq!(k.tx_packets, 2);
    assert_eq!(k.nonzero_drops(), drops(&[("rx_buffer_too_small", 1)]));
    assert_nothing_pending("b", &mut b);
    // And it sends fine too.
    let back = frame(mac(1), mac(2), 1514, 4);
    send_all(&mut b, std::slice::from_ref(&back));
    assert!(recv_one(&mut a) == back);
}

/// A port with two queue pairs. The driver, like every frontend built on the
/// `vhost` crate, takes GET_QUEUE_NUM as the number of virtqueues (as the
/// vhost-user spec words it) and will not touch a queue index at or above
/// it; QEMU only needs the answer to be at least the number of pairs.
#[test]
fn a_multiqueue_port_sends_and_receives_on_every_pair() {
    let mut sw = switch();
    let mut a = plug(&mut sw, "a", NetGuestConfig::default());
    let mut m = plug_with(
        &mut sw,
        json!({"name": "m", "queues": 2}),
        NetGuestConfig {
            queue_pairs: 2,
            ..Default::default()
        },
    );
    assert_eq!(m.queue_pairs(), 2);
    let mut from_m = Vec::new();
    for pair in 0..2 {
        m.set_tx_queue_pair(pair);
        let f = frame(mac(1), mac(2), 200, pair as u64);
        send_all(&mut m, std::slice::from_ref(&f));
        from_m.push(f);
    }
    // Frames from different queues may be switched in either order.
    let mut got = recv_n(&mut a, 2);
    got.sort();
    from_m.sort();
    assert_eq!(got, from_m);
    // Many flows towards m: spread over its RX queues, all arrive.
    let to_m: Vec<Vec<u8>> = (0..64)
        .map(|i| frame(mac(2), mac(100 + i), 100, u64::from(i)))
        .collect();
    send_all(&mut a, &to_m);
    let mut got = recv_n(&mut m, 64);
    got.sort();
    let mut want = to_m.clone();
    want.sort();
    assert!(got == want, "frames to the multiqueue port");
    let k = counters(&mut sw, "m");
    assert_eq!((k.rx_packets, k.tx_packets, k.total_drops()), (2, 64, 0));
}

#[test]
fn unicast_and_flood_cross_workers_intact() {
    let mut sw = switch_with(&[], 2);
    let specs = [("a", 0), ("b", 1), ("c", 0), ("d", 1)];
    let mut g = plug_all_with(&mut sw, "worker", &specs);
    // Everyone floods once: each frame reaches the three others, across
    // workers and within them.
    let hello: Vec<Vec<u8>> = (0..4)
        .map(|i| frame(BROADCAST, mac(i + 1), 60 + i as usize, u64::from(i)))
        .collect();
    for i in 0..4 {
        send_all(&mut g[i], std::slice::from_ref(&hello[i]));
        for (j, r) in g.iter_mut().enumerate() {
            if j != i {
                assert_eq!(recv_one(r), hello[i], "flood {i} -> {j}");
            }
        }
    }
    // Unicast between every pair, in sizes that need several buffers.
    let mut tag = 100;
    let mut sent_to = [0u64; 4];
    for i in 0..4 {
        for j in 0..4 {
            if i == j {
                continue;
            }
            for len in [60usize, 1514, 9000] {
                tag += 1;
                let f = frame(mac(j as u32 + 1), mac(i as u32 + 1), len, tag);
                send_all(&mut g[i], std::slice::from_ref(&f));
                assert!(recv_one(&mut g[j]) == f, "{i} -> {j}, {len} bytes");
                sent_to[j] += 1;
            }
        }
    }
    // Nothing strayed: a marker from each port is the next thing everyone
    // else sees.
    for i in 0..4 {
        let (before, after) = g.split_at_mut(i);
        let (me, after) = after.split_first_mut().expect("port i");
        let mut others: Vec<&mut NetGuest> = before.iter_mut().chain(after.iter_mut()).collect();
        let strays = barrier(me, mac(i as u32 + 1), 1000 + i as u64, &mut others);
        for s in strays {
            assert!(s.is_empty(), "{} stray frames after {i}'s unicast", s.len());
        }
    }
    for (j, (n, _)) in specs.iter().enumerate() {
        let k = counters(&mut sw, n);
        // 3 hellos, the unicast, 3 markers from the others.
        assert_eq!(k.tx_packets, 3 + sent_to[j] + 3, "{n}: {k:?}");
        assert_eq!(k.rx_packets, 1 + 9 + 1, "{n}: {k:?}");
        assert_eq!(k.total_drops(), 0, "{n}: {k:?}");
    }
}
