//! Fetch throughput: the real node fetch path against a bare tonic stream of the same bytes, over
//! the same TLS setup on 127.0.0.1 (docs/performance.md); by default all in one process, or with
//! servers and node in separate processes on separate CPUs (split mode, below).
//!
//! - A (baseline): a trivial `NodeService` whose `FetchWeights` streams pre-generated in-memory
//!   `WeightChunk`s (same count and sizes as the real model's chunks: chunk_size + 16 bytes each,
//!   `Bytes` clones, no per-message allocation), served with the vault's TLS identity and HTTP/2
//!   settings; the client only counts bytes.
//! - B (real): the vault started in-process from a dev config, a model pushed with the admin
//!   client, then `NodeClient::fetch` (challenge, sim attestation, grant, stream, decrypt) into a
//!   sink that discards the plaintext: fetch + decrypt, no disk writes on the node side.
//!
//! - C: `age -d` of the same bytes from local disk, when `age` is installed (it says so when not).
//!
//! `cargo bench --bench fetch`; model size from `WEIGHTVAULT_BENCH_BYTES` (default 1 GiB), rounds
//! from `WEIGHTVAULT_BENCH_ROUNDS` (default 3); `WEIGHTVAULT_BENCH_ONLY=a|b` runs one side only,
//! for profiling. The bench never asserts on timing.
//!
//! In-process mode (the default) runs servers and client on one tokio runtime sharing all the
//! cores, so B/A mostly measures the total CPU per GiB of both ends.
//!
//! Split mode, `WEIGHTVAULT_BENCH_SPLIT=1 cargo bench --bench fetch`, models vault and node on
//! different hosts: every server is its own process pinned to CPU 0, the client to CPU 1.
//! - B: the real binary, `taskset -c 0 weightvault serve --dev --data-dir DIR --listen
//!   127.0.0.1:0` (its own runtime: one worker, as on any one-CPU host), so B includes its blob
//!   reads, grant checks and audit writes. Both servers start under `setpriv --pdeathsig TERM`
//!   and are stopped on every exit path, so none outlives the bench.
//! - A: this bench binary executed again under `taskset -c 0` with
//!   `WEIGHTVAULT_BENCH_ROLE=baseline-server` (and `WEIGHTVAULT_BENCH_CONFIG`, the dev config):
//!   it generates the same chunks, serves them with the same TLS identity and HTTP/2 settings,
//!   prints `listening ADDR` and runs until its stdin closes. The A client code is unchanged.
//! - The bench process (the node client for A and B) pins itself to CPU 1 with `taskset -a -p`
//!   before building a multi-thread runtime with 1 worker, which is the runtime `weightvault
//!   node fetch` gets on a one-CPU host (its `block_on` thread runs there too).
//! - C: `taskset -c 1 age -d`, the one core the node gets.
//!
//! Split mode reports per round the wall time of A and B and the CPU seconds of the server
//! process (/proc/PID/stat, from just before the connection to the end of the transfer) and of
//! the client process (/proc/self/stat, the transfer) separately; then the medians, CPU seconds
//! per GiB, each process's CPU use per second of wall time (which core is the bottleneck), and
//! the server's CPU in the pause after each transfer (the vault's post-stream bookkeeping).
//! It needs `taskset` and `setpriv` (util-linux) and CPUs 0 and 1, and exits non-zero saying so
//! when one is missing. `WEIGHTVAULT_BENCH_BYTES`, `_ROUNDS`, `_PARALLEL` and `_ONLY` work in
//! both modes (`_ONLY` also prints the server's pid and CPU seconds in split mode).
//!
//! ```sh
//! WEIGHTVAULT_BENCH_SPLIT=1 cargo bench --bench fetch
//! WEIGHTVAULT_BENCH_SPLIT=1 WEIGHTVAULT_BENCH_BYTES=$((64<<20)) cargo bench --bench fetch
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use weightvault::client::admin::AdminClient;
use weightvault::client::node::{FetchOptions, NodeClient, SimAttester, WeightSink};
use weightvault::client::{ClientError, ENV_ADDR, Endpoint, collect_files};
use weightvault::config::Config;
use weightvault::config::dev::{self, files};
use weightvault::envelope::TAG_LEN;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::proto::v1::node_service_server::{NodeService, NodeServiceServer};
use weightvault::proto::v1::{
    AttestRequest, AttestResponse, FetchWeightsRequest, GetChallengeRequest, GetChallengeResponse,
    RequestGrantRequest, RequestGrantResponse, WeightChunk,
};
use weightvault::server::{CONNECTION_WINDOW, MAX_FRAME, MAX_MESSAGE, STREAM_WINDOW, StartOptions};

#[path = "common/procs.rs"]
mod procs;

use procs::{ChildGuard, StopBy};

