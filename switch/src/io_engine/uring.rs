//! The io_uring back end: one ring per worker, an eventfd registered for
//! completions.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Completion, Full, IoEngineError, IoKind, IoOp};

pub(super) struct UringEngine {
    ring: IoUring,
    notify: EventFd,
    /// Entries pushed to the submission queue since the last submit.
    queued: usize,
}

impl UringEngine {
    pub fn new(depth: u32) -> Result<Self, IoEngineError> {
        let ring = IoUring::builder()
            // Twice the entries: completions never overflow while at most
            // `depth` operations are held.
            .setup_cqsize(2 * depth)
            .build(depth)
            .map_err(IoEngineError::Uring)?;
        let notify = EventFd::new(EFD_NONBLOCK).map_err(IoEngineError::Uring)?;
        ring.submitter()
            .register_eventfd(notify.as_raw_fd())
            .map_err(IoEngineError::Uring)?;
        Ok(UringEngine {
            ring,
            notify,
            queued: 0,
        })
    }

    /// # Safety
    ///
    /// As [`super::IoEngine::push`].
    pub unsafe fn push(&mut self, op: &IoOp) -> Result<(), Full> {
        let fd = types::Fd(op.fd);
        let entry = match op.kind {
            IoKind::Read => opcode::Readv::new(fd, op.iov, op.iovcnt)
                .offset(op.offset)
                .build(),
            IoKind::Write { dsync } => opcode::Writev::new(fd, op.iov, op.iovcnt)
                .offset(op.offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Fallocate { mode } => opcode::Fallocate::new(fd, op.len)
                .offset(op.offset)
                .mode(mode)
                .build(),
        }
        .user_data(op.user_data);
        // SAFETY: the caller guarantees the fd and buffers stay valid until
        // the completion is reaped, which is what the kernel needs.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| Full)?;
        self.queued += 1;
        Ok(())
    }

    pub fn submit(&mut self) {
        if self.queued == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(n) => self.queued -= n.min(self.queued),
            // Out of kernel resources for now: the entries stay queued and
            // go with the next submit.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => log::error!("io_uring submit failed: {e}"),
        }
    }

    pub fn reap(&mut self, f: &mut impl FnMut(Completion)) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            f(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
            });
            n += 1;
        }
        n
    }

    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }
}
