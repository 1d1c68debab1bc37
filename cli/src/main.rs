//! `vioctl`: command-line client of the vioswitch control socket.
//!
//! A thin client: each subcommand sends one request line and prints the
//! answer as a table, or as JSON with `--json`. Exit codes: 0 when the switch
//! answered ok, 1 when it answered with an error, 2 when it cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Control a running vioswitch: add, change and remove ports and disks, look
/// at counters, the MAC table and the workers, save the configuration, and
/// follow events.
///
/// Examples:
///   vioctl port add vm1                     # QEMU connects to RUN_DIR/vm1.sock
///   vioctl port add vm2 --mode client --socket /var/run/qemu/vm2.sock
///   vioctl port set vm1 --vlan 10
///   vioctl port stats vm1
///   vioctl disk add d0 --path /var/lib/images/vm1.raw   # RUN_DIR/d0.sock
///   vioctl disk resize d0 --size 20G
///   vioctl disk stats d0
///   vioctl qos set vm1 --ingress-rate 100M --ingress-mode shape
///   vioctl qos set d0 --read-iops 2000 --write-bps 50M
///   vioctl identity add web --mac 52:54:00:00:00:10 --ip 192.0.2.10 --standby vm2
///   vioctl identity bind web vm1
///   vioctl identity move web --to vm2
///   vioctl --json port list
///   vioctl monitor
///
/// Exit codes: 0 ok, 1 the switch answered with an error, 2 the switch cannot
/// be reached.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    propagate_version = true,
    verbatim_doc_comment
)]
struct Cli {
    /// The switch's run directory (its control socket is RUN_DIR/control.sock)
    /// [default: /run/vioswitch for root, else $XDG_RUNTIME_DIR/vioswitch]
    #[arg(long, env = "VIOSWITCH_RUN_DIR", global = true)]
    run_dir: Option<PathBuf>,
    /// Print the switch's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the switch's version, uptime and workers.
    Info,
    /// Manage net ports.
    #[command(subcommand)]
    Port(PortCmd),
    /// Manage disks: raw image files or block devices served as virtio-blk
    ///
    /// A disk is served to one guest over vhost-user (QEMU's
    /// vhost-user-blk-pci), on a socket like a port's.
    ///
    /// Examples:
    ///   vioctl disk add d0 --path /var/lib/images/vm1.raw   # RUN_DIR/d0.sock
    ///   vioctl disk add d1 --path /dev/vg0/vm2 --direct --queues 4
    ///   vioctl disk list
    ///   vioctl disk stats d0
    ///   vioctl disk resize d0 --size 20G
    ///   vioctl disk del d1
    #[command(subcommand, verbatim_doc_comment)]
    Disk(DiskCmd),
    /// Limit and share the traffic of net ports and the requests of disks
    ///
    /// Net ports: a rate limit per direction (ingress: from the guest;
    /// egress: to the guest), policed (excess dropped) or shaped (excess
    /// waits: ingress is lossless, egress queues up to --egress-queue bytes
    /// then drops), in bits/s or packets/s, with a burst and an optional
    /// peak rate. Disks: IOPS and bytes/s limits, per kind or in total
    /// (lossless: requests wait in the ring). Both: a weight, the share of
    /// a busy worker. `qos set` changes only the options given; changes
    /// apply within a millisecond.
    ///
    /// Rates: bits/s, packets/s or IOPS with a decimal suffix k, M, G
    /// (100M = 100 000 000); bytes and bytes/s with a binary suffix K, M, G
    /// (50M = 50 MiB).
    ///
    /// Examples:
    ///   vioctl qos set vm1 --ingress-rate 100M --ingress-mode shape
    ///   vioctl qos set vm1 --egress-rate 1G --egress-peak 2G --egress-burst 1M
    ///   vioctl qos set vm2 --egress-rate 10k --egress-unit packets --weight 4
    ///   vioctl qos set d0 --read-iops 2000 --write-iops 500 --bps 100M
    ///   vioctl qos show                  # every port and disk with QoS
    ///   vioctl qos show vm1              # limits and counters
    ///   vioctl qos clear vm1 egress      # or ingress.peak, weight, ...
    ///   vioctl qos clear d0              # all of it
    #[command(subcommand, verbatim_doc_comment)]
    Qos(QosCmd),
    /// Network identities: a MAC and IP addresses bound to a port, enforced
    /// on it, and moved to another port by command or when its guest fails
    ///
    /// An identity is bound to at most one port; a port carries any number.
    /// The port then only sends from the identities' addresses (unless it is
    /// trusted), and a guest whose own MAC or addresses differ is translated
    /// (port options --guest-mac and --map-ip). A move points the MAC at the
    /// new port and announces it there (gratuitous ARP, unsolicited
    /// neighbour advertisement, RARP). With standby ports, the identity
    /// moves by itself to the first healthy one when its guest disconnects
    /// or stops taking frames for --stall-ms.
    ///
    /// Examples:
    ///   vioctl identity add web --mac 52:54:00:00:00:10 --ip 192.0.2.10 --ip 2001:db8::10
    ///   vioctl identity bind web vm1
    ///   vioctl identity set web --standby vm2 --standby vm3 --stall-ms 500
    ///   vioctl identity move web --to vm2
    ///   vioctl identity list
    ///   vioctl identity show web
    ///   vioctl port set vm2 --guest-mac 52:54:00:00:00:22 --map-ip 192.0.2.10=10.0.0.2
    #[command(subcommand, verbatim_doc_comment)]
    Identity(IdentityCmd),
    /// Show or flush the MAC learning table.
    #[command(subcommand)]
    Fdb(FdbCmd),
    /// Show the dataplane workers and move ports and disks between them.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Show or save the running configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print the switch's events (ports and disks added, connected, broken,
    /// disks resized, identities bound and moved, failovers, ...) as they
    /// happen.
    Monitor,
    /// Print a shell completion script, e.g. `vioctl completions bash > /etc/bash_completion.d/vioctl`.
    Completions { shell: clap_complete::Shell },
    /// Send any command with JSON arguments, e.g. `vioctl raw port.show '{"name":"vm1"}'`.
    Raw {
        cmd: String,
        #[arg(default_value = "{}")]
        args: String,
    },
}

#[derive(Subcommand, Debug)]
enum PortCmd {
    /// Add a port. In server mode (default) the switch listens on the
    /// socket and QEMU connects; in client mode QEMU listens
    /// (`-chardev socket,...,server=on,wait=off`) and the switch connects,
    /// reconnecting whenever QEMU comes back.
    Add {
        name: String,
        /// Queue pairs (multiqueue when > 1).
        #[arg(long)]
        queues: Option<u16>,
        /// VLAN (broadcast domain) of the port; 0 = none.
        #[arg(long)]
        vlan: Option<u16>,
        /// MTU: larger frames are dropped [default: no limit but the switch's 16 KiB frames].
        #[arg(long)]
        mtu: Option<u16>,
        /// No source checks on the identities the port carries (a router or an uplink).
        #[arg(long)]
        trusted: bool,
        /// The guest's own MAC, when it differs from its identity's [default: learnt].
        #[arg(long, value_name = "MAC")]
        guest_mac: Option<String>,
        /// Translate an identity's address to the guest's own (repeatable).
        #[arg(long = "map-ip", value_name = "IDENTITY_IP=GUEST_IP")]
        map_ip: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Change a port while it runs: VLAN and MTU apply at once, a new worker
    /// moves its rings, a new mode or socket reconnects its guest.
    Set {
        name: String,
        #[arg(long)]
        vlan: Option<u16>,
        /// 0 removes the limit.
        #[arg(long)]
        mtu: Option<u16>,
        #[arg(long)]
        worker: Option<usize>,
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        #[arg(long)]
        socket: Option<PathBuf>,
        /// No source checks on the identities the port carries.
        #[arg(long, conflicts_with = "untrusted")]
        trusted: bool,
        /// Check sources again.
        #[arg(long)]
        untrusted: bool,
        /// The guest's own MAC, when it differs from its identity's.
        #[arg(long, value_name = "MAC", conflicts_with = "no_guest_mac")]
        guest_mac: Option<String>,
        /// Learn the guest's MAC from its frames again.
        #[arg(long)]
        no_guest_mac: bool,
        /// Replace the port's address translations (repeatable).
        #[arg(
            long = "map-ip",
            value_name = "IDENTITY_IP=GUEST_IP",
            conflicts_with = "no_map_ip"
        )]
        map_ip: Vec<String>,
        /// Remove every address translation.
        #[arg(long)]
        no_map_ip: bool,
    },
    /// Remove a port, disconnecting its guest.
    Del { name: String },
    /// List ports.
    List,
    /// Show a port with its counters.
    Show { name: String },
    /// Show counters of one port, or of all.
    Stats { name: Option<String> },
}

