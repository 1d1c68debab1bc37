//! A port's QoS as its worker applies it: meters for both directions of a
//! net port, a byte budget per visit from its weight, and a disk's limits.
//!
//! Ingress shaping is lossless: a frame that does not conform is given back
//! to the guest's ring (`Vring::unpop`) and the ring is read again when the
//! bucket has refilled. Policing drops and counts. Weights give each port a
//! byte budget per visit of its worker (deficit round robin): under
//! contention ports are served in proportion to their weights, and a port
//! with less to send leaves the rest of the pass to the others.

use super::egress::EgressQueue;
use crate::blk::ReqType;
use crate::qos::{LimitMode, Meter, QosSpec, TokenBucket, DEFAULT_EGRESS_QUEUE, DEFAULT_IO_SIZE};
use crate::stats::{DiskStats, PortStats, QosCounter};
use crate::vring::{Chain, ChainError};

/// Bytes of budget per visit and unit of weight (net ports).
const NET_QUANTUM: i64 = 64 * 1024;
/// Bytes of budget per visit and unit of weight (disks).
const DISK_QUANTUM: i64 = 256 * 1024;
/// How often queued egress frames are retried while the guest posts no RX buffer.
const RX_RETRY_NS: u64 = 1_000_000;
/// Least a frame costs against a weighted port's budget.
const MIN_CHARGE: u32 = 64;
/// Least a disk request is charged against its budget.
const DISK_MIN_COST: i64 = 4096;

/// Time a shaper held traffic back, counted when it lets go.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    since: Option<u64>,
}

impl Throttle {
    /// The shaper holds traffic now.
    #[inline]
    pub fn hold(&mut self, now: u64) {
        self.since.get_or_insert(now);
    }

    /// The shaper let traffic through: returns how long it held it.
    #[inline]
    pub fn release(&mut self, now: u64) -> u64 {
        self.since.take().map_or(0, |s| now.saturating_sub(s))
    }

    pub fn holding(&self) -> bool {
        self.since.is_some()
    }
}

/// Deficit round robin budget of one port or disk: per visit, `weight ×`
/// a byte quantum and `weight ×` a number of items (frames or requests),
/// whichever runs out first. Bytes make the shares fair for large frames
/// and requests, items keep a visit of small frames as short as an
/// unweighted port's batches (times the weight).
#[derive(Debug, Default)]
pub(super) struct Budget {
    quantum: Option<i64>,
    weight: i64,
    deficit: i64,
    items: i64,
}

impl Budget {
    fn new(weight: Option<u32>, unit: i64) -> Self {
        Budget {
            quantum: weight.map(|w| i64::from(w) * unit),
            weight: i64::from(weight.unwrap_or(1)),
            deficit: 0,
            items: 0,
        }
    }

    /// A visit starts: add the quantum (keeping a debt, never a surplus)
    /// and allow `weight × batch` items.
    #[inline]
    pub fn start_visit(&mut self, batch: u16) {
        if let Some(q) = self.quantum {
            self.deficit = self.deficit.min(0) + q;
            self.items = self.weight * i64::from(batch);
        }
    }

    /// Whether the visit may take more.
    #[inline]
    pub fn open(&self) -> bool {
        self.quantum.is_none() || (self.deficit > 0 && self.items > 0)
    }

    /// Whether a weight sets the budget.
    #[inline]
    pub fn weighted(&self) -> bool {
        self.quantum.is_some()
    }

    /// Charge one item of `bytes`.
    #[inline]
    pub fn charge_item(&mut self, bytes: i64) {
        if self.quantum.is_some() {
            self.deficit -= bytes;
            self.items -= 1;
        }
    }

    /// Charge more bytes to the current item.
    #[inline]
    pub fn charge(&mut self, bytes: i64) {
        if self.quantum.is_some() {
            self.deficit -= bytes;
        }
    }

    /// Whether `n` more items fit the visit, `before_last` bytes being
    /// charged before the last of them is taken (each item is taken while
    /// the budget is [`open`](Self::open)).
    #[inline]
    fn fits(&self, n: usize, before_last: i64) -> bool {
        self.quantum.is_none() || (self.items >= n as i64 && self.deficit - before_last > 0)
    }

