//! The vhost-user-blk client: libblkio's `virtio-blk-vhost-user` driver (the
//! `blkio` crate, libblkio's own Rust implementation) on one virtqueue, with
//! a closed-loop job runner (a fixed number of requests always in flight).

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use crate::hist::Hist;
use crate::{stopped, BenchError};

/// Bytes at the start of the disk that the jobs never write: the data check
/// reads its pattern there.
pub const RESERVED: u64 = 1 << 20;
/// Offset of the block the data check writes and reads back.
const CHECK_WRITE_AT: u64 = 512 << 10;
/// Bytes the data check reads at offset 0.
const CHECK_READ_LEN: usize = 64 << 10;
/// Completions taken per `do_io` call at most.
const COMPLETIONS: usize = 64;
/// Longest time without any completion before the server is declared hung.
const STALL: Duration = Duration::from_secs(10);

/// The 8-byte word that a pre-filled image holds at byte offset `off`
/// (a multiple of 8): distinct per offset, never zero.
pub fn pattern_word(off: u64) -> u64 {
    (off ^ 0x5a5a_5a5a_0000_0000) | 1
}

/// What a disk returns where nothing has been written by the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// The image's pre-fill: [`pattern_word`] at every 8-byte word.
    Pattern,
    /// Zeroes (qsd's `null-co` with `read-zeroes=on`), and writes vanish.
    Zeroes,
}

/// One measured workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// Short stable name, e.g. `randread-4k-qd1`.
    pub name: &'static str,
    /// Bytes per request.
    pub block: usize,
    /// Requests kept in flight.
    pub depth: usize,
    /// Random (uniform over the disk, block aligned) or sequential offsets.
    pub random: bool,
    /// Writes instead of reads.
    pub write: bool,
}

/// What one job measured over its window.
#[derive(Clone, Default)]
pub struct JobStats {
    /// Length of the window.
    pub secs: f64,
    /// Submission-to-completion latency of the requests completed in the
    /// window (one sample each).
    pub lat: Hist,
    /// Sum of those latencies, for the mean.
    pub lat_sum_ns: u64,
}

impl JobStats {
    /// Completed requests per second.
    pub fn iops(&self) -> f64 {
        self.lat.count() as f64 / self.secs.max(1e-9)
    }

    /// Mean latency in ns (0 without samples).
    pub fn mean_ns(&self) -> u64 {
        self.lat_sum_ns.checked_div(self.lat.count()).unwrap_or(0)
    }
}

/// A connected, started libblkio instance with one queue and a buffer region
/// mapped into the server.
pub struct Client {
    queue: Blkioq,
    region: MemoryRegion,
    capacity: u64,
    completions: Vec<MaybeUninit<Completion>>,
    /// The `Blkio` instance must outlive the queue and the region: dropped
    /// last (fields drop in declaration order).
    _blkio: Blkio,
}

fn blkio_err(what: &str) -> impl FnOnce(blkio::Error) -> BenchError + '_ {
    move |source| BenchError::Blkio {
        what: what.to_string(),
        source,
    }
}

