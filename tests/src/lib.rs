//! vioswitch's test kit: a vhost-user guest driver of the project's own, a
//! harness that runs the daemon, and QEMU guest helpers. Used by the
//! integration and end-to-end tests and by the benchmark's traffic generator.

pub mod frames;
pub mod guest;
pub mod packets;
pub mod qemu;
pub mod switch;

use std::path::PathBuf;

/// Create a fresh, empty directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
