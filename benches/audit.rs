//! Audit log throughput: durable appends with group commit, and the auditor's replay
//! (docs/performance.md, "Audit log").
//!
//! 1. Appends. A fresh `SqliteStore` (WAL, `synchronous=FULL`) in a temp dir for every round.
//!    Baseline: `MetadataStore::append_audit` called directly with one entry per call (one
//!    transaction and one fsync per entry), from 1 task and from 16 tasks. Then the real path:
//!    `Sequencer::start` with default options (checkpoint every second) and C concurrent tasks
//!    (default 1, 16, 64, 256), each building a realistic grant entry and awaiting `append`,
//!    which returns only once the entry is committed (group commit). Reported: entries/s (median
//!    of the rounds), per-append latency percentiles and process CPU time per entry.
//! 2. Verification. N synthetic canonical entries (default 1,000,000) of a realistic, semantically
//!    valid mix (attest allow, grant allow, fetch_start allow, fetch_end), the Merkle root, a
//!    signed checkpoint, then `replay::replay` with a no-op evidence check, which must report
//!    `ok`. Leaf hashing, `merkle::root`, `AuditEntry::decode` and the JSON parse alone are timed
//!    separately, to show where the replay's time goes.
//!
//! `cargo bench --bench audit`. Knobs: `WEIGHTVAULT_BENCH_APPEND_ENTRIES` (entries per round,
//! default 20000), `WEIGHTVAULT_BENCH_APPEND_SECS` (time cap per round, default 5),
//! `WEIGHTVAULT_BENCH_APPEND_ROUNDS` (default 3), `WEIGHTVAULT_BENCH_CONCURRENCY` (sequencer
//! concurrencies, default `1,16,64,256`), `WEIGHTVAULT_BENCH_VERIFY_ENTRIES` (default 1000000),
//! `WEIGHTVAULT_BENCH_VERIFY_ROUNDS` (default 3), `WEIGHTVAULT_BENCH_ONLY=append|verify` (one
//! part only) or `sequencer` (appends without the direct baseline); with it the pid is printed,
//! for profiling. The bench never asserts on timing; it does check
//! that every append succeeded and that the replay passes.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_lc_rs::signature::Ed25519KeyPair;

use weightvault::audit::checkpoint::{Checkpoint, sign_checkpoint};
use weightvault::audit::entry::ActorKind;
use weightvault::audit::merkle::{self, Accumulator, Hash};
use weightvault::audit::note::NoteSigner;
use weightvault::audit::replay::{self, Input};
use weightvault::audit::sequencer::SequencerOptions;
use weightvault::audit::{Action, Actor, AuditEntry, Decision, Sequencer};
use weightvault::store::MetadataStore;
use weightvault::store::sqlite::SqliteStore;
use weightvault::time::{SharedClock, SystemClock};

/// The log's origin, which is also the signing key's name.
const ORIGIN: &str = "bench.weightvault.example/audit";
const DEFAULT_APPEND_ENTRIES: u64 = 20_000;
const DEFAULT_APPEND_SECS: u64 = 5;
const DEFAULT_APPEND_ROUNDS: u64 = 3;
const DEFAULT_CONCURRENCY: &str = "1,16,64,256";
const DEFAULT_VERIFY_ENTRIES: u64 = 1_000_000;
const DEFAULT_VERIFY_ROUNDS: u64 = 3;
/// Appends before each timed configuration, not timed (connections, page cache, WAL file).
const WARMUP_APPENDS: u64 = 100;
/// Concurrency of the direct (unbatched) baseline besides 1.
const DIRECT_CONCURRENCY: usize = 16;
/// The goals.
const APPEND_GOAL_PER_SEC: f64 = 20_000.0;
const VERIFY_GOAL_SECS_PER_MILLION: f64 = 10.0;
/// Grant lifetime in the synthetic entries (the server's default is of this order).
const GRANT_TTL_MS: u64 = 15 * 60 * 1000;
const MODELS: [&str; 3] = [
    "llama-3.1-8b-instruct",
    "mistral-7b-v0.3",
    "qwen2.5-72b-instruct",
];
const TEES: [&str; 2] = ["sev-snp", "tdx"];
/// Interleaved node sessions in the synthetic log.
const ACTIVE_SESSIONS: usize = 64;

