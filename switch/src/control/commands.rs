//! The control commands. Adding one is one match arm and one function.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ControlError, PROTOCOL_VERSION};
use crate::daemon::Switch;
use crate::port::{PortError, PortSpec, PortTable};

/// Every command, for `switch.info`.
pub const COMMANDS: &[&str] = &[
    "switch.info",
    "port.add",
    "port.del",
    "port.list",
    "port.show",
    "port.stats",
    "fdb.show",
    "fdb.flush",
    "worker.list",
];

/// Run one command.
pub fn dispatch(sw: &Switch, cmd: &str, args: Value) -> Result<Value, ControlError> {
    match cmd {
        "switch.info" | "hello" => switch_info(sw),
        "port.add" => port_add(sw, parse(args)?),
        "port.del" => port_del(sw, parse(args)?),
        "port.list" => port_list(sw, parse(args)?),
        "port.show" => port_show(sw, parse(args)?),
        "port.stats" => port_stats(sw, parse(args)?),
        "fdb.show" => fdb_show(sw, parse(args)?),
        "fdb.flush" => fdb_flush(sw, parse(args)?),
        "worker.list" => worker_list(sw, parse(args)?),
        _ => Err(ControlError::new(
            "unknown_command",
            format!("unknown command {cmd:?}; `switch.info` lists the commands"),
        )),
    }
}

fn parse<T: DeserializeOwned>(args: Value) -> Result<T, ControlError> {
    serde_json::from_value(args)
        .map_err(|e| ControlError::new("invalid_argument", format!("bad arguments: {e}")))
}

impl From<PortError> for ControlError {
    fn from(e: PortError) -> Self {
        let code = match &e {
            PortError::InvalidName(_) | PortError::BadQueues(_) | PortError::BadVlan(_) => {
                "invalid_argument"
            }
            PortError::Exists(_) | PortError::SocketTaken(..) => "exists",
            PortError::NotFound(_) => "not_found",
            PortError::SocketInUse(_) | PortError::NotASocket(_) | PortError::Bind { .. } => {
                "socket_error"
            }
            PortError::TooManyPorts => "limit",
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortAddArgs {
    name: String,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    queues: Option<u16>,
    #[serde(default)]
    vlan: Option<u16>,
    #[serde(default)]
    worker: Option<usize>,
}

fn switch_info(sw: &Switch) -> Result<Value, ControlError> {
    Ok(json!({
        "name": "vioswitch",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": PROTOCOL_VERSION,
        "uptime_s": sw.uptime().as_secs_f64(),
        "pid": std::process::id(),
        "run_dir": sw.run_dir(),
        "workers": sw.dataplane().worker_count(),
        "ports": sw.ports().iter().count(),
        "features": ["net"],
        "commands": super::commands::COMMANDS,
    }))
}

fn port_add(sw: &Switch, a: PortAddArgs) -> Result<Value, ControlError> {
    crate::port::validate_name(&a.name)?;
    let socket = a
        .socket
        .unwrap_or_else(|| sw.run_dir().join(format!("{}.sock", a.name)));
    let spec = PortSpec {
        name: a.name,
        socket,
        queue_pairs: a.queues.unwrap_or(1),
        vlan: a.vlan.unwrap_or(0),
        worker: a.worker,
    };
    let info = sw.ports().add(spec)?;
    Ok(json!(info))
}

fn port_del(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    sw.ports().remove(&a.name)?;
    Ok(json!({}))
}

fn port_list(sw: &Switch, _: NoArgs) -> Result<Value, ControlError> {
    let ports = sw.ports();
    Ok(json!(ports.iter().map(PortTable::info).collect::<Vec<_>>()))
}

fn port_show(sw: &Switch, a: NameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    let p = ports.get(&a.name)?;
    let mut v = json!(PortTable::info(p));
    v["stats"] = json!(p.stats.snapshot());
    Ok(v)
}

fn port_stats(sw: &Switch, a: OptNameArg) -> Result<Value, ControlError> {
    let ports = sw.ports();
    match a.name {
        Some(n) => Ok(json!(ports.get(&n)?.stats.snapshot())),
        None => Ok(Value::Object(
            ports
                .iter()
                .map(|p| (p.spec.name.clone(), json!(p.stats.snapshot())))
                .collect(),
        )),
    }
}

fn mac_string(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
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
                .filter(|p| p.worker == w)
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
