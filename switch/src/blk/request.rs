//! Parsing a virtio-blk request out of a walked descriptor chain.
//!
//! A request is a 16-byte header (driver-written), data buffers, and a
//! one-byte status (device-written, the last byte of the chain). With
//! `VIRTIO_F_VERSION_1` the driver may lay these out over descriptors as it
//! likes (any layout), so the header and the status byte are cut out of the
//! chain by byte count, not by descriptor. Nothing here trusts the guest:
//! every direction and length is checked, and the header is copied out once.

use virtio_bindings::virtio_blk::*;

use super::{DISCARD_SEG_LEN, HDR_LEN};
use crate::vring::{Seg, MAX_CHAIN_SEGS};

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqType {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type the disk does not serve (answered `S_UNSUPP`).
    Unsupported(u32),
}

impl ReqType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => ReqType::Read,
            VIRTIO_BLK_T_OUT => ReqType::Write,
            VIRTIO_BLK_T_FLUSH => ReqType::Flush,
            VIRTIO_BLK_T_GET_ID => ReqType::GetId,
            VIRTIO_BLK_T_DISCARD => ReqType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => ReqType::WriteZeroes,
            t => ReqType::Unsupported(t),
        }
    }

    /// Whether the data buffers are device-written.
    fn data_writable(self) -> bool {
        matches!(self, ReqType::Read | ReqType::GetId)
    }
}

/// Why a chain is not a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No device-writable byte at the end: there is nowhere to put a status.
    NoStatus,
    /// Fewer than 16 driver-written bytes before the device-written ones.
    ShortHeader,
    /// Data buffers of the wrong direction for the request type.
    WrongDirection,
}

/// A parsed request. The data segments are views into guest memory, valid
/// for as long as the chain's memory mapping is.
pub struct Request {
    pub ty: ReqType,
    pub sector: u64,
    /// The data buffers, header and status byte cut out.
    pub data: [Seg; MAX_CHAIN_SEGS],
    pub ndata: usize,
    /// Total bytes of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: *mut u8,
}

impl Request {
    pub fn new() -> Self {
        Request {
            ty: ReqType::Flush,
            sector: 0,
            data: [Seg {
                ptr: std::ptr::null_mut(),
                len: 0,
                writable: false,
            }; MAX_CHAIN_SEGS],
            ndata: 0,
            data_len: 0,
            status: std::ptr::null_mut(),
        }
    }

    /// The data buffers.
    #[inline]
    pub fn data(&self) -> &[Seg] {
        &self.data[..self.ndata]
    }

    /// Copy the `i`-th discard / write-zeroes segment out of the data.
    pub fn discard_seg(&self, i: usize) -> Option<DiscardSeg> {
        let mut raw = [0u8; DISCARD_SEG_LEN];
        if copy_out(self.data(), i * DISCARD_SEG_LEN, &mut raw) != DISCARD_SEG_LEN {
            return None;
        }
        Some(DiscardSeg {
            sector: u64::from_le_bytes(raw[0..8].try_into().ok()?),
            num_sectors: u32::from_le_bytes(raw[8..12].try_into().ok()?),
            flags: u32::from_le_bytes(raw[12..16].try_into().ok()?),
        })
    }

    /// Copy `src` into the data buffers from their start; returns bytes copied.
    pub fn fill_data(&self, src: &[u8]) -> usize {
        let mut done = 0;
        for s in self.data() {
            if done == src.len() {
                break;
            }
            let n = (s.len as usize).min(src.len() - done);
            // SAFETY: `s` is a device-writable buffer of `s.len` bytes inside
            // a guest mapping that outlives this call (translated by
            // `Vring::walk`); the source is a local slice of at least `n`
            // more bytes. The two cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), s.ptr, n) };
            done += n;
        }
        done
    }
}

