#!/usr/bin/env bash
# Build the guest image of the real-QEMU end-to-end tests:
#
#   DIR/vmlinux             uncompressed Debian 12 kernel (QEMU boots it via PVH)
#   DIR/initramfs.cpio.gz   busybox initramfs whose /init loads the virtio
#                           (and ext2) modules, configures eth0 from the
#                           kernel command line, runs one job and powers off
#   DIR/kernel-version      e.g. 6.1.0-56-amd64
#   DIR/modules/            the modules the guest loads, and their load order
#   DIR/stamp               sha256 of this script when the image was built
#
# DIR is the first argument, else $VIOSWITCH_GUEST_DIR, else target/guest.
# Cached: a rerun with everything present and this script unchanged does
# nothing. The kernel package is fetched with `apt-get download` and unpacked
# with `dpkg-deb -x` (nothing is installed into /boot); set
# VIOSWITCH_GUEST_KERNEL_PKG to pin a package.
#
# Guest command line (read from /proc/cmdline by /init):
#   vio.job=NAME       boot | ping | ping-loop | ping-watch | tcp-send |
#                      tcp-recv | serve | standby | driver-reload | mq-send |
#                      blk-sum | blk-write | blk-fs
#   vio.ip=A.B.C.D/N   address of eth0 (no network set up without it)
#   vio.peer=A.B.C.D   the other guest
#   vio.mtu=N          MTU of eth0
#   vio.count=N        ping, driver-reload, mq-send: echo requests (per phase,
#                      per CPU); ping-loop: replies wanted per round
#   vio.min=N          ping, driver-reload, mq-send: replies needed for ok
#                      (default: count)
#   vio.interval=S     ping, ping-watch: seconds between requests (default 0.2)
#   vio.silence=S      ping-watch: stop once the peer, having answered, has
#                      been silent S seconds (default 3; 0: never)
#   vio.duration=S     ping-watch: stop after S seconds (default 300);
#                      serve, standby: power off after S seconds (default:
#                      serve until killed)
#   vio.arp_ignore=N   net.ipv4.conf.all.arp_ignore, set before eth0 gets its
#                      address (standby: default 8, no ARP replies)
#   vio.wait=S         ping, driver-reload, mq-send: seconds to wait for the
#                      peer's first reply; tcp-send, mq-send: seconds to keep
#                      trying to connect;
#                      tcp-recv: seconds to wait for the transfer (default 120)
#   vio.deadline=S     ping-loop: seconds allowed per round (default 120)
#   vio.rounds=N       ping-loop: rounds; between two rounds the job waits for
#                      the peer to stop answering (for kill-and-restart tests)
#   vio.reloads=N      driver-reload: unload/load cycles (default 1)
#   vio.queues=N       mq-send: TX and RX queues eth0 must have (default 1)
#   vio.bytes=N        tcp-send, mq-send: payload size (default 1048576);
#                      tcp-recv: expected size (ok only if it matches);
#                      blk-sum: bytes to hash from the start of the disk
#                      (default: the whole disk); blk-write: bytes to write
#                      (default 1048576); blk-fs: size of the test file
#                      (default 1048576)
#   vio.disk=NAME      blk-*: the disk, a name in /dev (default vda)
#   vio.offset=N       blk-write: byte offset on the disk (default 0)
#   vio.pattern=P      blk-write, blk-fs: random (default; /dev/urandom) or
#                      seq (the tcp-send payload "1\n2\n3\n...", cut at
#                      vio.bytes)
#   vio.port=N         TCP port (default 5001)
#   vio.linger=S       after the result, stay up S seconds (answering pings)
#                      before powering off; default 0
#   vio.then=reboot    after the result (and linger), reboot instead of
#                      powering off: the job runs again on every boot
#                      (QEMU without -no-reboot; the test stops it). A job
#                      may ask for one reboot itself (blk-fs after writing)
#   vio.timeout=S      watchdog: fail and power off after S seconds
#                      (default 600; serve, standby: none)
#
# Serial console markers (one line each):
#   VIOTEST-BOOT <uptime>              /init started
#   VIOTEST-READY ip=...               network configured (or no network)
#   VIOTEST-PROGRESS <what>            job progress (ping-loop rounds, ...)
#   VIOTEST-PROGRESS reply seq=N       ping-watch: a reply (" dup" appended
#                                      for a duplicate)
#   VIOTEST-PROGRESS arp ip=A mac=M    ping-watch: the peer's ARP entry is
#                                      now M ("none": absent or incomplete)
#   VIOTEST-PROGRESS standby active .. standby: the first echo request for
#                                      its address came; ARP replies on
#   VIOTEST-RESULT: ok <k=v ...>       the job succeeded
#   VIOTEST-RESULT: fail <why>         the job failed
#   VIOTEST-DIAG eth0 ...              before a failure: eth0's counters, ARP
#   VIOTEST-DIAG vda ...               before a failure: each virtio disk's
#                                      size and I/O counters
#   VIOTEST-REBOOT                     the guest reboots (vio.then=reboot, or
#                                      the job asked for it)
#   VIO-BLK-SUM <sha256>               blk-sum: sha256 of the bytes read
#   VIO-BLK-WRITTEN <sha256>           blk-write: sha256 of the bytes written
#                                      (and read back) at vio.offset
#   VIO-FS-WRITTEN <sha256>            blk-fs, first boot: the test file was
#                                      written, the fs unmounted; reboots
#   VIO-FS-READ <sha256>               blk-fs, next boot: the test file read
#                                      back; powers off
#
# The identity jobs (a guest pings an address that the switch moves from
# one guest to another):
#   ping-watch ping vio.peer every vio.interval seconds; print each reply and
#              each change of the peer's ARP entry; stop once the peer,
#              having answered, is silent vio.silence seconds (or after
#              vio.duration). Result: sent=, replies=, first_seq=, last_seq=,
#              lost= (requests missing between the first and the last reply),
#              max_gap=, gaps= (the missing sequence ranges, or none), dups=,
#              macs= (every MAC the peer's complete ARP entry held, in
#              order), mac_changes=, arp_gone= (times the entry went absent
#              or incomplete), ended=silence|duration.
#   standby    hold vio.ip without claiming it: eth0 gets the address with
#              ARP replies off (arp_ignore=8), and sends nothing from it;
#              once the first echo request for the address arrives (the
#              switch moved the identity here), turn ARP replies on and
#              serve as `serve` does. Another guest may hold the same address
#              meanwhile.
#
# The disk jobs (on /dev/vda, or vio.disk; no network needed, no vio.ip):
#   blk-sum    sha256 of the first vio.bytes bytes of the disk.
#   blk-write  write vio.bytes bytes (vio.pattern) at vio.offset of the disk
#              with fsync, read them back past the page cache, and report
#              the sha256 (the host compares that range of its backing file).
#   blk-fs     if the disk holds no ext2 filesystem with the test file:
#              mke2fs (when it does not mount), mount, write the file
#              (vio.bytes of vio.pattern) and its sha256, umount, print
#              VIO-FS-WRITTEN and reboot (QEMU must run without -no-reboot);
#              else mount, check the file against the stored sha256, print
#              VIO-FS-READ and power off. The test compares the two sums.
set -euo pipefail

