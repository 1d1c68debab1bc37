//! The real-QEMU test infrastructure on its own, without the switch: the
//! guest image boots, and two guests joined by a UDP "wire"
//! (`-netdev socket,udp=`, plain virtio-net) ping each other, move a TCP
//! payload intact, and notice a peer that is killed and restarted. One more
//! test puts two guests on DPDK's testpmd (vhost PMD, io forwarding) with
//! exactly the vhost-user device line of `qemu_e2e`, so a known-good
//! vhost-user backend vouches for the QEMU side. If these pass and
//! `qemu_e2e` fails, the switch is at fault, not the guests.
//!
//! The disk jobs run against `qemu-storage-daemon` (a known-good
//! vhost-user-blk backend) serving a file: the guest's sha256 of the disk
//! matches the host's, a range written with fsync is in the file, and a
//! file on ext2 survives a guest reboot.
//!
//! The guests run one at a time per test (a lock): the machines have 2 cores.
//! Deadlines only bound a hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vioswitch_testkit::qemu::{
    mac, one_at_a_time, payload, sha256_file_range, sha256_hex, BlkJob, GuestConfig, GuestImage,
    GuestNet, GuestResult, Pattern, QemuGuest, QemuNetOpts, StorageDaemon, BLK_SUM_MARKER,
    BLK_WRITTEN_MARKER, FS_READ_MARKER, FS_WRITTEN_MARKER, READY_MARKER, REBOOT_MARKER,
};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(240);

fn image() -> GuestImage {
    GuestImage::ensure().expect("guest image (scripts/guest-kernel.sh)")
}

