//! The thread-pool back end, for kernels where io_uring is not allowed: a
//! few threads per worker run the system calls and hand completions back
//! through a lock-free queue and an eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use crossbeam_queue::SegQueue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, IoEngineError, IoKind, IoOp};

/// Threads per worker.
const THREADS: usize = 4;

/// An operation on its way to a pool thread.
struct Job(IoOp);

// SAFETY: the raw iovec pointer in the operation is only dereferenced by the
// kernel on the pool thread while the submitter keeps it valid (the contract
// of `IoEngine::push`); nothing else in it is thread-bound.
unsafe impl Send for Job {}

struct Done {
    queue: SegQueue<Completion>,
    notify: EventFd,
}

pub(super) struct ThreadEngine {
    /// Jobs pushed since the last submit.
    pending: Vec<Job>,
    jobs: Option<Sender<Job>>,
    done: Arc<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    pub fn new() -> Result<Self, IoEngineError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let done = Arc::new(Done {
            queue: SegQueue::new(),
            notify: EventFd::new(EFD_NONBLOCK).map_err(IoEngineError::Threads)?,
        });
        let mut threads = Vec::with_capacity(THREADS);
        for i in 0..THREADS {
            let rx: Receiver<Job> = rx.clone();
            let done = done.clone();
            let t = std::thread::Builder::new()
                .name(format!("vioswitch-io-{i}"))
                .spawn(move || {
                    while let Ok(Job(op)) = rx.recv() {
                        let result = run(&op);
                        done.queue.push(Completion {
                            user_data: op.user_data,
                            result,
                        });
                        let _ = done.notify.write(1);
                    }
                })
                .map_err(IoEngineError::Threads)?;
            threads.push(t);
        }
        Ok(ThreadEngine {
            pending: Vec::with_capacity(super::ENGINE_DEPTH as usize),
            jobs: Some(tx),
            done,
            threads,
        })
    }

    pub fn push(&mut self, op: IoOp) {
        self.pending.push(Job(op));
    }

    pub fn submit(&mut self) {
        let Some(jobs) = &self.jobs else { return };
        for job in self.pending.drain(..) {
            // The receivers live as long as the engine.
            let _ = jobs.send(job);
        }
    }

    pub fn reap(&mut self, f: &mut impl FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(c) = self.done.queue.pop() {
            f(c);
            n += 1;
        }
        n
    }

    pub fn has_completions(&mut self) -> bool {
        !self.done.queue.is_empty()
    }

    pub fn notify_fd(&self) -> RawFd {
        self.done.notify.as_raw_fd()
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Run one operation; bytes transferred (0 for flush/fallocate) or -errno.
fn run(op: &IoOp) -> i32 {
    let iovcnt = op.iovcnt as libc::c_int;
    let off = op.offset as libc::off_t;
    // SAFETY: the submitter keeps the fd open and the iovec array and its
    // buffers valid until this completion is reaped (`IoEngine::push`).
    let r: isize = unsafe {
        match op.kind {
            IoKind::Read => libc::preadv(op.fd, op.iov, iovcnt, off),
            IoKind::Write { dsync } => libc::pwritev2(
                op.fd,
                op.iov,
                iovcnt,
                off,
                if dsync { libc::RWF_DSYNC } else { 0 },
            ),
            IoKind::Flush => libc::fdatasync(op.fd) as isize,
            IoKind::Fallocate { mode } => {
                libc::fallocate(op.fd, mode, off, op.len as libc::off_t) as isize
            }
        }
    };
    if r < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(r).unwrap_or(i32::MAX)
    }
}
