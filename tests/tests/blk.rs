//! vioswitch's disks through the project's own virtio-blk guest driver:
//! data round trips checked against the backing file, flush and the write
//! cache, discard and write-zeroes, GET_ID, config space, queue depth and
//! multi-queue, disks and net ports sharing one worker, resize, worker
//! moves under load, both I/O engines, direct I/O, and reconnects.
//!
//! Every test runs its own switch in the adaptive polling mode. Nothing is
//! timed: waits are bounded only to catch a hang.

mod blk_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use blk_common::*;
use serde_json::json;
use vioswitch_testkit::frames::{counters, frame, mac, plug, recv_n, send_all, small_config};
use vioswitch_testkit::frames::{tag as frame_tag, wait_until};
use vioswitch_testkit::guest::blk::*;
use vioswitch_testkit::guest::ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vioswitch_testkit::guest::{BlkGuest, BlkGuestConfig, BlkRequest, NetGuest};

/// Which I/O engine a switch runs disks with.
#[derive(Debug, Clone, Copy)]
enum Engine {
    /// The default: io_uring where the kernel allows it.
    Auto,
    /// `--io-engine threads`.
    Threads,
}

impl Engine {
    fn rig(self, workers: usize) -> Rig {
        match self {
            Engine::Auto => Rig::new(workers, &[]),
            Engine::Threads => Rig::new(workers, &["--io-engine", "threads"]),
        }
    }
}

/// The bytes a request reads or writes: `data` split into the segment
/// lengths `cuts` (the last one takes the rest).
fn segments<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts {
        out.push(&data[at..at + c]);
        at += c;
    }
    out.push(&data[at..]);
    out
}

/// Write `data` at `sector` and keep `model` (the expected image) in step.
fn write_model(g: &mut BlkGuest, model: &mut [u8], sector: u64, data: &[u8], what: &str) {
    let r = ok(g.write(sector, data), what);
    assert_eq!(
        r.used_len, 1,
        "{what}: a write returns only the status byte"
    );
    let at = (sector * SECTOR_SIZE) as usize;
    model[at..at + data.len()].copy_from_slice(data);
}

// --- 1, 10: round trip -----------------------------------------------------

fn round_trip(engine: Engine) {
    const SIZE: u64 = 8 * MIB;
    let mut rig = engine.rig(1);
    let d = rig.add_disk("d0", SIZE, json!({}));
    let mut g = guest(&d, BlkGuestConfig::default());
    let mut model = background(SIZE as usize);
    let (mut wrote, mut read, mut writes, mut reads) = (0u64, 0u64, 0u64, 0u64);

    // One size after another, each followed by untouched sectors.
    let mut sector = 1;
    for (i, len) in [512usize, 1024, 4096, 65536, 200 * 1024, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u64);
        write_model(&mut g, &mut model, sector, &data, &format!("write {len}"));
        let r = ok(g.read(sector, len as u32), "read");
        assert_same(&r.data, &data, &format!("{len} bytes read back"));
        assert_eq!(r.used_len as usize, len + 1, "read used length");
        assert_same(
            &file_bytes(&d.path, sector * SECTOR_SIZE, len),
            &data,
            &format!("{len} bytes in the backing file"),
        );
        (wrote, read, writes, reads) =
            (wrote + len as u64, read + len as u64, writes + 1, reads + 1);
        sector += len as u64 / SECTOR_SIZE + 3;
    }

    // Segments cut at odd places, both ways: the request is whole sectors,
    // its descriptors are not.
    let data = pattern(5 * 4096 + 512, 77);
    for (k, cuts) in [
        vec![512, 3584, 1, 4095],
        vec![1, 511, 8000, 3776, 7],
        vec![13, 13, 13, 13, 4096 * 3],
    ]
    .into_iter()
    .enumerate()
    {
        let at = 9000 + 100 * k as u64;
        let w = BlkRequest::write_segments(at, &segments(&data, &cuts));
        let r = ok(g.run(0, &w), "multi-segment write");
        assert_eq!(r.used_len, 1);
        let o = (at * SECTOR_SIZE) as usize;
        model[o..o + data.len()].copy_from_slice(&data);
        let mut lens: Vec<u32> = cuts.iter().map(|&c| c as u32).collect();
        lens.push((data.len() - cuts.iter().sum::<usize>()) as u32);
        let r = ok(
            g.run(0, &BlkRequest::read_segments(at, &lens)),
            "multi-segment read",
        );
        assert_same(&r.data, &data, &format!("segments {cuts:?}"));
        wrote += data.len() as u64;
        read += data.len() as u64;
        writes += 1;
        reads += 1;
    }

    // The whole image: what was written, and nothing else changed.
    assert_same(
        &std::fs::read(&d.path).unwrap(),
        &model,
        "backing file against the writes",
    );
    let s = rig.stats("d0");
    assert_eq!(
        (
            s.op("write"),
            s.bytes("write"),
            s.op("read"),
            s.bytes("read")
        ),
        (writes, wrote, reads, read),
        "{s:?}"
    );
    for k in ["flush", "discard", "write_zeroes", "get_id"] {
        assert_eq!(s.op(k), 0, "{k}: {s:?}");
    }
    assert!(s.nonzero_errors().is_empty(), "{s:?}");
    assert_eq!((s.in_flight, s.broken), (0, false));
    assert_eq!(g.device_errors(), 0);
}

