//! Attestation verification cost on one core (docs/performance.md, "Attestation verification").
//!
//! For each hardware TEE, the real sample evidence of ../shared/vectors/attest (INDEX.md) is
//! verified in a loop on a single thread by a verifier built ONCE (roots parsed once, as the
//! vault does at start-up):
//!
//! - SNP: S1 (trustee Milan report + VCEK) and S4 (virtee Milan report + VCEK + ASK/ARK chain),
//!   policy with the Milan floor equal to the samples' TCB (3/0/8/115), at 2025-06-01.
//!   Breakdown row: the VCEK chain check alone (`verify_endorsement_key`).
//! - TDX: T1 v4 quote + its dcap-qvl collateral, at 2025-06-20 (inside the collateral window).
//! - Nitro: N1 (AWS-signed, us-east-1) at its own timestamp.
//! - TPM: P2 (GCE vTPM, go-tpm-tools protobuf, AK certificate chain to Google's root) through
//!   `verify_with_nonce` with nonce 0x9009, and P1 (swtpm) with its AK pinned, through `verify`.
//!
//! Every verification is checked to succeed (correctness); timing is never asserted. The cost of
//! `Verifier::new` (parsing and checking the pinned roots) is measured separately, to show what
//! building the verifier once saves on every boot request.
//!
//! `cargo bench --bench attest`; seconds per measurement from `WEIGHTVAULT_BENCH_SECS` (default
//! 2); `WEIGHTVAULT_BENCH_ONLY=snp|tdx|nitro|tpm` runs one TEE only (profiling aid, e.g. under
//! `perf record -g`). Besides wall time, the bench reads this thread's on-CPU time from
//! `/proc/thread-self/schedstat`, so results stay meaningful while other processes compete for
//! the cores.

use std::hint::black_box;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ciborium::Value;
use weightvault::attest::nitro::{self, NitroPolicy, NitroVerifier};
use weightvault::attest::snp::{self, SnpPolicy, SnpTcbFloor, SnpTcbFloors, SnpVerifier};
use weightvault::attest::tdx::{self, TdxPolicy, TdxVerifier};
use weightvault::attest::tpm::{self, TpmPolicy, TpmVerifier};
use weightvault::attest::{TeeKind, Verifier};

/// 2025-06-01T00:00:00Z: inside the SNP sample VCEKs' validity.
const SNP_NOW_MS: u64 = 1_748_736_000_000;
/// 2025-06-20T11:46:40Z: inside T1's collateral window.
const TDX_NOW_MS: u64 = 1_750_420_000_000;
/// 2025-01-01T00:00:00Z: inside P2's AK certificate validity.
const TPM_NOW_MS: u64 = 1_735_689_600_000;
/// go-tpm-tools' nonce of gce-cos-85-nonce9009.pb.
const GCE_NONCE: &[u8] = &[0x90, 0x09];
/// P1's extraData (Trustee's report_data layout: 48 bytes and 16 zero bytes).
const P1_EXTRA_DATA: &str = "a04182b506878d4f29b91ee606a71a0d3361ccf1b22db20c98adcaa537bea393\
                             ef0e41a18b3569ab678f1497fbc5c12000000000000000000000000000000000";
/// SHA-256 of P1's AK SubjectPublicKeyInfo (checked against `tpm::ak_fingerprint`).
const P1_AK: &str = "a517f03ffdaee469aef1a19569547e330726335d0461c3ef6383409c6295679e";

const WARMUP: Duration = Duration::from_millis(300);
const DEFAULT_SECS: f64 = 2.0;
/// `Verifier::new` is measured for this long (it is much cheaper to repeat than to reason about).
const NEW_SECS: f64 = 1.0;

