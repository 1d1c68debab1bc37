#!/usr/bin/env bash
# Run the disk benchmark: vioswitch's virtio-blk disks vs qemu-storage-daemon
# (vhost-user-blk export), both measured by libblkio's virtio-blk-vhost-user
# driver (the blkio crate, built into blk_bench: no system library).
#
# Usage: bench/blk_run.sh [blk_bench options]
#   default options: --duration 10 --warmup 2 --repeat 3
#   e.g. bench/blk_run.sh --targets qsd-threads,qsd-io_uring,qsd-null
#        bench/blk_run.sh --jobs randread-4k-qd1 --repeat 5 --json /tmp/blk.json
#
# Installs qemu-storage-daemon (Debian package qemu-system-common) if it is
# missing, builds vioswitch and blk_bench in release mode, prints the machine
# and the command, then the result tables (markdown). The server is pinned to
# core 1, the client to core 0 (--server-core/--client-core): keep the machine
# otherwise idle while it runs; the tables say how much CPU other processes
# took.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "blk_run.sh: qemu-storage-daemon missing, and not root and no sudo" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    echo "blk_run.sh: installing qemu-system-common (qemu-storage-daemon)" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends qemu-system-common
fi

cargo build --release -p vioswitch -p vioswitch-bench --bin vioswitch --bin blk_bench >&2

if [ "$#" -eq 0 ]; then
    set -- --duration 10 --warmup 2 --repeat 3
fi

dirty=""
if git status --porcelain switch bench 2>/dev/null | grep -q .; then
    dirty=" (switch/ or bench/ has uncommitted changes)"
fi
fence='```'
cat <<EOF
## Machine

$fence
date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')
kernel:  $(uname -srm), $(nproc) cores
load:    $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)
commit:  $(git rev-parse --short HEAD 2>/dev/null || echo '?')$dirty
qsd:     $(qemu-storage-daemon --version | head -n 1)
$(lscpu | grep -E '^(Model name|Thread|Core)')
$fence

## Command

$fence
bench/blk_run.sh $*
target/release/blk_bench $*
$fence
EOF
exec target/release/blk_bench "$@"
