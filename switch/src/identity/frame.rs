//! The per-frame work of identities on a frame's header window: the
//! rewrites of identity mapping and the source checks of port security.
//!
//! The dataplane copies the head of a frame (its first [`WINDOW`] bytes, or
//! all of a shorter frame; the Ethernet header first, no virtio header)
//! into a window, calls these functions on the window with the frame's full
//! length, and delivers the window followed by the rest of the frame. They
//! read nothing past the window and need nothing past it (checksums are
//! updated, never recomputed), allocate nothing, and take any bytes without
//! panicking: frames are hostile input.
//!
//! # Headers
//!
//! Ethernet, then at most one 802.1Q or 802.1ad tag, then by ethertype:
//! - ARP, for Ethernet and IPv4 only (hardware type 1, protocol type
//!   `0x0800`, address lengths 6 and 4);
//! - IPv4: version 4, a header of 20 bytes or more within the packet's
//!   total length, options skipped; the upper layer (TCP, UDP, ICMP) is read
//!   in the first fragment only;
//! - IPv6: the fixed header; the upper layer (TCP, UDP, ICMPv6) is read only
//!   when it directly follows: behind extension headers it is unknown.
//!
//! A header is *truncated* when it does not lie whole in the window, in the
//! frame and, past the IP header, in the IP packet's own length (so that
//! Ethernet padding is never taken for a header).
//!
//! # Identity mapping
//!
//! [`map_ingress`] (guest to network) replaces the guest's addresses with
//! the identity's wherever they stand in the fields below; [`map_egress`]
//! (network to guest) replaces the identity's with the guest's. On a frame
//! that does not hold both a guest's and its identity's address, each
//! undoes the other.
//! - The MAC, when the guest's differs from the identity's: Ethernet
//!   destination and source, ARP sender and target hardware addresses, and
//!   the link-layer address options (source and target) of NDP messages.
//! - Each address of [`PortPolicy::ip_map`] (the first entry that matches):
//!   IPv4 source and destination, ARP sender and target protocol addresses,
//!   IPv6 source and destination, the target of a neighbour solicitation or
//!   advertisement, the target and destination of a redirect, and the
//!   source and destination of the packet an ICMP error (destination
//!   unreachable, source quench, redirect, time exceeded, parameter
//!   problem) or an ICMPv6 error (types 1 to 4) carries.
//! - With the target of a neighbour solicitation, the solicited-node
//!   multicast group the solicitation is sent to (IPv6 and Ethernet
//!   destination), when the target's is another: so that the guest hears
//!   the network resolve the identity's address, and its duplicate address
//!   detection probes the identity's group.
//!
//! Every checksum that covers a rewritten field is updated incrementally
//! (RFC 1624): the IPv4 header's, TCP's and UDP's (through the
//! pseudo-header), ICMP's, ICMPv6's, and that of the IPv4 header an ICMP
//! error carries. A UDP checksum of zero (none) stays zero, and one that
//! comes out zero is written `0xffff`. Checksums are taken to be complete
//! (the switch offers no checksum offload).
//!
//! A header is rewritten whole or not at all: its addresses change only
//! together with every checksum that covers them, so a header that, or one
//! of whose checksums, lies partly outside the window, the frame or the
//! packet is left as it is (Ethernet and ARP have no checksum).
//! Limitations:
//! - behind IPv6 extension headers the upper layer's checksum is not found:
//!   the addresses are rewritten and a TCP, UDP or ICMPv6 checksum there
//!   (as in a fragmented datagram) is left wrong;
//! - the TCP or UDP checksum of the packet an ICMP error carries is left as
//!   it is (the packet is cut short there, and no receiver checks it);
//! - NDP options past the window are left as they are;
//! - addresses in payloads (the client hardware address of DHCP) are not
//!   rewritten.
//!
//! # Port security
//!
//! [`check_source`] checks a frame from the guest once it is mapped, so
//! against the identity's addresses ([`ingress`] maps and checks with one
//! parse of the headers). A port that is trusted, or has no MACs (no
//! identity), passes every frame; on another:
//! - Ethernet: the source is one of the port's MACs, else
//!   [`Violation::SrcMac`] (also for a truncated Ethernet header);
//! - ARP: the sender hardware address is one of the MACs and the sender
//!   protocol address one of the port's IPv4 addresses or 0.0.0.0 (a
//!   probe), else [`Violation::Arp`] (also for a truncated ARP or one other
//!   than Ethernet/IPv4);
//! - IPv4: the source is one of the port's IPv4 addresses, or 0.0.0.0 in
//!   UDP from port 68 to 67 (a DHCP client), else [`Violation::Ipv4Src`]
//!   (also for a truncated or malformed header);
//! - IPv6: the source is one of the port's IPv6 addresses or link-local
//!   (fe80::/10, as DHCPv6 clients send from), or unspecified (::) in a
//!   neighbour solicitation (duplicate address detection), a router
//!   solicitation, an MLDv2 report, or a packet that starts with a
//!   hop-by-hop header (as MLD reports do), else [`Violation::Ipv6Src`]
//!   (also for a truncated or malformed header);
//! - NDP (ICMPv6 directly after the fixed header): [`Violation::Nd`] for a
//!   router advertisement or a redirect (a guest is no router: a router's
//!   port is trusted); for a router or neighbour solicitation or a
//!   neighbour advertisement that does not lie whole in the window and the
//!   frame, whose options are malformed, or with a link-layer address
//!   option that is not one of the port's MACs; and for a neighbour
//!   advertisement, or a solicitation from ::, whose target is neither one
//!   of the port's IPv6 addresses nor link-local;
//! - any other ethertype passes once its MAC is checked.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Add;

use super::policy::{IpMap, IpMaps, Mac, PortPolicy};
use crate::stats::DropReason;

/// Bytes of a frame's head the dataplane copies for the checks and
/// rewrites.
///
/// Every field read or rewritten at a fixed place lies within it: the
/// deepest, the addresses of the packet an ICMP error carries behind a VLAN
/// tag and the longest IPv4 header (or an IPv6 header), end at byte 106.
/// Only NDP options can lie past it.
pub const WINDOW: usize = 128;

/// Why port security refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// The Ethernet source is not one of the port's MACs.
    SrcMac,
    /// An ARP sender (MAC or IPv4) is not the port's.
    Arp,
    /// The IPv4 source is not one of the port's addresses.
    Ipv4Src,
    /// The IPv6 source is not one of the port's addresses.
    Ipv6Src,
    /// A neighbour discovery message the port may not send.
    Nd,
}

impl From<Violation> for DropReason {
    fn from(v: Violation) -> Self {
        match v {
            Violation::SrcMac => DropReason::SpoofedMac,
            Violation::Arp => DropReason::SpoofedArp,
            Violation::Ipv4Src => DropReason::SpoofedIpv4,
            Violation::Ipv6Src => DropReason::SpoofedIpv6,
            Violation::Nd => DropReason::SpoofedNd,
        }
    }
}

/// Guest → network: rewrites the guest's own addresses to the identity's,
/// in place.
///
/// `guest_mac`: the guest's MAC, to map to the identity's MAC of
/// `policy.mac_map` (`None`: no MAC mapping).
pub fn map_ingress(win: &mut [u8], frame_len: usize, policy: &PortPolicy, guest_mac: Option<Mac>) {
    if let Some(rw) = Rewrite::new(policy, guest_mac, Direction::Ingress) {
        rw.window(visible(win, frame_len));
    }
}

/// Network → guest: rewrites the identity's addresses to the guest's, in
/// place (the reverse of [`map_ingress`]).
pub fn map_egress(win: &mut [u8], frame_len: usize, policy: &PortPolicy, guest_mac: Option<Mac>) {
    if let Some(rw) = Rewrite::new(policy, guest_mac, Direction::Egress) {
        rw.window(visible(win, frame_len));
    }
}

/// Port security on a frame from the guest, already mapped by
/// [`map_ingress`].
pub fn check_source(win: &[u8], frame_len: usize, policy: &PortPolicy) -> Result<(), Violation> {
    if !policy.enforces() {
        return Ok(());
    }
    let win = win.get(..frame_len).unwrap_or(win);
    check(win, parse(win), policy)
}

/// [`map_ingress`] then [`check_source`], parsing the headers once: the
/// whole work on a frame from the guest.
pub fn ingress(
    win: &mut [u8],
    frame_len: usize,
    policy: &PortPolicy,
    guest_mac: Option<Mac>,
) -> Result<(), Violation> {
    let win = visible(win, frame_len);
    let Some((h, rest, udp)) = fast4(win) else {
        return general_ingress(win, policy, guest_mac);
    };
    if policy.translates() {
        if let Some(rw) = Rewrite::new(policy, guest_mac, Direction::Ingress) {
            rw.fast4(h, rest, udp);
        }
    }
    if policy.enforces() {
        check_fast4(h, udp, policy)
    } else {
        Ok(())
    }
}

/// [`ingress`] on the visible part of the window, by the general parse
/// whatever the frame's shape.
#[inline(never)]
fn general_ingress(
    win: &mut [u8],
    policy: &PortPolicy,
    guest_mac: Option<Mac>,
) -> Result<(), Violation> {
    let rw = Rewrite::new(policy, guest_mac, Direction::Ingress);
    let enforces = policy.enforces();
    if rw.is_none() && !enforces {
        return Ok(());
    }
    let net = parse(win);
    if let Some(rw) = rw {
        rw.frame(win, net);
    }
    if enforces {
        check(win, net, policy)
    } else {
        Ok(())
    }
}

const ETH_HLEN: usize = 14;
const ETH_DST: usize = 0;
const ETH_SRC: usize = 6;
const ETH_TYPE: usize = 12;
const VLAN_TYPE: usize = 16;
const VLAN_HLEN: usize = 18;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IPV6: u16 = 0x86dd;

/// Hardware type, protocol type and address lengths of Ethernet/IPv4 ARP.
const ARP_ETHER_IPV4: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
const ARP_LEN: usize = 28;
const ARP_SHA: usize = 8;
const ARP_SPA: usize = 14;
const ARP_THA: usize = 18;
const ARP_TPA: usize = 24;

const IPV4_MIN_HLEN: usize = 20;
const IPV4_CSUM: usize = 10;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV6_HLEN: usize = 40;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// Offset of the checksum of ICMP and ICMPv6.
const ICMP_CSUM: usize = 2;
/// Offset of the packet an ICMP or ICMPv6 error carries.
const ICMP_ERROR_DATA: usize = 8;

const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
const MLD2_REPORT: u8 = 143;
/// Offset of the target of a neighbour solicitation, advertisement or
/// redirect, and of a redirect's destination.
const ND_TARGET: usize = 8;
const ND_REDIRECT_DST: usize = 24;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// Offset of the address in a link-layer address option.
const ND_OPT_LL_ADDR: usize = 2;

/// UDP source and destination ports of a DHCP client's request.
const DHCP_CLIENT_TO_SERVER: [u8; 4] = [0, 68, 0, 67];

/// The part of the window that holds the frame (all of it, unless the
/// frame is shorter).
fn visible(win: &mut [u8], frame_len: usize) -> &mut [u8] {
    let len = win.len().min(frame_len);
    &mut win[..len]
}

/// The network layer of a frame, as its window shows it.
///
/// Parsed once and shared by the rewrites and the checks: a rewrite changes
/// addresses and checksums only, never a field the parse reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// The Ethernet header is truncated.
    Short,
    /// ARP: the offset of an Ethernet/IPv4 body that lies whole in the
    /// window, `None` for another or a truncated one.
    Arp(Option<usize>),
    /// IPv4: `None` when the header is malformed or truncated.
    Ipv4(Option<Ip>),
    /// IPv6: `None` when the header is malformed or truncated.
    Ipv6(Option<Ip>),
    /// Another ethertype.
    Other,
}

/// An IP packet whose header lies whole in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ip {
    /// Offset of the IP header in the window.
    at: usize,
    /// End of what the window shows of the packet: the window's end, or the
    /// packet's if it ends before. Invariant: the header lies in `at..end`.
    end: usize,
    /// The upper-layer protocol (IPv6: the next header).
    proto: u8,
    /// Offset of the upper layer from `at`; `None` in a fragment of an IPv4
    /// datagram other than the first.
    l4: Option<usize>,
}

impl Ip {
    /// What the window shows of the packet.
    fn packet(self, win: &[u8]) -> &[u8] {
        win.get(self.at..self.end).unwrap_or_default()
    }

    fn packet_mut(self, win: &mut [u8]) -> &mut [u8] {
        win.get_mut(self.at..self.end).unwrap_or_default()
    }
}