fn main() -> Result<()> {
    let append_entries = env_u64("WEIGHTVAULT_BENCH_APPEND_ENTRIES", DEFAULT_APPEND_ENTRIES)?;
    let append_secs = env_u64("WEIGHTVAULT_BENCH_APPEND_SECS", DEFAULT_APPEND_SECS)?;
    let append_rounds = env_u64("WEIGHTVAULT_BENCH_APPEND_ROUNDS", DEFAULT_APPEND_ROUNDS)?;
    let verify_entries = env_u64("WEIGHTVAULT_BENCH_VERIFY_ENTRIES", DEFAULT_VERIFY_ENTRIES)?;
    let verify_rounds = env_u64("WEIGHTVAULT_BENCH_VERIFY_ROUNDS", DEFAULT_VERIFY_ROUNDS)?;
    let concurrency: Vec<usize> = std::env::var("WEIGHTVAULT_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| DEFAULT_CONCURRENCY.into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .with_context(|| format!("WEIGHTVAULT_BENCH_CONCURRENCY: {c:?} is not an integer"))
        })
        .collect::<Result<_>>()?;
    if append_entries == 0
        || append_secs == 0
        || append_rounds == 0
        || verify_entries == 0
        || verify_rounds == 0
        || concurrency.contains(&0)
    {
        bail!("entry counts, rounds, seconds and concurrency must be positive");
    }
    let only = std::env::var("WEIGHTVAULT_BENCH_ONLY").ok();
    // (appends, of which the direct baseline, verification)
    let (run_append, run_direct, run_verify) = match only.as_deref() {
        None => (true, true, true),
        Some("append") => (true, true, false),
        Some("sequencer") => (true, false, false),
        Some("verify") => (false, false, true),
        Some(other) => {
            bail!("WEIGHTVAULT_BENCH_ONLY must be append, sequencer or verify, not {other:?}")
        }
    };

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("weightvault audit bench");
    println!("  cores: {cores} (tokio multi-thread runtime, {cores} workers)");
    println!("  cpu:   {}", cpu_model());
    if only.is_some() {
        println!("  pid:   {}", std::process::id());
    }

    if run_append {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(appends(
            append_entries,
            Duration::from_secs(append_secs),
            append_rounds,
            run_direct,
            &concurrency,
        ))?;
    }
    if run_verify {
        verification(verify_entries, verify_rounds)?;
    }
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

/// Cheap deterministic filler (xorshift64*) for ids and hashes; the values do not matter.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `bytes` random bytes as lowercase hex.
    fn hex(&mut self, bytes: usize) -> String {
        let mut raw = Vec::with_capacity(bytes + 8);
        while raw.len() < bytes {
            raw.extend_from_slice(&self.next().to_le_bytes());
        }
        raw.truncate(bytes);
        hex::encode(raw)
    }
}

/// What a node's session token hash looks like as an actor.
fn node_actor(rng: &mut Rng) -> Actor {
    Actor::new(ActorKind::Node, rng.hex(32))
}

/// A grant allow entry as `NodeService::request_grant` writes it.
fn grant_entry(
    rng: &mut Rng,
    now: u64,
    actor: Actor,
    model: &str,
    tee: &str,
    measurement: &str,
) -> AuditEntry {
    let mut e = AuditEntry::new(now, Action::Grant, Decision::Allow, actor);
    e.request_id = Some(rng.hex(8));
    e.model = Some(model.to_owned());
    e.version = Some(3);
    e.grant_id = Some(format!("g-{}", rng.hex(16)));
    e.tee = Some(tee.to_owned());
    e.measurement = Some(measurement.to_owned());
    e.not_after_ms = Some(now + GRANT_TTL_MS);
    e.reason = Some(format!("rule {model}/{tee}/{measurement}"));
    e
}

/// User + system CPU seconds of this process, all threads (`/proc/self/stat`, USER_HZ = 100);
/// NaN where unavailable.
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) as f64 / 100.0,
        _ => f64::NAN,
    }
}

