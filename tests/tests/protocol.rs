//! vhost-user protocol misuse, through the driver's `Frontend` or a raw
//! socket: messages out of order, queues that do not exist, memory tables
//! that lie, garbage bytes, and a ring stopped and resumed (QEMU's stop/cont).
//! In every case the daemon survives and the other ports keep working.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vioswitch_testkit::frames::{
    counters, frame, mac, plug, recv_n, recv_one, send_all, small_config, wait_tx_done, wait_until,
    BROADCAST,
};
use vioswitch_testkit::guest::{GuestMemory, NetGuest, RingLayout, NET_HDR_LEN};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Bound on one reply from the switch (only a hang reaches it).
const REPLY_BOUND: Duration = Duration::from_secs(10);

struct Pair {
    x: NetGuest,
    y: NetGuest,
    round: u64,
}

/// Two healthy ports, x (mac 1) and y (mac 2), that know each other.
fn pair(sw: &mut SwitchProcess) -> Pair {
    let mut x = plug(sw, "x", small_config());
    let mut y = plug(sw, "y", small_config());
    let hx = frame(BROADCAST, mac(1), 60, 1);
    let hy = frame(BROADCAST, mac(2), 60, 2);
    send_all(&mut x, std::slice::from_ref(&hx));
    assert_eq!(recv_one(&mut y), hx);
    send_all(&mut y, std::slice::from_ref(&hy));
    assert_eq!(recv_one(&mut x), hy);
    Pair { x, y, round: 0 }
}

impl Pair {
    /// The daemon runs and x and y exchange frames intact.
    fn still_works(&mut self, sw: &mut SwitchProcess) {
        assert!(sw.is_running(), "vioswitch died: {:?}", sw.exit_status());
        sw.call("switch.info", json!({}))
            .expect("control socket answers");
        self.round += 1;
        let r = self.round * 100;
        let xy: Vec<Vec<u8>> = (0..10)
            .map(|i| frame(mac(2), mac(1), 60 + 500 * i, r + i as u64))
            .collect();
        let yx: Vec<Vec<u8>> = (0..10)
            .map(|i| frame(mac(1), mac(2), 9000 - 500 * i, r + 50 + i as u64))
            .collect();
        send_all(&mut self.x, &xy);
        assert!(recv_n(&mut self.y, 10) == xy, "x -> y");
        send_all(&mut self.y, &yx);
        assert!(recv_n(&mut self.x, 10) == yx, "y -> x");
        for n in ["x", "y"] {
            let k = counters(sw, n);
            assert_eq!(k.total_drops(), 0, "{n}: {k:?}");
        }
    }
}

fn switch() -> SwitchProcess {
    SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch")
}

/// A frontend on `sock` that has negotiated VERSION_1 and protocol features
/// with REPLY_ACK, so that every later request is answered.
fn raw_frontend(sock: &Path) -> Frontend {
    raw_frontend_on(UnixStream::connect(sock).expect("connect"))
}

