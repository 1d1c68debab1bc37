//! Who may use the control socket. By default it is mode 0600 (root and the
//! daemon's user only); with `--control-group` it is 0660 for that group,
//! whose members (by primary or supplementary group) get in. A peer that is
//! neither (here: `nobody`, reaching a socket someone made world-writable)
//! is answered `permission_denied`, cannot act, and the refusal is logged.
//!
//! The test runs as root and runs `vioctl`, or a raw client forked from the
//! test, as uid 65534 (nobody) with the groups each case needs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use vioswitch_testkit::switch::{vioswitch_bin, SwitchOptions, SwitchProcess};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// The `users` group of Debian.
const USERS: u32 = 100;

fn vioctl() -> PathBuf {
    vioswitch_bin()
        .expect("vioswitch binary")
        .with_file_name("vioctl")
}

/// Run `vioctl --run-dir DIR --json ARGS` as `uid`/`gid` with supplementary
/// `groups`. Returns (exit code, stdout, stderr).
fn vioctl_as(
    uid: u32,
    gid: u32,
    groups: &[u32],
    run_dir: &Path,
    args: &[&str],
) -> (i32, String, String) {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = Command::new(vioctl());
    cmd.arg("--run-dir")
        .arg(run_dir)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null());
    // SAFETY: between fork and exec the closure only makes three system
    // calls on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run vioctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a raw client running as `uid`/`gid` (no supplementary groups) got:
