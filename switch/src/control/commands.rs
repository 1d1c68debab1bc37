//! The control commands. Adding one is one match arm and one function.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ControlError, PROTOCOL_VERSION};
use crate::config::ConfigError;
use crate::daemon::{mac_string, Switch, SwitchError};
use crate::disk::DiskSpec;
use crate::identity::addr::{host_ip, IpMapping, MacAddr};
use crate::identity::failover::DEFAULT_STALL_MS;
use crate::identity::registry::{IdentityError, IdentitySpec};
use crate::port::{Port, PortChanges, PortError, PortMode, PortSpec, PortTable};
use crate::qos::{QosError, QosSpec};
use crate::stats::DropReason;

/// Every command, for `switch.info`. `events.subscribe` is served by the
/// connection itself (it turns the connection into an event stream).
pub const COMMANDS: &[&str] = &[
    "switch.info",
    "port.add",
    "port.del",
    "port.set",
    "port.list",
    "port.show",
    "port.stats",
    "disk.add",
    "disk.del",
    "disk.list",
    "disk.show",
    "disk.stats",
    "disk.resize",
    "qos.set",
    "qos.show",
    "qos.clear",
    "fdb.show",
    "fdb.flush",
    "fdb.add",
    "fdb.del",
    "worker.list",
    "worker.move",
    "worker.rebalance",
    "config.show",
    "config.save",
    "identity.add",
    "identity.del",
    "identity.list",
    "identity.show",
    "identity.bind",
    "identity.unbind",
    "identity.move",
    "identity.set",
    "events.subscribe",
];

/// Run one command. A command that changes the switch saves the running
/// configuration before it answers.
pub fn dispatch(sw: &Switch, cmd: &str, args: Value) -> Result<Value, ControlError> {
    let result = match cmd {
        "switch.info" | "hello" => return switch_info(sw, parse(args)?),
        "port.list" => return port_list(sw, parse(args)?),
        "port.show" => return port_show(sw, parse(args)?),
        "port.stats" => return port_stats(sw, parse(args)?),
        "disk.list" => return disk_list(sw, parse(args)?),
        "disk.show" => return disk_show(sw, parse(args)?),
        "disk.stats" => return disk_stats(sw, parse(args)?),
        "qos.show" => return qos_show(sw, parse(args)?),
        "fdb.show" => return fdb_show(sw, parse(args)?),
        "fdb.flush" => return fdb_flush(sw, parse(args)?),
        "worker.list" => return worker_list(sw, parse(args)?),
        "config.show" => return config_show(sw, parse(args)?),
        "config.save" => return config_save(sw, parse(args)?),
        "identity.list" => return identity_list(sw, parse(args)?),
        "identity.show" => return identity_show(sw, parse(args)?),
        "port.add" => port_add(sw, parse(args)?),
        "port.del" => port_del(sw, parse(args)?),
        "port.set" => port_set(sw, parse(args)?),
        "disk.add" => disk_add(sw, parse(args)?),
        "disk.del" => disk_del(sw, parse(args)?),
        "disk.resize" => disk_resize(sw, parse(args)?),
        "qos.set" => qos_set(sw, parse(args)?),
        "qos.clear" => qos_clear(sw, parse(args)?),
        "fdb.add" => fdb_add(sw, parse(args)?),
        "fdb.del" => fdb_del(sw, parse(args)?),
        "worker.move" => worker_move(sw, parse(args)?),
        "worker.rebalance" => worker_rebalance(sw, parse(args)?),
        "identity.add" => identity_add(sw, parse(args)?),
        "identity.del" => identity_del(sw, parse(args)?),
        "identity.bind" => identity_bind(sw, parse(args)?),
        "identity.unbind" => identity_unbind(sw, parse(args)?),
        "identity.move" => identity_move(sw, parse(args)?),
        "identity.set" => identity_set(sw, parse(args)?),
        _ => {
            return Err(ControlError::new(
                "unknown_command",
                format!("unknown command {cmd:?}; `switch.info` lists the commands"),
            ))
        }
    }?;
    sw.save().map_err(|e| {
        ControlError::new(
            "internal",
            format!("the change was made but the configuration could not be saved: {e}"),
        )
    })?;
    Ok(result)
}