fn raw_frontend_on(s: UnixStream) -> Frontend {
    s.set_read_timeout(Some(REPLY_BOUND)).expect("timeout");
    s.set_write_timeout(Some(REPLY_BOUND)).expect("timeout");
    let mut fe = Frontend::from_stream(s, 64);
    fe.set_owner().expect("SET_OWNER");
    let offered = fe.get_features().expect("GET_FEATURES");
    assert_ne!(offered & F_VERSION_1, 0);
    fe.set_features(F_VERSION_1 | F_PROTOCOL_FEATURES)
        .expect("SET_FEATURES");
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(pf.contains(VhostUserProtocolFeatures::REPLY_ACK));
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// A split ring of 8 entries laid out by hand in `mem`.
struct MiniRing {
    l: RingLayout,
    kick: EventFd,
    call: EventFd,
    bufs: Vec<u64>,
}

const QS: u16 = 8;
const BUF: usize = 2048;

impl MiniRing {
    fn new(mem: &GuestMemory) -> Self {
        let base = mem
            .alloc_aligned(RingLayout::at(0, QS).len, 4096)
            .expect("ring memory");
        MiniRing {
            l: RingLayout::at(base, QS),
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            bufs: (0..QS).map(|_| mem.alloc(BUF).expect("buffer")).collect(),
        }
    }

    fn config(&self, mem: &GuestMemory) -> VringConfigData {
        let host = |gpa: u64, len: usize| mem.host_addr(gpa, len).expect("ring in memory");
        VringConfigData {
            queue_max_size: QS,
            queue_size: QS,
            flags: 0,
            desc_table_addr: host(self.l.desc, self.l.len),
            used_ring_addr: host(self.l.used, 1),
            avail_ring_addr: host(self.l.avail, 1),
            log_addr: None,
        }
    }

    fn post(&self, mem: &GuestMemory, i: u16, len: u32, flags: u16) {
        let mut d = self.bufs[i as usize].to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        mem.write(self.l.desc + 16 * u64::from(i), &d)
            .expect("desc");
        mem.write(self.l.avail + 4 + 2 * u64::from(i), &i.to_le_bytes())
            .expect("avail entry");
    }

    fn publish(&self, mem: &GuestMemory, idx: u16) {
        mem.write(self.l.avail + 2, &idx.to_le_bytes())
            .expect("avail idx");
        self.kick.write(1).expect("kick");
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        let mut b = [0u8; 2];
        mem.read(self.l.used + 2, &mut b).expect("used idx");
        u16::from_le_bytes(b)
    }

    fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let b = mem
            .read_vec(self.l.used + 4 + 8 * u64::from(i % QS), 8)
            .expect("used elem");
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap_or_default()),
            u32::from_le_bytes(b[4..8].try_into().unwrap_or_default()),
        )
    }
}

#[test]
fn rings_set_up_before_the_memory_table_start_when_it_arrives() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let sock = sw.add_port("late").expect("port.add");
    let mut fe = raw_frontend(&sock);
    let mem = GuestMemory::new(1 << 20, 1).expect("memory");
    let rx = MiniRing::new(&mem);
    let tx = MiniRing::new(&mem);
    // Every ring message first, without any memory table.
    for (q, r) in [(0usize, &rx), (1, &tx)] {
        fe.set_vring_num(q, QS).expect("SET_VRING_NUM");
        fe.set_vring_addr(q, &r.config(&mem))
            .expect("SET_VRING_ADDR before SET_MEM_TABLE");
        fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        fe.set_vring_call(q, &r.call).expect("SET_VRING_CALL");
        fe.set_vring_kick(q, &r.kick)
            .expect("SET_VRING_KICK before SET_MEM_TABLE");
    }
    assert!(sw.is_running());
    p.still_works(&mut sw);
    // Then the table, then the enables.
    fe.set_mem_table(&mem.vhost_regions())
        .expect("SET_MEM_TABLE");
    for q in 0..2 {
        fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }
    for i in 0..QS {
        rx.post(&mem, i, BUF as u32, 2);
    }
    rx.publish(&mem, QS);

    // The late guest sends: x and y get it.
    let f = frame(BROADCAST, mac(9), 300, 1);
    let mut whole = vec![0u8; NET_HDR_LEN];
    whole.extend_from_slice(&f);
    mem.write(tx.bufs[0], &whole).expect("frame");
    tx.post(&mem, 0, whole.len() as u32, 0);
    tx.publish(&mem, 1);
    assert_eq!(recv_one(&mut p.x), f);
    assert_eq!(recv_one(&mut p.y), f);
    wait_until("the TX chain to come back", || tx.used_idx(&mem) == 1);
    // And it receives.
    let g = frame(mac(9), mac(1), 1000, 2);
    send_all(&mut p.x, std::slice::from_ref(&g));
    wait_until("a used RX buffer", || rx.used_idx(&mem) == 1);
    let (id, len) = rx.used_elem(&mem, 0);
    assert_eq!(len as usize, NET_HDR_LEN + g.len());
    let got = mem
        .read_vec(rx.bufs[id as usize] + NET_HDR_LEN as u64, g.len())
        .expect("read frame");
    assert!(got == g, "the late guest's frame");
    let k = counters(&mut sw, "late");
    assert_eq!((k.rx_packets, k.tx_packets, k.total_drops()), (1, 1, 0));
    p.still_works(&mut sw);
}