/// Where and how the switch serves a port's or disk's vhost-user socket.
#[derive(clap::Args, Debug)]
struct Endpoint {
    /// Socket path [default: RUN_DIR/NAME.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Who listens on the socket.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Worker that polls it [default: round robin].
    #[arg(long)]
    worker: Option<usize>,
    /// Owner of the socket file (server mode), e.g. libvirt-qemu.
    #[arg(long)]
    owner: Option<String>,
    /// Group of the socket file (server mode), e.g. kvm.
    #[arg(long)]
    group: Option<String>,
    /// Permissions of the socket file (server mode), octal [default: 0660].
    #[arg(long)]
    perm: Option<String>,
}

impl Endpoint {
    /// The arguments given, as `port.add` and `disk.add` name them.
    fn opts(&self) -> [(&'static str, Option<Value>); 6] {
        [
            ("socket", self.socket.as_ref().map(|v| json!(v))),
            ("mode", self.mode.map(|m| json!(m.as_str()))),
            ("worker", self.worker.map(|v| json!(v))),
            ("owner", self.owner.as_ref().map(|v| json!(v))),
            ("group", self.group.as_ref().map(|v| json!(v))),
            ("perm", self.perm.as_ref().map(|v| json!(v))),
        ]
    }
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Add a disk backed by a raw image file or a block device
    ///
    /// It is served on a vhost-user socket: in server mode (default) the
    /// switch listens and QEMU connects; in client mode QEMU listens.
    ///
    /// Examples:
    ///   vioctl disk add d0 --path /var/lib/images/vm1.raw
    ///   vioctl disk add d1 --path /dev/vg0/vm2 --direct --queues 4 --serial VM2-ROOT
    ///   vioctl disk add iso --path /srv/debian.iso --readonly --owner libvirt-qemu
    ///
    /// QEMU: -chardev socket,id=d0,path=RUN_DIR/d0.sock
    ///       -device vhost-user-blk-pci,chardev=d0,num-queues=1
    /// (guest memory shared: -object memory-backend-memfd,...,share=on)
    #[command(verbatim_doc_comment)]
    Add {
        /// 1-64 of A-Z a-z 0-9 - _ . (the default socket is RUN_DIR/NAME.sock).
        name: String,
        /// The raw image file or block device (a relative path is taken from
        /// the current directory).
        #[arg(long, value_hint = clap::ValueHint::AnyPath)]
        path: PathBuf,
        /// Serve the disk read-only (the backing is opened read-only).
        #[arg(long)]
        readonly: bool,
        /// Bypass the host page cache (O_DIRECT).
        #[arg(long)]
        direct: bool,
        /// Serial number the guest reads, up to 20 printable ASCII characters
        /// [default: the disk's name].
        #[arg(long)]
        serial: Option<String>,
        /// Request queues, 1-16 (QEMU's num-queues must not exceed it) [default: 1].
        #[arg(long)]
        queues: Option<u16>,
        /// Largest ring the guest may set up, a power of two 4-1024 [default: 256].
        #[arg(long)]
        queue_size: Option<u16>,
        /// Logical block size offered to the guest [default: 512].
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["512", "4096"])
            .map(|s| if s == "4096" { 4096u32 } else { 512 }))]
        block_size: Option<u32>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove a disk, disconnecting its guest.
    Del { name: String },
    /// List disks.
    List,
    /// Show a disk with its counters.
    Show { name: String },
    /// Show counters of one disk, or of all.
    ///
    /// Requests and bytes by kind (read, write, flush, discard, write_zeroes,
    /// get_id), failed requests by reason, requests in flight.
    Stats { name: Option<String> },
    /// Change a disk's size and tell its guest
    ///
    /// A file is grown (or, with --shrink, cut) to SIZE. A block device is
    /// resized by its owner (e.g. lvextend); then call resize without --size
    /// and the switch re-reads its size. The guest learns the new size from
    /// a config-change interrupt.
    ///
    /// Examples:
    ///   vioctl disk resize d0 --size 20G
    ///   vioctl disk resize d1            # after lvextend
    #[command(verbatim_doc_comment)]
    Resize {
        name: String,
        /// New size: bytes, or with a binary suffix K, M, G, T (10G = 10 GiB);
        /// a multiple of the block size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Allow making the disk smaller (cuts data the guest may use).
        #[arg(long)]
        shrink: bool,
    },
}

#[derive(Subcommand, Debug)]
enum QosCmd {
    /// Set limits of a net port or disk; options not given stay as they are
    ///
    /// Net ports take the --ingress-*, --egress-* and --egress-queue
    /// options, disks the IOPS, bytes/s and --io-size ones; both take
    /// --weight.
    ///
    /// Examples:
    ///   vioctl qos set vm1 --ingress-rate 100M --ingress-mode shape
    ///   vioctl qos set vm1 --ingress-burst 1M        # the rate stays 100 Mbit/s
    ///   vioctl qos set vm2 --egress-rate 10k --egress-unit packets --egress-mode shape
    ///   vioctl qos set d0 --read-iops 2000 --read-iops-burst 4000 --bps 200M
    #[command(verbatim_doc_comment)]
    Set {
        name: String,
        #[command(flatten)]
        limits: QosLimits,
    },
    /// Show the QoS settings and counters of a port or disk, or of every
    /// one that has QoS set.
    Show { name: Option<String> },
    /// Clear a port's or disk's QoS, or only the FIELDs given
    ///
    /// Fields: ingress, egress, egress_queue, weight, read_iops,
    /// write_iops, iops, read_bps, write_bps, bps, io_size; or a part of a
    /// limit: ingress.peak, egress.burst, read_iops.burst, ...
    ///
    /// Examples:
    ///   vioctl qos clear vm1                 # no limits, no weight
    ///   vioctl qos clear vm1 ingress weight
    ///   vioctl qos clear vm1 egress.peak egress.peak_burst
    #[command(verbatim_doc_comment)]
    Clear { name: String, fields: Vec<String> },
}

/// How a QoS option's value is written.
#[derive(Clone, Copy, Debug)]
enum QosValue {
    /// bits/s, packets/s or operations/s: decimal suffixes.
    Rate,
    /// Bytes or bytes/s: binary suffixes.
    Bytes,
    /// A plain integer.
    Count,
    /// police or shape.
    Mode,
    /// bits or packets.
    Unit,
}

impl QosValue {
    fn name(self) -> &'static str {
        match self {
            QosValue::Rate => "RATE",
            QosValue::Bytes => "BYTES",
            QosValue::Count => "N",
            QosValue::Mode => "MODE",
            QosValue::Unit => "UNIT",
        }
    }

    fn parser(self) -> clap::builder::ValueParser {
        use clap::builder::{PossibleValuesParser, ValueParser};
        let choice =
            |v: [&'static str; 2]| ValueParser::new(PossibleValuesParser::new(v).map(Value::from));
        match self {
            QosValue::Rate => ValueParser::new(|s: &str| parse_rate(s).map(Value::from)),
            QosValue::Bytes => ValueParser::new(|s: &str| parse_size(s).map(Value::from)),
            QosValue::Count => ValueParser::new(|s: &str| {
                s.parse::<u32>()
                    .map(Value::from)
                    .map_err(|_| format!("{s:?} is not a whole number"))
            }),
            QosValue::Mode => choice(["police", "shape"]),
            QosValue::Unit => choice(["bits", "packets"]),
        }
    }
}

/// A `vioctl qos set` option: where its value goes in `qos.set`.
#[derive(Debug)]
struct QosOpt {
    flag: &'static str,
    field: &'static str,
    /// The part of a limit (`rate`, `burst`, ...), or none for a plain field.
    part: Option<&'static str>,
    value: QosValue,
    heading: &'static str,
    help: &'static str,
}

const NET_HEADING: &str = "Net port limits";
const DISK_HEADING: &str = "Disk limits";

/// The options of one direction of a net port.
macro_rules! net_limit_opts {
    ($dir:literal, $what:literal) => {
        [
            QosOpt {
                flag: concat!($dir, "-rate"),
                field: $dir,
                part: Some("rate"),
                value: QosValue::Rate,
                heading: NET_HEADING,
                help: concat!(
                    "Average rate ", $what, ": bits/s with k, M, G (100M = 100 Mbit/s), or packets/s with --",
                    $dir, "-unit packets"
                ),
            },
            QosOpt {
                flag: concat!($dir, "-burst"),
                field: $dir,
                part: Some("burst"),
                value: QosValue::Bytes,
                heading: NET_HEADING,
                help: "Burst at the average rate: bytes with K, M, G, or packets [default: 10 ms at the rate, at least one 16 KiB frame]",
            },
            QosOpt {
                flag: concat!($dir, "-peak"),
                field: $dir,
                part: Some("peak"),
                value: QosValue::Rate,
                heading: NET_HEADING,
                help: "Peak rate (at least the rate) at which a burst goes out [default: line rate]",
            },
            QosOpt {
                flag: concat!($dir, "-peak-burst"),
                field: $dir,
                part: Some("peak_burst"),
                value: QosValue::Bytes,
                heading: NET_HEADING,
                help: "Burst at the peak rate: bytes or packets [default: one frame]",
            },
            QosOpt {
                flag: concat!($dir, "-mode"),
                field: $dir,
                part: Some("mode"),
                value: QosValue::Mode,
                heading: NET_HEADING,
                help: concat!("Over the ", $dir, " rate: police (drop) or shape (wait) [default: police]"),
            },
            QosOpt {
                flag: concat!($dir, "-unit"),
                field: $dir,
                part: Some("unit"),
                value: QosValue::Unit,
                heading: NET_HEADING,
                help: concat!("What the ", $dir, " rate counts [default: bits]"),
            },
        ]
    };
}

