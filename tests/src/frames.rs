//! Helpers the integration tests share: addresses, recognisable test frames,
//! guests on switch ports, waiting without spinning, and port counters.
//!
//! A test frame carries EtherType [`TEST_ETHERTYPE`], then an 8-byte tag and
//! a byte pattern derived from the tag, so that a receiver can tell frames
//! apart and check them byte for byte.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::guest::{GuestError, NetGuest, NetGuestConfig};
use crate::switch::SwitchProcess;

/// EtherType of test frames (IEEE local experimental).
pub const TEST_ETHERTYPE: u16 = 0x88b5;
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// An IPv4 multicast address (224.0.0.251).
pub const MULTICAST_V4: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
/// An IPv6 multicast address (ff02::1).
pub const MULTICAST_V6: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];
/// Bound on every wait: only a hang reaches it.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A locally administered unicast MAC address numbered `n`.
pub fn mac(n: u32) -> [u8; 6] {
    let b = n.to_be_bytes();
    [0x02, 0x5a, b[0], b[1], b[2], b[3]]
}

/// `aa:bb:cc:dd:ee:ff` as the control socket prints addresses.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A test frame of exactly `len` bytes (at least 22: header and tag) from
/// `src` to `dst`, recognisable by `tag`.
pub fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tag: u64) -> Vec<u8> {
    assert!(len >= 22, "a test frame needs at least 22 bytes, not {len}");
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&tag.to_be_bytes());
    let seed = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    f.extend((0..len - 22).map(|i| (seed >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8));
    f
}

/// The tag of a test frame, or `None` for anything else.
pub fn tag(f: &[u8]) -> Option<u64> {
    if f.len() < 22 || f[12..14] != TEST_ETHERTYPE.to_be_bytes() {
        return None;
    }
    Some(u64::from_be_bytes(f[14..22].try_into().ok()?))
}

/// The source MAC of a frame.
pub fn src_of(f: &[u8]) -> [u8; 6] {
    f[6..12].try_into().unwrap_or([0; 6])
}

/// Poll `f` every few milliseconds until it returns true; panic with `what`
/// after [`DEADLINE`].
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A guest configuration light enough to have dozens of: 64-entry queues,
/// 4 MiB of memory.
pub fn small_config() -> NetGuestConfig {
    NetGuestConfig {
        queue_size: 64,
        mem_size: 4 << 20,
        ..Default::default()
    }
}

/// Add port `name` to the switch and connect a guest to it.
pub fn plug(sw: &mut SwitchProcess, name: &str, cfg: NetGuestConfig) -> NetGuest {
    let sock = sw
        .add_port(name)
        .unwrap_or_else(|e| panic!("port.add {name}: {e}"));
    NetGuest::connect(&sock, cfg).unwrap_or_else(|e| panic!("guest on {name}: {e}"))
}

/// Add a port with any `port.add` arguments (`{"name": .., "vlan": ..}`) and
/// connect a guest to it.
pub fn plug_with(sw: &mut SwitchProcess, args: Value, cfg: NetGuestConfig) -> NetGuest {
    let r = sw
        .call("port.add", args.clone())
        .unwrap_or_else(|e| panic!("port.add {args}: {e}"));
    let sock = std::path::PathBuf::from(r["socket"].as_str().unwrap_or_default());
    NetGuest::connect(&sock, cfg).unwrap_or_else(|e| panic!("guest on {args}: {e}"))
}

/// Send every frame, waiting for TX ring space when it is full.
pub fn send_all(g: &mut NetGuest, frames: &[Vec<u8>]) {
    let deadline = Instant::now() + DEADLINE;
    let mut i = 0;
    while i < frames.len() {
        match g.send(&frames[i]) {
            Ok(()) => i += 1,
            Err(GuestError::RingFull) => {
                assert!(Instant::now() < deadline, "TX ring stayed full");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// Wait until the device has completed every frame this guest queued (it has
/// then switched them all: a TX chain is returned after its frame is
/// delivered to local ports or handed to another worker).
pub fn wait_tx_done(g: &mut NetGuest) {
    wait_until("the switch to complete our TX chains", || {
        g.reclaim_tx();
        g.tx_in_flight() == 0
    });
}

/// Receive exactly `n` frames (panics if they do not come).
pub fn recv_n(g: &mut NetGuest, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match g.recv_timeout(left) {
            Some(f) => out.push(f),
            None => panic!("received {} of {n} frames before the deadline", out.len()),
        }
    }
    out
}

/// Receive one frame (panics if none comes).
pub fn recv_one(g: &mut NetGuest) -> Vec<u8> {
    recv_n(g, 1).pop().unwrap_or_default()
}

/// A frame that marks a point in `sender`'s stream: broadcast it, then
/// collect everything each receiver got before it. Frames from one sender
/// reach a port in order, so what a receiver got before the marker is all
/// it will ever get of what was sent before it. The marker is a 60-byte
/// broadcast from `src` with `tag`; it is not in the returned lists.
pub fn barrier(
    sender: &mut NetGuest,
    src: [u8; 6],
    tag_value: u64,
    receivers: &mut [&mut NetGuest],
) -> Vec<Vec<Vec<u8>>> {
    let marker = frame(BROADCAST, src, 60, tag_value);
    send_all(sender, std::slice::from_ref(&marker));
    receivers
        .iter_mut()
        .map(|g| {
            let mut before = Vec::new();
            loop {
                let f = recv_one(g);
                if f == marker {
                    break before;
                }
                before.push(f);
            }
        })
        .collect()
}

/// A port's counters, as `port.stats` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames the switch took from the guest's TX ring.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the switch delivered into the guest's RX ring.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub broken: bool,
}

impl PortCounters {
    /// Parse a `port.stats` answer.
    pub fn from_json(v: &Value) -> Self {
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
        PortCounters {
            rx_packets: n("rx_packets"),
            rx_bytes: n("rx_bytes"),
            tx_packets: n("tx_packets"),
            tx_bytes: n("tx_bytes"),
            drops: v["drops"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, x)| (k.clone(), x.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            broken: v["broken"].as_bool().unwrap_or(false),
        }
    }

    /// One drop counter (0 if absent).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.drops.get(reason).copied().unwrap_or(0)
    }

    /// Every drop counter added up.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }

    /// The drop counters that are not zero, for exact comparisons.
    pub fn nonzero_drops(&self) -> BTreeMap<String, u64> {
        self.drops
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// The counters of port `name`.
pub fn counters(sw: &mut SwitchProcess, name: &str) -> PortCounters {
    let v = sw
        .port_stats(name)
        .unwrap_or_else(|e| panic!("port.stats {name}: {e}"));
    PortCounters::from_json(&v)
}

/// `[(name, value)]` as a map, for comparing drop counters exactly.
pub fn drops(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
    list.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Number of open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Number of threads of process `pid`.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_tag_and_length() {
        for len in [22, 60, 1514, 9000] {
            let f = frame(BROADCAST, mac(1), len, 77);
            assert_eq!(f.len(), len);
            assert_eq!(tag(&f), Some(77));
            assert_eq!(src_of(&f), mac(1));
        }
        assert_ne!(
            frame(BROADCAST, mac(1), 60, 1),
            frame(BROADCAST, mac(1), 60, 2)
        );
        assert_eq!(tag(&[0u8; 30]), None);
        assert_eq!(mac_str(&mac(0x0102)), "02:5a:00:00:01:02");
    }
}
