//! Turn fuzzer bytes into a virtio-blk descriptor chain and parse it the
//! way a worker does (`vioswitch::blk::parse`), then use the parsed request
//! as the worker would (discard ranges, GET_ID fill). Shared by the
//! `blk_request` fuzz target and its corpus replay on stable Rust.
//!
//! Input layout: one byte for the number of buffers (1 to 16), then per
//! buffer a flags byte (bit 0: device-writable) and a length byte (times 3,
//! so buffers reach 765 bytes); what follows fills the buffers in order.

use vioswitch::blk::{parse, ParseError, Request, DISCARD_SEG_LEN, HDR_LEN};
use vioswitch::vring::Seg;

/// What parsing made of one input.
#[derive(Debug)]
pub enum Outcome {
    /// Too short to describe a chain.
    Empty,
    Parsed(Result<(), ParseError>),
}

/// Parse one input. Panics if the parser breaks an invariant: a status
/// pointer outside the last buffer, data outside the chain, or a data
/// length that does not add up.
pub fn run(data: &[u8]) -> Outcome {
    let Some((&n, rest)) = data.split_first() else {
        return Outcome::Empty;
    };
    let n = usize::from(n % 16) + 1;
    if rest.len() < 2 * n {
        return Outcome::Empty;
    }
    let (desc, mut fill) = rest.split_at(2 * n);
    let mut bufs: Vec<(Vec<u8>, bool)> = desc
        .chunks(2)
        .map(|d| (vec![0u8; usize::from(d[1]) * 3], d[0] & 1 != 0))
        .collect();
    // Readable buffers first, as the ring walk guarantees.
    bufs.sort_by_key(|(_, w)| *w);
    for (b, _) in &mut bufs {
        let k = b.len().min(fill.len());
        b[..k].copy_from_slice(&fill[..k]);
        fill = &fill[k..];
    }
    let segs: Vec<Seg> = bufs
        .iter_mut()
        .filter(|(b, _)| !b.is_empty())
        .map(|(b, w)| Seg {
            ptr: b.as_mut_ptr(),
            len: b.len() as u32,
            writable: *w,
        })
        .collect();
    let mut req = Request::new();
    let res = parse(&segs, &mut req);
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if let Some(last) = segs.last() {
        if res != Err(ParseError::NoStatus) {
            assert!(last.writable);
            assert_eq!(
                req.status as usize,
                last.ptr as usize + last.len as usize - 1
            );
        }
    }
    if res.is_ok() {
        assert!(
            req.data_len + (HDR_LEN as u64) < total,
            "header and status are not data"
        );
        let sum: u64 = req.data().iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(sum, req.data_len);
        for s in req.data() {
            let inside = segs.iter().any(|c| {
                let (b, e) = (c.ptr as usize, c.ptr as usize + c.len as usize);
                s.ptr as usize >= b && s.ptr as usize + s.len as usize <= e
            });
            assert!(inside, "a data segment outside the chain");
            assert_ne!(
                s.ptr as usize, req.status as usize,
                "data covers the status byte"
            );
        }
        let ranges = req.data_len as usize / DISCARD_SEG_LEN;
        for i in 0..ranges.min(64) {
            assert!(req.discard_seg(i).is_some());
        }
        assert!(req.discard_seg(ranges).is_none());
        if req.data().iter().all(|s| s.writable) {
            let id = [b'x'; 20];
            assert!(req.fill_data(&id) <= id.len());
        }
    }
    Outcome::Parsed(res)
}