#[test]
fn requests_for_queues_that_do_not_exist_are_refused() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let mut g = plug(&mut sw, "g", small_config());
    let efd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let cfg = VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x3000,
        avail_ring_addr: 0x2000,
        log_addr: None,
    };
    // The port has queues 0 and 1 only. Twelve refusals in a row: the
    // connection stays up.
    for q in [2usize, 255] {
        let fe = g.frontend();
        assert!(fe.set_vring_num(q, 256).is_err(), "SET_VRING_NUM {q}");
        assert!(fe.set_vring_addr(q, &cfg).is_err(), "SET_VRING_ADDR {q}");
        assert!(fe.set_vring_base(q, 0).is_err(), "SET_VRING_BASE {q}");
        assert!(fe.set_vring_kick(q, &efd).is_err(), "SET_VRING_KICK {q}");
        assert!(fe.set_vring_call(q, &efd).is_err(), "SET_VRING_CALL {q}");
        assert!(
            fe.set_vring_enable(q, true).is_err(),
            "SET_VRING_ENABLE {q}"
        );
    }
    // Bad values for queues that exist are refused too.
    assert!(g.frontend().set_vring_num(0, 0).is_err(), "size 0");
    assert!(g.frontend().set_vring_num(0, 100).is_err(), "size 100");
    assert!(sw.is_running());
    // The connection survived: g still sends and receives.
    let f = frame(BROADCAST, mac(7), 500, 1);
    send_all(&mut g, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut p.x), f);
    assert_eq!(recv_one(&mut p.y), f);
    let back = frame(mac(7), mac(1), 500, 2);
    send_all(&mut p.x, std::slice::from_ref(&back));
    assert_eq!(recv_one(&mut g), back);
    p.still_works(&mut sw);

    // A frontend that keeps asking for what does not exist, 40 times in a
    // row: every request fails (refused, or the switch hangs up, which it
    // may do), and the port then takes a new guest.
    for q in 2..42usize {
        assert!(
            g.frontend().set_vring_num(q, 256).is_err(),
            "SET_VRING_NUM {q}"
        );
    }
    assert!(sw.is_running());
    drop(g);
    let sock = sw.run_dir().join("g.sock");
    wait_until("g's session to end", || {
        sw.call("port.show", json!({"name": "g"}))
            .is_ok_and(|v| v["connected"] == false)
    });
    let mut g = NetGuest::connect(&sock, small_config()).expect("reconnect");
    let f = frame(mac(1), mac(7), 700, 3);
    send_all(&mut g, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut p.x), f);
    p.still_works(&mut sw);
}

#[test]
fn get_vring_base_for_a_queue_that_does_not_exist_is_answered() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let sock = sw.add_port("g").expect("port.add");
    let stream = UnixStream::connect(&sock).expect("connect");
    let watch = stream.try_clone().expect("clone");
    let fe = raw_frontend_on(stream);
    // GET_VRING_BASE always has a reply, and a frontend waits for it (the
    // vhost crate's frontend even retries through read timeouts). The
    // switch must answer or hang up, not leave the frontend waiting.
    let (done, answered) = std::sync::mpsc::channel();
    let asker = std::thread::spawn(move || {
        let r = fe.get_vring_base(9).map_err(|e| e.to_string());
        let _ = done.send(());
        r
    });
    let in_time = answered.recv_timeout(REPLY_BOUND).is_ok();
    if !in_time {
        // Cut the line ourselves so that the asking thread ends.
        let _ = watch.shutdown(std::net::Shutdown::Both);
    }
    let r = asker.join().expect("asking thread");
    assert!(
        in_time,
        "no answer to GET_VRING_BASE for queue 9 within {REPLY_BOUND:?} (the frontend would hang)"
    );
    assert!(
        r.is_err(),
        "GET_VRING_BASE 9 answered {r:?} for a queue that does not exist"
    );
    p.still_works(&mut sw);
}

