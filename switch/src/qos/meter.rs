//! A meter: the buckets of one limit (average rate, and peak rate if set),
//! in the limit's unit.

use super::bucket::TokenBucket;
use super::policy::{LimitMode, NetLimit, RateUnit};

/// Largest frame a burst must hold at least (bytes): the switch's frame limit.
const MIN_BYTES_BURST: u64 = crate::dataplane::MAX_FRAME_LEN as u64;

/// The buckets of a net limit. Bits mode counts bits (exact for any bit
/// rate); packets mode counts frames.
#[derive(Debug, Clone)]
pub struct Meter {
    mode: LimitMode,
    packets: bool,
    avg: TokenBucket,
    peak: Option<TokenBucket>,
}

impl Meter {
    pub fn new(l: &NetLimit, now: u64) -> Self {
        let packets = l.unit == RateUnit::Packets;
        let (avg_burst, peak_burst) = bursts(l);
        Meter {
            mode: l.mode,
            packets,
            avg: TokenBucket::new(l.rate, avg_burst, now),
            peak: l.peak.map(|p| TokenBucket::new(p, peak_burst, now)),
        }
    }

    /// Change the limit, keeping the tokens held.
    pub fn update(&mut self, l: &NetLimit, now: u64) {
        if (l.unit == RateUnit::Packets) != self.packets || l.peak.is_some() != self.peak.is_some()
        {
            *self = Meter::new(l, now);
            return;
        }
        let (avg_burst, peak_burst) = bursts(l);
        self.mode = l.mode;
        self.avg.set(l.rate, avg_burst, now);
        if let (Some(b), Some(p)) = (self.peak.as_mut(), l.peak) {
            b.set(p, peak_burst, now);
        }
    }

    pub fn mode(&self) -> LimitMode {
        self.mode
    }

    /// Tokens a frame of `len` bytes costs.
    #[inline]
    fn cost(&self, len: u32) -> u64 {
        if self.packets {
            1
        } else {
            u64::from(len) * 8
        }
    }

    /// Whether a frame of `len` bytes conforms now.
    #[inline]
    pub fn allows(&mut self, len: u32, now: u64) -> bool {
        let c = self.cost(len);
        self.avg.allows(c, now) && self.peak.as_mut().is_none_or(|p| p.allows(c, now))
    }

    /// Take the tokens of a conforming frame; false (nothing taken) if it
    /// does not conform.
    #[inline]
    pub fn take(&mut self, len: u32, now: u64) -> bool {
        if !self.allows(len, now) {
            return false;
        }
        // `allows` brought both buckets up to `now`.
        let c = self.cost(len);
        self.avg.debit(c);
        if let Some(p) = self.peak.as_mut() {
            p.debit(c);
        }
        true
    }

    /// Nanoseconds until a frame of `len` bytes conforms.
    pub fn wait_ns(&mut self, len: u32, now: u64) -> u64 {
        let c = self.cost(len);
        let a = self.avg.wait_ns(c, now);
        let p = self.peak.as_mut().map_or(0, |p| p.wait_ns(c, now));
        a.max(p)
    }
}

/// Average and peak bursts in the meter's unit (bits or packets).
fn bursts(l: &NetLimit) -> (u64, u64) {
    match l.unit {
        RateUnit::Packets => {
            let avg = l.burst.unwrap_or(l.rate / 100).max(1);
            (avg, l.peak_burst.unwrap_or(1).max(1))
        }
        RateUnit::Bits => {
            // Bytes configured, bits counted; 10 ms at the rate by default.
            let avg = l.burst.unwrap_or(l.rate / 8 / 100).max(MIN_BYTES_BURST);
            let peak = l.peak_burst.unwrap_or(MIN_BYTES_BURST).max(MIN_BYTES_BURST);
            (avg.saturating_mul(8), peak.saturating_mul(8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn limit(unit: RateUnit, rate: u64, burst: u64, peak: Option<u64>) -> NetLimit {
        NetLimit {
            mode: LimitMode::Police,
            unit,
            rate,
            burst: Some(burst),
            peak,
            peak_burst: None,
        }
    }

    #[test]
    fn bits_are_counted_exactly() {
        // 8 Mbit/s = 1 byte per µs; burst 16 KiB (the least allowed).
        let mut m = Meter::new(&limit(RateUnit::Bits, 8_000_000, 16384, None), 0);
        assert!(m.take(16384, 0));
        assert!(!m.take(1, 0));
        assert!(!m.allows(1000, 999_999));
        assert!(m.take(1000, 1_000_000));
        assert_eq!(m.wait_ns(1000, 1_000_000), 1_000_000);
    }

    #[test]
    fn packets_and_peak() {
        // 1000 packets/s, burst 10, peak 2000/s with a burst of 1: the
        // burst drains at the peak rate, one packet every 0.5 ms.
        let mut m = Meter::new(&limit(RateUnit::Packets, 1000, 10, Some(2000)), 0);
        assert!(m.take(1500, 0));
        assert!(!m.take(64, 0), "the peak bucket holds one packet");
        assert!(m.take(64, MS / 2));
        assert_eq!(m.wait_ns(64, MS / 2), MS / 2);
        let mut passed = 0;
        let mut now = 0;
        while now <= 1000 * MS {
            while m.take(64, now) {
                passed += 1;
            }
            now += MS / 10;
        }
        // Over a second: the rate plus the burst, less the two taken above.
        assert_eq!(passed, 1000 + 10 - 2);
    }

    #[test]
    fn update_keeps_tokens_and_switching_unit_starts_over() {
        let mut m = Meter::new(&limit(RateUnit::Packets, 100, 5, None), 0);
        assert!(m.take(1, 0));
        m.update(&limit(RateUnit::Packets, 1000, 5, None), 0);
        let mut n = 0;
        while m.take(1, 0) {
            n += 1;
        }
        assert_eq!(n, 4, "the tokens held are kept");
        m.update(&limit(RateUnit::Bits, 8_000_000, 16384, None), 0);
        assert!(m.take(16384, 0), "a new unit starts with a full bucket");
    }
}
