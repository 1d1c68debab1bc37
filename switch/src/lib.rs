//! vioswitch: a userspace virtual I/O switch.
//!
//! Guests attach their virtio-net ports and virtio-blk disks over
//! vhost-user; a polling dataplane moves frames between the ports as an L2
//! learning switch and serves the disks' requests through an asynchronous
//! I/O engine. See the README and `docs/` for the architecture.

pub mod blk;
pub mod config;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod dataplane;
pub mod disk;
pub mod events;
pub mod fdb;
pub mod identity;
pub mod io_engine;
pub mod mem;
pub mod mem_fault;
pub mod port;
pub mod qos;
pub mod stats;
pub mod vhost_user;
pub mod vring;
