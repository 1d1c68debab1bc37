//! Hostile guests: a guest that feeds the switch bad rings, through the
//! driver's raw queue access. One test per kind of abuse. In each, the
//! hostile port "evil" shares a switch with a healthy pair "p" and "q"; the
//! test checks that the daemon still runs, that the pair keeps exchanging
//! frames intact, and that the counters say exactly what happened.

use serde_json::json;
use vioswitch_testkit::frames::{
    counters, drops, frame, mac, plug, recv_n, recv_one, send_all, small_config, wait_tx_done,
    wait_until, PortCounters, BROADCAST,
};
use vioswitch_testkit::guest::{NetGuest, NetGuestConfig, NET_HDR_LEN};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

const P: u32 = 1;
const Q: u32 = 2;
const E: u32 = 3;

/// VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

struct Lab {
    sw: SwitchProcess,
    p: NetGuest,
    q: NetGuest,
    evil: NetGuest,
    round: u64,
}

/// A switch with ports p, q and evil, every address learnt (each guest has
/// broadcast one hello, and everyone has drained them).
fn lab(evil_cfg: NetGuestConfig) -> Lab {
    let mut sw = SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
    let mut p = plug(&mut sw, "p", small_config());
    let mut q = plug(&mut sw, "q", small_config());
    let mut evil = plug(&mut sw, "evil", evil_cfg);
    let hp = frame(BROADCAST, mac(P), 60, 1);
    let hq = frame(BROADCAST, mac(Q), 60, 2);
    let he = frame(BROADCAST, mac(E), 60, 3);
    send_all(&mut p, std::slice::from_ref(&hp));
    assert_eq!(recv_one(&mut q), hp);
    assert_eq!(recv_one(&mut evil), hp);
    send_all(&mut q, std::slice::from_ref(&hq));
    assert_eq!(recv_one(&mut p), hq);
    assert_eq!(recv_one(&mut evil), hq);
    send_all(&mut evil, std::slice::from_ref(&he));
    assert_eq!(recv_one(&mut p), he);
    assert_eq!(recv_one(&mut q), he);
    for g in [&mut p, &mut q, &mut evil] {
        wait_tx_done(g);
    }
    Lab {
        sw,
        p,
        q,
        evil,
        round: 0,
    }
}

impl Lab {
    fn evil_counters(&mut self) -> PortCounters {
        counters(&mut self.sw, "evil")
    }

    /// The daemon runs and answers, and p and q exchange 20 frames each
    /// way, intact and in order, with exact counters and no drops.
    fn pair_still_works(&mut self) {
        assert!(self.sw.is_running(), "vioswitch died");
        self.sw
            .call("switch.info", json!({}))
            .expect("control socket still answers");
        self.round += 1;
        let r = self.round * 1000;
        let before_p = counters(&mut self.sw, "p");
        let before_q = counters(&mut self.sw, "q");
        let pq: Vec<Vec<u8>> = (0..20)
            .map(|i| frame(mac(Q), mac(P), 60 + 397 * i, r + i as u64))
            .collect();
        let qp: Vec<Vec<u8>> = (0..20)
            .map(|i| frame(mac(P), mac(Q), 1514 + 301 * i, r + 100 + i as u64))
            .collect();
        send_all(&mut self.p, &pq);
        assert!(recv_n(&mut self.q, 20) == pq, "p -> q frames changed");
        send_all(&mut self.q, &qp);
        assert!(recv_n(&mut self.p, 20) == qp, "q -> p frames changed");
        wait_tx_done(&mut self.p);
        wait_tx_done(&mut self.q);
        let bytes = |v: &[Vec<u8>]| v.iter().map(|f| f.len() as u64).sum::<u64>();
        let after_p = counters(&mut self.sw, "p");
        let after_q = counters(&mut self.sw, "q");
        assert_eq!(after_p.rx_packets - before_p.rx_packets, 20);
        assert_eq!(after_p.rx_bytes - before_p.rx_bytes, bytes(&pq));
        assert_eq!(after_p.tx_packets - before_p.tx_packets, 20);
        assert_eq!(after_p.tx_bytes - before_p.tx_bytes, bytes(&qp));
        assert_eq!(after_q.rx_packets - before_q.rx_packets, 20);
        assert_eq!(after_q.tx_packets - before_q.tx_packets, 20);
        for (n, c) in [("p", &after_p), ("q", &after_q)] {
            assert_eq!(c.total_drops(), 0, "{n}: {c:?}");
            assert!(!c.broken, "{n} broken");
        }
        assert_eq!(self.p.device_errors() + self.q.device_errors(), 0);
    }

