//! A fixed-size log-linear latency histogram (allocation-free recording).
//!
//! Values below 2^[`SUB_BITS`] ns are exact; above, each power of two is
//! split into 2^[`SUB_BITS`] equal buckets, so a reported percentile is the
//! lower bound of its bucket and at most 1/64 (1.6 %) below the true value.

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Latency samples in nanoseconds.
#[derive(Clone)]
pub struct Hist {
    counts: Box<[u64; BUCKETS]>,
    n: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: Box::new([0; BUCKETS]),
            n: 0,
            max: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = msb - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((shift as u64 + 1) * SUB + sub) as usize
}

fn lower_bound(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = b / SUB - 1;
    let sub = b % SUB;
    (SUB + sub) << shift
}

impl Hist {
    /// Record one sample.
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.n += 1;
        self.max = self.max.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The `p`-th percentile (0..=100) in ns, or None without samples.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(lower_bound(b).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut prev = 0;
        for v in (0..100_000u64).chain([1 << 40, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= prev);
            prev = b;
            let lo = lower_bound(b);
            assert!(lo <= v, "{v} {lo}");
            assert!(v - lo <= v / SUB, "{v} {lo}");
        }
        assert!(bucket(u64::MAX) < BUCKETS);
    }

    #[test]
    fn percentiles() {
        let mut h = Hist::default();
        assert_eq!(h.percentile(50.0), None);
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.percentile(50.0).unwrap();
        assert!((490..=500).contains(&p50), "{p50}");
        let p99 = h.percentile(99.0).unwrap();
        assert!((975..=990).contains(&p99), "{p99}");
        let p100 = h.percentile(100.0).unwrap();
        assert!((984..=1000).contains(&p100), "{p100}");
        assert_eq!(h.count(), 1000);
    }
}
