//! The vhost-user device side of one port connection (net or disk).
//!
//! The `vhost` crate parses the wire protocol ([`BackendReqHandler`]); this
//! module answers it. [`PortBackend`] keeps the per-connection protocol state
//! (features, memory table, ring set-up) and hands everything the dataplane
//! needs to the worker that owns the port, waiting for its acknowledgement
//! where the protocol requires the ring quiescent: `GET_VRING_BASE` answers
//! only once the worker has stopped the ring, and a memory table change only
//! once the worker has swapped mappings between two batches.
//!
//! Messages in an order the spec does not expect are handled without harm: a
//! ring starts only once it has a size, addresses, a memory table, its kick
//! and (with `VHOST_USER_F_PROTOCOL_FEATURES`) its enable, in whatever order
//! they come; a message naming a queue that does not exist is refused.
//!
//! What differs between device types (features, queues, configuration
//! space) is a [`Device`]: [`net::NetDevice`] and [`blk::BlkDevice`].
//!
//! [`BackendReqHandler`]: vhost::vhost_user::BackendReqHandler

pub mod blk;
pub mod net;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{
    Backend, Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vmm_sys_util::eventfd::EventFd;

use crate::dataplane::{Dataplane, DataplaneError, QueueSetup};
use crate::fdb::PortIdx;
use crate::mem::{GuestMemory, RegionSpec, MAX_REGIONS};
use crate::vring::{RingAddrs, MAX_QUEUE_SIZE};

/// What differs between device types.
pub trait Device: Send {
    /// The virtio features offered.
    fn features(&self) -> u64;
    /// The vhost-user protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// Number of virtqueues.
    fn queues(&self) -> usize;
    /// Largest ring the device accepts.
    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }
    /// Tell the dataplane what the frontend acked.
    fn apply_features(
        &mut self,
        dp: &Dataplane,
        idx: PortIdx,
        features: u64,
    ) -> Result<(), DataplaneError>;
    /// Read the configuration space.
    fn get_config(&mut self, offset: u32, size: u32) -> VhostResult<Vec<u8>>;
    /// Write the configuration space.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> VhostResult<()>;
}

#[derive(Default)]
struct QueueState {
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<EventFd>,
    /// A kick was set, with or without an fd (without: the ring is polled only).
    kick_set: bool,
    call: Option<EventFd>,
    enabled: bool,
    /// A `SET_VRING_ENABLE` reached us for this ring since it was last stopped.
    enable_seen: bool,
    started: bool,
}

/// Protocol state of one connection to one port.
pub struct PortBackend<D: Device> {
    name: String,
    idx: PortIdx,
    dp: Arc<Dataplane>,
    device: D,
    acked_features: u64,
    protocol_features: u64,
    mem: Option<Arc<GuestMemory>>,
    /// How many times each region was added: QEMU 7.2 adds (and removes)
    /// the same region once per queue pair.
    region_refs: Vec<(RegionSpec, u32)>,
    queues: Vec<QueueState>,
}

fn invalid(what: &'static str) -> VhostError {
    VhostError::InvalidOperation(what)
}

fn dp_err(e: DataplaneError) -> VhostError {
    log::warn!("dataplane refused a request: {e}");
    VhostError::BackendInternalError
}

