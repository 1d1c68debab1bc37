//! blk_bench: virtio-blk throughput and latency of vioswitch's disks against
//! `qemu-storage-daemon`'s vhost-user-blk export, measured by an independent
//! client, libblkio's `virtio-blk-vhost-user` driver (the `blkio` crate).
//!
//! `cargo run --release -p vioswitch-bench --bin blk_bench -- [options]`
//!
//! For each repeat and each target (a server and its backing), the server is
//! started on the
//! server core, the client (this process) connects from the client core,
//! checks that data moves, and runs every job: a warm-up, then a measured
//! window. The tables show the median repeat. See bench/RESULTS.md.

#[path = "../../hist.rs"]
mod hist;
#[path = "../../run_control.rs"]
mod run_control;
#[path = "../../sysstat.rs"]
mod sysstat;

pub use run_control::{install_signals, pin_current_thread, stopped};

mod client;
mod report;
mod server;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use client::{Client, Contents, Job, JobStats};
use report::Run;
use server::{Qsd, QsdNode, Server, SwitchDisk};
use sysstat::{CpuSnap, Interference};

/// Errors of the disk benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("libblkio {what}: {source} ({})", source.errno())]
    Blkio { what: String, source: blkio::Error },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qemu-storage-daemon: {msg}")]
    Qsd { msg: String },
    #[error("vioswitch: {msg}")]
    Switch { msg: String },
    #[error(
        "{} has no disk support yet: the control command disk.add was answered {answer}; \
         build a vioswitch with virtio-blk disks (disk.add) or leave it out with --targets qsd-threads,qsd-io_uring,qsd-null",
        binary.display()
    )]
    NoDiskSupport {
        binary: PathBuf,
        answer: serde_json::Value,
    },
    #[error("request {user_data} failed: {errno}")]
    Request {
        user_data: usize,
        errno: blkio::Errno,
    },
    #[error("a completion for request {0}, which was never submitted")]
    UnknownCompletion(usize),
    #[error("no completion for {0:?}: the server stopped answering")]
    Stalled(Duration),
    #[error("data check failed: {0}")]
    Data(String),
    #[error("{what}")]
    Setup { what: String },
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> BenchError {
        BenchError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// virtio-blk throughput and latency: vioswitch vs qemu-storage-daemon,
/// measured with libblkio's virtio-blk-vhost-user driver.
#[derive(Parser, Debug, Clone)]
#[command(version)]
struct Args {
    /// Servers to measure, in this order within each repeat. vioswitch and
    /// qsd-* share one page-cached raw image; qsd-null is qsd's null-co (no
    /// file I/O, a ceiling: vioswitch has no null backing).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "vioswitch,qsd-threads,qsd-io_uring,qsd-null"
    )]
    targets: Vec<Target>,
    /// Jobs to run [default: all]: randread-4k-qd1, randread-4k-qd32,
    /// seqread-64k, seqwrite-64k.
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Requests in flight for the sequential 64 KiB jobs.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    seq_depth: u16,
    /// Seconds of each job's measured window.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of each job before its window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Interleaved repeats of the whole set; the tables show the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Size of the image (and of the null disk) in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Image file [default: a new one in a temporary directory, removed at
    /// the end]. An existing file is overwritten with the pattern.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Core of the server (qsd or vioswitch, all its threads).
    #[arg(long, default_value_t = 1)]
    server_core: usize,
    /// Core of the client (this process).
    #[arg(long, default_value_t = 0)]
    client_core: usize,
    /// Entries of the client's virtqueue.
    #[arg(long, default_value_t = 256)]
    queue_size: i32,
    /// Busy-poll the used ring instead of waiting on the completion eventfd
    /// (a guest's interrupt).
    #[arg(long)]
    client_poll: bool,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: String,
    /// The vioswitch binary [default: `vioswitch` beside this binary, e.g.
    /// target/release/vioswitch].
    #[arg(long)]
    vioswitch: Option<PathBuf>,
    /// vioswitch's --idle-poll-us.
    #[arg(long, default_value_t = 200)]
    idle_poll_us: u64,
    /// Extra vioswitch arguments, e.g. --switch-arg=--batch=64.
    #[arg(long = "switch-arg", allow_hyphen_values = true)]
    switch_args: Vec<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The jobs, in the order they run.
