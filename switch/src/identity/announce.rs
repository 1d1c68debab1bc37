//! The frames that announce an identity where it now lives, so that peers
//! update their ARP and neighbour caches and physical switches their MAC
//! tables at once instead of when their entries expire:
//!
//! - a RARP request from the identity's MAC, as QEMU's self-announce sends
//!   after a migration (it names no address, only moves the MAC);
//! - a gratuitous ARP request for each IPv4 address (RFC 5227's ARP
//!   announcement: sender and target protocol address both the address);
//! - an unsolicited neighbour advertisement for each IPv6 address to all
//!   nodes (RFC 4861 section 7.2.6: override set, solicited clear).
//!
//! Each is a whole untagged Ethernet frame without FCS, padded with zeros to
//! the 60-byte minimum: the dataplane puts it in the port's VLAN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::policy::Mac;

/// Shortest Ethernet frame without its FCS.
pub const MIN_FRAME_LEN: usize = 60;

const BROADCAST: Mac = [0xff; 6];
const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_IPV6: u16 = 0x86dd;
/// ARP hardware type of Ethernet.
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
/// RARP "request reverse" (RFC 903).
const ARP_OP_REQUEST_REVERSE: u16 = 3;
/// The all-nodes multicast address and its MAC (RFC 2464 section 7).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];
const IPPROTO_ICMPV6: u8 = 58;
/// Neighbour discovery packets must carry this hop limit.
const ND_HOP_LIMIT: u8 = 255;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// The override flag of a neighbour advertisement (router and solicited
/// clear).
const NA_FLAG_OVERRIDE: u32 = 1 << 29;
/// The target link-layer address option, 8 bytes long (length 1).
const ND_OPT_TARGET_LINK_ADDR: u8 = 2;
/// A neighbour advertisement: ICMPv6 header, flags, target, option.
const NA_LEN: usize = 4 + 4 + 16 + 8;

/// Every frame that announces `mac` with `ips`: the RARP first, then a
/// gratuitous ARP per IPv4 address and a neighbour advertisement per IPv6
/// address, in the order of `ips`.
pub fn announcements(mac: Mac, ips: &[IpAddr]) -> Vec<Vec<u8>> {
    std::iter::once(rarp(mac))
        .chain(ips.iter().map(|ip| match ip {
            IpAddr::V4(a) => gratuitous_arp(mac, *a),
            IpAddr::V6(a) => neighbour_advertisement(mac, *a),
        }))
        .collect()
}

/// A RARP request from `mac` about itself, byte for byte as QEMU's
/// `announce_self_create`.
pub fn rarp(mac: Mac) -> Vec<u8> {
    arp(
        ETH_P_RARP,
        ARP_OP_REQUEST_REVERSE,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
    )
}

/// A gratuitous ARP request: `mac` has `ip`, to everyone.
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    arp(ETH_P_ARP, ARP_OP_REQUEST, mac, ip, [0; 6])
}

/// An ARP-format frame from `mac` to the broadcast address, sender `mac`
/// at `ip`, target `tha` at `ip` too.
fn arp(ethertype: u16, op: u16, mac: Mac, ip: Ipv4Addr, tha: Mac) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ethertype);
    f.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&ip.octets());
    pad(f)
}

