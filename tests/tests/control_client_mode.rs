//! Client-mode ports: the frontend listens and the switch connects. Traffic
//! flows between a client-mode port's guest and a server-mode port's guest;
//! when the frontend goes away and listens again, on the same socket or a
//! new one, the switch connects again by itself; removing the port leaves
//! the frontend's socket alone.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use vioswitch_testkit::frames::{frame, mac, plug, recv_n, send_all, small_config, wait_until};
use vioswitch_testkit::guest::NetGuest;
use vioswitch_testkit::switch::{SwitchOptions, SwitchProcess};

/// Bound on the switch's reconnect (its backoff is at most 5 s).
const ACCEPT_DEADLINE: Duration = Duration::from_secs(30);

fn port(sw: &mut SwitchProcess, name: &str) -> Value {
    sw.call("port.show", json!({"name": name}))
        .unwrap_or_else(|e| panic!("port.show {name}: {e}"))
}

/// Frames both ways between `c` (MAC 1) and `s` (MAC 2), unicast once both
/// are learnt; `round` keeps tags apart.
fn talk(c: &mut NetGuest, s: &mut NetGuest, round: u64) {
    for k in 0..4 {
        let tag = round * 100 + k;
        let to_s = frame(mac(2), mac(1), 60 + 200 * k as usize, tag);
        send_all(c, std::slice::from_ref(&to_s));
        assert_eq!(recv_n(s, 1), vec![to_s], "c -> s, round {round}");
        let to_c = frame(mac(1), mac(2), 1514 - 200 * k as usize, tag + 50);
        send_all(s, std::slice::from_ref(&to_c));
        assert_eq!(recv_n(c, 1), vec![to_c], "s -> c, round {round}");
    }
}

fn listen(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).expect("listen as a frontend would")
}

#[test]
fn the_switch_connects_to_a_listening_guest_and_reconnects_when_it_comes_back() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let dir = vioswitch_testkit::temp_dir("vioswitch-frontend").unwrap();
    let path = dir.join("qemu-c.sock");
    let listener = listen(&path);
    let r = sw
        .call(
            "port.add",
            json!({"name": "c", "mode": "client", "socket": path}),
        )
        .expect("port.add in client mode");
    assert_eq!(r["mode"], "client", "{r}");
    let mut gc = NetGuest::accept(&listener, small_config(), ACCEPT_DEADLINE)
        .expect("the switch connects to our socket");
    let mut gs = plug(&mut sw, "s", small_config());
    talk(&mut gc, &mut gs, 1);
    assert_eq!(port(&mut sw, "c")["connections"], 1);

    // The guest closes its connection but keeps listening: the switch comes back.
    gc.disconnect();
    let mut gc = NetGuest::accept(&listener, small_config(), ACCEPT_DEADLINE)
        .expect("the switch reconnects");
    talk(&mut gc, &mut gs, 2);
    assert_eq!(port(&mut sw, "c")["connections"], 2);

    // The guest goes away entirely (no listener, no socket file) for a
    // while, then listens again on the same path.
    gc.disconnect();
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    wait_until("c to be disconnected", || {
        port(&mut sw, "c")["connected"] == false
    });
    std::thread::sleep(Duration::from_millis(700)); // a few failed attempts
    assert_eq!(port(&mut sw, "c")["connected"], false);
    let listener = listen(&path);
    let mut gc = NetGuest::accept(&listener, small_config(), ACCEPT_DEADLINE)
        .expect("the switch reconnects once the socket is back");
    talk(&mut gc, &mut gs, 3);
    assert_eq!(port(&mut sw, "c")["connections"], 3);

    // port.set socket: the switch drops this guest and connects to the new
    // socket.
    let path2 = dir.join("qemu-c2.sock");
    let listener2 = listen(&path2);
    sw.call("port.set", json!({"name": "c", "socket": path2}))
        .expect("port.set socket");
    let mut gc2 = NetGuest::accept(&listener2, small_config(), ACCEPT_DEADLINE)
        .expect("the switch connects to the new socket");
    talk(&mut gc2, &mut gs, 4);
    drop(gc);

    // Removing the port leaves the frontend's socket file in place.
    sw.del_port("c").expect("port.del");
    assert!(path2.exists(), "port.del removed the frontend's socket");
    assert!(path.exists(), "the old socket was removed");
    assert!(sw.call("port.show", json!({"name": "c"})).is_err());
}

#[test]
fn a_client_mode_port_waits_for_a_socket_that_does_not_exist_yet() {
    let mut sw = SwitchProcess::spawn(SwitchOptions::default()).expect("start vioswitch");
    let dir = vioswitch_testkit::temp_dir("vioswitch-frontend").unwrap();
    let path = dir.join("later.sock");
    sw.call(
        "port.add",
        json!({"name": "c", "mode": "client", "socket": path}),
    )
    .expect("port.add in client mode before the frontend listens");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(port(&mut sw, "c")["connected"], false);
    let listener = listen(&path);
    let mut gc = NetGuest::accept(&listener, small_config(), ACCEPT_DEADLINE)
        .expect("the switch connects once the frontend listens");
    let mut gs = plug(&mut sw, "s", small_config());
    talk(&mut gc, &mut gs, 1);
    // Switched to server mode on another socket: the switch listens there.
    let spath = dir.join("now-server.sock");
    sw.call(
        "port.set",
        json!({"name": "c", "mode": "server", "socket": spath}),
    )
    .expect("port.set mode server");
    drop(gc);
    let mut gc = NetGuest::connect(&spath, small_config()).expect("connect to the server socket");
    talk(&mut gc, &mut gs, 2);
    assert_eq!(port(&mut sw, "c")["mode"], "server");
}
