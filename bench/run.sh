#!/usr/bin/env bash
# Run the vioswitch benchmark: vioswitch vs DPDK testpmd (vhost PMD, io
# forwarding) under the same generator, plus the generator into a sink.
#
# Usage: bench/run.sh [vioswitch-bench options]
#   default options: --ports 2 --sizes 64,1518 --duration 10 --repeat 3
#   e.g. bench/run.sh --sizes 64 --duration 5 --repeat 5
#        bench/run.sh --perf-dir /tmp/prof --only vioswitch
#
# Installs the DPDK packages if missing (apt-get, as root or through sudo),
# builds vioswitch and the benchmark in release mode, prints the machine and
# then the result tables (markdown). The benchmark pins the device under test
# to core 1 and the generator to core 0 (--dut-core/--gen-core): keep the
# machine otherwise idle while it runs.
set -euo pipefail

cd "$(dirname "$0")/.."

packages=(dpdk dpdk-dev librte-net-vhost23)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "run.sh: missing ${missing[*]}, and not root and no sudo" >&2
        exit 1
    fi
    echo "run.sh: installing ${missing[*]}" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

cargo build --release -p vioswitch -p vioswitch-bench >&2

if [ "$#" -eq 0 ]; then
    set -- --ports 2 --sizes 64,1518 --duration 10 --repeat 3
fi

echo "## Machine"
echo
echo '```'
echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "nproc:   $(nproc)"
echo "kernel:  $(uname -srm)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain switch bench 2>/dev/null | grep -q . && echo ' (switch/ or bench/ has uncommitted changes)')"
echo "testpmd: $(dpkg-query -W -f='dpdk ${Version}' dpdk 2>/dev/null || echo '?')"
lscpu | head -n 15
echo '```'
echo
echo "## Command"
echo
echo '```'
echo "bench/run.sh $*"
echo "target/release/vioswitch-bench $*"
echo '```'
exec target/release/vioswitch-bench "$@"