/// The options of one disk rate limit.
macro_rules! disk_rate_opts {
    ($flag:literal, $field:literal, $value:expr, $what:literal) => {
        [
            QosOpt {
                flag: $flag,
                field: $field,
                part: Some("rate"),
                value: $value,
                heading: DISK_HEADING,
                help: $what,
            },
            QosOpt {
                flag: concat!($flag, "-burst"),
                field: $field,
                part: Some("burst"),
                value: $value,
                heading: DISK_HEADING,
                help: concat!("Burst of --", $flag, " [default: one second at the rate]"),
            },
        ]
    };
}

const NET_LIMIT_OPTS: [[QosOpt; 6]; 2] = [
    net_limit_opts!("ingress", "from the guest"),
    net_limit_opts!("egress", "to the guest"),
];

const DISK_RATE_OPTS: [[QosOpt; 2]; 6] = [
    disk_rate_opts!(
        "read-iops",
        "read_iops",
        QosValue::Rate,
        "Read operations per second"
    ),
    disk_rate_opts!(
        "write-iops",
        "write_iops",
        QosValue::Rate,
        "Write operations per second (discard and write-zeroes count)"
    ),
    disk_rate_opts!(
        "iops",
        "iops",
        QosValue::Rate,
        "Operations per second, reads and writes together"
    ),
    disk_rate_opts!(
        "read-bps",
        "read_bps",
        QosValue::Bytes,
        "Bytes read per second, with K, M, G (100M = 100 MiB/s)"
    ),
    disk_rate_opts!(
        "write-bps",
        "write_bps",
        QosValue::Bytes,
        "Bytes written per second"
    ),
    disk_rate_opts!(
        "bps",
        "bps",
        QosValue::Bytes,
        "Bytes per second, read and written together"
    ),
];

const OTHER_QOS_OPTS: [QosOpt; 3] = [
    QosOpt {
        flag: "egress-queue",
        field: "egress_queue",
        part: None,
        value: QosValue::Bytes,
        heading: NET_HEADING,
        help:
            "Bytes a shaped egress may hold for the guest before it drops, 16K-64M [default: 256K]",
    },
    QosOpt {
        flag: "io-size",
        field: "io_size",
        part: None,
        value: QosValue::Bytes,
        heading: DISK_HEADING,
        help:
            "Bytes one operation covers: a larger request counts as several, 4K-16M [default: 128K]",
    },
    QosOpt {
        flag: "weight",
        field: "weight",
        part: None,
        value: QosValue::Count,
        heading: "Net ports and disks",
        help:
            "Share of a busy worker, 1-1000 (proportional to the others' weights) [default: none]",
    },
];

/// Every `vioctl qos set` option, in help order.
fn qos_opts() -> impl Iterator<Item = &'static QosOpt> {
    NET_LIMIT_OPTS
        .iter()
        .flatten()
        .chain(&OTHER_QOS_OPTS[..1])
        .chain(DISK_RATE_OPTS.iter().flatten())
        .chain(&OTHER_QOS_OPTS[1..])
}

/// The options of `vioctl qos set`, as the `qos.set` fields they give.
#[derive(Debug, Clone, Default)]
struct QosLimits(Value);