#[test]
fn guest_boots_without_network() {
    let _g = one_at_a_time();
    let img = image();
    let t0 = Instant::now();
    let mut vm = QemuGuest::spawn(
        &img,
        GuestConfig::net_job("boot", GuestNet::None, "boot", &[]),
    )
    .unwrap();
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
    let _g = one_at_a_time();
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
    let mut vm_a = QemuGuest::spawn(&img, GuestConfig::net_job("wire-a", na, "ping", &a)).unwrap();
    let mut vm_b = QemuGuest::spawn(&img, GuestConfig::net_job("wire-b", nb, "ping", &b)).unwrap();
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
    let _g = one_at_a_time();
    let img = image();
    const BYTES: usize = 1 << 20;
    let expected = sha256_hex(&payload(BYTES)).unwrap();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).unwrap();
    let bytes = format!("vio.bytes={BYTES}");
    let t0 = Instant::now();
    let mut rx = QemuGuest::spawn(
        &img,
        GuestConfig::net_job("wire-rx", nb, "tcp-recv", &["vio.ip=10.0.0.2/24", &bytes]),
    )
    .unwrap();
    let mut tx = QemuGuest::spawn(
        &img,
        GuestConfig::net_job(
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
    let _g = one_at_a_time();
    let img = image();
    let (na, nb) = GuestNet::udp_pair(&mac(1), &mac(2)).unwrap();
    let t0 = Instant::now();
    let mut a = QemuGuest::spawn(
        &img,
        GuestConfig::net_job(
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
        GuestConfig::net_job("wire-serve", nb.clone(), "serve", &["vio.ip=10.0.0.2/24"]),
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
        GuestConfig::net_job("wire-serve2", nb, "serve", &["vio.ip=10.0.0.2/24"]),
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
    let _g = one_at_a_time();
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

/// A disk image and `qemu-storage-daemon` serving it, in a directory of
/// their own (removed on drop, after the daemon is killed).
struct QsdDisk {
    qsd: StorageDaemon,
    image: PathBuf,
    dir: PathBuf,
}

impl QsdDisk {
    /// An image of `len` bytes: `content`, then zeros.
    fn new(name: &str, len: u64, content: &[u8]) -> QsdDisk {
        let dir = vioswitch_testkit::temp_dir(&format!("vioswitch-qsd-{name}")).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, content).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(len)
            .unwrap();
        let qsd =
            StorageDaemon::spawn(&image, &dir.join("blk.sock")).unwrap_or_else(|e| panic!("{e}"));
        QsdDisk { qsd, image, dir }
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// Boot a guest on `disk` running `job`; wait for its first result, which
/// must be ok.
fn run_blk(img: &GuestImage, disk: &QsdDisk, name: &str, job: &BlkJob) -> (QemuGuest, GuestResult) {
    let mut vm = QemuGuest::spawn(img, GuestConfig::blk(name, disk.qsd.disk(), job)).unwrap();
    let r = vm.result(JOB).unwrap();
    assert!(r.ok, "{}\n{}\n{}", r.line, vm.logs(), disk.qsd.log());
    (vm, r)
}

impl Drop for QsdDisk {
    fn drop(&mut self) {
        self.qsd.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn blk_sum_of_a_disk_matches_the_host() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 16 << 20;
    let content = payload(LEN as usize);
    let expected = sha256_hex(&content).unwrap();
    let disk = QsdDisk::new("sum", LEN, &content);
    let t0 = Instant::now();
    let (mut vm, r) = run_blk(&img, &disk, "blk-sum", &BlkJob::Sum { bytes: None });
    assert_eq!(r.get("size"), Some(LEN.to_string().as_str()), "{}", r.line);
    assert_eq!(
        vm.marker_values(BLK_SUM_MARKER),
        vec![expected.clone()],
        "{}",
        vm.logs()
    );
    assert_eq!(r.get("sha256"), Some(expected.as_str()));
    vm.wait_exit(BOOT).unwrap();
    eprintln!(
        "blk-sum of 16 MiB via qemu-storage-daemon after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}

#[test]
fn blk_write_with_fsync_lands_in_the_backing_file() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 8 << 20;
    // Neither the offset nor the length is a multiple of the sector size.
    const OFFSET: u64 = 1_000_001;
    const BYTES: u64 = 300_007;
    let before = payload(LEN as usize);
    let disk = QsdDisk::new("write", LEN, &before);
    let t0 = Instant::now();
    let job = BlkJob::Write {
        offset: OFFSET,
        bytes: BYTES,
        pattern: Pattern::Random,
    };
    let (mut vm, r) = run_blk(&img, &disk, "blk-write", &job);
    let written = vm.marker_values(BLK_WRITTEN_MARKER);
    assert_eq!(written.len(), 1, "{}", vm.logs());
    assert_eq!(r.get("sha256"), Some(written[0].as_str()));
    vm.wait_exit(BOOT).unwrap();
    // The guest's fsync returned: the data is in the file, no need to stop
    // the daemon.
    let on_host = sha256_file_range(&disk.image, OFFSET, BYTES).unwrap();
    assert_eq!(on_host, written[0], "the range in the backing file");
    let after = disk.read();
    let (o, e) = (OFFSET as usize, (OFFSET + BYTES) as usize);
    assert_eq!(after.len(), before.len());
    assert!(after[..o] == before[..o], "bytes before the range changed");
    assert!(after[e..] == before[e..], "bytes after the range changed");
    assert!(
        after[o..e] != before[o..e],
        "the range still holds the old bytes"
    );
    eprintln!(
        "blk-write of {BYTES} bytes at {OFFSET} checked after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}

#[test]
fn blk_fs_file_survives_a_guest_reboot() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 32 << 20;
    let disk = QsdDisk::new("fs", LEN, &[]);
    let t0 = Instant::now();
    let job = BlkJob::Fs {
        bytes: 1 << 20,
        pattern: Pattern::Random,
    };
    let (mut vm, w) = run_blk(&img, &disk, "blk-fs", &job);
    assert_eq!(w.get("phase"), Some("write"), "{}", w.line);
    assert_eq!(w.get("mkfs"), Some("yes"), "{}", w.line);
    let t_written = t0.elapsed();
    let r = vm.result_nth(2, JOB).unwrap();
    assert!(r.ok, "{}\n{}\n{}", r.line, vm.logs(), disk.qsd.log());
    assert_eq!(r.get("phase"), Some("read"), "{}", r.line);
    vm.wait_exit(BOOT).unwrap();
    let written = vm.marker_values(FS_WRITTEN_MARKER);
    let read = vm.marker_values(FS_READ_MARKER);
    assert_eq!(written.len(), 1, "{}", vm.logs());
    assert_eq!(read, written, "{}", vm.logs());
    assert_eq!(vm.find_lines(REBOOT_MARKER).len(), 1, "{}", vm.logs());
    // The ext2 superblock's magic (0xEF53 at 1024 + 56) is in the file.
    let image = disk.read();
    assert_eq!(
        &image[1080..1082],
        &[0x53, 0xef],
        "no ext2 superblock in the image"
    );
    eprintln!(
        "blk-fs: written after {t_written:?}, read back after the reboot after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}
