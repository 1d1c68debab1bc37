//! The real-QEMU test infrastructure on its own, without the switch: the
//! guest image boots, and two guests joined by a UDP "wire"
//! (`-netdev socket,udp=`, plain virtio-net) ping each other, move a TCP
//! payload intact, and notice a peer that is killed and restarted. One more
//! test puts two guests on DPDK's testpmd (vhost PMD, io forwarding) with
//! exactly the vhost-user device line of `qemu_e2e`, so a known-good
//! vhost-user backend vouches for the QEMU side. If these pass and
//! `qemu_e2e` fails, the switch is at fault, not the guests.
//!
//! The guests run one at a time per test (a lock): the machines have 2 cores.
//! Deadlines only bound a hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vioswitch_testkit::qemu::{
    mac, payload, sha256_hex, GuestConfig, GuestImage, GuestNet, QemuGuest, QemuNetOpts,
    READY_MARKER,
};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(240);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn image() -> GuestImage {
    GuestImage::ensure().expect("guest image (scripts/guest-kernel.sh)")
}

fn guest(name: &str, net: GuestNet, job: &str, args: &[&str]) -> GuestConfig {
    GuestConfig {
        name: name.into(),
        net,
        job: job.into(),
        kernel_args: args.iter().map(|s| s.to_string()).collect(),
        ..GuestConfig::default()
    }
}

#[test]
fn guest_boots_without_network() {
    let _g = serial();
    let img = image();
    let t0 = Instant::now();
    let mut vm = QemuGuest::spawn(&img, guest("boot", GuestNet::None, "boot", &[])).unwrap();
    let first = vm.wait_for("VIOTEST-BOOT", BOOT).unwrap();
    let t_first = t0.elapsed();
    let r = vm.result(JOB).unwrap();
    assert!(r.ok, "{}\n{}", r.line, vm.logs());
    assert_eq!(r.get("eth0"), Some("no"), "{}", r.line);
    vm.wait_exit(BOOT).unwrap();
    eprintln!(
        "kernel {}: first line ({first}) after {t_first:?}, powered off after {:?}",
        img.kernel_version,
        t0.elapsed()
    );
}

#[test]
fn two_guests_on_a_wire_ping_each_other() {
    let _g = serial();
    let img = image();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).unwrap();
    let t0 = Instant::now();
    let ping = |ip: &str, peer: &str| {
        [
            format!("vio.ip={ip}/24"),
            format!("vio.peer={peer}"),
            "vio.count=5".into(),
            "vio.linger=60".into(),
        ]
    };
    let a = ping("10.0.0.1", "10.0.0.2");
    let b = ping("10.0.0.2", "10.0.0.1");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let mut vm_a = QemuGuest::spawn(&img, guest("wire-a", na, "ping", &a)).unwrap();
    let mut vm_b = QemuGuest::spawn(&img, guest("wire-b", nb, "ping", &b)).unwrap();
    let ready = vm_a.wait_for(READY_MARKER, BOOT).unwrap();
    let t_ready = t0.elapsed();
    let ra = vm_a.result(JOB).unwrap();
    let rb = vm_b.result(JOB).unwrap();
    let t_done = t0.elapsed();
    assert!(ra.ok, "{}\n{}", ra.line, vm_a.logs());
    assert!(rb.ok, "{}\n{}", rb.line, vm_b.logs());
    assert_eq!(ra.get("replies"), Some("5"));
    assert_eq!(rb.get("replies"), Some("5"));
    eprintln!("ready ({ready}) after {t_ready:?}; both pinged 5/5 after {t_done:?}");
    eprintln!("a: {}\nb: {}", ra.details, rb.details);
}

#[test]
fn tcp_payload_crosses_the_wire_intact() {
    let _g = serial();
    let img = image();
    const BYTES: usize = 1 << 20;
    let expected = sha256_hex(&payload(BYTES)).unwrap();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).unwrap();
    let bytes = format!("vio.bytes={BYTES}");
    let t0 = Instant::now();
    let mut rx = QemuGuest::spawn(
        &img,
        guest("wire-rx", nb, "tcp-recv", &["vio.ip=10.0.0.2/24", &bytes]),
    )
    .unwrap();
    let mut tx = QemuGuest::spawn(
        &img,
        guest(
            "wire-tx",
            na,
            "tcp-send",
            &["vio.ip=10.0.0.1/24", "vio.peer=10.0.0.2", &bytes],
        ),
    )
    .unwrap();
    let rs = tx.result(JOB).unwrap();
    let rr = rx.result(JOB).unwrap();
    assert!(rs.ok, "{}\n{}", rs.line, tx.logs());
    assert!(rr.ok, "{}\n{}", rr.line, rx.logs());
    assert_eq!(
        rs.get("sha256"),
        Some(expected.as_str()),
        "sender's payload"
    );
    assert_eq!(
        rr.get("sha256"),
        Some(expected.as_str()),
        "received payload"
    );
    assert_eq!(rr.get("bytes"), Some(BYTES.to_string().as_str()));
    eprintln!(
        "1 MiB moved and checked after {:?}: {}",
        t0.elapsed(),
        rr.details
    );
}

