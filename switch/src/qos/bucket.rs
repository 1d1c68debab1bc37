//! Token buckets on an injectable clock, in exact integer arithmetic.
//!
//! A bucket holds up to `burst` tokens and gains `rate` tokens a second. The
//! level is kept in token-nanoseconds (tokens × 10⁹), so a refill after `dt`
//! nanoseconds adds exactly `rate × dt` and nothing is lost to rounding: over
//! any window a bucket lets through at most `rate × window + burst` tokens,
//! to the token.
//!
//! Time comes from the caller (`now`, in nanoseconds of any monotonic
//! clock: a worker passes the time of its poll pass, a test whatever it
//! likes; see [`Clock`]).

use std::time::Instant;

const NS: i128 = 1_000_000_000;

/// A source of monotonic time in nanoseconds.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

/// Nanoseconds since a fixed instant.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    epoch: Instant,
}

impl MonotonicClock {
    pub fn new(epoch: Instant) -> Self {
        MonotonicClock { epoch }
    }
}

impl Clock for MonotonicClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A token bucket.
///
/// The level is `tokens × 10⁹ + frac` token-nanoseconds: whole tokens in an
/// `i64`, so that taking and checking (per frame) is plain integer work,
/// and the fraction (`0 ≤ frac < 10⁹`) kept exactly across refills, which
/// happen at most once per distinct `now`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: u64,
    /// Most tokens held.
    burst: u64,
    /// Whole tokens; negative after a charge larger than what was held.
    tokens: i64,
    /// Token-nanoseconds short of the next whole token.
    frac: i128,
    /// When the level was last brought up to date.
    last: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: u64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: Self::clamp(burst),
            frac: 0,
            last: now,
        }
    }

    fn clamp(n: u64) -> i64 {
        i64::try_from(n).unwrap_or(i64::MAX)
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Change rate and burst, keeping the tokens held (up to the new burst).
    pub fn set(&mut self, rate: u64, burst: u64, now: u64) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst;
        self.cap();
    }

    #[inline]
    fn full(&self) -> bool {
        self.tokens >= Self::clamp(self.burst)
    }

    #[inline]
    fn cap(&mut self) {
        if self.full() {
            self.tokens = Self::clamp(self.burst);
            self.frac = 0;
        }
    }

    /// Bring the level up to `now` (at most once per distinct `now`).
    #[inline]
    pub fn refill(&mut self, now: u64) {
        if now > self.last {
            if !self.full() {
                let dt = now - self.last;
                // In u64 when it fits (a pass's few microseconds at any
                // rate do), else in i128: the same exact arithmetic.
                let (whole, frac) = match self
                    .rate
                    .checked_mul(dt)
                    .and_then(|x| x.checked_add(self.frac as u64))
                {
                    Some(acc) => (
                        i64::try_from(acc / NS as u64).unwrap_or(i64::MAX),
                        i128::from(acc % NS as u64),
                    ),
                    None => {
                        let acc = self.frac + i128::from(self.rate) * i128::from(dt);
                        (i64::try_from(acc / NS).unwrap_or(i64::MAX), acc % NS)
                    }
                };
                self.frac = frac;
                self.tokens = self.tokens.saturating_add(whole);
                self.cap();
            }
            self.last = now;
        }
    }

    /// Whole tokens held now (0 when in debt).
    pub fn tokens(&mut self, now: u64) -> u64 {
        self.refill(now);
        self.tokens.max(0) as u64
    }

    /// Whole tokens held when the level was last brought up to date
    /// (negative in debt): what may be taken at that instant.
    #[inline]
    pub fn held(&self) -> i64 {
        self.tokens
    }

    /// Whether `n` tokens may be taken now: the bucket holds them, or it
    /// is full and `n` is more than it can ever hold (such a request goes
    /// through at full bucket and leaves a debt, rather than never).
    #[inline]
    pub fn allows(&mut self, n: u64, now: u64) -> bool {
        self.refill(now);
        self.tokens >= Self::clamp(n) || (n > self.burst && self.full())
    }

    /// Take `n` tokens if [`allows`](Self::allows) says so.
    #[inline]
    pub fn take(&mut self, n: u64, now: u64) -> bool {
        if self.allows(n, now) {
            self.tokens = self.tokens.saturating_sub(Self::clamp(n));
            true
        } else {
            false
        }
    }

    /// Take `n` tokens right after [`allows`](Self::allows) said yes at the
    /// same `now` (no refill to redo).
    #[inline]
    pub fn debit(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(Self::clamp(n));
    }

    /// Take `n` tokens whatever the level (it may go into debt).
    #[inline]
    pub fn charge(&mut self, n: u64, now: u64) {
        self.refill(now);
        self.tokens = self.tokens.saturating_sub(Self::clamp(n));
    }

    /// Nanoseconds from `now` until `n` tokens are allowed (0: now;
    /// `u64::MAX`: never, the rate is 0).
    pub fn wait_ns(&mut self, n: u64, now: u64) -> u64 {
        if self.allows(n, now) {
            return 0;
        }
        if self.rate == 0 {
            return u64::MAX;
        }
        // An oversized request waits for a full bucket.
        let target = i128::from(n.min(self.burst));
        let missing = (target - i128::from(self.tokens)) * NS - self.frac;
        let rate = i128::from(self.rate);
        u64::try_from((missing + rate - 1) / rate).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn starts_full_and_refills_exactly() {
        // 1000 tokens/s, burst 100.
        let mut b = TokenBucket::new(1000, 100, 0);
        assert!(b.take(100, 0));
        assert!(!b.take(1, 0));
        // 1 ms = exactly one token.
        assert!(!b.allows(2, MS));
        assert!(b.take(1, MS));
        assert!(!b.take(1, MS));
        // 0.999 ms short of a token, then exactly there.
        assert!(!b.take(1, 2 * MS - 1));
        assert!(b.take(1, 2 * MS));
        // Never above the burst, however long the pause.
        assert_eq!(b.tokens(100 * S), 100);
    }

    #[test]
    fn fractional_rates_accumulate_without_loss() {
        // 3 tokens per second: one every 333,333,333.33 ns (a burst of 2,
        // so that the cap never clips what accumulates between polls).
        let mut b = TokenBucket::new(3, 2, 0);
        assert!(b.take(2, 0));
        let mut taken = 0;
        let mut now = 0;
        // Step in odd increments for 10 s: exactly 30 tokens become available.
        while now < 10 * S {
            now += 7_777_777;
            now = now.min(10 * S);
            while b.take(1, now) {
                taken += 1;
            }
        }
        assert_eq!(taken, 30);
    }

    #[test]
    fn never_more_than_rate_times_window_plus_burst() {
        // 1 Mbyte/s, burst 10 000; 1500-byte takes, polled every 100 µs.
        let (rate, burst) = (1_000_000u64, 10_000u64);
        let mut b = TokenBucket::new(rate, burst, 0);
        let mut passed = 0u64;
        let mut now = 0;
        while now <= S {
            while b.take(1500, now) {
                passed += 1500;
            }
            now += 100_000;
        }
        assert!(passed <= rate + burst, "{passed}");
        assert!(passed > rate + burst - 1500, "{passed}");
    }

    #[test]
    fn oversized_requests_pass_at_full_bucket_and_leave_a_debt() {
        let mut b = TokenBucket::new(1000, 100, 0);
        assert!(
            b.take(250, 0),
            "more than the burst passes on a full bucket"
        );
        assert_eq!(b.tokens(0), 0);
        // 150 tokens of debt: 150 ms to reach zero, 250 ms to be full again.
        assert!(!b.allows(1, 150 * MS));
        assert!(b.allows(1, 151 * MS));
        assert!(!b.allows(250, 249 * MS));
        assert!(b.allows(250, 250 * MS));
    }

    #[test]
    fn charges_go_into_debt_and_wait_says_how_long() {
        let mut b = TokenBucket::new(1000, 10, 0);
        b.charge(30, 0);
        assert_eq!(b.tokens(0), 0);
        assert_eq!(b.wait_ns(1, 0), 21 * MS);
        assert!(!b.allows(1, 21 * MS - 1));
        assert!(b.allows(1, 21 * MS));
        assert_eq!(b.wait_ns(1, 21 * MS), 0);
        let mut z = TokenBucket::new(0, 5, 0);
        assert!(z.take(5, 0));
        assert_eq!(z.wait_ns(1, 0), u64::MAX);
    }

    #[test]
    fn set_keeps_what_is_held_up_to_the_new_burst() {
        let mut b = TokenBucket::new(1000, 100, 0);
        assert!(b.take(40, 0));
        b.set(10, 50, 0);
        assert_eq!(b.tokens(0), 50);
        b.set(10, 1000, 0);
        assert_eq!(b.tokens(0), 50);
        assert_eq!(b.tokens(S), 60);
    }

    #[test]
    fn refills_past_u64_are_as_exact_as_small_ones() {
        // 400 Gbit/s over 100 s: rate × dt overflows u64, so the refill
        // takes the i128 path; in 1 ms steps it never does.
        let burst = u64::MAX / 4;
        let mut big = TokenBucket::new(400_000_000_000, burst, 0);
        let mut small = big.clone();
        big.charge(burst, 0);
        small.charge(burst, 0);
        assert_eq!(
            big.tokens(100 * S + 7),
            small_steps(&mut small, 100 * S + 7)
        );
        assert_eq!(big.tokens(100 * S + 7), 400_000_000_000 * 100 + 2800);
    }

    fn small_steps(b: &mut TokenBucket, until: u64) -> u64 {
        let mut t = 0;
        while t < until {
            t = (t + MS).min(until);
            b.tokens(t);
        }
        b.tokens(until)
    }

    #[test]
    fn manual_clock_drives_a_bucket() {
        let clock = ManualClock::default();
        let mut b = TokenBucket::new(100, 1, clock.now_ns());
        assert!(b.take(1, clock.now_ns()));
        assert!(!b.take(1, clock.now_ns()));
        clock.advance(10 * MS);
        assert!(b.take(1, clock.now_ns()));
    }
}