/// An unsolicited neighbour advertisement: `mac` has `ip`, to all nodes.
pub fn neighbour_advertisement(mac: Mac, ip: Ipv6Addr) -> Vec<u8> {
    let mut na = Vec::with_capacity(NA_LEN);
    na.extend_from_slice(&[ICMPV6_NEIGHBOUR_ADVERTISEMENT, 0, 0, 0]);
    na.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    na.extend_from_slice(&ip.octets());
    na.extend_from_slice(&[ND_OPT_TARGET_LINK_ADDR, 1]);
    na.extend_from_slice(&mac);
    let sum = icmpv6_checksum(ip, ALL_NODES, &na);
    na[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6);
    // Version 6, traffic class and flow label 0.
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(NA_LEN as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, ND_HOP_LIMIT]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&na);
    pad(f)
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME_LEN.max(ETH_HDR_LEN + 40 + NA_LEN));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn pad(mut f: Vec<u8>) -> Vec<u8> {
    if f.len() < MIN_FRAME_LEN {
        f.resize(MIN_FRAME_LEN, 0);
    }
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) from `src` to
/// `dst`: the ones' complement of the ones' complement sum of the IPv6
/// pseudo-header (RFC 8200 section 8.1) and the message.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let len = msg.len() as u32;
    let pseudo = src
        .octets()
        .into_iter()
        .chain(dst.octets())
        .chain(len.to_be_bytes())
        .chain([0, 0, 0, IPPROTO_ICMPV6]);
    let bytes: Vec<u8> = pseudo.chain(msg.iter().copied()).collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_is_qemu_s_self_announce() {
        #[rustfmt::skip]
        let want: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // from the MAC
            0x80, 0x35,                         // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4,       // Ethernet, IPv4
            0x00, 0x03,                         // request reverse
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender: MAC, 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target: MAC, 0.0.0.0
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding
        ];
        assert_eq!(rarp(MAC), want);
    }

    #[test]
    fn gratuitous_arp_names_the_address_as_sender_and_target() {
        #[rustfmt::skip]
        let want: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x08, 0x06,                         // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,
            0x00, 0x01,                         // request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 192, 0, 2, 10, // sender
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,                   // target
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 10)), want);
    }

    #[test]
    fn neighbour_advertisement_overrides_for_all_nodes() {
        let ip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        #[rustfmt::skip]
        let mut want: Vec<u8> = vec![
            0x33, 0x33, 0, 0, 0, 1,             // all nodes
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x86, 0xdd,                         // IPv6
            0x60, 0, 0, 0,                      // version 6
            0, 32, 58, 255,                     // payload 32, ICMPv6, hop limit 255
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, // source
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,          // ff02::1
            136, 0, 0, 0,                       // NA, checksum below
            0x20, 0, 0, 0,                      // override
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, // target
            2, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // target link-layer address
        ];
        let sum = reference_checksum(&want[22..54], &want[54..]);
        want[56..58].copy_from_slice(&sum.to_be_bytes());
        let got = neighbour_advertisement(MAC, ip);
        assert_eq!(got, want);
        // Computed independently (Python, RFC 1071 by hand).
        assert_eq!(&got[56..58], &[0x74, 0x51]);
        assert!(verifies(&got));
    }

    /// RFC 1071 as written: 16-bit words summed in 64 bits, carries folded
    /// at the end, over the pseudo-header (addresses from `addrs`, length,
    /// next header) and the message with its checksum field zeroed.
    fn reference_checksum(addrs: &[u8], msg: &[u8]) -> u16 {
        let mut data = addrs.to_vec();
        data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, 58]);
        let mut m = msg.to_vec();
        m[2] = 0;
        m[3] = 0;
        data.extend_from_slice(&m);
        if data.len() % 2 == 1 {
            data.push(0);
        }
        let mut sum: u64 = 0;
        for i in (0..data.len()).step_by(2) {
            sum += (u64::from(data[i]) << 8) | u64::from(data[i + 1]);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Whether a receiver accepts the frame's ICMPv6 checksum: the sum over
    /// pseudo-header and message, checksum included, is all ones.
    fn verifies(frame: &[u8]) -> bool {
        let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
        let msg = &frame[54..54 + payload_len];
        let mut sum: u64 = 0;
        let mut add = |b: &[u8]| {
            for w in b.chunks(2) {
                sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
        };
        add(&frame[22..54]);
        add(&(payload_len as u32).to_be_bytes());
        add(&[0, 0, 0, 58]);
        add(msg);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn checksums_verify_for_many_addresses() {
        for i in 0..2000u32 {
            let seg = |k: u32| (i.wrapping_mul(k) >> 3) as u16;
            let ip = Ipv6Addr::new(0x2001, 0xdb8, seg(7), seg(13), 0, seg(31), 0xffff, seg(97));
            let mac = [0x02, i as u8, (i >> 8) as u8, 0xff, 0, 0x01];
            let f = neighbour_advertisement(mac, ip);
            assert!(verifies(&f), "{ip}");
            assert_eq!(
                u16::from_be_bytes([f[56], f[57]]),
                reference_checksum(&f[22..54], &f[54..86]),
                "{ip}"
            );
        }
    }

    #[test]
    fn one_rarp_then_one_frame_per_address() {
        let ips: Vec<IpAddr> = vec![
            "2001:db8::1".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        ];
        let f = announcements(MAC, &ips);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], rarp(MAC));
        assert_eq!(
            f[1],
            neighbour_advertisement(MAC, "2001:db8::1".parse().unwrap())
        );
        assert_eq!(f[2], gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(f[3], gratuitous_arp(MAC, Ipv4Addr::new(198, 51, 100, 7)));
        assert!(f.iter().all(|f| f.len() >= MIN_FRAME_LEN));
        assert_eq!(announcements(MAC, &[]), vec![rarp(MAC)]);
    }
}