impl clap::FromArgMatches for QosLimits {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut fields = json!({});
        for o in qos_opts() {
            if let Some(v) = m.get_one::<Value>(o.flag) {
                match o.part {
                    Some(p) => fields[o.field][p] = v.clone(),
                    None => fields[o.field] = v.clone(),
                }
            }
        }
        Ok(QosLimits(fields))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for QosLimits {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        qos_opts().fold(cmd, |cmd, o| {
            cmd.arg(
                clap::Arg::new(o.flag)
                    .long(o.flag)
                    .value_name(o.value.name())
                    .value_parser(o.value.parser())
                    .help_heading(o.heading)
                    .help(o.help),
            )
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    /// Add an identity, unbound: a MAC and its IP addresses, in a VLAN.
    Add {
        /// 1-64 of A-Z a-z 0-9 - _ .
        name: String,
        /// Its MAC (unicast).
        #[arg(long)]
        mac: String,
        /// An IPv4 or IPv6 address of it (repeatable; at least one).
        #[arg(long = "ip", required = true, value_name = "IP")]
        ips: Vec<String>,
        /// Its VLAN; the ports it is bound to and its standbys are in it [default: 0].
        #[arg(long)]
        vlan: Option<u16>,
        /// A port to fail over to, in order of preference (repeatable).
        #[arg(long, value_name = "PORT")]
        standby: Vec<String>,
        /// Fail over when the guest's RX ring has taken nothing for this
        /// long while frames came for it; 0: only on disconnect [default: 1000].
        #[arg(long, value_name = "MS")]
        stall_ms: Option<u64>,
    },
    /// Remove an identity (unbinding it first).
    Del { name: String },
    /// List identities with their ports and standbys' health.
    List,
    /// Show an identity.
    Show { name: String },
    /// Bind an unbound identity to a port and announce it there.
    Bind { name: String, port: String },
    /// Unbind an identity: its port no longer carries it.
    Unbind { name: String },
    /// Move a bound identity to another port and announce it there.
    Move {
        name: String,
        #[arg(long, value_name = "PORT")]
        to: String,
    },
    /// Change an identity's standby ports or stall time.
    Set {
        name: String,
        /// Replace the standby ports, in order of preference (repeatable).
        #[arg(long, value_name = "PORT", conflicts_with = "no_standby")]
        standby: Vec<String>,
        /// Remove every standby port.
        #[arg(long)]
        no_standby: bool,
        /// See `identity add`; 0: only on disconnect.
        #[arg(long, value_name = "MS")]
        stall_ms: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum FdbCmd {
    /// List learnt MAC addresses.
    Show {
        #[arg(long)]
        port: Option<String>,
    },
    /// Forget learnt MAC addresses (of one port, or all).
    Flush {
        #[arg(long)]
        port: Option<String>,
    },
    /// Add a static entry: MAC always goes to PORT.
    Add {
        mac: String,
        port: String,
        #[arg(long, default_value_t = 0)]
        vlan: u16,
    },
    /// Remove a static entry.
    Del {
        mac: String,
        #[arg(long, default_value_t = 0)]
        vlan: u16,
    },
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// List workers with their ports and disks, and counters.
    List,
    /// Move a port or disk to another worker without disturbing its guest.
    Move { port: String, worker: usize },
    /// Spread the ports and disks evenly over the workers.
    Rebalance,
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print the running configuration (JSON, or TOML for --config).
    Show {
        #[arg(long)]
        toml: bool,
    },
    /// Save it: to the run directory's state (restored on restart), or as TOML
    /// to the file NAME in the run directory (for `vioswitch --config`).
    Save { name: Option<PathBuf> },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Mode {
    Server,
    Client,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Server => "server",
            Mode::Client => "client",
        }
    }
}

/// Put the `Some` options into an argument object.
fn with_opts(mut args: Value, opts: &[(&str, Option<Value>)]) -> Value {
    for (k, v) in opts {
        if let Some(v) = v {
            args[*k] = v.clone();
        }
    }
    args
}

fn default_run_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/vioswitch");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("vioswitch"),
        None => PathBuf::from(format!("/tmp/vioswitch-{uid}")),
    }
}

/// A request to send: command and arguments.
fn request(cmd: &Cmd) -> Result<(String, Value), String> {
    let r = match cmd {
        Cmd::Info => ("switch.info", json!({})),
        Cmd::Port(p) => match p {
            PortCmd::Add {
                name,
                queues,
                vlan,
                mtu,
                trusted,
                guest_mac,
                map_ip,
                endpoint,
            } => (
                "port.add",
                with_opts(
                    with_opts(json!({ "name": name }), &endpoint.opts()),
                    &[
                        ("queues", queues.map(|v| json!(v))),
                        ("vlan", vlan.map(|v| json!(v))),
                        ("mtu", mtu.map(|v| json!(v))),
                        ("trusted", trusted.then_some(json!(true))),
                        ("guest_mac", guest_mac.as_ref().map(|v| json!(v))),
                        ("ip_map", (!map_ip.is_empty()).then(|| json!(map_ip))),
                    ],
                ),
            ),
            PortCmd::Set {
                name,
                vlan,
                mtu,
                worker,
                mode,
                socket,
                trusted,
                untrusted,
                guest_mac,
                no_guest_mac,
                map_ip,
                no_map_ip,
            } => (
                "port.set",
                with_opts(
                    json!({ "name": name }),
                    &[
                        ("vlan", vlan.map(|v| json!(v))),
                        ("mtu", mtu.map(|v| json!(v))),
                        ("worker", worker.map(|v| json!(v))),
                        ("mode", mode.map(|m| json!(m.as_str()))),
                        ("socket", socket.as_ref().map(|v| json!(v))),
                        ("trusted", flag(*trusted, *untrusted)),
                        (
                            "guest_mac",
                            replace_or_clear(
                                guest_mac.as_ref().map(|v| json!(v)),
                                *no_guest_mac,
                                Value::Null,
                            ),
                        ),
                        (
                            "ip_map",
                            replace_or_clear(
                                (!map_ip.is_empty()).then(|| json!(map_ip)),
                                *no_map_ip,
                                json!([]),
                            ),
                        ),
                    ],
                ),
            ),
            PortCmd::Del { name } => ("port.del", json!({ "name": name })),
            PortCmd::List => ("port.list", json!({})),
            PortCmd::Show { name } => ("port.show", json!({ "name": name })),
            PortCmd::Stats { name } => ("port.stats", opt_name(name)),
        },
        Cmd::Disk(d) => match d {
            DiskCmd::Add {
                name,
                path,
                readonly,
                direct,
                serial,
                queues,
                queue_size,
                block_size,
                endpoint,
            } => {
                // The daemon runs elsewhere: a relative path means here.
                let path = std::path::absolute(path)
                    .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
                (
                    "disk.add",
                    with_opts(
                        with_opts(json!({ "name": name, "path": path }), &endpoint.opts()),
                        &[
                            ("readonly", readonly.then_some(json!(true))),
                            ("direct", direct.then_some(json!(true))),
                            ("serial", serial.as_ref().map(|v| json!(v))),
                            ("queues", queues.map(|v| json!(v))),
                            ("queue_size", queue_size.map(|v| json!(v))),
                            ("block_size", block_size.map(|v| json!(v))),
                        ],
                    ),
                )
            }
            DiskCmd::Del { name } => ("disk.del", json!({ "name": name })),
            DiskCmd::List => ("disk.list", json!({})),
            DiskCmd::Show { name } => ("disk.show", json!({ "name": name })),
            DiskCmd::Stats { name } => ("disk.stats", opt_name(name)),
            DiskCmd::Resize { name, size, shrink } => (
                "disk.resize",
                with_opts(
                    json!({ "name": name }),
                    &[
                        ("size", size.map(|v| json!(v))),
                        ("shrink", shrink.then_some(json!(true))),
                    ],
                ),
            ),
        },
        Cmd::Qos(q) => match q {
            QosCmd::Set { name, limits } => {
                let mut args = limits.0.clone();
                args["name"] = json!(name);
                ("qos.set", args)
            }
            QosCmd::Show { name } => ("qos.show", opt_name(name)),
            QosCmd::Clear { name, fields } if fields.is_empty() => {
                ("qos.clear", json!({ "name": name }))
            }
            QosCmd::Clear { name, fields } => {
                ("qos.clear", json!({ "name": name, "fields": fields }))
            }
        },
        Cmd::Identity(i) => match i {
            IdentityCmd::Add {
                name,
                mac,
                ips,
                vlan,
                standby,
                stall_ms,
            } => (
                "identity.add",
                with_opts(
                    json!({ "name": name, "mac": mac, "ips": ips }),
                    &[
                        ("vlan", vlan.map(|v| json!(v))),
                        ("standby", (!standby.is_empty()).then(|| json!(standby))),
                        ("stall_ms", stall_ms.map(|v| json!(v))),
                    ],
                ),
            ),
            IdentityCmd::Del { name } => ("identity.del", json!({ "name": name })),
            IdentityCmd::List => ("identity.list", json!({})),
            IdentityCmd::Show { name } => ("identity.show", json!({ "name": name })),
            IdentityCmd::Bind { name, port } => {
                ("identity.bind", json!({ "name": name, "port": port }))
            }
            IdentityCmd::Unbind { name } => ("identity.unbind", json!({ "name": name })),
            IdentityCmd::Move { name, to } => ("identity.move", json!({ "name": name, "to": to })),
            IdentityCmd::Set {
                name,
                standby,
                no_standby,
                stall_ms,
            } => (
                "identity.set",
                with_opts(
                    json!({ "name": name }),
                    &[
                        (
                            "standby",
                            replace_or_clear(
                                (!standby.is_empty()).then(|| json!(standby)),
                                *no_standby,
                                json!([]),
                            ),
                        ),
                        ("stall_ms", stall_ms.map(|v| json!(v))),
                    ],
                ),
            ),
        },
        Cmd::Fdb(f) => match f {
            FdbCmd::Show { port } => ("fdb.show", opt_port(port)),
            FdbCmd::Flush { port } => ("fdb.flush", opt_port(port)),
            FdbCmd::Add { mac, port, vlan } => {
                ("fdb.add", json!({ "mac": mac, "port": port, "vlan": vlan }))
            }
            FdbCmd::Del { mac, vlan } => ("fdb.del", json!({ "mac": mac, "vlan": vlan })),
        },
        Cmd::Worker(WorkerCmd::List) => ("worker.list", json!({})),
        Cmd::Worker(WorkerCmd::Move { port, worker }) => {
            ("worker.move", json!({ "port": port, "worker": worker }))
        }
        Cmd::Worker(WorkerCmd::Rebalance) => ("worker.rebalance", json!({})),
        Cmd::Config(ConfigCmd::Show { toml }) => (
            "config.show",
            json!({ "format": if *toml { "toml" } else { "json" } }),
        ),
        Cmd::Config(ConfigCmd::Save { name }) => match name {
            Some(p) => ("config.save", json!({ "path": p })),
            None => ("config.save", json!({})),
        },
        Cmd::Monitor => ("events.subscribe", json!({})),
        Cmd::Completions { .. } => return Err("completions are printed locally".into()),
        Cmd::Raw { cmd, args } => {
            let v: Value =
                serde_json::from_str(args).map_err(|e| format!("arguments are not JSON: {e}"))?;
            return Ok((cmd.clone(), v));
        }
    };
    Ok((r.0.to_string(), r.1))
}

/// `true` for `--on`, `false` for `--off`, nothing for neither.
fn flag(on: bool, off: bool) -> Option<Value> {
    match (on, off) {
        (true, _) => Some(json!(true)),
        (_, true) => Some(json!(false)),
        _ => None,
    }
}

/// A new value, or `cleared` for `--no-...`, or nothing for neither.
fn replace_or_clear(value: Option<Value>, clear: bool, cleared: Value) -> Option<Value> {
    value.or(clear.then_some(cleared))
}

/// `{key: value}`, or `{}` without a value.
fn opt_arg(key: &str, value: &Option<String>) -> Value {
    with_opts(json!({}), &[(key, value.as_ref().map(|v| json!(v)))])
}

fn opt_port(port: &Option<String>) -> Value {
    opt_arg("port", port)
}

fn opt_name(name: &Option<String>) -> Value {
    opt_arg("name", name)
}

const SIZE_UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// A number with an optional suffix from `units` (any case), or the
/// message `bad` gives.
fn parse_scaled(s: &str, units: &[(&str, u64)], bad: impl Fn() -> String) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_lowercase();
    let scale = match units.iter().find(|(u, _)| *u == suffix) {
        Some((_, scale)) => *scale,
        None => return Err(bad()),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size in bytes: digits, optionally followed by a binary suffix K, M, G
/// or T (also KiB, MiB, GiB, TiB; any case).
fn parse_size(s: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 9] = [
        ("", 1),
        ("k", 1 << 10),
        ("kib", 1 << 10),
        ("m", 1 << 20),
        ("mib", 1 << 20),
        ("g", 1 << 30),
        ("gib", 1 << 30),
        ("t", 1 << 40),
        ("tib", 1 << 40),
    ];
    parse_scaled(s, &UNITS, || {
        format!("{s:?} is not a size: give bytes, or a number with K, M, G or T (e.g. 10G)")
    })
}

/// A rate (bits/s, packets/s, operations/s): digits, optionally followed by
/// a decimal suffix k, M, G or T (any case; 100M = 100 000 000).
fn parse_rate(s: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 5] = [
        ("", 1),
        ("k", 1_000),
        ("m", 1_000_000),
        ("g", 1_000_000_000),
        ("t", 1_000_000_000_000),
    ];
    parse_scaled(s, &UNITS, || {
        format!("{s:?} is not a rate: give a number, or one with k, M, G or T (e.g. 100M = 100 000 000)")
    })
}

/// A rate for people: `100 M` + unit, exact on unit boundaries, else one
/// decimal.
fn human_rate(n: u64, unit: &str) -> String {
    let prefixes = ["", "k", "M", "G", "T"];
    let mut i = 0;
    let mut scale = 1u64;
    while i + 1 < prefixes.len() && n / scale >= 1000 {
        i += 1;
        scale *= 1000;
    }
    if n % scale == 0 {
        format!("{} {}{unit}", n / scale, prefixes[i])
    } else {
        format!("{:.1} {}{unit}", n as f64 / scale as f64, prefixes[i])
    }
}

/// Bytes for people: `512 B`, `64 MiB`, `1.5 GiB`: exact on unit
/// boundaries, else one decimal.
fn human_size(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < SIZE_UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, SIZE_UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, SIZE_UNITS[unit])
    }
}

