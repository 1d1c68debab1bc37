//! The file or block device behind a disk: opened once, checked, sized.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::SECTOR;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`, the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Why a backing could not be opened or resized.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("{0} does not exist; give the path of a raw image file or a block device")]
    Missing(PathBuf),
    #[error("{0} is a directory; give the path of a raw image file or a block device")]
    Directory(PathBuf),
    #[error("{0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    #[error(
        "no permission to open {path} {mode}: check its owner and mode, or add it with --readonly"
    )]
    Permission { path: PathBuf, mode: &'static str },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the size of {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, not a multiple of the {block_size}-byte block size: resize it or pick --block-size 512")]
    NotAligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("block size must be 512 or 4096, got {0}")]
    BadBlockSize(u32),
    #[error("{path} has {device}-byte logical blocks: use --block-size {device} or larger")]
    BlockTooSmall { path: PathBuf, device: u32 },
    #[error("{0} is empty: a disk needs at least one block")]
    Empty(PathBuf),
    #[error("the disk is read-only: it cannot be resized")]
    ReadOnly,
    #[error("a block device is resized by its owner (e.g. lvextend); call resize without a size to pick up its new size")]
    DeviceResize,
    #[error("new size {size} is not a multiple of the {block_size}-byte block size")]
    SizeNotAligned { size: u64, block_size: u32 },
    #[error("shrinking from {from} to {to} bytes would cut data the guest may use; pass shrink to confirm")]
    Shrink { from: u64, to: u64 },
    #[error("cannot resize {path}: {source}")]
    Resize {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the backing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// How to open a backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    pub path: PathBuf,
    pub readonly: bool,
    /// `O_DIRECT`: bypass the host page cache.
    pub direct: bool,
    /// Logical block size offered to the guest: 512 or 4096.
    pub block_size: u32,
}

/// An open backing file or block device.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    kind: BackingKind,
    readonly: bool,
    direct: bool,
    block_size: u32,
    /// Physical block size of the device (or the block size for files).
    physical_block: u32,
    /// Memory alignment direct I/O needs (1 without direct I/O).
    mem_align: u32,
    /// Offset and length alignment direct I/O needs (1 without direct I/O).
    offset_align: u32,
    size: AtomicU64,
    /// Identity of the file: (device, inode), or the device number of a
    /// block device.
    identity: (u64, u64),
}

fn size_of(file: &File, kind: BackingKind) -> std::io::Result<u64> {
    match kind {
        BackingKind::File => Ok(file.metadata()?.len()),
        BackingKind::BlockDevice => {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(size)
        }
    }
}

/// Logical and physical block size of a block device.
fn device_blocks(file: &File) -> (u32, u32) {
    let (mut logical, mut physical): (libc::c_int, libc::c_uint) = (512, 512);
    // SAFETY: both ioctls write one int through a pointer to a live local;
    // on failure the defaults stay.
    unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut logical as *mut libc::c_int,
        );
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKPBSZGET,
            &mut physical as *mut libc::c_uint,
        );
    }
    (logical.max(512) as u32, physical.max(512))
}

/// Direct-I/O memory and offset alignment (`statx` `STATX_DIOALIGN`, Linux 6.1+).
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the fd itself; statx
    // writes only into `stx`, a live local of the right type.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