/// `win`: the visible part of the window.
fn parse(win: &[u8]) -> Net {
    let Some(ethertype) = be16(win, ETH_TYPE) else {
        return Net::Short;
    };
    let (ethertype, at) = match ethertype {
        ETH_P_8021Q | ETH_P_8021AD => match be16(win, VLAN_TYPE) {
            Some(inner) => (inner, VLAN_HLEN),
            None => return Net::Other,
        },
        ethertype => (ethertype, ETH_HLEN),
    };
    match ethertype {
        ETH_P_ARP => Net::Arp(
            array::<ARP_LEN>(win, at)
                .filter(|arp| arp.starts_with(&ARP_ETHER_IPV4))
                .map(|_| at),
        ),
        ETH_P_IP => Net::Ipv4(parse_ipv4(win, at)),
        ETH_P_IPV6 => Net::Ipv6(parse_ipv6(win, at)),
        _ => Net::Other,
    }
}

fn parse_ipv4(win: &[u8], at: usize) -> Option<Ip> {
    let h = array::<IPV4_MIN_HLEN>(win, at)?;
    let hlen = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || hlen < IPV4_MIN_HLEN || total < hlen {
        return None;
    }
    let end = win.len().min(at + total);
    if at + hlen > end {
        return None;
    }
    let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
    Some(Ip {
        at,
        end,
        proto: h[9],
        l4: first_fragment.then_some(hlen),
    })
}

fn parse_ipv6(win: &[u8], at: usize) -> Option<Ip> {
    let h = array::<IPV6_HLEN>(win, at)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
    Some(Ip {
        at,
        end: win.len().min(at + IPV6_HLEN + payload),
        proto: h[6],
        l4: Some(IPV6_HLEN),
    })
}

/// Bytes of a frame of the fast path held at fixed offsets: the Ethernet
/// and IPv4 headers and the first 8 bytes of the upper layer (UDP's header,
/// TCP's ports and sequence number).
const FAST4_LEN: usize = ETH_HLEN + IPV4_MIN_HLEN + 8;
const FAST4_IP: usize = ETH_HLEN;
const FAST4_L4: usize = ETH_HLEN + IPV4_MIN_HLEN;
/// End of the TCP checksum: it lies past [`FAST4_LEN`].
const FAST4_TCP_END: usize = FAST4_L4 + TCP_CSUM + 2;

/// A frame of the common shape, taken without the general parse: untagged
/// IPv4 with a header of 20 bytes (no options), whole or its first
/// fragment, of TCP or UDP whose checksum lies in the window and in the
/// packet. Of exactly these frames the general parse makes
/// `Net::Ipv4(Some(ip))` with the upper layer's checksum within `ip`, and
/// the fast path rewrites and checks them as the general one does (the
/// same fields, the same checksums), at fixed offsets.
///
/// `win`: the visible part of the window. Returns its first
/// [`FAST4_LEN`] bytes, the rest, and whether UDP (else TCP).
#[inline(always)]
fn fast4(win: &mut [u8]) -> Option<(&mut [u8; FAST4_LEN], &mut [u8], bool)> {
    let len = win.len();
    let (h, rest) = win.split_at_mut_checked(FAST4_LEN)?;
    let h: &mut [u8; FAST4_LEN] = h.try_into().ok()?;
    // Ethertype, version and header length (not the TOS), as stored.
    let start = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let ip_start = u32::from_le_bytes([0x08, 0x00, 0x45, 0]);
    // Fragment offset, as stored.
    let fragment = u16::from_le_bytes([h[FAST4_IP + 6], h[FAST4_IP + 7]]) & 0xff1f;
    if start & 0x00ff_ffff != ip_start || fragment != 0 {
        return None;
    }
    // Where the checksum ends: in the window, and in the packet.
    let (end, udp) = match h[FAST4_IP + 9] {
        IPPROTO_UDP => (FAST4_LEN, true),
        IPPROTO_TCP => (FAST4_TCP_END, false),
        _ => return None,
    };
    let total = usize::from(u16::from_be_bytes([h[FAST4_IP + 2], h[FAST4_IP + 3]]));
    (len >= end && FAST4_IP + total >= end).then_some((h, rest, udp))
}

/// [`check`] on a frame of [`fast4`]'s shape.
#[inline(always)]
fn check_fast4(h: &[u8; FAST4_LEN], udp: bool, policy: &PortPolicy) -> Result<(), Violation> {
    let src_mac: Mac = [h[6], h[7], h[8], h[9], h[10], h[11]];
    if !policy.macs.contains(&src_mac) {
        return Err(Violation::SrcMac);
    }
    let at = FAST4_IP + IPV4_SRC;
    let src = [h[at], h[at + 1], h[at + 2], h[at + 3]];
    if policy.ipv4.contains(&Ipv4Addr::from(src)) {
        return Ok(());
    }
    let l4 = FAST4_L4;
    let ports = [h[l4], h[l4 + 1], h[l4 + 2], h[l4 + 3]];
    if src == [0; 4] && udp && ports == DHCP_CLIENT_TO_SERVER {
        Ok(())
    } else {
        Err(Violation::Ipv4Src)
    }
}

/// Which way a frame crosses the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the guest: its addresses become the identity's.
    Ingress,
    /// To the guest: the identity's addresses become its.
    Egress,
}

impl Direction {
    /// The address a translation replaces and the one it writes.
    fn orient<T>(self, identity: T, guest: T) -> (T, T) {
        match self {
            Direction::Ingress => (guest, identity),
            Direction::Egress => (identity, guest),
        }
    }
}

/// An address field of one IP version, as a header holds it.
trait IpField: Copy + PartialEq {
    /// The identity's and the guest's address of `map`, if of this version.
    fn pair(map: &IpMap) -> Option<(Self, Self)>;
}

impl IpField for [u8; 4] {
    fn pair(map: &IpMap) -> Option<(Self, Self)> {
        match *map {
            IpMap::V4 { identity, guest } => Some((identity.octets(), guest.octets())),
            IpMap::V6 { .. } => None,
        }
    }
}

impl IpField for [u8; 16] {
    fn pair(map: &IpMap) -> Option<(Self, Self)> {
        match *map {
            IpMap::V6 { identity, guest } => Some((identity.octets(), guest.octets())),
            IpMap::V4 { .. } => None,
        }
    }
}

/// The translations of one port in one direction.
struct Rewrite<'a> {
    /// The MAC replaced and its replacement.
    mac: Option<(Mac, Mac)>,
    ip_map: &'a IpMaps,
    dir: Direction,
}

impl<'a> Rewrite<'a> {
    /// `None` when there is nothing to translate.
    fn new(policy: &'a PortPolicy, guest_mac: Option<Mac>, dir: Direction) -> Option<Self> {
        let mac = match (policy.mac_map, guest_mac) {
            (Some(map), Some(guest)) if map.identity != guest => {
                Some(dir.orient(map.identity, guest))
            }
            _ => None,
        };
        (mac.is_some() || !policy.ip_map.is_empty()).then_some(Rewrite {
            mac,
            ip_map: &policy.ip_map,
            dir,
        })
    }

    fn mac(&self, mac: Mac) -> Option<Mac> {
        let (from, to) = self.mac?;
        (mac == from).then_some(to)
    }

    fn ip<A: IpField>(&self, addr: A) -> Option<A> {
        self.ip_map
            .iter()
            .filter_map(A::pair)
            .find_map(|(identity, guest)| {
                let (from, to) = self.dir.orient(identity, guest);
                (addr == from).then_some(to)
            })
    }

    fn mac_at(&self, b: &mut [u8], at: usize) -> Delta {
        swap(b, at, |mac| self.mac(mac))
    }

    fn ipv4_at(&self, b: &mut [u8], at: usize) -> Delta {
        swap(b, at, |addr: [u8; 4]| self.ip(addr))
    }

    fn ipv6_at(&self, b: &mut [u8], at: usize) -> Delta {
        swap(b, at, |addr: [u8; 16]| self.ip(addr))
    }

    /// `win`: the visible part of the window.
    fn window(&self, win: &mut [u8]) {
        match fast4(win) {
            Some((h, rest, udp)) => self.fast4(h, rest, udp),
            None => self.general(win),
        }
    }

    /// [`Rewrite::frame`] whatever the frame's shape.
    #[inline(never)]
    fn general(&self, win: &mut [u8]) {
        self.frame(win, parse(win));
    }

    /// The IPv4 address `addr` translates to, and the change to a checksum
    /// that covers it.
    #[inline(always)]
    fn v4(&self, addr: [u8; 4]) -> Option<([u8; 4], u16)> {
        let v4 = self.ip_map.v4().iter();
        match self.dir {
            Direction::Ingress => v4
                .filter(|t| t.guest == addr)
                .map(|t| (t.identity, t.to_identity))
                .next(),
            Direction::Egress => v4
                .filter(|t| t.identity == addr)
                .map(|t| (t.guest, t.to_guest))
                .next(),
        }
    }

    /// Translates the IPv4 address at `at` in `h`; returns the change.
    #[inline(always)]
    fn v4_at(&self, h: &mut [u8; FAST4_LEN], at: usize) -> Delta {
        let Some(field) = array_mut::<4>(h, at) else {
            return Delta::NONE;
        };
        match self.v4(*field) {
            Some((new, d)) => {
                *field = new;
                Delta(Some(d))
            }
            None => Delta::NONE,
        }
    }

    /// [`Rewrite::frame`] on a frame of [`fast4`]'s shape.
    #[inline(always)]
    fn fast4(&self, h: &mut [u8; FAST4_LEN], rest: &mut [u8], udp: bool) {
        let d = self.v4_at(h, FAST4_IP + IPV4_SRC) + self.v4_at(h, FAST4_IP + IPV4_DST);
        if d != Delta::NONE {
            d.set(h, FAST4_IP + IPV4_CSUM);
            if udp {
                d.set_udp(h, FAST4_L4 + UDP_CSUM);
            } else {
                d.set(rest, FAST4_L4 + TCP_CSUM - FAST4_LEN);
            }
        }
        if let Some((from, to)) = self.mac {
            for at in [ETH_DST, ETH_SRC] {
                if let Some(mac) = array_mut::<6>(h, at).filter(|mac| **mac == from) {
                    *mac = to;
                }
            }
        }
    }

    /// `win`: the visible part of the window; `net`: its parse.
    fn frame(&self, win: &mut [u8], net: Net) {
        let mut group = None;
        match net {
            Net::Arp(Some(at)) => {
                let arp = win.get_mut(at..).unwrap_or_default();
                self.mac_at(arp, ARP_SHA);
                self.ipv4_at(arp, ARP_SPA);
                self.mac_at(arp, ARP_THA);
                self.ipv4_at(arp, ARP_TPA);
            }
            Net::Ipv4(Some(ip)) => self.ipv4(ip.packet_mut(win), ip),
            Net::Ipv6(Some(ip)) => group = self.ipv6(ip.packet_mut(win), ip.proto),
            _ => {}
        }
        swap(win, ETH_DST, |mac| match group {
            Some((from, to)) if mac == multicast_mac(from) => Some(multicast_mac(to)),
            _ => self.mac(mac),
        });
        self.mac_at(win, ETH_SRC);
    }

    /// `pkt`: what the window shows of an IPv4 packet.
    fn ipv4(&self, pkt: &mut [u8], ip: Ip) {
        let sum = ip.l4.and_then(|l4| PseudoSum::of(ip.proto, l4));
        if sum.is_none_or(|sum| sum.fits(pkt)) {
            let d = self.ipv4_at(pkt, IPV4_SRC) + self.ipv4_at(pkt, IPV4_DST);
            d.apply(pkt, IPV4_CSUM);
            if let Some(sum) = sum {
                sum.update(pkt, d);
            }
        }
        if let (Some(l4), IPPROTO_ICMP) = (ip.l4, ip.proto) {
            self.icmp_error(pkt.get_mut(l4..).unwrap_or_default());
        }
    }

    /// The IPv4 header an ICMP error carries, with its checksum (both under
    /// the ICMP checksum).
    fn icmp_error(&self, icmp: &mut [u8]) {
        const IP: usize = ICMP_ERROR_DATA;
        let error = matches!(icmp.first(), Some(3 | 4 | 5 | 11 | 12));
        if !error || array::<IPV4_MIN_HLEN>(icmp, IP).is_none_or(|h| h[0] >> 4 != 4) {
            return;
        }
        let d = self.ipv4_at(icmp, IP + IPV4_SRC) + self.ipv4_at(icmp, IP + IPV4_DST);
        let d = d + d.apply(icmp, IP + IPV4_CSUM);
        d.apply(icmp, ICMP_CSUM);
    }

