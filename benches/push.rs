//! Push throughput: `AdminClient::push` of one file (read from disk, streamed over TLS, sealed
//! with AES-256-GCM chunk by chunk, every blob fsynced, the version committed) against the
//! least any durable copy costs: reading the same file and writing it to a new file on the same
//! disk, then fsync (docs/performance.md). Same process, same disk, alternating rounds; every
//! round's copies and pushed version are kept until the end (the temporary directory is removed
//! then, needing 3 × (rounds + 1) + 1 times the model size of free disk meanwhile). Two copies
//! per round: through the page cache (`write` + `fsync`, the plain copy) and with `O_DIRECT`
//! (as the vault's blob store writes where the file system allows it); the ratio is given
//! against each, and against the faster one.
//!
//! `cargo bench --bench push`; size from `WEIGHTVAULT_BENCH_BYTES` (default 1 GiB), rounds from
//! `WEIGHTVAULT_BENCH_ROUNDS` (default 3). Pushes record no plaintext digest (the default);
//! `WEIGHTVAULT_BENCH_DIGEST=1` pushes with `--digest`. Also reports the peak RSS (bounded
//! memory). The bench never asserts on timing.
//!
//! Two modes:
//! - default: the vault runs in this process (`server::start`), vault and client share both
//!   cores, CPU is the process's total;
//! - `WEIGHTVAULT_BENCH_SPLIT=1`: vault and pushing host as different machines. The vault is
//!   `taskset -c 0 weightvault serve --dev --data-dir DIR` (a child process), this process (the
//!   pushing client) pins every thread to CPU 1 (`taskset -a -p -c 1`), and the copy baseline
//!   runs on CPU 0, the vault's core, where the vault's writes and fsyncs happen. CPU seconds
//!   are reported per side. Needs `taskset` (util-linux) and CPUs 0 and 1.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use weightvault::client::admin::{AdminClient, PushOptions};
use weightvault::client::{Endpoint, collect_files};
use weightvault::config::Config;
use weightvault::config::dev::{self, files};
use weightvault::server::{RunningServer, StartOptions};

/// The same piece size the push client reads with.
const PIECE: usize = 1024 * 1024;

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not an integer")),
        Err(_) => Ok(default),
    }
}

fn write_model(path: &Path, bytes: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; PIECE];
    let mut left = bytes;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = left.min(PIECE as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// Baseline: read `src` in 1 MiB pieces, write them to `dst` (a new file), fsync. The copy is
/// kept, as the vault keeps every pushed version: on a virtual machine, writing into page-cache
/// pages freed a moment ago (those of a file just deleted) is several times faster than into
/// pages the guest has not used recently, so both sides must write into the same kind
/// (docs/performance.md, "Push: fresh and reused pages, and `O_DIRECT` blob writes").
fn copy_fsync(src: &Path, dst: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut r = std::fs::File::open(src)?;
    let mut w = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n])?;
    }
    w.sync_all()?;
    Ok(t.elapsed().as_secs_f64())
}

/// `/proc/self` or `/proc/PID`.
fn proc_dir(pid: Option<u32>) -> String {
    pid.map_or_else(|| "/proc/self".to_string(), |p| format!("/proc/{p}"))
}

