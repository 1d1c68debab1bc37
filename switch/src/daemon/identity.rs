//! The switch's identity operations: the registry's decisions applied to
//! the FDB, the ports' policies, the network (announcements) and the event
//! stream; and the monitor thread that fails identities over and sends the
//! later announcement rounds.
//!
//! Locks are taken in one order: the registry, then the port table, then
//! the static FDB entries. A port's session takes none of them: it reports
//! a guest that went away on a channel the monitor reads, so a session
//! stopped by someone holding the port table never waits for the monitor.

use std::net::IpAddr;
use std::sync::{MutexGuard, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver};
use serde::Serialize;
use serde_json::json;

use super::{Switch, SwitchError};
use crate::fdb::{Learn, PortIdx};
use crate::identity::addr::MacAddr;
use crate::identity::announce::announcements;
use crate::identity::failover::{
    pick_standby, stall_tick, standby_stall_ms, Health, PortState, Trigger, RETRY_TICK,
};
use crate::identity::registry::{IdentityError, IdentitySpec, Registry};
use crate::port::{PortChanges, PortError, PortInfo, PortTable};

/// When the announcement rounds after the first (which goes out at once)
/// are sent, counted from the binding. QEMU announces a migrated guest in
/// five rounds over about a second; three over 200 ms cover a lost frame
/// without keeping peers busy.
const LATER_ROUNDS: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(200)];

/// Why an identity's binding changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// A control command.
    Command,
    /// Failover.
    Failover(Trigger),
    /// Its port was removed.
    PortRemoved,
    /// The identity was removed.
    IdentityRemoved,
    /// Brought back from the saved state: no announcement, no event.
    Restore,
}

impl Cause {
    /// The `reason` of its events.
    fn as_str(self) -> &'static str {
        match self {
            Cause::Command => "command",
            Cause::Failover(t) => t.as_str(),
            Cause::PortRemoved => "port_removed",
            Cause::IdentityRemoved => "identity_removed",
            Cause::Restore => "restore",
        }
    }
}

/// What the identity monitor is told besides disconnects.
pub(super) enum Notice {
    /// Bindings, standbys or stall times changed: look again at what to
    /// watch.
    Changed,
    /// Send the later announcement rounds of `identity`'s binding `seq`.
    Announce { identity: String, seq: u64 },
}

/// An identity as `identity.show` and `identity.list` give it.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityInfo {
    pub name: String,
    pub mac: MacAddr,
    pub ips: Vec<IpAddr>,
    pub vlan: u16,
    /// The port it is bound to.
    pub port: Option<String>,
    /// That port's health.
    pub health: Option<Health>,
    pub stall_ms: u64,
    /// Its standby ports, in order of preference, with their health.
    pub standby: Vec<StandbyInfo>,
    /// The trigger of a failover that found no healthy standby and waits
    /// for one.
    pub failover_pending: Option<&'static str>,
}

/// A standby port and its health.
#[derive(Debug, Clone, Serialize)]
pub struct StandbyInfo {
    pub port: String,
    pub health: Health,
}

impl Switch {
    pub(super) fn identities(&self) -> MutexGuard<'_, Registry> {
        self.identities.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tell the monitor; it only ends with the switch.
    fn notify(&self, n: Notice) {
        let _ = self.notices.send(n);
    }

    /// What failover reads of a port.
    fn port_state(&self, ports: &PortTable, name: &str) -> Option<PortState> {
        let p = ports.get(name).ok()?;
        Some(PortState {
            connected: p.status.live(),
            attached: self.dp.owner(p.idx).is_some(),
            broken: p.broken(),
            rx_stalled_since: p.stats.rx_stalled_since(),
        })
    }

    /// A port's health now, a stall counting after `stall_ms`.
    fn health(&self, ports: &PortTable, name: &str, stall_ms: u64) -> Health {
        self.port_state(ports, name)
            .map_or(Health::Disconnected, |s| {
                s.health(self.dp.now_ms(), stall_ms)
            })
    }

