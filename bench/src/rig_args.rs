//! Command-line options the switch benchmarks share: where the switch and
//! the generator run, which switch binary, how often a busy line is run
//! again, and where the JSON goes. Included by `qos_bench` and
//! `ident_bench` (`#[path]`, flattened into their `Args`).

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct RigArgs {
    /// Runs of a line again while others took 5% of the CPU or more.
    #[arg(long, default_value_t = 2)]
    pub retries: usize,
    /// Core of vioswitch.
    #[arg(long, default_value_t = 1)]
    pub dut_core: usize,
    /// Core of the generator (this process).
    #[arg(long, default_value_t = 0)]
    pub gen_core: usize,
    /// The vioswitch binary [default: <workspace>/target/release/vioswitch].
    #[arg(long)]
    pub vioswitch: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl RigArgs {
    /// The vioswitch binary: the one given, else
    /// `<workspace>/target/release/vioswitch` (or under `CARGO_TARGET_DIR`).
    pub fn vioswitch(&self) -> PathBuf {
        self.vioswitch.clone().unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(
                    || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
                    PathBuf::from,
                )
                .join("release/vioswitch")
        })
    }
}
