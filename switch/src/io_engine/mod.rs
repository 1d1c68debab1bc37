//! Asynchronous disk I/O for the dataplane workers.
//!
//! A worker queues operations ([`IoOp`]) while it walks its disks' rings,
//! submits them once per pass ([`IoEngine::submit`]: one system call for the
//! whole batch with io_uring), and collects completions without a system
//! call ([`IoEngine::reap`]). A completion also signals an eventfd
//! ([`IoEngine::notify_fd`]) so that a sleeping worker wakes up for it.
//!
//! Two back ends share the interface: io_uring where the kernel allows it,
//! and a small pool of threads doing `preadv2`/`pwritev2`/`fdatasync`/
//! `fallocate` where it does not (io_uring disabled by sysctl or seccomp).
//!
//! The engine never holds more than [`IoEngine::capacity`] operations, so
//! io_uring's completion queue cannot overflow; a worker that finds it full
//! leaves further requests in the guest's ring until completions free room.

mod threads;
mod uring;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

/// Operations one engine holds at most (submitted and not yet reaped).
pub const ENGINE_DEPTH: u32 = 1024;

/// Errors of the I/O engine.
#[derive(Debug, thiserror::Error)]
pub enum IoEngineError {
    #[error("cannot set up io_uring: {0} (io_uring may be disabled: check /proc/sys/kernel/io_uring_disabled, or use --io-engine threads)")]
    Uring(std::io::Error),
    #[error("cannot start I/O threads: {0}")]
    Threads(std::io::Error),
}

/// Which back end the workers use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if the kernel allows it, threads otherwise.
    #[default]
    Auto,
    /// io_uring only (fail at start if unavailable).
    Uring,
    /// A small thread pool per worker.
    Threads,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "threads" => Ok(EngineKind::Threads),
            _ => Err(format!(
                "unknown I/O engine {s:?}: use auto, uring or threads"
            )),
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// `preadv` into the iovecs.
    Read,
    /// `pwritev` from the iovecs; `dsync`: durable when it completes (`RWF_DSYNC`).
    Write { dsync: bool },
    /// `fdatasync`.
    Flush,
    /// `fallocate(mode, offset, len)`.
    Fallocate { mode: i32 },
}

/// One operation on a file.
#[derive(Debug, Clone, Copy)]
pub struct IoOp {
    pub kind: IoKind,
    pub fd: RawFd,
    pub offset: u64,
    /// Read and write: the iovec array.
    pub iov: *const libc::iovec,
    pub iovcnt: u32,
    /// Fallocate: the length of the range.
    pub len: u64,
    /// Returned with the completion.
    pub user_data: u64,
}

/// A finished operation: bytes transferred (or 0), or `-errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
}

/// The engine is holding [`IoEngine::capacity`] operations already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

// One engine per worker: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Uring(uring::UringEngine),
    Threads(threads::ThreadEngine),
}

/// A worker's I/O engine.
pub struct IoEngine {
    backend: Backend,
    in_flight: usize,
    capacity: usize,
}

impl IoEngine {
    /// Set up an engine of the given kind.
    pub fn new(kind: EngineKind) -> Result<Self, IoEngineError> {
        let backend = match kind {
            EngineKind::Uring => Backend::Uring(uring::UringEngine::new(ENGINE_DEPTH)?),
            EngineKind::Threads => Backend::Threads(threads::ThreadEngine::new()?),
            EngineKind::Auto => match uring::UringEngine::new(ENGINE_DEPTH) {
                Ok(u) => Backend::Uring(u),
                Err(e) => {
                    log::warn!("{e}; disks use a thread pool instead");
                    Backend::Threads(threads::ThreadEngine::new()?)
                }
            },
        };
        Ok(IoEngine {
            backend,
            in_flight: 0,
            capacity: ENGINE_DEPTH as usize,
        })
    }