const MODEL: &str = "bench";
const MEASUREMENT_BYTE: &str = "ab";
const DEFAULT_BYTES: u64 = 1 << 30;
const DEFAULT_ROUNDS: usize = 3;
/// Split mode: the CPU of every server process, and the CPU of the node (this process, `age`).
const SERVER_CPU: u32 = 0;
const NODE_CPU: u32 = 1;
/// Split mode: set (to `baseline-server`) when this binary runs as the A server.
const ROLE_ENV: &str = "WEIGHTVAULT_BENCH_ROLE";
const CONFIG_ENV: &str = "WEIGHTVAULT_BENCH_CONFIG";
const LISTENING: &str = "listening ";
/// Pause after each transfer for the server's post-stream bookkeeping.
const SETTLE: Duration = Duration::from_millis(200);

fn main() -> Result<()> {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return match role.as_str() {
            "baseline-server" => baseline_server_main(),
            _ => bail!("{ROLE_ENV}={role:?}: the only role is baseline-server"),
        };
    }
    let bytes = env_u64("WEIGHTVAULT_BENCH_BYTES", DEFAULT_BYTES)?;
    let rounds = env_u64("WEIGHTVAULT_BENCH_ROUNDS", DEFAULT_ROUNDS as u64)? as usize;
    if bytes == 0 || rounds == 0 {
        bail!("WEIGHTVAULT_BENCH_BYTES and WEIGHTVAULT_BENCH_ROUNDS must be positive");
    }
    let split = match std::env::var("WEIGHTVAULT_BENCH_SPLIT").as_deref() {
        Ok("1") => true,
        Ok("0") | Ok("") | Err(_) => false,
        Ok(v) => {
            bail!("WEIGHTVAULT_BENCH_SPLIT={v:?}: use 1 for split mode, 0 or unset for in-process")
        }
    };
    if split {
        procs::require_pinning_tools(&[SERVER_CPU, NODE_CPU])?;
        // Before the runtime exists, so that all its threads inherit the mask.
        procs::pin_self(NODE_CPU)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        return rt.block_on(run_split(bytes, rounds));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(bytes, rounds))
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

