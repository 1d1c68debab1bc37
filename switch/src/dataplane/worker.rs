//! One dataplane worker thread: owns the rings of its ports, polls them while
//! there is work, and sleeps on their kick eventfds when there is none.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::net::{self, Ctx, NetPort, Scratch, NOT_LOCAL};
use super::{Command, DataplaneError, Shared, MAX_PORTS, MAX_QUEUE_PAIRS};
use crate::fdb::PortIdx;
use crate::stats::WorkerStats;
use crate::vring::Vring;

/// Tuning of the workers' polling loop.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Most chains taken from one ring per visit.
    pub batch: u16,
    /// How long a worker keeps polling after its last work before it sleeps.
    pub idle_poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch: 32,
            idle_poll: Duration::from_micros(200),
        }
    }
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_MAILBOX: u64 = 1;
const TOKEN_KICK: u64 = 1 << 32;
/// Frames taken from the mailbox per loop iteration.
const MAILBOX_BATCH: usize = 256;
/// Busy time is published at least this often.
const STATS_PERIOD: Duration = Duration::from_millis(100);

fn kick_token(idx: PortIdx, queue: usize) -> u64 {
    TOKEN_KICK | u64::from(idx) << 16 | queue as u64
}

pub(crate) struct Worker {
    id: usize,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    wake: EventFd,
    stats: Arc<WorkerStats>,
    config: WorkerConfig,
    ports: Vec<NetPort>,
    local: Box<[u16]>,
    epoll: Epoll,
    scratch: Box<Scratch>,
    dirty: Vec<u16>,
    /// Frames for a port moving to this worker that came before the port.
    parked: std::collections::VecDeque<super::Frame>,
}

