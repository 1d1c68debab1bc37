//! The per-port view of identities that a dataplane worker enforces.
//!
//! The control plane computes a [`PortPolicy`] for every port from the
//! identities bound to it and the port's options, and hands it to the
//! port's worker with the port's other settings; the worker never looks at
//! identities themselves. A port without a policy switches every frame as
//! a plain learning switch port does.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

/// What the dataplane enforces and translates on one port.
///
/// Invariant: the lists are short (the identities of one port), so the
/// dataplane searches them linearly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// No source checks (a router or uplink port); mapping still applies.
    pub trusted: bool,
    /// Source MACs the port may send from (its identities' MACs).
    pub macs: Vec<Mac>,
    /// IPv4 source addresses the port may send from.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 source addresses the port may send from (link-local ones are
    /// always allowed).
    pub ipv6: Vec<Ipv6Addr>,
    /// The guest's own MAC and the identity MAC it stands for, when they
    /// differ.
    pub mac_map: Option<MacMap>,
    /// Identity addresses the guest knows by another address.
    pub ip_map: Vec<IpMap>,
}

/// Translation between the guest's MAC and the identity's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacMap {
    /// The identity's MAC: what the rest of the network sees.
    pub identity: Mac,
    /// The guest's own virtio MAC (the port's `guest_mac`: told, never
    /// guessed from the guest's frames, which would let a guest that sends
    /// from a MAC not its own have it mapped instead of dropped).
    pub guest: Mac,
}

/// A 1:1 address translation: the network sees `identity`, the guest
/// `guest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpMap {
    V4 { identity: Ipv4Addr, guest: Ipv4Addr },
    V6 { identity: Ipv6Addr, guest: Ipv6Addr },
}

impl PortPolicy {
    /// Whether frames are translated at all (on their way in and out).
    pub fn translates(&self) -> bool {
        self.mac_map.is_some() || !self.ip_map.is_empty()
    }

    /// Whether the port checks sources at all.
    pub fn enforces(&self) -> bool {
        !self.trusted && !self.macs.is_empty()
    }
}
