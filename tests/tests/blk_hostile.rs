//! Hostile guests on a vioswitch disk: every request here is written by
//! hand on the driver's raw queue, and everything a guest can send is
//! malformed in one way. One test per kind of abuse; each variant checks
//!
//! - the status byte (IOERR or UNSUPP, or still 0xff where the chain has no
//!   device-writable status) and the used length,
//! - the exact `disk.stats` error counters,
//! - that nothing beyond the request was touched: canary bytes around every
//!   guest buffer, buffers the device must not write still as filled, and
//!   the backing file byte for byte as it was,
//!
//! and each test ends by showing that the disk still serves normal I/O.

mod blk_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use blk_common::*;
use serde_json::json;
use vioswitch_testkit::frames::wait_until;
use vioswitch_testkit::guest::blk::*;
use vioswitch_testkit::guest::ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vioswitch_testkit::guest::{BlkGuest, BlkGuestConfig};

const DISK_SIZE: u64 = MIB;
/// Sectors of the disk.
const CAP: u64 = DISK_SIZE / SECTOR_SIZE;
/// Canary bytes on each side of every guest buffer.
const GUARD: usize = 64;
const CANARY: u8 = 0xc5;
const W: u16 = VRING_DESC_F_WRITE;

/// A guest buffer between two canaries, and what it must hold.
#[derive(Debug, Clone)]
struct Buf {
    at: u64,
    want: Vec<u8>,
}

/// One descriptor: where, how long, WRITE / INDIRECT flags (NEXT is added
/// by [`Lab::post`]).
#[derive(Debug, Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    flags: u16,
}

impl Buf {
    /// Device-readable.
    fn r(&self) -> D {
        D {
            addr: self.at,
            len: self.want.len() as u32,
            flags: 0,
        }
    }

    /// Device-writable.
    fn w(&self) -> D {
        D {
            flags: W,
            ..self.r()
        }
    }
}

/// How the last descriptor of a chain ends.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// No NEXT: a proper chain.
    End,
    /// NEXT back to the head: a loop.
    Loop,
    /// NEXT to this descriptor index, whatever it is.
    Next(u16),
}

/// What the device must answer.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: u8,
    used_len: u32,
    /// The error counter that goes up by one.
    reason: &'static str,
}

const fn ioerr(reason: &'static str) -> Answer {
    Answer {
        status: VIRTIO_BLK_S_IOERR,
        used_len: 1,
        reason,
    }
}

const fn unsupp() -> Answer {
    Answer {
        status: VIRTIO_BLK_S_UNSUPP,
        used_len: 1,
        reason: "unsupported",
    }
}

/// No status to write: the chain comes back untouched with length 0.
const fn dropped(reason: &'static str) -> Answer {
    Answer {
        status: STATUS_UNWRITTEN,
        used_len: 0,
        reason,
    }
}

/// A switch with disk "d0", a guest on it, and what must not change.
struct Lab {
    g: BlkGuest,
    disk: TestDisk,
    /// Every buffer handed to the device so far.
    bufs: Vec<Buf>,
    /// The error counters expected.
    errors: BTreeMap<String, u64>,
    image: Vec<u8>,
    rig: Rig,
}

fn lab(extra: serde_json::Value) -> Lab {
    let mut rig = Rig::new(1, &[]);
    let disk = rig.add_disk("d0", DISK_SIZE, extra);
    let g = guest(&disk, BlkGuestConfig::default());
    assert_eq!(g.config().capacity, CAP);
    Lab {
        g,
        image: std::fs::read(&disk.path).unwrap(),
        disk,
        bufs: Vec::new(),
        errors: BTreeMap::new(),
        rig,
    }
}

