//! vioswitch: a userspace virtual I/O switch.
//!
//! Guests attach their virtio-net ports over vhost-user; a polling dataplane
//! moves frames between them as an L2 learning switch. See the README and
//! `docs/` for the architecture.

pub mod fdb;
pub mod mem;
pub mod vring;
