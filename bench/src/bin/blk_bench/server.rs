//! The servers under test, each pinned to one core and killed when dropped:
//! `qemu-storage-daemon` with a vhost-user-blk export (the reference), and
//! vioswitch with one disk added over its control socket.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vioswitch_testkit::switch::{HarnessError, SwitchOptions, SwitchProcess};

use crate::{pin_current_thread, stopped, BenchError};

/// The block node that qsd exports.
#[derive(Debug, Clone, Copy)]
pub enum QsdNode<'a> {
    /// A raw image file, through the page cache (`cache.direct=off`), with
    /// this `aio=` mode (`threads`: qsd's default, `io_uring`).
    File { image: &'a Path, aio: &'a str },
    /// The `null-co` driver of this many bytes (`read-zeroes=on`): the cost
    /// of the vhost-user path alone, a ceiling with no file I/O.
    Null { size: u64 },
}

/// A running server that exports one disk over a vhost-user socket.
pub trait Server {
    /// The disk's vhost-user-blk socket.
    fn socket(&self) -> &Path;
    /// The server's pid (for its CPU time).
    fn pid(&self) -> u32;
    /// How it was started, for the report.
    fn cmdline(&self) -> &str;
}

/// Escape a value for QEMU's `key=value,...` option syntax.
fn qemu_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// `qemu-storage-daemon` exporting one block node as vhost-user-blk.
pub struct Qsd {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    cmdline: String,
}

impl Qsd {
    /// Start `binary` on `core` with `node` exported at `dir/qsd.sock`.
    pub fn start(binary: &str, node: QsdNode, core: usize, dir: &Path) -> Result<Qsd, BenchError> {
        let socket = dir.join("qsd.sock");
        let _ = std::fs::remove_file(&socket);
        let (blockdev, node) = match node {
            QsdNode::File { image, aio } => (
                format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off,aio={aio}",
                    qemu_opt(&image.to_string_lossy())
                ),
                "f0",
            ),
            QsdNode::Null { size } => (
                format!("driver=null-co,node-name=n0,size={size},read-zeroes=on"),
                "n0",
            ),
        };
        let args = [
            "--blockdev".to_string(),
            blockdev,
            "--export".to_string(),
            format!(
                "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},\
                 writable=on,num-queues=1",
                qemu_opt(&socket.to_string_lossy())
            ),
        ];
        let log = dir.join("qsd.log");
        let out = std::fs::File::create(&log).map_err(|e| BenchError::io(&log, e))?;
        let err = out.try_clone().map_err(|e| BenchError::io(&log, e))?;
        let cmdline = format!("taskset -c {core} {binary} {}", args.join(" "));
        let mut cmd = Command::new(binary);
        cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the benchmark; run on the server core (as
                // `taskset -c CORE`), threads included.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| BenchError::Qsd {
            msg: format!(
                "cannot start {binary}: {e} (apt-get install qemu-system-x86 or qemu-utils)"
            ),
        })?;
        let mut qsd = Qsd {
            child: Some(child),
            socket,
            log,
            cmdline,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !qsd.socket.exists() {
            if let Some(Ok(Some(st))) = qsd.child.as_mut().map(Child::try_wait) {
                return Err(BenchError::Qsd {
                    msg: format!("exited ({st}):\n{}", qsd.log_text()),
                });
            }
            if Instant::now() > deadline || stopped() {
                return Err(BenchError::Qsd {
                    msg: format!("made no socket:\n{}", qsd.log_text()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(qsd)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Server for Qsd {
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
    fn cmdline(&self) -> &str {
        &self.cmdline
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// vioswitch with one worker and one disk `d0` on a raw image file.
pub struct SwitchDisk {
    sw: SwitchProcess,
    socket: PathBuf,
    cmdline: String,
}

impl SwitchDisk {
    /// Start `binary` (one worker, `--idle-poll-us idle_poll_us`, then
    /// `extra`) pinned to `core`, and add the disk over the control socket
    /// (`disk.add`). `client_core` is where this thread goes back to.
    pub fn start(
        binary: &Path,
        image: &Path,
        idle_poll_us: u64,
        extra: &[String],
        core: usize,
        client_core: usize,
    ) -> Result<SwitchDisk, BenchError> {
        let mut extra_args = vec!["--idle-poll-us".to_string(), idle_poll_us.to_string()];
        extra_args.extend_from_slice(extra);
        // The child inherits the affinity of the thread that forks it.
        pin_current_thread(core).map_err(|what| BenchError::Setup { what })?;
        let spawned = SwitchProcess::spawn(SwitchOptions {
            workers: 1,
            extra_args: extra_args.clone(),
            binary: Some(binary.to_path_buf()),
        });
        pin_current_thread(client_core).map_err(|what| BenchError::Setup { what })?;
        let sw = spawned.map_err(|e| BenchError::Switch {
            msg: format!("{} did not start: {e}", binary.display()),
        })?;
        let args = json!({ "name": "d0", "path": image, "queues": 1 });
        // From here on, dropping `disk` on an error stops the switch and
        // removes its run directory.
        let mut disk = SwitchDisk {
            cmdline: format!(
                "taskset -c {core} {} --run-dir {} --workers 1 {}; control: \
                 {{\"cmd\":\"disk.add\",\"args\":{args}}}",
                binary.display(),
                sw.run_dir().display(),
                extra_args.join(" "),
            ),
            // The interface promises RUN_DIR/d0.sock; the answer may say.
            socket: sw.run_dir().join("d0.sock"),
            sw,
        };
        match disk.sw.call("disk.add", args.clone()) {
            Ok(result) => {
                if let Some(s) = result.get("socket").and_then(Value::as_str) {
                    disk.socket = PathBuf::from(s);
                }
            }
            Err(HarnessError::Command { error, .. })
                if error["code"].as_str() == Some("unknown_command") =>
            {
                return Err(BenchError::NoDiskSupport {
                    binary: binary.to_path_buf(),
                    answer: error,
                })
            }
            Err(e) => {
                return Err(BenchError::Switch {
                    msg: format!("disk.add {args}: {e}"),
                })
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !disk.socket.exists() {
            if Instant::now() > deadline || stopped() {
                return Err(BenchError::Switch {
                    msg: format!(
                        "disk.add answered but {} never appeared",
                        disk.socket.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(disk)
    }
}

impl Drop for SwitchDisk {
    fn drop(&mut self) {
        self.sw.kill();
        let _ = std::fs::remove_dir_all(self.sw.run_dir());
    }
}

impl Server for SwitchDisk {
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn pid(&self) -> u32 {
        self.sw.pid()
    }
    fn cmdline(&self) -> &str {
        &self.cmdline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_options_escape_commas() {
        assert_eq!(qemu_opt("/tmp/a,b/c.img"), "/tmp/a,,b/c.img");
        assert_eq!(qemu_opt("/tmp/plain"), "/tmp/plain");
    }
}
