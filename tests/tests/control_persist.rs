//! The running configuration is saved and comes back:
//! - a switch stopped (SIGTERM) or killed (SIGKILL) and started again on the
//!   same run directory has the same ports on the same sockets, workers,
//!   VLANs, MTUs and static FDB entries, and they work;
//! - `--config FILE.toml` sets a switch up when there is no saved state, and
//!   the saved state wins over it afterwards; `config.show --toml` and
//!   `config.save` write files `--config` reads back;
//! - killed at random in the middle of a burst of changes, 30 times over,
//!   the switch always leaves `state.json` holding exactly the state before
//!   or after one change (never a torn or older one), and a restart brings
//!   back exactly that.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use vioswitch_testkit::frames::{frame, mac, mac_str, recv_n, send_all, small_config, wait_until};
use vioswitch_testkit::guest::NetGuest;
use vioswitch_testkit::switch::{ControlClient, HarnessError, SwitchProcess};

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The port list without what a restart changes (connection counters).
fn ports(sw: &mut SwitchProcess) -> Value {
    let mut list = sw.call("port.list", json!({})).expect("port.list");
    for p in list.as_array_mut().unwrap() {
        let o = p.as_object_mut().unwrap();
        o.remove("connected");
        o.remove("connections");
        o.remove("index");
    }
    list
}

fn statics(sw: &mut SwitchProcess) -> Vec<Value> {
    sw.call("fdb.show", json!({}))
        .expect("fdb.show")
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["static"] == true)
        .map(|e| json!([e["mac"], e["vlan"], e["port"]]))
        .collect()
}

/// Stop the daemon with SIGTERM and wait for it to exit.
fn stop(sw: &mut SwitchProcess) {
    kill(Pid::from_raw(sw.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    wait_until("vioswitch to exit after SIGTERM", || {
        sw.exit_status().is_some()
    });
    assert!(
        sw.exit_status().unwrap().success(),
        "vioswitch failed on SIGTERM"
    );
}

fn read_state(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("state.json")).expect("state.json");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("state.json does not parse ({e}):\n{text}"))
}

