//! Frames as real stacks send them (ARP, IPv4/UDP, IPv6/UDP, neighbour
//! advertisements), with correct checksums, and readers that check them:
//! for the tests of what the switch enforces and rewrites.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The Internet checksum of `data` folded into `sum`.
fn fold(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

/// The ones' complement of the folded sum.
fn finish(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum of `data` (0 when `data` carries a correct one).
pub fn checksum(data: &[u8]) -> u16 {
    finish(fold(0, data))
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP packet (Ethernet/IPv4) of opcode `op` (1 request, 2 reply).
pub fn arp(
    dst: [u8; 6],
    src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = eth(dst, src, 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(60, 0);
    f
}

/// An IPv4 UDP datagram with correct header and UDP checksums.
pub fn udp4(
    dst: [u8; 6],
    src: [u8; 6],
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst, src, 0x0800);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&from.0.octets());
    ip[16..20].copy_from_slice(&to.0.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let udp = udp(
        from.1,
        to.1,
        payload,
        pseudo4(from.0, to.0, 17, 8 + payload.len()),
    );
    f.extend_from_slice(&udp);
    f
}

/// An IPv6 UDP datagram with a correct checksum.
pub fn udp6(
    dst: [u8; 6],
    src: [u8; 6],
    from: (Ipv6Addr, u16),
    to: (Ipv6Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst, src, 0x86dd);
    f.extend_from_slice(&ip6_header(from.0, to.0, 17, 8 + payload.len(), 64));
    f.extend_from_slice(&udp(
        from.1,
        to.1,
        payload,
        pseudo6(from.0, to.0, 17, 8 + payload.len()),
    ));
    f
}

/// A neighbour advertisement for `target` with a target link-layer address
/// option, from `from` to `to`.
pub fn neighbour_advert(
    dst: [u8; 6],
    src: [u8; 6],
    from: Ipv6Addr,
    to: Ipv6Addr,
    target: Ipv6Addr,
    lladdr: [u8; 6],
) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&lladdr);
    let c = finish(fold(pseudo6(from, to, 58, icmp.len()), &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(dst, src, 0x86dd);
    f.extend_from_slice(&ip6_header(from, to, 58, icmp.len(), 255));
    f.extend_from_slice(&icmp);
    f
}

fn ip6_header(from: Ipv6Addr, to: Ipv6Addr, next: u8, len: usize, hops: u8) -> [u8; 40] {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = hops;
    ip[8..24].copy_from_slice(&from.octets());
    ip[24..40].copy_from_slice(&to.octets());
    ip
}

fn udp(sport: u16, dport: u16, payload: &[u8], pseudo: u32) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = match finish(fold(pseudo, &u)) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

fn pseudo4(from: Ipv4Addr, to: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    fold(0, &p)
}

fn pseudo6(from: Ipv6Addr, to: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    fold(0, &p)
}

/// Destination and source MAC of a frame.
pub fn macs(f: &[u8]) -> ([u8; 6], [u8; 6]) {
    let mut d = [0u8; 6];
    let mut s = [0u8; 6];
    d.copy_from_slice(&f[0..6]);
    s.copy_from_slice(&f[6..12]);
    (d, s)
}

/// Sender and target hardware and protocol addresses of an ARP frame.
pub fn arp_addrs(f: &[u8]) -> ([u8; 6], Ipv4Addr, [u8; 6], Ipv4Addr) {
    let a = &f[14..42];
    let mac = |o: usize| -> [u8; 6] { a[o..o + 6].try_into().unwrap_or([0; 6]) };
    let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
    (mac(8), ip(14), mac(18), ip(24))
}

/// Source and destination of an IPv4 UDP frame, after checking its header
/// and UDP checksums (panics, with what is wrong, if either is).
pub fn udp4_checked(f: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    assert_eq!(&f[12..14], &[8, 0], "not IPv4");
    let ip = &f[14..34];
    assert_eq!(checksum(ip), 0, "IPv4 header checksum");
    let from = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let to = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let len = usize::from(u16::from_be_bytes([ip[2], ip[3]])) - 20;
    let u = &f[34..34 + len];
    assert_eq!(
        finish(fold(pseudo4(from, to, 17, len), u)),
        0,
        "UDP checksum"
    );
    (from, to)
}

/// Source and destination of an IPv6 UDP frame, after checking its
/// checksum.
pub fn udp6_checked(f: &[u8]) -> (Ipv6Addr, Ipv6Addr) {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "not IPv6");
    let ip = &f[14..54];
    let addr = |o: usize| -> Ipv6Addr {
        let b: [u8; 16] = ip[o..o + 16].try_into().unwrap_or([0; 16]);
        Ipv6Addr::from(b)
    };
    let (from, to) = (addr(8), addr(24));
    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let u = &f[54..54 + len];
    assert_eq!(
        finish(fold(pseudo6(from, to, 17, len), u)),
        0,
        "UDP checksum"
    );
    (from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_check_out() {
        let a = [2, 0, 0, 0, 0, 1];
        let b = [2, 0, 0, 0, 0, 2];
        let f = udp4(
            b,
            a,
            (Ipv4Addr::new(10, 0, 0, 1), 5000),
            (Ipv4Addr::new(10, 0, 0, 2), 53),
            b"hello",
        );
        assert_eq!(
            udp4_checked(&f),
            (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2))
        );
        let x: Ipv6Addr = "2001:db8::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let y: Ipv6Addr = "2001:db8::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let f = udp6(b, a, (x, 1), (y, 2), b"odd");
        assert_eq!(udp6_checked(&f), (x, y));
        let na = neighbour_advert(b, a, x, y, x, a);
        let icmp_len = na.len() - 54;
        assert_eq!(finish(fold(pseudo6(x, y, 58, icmp_len), &na[54..])), 0);
        let r = arp(
            b,
            a,
            2,
            a,
            Ipv4Addr::new(10, 0, 0, 1),
            b,
            Ipv4Addr::new(10, 0, 0, 2),
        );
        assert_eq!(r.len(), 60);
        assert_eq!(arp_addrs(&r).0, a);
    }
}
