//! What the disk tests (`blk.rs`, `blk_hostile.rs`) share: a switch whose
//! run directory goes away with it, disks on image files with a known
//! background, the disk counters, and the driver's requests checked.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vioswitch_testkit::guest::blk::{BlkResult, VIRTIO_BLK_S_OK};
use vioswitch_testkit::guest::{BlkGuest, BlkGuestConfig, GuestError};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

/// Bound on every wait: only a hang reaches it.
pub const WAIT: Duration = Duration::from_secs(60);
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A recognisable byte pattern of `len` bytes for `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| (s >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8 ^ (i >> 11) as u8)
        .collect()
}

/// The background every image starts with: never zero, so that zeroes and
/// holes are visible.
pub fn background(len: usize) -> Vec<u8> {
    (0..len).map(|i| 0x80 | (i / 512 % 127) as u8).collect()
}

/// A request that must succeed.
pub fn ok(r: Result<BlkResult, GuestError>, what: &str) -> BlkResult {
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.status, VIRTIO_BLK_S_OK, "{what}: status");
    r
}

/// A disk added to the switch.
#[derive(Debug, Clone)]
pub struct TestDisk {
    pub name: String,
    pub path: PathBuf,
    pub sock: PathBuf,
}

/// A switch whose run directory (images included) is removed when it goes.
pub struct Rig {
    pub sw: SwitchProcess,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.sw.kill();
        let _ = std::fs::remove_dir_all(self.sw.run_dir());
    }
}

impl Rig {
    /// A switch with `workers` workers and extra arguments, logging to its
    /// run directory.
    pub fn new(workers: usize, args: &[&str]) -> Rig {
        let sw = SwitchProcess::spawn_logged(SwitchOptions {
            workers,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .expect("start vioswitch");
        Rig { sw }
    }

    /// An image file of `len` bytes holding [`background`].
    pub fn image(&self, file: &str, len: u64) -> PathBuf {
        let p = self.sw.run_dir().join(file);
        std::fs::write(&p, background(len as usize)).unwrap();
        p
    }

    /// A disk `name` on a fresh `len`-byte image, with more `disk.add`
    /// arguments in `extra` (an object).
    pub fn add_disk(&mut self, name: &str, len: u64, extra: Value) -> TestDisk {
        let path = self.image(&format!("{name}.img"), len);
        self.add_disk_on(name, &path, extra)
    }

    /// A disk `name` on an existing file.
    pub fn add_disk_on(&mut self, name: &str, path: &Path, extra: Value) -> TestDisk {
        let mut args = json!({ "name": name, "path": path });
        if let Value::Object(m) = extra {
            args.as_object_mut().unwrap().extend(m);
        }
        let info = self
            .sw
            .call("disk.add", args.clone())
            .unwrap_or_else(|e| panic!("disk.add {args}: {e}"));
        TestDisk {
            name: name.to_string(),
            path: path.to_path_buf(),
            sock: PathBuf::from(
                info["socket"]
                    .as_str()
                    .expect("disk.add answers its socket"),
            ),
        }
    }

    /// `disk.show`.
    pub fn show(&mut self, name: &str) -> Value {
        self.sw
            .call("disk.show", json!({ "name": name }))
            .unwrap_or_else(|e| panic!("disk.show {name}: {e}"))
    }

    /// `disk.stats`.
    pub fn stats(&mut self, name: &str) -> DiskCounters {
        let v = self
            .sw
            .call("disk.stats", json!({ "name": name }))
            .unwrap_or_else(|e| panic!("disk.stats {name}: {e}"));
        DiskCounters::from_json(&v)
    }
}

/// Connect a guest to a disk.
pub fn guest(d: &TestDisk, cfg: BlkGuestConfig) -> BlkGuest {
    BlkGuest::connect(&d.sock, cfg).unwrap_or_else(|e| panic!("guest on disk {}: {e}", d.name))
}

/// A disk's counters, as `disk.stats` answers them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub ops: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub in_flight: u64,
    pub broken: bool,
}

impl DiskCounters {
    pub fn from_json(v: &Value) -> Self {
        let map = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object()
                .unwrap_or_else(|| panic!("{k} in {v}"))
                .iter()
                .map(|(n, c)| (n.clone(), c.as_u64().expect("a count")))
                .collect()
        };
        DiskCounters {
            ops: map("ops"),
            bytes: map("bytes"),
            errors: map("errors"),
            in_flight: v["in_flight"].as_u64().expect("in_flight"),
            broken: v["broken"].as_bool().expect("broken"),
        }
    }

    pub fn op(&self, kind: &str) -> u64 {
        *self.ops.get(kind).unwrap_or_else(|| panic!("no op {kind}"))
    }

    pub fn bytes(&self, kind: &str) -> u64 {
        *self
            .bytes
            .get(kind)
            .unwrap_or_else(|| panic!("no bytes {kind}"))
    }

    /// The error counters that are not zero.
    pub fn nonzero_errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .filter(|(_, &n)| n != 0)
            .map(|(k, &n)| (k.clone(), n))
            .collect()
    }
}

/// The error counters `list` and nothing else.
pub fn errors(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
    list.iter().map(|&(k, n)| (k.to_string(), n)).collect()
}

/// `len` bytes of a file at `offset`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// Assert that `got == want` byte for byte, naming the first difference
/// (a megabyte of `assert_eq!` output helps nobody).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): {:#04x}, expected {:#04x}",
            i / 512,
            got[i],
            want[i]
        );
    }
}