/// A request header.
fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; BLK_HDR_LEN];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Discard / write-zeroes ranges.
fn ranges(list: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut d = Vec::new();
    for &(sector, num, flags) in list {
        d.extend_from_slice(&sector.to_le_bytes());
        d.extend_from_slice(&num.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
    }
    d
}

impl Lab {
    /// A buffer holding `content`, canaries around it.
    fn buf(&mut self, content: &[u8]) -> Buf {
        let mem = self.g.memory();
        let base = mem.alloc(content.len() + 2 * GUARD).unwrap();
        mem.fill(base, content.len() + 2 * GUARD, CANARY).unwrap();
        let b = Buf {
            at: base + GUARD as u64,
            want: content.to_vec(),
        };
        mem.write(b.at, content).unwrap();
        self.bufs.push(b.clone());
        b
    }

    /// A `len`-byte buffer of `fill` bytes: the device must leave it so.
    fn filled(&mut self, len: usize, fill: u8) -> Buf {
        self.buf(&vec![fill; len])
    }

    fn hdr(&mut self, kind: u32, sector: u64) -> Buf {
        self.buf(&header(kind, sector))
    }

    /// A status byte preset to 0xff.
    fn status(&mut self) -> Buf {
        self.buf(&[STATUS_UNWRITTEN])
    }

    /// Post one chain on queue 0 and return its used length.
    fn post(&mut self, descs: &[D], tail: Tail) -> u32 {
        let mut q = self.g.raw_queue(0).unwrap();
        let ids = q.alloc_chain(descs.len() as u16).expect("free descriptors");
        for (i, d) in descs.iter().enumerate() {
            let (flags, next) = match (ids.get(i + 1), tail) {
                (Some(&n), _) => (d.flags | VRING_DESC_F_NEXT, n),
                (None, Tail::End) => (d.flags, 0),
                (None, Tail::Loop) => (d.flags | VRING_DESC_F_NEXT, ids[0]),
                (None, Tail::Next(n)) => (d.flags | VRING_DESC_F_NEXT, n),
            };
            q.write_desc(ids[i], d.addr, d.len, flags, next);
        }
        q.push_avail(ids[0]);
        q.publish();
        q.kick();
        let (id, len) = self
            .g
            .wait_raw_used(0, WAIT)
            .expect("the device answers the chain");
        assert_eq!(id, u32::from(ids[0]), "used entry of another chain");
        len
    }

    /// Send `descs`; the device must answer `a` in `status` (if the chain
    /// has one) and touch nothing else.
    fn expect(&mut self, what: &str, descs: &[D], tail: Tail, status: Option<&Buf>, a: Answer) {
        let used = self.post(descs, tail);
        assert_eq!(used, a.used_len, "{what}: used length");
        if let Some(s) = status {
            let got = self.g.memory().read_vec(s.at, 1).unwrap()[0];
            assert_eq!(got, a.status, "{what}: status byte");
            let b = self.bufs.iter_mut().find(|b| b.at == s.at).unwrap();
            b.want = vec![a.status];
        }
        self.check_untouched(what);
        *self.errors.entry(a.reason.to_string()).or_default() += 1;
        let s = self.rig.stats(&self.disk.name);
        assert_eq!(s.nonzero_errors(), self.errors, "{what}: error counters");
        assert_eq!((s.in_flight, s.broken), (0, false), "{what}");
    }

    /// Every buffer holds what it must, canaries included, and the backing
    /// file is as it was.
    fn check_untouched(&self, what: &str) {
        let mem = self.g.memory();
        for b in &self.bufs {
            let all = mem
                .read_vec(b.at - GUARD as u64, b.want.len() + 2 * GUARD)
                .unwrap();
            let (front, rest) = all.split_at(GUARD);
            let (body, back) = rest.split_at(b.want.len());
            assert!(
                front.iter().chain(back).all(|&c| c == CANARY),
                "{what}: canary overwritten around the buffer at {:#x}",
                b.at
            );
            assert_same(body, &b.want, &format!("{what}: buffer at {:#x}", b.at));
        }
        assert_same(
            &std::fs::read(&self.disk.path).unwrap(),
            &self.image,
            &format!("{what}: backing file"),
        );
    }

    /// Normal I/O still works (written only on a writable disk), and the
    /// driver saw nothing odd.
    fn finish(mut self) {
        let g = &mut self.g;
        if g.has_feature(VIRTIO_BLK_F_RO) {
            assert_same(
                &ok(g.read(0, 4096), "read afterwards").data,
                &self.image[..4096],
                "read afterwards",
            );
        } else {
            ok(g.write(8, &pattern(4096, 1)), "write afterwards");
            assert_same(
                &ok(g.read(8, 4096), "read afterwards").data,
                &pattern(4096, 1),
                "read afterwards",
            );
            ok(g.flush(), "flush afterwards");
        }
        assert_eq!(g.device_errors(), 0);
        let s = self.rig.stats(&self.disk.name);
        assert_eq!(s.nonzero_errors(), self.errors, "no error from normal I/O");
        assert!(self.rig.sw.is_running());
    }

    /// A classic three-part request: header, one data buffer, status.
    fn request(&mut self, what: &str, kind: u32, sector: u64, data: D, a: Answer) {
        let h = self.hdr(kind, sector);
        let st = self.status();
        self.expect(what, &[h.r(), data, st.w()], Tail::End, Some(&st), a);
    }
}

#[test]
fn header_shorter_than_16_bytes() {
    let mut l = lab(json!({}));
    for n in [0usize, 1, 10, 15] {
        let h = l.buf(&header(VIRTIO_BLK_T_IN, 0)[..n]);
        let data = l.filled(512, 0xaa);
        let st = l.status();
        let chain = [h.r(), data.w(), st.w()];
        // A zero-length header descriptor is just skipped.
        l.expect(
            &format!("{n}-byte header"),
            &chain,
            Tail::End,
            Some(&st),
            ioerr("short_header"),
        );
    }
    // Only a status byte.
    let st = l.status();
    l.expect(
        "status alone",
        &[st.w()],
        Tail::End,
        Some(&st),
        ioerr("short_header"),
    );
    l.finish();
}

#[test]
fn no_device_writable_status_byte() {
    let mut l = lab(json!({}));
    // A read whose every buffer is driver-readable.
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let data = l.filled(512, 0xaa);
    let st = l.status();
    l.expect(
        "all readable",
        &[h.r(), data.r(), st.r()],
        Tail::End,
        Some(&st),
        dropped("no_status"),
    );
    // A flush that is only a header.
    let h = l.hdr(VIRTIO_BLK_T_FLUSH, 0);
    l.expect(
        "header alone",
        &[h.r()],
        Tail::End,
        None,
        dropped("no_status"),
    );
    // A write whose status descriptor is writable but empty.
    let h = l.hdr(VIRTIO_BLK_T_OUT, 0);
    let data = l.filled(512, 0xbb);
    let st = l.status();
    let empty = D { len: 0, ..st.w() };
    l.expect(
        "zero-length status",
        &[h.r(), data.r(), empty],
        Tail::End,
        Some(&st),
        dropped("no_status"),
    );
    l.finish();
}

#[test]
fn sectors_past_the_end() {
    let mut l = lab(json!({}));
    let overflow = u64::MAX / SECTOR_SIZE + 1; // sector * 512 overflows
    for (what, sector, len) in [
        ("read at the end", CAP, 512),
        ("read across the end", CAP - 1, 1024),
        ("read far out", 1 << 40, 512),
        ("read at an overflowing sector", overflow, 512),
        ("read at sector u64::MAX", u64::MAX, 512),
    ] {
        let data = l.filled(len, 0xaa);
        l.request(
            what,
            VIRTIO_BLK_T_IN,
            sector,
            data.w(),
            ioerr("out_of_range"),
        );
    }
    for (what, sector) in [
        ("write across the end", CAP - 1),
        ("write at an overflowing sector", overflow),
    ] {
        let data = l.buf(&pattern(1024, 3));
        l.request(
            what,
            VIRTIO_BLK_T_OUT,
            sector,
            data.r(),
            ioerr("out_of_range"),
        );
    }
    for (what, kind, list) in [
        (
            "discard at the end",
            VIRTIO_BLK_T_DISCARD,
            vec![(CAP, 8, 0)],
        ),
        (
            "discard across the end",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 8, 0), (CAP - 8, 16, 0)],
        ),
        (
            "discard at an overflowing sector",
            VIRTIO_BLK_T_DISCARD,
            vec![(overflow, 8, 0)],
        ),
        (
            "discard of more than max sectors",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, (1 << 21) + 8, 0)],
        ),
        (
            "write-zeroes across the end",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(CAP - 4, 8, 0)],
        ),
        (
            "write-zeroes with unmap past the end",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(CAP, 8, 1)],
        ),
        (
            "write-zeroes at an overflowing sector",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(overflow, 8, 0)],
        ),
    ] {
        let r = l.buf(&ranges(&list));
        l.request(what, kind, 0, r.r(), ioerr("out_of_range"));
    }
    assert_eq!(std::fs::metadata(&l.disk.path).unwrap().len(), DISK_SIZE);
    l.finish();
}