#[test]
fn round_trip_sizes_and_segments_match_the_backing_file() {
    round_trip(Engine::Auto);
}

#[test]
fn round_trip_with_the_thread_pool_engine() {
    round_trip(Engine::Threads);
}

// --- 2: flush and write cache ---------------------------------------------

#[test]
fn flush_and_write_cache_toggle() {
    let mut rig = Rig::new(1, &[]);
    let d = rig.add_disk("d0", 4 * MIB, json!({}));
    let mut g = guest(&d, BlkGuestConfig::default());
    assert!(g.has_feature(VIRTIO_BLK_F_FLUSH) && g.has_feature(VIRTIO_BLK_F_CONFIG_WCE));
    assert_eq!(g.config().writeback, 1);
    assert_eq!(rig.show("d0")["write_through"], false);

    ok(g.write(0, &pattern(4096, 1)), "write");
    let f = ok(g.flush(), "flush");
    assert_eq!(f.used_len, 1);
    assert_same(
        &file_bytes(&d.path, 0, 4096),
        &pattern(4096, 1),
        "flushed data",
    );

    // Write cache off: every write is durable when acknowledged.
    assert_eq!(g.set_writeback(false).unwrap().writeback, 0);
    assert_eq!(rig.show("d0")["write_through"], true);
    for i in 0..4u64 {
        ok(
            g.write(64 + 8 * i, &pattern(4096, 10 + i)),
            "write-through write",
        );
    }
    for i in 0..4u64 {
        let r = ok(g.read(64 + 8 * i, 4096), "read");
        assert_same(&r.data, &pattern(4096, 10 + i), "write-through data");
        assert_same(
            &file_bytes(&d.path, (64 + 8 * i) * SECTOR_SIZE, 4096),
            &pattern(4096, 10 + i),
            "write-through data in the file",
        );
    }
    ok(g.flush(), "flush with the cache off");

    assert_eq!(g.set_writeback(true).unwrap().writeback, 1);
    assert_eq!(rig.show("d0")["write_through"], false);
    ok(g.write(200, &pattern(512, 3)), "write-back write");
    ok(g.flush(), "flush");

    let s = rig.stats("d0");
    assert_eq!((s.op("flush"), s.op("write")), (3, 6), "{s:?}");
    assert_eq!(s.bytes("write"), 5 * 4096 + 512);
    assert!(s.nonzero_errors().is_empty(), "{s:?}");

    // A new connection starts with the cache on again.
    g.disconnect();
    let g = guest(&d, BlkGuestConfig::default());
    assert_eq!(g.config().writeback, 1);
    assert_eq!(rig.show("d0")["write_through"], false);
}

// --- 3: discard and write-zeroes -------------------------------------------