    fn info(&self, reg: &Registry, ports: &PortTable, spec: &IdentitySpec) -> IdentityInfo {
        let standby_stall = standby_stall_ms(spec.stall_ms);
        IdentityInfo {
            name: spec.name.clone(),
            mac: spec.mac,
            ips: spec.ips.clone(),
            vlan: spec.vlan,
            port: spec.port.clone(),
            health: spec
                .port
                .as_deref()
                .map(|p| self.health(ports, p, spec.stall_ms)),
            stall_ms: spec.stall_ms,
            standby: spec
                .standby
                .iter()
                .map(|p| StandbyInfo {
                    port: p.clone(),
                    health: self.health(ports, p, standby_stall),
                })
                .collect(),
            failover_pending: reg.failing(&spec.name).map(Trigger::as_str),
        }
    }

    /// The answer of a command that changed identity `name`.
    fn info_of(
        &self,
        reg: &Registry,
        ports: &PortTable,
        name: &str,
    ) -> Result<IdentityInfo, SwitchError> {
        Ok(self.info(reg, ports, reg.get(name)?))
    }

    /// Every identity, by name (`identity.list`).
    pub fn identity_list(&self) -> Vec<IdentityInfo> {
        let reg = self.identities();
        let ports = self.ports();
        reg.iter().map(|s| self.info(&reg, &ports, s)).collect()
    }

    /// One identity (`identity.show`).
    pub fn identity_show(&self, name: &str) -> Result<IdentityInfo, SwitchError> {
        let reg = self.identities();
        let ports = self.ports();
        self.info_of(&reg, &ports, name)
    }

    /// Add an identity, unbound (`identity.add`). A saved identity of that
    /// name that could not be restored is replaced.
    pub fn identity_add(&self, spec: IdentitySpec) -> Result<IdentityInfo, SwitchError> {
        let mut reg = self.identities();
        let ports = self.ports();
        let name = spec.name.clone();
        reg.add(spec, &*ports)?;
        self.unrestored().identities.retain(|i| i.name != name);
        self.info_of(&reg, &ports, &name)
    }

    /// Remove an identity, unbinding it first (`identity.del`). A saved
    /// identity that could not be restored is forgotten.
    pub fn identity_del(&self, name: &str) -> Result<(), SwitchError> {
        {
            let mut u = self.unrestored();
            let before = u.identities.len();
            u.identities.retain(|i| i.name != name);
            if u.identities.len() != before {
                return Ok(());
            }
        }
        let mut reg = self.identities();
        let ports = self.ports();
        if reg.get(name)?.port.is_some() {
            self.rebind(&mut reg, &ports, name, None, Cause::IdentityRemoved)?;
        }
        reg.remove(name)?;
        self.notify(Notice::Changed);
        Ok(())
    }

    /// Bind an unbound identity to a port (`identity.bind`); binding it to
    /// the port it is on changes nothing.
    pub fn identity_bind(&self, name: &str, port: &str) -> Result<IdentityInfo, SwitchError> {
        let mut reg = self.identities();
        let ports = self.ports();
        match reg.get(name)?.port.as_deref() {
            Some(p) if p == port => {}
            Some(p) => return Err(IdentityError::Bound(name.to_string(), p.to_string()).into()),
            None => self.rebind(&mut reg, &ports, name, Some(port), Cause::Command)?,
        }
        self.info_of(&reg, &ports, name)
    }

    /// Unbind an identity (`identity.unbind`).
    pub fn identity_unbind(&self, name: &str) -> Result<IdentityInfo, SwitchError> {
        let mut reg = self.identities();
        let ports = self.ports();
        if reg.get(name)?.port.is_none() {
            return Err(IdentityError::NotBound(name.to_string()).into());
        }
        self.rebind(&mut reg, &ports, name, None, Cause::Command)?;
        self.info_of(&reg, &ports, name)
    }

