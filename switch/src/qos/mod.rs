//! Quality of service: token buckets on an injectable clock, meters built
//! on them, and the per-port policies (`qos.set`).

mod bucket;
mod meter;
mod policy;

pub use bucket::{Clock, ManualClock, MonotonicClock, TokenBucket};
pub use meter::Meter;
pub use policy::{
    LimitMode, NetLimit, QosError, QosSpec, Rate, RateUnit, DEFAULT_EGRESS_QUEUE, DEFAULT_IO_SIZE,
    MAX_WEIGHT,
};
