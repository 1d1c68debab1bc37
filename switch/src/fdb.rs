//! The forwarding database: which port a MAC address (in a VLAN) was last
//! seen on.
//!
//! Every worker learns and looks up concurrently, so the table takes no lock:
//! it is a fixed array of slots probed linearly from the key's hash, each slot
//! a pair of atomics. A slot's `key` is written once when the slot is claimed
//! and only changes when a free slot is reclaimed for another key; its `val`
//! carries the port and the time the address was last seen, and is changed
//! with compare-and-swap so that a concurrent reclaim and refresh cannot mix
//! one key with another's port.
//!
//! Invariants:
//! - a slot whose `val` names [`NO_PORT`] is free and may be reclaimed;
//!   [`RESERVED`] marks a slot being reclaimed, which lookups treat as a miss;
//! - two slots may briefly hold the same key (two workers learning it at the
//!   same instant); lookups and learning both use the first in probe order,
//!   so the other is never refreshed and ages out;
//! - a reader that found its key reads the value, then the key again: a slot
//!   is rekeyed only through [`RESERVED`], so a value read between two
//!   matching key reads belongs to that key (and a CAS on it fails if the
//!   slot is reclaimed afterwards, since reclaiming changes the value).
//!
//! Time is milliseconds from an origin the caller chooses (the daemon's start),
//! passed in so the tests drive it.

use std::sync::atomic::{AtomicU64, Ordering};

/// A port number in the FDB: the port's dense index.
pub type PortIdx = u16;
/// `val` port field of a free slot.
pub const NO_PORT: PortIdx = u16::MAX;
const RESERVED: u64 = u64::MAX;
const KEY_VALID: u64 = 1 << 63;
const TS_MASK: u64 = (1 << 47) - 1;
const STATIC: u64 = 1 << 47;
/// How far a key may sit from its hash slot.
const MAX_PROBE: usize = 32;
/// A learnt entry is rewritten at most this often when nothing changes, so
/// that a busy flow does not keep its slot's cache line bouncing.
const REFRESH_MS: u64 = 1000;

/// Default ageing time.
pub const DEFAULT_AGEING_MS: u64 = 300_000;

struct Slot {
    key: AtomicU64,
    val: AtomicU64,
}

/// `val` of a slot never used: free (port [`NO_PORT`]).
const NEVER_USED: u64 = (NO_PORT as u64) << 48;

impl Default for Slot {
    fn default() -> Self {
        Slot {
            key: AtomicU64::new(0),
            val: AtomicU64::new(NEVER_USED),
        }
    }
}

/// One entry, as listed by [`Fdb::entries`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub vlan: u16,
    pub port: PortIdx,
    /// Milliseconds since the entry was last refreshed.
    pub age_ms: u64,
    pub is_static: bool,
}

/// Outcome of [`Fdb::learn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Known, nothing to write.
    Fresh,
    /// Added or updated (new port or refreshed time).
    Updated,
    /// The address moved from another port.
    Moved(PortIdx),
    /// A static entry names another port: not overridden.
    Static,
    /// No free slot near the key's hash.
    Full,
}

/// The lock-free forwarding database.
pub struct Fdb {
    slots: Box<[Slot]>,
    mask: usize,
    ageing_ms: AtomicU64,
}

#[inline]
fn mac_u64(mac: &[u8; 6]) -> u64 {
    u64::from(mac[0]) << 40
        | u64::from(mac[1]) << 32
        | u64::from(mac[2]) << 24
        | u64::from(mac[3]) << 16
        | u64::from(mac[4]) << 8
        | u64::from(mac[5])
}

#[inline]
fn make_key(mac: &[u8; 6], vlan: u16) -> u64 {
    KEY_VALID | u64::from(vlan & 0xfff) << 48 | mac_u64(mac)
}

#[inline]
fn make_val(port: PortIdx, now_ms: u64, is_static: bool) -> u64 {
    u64::from(port) << 48 | if is_static { STATIC } else { 0 } | (now_ms & TS_MASK)
}

#[inline]
fn val_port(val: u64) -> PortIdx {
    (val >> 48) as PortIdx
}

#[inline]
fn val_ts(val: u64) -> u64 {
    val & TS_MASK
}

