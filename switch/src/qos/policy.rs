//! QoS policies as configured: what `qos.set` takes, what is saved, and
//! their checks.

use serde::{Deserialize, Serialize};

/// What happens to traffic over a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Excess is dropped and counted.
    #[default]
    Police,
    /// Excess waits: from the guest, its ring is not read (lossless); to the
    /// guest, frames queue within the port's budget, then drop.
    Shape,
}

/// What a net rate counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    /// Rates in bits per second, bursts in bytes.
    #[default]
    Bits,
    /// Rates in packets per second, bursts in packets.
    Packets,
}

/// A limit on one direction of a net port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetLimit {
    #[serde(default)]
    pub mode: LimitMode,
    #[serde(default)]
    pub unit: RateUnit,
    /// Average rate (bits/s or packets/s).
    pub rate: u64,
    /// Burst (bytes or packets) [default: 10 ms at `rate`, at least one
    /// largest frame].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Peak rate, at least `rate` (none: bursts go out at line rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<u64>,
    /// Burst at the peak rate [default: one largest frame].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_burst: Option<u64>,
}

/// A rate with its burst (disks: operations or bytes per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate: u64,
    /// [default: one second at `rate`]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// Bounds of the settings.
pub const MAX_WEIGHT: u32 = 1000;
/// Default bytes a shaped port may queue toward its guest.
pub const DEFAULT_EGRESS_QUEUE: u64 = 256 * 1024;
/// Range of the egress queue budget.
pub const EGRESS_QUEUE_RANGE: std::ops::RangeInclusive<u64> = 16 * 1024..=64 * 1024 * 1024;
/// Default bytes one charged disk operation covers: a larger request counts
/// as several operations against the IOPS limits.
pub const DEFAULT_IO_SIZE: u32 = 128 * 1024;
/// Range of `io_size`.
pub const IO_SIZE_RANGE: std::ops::RangeInclusive<u32> = 4096..=16 * 1024 * 1024;