/// Allocated bytes of a file (`st_blocks` is in 512-byte units).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn discard_punches_holes_and_write_zeroes_reads_back_zeroes() {
    const SIZE: u64 = 8 * MIB;
    let mut rig = Rig::new(1, &[]);
    let d = rig.add_disk("d0", SIZE, json!({}));
    let mut g = guest(&d, BlkGuestConfig::default());
    assert!(g.has_feature(VIRTIO_BLK_F_DISCARD) && g.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    let c = g.config();
    assert_eq!(
        (
            c.max_discard_seg,
            c.max_write_zeroes_seg,
            c.write_zeroes_may_unmap
        ),
        (32, 32, 1)
    );
    let mut model = background(SIZE as usize);
    let full = allocated(&d.path);
    assert!(full >= SIZE, "the image is fully allocated ({full} bytes)");
    let zero = |model: &mut [u8], sector: u64, sectors: u32| {
        let at = (sector * SECTOR_SIZE) as usize;
        model[at..at + sectors as usize * 512].fill(0);
    };
    let mb = (MIB / SECTOR_SIZE) as u32;

    // Discard 1 MiB at 1 MiB: a hole in the file.
    let r = ok(g.discard(&[(2048, mb)]), "discard");
    assert_eq!(r.used_len, 1);
    zero(&mut model, 2048, mb);
    assert_eq!(
        file_bytes(&d.path, MIB, MIB as usize),
        vec![0; MIB as usize]
    );
    let after_discard = allocated(&d.path);
    assert!(
        after_discard <= full - MIB,
        "discard freed no blocks: {full} -> {after_discard} bytes allocated"
    );

    // Write-zeroes without unmap: zeroes (the blocks may stay).
    let r = ok(g.write_zeroes(&[(8192, 16, false)]), "write-zeroes");
    assert_eq!(r.used_len, 1);
    zero(&mut model, 8192, 16);
    assert_eq!(ok(g.read(8192, 8192), "read").data, vec![0; 8192]);

    // Write-zeroes with unmap, two ranges in one request: zeroes, and the
    // blocks go.
    ok(
        g.write_zeroes(&[(10240, mb, true), (14336, 8, true)]),
        "write-zeroes with unmap",
    );
    zero(&mut model, 10240, mb);
    zero(&mut model, 14336, 8);
    assert_eq!(
        ok(g.read(10240, MIB as u32), "read").data,
        vec![0; MIB as usize]
    );
    assert!(
        allocated(&d.path) <= after_discard - MIB,
        "write-zeroes with unmap freed no blocks"
    );

    // Several discard ranges in one request, one of them empty.
    ok(
        g.discard(&[(100, 8), (300, 0), (1000, 24)]),
        "discard of 3 ranges",
    );
    zero(&mut model, 100, 8);
    zero(&mut model, 1000, 24);

    // Everything around the ranges is untouched, in the guest's view and in
    // the file's.
    for m in 0..4 {
        let at = m * MIB as usize;
        assert_same(
            &ok(g.read(at as u64 / SECTOR_SIZE, MIB as u32), "read").data,
            &model[at..at + MIB as usize],
            &format!("MiB {m} read back"),
        );
    }
    assert_same(&std::fs::read(&d.path).unwrap(), &model, "backing file");

    let s = rig.stats("d0");
    assert_eq!((s.op("discard"), s.op("write_zeroes")), (2, 2), "{s:?}");
    assert_eq!(s.bytes("discard"), MIB + 32 * 512, "{s:?}");
    assert_eq!(s.bytes("write_zeroes"), 16 * 512 + MIB + 8 * 512, "{s:?}");
    assert!(s.nonzero_errors().is_empty(), "{s:?}");
}

// --- 4: GET_ID ------------------------------------------------------------

#[test]
fn get_id_is_the_serial_padded_and_defaults_to_the_name() {
    let mut rig = Rig::new(1, &[]);
    let cases = [
        ("named", json!({"serial": "SN-0042"}), "SN-0042"),
        ("plain-disk", json!({}), "plain-disk"),
        (
            "full",
            json!({"serial": "ABCDEFGHIJ0123456789"}),
            "ABCDEFGHIJ0123456789",
        ),
    ];
    for (name, extra, serial) in cases {
        let d = rig.add_disk(name, MIB, extra);
        assert_eq!(rig.show(name)["serial"], serial);
        let mut g = guest(&d, BlkGuestConfig::default());
        let r = ok(g.get_id(), "GET_ID");
        let mut want = serial.as_bytes().to_vec();
        want.resize(BLK_ID_BYTES, 0);
        assert_eq!(r.data, want, "{name}");
        assert_eq!(r.used_len as usize, BLK_ID_BYTES + 1);
        // A larger buffer gets the 20 bytes and nothing more.
        let big = BlkRequest {
            kind: VIRTIO_BLK_T_GET_ID,
            sector: 0,
            segments: vec![vioswitch_testkit::guest::Segment::FromDevice(64)],
        };
        let r = ok(g.run(0, &big), "GET_ID into 64 bytes");
        assert_eq!(r.used_len as usize, BLK_ID_BYTES + 1);
        assert_eq!(&r.data[..BLK_ID_BYTES], &want[..]);
        let s = rig.stats(name);
        assert_eq!((s.op("get_id"), s.bytes("get_id")), (2, 40), "{s:?}");
    }
}

// --- 5: config space ------------------------------------------------------

#[test]
fn config_space_and_features() {
    let mut rig = Rig::new(1, &[]);
    let a = rig.add_disk("a", 3 * MIB, json!({"queues": 3, "queue_size": 16}));
    let b = rig.add_disk("b", 4 * MIB, json!({"block_size": 4096}));
    let ro = rig.add_disk("ro", MIB, json!({"readonly": true}));

    let g = guest(
        &a,
        BlkGuestConfig {
            queue_size: 16,
            ..Default::default()
        },
    );
    let c = g.config();
    assert_eq!(c.capacity, 3 * MIB / SECTOR_SIZE);
    assert_eq!(
        (c.blk_size, c.num_queues, c.seg_max, c.writeback),
        (512, 3, 14, 1)
    );
    assert_eq!((c.discard_sector_alignment, c.physical_block_exp), (1, 0));
    for f in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert!(g.has_feature(f), "disk a offers feature {f}");
    }
    assert!(!g.has_feature(VIRTIO_BLK_F_RO));
    let show = rig.show("a");
    assert_eq!(
        (show["queues"].as_u64(), show["queue_size"].as_u64()),
        (Some(3), Some(16))
    );

    let g = guest(&b, BlkGuestConfig::default());
    let c = g.config();
    assert_eq!(c.capacity, 4 * MIB / SECTOR_SIZE);
    assert_eq!((c.blk_size, c.num_queues, c.seg_max), (4096, 1, 62));
    assert_eq!(c.discard_sector_alignment, 8);
    assert!(!g.has_feature(VIRTIO_BLK_F_MQ));

    let mut g = guest(&ro, BlkGuestConfig::default());
    assert!(g.has_feature(VIRTIO_BLK_F_RO));
    assert!(!g.has_feature(VIRTIO_BLK_F_DISCARD));
    assert!(!g.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    assert_eq!(g.config().capacity, MIB / SECTOR_SIZE);
    assert_eq!(rig.show("ro")["readonly"], true);
    // It still reads, and flush is a harmless no-op.
    assert_same(
        &ok(g.read(0, 4096), "read").data,
        &background(4096),
        "read-only read",
    );
    ok(g.flush(), "flush on a read-only disk");
}

