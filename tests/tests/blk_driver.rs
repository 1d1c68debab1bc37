//! The virtio-blk guest driver against a reference backend: QEMU's
//! `qemu-storage-daemon` exporting a raw temp file as vhost-user-blk.
//!
//! These tests need `qemu-storage-daemon` (Debian: qemu-system-common, pulled
//! in by qemu-system-x86); without it they fail and say so. Deadlines only
//! bound a hang.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vioswitch_testkit::guest::blk::*;
use vioswitch_testkit::guest::ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vioswitch_testkit::guest::{BlkGuest, BlkGuestConfig, BlkRequest, GuestError, Segment};

const QSD: &str = "qemu-storage-daemon";
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A qemu-storage-daemon exporting a fresh raw image of its own; killed on
/// drop.
struct Qsd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    qmp: PathBuf,
}

impl Qsd {
    /// Export an image of `size` bytes with `num_queues` queues.
    fn start(size: u64, num_queues: u16) -> Qsd {
        let dir = vioswitch_testkit::temp_dir("blkdrv").unwrap();
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(size))
            .unwrap();
        let sock = dir.join("blk.sock");
        let qmp = dir.join("qmp.sock");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},cache.direct=off",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={num_queues},logical-block-size=512",
                sock.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=m")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {QSD}: {e}. These tests need QEMU's storage daemon \
                     (Debian/Ubuntu: apt-get install qemu-system-common, which \
                     qemu-system-x86 pulls in)"
                )
            });
        Qsd {
            child,
            dir,
            sock,
            qmp,
        }
    }

    fn guest(&self, cfg: BlkGuestConfig) -> BlkGuest {
        BlkGuest::connect(&self.sock, cfg).expect("connect to qemu-storage-daemon")
    }

    /// Run one QMP command and return its `return` value.
    fn qmp(&self, cmd: serde_json::Value) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        let s = loop {
            match UnixStream::connect(&self.qmp) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("QMP socket {}: {e}", self.qmp.display()),
            }
        };
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut reply = |w: &mut UnixStream, msg: Option<&serde_json::Value>| {
            if let Some(m) = msg {
                writeln!(w, "{m}").unwrap();
            }
            loop {
                let mut line = String::new();
                assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v.get("event").is_none() {
                    return v;
                }
            }
        };
        reply(&mut w, None); // greeting
        reply(
            &mut w,
            Some(&serde_json::json!({"execute": "qmp_capabilities"})),
        );
        let v = reply(&mut w, Some(&cmd));
        match v.get("return") {
            Some(r) => r.clone(),
            None => panic!("QMP {cmd} failed: {v}"),
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn ok(r: Result<BlkResult, GuestError>, what: &str) -> BlkResult {
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.status, VIRTIO_BLK_S_OK, "{what}: status");
    r
}

#[test]
fn negotiation_and_config() {
    let qsd = Qsd::start(16 * MIB, 2);
    let g = qsd.guest(BlkGuestConfig::default());
    eprintln!(
        "qsd: features {:#x}, protocol features {:?}, config {:?}",
        g.features(),
        g.protocol_features(),
        g.config()
    );
    assert!(g.has_feature(VIRTIO_F_VERSION_1));
    let c = g.config();
    assert_eq!(c.capacity, 16 * MIB / SECTOR_SIZE);
    if g.has_feature(VIRTIO_BLK_F_BLK_SIZE) {
        assert_eq!(c.blk_size, 512);
    }
    if g.has_feature(VIRTIO_BLK_F_MQ) {
        assert_eq!(c.num_queues, 2);
    }
    assert!(!g.has_feature(VIRTIO_BLK_F_RO), "export is writable");
    assert!(!g.has_feature(64));

    // Masked features are not negotiated.
    drop(g);
    let mask = 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_BLK_F_DISCARD;
    let mut g = qsd.guest(BlkGuestConfig {
        mask_features: mask,
        ..Default::default()
    });
    assert_eq!(g.features() & mask, 0);
    // Without EVENT_IDX the rings still work.
    ok(g.write(0, &pattern(4096, 1)), "write without EVENT_IDX");
    assert_eq!(ok(g.read(0, 4096), "read").data, pattern(4096, 1));
    assert_eq!(g.device_errors(), 0);
}