#[test]
fn ping_loop_sees_a_killed_peer_come_back() {
    let _g = serial();
    let img = image();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).unwrap();
    let t0 = Instant::now();
    let mut a = QemuGuest::spawn(
        &img,
        guest(
            "wire-loop",
            na,
            "ping-loop",
            &[
                "vio.ip=10.0.0.1/24",
                "vio.peer=10.0.0.2",
                "vio.count=3",
                "vio.rounds=2",
                "vio.deadline=180",
            ],
        ),
    )
    .unwrap();
    let mut b = QemuGuest::spawn(
        &img,
        guest("wire-serve", nb.clone(), "serve", &["vio.ip=10.0.0.2/24"]),
    )
    .unwrap();
    b.wait_for(READY_MARKER, BOOT).unwrap();
    a.wait_for("VIOTEST-PROGRESS round=1 ok", JOB).unwrap();
    let t_up = t0.elapsed();
    b.kill();
    a.wait_for("VIOTEST-PROGRESS round=1 peer-down", JOB)
        .unwrap();
    let t_down = t0.elapsed();
    let mut b2 = QemuGuest::spawn(
        &img,
        guest("wire-serve2", nb, "serve", &["vio.ip=10.0.0.2/24"]),
    )
    .unwrap();
    let r = a.result(JOB).unwrap();
    assert!(r.ok, "{}\n{}\n{}", r.line, a.logs(), b2.logs());
    assert!(b2.is_running());
    eprintln!(
        "peer answered after {t_up:?}, seen down after {t_down:?}, back after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}

/// DPDK's testpmd forwarding between two vhost-user server sockets; killed
/// on drop.
struct TestPmd {
    child: Child,
    dir: PathBuf,
    prefix: String,
}

impl TestPmd {
    fn spawn(dir: &Path) -> TestPmd {
        let prefix = format!("vioswitch-{}", std::process::id());
        let log = std::fs::File::create(dir.join("testpmd.log")).unwrap();
        let child = Command::new("dpdk-testpmd")
            .args(["--no-huge", "-m", "512", "--no-pci", "-l", "0,1"])
            .arg(format!("--file-prefix={prefix}"))
            .arg(format!(
                "--vdev=net_vhost0,iface={}",
                dir.join("p0.sock").display()
            ))
            .arg(format!(
                "--vdev=net_vhost1,iface={}",
                dir.join("p1.sock").display()
            ))
            .args(["--", "--forward-mode=io", "--auto-start", "--no-mlockall"])
            .args(["--stats-period", "0", "--total-num-mbufs=4096"])
            // testpmd exits at EOF on stdin: keep a pipe open.
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dpdk-testpmd (scripts/install-deps.sh installs dpdk)");
        let mut pmd = TestPmd {
            child,
            dir: dir.to_path_buf(),
            prefix,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(dir.join("p0.sock").exists() && dir.join("p1.sock").exists()) {
            if let Ok(Some(st)) = pmd.child.try_wait() {
                panic!("testpmd exited ({st}):\n{}", pmd.log());
            }
            assert!(
                Instant::now() < deadline,
                "no testpmd sockets:\n{}",
                pmd.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pmd
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("testpmd.log")).unwrap_or_default()
    }
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // EAL's runtime directory (root: /var/run/dpdk/PREFIX).
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|_| !nix::unistd::Uid::effective().is_root())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/run"));
        let _ = std::fs::remove_dir_all(runtime.join("dpdk").join(&self.prefix));
    }
}

#[test]
fn vhost_user_guests_ping_through_dpdk_testpmd() {
    let _g = serial();
    let img = image();
    let dir = vioswitch_testkit::temp_dir("vioswitch-testpmd").unwrap();
    let pmd = TestPmd::spawn(&dir);
    let t0 = Instant::now();
    let net = |sock: &str, n: u8, ip: &str, peer: &str| QemuNetOpts {
        socket: dir.join(sock),
        mac: mac(n),
        job: "ping".into(),
        kernel_args: vec![
            format!("vio.ip={ip}/24"),
            format!("vio.peer={peer}"),
            "vio.count=5".into(),
            "vio.linger=60".into(),
        ],
    };
    let mut a = QemuGuest::spawn(&img, net("p0.sock", 1, "10.0.0.1", "10.0.0.2")).unwrap();
    let mut b = QemuGuest::spawn(&img, net("p1.sock", 2, "10.0.0.2", "10.0.0.1")).unwrap();
    let ra = a.result(JOB).unwrap();
    let rb = b.result(JOB).unwrap();
    assert!(ra.ok, "{}\n{}\n{}", ra.line, a.logs(), pmd.log());
    assert!(rb.ok, "{}\n{}\n{}", rb.line, b.logs(), pmd.log());
    eprintln!(
        "vhost-user via testpmd: both pinged after {:?}",
        t0.elapsed()
    );
    drop(a);
    drop(b);
    drop(pmd);
    let _ = std::fs::remove_dir_all(&dir);
}