    /// The back end's name, for statistics.
    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Uring(_) => "io_uring",
            Backend::Threads(_) => "threads",
        }
    }

    /// Operations held (queued, submitted, or completed and not yet reaped).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Most operations the engine holds at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `n` more operations fit.
    #[inline]
    pub fn has_room(&self, n: usize) -> bool {
        self.in_flight + n <= self.capacity
    }

    /// Queue an operation; it starts at the next [`IoEngine::submit`].
    ///
    /// # Safety
    ///
    /// `op.fd` must stay open, and for reads and writes the iovec array and
    /// every buffer it names must stay valid (mapped, and not used for
    /// anything else the kernel may not overwrite), until the operation's
    /// completion has been reaped.
    #[inline]
    pub unsafe fn push(&mut self, op: IoOp) -> Result<(), Full> {
        if self.in_flight >= self.capacity {
            return Err(Full);
        }
        match &mut self.backend {
            // SAFETY: the caller's contract is passed on unchanged.
            Backend::Uring(u) => unsafe { u.push(&op) }?,
            Backend::Threads(t) => t.push(op),
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Start everything queued since the last call.
    #[inline]
    pub fn submit(&mut self) {
        match &mut self.backend {
            Backend::Uring(u) => u.submit(),
            Backend::Threads(t) => t.submit(),
        }
    }

    /// Hand every finished operation to `f`. Returns how many there were.
    #[inline]
    pub fn reap(&mut self, mut f: impl FnMut(Completion)) -> usize {
        let n = match &mut self.backend {
            Backend::Uring(u) => u.reap(&mut f),
            Backend::Threads(t) => t.reap(&mut f),
        };
        self.in_flight -= n;
        n
    }

    /// Whether a completion waits to be reaped.
    pub fn has_completions(&mut self) -> bool {
        match &mut self.backend {
            Backend::Uring(u) => u.has_completions(),
            Backend::Threads(t) => t.has_completions(),
        }
    }

    /// An eventfd that becomes readable when an operation completes.
    pub fn notify_fd(&self) -> RawFd {
        match &self.backend {
            Backend::Uring(u) => u.notify_fd(),
            Backend::Threads(t) => t.notify_fd(),
        }
    }

    /// Reset the notification eventfd's counter.
    pub fn clear_notify(&self) {
        let fd = self.notify_fd();
        let mut v = 0u64;
        // SAFETY: an 8-byte read from a non-blocking eventfd this engine owns
        // into a local u64; a failure (EAGAIN) only means it was clear.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn wait_all(e: &mut IoEngine, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            e.reap(|c| out.push(c));
            assert!(Instant::now() < deadline, "completions did not arrive");
            std::thread::yield_now();
        }
        out
    }

    fn exercise(kind: EngineKind) {
        let mut e = IoEngine::new(kind).unwrap();
        let mut f = tempfile_with(&[7u8; 8192]);
        let fd = f.as_raw_fd();
        // Read 4 KiB at 4096 into two buffers.
        let mut a = vec![0u8; 1024];
        let mut b = vec![0u8; 3072];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let op = IoOp {
            kind: IoKind::Read,
            fd,
            offset: 4096,
            iov: iov.as_ptr(),
            iovcnt: 2,
            len: 0,
            user_data: 42,
        };
        // SAFETY: the file, iovecs and buffers outlive the wait below.
        unsafe { e.push(op).unwrap() };
        e.submit();
        let c = wait_all(&mut e, 1);
        assert_eq!(
            c,
            vec![Completion {
                user_data: 42,
                result: 4096
            }]
        );
        assert!(a.iter().chain(&b).all(|x| *x == 7));
        assert_eq!(e.in_flight(), 0);

        // Write, flush, punch a hole.
        let data = vec![9u8; 512];
        let wiov = [libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: 512,
        }];
        let ops = [
            IoOp {
                kind: IoKind::Write { dsync: true },
                fd,
                offset: 0,
                iov: wiov.as_ptr(),
                iovcnt: 1,
                len: 0,
                user_data: 1,
            },
            IoOp {
                kind: IoKind::Flush,
                fd,
                offset: 0,
                iov: std::ptr::null(),
                iovcnt: 0,
                len: 0,
                user_data: 2,
            },
            IoOp {
                kind: IoKind::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                },
                fd,
                offset: 4096,
                iov: std::ptr::null(),
                iovcnt: 0,
                len: 4096,
                user_data: 3,
            },
        ];
        for op in ops {
            // SAFETY: as above.
            unsafe { e.push(op).unwrap() };
        }
        e.submit();
        let mut c = wait_all(&mut e, 3);
        c.sort_by_key(|c| c.user_data);
        assert_eq!(c[0].result, 512);
        assert_eq!(c[1].result, 0);
        assert_eq!(c[2].result, 0);
        let content = std::fs::read(f.path()).unwrap();
        assert!(content[..512].iter().all(|x| *x == 9));
        assert!(content[4096..].iter().all(|x| *x == 0));

        // An error comes back as -errno.
        let bad = IoOp {
            kind: IoKind::Flush,
            fd: -1,
            offset: 0,
            iov: std::ptr::null(),
            iovcnt: 0,
            len: 0,
            user_data: 9,
        };
        // SAFETY: no buffers.
        unsafe { e.push(bad).unwrap() };
        e.submit();
        assert_eq!(wait_all(&mut e, 1)[0].result, -libc::EBADF);
        f.file.flush().unwrap();
    }

    struct TempFile {
        file: std::fs::File,
        path: std::path::PathBuf,
    }
    impl TempFile {
        fn path(&self) -> &std::path::Path {
            &self.path
        }
        fn as_raw_fd(&self) -> RawFd {
            self.file.as_raw_fd()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
    fn tempfile_with(data: &[u8]) -> TempFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vioswitch-io-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        TempFile { file, path }
    }

    #[test]
    fn uring_engine_reads_writes_flushes_and_punches() {
        exercise(EngineKind::Uring);
    }

    #[test]
    fn thread_engine_reads_writes_flushes_and_punches() {
        exercise(EngineKind::Threads);
    }

    #[test]
    fn a_full_engine_refuses_more() {
        let mut e = IoEngine::new(EngineKind::Threads).unwrap();
        let op = IoOp {
            kind: IoKind::Flush,
            fd: -1,
            offset: 0,
            iov: std::ptr::null(),
            iovcnt: 0,
            len: 0,
            user_data: 0,
        };
        for _ in 0..e.capacity() {
            // SAFETY: no buffers; fd -1 fails harmlessly.
            unsafe { e.push(op).unwrap() };
        }
        assert!(!e.has_room(1));
        // SAFETY: as above.
        assert_eq!(unsafe { e.push(op) }, Err(Full));
        e.submit();
        let n = e.capacity();
        wait_all(&mut e, n);
        assert!(e.has_room(n));
    }
}