#[test]
fn write_read_back_sizes_and_segments() {
    let qsd = Qsd::start(64 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig::default());
    // One segment, several segments of the guest's segment size, odd sizes.
    let mut sector = 0;
    for (i, len) in [512usize, 4096, 65536, 200 * 1024, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u8);
        let w = ok(g.write(sector, &data), "write");
        assert_eq!(w.used_len, 1, "a write returns only the status byte");
        let r = ok(g.read(sector, len as u32), "read");
        assert_eq!(r.data, data, "{len} bytes at sector {sector}");
        assert_eq!(r.used_len as usize, len + 1);
        sector += len as u64 / SECTOR_SIZE + 8;
    }

    // Segments of any sizes (multiples of 512 in total), in both directions.
    let data = pattern(3 * 4096, 99);
    let segs: [&[u8]; 4] = [
        &data[..512],
        &data[512..4096],
        &data[4096..4097],
        &data[4097..],
    ];
    let t = g
        .submit(0, &BlkRequest::write_segments(5000, &segs))
        .unwrap();
    let c = g.wait_completions(0, 1, WAIT).unwrap();
    assert_eq!(
        (c.len(), c[0].tag, c[0].result.status),
        (1, t, VIRTIO_BLK_S_OK)
    );
    let t = g
        .submit(0, &BlkRequest::read_segments(5000, &[1, 511, 8000, 3776]))
        .unwrap();
    let c = g.wait_completions(0, 1, WAIT).unwrap();
    assert_eq!((c[0].tag, c[0].result.status), (t, VIRTIO_BLK_S_OK));
    assert_eq!(c[0].result.data, data);

    // A segment larger than a descriptor buffer is refused by the driver.
    let too_big = BlkRequest::read(0, g.segment_size() + 512);
    assert!(matches!(
        g.submit(0, &too_big),
        Err(GuestError::SegmentTooLarge { .. })
    ));
    assert!(matches!(
        g.submit(7, &BlkRequest::flush()),
        Err(GuestError::NoQueue(7))
    ));
    assert_eq!(g.device_errors(), 0);
}

#[test]
fn flush_get_id_discard_write_zeroes_writeback() {
    let qsd = Qsd::start(16 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig::default());
    if g.has_feature(VIRTIO_BLK_F_FLUSH) {
        let f = ok(g.flush(), "flush");
        assert_eq!(f.used_len, 1);
    }

    let id = g.get_id().unwrap();
    eprintln!("GET_ID: status {} data {:?}", id.status, id.data);
    assert!(
        id.status == VIRTIO_BLK_S_OK || id.status == VIRTIO_BLK_S_UNSUPP,
        "GET_ID status {}",
        id.status
    );
    assert_eq!(id.data.len(), BLK_ID_BYTES);

    // An unknown request type is reported as unsupported.
    let r = g
        .run(
            0,
            &BlkRequest {
                kind: 0x77,
                sector: 0,
                segments: vec![],
            },
        )
        .unwrap();
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP);

    let c = g.config();
    let data = pattern(64 * 1024, 7);
    if g.has_feature(VIRTIO_BLK_F_WRITE_ZEROES) {
        eprintln!(
            "write-zeroes: max {} sectors, {} segs, may unmap {}",
            c.max_write_zeroes_sectors, c.max_write_zeroes_seg, c.write_zeroes_may_unmap
        );
        ok(g.write(100, &data), "write");
        ok(g.write_zeroes(&[(108, 16, false)]), "write-zeroes");
        let r = ok(g.read(100, data.len() as u32), "read");
        let mut want = data.clone();
        want[8 * 512..24 * 512].fill(0);
        assert_eq!(r.data, want);
        ok(g.write_zeroes(&[(100, 8, true)]), "write-zeroes with unmap");
        let r = ok(g.read(100, 4096), "read");
        assert_eq!(r.data, vec![0; 4096]);
    }
    if g.has_feature(VIRTIO_BLK_F_DISCARD) {
        eprintln!(
            "discard: max {} sectors, {} segs, alignment {}",
            c.max_discard_sectors, c.max_discard_seg, c.discard_sector_alignment
        );
        ok(g.write(1000, &data), "write");
        // Discarded contents are unspecified; only the status is checked.
        ok(g.discard(&[(1000, 64)]), "discard");
        // Beyond the end of the disk.
        let r = g.discard(&[(c.capacity, 8)]).unwrap();
        assert_eq!(r.status, VIRTIO_BLK_S_IOERR, "discard past the end");
    }

    if g.has_feature(VIRTIO_BLK_F_CONFIG_WCE) {
        assert_eq!(g.set_writeback(false).unwrap().writeback, 0);
        assert_eq!(g.config().writeback, 0);
        assert_eq!(g.set_writeback(true).unwrap().writeback, 1);
    }

    // Reads and writes past the end fail with IOERR.
    let r = g.read(c.capacity, 512).unwrap();
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    let r = g.write(c.capacity - 1, &[0; 1024]).unwrap();
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR);
    assert_eq!(g.device_errors(), 0);
}