script=$(readlink -f "${BASH_SOURCE[0]}")
here=$(dirname "$script")
root=$(dirname "$here")
dir=${1:-${VIOSWITCH_GUEST_DIR:-$root/target/guest}}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

log() { echo "guest-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

self_sum=$(sha256sum "$script" | cut -d' ' -f1)
is_current() {
    [ -s "$dir/vmlinux" ] && [ -s "$dir/initramfs.cpio.gz" ] &&
        [ "$(cat "$dir/stamp" 2>/dev/null)" = "$self_sum" ]
}
if is_current; then
    exit 0
fi

# Tools this script needs; install them if missing (and allowed to).
need_install=0
for c in apt-get dpkg-deb cpio gzip xz zstd flock od /bin/busybox; do
    command -v "$c" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    log "installing missing tools"
    "$here/install-deps.sh"
fi

# One builder at a time (test binaries may run concurrently).
exec 9>"$dir/.lock"
flock 9
if is_current; then
    exit 0
fi

work="$dir/work"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------- kernel ----

pick_kernel_pkg() {
    apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
        grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1
}

apt_update() {
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -q >&2
    else
        sudo apt-get update -q >&2
    fi
}

download() { # PACKAGE -> $work/PACKAGE_*.deb
    local apt_opts=()
    [ "$(id -u)" -eq 0 ] && apt_opts=(-o APT::Sandbox::User=root)
    (cd "$work" && apt-get download -q "${apt_opts[@]}" "$1" >&2)
}

# Extract the uncompressed ELF vmlinux from a bzImage, the same idea as the
# kernel's scripts/extract-vmlinux: the setup header says where the
# compressed payload is (setup_sects at 0x1f1, payload_offset at 0x248,
# payload_length at 0x24c); the payload's magic says how it is compressed;
# its last 4 bytes are the uncompressed size. Falls back to scanning for
# compression magics if the header does not help.
u32_at() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
u8_at() { od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }

decompress_at() { # FILE OFFSET [LENGTH] -> stdout
    local f=$1 off=$2 len=${3:-}
    local magic
    magic=$(od -An -t x1 -j "$off" -N 6 "$f" | tr -d ' \n')
    local cut
    if [ -n "$len" ]; then
        cut=(head -c "$len")
    else
        cut=(cat)
    fi
    # The decompressors complain about the bytes after the stream (the size
    # word, the rest of the bzImage): ignore their status, check the output.
    case $magic in
    fd377a585a00*) tail -c +"$((off + 1))" "$f" | "${cut[@]}" | xz -dc --single-stream 2>/dev/null || true ;;
    28b52ffd*) tail -c +"$((off + 1))" "$f" | "${cut[@]}" | zstd -dcq 2>/dev/null || true ;;
    1f8b08*) tail -c +"$((off + 1))" "$f" | "${cut[@]}" | gzip -dc 2>/dev/null || true ;;
    *) return 1 ;;
    esac
}

is_elf() { [ "$(od -An -t x1 -N 4 "$1" 2>/dev/null | tr -d ' \n')" = 7f454c46 ]; }

extract_vmlinux() { # VMLINUZ OUT
    local in=$1 out=$2
    if [ "$(od -An -c -j 0x202 -N 4 "$in" | tr -d ' ')" = HdrS ]; then
        local setup_sects payload_offset payload_length start size
        setup_sects=$(u8_at "$in" $((0x1f1)))
        [ "$setup_sects" = 0 ] && setup_sects=4
        payload_offset=$(u32_at "$in" $((0x248)))
        payload_length=$(u32_at "$in" $((0x24c)))
        start=$(((setup_sects + 1) * 512 + payload_offset))
        size=$(u32_at "$in" $((start + payload_length - 4)))
        if decompress_at "$in" "$start" "$payload_length" >"$out" && is_elf "$out" &&
            [ "$(stat -c %s "$out")" = "$size" ]; then
            log "vmlinux: payload at $start ($payload_length bytes) -> $size bytes"
            return 0
        fi
        log "setup header did not lead to the payload; scanning for magics"
    fi
    local off
    for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00|\x28\xb5\x2f\xfd|\x1f\x8b\x08' "$in" | cut -d: -f1); do
        if decompress_at "$in" "$off" >"$out" && is_elf "$out"; then
            log "vmlinux: compressed payload found at $off by its magic"
            return 0
        fi
    done
    return 1
}

