//! One dataplane worker thread: owns the rings of its ports, polls them while
//! there is work, and sleeps on their kick eventfds when there is none.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crossbeam_channel::Sender;

use super::blk::{self, BlkScratch, DiskPort, DiskQueue};
use super::net::{self, Ctx, NetPort, Scratch, NOT_LOCAL};
use super::qos::NetQos;
use super::{
    Command, DataplaneError, Device, Features, Moving, Shared, MAX_PORTS, MAX_QUEUE_PAIRS,
};
use crate::blk::MAX_DISK_QUEUES;
use crate::fdb::PortIdx;
use crate::io_engine::{EngineKind, IoEngine};
use crate::stats::WorkerStats;
use crate::vring::Vring;

/// Tuning of the workers' polling loop.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Most chains taken from one ring per visit.
    pub batch: u16,
    /// How long a worker keeps polling after its last work before it sleeps.
    pub idle_poll: Duration,
    /// The disk I/O engine.
    pub io_engine: EngineKind,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch: 32,
            idle_poll: Duration::from_micros(200),
            io_engine: EngineKind::Auto,
        }
    }
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_MAILBOX: u64 = 1;
const TOKEN_IO: u64 = 2;
const TOKEN_TIMER: u64 = 3;
const TOKEN_KICK: u64 = 1 << 32;
/// Frames taken from the mailbox per loop iteration.
const MAILBOX_BATCH: usize = 256;
/// Busy time is published at least this often.
const STATS_PERIOD: Duration = Duration::from_millis(100);
/// How long a stopping worker waits for disk I/O in flight.
const SHUTDOWN_IO_WAIT: Duration = Duration::from_secs(5);

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
    disks: Vec<DiskPort>,
    /// Port index → position in `disks`, or [`NOT_LOCAL`].
    disk_local: Box<[u16]>,
    /// Set up when the first disk arrives.
    engine: Option<IoEngine>,
    blk_scratch: Box<BlkScratch>,
    /// Generation of the next disk attached here.
    next_gen: u16,
    /// Disk commands waiting for requests in flight to finish.
    deferred: Vec<Deferred>,
    /// Wakes a sleeping worker when a shaper's or a disk limit's tokens are due.
    timer: TimerFd,
}

/// Where a port is on this worker.
#[derive(Debug, Clone, Copy)]
enum Local {
    Net(usize),
    Disk(usize),
}

