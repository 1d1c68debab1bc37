//! Bad input to the daemon: port sockets it cannot or must not create, bad
//! `port.add` arguments, unusable run directories, a second daemon on the
//! same run directory, malformed control lines. Each gets a clear refusal
//! and leaves the running switch as it was.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::frames::{frame, mac, plug, recv_one, send_all, small_config, BROADCAST};
use vioswitch_testkit::switch::{
    vioswitch_bin, ControlClient, HarnessError, SwitchOptions, SwitchProcess,
};

fn switch() -> SwitchProcess {
    SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch")
}

/// The error answer of a command that must fail: (code, message).
fn refused(sw: &mut SwitchProcess, cmd: &str, args: Value) -> (String, String) {
    match sw.call(cmd, args.clone()) {
        Ok(v) => panic!("{cmd} {args} succeeded: {v}"),
        Err(HarnessError::Command { error, .. }) => (
            error["code"].as_str().unwrap_or_default().to_string(),
            error["message"].as_str().unwrap_or_default().to_string(),
        ),
        Err(e) => panic!("{cmd} {args}: the control channel failed: {e}"),
    }
}

fn port_names(sw: &mut SwitchProcess) -> Vec<String> {
    sw.call("port.list", json!({}))
        .expect("port.list")
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Two guests on the switch still talk.
fn still_switches(sw: &mut SwitchProcess, a: &str, b: &str) {
    let mut ga = plug(sw, a, small_config());
    let mut gb = plug(sw, b, small_config());
    let f = frame(BROADCAST, mac(1), 100, 1);
    send_all(&mut ga, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut gb), f);
}