# The modules the guest needs (their dependencies are added), in load order.
# ext2 filesystems are mounted by ext4 (Debian: CONFIG_EXT4_USE_FOR_EXT2=y,
# no ext2 driver), which depends on jbd2, mbcache and crc16, and whose mount
# fails without a crc32c driver ("Cannot load crc32c driver", even for ext2
# without checksums): crc32c_generic, as TCG's CPU may lack SSE4.2.
mods="virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net virtio_blk crc32c_generic ext4"

if [ -s "$dir/vmlinux" ] && [ -s "$dir/kernel-version" ] &&
    [ "$(cat "$dir/modules/wanted" 2>/dev/null)" = "$mods" ]; then
    kver=$(cat "$dir/kernel-version")
    log "kernel $kver already extracted"
else
    pkg=${VIOSWITCH_GUEST_KERNEL_PKG:-$(pick_kernel_pkg)}
    if [ -z "$pkg" ]; then
        log "no linux-image-6.1.0-*-amd64 in the package lists: apt-get update"
        apt_update
        pkg=$(pick_kernel_pkg)
    fi
    [ -n "$pkg" ] || die "no linux-image-6.1.0-*-amd64 package found"
    log "downloading $pkg"
    if ! download "$pkg"; then
        # Stale lists name a version the archive no longer has.
        log "download failed: apt-get update and retry"
        apt_update
        [ -n "${VIOSWITCH_GUEST_KERNEL_PKG:-}" ] || pkg=$(pick_kernel_pkg)
        download "$pkg" || die "cannot download $pkg"
    fi
    kver=${pkg#linux-image-}
    deb=$(ls "$work"/"${pkg}"_*.deb | head -n 1)
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$work/pkg"
    rm -f "$deb"
    vmlinuz="$work/pkg/boot/vmlinuz-$kver"
    [ -f "$vmlinuz" ] || die "$vmlinuz missing from $pkg"
    extract_vmlinux "$vmlinuz" "$work/vmlinux" || die "cannot extract vmlinux from $vmlinuz"

    # Each module after what it depends on, as the modules' .modinfo says.
    mdir="$work/pkg/lib/modules/$kver"
    rm -rf "$work/modules"
    mkdir -p "$work/modules"
    order=()
    add_module() { # NAME [CHAIN]: extract NAME after its dependencies
        local m=$1 chain="${2:-} $1" f deps d
        case " ${order[*]} " in *" $m "* | *" =$m "*) return 0 ;; esac
        case " ${2:-} " in *" $m "*) die "module dependency cycle:$chain" ;; esac
        f=$(find "$mdir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
        if [ -z "$f" ]; then
            if grep -qE "/$m\.ko" "$mdir/modules.builtin" 2>/dev/null; then
                log "$m is built in"
                order+=("=$m")
                return 0
            fi
            die "module $m neither in the package nor built in"
        fi
        case $f in
        *.ko.xz) xz -dc "$f" >"$work/modules/$m.ko" ;;
        *.ko.zst) zstd -dcq "$f" >"$work/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$work/modules/$m.ko" ;;
        *) cp "$f" "$work/modules/$m.ko" ;;
        esac
        deps=$(tr '\0' '\n' <"$work/modules/$m.ko" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
        for d in $deps; do
            add_module "$d" "$chain"
        done
        order+=("$m")
    }
    for m in $mods; do
        add_module "$m"
    done
    order=("${order[@]/=*/}")
    printf '%s\n' "${order[@]}" | grep -v '^$' >"$work/modules/order"
    echo "$mods" >"$work/modules/wanted"

    rm -rf "$dir/modules"
    mv "$work/modules" "$dir/modules"
    mv "$work/vmlinux" "$dir/vmlinux"
    echo "$kver" >"$dir/kernel-version"
    rm -rf "$work/pkg"
fi

# ------------------------------------------------------------- initramfs ----

