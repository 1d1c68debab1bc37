//! Bad input on the control socket: malformed JSON, unknown commands, wrong
//! argument types, missing, unknown and out-of-range arguments of every
//! command, lines over the 64 KiB limit, a client that stalls half way
//! through a line, 200 clients at once, the client limit, clients that
//! leave in the middle of a request. Each gets the right error code, the
//! switch keeps serving everyone, and its state is as it was.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::frames::{
    frame, mac, plug, recv_n, send_all, small_config, wait_tx_done, BROADCAST,
};
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

/// A raw control connection.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Send bytes; errors (the switch closed the connection) are ignored.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// Read one answer line; `None` at end of stream.
    fn answer(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("answer {line:?} is not JSON: {e}")),
            ),
            Err(e) => panic!("reading an answer: {e}"),
        }
    }

    fn request(&mut self, line: &[u8]) -> Value {
        self.send(line);
        self.send(b"\n");
        self.answer()
            .unwrap_or_else(|| panic!("no answer to {}", String::from_utf8_lossy(line)))
    }

    /// Whether the switch has closed the connection (reads to end of stream).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or("")
}

/// What must not change: the saved configuration and the port list (less
/// the connection counters), and the static FDB entries.
fn snapshot(sw: &mut SwitchProcess) -> Value {
    let config = sw.call("config.show", json!({})).expect("config.show");
    let mut ports = sw.call("port.list", json!({})).expect("port.list");
    for p in ports.as_array_mut().expect("port.list is an array") {
        let o = p.as_object_mut().expect("a port is an object");
        o.remove("connections");
        o.remove("connected");
    }
    let statics: Vec<Value> = sw
        .call("fdb.show", json!({}))
        .expect("fdb.show")
        .as_array()
        .expect("fdb.show is an array")
        .iter()
        .filter(|e| e["static"] == true)
        .map(|e| json!([e["mac"], e["vlan"], e["port"]]))
        .collect();
    json!({ "config": config, "ports": ports, "statics": statics })
}

/// A switch with ports a (VLAN 10, MTU 1500) and b and a static entry on a.
fn lab() -> SwitchProcess {
    let mut sw = SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
    sw.call("port.add", json!({"name": "a", "vlan": 10, "mtu": 1500}))
        .expect("port.add a");
    sw.add_port("b").expect("port.add b");
    sw.call(
        "fdb.add",
        json!({"mac": "02:00:00:00:00:01", "port": "a", "vlan": 10}),
    )
    .expect("fdb.add");
    sw
}

