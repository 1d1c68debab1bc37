//! Identities and their bindings: the table the control plane keeps, the
//! rules a change must pass, and the [`PortPolicy`] each port gets from the
//! identities bound to it.
//!
//! The registry holds data and takes decisions; what a change implies for
//! the FDB, the dataplane, the network and the event stream is applied by
//! the switch (`daemon::identity`).
//!
//! Invariants, kept by every method (a refused change changes nothing):
//! - names are unique; within a VLAN, a MAC or an IP address belongs to one
//!   identity at most;
//! - an identity is bound to at most one port, a net port of its VLAN; a
//!   port carries any number;
//! - standby ports are net ports of the identity's VLAN, each listed once
//!   (the bound port may be among them: failover skips it);
//! - every change of binding stamps the identity with a fresh `seq`: a
//!   port's identities are ordered by when they were bound (the first is
//!   the one the guest's own MAC stands for), and work scheduled for an
//!   older binding (a later announcement round, a pending failover) is
//!   known to be void.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::addr::{check_host_ip, AddrError, MacAddr};
use super::failover::{Trigger, DEFAULT_STALL_MS, MAX_STALL_MS, MIN_STALL_MS};
use super::policy::{Mac, MacMap, PortPolicy};
use crate::port::{PortSpec, PortTable};

/// Most identities of a switch.
pub const MAX_IDENTITIES: usize = 4096;
/// Most IP addresses of one identity (the dataplane searches a port's
/// addresses linearly).
pub const MAX_IPS: usize = 16;
/// Most standby ports of one identity.
pub const MAX_STANDBY: usize = 8;

/// Errors of identity management.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid identity name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'")]
    InvalidName(String),
    #[error("identity {0:?} already exists")]
    Exists(String),
    #[error("no identity named {0:?}")]
    NotFound(String),
    #[error("the switch has {MAX_IDENTITIES} identities already")]
    TooMany,
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error("give the identity at least one IP address")]
    NoIps,
    #[error("an identity has at most {MAX_IPS} IP addresses, got {0}")]
    TooManyIps(usize),
    #[error("{0} is given twice")]
    IpTwice(IpAddr),
    #[error("VLAN must be between 0 (none) and 4094, got {0}")]
    BadVlan(u16),
    #[error("stall_ms must be 0 (off) or between {MIN_STALL_MS} and {MAX_STALL_MS}, got {0}")]
    BadStall(u64),
    #[error("an identity has at most {MAX_STANDBY} standby ports, got {0}")]
    TooManyStandby(usize),
    #[error("standby port {0:?} is listed twice")]
    StandbyTwice(String),
    #[error("no port named {0:?}")]
    NoPort(String),
    #[error("{0:?} is a disk, not a net port: identities live on net ports")]
    NotNet(String),
    #[error("MAC {mac} in VLAN {vlan} is identity {by:?}'s: an address belongs to one identity of a VLAN")]
    MacTaken { mac: MacAddr, vlan: u16, by: String },
    #[error(
        "{ip} in VLAN {vlan} is identity {by:?}'s: an address belongs to one identity of a VLAN"
    )]
    IpTaken { ip: IpAddr, vlan: u16, by: String },
    #[error("identity {name:?} is in VLAN {vlan} but port {port:?} is in VLAN {port_vlan}: use a port of the identity's VLAN")]
    VlanMismatch {
        name: String,
        vlan: u16,
        port: String,
        port_vlan: u16,
    },
    #[error("identity {0:?} is bound to port {1:?}: use `identity move` to take it elsewhere")]
    Bound(String, String),
    #[error("identity {0:?} is not bound to a port: use `identity bind`")]
    NotBound(String),
    #[error("port {port:?} is used by identity {name:?} (VLAN {vlan}), bound or as a standby: move it away or drop the standby before changing the port's VLAN")]
    PortInUse {
        port: String,
        name: String,
        vlan: u16,
    },
    #[error("a static FDB entry sends {mac} in VLAN {vlan} to port {port:?}: remove it (`fdb del`) before binding identity {name:?}")]
    StaticEntry {
        mac: MacAddr,
        vlan: u16,
        port: String,
        name: String,
    },
    #[error("{mac} in VLAN {vlan} is identity {by:?}'s: bind or move the identity instead of adding a static entry")]
    OwnedMac { mac: MacAddr, vlan: u16, by: String },
    #[error("the FDB has no room for {0} near its slot; the identity stays where it was")]
    FdbFull(MacAddr),
}