    /// Charge `n` items of `bytes` in all.
    #[inline]
    fn charge_items(&mut self, n: usize, bytes: i64) {
        if self.quantum.is_some() {
            self.deficit -= bytes;
            self.items -= n as i64;
        }
    }

    /// Charge one item at the least a disk request costs.
    #[inline]
    pub fn charge_min(&mut self) {
        self.charge_item(DISK_MIN_COST);
    }
}

/// What a batch taken from a guest adds up to, for its QoS: summed while
/// the chains are walked.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct BatchSums {
    /// Budget charge of all the chains, and of the last one.
    pub charge: i64,
    pub last: i64,
    /// Well-formed frames and their bytes (no virtio header).
    pub frames: u32,
    pub bytes: u64,
}

impl BatchSums {
    /// Count a chain of `total` bytes (`ok`: well formed).
    #[inline(always)]
    pub fn add(&mut self, total: u32, ok: bool, hdr_len: u32) {
        // Malformed chains cost their visit too.
        self.last = i64::from(total.max(MIN_CHARGE));
        self.charge += self.last;
        if ok {
            self.frames += 1;
            self.bytes += u64::from(total.saturating_sub(hdr_len));
        }
    }
}

/// A net port's QoS.
pub(super) struct NetQos {
    pub ingress: Option<Meter>,
    pub egress: Option<Meter>,
    pub budget: Budget,
    pub ingress_throttle: Throttle,
    /// Frames waiting for egress tokens (egress shaping only).
    pub queue: Option<EgressQueue>,
    pub egress_throttle: Throttle,
    /// The guest had no RX buffer for the oldest queued frame (whose
    /// tokens are already taken).
    pub rx_blocked: bool,
    /// Frames and bytes that passed the egress limit, not yet added to
    /// the port's counters (see [`flush_counters`](Self::flush_counters)).
    egress_passed: (u64, u64),
}

/// What to do with a frame to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Deliver it now.
    Pass,
    /// Over the policer: drop it.
    Drop,
    /// Over the shaper (or behind queued frames): queue it.
    Queue,
}

impl NetQos {
    /// The runtime state of `spec` (None when it sets nothing).
    pub fn new(spec: &QosSpec, now: u64) -> Option<Box<Self>> {
        if spec.ingress.is_none() && spec.egress.is_none() && spec.weight.is_none() {
            return None;
        }
        Some(Box::new(NetQos {
            ingress: spec.ingress.map(|l| Meter::new(&l, now)),
            egress: spec.egress.map(|l| Meter::new(&l, now)),
            budget: Budget::new(spec.weight, NET_QUANTUM),
            ingress_throttle: Throttle::default(),
            queue: Self::queue_for(spec).map(EgressQueue::new),
            egress_throttle: Throttle::default(),
            rx_blocked: false,
            egress_passed: (0, 0),
        }))
    }

    /// The egress queue budget `spec` asks for (None: no egress shaping).
    fn queue_for(spec: &QosSpec) -> Option<u64> {
        spec.egress
            .filter(|l| l.mode == LimitMode::Shape)
            .map(|_| spec.egress_queue.unwrap_or(DEFAULT_EGRESS_QUEUE))
    }

    /// Apply a new spec to `cur`, keeping what the buckets hold.
    pub fn update(cur: &mut Option<Box<Self>>, spec: &QosSpec, now: u64) {
        // Frames queued for the guest are never thrown away by a change:
        // with no limit left they go out at once.
        let queued = cur
            .as_ref()
            .and_then(|q| q.queue.as_ref())
            .is_some_and(|q| !q.is_empty());
        match cur {
            Some(q) if queued || NetQos::new(spec, now).is_some() => {
                q.ingress = match (q.ingress.take(), spec.ingress) {
                    (Some(mut m), Some(l)) => {
                        m.update(&l, now);
                        Some(m)
                    }
                    (_, l) => l.map(|l| Meter::new(&l, now)),
                };
                q.egress = match (q.egress.take(), spec.egress) {
                    (Some(mut m), Some(l)) => {
                        m.update(&l, now);
                        Some(m)
                    }
                    (_, l) => l.map(|l| Meter::new(&l, now)),
                };
                if q.ingress.is_none() {
                    q.ingress_throttle = Throttle::default();
                }
                q.budget = Budget::new(spec.weight, NET_QUANTUM);
                // A queue keeps its frames: a new budget applies once it is
                // empty, and frames queued when shaping stops still go out
                // (at once, there being no more limit).
                match (Self::queue_for(spec), q.queue.as_ref()) {
                    (Some(b), Some(old)) if old.budget() == b || !old.is_empty() => {}
                    (Some(b), _) => q.queue = Some(EgressQueue::new(b)),
                    (None, Some(old)) if !old.is_empty() => {}
                    (None, _) => q.queue = None,
                }
            }
            _ => *cur = NetQos::new(spec, now),
        }
    }