    /// `pkt`: what the window shows of an IPv6 packet; `proto`: its next
    /// header. Returns the solicited-node group it translated.
    fn ipv6(&self, pkt: &mut [u8], proto: u8) -> Option<([u8; 16], [u8; 16])> {
        let sum = match proto {
            IPPROTO_ICMPV6 => Some(PseudoSum {
                at: IPV6_HLEN + ICMP_CSUM,
                udp: false,
            }),
            proto => PseudoSum::of(proto, IPV6_HLEN),
        };
        if sum.is_some_and(|sum| !sum.fits(pkt)) {
            return None;
        }
        let group = match proto {
            IPPROTO_ICMPV6 => self.solicited_node_group(pkt),
            _ => None,
        };
        let dst = match group {
            Some((_, to)) => swap(pkt, IPV6_DST, |_| Some(to)),
            None => self.ipv6_at(pkt, IPV6_DST),
        };
        let mut d = self.ipv6_at(pkt, IPV6_SRC) + dst;
        if proto == IPPROTO_ICMPV6 {
            d = d + self.icmpv6(pkt.get_mut(IPV6_HLEN..).unwrap_or_default());
        }
        if let Some(sum) = sum {
            sum.update(pkt, d);
        }
        group
    }

    /// The solicited-node group the neighbour solicitation in `pkt` is sent
    /// to, and the one of its translated target, if they differ.
    fn solicited_node_group(&self, pkt: &[u8]) -> Option<([u8; 16], [u8; 16])> {
        let msg = pkt.get(IPV6_HLEN..)?;
        if msg.first() != Some(&ND_NEIGHBOR_SOLICIT) {
            return None;
        }
        let target = *array::<16>(msg, ND_TARGET)?;
        let (from, to) = (solicited_node(target), solicited_node(self.ip(target)?));
        (from != to && array::<16>(pkt, IPV6_DST) == Some(&from)).then_some((from, to))
    }

    /// The addresses in the body of an ICMPv6 message; returns the change
    /// for its checksum.
    fn icmpv6(&self, msg: &mut [u8]) -> Delta {
        const IP: usize = ICMP_ERROR_DATA;
        let Some(&ty) = msg.first() else {
            return Delta::NONE;
        };
        // An error (destination unreachable, packet too big, time exceeded,
        // parameter problem) carries the offending packet's header.
        if (1..=4).contains(&ty) {
            if array::<IPV6_HLEN>(msg, IP).is_none_or(|h| h[0] >> 4 != 6) {
                return Delta::NONE;
            }
            return self.ipv6_at(msg, IP + IPV6_SRC) + self.ipv6_at(msg, IP + IPV6_DST);
        }
        let Some(nd) = NdLayout::of(ty) else {
            return Delta::NONE;
        };
        let mut d = Delta::NONE;
        for &at in nd.addresses {
            d = d + self.ipv6_at(msg, at);
        }
        let mut options = LinkLayerOptions { at: nd.options };
        while let Ok(Some(at)) = options.next(msg) {
            d = d + self.mac_at(msg, at);
        }
        d
    }
}

/// Replaces the `N` bytes at `at` in `b` with their translation, if they
/// lie in `b` and have one; returns the change.
fn swap<const N: usize>(
    b: &mut [u8],
    at: usize,
    translate: impl FnOnce([u8; N]) -> Option<[u8; N]>,
) -> Delta {
    let Some(field) = array_mut::<N>(b, at) else {
        return Delta::NONE;
    };
    match translate(*field) {
        Some(new) => {
            let d = Delta::of(field, &new);
            *field = new;
            d
        }
        None => Delta::NONE,
    }
}

/// The checksum of an upper layer that covers the IP addresses through the
/// pseudo-header.
#[derive(Debug, Clone, Copy)]
struct PseudoSum {
    /// Offset from the IP header.
    at: usize,
    /// UDP's: zero means none.
    udp: bool,
}

impl PseudoSum {
    /// The checksum of TCP or UDP at `l4` from the IP header.
    fn of(proto: u8, l4: usize) -> Option<Self> {
        match proto {
            IPPROTO_TCP => Some(PseudoSum {
                at: l4 + TCP_CSUM,
                udp: false,
            }),
            IPPROTO_UDP => Some(PseudoSum {
                at: l4 + UDP_CSUM,
                udp: true,
            }),
            _ => None,
        }
    }

    /// Whether the window shows it in `pkt`.
    fn fits(self, pkt: &[u8]) -> bool {
        self.at + 2 <= pkt.len()
    }

    fn update(self, pkt: &mut [u8], d: Delta) {
        if self.udp {
            d.apply_udp(pkt, self.at);
        } else {
            d.apply(pkt, self.at);
        }
    }
}

/// A change to the words a checksum covers, as RFC 1624 (eqn. 3) adds it to
/// the checksum's complement: the sum of the old words' complements and the
/// new words, folded. `None`: nothing changed.
///
/// Each change must start at an even offset in what the checksum covers
/// (every address field does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delta(Option<u16>);

impl Delta {
    const NONE: Delta = Delta(None);

    /// `old` replaced by `new`, of the same even length.
    fn of(old: &[u8], new: &[u8]) -> Delta {
        Delta(Some(checksum_delta(old, new)))
    }

    /// [`Delta::apply`], without the change to the checksum field.
    #[inline(always)]
    fn set(self, b: &mut [u8], at: usize) {
        if let (Some(d), Some(field)) = (self.0, array_mut::<2>(b, at)) {
            adjust_as_stored(field, d);
        }
    }

    /// [`Delta::apply_udp`].
    #[inline(always)]
    fn set_udp(self, b: &mut [u8], at: usize) {
        if let (Some(d), Some(field)) = (self.0, array_mut::<2>(b, at)) {
            if *field != [0, 0] {
                adjust_as_stored(field, d);
                if *field == [0, 0] {
                    *field = [0xff, 0xff];
                }
            }
        }
    }

    /// Updates the checksum at `at` in `b`, if there; returns the change to
    /// the checksum field itself, for a checksum that covers it.
    fn apply(self, b: &mut [u8], at: usize) -> Delta {
        match array_mut::<2>(b, at) {
            Some(field) => self.adjust(field),
            None => Delta::NONE,
        }
    }

    /// [`Delta::apply`] to a UDP checksum: zero (none) stays zero, and a
    /// computed zero is written `0xffff` (RFC 768).
    #[inline(always)]
    fn apply_udp(self, b: &mut [u8], at: usize) {
        if let Some(field) = array_mut::<2>(b, at).filter(|f| **f != [0, 0]) {
            self.set(field, 0);
            if *field == [0, 0] {
                *field = [0xff, 0xff];
            }
        }
    }

    #[inline(always)]
    fn adjust(self, field: &mut [u8; 2]) -> Delta {
        let Some(d) = self.0 else {
            return Delta::NONE;
        };
        let old = *field;
        *field = (!fold(u32::from(!u16::from_be_bytes(old)) + u32::from(d))).to_be_bytes();
        Delta::of(&old, field)
    }
}

impl Add for Delta {
    type Output = Delta;

    fn add(self, other: Delta) -> Delta {
        match (self.0, other.0) {
            (Some(a), Some(b)) => Delta(Some(fold(u32::from(a) + u32::from(b)))),
            (a, b) => Delta(a.or(b)),
        }
    }
}

/// [`Delta::adjust`] without the change it returns, worked out on the
/// checksum as stored rather than as a big-endian number: ones' complement
/// sums come out the same in either byte order (RFC 1071, 2.B), so one
/// swap of `d` replaces two of the field. `d`: a [`Delta`]'s value.
#[inline(always)]
fn adjust_as_stored(field: &mut [u8; 2], d: u16) {
    let d = u16::from_ne_bytes(d.to_be_bytes());
    let old = u16::from_ne_bytes(*field);
    *field = (!fold(u32::from(!old) + u32::from(d))).to_ne_bytes();
}

/// What replacing `old` by `new` (of the same even length, at an even
/// offset in what a checksum covers) adds to the checksum's complement
/// (RFC 1624, eqn. 3): the sum of the old words' complements and the new
/// words, folded. See [`Delta`].
pub(crate) fn checksum_delta(old: &[u8], new: &[u8]) -> u16 {
    fold(u32::from(!fold(sum16(old))) + sum16(new))
}

/// Sum of `b` as big-endian 16-bit words, not folded.
fn sum16(b: &[u8]) -> u32 {
    b.iter()
        .zip([8, 0].into_iter().cycle())
        .map(|(&byte, shift)| u32::from(byte) << shift)
        .sum()
}

/// Folds a sum of 16-bit words to 16 bits, end-around carry.
///
/// Twice is enough for any `u32`: the first leaves at most `0x1fffe`, the
/// second at most `0xffff`; one more would change nothing.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// The solicited-node multicast group of `addr` (RFC 4291, 2.7.1).
fn solicited_node(addr: [u8; 16]) -> [u8; 16] {
    let [.., a, b, c] = addr;
    [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, a, b, c]
}

/// The Ethernet group of IPv6 multicast group `group` (RFC 2464, 7).
fn multicast_mac(group: [u8; 16]) -> Mac {
    let [.., a, b, c, d] = group;
    [0x33, 0x33, a, b, c, d]
}

/// Where the NDP message of an ICMPv6 type holds addresses.
struct NdLayout {
    /// Offsets of its IPv6 addresses (targets, a redirect's destination).
    addresses: &'static [usize],
    /// Offset of its options.
    options: usize,
}

impl NdLayout {
    fn of(ty: u8) -> Option<Self> {
        let (addresses, options): (&[usize], usize) = match ty {
            ND_ROUTER_SOLICIT => (&[], 8),
            ND_ROUTER_ADVERT => (&[], 16),
            ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT => (&[ND_TARGET], 24),
            ND_REDIRECT => (&[ND_TARGET, ND_REDIRECT_DST], 40),
            _ => return None,
        };
        Some(NdLayout { addresses, options })
    }
}

/// NDP options that are not well formed: one of length zero or past the
/// message's end.
#[derive(Debug)]
struct Malformed;

/// A walk over the options of an NDP message (RFC 4861, 4.6) that stops at
/// its link-layer address options. Not an iterator: the caller may rewrite
/// the message between steps.
struct LinkLayerOptions {
    /// Offset of the next option in the message.
    at: usize,
}

impl LinkLayerOptions {
    /// The offset in `msg` of the next link-layer (source or target)
    /// address, `None` at the end of `msg`.
    fn next(&mut self, msg: &[u8]) -> Result<Option<usize>, Malformed> {
        loop {
            let rest = msg.get(self.at..).ok_or(Malformed)?;
            let (ty, len) = match *rest {
                [] => return Ok(None),
                [ty, units, ..] => (ty, usize::from(units) * 8),
                [_] => return Err(Malformed),
            };
            if len == 0 || len > rest.len() {
                return Err(Malformed);
            }
            let option = self.at;
            self.at += len;
            if ty == ND_OPT_SOURCE_LL || ty == ND_OPT_TARGET_LL {
                return Ok(Some(option + ND_OPT_LL_ADDR));
            }
        }
    }
}

/// `win`: the visible part of the window; `net`: its parse.
fn check(win: &[u8], net: Net, policy: &PortPolicy) -> Result<(), Violation> {
    let src = array::<6>(win, ETH_SRC);
    if net == Net::Short || !src.is_some_and(|src| policy.macs.contains(src)) {
        return Err(Violation::SrcMac);
    }
    match net {
        Net::Arp(at) => check_arp(at.and_then(|at| array::<ARP_LEN>(win, at)), policy),
        Net::Ipv4(ip) => check_ipv4(win, ip.ok_or(Violation::Ipv4Src)?, policy),
        Net::Ipv6(ip) => check_ipv6(win, ip.ok_or(Violation::Ipv6Src)?, policy),
        Net::Short | Net::Other => Ok(()),
    }
}

fn check_arp(arp: Option<&[u8; ARP_LEN]>, policy: &PortPolicy) -> Result<(), Violation> {
    let arp = arp.ok_or(Violation::Arp)?;
    let (Some(sha), Some(spa)) = (array::<6>(arp, ARP_SHA), array::<4>(arp, ARP_SPA)) else {
        return Err(Violation::Arp);
    };
    let probe = *spa == [0; 4];
    if !policy.macs.contains(sha) || !(probe || policy.ipv4.contains(&Ipv4Addr::from(*spa))) {
        return Err(Violation::Arp);
    }
    Ok(())
}