#[test]
fn every_bad_request_gets_its_error_code_and_changes_nothing() {
    let mut sw = lab();
    let before = snapshot(&mut sw);
    let b_sock = sw.run_dir().join("b.sock");
    let b_sock = b_sock.to_str().unwrap();
    let long = "x".repeat(65);
    let deep = format!(
        r#"{{"cmd":"port.list","args":{{"x":{}{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    // (line, code); the id is checked where the line parses.
    let parse_errors: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"not json".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        b"{\"cmd\":\"port.list\"} trailing".to_vec(),
        b"{\"cmd\":\"port.list\"\x00}".to_vec(),
        b"{\"cmd\":\"port.add\",\"args\":{\"name\":\"x\",\"vlan\":1e400}}".to_vec(),
        b"{\"cmd\":\"port.add\",\"args\":{\"name\":\"\\ud800\"}}".to_vec(),
        deep.into_bytes(),
    ];
    let mut c = Conn::open(&sw.control_path());
    for line in &parse_errors {
        let a = c.request(line);
        assert_eq!(
            (a["ok"].clone(), code(&a)),
            (json!(false), "parse_error"),
            "{} -> {a}",
            String::from_utf8_lossy(line)
        );
        assert!(a["id"].is_null(), "{a}");
    }
    let invalid_requests = [
        json!("port.list"),
        json!([]),
        json!([{"cmd": "port.list"}]),
        json!(42),
        json!(null),
        json!({"id": 1}),
        json!({"id": 2, "cmd": 7}),
        json!({"id": 3, "cmd": null}),
        json!({"id": 4, "cmd": "port.list", "args": []}),
        json!({"id": 5, "cmd": "port.list", "args": "x"}),
        json!({"id": 6, "cmd": "port.del", "args": 1}),
    ];
    for req in &invalid_requests {
        let a = c.request(req.to_string().as_bytes());
        assert_eq!(code(&a), "invalid_request", "{req} -> {a}");
        assert_eq!(a["id"], req.get("id").cloned().unwrap_or(Value::Null));
    }
    let cases: Vec<(&str, Value, &str)> = vec![
        ("nope", json!({}), "unknown_command"),
        ("PORT.LIST", json!({}), "unknown_command"),
        ("", json!({}), "unknown_command"),
        ("port.list ", json!({}), "unknown_command"),
        // port.add
        ("port.add", json!({}), "invalid_argument"),
        ("port.add", json!({"name": 5}), "invalid_argument"),
        ("port.add", json!({"name": null}), "invalid_argument"),
        ("port.add", json!({"name": "x/y"}), "invalid_argument"),
        ("port.add", json!({"name": "/x"}), "invalid_argument"),
        ("port.add", json!({"name": "../x"}), "invalid_argument"),
        ("port.add", json!({"name": ".x"}), "invalid_argument"),
        ("port.add", json!({"name": ""}), "invalid_argument"),
        ("port.add", json!({"name": long}), "invalid_argument"),
        (
            "port.add",
            json!({"name": "x", "mtu": 70000}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": 67}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": 16367}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": 0}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": -1}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": 1500.5}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mtu": "1500"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "vlan": 5000}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "vlan": 4095}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "vlan": -1}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "queues": 0}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "queues": 17}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "worker": 1}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "worker": u64::MAX}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mode": "sideways"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "mode": 1}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "perm": "999"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "perm": "abc"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "perm": "07777"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "perm": 660}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "owner": "no-such-user-vioswitch"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "group": "no-such-group-vioswitch"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "colour": "red"}),
            "invalid_argument",
        ),
        (
            "port.add",
            json!({"name": "x", "socket": 1}),
            "invalid_argument",
        ),
        ("port.add", json!({"name": "a"}), "exists"),
        ("port.add", json!({"name": "x", "socket": b_sock}), "exists"),
        (
            "port.add",
            json!({"name": "x", "socket": "/nonexistent-vioswitch-dir/x.sock"}),
            "socket_error",
        ),
        // port.del
        ("port.del", json!({}), "invalid_argument"),
        ("port.del", json!({"name": "zz"}), "not_found"),
        (
            "port.del",
            json!({"name": "a", "force": true}),
            "invalid_argument",
        ),
        ("port.del", json!({"name": ["a"]}), "invalid_argument"),
        // port.set
        ("port.set", json!({}), "invalid_argument"),
        ("port.set", json!({"vlan": 1}), "invalid_argument"),
        ("port.set", json!({"name": "zz", "vlan": 1}), "not_found"),
        (
            "port.set",
            json!({"name": "a", "vlan": 5000}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "vlan": "1"}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "mtu": 70000}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "mtu": 67}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "mtu": 16367}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "worker": 1}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "mode": "both"}),
            "invalid_argument",
        ),
        ("port.set", json!({"name": "a", "socket": b_sock}), "exists"),
        (
            "port.set",
            json!({"name": "a", "queues": 2}),
            "invalid_argument",
        ),
        (
            "port.set",
            json!({"name": "a", "vlam": 7}),
            "invalid_argument",
        ),
        // port.show, port.stats
        ("port.show", json!({}), "invalid_argument"),
        ("port.show", json!({"name": "zz"}), "not_found"),
        ("port.stats", json!({"name": "zz"}), "not_found"),
        ("port.stats", json!({"name": 5}), "invalid_argument"),
        ("port.stats", json!({"port": "a"}), "invalid_argument"),
        ("port.list", json!({"x": 1}), "invalid_argument"),
        // fdb
        ("fdb.show", json!({"port": "zz"}), "not_found"),
        ("fdb.show", json!({"name": "a"}), "invalid_argument"),
        ("fdb.flush", json!({"port": "zz"}), "not_found"),
        ("fdb.flush", json!({"prot": "a"}), "invalid_argument"),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02:03", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:zz", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "2:0:0:0:0:2", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "01:00:5e:00:00:01", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "ff:ff:ff:ff:ff:ff", "port": "a"}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02", "port": "zz"}),
            "not_found",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02", "port": "a", "vlan": 5000}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02", "port": "a", "vlan": 4095}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02", "port": "a", "vlan": -1}),
            "invalid_argument",
        ),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02"}),
            "invalid_argument",
        ),
        ("fdb.add", json!({"port": "a"}), "invalid_argument"),
        (
            "fdb.add",
            json!({"mac": "02:00:00:00:00:02", "port": "a", "age": 1}),
            "invalid_argument",
        ),
        ("fdb.del", json!({}), "invalid_argument"),
        ("fdb.del", json!({"mac": "bad"}), "invalid_argument"),
        ("fdb.del", json!({"mac": "02:00:00:00:00:09"}), "not_found"),
        (
            "fdb.del",
            json!({"mac": "02:00:00:00:00:01", "vlan": 11}),
            "not_found",
        ),
        (
            "fdb.del",
            json!({"mac": "02:00:00:00:00:01", "vlan": 10, "port": "a"}),
            "invalid_argument",
        ),
        // workers
        ("worker.list", json!({"x": 1}), "invalid_argument"),
        ("worker.move", json!({"port": "a"}), "invalid_argument"),
        ("worker.move", json!({"worker": 0}), "invalid_argument"),
        (
            "worker.move",
            json!({"port": "a", "worker": 1}),
            "invalid_argument",
        ),
        (
            "worker.move",
            json!({"port": "a", "worker": -1}),
            "invalid_argument",
        ),
        (
            "worker.move",
            json!({"port": "zz", "worker": 0}),
            "not_found",
        ),
        ("worker.rebalance", json!({"x": 1}), "invalid_argument"),
        // switch, config
        ("switch.info", json!({"x": 1}), "invalid_argument"),
        ("hello", json!({"x": 1}), "invalid_argument"),
        ("config.show", json!({"format": "yaml"}), "invalid_argument"),
        ("config.show", json!({"format": 1}), "invalid_argument"),
        (
            "config.save",
            json!({"path": "/tmp/outside.toml"}),
            "invalid_argument",
        ),
        (
            "config.save",
            json!({"path": "../outside.toml"}),
            "invalid_argument",
        ),
        (
            "config.save",
            json!({"path": ".hidden.toml"}),
            "invalid_argument",
        ),
        ("config.save", json!({"path": 1}), "invalid_argument"),
        (
            "config.save",
            json!({"file": "/tmp/x.toml"}),
            "invalid_argument",
        ),
    ];
    for (i, (cmd, args, want)) in cases.iter().enumerate() {
        let id = json!(format!("case-{i}"));
        let req = json!({"id": id, "cmd": cmd, "args": args});
        let a = c.request(req.to_string().as_bytes());
        assert_eq!(a["ok"], false, "{req} -> {a}");
        assert_eq!(code(&a), *want, "{req} -> {a}");
        assert_eq!(a["id"], id, "{req} -> {a}");
        assert!(
            a["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{req} -> {a}"
        );
    }
    // Blank lines are ignored; the connection still answers in order.
    c.send(b"\n  \n\t\n");
    let a = c.request(br#"{"id": {"nested": [1]}, "cmd": "switch.info"}"#);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["id"], json!({"nested": [1]}));
    assert_eq!(
        snapshot(&mut sw),
        before,
        "a refused request changed the switch"
    );
    let files: Vec<String> = std::fs::read_dir(sw.run_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(files, ["a.sock", "b.sock", "control.sock"]);
}

/// `port.set` that fails (here: the new socket cannot be bound) must leave
/// the port as it was: same VLAN in the listing and in the dataplane, the
/// guest still connected.
#[test]
fn a_failed_port_set_changes_nothing() {
    let mut sw = SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
    let mut ga = plug(&mut sw, "a", small_config());
    let mut gb = plug(&mut sw, "b", small_config());
    let before = snapshot(&mut sw);
    let connections = |sw: &mut SwitchProcess| -> Vec<(Value, Value)> {
        sw.call("port.list", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["connected"].clone(), p["connections"].clone()))
            .collect()
    };
    let conns = connections(&mut sw);
    let err = sw
        .call(
            "port.set",
            json!({"name": "a", "vlan": 7, "mtu": 100,
                   "socket": "/nonexistent-vioswitch-dir/a.sock"}),
        )
        .expect_err("port.set to a socket in a missing directory");
    assert!(err.to_string().contains("socket_error"), "{err}");
    assert_eq!(
        snapshot(&mut sw),
        before,
        "the failed port.set changed the port"
    );
    let mut problems = Vec::new();
    let after = connections(&mut sw);
    if after != conns {
        problems.push(format!(
            "the guest was disconnected: (connected, connections) of a, b {conns:?} -> {after:?}"
        ));
        // Carry on with a new guest on a's (restored) socket.
        drop(ga);
        ga = vioswitch_testkit::guest::NetGuest::connect(
            &sw.run_dir().join("a.sock"),
            small_config(),
        )
        .expect("reconnect a guest to a");
    }
    // Frames of 200 bytes (over the refused MTU of 100) still go from a to b
    // in VLAN 0.
    let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(BROADCAST, mac(1), 200, i)).collect();
    send_all(&mut ga, &frames);
    wait_tx_done(&mut ga);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < frames.len() && Instant::now() < deadline {
        if let Some(f) = gb.recv_timeout(Duration::from_millis(200)) {
            got.push(f);
        }
    }
    if got.len() != frames.len() {
        problems.push(format!(
            "b received {} of {} frames from a (port.list says a is {}); a's counters: {}",
            got.len(),
            frames.len(),
            sw.call("port.show", json!({"name": "a"})).unwrap(),
            sw.port_stats("a").unwrap()
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Send `line` (with its newline) in one write on a fresh connection;
/// returns the answer and the connection.
fn one_line(sock: &Path, line: &[u8]) -> (Option<Value>, Conn) {
    let mut c = Conn::open(sock);
    let mut bytes = line.to_vec();
    bytes.push(b'\n');
    c.send(&bytes);
    (c.answer(), c)
}

/// A valid `port.add` of `name` padded with spaces to `len` bytes.
fn padded_add(name: &str, len: usize) -> Vec<u8> {
    let mut line = format!(r#"{{"id":1,"cmd":"port.add","args":{{"name":"{name}"}}"#).into_bytes();
    line.resize(len - 1, b' ');
    line.push(b'}');
    assert_eq!(line.len(), len);
    line
}

#[test]
fn lines_over_64_kib_are_refused_whatever_their_length() {
    let mut sw = lab();
    let before = snapshot(&mut sw);
    let sock = sw.control_path();
    // At the limit: served.
    let (a, _) = one_line(&sock, &padded_add("edge", 65536));
    let a = a.expect("an answer to a 65536-byte line");
    assert_eq!(a["ok"], true, "a 65536-byte request: {a}");
    sw.del_port("edge").expect("port.del edge");
    // Over it, by one byte or by a lot: refused, connection closed, not run.
    let mut run = Vec::new();
    for len in [65537, 66000, 69000, 69631, 69632, 70000, 100_000, 1 << 20] {
        let name = format!("over{len}");
        let (a, mut c) = one_line(&sock, &padded_add(&name, len));
        let a = a.unwrap_or_else(|| panic!("no answer to a {len}-byte line"));
        if a["ok"] == true {
            run.push(len);
            sw.del_port(&name).expect("port.del");
            continue;
        }
        assert_eq!(code(&a), "line_too_long", "a {len}-byte line: {a}");
        assert!(
            c.closed(),
            "the connection stays open after a {len}-byte line"
        );
    }
    assert!(
        run.is_empty(),
        "requests over 65536 bytes were run, not refused: lengths {run:?}"
    );
    // A line that never ends.
    let mut c = Conn::open(&sock);
    let junk = vec![b'x'; 256 * 1024];
    c.send(&junk);
    let a = c.answer().expect("an answer to an endless line");
    assert_eq!(code(&a), "line_too_long", "{a}");
    assert_eq!(
        snapshot(&mut sw),
        before,
        "an over-long line changed the switch"
    );
}

#[test]
fn a_stalled_half_line_holds_nothing_and_is_dropped() {
    let mut sw = lab();
    let before = snapshot(&mut sw);
    let sock = sw.control_path();
    let started = Instant::now();
    let mut stalled = Conn::open(&sock);
    stalled.send(br#"{"id":1,"cmd":"port.add","args":{"name":"stall"#);
    let mut idle = Conn::open(&sock);
    // Everyone else is served meanwhile, including changes.
    for i in 0..20 {
        let mut c = Conn::open(&sock);
        let a = c.request(format!(r#"{{"id":{i},"cmd":"port.list"}}"#).as_bytes());
        assert_eq!(a["ok"], true, "{a}");
    }
    sw.add_port("meanwhile")
        .expect("port.add while a client stalls");
    sw.del_port("meanwhile")
        .expect("port.del while a client stalls");
    let a = idle.request(br#"{"id":2,"cmd":"switch.info"}"#);
    assert_eq!(a["ok"], true, "{a}");
    // The stalled client is dropped (after 30 s), without its request run.
    stalled
        .writer
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let mut rest = Vec::new();
    let r = stalled.reader.read_to_end(&mut rest);
    assert!(
        r.is_ok(),
        "the stalled client was not dropped within {:?}: {r:?}",
        started.elapsed()
    );
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).contains("\"ok\":false"),
        "the stalled half request was answered: {}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        sw.log_text().contains("half sent"),
        "the drop is not logged:\n{}",
        sw.log_text()
    );
    assert_eq!(snapshot(&mut sw), before);
    // An idle client with nothing half sent is not dropped.
    let a = idle.request(br#"{"id":3,"cmd":"switch.info"}"#);
    assert_eq!(a["ok"], true, "{a}");
}

#[test]
fn two_hundred_clients_at_once_are_all_served() {
    let mut sw = lab();
    let before = snapshot(&mut sw);
    let sock = sw.control_path();
    let n = 200;
    let start = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let sock = sock.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&sock);
                start.wait();
                let reqs = match i % 4 {
                    0 => vec![json!({"id": i, "cmd": "port.list"})],
                    1 => vec![json!({"id": i, "cmd": "port.stats"})],
                    2 => vec![json!({"id": i, "cmd": "switch.info"})],
                    _ => vec![
                        json!({"id": i, "cmd": "port.add", "args": {"name": format!("c{i}")}}),
                        json!({"id": i, "cmd": "port.del", "args": {"name": format!("c{i}")}}),
                    ],
                };
                reqs.iter()
                    .map(|r| c.request(r.to_string().as_bytes()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        for a in t.join().expect("client thread") {
            assert_eq!(a["ok"], true, "client {i}: {a}");
            assert_eq!(a["id"], i, "client {i}: {a}");
        }
    }
    assert_eq!(snapshot(&mut sw), before);
}

#[test]
fn the_client_after_256_is_told_busy_and_served_once_one_leaves() {
    let mut sw = lab();
    let sock = sw.control_path();
    // The harness holds one connection: 255 more fill the switch.
    let mut held = Vec::new();
    for i in 0..255 {
        let mut c = Conn::open(&sock);
        let a = c.request(br#"{"id":1,"cmd":"switch.info"}"#);
        assert_eq!(a["ok"], true, "client {i} of 255: {a}");
        held.push(c);
    }
    for _ in 0..3 {
        let mut c = Conn::open(&sock);
        let a = c.request(br#"{"id":1,"cmd":"switch.info"}"#);
        assert_eq!(code(&a), "busy", "{a}");
        assert!(c.closed(), "a busy client is left open");
    }
    held.truncate(250);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = Conn::open(&sock);
        let a = c.request(br#"{"id":1,"cmd":"switch.info"}"#);
        if a["ok"] == true {
            break;
        }
        assert_eq!(code(&a), "busy", "{a}");
        assert!(
            Instant::now() < deadline,
            "no client is served after five left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    sw.call("switch.info", json!({}))
        .expect("the harness's client");
}

#[test]
fn clients_that_leave_mid_request_change_nothing() {
    let mut sw = lab();
    let before = snapshot(&mut sw);
    let sock = sw.control_path();
    for i in 0..50 {
        // Half a request, then gone.
        let mut c = Conn::open(&sock);
        c.send(format!(r#"{{"id":{i},"cmd":"port.add","args":{{"name":"half{i}"}}"#).as_bytes());
        drop(c);
        // A whole request, gone before the answer (the switch's write fails).
        let mut c = Conn::open(&sock);
        c.send(br#"{"cmd":"port.list"}"#);
        c.send(b"\n");
        c.send(br#"{"cmd":"config.show"}"#);
        c.send(b"\n");
        let _ = c.writer.shutdown(std::net::Shutdown::Both);
        drop(c);
        // A connection that says nothing.
        drop(Conn::open(&sock));
    }
    assert!(sw.is_running(), "the switch died");
    assert_eq!(snapshot(&mut sw), before);
    // And it still switches.
    let mut g1 = plug(&mut sw, "g1", small_config());
    let mut g2 = plug(&mut sw, "g2", small_config());
    let f = frame(BROADCAST, mac(1), 100, 1);
    send_all(&mut g1, std::slice::from_ref(&f));
    assert_eq!(recv_n(&mut g2, 1), vec![f]);
}

#[test]
fn events_subscribe_checks_its_arguments() {
    let sw = lab();
    let sock = sw.control_path();
    for args in [json!({"bogus": 1}), json!([])] {
        let mut c = Conn::open(&sock);
        let req = json!({"id": 1, "cmd": "events.subscribe", "args": args});
        let a = c.request(req.to_string().as_bytes());
        assert_eq!(a["ok"], false, "{req} subscribed: {a}");
    }
}