    /// Ingress shaping: whether a frame of `len` bytes may be taken from
    /// the guest now (tokens taken if so). Policers and no limit: true.
    #[inline]
    pub fn shape_ingress(&mut self, len: u32, now: u64, stats: &PortStats) -> bool {
        match self.ingress.as_mut() {
            Some(m) if m.mode() == LimitMode::Shape => {
                if m.take(len, now) {
                    self.release_ingress(now, stats);
                    true
                } else {
                    self.ingress_throttle.hold(now);
                    false
                }
            }
            _ => true,
        }
    }

    /// How many of the frames just taken from the guest's ring (their
    /// chains and walk results) the port's budget and ingress shaper admit,
    /// in order: as many as would have been taken one by one, each while
    /// the budget was open and (if shaped) its tokens were there. Their
    /// budget and tokens are taken; the caller gives the rest back.
    ///
    /// The whole batch is settled at once when it fits (the common case
    /// when no limit binds), frame by frame otherwise.
    pub fn admit_ingress(
        &mut self,
        sums: &BatchSums,
        chains: &[Chain],
        walked: &[Result<(), ChainError>],
        hdr_len: u32,
        now: u64,
        stats: &PortStats,
    ) -> usize {
        let n = chains.len();
        let weighted = self.budget.weighted();
        let shaping = self.shapes_ingress();
        if n == 0 || (!weighted && !shaping) {
            return n;
        }
        if self.budget.fits(n, sums.charge - sums.last)
            && (!shaping
                || self
                    .ingress
                    .as_mut()
                    .is_some_and(|m| m.take_bulk(sums.frames, sums.bytes, now)))
        {
            self.budget.charge_items(n, sums.charge);
            if shaping {
                self.release_ingress(now, stats);
            }
            return n;
        }
        for (k, (c, w)) in chains.iter().zip(walked).enumerate() {
            if !self.budget.open() {
                return k;
            }
            if shaping
                && w.is_ok()
                && !self.shape_ingress(c.total.saturating_sub(hdr_len), now, stats)
            {
                return k;
            }
            self.budget.charge_item(i64::from(c.total.max(MIN_CHARGE)));
        }
        n
    }

    /// The ingress shaper lets frames through: count how long it held them.
    #[inline]
    fn release_ingress(&mut self, now: u64, stats: &PortStats) {
        if self.ingress_throttle.holding() {
            let held = self.ingress_throttle.release(now);
            stats.add_qos(QosCounter::IngressThrottledNs, held);
        }
    }

    /// Whether the ingress limit shapes (holds frames in the guest's ring).
    #[inline]
    pub fn shapes_ingress(&self) -> bool {
        self.ingress
            .as_ref()
            .is_some_and(|m| m.mode() == LimitMode::Shape)
    }

    /// Whether the ingress limit polices (drops what is over).
    #[inline]
    pub fn polices_ingress(&self) -> bool {
        self.ingress
            .as_ref()
            .is_some_and(|m| m.mode() == LimitMode::Police)
    }

    /// Ingress policing of a frame that was taken: whether it passes. The
    /// caller counts what passed (`IngressPackets`, `IngressBytes`) once per
    /// batch.
    #[inline]
    pub fn police_ingress(&mut self, len: u32, now: u64) -> bool {
        match self.ingress.as_mut() {
            Some(m) if m.mode() == LimitMode::Police => m.take(len, now),
            _ => true,
        }
    }

    /// Count a frame that passed the egress limit.
    #[inline]
    fn note_egress(&mut self, len: u32) {
        self.egress_passed.0 += 1;
        self.egress_passed.1 += u64::from(len);
    }

