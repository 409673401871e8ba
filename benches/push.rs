//! Push throughput: `AdminClient::push` of one file (read from disk, streamed over TLS, sealed
//! with AES-256-GCM chunk by chunk, every blob fsynced, the version committed) against the
//! least any durable copy costs: reading the same file and writing it to a new file on the same
//! disk, then fsync (docs/performance.md). Same process, same disk, alternating rounds.
//!
//! `cargo bench --bench push`; size from `WEIGHTVAULT_BENCH_BYTES` (default 1 GiB), rounds from
//! `WEIGHTVAULT_BENCH_ROUNDS` (default 3). Also reports the vault's peak RSS growth during the
//! pushes (bounded memory). The bench never asserts on timing.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use weightvault::client::admin::AdminClient;
use weightvault::client::{Endpoint, collect_files};
use weightvault::config::Config;
use weightvault::config::dev::{self, files};
use weightvault::server::StartOptions;

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

/// Baseline: read `src` in 1 MiB pieces, write them to `dst`, fsync.
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
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(dst)?;
    Ok(secs)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of this process, all threads (USER_HZ = 100).
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
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

fn main() -> Result<()> {
    let bytes = env_u64("WEIGHTVAULT_BENCH_BYTES", 1 << 30)?;
    let rounds = env_u64("WEIGHTVAULT_BENCH_ROUNDS", 3)? as usize;
    if bytes == 0 || rounds == 0 {
        bail!("WEIGHTVAULT_BENCH_BYTES and WEIGHTVAULT_BENCH_ROUNDS must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(bytes, rounds))
}

async fn run(bytes: u64, rounds: usize) -> Result<()> {
    println!("weightvault push bench");
    println!(
        "  cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // On the same file system as the vault's blobs, so both sides write to the same disk.
    let tmp = tempfile::tempdir_in(std::env::temp_dir())?;
    let dev_dir = tmp.path().join("vault");
    let (config_path, _) = dev::ensure(&dev_dir)?;
    let cfg = Config::load(&config_path)?;
    let vault = weightvault::server::start(
        &cfg,
        StartOptions {
            listen: Some("127.0.0.1:0".parse()?),
            ..Default::default()
        },
    )
    .await?;
    let ep = Endpoint {
        addr: vault.local_addr.to_string(),
        ca_pem: std::fs::read(dev_dir.join(files::CA_CERT))?,
        identity: Some((
            std::fs::read(dev_dir.join(files::ADMIN_CERT))?,
            std::fs::read(dev_dir.join(files::ADMIN_KEY))?,
        )),
    };
    let src = tmp.path().join("weights.bin");
    write_model(&src, bytes)?;
    println!(
        "  model: {bytes} bytes ({:.2} GiB), chunk size {}; {rounds} rounds after 1 warm-up",
        bytes as f64 / (1u64 << 30) as f64,
        cfg.storage.chunk_size
    );
    let mut admin = AdminClient::new(ep.connect().await?);
    let hwm_before = vm_hwm_kib();
    admin.push("warm", collect_files(&src)?, |_| {}).await?;
    copy_fsync(&src, &tmp.path().join("copy.bin"))?;
    let (mut base, mut push) = (Vec::new(), Vec::new());
    println!(
        "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "round", "copy s", "copy GB/s", "push s", "push GB/s", "push cpu", "ratio"
    );
    for i in 0..rounds {
        let a = copy_fsync(&src, &tmp.path().join("copy.bin"))?;
        let cpu = cpu_secs();
        let t = Instant::now();
        let r = admin
            .push(&format!("m{i}"), collect_files(&src)?, |_| {})
            .await?;
        let b = t.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu;
        if r.total_bytes != bytes {
            bail!("pushed {} bytes, expected {bytes}", r.total_bytes);
        }
        println!(
            "  {:>5} {:>10.3} {:>10.2} {:>10.3} {:>10.2} {:>9.2} {:>7.3}",
            i + 1,
            a,
            bytes as f64 / a / 1e9,
            b,
            bytes as f64 / b / 1e9,
            cpu,
            a / b
        );
        base.push(a);
        push.push(b);
    }
    let (a, b) = (median(base), median(push));
    println!(
        "  median: copy+fsync {a:.3} s, push+encrypt {b:.3} s, ratio (copy s / push s) {:.3}",
        a / b
    );
    println!(
        "  process peak RSS (vault and client in this process): {} MiB before the pushes, {} MiB after",
        hwm_before / 1024,
        vm_hwm_kib() / 1024
    );
    vault.shutdown().await?;
    Ok(())
}