fn default_stall_ms() -> u64 {
    DEFAULT_STALL_MS
}

/// An identity as configured and saved: addresses, VLAN, failover settings
/// and the port it is bound to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    pub name: String,
    pub mac: MacAddr,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub vlan: u16,
    /// Ports to fail over to, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<String>,
    /// How long the bound guest's RX ring may take nothing while frames
    /// come for it before the identity fails over (0: never for a stall).
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// The port the identity is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

impl IdentitySpec {
    /// An unbound identity with the default stall time and no standby.
    pub fn new(name: &str, mac: MacAddr, ips: Vec<IpAddr>, vlan: u16) -> Self {
        IdentitySpec {
            name: name.to_string(),
            mac,
            ips,
            vlan,
            standby: Vec::new(),
            stall_ms: DEFAULT_STALL_MS,
            port: None,
        }
    }

    /// Check what does not depend on other identities or on ports.
    pub fn validate(&self) -> Result<(), IdentityError> {
        if !crate::port::is_valid_name(&self.name) {
            return Err(IdentityError::InvalidName(self.name.clone()));
        }
        self.mac.host()?;
        if self.ips.is_empty() {
            return Err(IdentityError::NoIps);
        }
        if self.ips.len() > MAX_IPS {
            return Err(IdentityError::TooManyIps(self.ips.len()));
        }
        for (i, ip) in self.ips.iter().enumerate() {
            check_host_ip(*ip)?;
            if self.ips[..i].contains(ip) {
                return Err(IdentityError::IpTwice(*ip));
            }
        }
        if self.vlan > 4094 {
            return Err(IdentityError::BadVlan(self.vlan));
        }
        check_stall(self.stall_ms)?;
        check_standby_list(&self.standby)
    }
}

fn check_stall(stall_ms: u64) -> Result<(), IdentityError> {
    if stall_ms != 0 && !(MIN_STALL_MS..=MAX_STALL_MS).contains(&stall_ms) {
        return Err(IdentityError::BadStall(stall_ms));
    }
    Ok(())
}

fn check_standby_list(standby: &[String]) -> Result<(), IdentityError> {
    if standby.len() > MAX_STANDBY {
        return Err(IdentityError::TooManyStandby(standby.len()));
    }
    for (i, p) in standby.iter().enumerate() {
        if standby[..i].contains(p) {
            return Err(IdentityError::StandbyTwice(p.clone()));
        }
    }
    Ok(())
}

/// What the registry needs to know of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFacts {
    pub vlan: u16,
    pub disk: bool,
}

/// The ports the registry checks changes against.
pub trait PortLookup {
    /// The port named `name`, if there is one.
    fn facts(&self, name: &str) -> Option<PortFacts>;
}

impl PortLookup for PortTable {
    fn facts(&self, name: &str) -> Option<PortFacts> {
        self.get(name).ok().map(|p| PortFacts {
            vlan: p.spec.vlan,
            disk: p.disk().is_some(),
        })
    }
}

/// `port` if it is a net port in `vlan` that can carry identity `name`.
fn check_port(
    ports: &impl PortLookup,
    name: &str,
    vlan: u16,
    port: &str,
) -> Result<(), IdentityError> {
    let facts = ports
        .facts(port)
        .ok_or_else(|| IdentityError::NoPort(port.to_string()))?;
    if facts.disk {
        return Err(IdentityError::NotNet(port.to_string()));
    }
    if facts.vlan != vlan {
        return Err(IdentityError::VlanMismatch {
            name: name.to_string(),
            vlan,
            port: port.to_string(),
            port_vlan: facts.vlan,
        });
    }
    Ok(())
}

