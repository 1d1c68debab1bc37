//! Disks under QoS: a vioswitch with one worker and one disk on a
//! page-cached raw image, and a closed-loop client (the project's
//! virtio-blk guest driver) that keeps a fixed number of 4 KiB random reads
//! in flight and counts completions per window.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::guest::{BlkGuest, BlkGuestConfig, BlkRequest};

use crate::net::set_qos;
use crate::{stopped, Daemon, QosBenchError};

/// Bytes per request.
pub const BLOCK: u32 = 4096;
/// Size of the image.
const IMAGE_BYTES: u64 = 256 << 20;
/// Longest time without a completion before the disk is declared hung
/// (a limit of 100 IOPS completes one request per 10 ms).
const STALL: Duration = Duration::from_secs(5);

/// Write a `IMAGE_BYTES` image at `path` (non-zero, so that reads are of
/// real blocks in the page cache).
pub fn make_image(path: &Path) -> Result<(), QosBenchError> {
    let io = |source| QosBenchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
    for _ in 0..IMAGE_BYTES >> 20 {
        f.write_all(&chunk).map_err(io)?;
    }
    f.sync_all().map_err(io)
}

/// vioswitch with disk `d0` and the client connected to it.
pub struct DiskRig {
    sw: Daemon,
    guest: BlkGuest,
    sectors: u64,
}

impl DiskRig {
    /// Start `binary` pinned to `core`, add `image` as disk `d0` and
    /// connect the client with `depth` requests' room from `client_core`.
    pub fn start(
        binary: &Path,
        image: &Path,
        depth: usize,
        core: usize,
        client_core: usize,
    ) -> Result<DiskRig, QosBenchError> {
        let mut sw = Daemon::start(binary, core, client_core)?;
        let args = json!({ "name": "d0", "path": image, "queues": 1 });
        let answer =
            sw.0.call("disk.add", args.clone())
                .map_err(|e| QosBenchError::switch(&format!("disk.add {args}"), e))?;
        let socket = answer
            .get("socket")
            .and_then(Value::as_str)
            .map_or_else(|| sw.0.run_dir().join("d0.sock"), PathBuf::from);
        // Each request takes three descriptors (header, data, status).
        let queue_size = (depth * 3).next_power_of_two().max(8);
        let cfg = BlkGuestConfig {
            queue_size: u16::try_from(queue_size)
                .map_err(|_| QosBenchError::Setup(format!("depth {depth} is too deep")))?,
            segment_size: BLOCK,
            mem_size: (16 << 20) + queue_size * BLOCK as usize,
            ..Default::default()
        };
        let guest = BlkGuest::connect(&socket, cfg).map_err(|source| QosBenchError::Guest {
            what: format!("connect {}", socket.display()),
            source,
        })?;
        let sectors = guest.config().capacity;
        if sectors < u64::from(BLOCK / 512) {
            return Err(QosBenchError::Setup(format!(
                "disk of {sectors} sectors is too small"
            )));
        }
        Ok(DiskRig { sw, guest, sectors })
    }

    /// The switch's process id.
    pub fn pid(&self) -> u32 {
        self.sw.0.pid()
    }

    /// `qos.set` on disk `d0`.
    pub fn set_qos(&mut self, spec: &Value) -> Result<(), QosBenchError> {
        set_qos(&mut self.sw.0, "d0", spec)
    }

    /// Keep `depth` random reads in flight for `warmup`, then for `windows`
    /// windows of `window`; returns (seconds, completions) per window.
    pub fn run(
        &mut self,
        depth: usize,
        warmup: Duration,
        window: Duration,
        windows: usize,
    ) -> Result<Vec<(f64, u64)>, QosBenchError> {
        let blocks = self.sectors / u64::from(BLOCK / 512);
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_sector = || {
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % blocks) * u64::from(BLOCK / 512)
        };
        let guest_err = |what: &str| {
            let what = what.to_string();
            move |source| QosBenchError::Guest { what, source }
        };
        for _ in 0..depth {
            self.guest
                .submit(0, &BlkRequest::read(next_sector(), BLOCK))
                .map_err(guest_err("submit"))?;
        }
        let mut out = Vec::with_capacity(windows);
        let t0 = Instant::now();
        let mut win_start = t0 + warmup;
        let mut measuring = false;
        let mut count = 0u64;
        let mut last_progress = t0;
        loop {
            if stopped() {
                return Err(QosBenchError::Interrupted);
            }
            let done = self.guest.poll_completions(0).map_err(guest_err("poll"))?;
            let now = Instant::now();
            if !measuring && now >= win_start {
                measuring = true;
                count = 0;
                win_start = now;
            } else if measuring && now >= win_start + window {
                out.push((now.duration_since(win_start).as_secs_f64(), count));
                count = 0;
                win_start = now;
                if out.len() == windows {
                    break;
                }
            }
            if done.is_empty() {
                if now.duration_since(last_progress) > STALL {
                    return Err(QosBenchError::Setup(format!(
                        "no completion from the disk for {STALL:?}"
                    )));
                }
                continue;
            }
            last_progress = now;
            for c in &done {
                if !c.result.is_ok() {
                    return Err(QosBenchError::Setup(format!(
                        "read {} failed with status {}",
                        c.tag, c.result.status
                    )));
                }
                count += 1;
                self.guest
                    .submit(0, &BlkRequest::read(next_sector(), BLOCK))
                    .map_err(guest_err("submit"))?;
            }
        }
        Ok(out)
    }
}