    /// Post a raw TX chain on evil (descriptors already written), kick, and
    /// wait for the switch to return it; returns the used entry's length.
    fn post_raw_tx(&mut self, head: u16) -> u32 {
        let at = {
            let mut tx = self.evil.raw_tx();
            let at = tx.avail_idx();
            tx.push_avail(head);
            tx.publish();
            tx.kick();
            at
        };
        wait_until("the switch to return the bad chain", || {
            self.evil.raw_tx().used_idx() != at
        });
        let (id, len) = self.evil.raw_tx().used_elem(at);
        assert_eq!(id, u32::from(head), "used entry names the chain's head");
        self.evil.reclaim_tx();
        len
    }

    /// A good frame from evil still reaches p (the port was not stopped).
    fn evil_still_sends(&mut self, tag: u64) {
        let f = frame(mac(P), mac(E), 200, tag);
        send_all(&mut self.evil, std::slice::from_ref(&f));
        assert_eq!(
            recv_one(&mut self.p),
            f,
            "evil's good frame after its bad ones"
        );
        // (Not `wait_tx_done`: the tail descriptors of bad chains stay
        // allocated, as far as the driver knows.)
    }

    /// One descriptor off evil's TX free list.
    fn tx_desc(&mut self) -> u16 {
        self.evil
            .raw_tx()
            .alloc_desc()
            .expect("a free TX descriptor")
    }

    /// A scratch buffer in evil's memory holding a virtio-net header and `f`.
    fn tx_buf(&mut self, f: &[u8]) -> (u64, u32) {
        let mut tx = self.evil.raw_tx();
        let len = NET_HDR_LEN + f.len();
        let gpa = tx.scratch(len);
        tx.memory()
            .write(gpa + NET_HDR_LEN as u64, f)
            .expect("write scratch");
        (gpa, len as u32)
    }
}

#[test]
fn descriptors_outside_guest_memory_are_dropped_and_counted() {
    let mut lab = lab(NetGuestConfig {
        mem_regions: 2,
        ..small_config()
    });
    let regions: Vec<_> = lab.evil.memory().regions().collect();
    assert_eq!(regions.len(), 2);
    let end0 = regions[0].guest_phys_addr + regions[0].size as u64;
    let end1 = regions[1].guest_phys_addr + regions[1].size as u64;
    let cases: [(u64, u32); 5] = [
        (0, 100),             // below guest memory
        (end0 + 0x1000, 100), // in the hole between the regions
        (end0 - 50, 100),     // straddles the end of region 0
        (end1 - 8, 100),      // runs off the end of memory
        (u64::MAX - 10, 100), // wraps around the address space
    ];
    for (addr, len) in cases {
        let d = lab.tx_desc();
        lab.evil.raw_tx().write_desc(d, addr, len, 0, 0);
        assert_eq!(lab.post_raw_tx(d), 0, "used length of a dropped chain");
    }
    // A good first descriptor and a bad second one.
    let f = frame(mac(P), mac(E), 100, 9);
    let (gpa, len) = lab.tx_buf(&f);
    let (d1, d2) = (lab.tx_desc(), lab.tx_desc());
    lab.evil.raw_tx().write_desc(d1, gpa, len, NEXT, d2);
    lab.evil.raw_tx().write_desc(d2, end1 + 0x10_0000, 64, 0, 0);
    assert_eq!(lab.post_raw_tx(d1), 0);

    let c = lab.evil_counters();
    assert_eq!(c.nonzero_drops(), drops(&[("bad_tx_descriptor", 6)]));
    assert_eq!(c.rx_packets, 1, "only the hello was switched: {c:?}");
    assert!(!c.broken);
    lab.evil_still_sends(10);
    lab.pair_still_works();
}