/// The policy of `port` carrying `bound` (in binding order), or `None` (a
/// plain port) when it carries none, trusted or not:
/// - `trusted` is the port's;
/// - `macs`, `ipv4`, `ipv6` are the identities' addresses;
/// - `mac_map` stands the guest's MAC (the port's `guest_mac`) for the
///   first identity's, when the port has one and it is not that one;
/// - `ip_map` is the port's mappings of addresses the identities have.
pub fn port_policy(port: &PortSpec, bound: &[&IdentitySpec]) -> Option<PortPolicy> {
    let first = bound.first()?;
    let ips = || bound.iter().flat_map(|i| i.ips.iter().copied());
    let guest = port.guest_mac.map(|m| m.0);
    Some(PortPolicy {
        trusted: port.trusted,
        macs: bound.iter().map(|i| i.mac.0).collect(),
        ipv4: ips()
            .filter_map(|ip| match ip {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect(),
        ipv6: ips()
            .filter_map(|ip| match ip {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
            .collect(),
        mac_map: guest.filter(|g| *g != first.mac.0).map(|guest| MacMap {
            identity: first.mac.0,
            guest,
        }),
        ip_map: port
            .ip_map
            .iter()
            .filter(|m| ips().any(|ip| ip == m.identity()))
            .map(|m| m.map())
            .collect(),
    })
}

/// One identity in the registry.
#[derive(Debug, Clone)]
struct Entry {
    spec: IdentitySpec,
    /// Stamp of the last change of binding (see the module's invariants).
    seq: u64,
    /// A failover that found no healthy standby, tried again until one is
    /// or the port recovers; cleared by any change of binding.
    failing: Option<Trigger>,
}

/// The identities of a switch.
#[derive(Debug, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    next_seq: u64,
}

impl Registry {
    fn entry(&self, name: &str) -> Result<&Entry, IdentityError> {
        self.entries
            .get(name)
            .ok_or_else(|| IdentityError::NotFound(name.to_string()))
    }

    fn entry_mut(&mut self, name: &str) -> Result<&mut Entry, IdentityError> {
        self.entries
            .get_mut(name)
            .ok_or_else(|| IdentityError::NotFound(name.to_string()))
    }

    fn stamp(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// An identity.
    pub fn get(&self, name: &str) -> Result<&IdentitySpec, IdentityError> {
        self.entry(name).map(|e| &e.spec)
    }

    /// The stamp of an identity's binding (see the module's invariants).
    pub fn seq(&self, name: &str) -> Option<u64> {
        self.entries.get(name).map(|e| e.seq)
    }

    /// Every identity, by name.
    pub fn iter(&self) -> impl Iterator<Item = &IdentitySpec> {
        self.entries.values().map(|e| &e.spec)
    }

    /// Every identity as saved: in binding order, so that a restore that
    /// binds them in this order gives each port its identities in the same
    /// order.
    pub fn specs(&self) -> Vec<IdentitySpec> {
        let mut v: Vec<&Entry> = self.entries.values().collect();
        v.sort_by_key(|e| e.seq);
        v.into_iter().map(|e| e.spec.clone()).collect()
    }

    /// Add an identity, unbound (`spec.port` is not looked at: binding is
    /// [`bind`](Self::bind)'s).
    pub fn add(
        &mut self,
        mut spec: IdentitySpec,
        ports: &impl PortLookup,
    ) -> Result<&IdentitySpec, IdentityError> {
        spec.port = None;
        spec.validate()?;
        if self.entries.contains_key(&spec.name) {
            return Err(IdentityError::Exists(spec.name));
        }
        if self.entries.len() >= MAX_IDENTITIES {
            return Err(IdentityError::TooMany);
        }
        self.check_unique(&spec)?;
        for p in &spec.standby {
            check_port(ports, &spec.name, spec.vlan, p)?;
        }
        let seq = self.stamp();
        let name = spec.name.clone();
        let entry = self.entries.entry(name).or_insert(Entry {
            spec,
            seq,
            failing: None,
        });
        Ok(&entry.spec)
    }

    /// Refuse addresses another identity of the VLAN has.
    fn check_unique(&self, spec: &IdentitySpec) -> Result<(), IdentityError> {
        for other in self.iter().filter(|o| o.vlan == spec.vlan) {
            if other.mac == spec.mac {
                return Err(IdentityError::MacTaken {
                    mac: spec.mac,
                    vlan: spec.vlan,
                    by: other.name.clone(),
                });
            }
            if let Some(ip) = spec.ips.iter().find(|ip| other.ips.contains(ip)) {
                return Err(IdentityError::IpTaken {
                    ip: *ip,
                    vlan: spec.vlan,
                    by: other.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Remove an unbound identity.
    pub fn remove(&mut self, name: &str) -> Result<IdentitySpec, IdentityError> {
        let e = self.entry(name)?;
        if let Some(port) = &e.spec.port {
            return Err(IdentityError::Bound(name.to_string(), port.clone()));
        }
        self.entries
            .remove(name)
            .map(|e| e.spec)
            .ok_or_else(|| IdentityError::NotFound(name.to_string()))
    }

    /// Change an identity's standby ports (replaced by the list given; an
    /// empty one ends a pending failover) and stall time.
    pub fn set(
        &mut self,
        name: &str,
        standby: Option<Vec<String>>,
        stall_ms: Option<u64>,
        ports: &impl PortLookup,
    ) -> Result<&IdentitySpec, IdentityError> {
        let spec = &self.entry(name)?.spec;
        if let Some(s) = stall_ms {
            check_stall(s)?;
        }
        if let Some(list) = &standby {
            check_standby_list(list)?;
            for p in list {
                check_port(ports, name, spec.vlan, p)?;
            }
        }
        let e = self.entry_mut(name)?;
        if let Some(list) = standby {
            e.spec.standby = list;
            if e.spec.standby.is_empty() {
                // Nowhere to go: a pending failover is over.
                e.failing = None;
            }
        }
        if let Some(s) = stall_ms {
            e.spec.stall_ms = s;
        }
        Ok(&e.spec)
    }

    /// Check that identity `name` may be bound to `port`: a net port of its
    /// VLAN.
    pub fn check_bind(
        &self,
        name: &str,
        port: &str,
        ports: &impl PortLookup,
    ) -> Result<&IdentitySpec, IdentityError> {
        let spec = self.get(name)?;
        check_port(ports, name, spec.vlan, port)?;
        Ok(spec)
    }

    /// Record that identity `name` is bound to `port` (`None`: unbound),
    /// with a fresh stamp and no failover pending. The caller has checked
    /// the port with [`check_bind`](Self::check_bind). Returns the port it
    /// was bound to.
    pub fn set_binding(
        &mut self,
        name: &str,
        port: Option<&str>,
    ) -> Result<Option<String>, IdentityError> {
        let seq = self.stamp();
        let e = self.entry_mut(name)?;
        e.seq = seq;
        e.failing = None;
        Ok(std::mem::replace(
            &mut e.spec.port,
            port.map(str::to_string),
        ))
    }

    /// The identities bound to `port`, in binding order.
    pub fn bound_to(&self, port: &str) -> Vec<&IdentitySpec> {
        let mut v: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.spec.port.as_deref() == Some(port))
            .collect();
        v.sort_by_key(|e| e.seq);
        v.into_iter().map(|e| &e.spec).collect()
    }

    /// The policy of a port (see [`port_policy`]).
    pub fn policy(&self, port: &PortSpec) -> Option<PortPolicy> {
        port_policy(port, &self.bound_to(&port.name))
    }

    /// The identity that has `mac` in `vlan`.
    pub fn mac_owner(&self, mac: Mac, vlan: u16) -> Option<&IdentitySpec> {
        self.iter().find(|i| i.mac.0 == mac && i.vlan == vlan)
    }

    /// An identity bound to `port` or with it among its standbys.
    pub fn port_user(&self, port: &str) -> Option<&IdentitySpec> {
        self.iter()
            .find(|i| i.port.as_deref() == Some(port) || i.standby.iter().any(|s| s == port))
    }

    /// Take `port` out of every standby list. Returns the identities whose
    /// list changed.
    pub fn drop_standby(&mut self, port: &str) -> Vec<String> {
        let mut changed = Vec::new();
        for e in self.entries.values_mut() {
            let before = e.spec.standby.len();
            e.spec.standby.retain(|s| s != port);
            if e.spec.standby.len() != before {
                changed.push(e.spec.name.clone());
            }
        }
        changed
    }

    /// The failover identity `name` waits to carry out, if any.
    pub fn failing(&self, name: &str) -> Option<Trigger> {
        self.entries.get(name).and_then(|e| e.failing)
    }

    /// Note (or clear) a failover that waits for a healthy standby.
    pub fn set_failing(&mut self, name: &str, why: Option<Trigger>) {
        if let Some(e) = self.entries.get_mut(name) {
            e.failing = why;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::PathBuf;

    use super::*;
    use crate::identity::policy::IpMap;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, n])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ident(name: &str, n: u8, ips: &[&str], vlan: u16) -> IdentitySpec {
        IdentitySpec::new(name, mac(n), ips.iter().map(|s| ip(s)).collect(), vlan)
    }

    /// Net ports a (VLAN 0), b (0), c (0), v10 (10); disk d (0).
    struct Ports;

    impl PortLookup for Ports {
        fn facts(&self, name: &str) -> Option<PortFacts> {
            let (vlan, disk) = match name {
                "a" | "b" | "c" => (0, false),
                "v10" => (10, false),
                "d" => (0, true),
                _ => return None,
            };
            Some(PortFacts { vlan, disk })
        }
    }

    fn port(name: &str) -> PortSpec {
        PortSpec::server(name, PathBuf::from(format!("/run/{name}.sock")))
    }

    #[test]
    fn a_spec_is_checked_field_by_field() {
        assert_eq!(ident("web", 1, &["192.0.2.1"], 0).validate(), Ok(()));
        let cases: Vec<(IdentitySpec, IdentityError)> = vec![
            (
                ident(".x", 1, &["192.0.2.1"], 0),
                IdentityError::InvalidName(".x".into()),
            ),
            (
                IdentitySpec {
                    mac: MacAddr([1, 0, 0, 0, 0, 1]),
                    ..ident("w", 1, &["192.0.2.1"], 0)
                },
                AddrError::NotUnicastMac(MacAddr([1, 0, 0, 0, 0, 1])).into(),
            ),
            (
                IdentitySpec {
                    mac: MacAddr([0; 6]),
                    ..ident("w", 1, &["192.0.2.1"], 0)
                },
                AddrError::NotUnicastMac(MacAddr([0; 6])).into(),
            ),
            (ident("w", 1, &[], 0), IdentityError::NoIps),
            (
                ident("w", 1, &["127.0.0.1"], 0),
                AddrError::NotUnicastIp(ip("127.0.0.1")).into(),
            ),
            (
                ident("w", 1, &["ff02::1"], 0),
                AddrError::NotUnicastIp(ip("ff02::1")).into(),
            ),
            (
                ident("w", 1, &["192.0.2.1", "2001:db8::1", "192.0.2.1"], 0),
                IdentityError::IpTwice(ip("192.0.2.1")),
            ),
            (
                ident("w", 1, &["192.0.2.1"], 4095),
                IdentityError::BadVlan(4095),
            ),
            (
                IdentitySpec {
                    stall_ms: 10,
                    ..ident("w", 1, &["192.0.2.1"], 0)
                },
                IdentityError::BadStall(10),
            ),
            (
                IdentitySpec {
                    standby: vec!["a".into(), "b".into(), "a".into()],
                    ..ident("w", 1, &["192.0.2.1"], 0)
                },
                IdentityError::StandbyTwice("a".into()),
            ),
        ];
        for (spec, err) in cases {
            assert_eq!(spec.validate(), Err(err), "{spec:?}");
        }
        let many: Vec<String> = (1..=17).map(|i| format!("192.0.2.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            ident("w", 1, &many, 0).validate(),
            Err(IdentityError::TooManyIps(17))
        );
        let stall_off = IdentitySpec {
            stall_ms: 0,
            ..ident("w", 1, &["192.0.2.1"], 0)
        };
        assert_eq!(stall_off.validate(), Ok(()));
    }

    #[test]
    fn addresses_are_unique_within_a_vlan_and_refusals_change_nothing() {
        let mut r = Registry::default();
        r.add(ident("web", 1, &["192.0.2.1", "2001:db8::1"], 0), &Ports)
            .unwrap();
        let before = r.specs();
        let refused = [
            (
                ident("web", 9, &["192.0.2.9"], 0),
                IdentityError::Exists("web".into()),
            ),
            (
                ident("x", 1, &["192.0.2.9"], 0),
                IdentityError::MacTaken {
                    mac: mac(1),
                    vlan: 0,
                    by: "web".into(),
                },
            ),
            (
                ident("x", 2, &["192.0.2.9", "2001:db8::1"], 0),
                IdentityError::IpTaken {
                    ip: ip("2001:db8::1"),
                    vlan: 0,
                    by: "web".into(),
                },
            ),
            (
                IdentitySpec {
                    standby: vec!["a".into(), "zz".into()],
                    ..ident("x", 2, &["192.0.2.9"], 0)
                },
                IdentityError::NoPort("zz".into()),
            ),
            (
                IdentitySpec {
                    standby: vec!["d".into()],
                    ..ident("x", 2, &["192.0.2.9"], 0)
                },
                IdentityError::NotNet("d".into()),
            ),
            (
                IdentitySpec {
                    standby: vec!["v10".into()],
                    ..ident("x", 2, &["192.0.2.9"], 0)
                },
                IdentityError::VlanMismatch {
                    name: "x".into(),
                    vlan: 0,
                    port: "v10".into(),
                    port_vlan: 10,
                },
            ),
        ];
        for (spec, err) in refused {
            assert_eq!(r.add(spec, &Ports).map(|_| ()), Err(err));
            assert_eq!(r.specs(), before);
        }
        // The same addresses in another VLAN are another identity's.
        r.add(ident("web10", 1, &["192.0.2.1"], 10), &Ports)
            .unwrap();
        assert_eq!(r.mac_owner(mac(1).0, 10).unwrap().name, "web10");
        assert_eq!(r.mac_owner(mac(1).0, 0).unwrap().name, "web");
        assert!(r.mac_owner(mac(1).0, 5).is_none());
    }

    #[test]
    fn bindings_are_ordered_and_stamped() {
        let mut r = Registry::default();
        for (name, n) in [("x", 1), ("y", 2), ("z", 3)] {
            let s = format!("192.0.2.{n}");
            r.add(ident(name, n, &[&s], 0), &Ports).unwrap();
        }
        assert_eq!(
            r.check_bind("x", "v10", &Ports).map(|_| ()),
            Err(IdentityError::VlanMismatch {
                name: "x".into(),
                vlan: 0,
                port: "v10".into(),
                port_vlan: 10
            })
        );
        assert_eq!(
            r.check_bind("x", "d", &Ports).map(|_| ()),
            Err(IdentityError::NotNet("d".into()))
        );
        assert_eq!(
            r.check_bind("nope", "a", &Ports).map(|_| ()),
            Err(IdentityError::NotFound("nope".into()))
        );
        for name in ["z", "x", "y"] {
            r.check_bind(name, "a", &Ports).unwrap();
            assert_eq!(r.set_binding(name, Some("a")), Ok(None));
        }
        let names = |v: Vec<&IdentitySpec>| v.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(r.bound_to("a")), ["z", "x", "y"]);
        let seq = r.seq("z").unwrap();
        r.set_failing("z", Some(Trigger::Disconnected));
        assert_eq!(r.set_binding("z", Some("b")), Ok(Some("a".into())));
        assert!(r.seq("z").unwrap() > seq);
        assert_eq!(r.failing("z"), None, "a new binding ends a failover");
        assert_eq!(names(r.bound_to("a")), ["x", "y"]);
        r.set_binding("z", Some("a")).unwrap();
        assert_eq!(names(r.bound_to("a")), ["x", "y", "z"]);
        // Saved in binding order: restored in the same order.
        let saved: Vec<String> = r.specs().into_iter().map(|s| s.name).collect();
        assert_eq!(saved, ["x", "y", "z"]);
        assert_eq!(
            r.remove("x"),
            Err(IdentityError::Bound("x".into(), "a".into()))
        );
        r.set_binding("x", None).unwrap();
        assert_eq!(r.remove("x").map(|s| s.name), Ok("x".into()));
        assert_eq!(r.remove("x"), Err(IdentityError::NotFound("x".into())));
    }

    #[test]
    fn set_replaces_standbys_and_stall_time_after_checking_them() {
        let mut r = Registry::default();
        r.add(ident("w", 1, &["192.0.2.1"], 0), &Ports).unwrap();
        let w = r
            .set("w", Some(vec!["b".into(), "a".into()]), Some(200), &Ports)
            .unwrap();
        assert_eq!(
            (w.standby.clone(), w.stall_ms),
            (vec!["b".into(), "a".into()], 200)
        );
        for (standby, stall, err) in [
            (Some(vec!["v10".to_string()]), None, "VLAN"),
            (Some(vec!["b".into(), "b".into()]), None, "twice"),
            (None, Some(20), "stall_ms"),
        ] {
            let e = r.set("w", standby, stall, &Ports).unwrap_err();
            assert!(e.to_string().contains(err), "{e}");
        }
        r.set_failing("w", Some(Trigger::RxStalled));
        let w = r.set("w", Some(vec![]), Some(0), &Ports).unwrap();
        assert_eq!((w.standby.len(), w.stall_ms), (0, 0));
        assert_eq!(r.failing("w"), None);
        r.set("w", Some(vec!["a".into(), "c".into()]), None, &Ports)
            .unwrap();
        r.set_binding("w", Some("b")).unwrap();
        assert_eq!(r.port_user("c").unwrap().name, "w");
        assert_eq!(r.port_user("b").unwrap().name, "w");
        assert_eq!(r.drop_standby("c"), ["w"]);
        assert_eq!(r.get("w").unwrap().standby, ["a"]);
        assert!(r.port_user("c").is_none());
        assert!(r.drop_standby("c").is_empty());
    }

    #[test]
    fn a_port_without_identities_has_no_policy_even_trusted() {
        let p = PortSpec {
            trusted: true,
            ..port("a")
        };
        assert_eq!(port_policy(&p, &[]), None);
    }

    #[test]
    fn a_policy_unites_the_bound_identities() {
        let x = ident("x", 1, &["192.0.2.1", "2001:db8::1"], 0);
        let y = ident("y", 2, &["192.0.2.2"], 0);
        let p = PortSpec {
            ip_map: vec![
                "192.0.2.2=10.0.0.2".parse().unwrap(),
                "192.0.2.99=10.0.0.99".parse().unwrap(),
                "2001:db8::1=fd00::1".parse().unwrap(),
            ],
            ..port("a")
        };
        let want = PortPolicy {
            trusted: false,
            macs: vec![mac(1).0, mac(2).0],
            ipv4: vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)],
            ipv6: vec!["2001:db8::1".parse::<Ipv6Addr>().unwrap()],
            // No guest_mac: the guest carries the identity's MAC itself.
            mac_map: None,
            ip_map: vec![
                IpMap::V4 {
                    identity: Ipv4Addr::new(192, 0, 2, 2),
                    guest: Ipv4Addr::new(10, 0, 0, 2),
                },
                IpMap::V6 {
                    identity: "2001:db8::1".parse().unwrap(),
                    guest: "fd00::1".parse().unwrap(),
                },
            ]
            .into(),
        };
        assert_eq!(port_policy(&p, &[&x, &y]), Some(want.clone()));
        // The first bound identity is the one mapped.
        let told = PortSpec {
            guest_mac: Some(mac(7)),
            ..p.clone()
        };
        let yx = port_policy(&told, &[&y, &x]).unwrap();
        assert_eq!(yx.mac_map.unwrap().identity, mac(2).0);
        assert_eq!(yx.macs, [mac(2).0, mac(1).0]);
        // A trusted port keeps its mapping.
        let trusted = PortSpec {
            trusted: true,
            ..p.clone()
        };
        assert_eq!(
            port_policy(&trusted, &[&x, &y]),
            Some(PortPolicy {
                trusted: true,
                ..want
            })
        );
    }

    #[test]
    fn the_guest_mac_is_mapped_unless_it_is_the_identity_s() {
        let x = ident("x", 1, &["192.0.2.1"], 0);
        let other = PortSpec {
            guest_mac: Some(mac(7)),
            ..port("a")
        };
        assert_eq!(
            port_policy(&other, &[&x]).unwrap().mac_map,
            Some(MacMap {
                identity: mac(1).0,
                guest: mac(7).0
            })
        );
        let same = PortSpec {
            guest_mac: Some(mac(1)),
            ..port("a")
        };
        let p = port_policy(&same, &[&x]).unwrap();
        assert_eq!(p.mac_map, None);
        assert!(p.ip_map.is_empty());
    }

    #[test]
    fn the_registry_s_policy_follows_its_bindings() {
        let mut r = Registry::default();
        r.add(ident("x", 1, &["192.0.2.1"], 0), &Ports).unwrap();
        let a = PortSpec {
            ip_map: vec!["192.0.2.1=10.0.0.1".parse().unwrap()],
            ..port("a")
        };
        assert_eq!(r.policy(&a), None);
        r.set_binding("x", Some("a")).unwrap();
        let p = r.policy(&a).unwrap();
        assert_eq!(p.macs, [mac(1).0]);
        assert_eq!(p.ip_map.len(), 1);
        assert_eq!(r.policy(&port("b")), None);
    }
}