fn all_jobs(seq_depth: usize) -> [Job; 4] {
    [
        Job {
            name: "randread-4k-qd1",
            block: 4096,
            depth: 1,
            random: true,
            write: false,
        },
        Job {
            name: "randread-4k-qd32",
            block: 4096,
            depth: 32,
            random: true,
            write: false,
        },
        Job {
            name: "seqread-64k",
            block: 64 << 10,
            depth: seq_depth,
            random: false,
            write: false,
        },
        Job {
            name: "seqwrite-64k",
            block: 64 << 10,
            depth: seq_depth,
            random: false,
            write: true,
        },
    ]
}

/// A server and what backs its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// vioswitch on the image file.
    #[value(name = "vioswitch")]
    Vioswitch,
    /// qsd on the image file, `aio=threads` (qsd's default).
    #[value(name = "qsd-threads")]
    QsdThreads,
    /// qsd on the image file, `aio=io_uring`.
    #[value(name = "qsd-io_uring")]
    QsdIoUring,
    /// qsd on `null-co`: the vhost-user ceiling without file I/O.
    #[value(name = "qsd-null")]
    QsdNull,
}

impl Target {
    /// Name in the tables and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Target::Vioswitch => "vioswitch",
            Target::QsdThreads => "qsd-threads",
            Target::QsdIoUring => "qsd-io_uring",
            Target::QsdNull => "qsd-null",
        }
    }

    /// What backs the disk: `file` (the page-cached image) or `null`.
    pub fn backing(self) -> &'static str {
        match self {
            Target::QsdNull => "null",
            _ => "file",
        }
    }
}

/// The vioswitch built beside this binary (same target directory and
/// profile: `cargo build --release` puts both in target/release).
fn default_vioswitch() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup {
        what: format!("where is this binary: {e}"),
    })?;
    Ok(exe.with_file_name("vioswitch"))
}

/// Write the pattern over `size` bytes of `path`, make it durable (so that
/// no writeback runs during the windows), then read it all once so that it
/// is in the page cache.
fn prepare_image(path: &Path, size: u64) -> Result<(), BenchError> {
    let io = |e| BenchError::io(path, e);
    let t = Instant::now();
    let mut f = std::fs::File::create(path).map_err(io)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        for (i, w) in chunk[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&client::pattern_word(off + 8 * i as u64).to_le_bytes());
        }
        f.write_all(&chunk[..n]).map_err(io)?;
        off += n as u64;
    }
    f.sync_all().map_err(io)?;
    drop(f);
    let mut f = std::fs::File::open(path).map_err(io)?;
    while f.read(&mut chunk).map_err(io)? > 0 {}
    eprintln!(
        "image {} ({} MiB) written and read in {:.1?}",
        path.display(),
        size >> 20,
        t.elapsed()
    );
    Ok(())
}