#[test]
fn the_running_configuration_survives_a_restart_and_a_crash() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-persist").unwrap();
    let other = vioswitch_testkit::temp_dir("vioswitch-persist-socks").unwrap();
    let b_sock = other.join("b.sock");
    let c_sock = other.join("qemu-c.sock");
    let mut sw = SwitchProcess::spawn_args(&dir, &args(&["--workers", "2"])).expect("start");
    sw.call(
        "port.add",
        json!({"name": "a", "vlan": 10, "mtu": 1500, "worker": 1}),
    )
    .expect("port.add a");
    sw.call(
        "port.add",
        json!({"name": "b", "socket": b_sock, "perm": "0640", "group": "100", "worker": 0}),
    )
    .expect("port.add b");
    sw.call(
        "port.add",
        json!({"name": "c", "mode": "client", "socket": c_sock, "queues": 2}),
    )
    .expect("port.add c");
    sw.call("port.add", json!({"name": "d", "vlan": 10}))
        .expect("port.add d");
    sw.call("port.set", json!({"name": "d", "mtu": 9000}))
        .expect("port.set d");
    sw.call("worker.move", json!({"port": "d", "worker": 1}))
        .expect("worker.move d");
    let s = mac_str(&mac(0x77));
    sw.call("fdb.add", json!({"mac": s, "port": "a", "vlan": 10}))
        .expect("fdb.add");
    sw.call("fdb.add", json!({"mac": mac_str(&mac(0x78)), "port": "b"}))
        .expect("fdb.add");
    let config = sw.call("config.show", json!({})).expect("config.show");
    let list = ports(&mut sw);
    let fdb = statics(&mut sw);
    assert_eq!(config["workers"], 2);
    assert_eq!(read_state(&dir), config, "state.json is the running config");

    for how in ["SIGTERM", "SIGKILL", "SIGKILL again"] {
        if how == "SIGTERM" {
            stop(&mut sw);
        } else {
            sw.kill();
        }
        drop(sw);
        sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart");
        assert_eq!(
            sw.call("config.show", json!({})).unwrap(),
            config,
            "after {how}"
        );
        assert_eq!(ports(&mut sw), list, "after {how}");
        assert_eq!(statics(&mut sw), fdb, "after {how}");
        assert_eq!(sw.call("switch.info", json!({})).unwrap()["workers"], 2);
        let meta = std::fs::metadata(&b_sock).expect("b's socket is back");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640, "after {how}");
        assert_eq!(meta.gid(), 100, "after {how}");
        assert!(dir.join("a.sock").exists() && dir.join("d.sock").exists());
    }

    // The restored ports work: d's frame to the static MAC reaches a (VLAN
    // 10, a never sent anything), and a reconnect of a's guest keeps the
    // static entry.
    let mut ga = NetGuest::connect(&dir.join("a.sock"), small_config()).expect("guest a");
    let mut gd = NetGuest::connect(&dir.join("d.sock"), small_config()).expect("guest d");
    let mut gb = NetGuest::connect(&b_sock, small_config()).expect("guest b");
    for round in 0..2 {
        let f = frame(mac(0x77), mac(0xd), 1000, round);
        send_all(&mut gd, std::slice::from_ref(&f));
        assert_eq!(recv_n(&mut ga, 1), vec![f], "round {round}");
        if round == 0 {
            ga.disconnect();
            wait_until("a to see its guest go", || {
                sw.call("port.show", json!({"name": "a"})).unwrap()["connected"] == false
            });
            assert_eq!(
                statics(&mut sw),
                fdb,
                "a guest's reconnect lost static entries"
            );
            ga = NetGuest::connect(&dir.join("a.sock"), small_config()).expect("guest a again");
        }
    }
    // b (VLAN 0) saw none of it; its own static entry brings it e's frame.
    assert!(gb.try_recv().is_none(), "b got a frame from VLAN 10");
    let hi = frame(mac(0x78), mac(0xe), 100, 9);
    let mut ge = {
        sw.call("port.add", json!({"name": "e"}))
            .expect("port.add e");
        NetGuest::connect(&dir.join("e.sock"), small_config()).expect("guest e")
    };
    send_all(&mut ge, std::slice::from_ref(&hi));
    assert_eq!(recv_n(&mut gb, 1), vec![hi], "the static entry of b");
    assert!(gd.try_recv().is_none() && ga.try_recv().is_none());
    // Removing the port removes its static entries, for good.
    sw.del_port("b").expect("port.del b");
    sw.kill();
    drop(sw);
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart");
    let left = statics(&mut sw);
    assert_eq!(left, vec![json!([s, 10, "a"])]);
    assert!(!b_sock.exists(), "b's socket came back");
}