/// A command answered once a disk's requests in flight have finished.
enum Deferred {
    Stop {
        idx: PortIdx,
        queue: usize,
        reply: Sender<Result<Option<u16>, DataplaneError>>,
    },
    Detach {
        idx: PortIdx,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Release {
        idx: PortIdx,
        reply: Sender<Result<Moving, DataplaneError>>,
    },
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
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&timer),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
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
            disks: Vec::new(),
            disk_local: vec![NOT_LOCAL; MAX_PORTS].into_boxed_slice(),
            engine: None,
            blk_scratch: BlkScratch::new(),
            next_gen: 0,
            deferred: Vec::new(),
            timer,
        })
    }

    /// The polling loop; returns on [`Command::Shutdown`].
    pub fn run(mut self) {
        let mut last_work = Instant::now();
        let mut busy_since = last_work;
        loop {
            if !self.handle_commands() {
                self.drain_io();
                return;
            }
            let now = Instant::now();
            let work = self.poll_once(now);
            if work > 0 {
                self.stats.add_batch(work as u64);
                last_work = now;
            } else if now.duration_since(last_work) < self.config.idle_poll {
                self.wait_for_io();
            } else {
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

    /// Between two polls without work: when disk I/O is in flight and none
    /// has finished, give the CPU to whoever runs it (io_uring's kernel
    /// workers or the thread pool, often on this core) instead of spinning.
    #[inline]
    fn wait_for_io(&mut self) {
        if let Some(e) = self.engine.as_mut() {
            if e.in_flight() > 0 && !e.has_completions() {
                std::thread::yield_now();
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
            now_ns: now.duration_since(self.shared.epoch).as_nanos() as u64,
            batch: self.config.batch,
            dirty: &mut self.dirty,
            remote_wake: 0,
            gen: self
                .shared
                .ident_gen
                .load(std::sync::atomic::Ordering::Acquire),
        };
        let mut work = 0;
        for pos in 0..self.ports.len() {
            if self.ports[pos].mem.faulted() {
                self.ports[pos].mark_broken("the frontend truncated guest memory under the switch");
                continue;
            }
            let weighted = match self.ports[pos].qos.as_deref_mut() {
                Some(q) => {
                    q.budget.start_visit(ctx.batch);
                    q.budget.weighted()
                }
                None => false,
            };
            for q in 0..MAX_QUEUE_PAIRS {
                if self.ports[pos].tx[q].is_none() {
                    continue;
                }
                loop {
                    let n = net::process_tx(&mut self.ports, pos, q, &mut ctx);
                    work += n;
                    // A weighted port takes its whole budget in this visit,
                    // until its ring is empty (as the guest's index says
                    // then: a batch shorter than `batch` may only mean the
                    // cached index ran out).
                    let more = weighted
                        && n > 0
                        && self.ports[pos]
                            .qos
                            .as_deref()
                            .is_some_and(|q| q.budget.open());
                    if !more {
                        break;
                    }
                    // Long visits: let the receivers see what they got
                    // batch by batch, so they can refill their rings.
                    publish_dirty(&mut self.ports, ctx.dirty);
                }
            }
        }
        work += mailbox_pass(&mut self.ports, &mut self.parked, &mut ctx, MAILBOX_BATCH);
        for pos in 0..self.ports.len() {
            if self.ports[pos].qos.is_some() {
                work += net::drain_egress(&mut self.ports, pos, &mut ctx);
            }
        }
        let wake = ctx.remote_wake;
        self.flush(wake);
        work + self.poll_disks()
    }

    /// Collect finished disk I/O, answer it, take new requests and start
    /// their I/O. Returns the requests taken and answered.
    fn poll_disks(&mut self) -> usize {
        let Some(engine) = self.engine.as_mut() else {
            return 0;
        };
        let (disks, local) = (&mut self.disks, &self.disk_local);
        let mut work = engine.reap(|c| {
            let (gen, idx, q, slot) = blk::split_user_data(c.user_data);
            match local.get(usize::from(idx)) {
                Some(&pos) if pos != NOT_LOCAL && disks[usize::from(pos)].gen == gen => {
                    disks[usize::from(pos)].complete(q, slot, c.result)
                }
                // Every disk leaves only once idle: a stray completion is a bug.
                _ => log::error!("I/O completion for unknown disk port {idx} (generation {gen})"),
            }
        });
        let now = self.shared.now_ns();
        for d in &mut self.disks {
            work += d.poll(engine, &mut self.blk_scratch, self.config.batch, now);
        }
        engine.submit();
        for d in &mut self.disks {
            d.publish();
        }
        if !self.deferred.is_empty() {
            self.run_deferred();
        }
        work
    }

    /// Answer the deferred disk commands whose disk has become idle.
    fn run_deferred(&mut self) {
        let waiting = std::mem::take(&mut self.deferred);
        for d in waiting {
            match d {
                Deferred::Stop { idx, queue, reply } => match self.disk_pos(idx) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(pos) => {
                        let idle = self.disks[pos].queues[queue]
                            .as_ref()
                            .is_none_or(|q| q.in_flight() == 0);
                        if idle {
                            let _ = reply.send(Ok(self.stop_disk_queue(pos, queue)));
                        } else {
                            self.deferred.push(Deferred::Stop { idx, queue, reply });
                        }
                    }
                },
                Deferred::Detach { idx, reply } => match self.disk_pos(idx) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(pos) if self.disks[pos].idle() => {
                        self.remove_disk(pos);
                        let _ = reply.send(Ok(()));
                    }
                    Ok(_) => self.deferred.push(Deferred::Detach { idx, reply }),
                },
                Deferred::Release { idx, reply } => match self.disk_pos(idx) {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(pos) if self.disks[pos].idle() => {
                        let d = self.release_disk(pos);
                        let _ = reply.send(Ok(Moving::Disk(Box::new(d))));
                    }
                    Ok(_) => self.deferred.push(Deferred::Release { idx, reply }),
                },
            }
        }
    }

    /// Before the thread ends: let disk I/O in flight finish (bounded), so
    /// the kernel never writes into memory that is unmapped after it.
    fn drain_io(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_IO_WAIT;
        for d in &mut self.disks {
            d.quiescing = true;
        }
        while self.engine.as_ref().is_some_and(|e| e.in_flight() > 0) {
            if Instant::now() >= deadline {
                log::error!("worker {}: disk I/O still in flight at shutdown", self.id);
                // Leak what the kernel may still write into rather than unmap it.
                std::mem::forget(std::mem::take(&mut self.disks));
                return;
            }
            self.poll_disks();
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Publish the RX used entries written and wake the workers sent frames.
    fn flush(&mut self, mut wake: u64) {
        publish_dirty(&mut self.ports, &mut self.dirty);
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
            now_ns: self.shared.now_ns(),
            batch: self.config.batch,
            dirty: &mut self.dirty,
            remote_wake: 0,
            gen: self
                .shared
                .ident_gen
                .load(std::sync::atomic::Ordering::Acquire),
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
        let now = shared.now_ns();
        // Rings held by a shaper or by disk limits do not count as work:
        // the worker wakes when their tokens are back.
        let mut wake_in: Option<u64> = None;
        let mut held = |w: Option<u64>| -> bool {
            if let Some(w) = w {
                wake_in = Some(wake_in.map_or(w, |c| c.min(w)));
            }
            w.is_some()
        };
        mb.sleeping.store(true, Ordering::SeqCst);
        let mut pending = false;
        for p in self.ports.iter_mut().filter(|p| !p.broken) {
            held(p.qos.as_deref_mut().and_then(|q| q.egress_wait(now)));
            let holding = held(p.qos.as_deref_mut().and_then(|q| q.ingress_wait(now)));
            for r in p.tx.iter_mut().flatten() {
                r.enable_notification();
                pending |= !holding && r.avail_pending() != Ok(0);
            }
        }
        for d in self.disks.iter_mut().filter(|d| !d.broken && !d.quiescing) {
            let holding = held(d.qos_wait(now));
            for q in d.queues.iter_mut().flatten() {
                q.ring.enable_notification();
                pending |= !holding && q.ring.avail_pending() != Ok(0);
            }
        }
        pending |= !mb.frames.is_empty() || !self.commands.is_empty();
        pending |= self.engine.as_mut().is_some_and(|e| e.has_completions());
        pending |= wake_in == Some(0);
        let armed = !pending && wake_in.is_some();
        if armed {
            // Nanosecond precision: a timerfd rather than epoll's milliseconds.
            let due = Duration::from_nanos(wake_in.unwrap_or(0));
            if let Err(e) = self.timer.reset(due, None) {
                log::error!("worker {}: cannot arm its timer: {e}", self.id);
                pending = true;
            }
        }
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
        if armed {
            let _ = self.timer.clear();
        }
        for p in &mut self.ports {
            for r in p.tx.iter_mut().flatten() {
                r.disable_notification();
            }
        }
        for d in &mut self.disks {
            for q in d.queues.iter_mut().flatten() {
                q.ring.disable_notification();
            }
        }
    }

    fn consume_event(&mut self, token: u64) {
        let fd = match token {
            TOKEN_WAKE => Some(&self.wake),
            TOKEN_MAILBOX => Some(&self.shared.mailboxes[self.id].wake),
            TOKEN_IO => {
                if let Some(e) = &self.engine {
                    e.clear_notify();
                }
                None
            }
            TOKEN_TIMER => {
                // Expired (epoll said so): the read does not block.
                let _ = self.timer.wait();
                None
            }
            t => {
                let idx = ((t >> 16) & 0xffff) as usize;
                let q = (t & 0xffff) as usize;
                match (self.local.get(idx), self.disk_local.get(idx)) {
                    (Some(&pos), _) if pos != NOT_LOCAL => self.ports[usize::from(pos)]
                        .kicks
                        .get(q)
                        .and_then(|k| k.as_ref()),
                    (_, Some(&pos)) if pos != NOT_LOCAL => self.disks[usize::from(pos)]
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
    ///
    /// A command's sender waits for the answer; when it shares this
    /// worker's core (no `--worker-cpus`), a worker that goes on polling
    /// keeps it waiting until the scheduler takes the core away,
    /// milliseconds later. So after answering, the worker yields once: a
    /// system call per batch of commands, never on the frame path.
    fn handle_commands(&mut self) -> bool {
        let mut answered = false;
        while let Ok(cmd) = self.commands.try_recv() {
            if !self.handle(cmd) {
                return false;
            }
            answered = true;
        }
        if answered {
            std::thread::yield_now();
        }
        true
    }

    fn port_pos(&self, idx: PortIdx) -> Result<usize, DataplaneError> {
        match self.local.get(usize::from(idx)) {
            Some(&pos) if pos != NOT_LOCAL => Ok(usize::from(pos)),
            _ => Err(DataplaneError::NotAttached(idx)),
        }
    }

    fn disk_pos(&self, idx: PortIdx) -> Result<usize, DataplaneError> {
        match self.disk_local.get(usize::from(idx)) {
            Some(&pos) if pos != NOT_LOCAL => Ok(usize::from(pos)),
            _ => Err(DataplaneError::NotAttached(idx)),
        }
    }

    /// Which kind of port `idx` is here, and where.
    fn find(&self, idx: PortIdx) -> Result<Local, DataplaneError> {
        self.port_pos(idx)
            .map(Local::Net)
            .or_else(|_| self.disk_pos(idx).map(Local::Disk))
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => return false,
            Command::Attach { idx, device, reply } => {
                let res = self.attach(idx, device);
                let _ = reply.send(res);
            }
            Command::Detach { idx, reply } => match self.find(idx) {
                Ok(Local::Net(pos)) => {
                    self.remove_port(pos);
                    let _ = reply.send(Ok(()));
                }
                Ok(Local::Disk(pos)) => {
                    self.disks[pos].quiescing = true;
                    self.deferred.push(Deferred::Detach { idx, reply });
                    self.run_deferred();
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Features {
                idx,
                features,
                reply,
            } => {
                let res = match (self.find(idx), features) {
                    (Ok(Local::Net(pos)), Features::Net(f)) => {
                        let p = &mut self.ports[pos];
                        p.features = f;
                        p.hdr_len = f.hdr_len() as u32;
                        Ok(())
                    }
                    (Ok(Local::Disk(pos)), Features::Disk(f)) => {
                        self.disks[pos].event_idx = f.event_idx;
                        Ok(())
                    }
                    (Ok(_), _) => Err(DataplaneError::NotAttached(idx)),
                    (Err(e), _) => Err(e),
                };
                let _ = reply.send(res);
            }
            Command::Memory { idx, mem, reply } => {
                let res = self.find(idx).map(|l| self.set_memory(l, mem));
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
                let q = usize::from(queue);
                match self.find(idx) {
                    Ok(Local::Net(pos)) => {
                        let _ = reply.send(Ok(self.stop_queue(pos, q)));
                    }
                    Ok(Local::Disk(_)) if q >= MAX_DISK_QUEUES => {
                        let _ = reply.send(Err(DataplaneError::NoSuchQueue(queue)));
                    }
                    Ok(Local::Disk(pos)) => {
                        self.disks[pos].stopping |= 1 << q;
                        self.deferred.push(Deferred::Stop {
                            idx,
                            queue: q,
                            reply,
                        });
                        self.run_deferred();
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::SetCall {
                idx,
                queue,
                call,
                reply,
            } => {
                let q = usize::from(queue);
                let res = match self.find(idx) {
                    Ok(Local::Net(_)) if q >= 2 * MAX_QUEUE_PAIRS => {
                        Err(DataplaneError::NoSuchQueue(queue))
                    }
                    Ok(Local::Net(pos)) => {
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
                    }
                    Ok(Local::Disk(pos)) => match self.disks[pos].queues.get_mut(q) {
                        None => Err(DataplaneError::NoSuchQueue(queue)),
                        Some(dq) => {
                            if let Some(dq) = dq {
                                dq.ring.set_call(call);
                            }
                            Ok(())
                        }
                    },
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
            Command::Release { idx, reply } => {
                self.drain_mailbox();
                match self.find(idx) {
                    Ok(Local::Net(pos)) => {
                        let p = self.release_port(pos);
                        let _ = reply.send(Ok(Moving::Net(Box::new(p))));
                    }
                    Ok(Local::Disk(pos)) => {
                        self.disks[pos].quiescing = true;
                        self.deferred.push(Deferred::Release { idx, reply });
                        self.run_deferred();
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Barrier { reply } => {
                let _ = reply.send(Ok(()));
            }
            Command::Adopt { port, reply } => {
                // Before the next poll: deliver the frames that waited here
                // for the port, and those it sent from its old worker to
                // ports here (all in the mailbox by now), so that its flows
                // stay in order both ways.
                let res = match port {
                    Moving::Net(p) => self.adopt_port(*p),
                    Moving::Disk(d) => self.adopt_disk(*d),
                };
                self.drain_mailbox();
                let _ = reply.send(res);
            }
            Command::Settings {
                idx,
                settings,
                reply,
            } => {
                let now = self.shared.now_ns();
                let res = match self.find(idx) {
                    Ok(Local::Net(pos)) => {
                        let p = &mut self.ports[pos];
                        if p.settings.qos != settings.qos {
                            if let Some(q) = p.qos.as_deref_mut() {
                                q.flush_counters(&p.stats);
                            }
                            NetQos::update(&mut p.qos, &settings.qos, now);
                            self.shared.set_weight(idx, &settings.qos);
                        }
                        p.settings = settings;
                        Ok(())
                    }
                    Ok(Local::Disk(pos)) => {
                        self.disks[pos].set_qos(&settings.qos, now);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
        }
        true
    }

    fn attach(&mut self, idx: PortIdx, device: Device) -> Result<(), DataplaneError> {
        if self.find(idx).is_ok() {
            return Ok(());
        }
        match device {
            Device::Net { stats, settings } => {
                self.shared.set_weight(idx, &settings.qos);
                self.local[usize::from(idx)] = self.ports.len() as u16;
                self.ports.push(NetPort::new(
                    idx,
                    stats,
                    settings,
                    self.shared.faults.clone(),
                    self.shared.now_ns(),
                ));
            }
            Device::Disk { disk, settings } => {
                self.ensure_engine()?;
                let gen = self.next_gen;
                self.next_gen = self.next_gen.wrapping_add(1);
                self.disk_local[usize::from(idx)] = self.disks.len() as u16;
                let mut d = DiskPort::new(idx, gen, disk, self.shared.faults.clone());
                d.set_qos(&settings.qos, self.shared.now_ns());
                self.disks.push(d);
            }
        }
        Ok(())
    }

    /// Set up the I/O engine when the first disk arrives.
    fn ensure_engine(&mut self) -> Result<(), DataplaneError> {
        if self.engine.is_none() {
            let engine = IoEngine::new(self.config.io_engine)?;
            self.epoll.ctl(
                ControlOperation::Add,
                engine.notify_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_IO),
            )?;
            log::info!("worker {}: disk I/O through {}", self.id, engine.name());
            self.engine = Some(engine);
        }
        Ok(())
    }

    fn set_memory(&mut self, l: Local, mem: Arc<crate::mem::GuestMemory>) {
        let mut failed = Vec::new();
        match l {
            Local::Net(pos) => {
                let p = &mut self.ports[pos];
                p.mem = mem.clone();
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
            }
            Local::Disk(pos) => {
                let d = &mut self.disks[pos];
                d.mem = mem.clone();
                for (q, dq) in d.queues.iter_mut().enumerate() {
                    if let Some(dq) = dq {
                        if dq.ring.remap(mem.clone()).is_err() {
                            failed.push(q);
                        }
                    }
                }
                if !failed.is_empty() {
                    d.mark_broken(&format!(
                        "queues {failed:?} lie outside the new memory table"
                    ));
                }
            }
        }
    }

    fn start_queue(
        &mut self,
        idx: PortIdx,
        q: usize,
        setup: super::QueueSetup,
    ) -> Result<(), DataplaneError> {
        let pos = match self.find(idx)? {
            Local::Net(pos) => pos,
            Local::Disk(pos) => return self.start_disk_queue(pos, q, setup),
        };
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

    fn start_disk_queue(
        &mut self,
        pos: usize,
        q: usize,
        setup: super::QueueSetup,
    ) -> Result<(), DataplaneError> {
        if q >= MAX_DISK_QUEUES {
            return Err(DataplaneError::NoSuchQueue(q as u16));
        }
        if self.disks[pos].queues[q]
            .as_ref()
            .is_some_and(|dq| dq.in_flight() > 0)
        {
            return Err(DataplaneError::QueueBusy(q as u16));
        }
        self.stop_disk_queue(pos, q);
        let d = &mut self.disks[pos];
        let mut ring = Vring::new(
            d.mem.clone(),
            setup.size,
            setup.addrs,
            setup.base,
            d.event_idx,
            setup.call,
        )?;
        ring.disable_notification();
        d.broken = false;
        d.disk.stats.set_broken(false);
        d.queues[q] = Some(DiskQueue::new(ring));
        if let Some(kick) = setup.kick {
            self.epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&kick),
                EpollEvent::new(EventSet::IN, kick_token(d.idx, q)),
            )?;
            d.kicks[q] = Some(kick);
        }
        Ok(())
    }

    /// Stop disk queue `q` (idle) of the disk at `pos`; returns its next avail index.
    fn stop_disk_queue(&mut self, pos: usize, q: usize) -> Option<u16> {
        let d = self.disks.get_mut(pos)?;
        if let Some(kick) = d.kicks.get_mut(q)?.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(&kick),
                EpollEvent::default(),
            );
        }
        d.take_queue(q)
    }

    /// Take an idle disk out of this worker, rings running.
    fn release_disk(&mut self, pos: usize) -> DiskPort {
        let mut d = self.disks.swap_remove(pos);
        self.disk_local[usize::from(d.idx)] = NOT_LOCAL;
        if let Some(moved) = self.disks.get(pos) {
            self.disk_local[usize::from(moved.idx)] = pos as u16;
        }
        Self::unwatch_kicks(&self.epoll, &d.kicks);
        d.publish();
        d.quiescing = false;
        d
    }

    /// Take over a disk another worker released (idle: nothing in flight).
    fn adopt_disk(&mut self, mut d: DiskPort) -> Result<(), DataplaneError> {
        let idx = d.idx;
        if self.find(idx).is_ok() {
            return Ok(());
        }
        self.ensure_engine()?;
        d.gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        self.watch_kicks(idx, &d.kicks)?;
        self.disk_local[usize::from(idx)] = self.disks.len() as u16;
        self.disks.push(d);
        Ok(())
    }

    /// Wake on the kicks of a port arriving here.
    fn watch_kicks(&self, idx: PortIdx, kicks: &[Option<EventFd>]) -> Result<(), DataplaneError> {
        for (q, kick) in kicks.iter().enumerate() {
            if let Some(k) = kick {
                self.epoll.ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(k),
                    EpollEvent::new(EventSet::IN, kick_token(idx, q)),
                )?;
            }
        }
        Ok(())
    }

    /// Stop waking on the kicks of a port leaving.
    fn unwatch_kicks(epoll: &Epoll, kicks: &[Option<EventFd>]) {
        for kick in kicks.iter().flatten() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                std::os::fd::AsRawFd::as_raw_fd(kick),
                EpollEvent::default(),
            );
        }
    }

    /// Remove an idle disk: its rings stop, its I/O is all answered.
    fn remove_disk(&mut self, pos: usize) {
        for q in 0..MAX_DISK_QUEUES {
            self.stop_disk_queue(pos, q);
        }
        drop(self.release_disk(pos));
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
    fn release_port(&mut self, pos: usize) -> NetPort {
        let p = &mut self.ports[pos];
        p.publish_rx();
        Self::unwatch_kicks(&self.epoll, &p.kicks);
        let port = self.ports.swap_remove(pos);
        self.local[usize::from(port.idx)] = NOT_LOCAL;
        if let Some(moved) = self.ports.get(pos) {
            self.local[usize::from(moved.idx)] = pos as u16;
        }
        self.dirty.clear();
        port
    }

    /// Take over a port another worker released.
    fn adopt_port(&mut self, port: NetPort) -> Result<(), DataplaneError> {
        let idx = port.idx;
        if self.port_pos(idx).is_ok() {
            return Ok(());
        }
        self.watch_kicks(idx, &port.kicks)?;
        self.local[usize::from(idx)] = self.ports.len() as u16;
        self.ports.push(port);
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

/// Publish the RX used entries of the ports in `dirty` (and forget them).
fn publish_dirty(ports: &mut [NetPort], dirty: &mut Vec<u16>) {
    for pos in dirty.drain(..) {
        ports[usize::from(pos)].publish_rx();
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
