//! The queue of a port whose traffic to its guest is shaped: frames wait
//! here, in arrival order, for the port's tokens, within a byte budget.
//!
//! Frames are copied into one contiguous byte ring (allocated once when the
//! shaper is set), so queueing allocates nothing. The budget is shared
//! among the sources by weight: a source may hold at most
//! `budget × its weight / the weights of all sources holding bytes`, so when
//! several ports send to one shaped port faster than it drains, each keeps
//! a share of the queue, and so of the drained rate, in proportion to its
//! weight (the queue is served in order, so what a source gets out is what
//! it holds in). Frames over a source's share, or over the budget, are
//! dropped and counted (`egress_queue_full`).

use std::collections::VecDeque;

use crate::dataplane::MAX_PORTS;
use crate::fdb::PortIdx;

/// One queued frame.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    pub off: u32,
    pub len: u32,
    pub src: PortIdx,
    pub hash: u32,
    /// Identity generation when the frame was switched.
    pub gen: u32,
}

pub(super) struct EgressQueue {
    buf: Box<[u8]>,
    frames: VecDeque<Queued>,
    /// Offset just past the newest frame.
    end: u32,
    /// Bytes held (frames only, not the gap left by a wrap).
    held: u64,
    /// Bytes and weight of each source holding bytes.
    src_bytes: Box<[u32]>,
    src_weight: Box<[u16]>,
    /// Sum of the weights of the sources holding bytes.
    active_weight: u64,
}

impl EgressQueue {
    pub fn new(budget: u64) -> Self {
        let cap = budget.min(u64::from(u32::MAX)) as usize;
        EgressQueue {
            buf: vec![0u8; cap].into_boxed_slice(),
            frames: VecDeque::with_capacity(cap / 64 + 1),
            end: 0,
            held: 0,
            src_bytes: vec![0; MAX_PORTS].into_boxed_slice(),
            src_weight: vec![0; MAX_PORTS].into_boxed_slice(),
            active_weight: 0,
        }
    }

    pub fn budget(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The oldest frame.
    pub fn front(&self) -> Option<Queued> {
        self.frames.front().copied()
    }

    /// Where a frame of `len` bytes can go, if the ring has room.
    fn place(&self, len: u32) -> Option<u32> {
        let cap = self.buf.len() as u32;
        let Some(first) = self.frames.front() else {
            return (len <= cap).then_some(0);
        };
        let start = first.off;
        if self.end > start || (self.end == start && self.held == 0) {
            // Not wrapped: room after the end, or at the start.
            if self.end.checked_add(len).is_some_and(|e| e <= cap) {
                Some(self.end)
            } else if len < start {
                Some(0)
            } else {
                None
            }
        } else if self.end + len <= start {
            Some(self.end)
        } else {
            None
        }
    }

    /// Queue a frame from `src` (of weight `weight`), copied by `fill` into
    /// the slice given to it. False when over the source's share or the budget.
    pub fn push(
        &mut self,
        src: PortIdx,
        weight: u16,
        len: u32,
        hash: u32,
        gen: u32,
        fill: impl FnOnce(&mut [u8]),
    ) -> bool {
        let s = usize::from(src);
        if s >= MAX_PORTS || len == 0 {
            return false;
        }
        let weight = weight.max(1);
        let active = if self.src_bytes[s] == 0 {
            self.active_weight + u64::from(weight)
        } else {
            self.active_weight
        };
        let share = self.budget() * u64::from(weight) / active.max(1);
        if u64::from(self.src_bytes[s]) + u64::from(len) > share {
            return false;
        }
        let Some(off) = self.place(len) else {
            return false;
        };
        fill(&mut self.buf[off as usize..(off + len) as usize]);
        if self.src_bytes[s] == 0 {
            self.src_weight[s] = weight;
            self.active_weight += u64::from(weight);
        }
        self.src_bytes[s] += len;
        self.held += u64::from(len);
        self.end = off + len;
        self.frames.push_back(Queued {
            off,
            len,
            src,
            hash,
            gen,
        });
        true
    }

    /// The bytes of a queued frame.
    #[cfg(test)]
    pub fn bytes(&self, q: &Queued) -> &[u8] {
        &self.buf[q.off as usize..(q.off + q.len) as usize]
    }

    /// Drop the oldest frame (delivered or not).
    pub fn pop(&mut self) {
        let Some(q) = self.frames.pop_front() else {
            return;
        };
        let s = usize::from(q.src);
        self.src_bytes[s] -= q.len;
        if self.src_bytes[s] == 0 {
            self.active_weight -= u64::from(self.src_weight[s]);
        }
        self.held -= u64::from(q.len);
        if self.frames.is_empty() {
            self.end = 0;
        }
    }

    /// Take the buffer out (to read frames from it while the port is
    /// borrowed mutably), and put it back.
    pub fn take_buf(&mut self) -> Box<[u8]> {
        std::mem::take(&mut self.buf)
    }

    pub fn put_buf(&mut self, buf: Box<[u8]>) {
        self.buf = buf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &mut EgressQueue, src: PortIdx, w: u16, len: u32, byte: u8) -> bool {
        q.push(src, w, len, 0, 0, |b| b.fill(byte))
    }

    #[test]
    fn fifo_within_the_budget_and_wraps() {
        let mut q = EgressQueue::new(1000);
        assert!(push(&mut q, 1, 1, 400, 1));
        assert!(push(&mut q, 1, 1, 400, 2));
        assert!(!push(&mut q, 1, 1, 400, 3), "over the budget");
        assert_eq!(q.held(), 800);
        let f = q.front().unwrap();
        assert_eq!(q.bytes(&f)[0], 1);
        q.pop();
        // 600 free but only 200 after the end: wraps to the start.
        assert!(push(&mut q, 1, 1, 300, 3));
        assert_eq!(q.front().unwrap().off, 400);
        q.pop();
        let f = q.front().unwrap();
        assert_eq!((f.off, q.bytes(&f)[0]), (0, 3));
        q.pop();
        assert!(q.is_empty());
        assert_eq!(q.held(), 0);
        assert!(push(&mut q, 1, 1, 1000, 4), "an empty queue starts over");
    }

    #[test]
    fn sources_share_the_budget_by_weight() {
        let mut q = EgressQueue::new(4000);
        // Alone, a source may fill it all.
        for _ in 0..3 {
            assert!(push(&mut q, 1, 1, 1000, 1));
        }
        // A second source of weight 3 is entitled to 3/4 (3000 bytes), of
        // which 1000 are free now.
        assert!(push(&mut q, 2, 3, 1000, 2));
        assert!(!push(&mut q, 2, 3, 1000, 2), "the budget is full");
        // Source 1 holds 2000 after a pop, over its share (1000).
        q.pop();
        assert!(!push(&mut q, 1, 1, 1000, 1));
        q.pop();
        q.pop();
        // Both sources back: 1000 for source 1, 3000 for source 2.
        assert!(push(&mut q, 1, 1, 1000, 1));
        assert!(!push(&mut q, 1, 1, 1000, 1), "1000 is source 1's share");
        assert!(push(&mut q, 2, 3, 1000, 2));
        assert!(push(&mut q, 2, 3, 1000, 2));
        assert!(!push(&mut q, 2, 3, 1000, 2), "3000 is source 2's share");
        // Delivered in arrival order.
        let order: Vec<u8> = std::iter::from_fn(|| {
            let f = q.front()?;
            let b = q.bytes(&f)[0];
            q.pop();
            Some(b)
        })
        .collect();
        assert_eq!(order, vec![2, 1, 2, 2]);
        assert_eq!(q.held(), 0);
    }
}
