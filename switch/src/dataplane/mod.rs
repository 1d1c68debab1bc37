//! The dataplane: polling workers that own the rings of the ports assigned to
//! them and switch frames between those ports.
//!
//! Protocol events reach a worker as [`Command`]s on a channel; the caller
//! waits for the worker's answer where the vhost-user protocol needs the ring
//! quiescent. Frames for a port owned by another worker go through that
//! worker's bounded lock-free [`Mailbox`].

mod blk;
mod egress;
mod net;
mod qos;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use crossbeam_queue::ArrayQueue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::Disk;
use crate::fdb::{Fdb, PortIdx};
use crate::mem::GuestMemory;
use crate::stats::{PortStats, WorkerStats};
use crate::vring::{RingAddrs, RingSetupError};

pub use worker::WorkerConfig;

/// Most ports one switch serves (port indices are below this).
pub const MAX_PORTS: usize = 4096;
/// Most queue pairs per net port.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Largest Ethernet frame the switch carries (jumbo frames included), without the virtio header.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Most chains a worker takes from one ring per visit (`--batch`).
pub const MAX_BATCH: usize = 64;
/// Frames queued to one worker from the others.
pub(crate) const MAILBOX_DEPTH: usize = 1024;
/// Owner value of a port that no worker serves.
const NO_WORKER: u16 = u16::MAX;
/// How long a control-path caller waits for a worker's answer before giving up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the dataplane's control path.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot create an eventfd or epoll instance: {0}")]
    Os(#[from] std::io::Error),
    #[error("cannot start worker thread: {0}")]
    Spawn(std::io::Error),
    #[error(
        "worker {0} did not answer within {COMMAND_TIMEOUT:?}; the dataplane is stuck or gone"
    )]
    WorkerGone(usize),
    #[error("no worker {0} (the switch has {1})")]
    NoSuchWorker(usize, usize),
    #[error("port {0} is not attached to the dataplane")]
    NotAttached(PortIdx),
    #[error("queue {0} does not exist on this port")]
    NoSuchQueue(u16),
    #[error("queue {0} still has requests in flight")]
    QueueBusy(u16),
    #[error("cannot start ring: {0}")]
    Ring(#[from] RingSetupError),
    #[error("cannot set up disk I/O: {0}")]
    Io(#[from] crate::io_engine::IoEngineError),
}

/// What a worker needs to start one ring.
pub struct QueueSetup {
    pub size: u16,
    pub addrs: RingAddrs,
    pub base: u16,
    pub kick: Option<EventFd>,
    pub call: Option<EventFd>,
}

/// Negotiated device features a worker needs to know.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetFeatures {
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    pub version_1: bool,
    pub notify_on_empty: bool,
}

impl NetFeatures {
    /// Length of the virtio-net header in front of every frame.
    pub fn hdr_len(&self) -> usize {
        if self.version_1 || self.mrg_rxbuf {
            12
        } else {
            10
        }
    }
}

/// Negotiated features of a disk a worker needs to know.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFeatures {
    pub event_idx: bool,
}

/// Negotiated features, by device type.
#[derive(Debug, Clone, Copy)]
enum Features {
    Net(NetFeatures),
    Disk(DiskFeatures),
}

/// What a port attached to a worker is.
enum Device {
    Net {
        stats: Arc<PortStats>,
        settings: PortSettings,
    },
    Disk {
        disk: Arc<Disk>,
        settings: PortSettings,
    },
}

/// A port on its way from one worker to another, rings running.
enum Moving {
    Net(Box<net::NetPort>),
    Disk(Box<blk::DiskPort>),
}

/// Per-port settings the dataplane applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSettings {
    /// Broadcast domain: frames stay among ports of the same VLAN (0 = none).
    pub vlan: u16,
    /// Largest IP packet (frames over MTU + 18 bytes are dropped); 0: no limit.
    pub mtu: u16,
    /// Limits and share of the port (or disk).
    pub qos: crate::qos::QosSpec,
    /// Identities the port carries: source checks and translation (net
    /// ports only; `None`: a plain port).
    pub policy: Option<Arc<crate::identity::policy::PortPolicy>>,
}