#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error(
        "cannot reach vioswitch at {0}: {1} (is it running? set --run-dir or VIOSWITCH_RUN_DIR)"
    )]
    Connect(PathBuf, std::io::Error),
    #[error("lost the connection to vioswitch: {0}")]
    Io(#[from] std::io::Error),
    #[error("vioswitch answered something that is not JSON: {0}")]
    Garbled(#[from] serde_json::Error),
}

fn call(sock: &PathBuf, cmd: &str, args: Value) -> Result<Value, Unreachable> {
    let mut s = UnixStream::connect(sock).map_err(|e| Unreachable::Connect(sock.clone(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = json!({ "id": 1, "cmd": cmd, "args": args });
    // The switch may answer and close before reading (a refused peer): read
    // its answer even if the request could not be written whole.
    let sent = writeln!(s, "{req}");
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(n) if n > 0 => Ok(serde_json::from_str(&line)?),
        Ok(_) => Err(sent.err().map_or_else(
            || Unreachable::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Unreachable::Io,
        )),
        Err(e) => Err(Unreachable::Io(e)),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The elements of an array result (none for anything else).
fn rows(result: &Value) -> &[Value] {
    result.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Rows of objects as aligned lines with the given columns, under a header.
fn table_lines(rows: &[Value], cols: &[&str]) -> Vec<String> {
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |items: Vec<String>| {
        let s: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.join("  ").trim_end().to_string()
    };
    std::iter::once(line(cols.iter().map(|c| c.to_uppercase()).collect()))
        .chain(cells.into_iter().map(line))
        .collect()
}

/// Print rows of objects as an aligned table with the given columns.
fn table(rows: &[Value], cols: &[&str]) {
    print_lines(table_lines(rows, cols))
}

fn print_stats(name: &str, s: &Value) {
    println!("{name}:");
    for k in ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "broken"] {
        println!("  {k:<22} {}", cell(&s[k]));
    }
    if let Some(d) = s["drops"].as_object() {
        for (k, v) in d {
            println!("  drop.{k:<17} {}", cell(v));
        }
    }
}

/// Requests and bytes by kind of a disk's counters, as indented table lines.
fn disk_op_lines(s: &Value) -> Vec<String> {
    let ops: Vec<Value> = s["ops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| json!({ "request": k, "ops": n, "bytes": s["bytes"][k] }))
                .collect()
        })
        .unwrap_or_default();
    table_lines(&ops, &["request", "ops", "bytes"])
        .into_iter()
        .map(|l| format!("  {l}"))
        .collect()
}

fn print_disk_stats(name: &str, s: &Value) {
    println!("{name}:");
    for l in disk_op_lines(s) {
        println!("{l}");
    }
    for k in ["in_flight", "broken"] {
        println!("  {k:<22} {}", cell(&s[k]));
    }
    if let Some(e) = s["errors"].as_object() {
        for (k, v) in e {
            println!("  error.{k:<16} {}", cell(v));
        }
    }
}

/// Print the counters of the one object named, or of every object in a map
/// of them (`port.stats`, `disk.stats`).
fn print_each(name: &Option<String>, result: &Value, print: fn(&str, &Value)) {
    match name {
        Some(n) => print(n, result),
        None => {
            if let Some(m) = result.as_object() {
                for (n, s) in m {
                    print(n, s);
                }
            }
        }
    }
}

/// Print an object's fields, then its counters (`port.show`, `disk.show`).
fn print_show(name: &str, result: &Value, print: fn(&str, &Value)) {
    if let Some(m) = result.as_object() {
        for (k, v) in m.iter().filter(|(k, _)| *k != "stats") {
            println!("{k:<14} {}", cell(v));
        }
    }
    print(&format!("{name} counters"), &result["stats"]);
}

/// A limit's rate and burst for people: `f` formats a rate, `unit` is what
/// a burst counts (`None`: bytes).
fn limit_row(name: &str, l: &Value, f: impl Fn(u64) -> String, unit: Option<&str>) -> Value {
    let burst = |v: &Value| match (v.as_u64(), unit) {
        (Some(n), Some(u)) => json!(format!("{n} {u}")),
        (Some(n), None) => json!(human_size(n)),
        (None, _) => Value::Null,
    };
    let rate = |v: &Value| v.as_u64().map_or(Value::Null, |n| json!(f(n)));
    json!({
        "limit": name,
        "mode": l["mode"],
        "rate": rate(&l["rate"]),
        "burst": burst(&l["burst"]),
        "peak": rate(&l["peak"]),
        "peak_burst": burst(&l["peak_burst"]),
    })
}

/// A QoS spec (`qos.set`, `qos.clear`, `qos.show`'s `qos`) as table lines.
fn qos_limit_lines(q: &Value) -> Vec<String> {
    let mut rows = Vec::new();
    for dir in ["ingress", "egress"] {
        let l = &q[dir];
        if l.is_object() {
            let packets = l["unit"] == "packets";
            let unit = if packets { "pkt/s" } else { "bit/s" };
            rows.push(limit_row(
                dir,
                l,
                |n| human_rate(n, unit),
                packets.then_some("pkt"),
            ));
        }
    }
    let net = !rows.is_empty();
    for k in ["read_iops", "write_iops", "iops"] {
        if q[k].is_object() {
            rows.push(limit_row(k, &q[k], |n| human_rate(n, "op/s"), Some("op")));
        }
    }
    for k in ["read_bps", "write_bps", "bps"] {
        if q[k].is_object() {
            let rate = |n| format!("{}/s", human_size(n));
            rows.push(limit_row(k, &q[k], rate, None));
        }
    }
    let cols: &[&str] = if net {
        &["limit", "mode", "rate", "burst", "peak", "peak_burst"]
    } else {
        &["limit", "rate", "burst"]
    };
    let mut lines = if rows.is_empty() {
        vec!["no limits".to_string()]
    } else {
        table_lines(&rows, cols)
    };
    for k in ["egress_queue", "io_size"] {
        if let Some(n) = q[k].as_u64() {
            lines.push(format!("{k:<13} {}", human_size(n)));
        }
    }
    if let Some(w) = q["weight"].as_u64() {
        lines.push(format!("{:<13} {w}", "weight"));
    }
    lines
}

/// Nanoseconds as milliseconds, for people.
fn ms(ns: &Value) -> Value {
    ns.as_u64()
        .map_or(Value::Null, |n| json!(format!("{:.3}", n as f64 / 1e6)))
}

/// A `qos.show` entry as lines: its limits, then its counters.
fn qos_entry_lines(e: &Value) -> Vec<String> {
    let mut lines = vec![format!("{} ({}):", cell(&e["name"]), cell(&e["kind"]))];
    lines.extend(
        qos_limit_lines(&e["qos"])
            .into_iter()
            .map(|l| format!("  {l}")),
    );
    let c = &e["counters"];
    if e["kind"] == "disk" {
        lines.extend(disk_op_lines(c));
        lines.push(format!("  throttled_ms  {}", cell(&ms(&c["throttled_ns"]))));
    } else {
        let row = |dir: &str, queue_full: Value| {
            json!({
                "passed": dir,
                "packets": c[format!("{dir}_packets")],
                "bytes": c[format!("{dir}_bytes")],
                "throttled_ms": ms(&c[format!("{dir}_throttled_ns")]),
                "policed": c[format!("{dir}_policed")],
                "queue_full": queue_full,
            })
        };
        let rows = [
            row("ingress", Value::Null),
            row("egress", c["egress_queue_full"].clone()),
        ];
        lines.extend(
            table_lines(
                &rows,
                &[
                    "passed",
                    "packets",
                    "bytes",
                    "throttled_ms",
                    "policed",
                    "queue_full",
                ],
            )
            .into_iter()
            .map(|l| format!("  {l}")),
        );
    }
    lines
}

fn print_lines(lines: Vec<String>) {
    for l in lines {
        println!("{l}");
    }
}

/// An identity's standbys (`[{"port", "health"}]`) for people:
/// `vm2 (healthy), vm3 (disconnected)`.
fn standby_cell(standby: &Value) -> String {
    let list: Vec<String> = rows(standby)
        .iter()
        .map(|s| format!("{} ({})", cell(&s["port"]), cell(&s["health"])))
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// An identity's port with its health: `vm1 (healthy)`, or `-`.
fn bound_cell(i: &Value) -> String {
    match i["port"].as_str() {
        Some(p) => format!("{p} ({})", cell(&i["health"])),
        None => "-".into(),
    }
}

/// An `identity.list` entry as the table shows it.
fn identity_row(i: &Value) -> Value {
    let mut r = i.clone();
    r["port"] = json!(bound_cell(i));
    r["standby"] = json!(standby_cell(&i["standby"]));
    r
}

/// An identity (`identity.show` and the commands that change one) as lines.
fn identity_lines(i: &Value) -> Vec<String> {
    let ips: Vec<String> = rows(&i["ips"]).iter().map(cell).collect();
    let mut lines = vec![
        format!("{:<9} {}", "name", cell(&i["name"])),
        format!("{:<9} {}", "mac", cell(&i["mac"])),
        format!("{:<9} {}", "ips", ips.join(", ")),
        format!("{:<9} {}", "vlan", cell(&i["vlan"])),
        format!("{:<9} {}", "port", bound_cell(i)),
        format!("{:<9} {}", "standby", standby_cell(&i["standby"])),
        format!("{:<9} {}", "stall_ms", cell(&i["stall_ms"])),
    ];
    if let Some(why) = i["failover_pending"].as_str() {
        lines.push(format!(
            "{:<9} pending ({why}): no standby is healthy",
            "failover"
        ));
    }
    lines
}

/// A disk's `size` for people: `64 MiB`, with the bytes too if `exact`.
fn disk_size(d: &Value, exact: bool) -> Value {
    match d["size"].as_u64() {
        Some(b) if exact => json!(format!("{} ({b} bytes)", human_size(b))),
        Some(b) => json!(human_size(b)),
        None => d["size"].clone(),
    }
}

/// A `disk.list` entry as the table shows it.
fn disk_row(d: &Value) -> Value {
    let mut r = d.clone();
    r["size"] = disk_size(d, false);
    r["ro"] = d["readonly"].clone();
    r
}

fn print_human(cmd: &Cmd, result: &Value) {
    match cmd {
        Cmd::Port(PortCmd::List) => table(
            rows(result),
            &[
                "name",
                "worker",
                "vlan",
                "queue_pairs",
                "connected",
                "broken",
                "socket",
            ],
        ),
        Cmd::Port(PortCmd::Stats { name }) => print_each(name, result, print_stats),
        Cmd::Port(PortCmd::Show { name }) => print_show(name, result, print_stats),
        Cmd::Disk(DiskCmd::List) => table(
            &rows(result).iter().map(disk_row).collect::<Vec<_>>(),
            &[
                "name",
                "path",
                "size",
                "block_size",
                "ro",
                "direct",
                "queues",
                "worker",
                "connected",
                "broken",
            ],
        ),
        Cmd::Disk(DiskCmd::Stats { name }) => print_each(name, result, print_disk_stats),
        Cmd::Disk(DiskCmd::Show { name }) => {
            let mut d = result.clone();
            d["size"] = disk_size(result, true);
            print_show(name, &d, print_disk_stats)
        }
        Cmd::Disk(DiskCmd::Add { .. }) => println!(
            "disk {} added ({}, {}); attach QEMU to {}",
            cell(&result["name"]),
            cell(&disk_size(result, false)),
            cell(&result["path"]),
            cell(&result["socket"])
        ),
        Cmd::Disk(DiskCmd::Resize { name, .. }) => {
            println!("disk {name} resized to {}", cell(&disk_size(result, true)))
        }
        Cmd::Qos(QosCmd::Set { .. } | QosCmd::Clear { .. }) => print_lines(qos_limit_lines(result)),
        Cmd::Qos(QosCmd::Show { name: Some(_) }) => print_lines(qos_entry_lines(result)),
        Cmd::Qos(QosCmd::Show { name: None }) => {
            if rows(result).is_empty() {
                println!("no port or disk has QoS set");
            }
            for (i, e) in rows(result).iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_lines(qos_entry_lines(e));
            }
        }
        Cmd::Identity(IdentityCmd::List) => table(
            &rows(result).iter().map(identity_row).collect::<Vec<_>>(),
            &["name", "mac", "vlan", "ips", "port", "standby", "stall_ms"],
        ),
        Cmd::Identity(IdentityCmd::Del { name }) => println!("identity {name} removed"),
        Cmd::Identity(_) => print_lines(identity_lines(result)),
        Cmd::Fdb(FdbCmd::Show { .. }) => {
            table(rows(result), &["mac", "vlan", "port", "age_s", "static"])
        }
        Cmd::Worker(WorkerCmd::List) => table(
            rows(result),
            &[
                "id", "ports", "frames", "batches", "busy_ns", "idle_ns", "wakeups",
            ],
        ),
        Cmd::Config(ConfigCmd::Show { toml: true }) => print!("{}", cell(&result["toml"])),
        Cmd::Config(ConfigCmd::Show { toml: false }) => {
            println!(
                "{}",
                serde_json::to_string_pretty(result).unwrap_or_default()
            )
        }
        Cmd::Port(PortCmd::Add { .. }) => {
            println!(
                "port {} added; attach QEMU to {}",
                cell(&result["name"]),
                cell(&result["socket"])
            )
        }
        _ => match result.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    println!("{k:<12} {}", cell(v));
                }
            }
            Some(_) => {}
            None => println!("{}", cell(result)),
        },
    }
}

/// Follow the event stream until the switch goes away.
fn monitor(sock: &PathBuf, json_out: bool) -> ExitCode {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vioctl: {}", Unreachable::Connect(sock.clone(), e));
            return ExitCode::from(2);
        }
    };
    if writeln!(s, "{}", json!({ "id": 1, "cmd": "events.subscribe" })).is_err() {
        eprintln!("vioctl: lost the connection to vioswitch");
        return ExitCode::from(2);
    }
    let mut lines = BufReader::new(s).lines();
    match lines.next() {
        Some(Ok(l)) if serde_json::from_str::<Value>(&l).is_ok_and(|v| v["ok"] == json!(true)) => {}
        Some(Ok(l)) => {
            eprintln!("vioctl: the switch refused to stream events: {l}");
            return ExitCode::from(1);
        }
        _ => {
            eprintln!("vioctl: lost the connection to vioswitch");
            return ExitCode::from(2);
        }
    }
    for line in lines {
        let Ok(line) = line else { break };
        if json_out {
            println!("{line}");
            continue;
        }
        if let Ok(ev) = serde_json::from_str::<Value>(&line) {
            println!("{}", event_line(&ev));
        }
    }
    eprintln!("vioctl: the switch closed the event stream");
    ExitCode::from(2)
}