ird="$work/initramfs"
mkdir -p "$ird"/{bin,dev,proc,sys,tmp,run,etc,mnt,jobs,lib/modules}
cp /bin/busybox "$ird/bin/busybox"
ln -s busybox "$ird/bin/sh"
cp "$dir"/modules/*.ko "$dir/modules/order" "$ird/lib/modules/"

cat >"$ird/init" <<'EOF'
#!/bin/sh
# vioswitch test guest: load the virtio modules, configure eth0 from the
# kernel command line, run one job, print its result, power off.
export PATH=/bin
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo "VIOTEST-BOOT $(cut -d' ' -f1 /proc/uptime)"
. /lib/vio.sh

# vio.KEY=VALUE on the command line -> $VIO_KEY ('-' and '.' become '_').
for w in $(cat /proc/cmdline); do
    case $w in
    vio.*=*)
        k=$(echo "${w%%=*}" | cut -c5- | tr -c 'a-zA-Z0-9_\n' '_')
        v=${w#*=}
        eval "VIO_$k=\$v"
        ;;
    esac
done

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "VIOTEST-WARN insmod $m failed"
done

job=${VIO_job:-boot}
if [ ! -f "/jobs/$job" ]; then
    result fail "unknown job $job"
    finish
fi

timeout=${VIO_timeout:-600}
case $job in serve | standby) timeout=${VIO_timeout:-0} ;; esac
[ "$job" = standby ] && VIO_arp_ignore=${VIO_arp_ignore:-8}
if [ "$timeout" -gt 0 ] 2>/dev/null; then
    (sleep "$timeout"; echo "VIOTEST-RESULT: fail timeout after ${timeout}s in job $job"; poweroff -f) &
    WATCHDOG=$!
fi

if net_setup; then
    ( . "/jobs/$job" )
    [ -f /tmp/result ] || result fail "job $job ended without a result"
fi
finish
EOF
chmod 755 "$ird/init"

cat >"$ird/lib/vio.sh" <<'EOF'
# Helpers shared by /init and the jobs.

now() { cut -d. -f1 /proc/uptime; }

# diag: one line on what eth0 saw, and one per virtio disk, for failure
# messages.
diag() {
    local d=/sys/class/net/eth0 s="" b
    for b in /sys/block/vd*; do
        [ -e "$b" ] || continue
        echo "VIOTEST-DIAG ${b##*/} size=$(($(cat $b/size) * 512)) ro=$(cat $b/ro) stat=[$(echo $(cat $b/stat))]"
    done
    if [ ! -e $d ]; then
        echo "VIOTEST-DIAG no eth0"
        return 0
    fi
    for c in tx_packets rx_packets tx_dropped rx_dropped rx_errors; do
        s="$s $c=$(cat $d/statistics/$c)"
    done
    echo "VIOTEST-DIAG eth0 operstate=$(cat $d/operstate) carrier=$(cat $d/carrier 2>/dev/null)$s neigh=[$(ip neigh show dev eth0 | tr '\n' ';')]"
}

# result ok|fail DETAILS...: print the result marker (once).
result() {
    [ -f /tmp/result ] && return 0
    : >/tmp/result
    [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
    [ "$1" = fail ] && diag
    echo "VIOTEST-RESULT: $*"
}

finish() {
    if [ -n "$VIO_linger" ] && [ "$VIO_linger" -gt 0 ] 2>/dev/null; then
        sleep "$VIO_linger"
    fi
    sync
    # A job asks for a reboot by creating /tmp/reboot (it runs in a subshell).
    if [ "$VIO_then" = reboot ] || [ -f /tmp/reboot ]; then
        echo "VIOTEST-REBOOT"
        reboot -f
    else
        poweroff -f
    fi
    while :; do sleep 1; done
}

net_setup() {
    ip link set lo up
    if [ -z "$VIO_ip" ]; then
        echo "VIOTEST-READY no-network eth0=$([ -e /sys/class/net/eth0 ] && echo yes || echo no)"
        return 0
    fi
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            result fail "no eth0 after 10s"
            return 1
        fi
        sleep 0.1
    done
    [ -n "$VIO_mtu" ] && ip link set eth0 mtu "$VIO_mtu"
    # Before the address exists: no ARP reply may claim it meanwhile.
    [ -n "$VIO_arp_ignore" ] && echo "$VIO_arp_ignore" >/proc/sys/net/ipv4/conf/all/arp_ignore
    if ! ip addr add "$VIO_ip" dev eth0 || ! ip link set eth0 up; then
        result fail "cannot configure eth0 with $VIO_ip"
        return 1
    fi
    echo "VIOTEST-READY ip=$VIO_ip mac=$(cat /sys/class/net/eth0/address) uptime=$(cut -d' ' -f1 /proc/uptime)"
}

need_peer() {
    if [ -z "$VIO_peer" ]; then
        result fail "vio.peer not set"
        return 1
    fi
}

# ping_once: one echo request, 1 s to answer.
ping_once() { ping -c 1 -W 1 "$VIO_peer" >/dev/null 2>&1; }

# wait_peer SECONDS: until the peer answers once.
wait_peer() {
    local end=$(($(now) + $1))
    while [ "$(now)" -lt "$end" ]; do
        ping_once && return 0
    done
    return 1
}

# ping_phase N MIN WAIT [CMD...]: wait up to WAIT seconds for the peer's first
# reply, then send it N echo requests (with CMD before ping, e.g. taskset).
# Sets PH_GOT (replies) and PH_INFO (k=v words, or why it failed); succeeds
# with at least MIN replies.
ping_phase() {
    local n=$1 min=$2 wait=$3 t0 t1 out rtt
    shift 3
    PH_GOT=0
    t0=$(now)
    if ! wait_peer "$wait"; then
        PH_INFO="peer $VIO_peer did not answer within ${wait}s"
        return 1
    fi
    t1=$(now)
    out=$("$@" ping -c "$n" -i "${VIO_interval:-0.2}" -W 5 "$VIO_peer" 2>&1)
    PH_GOT=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    rtt=$(echo "$out" | sed -n 's/.*min\/avg\/max = \([^ ]*\).*/\1/p')
    PH_GOT=${PH_GOT:-0}
    if [ "$PH_GOT" -ge "$min" ]; then
        PH_INFO="replies=$PH_GOT sent=$n rtt=$rtt first_reply_after=$((t1 - t0))s"
        return 0
    fi
    PH_INFO="replies=$PH_GOT sent=$n min=$min: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
    return 1
}

# payload N: N deterministic bytes ("1\n2\n3\n..." cut at N).
payload() { seq 1 $(($1 / 2 + 1)) | head -c "$1"; }

sum_of() { sha256sum "$1" | cut -d' ' -f1; }

# is_num WORD: a non-negative decimal integer.
is_num() {
    case $1 in
    '' | *[!0-9]*) return 1 ;;
    esac
}