// --- 6: queue depth and multi-queue --------------------------------------

/// One request of a batch and what it must give back.
struct Job {
    queue: usize,
    req: BlkRequest,
    /// The data a read must return (None: a write).
    want: Option<Vec<u8>>,
}

impl Job {
    fn write(queue: usize, sector: u64, data: &[u8], split: u32) -> Job {
        Job {
            queue,
            req: BlkRequest::write(sector, data).split(split),
            want: None,
        }
    }

    fn read(queue: usize, sector: u64, want: Vec<u8>, split: u32) -> Job {
        Job {
            queue,
            req: BlkRequest::read(sector, want.len() as u32).split(split),
            want: Some(want),
        }
    }
}

/// Submit every job before waiting for any, then check each completion.
fn run_batch(g: &mut BlkGuest, jobs: Vec<Job>) {
    let mut pending: HashMap<(usize, u64), Option<Vec<u8>>> = HashMap::new();
    let mut per_queue = vec![0usize; g.queues()];
    for j in jobs {
        let tag = g
            .submit(j.queue, &j.req)
            .unwrap_or_else(|e| panic!("submit on queue {}: {e}", j.queue));
        pending.insert((j.queue, tag), j.want);
        per_queue[j.queue] += 1;
    }
    for (q, &n) in per_queue.iter().enumerate() {
        assert_eq!(g.in_flight(q), n, "queue {q}: requests in flight at once");
    }
    for (q, n) in per_queue.into_iter().enumerate() {
        let mut got = 0;
        while got < n {
            for c in g.wait_completions(q, 1, WAIT).unwrap() {
                let want = pending
                    .remove(&(q, c.tag))
                    .expect("a known tag, completed once");
                assert_eq!(c.result.status, VIRTIO_BLK_S_OK, "queue {q} tag {}", c.tag);
                if let Some(w) = want {
                    assert_same(
                        &c.result.data,
                        &w,
                        &format!("read, queue {q} tag {}", c.tag),
                    );
                }
                got += 1;
            }
        }
    }
    assert!(pending.is_empty());
}

/// `n` 4 KiB ranges per queue, 8 sectors apart from `base`: written all at
/// once, then half read while the other half is rewritten, then all read
/// back; every request of a phase is in flight at the same time.
fn depth_phases(
    g: &mut BlkGuest,
    queues: usize,
    n: usize,
    base: u64,
    seed: u64,
    varied: bool,
) -> Vec<(u64, Vec<u8>)> {
    let sector = |q: usize, i: usize| base + 8 * (q * n + i) as u64;
    let data =
        |q: usize, i: usize, gen: u64| pattern(4096, seed + gen * 10_000 + (q * n + i) as u64);
    // Chains of different lengths (1, 2, 4 or 8 data descriptors), or all
    // of one data descriptor when the ring is to hold as many as it can.
    let split = |i: usize| if varied { 512u32 << (i % 4) } else { 4096 };
    let all = |f: &dyn Fn(usize, usize) -> Job| -> Vec<Job> {
        (0..queues)
            .flat_map(|q| (0..n).map(move |i| (q, i)))
            .map(|(q, i)| f(q, i))
            .collect()
    };
    run_batch(
        g,
        all(&|q, i| Job::write(q, sector(q, i), &data(q, i, 0), split(i))),
    );
    run_batch(
        g,
        all(&|q, i| {
            if i % 2 == 0 {
                Job::read(q, sector(q, i), data(q, i, 0), split(i + 1))
            } else {
                Job::write(q, sector(q, i), &data(q, i, 1), split(i + 1))
            }
        }),
    );
    let now = |q: usize, i: usize| data(q, i, (i % 2) as u64);
    run_batch(g, all(&|q, i| Job::read(q, sector(q, i), now(q, i), 4096)));
    (0..queues)
        .flat_map(|q| (0..n).map(move |i| (q, i)))
        .map(|(q, i)| (sector(q, i), now(q, i)))
        .collect()
}

