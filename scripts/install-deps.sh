#!/usr/bin/env bash
# Install the Debian packages that vioswitch's tests need: QEMU and the
# guest-image tools (scripts/guest-kernel.sh), qemu-storage-daemon (the
# reference vhost-user-blk backend of the disk tests), and DPDK (vhost PMD,
# for interoperability tests). Idempotent: packages already installed are not
# touched, and `apt-get update` runs (once) only if something is missing.
#
# Usage: scripts/install-deps.sh [EXTRA-PACKAGE...]
set -euo pipefail

packages=(
    # real-QEMU end-to-end tests
    qemu-system-x86
    # qemu-storage-daemon: vhost-user-blk export of a disk image
    qemu-system-common
    # guest image: busybox initramfs (its applets do the guest's jobs: ping,
    # nc, dd, sha256sum, mke2fs, mount ...), kernel extraction
    busybox-static
    cpio
    gzip
    xz-utils
    zstd
    util-linux # flock
    e2fsprogs # chattr: control_disk makes a backing file immutable
    # DPDK vhost-user PMD (testpmd) for interoperability tests
    dpdk
    dpdk-dev
    librte-net-vhost23
)
packages+=("$@")

missing=()
for p in "${packages[@]}"; do
    # dpkg -s succeeds for removed-but-configured packages too: check Status.
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-deps: missing ${missing[*]}, and not root and no sudo" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