# need_disk: wait (10 s) for the disk vio.disk (default vda); sets DISK to
# its /dev path and DISK_SIZE to its size in bytes.
need_disk() {
    local name=${VIO_disk:-vda} i=0
    DISK=/dev/$name
    while [ ! -b "$DISK" ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            result fail "no $DISK after 10s (disks: $(ls /sys/block | tr '\n' ' '))"
            return 1
        fi
        sleep 0.1
    done
    DISK_SIZE=$(blockdev --getsize64 "$DISK")
}

# pattern N FILE: N bytes of vio.pattern (random or seq) into FILE.
pattern() {
    case ${VIO_pattern:-random} in
    random) head -c "$1" /dev/urandom >"$2" ;;
    seq) payload "$1" >"$2" ;;
    *) return 1 ;;
    esac
    [ "$(wc -c <"$2")" = "$1" ]
}

# read_sum DEV OFFSET N: sha256 of N bytes of DEV at OFFSET (the caller
# checks that they are within DEV; fails on a read error).
read_sum() {
    (
        set -o pipefail
        dd if="$1" bs=65536 skip="$2" count="$3" iflag=skip_bytes,count_bytes status=none |
            sha256sum | cut -d' ' -f1
    )
}
EOF

cat >"$ird/jobs/boot" <<'EOF'
# boot: report that the guest came up (and what it sees).
result ok "uptime=$(cut -d' ' -f1 /proc/uptime) modules=$(wc -l </proc/modules) eth0=$([ -e /sys/class/net/eth0 ] && echo yes || echo no)"
EOF

cat >"$ird/jobs/serve" <<'EOF'
# serve: answer pings until killed (or vio.duration seconds).
echo "VIOTEST-SERVING"
if [ -n "$VIO_duration" ]; then
    sleep "$VIO_duration"
    result ok "served ${VIO_duration}s"
else
    while :; do sleep 3600; done
fi
EOF

cat >"$ird/jobs/ping" <<'EOF'
# ping: wait until the peer answers, then ping it vio.count times.
need_peer || exit 0
n=${VIO_count:-5}
min=${VIO_min:-$n}
wait=${VIO_wait:-120}
t0=$(now)
if ! wait_peer "$wait"; then
    result fail "peer $VIO_peer did not answer within ${wait}s"
    exit 0
fi
t1=$(now)
out=$(ping -c "$n" -i "${VIO_interval:-0.2}" -W 5 "$VIO_peer" 2>&1)
got=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
rtt=$(echo "$out" | sed -n 's/.*min\/avg\/max = \([^ ]*\).*/\1/p')
got=${got:-0}
if [ "$got" -ge "$min" ]; then
    result ok "replies=$got sent=$n rtt=$rtt first_reply_after=$((t1 - t0))s"
else
    result fail "replies=$got sent=$n min=$min: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
fi
EOF

cat >"$ird/jobs/ping-loop" <<'EOF'
# ping-loop: ping the peer until it answered vio.count times (per round) or
# vio.deadline seconds passed. With vio.rounds=N>1, after each round but the
# last, wait for the peer to stop answering (3 misses in a row), then start
# the next round: for tests that kill and restart the peer.
need_peer || exit 0
k=${VIO_count:-3}
deadline=${VIO_deadline:-120}
rounds=${VIO_rounds:-1}
round=1
total=0
attempts=0
while :; do
    got=0
    end=$(($(now) + deadline))
    while [ "$got" -lt "$k" ]; do
        if [ "$(now)" -ge "$end" ]; then
            result fail "round $round: $got/$k replies from $VIO_peer within ${deadline}s"
            exit 0
        fi
        attempts=$((attempts + 1))
        if ping_once; then
            got=$((got + 1))
            sleep 0.2
        fi
    done
    total=$((total + got))
    [ "$round" -ge "$rounds" ] && break
    echo "VIOTEST-PROGRESS round=$round ok replies=$got"
    misses=0
    end=$(($(now) + deadline))
    while [ "$misses" -lt 3 ]; do
        if [ "$(now)" -ge "$end" ]; then
            result fail "round $round: peer $VIO_peer kept answering for ${deadline}s"
            exit 0
        fi
        if ping_once; then misses=0; sleep 0.5; else misses=$((misses + 1)); fi
    done
    echo "VIOTEST-PROGRESS round=$round peer-down"
    round=$((round + 1))
done
result ok "rounds=$rounds replies=$total attempts=$attempts"
EOF

cat >"$ird/jobs/ping-watch" <<'EOF'
# ping-watch: ping the peer every vio.interval seconds, print one line per
# reply and one per change of the peer's ARP entry, and stop once the peer,
# having answered, stays silent vio.silence seconds (or after vio.duration
# seconds). The result counts the requests lost between the first and the
# last reply (the gaps in the replies' sequence numbers) and lists the MACs
# the peer's ARP entry held: for tests that move the peer's address to
# another guest while this one pings it.
need_peer || exit 0
iv=${VIO_interval:-0.2}
silence=${VIO_silence:-3}
duration=${VIO_duration:-300}
: >/tmp/pw.seqs
: >/tmp/pw.dups
: >/tmp/pw.stats
mkfifo /tmp/pw.fifo
# The reader: one line per reply, the time of the last one in /tmp/pw.last.
(
    while read -r line; do
        case $line in
        *" bytes from "*seq=*)
            s=${line#*seq=}
            s=${s%% *}
            case $line in
            *DUP*)
                echo "$s" >>/tmp/pw.dups
                echo "VIOTEST-PROGRESS reply seq=$s dup"
                ;;
            *)
                echo "$s" >>/tmp/pw.seqs
                read -r up _ </proc/uptime
                echo "${up%.*}" >/tmp/pw.last
                echo "VIOTEST-PROGRESS reply seq=$s"
                ;;
            esac
            ;;
        *" packets transmitted"*) echo "$line" >/tmp/pw.stats ;;
        esac
    done </tmp/pw.fifo
) &
reader=$!
ping -i "$iv" "$VIO_peer" >/tmp/pw.fifo 2>&1 &
pinger=$!