fn check_ipv4(win: &[u8], ip: Ip, policy: &PortPolicy) -> Result<(), Violation> {
    let pkt = ip.packet(win);
    let src = array::<4>(pkt, IPV4_SRC).ok_or(Violation::Ipv4Src)?;
    if policy.ipv4.contains(&Ipv4Addr::from(*src)) {
        return Ok(());
    }
    let ports = ip.l4.and_then(|l4| array::<4>(pkt, l4));
    let dhcp = *src == [0; 4] && ip.proto == IPPROTO_UDP && ports == Some(&DHCP_CLIENT_TO_SERVER);
    if dhcp {
        Ok(())
    } else {
        Err(Violation::Ipv4Src)
    }
}

fn check_ipv6(win: &[u8], ip: Ip, policy: &PortPolicy) -> Result<(), Violation> {
    let pkt = ip.packet(win);
    let (Some(payload_len), Some(src)) = (be16(pkt, 4), array::<16>(pkt, IPV6_SRC)) else {
        return Err(Violation::Ipv6Src);
    };
    let src = Ipv6Addr::from(*src);
    let msg = pkt.get(IPV6_HLEN..).unwrap_or_default();
    let icmp_type = msg.first().copied().filter(|_| ip.proto == IPPROTO_ICMPV6);
    let may_be_unspecified = ip.proto == IPPROTO_HOPOPTS
        || matches!(
            icmp_type,
            Some(ND_ROUTER_SOLICIT | ND_NEIGHBOR_SOLICIT | MLD2_REPORT)
        );
    if !(ours_v6(policy, src) || (src.is_unspecified() && may_be_unspecified)) {
        return Err(Violation::Ipv6Src);
    }
    match icmp_type {
        Some(ND_ROUTER_ADVERT | ND_REDIRECT) => Err(Violation::Nd),
        Some(ty @ (ND_ROUTER_SOLICIT | ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT)) => {
            let whole = msg.len() == usize::from(payload_len);
            check_nd(msg, whole, ty, src.is_unspecified(), policy)
        }
        _ => Ok(()),
    }
}

/// The checks of a router or neighbour solicitation or a neighbour
/// advertisement `msg` (`whole`: not cut by the window or the frame).
fn check_nd(
    msg: &[u8],
    whole: bool,
    ty: u8,
    from_unspecified: bool,
    policy: &PortPolicy,
) -> Result<(), Violation> {
    let nd = NdLayout::of(ty)
        .filter(|nd| whole && msg.len() >= nd.options)
        .ok_or(Violation::Nd)?;
    if ty == ND_NEIGHBOR_ADVERT || (ty == ND_NEIGHBOR_SOLICIT && from_unspecified) {
        let target = array::<16>(msg, ND_TARGET).ok_or(Violation::Nd)?;
        if !ours_v6(policy, Ipv6Addr::from(*target)) {
            return Err(Violation::Nd);
        }
    }
    let mut options = LinkLayerOptions { at: nd.options };
    while let Some(at) = options.next(msg).map_err(|Malformed| Violation::Nd)? {
        if !array::<6>(msg, at).is_some_and(|mac| policy.macs.contains(mac)) {
            return Err(Violation::Nd);
        }
    }
    Ok(())
}

/// Whether the port may use `addr` as an IPv6 source or NDP target.
fn ours_v6(policy: &PortPolicy, addr: Ipv6Addr) -> bool {
    addr.is_unicast_link_local() || policy.ipv6.contains(&addr)
}