/// Take a kick or call fd from the frontend. It must be an eventfd, and it
/// is made non-blocking: a worker reading a kick another queue already
/// cleared, or signalling a call whose counter the guest filled, must never
/// block (it polls every port it owns).
pub(crate) fn eventfd_from(file: File) -> VhostResult<EventFd> {
    let fd = file.as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    if !info.lines().any(|l| l.starts_with("eventfd-count:")) {
        log::warn!("frontend passed an fd that is not an eventfd for a kick or call");
        return Err(VhostError::InvalidParam);
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is involved.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(VhostError::InvalidParam);
    }
    // SAFETY: `into_raw_fd` gives up ownership of a valid, open eventfd,
    // which the EventFd then owns alone.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

impl<D: Device> PortBackend<D> {
    /// State for a fresh connection to port `idx`.
    pub fn new(name: &str, idx: PortIdx, dp: Arc<Dataplane>, device: D) -> Self {
        let queues = device.queues();
        PortBackend {
            name: name.to_string(),
            idx,
            dp,
            device,
            acked_features: 0,
            protocol_features: 0,
            mem: None,
            region_refs: Vec::new(),
            queues: (0..queues).map(|_| QueueState::default()).collect(),
        }
    }

    fn queue(&mut self, index: u32) -> VhostResult<&mut QueueState> {
        let n = self.queues.len();
        let name = &self.name;
        self.queues.get_mut(index as usize).ok_or_else(|| {
            log::warn!("port {name}: request for queue {index}, which does not exist (it has {n})");
            VhostError::InvalidParam
        })
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Start ring `index` in the worker if everything it needs has arrived.
    fn try_start(&mut self, index: usize) -> VhostResult<()> {
        if self.mem.is_none() {
            return Ok(());
        }
        let needs_enable = self.protocol_features_acked();
        let q = &mut self.queues[index];
        log::debug!(
            "port {}: queue {index}: size {} addrs {} kick {} enabled {} (needed {needs_enable})",
            self.name,
            q.size,
            q.addrs.is_some(),
            q.kick_set,
            q.enabled
        );
        // QEMU 7.2 sends SET_VRING_ENABLE before SET_FEATURES, and the vhost
        // crate refuses it then (protocol features not yet acked), so the
        // enable never reaches us. A ring that was never explicitly enabled
        // or disabled therefore starts on its kick, as it would without
        // protocol features; an explicit disable still holds it.
        let ready = !q.started
            && q.size != 0
            && q.addrs.is_some()
            && q.kick_set
            && (q.enabled || !needs_enable || !q.enable_seen);
        if !ready {
            return Ok(());
        }
        let Some(addrs) = q.addrs else { return Ok(()) };
        let kick = match &q.kick {
            Some(k) => Some(k.try_clone().map_err(VhostError::SocketError)?),
            None => None,
        };
        let call = match &q.call {
            Some(c) => Some(c.try_clone().map_err(VhostError::SocketError)?),
            None => None,
        };
        let setup = QueueSetup {
            size: q.size,
            addrs,
            base: q.base,
            kick,
            call,
        };
        match self.dp.start_queue(self.idx, index as u16, setup) {
            Ok(()) => {
                self.queues[index].started = true;
                log::debug!("port {}: queue {index} started", self.name);
                Ok(())
            }
            Err(e) => {
                log::warn!("port {}: cannot start queue {index}: {e}", self.name);
                Err(VhostError::InvalidParam)
            }
        }
    }

    /// Stop ring `index` in the worker; its next avail index becomes the base.
    fn stop(&mut self, index: usize) -> VhostResult<()> {
        if !self.queues[index].started {
            return Ok(());
        }
        let next = self.dp.stop_queue(self.idx, index as u16).map_err(dp_err)?;
        let q = &mut self.queues[index];
        q.started = false;
        if let Some(next) = next {
            q.base = next;
        }
        Ok(())
    }

    fn stop_all(&mut self) -> VhostResult<()> {
        for i in 0..self.queues.len() {
            self.stop(i)?;
        }
        Ok(())
    }

    fn install_memory(&mut self, mem: GuestMemory) -> VhostResult<()> {
        log::debug!("port {}: memory table {mem:?}", self.name);
        let mem = Arc::new(mem);
        self.dp.set_memory(self.idx, mem.clone()).map_err(dp_err)?;
        self.mem = Some(mem);
        for i in 0..self.queues.len() {
            // A ring waiting for memory may start now; a failure is logged.
            let _ = self.try_start(i);
        }
        Ok(())
    }
}

impl<D: Device> VhostUserBackendReqHandlerMut for PortBackend<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.stop_all()?;
        for q in &mut self.queues {
            *q = QueueState::default();
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.device.features();
        if features & !offered != 0 {
            log::warn!(
                "port {}: frontend acked features {:#x} that were not offered",
                self.name,
                features & !offered
            );
            return Err(VhostError::InvalidParam);
        }
        self.acked_features = features;
        log::debug!("port {}: features {features:#x}", self.name);
        self.device
            .apply_features(&self.dp, self.idx, features)
            .map_err(dp_err)?;
        // Without protocol features, rings are enabled as soon as they start.
        for i in 0..self.queues.len() {
            let _ = self.try_start(i);
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions: Vec<(RegionSpec, File)> = ctx
            .iter()
            .zip(files)
            .map(|(r, f)| {
                (
                    RegionSpec {
                        guest_phys_addr: r.guest_phys_addr,
                        size: r.memory_size,
                        user_addr: r.user_addr,
                        mmap_offset: r.mmap_offset,
                    },
                    f,
                )
            })
            .collect();
        let specs: Vec<RegionSpec> = regions.iter().map(|(s, _)| *s).collect();
        let mem = GuestMemory::from_table(regions).map_err(|e| {
            log::warn!("port {}: bad memory table: {e}", self.name);
            VhostError::InvalidParam
        })?;
        self.install_memory(mem)?;
        self.region_refs = specs.into_iter().map(|s| (s, 1)).collect();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let max = self.device.max_queue_size();
        let q = self.queue(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(VhostError::InvalidParam);
        }
        if q.started {
            return Err(invalid("queue size changed while the ring runs"));
        }
        q.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let q = self.queue(index)?;
        if q.started {
            return Err(invalid("ring addresses changed while the ring runs"));
        }
        q.addrs = Some(RingAddrs {
            desc: descriptor,
            avail: available,
            used,
        });
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let q = self.queue(index)?;
        if q.started {
            return Err(invalid("ring base changed while the ring runs"));
        }
        q.base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        if self.queue(index).is_err() {
            // The reply has no way to say "error", and the vhost crate sends
            // none when we fail, so the frontend would wait forever: hang up.
            return Err(VhostError::SocketBroken(std::io::Error::other(format!(
                "GET_VRING_BASE for queue {index}, which does not exist"
            ))));
        }
        let i = index as usize;
        if let Err(e) = self.stop(i) {
            // No reply could tell the frontend; hang up rather than leave it waiting.
            return Err(VhostError::SocketBroken(std::io::Error::other(format!(
                "cannot stop queue {index}: {e}"
            ))));
        }
        let q = &mut self.queues[i];
        // The ring is stopped: it restarts on the next kick.
        q.kick = None;
        q.kick_set = false;
        q.enabled = false;
        q.enable_seen = false;
        Ok(VhostUserVringState::new(index, u32::from(q.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        log::debug!(
            "port {}: kick for queue {index} (fd: {})",
            self.name,
            fd.is_some()
        );
        let kick = fd.map(eventfd_from).transpose()?;
        let q = self.queue(u32::from(index))?;
        q.kick = kick;
        q.kick_set = true;
        if q.started {
            // A new kick for a running ring: restart it with the new fd.
            self.stop(usize::from(index))?;
        }
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let idx = self.idx;
        let call = fd.map(eventfd_from).transpose()?;
        let q = self.queue(u32::from(index))?;
        q.call = call;
        if q.started {
            let call = match &q.call {
                Some(c) => Some(c.try_clone().map_err(VhostError::SocketError)?),
                None => None,
            };
            self.dp
                .set_call(idx, u16::from(index), call)
                .map_err(dp_err)?;
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.queue(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.device.protocol_features().bits();
        if features & !offered != 0 {
            log::warn!(
                "port {}: frontend acked protocol features {:#x} that were not offered",
                self.name,
                features & !offered
            );
            return Err(VhostError::InvalidParam);
        }
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        // Virtqueues, as the spec and rust-vmm frontends read it. QEMU's
        // vhost-user-net compares its queue pairs against this, so it accepts
        // any count up to the port's; ring indices past the port's queues
        // are refused at set-up.
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let q = self.queue(index)?;
        q.enabled = enable;
        q.enable_seen = true;
        if enable {
            self.try_start(index as usize)
        } else {
            self.stop(index as usize)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        self.device.get_config(offset, size)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.device.set_config(offset, buf)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(invalid("shared objects are not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        Err(invalid("inflight tracking is not offered"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        Err(invalid("inflight tracking is not offered"))
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        let spec = RegionSpec {
            guest_phys_addr: region.guest_phys_addr,
            size: region.memory_size,
            user_addr: region.user_addr,
            mmap_offset: region.mmap_offset,
        };
        if let Some((_, refs)) = self.region_refs.iter_mut().find(|(s, _)| *s == spec) {
            // The same region again: nothing to map.
            *refs += 1;
            return Ok(None);
        }
        let base = self
            .mem
            .clone()
            .unwrap_or_else(|| Arc::new(GuestMemory::empty()));
        let mem = base.with_region(spec, Arc::new(fd)).map_err(|e| {
            log::warn!("port {}: cannot add memory region: {e}", self.name);
            VhostError::InvalidParam
        })?;
        self.install_memory(mem)?;
        self.region_refs.push((spec, 1));
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let Some(pos) = self
            .region_refs
            .iter()
            .position(|(s, _)| s.guest_phys_addr == gpa && s.size == size)
        else {
            log::warn!(
                "port {}: REM_MEM_REG of a region that is not mapped ({gpa:#x}+{size:#x}); ignored",
                self.name
            );
            return Ok(());
        };
        self.region_refs[pos].1 -= 1;
        if self.region_refs[pos].1 > 0 {
            return Ok(());
        }
        self.region_refs.swap_remove(pos);
        let Some(base) = self.mem.clone() else {
            return Ok(());
        };
        let mem = base.without_region(gpa, size).map_err(|e| {
            log::warn!("port {}: cannot remove memory region: {e}", self.name);
            VhostError::InvalidParam
        })?;
        self.install_memory(mem)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(invalid("dirty logging is not offered"))
    }
}

impl<D: Device> Drop for PortBackend<D> {
    fn drop(&mut self) {
        // Best effort: the session detaches the port from its worker right
        // after, which stops every ring in any case.
        let _ = self.stop_all();
    }
}
