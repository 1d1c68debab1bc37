//! Disk ports through the control channel: what `disk.add` refuses (with
//! which error code), how disks and net ports keep to their own commands,
//! resizing, and that disks are saved and come back after a restart.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use vioswitch_testkit::switch::{HarnessError, SwitchOptions, SwitchProcess};

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

/// A file of `len` bytes in the switch's run directory.
fn image(sw: &SwitchProcess, name: &str, len: u64) -> PathBuf {
    let p = sw.run_dir().join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// The error code of a refused command.
fn code(r: Result<Value, HarnessError>) -> String {
    match r {
        Err(HarnessError::Command { error, .. }) => {
            assert!(
                error["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{error}"
            );
            error["code"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("expected an error answer, got {other:?}"),
    }
}

fn add(sw: &mut SwitchProcess, args: Value) -> Result<Value, HarnessError> {
    sw.call("disk.add", args)
}

#[test]
fn disk_add_refuses_what_is_not_a_usable_disk_and_changes_nothing() {
    let mut sw = switch();
    let dir = sw.run_dir().to_path_buf();
    let missing = dir.join("missing.img");
    assert_eq!(
        code(add(&mut sw, json!({"name": "d", "path": missing}))),
        "not_found"
    );
    assert_eq!(
        code(add(&mut sw, json!({"name": "d", "path": dir}))),
        "invalid_argument"
    );
    let odd = image(&sw, "odd.img", 1000);
    assert_eq!(
        code(add(&mut sw, json!({"name": "d", "path": odd}))),
        "invalid_argument"
    );
    let k6 = image(&sw, "6k.img", 6144);
    assert_eq!(
        code(add(
            &mut sw,
            json!({"name": "d", "path": k6, "block_size": 4096})
        )),
        "invalid_argument"
    );
    let ok = image(&sw, "ok.img", 1 << 20);
    for bad in [
        json!({"name": "d", "path": ok, "block_size": 1024}),
        json!({"name": "d", "path": ok, "queues": 0}),
        json!({"name": "d", "path": ok, "queues": 17}),
        json!({"name": "d", "path": ok, "queue_size": 100}),
        json!({"name": "d", "path": ok, "serial": "x".repeat(21)}),
        json!({"name": "d/x", "path": ok}),
        json!({"name": "d", "path": ok, "colour": "red"}),
        json!({"name": "d"}),
    ] {
        assert_eq!(code(add(&mut sw, bad.clone())), "invalid_argument", "{bad}");
    }
    // A file the daemon may not open for writing: immutable for root,
    // mode 0 for anyone else.
    let locked = image(&sw, "locked.img", 1 << 20);
    let root = nix::unistd::geteuid().is_root();
    if root {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&locked)
            .status()
            .expect("chattr (e2fsprogs)");
        assert!(st.success(), "chattr +i failed on {}", locked.display());
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let refused = code(add(&mut sw, json!({"name": "d", "path": locked})));
    if root {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&locked)
            .status();
    }
    assert_eq!(refused, "permission_denied");
    // Nothing of the refused disks exists.
    assert_eq!(sw.call("disk.list", json!({})).unwrap(), json!([]));
    assert!(!dir.join("d.sock").exists());
    // A good one, then the same name or socket again.
    let info = add(&mut sw, json!({"name": "d", "path": ok, "serial": "SN1"})).unwrap();
    assert_eq!(info["size"], 1 << 20);
    assert_eq!(info["serial"], "SN1");
    assert_eq!(info["kind"], "file");
    assert!(Path::new(info["socket"].as_str().unwrap()).exists());
    assert_eq!(
        code(add(&mut sw, json!({"name": "d", "path": ok}))),
        "exists"
    );
    assert_eq!(
        code(add(
            &mut sw,
            json!({"name": "e", "path": ok, "socket": info["socket"]})
        )),
        "exists"
    );
    // One backing, two disks: only if both are read-only.
    assert_eq!(
        code(add(&mut sw, json!({"name": "e", "path": ok}))),
        "exists"
    );
    assert_eq!(
        code(add(
            &mut sw,
            json!({"name": "e", "path": ok, "readonly": true})
        )),
        "exists"
    );
    let shared = image(&sw, "shared.img", 1 << 20);
    add(
        &mut sw,
        json!({"name": "r1", "path": shared, "readonly": true}),
    )
    .unwrap();
    add(
        &mut sw,
        json!({"name": "r2", "path": shared, "readonly": true}),
    )
    .unwrap();
    assert_eq!(
        code(add(&mut sw, json!({"name": "w", "path": shared}))),
        "exists"
    );
}

#[test]
fn disks_and_net_ports_keep_to_their_own_commands() {
    let mut sw = switch();
    let img = image(&sw, "d.img", 1 << 20);
    add(&mut sw, json!({"name": "d0", "path": img})).unwrap();
    sw.add_port("p0").unwrap();
    assert_eq!(
        code(sw.call("port.del", json!({"name": "d0"}))),
        "wrong_kind"
    );
    assert_eq!(
        code(sw.call("port.show", json!({"name": "d0"}))),
        "wrong_kind"
    );
    assert_eq!(
        code(sw.call("port.set", json!({"name": "d0", "vlan": 3}))),
        "wrong_kind"
    );
    assert_eq!(
        code(sw.call("disk.del", json!({"name": "p0"}))),
        "wrong_kind"
    );
    assert_eq!(
        code(sw.call("disk.show", json!({"name": "p0"}))),
        "wrong_kind"
    );
    assert_eq!(
        code(sw.call("fdb.add", json!({"mac": "52:54:00:00:00:01", "port": "d0"}))),
        "wrong_kind"
    );
    let ports = sw.call("port.list", json!({})).unwrap();
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    assert_eq!(ports[0]["name"], "p0");
    let disks = sw.call("disk.list", json!({})).unwrap();
    assert_eq!(disks.as_array().unwrap().len(), 1, "{disks}");
    assert_eq!(disks[0]["name"], "d0");
    let show = sw.call("disk.show", json!({"name": "d0"})).unwrap();
    assert_eq!(show["stats"]["in_flight"], 0, "{show}");
    assert_eq!(show["stats"]["ops"]["read"], 0, "{show}");
    assert!(sw.call("disk.stats", json!({})).unwrap()["d0"].is_object());
    // Disks move between workers like ports.
    sw.call("disk.del", json!({"name": "d0"})).unwrap();
    assert_eq!(sw.call("disk.list", json!({})).unwrap(), json!([]));
    assert_eq!(
        code(sw.call("disk.del", json!({"name": "d0"}))),
        "not_found"
    );
}

#[test]
fn resize_grows_files_and_refuses_what_would_lose_data() {
    let mut sw = switch();
    let img = image(&sw, "d.img", 1 << 20);
    add(&mut sw, json!({"name": "d0", "path": img})).unwrap();
    let r = sw
        .call("disk.resize", json!({"name": "d0", "size": 2 << 20}))
        .unwrap();
    assert_eq!(r["size"], 2 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);
    assert_eq!(
        sw.call("disk.show", json!({"name": "d0"})).unwrap()["size"],
        2 << 20
    );
    assert_eq!(
        code(sw.call("disk.resize", json!({"name": "d0", "size": 1 << 20}))),
        "invalid_argument"
    );
    assert_eq!(
        code(sw.call(
            "disk.resize",
            json!({"name": "d0", "size": (2 << 20) + 100})
        )),
        "invalid_argument"
    );
    sw.call(
        "disk.resize",
        json!({"name": "d0", "size": 1 << 20, "shrink": true}),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    // Grown by someone else: re-read.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    assert_eq!(
        sw.call("disk.resize", json!({"name": "d0"})).unwrap()["size"],
        4 << 20
    );
    let ro = image(&sw, "ro.img", 1 << 20);
    add(&mut sw, json!({"name": "ro", "path": ro, "readonly": true})).unwrap();
    assert_eq!(
        code(sw.call("disk.resize", json!({"name": "ro", "size": 2 << 20}))),
        "invalid_argument"
    );
    assert_eq!(
        code(sw.call("disk.resize", json!({"name": "nope"}))),
        "not_found"
    );
}

/// The disk list without what a restart changes.
fn disks(sw: &mut SwitchProcess) -> Value {
    let mut list = sw.call("disk.list", json!({})).expect("disk.list");
    for d in list.as_array_mut().unwrap() {
        let o = d.as_object_mut().unwrap();
        for k in ["connected", "connections", "index"] {
            o.remove(k);
        }
    }
    list
}

#[test]
fn disks_are_saved_and_come_back_after_a_restart() {
    let run_dir = vioswitch_testkit::temp_dir("vioswitch-disk-persist").unwrap();
    let opts = || SwitchOptions {
        workers: 2,
        ..SwitchOptions::default()
    };
    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    let a = image(&sw, "a.img", 1 << 20);
    let b = image(&sw, "b.img", 8 << 20);
    let gone = image(&sw, "gone.img", 1 << 20);
    add(
        &mut sw,
        json!({"name": "a", "path": a, "readonly": true, "serial": "AAA", "worker": 1}),
    )
    .unwrap();
    add(
        &mut sw,
        json!({"name": "b", "path": b, "queues": 4, "queue_size": 128, "block_size": 4096}),
    )
    .unwrap();
    add(&mut sw, json!({"name": "gone", "path": gone})).unwrap();
    sw.add_port("p0").unwrap();
    let before = disks(&mut sw);
    sw.kill();
    drop(sw);

    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    assert_eq!(disks(&mut sw), before, "disks after SIGKILL and restart");
    assert_eq!(
        sw.call("port.list", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    sw.kill();
    drop(sw);

    // A backing that vanished: the disk is not served, but stays saved.
    std::fs::remove_file(&gone).unwrap();
    let mut sw = SwitchProcess::spawn_in(&run_dir, opts()).unwrap();
    let names: Vec<Value> = disks(&mut sw)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("a"), json!("b")]);
    let saved = std::fs::read_to_string(run_dir.join("state.json")).unwrap();
    assert!(
        saved.contains("gone.img"),
        "the unrestored disk stays saved: {saved}"
    );
    // Removing it by name forgets it.
    sw.call("disk.del", json!({"name": "gone"})).unwrap();
    let saved = std::fs::read_to_string(run_dir.join("state.json")).unwrap();
    assert!(!saved.contains("gone.img"), "{saved}");
    sw.kill();
    let _ = std::fs::remove_dir_all(&run_dir);
}