#[test]
fn a_toml_config_sets_up_a_switch_that_has_no_saved_state() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-toml").unwrap();
    let front = vioswitch_testkit::temp_dir("vioswitch-toml-front").unwrap();
    let conf = dir.join("vioswitch.toml");
    let toml = format!(
        r#"
workers = 2
fdb_ageing_s = 120

[[port]]
name = "t1"
socket = "{d}/t1.sock"
vlan = 5
mtu = 1400
worker = 1

[[port]]
name = "t2"
socket = "{d}/t2.sock"
perm = "0600"

[[port]]
name = "t3"
mode = "client"
socket = "{f}/t3.sock"

[[fdb_static]]
mac = "02:5a:00:00:00:42"
port = "t1"
vlan = 5
"#,
        d = dir.display(),
        f = front.display()
    );
    std::fs::write(&conf, &toml).unwrap();
    let conf_arg = conf.to_str().unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &args(&["--config", conf_arg])).expect("start");
    let config = sw.call("config.show", json!({})).expect("config.show");
    let sock = |d: &Path, n: &str| d.join(n).to_str().unwrap().to_string();
    assert_eq!(
        config,
        json!({
            "version": 1,
            "workers": 2,
            "fdb_ageing_s": 120,
            "port": [
                {"name": "t1", "socket": sock(&dir, "t1.sock"), "mode": "server",
                 "queue_pairs": 1, "vlan": 5, "mtu": 1400, "worker": 1},
                {"name": "t2", "socket": sock(&dir, "t2.sock"), "mode": "server",
                 "queue_pairs": 1, "vlan": 0, "worker": 0, "perm": "0600"},
                {"name": "t3", "socket": sock(&front, "t3.sock"), "mode": "client",
                 "queue_pairs": 1, "vlan": 0, "worker": 1},
            ],
            "fdb_static": [{"mac": "02:5a:00:00:00:42", "vlan": 5, "port": "t1"}],
        })
    );
    assert_eq!(read_state(&dir), config);
    assert_eq!(
        std::fs::metadata(dir.join("t2.sock"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        statics(&mut sw),
        vec![json!(["02:5a:00:00:00:42", 5, "t1"])]
    );
    // The client-mode port connects to a frontend that listens.
    let _ = std::fs::remove_file(front.join("t3.sock"));
    let l = std::os::unix::net::UnixListener::bind(front.join("t3.sock")).unwrap();
    let _g3 = NetGuest::accept(&l, small_config(), Duration::from_secs(30)).expect("t3 connects");

    // Changed, then restarted with a changed file: the saved state wins.
    sw.call("port.del", json!({"name": "t2"}))
        .expect("port.del");
    let changed = sw.call("config.show", json!({})).unwrap();
    stop(&mut sw);
    drop(sw);
    std::fs::write(
        &conf,
        format!(
            "{toml}\n[[port]]\nname = \"t4\"\nsocket = \"{}/t4.sock\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &args(&["--config", conf_arg])).expect("restart");
    assert_eq!(sw.call("config.show", json!({})).unwrap(), changed);

    // config.show --toml and config.save write what --config reads.
    let shown = sw
        .call("config.show", json!({"format": "toml"}))
        .expect("config.show toml")["toml"]
        .as_str()
        .expect("toml text")
        .to_string();
    // A file name: saved in the run directory (the daemon writes nowhere else).
    let saved = dir.join("saved.toml");
    let r = sw
        .call("config.save", json!({"path": "saved.toml"}))
        .expect("config.save path");
    assert_eq!(r["path"], saved.to_str().unwrap());
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), shown);
    let r = sw.call("config.save", json!({})).expect("config.save");
    assert_eq!(r["path"], dir.join("state.json").to_str().unwrap());
    sw.kill();
    drop(sw);
    let dir2 = vioswitch_testkit::temp_dir("vioswitch-toml2").unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir2, &args(&["--config", saved.to_str().unwrap()]))
        .expect("start from the saved TOML");
    assert_eq!(sw.call("config.show", json!({})).unwrap(), changed);
}

#[test]
fn a_bad_config_file_is_a_clear_startup_error() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-badtoml").unwrap();
    let conf = dir.join("bad.toml");
    for text in [
        "workers = \"two\"",
        "[[port]]\nname = \"x\"",
        "[[port]]\nname = \"x\"\nsocket = \"/tmp/x.sock\"\ncolour = 1",
        "not toml at all [",
    ] {
        std::fs::write(&conf, text).unwrap();
        let r = SwitchProcess::spawn_args(&dir, &args(&["--config", conf.to_str().unwrap()]));
        assert!(r.is_err(), "{text:?} was accepted");
        let log = std::fs::read_to_string(dir.join("vioswitch.log")).unwrap_or_default();
        assert!(
            log.contains("bad.toml"),
            "{text:?}: the error names the file:\n{log}"
        );
        assert!(
            !dir.join("state.json").exists(),
            "{text:?}: a state was saved"
        );
    }
}

// ---------------------------------------------------------------------------
// Killed in the middle of changes.

