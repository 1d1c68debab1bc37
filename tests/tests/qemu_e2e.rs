//! End-to-end: real QEMU guests (TCG) on vioswitch ports over vhost-user.
//!
//! Each test starts a switch, adds server-mode ports, and boots guests from
//! the image of `scripts/guest-kernel.sh` (see `vioswitch_testkit::qemu`).
//! The guest-side jobs are proven without the switch by `qemu_infra`: when
//! that passes and this fails, look at the switch.
//!
//! One test at a time (a lock: they share one binary and 2 cores); the
//! deadlines only bound a hang.
//!
//! The reset tests reset a running guest's virtio-net device on the same
//! vhost-user connection (driver unloaded and loaded again, a monitor
//! `system_reset`, a reboot from inside the guest): QEMU stops every ring
//! with `GET_VRING_BASE` and sets them up again. The multiqueue test gives a
//! guest with 2 CPUs a 2-queue-pair port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::qemu::{
    mac, one_at_a_time, payload, sha256_hex, GuestConfig, GuestImage, GuestNet, GuestResult,
    QemuError, QemuGuest, QemuNetOpts, READY_MARKER,
};
use vioswitch_testkit::switch::{vioswitch_bin, SwitchOptions, SwitchProcess};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(300);

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

/// Add ports vm1 and vm2 to `sw`; returns it with their sockets.
fn with_two_ports(mut sw: SwitchProcess) -> (SwitchProcess, PathBuf, PathBuf) {
    let s1 = sw.add_port("vm1").expect("add port vm1");
    let s2 = sw.add_port("vm2").expect("add port vm2");
    (sw, s1, s2)
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
    let _g = one_at_a_time();
    let img = image();
    let (mut sw, s1, s2) = with_two_ports(switch());
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
    let _g = one_at_a_time();
    let img = image();
    const BYTES: usize = 1 << 20;
    let expected = sha256_hex(&payload(BYTES)).expect("sha256sum");
    let (mut sw, s1, s2) = with_two_ports(switch());
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
    let _g = one_at_a_time();
    let img = image();
    let (mut sw, s1, s2) = with_two_ports(switch());
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

// ------------------------------------------------------------ resets ----

/// A switch whose log (warnings, and the vhost-user set-up at debug level:
/// "port NAME: queue Q started") goes to [`SwitchProcess::log_text`]. A
/// wrapper script sets `RUST_LOG`, which the harness otherwise takes from
/// the test's environment.
fn logged_switch() -> SwitchProcess {
    use std::os::unix::fs::PermissionsExt;
    let bin = vioswitch_bin().expect("vioswitch binary (cargo build -p vioswitch --bins)");
    let dir = vioswitch_testkit::temp_dir("vioswitch-e2e-wrapper").expect("temp dir");
    let wrapper = dir.join("vioswitch");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nRUST_LOG='warn,vioswitch::vhost_user=debug' exec '{}' \"$@\"\n",
            bin.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the wrapper");
    SwitchProcess::spawn_logged(SwitchOptions {
        binary: Some(wrapper),
        ..SwitchOptions::default()
    })
    .expect("start vioswitch")
}

/// How often the switch started ring `queue` of `port` (from its debug log).
fn starts(sw: &SwitchProcess, port: &str, queue: u16) -> usize {
    let needle = format!("port {port}: queue {queue} started");
    sw.log_text().matches(needle.as_str()).count()
}

/// The switch's warnings and errors, for messages.
fn switch_complaints(sw: &SwitchProcess) -> String {
    sw.log_text()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The guest's result, or a panic as soon as QEMU says it could not start
/// vhost-net on the switch's port: it then falls back to its own virtio
/// emulation, which moves no frame, and the job would only time out.
fn result_unless_vhost_fails(
    g: &mut QemuGuest,
    sw: &SwitchProcess,
    timeout: Duration,
) -> GuestResult {
    let deadline = Instant::now() + timeout;
    loop {
        match g.result(Duration::from_secs(2)) {
            Ok(r) => return r,
            Err(QemuError::Timeout { .. }) if Instant::now() < deadline => {
                let stderr = g.qemu_stderr();
                if stderr.contains("unable to start vhost net") {
                    panic!(
                        "QEMU could not start vhost-net on the switch's port (the switch refused a request):\n{}\nswitch:\n{}",
                        g.logs(),
                        switch_complaints(sw)
                    );
                }
            }
            Err(e) => panic!(
                "{}'s result: {e}\nswitch:\n{}",
                g.name(),
                switch_complaints(sw)
            ),
        }
    }
}

fn port_show(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("port.show", json!({ "name": name }))
        .unwrap_or_else(|e| panic!("port.show {name}: {e}"))
}

/// The port kept its one connection through the resets and is not broken.
/// Both rings of `port` started more than `times` times (once at boot, once
/// per reset), as the switch's log shows.
fn assert_rings_restarted(sw: &SwitchProcess, port: &str, times: usize, what: &str) {
    for q in [0, 1] {
        assert!(
            starts(sw, port, q) > times,
            "queue {q} of {port} started {} times for {times} {what}:\n{}",
            starts(sw, port, q),
            sw.log_text()
        );
    }
}

fn assert_same_connection(sw: &mut SwitchProcess, name: &str, guest: &QemuGuest) {
    let info = port_show(sw, name);
    eprintln!("port {name}: {info}");
    assert_eq!(
        info["connections"],
        json!(1),
        "port {name} was reconnected: {info}\n{}\n{}",
        guest.logs(),
        switch_complaints(sw)
    );
    assert_eq!(info["connected"], json!(true), "port {name}: {info}");
    assert_eq!(
        info["broken"],
        json!(false),
        "port {name} broken: {info}\n{}",
        switch_complaints(sw)
    );
}

fn vhost_guest(name: &str, socket: &Path, n: u8, job: &str, args: &[&str]) -> GuestConfig {
    GuestConfig {
        name: name.into(),
        net: GuestNet::VhostUser {
            socket: socket.to_path_buf(),
            mac: mac(n),
        },
        job: job.into(),
        kernel_args: args.iter().map(|s| s.to_string()).collect(),
        ..GuestConfig::default()
    }
}

/// B (`serve` on vm2, 10.0.0.2) for the reset tests.
fn serving_peer(img: &GuestImage, s2: &Path) -> QemuGuest {
    let mut b = QemuGuest::spawn(
        img,
        vhost_guest("vm2", s2, 2, "serve", &["vio.ip=10.0.0.2/24"]),
    )
    .expect("start guest B");
    b.wait_for(READY_MARKER, BOOT).expect("guest B's network");
    b
}

#[test]
fn guest_driver_reload_resets_the_device_on_the_same_connection() {
    let _g = one_at_a_time();
    let img = image();
    let (mut sw, s1, s2) = with_two_ports(logged_switch());
    let t0 = Instant::now();
    let mut b = serving_peer(&img, &s2);
    const RELOADS: usize = 2;
    let reloads = format!("vio.reloads={RELOADS}");
    let mut a = QemuGuest::spawn(
        &img,
        vhost_guest(
            "vm1",
            &s1,
            1,
            "driver-reload",
            &[
                "vio.ip=10.0.0.1/24",
                "vio.peer=10.0.0.2",
                "vio.count=5",
                &reloads,
                "vio.linger=600",
            ],
        ),
    )
    .expect("start guest A");
    let r = result_unless_vhost_fails(&mut a, &sw, JOB);
    show_stats(&mut sw, &["vm1", "vm2"]);
    assert!(
        r.ok,
        "A: {}\n{}\n{}\nswitch:\n{}",
        r.line,
        a.logs(),
        b.logs(),
        switch_complaints(&sw)
    );
    assert_eq!(r.get("replies"), Some("5,5,5"), "{}", r.line);
    assert_same_connection(&mut sw, "vm1", &a);
    // The switch saw the rings stopped and started again.
    assert_rings_restarted(&sw, "vm1", RELOADS, "reloads");
    assert!(b.is_running() && sw.is_running());
    eprintln!(
        "A pinged B before and after {RELOADS} driver reloads in {:?} (vm1 queue 0 started {} times): {}",
        t0.elapsed(),
        starts(&sw, "vm1", 0),
        r.details
    );
}

/// A pings B, is reset `resets` times by `reset` (each reset starts the
/// guest, and its ping job, again) and must reach B after each; the port
/// keeps its connection.
fn ping_across_resets(
    label: &str,
    extra: &[&str],
    monitor: bool,
    resets: usize,
    mut reset: impl FnMut(&mut QemuGuest),
) {
    let img = image();
    let (mut sw, s1, s2) = with_two_ports(logged_switch());
    let t0 = Instant::now();
    let mut b = serving_peer(&img, &s2);
    let mut args = vec!["vio.ip=10.0.0.1/24", "vio.peer=10.0.0.2", "vio.count=5"];
    args.extend_from_slice(extra);
    let mut a = QemuGuest::spawn(
        &img,
        GuestConfig {
            reboot: true,
            monitor,
            ..vhost_guest("vm1", &s1, 1, "ping", &args)
        },
    )
    .expect("start guest A");
    let mut times = Vec::new();
    for boot in 1..=resets + 1 {
        let r = a.result_nth(boot, JOB).unwrap_or_else(|e| {
            panic!(
                "A's result in boot {boot}: {e}\n{}\nswitch:\n{}",
                b.logs(),
                switch_complaints(&sw)
            )
        });
        assert!(
            r.ok,
            "A in boot {boot}: {}\n{}\n{}\nswitch:\n{}",
            r.line,
            a.logs(),
            b.logs(),
            switch_complaints(&sw)
        );
        times.push(t0.elapsed());
        if boot <= resets {
            reset(&mut a);
            // The reset is done once the guest starts again.
            a.wait_for_nth("VIOTEST-BOOT", boot + 1, BOOT)
                .unwrap_or_else(|e| panic!("A did not boot again after reset {boot}: {e}"));
        }
    }
    show_stats(&mut sw, &["vm1", "vm2"]);
    assert_same_connection(&mut sw, "vm1", &a);
    assert_rings_restarted(&sw, "vm1", resets, "resets");
    assert!(b.is_running() && sw.is_running());
    eprintln!(
        "{label}: A pinged B in each of {} boots, results after {times:?}",
        resets + 1
    );
}

#[test]
fn guest_system_reset_resets_the_device_on_the_same_connection() {
    let _g = one_at_a_time();
    // A stays up after its result until the monitor resets it.
    ping_across_resets("system_reset", &["vio.linger=600"], true, 2, |a| {
        let out = a
            .monitor("system_reset", Duration::from_secs(30))
            .expect("system_reset on A's monitor");
        eprintln!("system_reset: {out:?}");
    });
}

#[test]
fn guest_reboot_from_inside_resets_the_device_on_the_same_connection() {
    let _g = one_at_a_time();
    // A reboots itself after each result (`reboot -f`), forever.
    ping_across_resets("in-guest reboot", &["vio.then=reboot"], false, 2, |_| {});
}

// -------------------------------------------------------- multiqueue ----

/// A guest with 2 CPUs on a 2-queue-pair port (Linux enables min(CPUs,
/// pairs) pairs; XPS sends from CPU i on TX queue i) pings and sends 1 MiB
/// to a single-queue guest. QEMU 7.2 sets the memory up once per queue pair
/// on the same connection: with `CONFIGURE_MEM_SLOTS` the port gets the same
/// `ADD_MEM_REG` twice (QEMU 8.0 sends it once), which it must accept.
#[test]
fn multiqueue_guest_talks_to_a_single_queue_guest() {
    let _g = one_at_a_time();
    let img = image();
    const BYTES: usize = 1 << 20;
    let expected = sha256_hex(&payload(BYTES)).expect("sha256sum");
    let mut sw = logged_switch();
    let info = sw
        .call("port.add", json!({ "name": "mq", "queues": 2 }))
        .expect("add port mq with 2 queue pairs");
    assert_eq!(info["queue_pairs"], json!(2), "{info}");
    let s1 = PathBuf::from(info["socket"].as_str().expect("socket path"));
    let s2 = sw.add_port("sq").expect("add port sq");
    let bytes = format!("vio.bytes={BYTES}");
    let t0 = Instant::now();
    let mut rx = QemuGuest::spawn(
        &img,
        vhost_guest(
            "sq",
            &s2,
            2,
            "tcp-recv",
            &["vio.ip=10.0.0.2/24", &bytes, "vio.wait=300"],
        ),
    )
    .expect("start the single-queue guest");
    // Linux enables min(CPUs, queue pairs) pairs: 2 CPUs for 2 pairs.
    let mut tx = QemuGuest::spawn(
        &img,
        GuestConfig {
            cpus: 2,
            queue_pairs: 2,
            ..vhost_guest(
                "mq",
                &s1,
                1,
                "mq-send",
                &[
                    "vio.ip=10.0.0.1/24",
                    "vio.peer=10.0.0.2",
                    "vio.queues=2",
                    "vio.count=5",
                    &bytes,
                    "vio.wait=120",
                    "vio.linger=600",
                ],
            )
        },
    )
    .expect("start the multiqueue guest");
    let rs = result_unless_vhost_fails(&mut tx, &sw, JOB);
    let rr = rx.result(JOB).expect("single-queue guest's result");
    show_stats(&mut sw, &["mq", "sq"]);
    assert!(
        rs.ok,
        "mq: {}\n{}\n{}\nswitch:\n{}",
        rs.line,
        tx.logs(),
        rx.logs(),
        switch_complaints(&sw)
    );
    assert!(rr.ok, "sq: {}\n{}", rr.line, rx.logs());
    assert_eq!(rs.get("tx_queues"), Some("2"), "{}", rs.line);
    assert_eq!(rs.get("rx_queues"), Some("2"), "{}", rs.line);
    assert_eq!(
        rs.get("replies"),
        Some("5,5"),
        "pings from both CPUs: {}",
        rs.line
    );
    assert_eq!(rr.get("sha256"), Some(expected.as_str()), "{}", rr.line);
    // The switch ran all four rings of the multiqueue port.
    for q in 0..4 {
        assert!(
            starts(&sw, "mq", q) >= 1,
            "queue {q} of port mq never started:\n{}",
            sw.log_text()
        );
    }
    let mq = port_show(&mut sw, "mq");
    eprintln!("port mq: {mq}");
    assert_eq!(mq["connections"], json!(1), "{mq}");
    assert_eq!(mq["broken"], json!(false), "{mq}");
    let st = &mq["stats"];
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    assert!(
        n("rx_bytes") >= BYTES as u64,
        "the payload did not go through port mq: {st}"
    );
    assert!(n("tx_packets") >= 10, "replies did not reach port mq: {st}");
    eprintln!(
        "multiqueue guest -> single-queue guest after {:?}: {} | {}",
        t0.elapsed(),
        rs.details,
        rr.details
    );
}