/// The `N` bytes at `at` in `b`, if they lie in it.
fn array<const N: usize>(b: &[u8], at: usize) -> Option<&[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

fn array_mut<const N: usize>(b: &mut [u8], at: usize) -> Option<&mut [u8; N]> {
    b.get_mut(at..at + N)?.try_into().ok()
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    array(b, at).copied().map(u16::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::policy::MacMap;

    const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const ID_MAC: Mac = [0x02, 0x1d, 0x00, 0x00, 0x00, 0x07];
    const PEER_MAC: Mac = [0x52, 0x54, 0x00, 0x9a, 0xbc, 0xde];
    const ROUTER_MAC: Mac = [0x00, 0x1b, 0x21, 0x0a, 0x0b, 0x0c];
    const BROADCAST: Mac = [0xff; 6];
    const GUEST4: [u8; 4] = [192, 168, 122, 10];
    const ID4: [u8; 4] = [10, 1, 0, 10];
    const PEER4: [u8; 4] = [10, 1, 0, 20];
    const ROUTER4: [u8; 4] = [10, 1, 0, 1];
    const FAR4: [u8; 4] = [198, 51, 100, 7];
    const GUEST6: [u8; 16] = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xc0a8, 0x7a0a).octets();
    const ID6: [u8; 16] = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10).octets();
    const PEER6: [u8; 16] = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20).octets();
    const FAR6: [u8; 16] = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7).octets();
    /// The guest's link-local address (from its MAC, as Linux forms it).
    const LINK_LOCAL: [u8; 16] =
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456).octets();
    const ROUTER_LL: [u8; 16] =
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0x21b, 0x21ff, 0xfe0a, 0xb0c).octets();
    const ALL_NODES: [u8; 16] = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    const ALL_ROUTERS: [u8; 16] = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2).octets();
    const MLDV2_ROUTERS: [u8; 16] = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16).octets();
    const UNSPECIFIED: [u8; 16] = [0; 16];

    /// The local end of a test frame: the guest as it sees itself, or the
    /// identity the network sees.
    #[derive(Debug, Clone, Copy)]
    struct Host {
        mac: Mac,
        v4: [u8; 4],
        v6: [u8; 16],
    }

    const GUEST: Host = Host {
        mac: GUEST_MAC,
        v4: GUEST4,
        v6: GUEST6,
    };
    const IDENTITY: Host = Host {
        mac: ID_MAC,
        v4: ID4,
        v6: ID6,
    };

    fn policy() -> PortPolicy {
        PortPolicy {
            trusted: false,
            macs: vec![ID_MAC],
            ipv4: vec![ID4.into()],
            ipv6: vec![ID6.into()],
            mac_map: Some(MacMap {
                identity: ID_MAC,
                guest: GUEST_MAC,
            }),
            ip_map: vec![
                IpMap::V4 {
                    identity: ID4.into(),
                    guest: GUEST4.into(),
                },
                IpMap::V6 {
                    identity: ID6.into(),
                    guest: GUEST6.into(),
                },
            ]
            .into(),
        }
    }

    fn get16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// The Internet checksum of `bytes` from scratch (RFC 1071).
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|w| u32::from(w[0]) << 8 | u32::from(w.get(1).copied().unwrap_or(0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Recomputes the checksum of the IPv4 header `h` starts with; returns
    /// the header's length.
    fn ipv4_header_sum(h: &mut [u8]) -> usize {
        let hlen = usize::from(h[0] & 0x0f) * 4;
        put16(h, 10, 0);
        let sum = checksum(&h[..hlen]);
        put16(h, 10, sum);
        hlen
    }

    /// Recomputes the checksum of the upper layer `l4` of protocol `proto`,
    /// under `pseudo`; a UDP checksum of zero (none) is kept.
    fn upper_layer_sum(l4: &mut [u8], proto: u8, pseudo: &[u8]) {
        let at = match proto {
            IPPROTO_TCP => TCP_CSUM,
            IPPROTO_UDP if get16(l4, UDP_CSUM) == 0 => return,
            IPPROTO_UDP => UDP_CSUM,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => ICMP_CSUM,
            _ => return,
        };
        put16(l4, at, 0);
        let sum = checksum(&[pseudo, l4].concat());
        put16(
            l4,
            at,
            if proto == IPPROTO_UDP && sum == 0 {
                0xffff
            } else {
                sum
            },
        );
    }

    /// `frame` with every checksum recomputed from scratch, apart from the
    /// code under test: IPv4 headers (and the one an ICMP error carries),
    /// TCP, UDP, ICMP and ICMPv6 (behind a hop-by-hop header too). The
    /// upper layer of an IPv4 fragment is left alone (its checksum covers
    /// the datagram), as is that of the packet an error carries.
    fn sums(frame: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        let (mut ethertype, mut at) = (get16(&f, 12), ETH_HLEN);
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            (ethertype, at) = (get16(&f, 16), VLAN_HLEN);
        }
        match ethertype {
            ETH_P_IP => {
                let end = at + usize::from(get16(&f, at + 2));
                let hlen = ipv4_header_sum(&mut f[at..end]);
                let (l4, proto) = (at + hlen, f[at + 9]);
                if get16(&f, at + 6) & 0x3fff != 0 {
                    return f;
                }
                let mut pseudo = f[at + 12..at + 20].to_vec();
                pseudo.extend([0, proto]);
                pseudo.extend(((end - l4) as u16).to_be_bytes());
                if proto == IPPROTO_ICMP {
                    if matches!(f[l4], 3 | 4 | 5 | 11 | 12) {
                        ipv4_header_sum(&mut f[l4 + 8..end]);
                    }
                    pseudo.clear();
                }
                upper_layer_sum(&mut f[l4..end], proto, &pseudo);
            }
            ETH_P_IPV6 => {
                let end = at + IPV6_HLEN + usize::from(get16(&f, at + 4));
                let (mut next, mut l4) = (f[at + 6], at + IPV6_HLEN);
                if next == IPPROTO_HOPOPTS {
                    (next, l4) = (f[l4], l4 + (usize::from(f[l4 + 1]) + 1) * 8);
                }
                let mut pseudo = f[at + 8..at + 40].to_vec();
                pseudo.extend(((end - l4) as u32).to_be_bytes());
                pseudo.extend([0, 0, 0, next]);
                upper_layer_sum(&mut f[l4..end], next, &pseudo);
            }
            _ => {}
        }
        f
    }

    /// A frame, its checksums computed.
    fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        sums(&[&dst[..], &src, &ethertype.to_be_bytes(), payload].concat())
    }

    /// `frame` with a tag of VLAN 100 (`tpid`: 802.1Q or 802.1ad).
    fn tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
        [
            &frame[..12],
            &tpid.to_be_bytes(),
            &[0x00, 0x64],
            &frame[12..],
        ]
        .concat()
    }

    fn arp(op: u16, sha: Mac, spa: [u8; 4], tha: Mac, tpa: [u8; 4]) -> Vec<u8> {
        [
            &ARP_ETHER_IPV4[..],
            &op.to_be_bytes(),
            &sha,
            &spa,
            &tha,
            &tpa,
        ]
        .concat()
    }

    /// An IPv4 packet as Linux sends one (DF, TTL 64); checksums are left
    /// to [`sums`].
    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let len = (IPV4_MIN_HLEN + payload.len()) as u16;
        let fixed = [0x45, 0x00, 0, 0, 0x4a, 0x1c, 0x40, 0x00, 64, proto, 0, 0];
        let mut p = [&fixed[..], &src, &dst, payload].concat();
        put16(&mut p, 2, len);
        p
    }

    /// `frame` with `options` in the IPv4 header at `at`.
    fn with_options(frame: &[u8], at: usize, options: &[u8]) -> Vec<u8> {
        let hlen = at + IPV4_MIN_HLEN;
        let mut f = [&frame[..hlen], options, &frame[hlen..]].concat();
        f[at] = 0x40 | ((IPV4_MIN_HLEN + options.len()) / 4) as u8;
        let len = get16(&f, at + 2) + options.len() as u16;
        put16(&mut f, at + 2, len);
        f
    }

    /// The IPv4 datagram of `frame` in two fragments, the first carrying
    /// `first` bytes (a multiple of 8) of its payload.
    fn fragments(frame: &[u8], first: usize) -> [Vec<u8>; 2] {
        let (head, payload) = frame.split_at(ETH_HLEN + IPV4_MIN_HLEN);
        let fragment = |offset: usize, data: &[u8], more: u16| {
            let mut f = [head, data].concat();
            put16(&mut f, ETH_HLEN + 2, (IPV4_MIN_HLEN + data.len()) as u16);
            put16(&mut f, ETH_HLEN + 6, more | (offset / 8) as u16);
            sums(&f)
        };
        [
            fragment(0, &payload[..first], 0x2000),
            fragment(first, &payload[first..], 0),
        ]
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let hop_limit = match next {
            IPPROTO_ICMPV6 => 255,
            IPPROTO_HOPOPTS => 1,
            _ => 64,
        };
        let len = (payload.len() as u16).to_be_bytes();
        let fixed = [0x60, 0x0a, 0xbc, 0xde, len[0], len[1], next, hop_limit];
        [&fixed[..], &src, &dst, payload].concat()
    }

    /// A frame of an IPv4 packet from `mac` and `src` to the peer.
    fn to_peer4(mac: Mac, src: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        eth(PEER_MAC, mac, ETH_P_IP, &ipv4(src, PEER4, proto, l4))
    }

    /// A frame of an IPv6 packet from `mac` and `src` to the peer.
    fn to_peer6(mac: Mac, src: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
        eth(PEER_MAC, mac, ETH_P_IPV6, &ipv6(src, PEER6, proto, l4))
    }

    /// A TCP SYN as Linux sends one: MSS, SACK permitted, timestamps, window
    /// scale.
    fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
        let fixed = [
            0x3b, 0x9a, 0xca, 0x07, 0, 0, 0, 0, 0xa0, 0x02, 0xfa, 0xf0, 0, 0, 0, 0,
        ];
        let options = [
            0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x6f, 0x3c, 0x11, 0x22, 0, 0, 0, 0,
            0x01, 0x03, 0x03, 0x07,
        ];
        [
            &sport.to_be_bytes()[..],
            &dport.to_be_bytes(),
            &fixed,
            &options,
        ]
        .concat()
    }

    /// A TCP segment of `len` bytes of data (ACK, PSH, timestamps).
    fn tcp_data(sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let fixed = [
            0x3b, 0x9a, 0xca, 0x08, 0x1f, 0x22, 0x7e, 0x01, 0x80, 0x18, 0x01, 0xf6, 0, 0, 0, 0,
        ];
        let options = [
            0x01, 0x01, 0x08, 0x0a, 0x6f, 0x3c, 0x11, 0x30, 0x8c, 0x01, 0x2f, 0x7a,
        ];
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        [
            &sport.to_be_bytes()[..],
            &dport.to_be_bytes(),
            &fixed,
            &options,
            &data,
        ]
        .concat()
    }

    /// A UDP datagram whose checksum [`sums`] computes.
    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let header = [
            sport.to_be_bytes(),
            dport.to_be_bytes(),
            len.to_be_bytes(),
            [0xff, 0xff],
        ];
        [&header.concat()[..], payload].concat()
    }

    /// A UDP datagram sent without checksum.
    fn udp_no_checksum(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut d = udp(sport, dport, payload);
        put16(&mut d, UDP_CSUM, 0);
        d
    }

    /// A DNS query for example.com's A records.
    fn dns_query() -> Vec<u8> {
        let header = [0x5c, 0x1e, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        [&header[..], b"\x07example\x03com\x00", &[0, 1, 0, 1]].concat()
    }

    /// A DHCP discover from the guest's own MAC (the payload is not mapped).
    fn dhcp_discover() -> Vec<u8> {
        let mut d = vec![1, 1, 6, 0, 0x3d, 0x1d, 0x5b, 0x0a];
        d.resize(28, 0);
        d.extend(GUEST_MAC);
        d.resize(236, 0);
        d.extend([99, 130, 83, 99, 53, 1, 1, 55, 3, 1, 3, 6, 255]);
        d
    }

    /// ICMP or ICMPv6 of `ty` and `code`, its checksum left to [`sums`].
    fn icmp(ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
        [&[ty, code, 0, 0][..], body].concat()
    }

    /// An echo request's body as ping sends it.
    fn echo_body() -> Vec<u8> {
        let data: Vec<u8> = (0..56u8).map(|i| i.wrapping_add(0x10)).collect();
        [&[0x1c, 0x2b, 0x00, 0x01][..], &data].concat()
    }

    /// A link-layer address option (`ty`: source 1, target 2).
    fn ll_option(ty: u8, mac: Mac) -> Vec<u8> {
        [&[ty, 1][..], &mac].concat()
    }

    fn icmpv6_frame(
        eth_dst: Mac,
        eth_src: Mac,
        src: [u8; 16],
        dst: [u8; 16],
        msg: &[u8],
    ) -> Vec<u8> {
        eth(
            eth_dst,
            eth_src,
            ETH_P_IPV6,
            &ipv6(src, dst, IPPROTO_ICMPV6, msg),
        )
    }

    /// A neighbour solicitation for `target` from `src` (`sll`: its source
    /// link-layer address option).
    fn ns(eth_src: Mac, src: [u8; 16], target: [u8; 16], sll: Option<Mac>) -> Vec<u8> {
        let group = solicited_node(target);
        let option = sll
            .map(|mac| ll_option(ND_OPT_SOURCE_LL, mac))
            .unwrap_or_default();
        let body = [&[0; 4][..], &target, &option].concat();
        icmpv6_frame(
            multicast_mac(group),
            eth_src,
            src,
            group,
            &icmp(ND_NEIGHBOR_SOLICIT, 0, &body),
        )
    }

    /// A neighbour advertisement from `h` with `flags` (solicited: to the
    /// peer; else to all nodes).
    fn na(h: Host, flags: u8, target: [u8; 16], tll: Mac) -> Vec<u8> {
        let (eth_dst, dst) = match flags & 0x40 {
            0 => (multicast_mac(ALL_NODES), ALL_NODES),
            _ => (PEER_MAC, PEER6),
        };
        let body = [
            &[flags, 0, 0, 0][..],
            &target,
            &ll_option(ND_OPT_TARGET_LL, tll),
        ]
        .concat();
        icmpv6_frame(
            eth_dst,
            h.mac,
            h.v6,
            dst,
            &icmp(ND_NEIGHBOR_ADVERT, 0, &body),
        )
    }

    fn rs(h: Host, src: [u8; 16], sll: Option<Mac>) -> Vec<u8> {
        let option = sll
            .map(|mac| ll_option(ND_OPT_SOURCE_LL, mac))
            .unwrap_or_default();
        let body = [&[0; 4][..], &option].concat();
        icmpv6_frame(
            multicast_mac(ALL_ROUTERS),
            h.mac,
            src,
            ALL_ROUTERS,
            &icmp(ND_ROUTER_SOLICIT, 0, &body),
        )
    }

    fn ra(eth_src: Mac, src: [u8; 16]) -> Vec<u8> {
        let fixed = [64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        let mtu = [5, 1, 0, 0, 0, 0, 0x05, 0xdc];
        let prefix = [
            3, 4, 64, 0xc0, 0, 0x27, 0x8d, 0, 0, 0x09, 0x3a, 0x80, 0, 0, 0, 0,
        ];
        let prefix = [&prefix[..], &ID6[..8], &[0; 8]].concat();
        let body = [
            &fixed[..],
            &ll_option(ND_OPT_SOURCE_LL, eth_src),
            &mtu,
            &prefix,
        ]
        .concat();
        icmpv6_frame(
            multicast_mac(ALL_NODES),
            eth_src,
            src,
            ALL_NODES,
            &icmp(ND_ROUTER_ADVERT, 0, &body),
        )
    }

    /// A redirect from a router to the peer: `h` is on-link.
    fn redirect(h: Host, eth_src: Mac, src: [u8; 16]) -> Vec<u8> {
        let body = [
            &[0; 4][..],
            &h.v6,
            &h.v6,
            &ll_option(ND_OPT_TARGET_LL, h.mac),
        ]
        .concat();
        icmpv6_frame(PEER_MAC, eth_src, src, PEER6, &icmp(ND_REDIRECT, 0, &body))
    }

    /// An MLDv2 report (joining the link-local address' solicited-node
    /// group) behind a hop-by-hop header with a router alert, from `src`.
    fn mldv2_report(h: Host, src: [u8; 16]) -> Vec<u8> {
        let hop_by_hop = [IPPROTO_ICMPV6, 0, 5, 2, 0, 0, 1, 0];
        let record = [&[4, 0, 0, 0][..], &solicited_node(LINK_LOCAL)].concat();
        let report = icmp(MLD2_REPORT, 0, &[&[0, 0, 0, 1][..], &record].concat());
        let packet = ipv6(
            src,
            MLDV2_ROUTERS,
            IPPROTO_HOPOPTS,
            &[&hop_by_hop[..], &report].concat(),
        );
        eth(multicast_mac(MLDV2_ROUTERS), h.mac, ETH_P_IPV6, &packet)
    }

    /// Who sent a captured frame: the local host, or the network to it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Sender {
        Host,
        Network,
    }

    /// Frames as real stacks send them, with `h` the local host: the guest
    /// as it sees itself or the identity the network sees, so that mapping
    /// one view must give the other, to the byte.
    fn captured(h: Host) -> Vec<(&'static str, Sender, Vec<u8>)> {
        let ip4 = |proto, l4: &[u8]| to_peer4(h.mac, h.v4, proto, l4);
        let ip6 = |proto, l4: &[u8]| to_peer6(h.mac, h.v6, proto, l4);
        let arp_request = |spa, tpa| {
            let request = arp(1, h.mac, spa, [0; 6], tpa);
            eth(BROADCAST, h.mac, ETH_P_ARP, &request)
        };
        let arp_reply = arp(2, h.mac, h.v4, PEER_MAC, PEER4);
        let arp_reply = eth(PEER_MAC, h.mac, ETH_P_ARP, &arp_reply);
        let arp_reply_in = arp(2, PEER_MAC, PEER4, h.mac, h.v4);
        let arp_reply_in = eth(h.mac, PEER_MAC, ETH_P_ARP, &arp_reply_in);
        let syn = tcp_syn(41_952, 443);
        let syn4 = ip4(IPPROTO_TCP, &syn);
        let dns = udp(53_124, 53, &dns_query());
        let echo = echo_body();
        let no_checksum = ip4(IPPROTO_UDP, &udp_no_checksum(4_789, 4_789, &[0x08; 30]));
        let no_checksum = tagged(&no_checksum, ETH_P_8021AD);
        let [first, later] = fragments(&ip4(IPPROTO_UDP, &udp(40_000, 7_000, &[0x5a; 40])), 16);
        let discover = udp(68, 67, &dhcp_discover());
        let discover = eth(
            BROADCAST,
            h.mac,
            ETH_P_IP,
            &ipv4([0; 4], [255; 4], IPPROTO_UDP, &discover),
        );
        let segment = ipv4(PEER4, h.v4, IPPROTO_TCP, &tcp_data(443, 41_952, 1400));
        let segment = eth(h.mac, PEER_MAC, ETH_P_IP, &segment);
        // The packets errors carry: the peer's datagram to the host, the
        // host's segment to a far host (upper-layer checksums as sent).
        let to_host = ipv4(PEER4, h.v4, IPPROTO_UDP, &udp(53, 53_124, &[0; 12]));
        let unreachable = icmp(3, 3, &[&[0; 4][..], &to_host].concat());
        let from_host = ipv4(h.v4, FAR4, IPPROTO_TCP, &tcp_data(41_953, 443, 8));
        let frag_needed = icmp(3, 4, &[&[0, 0, 0x05, 0xdc][..], &from_host].concat());
        let frag_needed = ipv4(ROUTER4, h.v4, IPPROTO_ICMP, &frag_needed);
        let frag_needed = eth(h.mac, ROUTER_MAC, ETH_P_IP, &frag_needed);
        let record_route = [&[7, 39, 4][..], &[0; 36], &[0]].concat();
        let with_options = with_options(&frag_needed, ETH_HLEN, &record_route);
        let with_options = tagged(&with_options, ETH_P_8021Q);
        let too_big = ipv6(h.v6, FAR6, IPPROTO_TCP, &tcp_syn(41_954, 443));
        let too_big = icmp(2, 0, &[&[0, 0, 0x05, 0x00][..], &too_big].concat());
        let too_big = icmpv6_frame(h.mac, ROUTER_MAC, ROUTER_LL, h.v6, &too_big);
        // Unreachability detection: a solicitation to the address itself.
        let mut nud = ns(PEER_MAC, PEER6, h.v6, Some(PEER_MAC));
        nud[ETH_DST..ETH_SRC].copy_from_slice(&h.mac);
        nud[ETH_HLEN + IPV6_DST..ETH_HLEN + IPV6_HLEN].copy_from_slice(&h.v6);
        let sent = [
            ("ARP request", arp_request(h.v4, PEER4)),
            ("ARP reply", arp_reply),
            ("gratuitous ARP", arp_request(h.v4, h.v4)),
            ("ARP probe", arp_request([0; 4], h.v4)),
            ("TCP SYN", syn4.clone()),
            ("TCP SYN, 802.1Q", tagged(&syn4, ETH_P_8021Q)),
            ("DNS query", ip4(IPPROTO_UDP, &dns)),
            ("UDP without checksum, 802.1ad", no_checksum),
            ("UDP first fragment", first),
            ("UDP later fragment", later),
            ("DHCP discover", discover),
            ("ICMP echo", ip4(IPPROTO_ICMP, &icmp(8, 0, &echo))),
            ("ICMP port unreachable", ip4(IPPROTO_ICMP, &unreachable)),
            ("IPv6 TCP SYN", ip6(IPPROTO_TCP, &syn)),
            ("IPv6 DNS query", ip6(IPPROTO_UDP, &dns)),
            ("ICMPv6 echo", ip6(IPPROTO_ICMPV6, &icmp(128, 0, &echo))),
            ("NS", ns(h.mac, h.v6, PEER6, Some(h.mac))),
            ("solicited NA", na(h, 0x60, h.v6, h.mac)),
            ("unsolicited NA", na(h, 0x20, h.v6, h.mac)),
            ("DAD", ns(h.mac, UNSPECIFIED, h.v6, None)),
            ("RS", rs(h, LINK_LOCAL, Some(h.mac))),
            ("RS from ::", rs(h, UNSPECIFIED, None)),
            ("MLDv2 report from ::", mldv2_report(h, UNSPECIFIED)),
        ];
        let received = [
            ("ARP reply to the host", arp_reply_in),
            ("TCP segment to the host", segment),
            ("ICMP fragmentation needed", frag_needed),
            ("the same, IP options, 802.1Q", with_options),
            ("ICMPv6 packet too big", too_big),
            ("NS for the host", ns(PEER_MAC, PEER6, h.v6, Some(PEER_MAC))),
            ("NUD NS to the host", nud),
            ("RA", ra(ROUTER_MAC, ROUTER_LL)),
            ("redirect", redirect(h, ROUTER_MAC, ROUTER_LL)),
        ];
        let sent = sent.map(|(name, f)| (name, Sender::Host, f));
        let received = received.map(|(name, f)| (name, Sender::Network, f));
        // Tags and options were added after the checksums.
        let all = sent.into_iter().chain(received);
        all.map(|(name, sender, f)| (name, sender, sums(&f)))
            .collect()
    }

    /// `frame` through `f` as the dataplane passes it: its first `n` bytes
    /// (at most [`WINDOW`], at most the frame) in a window, with the
    /// frame's length; then the window and the rest of the frame.
    fn through(frame: &[u8], n: usize, f: impl FnOnce(&mut [u8], usize)) -> Vec<u8> {
        let mut win = [0; WINDOW];
        let win = &mut win[..n.min(WINDOW).min(frame.len())];
        win.copy_from_slice(&frame[..win.len()]);
        f(win, frame.len());
        [&win[..], &frame[win.len()..]].concat()
    }

    fn ingress_of(frame: &[u8], n: usize, policy: &PortPolicy) -> Vec<u8> {
        through(frame, n, |w, len| {
            map_ingress(w, len, policy, Some(GUEST_MAC))
        })
    }

    fn egress_of(frame: &[u8], n: usize, policy: &PortPolicy) -> Vec<u8> {
        through(frame, n, |w, len| {
            map_egress(w, len, policy, Some(GUEST_MAC))
        })
    }

    /// The captured frames in both views: (name, sender, guest's, identity's).
    fn views() -> Vec<(&'static str, Sender, Vec<u8>, Vec<u8>)> {
        captured(GUEST)
            .into_iter()
            .zip(captured(IDENTITY))
            .map(|((name, sender, guest), (_, _, identity))| (name, sender, guest, identity))
            .collect()
    }

    /// The captured frame `name` in both views: the guest's, the identity's.
    fn view(name: &str) -> (Vec<u8>, Vec<u8>) {
        let (_, _, guest, identity) = views().into_iter().find(|v| v.0 == name).unwrap();
        (guest, identity)
    }

    #[test]
    fn ingress_turns_the_guest_view_into_the_identity_view_and_egress_back() {
        let p = policy();
        for (name, _, guest, identity) in views() {
            assert_eq!(sums(&identity), identity, "{name}");
            assert_eq!(ingress_of(&guest, WINDOW, &p), identity, "{name}: ingress");
            assert_eq!(egress_of(&identity, WINDOW, &p), guest, "{name}: egress");
            // Those that hold neither guest nor identity addresses stay.
            assert_eq!(ingress_of(&identity, WINDOW, &p), identity, "{name}");
        }
    }

    #[test]
    fn maps_only_what_the_policy_translates() {
        let (guest, identity) = view("ICMP port unreachable");
        let nothing = PortPolicy {
            mac_map: None,
            ip_map: IpMaps::default(),
            ..policy()
        };
        assert_eq!(ingress_of(&guest, WINDOW, &nothing), guest);
        // The MAC alone: without a guest MAC, or one that is the identity's,
        // there is none.
        let mac_only = PortPolicy {
            ip_map: IpMaps::default(),
            ..policy()
        };
        let mapped = ingress_of(&guest, WINDOW, &mac_only);
        assert_eq!(mapped[..12], identity[..12]);
        assert_eq!(mapped[12..], guest[12..]);
        let mut w = guest.clone();
        map_ingress(&mut w, guest.len(), &mac_only, None);
        map_ingress(&mut w, guest.len(), &mac_only, Some(ID_MAC));
        assert_eq!(w, guest);
        // The addresses alone.
        let mut w = guest.clone();
        map_ingress(&mut w, guest.len(), &policy(), None);
        assert_eq!(w[..12], guest[..12]);
        assert_eq!(w[12..], identity[12..]);
    }

    #[test]
    fn every_fixed_field_lies_in_the_window() {
        let p = policy();
        let (guest, identity) = view("the same, IP options, 802.1Q");
        // The source of the packet it carries; its destination ends at
        // byte 106.
        assert_eq!(guest[98..102], GUEST4);
        assert_eq!(ingress_of(&guest, WINDOW, &p), identity);
    }

    #[test]
    fn a_header_cut_by_the_window_is_rewritten_whole_or_not_at_all() {
        let p = policy();
        for (name, _, guest, identity) in views() {
            for n in 0..=guest.len().min(WINDOW) {
                let mapped = ingress_of(&guest, n, &p);
                assert_eq!(sums(&mapped), mapped, "{name}, window of {n}");
                let mapped = egress_of(&identity, n, &p);
                assert_eq!(sums(&mapped), mapped, "{name}, window of {n}");
            }
        }
    }

    #[test]
    fn a_header_is_rewritten_only_with_its_checksums() {
        let p = policy();
        // Frames with one header under checksums, and where its last
        // checksum ends.
        let cases = [
            ("TCP SYN", 14 + 20 + 18),
            ("TCP SYN, 802.1Q", 18 + 20 + 18),
            ("DNS query", 14 + 20 + 8),
            ("IPv6 TCP SYN", 14 + 40 + 18),
            ("IPv6 DNS query", 14 + 40 + 8),
            ("ICMPv6 echo", 14 + 40 + 4),
            ("DAD", 14 + 40 + 24),
        ];
        for (name, needed) in cases {
            let (guest, identity) = &view(name);
            for n in ETH_HLEN..guest.len().min(WINDOW) {
                let expected = if n >= needed { identity } else { guest };
                // Cut by the window, and by the frame.
                // The source MAC is mapped alone; the destination of a
                // solicitation follows its target.
                let mut expected = expected[..n].to_vec();
                expected[ETH_SRC..ETH_TYPE].copy_from_slice(&ID_MAC);
                assert_eq!(
                    ingress_of(guest, n, &p)[..n],
                    expected,
                    "{name}, window of {n}"
                );
                let mut cut_frame = guest[..n].to_vec();
                map_ingress(&mut cut_frame, n, &p, Some(GUEST_MAC));
                assert_eq!(cut_frame, expected, "{name}, frame of {n}");
            }
        }
        // The ICMP error's own header and the one it carries are apart.
        let (guest, identity) = &view("ICMP port unreachable");
        let outer = 14 + 20;
        let inner = outer + 8 + 20;
        for n in [outer - 1, outer, inner - 1, inner] {
            let mapped = ingress_of(guest, n, &p);
            let outer_mapped = mapped[14..outer] == identity[14..outer];
            let inner_mapped = mapped[outer..inner] == identity[outer..inner];
            assert_eq!(
                (outer_mapped, inner_mapped),
                (n >= outer, n >= inner),
                "{n}"
            );
        }
    }

    #[test]
    fn a_solicitation_for_another_keeps_its_group() {
        let p = policy();
        // A neighbour in the guest's solicited-node group.
        let mut neighbour = PEER6;
        neighbour[13..].copy_from_slice(&GUEST6[13..]);
        let guest = ns(GUEST_MAC, GUEST6, neighbour, Some(GUEST_MAC));
        let identity = ns(ID_MAC, ID6, neighbour, Some(ID_MAC));
        assert_eq!(identity[..6], multicast_mac(solicited_node(GUEST6)));
        assert_eq!(ingress_of(&guest, WINDOW, &p), identity);
    }

    #[test]
    fn padding_past_the_ip_packet_is_no_header() {
        let p = policy();
        // Padding past the IPv4 packet is no header: a UDP header claimed
        // by a packet too short to hold it blocks the rewrite.
        let short = ipv4(GUEST4, PEER4, IPPROTO_UDP, &udp(1, 2, &[]));
        let mut frame = eth(PEER_MAC, GUEST_MAC, ETH_P_IP, &short);
        put16(&mut frame, ETH_HLEN + 2, 20 + 4);
        ipv4_header_sum(&mut frame[ETH_HLEN..]);
        let mapped = ingress_of(&frame, WINDOW, &p);
        assert_eq!(mapped[12..], frame[12..]);
    }

    #[test]
    fn behind_extension_headers_only_the_addresses_change() {
        let p = policy();
        // The first fragment of a UDP datagram: its checksum, not found,
        // stays as it is (a documented limitation).
        let fragment_header = [IPPROTO_UDP, 0, 0x00, 0x01, 0x12, 0x34, 0x56, 0x78];
        let datagram = |h: Host| {
            let packet = [&fragment_header[..], &udp(5_000, 5_001, &[7; 8])].concat();
            to_peer6(h.mac, h.v6, 44, &packet)
        };
        let (guest, identity) = (datagram(GUEST), datagram(IDENTITY));
        assert_eq!(ingress_of(&guest, WINDOW, &p), identity);
        assert_eq!(egress_of(&identity, WINDOW, &p), guest);
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_sent_as_ffff() {
        let p = policy();
        let frame = |h: Host, word: u16| {
            let packet = ipv4(
                h.v4,
                PEER4,
                IPPROTO_UDP,
                &udp(5_000, 5_001, &word.to_be_bytes()),
            );
            eth(PEER_MAC, h.mac, ETH_P_IP, &packet)
        };
        // The payload word that brings the identity's checksum to zero.
        let at = ETH_HLEN + 20 + UDP_CSUM;
        let word = get16(&frame(IDENTITY, 0), at);
        let (guest, identity) = (frame(GUEST, word), frame(IDENTITY, word));
        assert_eq!(get16(&identity, at), 0xffff);
        assert_ne!(get16(&guest, at), 0xffff);
        assert_eq!(ingress_of(&guest, WINDOW, &p), identity);
        assert_eq!(egress_of(&identity, WINDOW, &p), guest);
    }

    #[test]
    fn ndp_options_past_the_window_stay() {
        let p = policy();
        let guest = na(GUEST, 0x60, GUEST6, GUEST_MAC);
        let identity = na(IDENTITY, 0x60, ID6, ID_MAC);
        let options = 14 + 40 + 24;
        let mapped = ingress_of(&guest, options, &p);
        assert_eq!(sums(&mapped), mapped);
        assert_eq!(
            mapped[..ETH_HLEN + IPV6_HLEN],
            identity[..ETH_HLEN + IPV6_HLEN]
        );
        assert_eq!(mapped[options - 16..options], ID6);
        assert_eq!(mapped[options..], guest[options..]);
        // Port security refuses what it cannot see whole.
        assert_eq!(
            check_source(&identity[..options], identity.len(), &p),
            Err(Violation::Nd)
        );
        assert_eq!(check_source(&identity, identity.len(), &p), Ok(()));
    }

    /// A frame's window with the frame's length, and what port security
    /// says of it.
    struct Case {
        name: &'static str,
        win: Vec<u8>,
        frame_len: usize,
        expect: Result<(), Violation>,
    }

    fn case(name: &'static str, frame: Vec<u8>, expect: Result<(), Violation>) -> Case {
        Case {
            name,
            frame_len: frame.len(),
            win: frame[..frame.len().min(WINDOW)].to_vec(),
            expect,
        }
    }

    /// `frame` cut to `n` bytes: by the window, or (`frame_len` of `n`) by
    /// the frame.
    fn cut(
        name: &'static str,
        frame: Vec<u8>,
        n: usize,
        frame_cut: bool,
        expect: Violation,
    ) -> Case {
        Case {
            name,
            frame_len: if frame_cut { n } else { frame.len() },
            win: frame[..n].to_vec(),
            expect: Err(expect),
        }
    }

    /// Frames from the identity (so once mapped) that are not in
    /// [`captured`]: allowed ones and every violation.
    fn cases() -> Vec<Case> {
        use Violation::*;
        let h = IDENTITY;
        let syn = tcp_syn(1, 2);
        let tcp = |src| to_peer4(h.mac, src, IPPROTO_TCP, &syn);
        let udp4 =
            |src, sport, dport| to_peer4(h.mac, src, IPPROTO_UDP, &udp(sport, dport, &[0; 8]));
        let tcp6 = |src| to_peer6(h.mac, src, IPPROTO_TCP, &syn);
        let echo6 = |src| to_peer6(h.mac, src, IPPROTO_ICMPV6, &icmp(128, 0, &echo_body()));
        let arp_from = |sha, spa| {
            let request = arp(1, sha, spa, [0; 6], PEER4);
            eth(BROADCAST, h.mac, ETH_P_ARP, &request)
        };
        let with = |mut frame: Vec<u8>, at: usize, bytes: &[u8]| {
            frame[at..at + bytes.len()].copy_from_slice(bytes);
            frame
        };
        let na_frame = na(h, 0x60, h.v6, h.mac);
        let nd_options = ETH_HLEN + IPV6_HLEN + 24;
        let mut later_dhcp = udp4([0; 4], 68, 67);
        put16(&mut later_dhcp, ETH_HLEN + 6, 0x0001);
        let dhcp_agents = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2).octets();
        let solicit = udp(546, 547, &[1, 0, 0, 7]);
        let solicit = ipv6(LINK_LOCAL, dhcp_agents, IPPROTO_UDP, &solicit);
        let dhcpv6 = eth(multicast_mac(dhcp_agents), h.mac, ETH_P_IPV6, &solicit);
        vec![
            // Allowed.
            case("DHCPv6 solicit from link-local", dhcpv6, Ok(())),
            case("ICMPv6 from link-local", echo6(LINK_LOCAL), Ok(())),
            case(
                "DAD of the link-local address",
                ns(h.mac, UNSPECIFIED, LINK_LOCAL, None),
                Ok(()),
            ),
            case(
                "neighbour advertisement for link-local",
                na(h, 0x60, LINK_LOCAL, h.mac),
                Ok(()),
            ),
            case(
                "neighbour solicitation for another",
                ns(h.mac, h.v6, PEER6, Some(h.mac)),
                Ok(()),
            ),
            case(
                "MLDv2 report from link-local",
                mldv2_report(h, LINK_LOCAL),
                Ok(()),
            ),
            case(
                "ARP in 802.1Q",
                tagged(&arp_from(h.mac, h.v4), ETH_P_8021Q),
                Ok(()),
            ),
            case(
                "RARP",
                eth(
                    BROADCAST,
                    h.mac,
                    0x8035,
                    &arp(3, h.mac, [0; 4], h.mac, [0; 4]),
                ),
                Ok(()),
            ),
            case(
                "LLDP",
                eth(
                    [0x01, 0x80, 0xc2, 0, 0, 0x0e],
                    h.mac,
                    0x88cc,
                    &[0x02, 0x07, 0x04],
                ),
                Ok(()),
            ),
            case(
                "another tag inside the tag",
                tagged(&tagged(&tcp(PEER4), ETH_P_8021Q), ETH_P_8021AD),
                Ok(()),
            ),
            // Source MAC.
            case(
                "another MAC",
                with(tcp(h.v4), ETH_SRC, &PEER_MAC),
                Err(SrcMac),
            ),
            case(
                "the guest's own MAC",
                with(tcp(h.v4), ETH_SRC, &GUEST_MAC),
                Err(SrcMac),
            ),
            cut("no Ethernet type", tcp(h.v4), 13, true, SrcMac),
            cut("no source MAC", tcp(h.v4), 11, true, SrcMac),
            cut("empty", tcp(h.v4), 0, true, SrcMac),
            // ARP.
            case("ARP from another MAC", arp_from(PEER_MAC, h.v4), Err(Arp)),
            case("ARP from another address", arp_from(h.mac, PEER4), Err(Arp)),
            case(
                "ARP of another hardware",
                with(arp_from(h.mac, h.v4), ETH_HLEN, &[0, 6]),
                Err(Arp),
            ),
            case(
                "ARP of other address lengths",
                with(arp_from(h.mac, h.v4), ETH_HLEN + 4, &[6, 16]),
                Err(Arp),
            ),
            cut(
                "ARP cut by the frame",
                arp_from(h.mac, h.v4),
                ETH_HLEN + 27,
                true,
                Arp,
            ),
            cut(
                "ARP cut by the window",
                arp_from(h.mac, h.v4),
                ETH_HLEN + 20,
                false,
                Arp,
            ),
            // IPv4.
            case("IPv4 from another address", tcp(PEER4), Err(Ipv4Src)),
            case(
                "IPv4 from another address, 802.1Q",
                tagged(&tcp(PEER4), ETH_P_8021Q),
                Err(Ipv4Src),
            ),
            case("TCP from 0.0.0.0", tcp([0; 4]), Err(Ipv4Src)),
            case(
                "UDP from 0.0.0.0, not to a DHCP server",
                udp4([0; 4], 68, 68),
                Err(Ipv4Src),
            ),
            case(
                "UDP from 0.0.0.0, from a DHCP server",
                udp4([0; 4], 67, 68),
                Err(Ipv4Src),
            ),
            case("DHCP ports in a later fragment", later_dhcp, Err(Ipv4Src)),
            case(
                "DHCP ports in a packet too short",
                with(udp4([0; 4], 68, 67), ETH_HLEN + 2, &[0, 22]),
                Err(Ipv4Src),
            ),
            case(
                "IPv4 of version 6",
                with(tcp(h.v4), ETH_HLEN, &[0x65]),
                Err(Ipv4Src),
            ),
            case(
                "IPv4 header under 20 bytes",
                with(tcp(h.v4), ETH_HLEN, &[0x44]),
                Err(Ipv4Src),
            ),
            case(
                "IPv4 total length under its header",
                with(tcp(h.v4), ETH_HLEN + 2, &[0, 19]),
                Err(Ipv4Src),
            ),
            case(
                "IPv4 options past the frame",
                with(
                    with(udp4(h.v4, 1, 2), ETH_HLEN, &[0x4f]),
                    ETH_HLEN + 2,
                    &[4, 0],
                ),
                Err(Ipv4Src),
            ),
            cut(
                "IPv4 cut by the frame",
                tcp(h.v4),
                ETH_HLEN + 19,
                true,
                Ipv4Src,
            ),
            // IPv6.
            case("IPv6 from another address", tcp6(PEER6), Err(Ipv6Src)),
            case("IPv6 from the guest's address", tcp6(GUEST6), Err(Ipv6Src)),
            case("TCP from ::", tcp6(UNSPECIFIED), Err(Ipv6Src)),
            case("echo request from ::", echo6(UNSPECIFIED), Err(Ipv6Src)),
            case(
                "neighbour advertisement from ::",
                with(na_frame.clone(), ETH_HLEN + IPV6_SRC, &UNSPECIFIED),
                Err(Ipv6Src),
            ),
            case(
                "IPv6 of version 4",
                with(tcp6(h.v6), ETH_HLEN, &[0x40]),
                Err(Ipv6Src),
            ),
            cut(
                "IPv6 cut by the frame",
                tcp6(h.v6),
                ETH_HLEN + 39,
                true,
                Ipv6Src,
            ),
            // NDP.
            case("router advertisement", ra(h.mac, LINK_LOCAL), Err(Nd)),
            case("redirect", redirect(h, h.mac, LINK_LOCAL), Err(Nd)),
            case(
                "advertisement for another",
                na(h, 0x60, PEER6, h.mac),
                Err(Nd),
            ),
            case(
                "advertisement for the guest's address",
                na(h, 0x60, GUEST6, h.mac),
                Err(Nd),
            ),
            case(
                "advertisement of another MAC",
                na(h, 0x60, h.v6, PEER_MAC),
                Err(Nd),
            ),
            case(
                "solicitation from another MAC",
                ns(h.mac, h.v6, PEER6, Some(PEER_MAC)),
                Err(Nd),
            ),
            case(
                "DAD of another's address",
                ns(h.mac, UNSPECIFIED, PEER6, None),
                Err(Nd),
            ),
            case(
                "router solicitation from another MAC",
                rs(h, LINK_LOCAL, Some(PEER_MAC)),
                Err(Nd),
            ),
            case(
                "option of length 0",
                with(na_frame.clone(), nd_options + 1, &[0]),
                Err(Nd),
            ),
            case(
                "option past the message",
                with(na_frame.clone(), nd_options + 1, &[2]),
                Err(Nd),
            ),
            case(
                "advertisement without target",
                with(na_frame.clone(), ETH_HLEN + 4, &[0, 20]),
                Err(Nd),
            ),
            cut(
                "advertisement cut by the frame",
                na_frame.clone(),
                nd_options + 6,
                true,
                Nd,
            ),
            cut(
                "advertisement cut by the window",
                na_frame.clone(),
                nd_options,
                false,
                Nd,
            ),
        ]
    }

    #[test]
    fn port_security_allows_what_the_identity_sends() {
        let p = policy();
        for (name, sender, frame) in captured(IDENTITY) {
            if sender == Sender::Host {
                assert_eq!(check_source(&frame, frame.len(), &p), Ok(()), "{name}");
            }
        }
    }

    #[test]
    fn port_security_refuses_what_it_must() {
        let p = policy();
        for c in cases() {
            assert_eq!(
                check_source(&c.win, c.frame_len, &p),
                c.expect,
                "{}",
                c.name
            );
        }
        // The guest's own view, unmapped.
        let (guest, _) = view("TCP SYN");
        assert_eq!(
            check_source(&guest, guest.len(), &p),
            Err(Violation::SrcMac)
        );
        let ip_only = PortPolicy {
            macs: vec![GUEST_MAC],
            ..policy()
        };
        assert_eq!(
            check_source(&guest, guest.len(), &ip_only),
            Err(Violation::Ipv4Src)
        );
    }

    #[test]
    fn a_port_that_does_not_enforce_passes_every_frame() {
        let trusted = PortPolicy {
            trusted: true,
            ..policy()
        };
        let without_identity = PortPolicy {
            macs: vec![],
            ..policy()
        };
        let frames = views()
            .into_iter()
            .flat_map(|(_, _, guest, identity)| [guest, identity]);
        for frame in frames.chain(cases().into_iter().map(|c| c.win)) {
            assert_eq!(check_source(&frame, frame.len(), &trusted), Ok(()));
            assert_eq!(check_source(&frame, frame.len(), &without_identity), Ok(()));
        }
    }

    #[test]
    fn ingress_maps_then_checks() {
        let p = policy();
        for (name, sender, guest, identity) in views() {
            let mut w = guest.clone();
            let verdict = ingress(&mut w, guest.len(), &p, Some(GUEST_MAC));
            assert_eq!(w, identity, "{name}");
            if sender == Sender::Host {
                assert_eq!(verdict, Ok(()), "{name}");
            }
        }
        // Without mapping, ingress is the check alone.
        let unmapped = PortPolicy {
            mac_map: None,
            ip_map: IpMaps::default(),
            ..policy()
        };
        for c in cases() {
            let mut w = c.win.clone();
            let verdict = ingress(&mut w, c.frame_len, &unmapped, None);
            assert_eq!(verdict, c.expect, "{}", c.name);
            assert_eq!(w, c.win);
        }
    }

    #[test]
    fn violations_count_as_their_drop_reasons() {
        let names = [
            (Violation::SrcMac, "spoofed_mac"),
            (Violation::Arp, "spoofed_arp"),
            (Violation::Ipv4Src, "spoofed_ipv4"),
            (Violation::Ipv6Src, "spoofed_ipv6"),
            (Violation::Nd, "spoofed_nd"),
        ];
        for (v, name) in names {
            assert_eq!(DropReason::from(v).name(), name);
        }
    }

    /// The checksum change of RFC 1624 (eqn. 3) as first written: byte by
    /// byte, folded in a loop.
    fn reference_delta(old: &[u8], new: &[u8]) -> u16 {
        let sum = |b: &[u8]| -> u32 {
            b.iter()
                .enumerate()
                .map(|(i, &byte)| u32::from(byte) << if i % 2 == 0 { 8 } else { 0 })
                .sum()
        };
        let fold = |mut sum: u32| {
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            sum as u16
        };
        fold(u32::from(!fold(sum(old))) + sum(new))
    }

    #[test]
    fn fold_is_the_loop() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let edges = [
            0,
            1,
            0xfffe,
            0xffff,
            0x1_0000,
            0x1_fffe,
            0x1_ffff,
            0xffff_fffe,
            u32::MAX,
        ];
        let randoms: Vec<u32> = (0..100_000).map(|_| rng.next() as u32).collect();
        for &x in edges.iter().chain(&randoms) {
            let mut sum = x;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            assert_eq!(fold(x), sum as u16, "{x:#x}");
        }
    }

    #[test]
    fn a_checksum_adjusted_as_stored_is_adjusted_as_a_number() {
        let mut rng = XorShift(0xda94_2042_e4dd_58b5);
        let edges = [0u16, 1, 0xfe, 0xff, 0x100, 0xfeff, 0xff00, 0xfffe, 0xffff];
        let mut pairs: Vec<(u16, u16)> = edges
            .iter()
            .flat_map(|&a| edges.iter().map(move |&b| (a, b)))
            .collect();
        pairs.extend((0..100_000).map(|_| (rng.next() as u16, rng.next() as u16)));
        for (csum, d) in pairs {
            let mut want = csum.to_be_bytes();
            Delta(Some(d)).adjust(&mut want);
            let mut got = csum.to_be_bytes();
            adjust_as_stored(&mut got, d);
            assert_eq!(got, want, "{csum:#x} {d:#x}");
        }
    }

    #[test]
    fn precomputed_checksum_deltas_are_the_reference() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut pairs4: Vec<([u8; 4], [u8; 4])> = vec![
            (ID4, GUEST4),
            (ID4, ID4),
            ([0; 4], [0xff; 4]),
            ([0xff; 4], [0; 4]),
            ([0; 4], [0; 4]),
            ([0xff; 4], [0xff; 4]),
        ];
        let mut pairs6: Vec<([u8; 16], [u8; 16])> =
            vec![(ID6, GUEST6), ([0; 16], [0xff; 16]), ([0xff; 16], [0; 16])];
        for _ in 0..2_000 {
            pairs4.push((
                (rng.next() as u32).to_be_bytes(),
                (rng.next() as u32).to_be_bytes(),
            ));
            let a = u128::from(rng.next()) << 64 | u128::from(rng.next());
            let b = u128::from(rng.next()) << 64 | u128::from(rng.next());
            pairs6.push((a.to_be_bytes(), b.to_be_bytes()));
        }
        let maps: IpMaps = pairs4
            .iter()
            .map(|&(identity, guest)| IpMap::V4 {
                identity: identity.into(),
                guest: guest.into(),
            })
            .chain(pairs6.iter().map(|&(identity, guest)| IpMap::V6 {
                identity: identity.into(),
                guest: guest.into(),
            }))
            .collect();
        assert_eq!(maps.len(), pairs4.len() + pairs6.len());
        assert_eq!(maps.v4().len(), pairs4.len());
        assert_eq!(maps.v6().len(), pairs6.len());
        for (t, &(identity, guest)) in maps.v4().iter().zip(&pairs4) {
            assert_eq!((t.identity, t.guest), (identity, guest));
            assert_eq!(t.to_identity, reference_delta(&guest, &identity));
            assert_eq!(t.to_guest, reference_delta(&identity, &guest));
        }
        for (t, &(identity, guest)) in maps.v6().iter().zip(&pairs6) {
            assert_eq!((t.identity, t.guest), (identity, guest));
            assert_eq!(t.to_identity, reference_delta(&guest, &identity));
            assert_eq!(t.to_guest, reference_delta(&identity, &guest));
        }
    }

    #[test]
    fn precomputed_deltas_give_the_recomputed_checksums() {
        // Random translations, and frames between random addresses: what
        // the precomputed deltas write is what a checksum from scratch is.
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        for _ in 0..2_000 {
            let addr = |rng: &mut XorShift| (rng.next() as u32).to_be_bytes();
            let (guest, identity, peer) = (addr(&mut rng), addr(&mut rng), addr(&mut rng));
            if guest == peer || identity == peer || guest == identity {
                continue;
            }
            let p = PortPolicy {
                ip_map: vec![IpMap::V4 {
                    identity: identity.into(),
                    guest: guest.into(),
                }]
                .into(),
                ..policy()
            };
            let payload: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            let sport = rng.next() as u16;
            let l4 = if rng.next() % 2 == 0 {
                (IPPROTO_UDP, udp(sport, 53, &payload))
            } else {
                (IPPROTO_TCP, tcp_data(sport, 443, payload.len()))
            };
            let frame = |src, dst| eth(PEER_MAC, GUEST_MAC, ETH_P_IP, &ipv4(src, dst, l4.0, &l4.1));
            let (from_guest, from_identity) = (frame(guest, peer), frame(identity, peer));
            let mut w = from_guest.clone();
            let n = w.len();
            map_ingress(&mut w, n, &p, None);
            assert_eq!(w, from_identity);
            let (to_guest, to_identity) = (frame(peer, guest), frame(peer, identity));
            let mut w = to_identity.clone();
            let n = w.len();
            map_egress(&mut w, n, &p, None);
            assert_eq!(w, to_guest);
        }
    }

    /// Frames of the fast path's shape and around it: IPv4 TCP and UDP
    /// between the guest's, the identity's and others' addresses, their
    /// bytes that steer the fast path or that it rewrites set to values at
    /// its edges.
    fn fast_path_frames(rng: &mut XorShift) -> Vec<u8> {
        let addrs = [GUEST4, ID4, PEER4, [0; 4]];
        let macs = [GUEST_MAC, ID_MAC, PEER_MAC];
        let src = addrs[rng.below(addrs.len())];
        let dst = addrs[rng.below(addrs.len())];
        let (proto, l4) = match rng.below(4) {
            0 => (IPPROTO_TCP, tcp_syn(41_952, 443)),
            1 => (IPPROTO_TCP, tcp_data(443, 41_952, rng.below(30))),
            2 => (IPPROTO_UDP, udp(68, 67, &vec![7; rng.below(30)])),
            _ => (
                IPPROTO_UDP,
                udp_no_checksum(53, 53, &vec![9; rng.below(30)]),
            ),
        };
        let mut f = eth(
            macs[rng.below(macs.len())],
            macs[rng.below(macs.len())],
            ETH_P_IP,
            &ipv4(src, dst, proto, &l4),
        );
        let steer: [(usize, &[u8]); 12] = [
            (ETH_TYPE, &[0x08, 0x86, 0x81, 0x88, 0x00]),
            (ETH_TYPE + 1, &[0x00, 0x06, 0xdd, 0x01]),
            (ETH_HLEN, &[0x45, 0x46, 0x44, 0x65, 0x4f, 0x55]),
            (ETH_HLEN + 1, &[0x00, 0xff, 0x45]),
            (ETH_HLEN + 2, &[0x00, 0x01]),
            (ETH_HLEN + 3, &[0, 20, 27, 28, 37, 38, 39, 60]),
            (ETH_HLEN + 6, &[0x00, 0x20, 0x40, 0x01, 0x1f, 0xe0]),
            (ETH_HLEN + 7, &[0x00, 0x01, 0xff]),
            (ETH_HLEN + 9, &[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 0]),
            (ETH_HLEN + IPV4_CSUM, &[0x00, 0xff]),
            (FAST4_L4 + UDP_CSUM, &[0x00, 0xff]),
            (FAST4_L4 + TCP_CSUM, &[0x00, 0xff]),
        ];
        for _ in 0..rng.below(4) {
            let (at, values) = steer[rng.below(steer.len())];
            let value = values[rng.below(values.len())];
            let width = if rng.next() % 2 == 0 { 1 } else { 2 };
            for b in f.iter_mut().skip(at).take(width) {
                *b = value;
            }
        }
        f
    }

    #[test]
    fn the_fast_path_is_the_general_one() {
        let policies = [
            policy(),
            PortPolicy {
                trusted: true,
                ..policy()
            },
            PortPolicy {
                mac_map: None,
                ip_map: IpMaps::default(),
                ..policy()
            },
            PortPolicy {
                ip_map: IpMaps::default(),
                ..policy()
            },
            PortPolicy {
                mac_map: None,
                ..policy()
            },
            PortPolicy {
                macs: vec![],
                ipv4: vec![],
                ..policy()
            },
            PortPolicy {
                // Two translations of one address: the first wins.
                ip_map: [
                    policy().ip_map.to_vec(),
                    vec![
                        IpMap::V4 {
                            identity: PEER4.into(),
                            guest: GUEST4.into(),
                        },
                        IpMap::V4 {
                            identity: ID4.into(),
                            guest: PEER4.into(),
                        },
                    ],
                ]
                .concat()
                .into(),
                ..policy()
            },
        ];
        let guest_macs = [Some(GUEST_MAC), Some(ID_MAC), None];
        let mut rng = XorShift(0x5851_f42d_4c95_7f2d);
        let mut fast = 0;
        for _ in 0..100_000 {
            let frame = fast_path_frames(&mut rng);
            let frame_len = match rng.below(4) {
                0 => rng.below(frame.len() + 1),
                1 => frame.len() + rng.below(100),
                _ => frame.len(),
            };
            let n = match rng.below(3) {
                0 => rng.below(frame.len() + 1),
                _ => frame.len().min(WINDOW),
            };
            let p = &policies[rng.below(policies.len())];
            let guest_mac = guest_macs[rng.below(guest_macs.len())];
            let mut w = frame[..n].to_vec();
            if fast4(visible(&mut w, frame_len)).is_some() {
                fast += 1;
            }
            // Ingress: mapped and checked.
            let mut general = frame[..n].to_vec();
            let want = general_ingress(visible(&mut general, frame_len), p, guest_mac);
            let got = ingress(&mut w, frame_len, p, guest_mac);
            assert_eq!((got, &w), (want, &general), "{frame:02x?} {frame_len}");
            // Each way, mapped only.
            for dir in [Direction::Ingress, Direction::Egress] {
                let Some(rw) = Rewrite::new(p, guest_mac, dir) else {
                    continue;
                };
                let mut general = frame[..n].to_vec();
                rw.general(visible(&mut general, frame_len));
                let mut w = frame[..n].to_vec();
                rw.window(visible(&mut w, frame_len));
                assert_eq!(w, general, "{dir:?} {frame:02x?} {frame_len}");
            }
        }
        // Most frames take the fast path, and many do not.
        assert!((25_000..75_000).contains(&fast), "{fast}");
    }

    /// Marsaglia's xorshift64.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn any_bytes_pass_without_panic() {
        let policies = [
            policy(),
            PortPolicy {
                trusted: true,
                ..policy()
            },
        ];
        let seeds: Vec<Vec<u8>> = views()
            .into_iter()
            .flat_map(|(_, _, guest, identity)| [guest, identity])
            .chain(cases().into_iter().map(|c| c.win))
            .collect();
        // Values that steer the parse: ethertypes, versions, protocols,
        // ICMP and NDP types, option types and lengths.
        let steer = [
            0, 1, 2, 3, 4, 5, 6, 8, 11, 17, 58, 0x45, 0x4f, 0x60, 0x81, 0x86, 0x88, 0xdd, 133, 134,
            135, 136, 137, 143, 0xff,
        ];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in 0..50_000 {
            let mut frame = if i % 4 == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                seeds[rng.below(seeds.len())].clone()
            };
            let mutations = if frame.is_empty() { 0 } else { rng.below(4) };
            for _ in 0..mutations {
                let at = rng.below(frame.len().min(WINDOW));
                frame[at] = if rng.next() % 2 == 0 {
                    rng.next() as u8
                } else {
                    steer[rng.below(steer.len())]
                };
            }
            let frame_len = match rng.below(3) {
                0 => rng.below(frame.len() + 1),
                1 => frame.len() + rng.below(2000),
                _ => frame.len(),
            };
            let n = if i % 2 == 0 {
                frame.len().min(WINDOW)
            } else {
                rng.below(frame.len() + 1)
            };
            for p in &policies {
                let mut mapped = frame[..n].to_vec();
                map_ingress(&mut mapped, frame_len, p, Some(GUEST_MAC));
                let verdict = check_source(&mapped, frame_len, p);
                let mut once = frame[..n].to_vec();
                assert_eq!(ingress(&mut once, frame_len, p, Some(GUEST_MAC)), verdict);
                assert_eq!(once, mapped);
                map_egress(&mut mapped, frame_len, p, Some(GUEST_MAC));
            }
        }
    }
}