impl Worker {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        commands: Receiver<Command>,
        wake: EventFd,
        stats: Arc<WorkerStats>,
        config: WorkerConfig,
    ) -> Result<Self, DataplaneError> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&wake),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&shared.mailboxes[id].wake),
            EpollEvent::new(EventSet::IN, TOKEN_MAILBOX),
        )?;
        Ok(Worker {
            id,
            shared,
            commands,
            wake,
            stats,
            config,
            ports: Vec::new(),
            local: vec![NOT_LOCAL; MAX_PORTS].into_boxed_slice(),
            epoll,
            scratch: Scratch::new(),
            dirty: Vec::with_capacity(MAX_PORTS),
            parked: std::collections::VecDeque::with_capacity(super::MAILBOX_DEPTH),
        })
    }

    /// The polling loop; returns on [`Command::Shutdown`].
    pub fn run(mut self) {
        let mut last_work = Instant::now();
        let mut busy_since = last_work;
        loop {
            if !self.handle_commands() {
                return;
            }
            let now = Instant::now();
            let work = self.poll_once(now);
            if work > 0 {
                self.stats.add_batch(work as u64);
                last_work = now;
            } else if now.duration_since(last_work) >= self.config.idle_poll {
                self.stats
                    .add_busy(now.duration_since(busy_since).as_nanos() as u64);
                self.sleep();
                let woke = Instant::now();
                self.stats
                    .add_idle(woke.duration_since(now).as_nanos() as u64);
                self.stats.add_wakeup();
                busy_since = woke;
                last_work = woke;
            }
            if now.duration_since(busy_since) >= STATS_PERIOD {
                self.stats
                    .add_busy(now.duration_since(busy_since).as_nanos() as u64);
                busy_since = now;
            }
        }
    }

    /// One pass over every ring and the mailbox. Returns the frames handled.
    fn poll_once(&mut self, now: Instant) -> usize {
        let mut ctx = Ctx {
            shared: &self.shared,
            local: &self.local,
            scratch: &mut self.scratch,
            worker: self.id,
            now_ms: now.duration_since(self.shared.epoch).as_millis() as u64,
            batch: self.config.batch,
            dirty: &mut self.dirty,
            remote_wake: 0,
        };
        let mut work = 0;
        for pos in 0..self.ports.len() {
            if self.ports[pos].mem.faulted() {
                self.ports[pos].mark_broken("the frontend truncated guest memory under the switch");
                continue;
            }
            for q in 0..MAX_QUEUE_PAIRS {
                if self.ports[pos].tx[q].is_some() {
                    work += net::process_tx(&mut self.ports, pos, q, &mut ctx);
                }
            }
        }
        work += mailbox_pass(&mut self.ports, &mut self.parked, &mut ctx, MAILBOX_BATCH);
        let wake = ctx.remote_wake;
        self.flush(wake);
        work
    }

    /// Publish the RX used entries written and wake the workers sent frames.
    fn flush(&mut self, mut wake: u64) {
        for pos in self.dirty.drain(..) {
            self.ports[usize::from(pos)].publish_rx();
        }
        while wake != 0 {
            let w = wake.trailing_zeros() as usize;
            wake &= wake - 1;
            self.shared.mailboxes[w].wake();
        }
    }

    /// Deliver what the mailbox holds now (before a port leaves or after one
    /// arrives).
    fn drain_mailbox(&mut self) {
        let mut ctx = Ctx {
            shared: &self.shared,
            local: &self.local,
            scratch: &mut self.scratch,
            worker: self.id,
            now_ms: self.shared.now_ms(),
            batch: self.config.batch,
            dirty: &mut self.dirty,
            remote_wake: 0,
        };
        // What is queued now; frames that keep coming wait for the next poll
        // (the caller waits for this command, so it must not chase them).
        let queued = self.shared.mailboxes[self.id].frames.len();
        mailbox_pass(&mut self.ports, &mut self.parked, &mut ctx, queued);
        let wake = ctx.remote_wake;
        self.flush(wake);
    }

    /// Re-enable guest notifications and sleep until a kick, a frame from
    /// another worker or a command arrives.
    fn sleep(&mut self) {
        let shared = Arc::clone(&self.shared);
        let mb = &shared.mailboxes[self.id];
        mb.sleeping.store(true, Ordering::SeqCst);
        let mut pending = false;
        for p in self.ports.iter_mut().filter(|p| !p.broken) {
            for r in p.tx.iter_mut().flatten() {
                r.enable_notification();
                pending |= r.avail_pending() != Ok(0);
            }
        }
        pending |= !mb.frames.is_empty() || !self.commands.is_empty();
        if !pending {
            let mut events = [EpollEvent::default(); 64];
            match self.epoll.wait(1000, &mut events) {
                Ok(n) => {
                    for ev in &events[..n] {
                        self.consume_event(ev.data());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => log::error!("worker {}: epoll_wait failed: {e}", self.id),
            }
        }
        mb.sleeping.store(false, Ordering::SeqCst);
        for p in &mut self.ports {
            for r in p.tx.iter_mut().flatten() {
                r.disable_notification();
            }
        }
    }

    fn consume_event(&mut self, token: u64) {
        let fd = match token {
            TOKEN_WAKE => Some(&self.wake),
            TOKEN_MAILBOX => Some(&self.shared.mailboxes[self.id].wake),
            t => {
                let idx = ((t >> 16) & 0xffff) as usize;
                let q = (t & 0xffff) as usize;
                match self.local.get(idx) {
                    Some(&pos) if pos != NOT_LOCAL => self.ports[usize::from(pos)]
                        .kicks
                        .get(q)
                        .and_then(|k| k.as_ref()),
                    _ => None,
                }
            }
        };
        if let Some(fd) = fd {
            // Only resets the counter; a failure means it was already read.
            let _ = fd.read();
        }
    }

    /// Handle every queued command. Returns false on shutdown.
    fn handle_commands(&mut self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            if !self.handle(cmd) {
                return false;
            }
        }
        true
    }

    fn port_pos(&self, idx: PortIdx) -> Result<usize, DataplaneError> {
        match self.local.get(usize::from(idx)) {
            Some(&pos) if pos != NOT_LOCAL => Ok(usize::from(pos)),
            _ => Err(DataplaneError::NotAttached(idx)),
        }
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => return false,
            Command::Attach {
                idx,
                stats,
                settings,
                reply,
            } => {
                let res = if self.port_pos(idx).is_ok() {
                    Ok(())
                } else {
                    self.local[usize::from(idx)] = self.ports.len() as u16;
                    self.ports.push(NetPort::new(
                        idx,
                        stats,
                        settings,
                        self.shared.faults.clone(),
                    ));
                    Ok(())
                };
                let _ = reply.send(res);
            }
            Command::Detach { idx, reply } => {
                let res = self.port_pos(idx).map(|pos| self.remove_port(pos));
                let _ = reply.send(res);
            }
            Command::Features {
                idx,
                features,
                reply,
            } => {
                let res = self.port_pos(idx).map(|pos| {
                    let p = &mut self.ports[pos];
                    p.features = features;
                    p.hdr_len = features.hdr_len() as u32;
                });
                let _ = reply.send(res);
            }
            Command::Memory { idx, mem, reply } => {
                let res = self.port_pos(idx).map(|pos| {
                    let p = &mut self.ports[pos];
                    p.mem = mem.clone();
                    let mut failed = Vec::new();
                    for (q, r) in p.rx.iter_mut().enumerate() {
                        if let Some(ring) = r {
                            if ring.remap(mem.clone()).is_err() {
                                failed.push(2 * q);
                            }
                        }
                    }
                    for (q, r) in p.tx.iter_mut().enumerate() {
                        if let Some(ring) = r {
                            if ring.remap(mem.clone()).is_err() {
                                failed.push(2 * q + 1);
                            }
                        }
                    }
                    if !failed.is_empty() {
                        p.mark_broken(&format!(
                            "queues {failed:?} lie outside the new memory table"
                        ));
                    }
                });
                let _ = reply.send(res);
            }
            Command::StartQueue {
                idx,
                queue,
                setup,
                reply,
            } => {
                let res = self.start_queue(idx, usize::from(queue), setup);
                let _ = reply.send(res);
            }
            Command::StopQueue { idx, queue, reply } => {
                let res = self
                    .port_pos(idx)
                    .map(|pos| self.stop_queue(pos, usize::from(queue)));
                let _ = reply.send(res);
            }
            Command::SetCall {
                idx,
                queue,
                call,
                reply,
            } => {
                let res = self.port_pos(idx).and_then(|pos| {
                    let q = usize::from(queue);
                    if q >= 2 * MAX_QUEUE_PAIRS {
                        return Err(DataplaneError::NoSuchQueue(queue));
                    }
                    let p = &mut self.ports[pos];
                    let ring = if q % 2 == 0 {
                        &mut p.rx[q / 2]
                    } else {
                        &mut p.tx[q / 2]
                    };
                    if let Some(r) = ring {
                        r.set_call(call);
                    }
                    Ok(())
                });
                let _ = reply.send(res);
            }
            Command::Release { idx, reply } => {
                self.drain_mailbox();
                let res = self.port_pos(idx).map(|pos| self.release_port(pos));
                let _ = reply.send(res);
            }
            Command::Barrier { reply } => {
                let _ = reply.send(Ok(()));
            }
            Command::Adopt { port, reply } => {
                // Before the next poll: deliver the frames that waited here
                // for the port, and those it sent from its old worker to
                // ports here (all in the mailbox by now), so that its flows
                // stay in order both ways.
                let res = self.adopt_port(port);
                self.drain_mailbox();
                let _ = reply.send(res);
            }
            Command::Settings {
                idx,
                settings,
                reply,
            } => {
                let res = self
                    .port_pos(idx)
                    .map(|pos| self.ports[pos].settings = settings);
                let _ = reply.send(res);
            }
        }
        true
    }

    fn start_queue(
        &mut self,
        idx: PortIdx,
        q: usize,
        setup: super::QueueSetup,
    ) -> Result<(), DataplaneError> {
        let pos = self.port_pos(idx)?;
        if q >= 2 * MAX_QUEUE_PAIRS {
            return Err(DataplaneError::NoSuchQueue(q as u16));
        }
        self.stop_queue(pos, q);
        let p = &mut self.ports[pos];
        let mut ring = Vring::new(
            p.mem.clone(),
            setup.size,
            setup.addrs,
            setup.base,
            p.features.event_idx,
            setup.call,
        )?;
        ring.disable_notification();
        p.broken = false;
        p.stats.set_broken(false);
        if q % 2 == 0 {
            p.rx[q / 2] = Some(ring);
            p.update_rx_active();
        } else {
            p.tx[q / 2] = Some(ring);
            if let Some(kick) = setup.kick {
                self.epoll.ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(&kick),
                    EpollEvent::new(EventSet::IN, kick_token(idx, q)),
                )?;
                p.kicks[q] = Some(kick);
            }
        }
        Ok(())
    }

    /// Stop ring `q` of the port at `pos`; returns its next avail index.
    fn stop_queue(&mut self, pos: usize, q: usize) -> Option<u16> {
        let p = self.ports.get_mut(pos)?;
        if q >= 2 * MAX_QUEUE_PAIRS {
            return None;
        }
        if let Some(kick) = p.kicks[q].take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(&kick),
                EpollEvent::default(),
            );
        }
        let mut ring = if q % 2 == 0 {
            p.rx_dirty &= !(1 << (q / 2));
            let r = p.rx[q / 2].take();
            p.update_rx_active();
            r
        } else {
            p.tx[q / 2].take()
        }?;
        ring.publish_used();
        Some(ring.next_avail())
    }

    /// Take a port out, rings running, to hand it to another worker.
    fn release_port(&mut self, pos: usize) -> Box<NetPort> {
        let p = &mut self.ports[pos];
        p.publish_rx();
        for kick in p.kicks.iter().flatten() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(kick),
                EpollEvent::default(),
            );
        }
        let port = self.ports.swap_remove(pos);
        self.local[usize::from(port.idx)] = NOT_LOCAL;
        if let Some(moved) = self.ports.get(pos) {
            self.local[usize::from(moved.idx)] = pos as u16;
        }
        self.dirty.clear();
        Box::new(port)
    }

    /// Take over a port another worker released.
    fn adopt_port(&mut self, port: Box<NetPort>) -> Result<(), DataplaneError> {
        let idx = port.idx;
        if self.port_pos(idx).is_ok() {
            return Ok(());
        }
        for (q, kick) in port.kicks.iter().enumerate() {
            if let Some(k) = kick {
                self.epoll.ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(k),
                    EpollEvent::new(EventSet::IN, kick_token(idx, q)),
                )?;
            }
        }
        self.local[usize::from(idx)] = self.ports.len() as u16;
        self.ports.push(*port);
        Ok(())
    }

    fn remove_port(&mut self, pos: usize) {
        for q in 0..2 * MAX_QUEUE_PAIRS {
            self.stop_queue(pos, q);
        }
        let removed = self.ports.swap_remove(pos);
        self.local[usize::from(removed.idx)] = NOT_LOCAL;
        if let Some(moved) = self.ports.get(pos) {
            self.local[usize::from(moved.idx)] = pos as u16;
        }
        // Positions changed: nothing may stay queued for publishing.
        self.dirty.clear();
    }
}

