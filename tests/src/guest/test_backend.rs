//! Test-only vhost-user backend: records the requests it gets and runs a
//! loopback net device (TX of pair k is delivered to RX of pair k) over its
//! *own* mapping of the fds it is sent, translating ring addresses as
//! frontend virtual addresses and descriptor addresses as guest-physical
//! ones, as a real backend must. The tests step the device by hand.

use std::fs::File;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    BackendListener, Error, GpuBackend, Listener, Result, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures,
};
use vhost::VhostUserMemoryRegionBase;

use super::ring::need_event;

const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_MQ: u64 = 1 << 22;
const F_PROTOCOL: u64 = 1 << 30;

pub(crate) struct Mapped {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    ptr: NonNull<u8>,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `set_mem_table`, unmapped once.
        unsafe { munmap(self.ptr.cast(), self.size as usize).unwrap() };
    }
}

#[derive(Default)]
pub(crate) struct Vring {
    pub num: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub last_avail: u16,
    pub used_idx: u16,
    pub call: Option<File>,
    pub kick: Option<File>,
    pub enabled: bool,
    pub signals: u64,
}

#[derive(Default)]
pub(crate) struct Loopback {
    pub log: Vec<&'static str>,
    pub offered: u64,
    pub acked: u64,
    pub protocol: u64,
    pub regions: Vec<Mapped>,
    pub vrings: Vec<Vring>,
    /// Frames dropped for want of RX buffers (or bad descriptors).
    pub dropped: u64,
}

// SAFETY: the mappings are owned by the struct and not tied to a thread.
unsafe impl Send for Loopback {}

pub(crate) type Shared = Arc<Mutex<Loopback>>;

impl Loopback {
    pub fn new(offered: u64, pairs: usize) -> Self {
        Loopback {
            offered,
            vrings: (0..2 * pairs).map(|_| Vring::default()).collect(),
            ..Default::default()
        }
    }

    /// Offers VERSION_1, PROTOCOL_FEATURES, MRG_RXBUF, EVENT_IDX and MQ.
    pub fn full(pairs: usize) -> Self {
        Self::new(
            F_VERSION_1 | F_PROTOCOL | F_MRG_RXBUF | F_EVENT_IDX | F_MQ,
            pairs,
        )
    }

    /// Listen on `path` and serve one connection in a thread.
    pub fn serve(self, path: &Path) -> (Shared, JoinHandle<()>) {
        let shared = Arc::new(Mutex::new(self));
        let mut listener = Listener::new(path, true).unwrap();
        let s2 = shared.clone();
        let t = std::thread::spawn(move || {
            let mut bl = BackendListener::new(&mut listener, s2).unwrap();
            let Some(mut h) = bl.accept().unwrap() else {
                return;
            };
            while h.handle_request().is_ok() {}
        });
        (shared, t)
    }

    fn host(&self, addr: u64, len: u64, by_va: bool) -> Option<*mut u8> {
        self.regions.iter().find_map(|r| {
            let start = if by_va { r.user_addr } else { r.gpa };
            (addr >= start && addr - start < r.size && len <= r.size - (addr - start)).then(|| {
                // SAFETY: the offset is inside the mapping (checked above).
                unsafe { r.ptr.as_ptr().add((addr - start) as usize) }
            })
        })
    }

    fn va(&self, addr: u64, len: u64) -> *mut u8 {
        self.host(addr, len, true).expect("ring address not mapped")
    }

    fn atomic_u16(&self, va: u64) -> &AtomicU16 {
        // SAFETY: a 2-aligned u16 ring field inside our mapping (panics if
        // unmapped), accessed atomically on both sides.
        unsafe { AtomicU16::from_ptr(self.va(va, 2).cast()) }
    }

    fn rd<T: Copy>(&self, va: u64) -> T {
        // SAFETY: inside our mapping; plain integer, any bits valid.
        unsafe {
            self.va(va, size_of::<T>() as u64)
                .cast::<T>()
                .read_volatile()
        }
    }

    fn wr<T: Copy>(&self, va: u64, v: T) {
        // SAFETY: inside our mapping; plain integer.
        unsafe {
            self.va(va, size_of::<T>() as u64)
                .cast::<T>()
                .write_volatile(v)
        }
    }

    fn event_idx(&self) -> bool {
        self.acked & F_EVENT_IDX != 0
    }