    /// Add what passed the egress limit to the port's counters. The worker
    /// calls it at least once per pass over the port (a per-frame counter
    /// update in shared memory costs more than the meter itself).
    #[inline]
    pub fn flush_counters(&mut self, stats: &PortStats) {
        let (packets, bytes) = std::mem::take(&mut self.egress_passed);
        if packets != 0 {
            stats.add_qos(QosCounter::EgressPackets, packets);
            stats.add_qos(QosCounter::EgressBytes, bytes);
        }
    }

    /// Egress: what to do with a frame of `len` bytes to the guest. Tokens
    /// are taken when it passes.
    #[inline]
    pub fn egress_gate(&mut self, len: u32, now: u64) -> Gate {
        let queued = self.queue.as_ref().is_some_and(|q| !q.is_empty());
        let Some(m) = self.egress.as_mut() else {
            return if queued { Gate::Queue } else { Gate::Pass };
        };
        if !queued && m.take(len, now) {
            self.note_egress(len);
            return Gate::Pass;
        }
        match m.mode() {
            LimitMode::Police => Gate::Drop,
            LimitMode::Shape => Gate::Queue,
        }
    }

    /// Egress: whether the oldest queued frame (`len` bytes) may go now
    /// (tokens taken if so).
    #[inline]
    pub fn release_queued(&mut self, len: u32, now: u64, stats: &PortStats) -> bool {
        let pass = self.egress.as_mut().is_none_or(|m| m.take(len, now));
        if pass {
            self.note_egress(len);
            if self.egress_throttle.holding() {
                let held = self.egress_throttle.release(now);
                stats.add_qos(QosCounter::EgressThrottledNs, held);
            }
        } else {
            self.egress_throttle.hold(now);
        }
        pass
    }

    /// Nanoseconds until queued egress frames may go on (None: nothing queued).
    pub fn egress_wait(&mut self, now: u64) -> Option<u64> {
        let front = self.queue.as_ref()?.front()?;
        if self.rx_blocked {
            // Waiting for the guest to post RX buffers: look again soon.
            return Some(RX_RETRY_NS);
        }
        Some(
            self.egress
                .as_mut()
                .map_or(0, |m| m.wait_ns(front.len, now)),
        )
    }

    /// Nanoseconds until the held ingress may go on (None: not held).
    pub fn ingress_wait(&mut self, now: u64) -> Option<u64> {
        if !self.ingress_throttle.holding() {
            return None;
        }
        // The smallest frame: the ring is read again as soon as anything
        // could conform.
        self.ingress.as_mut().map(|m| m.wait_ns(64, now))
    }
}

/// The buckets of one disk limit kind, in [`DiskQos::buckets`] order.
const READ_IOPS: usize = 0;
const WRITE_IOPS: usize = 1;
const IOPS: usize = 2;
const READ_BPS: usize = 3;
const WRITE_BPS: usize = 4;
const BPS: usize = 5;

/// A disk's QoS.
pub(super) struct DiskQos {
    buckets: [Option<TokenBucket>; 6],
    io_size: u64,
    pub budget: Budget,
    pub throttle: Throttle,
}

impl DiskQos {
    pub fn new(spec: &QosSpec, now: u64) -> Option<Box<Self>> {
        if spec.disk_rates().iter().all(|(_, r)| r.is_none()) && spec.weight.is_none() {
            return None;
        }
        let buckets = spec
            .disk_rates()
            .map(|(_, r)| r.map(|r| TokenBucket::new(r.rate, r.burst.unwrap_or(r.rate), now)));
        Some(Box::new(DiskQos {
            buckets,
            io_size: u64::from(spec.io_size.unwrap_or(DEFAULT_IO_SIZE)),
            budget: Budget::new(spec.weight, DISK_QUANTUM),
            throttle: Throttle::default(),
        }))
    }

    /// Apply a new spec to `cur`, keeping what the buckets hold.
    pub fn update(cur: &mut Option<Box<Self>>, spec: &QosSpec, now: u64) {
        let Some(mut new) = DiskQos::new(spec, now) else {
            *cur = None;
            return;
        };
        if let Some(old) = cur.take() {
            for (n, o) in new.buckets.iter_mut().zip(old.buckets) {
                if let (Some(n), Some(mut o)) = (n.as_mut(), o) {
                    o.set(n.rate(), n.burst(), now);
                    *n = o;
                }
            }
            new.throttle = old.throttle;
        }
        *cur = Some(new);
    }

