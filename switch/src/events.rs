//! Events for subscribed control clients: ports added, removed, connected,
//! disconnected and broken, and the configuration saved.
//!
//! Emitting never blocks: each subscriber has a bounded queue, and a
//! subscriber that does not keep up loses events (and is told how many).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde_json::{json, Value};

/// Events queued per subscriber before it starts losing them.
const QUEUE: usize = 1024;

/// One subscription.
pub struct Subscription {
    pub events: Receiver<Value>,
    lost: Arc<AtomicU64>,
}

impl Subscription {
    /// Events dropped because the subscriber was slow, since the last call.
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }
}

struct Subscriber {
    tx: Sender<Value>,
    lost: Arc<AtomicU64>,
}

/// Fans events out to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl EventBus {
    /// Subscribe to every later event.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = bounded(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        self.lock().push(Subscriber {
            tx,
            lost: lost.clone(),
        });
        Subscription { events: rx, lost }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send an event, e.g. `emit("port.connected", json!({"port": "vm1"}))`.
    pub fn emit(&self, event: &str, mut fields: Value) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        if !fields.is_object() {
            fields = json!({});
        }
        fields["event"] = json!(event);
        fields["time"] = json!(time);
        log::debug!("event {fields}");
        self.lock().retain(|s| match s.tx.try_send(fields.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                s.lost.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_and_slow_ones_lose_some() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        bus.emit("port.added", json!({"port": "vm1"}));
        let e = a.events.try_recv().unwrap();
        assert_eq!(e["event"], "port.added");
        assert_eq!(e["port"], "vm1");
        for _ in 0..QUEUE + 5 {
            bus.emit("x", json!({}));
        }
        assert_eq!(a.take_lost(), 5);
        drop(a);
        bus.emit("y", json!({}));
        assert!(bus.lock().is_empty(), "gone subscribers are forgotten");
    }
}