#[test]
fn data_buffers_of_the_wrong_direction() {
    let mut l = lab(json!({}));
    let data = l.filled(512, 0xaa);
    l.request(
        "read into a readable buffer",
        VIRTIO_BLK_T_IN,
        0,
        data.r(),
        ioerr("wrong_direction"),
    );
    let data = l.filled(512, 0xbb);
    l.request(
        "write from a writable buffer",
        VIRTIO_BLK_T_OUT,
        0,
        data.w(),
        ioerr("wrong_direction"),
    );
    let data = l.filled(BLK_ID_BYTES, 0xcc);
    l.request(
        "GET_ID into a readable buffer",
        VIRTIO_BLK_T_GET_ID,
        0,
        data.r(),
        ioerr("wrong_direction"),
    );
    let r = l.buf(&ranges(&[(0, 8, 0)]));
    l.request(
        "discard ranges in a writable buffer",
        VIRTIO_BLK_T_DISCARD,
        0,
        r.w(),
        ioerr("wrong_direction"),
    );
    // Header, readable data, writable data: a write with both.
    let h = l.hdr(VIRTIO_BLK_T_OUT, 0);
    let (a, b) = (l.buf(&pattern(512, 1)), l.filled(512, 0xdd));
    let st = l.status();
    l.expect(
        "write with readable and writable data",
        &[h.r(), a.r(), b.w(), st.w()],
        Tail::End,
        Some(&st),
        ioerr("wrong_direction"),
    );
    l.finish();
}

