//! Server memory while serving: the vault runs as its own process (`weightvault serve`), a model
//! is pushed, the vault is restarted (so its peak RSS counts serving only), then 8 nodes fetch
//! the whole model at once. Reports the server's VmHWM (peak resident set) and VmRSS samples
//! from /proc/PID/status, for each model size, to show memory is flat in model size
//! (docs/performance.md). Goal: at most 128 MiB.
//!
//! `cargo bench --bench rss`; sizes from `WEIGHTVAULT_BENCH_SIZES` (bytes, comma separated,
//! default 1 GiB and 4 GiB), concurrent fetches from `WEIGHTVAULT_BENCH_FETCHES` (default 8),
//! streams per fetch from `WEIGHTVAULT_BENCH_PARALLEL` (default: the client's default). Needs
//! the largest size in free disk (blobs; the source file is sparse). Never asserts on timing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use weightvault::client::admin::AdminClient;
use weightvault::client::node::{FetchOptions, NodeClient, SimAttester, WeightSink};
use weightvault::client::{ClientError, Endpoint, collect_files};
use weightvault::config::dev::{self, files};

struct Discard(u64);

impl WeightSink for Discard {
    fn begin(&mut self, _files: &[(String, u64)]) -> Result<(), ClientError> {
        Ok(())
    }
    fn write_at(&mut self, _f: usize, _o: u64, p: &[u8]) -> Result<(), ClientError> {
        self.0 += std::hint::black_box(p).len() as u64;
        Ok(())
    }
    fn commit(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
    fn abort(&mut self) {}
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `weightvault serve --dev` on the directory and waits until it answers.
async fn serve(dir: &std::path::Path, port: u16, ep: &Endpoint) -> Result<Child> {
    let child = Command::new(env!("CARGO_BIN_EXE_weightvault"))
        .args(["serve", "--dev", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("WEIGHTVAULT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting weightvault serve")?;
    let t = Instant::now();
    while ep.connect().await.is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the vault did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child)
}

fn stop(mut child: Child) -> Result<()> {
    // SIGTERM for a clean shutdown (the audit sequencer writes its last checkpoint).
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not an integer")),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<()> {
    let sizes: Vec<u64> = match std::env::var("WEIGHTVAULT_BENCH_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse().context("WEIGHTVAULT_BENCH_SIZES"))
            .collect::<Result<_>>()?,
        Err(_) => vec![1 << 30, 4 << 30],
    };
    let fetches = env_u64("WEIGHTVAULT_BENCH_FETCHES", 8)? as usize;
    let parallel = env_u64("WEIGHTVAULT_BENCH_PARALLEL", 0)? as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("weightvault server memory bench");
    println!(
        "  cores: {}; {fetches} concurrent fetches, streams per fetch: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if parallel == 0 {
            "client default".to_string()
        } else {
            parallel.to_string()
        }
    );
    for size in sizes {
        rt.block_on(one(size, fetches, parallel))?;
    }
    Ok(())
}

async fn one(bytes: u64, fetches: usize, parallel: usize) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("vault");
    dev::ensure(&dir)?;
    let port = free_port()?;
    let ca_pem = std::fs::read(dir.join(files::CA_CERT))?;
    let node_ep = Endpoint {
        addr: format!("127.0.0.1:{port}"),
        ca_pem,
        identity: None,
    };
    let admin_ep = Endpoint {
        identity: Some((
            std::fs::read(dir.join(files::ADMIN_CERT))?,
            std::fs::read(dir.join(files::ADMIN_KEY))?,
        )),
        ..node_ep.clone()
    };
    let child = serve(&dir, port, &node_ep).await?;
    // Sparse: the vault encrypts it, so its content does not matter, and it needs no disk.
    let src = tmp.path().join("weights.bin");
    std::fs::File::create(&src)?.set_len(bytes)?;
    let mut admin = AdminClient::new(admin_ep.connect().await?);
    let t = Instant::now();
    admin.push("m", collect_files(&src)?, |_| {}).await?;
    let push_hwm = status_kib(child.id(), "VmHWM:").unwrap_or(0);
    println!(
        "  {:.2} GiB: pushed in {:.1} s (server VmHWM during push {} MiB)",
        bytes as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64(),
        push_hwm / 1024
    );
    let measurement = "ab".repeat(48);
    admin.allow("m", "sim", &measurement).await?;
    drop(admin);
    stop(child)?;

    let child = serve(&dir, port, &node_ep).await?;
    let pid = child.id();
    let idle = status_kib(pid, "VmHWM:").unwrap_or(0);
    let sim_key = std::fs::read(dir.join(files::SIM_KEY))?;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..fetches {
        let ep = node_ep.clone();
        let attester = SimAttester::new(&sim_key, &measurement, &format!("node-{i}"))?;
        tasks.spawn(async move {
            let mut client = NodeClient::new(ep.connect().await?);
            let mut sink = Discard(0);
            let opts = FetchOptions {
                parallel,
                ..FetchOptions::default()
            };
            client
                .fetch("m", &opts, &attester, &mut sink, &mut |_, _| {})
                .await?;
            Ok::<u64, anyhow::Error>(sink.0)
        });
    }
    let mut samples = Vec::new();
    let mut done = 0;
    let mut total = 0u64;
    while done < fetches {
        tokio::select! {
            r = tasks.join_next() => {
                total += r.expect("a task")??;
                done += 1;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Some(rss) = status_kib(pid, "VmRSS:") {
                    samples.push(rss);
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    if total != bytes * fetches as u64 {
        bail!("fetched {total} bytes, expected {}", bytes * fetches as u64);
    }
    samples.sort_unstable();
    let p50 = samples.get(samples.len() / 2).copied().unwrap_or(0);
    let max = samples.last().copied().unwrap_or(0);
    println!(
        "  {:.2} GiB: {fetches} fetches of {bytes} bytes in {secs:.1} s ({:.2} GB/s in all); server VmHWM {} MiB (idle after start {} MiB), VmRSS median {} MiB, max sampled {} MiB ({} samples)",
        bytes as f64 / (1u64 << 30) as f64,
        total as f64 / secs / 1e9,
        hwm / 1024,
        idle / 1024,
        p50 / 1024,
        max / 1024,
        samples.len()
    );
    stop(child)?;
    Ok(())
}