# arp_entry: ARP_MAC := the peer's MAC in the ARP table, or "none" when the
# entry is absent or incomplete (no fork: /proc read by the shell).
arp_entry() {
    local ip hw fl mac rest
    ARP_MAC=none
    while read -r ip hw fl mac rest; do
        if [ "$ip" = "$VIO_peer" ] && [ $((fl & 2)) -ne 0 ]; then
            ARP_MAC=$mac
        fi
    done </proc/net/arp
}

read -r up _ </proc/uptime
t0=${up%.*}
shown=""
macs=""
last_mac=""
changes=0
gone=0
why=duration
while :; do
    arp_entry
    if [ "$ARP_MAC" != "$shown" ]; then
        echo "VIOTEST-PROGRESS arp ip=$VIO_peer mac=$ARP_MAC"
        if [ "$ARP_MAC" = none ]; then
            [ -n "$shown" ] && gone=$((gone + 1))
        else
            case " $macs " in *" $ARP_MAC "*) ;; *) macs="$macs $ARP_MAC" ;; esac
            [ -n "$last_mac" ] && [ "$ARP_MAC" != "$last_mac" ] && changes=$((changes + 1))
            last_mac=$ARP_MAC
        fi
        shown=$ARP_MAC
    fi
    read -r up _ </proc/uptime
    t=${up%.*}
    [ $((t - t0)) -ge "$duration" ] && break
    if [ "$silence" -gt 0 ] && [ -s /tmp/pw.last ]; then
        read -r last </tmp/pw.last
        if [ $((t - last)) -ge "$silence" ]; then
            why=silence
            break
        fi
    fi
    sleep "$iv"
done
# SIGINT: ping prints its statistics and exits; the reader then sees EOF.
kill -INT "$pinger" 2>/dev/null
wait "$pinger"
wait "$reader"
sent=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/pw.stats)
acct=$(sort -n -u /tmp/pw.seqs | awk '
    NR == 1 { first = $1 }
    NR > 1 && $1 > prev + 1 {
        g = g (g == "" ? "" : ",") (prev + 1) "-" ($1 - 1)
        lost += $1 - prev - 1
        if ($1 - prev - 1 > max) max = $1 - prev - 1
    }
    { prev = $1; n++ }
    END {
        if (n == 0) { print "replies=0"; exit }
        printf "replies=%d first_seq=%d last_seq=%d lost=%d max_gap=%d gaps=%s", n, first, prev, lost + 0, max + 0, (g == "" ? "none" : g)
    }')
dups=$(wc -l </tmp/pw.dups)
macs=$(echo $macs | tr ' ' ',')
info="sent=${sent:-0} $acct dups=$dups macs=${macs:-none} mac_changes=$changes arp_gone=$gone ended=$why"
case $acct in
replies=0) result fail "no reply from $VIO_peer: $info" ;;
*) result ok "$info" ;;
esac
EOF

cat >"$ird/jobs/standby" <<'EOF'
# standby: hold vio.ip without claiming it (/init set arp_ignore=8 before
# the address); once an echo request for it arrives, answer ARP and serve.
# /proc/net/snmp: "Icmp: ... InEchos ..." then the same line with values.
in_echos() {
    awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else { print $c; exit } }' /proc/net/snmp
}
echo "VIOTEST-SERVING standby arp_ignore=$(cat /proc/sys/net/ipv4/conf/all/arp_ignore)"
t0=$(now)
end=""
[ -n "$VIO_duration" ] && end=$((t0 + VIO_duration))
active=no
while :; do
    if [ "$active" = no ]; then
        n=$(in_echos)
        if [ "${n:-0}" -gt 0 ]; then
            echo 0 >/proc/sys/net/ipv4/conf/all/arp_ignore
            active=yes
            echo "VIOTEST-PROGRESS standby active echo_requests=$n after=$(($(now) - t0))s"
        fi
        sleep 0.2
    else
        sleep 1
    fi
    if [ -n "$end" ] && [ "$(now)" -ge "$end" ]; then
        result ok "served ${VIO_duration}s active=$active echo_requests=$(in_echos)"
        exit 0
    fi
done
EOF

cat >"$ird/jobs/tcp-send" <<'EOF'
# tcp-send: send vio.bytes deterministic bytes to the peer's listener.
need_peer || exit 0
bytes=${VIO_bytes:-1048576}
port=${VIO_port:-5001}
wait=${VIO_wait:-120}
payload "$bytes" >/tmp/payload
sum=$(sum_of /tmp/payload)
echo "VIOTEST-PROGRESS payload bytes=$bytes sha256=$sum"
end=$(($(now) + wait))
tries=0
while :; do
    tries=$((tries + 1))
    t0=$(now)
    if nc -w 5 "$VIO_peer" "$port" </tmp/payload; then
        result ok "bytes=$bytes sha256=$sum tries=$tries secs=$(($(now) - t0))"
        exit 0
    fi
    if [ "$(now)" -ge "$end" ]; then
        result fail "could not send to $VIO_peer:$port within ${wait}s ($tries tries)"
        exit 0
    fi
    sleep 1