#[test]
fn descriptor_loops_are_dropped_and_counted() {
    let mut lab = lab(small_config());
    let f = frame(mac(P), mac(E), 60, 1);
    let (gpa, len) = lab.tx_buf(&f);
    // A descriptor that points at itself.
    let d = lab.tx_desc();
    lab.evil.raw_tx().write_desc(d, gpa, len, NEXT, d);
    assert_eq!(lab.post_raw_tx(d), 0);
    // Two descriptors pointing at each other, zero-length so that only the
    // hop count can end the walk.
    let (a, b) = (lab.tx_desc(), lab.tx_desc());
    lab.evil.raw_tx().write_desc(a, gpa, 0, NEXT, b);
    lab.evil.raw_tx().write_desc(b, gpa, 0, NEXT, a);
    assert_eq!(lab.post_raw_tx(a), 0);
    let c = lab.evil_counters();
    assert_eq!(c.nonzero_drops(), drops(&[("bad_tx_descriptor", 2)]));
    assert!(!c.broken);
    lab.evil_still_sends(2);
    lab.pair_still_works();
}

#[test]
fn chains_longer_than_64_descriptors_or_the_queue_are_dropped() {
    // A 64-entry queue: 65 distinct descriptors do not fit, so use a queue
    // of 256 for the long chain, and an 8-entry one for the ring-sized loop.
    let mut lab = lab(NetGuestConfig {
        queue_size: 256,
        mem_size: 8 << 20,
        ..Default::default()
    });
    // 65 descriptors that together hold a valid frame.
    let f = frame(mac(P), mac(E), 65 * 20 - NET_HDR_LEN, 1);
    let mut whole = vec![0u8; NET_HDR_LEN];
    whole.extend_from_slice(&f);
    let descs: Vec<u16> = (0..65).map(|_| lab.tx_desc()).collect();
    for (i, chunk) in whole.chunks(20).enumerate() {
        let mut tx = lab.evil.raw_tx();
        let gpa = tx.scratch(20);
        tx.memory().write(gpa, chunk).expect("write");
        let (flags, next) = match descs.get(i + 1) {
            Some(n) => (NEXT, *n),
            None => (0, 0),
        };
        tx.write_desc(descs[i], gpa, chunk.len() as u32, flags, next);
    }
    assert_eq!(lab.post_raw_tx(descs[0]), 0);
    let c = lab.evil_counters();
    assert_eq!(c.nonzero_drops(), drops(&[("bad_tx_descriptor", 1)]));
    lab.evil_still_sends(2);
    lab.pair_still_works();

    // A guest with an 8-entry TX queue whose chain runs through every
    // descriptor and back to the first.
    let mut small = plug(
        &mut lab.sw,
        "tiny",
        NetGuestConfig {
            queue_size: 8,
            mem_size: 1 << 20,
            ..Default::default()
        },
    );
    {
        let mut tx = small.raw_tx();
        let ds: Vec<u16> = (0..8).map(|_| tx.alloc_desc().expect("desc")).collect();
        let gpa = tx.scratch(64);
        for (i, d) in ds.iter().enumerate() {
            tx.write_desc(*d, gpa, 8, NEXT, ds[(i + 1) % 8]);
        }
        tx.push_avail(ds[0]);
        tx.publish();
        tx.kick();
    }
    wait_until("the switch to return tiny's chain", || {
        small.raw_tx().used_idx() == 1
    });
    assert_eq!(small.raw_tx().used_elem(0).1, 0);
    let c = counters(&mut lab.sw, "tiny");
    assert_eq!(c.nonzero_drops(), drops(&[("bad_tx_descriptor", 1)]));
    assert!(!c.broken);
    lab.pair_still_works();
}