#[test]
fn data_length_not_a_multiple_of_512() {
    let mut l = lab(json!({}));
    for len in [1usize, 700, 4095] {
        let data = l.filled(len, 0xaa);
        l.request(
            &format!("{len}-byte read"),
            VIRTIO_BLK_T_IN,
            0,
            data.w(),
            ioerr("unaligned"),
        );
        let data = l.buf(&pattern(len, 2));
        l.request(
            &format!("{len}-byte write"),
            VIRTIO_BLK_T_OUT,
            0,
            data.r(),
            ioerr("unaligned"),
        );
    }
    l.finish();
}

#[test]
fn writes_to_a_read_only_disk() {
    let mut l = lab(json!({"readonly": true}));
    assert!(l.g.has_feature(VIRTIO_BLK_F_RO));
    let data = l.buf(&pattern(4096, 1));
    l.request("write", VIRTIO_BLK_T_OUT, 0, data.r(), ioerr("read_only"));
    let r = l.buf(&ranges(&[(0, 8, 0)]));
    l.request(
        "discard",
        VIRTIO_BLK_T_DISCARD,
        0,
        r.r(),
        ioerr("read_only"),
    );
    for flags in [0, 1] {
        let r = l.buf(&ranges(&[(8, 8, flags)]));
        l.request(
            "write-zeroes",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            r.r(),
            ioerr("read_only"),
        );
    }
    l.finish();
}

#[test]
fn unknown_request_types() {
    let mut l = lab(json!({}));
    // GET_LIFETIME, SECURE_ERASE, and types nobody defined.
    for kind in [10u32, 14, 0x77, u32::MAX] {
        let data = l.filled(512, 0xaa);
        l.request(
            &format!("type {kind} with a writable buffer"),
            kind,
            0,
            data.w(),
            unsupp(),
        );
        let data = l.buf(&pattern(512, 9));
        l.request(
            &format!("type {kind} with a readable buffer"),
            kind,
            0,
            data.r(),
            unsupp(),
        );
    }
    let h = l.hdr(0x77, 0);
    let st = l.status();
    l.expect(
        "type 0x77 without data",
        &[h.r(), st.w()],
        Tail::End,
        Some(&st),
        unsupp(),
    );
    l.finish();
}