impl Backing {
    /// Open and check a backing.
    pub fn open(p: &DiskParams) -> Result<Self, BackingError> {
        let path = p.path.clone();
        if p.block_size != 512 && p.block_size != 4096 {
            return Err(BackingError::BadBlockSize(p.block_size));
        }
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackingError::Missing(path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(BackingError::Permission {
                    path,
                    mode: "(cannot even look at it)",
                })
            }
            Err(source) => return Err(BackingError::Open { path, source }),
        };
        let identity = if meta.file_type().is_block_device() {
            (meta.rdev(), 0)
        } else {
            (meta.dev(), meta.ino())
        };
        let kind = if meta.is_dir() {
            return Err(BackingError::Directory(path));
        } else if meta.is_file() {
            BackingKind::File
        } else if meta.file_type().is_block_device() {
            BackingKind::BlockDevice
        } else {
            return Err(BackingError::NotAFile(path));
        };
        let mut flags = libc::O_CLOEXEC;
        if p.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!p.readonly)
            .custom_flags(flags)
            .open(&path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::PermissionDenied => BackingError::Permission {
                    path: path.clone(),
                    mode: if p.readonly {
                        "for reading"
                    } else {
                        "for reading and writing"
                    },
                },
                _ => BackingError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let (device_logical, physical) = match kind {
            BackingKind::BlockDevice => device_blocks(&file),
            BackingKind::File => (512, p.block_size),
        };
        if p.block_size < device_logical {
            return Err(BackingError::BlockTooSmall {
                path,
                device: device_logical,
            });
        }
        let (mem_align, offset_align) = if p.direct {
            let (m, o) = dio_align(&file).unwrap_or((512, device_logical));
            if o > p.block_size {
                return Err(BackingError::BlockTooSmall { path, device: o });
            }
            // Direct I/O does no read-modify-write on the host: hold the
            // guest to the block size it is offered, even where the file
            // system would take smaller I/O.
            (m, o.max(p.block_size))
        } else {
            (1, 1)
        };
        let size = size_of(&file, kind).map_err(|source| BackingError::Size {
            path: path.clone(),
            source,
        })?;
        if size == 0 {
            return Err(BackingError::Empty(path));
        }
        if size % u64::from(p.block_size) != 0 {
            return Err(BackingError::NotAligned {
                path,
                size,
                block_size: p.block_size,
            });
        }
        Ok(Backing {
            file,
            path,
            kind,
            readonly: p.readonly,
            direct: p.direct,
            block_size: p.block_size,
            physical_block: physical.max(p.block_size),
            mem_align,
            offset_align,
            size: AtomicU64::new(size),
            identity,
        })
    }

    /// Whether both open the same file or device.
    pub fn same_file(&self, other: &Backing) -> bool {
        self.identity == other.identity
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn physical_block(&self) -> u32 {
        self.physical_block
    }

    /// Memory alignment every data buffer needs (1: none).
    #[inline]
    pub fn mem_align(&self) -> u32 {
        self.mem_align
    }

    /// Alignment of offsets and lengths (1: none).
    #[inline]
    pub fn offset_align(&self) -> u32 {
        self.offset_align
    }

    /// Capacity in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size() / SECTOR
    }

    /// Change the capacity. A file is grown (or, with `shrink`, cut) to
    /// `new_size`; a block device is only re-read (`new_size` must be None).
    /// Returns the new size in bytes.
    pub fn resize(&self, new_size: Option<u64>, shrink: bool) -> Result<u64, BackingError> {
        let size = match (self.kind, new_size) {
            (BackingKind::BlockDevice, Some(_)) => return Err(BackingError::DeviceResize),
            (_, None) => size_of(&self.file, self.kind).map_err(|source| BackingError::Size {
                path: self.path.clone(),
                source,
            })?,
            (BackingKind::File, Some(size)) => {
                if self.readonly {
                    return Err(BackingError::ReadOnly);
                }
                let current = self.size();
                if size < current && !shrink {
                    return Err(BackingError::Shrink {
                        from: current,
                        to: size,
                    });
                }
                if size == 0 || size % u64::from(self.block_size) != 0 {
                    return Err(BackingError::SizeNotAligned {
                        size,
                        block_size: self.block_size,
                    });
                }
                self.file
                    .set_len(size)
                    .map_err(|source| BackingError::Resize {
                        path: self.path.clone(),
                        source,
                    })?;
                size
            }
        };
        let size = size - size % u64::from(self.block_size);
        self.size.store(size, Ordering::Release);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(path: &Path) -> DiskParams {
        DiskParams {
            path: path.to_path_buf(),
            readonly: false,
            direct: false,
            block_size: 512,
        }
    }

    fn dir() -> PathBuf {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "vioswitch-backing-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_what_is_not_a_disk() {
        let d = dir();
        assert!(matches!(
            Backing::open(&params(&d.join("nope"))),
            Err(BackingError::Missing(_))
        ));
        assert!(matches!(
            Backing::open(&params(&d)),
            Err(BackingError::Directory(_))
        ));
        let odd = d.join("odd");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            Backing::open(&params(&odd)),
            Err(BackingError::NotAligned { .. })
        ));
        let empty = d.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Backing::open(&params(&empty)),
            Err(BackingError::Empty(_))
        ));
        let ok = d.join("ok");
        std::fs::write(&ok, vec![0u8; 4096]).unwrap();
        let mut p = params(&ok);
        p.block_size = 1024;
        assert!(matches!(
            Backing::open(&p),
            Err(BackingError::BadBlockSize(1024))
        ));
        assert!(matches!(
            Backing::open(&params(Path::new("/dev/null"))),
            Err(BackingError::NotAFile(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn opens_sizes_and_resizes_a_file() {
        let d = dir();
        let f = d.join("disk.img");
        std::fs::write(&f, vec![0u8; 8192]).unwrap();
        let b = Backing::open(&params(&f)).unwrap();
        assert_eq!(b.size(), 8192);
        assert_eq!(b.sectors(), 16);
        assert_eq!(b.kind(), BackingKind::File);
        assert_eq!(b.resize(Some(16384), false).unwrap(), 16384);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 16384);
        assert!(matches!(
            b.resize(Some(4096), false),
            Err(BackingError::Shrink { .. })
        ));
        assert!(matches!(
            b.resize(Some(5000), true),
            Err(BackingError::SizeNotAligned { .. })
        ));
        assert_eq!(b.resize(Some(4096), true).unwrap(), 4096);
        // Grown behind our back: re-read.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(65536)
            .unwrap();
        assert_eq!(b.resize(None, false).unwrap(), 65536);
        let mut ro = params(&f);
        ro.readonly = true;
        let r = Backing::open(&ro).unwrap();
        assert!(matches!(
            r.resize(Some(131072), false),
            Err(BackingError::ReadOnly)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn direct_io_reports_its_alignment() {
        let d = dir();
        let f = d.join("direct.img");
        std::fs::write(&f, vec![0u8; 65536]).unwrap();
        let mut p = params(&f);
        p.direct = true;
        p.block_size = 4096;
        match Backing::open(&p) {
            Ok(b) => {
                assert!(b.direct());
                // Whatever the file system takes, the guest is held to
                // the 4096-byte blocks it is offered.
                assert_eq!(b.offset_align(), 4096);
                assert!(b.mem_align() >= 1);
            }
            // tmpfs and some others refuse O_DIRECT: a clear error.
            Err(BackingError::Open { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