fn main() -> Result<ExitCode> {
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/attest");
    if !vectors.is_dir() {
        println!(
            "attestation vectors not found at {} (INDEX.md); nothing to measure, skipping",
            vectors.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let secs: f64 = match std::env::var("WEIGHTVAULT_BENCH_SECS") {
        Ok(v) => v
            .trim()
            .parse()
            .context("WEIGHTVAULT_BENCH_SECS must be a number")?,
        Err(_) => DEFAULT_SECS,
    };
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("WEIGHTVAULT_BENCH_SECS must be positive");
    }
    let only = std::env::var("WEIGHTVAULT_BENCH_ONLY").ok();
    let run = |tee: TeeKind| only.as_deref().is_none_or(|o| o == tee.as_str());

    print_machine();
    println!(
        "pid {}; one thread; warm-up {} ms, then verify in a loop for {secs} s per row\n",
        std::process::id(),
        WARMUP.as_millis()
    );

    let mut rows = Vec::new();
    if run(TeeKind::Snp) {
        rows.extend(bench_snp(&vectors, secs)?);
    }
    if run(TeeKind::Tdx) {
        rows.extend(bench_tdx(&vectors, secs)?);
    }
    if run(TeeKind::Nitro) {
        rows.extend(bench_nitro(&vectors, secs)?);
    }
    if run(TeeKind::Tpm) {
        rows.extend(bench_tpm(&vectors, secs)?);
    }
    print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Measurement.

/// This thread's time on a CPU, from the scheduler (`/proc/<tid>/schedstat`, first field, ns).
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[derive(Clone)]
struct Rate {
    iterations: u64,
    wall: Duration,
    cpu: Option<Duration>,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.iterations as f64 / self.wall.as_secs_f64()
    }
    fn wall_us(&self) -> f64 {
        self.wall.as_secs_f64() * 1e6 / self.iterations as f64
    }
    fn cpu_us(&self) -> Option<f64> {
        self.cpu
            .map(|c| c.as_secs_f64() * 1e6 / self.iterations as f64)
    }
}

/// Runs `f` for `WARMUP`, then for `secs` seconds, checking every call with `ok`.
fn measure<T>(secs: f64, mut f: impl FnMut() -> T, ok: impl Fn(&T) -> bool) -> Result<Rate> {
    let warm_end = Instant::now() + WARMUP;
    while Instant::now() < warm_end {
        let r = f();
        if !ok(&r) {
            bail!("warm-up call failed");
        }
        black_box(r);
    }
    let budget = Duration::from_secs_f64(secs);
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let mut iterations = 0u64;
    loop {
        let r = f();
        iterations += 1;
        if !ok(&r) {
            bail!("call {iterations} failed");
        }
        black_box(r);
        // Checking the clock costs ~25 ns; every call is tens of µs or more.
        if t0.elapsed() >= budget {
            break;
        }
    }
    let wall = t0.elapsed();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Ok(Rate {
        iterations,
        wall,
        cpu,
    })
}

struct Row {
    name: String,
    verify: Rate,
    new: Option<Rate>,
}

fn row(name: &str, verify: Rate, new: Option<Rate>) -> Row {
    let r = Row {
        name: name.to_string(),
        verify,
        new,
    };
    eprintln!(
        "  {:<44} {:>9.0} /s  {:>9.1} µs  cpu {:>9} µs  new() {:>9} µs",
        r.name,
        r.verify.per_second(),
        r.verify.wall_us(),
        fmt_opt(r.verify.cpu_us()),
        fmt_opt(r.new.as_ref().map(Rate::wall_us)),
    );
    r
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

fn print_table(rows: &[Row]) {
    println!(
        "| TEE / evidence | verifications/s | µs per verification | CPU µs per verification | iterations | µs for new() | CPU µs for new() | new() / verify |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let ratio = r
            .new
            .as_ref()
            .map(|n| format!("{:.2}", n.wall_us() / r.verify.wall_us()));
        println!(
            "| {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
            r.name,
            r.verify.per_second(),
            r.verify.wall_us(),
            fmt_opt(r.verify.cpu_us()),
            r.verify.iterations,
            fmt_opt(r.new.as_ref().map(Rate::wall_us)),
            fmt_opt(r.new.as_ref().and_then(Rate::cpu_us)),
            ratio.unwrap_or_else(|| "-".into()),
        );
    }
}

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cores} CPUs, model name {model:?}; loadavg at start {}",
        load.trim()
    );
}

fn read(dir: &Path, rel: &str) -> Result<Vec<u8>> {
    std::fs::read(dir.join(rel)).with_context(|| format!("reading {}", dir.join(rel).display()))
}