#[test]
fn discard_with_flags_or_too_many_segments() {
    let mut l = lab(json!({}));
    let max_seg = l.g.config().max_discard_seg as u64;
    assert_eq!(max_seg, 32);
    // Flags the request type does not know (unmap is for write-zeroes only).
    for (what, kind, flags) in [
        ("discard with unmap", VIRTIO_BLK_T_DISCARD, 1),
        (
            "discard with reserved flags",
            VIRTIO_BLK_T_DISCARD,
            0x8000_0000,
        ),
        (
            "write-zeroes with reserved flags",
            VIRTIO_BLK_T_WRITE_ZEROES,
            2,
        ),
    ] {
        let r = l.buf(&ranges(&[(0, 8, 0), (16, 8, flags)]));
        l.request(what, kind, 0, r.r(), unsupp());
    }
    // More segments than max_discard_seg (UNSUPP, as QEMU answers it), a
    // partial segment (IOERR): refused as a whole (none of the ranges is done).
    let many: Vec<(u64, u32, u32)> = (0..=max_seg).map(|i| (8 * i, 8, 0)).collect();
    for (what, kind) in [
        (
            "discard of max_discard_seg + 1 segments",
            VIRTIO_BLK_T_DISCARD,
        ),
        (
            "write-zeroes of max_discard_seg + 1 segments",
            VIRTIO_BLK_T_WRITE_ZEROES,
        ),
    ] {
        let r = l.buf(&ranges(&many));
        l.request(what, kind, 0, r.r(), unsupp());
    }
    let mut partial = ranges(&[(0, 8, 0)]);
    partial.extend_from_slice(&[0; 4]);
    let r = l.buf(&partial);
    l.request(
        "discard of 20 bytes",
        VIRTIO_BLK_T_DISCARD,
        0,
        r.r(),
        ioerr("unsupported"),
    );
    let h = l.hdr(VIRTIO_BLK_T_DISCARD, 0);
    let st = l.status();
    l.expect(
        "discard without ranges",
        &[h.r(), st.w()],
        Tail::End,
        Some(&st),
        ioerr("unsupported"),
    );
    l.finish();
}