    /// Move a bound identity to another port (`identity.move`); moving it
    /// to the port it is on changes nothing.
    pub fn identity_move(&self, name: &str, to: &str) -> Result<IdentityInfo, SwitchError> {
        let mut reg = self.identities();
        let ports = self.ports();
        match reg.get(name)?.port.as_deref() {
            None => return Err(IdentityError::NotBound(name.to_string()).into()),
            Some(p) if p == to => {}
            Some(_) => self.rebind(&mut reg, &ports, name, Some(to), Cause::Command)?,
        }
        self.info_of(&reg, &ports, name)
    }

    /// Change an identity's standby ports and stall time (`identity.set`).
    pub fn identity_set(
        &self,
        name: &str,
        standby: Option<Vec<String>>,
        stall_ms: Option<u64>,
    ) -> Result<IdentityInfo, SwitchError> {
        let mut reg = self.identities();
        let ports = self.ports();
        reg.set(name, standby, stall_ms, &*ports)?;
        self.notify(Notice::Changed);
        self.info_of(&reg, &ports, name)
    }

    /// Remove a net port: the identities bound to it are unbound (they
    /// stay, to be bound elsewhere), it leaves every standby list, and its
    /// static FDB entries are forgotten.
    pub fn remove_port(&self, name: &str) -> Result<(), SwitchError> {
        let mut reg = self.identities();
        let mut ports = self.ports();
        if ports.get(name)?.disk().is_some() {
            return Err(PortError::IsADisk(name.to_string()).into());
        }
        let bound: Vec<String> = reg.bound_to(name).iter().map(|i| i.name.clone()).collect();
        for identity in &bound {
            self.rebind(&mut reg, &ports, identity, None, Cause::PortRemoved)?;
        }
        for identity in reg.drop_standby(name) {
            log::info!("port {name} removed: no longer a standby of identity {identity}");
        }
        ports.remove(name)?;
        drop(ports);
        drop(reg);
        self.forget_statics_of(name);
        self.notify(Notice::Changed);
        Ok(())
    }

    /// Change a net port. Its VLAN cannot change while an identity uses it
    /// (bound or as a standby); a change of its identity options gives it
    /// a new policy.
    pub fn set_port(&self, name: &str, changes: PortChanges) -> Result<PortInfo, SwitchError> {
        let reg = self.identities();
        let mut ports = self.ports();
        let port = ports.get(name)?;
        if port.disk().is_some() {
            return Err(PortError::IsADisk(name.to_string()).into());
        }
        if changes.vlan.is_some_and(|v| v != port.spec.vlan) {
            if let Some(user) = reg.port_user(name) {
                return Err(IdentityError::PortInUse {
                    port: name.to_string(),
                    name: user.name.clone(),
                    vlan: user.vlan,
                }
                .into());
            }
        }
        let touch = changes.touch_policy();
        let info = ports.set(name, changes)?;
        if touch {
            self.push_policy(&reg, &ports, name)?;
        }
        Ok(info)
    }

    /// Give a port the policy of the identities it carries now.
    fn push_policy(
        &self,
        reg: &Registry,
        ports: &PortTable,
        port: &str,
    ) -> Result<(), SwitchError> {
        let spec = &ports.get(port)?.spec;
        Ok(ports.set_policy(port, reg.policy(spec))?)
    }