/// Run the daemon with `args` until it exits (bounded: a daemon that keeps
/// running is killed and reported). Returns its status and standard error.
fn run_daemon(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(vioswitch_bin().expect("vioswitch binary"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vioswitch");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vioswitch {args:?} kept running instead of exiting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

#[test]
fn port_add_refuses_a_regular_file_and_leaves_it_alone() {
    let mut sw = switch();
    let file = sw.run_dir().join("precious.txt");
    std::fs::write(&file, b"keep me").expect("write file");
    let (code, msg) = refused(
        &mut sw,
        "port.add",
        json!({"name": "p", "socket": file.to_str()}),
    );
    assert_eq!(code, "socket_error", "{msg}");
    assert!(
        msg.contains("precious.txt"),
        "the message names the path: {msg}"
    );
    assert_eq!(std::fs::read(&file).expect("file still there"), b"keep me");
    assert!(port_names(&mut sw).is_empty());
    // The name is still free.
    still_switches(&mut sw, "p", "q");
}

#[test]
fn port_add_refuses_a_socket_in_a_missing_directory() {
    let mut sw = switch();
    let path = sw.run_dir().join("no/such/dir/p.sock");
    let (code, msg) = refused(
        &mut sw,
        "port.add",
        json!({"name": "p", "socket": path.to_str()}),
    );
    assert_eq!(code, "socket_error", "{msg}");
    assert!(
        msg.contains("no/such/dir"),
        "the message names the path: {msg}"
    );
    assert!(!path.parent().is_some_and(Path::exists));
    assert!(port_names(&mut sw).is_empty());
    still_switches(&mut sw, "p", "q");
}

#[test]
fn port_add_refuses_the_live_control_socket_and_keeps_it() {
    let mut sw = switch();
    // The control socket is a live socket of the switch itself.
    let control = sw.control_path();
    let (code, msg) = refused(
        &mut sw,
        "port.add",
        json!({"name": "p", "socket": control.to_str()}),
    );
    assert_eq!(code, "socket_error", "{msg}");
    assert!(control.exists(), "the control socket was unlinked");
    ControlClient::connect(&control)
        .and_then(|mut c| c.call("switch.info", json!({})))
        .expect("the control socket still answers a new client");
    assert!(port_names(&mut sw).is_empty());
}

#[test]
fn port_add_refuses_another_ports_socket_however_spelt() {
    let mut sw = switch();
    let a_sock = sw.add_port("a").expect("port.add a");
    let (code, msg) = refused(
        &mut sw,
        "port.add",
        json!({"name": "b", "socket": a_sock.to_str()}),
    );
    assert_eq!(code, "exists", "{msg}");
    // The same socket by another name: a live socket, refused by bind.
    let dir = a_sock.parent().expect("run dir");
    let spelt = dir.join(".").join("a.sock");
    let (code, msg) = refused(
        &mut sw,
        "port.add",
        json!({"name": "b", "socket": spelt.to_str()}),
    );
    assert!(code == "exists" || code == "socket_error", "{code}: {msg}");
    assert!(
        a_sock.exists(),
        "a's socket was unlinked by the refused port.add"
    );
    assert_eq!(port_names(&mut sw), ["a"]);
    // a still takes a guest.
    let mut ga =
        vioswitch_testkit::guest::NetGuest::connect(&a_sock, small_config()).expect("a guest on a");
    let mut gb = plug(&mut sw, "b", small_config());
    let f = frame(BROADCAST, mac(1), 100, 1);
    send_all(&mut ga, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut gb), f);
}

#[test]
fn port_add_refuses_bad_arguments_and_changes_nothing() {
    let mut sw = switch();
    sw.add_port("a").expect("port.add a");
    let cases = [
        (json!({"name": "a"}), "exists"),
        (json!({"name": ""}), "invalid_argument"),
        (json!({"name": "../x"}), "invalid_argument"),
        (json!({"name": "a b"}), "invalid_argument"),
        (json!({"name": "x".repeat(65)}), "invalid_argument"),
        (json!({"name": "v", "vlan": 4095}), "invalid_argument"),
        (json!({"name": "v", "vlan": -1}), "invalid_argument"),
        (json!({"name": "q", "queues": 0}), "invalid_argument"),
        (json!({"name": "q", "queues": 17}), "invalid_argument"),
        (json!({"name": "w", "worker": 1}), "invalid_argument"),
        (json!({"name": "u", "colour": "red"}), "invalid_argument"),
        (json!({"name": 5}), "invalid_argument"),
        (json!({}), "invalid_argument"),
    ];
    for (args, want) in cases {
        let (code, msg) = refused(&mut sw, "port.add", args.clone());
        assert_eq!(code, want, "port.add {args}: {msg}");
        assert!(!msg.is_empty(), "port.add {args}: an empty message");
    }
    let (code, _) = refused(&mut sw, "port.del", json!({"name": "nope"}));
    assert_eq!(code, "not_found");
    let (code, _) = refused(&mut sw, "port.stats", json!({"name": "nope"}));
    assert_eq!(code, "not_found");
    assert_eq!(port_names(&mut sw), ["a"]);
    let files: Vec<String> = std::fs::read_dir(sw.run_dir())
        .expect("run dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock") && n != "control.sock")
        .collect();
    assert_eq!(files, ["a.sock"], "refused ports left sockets behind");
    still_switches(&mut sw, "b", "c");
}

#[test]
fn malformed_control_lines_get_error_answers() {
    let sw = switch();
    let mut c = ControlClient::connect(&sw.control_path()).expect("connect");
    for line in [
        "not json",
        "[]",
        "42",
        r#"{"id": 1}"#,
        r#"{"id": 2, "cmd": 5}"#,
        r#"{"id": 3, "cmd": "no.such"}"#,
        r#"{"id": 4, "cmd": "port.add", "args": "a"}"#,
        r#"{"id": 5, "cmd": "port.list", "args": {"x": 1}}"#,
    ] {
        let answer = c.raw(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(answer["ok"], false, "{line} -> {answer}");
        assert!(
            answer["error"]["code"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{line} -> {answer}"
        );
    }
    // The same connection still works.
    let answer = c
        .raw(r#"{"id": 9, "cmd": "switch.info"}"#)
        .expect("switch.info");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["id"], 9);
}

#[test]
fn an_unusable_run_directory_is_a_clear_startup_error() {
    // Running as root, permissions do not stop us: a path under a regular
    // file cannot be a directory for anyone.
    let (status, err) = run_daemon(&["--run-dir", "/etc/passwd/x"]);
    assert!(!status.success(), "exit status {status}");
    assert!(status.code().is_some(), "killed by a signal: {status}");
    assert!(
        err.contains("/etc/passwd/x"),
        "stderr names the path: {err}"
    );
    assert!(
        err.to_lowercase().contains("run dir"),
        "stderr says what the path is for: {err}"
    );
    assert!(!Path::new("/etc/passwd/x").exists());
}

#[test]
fn bad_worker_counts_are_startup_errors() {
    let dir = vioswitch_testkit::temp_dir("vioswitch-badworkers").expect("temp dir");
    for n in ["0", "65"] {
        let (status, err) =
            run_daemon(&["--run-dir", dir.to_str().unwrap_or("/tmp"), "--workers", n]);
        assert!(!status.success(), "--workers {n}: {status}");
        assert!(err.contains("--workers"), "--workers {n}: {err}");
    }
}

#[test]
fn a_second_daemon_on_the_same_run_directory_exits_and_the_first_keeps_serving() {
    let mut sw = switch();
    sw.add_port("a").expect("port.add a");
    let run_dir = sw.run_dir().to_path_buf();
    let pid_file = run_dir.join("vioswitch.pid");
    let pid_before = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(pid_before.trim(), sw.pid().to_string());

    let (status, err) = run_daemon(&[
        "--run-dir",
        run_dir.to_str().expect("utf-8 path"),
        "--port",
        "a",
    ]);
    assert!(!status.success(), "the second daemon exited with {status}");
    assert!(
        err.contains("another vioswitch"),
        "stderr explains why: {err}"
    );
    assert!(
        err.contains(&sw.pid().to_string()),
        "and names the first: {err}"
    );

    // The first one is untouched: its pid file, its control socket (for a
    // new client too), its port socket, and its switching.
    assert!(sw.is_running());
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file"),
        pid_before
    );
    ControlClient::connect(&sw.control_path())
        .and_then(|mut c| c.call("switch.info", json!({})))
        .expect("a new control client is served");
    assert!(run_dir.join("a.sock").exists());
    assert_eq!(port_names(&mut sw), ["a"]);
    let mut ga =
        vioswitch_testkit::guest::NetGuest::connect(&run_dir.join("a.sock"), small_config())
            .expect("guest on a");
    let mut gb = plug(&mut sw, "b", small_config());
    let f = frame(BROADCAST, mac(1), 100, 1);
    send_all(&mut ga, std::slice::from_ref(&f));
    assert_eq!(recv_one(&mut gb), f);
}