/// Submit `n` writes of 4 KiB (one per 8 sectors from `base`) on `queue`,
/// then `n` reads of them, all in flight at once; check every completion.
fn depth_round(g: &mut BlkGuest, queue: usize, n: usize, base: u64, seed: u8) {
    let mut tags = Vec::new();
    for i in 0..n {
        let data = pattern(4096, seed.wrapping_add(i as u8));
        // Split unevenly so chains differ in length.
        let req = BlkRequest::write(base + 8 * i as u64, &data).split(512 << (i % 4));
        tags.push(g.submit(queue, &req).unwrap());
    }
    assert_eq!(g.in_flight(queue), n);
    let done = g.wait_completions(queue, n, WAIT).unwrap();
    assert_eq!(done.len(), n);
    for c in &done {
        assert!(tags.contains(&c.tag));
        assert_eq!(c.result.status, VIRTIO_BLK_S_OK, "write {}", c.tag);
    }
    let mut reads = std::collections::HashMap::new();
    for i in 0..n {
        let t = g
            .submit(queue, &BlkRequest::read(base + 8 * i as u64, 4096))
            .unwrap();
        reads.insert(t, i);
    }
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < n && Instant::now() < deadline {
        for c in g.wait_completions(queue, 1, WAIT).unwrap() {
            let i = reads.remove(&c.tag).expect("known tag, completed once");
            assert_eq!(c.result.status, VIRTIO_BLK_S_OK);
            assert_eq!(c.result.data, pattern(4096, seed.wrapping_add(i as u8)));
            got += 1;
        }
    }
    assert_eq!(got, n);
    assert_eq!(g.in_flight(queue), 0);
}

#[test]
fn thirty_two_in_flight_on_one_queue() {
    let qsd = Qsd::start(16 * MIB, 1);
    // Chains of up to 10 descriptors: 32 of them need more than 128.
    let mut g = qsd.guest(BlkGuestConfig {
        queue_size: 512,
        segment_size: 4096,
        ..Default::default()
    });
    depth_round(&mut g, 0, 32, 0, 1);
    // Again, so that ring indices and descriptors are reused.
    depth_round(&mut g, 0, 32, 0, 50);
    assert_eq!(g.device_errors(), 0);
}

