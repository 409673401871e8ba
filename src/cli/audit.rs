//! `weightvault audit entries|checkpoint|verify|export|proof|check-proof|tail` (auditor).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use super::ConnArgs;
use crate::attest::{TeeKind, Verifier, report_data};
use crate::audit::checkpoint::{Checkpoint, open_checkpoint};
use crate::audit::entry::{Action, AuditEntry, Decision};
use crate::audit::merkle::{self, Hash};
use crate::audit::note::NoteVerifier;
use crate::audit::proof::TlogProof;
use crate::audit::replay::{self, Report};
use crate::client::ClientError;
use crate::client::audit::AuditClient;
use crate::config::Config;
use crate::config::dev;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print log entries as JSON lines (`{"index":N,"entry":{...}}`), in log order.
    Entries {
        /// First index.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// End index, exclusive (default: the current end of the log).
        #[arg(long)]
        end: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Follow the log: print entries from --start, then each new one as it becomes durable.
    Tail {
        /// First index [default: the current end of the log].
        #[arg(long)]
        start: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the latest signed checkpoint (C2SP tlog-checkpoint signed note).
    Checkpoint {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Verify the log from the vault or an export: signature, root, consistency with the last
    /// trusted checkpoint, semantics, stored evidence. Exit 0 only if everything passes.
    Verify {
        /// Verify an export file (`audit export`) instead of asking the vault.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Trusted-checkpoint file: read if present (rollback and fork detection, pinned log
        /// key) and replaced atomically after a successful verification.
        #[arg(long, value_name = "FILE")]
        trusted: Option<PathBuf>,
        /// Pin the log's verifier key (C2SP vkey) instead of trusting the one offered.
        #[arg(long, value_name = "VKEY")]
        log_key: Option<String>,
        /// Trusted sim TEE key (hex) for re-verifying sim evidence; repeatable. Default: from
        /// --config or the dev data directory's config.
        #[arg(long, value_name = "HEX")]
        sim_trusted_key: Vec<String>,
        /// Vault config to take verifier trust anchors from.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Do not re-verify stored evidence (the report says so).
        #[arg(long)]
        skip_evidence: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write entries, leaf hashes, the signed checkpoint and stored evidence to one file.
    Export {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a C2SP tlog-proof@v1 inclusion proof of entry INDEX (the entry in its extra line).
    Proof {
        #[arg(long)]
        index: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Check a tlog-proof offline against the log's verifier key.
    CheckProof {
        #[arg(long, value_name = "FILE")]
        proof: PathBuf,
        /// The log's verifier key (C2SP vkey).
        #[arg(long, value_name = "VKEY")]
        log_key: String,
    },
}

/// The export file (docs/audit-log.md).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub format: String,
    pub verifier_key: String,
    pub checkpoint: String,
    /// Entries from index 0, base64 of the stored bytes.
    pub entries: Vec<String>,
    /// SHA-256(0x00 || entry) of each entry, hex.
    pub leaf_hashes: Vec<String>,
    /// Evidence by SHA-256 (hex), base64.
    pub evidence: HashMap<String, String>,
}

pub const EXPORT_FORMAT: &str = "weightvault-audit-export/v1";

/// The trusted-checkpoint file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trusted {
    verifier_key: String,
    checkpoint: String,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

async fn collect_entries(client: &mut AuditClient, end: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut entries = Vec::new();
    client
        .entries(0, end, |_, e| {
            entries.push(e.to_vec());
            Ok(())
        })
        .await?;
    Ok(entries)
}

/// The attest entries whose evidence a replay re-verifies: evidence hash → entry index.
fn evidence_needed(entries: &[Vec<u8>]) -> Vec<[u8; 32]> {
    entries
        .iter()
        .filter_map(|b| AuditEntry::decode(b).ok())
        .filter(|e| e.action == Action::Attest && e.decision == Decision::Allow)
        .filter_map(|e| hex::decode(e.evidence_sha256?).ok()?.try_into().ok())
        .collect()
}

/// The verifier policies and sim keys: from an explicit --config (which must load), else the
/// dev data directory's config when there is one, with --sim-trusted-key overriding the keys.
fn verifier_config(
    explicit: &[String],
    config: Option<&Path>,
) -> anyhow::Result<crate::config::AttestConfig> {
    let mut cfg = match config {
        Some(p) => {
            Config::load(p)
                .with_context(|| format!("--config {}", p.display()))?
                .attest
        }
        None => Config::load(&dev::default_data_dir().join(dev::CONFIG_FILE))
            .map(|c| c.attest)
            .unwrap_or_default(),
    };
    if !explicit.is_empty() {
        for k in explicit {
            if hex::decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .is_none()
            {
                bail!("--sim-trusted-key {k:?} is not a 32-byte hex key");
            }
        }
        cfg.sim.trusted_keys = explicit.to_vec();
    }
    Ok(cfg)
}

/// Re-verifies one attest entry's stored evidence with the verifier of its TEE, at the time the
/// entry was written, against the report data its nonce and node key imply.
fn reverify(
    e: &AuditEntry,
    evidence: &HashMap<[u8; 32], Vec<u8>>,
    verifiers: &HashMap<TeeKind, Result<Box<dyn Verifier>, String>>,
) -> Result<(), String> {
    let sha: [u8; 32] = e
        .evidence_sha256
        .as_deref()
        .and_then(|h| hex::decode(h).ok()?.try_into().ok())
        .ok_or("hash missing from the entry")?;
    let ev = evidence.get(&sha).ok_or("not stored")?;
    if merkle_free_sha256(ev) != sha {
        return Err("does not match its hash".into());
    }
    let nonce: [u8; 32] = e
        .nonce
        .as_deref()
        .and_then(|h| hex::decode(h).ok()?.try_into().ok())
        .ok_or("nonce missing from the entry")?;
    let key: [u8; 32] = e
        .node_key
        .as_deref()
        .and_then(|h| hex::decode(h).ok()?.try_into().ok())
        .ok_or("node key missing from the entry")?;
    let tee: TeeKind = e
        .tee
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|err: crate::attest::AttestError| err.to_string())?;
    let verifier: &dyn Verifier = match verifiers.get(&tee) {
        Some(Ok(v)) => v.as_ref(),
        Some(Err(why)) => return Err(format!("cannot be re-verified: {why}")),
        None => return Err(format!("cannot be re-verified: no {tee} verifier")),
    };
    if tee == TeeKind::Sim && !e.simulated.unwrap_or(false) {
        return Err("names the sim TEE but is not marked simulated".into());
    }
    let claims = verifier
        .verify(ev, &report_data(&nonce, &key), e.time_ms)
        .map_err(|err| format!("no longer verifies: {err}"))?
        .into_claims();
    if Some(&claims.measurement) != e.measurement.as_ref() {
        return Err("verifies with another measurement than the entry records".into());
    }
    Ok(())
}

fn merkle_free_sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref());
    out
}

fn print_report(r: &Report, json: bool, skipped_evidence: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serializes"));
        return;
    }
    if r.ok {
        println!(
            "OK: {} entries verified against checkpoint size {} root {}",
            r.entries_checked, r.checkpoint_size, r.checkpoint_root
        );
        println!(
            "  {} grants, {} fetches, {} attestations re-verified{}",
            r.grants,
            r.fetches,
            r.attestations_reverified,
            if skipped_evidence {
                " (evidence re-verification skipped)"
            } else {
                ""
            }
        );
    } else {
        println!("FAILED: {} problem(s)", r.findings.len());
        for f in &r.findings {
            match f.index {
                Some(_) | None => println!("  [{:?}] {}", f.kind, f.detail),
            }
        }
    }
}

