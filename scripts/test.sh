#!/usr/bin/env bash
# Run vioswitch's whole test suite on a fresh Debian 12 machine:
#   1. install the Debian packages the tests need (QEMU, busybox, DPDK),
#   2. build the QEMU guest image (kernel by `apt-get download`, busybox initramfs),
#   3. build every binary (the tests run the real `vioswitch` daemon),
#   4. run unit, integration and real-QEMU end-to-end tests.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
scripts/guest-kernel.sh
cargo build --workspace --bins
cargo test --workspace "$@"