#[test]
fn two_queues() {
    let qsd = Qsd::start(16 * MIB, 2);
    let mut g = qsd.guest(BlkGuestConfig {
        queues: 2,
        segment_size: 4096,
        ..Default::default()
    });
    assert_eq!(g.queues(), 2);
    // Both queues busy at once: submit on 1 before waiting on 0.
    let req = BlkRequest::write(4096, &pattern(8192, 3)).split(4096);
    let t1 = g.submit(1, &req).unwrap();
    depth_round(&mut g, 0, 16, 0, 9);
    let c = g.wait_completions(1, 1, WAIT).unwrap();
    assert_eq!((c[0].tag, c[0].result.status), (t1, VIRTIO_BLK_S_OK));
    depth_round(&mut g, 1, 16, 2048, 77);
    // Data written through one queue reads back through the other.
    let t = g
        .submit(0, &BlkRequest::read_segments(4096, &[4096, 4096]))
        .unwrap();
    let c = g.wait_completions(0, 1, WAIT).unwrap();
    assert_eq!(c[0].tag, t);
    assert_eq!(c[0].result.data, pattern(8192, 3));
    assert_eq!(g.device_errors(), 0);

    // More queues than the export has are refused at connect.
    drop(g);
    let e = BlkGuest::connect(
        &qsd.sock,
        BlkGuestConfig {
            queues: 3,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, GuestError::Unsupported(_)), "{e}");
}

/// qemu-storage-daemon sends the config-change notice from inside
/// `block_resize` (QEMU 8.0 and later), so when the command returns, either
/// the config space already shows the new capacity and the notice is on its
/// way, or the daemon does not support resize notices at all (QEMU 7.2: the
/// export keeps the capacity it started with).
#[test]
fn resize_is_a_config_change() {
    let qsd = Qsd::start(8 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig::default());
    assert_eq!(g.config().capacity, 8 * MIB / SECTOR_SIZE);
    assert!(!g.wait_config_change(Duration::ZERO).unwrap());
    qsd.qmp(serde_json::json!({
        "execute": "block_resize",
        "arguments": {"node-name": "f0", "size": 24 * MIB},
    }));
    let c = g.reread_config().unwrap();
    if c.capacity == 8 * MIB / SECTOR_SIZE {
        eprintln!(
            "{QSD} does not update its export on resize (QEMU < 8.0); \
             the config-change path is covered by the driver's unit tests"
        );
        assert_eq!(g.pending_config_changes(), 0);
        return;
    }
    assert_eq!(c.capacity, 24 * MIB / SECTOR_SIZE);
    assert!(
        g.wait_config_change(WAIT).unwrap(),
        "no config change after block_resize"
    );
    assert_eq!(g.reread_config().unwrap(), c);
    // The new space is usable.
    let data = pattern(4096, 5);
    ok(g.write(c.capacity - 8, &data), "write at the new end");
    assert_eq!(ok(g.read(c.capacity - 8, 4096), "read").data, data);
}

#[test]
fn no_backend_channel_when_not_asked() {
    let qsd = Qsd::start(8 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig {
        backend_req: false,
        ..Default::default()
    });
    assert!(!g
        .protocol_features()
        .contains(vhost::vhost_user::VhostUserProtocolFeatures::BACKEND_REQ));
    assert!(matches!(
        g.wait_config_change(Duration::ZERO),
        Err(GuestError::Unsupported(_))
    ));
}