fn queue_depth(engine: Engine) {
    const SIZE: u64 = 16 * MIB;
    let mut rig = engine.rig(1);
    let d = rig.add_disk("d0", SIZE, json!({"queues": 4}));
    let cfg = BlkGuestConfig {
        queue_size: 256,
        segment_size: 4096,
        ..Default::default()
    };
    let mut g = guest(&d, cfg.clone());
    let mut model = background(SIZE as usize);
    let keep = |model: &mut Vec<u8>, written: Vec<(u64, Vec<u8>)>| {
        for (s, data) in written {
            let at = (s * SECTOR_SIZE) as usize;
            model[at..at + data.len()].copy_from_slice(&data);
        }
    };
    // 32 on one queue, twice so that ring positions and descriptors are reused.
    let w = depth_phases(&mut g, 1, 32, 0, 1, true);
    keep(&mut model, w);
    let w = depth_phases(&mut g, 1, 32, 512, 2, true);
    keep(&mut model, w);
    // As many as the ring holds: three descriptors per one-segment request.
    let full = usize::from(cfg.queue_size) / 3;
    let w = depth_phases(&mut g, 1, full, 1024, 3, false);
    keep(&mut model, w);
    g.disconnect();

    // Four queues busy at once.
    let mut g = guest(&d, BlkGuestConfig { queues: 4, ..cfg });
    let w = depth_phases(&mut g, 4, 32, 4096, 4, true);
    keep(&mut model, w);
    assert_eq!(g.device_errors(), 0);
    assert_same(&std::fs::read(&d.path).unwrap(), &model, "backing file");
    let s = rig.stats("d0");
    assert!(s.nonzero_errors().is_empty(), "{s:?}");
    assert_eq!(s.in_flight, 0);
}

#[test]
fn thirty_two_and_a_full_ring_in_flight_and_four_queues_at_once() {
    queue_depth(Engine::Auto);
}

#[test]
fn queue_depth_with_the_thread_pool_engine() {
    queue_depth(Engine::Threads);
}

// --- a steady stream of requests -------------------------------------------