#[test]
fn zero_short_and_huge_lengths_are_dropped_and_counted() {
    let mut lab = lab(small_config());
    let f = frame(mac(P), mac(E), 60, 1);
    let (gpa, _) = lab.tx_buf(&f);
    let cases: [(u32, &str); 4] = [
        (0, "short_frame"),                              // nothing at all
        (NET_HDR_LEN as u32 + 13, "short_frame"),        // 13 bytes of frame
        (u32::MAX, "oversized_frame"),                   // 4 GiB
        (NET_HDR_LEN as u32 + 16385, "oversized_frame"), // one byte over the limit
    ];
    for (len, _) in cases {
        let d = lab.tx_desc();
        lab.evil.raw_tx().write_desc(d, gpa, len, 0, 0);
        assert_eq!(lab.post_raw_tx(d), 0, "length {len}");
    }
    // Two descriptors whose lengths overflow a u32 when added.
    let (a, b) = (lab.tx_desc(), lab.tx_desc());
    lab.evil.raw_tx().write_desc(a, gpa, 100, NEXT, b);
    lab.evil.raw_tx().write_desc(b, gpa, u32::MAX - 50, 0, 0);
    assert_eq!(lab.post_raw_tx(a), 0);
    // A header-only chain (the frame missing entirely).
    let d = lab.tx_desc();
    lab.evil
        .raw_tx()
        .write_desc(d, gpa, NET_HDR_LEN as u32, 0, 0);
    assert_eq!(lab.post_raw_tx(d), 0);

    let c = lab.evil_counters();
    assert_eq!(
        c.nonzero_drops(),
        drops(&[("short_frame", 3), ("oversized_frame", 3)])
    );
    assert_eq!(c.rx_packets, 1, "{c:?}");
    lab.evil_still_sends(2);
    lab.pair_still_works();
}

#[test]
fn writable_and_indirect_descriptors_in_tx_are_dropped_and_counted() {
    let mut lab = lab(small_config());
    let f = frame(mac(P), mac(E), 60, 1);
    let (gpa, len) = lab.tx_buf(&f);
    for flags in [WRITE, INDIRECT, WRITE | INDIRECT] {
        let d = lab.tx_desc();
        lab.evil.raw_tx().write_desc(d, gpa, len, flags, 0);
        assert_eq!(lab.post_raw_tx(d), 0, "flags {flags:#x}");
    }
    // A readable head followed by a device-writable buffer.
    let (a, b) = (lab.tx_desc(), lab.tx_desc());
    lab.evil.raw_tx().write_desc(a, gpa, len, NEXT, b);
    lab.evil.raw_tx().write_desc(b, gpa, 64, WRITE, 0);
    assert_eq!(lab.post_raw_tx(a), 0);
    let c = lab.evil_counters();
    assert_eq!(c.nonzero_drops(), drops(&[("bad_tx_descriptor", 4)]));
    assert!(!c.broken);
    lab.evil_still_sends(2);
    lab.pair_still_works();
}

/// Which RX descriptor the switch will take next from `g`'s RX ring, and
/// that descriptor as it is: (head, addr, len).
fn next_rx_head(g: &mut NetGuest) -> (u16, u64, u32) {
    let rx = g.raw_rx();
    // Every frame so far took one buffer, so the device has consumed as
    // many avail entries as it published used ones.
    let pos = rx.used_idx();
    let l = rx.layout();
    let mut b = [0u8; 2];
    rx.memory()
        .read(l.avail + 4 + 2 * u64::from(pos % l.size), &mut b)
        .expect("read avail ring");
    let head = u16::from_le_bytes(b);
    let (addr, len, flags, _) = rx.read_desc(head);
    assert_eq!(flags, WRITE, "RX descriptors are posted device-writable");
    (head, addr, len)
}

#[test]
fn bad_rx_buffers_are_counted_on_the_destination() {
    let mut lab = lab(small_config());
    let before_errors = lab.evil.device_errors();
    // A readable (not device-writable) RX buffer.
    let (head, addr, len) = next_rx_head(&mut lab.evil);
    lab.evil.raw_rx().write_desc(head, addr, len, 0, 0);
    let f1 = frame(mac(E), mac(P), 100, 1);
    send_all(&mut lab.p, std::slice::from_ref(&f1));
    wait_tx_done(&mut lab.p);
    wait_until("the bad RX buffer to come back", || {
        let rx = lab.evil.raw_rx();
        rx.used_idx() != rx.last_used()
    });
    // The driver sees an empty used entry (and reposts the buffer whole).
    assert_eq!(lab.evil.try_recv(), None, "the frame must not be delivered");
    assert_eq!(lab.evil.device_errors(), before_errors + 1);

    // An RX buffer outside guest memory.
    let (head, _, len) = next_rx_head(&mut lab.evil);
    let end = lab.evil.memory().end();
    lab.evil
        .raw_rx()
        .write_desc(head, end + 0x1000, len, WRITE, 0);
    let f2 = frame(mac(E), mac(P), 100, 2);
    send_all(&mut lab.p, std::slice::from_ref(&f2));
    wait_tx_done(&mut lab.p);
    wait_until("the bad RX buffer to come back", || {
        let rx = lab.evil.raw_rx();
        rx.used_idx() != rx.last_used()
    });
    assert_eq!(lab.evil.try_recv(), None);
    assert_eq!(lab.evil.device_errors(), before_errors + 2);

    let c = lab.evil_counters();
    assert_eq!(c.nonzero_drops(), drops(&[("bad_rx_descriptor", 2)]));
    assert_eq!(c.tx_packets, 2, "only the two hellos: {c:?}");
    assert!(!c.broken);
    let pc = counters(&mut lab.sw, "p");
    assert_eq!(pc.total_drops(), 0, "the sender is not blamed: {pc:?}");
    // The next frame to evil arrives normally.
    let f3 = frame(mac(E), mac(P), 1514, 3);
    send_all(&mut lab.p, std::slice::from_ref(&f3));
    assert_eq!(recv_one(&mut lab.evil), f3);
    lab.pair_still_works();
}

