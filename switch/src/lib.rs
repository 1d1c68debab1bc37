//! vioswitch: a userspace virtual I/O switch.
//!
//! Guests attach their virtio-net ports over vhost-user; a polling dataplane
//! moves frames between them as an L2 learning switch. See the README and
//! `docs/` for the architecture.

pub mod config;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod fdb;
pub mod mem;
pub mod mem_fault;
pub mod port;
pub mod stats;
pub mod vhost_user;
pub mod vring;