/// Keeps `depth` requests in flight on one queue over `2 * depth` 4 KiB
/// ranges from `base`, alternating a write of fresh data and a read that
/// checks it on each range, until `go_on(completed)` says stop. Every
/// request must succeed with the right data. `progress` counts completions.
fn stream(
    g: &mut BlkGuest,
    depth: usize,
    base: u64,
    seed: u64,
    progress: &AtomicU64,
    mut go_on: impl FnMut(u64) -> bool,
) -> u64 {
    let ranges = 2 * depth;
    let mut content: Vec<Option<u64>> = vec![None; ranges];
    let mut busy = vec![false; ranges];
    let mut ops_on = vec![0u64; ranges];
    // tag -> (range, Some(seed written) | None for a read)
    let mut inflight: HashMap<u64, (usize, Option<u64>)> = HashMap::new();
    let (mut next, mut done, mut fresh) = (0usize, 0u64, seed);
    loop {
        while inflight.len() < depth && go_on(done) {
            while busy[next] {
                next = (next + 1) % ranges;
            }
            let r = next;
            next = (next + 1) % ranges;
            let sector = base + 8 * r as u64;
            let write = content[r].is_none() || ops_on[r] % 2 == 0;
            ops_on[r] += 1;
            let (req, w) = if write {
                fresh += 1;
                let split = 512u32 << (fresh % 4);
                (
                    BlkRequest::write(sector, &pattern(4096, fresh)).split(split),
                    Some(fresh),
                )
            } else {
                (BlkRequest::read(sector, 4096).split(2048), None)
            };
            let tag = g.submit(0, &req).unwrap_or_else(|e| panic!("submit: {e}"));
            busy[r] = true;
            inflight.insert(tag, (r, w));
        }
        if inflight.is_empty() {
            return done;
        }
        for c in g.wait_completions(0, 1, WAIT).unwrap_or_else(|e| {
            panic!(
                "{} requests still in flight after {done} completed: {e}",
                inflight.len()
            )
        }) {
            let (r, w) = inflight
                .remove(&c.tag)
                .expect("a known tag, completed once");
            assert_eq!(
                c.result.status, VIRTIO_BLK_S_OK,
                "request {} on range {r}",
                c.tag
            );
            match w {
                Some(s) => content[r] = Some(s),
                None => assert_same(
                    &c.result.data,
                    &pattern(4096, content[r].expect("read of a written range")),
                    &format!("range {r} after {done} completions"),
                ),
            }
            busy[r] = false;
            done += 1;
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn stream_guest(d: &TestDisk) -> BlkGuest {
    guest(
        d,
        BlkGuestConfig {
            queue_size: 256,
            segment_size: 4096,
            mem_size: 8 << 20,
            ..Default::default()
        },
    )
}

// --- 7: disks and net ports on one worker ---------------------------------

/// `n` numbered frames from `a` to `b` and as many back, in windows that
/// fit the receivers' rings; each must arrive in order, byte for byte.
fn exchange(a: &mut NetGuest, b: &mut NetGuest, n: u64, window: u64) {
    let f =
        |to: u32, from: u32, i: u64| frame(mac(to), mac(from), 60 + (i as usize * 37) % 1455, i);
    let mut i = 0;
    while i < n {
        let k = window.min(n - i);
        let ab: Vec<Vec<u8>> = (i..i + k).map(|t| f(2, 1, t)).collect();
        let ba: Vec<Vec<u8>> = (i..i + k).map(|t| f(1, 2, n + t)).collect();
        send_all(a, &ab);
        send_all(b, &ba);
        for (got, want) in recv_n(b, k as usize).iter().zip(&ab) {
            assert!(
                got == want,
                "frame {:?} a -> b, expected {:?}",
                frame_tag(got),
                frame_tag(want)
            );
        }
        for (got, want) in recv_n(a, k as usize).iter().zip(&ba) {
            assert!(
                got == want,
                "frame {:?} b -> a, expected {:?}",
                frame_tag(got),
                frame_tag(want)
            );
        }
        i += k;
    }
}

#[test]
fn two_disks_and_two_net_ports_share_one_worker() {
    const FRAMES: u64 = 3000;
    let mut rig = Rig::new(1, &[]);
    let disks = [
        rig.add_disk("d0", 4 * MIB, json!({})),
        rig.add_disk("d1", 4 * MIB, json!({})),
    ];
    let mut a = plug(&mut rig.sw, "a", small_config());
    let mut b = plug(&mut rig.sw, "b", small_config());
    let mut guests: Vec<BlkGuest> = disks.iter().map(stream_guest).collect();
    let stop = AtomicBool::new(false);
    let progress = [AtomicU64::new(0), AtomicU64::new(0)];
    let done: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = guests
            .iter_mut()
            .zip(&progress)
            .enumerate()
            .map(|(k, (g, p))| {
                let stop = &stop;
                // At least two full passes over the ranges, then until the
                // net exchange is over.
                s.spawn(move || {
                    stream(g, 8, 0, 1000 * k as u64, p, |n| {
                        n < 64 || !stop.load(Ordering::Relaxed)
                    })
                })
            })
            .collect();
        exchange(&mut a, &mut b, FRAMES, 48);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("disk stream"))
            .collect()
    });
    for n in ["a", "b"] {
        let c = counters(&mut rig.sw, n);
        assert_eq!((c.rx_packets, c.tx_packets), (FRAMES, FRAMES), "{n}: {c:?}");
        assert_eq!(c.total_drops(), 0, "{n}: {c:?}");
    }
    for (k, d) in disks.iter().enumerate() {
        let s = rig.stats(&d.name);
        assert!(done[k] >= 64);
        assert_eq!(s.op("read") + s.op("write"), done[k], "{}: {s:?}", d.name);
        assert!(s.nonzero_errors().is_empty(), "{}: {s:?}", d.name);
        assert_eq!(rig.show(&d.name)["worker"], 0);
    }
    for g in &guests {
        assert_eq!(g.device_errors(), 0);
    }
}

// --- 8: resize ------------------------------------------------------------

#[test]
fn resize_grows_the_disk_and_tells_the_guest() {
    let mut rig = Rig::new(1, &[]);
    let d = rig.add_disk("d0", 4 * MIB, json!({}));
    let mut g = guest(&d, BlkGuestConfig::default());
    assert_eq!(g.config().capacity, 4 * MIB / SECTOR_SIZE);
    assert!(!g.wait_config_change(std::time::Duration::ZERO).unwrap());
    let old_end = g.config().capacity;
    // Past the end before the resize.
    assert_eq!(g.read(old_end, 512).unwrap().status, VIRTIO_BLK_S_IOERR);

    let r = rig
        .sw
        .call("disk.resize", json!({"name": "d0", "size": 12 * MIB}))
        .expect("disk.resize");
    assert_eq!(r["size"], 12 * MIB);
    assert!(
        g.wait_config_change(WAIT).unwrap(),
        "no config change after disk.resize"
    );
    let c = g.reread_config().unwrap();
    assert_eq!(c.capacity, 12 * MIB / SECTOR_SIZE);
    assert_eq!(std::fs::metadata(&d.path).unwrap().len(), 12 * MIB);
    assert_eq!(rig.show("d0")["size"], 12 * MIB);

    // The new area works, at its start and at its very end.
    for (sector, seed) in [(old_end, 1), (c.capacity - 8, 2)] {
        ok(
            g.write(sector, &pattern(4096, seed)),
            "write in the new area",
        );
        assert_same(
            &ok(g.read(sector, 4096), "read").data,
            &pattern(4096, seed),
            "new area",
        );
        assert_same(
            &file_bytes(&d.path, sector * SECTOR_SIZE, 4096),
            &pattern(4096, seed),
            "new area in the file",
        );
    }
    // The old data is where it was, and the new end is an end.
    assert_same(
        &ok(g.read(0, 4096), "read").data,
        &background(4096),
        "old data",
    );
    assert_eq!(g.read(c.capacity, 512).unwrap().status, VIRTIO_BLK_S_IOERR);
    let s = rig.stats("d0");
    assert_eq!(s.nonzero_errors(), errors(&[("out_of_range", 2)]), "{s:?}");
}