/// Deliver up to `limit` frames from this worker's mailbox, and those parked
/// for a port that has arrived since. A frame for a port on its way to this
/// worker waits (parked) until the port comes; one for a port now served by
/// another worker is passed on to it. Returns the frames taken.
fn mailbox_pass(
    ports: &mut [NetPort],
    parked: &mut std::collections::VecDeque<super::Frame>,
    ctx: &mut Ctx<'_>,
    limit: usize,
) -> usize {
    let shared = ctx.shared;
    let me = ctx.worker;
    let mb = &shared.mailboxes[me];
    let local = |ctx: &Ctx<'_>, idx: PortIdx| {
        ctx.local
            .get(usize::from(idx))
            .is_some_and(|p| *p != NOT_LOCAL)
    };
    for _ in 0..parked.len() {
        let Some(frame) = parked.pop_front() else {
            break;
        };
        if !local(ctx, frame.dst) && shared.owner(frame.dst) == Some(me) {
            parked.push_back(frame);
            continue;
        }
        net::deliver_remote(ports, &frame, ctx);
        let _ = mb.pool.push(frame.buf);
    }
    let mut taken = 0;
    while taken < limit {
        let Some(frame) = mb.frames.pop() else { break };
        taken += 1;
        let waiting_for_port = frame.dst != super::FLOOD
            && !local(ctx, frame.dst)
            && shared.owner(frame.dst) == Some(me);
        if waiting_for_port && parked.len() < parked.capacity() {
            parked.push_back(frame);
            continue;
        }
        net::deliver_remote(ports, &frame, ctx);
        let _ = mb.pool.push(frame.buf);
    }
    taken
}
