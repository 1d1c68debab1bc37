//! Port lifecycle through the guest driver: removal under traffic, many
//! ports, hundreds of reconnects without leaking, and a clean port for every
//! new connection.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vioswitch_testkit::frames::{
    counters, fd_count, frame, mac, mac_str, plug, plug_with, recv_n, recv_one, send_all,
    small_config, src_of, tag, thread_count, wait_tx_done, wait_until, BROADCAST, DEADLINE,
};
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

fn port_info(sw: &mut SwitchProcess, name: &str) -> Option<Value> {
    let list = sw.call("port.list", json!({})).expect("port.list");
    list.as_array()?.iter().find(|p| p["name"] == name).cloned()
}

/// Every guest broadcasts a hello that all the others drain, so that every
/// address is learnt.
fn introduce(guests: &mut [(&mut NetGuest, u32)]) {
    for i in 0..guests.len() {
        let f = frame(
            BROADCAST,
            mac(guests[i].1),
            60,
            7_000 + u64::from(guests[i].1),
        );
        send_all(&mut *guests[i].0, std::slice::from_ref(&f));
        for (j, (g, _)) in guests.iter_mut().enumerate() {
            if j != i {
                assert_eq!(recv_one(g), f);
            }
        }
    }
}

/// Receive frames until `n` from `src` have come, returning those (in
/// order) and ignoring any others.
fn recv_from(g: &mut NetGuest, src: [u8; 6], n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let f = g
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|| panic!("got {} of {n} frames from {src:02x?}", out.len()));
        if src_of(&f) == src {
            out.push(f);
        }
    }
    out
}

#[test]
fn removing_a_port_under_traffic_leaves_the_others_running() {
    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;
    const D: u32 = 4;
    let mut sw = switch();
    // Two VLANs, so that a's frames for the vanished b (unknown unicast,
    // flooded) cannot crowd c's and d's RX rings.
    let mut a = plug_with(&mut sw, json!({"name": "a", "vlan": 10}), small_config());
    let mut b = plug_with(&mut sw, json!({"name": "b", "vlan": 10}), small_config());
    let mut c = plug_with(&mut sw, json!({"name": "c", "vlan": 20}), small_config());
    let mut d = plug_with(&mut sw, json!({"name": "d", "vlan": 20}), small_config());
    introduce(&mut [(&mut a, A), (&mut b, B)]);
    introduce(&mut [(&mut c, C), (&mut d, D)]);
    let b_sock = sw.run_dir().join("b.sock");
    assert!(b_sock.exists());

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    // c and d talk to each other and check every frame.
    let cd = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || rounds.load(Ordering::Relaxed) < 20 {
                let to_d: Vec<Vec<u8>> = (0..8)
                    .map(|i| frame(mac(D), mac(C), 60 + 150 * i, n * 100 + i as u64))
                    .collect();
                let to_c: Vec<Vec<u8>> = (0..8)
                    .map(|i| frame(mac(C), mac(D), 1514 - 100 * i, n * 100 + 50 + i as u64))
                    .collect();
                send_all(&mut c, &to_d);
                send_all(&mut d, &to_c);
                assert!(recv_from(&mut d, mac(C), 8) == to_d, "round {n}: c -> d");
                assert!(recv_from(&mut c, mac(D), 8) == to_c, "round {n}: d -> c");
                n += 1;
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            n
        })
    };
    // a and b talk to each other without looking at what arrives.
    let ab = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let f = frame(mac(B), mac(A), 200, n);
                let g = frame(mac(A), mac(B), 200, n);
                let _ = a.send_burst(&[&f, &f, &f, &f]);
                let _ = b.send_burst(&[&g, &g, &g, &g]);
                while a.try_recv().is_some() {}
                while b.try_recv().is_some() {}
                std::thread::sleep(Duration::from_millis(1));
                n += 1;
            }
            (a, b)
        })
    };
    wait_until("traffic on both pairs", || {
        rounds.load(Ordering::Relaxed) >= 5 && counters(&mut sw, "b").tx_packets >= 20
    });
    sw.del_port("b").expect("port.del b under traffic");
    assert!(!b_sock.exists(), "b's socket is still there after port.del");
    assert!(port_info(&mut sw, "b").is_none(), "b is still listed");
    let at_removal = rounds.load(Ordering::Relaxed);
    wait_until("c and d to keep going after the removal", || {
        rounds.load(Ordering::Relaxed) >= at_removal + 10
    });
    stop.store(true, Ordering::Relaxed);
    let n = cd.join().expect("c <-> d traffic thread");
    let (mut a, mut b) = ab.join().expect("a <-> b traffic thread");
    assert!(n >= 20);
    assert!(sw.is_running());
    // b's connection was cut.
    assert!(b.get_vring_base(0).is_err(), "b's guest is still connected");
    assert!(
        sw.call("fdb.show", json!({}))
            .expect("fdb.show")
            .as_array()
            .is_some_and(|l| l.iter().all(|e| e["mac"] != mac_str(&mac(B)).as_str())),
        "b's address outlived its port"
    );
    for name in ["c", "d"] {
        let k = counters(&mut sw, name);
        assert_eq!(k.total_drops(), 0, "{name}: {k:?}");
    }

    // The name and socket can be used again, for a fresh port.
    drop(b);
    while a.try_recv().is_some() {}
    let mut b = plug_with(&mut sw, json!({"name": "b", "vlan": 10}), small_config());
    assert!(b_sock.exists());
    let f = frame(mac(A), mac(B), 300, 999_999);
    send_all(&mut b, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut a), f);
    let k = counters(&mut sw, "b");
    assert_eq!(
        (k.rx_packets, k.tx_packets),
        (1, 0),
        "a new port starts at zero"
    );
}