impl PortSettings {
    /// Whether a frame of `len` bytes exceeds the MTU.
    #[inline]
    pub fn over_mtu(&self, len: u32) -> bool {
        self.mtu != 0 && len > u32::from(self.mtu) + 18
    }
}

/// A request to a worker.
enum Command {
    Attach {
        idx: PortIdx,
        device: Device,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Detach {
        idx: PortIdx,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Features {
        idx: PortIdx,
        features: Features,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Memory {
        idx: PortIdx,
        mem: Arc<GuestMemory>,
        reply: Sender<Result<(), DataplaneError>>,
    },
    StartQueue {
        idx: PortIdx,
        queue: u16,
        setup: QueueSetup,
        reply: Sender<Result<(), DataplaneError>>,
    },
    StopQueue {
        idx: PortIdx,
        queue: u16,
        reply: Sender<Result<Option<u16>, DataplaneError>>,
    },
    SetCall {
        idx: PortIdx,
        queue: u16,
        call: Option<EventFd>,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Settings {
        idx: PortIdx,
        settings: PortSettings,
        reply: Sender<Result<(), DataplaneError>>,
    },
    /// Hand the port, rings and all, to the caller (to move it). A disk is
    /// handed over once its requests in flight have finished.
    Release {
        idx: PortIdx,
        reply: Sender<Result<Moving, DataplaneError>>,
    },
    /// Answer once between two batches: after it, the worker acts on what
    /// the shared state said when the barrier was sent.
    Barrier {
        reply: Sender<Result<(), DataplaneError>>,
    },
    /// Take over a port another worker released.
    Adopt {
        port: Moving,
        reply: Sender<Result<(), DataplaneError>>,
    },
    Shutdown,
}

/// A frame handed from one worker to another.
pub(crate) struct Frame {
    pub buf: Box<[u8]>,
    pub len: u32,
    pub src: PortIdx,
    /// Destination port, or [`FLOOD`].
    pub dst: PortIdx,
    pub vlan: u16,
    /// [`Shared::ident_gen`] when the frame was switched.
    pub gen: u32,
}

/// `Frame::dst` of a frame to flood to every local port of its VLAN.
pub(crate) const FLOOD: PortIdx = crate::fdb::NO_PORT;

/// The inbound side of a worker that other workers use.
pub(crate) struct Mailbox {
    pub frames: ArrayQueue<Frame>,
    pub pool: ArrayQueue<Box<[u8]>>,
    pub wake: EventFd,
    pub sleeping: AtomicBool,
}

impl Mailbox {
    fn new() -> Result<Self, DataplaneError> {
        let pool = ArrayQueue::new(MAILBOX_DEPTH);
        for _ in 0..MAILBOX_DEPTH {
            let _ = pool.push(vec![0u8; MAX_FRAME_LEN].into_boxed_slice());
        }
        Ok(Mailbox {
            frames: ArrayQueue::new(MAILBOX_DEPTH),
            pool,
            wake: EventFd::new(EFD_NONBLOCK)?,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wake the worker if it sleeps.
    pub fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }
}

/// State every worker shares.
pub(crate) struct Shared {
    pub fdb: Fdb,
    /// Ports whose guest broke a ring, for the control plane to report.
    pub faults: Sender<PortIdx>,
    /// Which worker serves each port.
    pub owner: Box<[AtomicU16]>,
    /// Each port's QoS weight (1 when none is set), for the egress queues
    /// of the ports it sends to.
    pub weights: Box<[AtomicU16]>,
    pub mailboxes: Vec<Mailbox>,
    pub epoch: Instant,
    /// Bumped before any port's identities change (after the FDB says
    /// where they went). A frame switched under an older generation is
    /// looked up again before it is delivered late (from a mailbox or an
    /// egress queue), so that once a move has returned nothing switched to
    /// the identity's old port reaches it.
    pub ident_gen: AtomicU32,
}

impl Shared {
    #[inline]
    pub fn owner(&self, idx: PortIdx) -> Option<usize> {
        match self.owner.get(usize::from(idx))?.load(Ordering::Acquire) {
            NO_WORKER => None,
            w => Some(usize::from(w)),
        }
    }

    /// A port's QoS weight.
    #[inline]
    pub fn weight(&self, idx: PortIdx) -> u16 {
        self.weights
            .get(usize::from(idx))
            .map_or(1, |w| w.load(Ordering::Relaxed))
    }

    /// Publish a port's QoS weight.
    pub fn set_weight(&self, idx: PortIdx, qos: &crate::qos::QosSpec) {
        if let Some(w) = self.weights.get(usize::from(idx)) {
            w.store(
                qos.weight.unwrap_or(1).min(u32::from(u16::MAX)) as u16,
                Ordering::Relaxed,
            );
        }
    }

    /// Milliseconds since the switch started (the FDB's clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Nanoseconds since the switch started (the QoS clock).
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

struct WorkerHandle {
    commands: Sender<Command>,
    wake: EventFd,
    stats: Arc<WorkerStats>,
    thread: Option<JoinHandle<()>>,
}

/// The set of workers, as the control plane sees it.
pub struct Dataplane {
    shared: Arc<Shared>,
    workers: Vec<WorkerHandle>,
    /// Serialises control operations, so that a port's owner cannot change
    /// between looking it up and the worker acting on it.
    ctl: std::sync::Mutex<()>,
}

impl Dataplane {
    /// Start `n` workers.
    ///
    /// Worker `i` runs on CPU `cpus[i % cpus.len()]` when `cpus` is not
    /// empty.
    pub fn start(
        n: usize,
        config: WorkerConfig,
        cpus: &[usize],
        fdb_capacity: usize,
        ageing_ms: u64,
        faults: Sender<PortIdx>,
    ) -> Result<Self, DataplaneError> {
        let n = n.max(1);
        let mailboxes = (0..n).map(|_| Mailbox::new()).collect::<Result<_, _>>()?;
        let shared = Arc::new(Shared {
            fdb: Fdb::new(fdb_capacity, ageing_ms),
            faults,
            owner: (0..MAX_PORTS).map(|_| AtomicU16::new(NO_WORKER)).collect(),
            weights: (0..MAX_PORTS).map(|_| AtomicU16::new(1)).collect(),
            mailboxes,
            epoch: Instant::now(),
            ident_gen: AtomicU32::new(0),
        });
        let mut workers = Vec::with_capacity(n);
        for id in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let stats = Arc::new(WorkerStats::default());
            let w = worker::Worker::new(
                id,
                shared.clone(),
                rx,
                wake.try_clone()?,
                stats.clone(),
                config,
            )?;
            let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("vioswitch-worker-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        match crate::cpu::pin_current_thread(cpu) {
                            Ok(()) => log::info!("worker {id}: on CPU {cpu}"),
                            Err(e) => log::error!("worker {id}: cannot run on CPU {cpu}: {e}"),
                        }
                    }
                    w.run()
                })
                .map_err(DataplaneError::Spawn)?;
            workers.push(WorkerHandle {
                commands: tx,
                wake,
                stats,
                thread: Some(thread),
            });
        }
        Ok(Dataplane {
            shared,
            workers,
            ctl: std::sync::Mutex::new(()),
        })
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The FDB.
    pub fn fdb(&self) -> &Fdb {
        &self.shared.fdb
    }

    /// Milliseconds since start, the FDB's clock.
    pub fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// A worker's counters.
    pub fn worker_stats(&self, worker: usize) -> Option<&WorkerStats> {
        self.workers.get(worker).map(|w| &*w.stats)
    }

    /// Flood `frames` (whole Ethernet frames, e.g. announcements of an
    /// identity that moved to `src`) to every port of `vlan` but `src`, as
    /// if `src`'s guest had sent them. Returns how many frames were queued
    /// to all workers; a full mailbox drops the rest (counted nowhere: an
    /// announcement is best effort, like the guest's own).
    pub fn announce(&self, src: PortIdx, vlan: u16, frames: &[Vec<u8>]) -> usize {
        let mut queued = 0;
        let gen = self.shared.ident_gen.load(Ordering::Acquire);
        for mb in &self.shared.mailboxes {
            for f in frames.iter().filter(|f| f.len() <= MAX_FRAME_LEN) {
                let Some(mut buf) = mb.pool.pop() else {
                    break;
                };
                buf[..f.len()].copy_from_slice(f);
                let frame = Frame {
                    buf,
                    len: f.len() as u32,
                    src,
                    dst: FLOOD,
                    vlan,
                    gen,
                };
                match mb.frames.push(frame) {
                    Ok(()) => queued += 1,
                    Err(f) => {
                        let _ = mb.pool.push(f.buf);
                        break;
                    }
                }
            }
            mb.wake();
        }
        queued
    }

    /// The worker serving a port.
    pub fn owner(&self, idx: PortIdx) -> Option<usize> {
        self.shared.owner(idx)
    }

    fn call<T>(
        &self,
        worker: usize,
        make: impl FnOnce(Sender<Result<T, DataplaneError>>) -> Command,
    ) -> Result<T, DataplaneError> {
        let w = self
            .workers
            .get(worker)
            .ok_or(DataplaneError::NoSuchWorker(worker, self.workers.len()))?;
        let (tx, rx) = bounded(1);
        w.commands
            .send(make(tx))
            .map_err(|_| DataplaneError::WorkerGone(worker))?;
        let _ = w.wake.write(1);
        rx.recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| DataplaneError::WorkerGone(worker))?
    }

    fn owner_of(&self, idx: PortIdx) -> Result<usize, DataplaneError> {
        self.shared
            .owner(idx)
            .ok_or(DataplaneError::NotAttached(idx))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send a command to the worker that owns `idx`.
    fn call_port<T>(
        &self,
        idx: PortIdx,
        make: impl FnOnce(Sender<Result<T, DataplaneError>>) -> Command,
    ) -> Result<T, DataplaneError> {
        let _g = self.lock();
        let w = self.owner_of(idx)?;
        self.call(w, make)
    }

    /// Move an attached port to another worker without stopping its rings:
    /// the old worker hands the port over between two batches and the new
    /// one takes it up where it was. Unicast frames for it that reach the new
    /// worker before the port does wait there (up to the mailbox depth), so
    /// unicast flows lose nothing and stay in order both ways. A broadcast
    /// in flight during the move may reach the port twice (from the old
    /// worker's drain and the new worker's copy) or, past the parking
    /// limit, not at all.
    pub fn move_port(&self, idx: PortIdx, worker: usize) -> Result<(), DataplaneError> {
        if worker >= self.workers.len() {
            return Err(DataplaneError::NoSuchWorker(worker, self.workers.len()));
        }
        let _g = self.lock();
        let old = self.owner_of(idx)?;
        if old == worker {
            return Ok(());
        }
        let slot = &self.shared.owner[usize::from(idx)];
        slot.store(worker as u16, Ordering::Release);
        // Every frame for the port switched from now on goes to the new
        // worker (and waits there); the barrier makes sure no worker is still
        // in a batch that read the old owner. Then the old worker delivers
        // what it still has for the port, in order, and hands it over.
        for w in 0..self.workers.len() {
            self.call(w, |reply| Command::Barrier { reply })?;
        }
        let port = match self.call(old, |reply| Command::Release { idx, reply }) {
            Ok(p) => p,
            Err(e) => {
                slot.store(old as u16, Ordering::Release);
                return Err(e);
            }
        };
        self.call(worker, |reply| Command::Adopt { port, reply })
    }

    /// Give a net port to a worker. The port has no rings until queues are started.
    pub fn attach(
        &self,
        idx: PortIdx,
        worker: usize,
        stats: Arc<PortStats>,
        settings: PortSettings,
    ) -> Result<(), DataplaneError> {
        self.attach_device(idx, worker, Device::Net { stats, settings })
    }

    /// Give a disk to a worker. It has no rings until queues are started.
    pub fn attach_disk(
        &self,
        idx: PortIdx,
        worker: usize,
        disk: Arc<Disk>,
        settings: PortSettings,
    ) -> Result<(), DataplaneError> {
        self.attach_device(idx, worker, Device::Disk { disk, settings })
    }

    fn attach_device(
        &self,
        idx: PortIdx,
        worker: usize,
        device: Device,
    ) -> Result<(), DataplaneError> {
        if worker >= self.workers.len() {
            return Err(DataplaneError::NoSuchWorker(worker, self.workers.len()));
        }
        let _g = self.lock();
        self.call(worker, |reply| Command::Attach { idx, device, reply })?;
        self.shared.owner[usize::from(idx)].store(worker as u16, Ordering::Release);
        Ok(())
    }

    /// Take a port away from its worker. When this returns, the worker no
    /// longer touches the port's rings or memory, and its learnt FDB entries
    /// are gone (static ones stay: they outlive a guest's reconnects). A
    /// disk's requests in flight finish (and are answered) first.
    pub fn detach(&self, idx: PortIdx) -> Result<(), DataplaneError> {
        let _g = self.lock();
        let worker = self.owner_of(idx)?;
        self.shared.owner[usize::from(idx)].store(NO_WORKER, Ordering::Release);
        let res = self.call(worker, |reply| Command::Detach { idx, reply });
        self.shared.fdb.flush_port(idx, false);
        res
    }

    /// Tell the worker a net port's negotiated features.
    pub fn set_features(&self, idx: PortIdx, features: NetFeatures) -> Result<(), DataplaneError> {
        self.call_port(idx, |reply| Command::Features {
            idx,
            features: Features::Net(features),
            reply,
        })
    }

    /// Tell the worker a disk's negotiated features.
    pub fn set_disk_features(
        &self,
        idx: PortIdx,
        features: DiskFeatures,
    ) -> Result<(), DataplaneError> {
        self.call_port(idx, |reply| Command::Features {
            idx,
            features: Features::Disk(features),
            reply,
        })
    }

    /// Swap the port's guest memory; returns once no copy uses the old one.
    pub fn set_memory(&self, idx: PortIdx, mem: Arc<GuestMemory>) -> Result<(), DataplaneError> {
        self.call_port(idx, |reply| Command::Memory { idx, mem, reply })
    }

    /// Start polling (TX) or filling (RX) a ring.
    pub fn start_queue(
        &self,
        idx: PortIdx,
        queue: u16,
        setup: QueueSetup,
    ) -> Result<(), DataplaneError> {
        self.call_port(idx, |reply| Command::StartQueue {
            idx,
            queue,
            setup,
            reply,
        })
    }

    /// Stop a ring; returns its next avail index if it was running. A disk
    /// queue stops taking requests at once and stops once those in flight
    /// have been answered.
    pub fn stop_queue(&self, idx: PortIdx, queue: u16) -> Result<Option<u16>, DataplaneError> {
        self.call_port(idx, |reply| Command::StopQueue { idx, queue, reply })
    }

    /// Replace a running ring's call eventfd.
    pub fn set_call(
        &self,
        idx: PortIdx,
        queue: u16,
        call: Option<EventFd>,
    ) -> Result<(), DataplaneError> {
        self.call_port(idx, |reply| Command::SetCall {
            idx,
            queue,
            call,
            reply,
        })
    }

    /// Change a port's settings.
    ///
    /// When the port's identities change, the caller updates the FDB
    /// first: frames switched before that are then looked up again if they
    /// reach a port late (see [`Shared::ident_gen`]), so that once this
    /// returns none reaches the port an identity left.
    pub fn set_settings(&self, idx: PortIdx, settings: PortSettings) -> Result<(), DataplaneError> {
        // Any change may be one of identities: a spurious bump only costs
        // the frames in flight a second lookup.
        self.shared.ident_gen.fetch_add(1, Ordering::AcqRel);
        self.call_port(idx, |reply| Command::Settings {
            idx,
            settings,
            reply,
        })
    }
}

impl std::ops::Drop for Dataplane {
    fn drop(&mut self) {
        for w in &self.workers {
            let _ = w.commands.send(Command::Shutdown);
            let _ = w.wake.write(1);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}
