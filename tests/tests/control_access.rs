//! Who may use the control socket. By default it is mode 0600 (root and the
//! daemon's user only); with `--control-group` it is 0660 for that group,
//! whose members (by primary or supplementary group) get in. A peer that is
//! neither (here: `nobody`, reaching a socket someone made world-writable)
//! is answered `permission_denied`, cannot act, and the refusal is logged.
//!
//! The test runs as root and runs `vioctl` as uid 65534 (nobody) with the
//! groups each case needs.

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
        for args in [
            vec!["raw", "port.add", r#"{"name":"evil"}"#],
            vec!["port", "del", "m1"],
            vec![
                "raw",
                "config.save",
                r#"{"path":"/tmp/vioswitch-evil.toml"}"#,
            ],
        ] {
            let (code, out, err) = vioctl_as(NOBODY, NOGROUP, &[], &dir, &args);
            assert_eq!(code, 1, "{args:?}: not refused: {out}{err}");
            assert!(
                format!("{out}{err}").contains("permission_denied"),
                "{args:?}: {out}{err}"
            );
        }
        // A raw client is answered at once and then cut off.
        {
            use std::io::{BufRead, BufReader, Write};
            let (code, out, err) = vioctl_as(NOBODY, NOGROUP, &[], &dir, &["info"]);
            assert_eq!(code, 1, "{out}{err}");
            // root, on the same world-writable socket, is still served.
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
