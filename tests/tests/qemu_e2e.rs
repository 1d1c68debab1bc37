//! End-to-end: real QEMU guests (TCG) on vioswitch ports over vhost-user.
//!
//! Each test starts a switch, adds server-mode ports, and boots guests from
//! the image of `scripts/guest-kernel.sh` (see `vioswitch_testkit::qemu`).
//! The guest-side jobs are proven without the switch by `qemu_infra`: when
//! that passes and this fails, look at the switch.
//!
//! One test at a time (a lock: they share one binary and 2 cores); the
//! deadlines only bound a hang.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vioswitch_testkit::qemu::{
    mac, payload, sha256_hex, GuestImage, QemuGuest, QemuNetOpts, READY_MARKER,
};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(300);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn image() -> GuestImage {
    GuestImage::ensure().expect("guest image (scripts/guest-kernel.sh)")
}

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

fn opts(socket: &Path, n: u8, job: &str, args: &[String]) -> QemuNetOpts {
    QemuNetOpts {
        socket: socket.to_path_buf(),
        mac: mac(n),
        job: job.into(),
        kernel_args: args.to_vec(),
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn show_stats(sw: &mut SwitchProcess, ports: &[&str]) {
    for p in ports {
        match sw.port_stats(p) {
            Ok(v) => eprintln!("port {p} stats: {v}"),
            Err(e) => eprintln!("port {p} stats: {e}"),
        }
    }
}

#[test]
fn two_guests_ping_each_other_through_the_switch() {
    let _g = serial();
    let img = image();
    let mut sw = switch();
    let s1 = sw.add_port("vm1").expect("add port vm1");
    let s2 = sw.add_port("vm2").expect("add port vm2");
    let t0 = Instant::now();
    let common = ["vio.count=5", "vio.linger=120"];
    let mut a = QemuGuest::spawn(
        &img,
        opts(
            &s1,
            1,
            "ping",
            &[
                args(&["vio.ip=10.0.0.1/24", "vio.peer=10.0.0.2"]),
                args(&common),
            ]
            .concat(),
        ),
    )
    .expect("start guest A");
    let mut b = QemuGuest::spawn(
        &img,
        opts(
            &s2,
            2,
            "ping",
            &[
                args(&["vio.ip=10.0.0.2/24", "vio.peer=10.0.0.1"]),
                args(&common),
            ]
            .concat(),
        ),
    )
    .expect("start guest B");
    let ra = a.result(JOB).expect("guest A's result");
    let rb = b.result(JOB).expect("guest B's result");
    show_stats(&mut sw, &["vm1", "vm2"]);
    assert!(ra.ok, "A: {}\n{}", ra.line, a.logs());
    assert!(rb.ok, "B: {}\n{}", rb.line, b.logs());
    assert_eq!(ra.get("replies"), Some("5"), "{}", ra.line);
    assert_eq!(rb.get("replies"), Some("5"), "{}", rb.line);
    eprintln!(
        "both guests pinged 5/5 after {:?}\nA: {}\nB: {}",
        t0.elapsed(),
        ra.details,
        rb.details
    );
}

#[test]
fn tcp_payload_crosses_the_switch_intact() {
    let _g = serial();
    let img = image();
    const BYTES: usize = 1 << 20;
    let expected = sha256_hex(&payload(BYTES)).expect("sha256sum");
    let mut sw = switch();
    let s1 = sw.add_port("vm1").expect("add port vm1");
    let s2 = sw.add_port("vm2").expect("add port vm2");
    let bytes = format!("vio.bytes={BYTES}");
    let t0 = Instant::now();
    let mut rx = QemuGuest::spawn(
        &img,
        opts(
            &s2,
            2,
            "tcp-recv",
            &args(&["vio.ip=10.0.0.2/24", &bytes, "vio.wait=240"]),
        ),
    )
    .expect("start receiver");
    let mut tx = QemuGuest::spawn(
        &img,
        opts(
            &s1,
            1,
            "tcp-send",
            &args(&[
                "vio.ip=10.0.0.1/24",
                "vio.peer=10.0.0.2",
                &bytes,
                "vio.wait=240",
            ]),
        ),
    )
    .expect("start sender");
    let rs = tx.result(JOB).expect("sender's result");
    let rr = rx.result(JOB).expect("receiver's result");
    show_stats(&mut sw, &["vm1", "vm2"]);
    assert!(rs.ok, "sender: {}\n{}", rs.line, tx.logs());
    assert!(rr.ok, "receiver: {}\n{}", rr.line, rx.logs());
    assert_eq!(
        rs.get("sha256"),
        Some(expected.as_str()),
        "sender's payload"
    );
    assert_eq!(
        rr.get("sha256"),
        Some(expected.as_str()),
        "received payload differs: {}",
        rr.line
    );
    assert_eq!(rr.get("bytes"), Some(BYTES.to_string().as_str()));
    eprintln!(
        "1 MiB through the switch after {:?}: {}",
        t0.elapsed(),
        rr.details
    );
}

#[test]
fn traffic_resumes_after_a_guest_is_killed_and_restarted() {
    let _g = serial();
    let img = image();
    let mut sw = switch();
    let s1 = sw.add_port("vm1").expect("add port vm1");
    let s2 = sw.add_port("vm2").expect("add port vm2");
    let t0 = Instant::now();
    // A pings B until it answers 3 times, waits for B to go silent, then
    // pings until B answers 3 times again.
    let mut a = QemuGuest::spawn(
        &img,
        opts(
            &s1,
            1,
            "ping-loop",
            &args(&[
                "vio.ip=10.0.0.1/24",
                "vio.peer=10.0.0.2",
                "vio.count=3",
                "vio.rounds=2",
                "vio.deadline=240",
            ]),
        ),
    )
    .expect("start guest A");
    let serve = args(&["vio.ip=10.0.0.2/24"]);
    let mut b = QemuGuest::spawn(&img, opts(&s2, 2, "serve", &serve)).expect("start guest B");
    b.wait_for(READY_MARKER, BOOT).expect("guest B's network");
    a.wait_for("VIOTEST-PROGRESS round=1 ok", JOB)
        .unwrap_or_else(|e| panic!("A never reached B before the restart: {e}\n{}", b.logs()));
    let t_up = t0.elapsed();

    b.kill();
    a.wait_for("VIOTEST-PROGRESS round=1 peer-down", JOB)
        .expect("A saw B go away");
    let t_down = t0.elapsed();

    // Same socket, same MAC: a fresh QEMU process.
    let mut b2 = QemuGuest::spawn(&img, opts(&s2, 2, "serve", &serve)).expect("restart guest B");
    b2.wait_for(READY_MARKER, BOOT)
        .expect("restarted guest B's network");
    let r = a.result(JOB).expect("guest A's result");
    show_stats(&mut sw, &["vm1", "vm2"]);
    assert!(r.ok, "A: {}\n{}\n{}", r.line, a.logs(), b2.logs());
    assert!(b2.is_running(), "{}", b2.logs());
    assert!(sw.is_running(), "the switch died");
    eprintln!(
        "B answered after {t_up:?}, was seen gone after {t_down:?}, answered again after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}