#[test]
fn sixty_four_ports_each_reach_all_the_others() {
    let mut sw = switch();
    let cfg = NetGuestConfig {
        queue_size: 64,
        mem_size: 2 << 20,
        ..Default::default()
    };
    let mut guests: Vec<NetGuest> = (0..64)
        .map(|i| plug(&mut sw, &format!("p{i}"), cfg.clone()))
        .collect();
    let list = sw.call("port.list", json!({})).expect("port.list");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 64);
    assert!(list.iter().all(|p| p["connected"] == true), "{list:?}");

    for i in 0..64 {
        let f = frame(BROADCAST, mac(i as u32 + 1), 60 + i, i as u64);
        send_all(&mut guests[i], std::slice::from_ref(&f));
        for (j, g) in guests.iter_mut().enumerate() {
            if j != i {
                assert_eq!(recv_one(g), f, "broadcast {i} at port {j}");
            }
        }
    }
    for g in guests.iter_mut() {
        wait_tx_done(g);
        assert_eq!(g.try_recv(), None);
    }
    for i in 0..64 {
        let k = counters(&mut sw, &format!("p{i}"));
        assert_eq!((k.rx_packets, k.tx_packets), (1, 63), "p{i}: {k:?}");
        assert_eq!(k.total_drops(), 0, "p{i}: {k:?}");
    }
    // Unicast around the ring of ports, now that every address is known.
    for i in 0..64 {
        let j = (i + 1) % 64;
        let f = frame(mac(j as u32 + 1), mac(i as u32 + 1), 1000, 100 + i as u64);
        send_all(&mut guests[i], std::slice::from_ref(&f));
        assert_eq!(recv_one(&mut guests[j]), f);
    }
    for (i, g) in guests.iter_mut().enumerate() {
        wait_tx_done(g);
        assert_eq!(g.try_recv(), None, "p{i} got a stray frame");
    }
}

/// Wait until port `name` has seen `connections` connections and none is
/// open any more.
fn wait_disconnected(sw: &mut SwitchProcess, name: &str, connections: u64) {
    wait_until("the port's session to end", || {
        port_info(sw, name).is_some_and(|p| {
            p["connected"] == false && p["connections"].as_u64() == Some(connections)
        })
    });
}

#[test]
fn two_hundred_reconnects_leak_no_fd_and_no_thread() {
    let mut sw = switch();
    let mut x = plug(&mut sw, "x", small_config());
    let sock = sw.add_port("r").expect("port.add r");
    let cfg = NetGuestConfig {
        queue_size: 32,
        mem_size: 1 << 20,
        ..Default::default()
    };
    let pid = sw.pid();
    // One full cycle first, so that whatever is created once is there.
    let mut g = NetGuest::connect(&sock, cfg.clone()).expect("connect");
    let f = frame(BROADCAST, mac(100), 60, 0);
    send_all(&mut g, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut x), f);
    g.disconnect();
    wait_disconnected(&mut sw, "r", 1);
    let (fds, threads) = (fd_count(pid), thread_count(pid));
    assert!(fds > 0 && threads > 0);

    let mut connections = 1;
    for i in 0..200u64 {
        match i % 4 {
            // Connect and hang up at once.
            0 => drop(UnixStream::connect(&sock).expect("connect")),
            // Connect, half a greeting, hang up.
            1 => {
                use std::io::Write;
                let mut s = UnixStream::connect(&sock).expect("connect");
                let _ = s.write_all(&[3, 0, 0, 0, 1, 0]);
            }
            // A full guest that sends a frame now and then.
            _ => {
                let mut g = NetGuest::connect(&sock, cfg.clone()).expect("connect");
                if i % 20 == 2 {
                    let f = frame(BROADCAST, mac(100), 60, i);
                    send_all(&mut g, std::slice::from_ref(&f));
                    assert_eq!(recv_one(&mut x), f);
                }
                g.disconnect();
            }
        }
        connections += 1;
        // The session takes one connection at a time; wait for each to end
        // so that every cycle is a real connect and disconnect.
        wait_disconnected(&mut sw, "r", connections);
    }
    wait_until("the fd count to come back", || fd_count(pid) <= fds);
    assert_eq!(fd_count(pid), fds, "fds before and after 200 reconnects");
    assert_eq!(thread_count(pid), threads, "threads before and after");

    // The port still works.
    let mut g = NetGuest::connect(&sock, cfg).expect("connect");
    let f = frame(mac(1), mac(100), 1514, 9);
    send_all(&mut g, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut x), f);
    let back = frame(mac(100), mac(1), 1514, 10);
    send_all(&mut x, std::slice::from_ref(&back));
    assert_eq!(recv_one(&mut g), back);
    assert!(sw.is_running());
}