fn parse<T: DeserializeOwned>(args: Value) -> Result<T, ControlError> {
    serde_json::from_value(args)
        .map_err(|e| ControlError::new("invalid_argument", format!("bad arguments: {e}")))
}

impl From<PortError> for ControlError {
    fn from(e: PortError) -> Self {
        let code = match &e {
            PortError::InvalidName(_)
            | PortError::BadQueues(_)
            | PortError::BadVlan(_)
            | PortError::BadMtu(_)
            | PortError::BadPerm(_)
            | PortError::NoSuchUser(_)
            | PortError::NoSuchGroup(_) => "invalid_argument",
            PortError::Chown { .. } => "socket_error",
            PortError::Exists(_) | PortError::SocketTaken(..) => "exists",
            PortError::NotFound(_) => "not_found",
            PortError::SocketInUse(_) | PortError::NotASocket(_) | PortError::Bind { .. } => {
                "socket_error"
            }
            PortError::TooManyPorts => "limit",
            PortError::IsADisk(_) | PortError::NotADisk(_) => "wrong_kind",
            PortError::Disk(crate::disk::DiskError::Backing(b)) => match b {
                crate::blk::BackingError::Missing(_) => "not_found",
                crate::blk::BackingError::Permission { .. } => "permission_denied",
                crate::blk::BackingError::Open { .. }
                | crate::blk::BackingError::Size { .. }
                | crate::blk::BackingError::Resize { .. } => "io_error",
                _ => "invalid_argument",
            },
            PortError::Disk(crate::disk::DiskError::BackingInUse { .. }) => "exists",
            PortError::Disk(_) => "invalid_argument",
            PortError::Qos(_) | PortError::Addr(_) => "invalid_argument",
            PortError::Dataplane(crate::dataplane::DataplaneError::NoSuchWorker(..)) => {
                "invalid_argument"
            }
            PortError::Thread(_) | PortError::Dataplane(_) => "internal",
        };
        ControlError::new(code, e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArg {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptNameArg {
    #[serde(default)]
    name: Option<String>,
}

impl From<SwitchError> for ControlError {
    fn from(e: SwitchError) -> Self {
        match e {
            SwitchError::Port(p) => p.into(),
            SwitchError::BadMac(_) | SwitchError::MulticastMac(_) => {
                ControlError::new("invalid_argument", e.to_string())
            }
            SwitchError::NoStatic(..) => ControlError::new("not_found", e.to_string()),
            SwitchError::Identity(i) => i.into(),
            SwitchError::FdbFull => ControlError::new("limit", e.to_string()),
            other => ControlError::new("internal", other.to_string()),
        }
    }
}

impl From<IdentityError> for ControlError {
    fn from(e: IdentityError) -> Self {
        let code = match &e {
            IdentityError::InvalidName(_)
            | IdentityError::Addr(_)
            | IdentityError::NoIps
            | IdentityError::TooManyIps(_)
            | IdentityError::IpTwice(_)
            | IdentityError::BadVlan(_)
            | IdentityError::BadStall(_)
            | IdentityError::TooManyStandby(_)
            | IdentityError::StandbyTwice(_) => "invalid_argument",
            IdentityError::Exists(_) => "exists",
            IdentityError::NotFound(_) | IdentityError::NoPort(_) => "not_found",
            IdentityError::TooMany | IdentityError::FdbFull(_) => "limit",
            IdentityError::NotNet(_) => "wrong_kind",
            IdentityError::MacTaken { .. }
            | IdentityError::IpTaken { .. }
            | IdentityError::VlanMismatch { .. }
            | IdentityError::Bound(..)
            | IdentityError::NotBound(_)
            | IdentityError::PortInUse { .. }
            | IdentityError::StaticEntry { .. }
            | IdentityError::OwnedMac { .. } => "conflict",
        };
        ControlError::new(code, e.to_string())
    }
}

impl From<ConfigError> for ControlError {
    fn from(e: ConfigError) -> Self {
        ControlError::new("io_error", e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortAddArgs {
    name: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    mode: Option<PortMode>,
    #[serde(default)]
    queues: Option<u16>,
    #[serde(default)]
    vlan: Option<u16>,
    #[serde(default)]
    mtu: Option<u16>,
    #[serde(default)]
    worker: Option<usize>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    perm: Option<String>,
    #[serde(default)]
    trusted: bool,
    #[serde(default)]
    guest_mac: Option<MacAddr>,
    #[serde(default)]
    ip_map: Vec<IpMapping>,
}

fn switch_info(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    Ok(json!({
        "name": "vioswitch",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": PROTOCOL_VERSION,
        "uptime_s": sw.uptime().as_secs_f64(),
        "pid": std::process::id(),
        "run_dir": sw.run_dir(),
        "workers": sw.dataplane().worker_count(),
        "ports": sw.ports().iter().count(),
        "features": [
            "net",
            "blk",
            "client-mode",
            "persistence",
            "events",
            "access-control",
            "qos",
            "identity"
        ],
        "commands": super::commands::COMMANDS,
    }))
}

fn port_add(sw: &Switch, a: PortAddArgs) -> Result<Value, ControlError> {
    crate::port::validate_name(&a.name)?;
    let socket = a
        .socket
        .unwrap_or_else(|| sw.run_dir().join(format!("{}.sock", a.name)));
    let mode = a.mode.unwrap_or_default();
    let spec = PortSpec {
        queue_pairs: a.queues.unwrap_or(1),
        vlan: a.vlan.unwrap_or(0),
        mtu: a.mtu,
        worker: a.worker,
        mode,
        owner: a.owner,
        group: a.group,
        perm: a.perm,
        trusted: a.trusted,
        guest_mac: a.guest_mac,
        ip_map: a.ip_map,
        ..PortSpec::server(&a.name, socket)
    };
    let info = sw.ports().add(spec)?;
    sw.settle_port_name(&info.name);
    Ok(json!(info))
}

/// The port `name`, refused if it is a disk.
fn net_port(ports: &PortTable, name: &str) -> Result<(), PortError> {
    if ports.get(name)?.disk().is_some() {
        return Err(PortError::IsADisk(name.to_string()));
    }
    Ok(())
}

fn port_del(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    if sw.is_unrestored(&a.name) {
        // A saved port that could not be restored: forget it.
        sw.settle_port_name(&a.name);
        return Ok(json!({}));
    }
    sw.remove_port(&a.name)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSetArgs {
    name: String,
    #[serde(flatten)]
    changes: PortChanges,
}

fn port_set(sw: &Switch, a: PortSetArgs) -> Result<Value, ControlError> {
    Ok(json!(sw.set_port(&a.name, a.changes)?))
}

fn port_list(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    let ports = sw.ports();
    Ok(json!(ports
        .iter()
        .filter(|p| p.disk().is_none())
        .map(PortTable::info)
        .collect::<Vec<_>>()))
}

fn port_show(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    net_port(&ports, &a.name)?;
    let p = ports.get(&a.name)?;
    let mut v = json!(PortTable::info(p));
    v["stats"] = json!(p.stats.snapshot());
    Ok(v)
}

fn port_stats(sw: &Switch, a: OptNameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    match a.name {
        Some(n) => {
            net_port(&ports, &n)?;
            Ok(json!(ports.get(&n)?.stats.snapshot()))
        }
        None => Ok(Value::Object(
            ports
                .iter()
                .filter(|p| p.disk().is_none())
                .map(|p| (p.spec.name.clone(), json!(p.stats.snapshot())))
                .collect(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskAddArgs {
    name: String,
    path: PathBuf,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    mode: Option<PortMode>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    queues: Option<u16>,
    #[serde(default)]
    queue_size: Option<u16>,
    #[serde(default)]
    block_size: Option<u32>,
    #[serde(default)]
    worker: Option<usize>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    perm: Option<String>,
}

fn disk_add(sw: &Switch, a: DiskAddArgs) -> Result<Value, ControlError> {
    crate::port::validate_name(&a.name)?;
    let socket = a
        .socket
        .unwrap_or_else(|| sw.run_dir().join(format!("{}.sock", a.name)));
    let defaults = DiskSpec::new(&a.name, a.path, socket);
    let spec = DiskSpec {
        mode: a.mode.unwrap_or_default(),
        readonly: a.readonly,
        direct: a.direct,
        serial: a.serial,
        queues: a.queues.unwrap_or(defaults.queues),
        queue_size: a.queue_size.unwrap_or(defaults.queue_size),
        block_size: a.block_size.unwrap_or(defaults.block_size),
        worker: a.worker,
        owner: a.owner,
        group: a.group,
        perm: a.perm,
        ..defaults
    };
    let info = sw.ports().add_disk(spec)?;
    sw.settle_port_name(&info.name);
    Ok(json!(info))
}

/// The disk `name`, refused if it is a net port.
fn disk_port<'a>(ports: &'a PortTable, name: &str) -> Result<&'a crate::port::Port, PortError> {
    let p = ports.get(name)?;
    if p.disk().is_none() {
        return Err(PortError::NotADisk(name.to_string()));
    }
    Ok(p)
}

fn disk_del(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    if sw.is_unrestored(&a.name) {
        sw.settle_port_name(&a.name);
        return Ok(json!({}));
    }
    let mut ports = sw.ports();
    disk_port(&ports, &a.name)?;
    ports.remove(&a.name)?;
    Ok(json!({}))
}

fn disk_list(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    let ports = sw.ports();
    Ok(json!(ports
        .iter()
        .filter_map(PortTable::disk_info)
        .collect::<Vec<_>>()))
}

fn disk_show(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    let p = disk_port(&ports, &a.name)?;
    let mut v = json!(PortTable::disk_info(p));
    v["stats"] = json!(ports.disk_stats(&a.name)?.snapshot());
    Ok(v)
}

fn disk_stats(sw: &Switch, a: OptNameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    match a.name {
        Some(n) => Ok(json!(ports.disk_stats(&n)?.snapshot())),
        None => Ok(Value::Object(
            ports
                .iter()
                .filter_map(|p| {
                    p.disk()
                        .map(|d| (p.spec.name.clone(), json!(d.disk.stats.snapshot())))
                })
                .collect(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskResizeArgs {
    name: String,
    /// New size in bytes (files); absent: re-read the size (block devices,
    /// or a file grown by someone else).
    #[serde(default)]
    size: Option<u64>,
    /// Allow making the disk smaller.
    #[serde(default)]
    shrink: bool,
}

fn disk_resize(sw: &Switch, a: DiskResizeArgs) -> Result<Value, ControlError> {
    let size = sw.ports().resize_disk(&a.name, a.size, a.shrink)?;
    Ok(json!({ "size": size }))
}

/// QoS fields of net ports only, of disks only; `weight` is both's.
const QOS_NET_FIELDS: [&str; 3] = ["ingress", "egress", "egress_queue"];
const QOS_DISK_FIELDS: [&str; 7] = [
    "read_iops",
    "write_iops",
    "iops",
    "read_bps",
    "write_bps",
    "bps",
    "io_size",
];
/// Parts of a net limit and of a disk rate that `qos.clear` may clear
/// alone (`rate` goes with the limit).
const QOS_NET_LIMIT_PARTS: [&str; 5] = ["mode", "unit", "burst", "peak", "peak_burst"];
const QOS_RATE_PARTS: [&str; 1] = ["burst"];

fn invalid(msg: impl Into<String>) -> ControlError {
    ControlError::new("invalid_argument", msg)
}

/// A QoS spec from its JSON form, refused (`invalid_argument`) with what to
/// fix if a limit has no rate or a field is unknown or mistyped.
fn qos_from_json(v: Value) -> Result<QosSpec, ControlError> {
    if let Some((k, _)) = v
        .as_object()
        .into_iter()
        .flatten()
        .find(|(_, l)| l.as_object().is_some_and(|l| !l.contains_key("rate")))
    {
        return Err(invalid(format!(
            "{k}: give its rate (there is no {k} limit to change)"
        )));
    }
    serde_json::from_value(v.clone()).map_err(|e| {
        // Name the field at fault: the first that is refused alone.
        let culprit = v.as_object().into_iter().flatten().find_map(|(k, f)| {
            serde_json::from_value::<QosSpec>(json!({ k: f }))
                .err()
                .map(|e| format!("{k}: {e}"))
        });
        invalid(format!(
            "bad QoS setting: {}",
            culprit.unwrap_or(e.to_string())
        ))
    })
}

/// Apply a JSON merge patch (RFC 7396): objects merge field by field, null
/// removes a field, anything else replaces.
fn merge_patch(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(&k);
            } else {
                merge_patch(t.entry(k).or_insert(Value::Null), v);
            }
        }
    }
}

/// Validate `qos` for port `name` and apply it.
fn apply_qos(ports: &mut PortTable, name: &str, qos: QosSpec) -> Result<Value, ControlError> {
    let disk = ports.get(name)?.disk().is_some();
    qos.validate(disk).map_err(PortError::from)?;
    Ok(json!(ports.set_qos(name, qos)?))
}

#[derive(Deserialize)]
struct QosSetArgs {
    name: String,
    /// The QoS fields, merged into the current ones.
    #[serde(flatten)]
    patch: serde_json::Map<String, Value>,
}

fn qos_set(sw: &Switch, a: QosSetArgs) -> Result<Value, ControlError> {
    let mut ports = sw.ports();
    let mut v = json!(ports.get(&a.name)?.spec.qos);
    merge_patch(&mut v, Value::Object(a.patch));
    let qos = qos_from_json(v)?;
    apply_qos(&mut ports, &a.name, qos)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QosClearArgs {
    name: String,
    /// Fields to clear (`ingress`, `ingress.peak`, ...); absent: all.
    #[serde(default)]
    fields: Option<Vec<String>>,
}

/// Check a field name `qos.clear` was given for a port of that kind (`disk`).
fn qos_clear_field(field: &str, disk: bool) -> Result<(&str, Option<&str>), ControlError> {
    let (top, part) = match field.split_once('.') {
        Some((t, p)) => (t, Some(p)),
        None => (field, None),
    };
    let net = QOS_NET_FIELDS.iter().find(|f| **f == top);
    let dsk = QOS_DISK_FIELDS.iter().find(|f| **f == top);
    if net.is_none() && dsk.is_none() && top != "weight" {
        return Err(invalid(format!(
            "unknown QoS field {field:?}: the fields are {}, {} and weight",
            QOS_NET_FIELDS.join(", "),
            QOS_DISK_FIELDS.join(", ")
        )));
    }
    match (net, dsk) {
        (Some(f), _) if disk => return Err(PortError::from(QosError::NetOnly(f)).into()),
        (_, Some(f)) if !disk => return Err(PortError::from(QosError::DiskOnly(f)).into()),
        _ => {}
    }
    let Some(part) = part else {
        return Ok((top, None));
    };
    let parts: &[&str] = match top {
        "ingress" | "egress" => &QOS_NET_LIMIT_PARTS,
        "egress_queue" | "io_size" | "weight" => &[],
        _ => &QOS_RATE_PARTS,
    };
    if parts.contains(&part) {
        return Ok((top, Some(part)));
    }
    Err(invalid(if part == "rate" {
        format!("{field}: a limit's rate cannot be cleared alone; clear {top} to lift the limit")
    } else if parts.is_empty() {
        format!("{top} has no parts: clear {top}")
    } else {
        format!(
            "unknown QoS field {field:?}: {top} has {}",
            parts.join(", ")
        )
    }))
}

fn qos_clear(sw: &Switch, a: QosClearArgs) -> Result<Value, ControlError> {
    let mut ports = sw.ports();
    let p = ports.get(&a.name)?;
    let Some(fields) = a.fields else {
        return apply_qos(&mut ports, &a.name, QosSpec::default());
    };
    let disk = p.disk().is_some();
    let mut v = json!(p.spec.qos);
    for f in &fields {
        let (top, part) = qos_clear_field(f, disk)?;
        if let Value::Object(m) = &mut v {
            match part {
                None => {
                    m.remove(top);
                }
                Some(part) => {
                    if let Some(Value::Object(l)) = m.get_mut(top) {
                        l.remove(part);
                    }
                }
            }
        }
    }
    let qos = qos_from_json(v)?;
    apply_qos(&mut ports, &a.name, qos)
}

/// The drops a port's QoS causes.
const QOS_DROPS: [DropReason; 3] = [
    DropReason::IngressPoliced,
    DropReason::EgressPoliced,
    DropReason::EgressQueueFull,
];

/// A port's or disk's QoS with its counters (`qos.show`).
fn qos_entry(p: &Port) -> Value {
    let (kind, counters) = match p.disk() {
        Some(d) => {
            let s = d.disk.stats.snapshot();
            (
                "disk",
                json!({ "ops": s.ops, "bytes": s.bytes, "throttled_ns": s.throttled_ns }),
            )
        }
        None => {
            let mut c = json!(p.stats.snapshot().qos);
            for r in QOS_DROPS {
                c[r.name()] = json!(p.stats.drops(r));
            }
            ("port", c)
        }
    };
    json!({ "name": p.spec.name, "kind": kind, "qos": p.spec.qos, "counters": counters })
}

fn qos_show(sw: &Switch, a: OptNameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    match a.name {
        Some(n) => Ok(qos_entry(ports.get(&n)?)),
        None => Ok(json!(ports
            .iter()
            .filter(|p| !p.spec.qos.is_empty())
            .map(qos_entry)
            .collect::<Vec<_>>())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdbArgs {
    #[serde(default)]
    port: Option<String>,
}

fn fdb_show(sw: &Switch, a: FdbArgs) -> Result<Value, ControlError> {
    let ports = sw.ports();
    let only = match &a.port {
        Some(n) => Some(ports.get(n)?.idx),
        None => None,
    };
    let dp = sw.dataplane();
    let mut entries = dp.fdb().entries(dp.now_ms());
    entries.sort_by_key(|e| (e.vlan, e.mac));
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| only.is_none_or(|i| i == e.port))
        .filter_map(|e| {
            let p = ports.by_index(e.port)?;
            Some(json!({
                "mac": mac_string(&e.mac),
                "vlan": e.vlan,
                "port": p.spec.name,
                "age_s": e.age_ms as f64 / 1000.0,
                "static": e.is_static,
            }))
        })
        .collect();
    Ok(json!(list))
}

fn fdb_flush(sw: &Switch, a: FdbArgs) -> Result<Value, ControlError> {
    let ports = sw.ports();
    let fdb = sw.dataplane().fdb();
    let n = match &a.port {
        Some(n) => fdb.flush_port(ports.get(n)?.idx, false),
        None => fdb.flush(false),
    };
    Ok(json!({ "flushed": n }))
}

fn worker_list(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    let dp = sw.dataplane();
    let ports = sw.ports();
    let list: Vec<Value> = (0..dp.worker_count())
        .map(|w| {
            let names: Vec<&str> = ports
                .iter()
                .filter(|p| p.worker() == w)
                .map(|p| p.spec.name.as_str())
                .collect();
            let mut v = json!(dp.worker_stats(w).map(|s| s.snapshot()).unwrap_or_default());
            v["id"] = json!(w);
            v["ports"] = json!(names);
            v
        })
        .collect();
    Ok(json!(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdbAddArgs {
    mac: String,
    port: String,
    #[serde(default)]
    vlan: u16,
}

fn fdb_add(sw: &Switch, a: FdbAddArgs) -> Result<Value, ControlError> {
    if a.vlan > 4094 {
        return Err(PortError::BadVlan(a.vlan).into());
    }
    sw.add_static(&a.mac, a.vlan, &a.port)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdbDelArgs {
    mac: String,
    #[serde(default)]
    vlan: u16,
}

fn fdb_del(sw: &Switch, a: FdbDelArgs) -> Result<Value, ControlError> {
    sw.del_static(&a.mac, a.vlan)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerMoveArgs {
    port: String,
    worker: usize,
}

fn worker_move(sw: &Switch, a: WorkerMoveArgs) -> Result<Value, ControlError> {
    sw.ports().move_port(&a.port, a.worker)?;
    Ok(json!({}))
}

fn worker_rebalance(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    let moved = sw.ports().rebalance()?;
    Ok(json!({ "moved": moved }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigShowArgs {
    #[serde(default)]
    format: Option<String>,
}

fn config_show(sw: &Switch, a: ConfigShowArgs) -> Result<Value, ControlError> {
    let state = sw.state();
    match a.format.as_deref() {
        None | Some("json") => Ok(json!(state)),
        Some("toml") => Ok(json!({ "toml": state.to_toml()? })),
        Some(f) => Err(ControlError::new(
            "invalid_argument",
            format!("format {f:?}: use \"json\" or \"toml\""),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSaveArgs {
    #[serde(default)]
    path: Option<PathBuf>,
}

fn config_save(sw: &Switch, a: ConfigSaveArgs) -> Result<Value, ControlError> {
    match a.path {
        None => {
            sw.save()?;
            Ok(json!({ "path": sw.run_dir().join(crate::config::STATE_FILE) }))
        }
        Some(name) => {
            // A file name in the run directory: the daemon may run as root,
            // and the control group must not make it write anywhere else.
            let plain = name.components().count() == 1
                && matches!(
                    name.components().next(),
                    Some(std::path::Component::Normal(_))
                );
            if !plain || name.to_string_lossy().starts_with('.') {
                return Err(ControlError::new(
                    "invalid_argument",
                    "path is a file name, saved in the run directory (e.g. \"vioswitch.toml\")",
                ));
            }
            let path = sw.run_dir().join(name);
            sw.save_toml(&path)?;
            Ok(json!({ "path": path }))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityAddArgs {
    name: String,
    mac: String,
    ips: Vec<String>,
    #[serde(default)]
    vlan: u16,
    #[serde(default)]
    standby: Vec<String>,
    #[serde(default)]
    stall_ms: Option<u64>,
}

fn identity_add(sw: &Switch, a: IdentityAddArgs) -> Result<Value, ControlError> {
    let mac: MacAddr = a.mac.parse().map_err(IdentityError::from)?;
    let ips = a
        .ips
        .iter()
        .map(|s| host_ip(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(IdentityError::from)?;
    let spec = IdentitySpec {
        standby: a.standby,
        stall_ms: a.stall_ms.unwrap_or(DEFAULT_STALL_MS),
        ..IdentitySpec::new(&a.name, mac, ips, a.vlan)
    };
    Ok(json!(sw.identity_add(spec)?))
}

fn identity_del(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    sw.identity_del(&a.name)?;
    Ok(json!({}))
}

fn identity_list(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_list()))
}

fn identity_show(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_show(&a.name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityBindArgs {
    name: String,
    port: String,
}

fn identity_bind(sw: &Switch, a: IdentityBindArgs) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_bind(&a.name, &a.port)?))
}

fn identity_unbind(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_unbind(&a.name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityMoveArgs {
    name: String,
    to: String,
}

fn identity_move(sw: &Switch, a: IdentityMoveArgs) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_move(&a.name, &a.to)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentitySetArgs {
    name: String,
    /// Replaces the standby list; `[]` empties it.
    #[serde(default)]
    standby: Option<Vec<String>>,
    #[serde(default)]
    stall_ms: Option<u64>,
}

fn identity_set(sw: &Switch, a: IdentitySetArgs) -> Result<Value, ControlError> {
    Ok(json!(sw.identity_set(&a.name, a.standby, a.stall_ms)?))
}