    /// Refuse a binding of `spec` that a static FDB entry of the user's
    /// would contradict.
    fn check_statics(&self, spec: &IdentitySpec) -> Result<(), IdentityError> {
        let mac = spec.mac.to_string();
        match self
            .statics()
            .iter()
            .find(|e| e.mac == mac && e.vlan == spec.vlan)
        {
            Some(e) => Err(IdentityError::StaticEntry {
                mac: spec.mac,
                vlan: spec.vlan,
                port: e.port.clone(),
                name: spec.name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Bind identity `name` to port `to` (`None`: unbind it), in this
    /// order:
    /// 1. `to`'s worker gets `to`'s policy, now with the identity, so that
    ///    the first frames for the identity that reach `to` are already
    ///    translated for its guest;
    /// 2. the FDB's static entry for its MAC in its VLAN points to `to`,
    ///    replaced in place so that frames for the MAC never find it
    ///    unknown (or the entry is removed);
    /// 3. the old port's worker gets its policy, now without it (frames
    ///    switched to it before step 2 and still in flight are looked up
    ///    again before a late delivery: none reaches it after this);
    /// 4. `to` announces the identity: a round at once, later ones from
    ///    the monitor;
    /// 5. (the caller) the state is saved, once the dataplane has the
    ///    change;
    /// 6. that save sends the event (`identity.bound`, `.unbound` or
    ///    `.moved`).
    ///
    /// Everything that can refuse comes before step 1 (a full FDB, found
    /// at step 2, puts step 1 back); after it, only a dataplane failure is
    /// reported (the binding stands, and its policies reach the workers
    /// when their guests attach).
    fn rebind(
        &self,
        reg: &mut Registry,
        ports: &PortTable,
        name: &str,
        to: Option<&str>,
        cause: Cause,
    ) -> Result<(), SwitchError> {
        let spec = reg.get(name)?.clone();
        let fdb = self.dp.fdb();
        let idx = match to {
            Some(port) => {
                reg.check_bind(name, port, ports)?;
                self.check_statics(&spec)?;
                Some(ports.get(port)?.idx)
            }
            None => None,
        };
        let from = reg.set_binding(name, to)?;
        let mut pushed = to.map_or(Ok(()), |p| self.push_policy(reg, ports, p));
        match idx {
            Some(idx) => {
                if fdb.add_static(&spec.mac.0, spec.vlan, idx) == Learn::Full {
                    reg.set_binding(name, from.as_deref())?;
                    if let Some(port) = to {
                        let _ = self.push_policy(reg, ports, port);
                    }
                    return Err(IdentityError::FdbFull(spec.mac).into());
                }
            }
            None => {
                fdb.remove(&spec.mac.0, spec.vlan);
            }
        }
        if let Some(old) = from.as_deref().filter(|f| Some(*f) != to) {
            pushed = pushed.and(self.push_policy(reg, ports, old));
        }
        if cause == Cause::Restore {
            return pushed;
        }
        if let Some(port) = to {
            self.announce(&spec, ports, port);
            if let Some(seq) = reg.seq(name) {
                self.notify(Notice::Announce {
                    identity: name.to_string(),
                    seq,
                });
            }
        }
        let reason = cause.as_str();
        let event = match (from.as_deref(), to) {
            (None, Some(port)) => {
                Some(("identity.bound", json!({ "identity": name, "port": port })))
            }
            (Some(port), None) => Some((
                "identity.unbound",
                json!({ "identity": name, "port": port, "reason": reason }),
            )),
            (Some(from), Some(to)) => Some((
                "identity.moved",
                json!({ "identity": name, "from": from, "to": to, "reason": reason }),
            )),
            (None, None) => None,
        };
        // Sent by the save that follows (see `unsaved_events`).
        self.unsaved_events().extend(event);
        log::info!(
            "identity {name}: {} -> {} ({reason})",
            from.as_deref().unwrap_or("unbound"),
            to.unwrap_or("unbound")
        );
        self.notify(Notice::Changed);
        pushed
    }

    /// Flood one round of `spec`'s announcements from `port`.
    fn announce(&self, spec: &IdentitySpec, ports: &PortTable, port: &str) {
        if let Ok(p) = ports.get(port) {
            let frames = announcements(spec.mac.0, &spec.ips);
            self.dp.announce(p.idx, spec.vlan, &frames);
        }
    }

    /// A later announcement round of binding `seq` of `name`, unless the
    /// identity has moved since.
    fn announce_again(&self, name: &str, seq: u64) {
        let reg = self.identities();
        if reg.seq(name) != Some(seq) {
            return;
        }
        let Ok(spec) = reg.get(name) else { return };
        if let Some(port) = &spec.port {
            self.announce(spec, &self.ports(), port);
        }
    }

    /// Bring back saved identities, after the ports. One that cannot come
    /// back exactly as saved (a port missing, a rule broken) is logged and
    /// returned, to stay in the saved state.
    pub(super) fn restore_identities(&self, saved: &[IdentitySpec]) -> Vec<IdentitySpec> {
        let mut failed = Vec::new();
        let mut reg = self.identities();
        let ports = self.ports();
        for spec in saved {
            let restored = match (reg.add(spec.clone(), &*ports), &spec.port) {
                (Err(e), _) => Err(e.into()),
                (Ok(_), Some(p)) => {
                    self.rebind(&mut reg, &ports, &spec.name, Some(p), Cause::Restore)
                }
                (Ok(_), None) => Ok(()),
            };
            if let Err(e) = restored {
                log::error!(
                    "cannot restore identity {}: {e}; it stays in the saved state",
                    spec.name
                );
                if reg.get(&spec.name).is_ok_and(|s| s.port.is_none()) {
                    let _ = reg.remove(&spec.name);
                    failed.push(spec.clone());
                }
            }
        }
        failed
    }

    /// Refuse a static FDB entry for an identity's address.
    pub(super) fn check_static_free(&self, mac: [u8; 6], vlan: u16) -> Result<(), SwitchError> {
        match self.identities().mac_owner(mac, vlan) {
            Some(i) => Err(IdentityError::OwnedMac {
                mac: MacAddr(mac),
                vlan,
                by: i.name.clone(),
            }
            .into()),
            None => Ok(()),
        }
    }

    /// A port's guest went away: the identities bound to it with standbys
    /// fail over. Returns whether one moved.
    fn port_down(&self, idx: PortIdx) -> bool {
        let mut reg = self.identities();
        let ports = self.ports();
        let Some(port) = ports.by_index(idx).map(|p| p.spec.name.clone()) else {
            return false;
        };
        let names: Vec<String> = reg
            .bound_to(&port)
            .iter()
            .filter(|i| !i.standby.is_empty())
            .map(|i| i.name.clone())
            .collect();
        let mut moved = false;
        for n in names {
            moved |= self.fail_over(&mut reg, &ports, &n, Trigger::Disconnected);
        }
        moved
    }

    /// Fail identities over whose guest's RX ring stalled, and try again
    /// the failovers that wait for a standby. Returns whether one moved,
    /// and how soon to look again (`None`: nothing to watch).
    fn watch(&self) -> (bool, Option<Duration>) {
        let mut reg = self.identities();
        let ports = self.ports();
        let watched: Vec<(String, String, u64)> = reg
            .iter()
            .filter(|i| !i.standby.is_empty())
            .filter_map(|i| Some((i.name.clone(), i.port.clone()?, i.stall_ms)))
            .collect();
        let mut moved = false;
        for (name, port, stall_ms) in &watched {
            let trigger = match reg.failing(name) {
                Some(t) => Some(t),
                None if self.health(&ports, port, *stall_ms) == Health::RxStalled => {
                    Some(Trigger::RxStalled)
                }
                None => None,
            };
            if let Some(t) = trigger {
                moved |= self.fail_over(&mut reg, &ports, name, t);
            }
        }
        let tick = watched
            .iter()
            .filter_map(|(name, _, stall_ms)| match reg.failing(name) {
                Some(_) => Some(RETRY_TICK),
                None => (*stall_ms > 0).then(|| stall_tick(*stall_ms)),
            })
            .min();
        (moved, tick)
    }

    /// Move identity `name` off its port if that port is still unhealthy,
    /// to the first healthy standby. With none, note the failover as
    /// pending (the first time: `identity.failover_failed`) so that the
    /// monitor tries again. Returns whether it moved.
    fn fail_over(
        &self,
        reg: &mut Registry,
        ports: &PortTable,
        name: &str,
        trigger: Trigger,
    ) -> bool {
        let Ok(spec) = reg.get(name).cloned() else {
            return false;
        };
        let Some(current) = spec.port.clone() else {
            return false;
        };
        if self.health(ports, &current, spec.stall_ms) == Health::Healthy {
            // Its guest is back (or drains again): nothing to do.
            reg.set_failing(name, None);
            return false;
        }
        let stall = standby_stall_ms(spec.stall_ms);
        let target = pick_standby(&spec.standby, &current, |p| self.health(ports, p, stall));
        if let Some(to) = target.map(str::to_string) {
            match self.rebind(reg, ports, name, Some(&to), Cause::Failover(trigger)) {
                Ok(()) => return true,
                Err(e) => log::error!("identity {name}: failover to {to}: {e}"),
            }
        }
        if reg.failing(name).is_none() {
            let standby: Vec<StandbyInfo> = spec
                .standby
                .iter()
                .map(|p| StandbyInfo {
                    port: p.clone(),
                    health: self.health(ports, p, stall),
                })
                .collect();
            log::warn!(
                "identity {name}: port {current} {}, and no standby is healthy; it stays until one is",
                trigger.as_str()
            );
            self.events.emit(
                "identity.failover_failed",
                json!({
                    "identity": name,
                    "port": current,
                    "reason": trigger.as_str(),
                    "standby": standby,
                }),
            );
            reg.set_failing(name, Some(trigger));
        }
        false
    }
}

/// A later announcement round due at `due`.
struct Round {
    due: Instant,
    identity: String,
    seq: u64,
}

/// The identity monitor: fails identities over when their guest
/// disconnects (reported on `down` by the port's session) or its RX ring
/// stalls (looked at every few milliseconds while an identity with
/// standbys has a stall time), tries pending failovers again, sends the
/// later announcement rounds, and saves the state after a failover. It
/// sleeps while there is nothing to watch, and ends on `stop` or when the
/// switch is gone.
pub(super) fn monitor(
    sw: Weak<Switch>,
    stop: Receiver<()>,
    down: Receiver<PortIdx>,
    notices: Receiver<Notice>,
) {
    let mut rounds: Vec<Round> = Vec::new();
    let mut next_watch: Option<Instant> = None;
    loop {
        let deadline = rounds.iter().map(|r| r.due).chain(next_watch).min();
        let timer = deadline.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
        let mut went_down = None;
        select! {
            recv(stop) -> _ => return,
            recv(down) -> idx => match idx {
                Ok(idx) => went_down = Some(idx),
                Err(_) => return,
            },
            recv(notices) -> n => match n {
                Ok(Notice::Announce { identity, seq }) => {
                    let now = Instant::now();
                    rounds.extend(LATER_ROUNDS.iter().map(|d| Round {
                        due: now + *d,
                        identity: identity.clone(),
                        seq,
                    }));
                }
                Ok(Notice::Changed) => {}
                Err(_) => return,
            },
            recv(timer) -> _ => {}
        }
        let Some(sw) = sw.upgrade() else { return };
        let mut moved = went_down.is_some_and(|idx| sw.port_down(idx));
        let now = Instant::now();
        let (due, later): (Vec<Round>, Vec<Round>) = rounds.drain(..).partition(|r| r.due <= now);
        rounds = later;
        for r in due {
            sw.announce_again(&r.identity, r.seq);
        }
        let (watch_moved, tick) = sw.watch();
        moved |= watch_moved;
        next_watch = tick.map(|t| now + t);
        if moved {
            if let Err(e) = sw.save() {
                log::error!("after a failover: {e}");
            }
        }
    }
}
