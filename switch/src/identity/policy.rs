//! The per-port view of identities that a dataplane worker enforces.
//!
//! The control plane computes a [`PortPolicy`] for every port from the
//! identities bound to it and the port's options, and hands it to the
//! port's worker with the port's other settings; the worker never looks at
//! identities themselves. A port without a policy switches every frame as
//! a plain learning switch port does.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Deref;

use super::frame::checksum_delta;

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
    pub ip_map: IpMaps,
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

/// The [`IpMap`]s of a port, in order (the first that matches an address
/// translates it), with what the dataplane works out of them once rather
/// than on every frame: each translation by IP version, as a number, with
/// the change it makes to a checksum (RFC 1624) either way.
///
/// Built from its maps (`From<Vec<IpMap>>`, `collect`) and read as a slice
/// of them; never changed in place, so the two views always agree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpMaps {
    maps: Vec<IpMap>,
    v4: Vec<Translation<4>>,
    v6: Vec<Translation<16>>,
}

/// One [`IpMap`] of a version, addresses as a header holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation<const N: usize> {
    pub identity: [u8; N],
    pub guest: [u8; N],
    /// What writing `identity` over `guest` adds to a checksum that covers
    /// the address (see `frame::checksum_delta`).
    pub to_identity: u16,
    /// What writing `guest` over `identity` adds.
    pub to_guest: u16,
}

impl IpMaps {
    /// The IPv4 translations, in order.
    pub fn v4(&self) -> &[Translation<4>] {
        &self.v4
    }

    /// The IPv6 translations, in order.
    pub fn v6(&self) -> &[Translation<16>] {
        &self.v6
    }
}

impl From<Vec<IpMap>> for IpMaps {
    fn from(maps: Vec<IpMap>) -> Self {
        fn translation<const N: usize>(identity: [u8; N], guest: [u8; N]) -> Translation<N> {
            Translation {
                identity,
                guest,
                to_identity: checksum_delta(&guest, &identity),
                to_guest: checksum_delta(&identity, &guest),
            }
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for map in &maps {
            match *map {
                IpMap::V4 { identity, guest } => {
                    v4.push(translation(identity.octets(), guest.octets()))
                }
                IpMap::V6 { identity, guest } => {
                    v6.push(translation(identity.octets(), guest.octets()))
                }
            }
        }
        IpMaps { maps, v4, v6 }
    }
}

impl FromIterator<IpMap> for IpMaps {
    fn from_iter<I: IntoIterator<Item = IpMap>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

impl Deref for IpMaps {
    type Target = [IpMap];

    fn deref(&self) -> &[IpMap] {
        &self.maps
    }
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