#[inline]
fn is_live(val: u64) -> bool {
    val != RESERVED && val_port(val) != NO_PORT
}

impl Fdb {
    /// A table of at least `capacity` slots (rounded up to a power of two).
    pub fn new(capacity: usize, ageing_ms: u64) -> Self {
        let n = capacity.max(MAX_PROBE).next_power_of_two();
        let slots: Box<[Slot]> = (0..n).map(|_| Slot::default()).collect();
        Fdb {
            slots,
            mask: n - 1,
            ageing_ms: AtomicU64::new(ageing_ms),
        }
    }

    /// The ageing time.
    pub fn ageing_ms(&self) -> u64 {
        self.ageing_ms.load(Ordering::Relaxed)
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 29) as usize & self.mask
    }

    #[inline]
    fn expired(&self, val: u64, now_ms: u64) -> bool {
        val & STATIC == 0 && now_ms.saturating_sub(val_ts(val)) > self.ageing_ms()
    }

    /// The port `mac` was last seen on in `vlan`, if known and not aged out.
    #[inline]
    pub fn lookup(&self, mac: &[u8; 6], vlan: u16, now_ms: u64) -> Option<PortIdx> {
        let key = make_key(mac, vlan);
        let home = self.home(key);
        for i in 0..MAX_PROBE {
            let slot = &self.slots[(home + i) & self.mask];
            let k = slot.key.load(Ordering::Acquire);
            if k == 0 {
                return None;
            }
            if k == key {
                let v = slot.val.load(Ordering::Acquire);
                // The slot may have been reclaimed for another key between
                // the two loads: then `v` is not ours.
                if slot.key.load(Ordering::Acquire) != key {
                    return None;
                }
                if is_live(v) && !self.expired(v, now_ms) {
                    return Some(val_port(v));
                }
                return None;
            }
        }
        None
    }

    /// Record that `mac` was seen on `port` in `vlan`.
    ///
    /// Called for every frame: the common case, an address known in its
    /// home slot on the same port and refreshed lately (or static there),
    /// is settled here with two loads, as [`insert`](Self::insert) would
    /// settle it.
    #[inline]
    pub fn learn(&self, mac: &[u8; 6], vlan: u16, port: PortIdx, now_ms: u64) -> Learn {
        let key = make_key(mac, vlan);
        let slot = &self.slots[self.home(key)];
        if slot.key.load(Ordering::Acquire) == key {
            let v = slot.val.load(Ordering::Acquire);
            if v != RESERVED
                && val_port(v) == port
                && (v & STATIC != 0 || now_ms.saturating_sub(val_ts(v)) < REFRESH_MS)
                && slot.key.load(Ordering::Acquire) == key
            {
                return Learn::Fresh;
            }
        }
        self.insert(key, port, now_ms, false)
    }

    /// Add a static entry (never ages, not moved by learning).
    pub fn add_static(&self, mac: &[u8; 6], vlan: u16, port: PortIdx) -> Learn {
        self.insert(make_key(mac, vlan), port, 0, true)
    }

    fn insert(&self, key: u64, port: PortIdx, now_ms: u64, is_static: bool) -> Learn {
        let home = self.home(key);
        let new_val = make_val(port, now_ms, is_static);
        // First pass: the key's existing slot, if any.
        let mut free: Option<usize> = None;
        for i in 0..MAX_PROBE {
            let idx = (home + i) & self.mask;
            let slot = &self.slots[idx];
            let k = slot.key.load(Ordering::Acquire);
            if k == 0 {
                free.get_or_insert(idx);
                break;
            }
            if k != key {
                let v = slot.val.load(Ordering::Relaxed);
                if free.is_none() && v != RESERVED && val_port(v) == NO_PORT {
                    free = Some(idx);
                }
                continue;
            }
            let v = slot.val.load(Ordering::Acquire);
            if v == RESERVED || slot.key.load(Ordering::Acquire) != key {
                // Being (or just) reclaimed for another key: `v` is not ours.
                // Learning again from the next frame is enough.
                return Learn::Fresh;
            }
            if v & STATIC != 0 && !is_static {
                return if val_port(v) == port {
                    Learn::Fresh
                } else {
                    Learn::Static
                };
            }
            let old_port = val_port(v);
            if !is_static && old_port == port && now_ms.saturating_sub(val_ts(v)) < REFRESH_MS {
                return Learn::Fresh;
            }
            return match slot
                .val
                .compare_exchange(v, new_val, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) if old_port != port && old_port != NO_PORT => Learn::Moved(old_port),
                _ => Learn::Updated,
            };
        }
        // Second pass: claim a slot for a new key.
        let Some(start) = free else {
            return Learn::Full;
        };
        let start_i = start.wrapping_sub(home) & self.mask;
        for i in start_i..MAX_PROBE {
            let idx = (home + i) & self.mask;
            let slot = &self.slots[idx];
            let k = slot.key.load(Ordering::Acquire);
            if k == 0 {
                match slot
                    .key
                    .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        // Fails only if another learner reclaimed the slot in
                        // between (it saw a free value): then its key wins and
                        // this address is learnt again from its next frame.
                        let _ = slot.val.compare_exchange(
                            NEVER_USED,
                            new_val,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        );
                        return Learn::Updated;
                    }
                    Err(now) if now == key => {
                        // Another worker claimed it for the same key.
                        let v = slot.val.load(Ordering::Acquire);
                        let _ = slot.val.compare_exchange(
                            v,
                            new_val,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        );
                        return Learn::Updated;
                    }
                    Err(_) => continue,
                }
            }
            let v = slot.val.load(Ordering::Acquire);
            if v == RESERVED || val_port(v) != NO_PORT {
                continue;
            }
            // A free slot of another key: reserve it, rekey it, fill it.
            if slot
                .val
                .compare_exchange(v, RESERVED, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            slot.key.store(key, Ordering::Release);
            slot.val.store(new_val, Ordering::Release);
            return Learn::Updated;
        }
        Learn::Full
    }

    /// Remove the entry of `mac` in `vlan`, static or not. Returns whether one was live.
    pub fn remove(&self, mac: &[u8; 6], vlan: u16) -> bool {
        let key = make_key(mac, vlan);
        let home = self.home(key);
        let mut found = false;
        for i in 0..MAX_PROBE {
            let slot = &self.slots[(home + i) & self.mask];
            let k = slot.key.load(Ordering::Acquire);
            if k == 0 {
                break;
            }
            if k == key {
                found |= self.free_slot(slot, |_| true);
            }
        }
        found
    }

    /// Free the slot if its value is live and `pred` holds. Returns whether it did.
    fn free_slot(&self, slot: &Slot, pred: impl Fn(u64) -> bool) -> bool {
        loop {
            let v = slot.val.load(Ordering::Acquire);
            if !is_live(v) || !pred(v) {
                return false;
            }
            let freed = make_val(NO_PORT, val_ts(v), false);
            if slot
                .val
                .compare_exchange(v, freed, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Forget every entry (static ones too, if `statics`) that names `port`.
    pub fn flush_port(&self, port: PortIdx, statics: bool) -> usize {
        self.slots
            .iter()
            .filter(|s| self.free_slot(s, |v| val_port(v) == port && (statics || v & STATIC == 0)))
            .count()
    }

    /// Forget every learnt entry (and static ones too, if `statics`).
    pub fn flush(&self, statics: bool) -> usize {
        self.slots
            .iter()
            .filter(|s| self.free_slot(s, |v| statics || v & STATIC == 0))
            .count()
    }

    /// Free the entries that aged out. Returns how many.
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| self.free_slot(s, |v| self.expired(v, now_ms)))
            .count()
    }

    /// The live entries.
    pub fn entries(&self, now_ms: u64) -> Vec<FdbEntry> {
        let mut out = Vec::new();
        for s in self.slots.iter() {
            let k = s.key.load(Ordering::Acquire);
            let v = s.val.load(Ordering::Acquire);
            if k == 0 || !is_live(v) || self.expired(v, now_ms) {
                continue;
            }
            let m = k & 0xffff_ffff_ffff;
            let b = m.to_be_bytes();
            out.push(FdbEntry {
                mac: [b[2], b[3], b[4], b[5], b[6], b[7]],
                vlan: ((k >> 48) & 0xfff) as u16,
                port: val_port(v),
                age_ms: if v & STATIC != 0 {
                    0
                } else {
                    now_ms.saturating_sub(val_ts(v))
                },
                is_static: v & STATIC != 0,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> [u8; 6] {
        let b = n.to_be_bytes();
        [0x52, 0x54, b[0], b[1], b[2], b[3]]
    }

    #[test]
    fn learns_moves_and_ages() {
        let fdb = Fdb::new(1024, 300_000);
        assert_eq!(fdb.lookup(&mac(1), 0, 0), None);
        assert_eq!(fdb.learn(&mac(1), 0, 3, 0), Learn::Updated);
        assert_eq!(fdb.learn(&mac(1), 0, 3, 10), Learn::Fresh);
        assert_eq!(fdb.lookup(&mac(1), 0, 10), Some(3));
        assert_eq!(fdb.lookup(&mac(1), 7, 10), None, "VLANs are separate");
        assert_eq!(fdb.learn(&mac(1), 0, 4, 20), Learn::Moved(3));
        assert_eq!(fdb.lookup(&mac(1), 0, 20), Some(4));
        // Refreshed at most once a second, and ages 300 s after the last refresh.
        assert_eq!(fdb.learn(&mac(1), 0, 4, 1500), Learn::Updated);
        assert_eq!(fdb.lookup(&mac(1), 0, 301_500), Some(4));
        assert_eq!(fdb.lookup(&mac(1), 0, 301_501), None);
        assert_eq!(fdb.sweep(301_000), 0);
        assert_eq!(fdb.sweep(301_501), 1);
        assert!(fdb.entries(0).is_empty());
        // The freed slot is reused by the same or another key.
        assert_eq!(fdb.learn(&mac(1), 0, 5, 400_000), Learn::Updated);
        assert_eq!(fdb.lookup(&mac(1), 0, 400_000), Some(5));
    }

    #[test]
    fn static_entries_win_and_never_age() {
        let fdb = Fdb::new(64, 1000);
        fdb.add_static(&mac(9), 0, 1);
        assert_eq!(fdb.learn(&mac(9), 0, 2, 5), Learn::Static);
        assert_eq!(fdb.lookup(&mac(9), 0, 1 << 40), Some(1));
        assert_eq!(fdb.flush(false), 0);
        assert_eq!(fdb.flush_port(1, false), 0);
        assert_eq!(fdb.flush_port(1, true), 1);
        assert_eq!(fdb.lookup(&mac(9), 0, 0), None);
    }

    #[test]
    fn flush_port_forgets_only_that_port() {
        let fdb = Fdb::new(4096, 300_000);
        for i in 0..100 {
            fdb.learn(&mac(i), 0, (i % 4) as PortIdx, 0);
        }
        assert_eq!(fdb.flush_port(2, false), 25);
        for i in 0..100 {
            let want = if i % 4 == 2 {
                None
            } else {
                Some((i % 4) as PortIdx)
            };
            assert_eq!(fdb.lookup(&mac(i), 0, 0), want);
        }
        assert_eq!(fdb.entries(0).len(), 75);
        assert!(fdb.remove(&mac(1), 0));
        assert!(!fdb.remove(&mac(1), 0));
    }

    #[test]
    fn full_table_reports_full_and_keeps_working() {
        let fdb = Fdb::new(32, 300_000);
        let mut full = 0;
        for i in 0..200 {
            if fdb.learn(&mac(i), 0, 1, 0) == Learn::Full {
                full += 1;
            }
        }
        assert!(full >= 200 - 32);
        assert_eq!(fdb.entries(0).len(), 200 - full);
        fdb.flush(true);
        assert_eq!(fdb.learn(&mac(1000), 0, 1, 0), Learn::Updated);
        assert_eq!(fdb.lookup(&mac(1000), 0, 0), Some(1));
    }

    #[test]
    fn concurrent_learners_agree() {
        let fdb = std::sync::Arc::new(Fdb::new(1 << 12, 300_000));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let fdb = fdb.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        for i in 0..500 {
                            fdb.learn(&mac(i), 0, (i % 7) as PortIdx, round * 2000 + t);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 0..500 {
            assert_eq!(fdb.lookup(&mac(i), 0, 100_000), Some((i % 7) as PortIdx));
        }
    }
}