#[test]
fn a_new_connection_gets_a_clean_port() {
    const X: u32 = 1;
    const R: u32 = 2;
    let mut sw = switch();
    let mut x = plug(&mut sw, "x", small_config());
    let sock = sw.add_port("r").expect("port.add r");
    let mut r1 = NetGuest::connect(&sock, small_config()).expect("connect");
    // r1 moves its rings along, is learnt, and leaves with frames in
    // flight both ways.
    let out: Vec<Vec<u8>> = (0..10).map(|i| frame(mac(X), mac(R), 100, i)).collect();
    send_all(&mut r1, &out);
    assert!(recv_n(&mut x, 10) == out);
    let to_r: Vec<Vec<u8>> = (0..5).map(|i| frame(mac(R), mac(X), 100, 20 + i)).collect();
    send_all(&mut x, &to_r);
    wait_tx_done(&mut x);
    r1.set_rx_refill(false);
    let _ = r1.send_burst(&[&out[0], &out[1]]);
    let r_entries = |sw: &mut SwitchProcess| {
        sw.call("fdb.show", json!({"port": "r"}))
            .expect("fdb.show")
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(r_entries(&mut sw), 1);
    r1.disconnect();
    wait_disconnected(&mut sw, "r", 1);
    assert_eq!(
        r_entries(&mut sw),
        0,
        "the old guest's addresses are forgotten"
    );
    // Drain what r1's last frames did (they may or may not have gone out).
    while x.try_recv().is_some() {}

    // A different guest: other queue size, no mergeable buffers, no
    // EVENT_IDX, its rings starting from index 0 again.
    let mut r2 = NetGuest::connect(
        &sock,
        NetGuestConfig {
            queue_size: 128,
            mrg_rxbuf: false,
            event_idx: false,
            ..Default::default()
        },
    )
    .expect("reconnect");
    let before = counters(&mut sw, "r");
    let f = frame(mac(X), mac(R), 1514, 100);
    send_all(&mut r2, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut x), f, "the new guest's first frame");
    let g = frame(mac(R), mac(X), 2000, 101);
    send_all(&mut x, std::slice::from_ref(&g));
    assert_eq!(recv_one(&mut r2), g, "the new guest's first received frame");
    assert_eq!(
        r2.try_recv(),
        None,
        "frames for the old guest leaked to the new one"
    );
    assert_eq!(tag(&g), Some(101));
    wait_tx_done(&mut r2);
    let after = counters(&mut sw, "r");
    assert_eq!(after.rx_packets - before.rx_packets, 1);
    assert_eq!(after.tx_packets - before.tx_packets, 1);
    assert!(!after.broken);
    assert_eq!(r2.device_errors(), 0);
}

/// `Cpus_allowed_list` of each thread of `pid`, by thread name.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or_default();
        out.push((name.trim().to_string(), cpus.trim().to_string()));
    }
    out
}

#[test]
fn workers_run_on_the_cpus_given_and_the_other_threads_keep_off_them() {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = n - 1;
    let mut sw = SwitchProcess::spawn(SwitchOptions {
        extra_args: vec!["--worker-cpus".into(), last.to_string()],
        ..Default::default()
    })
    .expect("start vioswitch");
    let _g = NetGuest::connect(
        &sw.add_port("p").expect("port.add"),
        NetGuestConfig::default(),
    )
    .expect("guest");
    let threads = thread_cpus(sw.pid());
    let worker: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("vioswitch-work"))
        .collect();
    assert!(!worker.is_empty(), "{threads:?}");
    for (_, cpus) in &worker {
        assert_eq!(*cpus, last.to_string(), "{threads:?}");
    }
    if n > 1 {
        let others: Vec<_> = threads
            .iter()
            .filter(|(name, _)| !name.starts_with("vioswitch-work"))
            .filter(|(_, cpus)| *cpus == format!("0-{last}") || cpus.contains(&last.to_string()))
            .collect();
        // Only the main thread started before the workers' CPUs were set
        // aside; every thread started after keeps off them.
        assert!(others.len() <= 1, "{threads:?}");
    }
}

#[test]
fn a_worker_cpu_that_does_not_exist_is_refused() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-cpus").expect("temp dir");
    let out =
        std::process::Command::new(vioswitch_testkit::switch::vioswitch_bin().expect("binary"))
            .args([
                "--run-dir",
                dir.to_str().unwrap_or_default(),
                "--worker-cpus",
                "100000",
            ])
            .output()
            .expect("run vioswitch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--worker-cpus") && err.contains("100000"),
        "{err}"
    );
}