/// Why a QoS setting is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QosError {
    #[error("{0} applies to disks, not to net ports")]
    DiskOnly(&'static str),
    #[error("{0} applies to net ports, not to disks")]
    NetOnly(&'static str),
    #[error("{0}: the rate must be above 0 (clear the limit to lift it)")]
    ZeroRate(&'static str),
    #[error("{0}: the peak rate must be at least the average rate")]
    PeakBelowRate(&'static str),
    #[error("{0}: a burst must be above 0")]
    ZeroBurst(&'static str),
    #[error("weight must be between 1 and {MAX_WEIGHT}, got {0}")]
    BadWeight(u32),
    #[error("egress_queue must be between 16 KiB and 64 MiB, got {0} bytes")]
    BadQueue(u64),
    #[error("io_size must be between 4 KiB and 16 MiB, got {0} bytes")]
    BadIoSize(u32),
}

/// The QoS of a port or disk: what `qos.set` takes and what is saved.
/// Net ports use `ingress` (guest to switch), `egress` (switch to guest),
/// `egress_queue`; disks use the IOPS and bytes/s limits and `io_size`;
/// both use `weight` (share of a contended worker, or of a destination).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<NetLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<NetLimit>,
    /// Bytes a shaped egress may hold for the guest before dropping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_queue: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl QosSpec {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        *self == QosSpec::default()
    }

    /// The disk rates, by name.
    pub fn disk_rates(&self) -> [(&'static str, Option<Rate>); 6] {
        [
            ("read_iops", self.read_iops),
            ("write_iops", self.write_iops),
            ("iops", self.iops),
            ("read_bps", self.read_bps),
            ("write_bps", self.write_bps),
            ("bps", self.bps),
        ]
    }

    /// Check the settings for a disk (`disk`) or a net port.
    pub fn validate(&self, disk: bool) -> Result<(), QosError> {
        if let Some(w) = self.weight {
            if !(1..=MAX_WEIGHT).contains(&w) {
                return Err(QosError::BadWeight(w));
            }
        }
        let net = [("ingress", self.ingress), ("egress", self.egress)];
        if disk {
            if let Some((name, _)) = net.iter().find(|(_, l)| l.is_some()) {
                return Err(QosError::NetOnly(name));
            }
            if self.egress_queue.is_some() {
                return Err(QosError::NetOnly("egress_queue"));
            }
            for (name, r) in self.disk_rates() {
                if let Some(r) = r {
                    if r.rate == 0 {
                        return Err(QosError::ZeroRate(name));
                    }
                    if r.burst == Some(0) {
                        return Err(QosError::ZeroBurst(name));
                    }
                }
            }
            if let Some(s) = self.io_size {
                if !IO_SIZE_RANGE.contains(&s) {
                    return Err(QosError::BadIoSize(s));
                }
            }
            return Ok(());
        }
        if let Some((name, _)) = self.disk_rates().iter().find(|(_, r)| r.is_some()) {
            return Err(QosError::DiskOnly(name));
        }
        if self.io_size.is_some() {
            return Err(QosError::DiskOnly("io_size"));
        }
        for (name, l) in net {
            if let Some(l) = l {
                if l.rate == 0 {
                    return Err(QosError::ZeroRate(name));
                }
                if l.peak.is_some_and(|p| p < l.rate) {
                    return Err(QosError::PeakBelowRate(name));
                }
                if l.burst == Some(0) || l.peak_burst == Some(0) {
                    return Err(QosError::ZeroBurst(name));
                }
            }
        }
        if let Some(q) = self.egress_queue {
            if !EGRESS_QUEUE_RANGE.contains(&q) {
                return Err(QosError::BadQueue(q));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: u64) -> NetLimit {
        NetLimit {
            mode: LimitMode::Shape,
            unit: RateUnit::Bits,
            rate,
            burst: None,
            peak: None,
            peak_burst: None,
        }
    }

    #[test]
    fn checks_by_kind() {
        let net = QosSpec {
            ingress: Some(limit(1_000_000)),
            weight: Some(3),
            ..QosSpec::default()
        };
        assert_eq!(net.validate(false), Ok(()));
        assert_eq!(net.validate(true), Err(QosError::NetOnly("ingress")));
        let disk = QosSpec {
            read_iops: Some(Rate {
                rate: 100,
                burst: None,
            }),
            ..QosSpec::default()
        };
        assert_eq!(disk.validate(true), Ok(()));
        assert_eq!(disk.validate(false), Err(QosError::DiskOnly("read_iops")));
        let bad = [
            (
                QosSpec {
                    weight: Some(0),
                    ..QosSpec::default()
                },
                QosError::BadWeight(0),
            ),
            (
                QosSpec {
                    ingress: Some(limit(0)),
                    ..QosSpec::default()
                },
                QosError::ZeroRate("ingress"),
            ),
            (
                QosSpec {
                    egress: Some(NetLimit {
                        peak: Some(5),
                        ..limit(10)
                    }),
                    ..QosSpec::default()
                },
                QosError::PeakBelowRate("egress"),
            ),
            (
                QosSpec {
                    egress_queue: Some(10),
                    ..QosSpec::default()
                },
                QosError::BadQueue(10),
            ),
        ];
        for (spec, err) in bad {
            assert_eq!(spec.validate(false), Err(err));
        }
        assert!(QosSpec::default().is_empty());
    }

    #[test]
    fn parses_json_with_defaults_and_refuses_unknown_fields() {
        let q: QosSpec =
            serde_json::from_str(r#"{"ingress": {"rate": 1000000, "mode": "shape"}, "weight": 2}"#)
                .unwrap();
        let i = q.ingress.unwrap();
        assert_eq!(
            (i.rate, i.mode, i.unit),
            (1_000_000, LimitMode::Shape, RateUnit::Bits)
        );
        assert!(serde_json::from_str::<QosSpec>(r#"{"ingres": {"rate": 1}}"#).is_err());
        assert!(serde_json::from_str::<QosSpec>(r#"{"ingress": {"rate": 1, "x": 2}}"#).is_err());
    }
}
