//! A meter: the buckets of one limit (average rate, and peak rate if set),
//! in the limit's unit.
//!
//! Taking tokens is per frame, so the meter keeps a fast path: after it has
//! brought its buckets up to date at some instant, it remembers how many
//! tokens both hold then (`credit`), and frames at the same instant (a
//! worker passes one `now` per poll pass) are taken from that credit alone,
//! the tokens owed to the buckets settled before they are next consulted.
//! The outcome is the same, frame for frame, as consulting both buckets
//! every time (a test checks it): the fast path takes only what both
//! buckets hold, and a bucket is only refilled at a later instant, after
//! what it is owed is settled.

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
    /// The instant the buckets were last brought up to date ([`NEVER`]:
    /// not since they changed).
    at: u64,
    /// Tokens both buckets hold at `at`, less `owed`.
    credit: i64,
    /// Tokens taken at `at` through `credit`, not yet debited from the buckets.
    owed: i64,
}

/// `Meter::at` of a meter whose credit must be worked out again.
const NEVER: u64 = u64::MAX;

impl Meter {
    pub fn new(l: &NetLimit, now: u64) -> Self {
        let packets = l.unit == RateUnit::Packets;
        let (avg_burst, peak_burst) = bursts(l);
        Meter {
            mode: l.mode,
            packets,
            avg: TokenBucket::new(l.rate, avg_burst, now),
            peak: l.peak.map(|p| TokenBucket::new(p, peak_burst, now)),
            at: NEVER,
            credit: 0,
            owed: 0,
        }
    }

    /// Debit both buckets with `c` tokens.
    #[inline]
    fn debit(&mut self, c: u64) {
        self.avg.debit(c);
        if let Some(p) = self.peak.as_mut() {
            p.debit(c);
        }
    }

    /// Debit the buckets with what the fast path took.
    #[inline]
    fn settle(&mut self) {
        if self.owed != 0 {
            self.debit(self.owed as u64);
            self.owed = 0;
        }
        self.at = NEVER;
    }