/// Write a raw request on queue 0: a header of `hdr_len` bytes, optional
/// data (`data_len` bytes with `data_flags`), and a status byte with
/// `status_flags`. Returns the status byte's address (preset to 0xff).
fn raw_request(
    g: &mut BlkGuest,
    kind: u32,
    hdr_len: u32,
    data: Option<(u32, u16)>,
    status_flags: u16,
) -> u64 {
    let mut q = g.raw_queue(0).unwrap();
    let n = if data.is_some() { 3 } else { 2 };
    let ids = q.alloc_chain(n).unwrap();
    let hdr = q.scratch(16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    q.memory().write(hdr, &h).unwrap();
    let status = q.scratch(1);
    q.memory().write(status, &[STATUS_UNWRITTEN]).unwrap();
    q.write_desc(ids[0], hdr, hdr_len, VRING_DESC_F_NEXT, ids[1]);
    if let Some((len, flags)) = data {
        let buf = q.scratch(len as usize);
        q.write_desc(ids[1], buf, len, flags | VRING_DESC_F_NEXT, ids[2]);
    }
    q.write_desc(ids[n as usize - 1], status, 1, status_flags, 0);
    q.push_avail(ids[0]);
    q.publish();
    q.kick();
    status
}

#[test]
fn raw_requests() {
    let qsd = Qsd::start(8 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig::default());
    let status_of = |g: &BlkGuest, at: u64| g.memory().read_vec(at, 1).unwrap()[0];

    // A read whose length is not a multiple of 512.
    let st = raw_request(
        &mut g,
        VIRTIO_BLK_T_IN,
        16,
        Some((700, VRING_DESC_F_WRITE)),
        VRING_DESC_F_WRITE,
    );
    let (_, len) = g.wait_raw_used(0, WAIT).unwrap();
    eprintln!(
        "700-byte read: used len {len}, status {}",
        status_of(&g, st)
    );
    assert_eq!(status_of(&g, st), VIRTIO_BLK_S_IOERR);

    // A write whose data buffer is device-writable (wrong direction): the
    // driver builds it, the status is whatever the device says.
    let wrong = BlkRequest {
        kind: VIRTIO_BLK_T_OUT,
        sector: 0,
        segments: vec![Segment::FromDevice(512)],
    };
    let r = g.run(0, &wrong).unwrap();
    eprintln!(
        "write with a writable data buffer: used len {}, status {}",
        r.used_len, r.status
    );
    assert_ne!(r.status, STATUS_UNWRITTEN);

    // Malformed chains: a 10-byte header, and a read-only status byte. QEMU
    // 7.2's daemon logs and drops them (no used entry), so the wait only
    // bounds how long the outcome is watched for.
    for (what, kind, hdr_len, data, status_flags) in [
        (
            "10-byte header",
            VIRTIO_BLK_T_IN,
            10,
            Some((512, VRING_DESC_F_WRITE)),
            VRING_DESC_F_WRITE,
        ),
        ("read-only status byte", VIRTIO_BLK_T_FLUSH, 16, None, 0),
    ] {
        let st = raw_request(&mut g, kind, hdr_len, data, status_flags);
        let used = g.wait_raw_used(0, Duration::from_secs(2));
        eprintln!("{what}: {used:?}, status byte {}", status_of(&g, st));
        if status_flags == 0 {
            assert_eq!(
                status_of(&g, st),
                STATUS_UNWRITTEN,
                "device wrote a read-only byte"
            );
        }
    }

    // The device still serves ordinary requests.
    ok(g.write(0, &pattern(4096, 2)), "write after raw requests");
    assert_eq!(ok(g.read(0, 4096), "read").data, pattern(4096, 2));
}

#[test]
fn vring_base_and_reconnect() {
    let qsd = Qsd::start(8 * MIB, 1);
    let mut g = qsd.guest(BlkGuestConfig::default());
    for i in 0..5u8 {
        ok(g.write(u64::from(i) * 8, &pattern(4096, i)), "write");
    }
    // Five requests were taken from the ring.
    assert_eq!(g.get_vring_base(0).unwrap(), 5);
    g.disconnect();
    // The daemon takes the next connection, and the data is there.
    let mut g = qsd.guest(BlkGuestConfig::default());
    for i in 0..5u8 {
        let r = ok(g.read(u64::from(i) * 8, 4096), "read after reconnect");
        assert_eq!(r.data, pattern(4096, i));
    }
}

#[test]
fn missing_socket_is_a_connect_error() {
    let dir = vioswitch_testkit::temp_dir("blkdrv-nosock").unwrap();
    let e = BlkGuest::from_stream(
        UnixStream::pair().unwrap().0,
        BlkGuestConfig {
            queues: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, GuestError::InvalidConfig(_)), "{e}");
    // A path that is not a socket fails at once, not after the retry window.
    let file = dir.join("plain");
    std::fs::write(&file, b"").unwrap();
    let e = BlkGuest::connect(Path::new(&file), BlkGuestConfig::default()).unwrap_err();
    assert!(matches!(e, GuestError::Connect { .. }), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
