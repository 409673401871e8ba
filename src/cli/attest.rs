//! `weightvault attest verify|sim-evidence`: check evidence offline with the same verifiers the
//! server uses, and make sim evidence for tests and demos.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::attest::TeeKind;
use crate::attest::sim::{SimReport, SimSigner};
use crate::config::Config;
use crate::config::dev::{self, files};
use crate::time::{Clock, SystemClock};

#[derive(Subcommand)]
pub enum AttestCmd {
    /// Verify evidence offline; prints the verified claims as JSON (exit 0) or the reason (exit 1).
    Verify {
        /// TEE kind: sim, snp, tdx, nitro, tpm (az-snp-vtpm, az-tdx-vtpm: not yet).
        #[arg(long)]
        tee: String,
        /// Evidence file: the report, quote or document as stored (raw binary, hex or base64
        /// text, the JSON wrappers of common tools) or a vault evidence bundle.
        #[arg(long, value_name = "FILE")]
        evidence: PathBuf,
        /// Certificates that come with the evidence (VCEK, AK certificate, ...); repeatable.
        #[arg(long = "certs", value_name = "FILE")]
        certs: Vec<PathBuf>,
        /// Collateral for TDX (TCB info, QE identity, CRLs) as JSON.
        #[arg(long, value_name = "FILE")]
        collateral: Option<PathBuf>,
        /// Expected report data, 64 bytes hex: SHA-512("weightvault/attest/v1" || nonce ||
        /// node key) for vault evidence, or the value a sample carries.
        #[arg(long, value_name = "HEX", required_unless_present = "nonce")]
        report_data: Option<String>,
        /// TPM and Azure vTPM: check that the quote carries exactly this nonce (hex) instead of vault
        /// report data, as third-party samples do. The node key is then not bound.
        #[arg(long, value_name = "HEX", conflicts_with = "report_data")]
        nonce: Option<String>,
        /// Trusted sim key (Ed25519 public key, hex); repeatable. Default: from --config, or
        /// the dev data directory's config.
        #[arg(long, value_name = "HEX")]
        trusted_key: Vec<String>,
        /// Vault config: verifier policies ([attest.<tee>.policy]) and sim keys. Without it the
        /// strict default policy of each TEE applies.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Verification time, RFC 3339 (for example 2024-09-07T14:37:40Z) [default: now].
        #[arg(long, value_name = "RFC3339", conflicts_with = "time_ms")]
        at: Option<String>,
        /// Verification time, ms since the Unix epoch.
        #[arg(long, value_name = "MS")]
        time_ms: Option<u64>,
        /// Print {"ok":…,"claims":…} or {"ok":false,"reason":…} as JSON.
        #[arg(long)]
        json: bool,
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
            certs,
            collateral,
            report_data,
            nonce,
            trusted_key,
            config,
            at,
            time_ms,
            json,
        } => {
            let tee: TeeKind = tee.parse()?;
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let ev = read(&evidence)?;
            let extra = certs.iter().map(read).collect::<anyhow::Result<Vec<_>>>()?;
            let collateral = collateral.as_ref().map(read).transpose()?;
            let mut attest_cfg = match &config {
                Some(p) => Config::load(p)?.attest,
                None => Config::load(&dev::default_data_dir().join(dev::CONFIG_FILE))
                    .map(|c| c.attest)
                    .unwrap_or_default(),
            };
            if !trusted_key.is_empty() {
                for k in &trusted_key {
                    if hex::decode(k)
                        .ok()
                        .and_then(|v| <[u8; 32]>::try_from(v).ok())
                        .is_none()
                    {
                        anyhow::bail!("--trusted-key {k:?} is not a 32-byte hex key");
                    }
                }
                attest_cfg.sim.trusted_keys = trusted_key;
            }
            let verifier = attest_cfg.verifier(tee)?;
            let bundle = bundle(tee, &ev, &extra, collateral.as_deref())?;
            let now = match (at, time_ms) {
                (Some(t), _) => parse_rfc3339_ms(&t)?,
                (None, Some(ms)) => ms,
                (None, None) => SystemClock.now_ms(),
            };
            let outcome = match (&report_data, &nonce) {
                (Some(rd), _) => verifier
                    .verify(&bundle, &report_data_arg(rd)?, now)
                    .map(|ok| ok.into_claims()),
                (None, Some(n)) => {
                    let n = hex::decode(n).map_err(|_| anyhow::anyhow!("--nonce must be hex"))?;
                    match tee {
                        TeeKind::Tpm => {
                            crate::attest::tpm::TpmVerifier::new(attest_cfg.tpm.policy.clone())?
                                .verify_with_nonce(&bundle, &n, now)
                        }
                        TeeKind::AzSnpVtpm | TeeKind::AzTdxVtpm => {
                            let policy = if tee == TeeKind::AzSnpVtpm {
                                attest_cfg.az_snp_vtpm.policy.clone()
                            } else {
                                attest_cfg.az_tdx_vtpm.policy.clone()
                            };
                            crate::attest::azure::AzureVtpmVerifier::new(tee, policy)?
                                .verify_with_nonce(&bundle, &n, now)
                        }
                        _ => anyhow::bail!(
                            "--nonce is for tpm and Azure vTPM evidence; other TEEs need --report-data"
                        ),
                    }
                }
                (None, None) => anyhow::bail!("give --report-data or --nonce"),
            };
            match outcome {
                Ok(claims) => {
                    if json {
                        println!("{{\"ok\":true,\"claims\":{}}}", claims.to_json());
                    } else {
                        println!("{}", claims.to_json());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "reason": e.short_reason(), "detail": e.to_string()})
                        );
                    } else {
                        eprintln!("evidence rejected: {e}");
                    }
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

/// The vault's evidence bundle for `tee` from files as they are stored.
pub fn bundle(
    tee: TeeKind,
    evidence: &[u8],
    extra: &[Vec<u8>],
    collateral: Option<&[u8]>,
) -> anyhow::Result<Vec<u8>> {
    use crate::attest::{nitro, snp, tdx, tpm};
    Ok(match tee {
        TeeKind::Sim => evidence.to_vec(),
        TeeKind::Snp => snp::bundle_from_inputs(evidence, extra, collateral)?,
        TeeKind::Tdx => tdx::bundle_from_inputs(evidence, extra, collateral)?,
        TeeKind::Nitro => nitro::bundle_from_inputs(evidence, extra, collateral)?,
        TeeKind::Tpm => tpm::bundle_from_inputs(evidence, extra, collateral)?,
        TeeKind::AzSnpVtpm | TeeKind::AzTdxVtpm => {
            crate::attest::azure::bundle_from_inputs(evidence, extra, collateral)?
        }
    })
}

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp (`Z` or `±hh:mm` offset,
/// optional fraction).
pub fn parse_rfc3339_ms(s: &str) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("{s:?} is not an RFC 3339 time like 2024-09-07T14:37:40Z");
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> anyhow::Result<i64> {
        s.get(r)
            .filter(|d| d.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return Err(bad());
        }
        ms = format!("{:0<3}", &digits[..digits.len().min(3)])
            .parse()
            .map_err(|_| bad())?;
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (num(s.len() - 5..s.len() - 3)? * 60 + num(s.len() - 2..s.len())?)
        }
        _ => return Err(bad()),
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339_ms;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339_ms("2024-09-07T14:37:39.545Z").unwrap(),
            1_725_719_859_545
        );
        assert_eq!(
            parse_rfc3339_ms("2024-09-07T16:37:39.545+02:00").unwrap(),
            1_725_719_859_545
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T12:00:00Z").unwrap(),
            951_825_600_000
        );
        for bad in [
            "2024-09-07",
            "2024-13-01T00:00:00Z",
            "2024-09-07T14:37:39",
            "x",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }
}