/// A small deterministic random generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One change: the request, and the state it leads to (by a model of the
/// saved state).
fn next_change(rng: &mut Rng, state: &Value, dir: &Path) -> (String, Value, Value) {
    let mut s = state.clone();
    let names: Vec<String> = s["port"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let statics: Vec<(String, u64)> = s["fdb_static"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["mac"].as_str().unwrap().to_string(),
                e["vlan"].as_u64().unwrap(),
            )
        })
        .collect();
    let free: Vec<String> = (0..6)
        .map(|i| format!("p{i}"))
        .filter(|n| !names.contains(n))
        .collect();
    let pick = rng.below(100);
    if names.is_empty() || (pick < 30 && !free.is_empty()) {
        let name = free[rng.below(free.len() as u64) as usize].clone();
        let vlan = rng.below(3) * 10;
        let worker = rng.below(2);
        let mut p = json!({"name": name, "socket": dir.join(format!("{name}.sock")),
            "mode": "server", "queue_pairs": 1, "vlan": vlan, "worker": worker});
        let mut args = json!({"name": name, "vlan": vlan, "worker": worker});
        if rng.below(2) == 0 {
            let mtu = 1000 + rng.below(8000);
            p["mtu"] = json!(mtu);
            args["mtu"] = json!(mtu);
        }
        let ports = s["port"].as_array_mut().unwrap();
        ports.push(p);
        ports.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        return ("port.add".into(), args, s);
    }
    let name = names[rng.below(names.len() as u64) as usize].clone();
    let port = s["port"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == name.as_str())
        .unwrap();
    match pick % 6 {
        _ if pick >= 90 => {
            s["port"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p["name"] != name.as_str());
            s["fdb_static"]
                .as_array_mut()
                .unwrap()
                .retain(|e| e["port"] != name.as_str());
            ("port.del".into(), json!({"name": name}), s)
        }
        0 | 1 => {
            let vlan = rng.below(4094);
            port["vlan"] = json!(vlan);
            ("port.set".into(), json!({"name": name, "vlan": vlan}), s)
        }
        2 => {
            let mtu = if rng.below(3) == 0 {
                0
            } else {
                68 + rng.below(16000)
            };
            let o = port.as_object_mut().unwrap();
            if mtu == 0 {
                o.remove("mtu");
            } else {
                o.insert("mtu".into(), json!(mtu));
            }
            ("port.set".into(), json!({"name": name, "mtu": mtu}), s)
        }
        3 => {
            let w = 1 - port["worker"].as_u64().unwrap();
            port["worker"] = json!(w);
            ("worker.move".into(), json!({"port": name, "worker": w}), s)
        }
        4 if !statics.is_empty() => {
            let (m, v) = statics[rng.below(statics.len() as u64) as usize].clone();
            s["fdb_static"]
                .as_array_mut()
                .unwrap()
                .retain(|e| !(e["mac"] == m.as_str() && e["vlan"] == v));
            ("fdb.del".into(), json!({"mac": m, "vlan": v}), s)
        }
        _ => {
            let m = mac_str(&mac(0x100 + rng.below(8) as u32));
            let v = rng.below(2) * 10;
            let list = s["fdb_static"].as_array_mut().unwrap();
            list.retain(|e| !(e["mac"] == m.as_str() && e["vlan"] == v));
            list.push(json!({"mac": m, "vlan": v, "port": name}));
            (
                "fdb.add".into(),
                json!({"mac": m, "port": name, "vlan": v}),
                s,
            )
        }
    }
}

/// What the changer knows: the state after each acknowledged change, and
/// the one the change in flight (sent, not yet acknowledged) leads to.
#[derive(Default)]
struct Progress {
    acked: Vec<Value>,
    pending: Option<(String, Value, Value)>,
}