/// An event for people: time, name, then its fields as `key=value`, by key.
fn event_line(ev: &Value) -> String {
    let mut rest: Vec<String> = ev
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "event" && *k != "time")
                .map(|(k, v)| match k.as_str() {
                    "standby" => format!("{k}={}", standby_cell(v).replace(' ', "")),
                    _ => format!("{k}={}", cell(v)),
                })
                .collect()
        })
        .unwrap_or_default();
    rest.sort();
    format!(
        "{:.3}  {:<24} {}",
        ev["time"].as_f64().unwrap_or_default(),
        cell(&ev["event"]),
        rest.join(" ")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "vioctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let sock = cli
        .run_dir
        .clone()
        .unwrap_or_else(default_run_dir)
        .join("control.sock");
    if let Cmd::Monitor = cli.cmd {
        return monitor(&sock, cli.json);
    }
    let (cmd, args) = match request(&cli.cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vioctl: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = match call(&sock, &cmd, args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vioctl: {e}");
            return ExitCode::from(2);
        }
    };
    if answer["ok"].as_bool() != Some(true) {
        if cli.json {
            println!("{answer}");
        }
        eprintln!(
            "vioctl: {} ({})",
            cell(&answer["error"]["message"]),
            cell(&answer["error"]["code"])
        );
        return ExitCode::from(1);
    }
    if cli.json {
        println!("{}", answer["result"]);
    } else {
        print_human(&cli.cmd, &answer["result"]);
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The request a command line sends.
    fn req(argv: &[&str]) -> (String, Value) {
        let cli = Cli::try_parse_from(std::iter::once("vioctl").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        request(&cli.cmd).unwrap()
    }

    fn refused(argv: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("vioctl").chain(argv.iter().copied())).is_err()
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("67108864"), Ok(64 << 20));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for bad in [
            "",
            "10X",
            "G",
            "-1",
            "1.5G",
            "10 G",
            "10GB",
            "0x10",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("10X").unwrap_err().contains("10G"));
    }

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(5 << 40), "5 TiB");
        assert_eq!(human_size(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn disk_add_sends_only_what_is_given() {
        assert_eq!(
            req(&["disk", "add", "d0", "--path", "/img/a.raw"]),
            (
                "disk.add".into(),
                json!({ "name": "d0", "path": "/img/a.raw" })
            )
        );
        let (cmd, args) = req(&[
            "disk",
            "add",
            "d1",
            "--path",
            "/dev/vg0/d1",
            "--readonly",
            "--direct",
            "--serial",
            "SN-1",
            "--queues",
            "4",
            "--queue-size",
            "128",
            "--block-size",
            "4096",
            "--socket",
            "/s/d1.sock",
            "--mode",
            "client",
            "--worker",
            "1",
            "--owner",
            "libvirt-qemu",
            "--group",
            "kvm",
            "--perm",
            "0600",
        ]);
        assert_eq!(cmd, "disk.add");
        assert_eq!(
            args,
            json!({
                "name": "d1", "path": "/dev/vg0/d1", "readonly": true, "direct": true,
                "serial": "SN-1", "queues": 4, "queue_size": 128, "block_size": 4096,
                "socket": "/s/d1.sock", "mode": "client", "worker": 1,
                "owner": "libvirt-qemu", "group": "kvm", "perm": "0600",
            })
        );
    }

    #[test]
    fn disk_add_makes_the_path_absolute() {
        let (_, args) = req(&["disk", "add", "d0", "--path", "x.img"]);
        let want = std::env::current_dir().unwrap().join("x.img");
        assert_eq!(args["path"], json!(want));
    }

    #[test]
    fn disk_add_refuses_bad_arguments() {
        assert!(refused(&["disk", "add", "d0"]));
        assert!(refused(&[
            "disk",
            "add",
            "d0",
            "--path",
            "/x",
            "--block-size",
            "1024"
        ]));
        assert!(refused(&[
            "disk", "add", "d0", "--path", "/x", "--queues", "x"
        ]));
        assert!(refused(&[
            "disk", "add", "d0", "--path", "/x", "--mode", "both"
        ]));
        assert_eq!(
            req(&["disk", "add", "d0", "--path", "/x", "--block-size", "512"]).1["block_size"],
            json!(512)
        );
    }

    #[test]
    fn disk_resize_and_the_rest() {
        assert_eq!(
            req(&["disk", "resize", "d0", "--size", "10G", "--shrink"]),
            (
                "disk.resize".into(),
                json!({ "name": "d0", "size": 10u64 << 30, "shrink": true })
            )
        );
        assert_eq!(
            req(&["disk", "resize", "d0"]),
            ("disk.resize".into(), json!({ "name": "d0" }))
        );
        assert!(refused(&["disk", "resize", "d0", "--size", "10X"]));
        assert_eq!(req(&["disk", "list"]), ("disk.list".into(), json!({})));
        assert_eq!(
            req(&["disk", "show", "d0"]),
            ("disk.show".into(), json!({ "name": "d0" }))
        );
        assert_eq!(req(&["disk", "stats"]), ("disk.stats".into(), json!({})));
        assert_eq!(
            req(&["disk", "stats", "d0"]),
            ("disk.stats".into(), json!({ "name": "d0" }))
        );
        assert_eq!(
            req(&["disk", "del", "d0"]),
            ("disk.del".into(), json!({ "name": "d0" }))
        );
    }

    #[test]
    fn port_add_is_unchanged() {
        assert_eq!(
            req(&[
                "port", "add", "vm1", "--queues", "2", "--vlan", "10", "--mtu", "9000", "--socket",
                "/s.sock", "--mode", "server", "--worker", "0", "--perm", "0660",
            ]),
            (
                "port.add".into(),
                json!({
                    "name": "vm1", "queues": 2, "vlan": 10, "mtu": 9000, "socket": "/s.sock",
                    "mode": "server", "worker": 0, "perm": "0660",
                })
            )
        );
        assert_eq!(req(&["port", "stats"]), ("port.stats".into(), json!({})));
        assert_eq!(
            req(&["fdb", "show", "--port", "vm1"]),
            ("fdb.show".into(), json!({ "port": "vm1" }))
        );
    }

    #[test]
    fn identity_commands_send_what_is_given() {
        let add = [
            "identity",
            "add",
            "web",
            "--mac",
            "52:54:00:00:00:10",
            "--ip",
            "192.0.2.10",
        ];
        assert_eq!(
            req(&add),
            (
                "identity.add".into(),
                json!({ "name": "web", "mac": "52:54:00:00:00:10", "ips": ["192.0.2.10"] })
            )
        );
        let more = [
            "--ip",
            "2001:db8::10",
            "--vlan",
            "10",
            "--standby",
            "b",
            "--standby",
            "a",
            "--stall-ms",
            "200",
        ];
        assert_eq!(
            req(&[&add[..], &more[..]].concat()).1,
            json!({
                "name": "web", "mac": "52:54:00:00:00:10", "ips": ["192.0.2.10", "2001:db8::10"],
                "vlan": 10, "standby": ["b", "a"], "stall_ms": 200,
            })
        );
        assert_eq!(
            req(&["identity", "bind", "web", "vm1"]),
            (
                "identity.bind".into(),
                json!({ "name": "web", "port": "vm1" })
            )
        );
        assert_eq!(
            req(&["identity", "move", "web", "--to", "vm2"]),
            (
                "identity.move".into(),
                json!({ "name": "web", "to": "vm2" })
            )
        );
        for (cmd, argv) in [
            ("identity.del", &["identity", "del", "web"][..]),
            ("identity.show", &["identity", "show", "web"]),
            ("identity.unbind", &["identity", "unbind", "web"]),
        ] {
            assert_eq!(req(argv), (cmd.into(), json!({ "name": "web" })));
        }
        assert_eq!(
            req(&["identity", "list"]),
            ("identity.list".into(), json!({}))
        );
        assert_eq!(
            req(&[
                "identity",
                "set",
                "web",
                "--standby",
                "c",
                "--stall-ms",
                "0"
            ]),
            (
                "identity.set".into(),
                json!({ "name": "web", "standby": ["c"], "stall_ms": 0 })
            )
        );
        assert_eq!(
            req(&["identity", "set", "web", "--no-standby"]).1,
            json!({ "name": "web", "standby": [] })
        );
        assert_eq!(req(&["identity", "set", "web"]).1, json!({ "name": "web" }));
        for bad in [
            &["identity", "add", "web", "--mac", "52:54:00:00:00:10"][..],
            &["identity", "add", "web", "--ip", "192.0.2.1"],
            &["identity", "move", "web", "vm2"],
            &["identity", "bind", "web"],
            &["identity", "set", "web", "--standby", "a", "--no-standby"],
            &["identity", "set", "web", "--stall-ms", "-1"],
        ] {
            assert!(refused(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn port_identity_options() {
        assert_eq!(
            req(&[
                "port",
                "add",
                "r1",
                "--trusted",
                "--guest-mac",
                "52:54:00:00:00:22",
                "--map-ip",
                "192.0.2.10=10.0.0.2",
                "--map-ip",
                "192.0.2.11=10.0.0.3",
            ])
            .1,
            json!({
                "name": "r1", "trusted": true, "guest_mac": "52:54:00:00:00:22",
                "ip_map": ["192.0.2.10=10.0.0.2", "192.0.2.11=10.0.0.3"],
            })
        );
        assert_eq!(
            req(&[
                "port",
                "set",
                "r1",
                "--untrusted",
                "--no-guest-mac",
                "--no-map-ip"
            ])
            .1,
            json!({ "name": "r1", "trusted": false, "guest_mac": null, "ip_map": [] })
        );
        assert_eq!(
            req(&[
                "port",
                "set",
                "r1",
                "--trusted",
                "--map-ip",
                "192.0.2.10=10.0.0.2"
            ])
            .1,
            json!({ "name": "r1", "trusted": true, "ip_map": ["192.0.2.10=10.0.0.2"] })
        );
        assert_eq!(req(&["port", "set", "r1"]).1, json!({ "name": "r1" }));
        for bad in [
            &["port", "set", "r1", "--trusted", "--untrusted"][..],
            &[
                "port",
                "set",
                "r1",
                "--guest-mac",
                "52:54:00:00:00:22",
                "--no-guest-mac",
            ],
            &["port", "set", "r1", "--map-ip", "a=b", "--no-map-ip"],
        ] {
            assert!(refused(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn identities_are_readable() {
        let web = json!({
            "name": "web", "mac": "52:54:00:00:00:10", "ips": ["192.0.2.10", "2001:db8::10"],
            "vlan": 0, "port": "vm1", "health": "healthy", "stall_ms": 1000,
            "standby": [{ "port": "vm2", "health": "healthy" }, { "port": "vm3", "health": "disconnected" }],
            "failover_pending": null,
        });
        assert_eq!(
            identity_lines(&web),
            [
                "name      web",
                "mac       52:54:00:00:00:10",
                "ips       192.0.2.10, 2001:db8::10",
                "vlan      0",
                "port      vm1 (healthy)",
                "standby   vm2 (healthy), vm3 (disconnected)",
                "stall_ms  1000",
            ]
        );
        let db = json!({
            "name": "db", "mac": "52:54:00:00:00:11", "ips": ["192.0.2.11"], "vlan": 5,
            "port": "vm4", "health": "disconnected", "stall_ms": 0,
            "standby": [{ "port": "vm5", "health": "broken" }], "failover_pending": "disconnected",
        });
        assert_eq!(
            identity_lines(&db).last().unwrap(),
            "failover  pending (disconnected): no standby is healthy"
        );
        let spare = json!({
            "name": "spare", "mac": "52:54:00:00:00:12", "ips": ["192.0.2.12"], "vlan": 0,
            "port": null, "health": null, "stall_ms": 1000, "standby": [], "failover_pending": null,
        });
        let rows: Vec<Value> = [web, spare].iter().map(identity_row).collect();
        assert_eq!(
            table_lines(&rows, &["name", "port", "standby"]),
            [
                "NAME   PORT           STANDBY",
                "web    vm1 (healthy)  vm2 (healthy), vm3 (disconnected)",
                "spare  -              -",
            ]
        );
    }

    #[test]
    fn identity_events_are_readable() {
        let moved = json!({
            "event": "identity.moved", "time": 1.5, "identity": "web",
            "from": "vm1", "to": "vm2", "reason": "disconnected",
        });
        assert_eq!(
            event_line(&moved),
            "1.500  identity.moved           from=vm1 identity=web reason=disconnected to=vm2"
        );
        let failed = json!({
            "event": "identity.failover_failed", "time": 2.0, "identity": "web", "port": "vm1",
            "reason": "rx_stalled",
            "standby": [{ "port": "vm2", "health": "disconnected" }, { "port": "vm3", "health": "broken" }],
        });
        assert_eq!(
            event_line(&failed),
            "2.000  identity.failover_failed identity=web port=vm1 reason=rx_stalled \
             standby=vm2(disconnected),vm3(broken)"
        );
        assert_eq!(
            event_line(
                &json!({ "event": "port.added", "time": 0.25, "port": "vm1", "kind": "port" })
            ),
            "0.250  port.added               kind=port port=vm1"
        );
    }

    #[test]
    fn rates_take_decimal_suffixes() {
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("1500"), Ok(1500));
        assert_eq!(parse_rate("10k"), Ok(10_000));
        assert_eq!(parse_rate("10K"), Ok(10_000));
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("25g"), Ok(25_000_000_000));
        assert_eq!(parse_rate("1T"), Ok(1_000_000_000_000));
        for bad in ["", "M", "1.5M", "10Mi", "10 M", "-1", "10x", "99999999999T"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_rate("10x").unwrap_err().contains("100M"));
        assert_eq!(human_rate(100_000_000, "bit/s"), "100 Mbit/s");
        assert_eq!(human_rate(1_500_000_000, "bit/s"), "1.5 Gbit/s");
        assert_eq!(human_rate(999, "op/s"), "999 op/s");
        assert_eq!(human_rate(10_000, "pkt/s"), "10 kpkt/s");
    }

    #[test]
    fn qos_set_sends_only_what_is_given() {
        assert_eq!(
            req(&["qos", "set", "vm1", "--ingress-rate", "100M"]),
            (
                "qos.set".into(),
                json!({ "name": "vm1", "ingress": { "rate": 100_000_000 } })
            )
        );
        assert_eq!(
            req(&["qos", "set", "vm1"]),
            ("qos.set".into(), json!({ "name": "vm1" }))
        );
        let (cmd, args) = req(&[
            "qos",
            "set",
            "vm1",
            "--ingress-rate",
            "1G",
            "--ingress-burst",
            "1M",
            "--ingress-peak",
            "2G",
            "--ingress-peak-burst",
            "64K",
            "--ingress-mode",
            "shape",
            "--ingress-unit",
            "bits",
            "--egress-rate",
            "10k",
            "--egress-unit",
            "packets",
            "--egress-mode",
            "police",
            "--egress-burst",
            "32",
            "--egress-queue",
            "1M",
            "--weight",
            "5",
        ]);
        assert_eq!(cmd, "qos.set");
        assert_eq!(
            args,
            json!({
                "name": "vm1",
                "ingress": {
                    "rate": 1_000_000_000u64, "burst": 1 << 20, "peak": 2_000_000_000u64,
                    "peak_burst": 64 << 10, "mode": "shape", "unit": "bits",
                },
                "egress": { "rate": 10_000, "unit": "packets", "mode": "police", "burst": 32 },
                "egress_queue": 1 << 20,
                "weight": 5,
            })
        );
        let (_, args) = req(&[
            "qos",
            "set",
            "d0",
            "--read-iops",
            "2k",
            "--read-iops-burst",
            "4000",
            "--write-iops",
            "500",
            "--write-iops-burst",
            "50",
            "--iops",
            "3000",
            "--iops-burst",
            "10",
            "--read-bps",
            "100M",
            "--read-bps-burst",
            "1G",
            "--write-bps",
            "50M",
            "--write-bps-burst",
            "64M",
            "--bps",
            "120M",
            "--bps-burst",
            "2G",
            "--io-size",
            "64K",
        ]);
        assert_eq!(
            args,
            json!({
                "name": "d0",
                "read_iops": { "rate": 2000, "burst": 4000 },
                "write_iops": { "rate": 500, "burst": 50 },
                "iops": { "rate": 3000, "burst": 10 },
                "read_bps": { "rate": 100u64 << 20, "burst": 1u64 << 30 },
                "write_bps": { "rate": 50u64 << 20, "burst": 64u64 << 20 },
                "bps": { "rate": 120u64 << 20, "burst": 2u64 << 30 },
                "io_size": 64 << 10,
            })
        );
        for bad in [
            &["qos", "set", "vm1", "--ingress-rate", "1.5M"][..],
            &["qos", "set", "vm1", "--ingress-mode", "drop"],
            &["qos", "set", "vm1", "--egress-unit", "bytes"],
            &["qos", "set", "vm1", "--weight", "1k"],
            &["qos", "set", "vm1", "--egress-queue", "10X"],
            &["qos", "set", "--weight", "3"],
            &["qos", "set", "vm1", "--ingress-rate"],
        ] {
            assert!(refused(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn qos_show_and_clear() {
        assert_eq!(req(&["qos", "show"]), ("qos.show".into(), json!({})));
        assert_eq!(
            req(&["qos", "show", "vm1"]),
            ("qos.show".into(), json!({ "name": "vm1" }))
        );
        assert_eq!(
            req(&["qos", "clear", "vm1"]),
            ("qos.clear".into(), json!({ "name": "vm1" }))
        );
        assert_eq!(
            req(&["qos", "clear", "vm1", "ingress", "egress.peak"]),
            (
                "qos.clear".into(),
                json!({ "name": "vm1", "fields": ["ingress", "egress.peak"] })
            )
        );
        assert!(refused(&["qos", "clear"]));
    }

    #[test]
    fn qos_tables_are_readable() {
        let q = json!({
            "ingress": { "rate": 100_000_000, "mode": "shape", "unit": "bits", "burst": 1 << 20 },
            "egress": { "rate": 10_000, "mode": "police", "unit": "packets", "peak": 20_000, "peak_burst": 4 },
            "egress_queue": 1 << 20,
            "weight": 3,
        });
        assert_eq!(
            qos_limit_lines(&q),
            [
                "LIMIT    MODE    RATE        BURST  PEAK       PEAK_BURST",
                "ingress  shape   100 Mbit/s  1 MiB  -          -",
                "egress   police  10 kpkt/s   -      20 kpkt/s  4 pkt",
                "egress_queue  1 MiB",
                "weight        3",
            ]
        );
        let d = json!({ "read_iops": { "rate": 2000, "burst": 50 }, "bps": { "rate": 100 << 20 }, "io_size": 65536 });
        assert_eq!(
            qos_limit_lines(&d),
            [
                "LIMIT      RATE       BURST",
                "read_iops  2 kop/s    50 op",
                "bps        100 MiB/s  -",
                "io_size       64 KiB",
            ]
        );
        assert_eq!(qos_limit_lines(&json!({})), ["no limits"]);
        let e = json!({
            "name": "vm1", "kind": "port", "qos": { "weight": 2 },
            "counters": {
                "ingress_packets": 10, "ingress_bytes": 15000, "ingress_throttled_ns": 2_500_000,
                "egress_packets": 3, "egress_bytes": 180, "egress_throttled_ns": 0,
                "ingress_policed": 1, "egress_policed": 2, "egress_queue_full": 4,
            },
        });
        assert_eq!(
            qos_entry_lines(&e),
            [
                "vm1 (port):",
                "  no limits",
                "  weight        2",
                "  PASSED   PACKETS  BYTES  THROTTLED_MS  POLICED  QUEUE_FULL",
                "  ingress  10       15000  2.500         1        -",
                "  egress   3        180    0.000         2        4",
            ]
        );
        let e = json!({
            "name": "d0", "kind": "disk", "qos": {},
            "counters": { "ops": { "read": 7 }, "bytes": { "read": 4096 }, "throttled_ns": 1_000_000 },
        });
        assert_eq!(
            qos_entry_lines(&e),
            [
                "d0 (disk):",
                "  no limits",
                "  REQUEST  OPS  BYTES",
                "  read     7    4096",
                "  throttled_ms  1.000",
            ]
        );
    }

    #[test]
    fn disk_list_rows_are_readable() {
        let d = json!({ "name": "d0", "size": 64u64 << 20, "readonly": true });
        let r = disk_row(&d);
        assert_eq!(
            (r["size"].clone(), r["ro"].clone()),
            (json!("64 MiB"), json!(true))
        );
        assert_eq!(
            disk_size(&d, true),
            json!(format!("64 MiB ({} bytes)", 64u64 << 20))
        );
        let lines = table_lines(&[r], &["name", "size", "ro"]);
        assert_eq!(lines, ["NAME  SIZE    RO", "d0    64 MiB  true"]);
    }
}