pub async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Entries { start, end, conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            client
                .entries(start, end.unwrap_or(0), |index, entry| {
                    json_line(&mut out, index, entry)
                })
                .await?;
            out.flush()?;
        }
        AuditCmd::Tail { start, conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let start = match start {
                Some(s) => s,
                None => client.checkpoint().await?.size,
            };
            let stdout = std::io::stdout();
            client
                .tail(start, |index, entry| {
                    let mut out = stdout.lock();
                    json_line(&mut out, index, entry)?;
                    out.flush()
                        .map_err(|e| ClientError::Protocol(e.to_string()))
                })
                .await?;
        }
        AuditCmd::Checkpoint { conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let cp = client.checkpoint().await?;
            print!("{}", cp.note);
            eprintln!("log key: {}", cp.verifier_key);
        }
        AuditCmd::Export { out, conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let cp = client.checkpoint().await?;
            let entries = collect_entries(&mut client, cp.size).await?;
            let mut evidence = HashMap::new();
            for sha in evidence_needed(&entries) {
                match client.evidence(&sha).await {
                    Ok(ev) => {
                        evidence.insert(hex::encode(sha), STANDARD.encode(ev));
                    }
                    Err(e) => eprintln!("warning: evidence {} not exported: {e}", hex::encode(sha)),
                }
            }
            let export = Export {
                format: EXPORT_FORMAT.into(),
                verifier_key: cp.verifier_key,
                checkpoint: cp.note,
                leaf_hashes: entries
                    .iter()
                    .map(|e| hex::encode(merkle::leaf_hash(e)))
                    .collect(),
                entries: entries.iter().map(|e| STANDARD.encode(e)).collect(),
                evidence,
            };
            write_atomic(&out, &serde_json::to_vec(&export)?)?;
            println!(
                "exported {} entries (checkpoint size {}) to {}",
                entries.len(),
                cp.size,
                out.display()
            );
        }
        AuditCmd::Proof { index, conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let cp = client.checkpoint().await?;
            if index >= cp.size {
                bail!(
                    "entry {index} is not covered by the latest checkpoint (size {})",
                    cp.size
                );
            }
            let hashes = client.inclusion_proof(index, cp.size).await?;
            let mut entry = None;
            client
                .entries(index, index + 1, |_, e| {
                    entry = Some(e.to_vec());
                    Ok(())
                })
                .await?;
            let proof = TlogProof {
                extra: entry,
                index,
                hashes,
                checkpoint: cp.note,
            };
            print!("{}", proof.to_text());
            eprintln!("log key: {}", cp.verifier_key);
        }
        AuditCmd::CheckProof { proof, log_key } => {
            let text = std::fs::read_to_string(&proof)
                .with_context(|| format!("reading {}", proof.display()))?;
            let p = TlogProof::parse(&text)?;
            let verifier = NoteVerifier::from_vkey(&log_key)?;
            let cp = open_checkpoint(&p.checkpoint, &[verifier])?;
            let entry = p
                .extra
                .as_deref()
                .context("the proof carries no entry in its extra line")?;
            merkle::verify_inclusion(
                &merkle::leaf_hash(entry),
                p.index,
                cp.size,
                &p.hashes,
                &cp.root,
            )?;
            println!(
                "OK: entry {} is in the log {} of size {} ({})",
                p.index,
                cp.origin,
                cp.size,
                String::from_utf8_lossy(entry)
            );
        }
        AuditCmd::Verify {
            file,
            trusted,
            log_key,
            sim_trusted_key,
            config,
            skip_evidence,
            json,
            conn,
        } => {
            return verify(
                file,
                trusted,
                log_key,
                &sim_trusted_key,
                config,
                skip_evidence,
                json,
                conn,
            )
            .await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn json_line(out: &mut impl Write, index: u64, entry: &[u8]) -> Result<(), ClientError> {
    let text = std::str::from_utf8(entry)
        .map_err(|_| ClientError::Protocol(format!("entry {index} is not UTF-8")))?;
    writeln!(out, "{{\"index\":{index},\"entry\":{text}}}")
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn verify(
    file: Option<PathBuf>,
    trusted_path: Option<PathBuf>,
    log_key: Option<String>,
    sim_trusted_key: &[String],
    config: Option<PathBuf>,
    skip_evidence: bool,
    json: bool,
    conn: ConnArgs,
) -> anyhow::Result<ExitCode> {
    let trusted: Option<Trusted> = match &trusted_path {
        Some(p) if p.exists() => Some(
            serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a trusted-checkpoint file", p.display()))?,
        ),
        _ => None,
    };
    let mut proof_problem = None;
    // What to verify: an export, or the live log.
    let (offered_key, note, entries, recorded, evidence) = match &file {
        Some(f) => {
            let ex: Export = serde_json::from_slice(
                &std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
            )
            .with_context(|| format!("{} is not an audit export", f.display()))?;
            if ex.format != EXPORT_FORMAT {
                bail!("{}: unknown export format {:?}", f.display(), ex.format);
            }
            let entries = ex
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    STANDARD
                        .decode(e)
                        .with_context(|| format!("entry {i} is not base64"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let recorded = ex
                .leaf_hashes
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    hex::decode(h)
                        .ok()
                        .and_then(|v| v.try_into().ok())
                        .with_context(|| format!("leaf hash {i} is malformed"))
                })
                .collect::<anyhow::Result<Vec<Hash>>>()?;
            let mut evidence = HashMap::new();
            for (k, v) in ex.evidence {
                let sha: [u8; 32] = hex::decode(&k)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .with_context(|| format!("evidence key {k} is malformed"))?;
                evidence.insert(
                    sha,
                    STANDARD
                        .decode(v)
                        .with_context(|| format!("evidence {k} is not base64"))?,
                );
            }
            (
                ex.verifier_key,
                ex.checkpoint,
                entries,
                Some(recorded),
                evidence,
            )
        }
        None => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let cp = client.checkpoint().await?;
            let entries = collect_entries(&mut client, cp.size).await?;
            let mut evidence = HashMap::new();
            if !skip_evidence {
                for sha in evidence_needed(&entries) {
                    if let Ok(ev) = client.evidence(&sha).await {
                        evidence.insert(sha, ev);
                    }
                }
            }
            // The vault's own consistency proof must agree with the trusted checkpoint too.
            if let Some(t) = &trusted
                && let Ok(tcp) =
                    Checkpoint::parse(t.checkpoint.split("\n\n").next().unwrap_or_default())
                && tcp.size > 0
                && tcp.size < cp.size
            {
                let proof = client.consistency_proof(tcp.size, cp.size).await?;
                let root: Hash = cp
                    .root
                    .as_slice()
                    .try_into()
                    .context("root is not 32 bytes")?;
                if let Err(e) =
                    merkle::verify_consistency(tcp.size, cp.size, &tcp.root, &root, &proof)
                {
                    proof_problem = Some(format!(
                        "the vault's consistency proof from the trusted size {} to {} does not verify: {e}",
                        tcp.size, cp.size
                    ));
                }
            }
            (cp.verifier_key, cp.note, entries, None, evidence)
        }
    };
    // The log key: pinned by flag, else by the trusted file, else the one offered (first use).
    let vkey = match (&log_key, &trusted) {
        (Some(k), _) => k.clone(),
        (None, Some(t)) => t.verifier_key.clone(),
        (None, None) => {
            if !json {
                eprintln!("note: trusting the log key offered on first use: {offered_key}");
            }
            offered_key.clone()
        }
    };
    let verifier = NoteVerifier::from_vkey(&vkey)?;
    let trusted_cp = match &trusted {
        Some(t) => Some(
            open_checkpoint(&t.checkpoint, std::slice::from_ref(&verifier))
                .context("the trusted checkpoint does not verify with the pinned log key")?,
        ),
        None => None,
    };
    let verifiers: HashMap<TeeKind, Result<Box<dyn Verifier>, String>> = if skip_evidence {
        HashMap::new()
    } else {
        let cfg = verifier_config(sim_trusted_key, config.as_deref())?;
        TeeKind::ALL
            .into_iter()
            .map(|t| {
                let v = match t {
                    TeeKind::Sim if cfg.sim.trusted_keys.is_empty() => {
                        Err("no trusted sim key (--sim-trusted-key or --config)".to_string())
                    }
                    _ => cfg.verifier(t).map_err(|e| e.to_string()),
                };
                (t, v)
            })
            .collect()
    };
    let input = replay::Input {
        entries: &entries,
        recorded_leaf_hashes: recorded.as_deref(),
        checkpoint_note: &note,
        verifier: &verifier,
        trusted: trusted_cp.as_ref(),
    };
    let mut report = replay::replay(&input, &mut |_, e| {
        if skip_evidence {
            Ok(false)
        } else {
            reverify(e, &evidence, &verifiers).map(|()| true)
        }
    });
    if let Some(detail) = proof_problem {
        report.findings.push(replay::Finding {
            kind: replay::FindingKind::Fork,
            index: None,
            detail,
        });
        report.ok = false;
    }
    print_report(&report, json, skip_evidence);
    if !report.ok {
        return Ok(ExitCode::FAILURE);
    }
    if let Some(p) = &trusted_path {
        let t = Trusted {
            verifier_key: vkey,
            checkpoint: note,
        };
        write_atomic(p, &serde_json::to_vec_pretty(&t)?)?;
        if !json {
            println!("trusted checkpoint updated: {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