#[test]
fn killed_in_the_middle_of_changes_the_saved_state_is_never_torn() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-crash").unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &args(&["--workers", "2"])).expect("start");
    let mut state = sw.call("config.show", json!({})).unwrap();
    let mut rng = Rng(7);
    let mut total_acked = 0;
    let mut saw_pending_on_disk = 0;
    for round in 0..30 {
        let progress = Arc::new(Mutex::new(Progress {
            acked: vec![state.clone()],
            pending: None,
        }));
        let changer = {
            let (sock, progress, dir) = (sw.control_path(), progress.clone(), dir.clone());
            let mut rng = Rng(rng.next() + round);
            std::thread::spawn(move || {
                let Ok(mut c) = ControlClient::connect(&sock) else {
                    return;
                };
                loop {
                    let current = progress.lock().unwrap().acked.last().unwrap().clone();
                    let (cmd, args, next) = next_change(&mut rng, &current, &dir);
                    progress.lock().unwrap().pending =
                        Some((cmd.clone(), args.clone(), next.clone()));
                    match c.call(&cmd, args.clone()) {
                        Ok(_) => {}
                        Err(HarnessError::Command { error, .. }) => {
                            panic!("{cmd} {args} was refused: {error}")
                        }
                        Err(_) => return, // killed
                    }
                    {
                        let mut p = progress.lock().unwrap();
                        p.acked.push(next.clone());
                        p.pending = None;
                    }
                    match c.call("config.show", json!({})) {
                        Ok(shown) => assert_eq!(shown, next, "after {cmd} {args}"),
                        Err(HarnessError::Command { error, .. }) => panic!("config.show: {error}"),
                        Err(_) => return,
                    }
                }
            })
        };
        let delay = 20 + rng.below(250);
        std::thread::sleep(Duration::from_millis(delay));
        sw.kill();
        if let Err(e) = changer.join() {
            std::panic::resume_unwind(e);
        }
        drop(sw);
        let p = progress.lock().unwrap();
        let last = p.acked.last().unwrap();
        total_acked += p.acked.len() - 1;
        let on_disk = read_state(&dir);
        let pending = p.pending.as_ref().map(|(_, _, s)| s);
        if pending == Some(&on_disk) && &on_disk != last {
            saw_pending_on_disk += 1;
        }
        assert!(
            &on_disk == last || pending == Some(&on_disk),
            "round {round}: after {} acknowledged changes, state.json is neither the state \
             after the last acknowledged change nor after the change in flight {:?}:\n\
             on disk: {on_disk}\nlast acked: {last}\npending: {pending:?}",
            p.acked.len() - 1,
            p.pending.as_ref().map(|(c, a, _)| (c, a)),
        );
        sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart");
        let restored = sw.call("config.show", json!({})).unwrap();
        assert_eq!(
            restored, on_disk,
            "round {round}: the restart restored something else"
        );
        for port in restored["port"].as_array().unwrap() {
            let sock = PathBuf::from(port["socket"].as_str().unwrap());
            assert!(sock.exists(), "round {round}: no socket for {port}");
        }
        let listed: BTreeMap<String, Value> = sw
            .call("port.list", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["worker"].clone()))
            .collect();
        let saved: BTreeMap<String, Value> = restored["port"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["worker"].clone()))
            .collect();
        assert_eq!(listed, saved, "round {round}: ports and workers");
        state = restored;
    }
    assert!(total_acked >= 30, "only {total_acked} changes in 30 rounds");
    eprintln!(
        "{total_acked} acknowledged changes; {saw_pending_on_disk} kills caught a change saved \
         but not yet acknowledged"
    );
}

/// A port that cannot be restored at start-up (its socket's directory is
/// gone for now) must not vanish from the saved configuration: once the
/// directory is back, the next restart brings the port back.
#[test]
fn a_port_that_cannot_be_restored_for_now_is_not_forgotten() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-restore").unwrap();
    let gone = vioswitch_testkit::temp_dir("vioswitch-restore-socks").unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("start");
    sw.call(
        "port.add",
        json!({"name": "x", "socket": gone.join("x.sock")}),
    )
    .expect("port.add x");
    sw.add_port("y").expect("port.add y");
    let config = sw.call("config.show", json!({})).unwrap();
    sw.kill();
    drop(sw);
    std::fs::remove_dir_all(&gone).unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart without x's directory");
    assert!(sw.call("port.show", json!({"name": "y"})).is_ok());
    assert!(
        sw.log_text().contains("cannot restore port x"),
        "{}",
        sw.log_text()
    );
    sw.kill();
    drop(sw);
    std::fs::create_dir_all(&gone).unwrap();
    let mut sw = SwitchProcess::spawn_args(&dir, &[]).expect("restart with it back");
    assert_eq!(
        sw.call("config.show", json!({})).unwrap(),
        config,
        "port x was dropped from the saved state by a restart that could not restore it"
    );
    assert!(gone.join("x.sock").exists());
}