    /// Whether a request may start now; if so its cost is taken from every
    /// limit it falls under. A request larger than `io_size` counts as
    /// several operations.
    pub fn admit(&mut self, ty: ReqType, bytes: u64, now: u64, stats: &DiskStats) -> bool {
        let ios = bytes.div_ceil(self.io_size).max(1);
        let (iops, bps, data) = match ty {
            ReqType::Read => (READ_IOPS, READ_BPS, bytes),
            ReqType::Write => (WRITE_IOPS, WRITE_BPS, bytes),
            // Discard and write-zeroes move no data: they count as writes.
            ReqType::Discard | ReqType::WriteZeroes => (WRITE_IOPS, WRITE_BPS, 0),
            ReqType::Flush | ReqType::GetId | ReqType::Unsupported(_) => return true,
        };
        let charges = [(iops, ios), (IOPS, ios), (bps, data), (BPS, data)];
        let ok = charges
            .iter()
            .all(|&(b, n)| n == 0 || self.buckets[b].as_mut().is_none_or(|t| t.allows(n, now)));
        if !ok {
            self.throttle.hold(now);
            return false;
        }
        for (b, n) in charges {
            if let Some(t) = self.buckets[b].as_mut() {
                if n > 0 {
                    t.charge(n, now);
                }
            }
        }
        stats.add_throttled(self.throttle.release(now));
        // The minimum was charged when the request was taken.
        self.budget.charge((bytes as i64 - DISK_MIN_COST).max(0));
        true
    }

    /// Nanoseconds until a held disk may go on (None: not held).
    pub fn wait(&mut self, now: u64) -> Option<u64> {
        if !self.throttle.holding() {
            return None;
        }
        self.buckets
            .iter_mut()
            .flatten()
            .map(|b| b.wait_ns(1, now))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qos::{NetLimit, Rate, RateUnit};

    const MS: u64 = 1_000_000;

    #[test]
    fn ingress_shaper_holds_and_counts_the_time() {
        let spec = QosSpec {
            ingress: Some(NetLimit {
                mode: LimitMode::Shape,
                unit: RateUnit::Packets,
                rate: 1000,
                burst: Some(2),
                peak: None,
                peak_burst: None,
            }),
            ..QosSpec::default()
        };
        let stats = PortStats::default();
        let mut q = NetQos::new(&spec, 0).unwrap();
        assert!(q.shape_ingress(100, 0, &stats));
        assert!(q.shape_ingress(100, 0, &stats));
        assert!(!q.shape_ingress(100, 0, &stats));
        assert_eq!(q.ingress_wait(0), Some(MS));
        assert!(q.police_ingress(100, 0), "a shaper never polices");
        assert!(q.shapes_ingress() && !q.polices_ingress());
        assert!(q.shape_ingress(100, MS, &stats));
        assert_eq!(stats.qos(QosCounter::IngressThrottledNs), MS);
        assert_eq!(q.ingress_wait(MS), None);
    }

    #[test]
    fn policer_drops_over_the_rate() {
        let spec = QosSpec {
            ingress: Some(NetLimit {
                mode: LimitMode::Police,
                unit: RateUnit::Packets,
                rate: 1000,
                burst: Some(1),
                peak: None,
                peak_burst: None,
            }),
            ..QosSpec::default()
        };
        let stats = PortStats::default();
        let mut q = NetQos::new(&spec, 0).unwrap();
        assert!(q.shape_ingress(60, 0, &stats), "a policer never holds");
        assert!(q.polices_ingress() && !q.shapes_ingress());
        assert!(q.police_ingress(60, 0));
        assert!(!q.police_ingress(60, 0));
        assert!(q.police_ingress(60, MS));
    }

    /// Frames admitted one by one: while the budget is open and, shaped,
    /// while the tokens are there (what `admit_ingress` must match).
    fn admit_one_by_one(
        q: &mut NetQos,
        frames: &[(u32, bool)],
        now: u64,
        stats: &PortStats,
    ) -> usize {
        for (k, &(total, ok)) in frames.iter().enumerate() {
            if !q.budget.open() {
                return k;
            }
            if ok && q.shapes_ingress() && !q.shape_ingress(total - 12, now, stats) {
                return k;
            }
            q.budget.charge_item(i64::from(total.max(MIN_CHARGE)));
        }
        frames.len()
    }

    #[test]
    fn a_batch_is_admitted_as_frame_by_frame() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let spec = QosSpec {
            ingress: Some(NetLimit {
                mode: LimitMode::Shape,
                unit: RateUnit::Bits,
                rate: 200_000_000,
                burst: Some(200_000),
                peak: None,
                peak_burst: None,
            }),
            weight: Some(2),
            ..QosSpec::default()
        };
        let stats = PortStats::default();
        let mut a = NetQos::new(&spec, 0).unwrap();
        let mut b = NetQos::new(&spec, 0).unwrap();
        let (mut now, mut partial, mut whole) = (0, 0, 0);
        for round in 0..20_000 {
            if round % 8 == 0 {
                a.budget.start_visit(32);
                b.budget.start_visit(32);
                now += next() % 3_000_000;
            }
            let frames: Vec<(u32, bool)> = (0..1 + next() % 32)
                .map(|_| (12 + 60 + (next() % 9000) as u32, next() % 50 != 0))
                .collect();
            let mut chains: Vec<Chain> = Vec::new();
            let mut walked = Vec::new();
            for &(total, ok) in &frames {
                let mut c = Chain::new();
                c.total = total;
                chains.push(c);
                walked.push(if ok { Ok(()) } else { Err(ChainError::TooBig) });
            }
            let mut sums = BatchSums::default();
            for &(total, ok) in &frames {
                sums.add(total, ok, 12);
            }
            let got = a.admit_ingress(&sums, &chains, &walked, 12, now, &stats);
            assert_eq!(
                got,
                admit_one_by_one(&mut b, &frames, now, &stats),
                "round {round}"
            );
            if got == frames.len() {
                whole += 1;
            } else {
                partial += 1;
            }
        }
        assert!(
            whole > 100 && partial > 100,
            "both outcomes ({whole} whole, {partial} cut)"
        );
    }

