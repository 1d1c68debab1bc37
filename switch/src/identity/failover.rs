//! When an identity leaves its port by itself: the health of a port as
//! failover judges it, the standby an identity moves to, and how often the
//! monitor looks.
//!
//! An identity with standby ports fails over when its port's guest
//! disconnects, or when the guest's RX ring has taken nothing for the
//! identity's `stall_ms` while frames came for it. It moves to the first
//! standby, in the order listed, that is healthy; with none, it stays and is
//! retried until one is (or its own port recovers). It never moves back by
//! itself.

use std::time::Duration;

use serde::Serialize;

/// Default `stall_ms` of an identity.
pub const DEFAULT_STALL_MS: u64 = 1000;
/// Shortest `stall_ms` (other than 0, off).
pub const MIN_STALL_MS: u64 = 50;
/// Longest `stall_ms`.
pub const MAX_STALL_MS: u64 = 3_600_000;
/// The monitor looks for stalls this often at least...
const MIN_TICK: Duration = Duration::from_millis(5);
/// ... and at most.
const MAX_TICK: Duration = Duration::from_millis(100);
/// How often a failover that found no healthy standby is tried again.
pub const RETRY_TICK: Duration = Duration::from_millis(10);

/// What made an identity leave its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The port's guest disconnected.
    Disconnected,
    /// The port's guest took no frame into its RX ring for `stall_ms`.
    RxStalled,
}

impl Trigger {
    /// The name in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Disconnected => "disconnected",
            Trigger::RxStalled => "rx_stalled",
        }
    }
}

/// A port's fitness to carry an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// No guest connected.
    Disconnected,
    /// A guest is connected but the port is not on a worker yet.
    NotAttached,
    /// The guest broke its rings; the port is not polled until it resets them.
    Broken,
    /// Frames for the guest have found no RX buffer for the stall time.
    RxStalled,
}

/// What failover reads of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortState {
    pub connected: bool,
    /// On a worker (its rings are served).
    pub attached: bool,
    pub broken: bool,
    /// Switch clock (ms) since when frames for the guest have found no RX
    /// buffer, none delivered since.
    pub rx_stalled_since: Option<u64>,
}

impl PortState {
    /// The port's health at `now_ms` (the switch clock), an RX stall
    /// counting once it has lasted `stall_ms` (0: stalls do not count).
    pub fn health(&self, now_ms: u64, stall_ms: u64) -> Health {
        let stalled = self
            .rx_stalled_since
            .is_some_and(|t| stall_ms > 0 && now_ms.saturating_sub(t) >= stall_ms);
        if !self.connected {
            Health::Disconnected
        } else if !self.attached {
            Health::NotAttached
        } else if self.broken {
            Health::Broken
        } else if stalled {
            Health::RxStalled
        } else {
            Health::Healthy
        }
    }
}

/// The stall time that judges a standby: the identity's own, or the
/// default when its stall detection is off (a standby must not be stalled
/// either way).
pub fn standby_stall_ms(stall_ms: u64) -> u64 {
    if stall_ms == 0 {
        DEFAULT_STALL_MS
    } else {
        stall_ms
    }
}

/// The standby to fail over to: the first of `standby`, in order, that is
/// not `current` and is healthy.
pub fn pick_standby<'a>(
    standby: &'a [String],
    current: &str,
    health: impl Fn(&str) -> Health,
) -> Option<&'a str> {
    standby
        .iter()
        .map(String::as_str)
        .filter(|p| *p != current)
        .find(|p| health(p) == Health::Healthy)
}

/// How often to look for a stall of `stall_ms`: a tenth of it, within
/// 5 ms and 100 ms.
pub fn stall_tick(stall_ms: u64) -> Duration {
    Duration::from_millis(stall_ms / 10).clamp(MIN_TICK, MAX_TICK)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: PortState = PortState {
        connected: true,
        attached: true,
        broken: false,
        rx_stalled_since: None,
    };

    #[test]
    fn health_names_the_first_thing_wrong() {
        assert_eq!(UP.health(5000, 1000), Health::Healthy);
        let down = PortState {
            connected: false,
            attached: false,
            broken: true,
            ..UP
        };
        assert_eq!(down.health(0, 1000), Health::Disconnected);
        let attaching = PortState {
            attached: false,
            ..UP
        };
        assert_eq!(attaching.health(0, 1000), Health::NotAttached);
        let broken = PortState { broken: true, ..UP };
        assert_eq!(broken.health(0, 1000), Health::Broken);
        let stalled = PortState {
            rx_stalled_since: Some(4000),
            ..UP
        };
        assert_eq!(stalled.health(4999, 1000), Health::Healthy);
        assert_eq!(stalled.health(5000, 1000), Health::RxStalled);
        assert_eq!(stalled.health(9000, 0), Health::Healthy, "0: off");
        // A clock read before the stall was noted is no stall.
        assert_eq!(stalled.health(3000, 1000), Health::Healthy);
    }

    #[test]
    fn the_first_healthy_standby_in_order_that_is_not_the_current_port() {
        let standby: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let health = |p: &str| match p {
            "b" => Health::Disconnected,
            _ => Health::Healthy,
        };
        assert_eq!(pick_standby(&standby, "a", health), Some("c"));
        assert_eq!(pick_standby(&standby, "x", health), Some("a"));
        assert_eq!(pick_standby(&standby, "a", |_| Health::Broken), None);
        assert_eq!(pick_standby(&[], "a", health), None);
        assert_eq!(pick_standby(&standby[..1], "a", health), None);
    }

    #[test]
    fn ticks_and_standby_stall_times() {
        assert_eq!(stall_tick(1000), Duration::from_millis(100));
        assert_eq!(stall_tick(200), Duration::from_millis(20));
        assert_eq!(stall_tick(50), Duration::from_millis(5));
        assert_eq!(stall_tick(MAX_STALL_MS), Duration::from_millis(100));
        assert_eq!(standby_stall_ms(0), DEFAULT_STALL_MS);
        assert_eq!(standby_stall_ms(200), 200);
    }
}