// --- 9: worker moves under load -------------------------------------------

#[test]
fn worker_moves_with_requests_in_flight_lose_nothing() {
    const MOVES: usize = 24;
    let mut rig = Rig::new(2, &[]);
    let d = rig.add_disk("d0", 4 * MIB, json!({"worker": 0}));
    let mut g = stream_guest(&d);
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let done = std::thread::scope(|s| {
        let io = s.spawn(|| {
            stream(&mut g, 32, 0, 7, &progress, |_| {
                !stop.load(Ordering::Relaxed)
            })
        });
        for m in 0..MOVES {
            // Requests completed since the last move: the stream is running
            // when the disk moves.
            let seen = progress.load(Ordering::Relaxed);
            wait_until("disk I/O to make progress", || {
                progress.load(Ordering::Relaxed) >= seen + 16 || io.is_finished()
            });
            assert!(!io.is_finished(), "the I/O stream ended early");
            let to = (m + 1) % 2;
            rig.sw
                .call("worker.move", json!({"port": "d0", "worker": to}))
                .unwrap_or_else(|e| panic!("move {m} to worker {to}: {e}"));
            assert_eq!(rig.show("d0")["worker"], to);
        }
        let seen = progress.load(Ordering::Relaxed);
        wait_until("disk I/O after the last move", || {
            progress.load(Ordering::Relaxed) >= seen + 64 || io.is_finished()
        });
        stop.store(true, Ordering::Relaxed);
        io.join().expect("the I/O stream")
    });
    assert_eq!(g.in_flight(0), 0);
    assert_eq!(g.device_errors(), 0);
    let s = rig.stats("d0");
    assert_eq!(s.op("read") + s.op("write"), done, "{s:?}");
    assert!(s.nonzero_errors().is_empty(), "{s:?}");
    assert_eq!((s.in_flight, s.broken), (0, false));
}

// --- 11: direct I/O -------------------------------------------------------

/// A raw read of `len` bytes at `sector` into a buffer at `buf` (guest
/// physical) on queue 0; returns (used length, status).
fn raw_read(g: &mut BlkGuest, sector: u64, buf: u64, len: u32) -> (u32, u8) {
    let mut q = g.raw_queue(0).unwrap();
    let ids = q.alloc_chain(3).unwrap();
    let hdr = q.scratch(BLK_HDR_LEN);
    let mut h = [0u8; BLK_HDR_LEN];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    q.memory().write(hdr, &h).unwrap();
    let status = q.scratch(1);
    q.memory().write(status, &[STATUS_UNWRITTEN]).unwrap();
    q.write_desc(ids[0], hdr, BLK_HDR_LEN as u32, VRING_DESC_F_NEXT, ids[1]);
    q.write_desc(
        ids[1],
        buf,
        len,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        ids[2],
    );
    q.write_desc(ids[2], status, 1, VRING_DESC_F_WRITE, 0);
    q.push_avail(ids[0]);
    q.publish();
    q.kick();
    let (_, used) = g.wait_raw_used(0, WAIT).expect("the raw read completes");
    (used, g.memory().read_vec(status, 1).unwrap()[0])
}