done
EOF

cat >"$ird/jobs/tcp-recv" <<'EOF'
# tcp-recv: accept one connection and report what arrived. busybox nc -l with
# stdin at EOF stops early: give it a fifo opened read-write (never EOF).
port=${VIO_port:-5001}
wait=${VIO_wait:-120}
mkfifo /tmp/nc.in
echo "VIOTEST-PROGRESS listening port=$port"
t0=$(now)
timeout "$wait" nc -l -p "$port" <>/tmp/nc.in >/tmp/recv
got=$(wc -c </tmp/recv)
sum=$(sum_of /tmp/recv)
if [ -n "$VIO_bytes" ] && [ "$got" != "$VIO_bytes" ]; then
    result fail "bytes=$got expected=$VIO_bytes sha256=$sum secs=$(($(now) - t0))"
elif [ "$got" = 0 ]; then
    result fail "nothing received within ${wait}s"
else
    result ok "bytes=$got sha256=$sum secs=$(($(now) - t0))"
fi
EOF

cat >"$ird/jobs/driver-reload" <<'EOF'
# driver-reload: ping the peer; then, vio.reloads times: unload virtio_net
# and load it again (the driver resets the virtio device, and QEMU stops the
# rings with GET_VRING_BASE and sets them up again on the same vhost-user
# connection), configure eth0 again and ping the peer again.
need_peer || exit 0
n=${VIO_count:-5}
min=${VIO_min:-$n}
wait=${VIO_wait:-120}
reloads=${VIO_reloads:-1}
if ! ping_phase "$n" "$min" "$wait"; then
    result fail "before the reload: $PH_INFO"
    exit 0