// ---------------------------------------------------------------------------------------------
// SEV-SNP.

/// The samples' TCB (3/0/8/115) is below the default Milan floor: the floor is set to exactly it.
fn snp_policy() -> SnpPolicy {
    SnpPolicy {
        min_tcb: SnpTcbFloors {
            milan: Some(SnpTcbFloor {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: 0,
            }),
            genoa: None,
            turin: None,
        },
        ..SnpPolicy::default()
    }
}

fn bench_snp(vectors: &Path, secs: f64) -> Result<Vec<Row>> {
    let dir = vectors.join("snp");
    let s1 = snp::bundle_from_inputs(
        &read(&dir, "trustee-milan-vcek/test-report.bin")?,
        &[read(&dir, "trustee-milan-vcek/test-vcek.der")?],
        None,
    )?;
    let s4 = snp::bundle_from_inputs(
        &read(&dir, "virtee-sev/report_milan.hex")?,
        &[
            read(&dir, "virtee-sev/vcek_milan.der")?,
            read(&dir, "virtee-sev/cert_chain_milan")?,
        ],
        None,
    )?;
    let new = measure(NEW_SECS, || SnpVerifier::new(snp_policy()), Result::is_ok)?;
    let v = SnpVerifier::new(snp_policy())?;
    let mut rows = Vec::new();
    for (name, bundle) in [
        ("SNP S1 (Milan, VCEK only)", &s1),
        ("SNP S4 (Milan, VCEK + ASK/ARK in bundle)", &s4),
    ] {
        let parsed = snp::Bundle::parse(bundle)?;
        let rd: [u8; 64] = parsed.report[0x50..0x90].try_into()?;
        let verify = measure(
            secs,
            || v.verify(black_box(bundle), &rd, SNP_NOW_MS),
            |r| r.as_ref().is_ok_and(|a| a.claims().tee == TeeKind::Snp),
        )?;
        rows.push(row(name, verify, Some(new.clone())));
    }
    // Breakdown: the VCEK ← ASK chain check alone (RSA-PSS-SHA384, 4096-bit ASK key), the part a
    // cache of verified VCEKs would skip.
    let parsed = snp::Bundle::parse(&s1)?;
    let chain_only = measure(
        secs,
        || v.verify_endorsement_key(black_box(&parsed.vek), &parsed.chain, SNP_NOW_MS),
        Result::is_ok,
    )?;
    rows.push(row(
        "  of which: SNP VCEK chain only (S1)",
        chain_only,
        None,
    ));
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// TDX.

fn bench_tdx(vectors: &Path, secs: f64) -> Result<Vec<Row>> {
    let quote = read(vectors, "tdx/dcap-qvl/tdx_quote")?;
    let collateral = read(vectors, "tdx/dcap-qvl/tdx_quote_collateral.json")?;
    let bundle = tdx::bundle_from_inputs(&quote, &[], Some(&collateral))?;
    // v4: 48-byte header, REPORTDATA at 520..584 of the TD report body.
    let rd: [u8; 64] = quote[48 + 520..48 + 584].try_into()?;
    let new = measure(
        NEW_SECS,
        || TdxVerifier::new(TdxPolicy::default()),
        Result::is_ok,
    )?;
    let v = TdxVerifier::new(TdxPolicy::default())?;
    let verify = measure(
        secs,
        || v.verify(black_box(&bundle), &rd, TDX_NOW_MS),
        |r| {
            r.as_ref().is_ok_and(|a| {
                a.claims().details.get("tcb_status").map(String::as_str) == Some("UpToDate")
            })
        },
    )?;
    let mut rows = vec![row("TDX T1 (v4 quote + collateral)", verify, Some(new))];
    // Breakdown proxy: tokenizing the bundle JSON (quote + TCB info + QE identity + CRLs + PCK
    // CRL chain as text), without the hex/base64 decoding and DER parsing that follow.
    let json = measure(
        secs.min(1.0),
        || serde_json::from_slice::<serde_json::Value>(black_box(&bundle)),
        Result::is_ok,
    )?;
    rows.push(row(
        &format!("  of which: TDX bundle JSON parse ({} B)", bundle.len()),
        json,
        None,
    ));
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Nitro.

fn cbor_field<'a>(map: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

fn bench_nitro(vectors: &Path, secs: f64) -> Result<Vec<Row>> {
    let stored = read(vectors, "nitro/blocky-nitrite/nitro_attestation.b64")?;
    let bundle = nitro::bundle_from_inputs(&stored, &[], None)?;
    // The document's own timestamp, nonce and public key, decoded here independently.
    let Value::Array(items) = ciborium::de::from_reader::<Value, _>(bundle.as_slice())? else {
        bail!("N1 is not a COSE_Sign1 array");
    };
    let Some(Value::Bytes(payload)) = items.get(2) else {
        bail!("N1 has no payload");
    };
    let Value::Map(payload) = ciborium::de::from_reader::<Value, _>(payload.as_slice())? else {
        bail!("N1 payload is not a map");
    };
    let field = |name: &str| -> Result<Vec<u8>> {
        cbor_field(&payload, name)
            .and_then(Value::as_bytes)
            .cloned()
            .with_context(|| format!("N1 {name}"))
    };
    let ts = cbor_field(&payload, "timestamp")
        .and_then(Value::as_integer)
        .and_then(|i| u64::try_from(i).ok())
        .context("N1 timestamp")?;
    let rd = nitro::report_data_for_fields(&field("nonce")?, &field("public_key")?);
    // Third-party documents carry 1024-byte nonce/public_key, not the protocol's 32 bytes.
    let policy = || NitroPolicy {
        require_protocol_field_sizes: false,
        ..NitroPolicy::default()
    };
    let new = measure(NEW_SECS, || NitroVerifier::new(policy()), Result::is_ok)?;
    let v = NitroVerifier::new(policy())?;
    let verify = measure(
        secs,
        || v.verify(black_box(&bundle), &rd, ts),
        |r| r.as_ref().is_ok_and(|a| a.claims().tee == TeeKind::Nitro),
    )?;
    Ok(vec![row(
        &format!("Nitro N1 (COSE ES384, {} B)", bundle.len()),
        verify,
        Some(new),
    )])
}

// ---------------------------------------------------------------------------------------------
// TPM.

fn bench_tpm(vectors: &Path, secs: f64) -> Result<Vec<Row>> {
    let p2 = tpm::bundle_from_inputs(
        &read(vectors, "tpm/gce-go-tpm-tools/gce-cos-85-nonce9009.pb")?,
        &[],
        None,
    )?;
    let new = measure(
        NEW_SECS,
        || TpmVerifier::new(TpmPolicy::default()),
        Result::is_ok,
    )?;
    let v = TpmVerifier::new(TpmPolicy::default())?;
    let verify = measure(
        secs,
        || v.verify_with_nonce(black_box(&p2), GCE_NONCE, TPM_NOW_MS),
        |r| r.as_ref().is_ok_and(|c| c.tee == TeeKind::Tpm),
    )?;
    let mut rows = vec![row(
        "TPM P2 (GCE vTPM, AK cert chain, 3 quotes)",
        verify,
        Some(new),
    )];

    let p1 = tpm::bundle_from_inputs(&read(vectors, "tpm/trustee/tpm_evidence.json")?, &[], None)?;
    if tpm::ak_fingerprint(&p1)? != P1_AK {
        bail!("P1's AK is not the expected one");
    }
    let rd: [u8; 64] = hex::decode(P1_EXTRA_DATA)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("P1 extraData length"))?;
    let pinned = || TpmPolicy {
        pinned_aks: vec![P1_AK.to_string()],
        ..TpmPolicy::default()
    };
    let new = measure(NEW_SECS, || TpmVerifier::new(pinned()), Result::is_ok)?;
    let v = TpmVerifier::new(pinned())?;
    let verify = measure(
        secs,
        || v.verify(black_box(&p1), &rd, TPM_NOW_MS),
        |r| {
            r.as_ref().is_ok_and(|a| {
                a.claims().details.get("ak_trust").map(String::as_str) == Some("pinned")
            })
        },
    )?;
    rows.push(row("TPM P1 (swtpm, AK pinned)", verify, Some(new)));
    Ok(rows)
}