    pub fn avail_idx(&self, q: usize) -> u16 {
        self.atomic_u16(self.vrings[q].avail + 2)
            .load(Ordering::Acquire)
    }

    pub fn set_avail_event(&self, q: usize, v: u16) {
        let r = &self.vrings[q];
        self.atomic_u16(r.used + 4 + 8 * r.num as u64)
            .store(v, Ordering::Relaxed);
    }

    /// Pop one chain of queue `q`: (head, bytes) or None when empty. Bytes
    /// are None if a descriptor does not translate.
    fn pop(&mut self, q: usize) -> Option<(u16, Option<Vec<u8>>)> {
        let r = &self.vrings[q];
        if r.last_avail == self.avail_idx(q) {
            return None;
        }
        let head: u16 = self.rd(r.avail + 4 + 2 * (r.last_avail % r.num) as u64);
        let mut bytes = Some(Vec::new());
        let mut d = head;
        for _ in 0..r.num {
            let at = r.desc + 16 * (d % r.num) as u64;
            let (addr, len, flags, next): (u64, u32, u16, u16) = (
                self.rd(at),
                self.rd(at + 8),
                self.rd(at + 12),
                self.rd(at + 14),
            );
            match (self.host(addr, len as u64, false), bytes.as_mut()) {
                (Some(p), Some(b)) => {
                    // SAFETY: `len` mapped bytes at `p` (checked by `host`).
                    b.extend_from_slice(unsafe { std::slice::from_raw_parts(p, len as usize) })
                }
                _ => bytes = None,
            }
            if flags & 1 == 0 {
                break;
            }
            d = next;
        }
        self.vrings[q].last_avail = self.vrings[q].last_avail.wrapping_add(1);
        Some((head, bytes))
    }

    fn put_used(&mut self, q: usize, id: u16, len: u32) {
        let r = &self.vrings[q];
        let at = r.used + 4 + 8 * (r.used_idx % r.num) as u64;
        self.wr(at, id as u32);
        self.wr(at + 4, len);
        self.vrings[q].used_idx = r.used_idx.wrapping_add(1);
    }

    /// Publish used entries added since `old` and signal if the driver asked.
    fn publish(&mut self, q: usize, old: u16) {
        let r = &self.vrings[q];
        let new = r.used_idx;
        if new == old {
            return;
        }
        self.atomic_u16(r.used + 2).store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let signal = if self.event_idx() {
            need_event(self.rd(r.avail + 4 + 2 * r.num as u64), new, old)
        } else {
            self.rd::<u16>(r.avail) & 1 == 0
        };
        if signal {
            let r = &mut self.vrings[q];
            r.signals += 1;
            if let Some(f) = r.call.as_mut() {
                f.write_all(&1u64.to_ne_bytes()).unwrap();
            }
        }
    }

    /// Copy `bytes` (header included) into RX queue `q`'s buffers.
    fn deliver(&mut self, q: usize, bytes: &[u8]) {
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let r = &self.vrings[q];
        let avail = self.avail_idx(q);
        let mut pos = r.last_avail;
        let mut bufs = Vec::new();
        let mut room = 0usize;
        while room < bytes.len() && (mrg || bufs.is_empty()) {
            if pos == avail {
                self.dropped += 1;
                return;
            }
            let head: u16 = self.rd(r.avail + 4 + 2 * (pos % r.num) as u64);
            let at = r.desc + 16 * (head % r.num) as u64;
            let (addr, len): (u64, u32) = (self.rd(at), self.rd(at + 8));
            let Some(p) = self.host(addr, len as u64, false) else {
                self.dropped += 1;
                return;
            };
            bufs.push((head, p, len as usize));
            room += len as usize;
            pos = pos.wrapping_add(1);
        }
        if room < bytes.len() {
            self.dropped += 1;
            return;
        }
        self.vrings[q].last_avail = pos;
        let old = self.vrings[q].used_idx;
        let mut off = 0;
        let n = bufs.len() as u16;
        for (i, (head, p, len)) in bufs.into_iter().enumerate() {
            let chunk = len.min(bytes.len() - off);
            // SAFETY: `len` mapped bytes at `p`; source in bounds.
            unsafe { std::ptr::copy_nonoverlapping(bytes[off..].as_ptr(), p, chunk) };
            if i == 0 {
                // SAFETY: the first buffer holds the 12-byte header.
                unsafe { p.add(10).cast::<u16>().write_unaligned(n) };
            }
            off += chunk;
            self.put_used(q, head, chunk as u32);
        }
        self.publish(q, old);
    }