/// Flush what a write job left dirty, so that the next server does not pay
/// for its writeback.
fn settle_image(path: &Path) -> Result<(), BenchError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| BenchError::io(path, e))
}

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Connect, retrying while the server sets its socket up.
fn connect(args: &Args, socket: &Path, buf_len: usize) -> Result<Client, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Client::connect(socket, args.queue_size, args.client_poll, buf_len) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline && !stopped() => {
                eprintln!("   connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One server session: start, check, run every job, stop.
fn session(
    args: &Args,
    target: Target,
    image: &Path,
    jobs: &[Job],
    repeat: usize,
    work: &Path,
) -> Result<Vec<Run>, BenchError> {
    eprintln!(
        "== repeat {}/{}: {} ({})",
        repeat + 1,
        args.repeat,
        target.key(),
        target.backing()
    );
    let qsd = |node| Qsd::start(&args.qsd, node, args.server_core, work);
    let server: Box<dyn Server> = match target {
        Target::Vioswitch => Box::new(SwitchDisk::start(
            &match &args.vioswitch {
                Some(p) => p.clone(),
                None => default_vioswitch()?,
            },
            image,
            args.idle_poll_us,
            &args.switch_args,
            args.server_core,
            args.client_core,
        )?),
        Target::QsdThreads => Box::new(qsd(QsdNode::File {
            image,
            aio: "threads",
        })?),
        Target::QsdIoUring => Box::new(qsd(QsdNode::File {
            image,
            aio: "io_uring",
        })?),
        Target::QsdNull => Box::new(qsd(QsdNode::Null {
            size: args.size_mib << 20,
        })?),
    };
    let buf_len = jobs.iter().map(|j| j.block * j.depth).max().unwrap_or(0);
    let mut client = connect(args, server.socket(), buf_len.max(64 << 10))?;
    let contents = match target {
        Target::QsdNull => Contents::Zeroes,
        _ => Contents::Pattern,
    };
    client.check_data(contents)?;
    let mut runs = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let before = CpuSnap::take(server.pid());
        let server_before = sysstat::proc_ticks(server.pid());
        let t = Instant::now();
        let stats: JobStats = client.run(
            job,
            Duration::from_secs_f64(args.warmup),
            Duration::from_secs_f64(args.duration),
            0x9e37_79b9_7f4a_7c15 ^ ((repeat * jobs.len() + i) as u64),
        )?;
        let elapsed = t.elapsed().as_secs_f64();
        let interference: Interference = before.until(&CpuSnap::take(server.pid()));
        let server_ticks = sysstat::proc_ticks(server.pid()).saturating_sub(server_before);
        let run = Run {
            target,
            job: *job,
            repeat,
            stats,
            // Over warm-up and window alike (both run the same load).
            server_cpu_pct: 100.0 * server_ticks as f64 / ticks_per_sec() / elapsed,
            interference,
            cmdline: server.cmdline().to_string(),
        };
        eprintln!("   {}", run.summary());
        runs.push(run);
    }
    drop(client);
    drop(server);
    if target.backing() == "file" {
        settle_image(image)?;
    }
    Ok(runs)
}

fn select_jobs(args: &Args) -> Result<Vec<Job>, BenchError> {
    let all = all_jobs(usize::from(args.seq_depth));
    if args.jobs.is_empty() {
        return Ok(all.to_vec());
    }
    args.jobs
        .iter()
        .map(|name| {
            all.iter()
                .find(|j| j.name == name)
                .copied()
                .ok_or_else(|| BenchError::Setup {
                    what: format!("unknown job {name:?}"),
                })
        })
        .collect()
}

fn run(args: &Args) -> Result<(), BenchError> {
    let setup = |what| BenchError::Setup { what };
    install_signals().map_err(setup)?;
    pin_current_thread(args.client_core).map_err(setup)?;
    let jobs = select_jobs(args)?;
    let size = args.size_mib << 20;
    let work = vioswitch_testkit::temp_dir("vioswitch-blkbench")
        .map_err(|e| BenchError::io(&std::env::temp_dir(), e))?;
    let image = args.image.clone().unwrap_or_else(|| work.join("disk.img"));
    if args.targets.iter().any(|t| t.backing() == "file") {
        prepare_image(&image, size)?;
    }

    let result = (|| {
        let mut runs = Vec::new();
        for repeat in 0..args.repeat {
            for &t in &args.targets {
                runs.extend(session(args, t, &image, &jobs, repeat, &work)?);
            }
        }
        Ok::<_, BenchError>(runs)
    })();
    let _ = std::fs::remove_dir_all(&work);
    let runs = result?;
    report::print_tables(&runs, args.repeat);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report::to_json(&runs, &format!("{args:?}")))
            .map_err(|e| BenchError::Setup {
                what: format!("JSON: {e}"),
            })?;
        std::fs::write(path, text).map_err(|e| BenchError::io(path, e))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_by_their_keys() {
        let a = Args::try_parse_from(["blk_bench", "--targets", "qsd-io_uring,vioswitch"]).unwrap();
        assert_eq!(a.targets, [Target::QsdIoUring, Target::Vioswitch]);
        let d = Args::try_parse_from(["blk_bench"]).unwrap();
        let keys: Vec<&str> = d.targets.iter().map(|t| t.key()).collect();
        assert_eq!(
            keys,
            ["vioswitch", "qsd-threads", "qsd-io_uring", "qsd-null"]
        );
        assert!(Args::try_parse_from(["blk_bench", "--targets", "qsd"]).is_err());
    }

    #[test]
    fn jobs_select_by_name() {
        let a = Args::try_parse_from(["blk_bench", "--jobs", "seqwrite-64k", "--seq-depth", "4"])
            .unwrap();
        let jobs = select_jobs(&a).unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].write && !jobs[0].random && jobs[0].depth == 4);
        let bad = Args::try_parse_from(["blk_bench", "--jobs", "nope"]).unwrap();
        assert!(select_jobs(&bad).is_err());
    }
}
