//! `weightvault attest verify|sim-evidence`: check evidence offline with the same verifiers the
//! server uses, and make sim evidence for tests and demos.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::attest::sim::{DEFAULT_MAX_AGE_MS, SimReport, SimSigner, SimVerifier};
use crate::attest::{TeeKind, Verifier};
use crate::config::Config;
use crate::config::dev::{self, files};
use crate::time::{Clock, SystemClock};

#[derive(Subcommand)]
pub enum AttestCmd {
    /// Verify evidence offline; prints the verified claims as JSON (exit 0) or the reason (exit 1).
    Verify {
        /// TEE kind: sim.
        #[arg(long)]
        tee: String,
        /// Evidence file.
        #[arg(long, value_name = "FILE")]
        evidence: PathBuf,
        /// Expected report data, 64 bytes hex (SHA-512 binding of nonce and node key).
        #[arg(long, value_name = "HEX")]
        report_data: String,
        /// Trusted sim key (Ed25519 public key, hex); repeatable. Default: from --config, or
        /// the dev data directory's config.
        #[arg(long, value_name = "HEX")]
        trusted_key: Vec<String>,
        /// Vault config to take trusted keys from.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Verification time, ms since the Unix epoch [default: now].
        #[arg(long, value_name = "MS")]
        time_ms: Option<u64>,
    },
    /// Produce sim evidence (development TEE) for the given report data.
    SimEvidence {
        /// Measurement to report (hex).
        #[arg(long, value_name = "HEX")]
        measurement: String,
        /// Report data, 64 bytes hex.
        #[arg(long, value_name = "HEX")]
        report_data: String,
        /// Sim TEE key (PKCS#8) [default: sim-tee.key of the dev data directory].
        #[arg(long, value_name = "FILE")]
        sim_key: Option<PathBuf>,
        #[arg(long, default_value = "sim-node")]
        instance_id: String,
        /// Mark the evidence as produced by a debug-mode TEE (for negative tests).
        #[arg(long)]
        debug: bool,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn report_data_arg(s: &str) -> anyhow::Result<[u8; 64]> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("--report-data must be 64 bytes of hex (128 hex digits)"))
}

pub async fn run(cmd: AttestCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AttestCmd::Verify {
            tee,
            evidence,
            report_data,
            trusted_key,
            config,
            time_ms,
        } => {
            let tee: TeeKind = tee.parse()?;
            let rd = report_data_arg(&report_data)?;
            let ev = std::fs::read(&evidence)
                .with_context(|| format!("reading evidence {}", evidence.display()))?;
            let verifier: Box<dyn Verifier> = match tee {
                TeeKind::Sim => {
                    let mut max_age_ms = DEFAULT_MAX_AGE_MS;
                    let keys: Vec<[u8; 32]> = if !trusted_key.is_empty() {
                        trusted_key
                            .iter()
                            .map(|k| {
                                hex::decode(k)
                                    .ok()
                                    .and_then(|v| v.try_into().ok())
                                    .ok_or_else(|| {
                                        anyhow::anyhow!(
                                            "--trusted-key {k:?} is not a 32-byte hex key"
                                        )
                                    })
                            })
                            .collect::<anyhow::Result<_>>()?
                    } else {
                        let path = config
                            .unwrap_or_else(|| dev::default_data_dir().join(dev::CONFIG_FILE));
                        let cfg = Config::load(&path)
                            .with_context(|| "no --trusted-key given; tried the vault config")?;
                        max_age_ms = cfg.attest.sim.max_evidence_age_secs.saturating_mul(1000);
                        cfg.sim_trusted_keys()
                    };
                    Box::new(SimVerifier::new(keys, max_age_ms))
                }
                other => anyhow::bail!("no {other} verifier in this build yet"),
            };
            let now = time_ms.unwrap_or_else(|| SystemClock.now_ms());
            match verifier.verify(&ev, &rd, now) {
                Ok(ok) => {
                    println!("{}", ok.claims().to_json());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("evidence rejected: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AttestCmd::SimEvidence {
            measurement,
            report_data,
            sim_key,
            instance_id,
            debug,
            out,
        } => {
            let rd = report_data_arg(&report_data)?;
            let key_path = sim_key.unwrap_or_else(|| dev::default_data_dir().join(files::SIM_KEY));
            let pkcs8 = zeroize::Zeroizing::new(
                std::fs::read(&key_path)
                    .with_context(|| format!("reading the sim TEE key {}", key_path.display()))?,
            );
            let signer = SimSigner::from_pkcs8(&pkcs8)?;
            let ev = signer.sign(&SimReport {
                measurement: measurement.to_ascii_lowercase(),
                report_data: hex::encode(rd),
                instance_id,
                debug,
                issued_ms: SystemClock.now_ms(),
            });
            std::fs::write(&out, ev).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote sim evidence to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