impl Default for Request {
    fn default() -> Self {
        Self::new()
    }
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSeg {
    pub sector: u64,
    pub num_sectors: u32,
    /// Bit 0: unmap (write zeroes may deallocate).
    pub flags: u32,
}

/// Copy bytes at `offset` of the buffers `segs` into `out`; returns the
/// count copied (less than `out.len()` if the buffers end first).
fn copy_out(segs: &[Seg], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let len = s.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(out.len() - done);
        // SAFETY: `s.ptr..s.ptr+s.len` is a guest buffer mapped for the
        // duration of the call (translated by `Vring::walk`) and
        // `offset + n <= len`; `out[done..done+n]` is in bounds.
        unsafe { std::ptr::copy_nonoverlapping(s.ptr.add(offset), out.as_mut_ptr().add(done), n) };
        done += n;
        offset = 0;
        if done == out.len() {
            break;
        }
    }
    done
}

/// Parse the chain `segs` (readable buffers first, then writable ones, as
/// `Direction::Mixed` walks them) into `out`.
///
/// On `Err(ShortHeader)` or `Err(WrongDirection)` `out.status` is already
/// set, so the caller can answer `S_IOERR`; on `Err(NoStatus)` there is
/// nowhere to answer and the chain is returned with length 0.
pub fn parse(segs: &[Seg], out: &mut Request) -> Result<(), ParseError> {
    out.ndata = 0;
    out.data_len = 0;
    out.status = std::ptr::null_mut();
    let last = match segs.last() {
        Some(s) if s.writable && s.len > 0 => *s,
        _ => return Err(ParseError::NoStatus),
    };
    // SAFETY: `last.len >= 1`, so the last byte is inside the buffer.
    out.status = unsafe { last.ptr.add(last.len as usize - 1) };

    let mut hdr = [0u8; HDR_LEN];
    let readable = segs.iter().take_while(|s| !s.writable).count();
    if copy_out(&segs[..readable], 0, &mut hdr) < HDR_LEN {
        return Err(ParseError::ShortHeader);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    out.ty = ReqType::from_raw(ty);
    out.sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    // Data: readable bytes after the header, writable bytes before the status.
    let mut skip = HDR_LEN as u32;
    let mut readable_data = 0u64;
    let mut writable_data = 0u64;
    let nsegs = segs.len();
    for (i, s) in segs.iter().enumerate() {
        let mut ptr = s.ptr;
        let mut len = s.len;
        if !s.writable && skip > 0 {
            let cut = skip.min(len);
            // SAFETY: cut <= len: still inside the buffer.
            ptr = unsafe { ptr.add(cut as usize) };
            len -= cut;
            skip -= cut;
        }
        if i == nsegs - 1 {
            len -= 1; // the status byte
        }
        if len == 0 {
            continue;
        }
        if s.writable {
            writable_data += u64::from(len);
        } else {
            readable_data += u64::from(len);
        }
        out.data[out.ndata] = Seg {
            ptr,
            len,
            writable: s.writable,
        };
        out.ndata += 1;
    }
    out.data_len = readable_data + writable_data;
    let wrong = match out.ty {
        ReqType::Flush | ReqType::Unsupported(_) => false,
        t if t.data_writable() => readable_data != 0,
        _ => writable_data != 0,
    };
    if wrong {
        return Err(ParseError::WrongDirection);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(buf: &mut [u8], writable: bool) -> Seg {
        Seg {
            ptr: buf.as_mut_ptr(),
            len: buf.len() as u32,
            writable,
        }
    }

    fn header(ty: u32, sector: u64) -> Vec<u8> {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    #[test]
    fn classic_layout_read() {
        let mut h = header(VIRTIO_BLK_T_IN, 77);
        let mut d = vec![0u8; 4096];
        let mut st = vec![0xffu8; 1];
        let segs = [seg(&mut h, false), seg(&mut d, true), seg(&mut st, true)];
        let mut r = Request::new();
        parse(&segs, &mut r).unwrap();
        assert_eq!(r.ty, ReqType::Read);
        assert_eq!(r.sector, 77);
        assert_eq!(r.data_len, 4096);
        assert_eq!(r.ndata, 1);
        assert_eq!(r.status, st.as_mut_ptr());
        assert_eq!(r.fill_data(&[5u8; 10]), 10);
        assert_eq!(&d[..11], &[5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 0]);
    }

    #[test]
    fn any_layout_header_with_data_and_data_with_status() {
        // Header and write data share one buffer; status alone.
        let mut hd = header(VIRTIO_BLK_T_OUT, 3);
        hd.extend_from_slice(&[9u8; 1024]);
        let mut st = [0u8; 1];
        let segs = [seg(&mut hd, false), seg(&mut st, true)];
        let mut r = Request::new();
        parse(&segs, &mut r).unwrap();
        assert_eq!(
            (r.ty, r.sector, r.data_len, r.ndata),
            (ReqType::Write, 3, 1024, 1)
        );
        // SAFETY: the data segment points into `hd`, which is alive.
        assert_eq!(unsafe { *r.data[0].ptr }, 9);

        // Header split over two buffers; read data and status in one buffer.
        let mut h = header(VIRTIO_BLK_T_IN, 8);
        let (a, b) = h.split_at_mut(5);
        let mut ds = vec![0u8; 513];
        let segs = [seg(a, false), seg(b, false), seg(&mut ds, true)];
        parse(&segs, &mut r).unwrap();
        assert_eq!((r.ty, r.sector, r.data_len), (ReqType::Read, 8, 512));
        assert_eq!(r.status, ds[512..].as_mut_ptr());
    }

    #[test]
    fn malformed_requests() {
        let mut r = Request::new();
        // No writable byte at all.
        let mut h = header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(&[seg(&mut h, false)], &mut r),
            Err(ParseError::NoStatus)
        );
        assert_eq!(parse(&[], &mut r), Err(ParseError::NoStatus));
        // A 10-byte header.
        let mut short = vec![0u8; 10];
        let mut st = [0u8; 1];
        assert_eq!(
            parse(&[seg(&mut short, false), seg(&mut st, true)], &mut r),
            Err(ParseError::ShortHeader)
        );
        assert_eq!(
            r.status,
            st.as_mut_ptr(),
            "the status can still be answered"
        );
        // A read whose data buffer is driver-readable.
        let mut h = header(VIRTIO_BLK_T_IN, 0);
        let mut d = vec![0u8; 512];
        assert_eq!(
            parse(
                &[seg(&mut h, false), seg(&mut d, false), seg(&mut st, true)],
                &mut r
            ),
            Err(ParseError::WrongDirection)
        );
        // A write whose data buffer is device-writable.
        let mut h = header(VIRTIO_BLK_T_OUT, 0);
        let mut d = vec![0u8; 513];
        assert_eq!(
            parse(&[seg(&mut h, false), seg(&mut d, true)], &mut r),
            Err(ParseError::WrongDirection)
        );
        // Unknown types parse (and are answered UNSUPP by the caller).
        let mut h = header(99, 0);
        parse(&[seg(&mut h, false), seg(&mut st, true)], &mut r).unwrap();
        assert_eq!(r.ty, ReqType::Unsupported(99));
    }

    #[test]
    fn discard_segments_are_read_across_buffers() {
        let mut h = header(VIRTIO_BLK_T_DISCARD, 0);
        let mut payload = Vec::new();
        for (s, n, f) in [(8u64, 16u32, 0u32), (1024, 8, 1)] {
            payload.extend_from_slice(&s.to_le_bytes());
            payload.extend_from_slice(&n.to_le_bytes());
            payload.extend_from_slice(&f.to_le_bytes());
        }
        let (a, b) = payload.split_at_mut(20);
        let mut st = [0u8; 1];
        let segs = [
            seg(&mut h, false),
            seg(a, false),
            seg(b, false),
            seg(&mut st, true),
        ];
        let mut r = Request::new();
        parse(&segs, &mut r).unwrap();
        assert_eq!(r.data_len, 32);
        assert_eq!(
            r.discard_seg(1),
            Some(DiscardSeg {
                sector: 1024,
                num_sectors: 8,
                flags: 1
            })
        );
        assert_eq!(r.discard_seg(0).map(|s| s.sector), Some(8));
        assert_eq!(r.discard_seg(2), None);
    }
}
