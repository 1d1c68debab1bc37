//! Network identities: a MAC and a set of IP addresses (optionally in a
//! VLAN) that the switch binds to a port, enforces on it (port security),
//! translates for a guest whose own addresses differ (identity mapping), and
//! moves to another port, by command or by itself when a guest fails.
//!
//! - [`addr`]: MACs and IP mappings as the control plane reads and writes
//!   them, and what makes an address a host's own;
//! - [`policy`]: what the dataplane enforces on one port, computed from the
//!   identities bound to it and the port's own options;
//! - [`frame`]: the per-frame work on a frame's headers: source checks and
//!   the rewrites of identity mapping, with their checksum fix-ups;
//! - [`announce`]: the frames that announce an identity where it now lives;
//! - [`registry`]: identities, their bindings, the rules they keep, and each
//!   port's policy;
//! - [`failover`]: when an identity leaves its port by itself, and for
//!   which standby.
//!
//! The switch applies bindings, moves and failovers (`daemon::identity`).

pub mod addr;
pub mod announce;
pub mod failover;
pub mod frame;
pub mod policy;
pub mod registry;