#[test]
fn direct_io_on_ext4_serves_aligned_and_refuses_misaligned_requests() {
    let mut rig = Rig::new(1, &[]);
    let img = rig.image("direct.img", 4 * MIB);
    let img4k = rig.image("direct4k.img", 4 * MIB);
    let mut add = |name: &str, path: &std::path::Path, extra: serde_json::Value| {
        let mut args = json!({"name": name, "path": path, "direct": true});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        rig.sw.call("disk.add", args).unwrap_or_else(|e| {
            panic!(
                "disk.add with direct I/O on {} (a file on the run directory's \
                 file system, ext4 here) was refused: {e}. O_DIRECT must work there.",
                path.display()
            )
        })
    };
    let s512 = add("d512", &img, json!({}));
    let s4k = add("d4k", &img4k, json!({"block_size": 4096}));
    assert_eq!(
        (s512["direct"].as_bool(), s4k["direct"].as_bool()),
        (Some(true), Some(true))
    );
    let d512 = TestDisk {
        name: "d512".into(),
        path: img.clone(),
        sock: s512["socket"].as_str().unwrap().into(),
    };
    let d4k = TestDisk {
        name: "d4k".into(),
        path: img4k.clone(),
        sock: s4k["socket"].as_str().unwrap().into(),
    };
    // Page-sized segments in page-aligned slots.
    let cfg = BlkGuestConfig {
        segment_size: 4096,
        ..Default::default()
    };

    let mut g = guest(&d512, cfg.clone());
    let data = pattern(64 * 1024, 5);
    ok(g.write(8, &data), "aligned direct write");
    assert_same(
        &ok(g.read(8, data.len() as u32), "aligned direct read").data,
        &data,
        "direct read back",
    );
    assert_same(
        &file_bytes(&img, 8 * 512, data.len()),
        &data,
        "direct write in the file",
    );
    // A buffer one byte off alignment.
    let buf = g.memory().alloc_aligned(8192, 4096).unwrap() + 1;
    g.memory().fill(buf, 4096, 0x5a).unwrap();
    assert_eq!(raw_read(&mut g, 8, buf, 4096), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(
        g.memory().read_vec(buf, 4096).unwrap(),
        vec![0x5a; 4096],
        "refused read wrote data"
    );
    let s = rig.stats("d512");
    assert_eq!(s.nonzero_errors(), errors(&[("unaligned", 1)]), "{s:?}");
    ok(g.read(0, 4096), "aligned read after the refusal");

    let mut g = guest(&d4k, cfg);
    assert_eq!(g.config().blk_size, 4096);
    let whole = pattern(8192, 9);
    ok(g.write(8, &whole), "a 4 KiB-aligned write");
    assert_same(
        &ok(g.read(8, 8192), "read").data,
        &whole,
        "4k direct read back",
    );
    // Less than a block, or a block that does not start on one.
    let r = g.read(16, 512).unwrap();
    assert_eq!(
        (r.status, r.used_len),
        (VIRTIO_BLK_S_IOERR, 1),
        "512-byte read on a 4096-block disk"
    );
    let r = g.write(8, &pattern(512, 1)).unwrap();
    assert_eq!(
        r.status, VIRTIO_BLK_S_IOERR,
        "512-byte write on a 4096-block disk"
    );
    let r = g.read(9, 4096).unwrap();
    assert_eq!(
        r.status, VIRTIO_BLK_S_IOERR,
        "read at a sector inside a block"
    );
    let s = rig.stats("d4k");
    assert_eq!(s.nonzero_errors(), errors(&[("unaligned", 3)]), "{s:?}");
    assert_same(
        &file_bytes(&img4k, 4096, 8192),
        &whole,
        "the refused write changed nothing",
    );
}

// --- 12: reconnect and GET_VRING_BASE -------------------------------------

#[test]
fn reconnect_sees_the_data_and_vring_base_covers_only_answered_requests() {
    let mut rig = Rig::new(1, &[]);
    let d = rig.add_disk("d0", 8 * MIB, json!({}));
    let mut g = guest(&d, BlkGuestConfig::default());
    for i in 0..5u64 {
        ok(g.write(8 * i, &pattern(4096, i)), "write");
    }
    assert_eq!(g.get_vring_base(0).unwrap(), 5, "five requests taken");
    g.disconnect();
    let mut g = guest(&d, BlkGuestConfig::default());
    for i in 0..5u64 {
        assert_same(
            &ok(g.read(8 * i, 4096), "read after reconnect").data,
            &pattern(4096, i),
            "data after reconnect",
        );
    }

    // Requests in flight when GET_VRING_BASE comes: every request the switch
    // took is answered before the base is returned, and the base counts
    // exactly those.
    const N: u64 = 32;
    let mut tags = HashMap::new();
    for i in 0..N {
        let data = pattern(64 * 1024, 100 + i);
        let t = g
            .submit(0, &BlkRequest::write(1024 + 128 * i, &data))
            .unwrap();
        tags.insert(t, i);
    }
    // The five reads above came first on this connection.
    let base = g.get_vring_base(0).unwrap();
    let used = g.raw_queue(0).unwrap().used_idx();
    assert_eq!(u32::from(used), base, "used index when the ring stopped");
    let taken = u64::from(base) - 5;
    assert!(taken <= N, "base {base}");
    let done = g.poll_completions(0).unwrap();
    assert_eq!(done.len() as u64, taken, "answered writes = writes taken");
    let mut written = Vec::new();
    for c in &done {
        assert_eq!(c.result.status, VIRTIO_BLK_S_OK);
        written.push(tags[&c.tag]);
    }
    eprintln!("{taken} of {N} writes were taken before GET_VRING_BASE");
    assert_eq!(g.in_flight(0) as u64, N - taken);
    let s = rig.stats("d0");
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.op("write"), 5 + taken, "{s:?}");
    g.disconnect();

    let mut g = guest(&d, BlkGuestConfig::default());
    for i in written {
        let r = ok(g.read(1024 + 128 * i, 64 * 1024), "read after reconnect");
        assert_same(
            &r.data,
            &pattern(64 * 1024, 100 + i),
            "write answered before the stop",
        );
    }
    assert_eq!(rig.show("d0")["connections"], 3);
    assert!(rig.stats("d0").nonzero_errors().is_empty());
}