#[test]
fn a_memory_table_larger_than_its_file_does_not_take_the_switch_down() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let sock = sw.add_port("liar").expect("port.add");
    let mut fe = raw_frontend(&sock);
    // 64 KiB of memfd, announced as 16 MiB.
    let mem = GuestMemory::new(64 << 10, 1).expect("memory");
    let mut region: VhostUserMemoryRegionInfo = mem.vhost_regions()[0];
    region.memory_size = 16 << 20;
    let fake_uva = region.userspace_addr;
    if fe.set_mem_table(&[region]).is_err() {
        // Refused: the right answer. The switch carries on.
        p.still_works(&mut sw);
        return;
    }
    // Accepted: put a TX ring past the end of the file and start it.
    let off = 8 << 20;
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let cfg = VringConfigData {
        queue_max_size: QS,
        queue_size: QS,
        flags: 0,
        desc_table_addr: fake_uva + off,
        avail_ring_addr: fake_uva + off + 0x1000,
        used_ring_addr: fake_uva + off + 0x2000,
        log_addr: None,
    };
    let _ = fe.set_vring_num(1, QS);
    let _ = fe.set_vring_addr(1, &cfg);
    let _ = fe.set_vring_base(1, 0);
    let _ = fe.set_vring_kick(1, &kick);
    let _ = fe.set_vring_enable(1, true);
    let _ = kick.write(1);
    // One frame through the switch: it has polled the ring by then.
    let f = frame(mac(2), mac(1), 60, 77);
    send_all(&mut p.x, std::slice::from_ref(&f));
    wait_until("x's frame to reach y (or the switch to die)", || {
        !sw.is_running() || p.y.try_recv().is_some()
    });
    p.still_works(&mut sw);
}

/// A small xorshift generator for reproducible garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Write `bytes` to the port's socket, then hang up (after seeing whether
/// the switch hangs up first).
fn throw_at(sock: &Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    // The switch may hang up half way: a write error is fine.
    let _ = s.write_all(bytes);
    let mut sink = [0u8; 256];
    let _ = s.read(&mut sink);
}

#[test]
fn garbage_on_a_port_socket_leaves_the_port_usable() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let sock = sw.add_port("g").expect("port.add");
    // Random bytes.
    throw_at(&sock, &garbage(1, 64 << 10));
    // A plausible header (GET_FEATURES, version 1) claiming a 4 KiB body,
    // then nothing.
    let mut hdr = 1u32.to_le_bytes().to_vec();
    hdr.extend_from_slice(&1u32.to_le_bytes());
    hdr.extend_from_slice(&4096u32.to_le_bytes());
    throw_at(&sock, &hdr);
    // A header with an absurd size, then more garbage.
    let mut huge = 5u32.to_le_bytes().to_vec();
    huge.extend_from_slice(&1u32.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend(garbage(2, 1000));
    throw_at(&sock, &huge);
    // An unknown request code, over and over, keeping the line open.
    let mut unknown = Vec::new();
    for _ in 0..64 {
        unknown.extend_from_slice(&9999u32.to_le_bytes());
        unknown.extend_from_slice(&1u32.to_le_bytes());
        unknown.extend_from_slice(&0u32.to_le_bytes());
    }
    throw_at(&sock, &unknown);
    assert!(sw.is_running(), "vioswitch died: {:?}", sw.exit_status());
    p.still_works(&mut sw);

    // A proper guest gets a working port.
    let mut g = NetGuest::connect(&sock, small_config()).expect("connect after garbage");
    let f = frame(BROADCAST, mac(5), 200, 1);
    send_all(&mut g, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut p.x), f);
    assert_eq!(recv_one(&mut p.y), f);
    let back = frame(mac(5), mac(2), 200, 2);
    send_all(&mut p.y, std::slice::from_ref(&back));
    assert_eq!(recv_one(&mut g), back);
    let info = sw
        .call("port.show", json!({"name": "g"}))
        .expect("port.show");
    assert_eq!(info["connected"], true);
    assert!(info["connections"].as_u64().unwrap_or(0) >= 5, "{info}");
}