    /// Move every pending TX frame to the RX queue of the same pair.
    pub fn step(&mut self) -> usize {
        let mut moved = 0;
        for tx in (1..self.vrings.len()).step_by(2) {
            if !self.vrings[tx].enabled {
                continue;
            }
            let old = self.vrings[tx].used_idx;
            while let Some((head, bytes)) = self.pop(tx) {
                self.put_used(tx, head, 0);
                match bytes {
                    Some(b) if b.len() >= 12 => {
                        self.deliver(tx - 1, &b);
                        moved += 1;
                    }
                    _ => self.dropped += 1,
                }
            }
            self.publish(tx, old);
        }
        moved
    }

    /// Return `id` as used on queue `q` (a misbehaving device).
    pub fn bogus_used(&mut self, q: usize, id: u16, len: u32) {
        let old = self.vrings[q].used_idx;
        self.put_used(q, id, len);
        self.publish(q, old);
    }
}

macro_rules! unsupported {
    ($($name:ident($($arg:ty),*) -> $ret:ty;)*) => {$(
        fn $name(&mut self, $(_: $arg),*) -> Result<$ret> {
            Err(Error::InvalidOperation(stringify!($name)))
        }
    )*};
}

impl VhostUserBackendReqHandlerMut for Loopback {
    fn set_owner(&mut self) -> Result<()> {
        self.log.push("SET_OWNER");
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        self.log.push("RESET_OWNER");
        Ok(())
    }
    fn get_features(&mut self) -> Result<u64> {
        self.log.push("GET_FEATURES");
        Ok(self.offered)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        self.log.push("SET_FEATURES");
        self.acked = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.log.push("SET_MEM_TABLE");
        self.regions.clear();
        for (r, f) in ctx.iter().zip(files) {
            let (gpa, size, user_addr, off) =
                (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            // SAFETY: a fresh shared mapping of the fd we were sent, at a
            // kernel-chosen address; unmapped in `Mapped::drop`.
            let ptr = unsafe {
                mmap(
                    None,
                    NonZeroUsize::new(size as usize).unwrap(),
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    &f,
                    off as i64,
                )
            }
            .map_err(|_| Error::InvalidParam)?;
            self.regions.push(Mapped {
                gpa,
                size,
                user_addr,
                ptr: ptr.cast(),
            });
        }
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.log.push("SET_VRING_NUM");
        self.vrings[index as usize].num = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        self.log.push("SET_VRING_ADDR");
        let r = &mut self.vrings[index as usize];
        (r.desc, r.used, r.avail) = (descriptor, used, available);
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.log.push("SET_VRING_BASE");
        let r = &mut self.vrings[index as usize];
        (r.last_avail, r.used_idx) = (base as u16, base as u16);
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.log.push("GET_VRING_BASE");
        let r = &mut self.vrings[index as usize];
        r.enabled = false;
        Ok(VhostUserVringState::new(index, r.last_avail as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log.push("SET_VRING_KICK");
        self.vrings[index as usize].kick = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log.push("SET_VRING_CALL");
        self.vrings[index as usize].call = fd;
        Ok(())
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        self.log.push("GET_PROTOCOL_FEATURES");
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG)
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.log.push("SET_PROTOCOL_FEATURES");
        self.protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        self.log.push("GET_QUEUE_NUM");
        Ok(self.vrings.len() as u64)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.log.push("SET_VRING_ENABLE");
        self.vrings[index as usize].enabled = enable;
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(8)
    }
    unsupported! {
        reset_device() -> ();
        set_vring_err(u8, Option<File>) -> ();
        get_config(u32, u32, VhostUserConfigFlags) -> Vec<u8>;
        set_config(u32, &[u8], VhostUserConfigFlags) -> ();
        set_gpu_socket(GpuBackend) -> ();
        get_shared_object(VhostUserSharedMsg) -> File;
        get_inflight_fd(&VhostUserInflight) -> (VhostUserInflight, File);
        set_inflight_fd(&VhostUserInflight, File) -> ();
        add_mem_region(&VhostUserSingleMemoryRegion, File, Option<bool>)
            -> Option<VhostUserMemoryRegionBase>;
        remove_mem_region(&VhostUserSingleMemoryRegion) -> ();
        set_device_state_fd(VhostTransferStateDirection, VhostTransferStatePhase, File)
            -> Option<File>;
        check_device_state() -> ();
        get_shmem_config() -> VhostUserShMemConfig;
        set_log_base(&VhostUserLog, File) -> ();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::guest::{
        eth_frame, GuestError, NetGuest, NetGuestConfig, GUEST_PHYS_BASE, NET_HDR_LEN, REGION_GAP,
        TX_BUF_LEN,
    };

    fn sock(name: &str) -> std::path::PathBuf {
        crate::temp_dir(&format!("guest-{name}"))
            .unwrap()
            .join("port.sock")
    }

    fn up(name: &str, dev: Loopback, cfg: NetGuestConfig) -> (NetGuest, Shared) {
        let path = sock(name);
        let (shared, _t) = dev.serve(&path);
        let g = NetGuest::connect(&path, cfg).unwrap();
        (g, shared)
    }

    fn frame(n: u32, len: usize) -> Vec<u8> {
        let mut p = n.to_be_bytes().to_vec();
        p.extend((0..len.saturating_sub(18)).map(|i| (i as u32 ^ n) as u8));
        eth_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 0x88b5, &p)
    }

    #[test]
    fn protocol_sequence_and_addresses() {
        let (mut g, dev) = up("seq", Loopback::full(1), NetGuestConfig::default());
        let d = dev.lock().unwrap();
        let mut want = vec![
            "SET_OWNER",
            "GET_FEATURES",
            "SET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "SET_MEM_TABLE",
        ];
        for _ in 0..2 {
            want.extend([
                "SET_VRING_NUM",
                "SET_VRING_ADDR",
                "SET_VRING_BASE",
                "SET_VRING_CALL",
                "SET_VRING_KICK",
            ]);
        }
        want.extend(["SET_VRING_ENABLE", "SET_VRING_ENABLE"]);
        assert_eq!(d.log, want);
        assert_eq!(
            d.acked,
            F_VERSION_1 | F_PROTOCOL | F_MRG_RXBUF | F_EVENT_IDX
        );
        assert_eq!(g.features(), d.acked);
        let pf = VhostUserProtocolFeatures::from_bits_truncate(d.protocol);
        assert_eq!(
            pf,
            VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        );
        assert_eq!(d.regions.len(), 1);
        assert_eq!(d.regions[0].gpa, GUEST_PHYS_BASE);
        let host = g.memory().host_addr(GUEST_PHYS_BASE, 1).unwrap();
        assert_eq!(d.regions[0].user_addr, host);
        // Ring addresses are the frontend's virtual addresses, not GPAs.
        let l = g.raw_tx().layout();
        let r = &d.vrings[1];
        assert_eq!(r.num, 256);
        assert_eq!(r.desc, g.memory().host_addr(l.desc, 1).unwrap());
        assert_eq!(r.avail, g.memory().host_addr(l.avail, 1).unwrap());
        assert_eq!(r.used, g.memory().host_addr(l.used, 1).unwrap());
        assert!(d.vrings.iter().all(|r| r.enabled && r.call.is_some()));
        // RX ring was full before enabling, and the device was told.
        assert_eq!(d.avail_idx(0), 256);
        assert_eq!(g.kicks(0), 1);
        drop(d);
        assert_eq!(g.get_vring_base(1).unwrap(), 0);
    }

    #[test]
    fn loopback_send_and_receive() {
        let (mut g, dev) = up("loop", Loopback::full(1), NetGuestConfig::default());
        let f = frame(1, 60);
        g.send(&f).unwrap();
        assert_eq!(g.tx_in_flight(), 1);
        assert_eq!(g.try_recv(), None);
        assert_eq!(dev.lock().unwrap().step(), 1);
        assert_eq!(g.rx_pending(), 1);
        assert_eq!(g.try_recv().unwrap(), f);
        assert_eq!(g.rx_pending(), 0);
        assert_eq!(g.reclaim_tx(), 1);
        assert_eq!(g.tx_in_flight(), 0);

        // A burst, received without allocation.
        let fs: Vec<Vec<u8>> = (0..10).map(|i| frame(i, 64 + i as usize)).collect();
        let refs: Vec<&[u8]> = fs.iter().map(Vec::as_slice).collect();
        assert_eq!(g.send_burst(&refs), 10);
        assert_eq!(dev.lock().unwrap().step(), 10);
        let mut buf = [0u8; 2048];
        for f in &fs {
            let n = g.recv_into(&mut buf).unwrap();
            assert_eq!(&buf[..n], f.as_slice());
        }
        assert_eq!(g.recv_into(&mut buf), None);

        // Chains: header alone first, and a frame in three pieces.
        let f = frame(99, 300);
        g.send_chain(&[&[], &f]).unwrap();
        g.send_chain(&[&f[..10], &f[10..100], &f[100..]]).unwrap();
        assert_eq!(dev.lock().unwrap().step(), 2);
        assert_eq!(g.try_recv().unwrap(), f);
        assert_eq!(g.try_recv().unwrap(), f);
        g.reclaim_tx();
        assert_eq!(g.tx_in_flight(), 0);

        // Too large for a TX slot.
        let big = vec![0u8; TX_BUF_LEN - NET_HDR_LEN + 1];
        assert!(matches!(
            g.send(&big),
            Err(GuestError::FrameTooLarge { .. })
        ));
        assert_eq!(g.device_errors(), 0);
        assert_eq!(dev.lock().unwrap().dropped, 0);
    }

    #[test]
    fn mergeable_buffers_span_frames() {
        let cfg = NetGuestConfig {
            rx_buf_len: 256,
            queue_size: 16,
            ..Default::default()
        };
        let (mut g, dev) = up("mrg", Loopback::full(1), cfg);
        for len in [1000, 3000, 244, 245, 60] {
            let f = frame(len as u32, len);
            g.send(&f).unwrap();
            assert_eq!(dev.lock().unwrap().step(), 1);
            let bufs = (NET_HDR_LEN + f.len()).div_ceil(256);
            assert_eq!(g.rx_pending(), bufs, "len {len}");
            assert_eq!(g.try_recv().unwrap(), f, "len {len}");
            // Truncating receive still reports the length.
            g.send(&f).unwrap();
            dev.lock().unwrap().step();
            let mut small = [0u8; 100];
            assert_eq!(g.recv_into(&mut small), Some(f.len()));
            let n = f.len().min(100);
            assert_eq!(&small[..n], &f[..n]);
        }
        assert_eq!(dev.lock().unwrap().dropped, 0);
        assert_eq!(g.device_errors(), 0);
    }

    #[test]
    fn without_mrg_and_event_idx() {
        let cfg = NetGuestConfig {
            mrg_rxbuf: false,
            event_idx: false,
            ..Default::default()
        };
        let dev = Loopback::new(F_VERSION_1 | F_PROTOCOL, 1);
        let (mut g, dev) = up("plain", dev, cfg);
        assert_eq!(g.features(), F_VERSION_1 | F_PROTOCOL);
        for i in 0..600 {
            let f = frame(i, 1514);
            g.send(&f).unwrap();
            dev.lock().unwrap().step();
            assert_eq!(g.try_recv().unwrap(), f);
        }
        // Too big for one 2048-byte RX buffer: the device drops it.
        g.send(&frame(7, 3000)).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv(), None);
        assert_eq!(dev.lock().unwrap().dropped, 1);
    }

    #[test]
    fn indices_wrap_past_65535_end_to_end() {
        let cfg = NetGuestConfig {
            queue_size: 64,
            ..Default::default()
        };
        let (mut g, dev) = up("wrap", Loopback::full(1), cfg);
        let fs: Vec<Vec<u8>> = (0..32).map(|i| frame(i, 60 + i as usize)).collect();
        let refs: Vec<&[u8]> = fs.iter().map(Vec::as_slice).collect();
        let mut buf = [0u8; 256];
        let mut total = 0u32;
        while total < 70_000 {
            assert_eq!(g.send_burst(&refs), 32);
            assert_eq!(dev.lock().unwrap().step(), 32);
            for f in &fs {
                let n = g.recv_into(&mut buf).unwrap();
                assert_eq!(&buf[..n], f.as_slice());
            }
            total += 32;
        }
        // Every index went once round the 16-bit space and a bit more.
        let wrapped = (total % 65536) as u16;
        assert_eq!(g.raw_tx().avail_idx(), wrapped);
        assert_eq!(g.raw_tx().used_idx(), wrapped);
        assert_eq!(g.raw_rx().used_idx(), wrapped);
        assert_eq!(g.raw_rx().avail_idx(), wrapped + 64);
        g.reclaim_tx();
        assert_eq!(g.tx_in_flight(), 0);
        assert_eq!(g.device_errors(), 0);
        assert_eq!(dev.lock().unwrap().dropped, 0);
    }

    #[test]
    fn ring_full_and_paused_refill() {
        let cfg = NetGuestConfig {
            queue_size: 8,
            ..Default::default()
        };
        let (mut g, dev) = up("full", Loopback::full(1), cfg);
        let f = frame(0, 60);
        for _ in 0..8 {
            g.send(&f).unwrap();
        }
        assert!(matches!(g.send(&f), Err(GuestError::RingFull)));
        assert_eq!(g.send_burst(&[&f]), 0);
        assert!(matches!(
            g.send_chain(&[&f[..1], &f[1..]]),
            Err(GuestError::RingFull)
        ));
        assert_eq!(dev.lock().unwrap().step(), 8);
        for _ in 0..8 {
            assert_eq!(g.try_recv().unwrap(), f);
        }
        g.send(&f).unwrap(); // reclaims first
        assert_eq!(g.tx_in_flight(), 1);
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv().unwrap(), f);

        // A guest that stops refilling: 8 buffers, then drops.
        g.set_rx_refill(false);
        for _ in 0..12 {
            g.send(&f).unwrap();
            dev.lock().unwrap().step();
        }
        assert_eq!(g.rx_pending(), 8);
        assert_eq!(dev.lock().unwrap().dropped, 4);
        for _ in 0..8 {
            assert_eq!(g.try_recv().unwrap(), f);
        }
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv(), None);
        assert_eq!(dev.lock().unwrap().dropped, 5);
        g.set_rx_refill(true);
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv().unwrap(), f);
        assert_eq!(g.device_errors(), 0);
    }

    #[test]
    fn recv_timeout_sleeps_until_called() {
        let (mut g, dev) = up("timeout", Loopback::full(1), NetGuestConfig::default());
        let t0 = Instant::now();
        assert_eq!(g.recv_timeout(Duration::from_millis(50)), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // With interrupts disabled, delivering does not signal.
        let f = frame(5, 100);
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(dev.lock().unwrap().vrings[0].signals, 0);
        assert_eq!(g.recv_timeout(Duration::from_secs(10)).unwrap(), f);
        // Now the frame arrives while the guest sleeps.
        g.send(&f).unwrap();
        let d2 = dev.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            d2.lock().unwrap().step()
        });
        assert_eq!(g.recv_timeout(Duration::from_secs(20)).unwrap(), f);
        assert_eq!(t.join().unwrap(), 1);
        assert_eq!(dev.lock().unwrap().vrings[0].signals, 1);
    }

    #[test]
    fn multi_region_memory() {
        let cfg = NetGuestConfig {
            mem_regions: 3,
            ..Default::default()
        };
        let (mut g, dev) = up("regions", Loopback::full(1), cfg);
        {
            let d = dev.lock().unwrap();
            assert_eq!(d.regions.len(), 3);
            for w in d.regions.windows(2) {
                assert_eq!(w[1].gpa, w[0].gpa + w[0].size + REGION_GAP);
            }
        }
        let fs: Vec<Vec<u8>> = (0..300).map(|i| frame(i, 60 + i as usize)).collect();
        for f in &fs {
            g.send(f).unwrap();
            dev.lock().unwrap().step();
            assert_eq!(&g.try_recv().unwrap(), f);
        }
        assert_eq!(dev.lock().unwrap().dropped, 0);
    }

    #[test]
    fn multiqueue_pairs() {
        let cfg = NetGuestConfig {
            queue_pairs: 2,
            ..Default::default()
        };
        let (mut g, dev) = up("mq", Loopback::full(2), cfg);
        assert_eq!(g.queue_pairs(), 2);
        assert!(dev.lock().unwrap().log.contains(&"GET_QUEUE_NUM"));
        let f = frame(3, 80);
        g.set_tx_queue_pair(1);
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.raw_queue(2).unwrap().used_idx(), 1);
        assert_eq!(g.raw_queue(0).unwrap().used_idx(), 0);
        assert_eq!(g.try_recv().unwrap(), f);

        // A backend without MQ cannot serve two pairs.
        let path = sock("nomq");
        let _b = Loopback::new(F_VERSION_1 | F_PROTOCOL, 2).serve(&path);
        let cfg = NetGuestConfig {
            queue_pairs: 2,
            ..Default::default()
        };
        assert!(matches!(
            NetGuest::connect(&path, cfg),
            Err(GuestError::Unsupported(_))
        ));
    }

    #[test]
    fn raw_injection_and_device_errors() {
        let (mut g, dev) = up("raw", Loopback::full(1), NetGuestConfig::default());
        let f = frame(8, 70);
        // Hand-built TX chain from a scratch buffer.
        let mut raw = g.raw_tx();
        let d = raw.alloc_desc().unwrap();
        let buf = raw.scratch(NET_HDR_LEN + f.len());
        raw.memory().write(buf + NET_HDR_LEN as u64, &f).unwrap();
        raw.write_desc(d, buf, (NET_HDR_LEN + f.len()) as u32, 0, 0);
        raw.push_avail(d);
        // A descriptor outside guest memory: the device drops it.
        let e = raw.alloc_desc().unwrap();
        let hole = raw.memory().end() + 0x1000;
        raw.write_desc(e, hole, 64, 0, 0);
        raw.push_avail(e);
        let idx = raw.avail_idx();
        raw.set_avail_idx(idx);
        raw.kick();
        assert_eq!(dev.lock().unwrap().step(), 1);
        assert_eq!(dev.lock().unwrap().dropped, 1);
        assert_eq!(g.try_recv().unwrap(), f);
        // Both raw descriptors come back through the normal reclaim.
        assert_eq!(g.reclaim_tx(), 2);
        assert_eq!(g.tx_in_flight(), 0);
        assert_eq!(g.device_errors(), 0);
        // Normal traffic continues after raw use.
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv().unwrap(), f);
        // A device returning a TX descriptor it does not own.
        dev.lock().unwrap().bogus_used(1, 200, 0);
        g.reclaim_tx();
        assert_eq!(g.device_errors(), 1);
        // An RX used entry longer than the buffer is dropped and counted.
        dev.lock().unwrap().bogus_used(0, 5, 4096);
        assert_eq!(g.try_recv(), None);
        assert_eq!(g.device_errors(), 2);
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv().unwrap(), f);
    }

    #[test]
    fn kicks_follow_avail_event() {
        let (mut g, dev) = up("kicks", Loopback::full(1), NetGuestConfig::default());
        let f = frame(1, 60);
        // avail_event 0 was crossed by the first send...
        g.send(&f).unwrap();
        assert_eq!(g.kicks(1), 1);
        // ...then the device asks for a kick only past index 5.
        dev.lock().unwrap().set_avail_event(1, 5);
        for _ in 0..4 {
            g.send(&f).unwrap();
        }
        assert_eq!(g.kicks(1), 1);
        g.send(&f).unwrap(); // 5 -> 6 crosses 5
        assert_eq!(g.kicks(1), 2);
        assert_eq!(g.kick_fd(1).unwrap().read().unwrap(), 2);
    }

    #[test]
    fn connect_waits_for_the_socket() {
        let path = sock("late");
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            Loopback::full(1).serve(&p2)
        });
        let g = NetGuest::connect(&path, NetGuestConfig::default()).unwrap();
        let (dev, _) = t.join().unwrap();
        assert_eq!(dev.lock().unwrap().log.last(), Some(&"SET_VRING_ENABLE"));
        g.disconnect();
    }

    #[test]
    fn accept_a_backend_in_client_mode() {
        let path = sock("client");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            NetGuest::accept(
                &listener,
                NetGuestConfig::default(),
                Duration::from_millis(30)
            ),
            Err(GuestError::Timeout)
        ));
        let dev: Shared = Arc::new(Mutex::new(Loopback::full(1)));
        let d2 = dev.clone();
        let p2 = path.clone();
        std::thread::spawn(move || {
            let mut h =
                vhost::vhost_user::BackendReqHandler::connect(p2.to_str().unwrap(), d2).unwrap();
            while h.handle_request().is_ok() {}
        });
        let mut g = NetGuest::accept(
            &listener,
            NetGuestConfig::default(),
            Duration::from_secs(10),
        )
        .unwrap();
        let f = frame(4, 90);
        g.send(&f).unwrap();
        dev.lock().unwrap().step();
        assert_eq!(g.try_recv().unwrap(), f);
    }

    #[test]
    fn missing_features_are_refused() {
        let path = sock("nov1");
        let _b = Loopback::new(F_PROTOCOL | F_MRG_RXBUF, 1).serve(&path);
        assert!(matches!(
            NetGuest::connect(&path, NetGuestConfig::default()),
            Err(GuestError::Unsupported(_))
        ));
    }
}
