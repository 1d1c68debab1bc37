//! End-to-end: real QEMU guests (TCG) with a virtio-blk disk served by
//! vioswitch over vhost-user (`-device vhost-user-blk-pci`).
//!
//! The guest reads a known image and its checksum matches the host's;
//! writes a range with fsync and the host sees it in the backing file; makes
//! an ext2 filesystem, writes a file, reboots and reads it back. The same
//! jobs are proven against `qemu-storage-daemon` by `qemu_infra`: when that
//! passes and this fails, look at the switch.
//!
//! One guest at a time (a lock: 2 cores); deadlines only bound a hang.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use vioswitch_testkit::qemu::{
    one_at_a_time, payload, sha256_file_range, sha256_hex, BlkJob, DiskAttach, GuestConfig,
    GuestImage, GuestResult, Pattern, QemuGuest, BLK_SUM_MARKER, BLK_WRITTEN_MARKER,
    FS_READ_MARKER, FS_WRITTEN_MARKER, REBOOT_MARKER,
};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

const BOOT: Duration = Duration::from_secs(120);
const JOB: Duration = Duration::from_secs(300);

fn image() -> GuestImage {
    GuestImage::ensure().expect("guest image (scripts/guest-kernel.sh)")
}

/// A switch serving one disk on an image of its own.
struct SwitchDisk {
    sw: SwitchProcess,
    image: PathBuf,
    socket: PathBuf,
}

impl SwitchDisk {
    /// An image of `len` bytes (`content`, then zeros) served as disk `d0`.
    fn new(len: u64, content: &[u8], extra: serde_json::Value) -> SwitchDisk {
        let mut sw =
            SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
        let image = sw.run_dir().join("disk.img");
        std::fs::write(&image, content).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(len)
            .unwrap();
        let mut args = json!({ "name": "d0", "path": image });
        if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        let info = sw.call("disk.add", args).expect("disk.add");
        let socket = PathBuf::from(
            info["socket"]
                .as_str()
                .expect("socket in disk.add's answer"),
        );
        SwitchDisk { sw, image, socket }
    }

    fn disk(&self) -> DiskAttach {
        DiskAttach::new(&self.socket)
    }

    /// Boot a guest on the disk running `job`; its first result must be ok.
    fn run(&mut self, img: &GuestImage, name: &str, job: &BlkJob) -> (QemuGuest, GuestResult) {
        let mut vm = QemuGuest::spawn(img, GuestConfig::blk(name, self.disk(), job)).unwrap();
        let r = vm.result(JOB).unwrap();
        assert!(r.ok, "{}\n{}\n{}", r.line, vm.logs(), self.sw.log_text());
        (vm, r)
    }

    fn stats(&mut self) -> serde_json::Value {
        self.sw
            .call("disk.stats", json!({ "name": "d0" }))
            .expect("disk.stats")
    }
}

#[test]
fn guest_reads_a_known_image_through_the_switch() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 16 << 20;
    let content = payload(LEN as usize);
    let expected = sha256_hex(&content).unwrap();
    let mut d = SwitchDisk::new(LEN, &content, json!({ "readonly": true }));
    let t0 = Instant::now();
    let (mut vm, r) = d.run(&img, "blk-sum", &BlkJob::Sum { bytes: None });
    assert_eq!(r.get("size"), Some(LEN.to_string().as_str()), "{}", r.line);
    assert_eq!(
        vm.marker_values(BLK_SUM_MARKER),
        vec![expected],
        "{}",
        vm.logs()
    );
    vm.wait_exit(BOOT).unwrap();
    let s = d.stats();
    assert!(s["bytes"]["read"].as_u64().unwrap() >= LEN, "{s}");
    assert_eq!(s["ops"]["write"], 0, "{s}");
    let errors: u64 = s["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(errors, 0, "{s}");
    eprintln!(
        "blk-sum of 16 MiB via vioswitch after {:?}: {}",
        t0.elapsed(),
        r.details
    );
}

#[test]
fn guest_write_with_fsync_lands_in_the_backing_file() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 8 << 20;
    // Neither the offset nor the length is a multiple of the sector size.
    const OFFSET: u64 = 1_000_001;
    const BYTES: u64 = 300_007;
    let before = payload(LEN as usize);
    let mut d = SwitchDisk::new(LEN, &before, json!({}));
    let job = BlkJob::Write {
        offset: OFFSET,
        bytes: BYTES,
        pattern: Pattern::Random,
    };
    let (mut vm, r) = d.run(&img, "blk-write", &job);
    let written = vm.marker_values(BLK_WRITTEN_MARKER);
    assert_eq!(written.len(), 1, "{}", vm.logs());
    assert_eq!(r.get("sha256"), Some(written[0].as_str()));
    vm.wait_exit(BOOT).unwrap();
    // The guest's fsync returned: the data is in the file.
    let on_host = sha256_file_range(&d.image, OFFSET, BYTES).unwrap();
    assert_eq!(on_host, written[0], "the range in the backing file");
    let after = std::fs::read(&d.image).unwrap();
    let (o, e) = (OFFSET as usize, (OFFSET + BYTES) as usize);
    assert!(after[..o] == before[..o], "bytes before the range changed");
    assert!(after[e..] == before[e..], "bytes after the range changed");
    let s = d.stats();
    assert!(
        s["ops"]["flush"].as_u64().unwrap() >= 1,
        "fsync sends a FLUSH: {s}"
    );
}

#[test]
fn guest_filesystem_survives_a_guest_reboot() {
    let _g = one_at_a_time();
    let img = image();
    const LEN: u64 = 32 << 20;
    let mut d = SwitchDisk::new(LEN, &[], json!({ "queues": 1 }));
    let job = BlkJob::Fs {
        bytes: 1 << 20,
        pattern: Pattern::Random,
    };
    let (mut vm, w) = d.run(&img, "blk-fs", &job);
    assert_eq!(w.get("phase"), Some("write"), "{}", w.line);
    let r = vm.result_nth(2, JOB).unwrap();
    assert!(r.ok, "{}\n{}\n{}", r.line, vm.logs(), d.sw.log_text());
    assert_eq!(r.get("phase"), Some("read"), "{}", r.line);
    vm.wait_exit(BOOT).unwrap();
    let written = vm.marker_values(FS_WRITTEN_MARKER);
    assert_eq!(written.len(), 1, "{}", vm.logs());
    assert_eq!(vm.marker_values(FS_READ_MARKER), written, "{}", vm.logs());
    assert_eq!(vm.find_lines(REBOOT_MARKER).len(), 1, "{}", vm.logs());
    let image = std::fs::read(&d.image).unwrap();
    assert_eq!(
        &image[1080..1082],
        &[0x53, 0xef],
        "no ext2 superblock in the image"
    );
    let s = d.stats();
    assert_eq!(s["broken"], false, "{s}");
    assert_eq!(
        d.sw.call("disk.show", json!({ "name": "d0" })).unwrap()["connections"],
        1,
        "the guest's reboot resets the device on the same connection"
    );
}