    /// Change the limit, keeping the tokens held.
    pub fn update(&mut self, l: &NetLimit, now: u64) {
        if (l.unit == RateUnit::Packets) != self.packets || l.peak.is_some() != self.peak.is_some()
        {
            *self = Meter::new(l, now);
            return;
        }
        self.settle();
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
    pub fn allows(&mut self, len: u32, now: u64) -> bool {
        self.settle();
        self.allows_settled(self.cost(len), now)
    }

    /// Whether `c` tokens may be taken now, the buckets owed nothing.
    #[inline]
    fn allows_settled(&mut self, c: u64, now: u64) -> bool {
        self.avg.allows(c, now) && self.peak.as_mut().is_none_or(|p| p.allows(c, now))
    }

    /// Take the tokens of a conforming frame; false (nothing taken) if it
    /// does not conform.
    #[inline]
    pub fn take(&mut self, len: u32, now: u64) -> bool {
        // A cost is at most MAX_FRAME_LEN × 8: no overflow.
        let c = self.cost(len) as i64;
        self.take_credit(c, now) || self.take_slow(c as u64, now)
    }

    /// Take `c` tokens from the credit both buckets hold at `now`, if it
    /// covers them.
    #[inline]
    fn take_credit(&mut self, c: i64, now: u64) -> bool {
        if now != self.at {
            self.sync(now);
        }
        if c <= self.credit {
            self.credit -= c;
            self.owed += c;
            return true;
        }
        false
    }

    /// Take the tokens of `frames` frames of `bytes` bytes in all if both
    /// buckets hold them all now; false (nothing taken) otherwise, when
    /// the caller takes them frame by frame (an answer for the whole only:
    /// some may conform).
    #[inline]
    pub fn take_bulk(&mut self, frames: u32, bytes: u64, now: u64) -> bool {
        let c = if self.packets {
            i64::from(frames)
        } else {
            i64::try_from(bytes.saturating_mul(8)).unwrap_or(i64::MAX)
        };
        self.take_credit(c, now)
    }

    /// Settle, bring both buckets up to `now` and work out the credit.
    #[inline(never)]
    fn sync(&mut self, now: u64) {
        self.settle();
        self.avg.refill(now);
        if let Some(p) = self.peak.as_mut() {
            p.refill(now);
        }
        self.at = now;
        self.credit = self.held();
    }

    /// The least either bucket holds.
    #[inline]
    fn held(&self) -> i64 {
        self.avg
            .held()
            .min(self.peak.as_ref().map_or(i64::MAX, |p| p.held()))
    }

    /// [`take`](Self::take) when the credit (worked out at `now`) does not
    /// cover the frame: settle, consult both buckets, and work out the
    /// credit again.
    #[inline(never)]
    fn take_slow(&mut self, c: u64, now: u64) -> bool {
        self.settle();
        self.at = now;
        // Both buckets are up to `now`: ask them.
        let ok = self.allows_settled(c, now);
        if ok {
            self.debit(c);
            self.credit = self.held();
        }
        ok
    }

    /// Nanoseconds until a frame of `len` bytes conforms.
    pub fn wait_ns(&mut self, len: u32, now: u64) -> u64 {
        self.settle();
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

    /// The buckets consulted for every frame, as the fast path must behave.
    fn take_eagerly(
        avg: &mut TokenBucket,
        peak: &mut Option<TokenBucket>,
        c: u64,
        now: u64,
    ) -> bool {
        let ok = avg.allows(c, now) && peak.as_mut().is_none_or(|p| p.allows(c, now));
        if ok {
            avg.debit(c);
            if let Some(p) = peak.as_mut() {
                p.debit(c);
            }
        }
        ok
    }

    #[test]
    fn credit_takes_exactly_what_the_buckets_would() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for peak in [None, Some(3_000_000)] {
            let l = NetLimit {
                peak,
                peak_burst: Some(20_000),
                ..limit(RateUnit::Bits, 1_000_000, 16_384, None)
            };
            let mut m = Meter::new(&l, 0);
            let (ab, pb) = bursts(&l);
            let mut avg = TokenBucket::new(l.rate, ab, 0);
            let mut pk = peak.map(|p| TokenBucket::new(p, pb, 0));
            let mut now = 0;
            let (mut passed, mut bulks) = (0, 0);
            for i in 0..200_000 {
                // Several frames per instant, as in a poll pass; sizes
                // from 1 byte to over the burst.
                if next() % 4 == 0 {
                    now += next() % 2_000_000;
                }
                let mut len = || match next() % 16 {
                    0 => 20_000,
                    _ => 1 + (next() % 1_600) as u32,
                };
                if i % 3 == 0 {
                    // A batch at once: all or nothing, then one by one.
                    let lens: Vec<u32> = (0..1 + i % 7).map(|_| len()).collect();
                    let sum = lens.iter().map(|l| u64::from(*l)).sum();
                    if m.take_bulk(lens.len() as u32, sum, now) {
                        for l in &lens {
                            let ok = take_eagerly(&mut avg, &mut pk, u64::from(*l) * 8, now);
                            assert!(ok, "batch {i}");
                        }
                        passed += lens.len() as u64;
                        bulks += 1;
                        continue;
                    }
                }
                let len = len();
                let got = m.take(len, now);
                assert_eq!(
                    got,
                    take_eagerly(&mut avg, &mut pk, u64::from(len) * 8, now),
                    "frame {i}"
                );
                passed += u64::from(got);
                if i % 1000 == 0 {
                    assert_eq!(m.wait_ns(64, now), {
                        let a = avg.wait_ns(512, now);
                        a.max(pk.as_mut().map_or(0, |p| p.wait_ns(512, now)))
                    });
                }
            }
            assert!(passed > 1000, "the test exercised both outcomes");
            assert!(bulks > 100, "and batches taken at once");
        }
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