fi
echo "VIOTEST-PROGRESS phase=0 ok $PH_INFO"
got="$PH_GOT"
k=1
while [ "$k" -le "$reloads" ]; do
    t0=$(now)
    if ! rmmod virtio_net; then
        result fail "reload $k: rmmod virtio_net failed"
        exit 0
    fi
    i=0
    while [ -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            result fail "reload $k: eth0 still there 10s after rmmod"
            exit 0
        fi
        sleep 0.1
    done
    echo "VIOTEST-PROGRESS reload=$k unloaded"
    if ! insmod /lib/modules/virtio_net.ko; then
        result fail "reload $k: insmod virtio_net failed"
        exit 0
    fi
    net_setup || exit 0
    t1=$(now)
    if ! ping_phase "$n" "$min" "$wait"; then
        result fail "after reload $k: $PH_INFO"
        exit 0
    fi
    echo "VIOTEST-PROGRESS phase=$k ok reload_secs=$((t1 - t0)) $PH_INFO"
    got="$got,$PH_GOT"
    k=$((k + 1))
done
result ok "reloads=$reloads replies=$got"
EOF

cat >"$ird/jobs/mq-send" <<'EOF'
# mq-send: for a guest with a multiqueue NIC and several CPUs. Check that eth0
# has vio.queues TX and RX queues (Linux enables min(CPUs, queue pairs)
# pairs), ping the peer from every CPU in turn (XPS maps CPU i to TX queue i),
# then send vio.bytes to the peer's tcp-recv listener from the last CPU.
need_peer || exit 0
want=${VIO_queues:-1}
n=${VIO_count:-5}
min=${VIO_min:-$n}
wait=${VIO_wait:-120}
bytes=${VIO_bytes:-1048576}
port=${VIO_port:-5001}
q=/sys/class/net/eth0/queues
rxq=$(ls -d $q/rx-* | wc -l)
txq=$(ls -d $q/tx-* | wc -l)
cpus=$(nproc)
xps=""
i=0
while [ "$i" -lt "$txq" ]; do
    xps="$xps${xps:+,}$(cat $q/tx-$i/xps_cpus 2>/dev/null || echo none)"
    i=$((i + 1))
done
info="tx_queues=$txq rx_queues=$rxq cpus=$cpus xps=$xps"
echo "VIOTEST-PROGRESS $info"
if [ "$txq" -lt "$want" ] || [ "$rxq" -lt "$want" ]; then
    result fail "eth0 has fewer queues than $want: $info"
    exit 0
fi
replies=""
cpu=0
while [ "$cpu" -lt "$cpus" ]; do
    mask=$(printf %x $((1 << cpu)))
    if ! ping_phase "$n" "$min" "$wait" taskset "$mask"; then
        result fail "ping from cpu $cpu: $PH_INFO ($info)"
        exit 0
    fi
    echo "VIOTEST-PROGRESS cpu=$cpu $PH_INFO"
    replies="$replies${replies:+,}$PH_GOT"
    cpu=$((cpu + 1))
done
payload "$bytes" >/tmp/payload
sum=$(sum_of /tmp/payload)
end=$(($(now) + wait))
tries=0
while :; do
    tries=$((tries + 1))
    t0=$(now)
    if taskset "$mask" nc -w 5 "$VIO_peer" "$port" </tmp/payload; then
        result ok "$info replies=$replies bytes=$bytes sha256=$sum tries=$tries secs=$(($(now) - t0))"
        exit 0
    fi
    if [ "$(now)" -ge "$end" ]; then
        result fail "could not send to $VIO_peer:$port within ${wait}s ($tries tries; $info)"
        exit 0
    fi
    sleep 1
done
EOF

cat >"$ird/jobs/blk-sum" <<'EOF'
# blk-sum: sha256 of the first vio.bytes bytes of the disk (default: all).
need_disk || exit 0
bytes=${VIO_bytes:-$DISK_SIZE}
if ! is_num "$bytes" || [ "$bytes" -gt "$DISK_SIZE" ]; then
    result fail "vio.bytes=$bytes: not a size within $DISK ($DISK_SIZE bytes)"
    exit 0
fi
t0=$(now)
if ! sum=$(read_sum "$DISK" 0 "$bytes"); then
    result fail "cannot read $bytes bytes of $DISK"
    exit 0
fi
echo "VIO-BLK-SUM $sum"
result ok "disk=$DISK size=$DISK_SIZE bytes=$bytes sha256=$sum secs=$(($(now) - t0))"
EOF

cat >"$ird/jobs/blk-write" <<'EOF'
# blk-write: write vio.bytes bytes of vio.pattern at vio.offset of the disk
# with fsync, read them back past the page cache, report their sha256.
need_disk || exit 0
bytes=${VIO_bytes:-1048576}
offset=${VIO_offset:-0}
if ! is_num "$bytes" || ! is_num "$offset" || [ $((offset + bytes)) -gt "$DISK_SIZE" ]; then
    result fail "vio.offset=$offset vio.bytes=$bytes: not a range within $DISK ($DISK_SIZE bytes)"
    exit 0
fi
if ! pattern "$bytes" /tmp/blk.data; then
    result fail "cannot make $bytes bytes of pattern ${VIO_pattern:-random}"
    exit 0
fi
sum=$(sum_of /tmp/blk.data)
t0=$(now)
if ! dd if=/tmp/blk.data of="$DISK" bs=65536 seek="$offset" oflag=seek_bytes conv=notrunc,fsync status=none; then
    result fail "writing $bytes bytes at $offset of $DISK failed"
    exit 0
fi
t1=$(now)
rm -f /tmp/blk.data
# Read back from the device, not from the page cache.
sync
echo 3 >/proc/sys/vm/drop_caches
blockdev --flushbufs "$DISK"
if ! back=$(read_sum "$DISK" "$offset" "$bytes"); then
    result fail "cannot read back $bytes bytes at $offset of $DISK"
    exit 0
fi
if [ "$back" != "$sum" ]; then
    result fail "wrote sha256=$sum at $offset of $DISK, read back sha256=$back"
    exit 0
fi
echo "VIO-BLK-WRITTEN $sum"
result ok "disk=$DISK offset=$offset bytes=$bytes sha256=$sum write_secs=$((t1 - t0)) secs=$(($(now) - t0))"
EOF

cat >"$ird/jobs/blk-fs" <<'EOF'
# blk-fs: first boot: make an ext2 filesystem on the disk if none mounts,
# write a test file and its sha256, umount, reboot. Next boot (the file is
# there): check the file against its stored sha256, power off.
need_disk || exit 0
if ! grep -qw ext2 /proc/filesystems; then
    result fail "no ext2 in /proc/filesystems (ext4 module not loaded?)"
    exit 0
fi
bytes=${VIO_bytes:-1048576}
if ! is_num "$bytes"; then
    result fail "vio.bytes=$bytes is not a size"
    exit 0
fi
mnt=/mnt/vio
file=$mnt/vio-test
mkdir -p "$mnt"
fs_mount() { mount -t ext2 "$DISK" "$mnt" 2>/tmp/mount.err; }
fs_umount() {
    if ! umount "$mnt" 2>/tmp/umount.err; then
        result fail "umount $mnt: $(cat /tmp/umount.err)"
        return 1
    fi
}
mkfs=no
if ! fs_mount; then
    echo "VIOTEST-PROGRESS no ext2 on $DISK ($(cat /tmp/mount.err)): mke2fs"
    if ! mke2fs -F "$DISK" >/tmp/mkfs.out 2>&1; then
        result fail "mke2fs $DISK failed: $(tail -n 3 /tmp/mkfs.out | tr '\n' ' ')"
        exit 0
    fi
    if ! fs_mount; then
        result fail "mount -t ext2 $DISK after mke2fs failed: $(cat /tmp/mount.err)"
        exit 0
    fi
    mkfs=yes
fi
if [ -f "$file" ] && [ -f "$file.sha256" ]; then
    stored=$(cat "$file.sha256")
    size=$(wc -c <"$file")
    sum=$(sum_of "$file")
    fs_umount || exit 0
    echo "VIO-FS-READ $sum"
    if [ "$sum" = "$stored" ]; then
        result ok "phase=read disk=$DISK bytes=$size sha256=$sum"
    else
        result fail "phase=read: $file has sha256=$sum ($size bytes), stored sha256=$stored"
    fi
    exit 0
fi
rm -f "$file" "$file.sha256"
if ! pattern "$bytes" "$file"; then
    result fail "cannot write $bytes bytes of pattern ${VIO_pattern:-random} to $file"
    exit 0
fi
sum=$(sum_of "$file")
echo "$sum" >"$file.sha256"
sync
fs_umount || exit 0
sync
echo "VIO-FS-WRITTEN $sum"
: >/tmp/reboot
result ok "phase=write disk=$DISK mkfs=$mkfs bytes=$bytes sha256=$sum"
EOF

log "building initramfs"
(cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9n) >"$work/initramfs.cpio.gz"
mv "$work/initramfs.cpio.gz" "$dir/initramfs.cpio.gz"
echo "$self_sum" >"$dir/stamp"
log "ready: $dir/vmlinux $dir/initramfs.cpio.gz (kernel $(cat "$dir/kernel-version"))"