/// Peak resident set size of this process in MiB (`VmHWM`), NaN where unavailable.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (nearest rank) of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// 1. Durable appends
// ---------------------------------------------------------------------------------------------

/// How entries reach the log.
#[derive(Clone)]
enum Log {
    /// `append_audit` with one entry per call: one transaction and one fsync per entry.
    Direct(Arc<SqliteStore>),
    /// `Sequencer::append`: group commit.
    Sequencer(Sequencer),
}

impl Log {
    async fn append(&self, e: &AuditEntry) -> Result<()> {
        match self {
            Log::Direct(store) => {
                store.append_audit(&[e.encode()]).await?;
            }
            Log::Sequencer(seq) => {
                seq.append(e).await?;
            }
        }
        Ok(())
    }
}

/// One timed append configuration.
struct AppendSample {
    label: String,
    concurrency: usize,
    entries: u64,
    secs: f64,
    cpu_secs: f64,
    /// Per-append latency, sorted.
    latencies: Vec<Duration>,
}

impl AppendSample {
    fn rate(&self) -> f64 {
        self.entries as f64 / self.secs
    }
}

/// Appends from `c` tasks until `target` entries are durable or `cap` has passed.
async fn drive(
    log: &Log,
    label: &str,
    c: usize,
    target: u64,
    cap: Duration,
    clock: &SharedClock,
) -> Result<AppendSample> {
    let measurement = Rng(0x5eed).hex(48);
    let next = Arc::new(AtomicU64::new(0));
    let cpu = process_cpu_secs();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for t in 0..c {
        let log = log.clone();
        let next = next.clone();
        let clock = clock.clone();
        let measurement = measurement.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) << 20));
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < target && start.elapsed() < cap {
                let model = MODELS[rng.below(MODELS.len())];
                let actor = node_actor(&mut rng);
                let e = grant_entry(
                    &mut rng,
                    clock.now_ms(),
                    actor,
                    model,
                    TEES[0],
                    &measurement,
                );
                let began = Instant::now();
                log.append(&e).await?;
                lat.push(began.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu;
    latencies.sort_unstable();
    Ok(AppendSample {
        label: label.to_owned(),
        concurrency: c,
        entries: latencies.len() as u64,
        secs,
        cpu_secs,
        latencies,
    })
}

async fn open_store(dir: &Path, name: &str) -> Result<Arc<SqliteStore>> {
    let path = dir.join(format!("{name}.db"));
    Ok(Arc::new(SqliteStore::open(&path).await?))
}

/// One round of one configuration on a fresh store: warm-up, timed appends, checks.
async fn append_round(
    dir: &Path,
    sequencer: bool,
    c: usize,
    target: u64,
    cap: Duration,
    clock: &SharedClock,
) -> Result<AppendSample> {
    let name = format!(
        "{}-{c}-{}",
        if sequencer { "sequencer" } else { "direct" },
        ROUND.fetch_add(1, Ordering::Relaxed)
    );
    let store = open_store(dir, &name).await?;
    if !sequencer {
        let log = Log::Direct(store.clone());
        drive(&log, "warm-up", 1, WARMUP_APPENDS, cap, clock).await?;
        let s = drive(&log, "direct append_audit", c, target, cap, clock).await?;
        let stored = store.audit_size().await?;
        ensure!(
            stored == WARMUP_APPENDS + s.entries,
            "direct store holds {stored} entries, expected {}",
            WARMUP_APPENDS + s.entries
        );
        return Ok(s);
    }
    let signer = NoteSigner::new(
        ORIGIN,
        Ed25519KeyPair::generate().map_err(|_| anyhow!("generating an Ed25519 key"))?,
    )?;
    let (seq, task) = Sequencer::start(
        store.clone(),
        signer,
        ORIGIN.to_owned(),
        clock.clone(),
        SequencerOptions::default(),
    )
    .await?;
    let log = Log::Sequencer(seq.clone());
    drive(&log, "warm-up", c.min(16), WARMUP_APPENDS, cap, clock).await?;
    let s = drive(&log, "Sequencer::append", c, target, cap, clock).await?;
    seq.close().await;
    task.await?;
    let stored = store.audit_size().await?;
    let checkpoint = store
        .latest_checkpoint()
        .await?
        .context("no checkpoint after close")?;
    // The sequencer may add heartbeat entries, never lose one.
    ensure!(
        stored >= WARMUP_APPENDS + s.entries && checkpoint.size == stored,
        "sequencer store holds {stored} entries (final checkpoint {}), expected {}",
        checkpoint.size,
        WARMUP_APPENDS + s.entries
    );
    Ok(s)
}

/// Names each round's database file.
static ROUND: AtomicU64 = AtomicU64::new(0);

async fn appends(
    target: u64,
    cap: Duration,
    rounds: u64,
    direct: bool,
    concurrency: &[usize],
) -> Result<()> {
    println!();
    println!(
        "== durable appends: SqliteStore (WAL, synchronous=FULL), {target} grant entries per round (cap {} s), {rounds} rounds per configuration, each on a fresh store after {WARMUP_APPENDS} untimed warm-up appends",
        cap.as_secs()
    );
    let tmp = tempfile::tempdir()?;
    println!("  temp dir: {}", tmp.path().display());
    let clock: SharedClock = Arc::new(SystemClock);
    let size = grant_entry(
        &mut Rng(1),
        clock.now_ms(),
        node_actor(&mut Rng(2)),
        MODELS[0],
        TEES[0],
        &Rng(3).hex(48),
    )
    .encode()
    .len();
    println!("  entry size: {size} bytes of canonical JSON");

    let direct_configs = if direct {
        vec![(false, 1), (false, DIRECT_CONCURRENCY)]
    } else {
        Vec::new()
    };
    let configs: Vec<(bool, usize)> = direct_configs
        .into_iter()
        .chain(concurrency.iter().map(|&c| (true, c)))
        .collect();
    let mut results: Vec<Vec<AppendSample>> = Vec::new();
    for &(sequencer, c) in &configs {
        let mut samples = Vec::new();
        for r in 0..rounds {
            let s = append_round(tmp.path(), sequencer, c, target, cap, &clock).await?;
            println!(
                "  {} C={} round {}: {} entries in {:.3} s = {:.0} entries/s (p50 {:.2} ms, p99 {:.2} ms, {:.2} cpu s)",
                s.label,
                s.concurrency,
                r + 1,
                s.entries,
                s.secs,
                s.rate(),
                quantile_ms(&s.latencies, 0.5),
                quantile_ms(&s.latencies, 0.99),
                s.cpu_secs
            );
            samples.push(s);
        }
        results.push(samples);
    }

    println!();
    println!("entries/s = durable appends per second (every append returned after its commit):");
    println!(
        "  median of the rounds [min, max]; latency = time one append waited, all rounds (ms);"
    );
    println!("  cpu µs/entry = process CPU time per durable entry (median of rounds)");
    println!();
    println!(
        "{:<22}{:>5}{:>9}{:>11}{:>17}{:>8}{:>8}{:>8}{:>8}{:>8}{:>10}",
        "path",
        "C",
        "entries",
        "entries/s",
        "[min, max]",
        "p50",
        "p90",
        "p99",
        "max",
        "cpu µs",
        "vs direct"
    );
    let med_rate = |v: &[AppendSample]| median(v.iter().map(AppendSample::rate).collect());
    let direct = if direct {
        results.first().map_or(f64::NAN, |v| med_rate(v))
    } else {
        f64::NAN
    };
    let mut best: Option<(f64, usize)> = None;
    for (&(sequencer, c), samples) in configs.iter().zip(&results) {
        let mut lat: Vec<Duration> = samples.iter().flat_map(|s| s.latencies.clone()).collect();
        lat.sort_unstable();
        let rates: Vec<f64> = samples.iter().map(AppendSample::rate).collect();
        let rate = med_rate(samples);
        if sequencer && best.is_none_or(|(b, _)| rate > b) {
            best = Some((rate, c));
        }
        println!(
            "{:<22}{:>5}{:>9}{:>11.0}{:>17}{:>8.2}{:>8.2}{:>8.2}{:>8.2}{:>8.1}{:>10}",
            samples.first().map_or("", |s| s.label.as_str()),
            c,
            samples.iter().map(|s| s.entries).sum::<u64>(),
            rate,
            format!(
                "[{:.0}, {:.0}]",
                rates.iter().copied().fold(f64::INFINITY, f64::min),
                rates.iter().copied().fold(0.0, f64::max)
            ),
            quantile_ms(&lat, 0.5),
            quantile_ms(&lat, 0.9),
            quantile_ms(&lat, 0.99),
            quantile_ms(&lat, 1.0),
            median(
                samples
                    .iter()
                    .map(|s| s.cpu_secs * 1e6 / s.entries as f64)
                    .collect()
            ),
            if direct.is_nan() {
                "-".to_owned()
            } else {
                format!("{:.1}x", rate / direct)
            }
        );
    }
    if let Some((rate, c)) = best {
        println!();
        println!(
            "best sequencer rate: {rate:.0} entries/s at C = {c} (goal {APPEND_GOAL_PER_SEC:.0} durable entries/s: {})",
            if rate >= APPEND_GOAL_PER_SEC {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Verification
// ---------------------------------------------------------------------------------------------

/// Where a synthetic node session is.
enum Step {
    Attest,
    Grant,
    FetchStart(u32),
    FetchEnd(u32),
}

/// One node: attests, gets one grant, fetches `files` files (start and end for each).
struct Session {
    actor: Actor,
    tee: usize,
    measurement: usize,
    model: usize,
    grant_id: String,
    files: u32,
    next: Step,
}

#[derive(Default, Debug, PartialEq, Eq)]
struct Counts {
    attests: u64,
    grants: u64,
    fetches: u64,
    fetch_ends: u64,
}

/// Builds `n` canonical entries: `ACTIVE_SESSIONS` node sessions interleaved at random, each
/// attest allow → grant allow (same actor, unexpired) → per file fetch_start allow and fetch_end
/// info. Every prefix is semantically valid.
fn synthetic_log(n: usize) -> (Vec<Vec<u8>>, Counts) {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let measurements: Vec<String> = (0..4).map(|_| rng.hex(48)).collect();
    let new_session = |rng: &mut Rng| Session {
        actor: node_actor(rng),
        tee: rng.below(TEES.len()),
        measurement: rng.below(measurements.len()),
        model: rng.below(MODELS.len()),
        grant_id: String::new(),
        files: 1 + rng.below(4) as u32,
        next: Step::Attest,
    };
    let mut sessions: Vec<Session> = (0..ACTIVE_SESSIONS)
        .map(|_| new_session(&mut rng))
        .collect();
    let mut counts = Counts::default();
    let mut time_ms: u64 = 1_750_000_000_000;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        time_ms += 1 + rng.next() % 3;
        let k = rng.below(sessions.len());
        let s = &mut sessions[k];
        let (tee, measurement, model) =
            (TEES[s.tee], &measurements[s.measurement], MODELS[s.model]);
        let file = |i: u32| format!("model-{:05}-of-{:05}.safetensors", i + 1, s.files);
        let (entry, next) = match s.next {
            Step::Attest => {
                let mut e =
                    AuditEntry::new(time_ms, Action::Attest, Decision::Allow, s.actor.clone());
                e.request_id = Some(rng.hex(8));
                e.tee = Some(tee.to_owned());
                e.measurement = Some(measurement.clone());
                e.evidence_sha256 = Some(rng.hex(32));
                e.nonce = Some(rng.hex(32));
                e.node_key = Some(rng.hex(32));
                e.reason = Some(format!("instance i-{}", rng.hex(8)));
                counts.attests += 1;
                (e, Some(Step::Grant))
            }
            Step::Grant => {
                let e = grant_entry(&mut rng, time_ms, s.actor.clone(), model, tee, measurement);
                s.grant_id = e.grant_id.clone().unwrap_or_default();
                counts.grants += 1;
                (e, Some(Step::FetchStart(0)))
            }
            Step::FetchStart(i) => {
                let mut e = AuditEntry::new(
                    time_ms,
                    Action::FetchStart,
                    Decision::Allow,
                    s.actor.clone(),
                );
                e.request_id = Some(rng.hex(8));
                e.model = Some(model.to_owned());
                e.version = Some(3);
                e.grant_id = Some(s.grant_id.clone());
                e.file = Some(file(i));
                e.reason = Some(format!("chunks 0..{}", 1 + rng.below(1200)));
                counts.fetches += 1;
                (e, Some(Step::FetchEnd(i)))
            }
            Step::FetchEnd(i) => {
                let mut e =
                    AuditEntry::new(time_ms, Action::FetchEnd, Decision::Info, s.actor.clone());
                e.request_id = Some(rng.hex(8));
                e.model = Some(model.to_owned());
                e.version = Some(3);
                e.grant_id = Some(s.grant_id.clone());
                e.file = Some(file(i));
                e.bytes = Some(rng.next() % (5 << 30));
                e.reason = Some("complete".into());
                counts.fetch_ends += 1;
                (e, (i + 1 < s.files).then_some(Step::FetchStart(i + 1)))
            }
        };
        out.push(entry.encode());
        match next {
            Some(step) => s.next = step,
            None => sessions[k] = new_session(&mut rng),
        }
    }
    (out, counts)
}

/// Runs `f` once and returns its result and wall seconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

/// Wall seconds of each timed part of one verification round.
#[derive(Default, Clone, Copy)]
struct VerifyRound {
    leaf: f64,
    root: f64,
    decode: f64,
    parse: f64,
    replay: f64,
}

fn verification(n: u64, rounds: u64) -> Result<()> {
    let n_usize = usize::try_from(n).context("entry count exceeds memory")?;
    println!();
    println!(
        "== verification: {n} synthetic entries, replay with a no-op evidence check, {rounds} rounds"
    );
    let ((entries, counts), gen_secs) = timed(|| synthetic_log(n_usize));
    let bytes: usize = entries.iter().map(Vec::len).sum();
    println!(
        "  built in {gen_secs:.2} s: {} attest, {} grant, {} fetch_start, {} fetch_end; {} bytes ({:.0} bytes/entry on average)",
        counts.attests,
        counts.grants,
        counts.fetches,
        counts.fetch_ends,
        bytes,
        bytes as f64 / n as f64
    );

    // The log's signed checkpoint over all entries.
    let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    let root = merkle::root(&leaves);
    let mut acc = Accumulator::new();
    for l in &leaves {
        acc.push(*l);
    }
    ensure!(acc.root() == root, "Accumulator and merkle::root disagree");
    let signer = NoteSigner::new(
        ORIGIN,
        Ed25519KeyPair::generate().map_err(|_| anyhow!("generating an Ed25519 key"))?,
    )?;
    let verifier = signer.verifier();
    let note = sign_checkpoint(
        &signer,
        &Checkpoint {
            origin: ORIGIN.to_owned(),
            size: n,
            root,
            extensions: Vec::new(),
        },
    )?;

    let check = |report: &replay::Report| -> Result<()> {
        ensure!(
            report.ok,
            "replay failed: {:?}",
            report.findings.iter().take(5).collect::<Vec<_>>()
        );
        ensure!(
            report.entries_checked == n
                && report.grants == counts.grants
                && report.fetches == counts.fetches
                && report.attestations_reverified == counts.attests,
            "replay counted {} entries, {} grants, {} fetches, {} attestations",
            report.entries_checked,
            report.grants,
            report.fetches,
            report.attestations_reverified
        );
        Ok(())
    };

    // The full replay, as `weightvault audit verify --skip-evidence` does against a live vault
    // once it has the entries; and its parts, each one pass over all entries.
    let input = Input {
        entries: &entries,
        recorded_leaf_hashes: None,
        checkpoint_note: &note,
        verifier: &verifier,
        trusted: None,
    };
    let mut times = Vec::new();
    for r in 0..rounds {
        let mut t = VerifyRound::default();
        // No-op evidence check: every attestation is accepted (and counted as re-verified).
        let (report, secs) = timed(|| replay::replay(&input, &mut |_, _| Ok(true)));
        check(&report)?;
        t.replay = secs;
        let (hashes, secs) = timed(|| {
            entries
                .iter()
                .map(|e| merkle::leaf_hash(e))
                .collect::<Vec<Hash>>()
        });
        t.leaf = secs;
        let (head, secs) = timed(|| merkle::root(&hashes));
        t.root = secs;
        ensure!(head == root, "the tree head changed");
        drop(hashes);
        let (decoded, secs) = timed(|| {
            entries
                .iter()
                .filter(|b| black_box(AuditEntry::decode(b)).is_ok())
                .count()
        });
        t.decode = secs;
        ensure!(
            decoded == n_usize,
            "{} entries do not decode",
            n_usize - decoded
        );
        let (parsed, secs) = timed(|| {
            entries
                .iter()
                .filter(|b| black_box(serde_json::from_slice::<AuditEntry>(b)).is_ok())
                .count()
        });
        t.parse = secs;
        ensure!(
            parsed == n_usize,
            "{} entries do not parse",
            n_usize - parsed
        );
        println!(
            "  round {}: replay {:.3} s = {:.0} entries/s (ok = {}); leaf hashes {:.3} s, tree head {:.3} s, decode {:.3} s, parse alone {:.3} s",
            r + 1,
            t.replay,
            n as f64 / t.replay,
            report.ok,
            t.leaf,
            t.root,
            t.decode,
            t.parse
        );
        times.push(t);
    }
    let med = |f: fn(&VerifyRound) -> f64| median(times.iter().map(f).collect());
    let m = VerifyRound {
        leaf: med(|t| t.leaf),
        root: med(|t| t.root),
        decode: med(|t| t.decode),
        parse: med(|t| t.parse),
        replay: med(|t| t.replay),
    };

    // The export path: recorded leaf hashes compared, and a trusted checkpoint at half the size
    // (its prefix root recomputed: the consistency check).
    let half = n / 2;
    let trusted = (half > 0).then(|| Checkpoint {
        origin: ORIGIN.to_owned(),
        size: half,
        root: merkle::root(&leaves[..usize::try_from(half).expect("below n")]),
        extensions: Vec::new(),
    });
    let input = Input {
        entries: &entries,
        recorded_leaf_hashes: Some(&leaves),
        checkpoint_note: &note,
        verifier: &verifier,
        trusted: trusted.as_ref(),
    };
    let (report, export_secs) = timed(|| replay::replay(&input, &mut |_, _| Ok(true)));
    check(&report)?;

    let per_million = m.replay * 1e6 / n as f64;
    println!();
    println!(
        "{:<46}{:>8}{:>11}{:>10}",
        format!("part (one pass over {n} entries, median)"),
        "s",
        "µs/entry",
        "% replay"
    );
    let line = |name: &str, secs: f64| {
        println!(
            "{name:<46}{secs:>8.3}{:>11.3}{:>10.1}",
            secs * 1e6 / n as f64,
            100.0 * secs / m.replay
        );
    };
    line("leaf hashes (merkle::leaf_hash)", m.leaf);
    line("tree head (merkle::root over leaf hashes)", m.root);
    line("AuditEntry::decode (parse + re-encode + cmp)", m.decode);
    line("  serde_json parse alone", m.parse);
    line("  re-encode + compare (difference)", m.decode - m.parse);
    line(
        "rest: semantic checks (difference)",
        m.replay - m.leaf - m.root - m.decode,
    );
    line("replay::replay", m.replay);
    println!();
    println!(
        "replay: median {:.3} s for {n} entries = {:.0} entries/s; rounds [{}]",
        m.replay,
        n as f64 / m.replay,
        times
            .iter()
            .map(|t| format!("{:.3}", t.replay))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "replay with recorded leaf hashes and a trusted checkpoint at size {half}: {export_secs:.3} s"
    );
    println!(
        "per 1,000,000 entries: {per_million:.2} s (goal < {VERIFY_GOAL_SECS_PER_MILLION} s: {}); peak RSS {:.0} MiB; replay runs on one thread",
        if per_million < VERIFY_GOAL_SECS_PER_MILLION {
            "met"
        } else {
            "NOT met"
        },
        peak_rss_mib()
    );
    Ok(())
}