#[test]
fn a_stopped_ring_resumes_where_it_stopped() {
    let mut sw = switch();
    let mut p = pair(&mut sw);
    let mut g = plug(&mut sw, "g", small_config());
    let first: Vec<Vec<u8>> = (0..3).map(|i| frame(mac(1), mac(7), 100, i)).collect();
    send_all(&mut g, &first);
    assert!(recv_n(&mut p.x, 3) == first);
    wait_tx_done(&mut g);

    // Stop both rings, as QEMU does when the VM stops.
    assert_eq!(g.get_vring_base(1).expect("GET_VRING_BASE tx"), 3);
    let rx_base = g.get_vring_base(0).expect("GET_VRING_BASE rx");
    assert_eq!(rx_base, 0, "nothing was delivered to g yet");
    // While stopped: frames to g are dropped and counted, g's frames wait.
    let lost = frame(mac(7), mac(1), 100, 10);
    send_all(&mut p.x, std::slice::from_ref(&lost));
    wait_tx_done(&mut p.x);
    let k = counters(&mut sw, "g");
    assert_eq!(k.dropped("no_rx_buffer"), 1, "{k:?}");
    let later: Vec<Vec<u8>> = (0..2).map(|i| frame(mac(1), mac(7), 100, 20 + i)).collect();
    send_all(&mut g, &later);

    // Resume both from where they stopped.
    for (q, base) in [(0usize, rx_base), (1, 3)] {
        let l = g.raw_queue(q).expect("queue").layout();
        let host = |gpa: u64, len: usize| g.memory().host_addr(gpa, len).expect("host addr");
        let cfg = VringConfigData {
            queue_max_size: l.size,
            queue_size: l.size,
            flags: 0,
            desc_table_addr: host(l.desc, l.len),
            used_ring_addr: host(l.used, 1),
            avail_ring_addr: host(l.avail, 1),
            log_addr: None,
        };
        let kick = g
            .kick_fd(q)
            .expect("kick fd")
            .try_clone()
            .expect("clone eventfd");
        let fe = g.frontend();
        fe.set_vring_num(q, l.size).expect("SET_VRING_NUM");
        fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        fe.set_vring_base(q, base as u16).expect("SET_VRING_BASE");
        fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }
    g.kick(1);
    // Exactly the two waiting frames come out, not the first three again.
    assert!(
        recv_n(&mut p.x, 2) == later,
        "the frames queued while stopped"
    );
    wait_tx_done(&mut g);
    let back = frame(mac(7), mac(1), 1514, 30);
    send_all(&mut p.x, std::slice::from_ref(&back));
    assert_eq!(recv_one(&mut g), back, "RX after resume");
    assert_eq!(
        g.try_recv(),
        None,
        "the frame sent while stopped stays lost"
    );
    let k = counters(&mut sw, "g");
    assert_eq!((k.rx_packets, k.tx_packets), (5, 1), "{k:?}");
    assert_eq!(p.x.try_recv(), None, "g's first frames were sent twice");
    p.still_works(&mut sw);
}