/// Wait until evil's port reports itself broken, and check that the
/// control socket and the log say so.
fn wait_broken(lab: &mut Lab, log_words: &str) {
    wait_until("evil's port to be marked broken", || {
        lab.evil_counters().broken
    });
    let list = lab.sw.call("port.list", json!({})).expect("port.list");
    let evil = list
        .as_array()
        .and_then(|l| l.iter().find(|p| p["name"] == "evil"))
        .expect("evil in port.list");
    assert_eq!(evil["broken"], true, "{evil}");
    for name in ["p", "q"] {
        let p = list
            .as_array()
            .and_then(|l| l.iter().find(|p| p["name"] == name))
            .expect("port in list");
        assert_eq!(p["broken"], false, "{name}: {p}");
    }
    wait_until("the fault to be logged", || {
        lab.sw.log_text().contains(log_words)
    });
}

/// After evil broke: frames to it are dropped and counted, frames from it
/// are ignored, a broadcast still reaches q, and a reconnect heals it.
fn broken_then_healed(mut lab: Lab) {
    let before = lab.evil_counters();
    let bc = frame(BROADCAST, mac(P), 60, 500);
    send_all(&mut lab.p, std::slice::from_ref(&bc));
    assert_eq!(recv_one(&mut lab.q), bc);
    wait_tx_done(&mut lab.p);
    let after = lab.evil_counters();
    assert_eq!(
        after.dropped("no_rx_buffer"),
        before.dropped("no_rx_buffer") + 1
    );
    assert_eq!(after.tx_packets, before.tx_packets);
    lab.pair_still_works();

    // The guest reconnects: a fresh port that works both ways.
    let Lab {
        sw,
        p,
        q,
        evil,
        round,
    } = lab;
    let sock = sw.run_dir().join("evil.sock");
    evil.disconnect();
    let evil = NetGuest::connect(&sock, small_config()).expect("reconnect");
    let mut lab = Lab {
        sw,
        p,
        q,
        evil,
        round,
    };
    wait_until("the reconnected port to be healthy", || {
        !lab.evil_counters().broken
    });
    let hi = frame(mac(P), mac(E), 300, 501);
    send_all(&mut lab.evil, std::slice::from_ref(&hi));
    assert_eq!(recv_one(&mut lab.p), hi);
    let back = frame(mac(E), mac(P), 300, 502);
    send_all(&mut lab.p, std::slice::from_ref(&back));
    assert_eq!(recv_one(&mut lab.evil), back);
    lab.pair_still_works();
}

#[test]
fn an_avail_index_jumping_past_the_queue_size_breaks_only_that_port() {
    let mut lab = lab(small_config());
    {
        let mut tx = lab.evil.raw_tx();
        let size = tx.size();
        let idx = tx.avail_idx();
        tx.set_avail_idx(idx.wrapping_add(size + 1));
        tx.kick();
    }
    wait_broken(&mut lab, "avail index jumped");
    let c = lab.evil_counters();
    assert_eq!(
        c.rx_packets, 1,
        "nothing was taken from the bad ring: {c:?}"
    );
    broken_then_healed(lab);
}