    #[test]
    fn budgets_follow_weights_and_keep_debts() {
        let mut b = Budget::new(Some(2), NET_QUANTUM);
        b.start_visit(32);
        assert!(b.open());
        b.charge_item(2 * NET_QUANTUM + 100);
        assert!(!b.open());
        b.start_visit(32);
        assert_eq!(b.deficit, 2 * NET_QUANTUM - 100, "the debt is kept");
        b.charge_item(10);
        b.start_visit(32);
        assert_eq!(b.deficit, 2 * NET_QUANTUM, "a surplus is not");
        // Small items: the visit ends after weight x batch of them.
        for _ in 0..64 {
            assert!(b.open());
            b.charge_item(64);
        }
        assert!(!b.open());
        let mut none = Budget::new(None, NET_QUANTUM);
        none.charge_item(1 << 40);
        assert!(none.open());
    }

    #[test]
    fn disk_limits_charge_by_kind_and_size() {
        let spec = QosSpec {
            read_iops: Some(Rate {
                rate: 100,
                burst: Some(10),
            }),
            bps: Some(Rate {
                rate: 1 << 20,
                burst: Some(1 << 20),
            }),
            ..QosSpec::default()
        };
        let stats = DiskStats::default();
        let mut q = DiskQos::new(&spec, 0).unwrap();
        // A 1 MiB read is 8 operations of 128 KiB and the whole byte burst.
        assert!(q.admit(ReqType::Read, 1 << 20, 0, &stats));
        assert!(!q.admit(ReqType::Read, 4096, 0, &stats), "no bytes left");
        assert!(q.admit(ReqType::Flush, 0, 0, &stats), "flushes are free");
        // 10 ms: 1 read operation and 10 KiB come back.
        assert!(q.admit(ReqType::Read, 4096, 10 * MS, &stats));
        assert_eq!(stats.snapshot().throttled_ns, 10 * MS);
        // Writes have no IOPS limit here, only the shared bytes.
        assert!(q.admit(ReqType::Discard, 1 << 30, 10 * MS, &stats));
        assert!(q.wait(10 * MS).is_none());
    }
}