impl Client {
    /// Connect to the vhost-user-blk socket `path` and set up one queue of
    /// `queue_size` entries (completions signalled through an eventfd, as a
    /// guest's interrupt; or, with `poll`, busy-polled) and a buffer region
    /// of `buf_len` bytes.
    pub fn connect(
        path: &Path,
        queue_size: i32,
        poll: bool,
        buf_len: usize,
    ) -> Result<Client, BenchError> {
        let path_str = path.to_str().ok_or_else(|| BenchError::Setup {
            what: format!("socket path {} is not UTF-8", path.display()),
        })?;
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("new"))?;
        b.set_str("path", path_str).map_err(blkio_err("set path"))?;
        b.connect().map_err(blkio_err("connect"))?;
        b.set_i32("queue-size", queue_size)
            .map_err(blkio_err("set queue-size"))?;
        let (interrupt, polled) = if poll { (0, 1) } else { (1, 0) };
        b.set_i32("num-queues", interrupt)
            .map_err(blkio_err("set num-queues"))?;
        b.set_i32("num-poll-queues", polled)
            .map_err(blkio_err("set num-poll-queues"))?;
        let capacity = b.get_u64("capacity").map_err(blkio_err("get capacity"))?;
        let mut started = b.start().map_err(blkio_err("start"))?;
        let queue = if poll {
            started.poll_queues.pop()
        } else {
            started.queues.pop()
        }
        .ok_or_else(|| BenchError::Setup {
            what: "libblkio started without a queue".into(),
        })?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(blkio_err("get mem-region-alignment"))?
            .max(1) as usize;
        let len = buf_len.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(len)
            .map_err(blkio_err("alloc_mem_region"))?;
        b.map_mem_region(&region)
            .map_err(blkio_err("map_mem_region"))?;
        Ok(Client {
            queue,
            region,
            capacity,
            completions: (0..COMPLETIONS).map(|_| MaybeUninit::uninit()).collect(),
            _blkio: b,
        })
    }

    /// The buffer region as bytes.
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes of a shared mapping that libblkio
        // allocated and keeps mapped while `self._blkio` lives; no request is
        // in flight when this is called (the callers run one request at a
        // time and wait for its completion), so the server does not write it
        // concurrently.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Run one request at offset `start` on the first `len` bytes of the
    /// buffer and wait for it.
    fn one(&mut self, write: bool, start: u64, len: usize) -> Result<(), BenchError> {
        if len > self.region.len {
            return Err(BenchError::Setup {
                what: format!("{len} bytes do not fit the {}-byte buffer", self.region.len),
            });
        }
        let buf = self.region.addr as *mut u8;
        if write {
            self.queue.write(start, buf, len, 0, ReqFlags::empty());
        } else {
            self.queue.read(start, buf, len, 0, ReqFlags::empty());
        }
        let mut done = 0;
        let since = Instant::now();
        while done == 0 {
            done = self.reap(1, since)?;
        }
        Ok(())
    }

    /// Check that the disk returns what it holds: the pre-fill (or zeroes)
    /// at offset 0, and, on a disk that keeps writes, a written block when
    /// read back. Catches a server that answers without moving data.
    pub fn check_data(&mut self, contents: Contents) -> Result<(), BenchError> {
        if self.capacity < RESERVED * 2 {
            return Err(BenchError::Data(format!(
                "disk of {} bytes is too small (at least {} needed)",
                self.capacity,
                RESERVED * 2
            )));
        }
        self.buf()[..CHECK_READ_LEN].fill(0xee);
        self.one(false, 0, CHECK_READ_LEN)?;
        for (i, w) in self.buf()[..CHECK_READ_LEN].chunks_exact(8).enumerate() {
            let off = (i * 8) as u64;
            let got = u64::from_le_bytes(<[u8; 8]>::try_from(w).unwrap_or_default());
            let want = match contents {
                Contents::Pattern => pattern_word(off),
                Contents::Zeroes => 0,
            };
            if got != want {
                return Err(BenchError::Data(format!(
                    "read at offset {off}: {got:#x}, expected {want:#x}"
                )));
            }
        }
        if contents == Contents::Pattern {
            // A byte that the block does not hold now, so that a server that
            // drops writes cannot pass.
            self.one(false, CHECK_WRITE_AT, 4096)?;
            let stamp = self.buf()[0].wrapping_add(1) | 0x80;
            self.buf()[..4096].fill(stamp);
            self.one(true, CHECK_WRITE_AT, 4096)?;
            self.buf()[..4096].fill(0);
            self.one(false, CHECK_WRITE_AT, 4096)?;
            if let Some(p) = self.buf()[..4096].iter().position(|&b| b != stamp) {
                return Err(BenchError::Data(format!(
                    "a 4 KiB block written at offset {CHECK_WRITE_AT} reads back \
                     {:#x} at byte {p}, expected {stamp:#x}",
                    self.buf()[p]
                )));
            }
        }
        Ok(())
    }

    /// Wait for at least `min` completions (1 s at a time, so that a signal
    /// or a hung server is noticed); returns how many arrived, with their
    /// `user_data` in `self.completions`. A failed request is an error.
    fn reap(&mut self, min: usize, last_progress: Instant) -> Result<usize, BenchError> {
        let mut timeout = Duration::from_secs(1);
        match self
            .queue
            .do_io(&mut self.completions, min, Some(&mut timeout), None)
        {
            Ok(n) => {
                for c in &self.completions[..n] {
                    // SAFETY: do_io initialised the first `n` entries.
                    let c = unsafe { c.assume_init_ref() };
                    if c.ret != 0 {
                        return Err(BenchError::Request {
                            user_data: c.user_data,
                            errno: Errno::from_raw_os_error(-c.ret),
                        });
                    }
                }
                Ok(n)
            }
            Err(e) if e.errno() == Errno::TIME || e.errno() == Errno::INTR => {
                if stopped() {
                    Err(BenchError::Interrupted)
                } else if last_progress.elapsed() > STALL {
                    Err(BenchError::Stalled(STALL))
                } else {
                    Ok(0)
                }
            }
            Err(e) => Err(BenchError::Blkio {
                what: "do_io".into(),
                source: e,
            }),
        }
    }

    /// Run `job` for `warmup` then measure it for `window`. Offsets stay in
    /// `[RESERVED, capacity)`; each of the `depth` slots has its own buffer.
    pub fn run(
        &mut self,
        job: &Job,
        warmup: Duration,
        window: Duration,
        seed: u64,
    ) -> Result<JobStats, BenchError> {
        let slots = job.depth;
        if slots * job.block > self.region.len {
            return Err(BenchError::Setup {
                what: format!(
                    "{}: {slots} x {} bytes do not fit the {}-byte buffer region",
                    job.name, job.block, self.region.len
                ),
            });
        }
        let block = job.block as u64;
        let blocks = self.capacity.saturating_sub(RESERVED) / block;
        if blocks == 0 {
            return Err(BenchError::Setup {
                what: format!(
                    "{}: the disk has no block past its first {RESERVED} bytes",
                    job.name
                ),
            });
        }
        let mut rng = seed | 1;
        let mut seq = 0u64;
        let mut next_offset = || {
            let n = if job.random {
                // xorshift64
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            } else {
                seq = (seq + 1) % blocks;
                seq
            };
            RESERVED + n * block
        };

        let base = self.region.addr;
        let mut submitted_at = vec![Instant::now(); slots];
        let submit = |q: &mut Blkioq, slot: usize, off: u64| {
            let buf = (base + slot * job.block) as *mut u8;
            if job.write {
                q.write(off, buf, job.block, slot, ReqFlags::empty());
            } else {
                q.read(off, buf, job.block, slot, ReqFlags::empty());
            }
        };
        for (slot, t) in submitted_at.iter_mut().enumerate() {
            *t = Instant::now();
            submit(&mut self.queue, slot, next_offset());
        }

        let start = Instant::now();
        let measure_from = start + warmup;
        let end = measure_from + window;
        let mut stats = JobStats::default();
        let mut last_progress = start;
        let mut in_flight = slots;
        let mut draining = false;
        while in_flight > 0 {
            let n = self.reap(1, last_progress)?;
            if n == 0 {
                continue;
            }
            let now = Instant::now();
            last_progress = now;
            draining |= now >= end;
            let measuring = now >= measure_from && !draining;
            for i in 0..n {
                // SAFETY: reap returned `n` initialised completions.
                let slot = unsafe { self.completions[i].assume_init_ref() }.user_data;
                let Some(t) = submitted_at.get_mut(slot) else {
                    return Err(BenchError::UnknownCompletion(slot));
                };
                if measuring {
                    let ns = now.duration_since(*t).as_nanos() as u64;
                    stats.lat.record(ns);
                    stats.lat_sum_ns += ns;
                }
                if draining {
                    in_flight -= 1;
                } else {
                    *t = now;
                    submit(&mut self.queue, slot, next_offset());
                }
            }
        }
        stats.secs = window.as_secs_f64();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_never_zero_and_differs_per_word() {
        let words: Vec<u64> = (0..4096).map(|i| pattern_word(8 * i)).collect();
        assert!(words.iter().all(|&w| w != 0));
        let mut sorted = words.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), words.len());
    }
}