fn vm_hwm_kib(pid: Option<u32>) -> u64 {
    std::fs::read_to_string(format!("{}/status", proc_dir(pid)))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process, all threads (USER_HZ = 100).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("{}/stat", proc_dir(pid))) else {
        return f64::NAN;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (t(11) + t(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU for the split mode's vault and its copy baseline.
const VAULT_CPU: u32 = 0;
/// CPU for the split mode's pushing client (this process).
const CLIENT_CPU: u32 = 1;

fn taskset(args: &[&str]) -> Result<()> {
    let status = Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux) for WEIGHTVAULT_BENCH_SPLIT=1")?;
    if !status.success() {
        bail!("taskset {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// The calling thread's id, from `/proc/thread-self` (a link to `PID/task/TID`).
fn thread_id() -> Result<String> {
    let link = std::fs::read_link("/proc/thread-self")?;
    Ok(link
        .file_name()
        .context("/proc/thread-self")?
        .to_string_lossy()
        .into_owned())
}

/// Baseline 2: read `src` in 4 MiB pieces into an aligned buffer, write them to `dst` (a new
/// file, kept) with `O_DIRECT`, one write at a time, the last piece padded to the block size and
/// the file then cut to its length, fsync. NaN when the file system refuses `O_DIRECT` (EINVAL;
/// the column then reads NaN and the ratios use the plain copy).
fn copy_direct(src: &Path, dst: &Path) -> Result<f64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    const BIG: usize = 4 << 20;
    let t = Instant::now();
    let mut r = std::fs::File::open(src)?;
    let w = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(dst)
    {
        Ok(w) => w,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            return Ok(f64::NAN);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("opening {} with O_DIRECT", dst.display()));
        }
    };
    let mut raw = vec![0u8; BIG + ALIGN];
    let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
    let buf = &mut raw[start..start + BIG];
    let mut offset = 0u64;
    loop {
        let mut n = 0;
        while n < BIG {
            let got = r.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        let padded = n.next_multiple_of(ALIGN);
        buf[n..padded].fill(0);
        w.write_all_at(&buf[..padded], offset)?;
        offset += n as u64;
        if n < BIG {
            break;
        }
    }
    w.set_len(offset)?;
    w.sync_all()?;
    Ok(t.elapsed().as_secs_f64())
}

/// One copy (`copy_direct` when `direct`, else `copy_fsync`) on a thread pinned to `cpu`
/// (`None`: wherever the scheduler puts it).
fn copy_on(cpu: Option<u32>, direct: bool, src: &Path, dst: &Path) -> Result<f64> {
    let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            taskset(&["-p", "-c", &cpu.to_string(), &thread_id()?])?;
        }
        if direct {
            copy_direct(&src, &dst)
        } else {
            copy_fsync(&src, &dst)
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("copy thread panicked"))?
}

/// The vault under test: in this process, or a pinned child process.
enum VaultUnderTest {
    InProcess(RunningServer),
    Child(Child),
}

impl VaultUnderTest {
    /// The child's pid (`None` for the in-process vault).
    fn pid(&self) -> Option<u32> {
        match self {
            VaultUnderTest::InProcess(_) => None,
            VaultUnderTest::Child(c) => Some(c.id()),
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            VaultUnderTest::InProcess(v) => Ok(v.shutdown().await?),
            VaultUnderTest::Child(mut c) => {
                // SIGTERM for a clean shutdown (the audit sequencer writes its last checkpoint).
                Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status()?;
                c.wait()?;
                Ok(())
            }
        }
    }
}

/// `taskset -c VAULT_CPU weightvault serve --dev` on the dev directory; returns once it answers.
async fn serve_pinned(dir: &Path, ep: &mut Endpoint) -> Result<Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    ep.addr = format!("127.0.0.1:{port}");
    // `taskset` execs the vault, so the child's pid is the vault's.
    let mut child = Command::new("taskset")
        .args([
            "-c",
            &VAULT_CPU.to_string(),
            env!("CARGO_BIN_EXE_weightvault"),
        ])
        .args(["serve", "--dev", "--data-dir"])
        .arg(dir)
        .args(["--listen", &ep.addr])
        .env("WEIGHTVAULT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting taskset -c 0 weightvault serve")?;
    let t = Instant::now();
    while ep.connect().await.is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the vault exited: {status}");
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("the vault did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

fn main() -> Result<()> {
    let bytes = env_u64("WEIGHTVAULT_BENCH_BYTES", 1 << 30)?;
    let rounds = env_u64("WEIGHTVAULT_BENCH_ROUNDS", 3)? as usize;
    let split = env_u64("WEIGHTVAULT_BENCH_SPLIT", 0)? != 0;
    let digest = env_u64("WEIGHTVAULT_BENCH_DIGEST", 0)? != 0;
    if bytes == 0 || rounds == 0 {
        bail!("WEIGHTVAULT_BENCH_BYTES and WEIGHTVAULT_BENCH_ROUNDS must be positive");
    }
    // Before pinning, which shrinks what this process may use to one core.
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if split {
        // Every thread of this process, the runtime's workers included; threads started later
        // inherit the mask of the thread that starts them.
        taskset(&[
            "-a",
            "-p",
            "-c",
            &CLIENT_CPU.to_string(),
            &std::process::id().to_string(),
        ])?;
    }
    rt.block_on(run(bytes, rounds, split, digest, cores))
}

async fn run(bytes: u64, rounds: usize, split: bool, digest: bool, cores: usize) -> Result<()> {
    println!("weightvault push bench");
    println!(
        "  cores: {cores}; mode: {}; push --digest: {}",
        if split {
            "split (vault: child process on CPU 0, client: this process on CPU 1, copy on CPU 0)"
        } else {
            "in-process (vault and client share the cores)"
        },
        if digest { "yes" } else { "no" }
    );
    // On the same file system as the vault's blobs, so both sides write to the same disk.
    let tmp = tempfile::tempdir_in(std::env::temp_dir())?;
    let dev_dir = tmp.path().join("vault");
    let (config_path, _) = dev::ensure(&dev_dir)?;
    let cfg = Config::load(&config_path)?;
    let mut ep = Endpoint {
        addr: String::new(),
        ca_pem: std::fs::read(dev_dir.join(files::CA_CERT))?,
        identity: Some((
            std::fs::read(dev_dir.join(files::ADMIN_CERT))?,
            std::fs::read(dev_dir.join(files::ADMIN_KEY))?,
        )),
    };
    let vault = if split {
        VaultUnderTest::Child(serve_pinned(&dev_dir, &mut ep).await?)
    } else {
        let v = weightvault::server::start(
            &cfg,
            StartOptions {
                listen: Some("127.0.0.1:0".parse()?),
                ..Default::default()
            },
        )
        .await?;
        ep.addr = v.local_addr.to_string();
        VaultUnderTest::InProcess(v)
    };
    let copy_cpu = split.then_some(VAULT_CPU);
    let src = tmp.path().join("weights.bin");
    write_model(&src, bytes)?;
    println!(
        "  model: {bytes} bytes ({:.2} GiB), chunk size {}; {rounds} rounds after 1 warm-up",
        bytes as f64 / (1u64 << 30) as f64,
        cfg.storage.chunk_size
    );
    let opts = PushOptions {
        record_digest: digest,
    };
    let mut admin = AdminClient::new(ep.connect().await?);
    let hwm_before = vm_hwm_kib(vault.pid());
    admin
        .push_with("warm", collect_files(&src)?, &opts, |_| {})
        .await?;
    copy_on(copy_cpu, false, &src, &tmp.path().join("copy-warm.bin"))?;
    copy_on(copy_cpu, true, &src, &tmp.path().join("direct-warm.bin"))?;
    let (mut base, mut direct, mut push) = (Vec::new(), Vec::new(), Vec::new());
    let cpu_header = if split {
        format!("{:>9} {:>10}", "vault cpu", "client cpu")
    } else {
        format!("{:>9}", "push cpu")
    };
    println!(
        "  {:>5} {:>10} {:>10} {:>10} {:>10} {cpu_header} {:>7} {:>7} {:>7}",
        "round", "copy s", "direct s", "push s", "push GB/s", "ratio", "direct", "best"
    );
    for i in 0..rounds {
        let a = copy_on(
            copy_cpu,
            false,
            &src,
            &tmp.path().join(format!("copy-{i}.bin")),
        )?;
        let d = copy_on(
            copy_cpu,
            true,
            &src,
            &tmp.path().join(format!("direct-{i}.bin")),
        )?;
        let (client0, vault0) = (cpu_secs(None), vault.pid().map(|p| cpu_secs(Some(p))));
        let t = Instant::now();
        let r = admin
            .push_with(&format!("m{i}"), collect_files(&src)?, &opts, |_| {})
            .await?;
        let b = t.elapsed().as_secs_f64();
        let client = cpu_secs(None) - client0;
        let cpu = match (vault0, vault.pid()) {
            (Some(v0), Some(p)) => format!("{:>9.2} {client:>10.2}", cpu_secs(Some(p)) - v0),
            _ => format!("{client:>9.2}"),
        };
        if r.total_bytes != bytes {
            bail!("pushed {} bytes, expected {bytes}", r.total_bytes);
        }
        println!(
            "  {:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.2} {cpu} {:>7.3} {:>7.3} {:>7.3}",
            i + 1,
            a,
            d,
            b,
            bytes as f64 / b / 1e9,
            a / b,
            d / b,
            a.min(d) / b
        );
        base.push(a);
        direct.push(d);
        push.push(b);
    }
    let best: Vec<f64> = base.iter().zip(&direct).map(|(a, d)| a.min(*d)).collect();
    let (a, d, m, b) = (median(base), median(direct), median(best), median(push));
    println!(
        "  median: copy+fsync {a:.3} s, O_DIRECT copy+fsync {d:.3} s, the faster of the two per \
         round {m:.3} s, push+encrypt {b:.3} s"
    );
    println!(
        "  ratio (copy s / push s): {:.3} against copy+fsync, {:.3} against the O_DIRECT copy, \
         {:.3} against the faster",
        a / b,
        d / b,
        m / b
    );
    println!(
        "  peak RSS ({}): {} MiB before the pushes, {} MiB after",
        if split {
            "the vault process"
        } else {
            "vault and client in this process"
        },
        hwm_before / 1024,
        vm_hwm_kib(vault.pid()) / 1024
    );
    drop(admin);
    vault.stop().await?;
    Ok(())
}