#[test]
fn descriptors_outside_memory_looping_or_indirect() {
    let mut l = lab(json!({}));
    let outside = l.g.memory().end() + 0x10_0000;
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let st = l.status();
    let far = D {
        addr: outside,
        len: 512,
        flags: W,
    };
    l.expect(
        "data outside guest memory",
        &[h.r(), far, st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );
    let st = l.status();
    let bad_hdr = D {
        addr: outside,
        len: 16,
        flags: 0,
    };
    l.expect(
        "header outside guest memory",
        &[bad_hdr, st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let st = l.status();
    let huge = D {
        addr: st.at,
        len: u32::MAX,
        flags: W,
    };
    l.expect(
        "a 4 GiB buffer",
        &[h.r(), huge],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );
    let data = l.filled(512, 0xaa);
    let straddle = D {
        addr: l.g.memory().end() - 256,
        len: 512,
        flags: W,
    };
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let st = l.status();
    l.expect(
        "a buffer across the end of memory",
        &[h.r(), straddle, data.w(), st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );

    // Loops: through two descriptors, and one pointing at itself.
    let h = l.hdr(VIRTIO_BLK_T_OUT, 0);
    let data = l.buf(&pattern(512, 4));
    l.expect(
        "a two-descriptor loop",
        &[h.r(), data.r()],
        Tail::Loop,
        None,
        dropped("bad_descriptor"),
    );
    let h = l.hdr(VIRTIO_BLK_T_FLUSH, 0);
    l.expect(
        "a descriptor chained to itself",
        &[h.r()],
        Tail::Loop,
        None,
        dropped("bad_descriptor"),
    );
    let h = l.hdr(VIRTIO_BLK_T_FLUSH, 0);
    let st = l.status();
    l.expect(
        "next beyond the ring",
        &[h.r(), st.w()],
        Tail::Next(1000),
        Some(&st),
        dropped("bad_descriptor"),
    );

    // The indirect flag (not offered), on the header and on the data.
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let data = l.filled(512, 0xaa);
    let st = l.status();
    let ind = D {
        flags: VRING_DESC_F_INDIRECT,
        ..h.r()
    };
    l.expect(
        "indirect header",
        &[ind, data.w(), st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let st = l.status();
    let table = l.buf(&[0u8; 32]);
    let ind = D {
        flags: VRING_DESC_F_INDIRECT,
        ..table.r()
    };
    l.expect(
        "indirect data",
        &[h.r(), ind, st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );

    // A driver-readable buffer after a device-writable one.
    let h = l.hdr(VIRTIO_BLK_T_IN, 0);
    let (a, b) = (l.filled(512, 0xaa), l.filled(512, 0xbb));
    let st = l.status();
    l.expect(
        "readable after writable",
        &[h.r(), a.w(), b.r(), st.w()],
        Tail::End,
        Some(&st),
        dropped("bad_descriptor"),
    );
    l.finish();
}

/// An event subscription on the control socket.
fn subscribe(control: &std::path::Path) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(control).expect("connect to the control socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    writeln!(s, r#"{{"id":1,"cmd":"events.subscribe"}}"#).unwrap();
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer).unwrap();
    assert!(
        answer.contains(r#""ok":true"#),
        "events.subscribe: {answer}"
    );
    r
}

#[test]
fn avail_index_jump_breaks_only_that_disk_until_it_reconnects() {
    let mut l = lab(json!({}));
    let other = l.rig.add_disk("d1", DISK_SIZE, json!({}));
    let mut healthy = guest(&other, BlkGuestConfig::default());
    assert_eq!(l.rig.show("d0")["worker"], l.rig.show("d1")["worker"]);
    ok(healthy.write(0, &pattern(4096, 7)), "the other disk before");

    let mut events = subscribe(&l.rig.sw.control_path());
    // The guest claims more new entries than the ring has.
    {
        let mut q = l.g.raw_queue(0).unwrap();
        let jump = q.avail_idx().wrapping_add(q.size() + 3);
        q.set_avail_idx(jump);
        q.kick();
    }
    wait_until("disk d0 to be marked broken", || {
        l.rig.show("d0")["broken"] == true
    });
    // Subscribers are told (other events, e.g. connections, may come first).
    loop {
        let mut line = String::new();
        let n = events
            .read_line(&mut line)
            .expect("an event before the deadline");
        assert!(n > 0, "event stream closed before port.broken");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["event"] == "port.broken" {
            assert_eq!(e["port"], "d0", "{e}");
            break;
        }
    }
    let s = l.rig.stats("d0");
    assert!(s.broken && s.in_flight == 0, "{s:?}");
    assert!(s.nonzero_errors().is_empty(), "{s:?}");
    l.check_untouched("after the jump");

    // The other disk on the same worker is served as before.
    for i in 0..8u64 {
        ok(
            healthy.write(8 + 8 * i, &pattern(4096, 20 + i)),
            "the other disk",
        );
        assert_same(
            &ok(healthy.read(8 + 8 * i, 4096), "read").data,
            &pattern(4096, 20 + i),
            "the other disk",
        );
    }
    assert!(!l.rig.stats("d1").broken);
    assert_eq!(healthy.device_errors(), 0);

    // A new connection heals it.
    let Lab {
        g,
        disk,
        image,
        rig,
        ..
    } = l;
    g.disconnect();
    let g = guest(&disk, BlkGuestConfig::default());
    let mut l = Lab {
        g,
        disk,
        bufs: Vec::new(),
        errors: BTreeMap::new(),
        image,
        rig,
    };
    wait_until("disk d0 to be repaired", || {
        l.rig.show("d0")["broken"] == false
    });
    assert_same(
        &ok(l.g.read(0, 4096), "read after reconnecting").data,
        &l.image[..4096],
        "d0 after reconnecting",
    );
    l.finish();
}