/// Cheap non-compressible filler (xorshift64*); the content does not matter to the transport.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// Writes `bytes` of filler to `path`, piece by piece.
fn write_model(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut piece = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = piece.len().min(left as usize);
        rng.fill(&mut piece[..n]);
        f.write_all(&piece[..n])?;
        left -= n as u64;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// The baseline chunks: as many messages as the stored model has chunks, each the size of the
/// stored chunk (plaintext + tag), in distinct buffers like the blobs the vault reads.
fn baseline_chunks(bytes: u64, chunk_size: u32) -> Vec<Bytes> {
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    let mut out = Vec::new();
    let mut left = bytes;
    while left > 0 {
        let plain = left.min(u64::from(chunk_size)) as usize;
        let mut buf = vec![0u8; plain + TAG_LEN];
        rng.fill(&mut buf);
        out.push(Bytes::from(buf));
        left -= plain as u64;
    }
    out
}

/// (A) A bare NodeService that only streams pre-generated chunks.
struct Baseline {
    chunks: Arc<Vec<Bytes>>,
}

type ServeTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for Baseline {
    async fn get_challenge(
        &self,
        _req: Request<GetChallengeRequest>,
    ) -> Result<Response<GetChallengeResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn attest(
        &self,
        _req: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn request_grant(
        &self,
        _req: Request<RequestGrantRequest>,
    ) -> Result<Response<RequestGrantResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(
        &self,
        _req: Request<FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let chunks = self.chunks.clone();
        let stream = tokio_stream::iter((0..chunks.len()).map(move |i| {
            Ok(WeightChunk {
                index: i as u64,
                ciphertext: chunks[i].clone(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the baseline with the vault's TLS material and HTTP/2 settings (as `server::start`).
async fn start_baseline(
    cfg: &Config,
    chunks: Arc<Vec<Bytes>>,
    stop: CancellationToken,
) -> Result<(SocketAddr, ServeTask)> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(&cfg.tls.cert)?,
            std::fs::read(&cfg.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(&cfg.tls.client_ca)?))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = tonic::transport::Server::builder()
        .tls_config(tls)?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(
            NodeServiceServer::new(Baseline { chunks }).max_encoding_message_size(MAX_MESSAGE),
        );
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
    });
    Ok((addr, task))
}

/// Discards plaintext, counting it; notes when the first file begins (end of challenge, attest
/// and grant) so the stream can be timed on its own.
#[derive(Default)]
struct CountingSink {
    bytes: u64,
    began: Option<Instant>,
}

impl WeightSink for CountingSink {
    fn begin(&mut self, _files: &[(String, u64)]) -> Result<(), ClientError> {
        self.began.get_or_insert_with(Instant::now);
        Ok(())
    }

    fn write_at(
        &mut self,
        _file: usize,
        _offset: u64,
        plaintext: &[u8],
    ) -> Result<(), ClientError> {
        self.bytes += std::hint::black_box(plaintext).len() as u64;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ClientError> {
        Ok(())
    }

    fn abort(&mut self) {}
}

/// One timed transfer.
#[derive(Clone, Copy)]
struct Sample {
    bytes: u64,
    secs: f64,
    /// CPU seconds the whole process (server and client) spent during the transfer.
    cpu_secs: f64,
    /// B only: seconds of challenge + attest + grant before the stream starts.
    setup_secs: Option<f64>,
}

impl Sample {
    fn ratio(a: &Sample, b: &Sample) -> (f64, f64) {
        (a.secs / b.secs, a.cpu_secs / b.cpu_secs)
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
}

/// (A) Drains the baseline stream over a fresh connection (connect not timed).
async fn run_baseline(ep: &Endpoint, expect: u64) -> Result<Sample> {
    let channel = ep.connect().await?;
    let mut client = NodeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let cpu = process_cpu_secs();
    let start = Instant::now();
    let mut stream = client
        .fetch_weights(FetchWeightsRequest::default())
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await? {
        bytes += chunk.ciphertext.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu;
    if bytes != expect {
        bail!("baseline streamed {bytes} bytes, expected {expect}");
    }
    Ok(Sample {
        bytes,
        secs,
        cpu_secs,
        setup_secs: None,
    })
}

/// (B) The whole node fetch over a fresh connection (connect not timed).
/// One untimed transfer of each side, printed (both modes).
async fn warm_up(
    base_ep: &Endpoint,
    node_ep: &Endpoint,
    attester: &SimAttester,
    wire: u64,
    bytes: u64,
) -> Result<()> {
    let a = run_baseline(base_ep, wire).await?;
    let b = run_real(node_ep, attester, bytes).await?;
    println!(
        "  warm-up: A {:.3} s ({:.2} GB/s), B {:.3} s ({:.2} GB/s)",
        a.secs,
        a.gbps(),
        b.secs,
        b.gbps()
    );
    Ok(())
}

async fn run_real(ep: &Endpoint, attester: &SimAttester, expect: u64) -> Result<Sample> {
    let channel = ep.connect().await?;
    let mut client = NodeClient::new(channel);
    let mut sink = CountingSink::default();
    let cpu = process_cpu_secs();
    let start = Instant::now();
    let report = client
        .fetch(
            MODEL,
            &FetchOptions {
                // Streams at once (0 = the client's default); WEIGHTVAULT_BENCH_PARALLEL.
                parallel: env_u64("WEIGHTVAULT_BENCH_PARALLEL", 0)? as usize,
                ..FetchOptions::default()
            },
            attester,
            &mut sink,
            &mut |_, _| {},
        )
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu;
    if report.bytes != expect || sink.bytes != expect {
        bail!(
            "fetch delivered {} bytes (report {}), expected {expect}",
            sink.bytes,
            report.bytes
        );
    }
    let setup = sink.began.map(|t| t.duration_since(start).as_secs_f64());
    Ok(Sample {
        bytes: sink.bytes,
        secs,
        cpu_secs,
        setup_secs: setup,
    })
}

/// User + system CPU seconds of this process, all threads (`/proc/self/stat`, USER_HZ = 100);
/// NaN where unavailable.
fn process_cpu_secs() -> f64 {
    procs::cpu_secs(None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn run(bytes: u64, rounds: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("weightvault fetch bench");
    println!(
        "  cores: {cores} (tokio multi-thread runtime, {cores} workers; server and client share it)"
    );
    println!("  cpu:   {}", cpu_model());

    let tmp = tempfile::tempdir()?;
    let dev_dir = tmp.path().join("vault");
    let (config_path, _) = dev::ensure(&dev_dir)?;
    let cfg = Config::load(&config_path)?;
    let chunk_size = cfg.storage.chunk_size;
    let chunks = bytes.div_ceil(u64::from(chunk_size));
    let wire = bytes + chunks * TAG_LEN as u64;
    println!(
        "  model: {bytes} bytes ({:.2} GiB) in {chunks} chunks of {chunk_size} + {TAG_LEN} bytes; {rounds} rounds after 1 warm-up",
        bytes as f64 / (1u64 << 30) as f64
    );

    // (B) The real vault, in-process.
    let vault = weightvault::server::start(
        &cfg,
        StartOptions {
            listen: Some("127.0.0.1:0".parse()?),
            ..Default::default()
        },
    )
    .await?;
    let ca_pem = std::fs::read(dev_dir.join(files::CA_CERT))?;
    let admin_ep = Endpoint {
        addr: vault.local_addr.to_string(),
        ca_pem: ca_pem.clone(),
        identity: Some((
            std::fs::read(dev_dir.join(files::ADMIN_CERT))?,
            std::fs::read(dev_dir.join(files::ADMIN_KEY))?,
        )),
    };
    let node_ep = Endpoint {
        identity: None,
        ..admin_ep.clone()
    };

    let (age, attester) = prepare_model(tmp.path(), &dev_dir, &admin_ep, bytes).await?;

    // (A) The baseline, with the same TLS identity and HTTP/2 settings.
    let stop = CancellationToken::new();
    let (base_addr, base_task) = start_baseline(
        &cfg,
        Arc::new(baseline_chunks(bytes, chunk_size)),
        stop.clone(),
    )
    .await?;
    let base_ep = Endpoint {
        addr: base_addr.to_string(),
        ..node_ep.clone()
    };

    warm_up(&base_ep, &node_ep, &attester, wire, bytes).await?;

    // Profiling aid: WEIGHTVAULT_BENCH_ONLY=a|b runs only that side, `rounds` times, after
    // printing the pid (attach `perf record -p`); no table, no ratio.
    if let Ok(side) = std::env::var("WEIGHTVAULT_BENCH_ONLY") {
        println!("  only side {side}, pid {}", std::process::id());
        for i in 0..rounds {
            let s = match side.as_str() {
                "a" => run_baseline(&base_ep, wire).await?,
                "b" => run_real(&node_ep, &attester, bytes).await?,
                _ => bail!("WEIGHTVAULT_BENCH_ONLY must be a or b"),
            };
            println!(
                "  {side} round {}: {} bytes, {:.3} s, {:.2} GB/s, {:.2} cpu s",
                i + 1,
                s.bytes,
                s.secs,
                s.gbps(),
                s.cpu_secs
            );
        }
    } else {
        let b_secs = report(&base_ep, &node_ep, &attester, bytes, wire, rounds).await?;
        age_compare(age.as_ref(), rounds, b_secs, bytes, None)?;
    }

    stop.cancel();
    base_task.await??;
    vault.shutdown().await?;
    Ok(())
}

/// Writes the model file, pushes it as the admin, prepares `age` (C), deletes the file, allows
/// the sim measurement and returns the node's attester.
async fn prepare_model(
    tmp: &Path,
    dev_dir: &Path,
    admin_ep: &Endpoint,
    bytes: u64,
) -> Result<(Option<Age>, SimAttester)> {
    let model_path = tmp.join("weights.bin");
    let t = Instant::now();
    write_model(&model_path, bytes)?;
    println!(
        "  wrote the model file in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let mut admin = AdminClient::new(admin_ep.connect().await?);
    let t = Instant::now();
    let pushed = admin
        .push(MODEL, collect_files(&model_path)?, |_| {})
        .await?;
    println!(
        "  pushed {MODEL} version {} in {:.2} s (seal + fsync)",
        pushed.version,
        t.elapsed().as_secs_f64()
    );
    let age = age_prepare(tmp, &model_path)?;
    std::fs::remove_file(&model_path)?;
    let measurement = MEASUREMENT_BYTE.repeat(48);
    admin.allow(MODEL, "sim", &measurement).await?;
    let attester = SimAttester::new(
        &std::fs::read(dev_dir.join(files::SIM_KEY))?,
        &measurement,
        "bench-node",
    )?;
    Ok((age, attester))
}

/// Alternating rounds of A and B, then the table.
async fn report(
    base_ep: &Endpoint,
    node_ep: &Endpoint,
    attester: &SimAttester,
    bytes: u64,
    wire: u64,
    rounds: usize,
) -> Result<f64> {
    let mut a = Vec::with_capacity(rounds);
    let mut b = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        a.push(run_baseline(base_ep, wire).await?);
        // Let the vault's post-stream bookkeeping (bytes served, fetch-end audit entry) settle.
        tokio::time::sleep(SETTLE).await;
        b.push(run_real(node_ep, attester, bytes).await?);
        tokio::time::sleep(SETTLE).await;
    }

    println!();
    println!("A = bare tonic stream of the same chunks; bytes = ciphertext received");
    println!(
        "B = NodeClient::fetch: challenge + attest + grant + stream + decrypt; bytes = plaintext"
    );
    println!("    delivered (setup = challenge + attest + grant, included in B s)");
    println!("cpu = CPU seconds of the whole process (vault or baseline server + client)");
    println!(
        "ratio = B throughput / A throughput = A s / B s (same bytes on the wire); cpu ratio = A cpu / B cpu"
    );
    println!();
    let header = [
        "round",
        "A bytes",
        "A s",
        "A GB/s",
        "A cpu",
        "B bytes",
        "B s",
        "B GB/s",
        "B cpu",
        "B setup",
        "ratio",
        "cpu ratio",
    ];
    println!(
        "{:<7}{:>12}{:>8}{:>8}{:>7}{:>12}{:>8}{:>8}{:>7}{:>9}{:>7}{:>10}",
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        header[6],
        header[7],
        header[8],
        header[9],
        header[10],
        header[11]
    );
    let row = |label: &str, sa: &Sample, sb: &Sample| {
        let (ratio, cpu_ratio) = Sample::ratio(sa, sb);
        println!(
            "{:<7}{:>12}{:>8.3}{:>8.2}{:>7.2}{:>12}{:>8.3}{:>8.2}{:>7.2}{:>9.4}{:>7.3}{:>10.3}",
            label,
            sa.bytes,
            sa.secs,
            sa.gbps(),
            sa.cpu_secs,
            sb.bytes,
            sb.secs,
            sb.gbps(),
            sb.cpu_secs,
            sb.setup_secs.unwrap_or(f64::NAN),
            ratio,
            cpu_ratio
        );
    };
    for (i, (sa, sb)) in a.iter().zip(&b).enumerate() {
        row(&(i + 1).to_string(), sa, sb);
    }
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    let med_a = Sample {
        bytes: wire,
        secs: med(&a, |s| s.secs),
        cpu_secs: med(&a, |s| s.cpu_secs),
        setup_secs: None,
    };
    let med_b = Sample {
        bytes,
        secs: med(&b, |s| s.secs),
        cpu_secs: med(&b, |s| s.cpu_secs),
        setup_secs: Some(med(&b, |s| s.setup_secs.unwrap_or(f64::NAN))),
    };
    row("median", &med_a, &med_b);
    let per_round: Vec<String> = a
        .iter()
        .zip(&b)
        .map(|(sa, sb)| format!("{:.3}", Sample::ratio(sa, sb).0))
        .collect();
    println!();
    println!(
        "ratio B/A of the medians = {:.3} (goal >= 0.85); per round: [{}]; median of per-round ratios = {:.3}",
        Sample::ratio(&med_a, &med_b).0,
        per_round.join(", "),
        median(
            a.iter()
                .zip(&b)
                .map(|(sa, sb)| Sample::ratio(sa, sb).0)
                .collect()
        )
    );
    Ok(med_b.secs)
}

/// (C) `age -d` of the same plaintext, encrypted by `age` to an X25519 recipient, read from the
/// local disk (page cache warm after one untimed run) into /dev/null. `None` when `age` or
/// `age-keygen` is not installed.
struct Age {
    key: std::path::PathBuf,
    file: std::path::PathBuf,
}

fn age_prepare(dir: &Path, plaintext: &Path) -> Result<Option<Age>> {
    let installed = |bin: &str| {
        std::process::Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !installed("age") || !installed("age-keygen") {
        return Ok(None);
    }
    let key = dir.join("age-key.txt");
    let file = dir.join("weights.age");
    let ok = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()?
        .status
        .success();
    let recipient = std::process::Command::new("age-keygen")
        .arg("-y")
        .arg(&key)
        .output()?;
    if !ok || !recipient.status.success() {
        bail!("age-keygen failed");
    }
    let recipient = String::from_utf8(recipient.stdout)?.trim().to_string();
    let enc = std::process::Command::new("age")
        .args(["-e", "-r", &recipient, "-o"])
        .arg(&file)
        .arg(plaintext)
        .status()?;
    if !enc.success() {
        bail!("age -e failed");
    }
    Ok(Some(Age { key, file }))
}

/// Wall and CPU seconds of one `age -d`, under `taskset -c CPU` when `pin` is set.
fn age_decrypt_secs(age: &Age, pin: Option<u32>) -> Result<(f64, f64)> {
    let mut cmd = match pin {
        Some(cpu) => procs::pinned(cpu, "age"),
        None => std::process::Command::new("age"),
    };
    cmd.args(["-d", "-i"])
        .arg(&age.key)
        .args(["-o", "/dev/null"])
        .arg(&age.file);
    let cpu = procs::children_cpu_secs();
    let t = Instant::now();
    let st = cmd.status()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = procs::children_cpu_secs() - cpu;
    if !st.success() {
        bail!("age -d failed");
    }
    Ok((secs, cpu))
}

fn age_compare(
    age: Option<&Age>,
    rounds: usize,
    b_secs: f64,
    bytes: u64,
    pin: Option<u32>,
) -> Result<()> {
    println!();
    let Some(age) = age else {
        println!(
            "C = age -d: NOT MEASURED, `age` is not installed (apt-get install -y age); the end-to-end comparison with age is missing from this run"
        );
        return Ok(());
    };
    age_decrypt_secs(age, pin)?;
    let mut c = Vec::with_capacity(rounds);
    let mut c_cpu = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (secs, cpu) = age_decrypt_secs(age, pin)?;
        c.push(secs);
        c_cpu.push(cpu);
    }
    let per_round: Vec<String> = c.iter().map(|s| format!("{s:.3}")).collect();
    let c_med = median(c);
    match pin {
        None => println!(
            "C = `age -d -i KEY -o /dev/null FILE` of the same {bytes} bytes from local disk (page cache warm): seconds per round [{}], median {c_med:.3} s ({:.2} GB/s)",
            per_round.join(", "),
            bytes as f64 / c_med / 1e9
        ),
        Some(cpu) => {
            let cpu_rounds: Vec<String> = c_cpu.iter().map(|s| format!("{s:.2}")).collect();
            println!(
                "C = `taskset -c {cpu} age -d -i KEY -o /dev/null FILE` (the node's one core) of the same {bytes} bytes from local disk (page cache warm): seconds per round [{}], median {c_med:.3} s ({:.2} GB/s); CPU seconds per round [{}]",
                per_round.join(", "),
                bytes as f64 / c_med / 1e9,
                cpu_rounds.join(", ")
            );
        }
    }
    println!(
        "B (fetch + decrypt end to end, median {b_secs:.3} s) vs C: B is {:.2}x the speed of age -d (goal > 1)",
        c_med / b_secs
    );
    Ok(())
}

// Split mode: servers and node in separate processes on separate CPUs.

/// The A server as its own process (`WEIGHTVAULT_BENCH_ROLE=baseline-server`): the same chunks,
/// TLS identity and HTTP/2 settings as the in-process baseline; prints `listening ADDR`, then
/// serves until its stdin closes.
fn baseline_server_main() -> Result<()> {
    let config = std::env::var_os(CONFIG_ENV).with_context(|| {
        format!("{ROLE_ENV}=baseline-server needs {CONFIG_ENV} (the dev vault's config file)")
    })?;
    let bytes = env_u64("WEIGHTVAULT_BENCH_BYTES", DEFAULT_BYTES)?;
    let cfg = Config::load(Path::new(&config))?;
    let chunks = Arc::new(baseline_chunks(bytes, cfg.storage.chunk_size));
    // The runtime `weightvault serve` builds: multi-thread, one worker per CPU it may use.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let (addr, task) = start_baseline(&cfg, chunks, stop.clone()).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{LISTENING}{addr}")?;
            out.flush()?;
        }
        // End of stdin: the bench stops this server, or the bench died; no orphan either way.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            stop.cancel();
        });
        task.await??;
        Ok(())
    })
}

/// `taskset -c 0 weightvault serve --dev` on the dev directory; returns its address once it
/// prints `ready`.
fn start_vault_process(dev_dir: &Path) -> Result<(ChildGuard, String)> {
    let prefix = format!("export {ENV_ADDR}=");
    let mut addr = None;
    let mut cmd = procs::pinned_server(SERVER_CPU, env!("CARGO_BIN_EXE_weightvault"));
    cmd.args(["serve", "--dev", "--data-dir"])
        .arg(dev_dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("WEIGHTVAULT_LOG", "warn");
    ChildGuard::spawn(
        "vault (weightvault serve)",
        &mut cmd,
        StopBy::Term,
        Duration::from_secs(60),
        move |line| {
            if let Some(a) = line.strip_prefix(&prefix) {
                addr = Some(a.trim().to_string());
            }
            if line == "ready" { addr.clone() } else { None }
        },
    )
}

/// This bench binary again, as the baseline server under `taskset -c 0`; returns its address.
fn start_baseline_process(config_path: &Path, bytes: u64) -> Result<(ChildGuard, String)> {
    let mut cmd = procs::pinned_server(SERVER_CPU, std::env::current_exe()?);
    cmd.env(ROLE_ENV, "baseline-server")
        .env(CONFIG_ENV, config_path)
        .env("WEIGHTVAULT_BENCH_BYTES", bytes.to_string());
    ChildGuard::spawn(
        "baseline server (this bench with WEIGHTVAULT_BENCH_ROLE=baseline-server)",
        &mut cmd,
        StopBy::CloseStdin,
        Duration::from_secs(300),
        |line| line.strip_prefix(LISTENING).map(|a| a.trim().to_string()),
    )
}

fn cpus_of(pid: Option<u32>) -> String {
    procs::allowed_cpus(pid).unwrap_or_else(|| "?".into())
}

async fn run_split(bytes: u64, rounds: usize) -> Result<()> {
    println!("weightvault fetch bench, split mode (WEIGHTVAULT_BENCH_SPLIT=1)");
    println!("  cpu:   {}", cpu_model());

    let tmp = tempfile::tempdir()?;
    let dev_dir = tmp.path().join("vault");
    let (config_path, _) = dev::ensure(&dev_dir)?;
    let cfg = Config::load(&config_path)?;
    let chunk_size = cfg.storage.chunk_size;
    let chunks = bytes.div_ceil(u64::from(chunk_size));
    let wire = bytes + chunks * TAG_LEN as u64;
    println!(
        "  model: {bytes} bytes ({:.2} GiB) in {chunks} chunks of {chunk_size} + {TAG_LEN} bytes; {rounds} rounds after 1 warm-up",
        bytes as f64 / (1u64 << 30) as f64
    );

    let (vault, vault_addr) = start_vault_process(&dev_dir)?;
    println!(
        "  server B: `weightvault serve --dev`, pid {}, CPUs {} (its multi-thread runtime, one worker per allowed CPU)",
        vault.pid(),
        cpus_of(Some(vault.pid()))
    );
    println!(
        "  client:   this process, pid {}, CPUs {} (multi-thread runtime with 1 worker, plus the block_on thread)",
        std::process::id(),
        cpus_of(None)
    );
    let ca_pem = std::fs::read(dev_dir.join(files::CA_CERT))?;
    let admin_ep = Endpoint {
        addr: vault_addr,
        ca_pem,
        identity: Some((
            std::fs::read(dev_dir.join(files::ADMIN_CERT))?,
            std::fs::read(dev_dir.join(files::ADMIN_KEY))?,
        )),
    };
    let node_ep = Endpoint {
        identity: None,
        ..admin_ep.clone()
    };
    let (age, attester) = prepare_model(tmp.path(), &dev_dir, &admin_ep, bytes).await?;

    // Started after the push so that its chunk generation does not compete with the vault.
    let (base, base_addr) = start_baseline_process(&config_path, bytes)?;
    println!(
        "  server A: baseline process, pid {}, CPUs {} (multi-thread runtime, one worker per allowed CPU)",
        base.pid(),
        cpus_of(Some(base.pid()))
    );
    let base_ep = Endpoint {
        addr: base_addr,
        ..node_ep.clone()
    };

    warm_up(&base_ep, &node_ep, &attester, wire, bytes).await?;

    if let Ok(side) = std::env::var("WEIGHTVAULT_BENCH_ONLY") {
        let server = match side.as_str() {
            "a" => &base,
            "b" => &vault,
            _ => bail!("WEIGHTVAULT_BENCH_ONLY must be a or b"),
        };
        println!(
            "  only side {side}, client pid {}, server pid {}",
            std::process::id(),
            server.pid()
        );
        for i in 0..rounds {
            let cpu = server.cpu_secs();
            let s = if side == "a" {
                run_baseline(&base_ep, wire).await?
            } else {
                run_real(&node_ep, &attester, bytes).await?
            };
            println!(
                "  {side} round {}: {} bytes, {:.3} s, {:.2} GB/s, client {:.2} cpu s, server {:.2} cpu s",
                i + 1,
                s.bytes,
                s.secs,
                s.gbps(),
                s.cpu_secs,
                server.cpu_secs() - cpu
            );
        }
    } else {
        let b_secs = report_split(
            &base, &vault, &base_ep, &node_ep, &attester, bytes, wire, rounds,
        )
        .await?;
        age_compare(age.as_ref(), rounds, b_secs, bytes, Some(NODE_CPU))?;
    }

    let st = base.stop()?;
    if !st.success() {
        bail!("the baseline server exited with {st}");
    }
    let st = vault.stop()?;
    if !st.success() {
        bail!("the vault exited with {st} after SIGTERM");
    }
    Ok(())
}

/// One split-mode transfer: the client's sample (`cpu_secs` is this process alone) and the
/// server process's CPU seconds.
#[derive(Clone, Copy)]
struct Split {
    s: Sample,
    /// From just before the connection to the end of the transfer (the client's window plus
    /// the TLS handshake).
    server_cpu: f64,
    /// During the pause after the transfer (the vault's post-stream bookkeeping).
    server_after: f64,
    /// Busy fraction of the server's and the node's CPU over the server's window, whoever used
    /// it (/proc/stat, tasks + irq): above the processes' own core use when something else ran
    /// there or interrupt time was charged to no process.
    core_busy: [f64; 2],
    /// The irq + softirq part of `core_busy`.
    core_irq: [f64; 2],
    /// Seconds the hypervisor took from the two CPUs over that window.
    steal: f64,
}

impl Split {
    /// CPU seconds per wall second of the transfer: 1.00 is one core fully busy.
    fn busy(cpu: f64, s: &Sample) -> f64 {
        cpu / s.secs
    }
}

/// Runs one transfer, reading the server's CPU (and both CPUs' load) around it and the server's
/// after the settle pause.
async fn on_server(
    server: &ChildGuard,
    transfer: impl std::future::Future<Output = Result<Sample>>,
) -> Result<Split> {
    let cores = [SERVER_CPU, NODE_CPU];
    let cores_before = cores.map(procs::core_secs);
    let before = server.cpu_secs();
    let t = Instant::now();
    let s = transfer.await?;
    let end = server.cpu_secs();
    let window = t.elapsed().as_secs_f64();
    let cores_used = [0, 1].map(|i| procs::core_secs(cores[i]) - cores_before[i]);
    tokio::time::sleep(SETTLE).await;
    Ok(Split {
        s,
        server_cpu: end - before,
        server_after: server.cpu_secs() - end,
        core_busy: cores_used.map(|c| (c.tasks + c.irq) / window),
        core_irq: cores_used.map(|c| c.irq / window),
        steal: cores_used.iter().map(|c| c.steal).sum(),
    })
}

/// Alternating rounds of A and B with per-process CPU, then the table.
#[allow(clippy::too_many_arguments)]
async fn report_split(
    base: &ChildGuard,
    vault: &ChildGuard,
    base_ep: &Endpoint,
    node_ep: &Endpoint,
    attester: &SimAttester,
    bytes: u64,
    wire: u64,
    rounds: usize,
) -> Result<f64> {
    let mut a = Vec::with_capacity(rounds);
    let mut b = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        a.push(on_server(base, run_baseline(base_ep, wire)).await?);
        b.push(on_server(vault, run_real(node_ep, attester, bytes)).await?);
    }

    println!();
    println!(
        "split mode: each server process on CPU {SERVER_CPU}, this process (the node) on CPU {NODE_CPU}"
    );
    println!(
        "A = bare tonic stream of the same chunks from the baseline process; {wire} bytes of ciphertext each round"
    );
    println!(
        "B = NodeClient::fetch from `weightvault serve`: challenge + attest + grant + stream + decrypt;"
    );
    println!(
        "    {bytes} bytes of plaintext each round (setup = challenge + attest + grant, included in B s)"
    );
    println!(
        "srv cpu = CPU seconds of the server process from just before the connection to the end of the transfer"
    );
    println!("cli cpu = CPU seconds of this process (the node) during the transfer");
    println!(
        "ratio = B throughput / A throughput = A s / B s; srv ratio, cli ratio = A cpu / B cpu of that process"
    );
    println!();
    println!(
        "{:<7}{:>8}{:>8}{:>10}{:>10}{:>8}{:>8}{:>10}{:>10}{:>9}{:>7}{:>10}{:>10}",
        "round",
        "A s",
        "A GB/s",
        "A srv cpu",
        "A cli cpu",
        "B s",
        "B GB/s",
        "B srv cpu",
        "B cli cpu",
        "B setup",
        "ratio",
        "srv ratio",
        "cli ratio"
    );
    let row = |label: &str, sa: &Split, sb: &Split| {
        println!(
            "{:<7}{:>8.3}{:>8.2}{:>10.2}{:>10.2}{:>8.3}{:>8.2}{:>10.2}{:>10.2}{:>9.4}{:>7.3}{:>10.3}{:>10.3}",
            label,
            sa.s.secs,
            sa.s.gbps(),
            sa.server_cpu,
            sa.s.cpu_secs,
            sb.s.secs,
            sb.s.gbps(),
            sb.server_cpu,
            sb.s.cpu_secs,
            sb.s.setup_secs.unwrap_or(f64::NAN),
            sa.s.secs / sb.s.secs,
            sa.server_cpu / sb.server_cpu,
            sa.s.cpu_secs / sb.s.cpu_secs
        );
    };
    for (i, (sa, sb)) in a.iter().zip(&b).enumerate() {
        row(&(i + 1).to_string(), sa, sb);
    }
    let med = |v: &[Split], f: &dyn Fn(&Split) -> f64| median(v.iter().map(f).collect());
    let med_of = |v: &[Split], n: u64| Split {
        s: Sample {
            bytes: n,
            secs: med(v, &|x| x.s.secs),
            cpu_secs: med(v, &|x| x.s.cpu_secs),
            setup_secs: Some(med(v, &|x| x.s.setup_secs.unwrap_or(f64::NAN))),
        },
        server_cpu: med(v, &|x| x.server_cpu),
        server_after: med(v, &|x| x.server_after),
        core_busy: [0, 1].map(|i| med(v, &|x| x.core_busy[i])),
        core_irq: [0, 1].map(|i| med(v, &|x| x.core_irq[i])),
        steal: med(v, &|x| x.steal),
    };
    let med_a = med_of(&a, wire);
    let med_b = med_of(&b, bytes);
    row("median", &med_a, &med_b);

    let ratios: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(sa, sb)| sa.s.secs / sb.s.secs)
        .collect();
    let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!();
    println!(
        "ratio B/A of the medians = {:.3} (goal >= 0.85); per round: [{}]; median of per-round ratios = {:.3}",
        med_a.s.secs / med_b.s.secs,
        per_round.join(", "),
        median(ratios)
    );
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "CPU seconds per GiB of model (medians): A server {:.2}, client {:.2}; B server {:.2}, client {:.2}",
        med_a.server_cpu / gib,
        med_a.s.cpu_secs / gib,
        med_b.server_cpu / gib,
        med_b.s.cpu_secs / gib
    );
    let busy = |v: &[Split], server: bool| {
        median(
            v.iter()
                .map(|x| Split::busy(if server { x.server_cpu } else { x.s.cpu_secs }, &x.s))
                .collect(),
        )
    };
    println!(
        "core use = CPU s / wall s of the transfer (medians; 1.00 = that process's one core busy all along): A server {:.2}, client {:.2}; B server {:.2}, client {:.2}",
        busy(&a, true),
        busy(&a, false),
        busy(&b, true),
        busy(&b, false)
    );
    println!(
        "CPU busy = /proc/stat busy time of the CPU (any task, plus irq/softirq charged to none) / wall s, medians, (irq part): A CPU {SERVER_CPU} {:.2} ({:.2}), CPU {NODE_CPU} {:.2} ({:.2}); B CPU {SERVER_CPU} {:.2} ({:.2}), CPU {NODE_CPU} {:.2} ({:.2}); steal by the hypervisor (both CPUs, median): A {:.2} s, B {:.2} s",
        med_a.core_busy[0],
        med_a.core_irq[0],
        med_a.core_busy[1],
        med_a.core_irq[1],
        med_b.core_busy[0],
        med_b.core_irq[0],
        med_b.core_busy[1],
        med_b.core_irq[1],
        med_a.steal,
        med_b.steal
    );
    let per_round = |v: &[Split]| {
        v.iter()
            .map(|x| {
                format!(
                    "{:.2}({:.2})/{:.2}({:.2}) {:.2} s",
                    x.core_busy[0], x.core_irq[0], x.core_busy[1], x.core_irq[1], x.steal
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  per round, CPU {SERVER_CPU} busy (irq) / CPU {NODE_CPU} busy (irq), steal: A [{}]; B [{}]",
        per_round(&a),
        per_round(&b)
    );
    println!(
        "server CPU in the {} ms pause after each transfer (post-stream bookkeeping, not in srv cpu), median: A {:.2} s, B {:.2} s",
        SETTLE.as_millis(),
        med_a.server_after,
        med_b.server_after
    );
    Ok(med_b.s.secs)
}