/// `Err(errno)` if it could not connect, else every byte the switch sent
/// after the client wrote `request` (read until the switch closes, or 10 s).
///
/// The client is a forked child of this test that only makes system calls
/// on memory prepared before the fork, so it is safe in a threaded process.
fn raw_client_as(uid: u32, gid: u32, sock: &Path, request: &[u8]) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY (all unsafe blocks below): plain system calls on file
    // descriptors and buffers owned by this function.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = sock.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let mut buf = [0u8; 4096];
    // SAFETY: the child only makes async-signal-safe system calls and ends
    // with _exit.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            libc::close(rd);
            let fail = |tag: u8| {
                let e = *libc::__errno_location();
                let msg = [tag, e as u8, (e >> 8) as u8, 0];
                libc::write(wr, msg.as_ptr().cast(), 4);
                libc::_exit(1);
            };
            let none: [libc::gid_t; 0] = [];
            if libc::setgroups(0, none.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                fail(b'U');
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                fail(b'E');
            }
            let tv = libc::timeval {
                tv_sec: 10,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::write(wr, b"C".as_ptr().cast(), 1);
            libc::send(
                fd,
                request.as_ptr().cast(),
                request.len(),
                libc::MSG_NOSIGNAL,
            );
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(wr, buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => {
            unsafe { libc::close(wr) };
            let mut out = Vec::new();
            loop {
                let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
            unsafe { libc::close(rd) };
            nix::sys::wait::waitpid(child, None).expect("waitpid");
            match out.first() {
                Some(b'C') => Ok(out[1..].to_vec()),
                Some(b'E') => Err(i32::from(out[1]) | i32::from(out[2]) << 8),
                _ => panic!("the raw client could not become uid {uid}: {out:?}"),
            }
        }
    }
}

fn port_names(sw: &mut SwitchProcess) -> Vec<String> {
    sw.call("port.list", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_control_socket_is_for_root_and_the_daemon_s_user_by_default() {
    let mut sw = SwitchProcess::spawn_logged(SwitchOptions::default()).expect("start vioswitch");
    let meta = std::fs::metadata(sw.control_path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    // root gets in (as vioctl, in another process, too).
    let (code, out, err) = vioctl_as(0, 0, &[], sw.run_dir(), &["port", "add", "r1"]);
    assert_eq!(code, 0, "root: {out}{err}");
    // nobody cannot even connect, in any group.
    for groups in [vec![], vec![USERS]] {
        let (code, out, err) = vioctl_as(
            NOBODY,
            NOGROUP,
            &groups,
            sw.run_dir(),
            &["raw", "port.add", r#"{"name":"evil"}"#],
        );
        assert_eq!(code, 2, "nobody {groups:?} reached the switch: {out}{err}");
        assert!(err.contains("ermission denied"), "{err}");
    }
    assert_eq!(port_names(&mut sw), ["r1"]);
}

#[test]
fn members_of_the_control_group_get_in_and_others_are_refused_and_logged() {
    for group in ["users", "100"] {
        let mut sw = SwitchProcess::spawn_logged(SwitchOptions {
            extra_args: vec!["--control-group".into(), group.into()],
            ..Default::default()
        })
        .expect("start vioswitch");
        let dir = sw.run_dir().to_path_buf();
        let meta = std::fs::metadata(sw.control_path()).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "--control-group {group}"
        );
        assert_eq!(meta.gid(), USERS, "--control-group {group}");

        // A member by its primary group, and one by a supplementary group.
        let (code, out, err) = vioctl_as(NOBODY, USERS, &[], &dir, &["port", "add", "m1"]);
        assert_eq!(code, 0, "primary group member: {out}{err}");
        let (code, out, err) = vioctl_as(NOBODY, NOGROUP, &[USERS], &dir, &["port", "add", "m2"]);
        assert_eq!(code, 0, "supplementary group member: {out}{err}");
        let (code, out, _) = vioctl_as(NOBODY, NOGROUP, &[USERS], &dir, &["port", "list"]);
        assert_eq!(code, 0);
        let listed: Value = serde_json::from_str(&out).expect("vioctl --json prints JSON");
        assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

        // Not a member: the file mode keeps it out.
        let (code, out, err) = vioctl_as(
            NOBODY,
            NOGROUP,
            &[],
            &dir,
            &["raw", "port.add", r#"{"name":"evil"}"#],
        );
        assert_eq!(code, 2, "a non-member reached the switch: {out}{err}");

        // Not a member, but the socket was made world-writable by mistake:
        // the switch itself refuses, says why, and logs it.
        std::fs::set_permissions(sw.control_path(), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        for request in [
            r#"{"id":1,"cmd":"port.add","args":{"name":"evil"}}"#,
            r#"{"id":2,"cmd":"port.del","args":{"name":"m1"}}"#,
            r#"{"id":3,"cmd":"config.save","args":{"path":"/tmp/vioswitch-evil.toml"}}"#,
        ] {
            let got = raw_client_as(
                NOBODY,
                NOGROUP,
                &sw.control_path(),
                format!("{request}\n").as_bytes(),
            )
            .unwrap_or_else(|e| panic!("nobody cannot connect to the 0666 socket: errno {e}"));
            let text = String::from_utf8_lossy(&got);
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 1, "{request}: {text}");
            let a: Value = serde_json::from_str(lines[0]).expect("a JSON answer");
            assert_eq!(a["ok"], false, "{a}");
            assert_eq!(a["error"]["code"], "permission_denied", "{a}");
            assert!(
                a["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("65534"),
                "{a}"
            );
        }
        // root, on the same world-writable socket, is still served.
        {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::os::unix::net::UnixStream::connect(sw.control_path()).unwrap();
            writeln!(s, r#"{{"id":5,"cmd":"switch.info"}}"#).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            let a: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(a["ok"], true, "{a}");
        }
        assert_eq!(port_names(&mut sw), ["m1", "m2"], "a refused client acted");
        assert!(!Path::new("/tmp/vioswitch-evil.toml").exists());
        let log = sw.log_text();
        assert!(
            log.contains("refused a connection") && log.contains("uid 65534"),
            "the refusal is not logged:\n{log}"
        );
        // Members still get in afterwards.
        let (code, out, err) = vioctl_as(NOBODY, USERS, &[], &dir, &["port", "del", "m1"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(port_names(&mut sw), ["m2"]);
    }
}