#[test]
fn an_avail_entry_naming_a_descriptor_out_of_range_breaks_only_that_port() {
    let mut lab = lab(small_config());
    {
        let mut tx = lab.evil.raw_tx();
        let size = tx.size();
        tx.push_avail(size + 300);
        tx.publish();
        tx.kick();
    }
    wait_broken(&mut lab, "names descriptor");
    broken_then_healed(lab);
}

#[test]
fn an_rx_avail_entry_out_of_range_breaks_only_that_port() {
    let mut lab = lab(small_config());
    // Point the next RX avail entry at a descriptor that does not exist.
    {
        let rx = lab.evil.raw_rx();
        let pos = rx.used_idx();
        let l = rx.layout();
        rx.memory()
            .write(
                l.avail + 4 + 2 * u64::from(pos % l.size),
                &(l.size + 7).to_le_bytes(),
            )
            .expect("write avail ring");
    }
    let f = frame(mac(E), mac(P), 60, 1);
    send_all(&mut lab.p, std::slice::from_ref(&f));
    wait_broken(&mut lab, "names descriptor");
    let c = lab.evil_counters();
    assert_eq!(c.tx_packets, 2, "{c:?}");
    broken_then_healed(lab);
}

#[test]
fn a_guest_that_never_refills_rx_costs_only_its_own_frames() {
    let mut lab = lab(small_config());
    lab.evil.set_rx_refill(false);
    let size = lab.evil.raw_rx().size() as u64;
    let before = lab.evil_counters();
    // 100 broadcasts from p: q drains them as they come, evil never does.
    let sent: Vec<Vec<u8>> = (0..100)
        .map(|i| frame(BROADCAST, mac(P), 60 + i, 1000 + i as u64))
        .collect();
    for chunk in sent.chunks(20) {
        send_all(&mut lab.p, chunk);
        assert!(recv_n(&mut lab.q, chunk.len()) == chunk, "q's copy");
    }
    wait_tx_done(&mut lab.p);
    let after = lab.evil_counters();
    assert_eq!(
        after.tx_packets - before.tx_packets,
        size,
        "evil's ring held {size}"
    );
    assert_eq!(
        after.nonzero_drops(),
        drops(&[("no_rx_buffer", 100 - size)])
    );
    assert!(!after.broken, "a slow guest is not a broken one");
    let pc = counters(&mut lab.sw, "p");
    assert_eq!((pc.rx_packets, pc.total_drops()), (101, 0), "{pc:?}");
    lab.pair_still_works();

    // Once it drains and refills, it gets frames again: the first `size`
    // of the burst, in order.
    lab.evil.set_rx_refill(true);
    let got = recv_n(&mut lab.evil, size as usize);
    assert!(got[..] == sent[..size as usize], "evil's frames");
    let late = frame(BROADCAST, mac(P), 80, 9999);
    send_all(&mut lab.p, std::slice::from_ref(&late));
    assert_eq!(recv_one(&mut lab.q), late);
    assert_eq!(recv_one(&mut lab.evil), late);
    assert_eq!(lab.evil.try_recv(), None);
}

#[test]
fn a_guest_that_shrinks_its_memory_under_the_switch_does_not_kill_it() {
    let mut lab = lab(small_config());
    // The switch mapped evil's memfd; the guest now cuts the file to
    // nothing. Any access by the switch to the mapping would fault (SIGBUS).
    let fd = lab.evil.memory().vhost_regions()[0].mmap_handle;
    // SAFETY: ftruncate on a memfd this process owns; it changes no memory
    // that Rust code here reads (the test touches evil's rings no more).
    let rc = unsafe { libc::ftruncate(fd, 0) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
    // Wake the switch on evil's TX queue and send evil a frame.
    lab.evil.kick(1);
    let f = frame(mac(E), mac(P), 60, 1);
    send_all(&mut lab.p, std::slice::from_ref(&f));
    // p's chain comes back once the switch has tried to deliver to evil.
    wait_until("the switch to handle p's frame (or die)", || {
        lab.p.reclaim_tx();
        lab.p.tx_in_flight() == 0 || !lab.sw.is_running()
    });
    assert!(
        lab.sw.is_running(),
        "vioswitch died ({:?}) after a guest shrank its memory file:\n{}",
        lab.sw.exit_status(),
        lab.sw.log_text()
    );
    lab.pair_still_works();
}
