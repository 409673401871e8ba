//! `weightvault node fetch`: the whole boot protocol from the command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::ConnArgs;
use crate::client::collect::{self as collectors, CollectOptions};
use crate::client::node::{
    Attester, DirSink, FetchOptions, NodeClient, SimAttester, parse_model_ref,
};
use crate::config::dev::{self, files};

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Attest, get a grant, stream and decrypt a model version into a directory.
    ///
    /// Files are written to a staging directory inside --out and moved into place only when
    /// every file decrypted; a refused or failed fetch writes nothing. Put --out on tmpfs to keep
    /// plaintext off disk.
    Fetch {
        /// NAME or NAME@VERSION (default: the latest version).
        model: String,
        /// Directory to write the files into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// TEE to attest with: sim, snp, tdx, nitro, tpm, az-snp-vtpm or az-tdx-vtpm (hardware
        /// evidence is collected from the devices below; see docs/attestation.md).
        #[arg(long)]
        tee: String,
        /// Measurement the sim TEE reports (hex).
        #[arg(long, value_name = "HEX", required_if_eq("tee", "sim"))]
        sim_measurement: Option<String>,
        /// Sim TEE signing key (PKCS#8) [default: sim-tee.key of the dev data directory].
        #[arg(long, value_name = "FILE")]
        sim_key: Option<PathBuf>,
        /// Dev data directory to find the sim key in [default: ~/.local/share/weightvault/dev].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Instance id the sim TEE reports.
        #[arg(long, default_value = "sim-node")]
        instance_id: String,
        /// Also check every file's SHA-256 against the signed manifest (a SHA-256 pass over
        /// the plaintext; off by default). Needs a version pushed with `model push --digest`;
        /// a version without recorded digests is refused before anything is fetched.
        #[arg(long)]
        verify_digest: bool,
        /// Streams at once: files, and chunk ranges of large files, fetched in parallel.
        #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        parallel: u16,
        /// Require the vault's manifest signing key (Ed25519 public key, hex) instead of
        /// accepting the one the vault sends.
        #[arg(long, value_name = "HEX")]
        manifest_key: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        collect: CollectArgs,
    },
}

pub async fn run(cmd: NodeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCmd::Fetch {
            model,
            out,
            tee,
            sim_measurement,
            sim_key,
            data_dir,
            instance_id,
            verify_digest,
            parallel,
            manifest_key,
            conn,
            collect,
        } => {
            let manifest_key = manifest_key
                .map(|k| {
                    hex::decode(&k)
                        .ok()
                        .and_then(|v| <[u8; 32]>::try_from(v).ok())
                        .ok_or_else(|| anyhow::anyhow!("--manifest-key must be 32 bytes of hex"))
                })
                .transpose()?;
            let (name, version) = parse_model_ref(&model)?;
            let attester: Box<dyn Attester> = match tee.as_str() {
                "sim" => {
                    let key_path = sim_key.unwrap_or_else(|| {
                        data_dir
                            .unwrap_or_else(dev::default_data_dir)
                            .join(files::SIM_KEY)
                    });
                    let pkcs8 =
                        zeroize::Zeroizing::new(std::fs::read(&key_path).with_context(|| {
                            format!("reading the sim TEE key {}", key_path.display())
                        })?);
                    let m = sim_measurement.expect("clap requires it for sim");
                    Box::new(SimAttester::new(&pkcs8, &m, &instance_id)?)
                }
                other => match other.parse::<crate::attest::TeeKind>() {
                    Ok(t) => collect.attester(t)?,
                    Err(_) => anyhow::bail!(
                        "unknown --tee {other:?} (sim, snp, tdx, nitro, tpm, az-snp-vtpm, az-tdx-vtpm)"
                    ),
                },
            };
            let mut client = NodeClient::new(conn.endpoint(false)?.connect().await?);
            let bar = if std::io::stderr().is_terminal() {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                b.set_message(format!("fetching {name}"));
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut sink = DirSink::new(&out);
            let opts = FetchOptions {
                version,
                verify_digest,
                manifest_key,
                parallel: usize::from(parallel),
                ..FetchOptions::default()
            };
            let b = bar.clone();
            let r = client
                .fetch(
                    &name,
                    &opts,
                    attester.as_ref(),
                    &mut sink,
                    &mut |total, done| {
                        b.set_length(total);
                        b.set_position(done);
                    },
                )
                .await;
            bar.finish_and_clear();
            let r = r?;
            println!(
                "fetched {}@{}: {} files, {} bytes into {} (grant {})",
                r.model,
                r.version,
                r.files,
                r.bytes,
                out.display(),
                r.grant_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where hardware evidence comes from (`node fetch --tee snp|tdx|nitro|tpm|az-*`). Defaults are
/// the real devices; tests point them at fakes.
#[derive(clap::Args, Clone, Debug)]
pub struct CollectArgs {
    /// configfs-tsm report directory (snp, tdx).
    #[arg(long, value_name = "DIR", default_value = collectors::DEFAULT_TSM_REPORT_DIR)]
    tsm_dir: PathBuf,
    /// SEV-SNP VMPL to request the report for, 0-3 (the vault accepts 0) [default: the
    /// kernel's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=3))]
    privlevel: Option<u8>,
    /// Nitro Secure Module device (nitro).
    #[arg(long, value_name = "PATH", default_value = collectors::DEFAULT_NSM_DEVICE)]
    nsm_device: PathBuf,
    /// TPM device (tpm, az-snp-vtpm, az-tdx-vtpm).
    #[arg(long, value_name = "PATH", default_value = collectors::DEFAULT_TPM_DEVICE)]
    tpm_device: PathBuf,
    /// Persistent handle of the attestation key, hex (required for tpm) [default for az-*:
    /// 0x81000003, the Azure paravisor's AK].
    #[arg(long, value_name = "HEX", value_parser = parse_handle)]
    ak_handle: Option<u32>,
    /// AK certificate, then its intermediates (DER or PEM; repeatable) (tpm).
    #[arg(long = "ak-cert", value_name = "FILE")]
    ak_certs: Vec<PathBuf>,
    /// SHA-256 PCRs to quote, comma-separated (tpm, az-*).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "0,1,2,3,4,5,6,7"
    )]
    pcrs: Vec<u8>,
    /// VCEK/VLEK and optionally ASK/ARK (DER or PEM; repeatable): snp when the host supplies no
    /// certificates, and az-snp-vtpm.
    #[arg(long, value_name = "FILE")]
    certs: Vec<PathBuf>,
    /// DCAP collateral of this platform, dcap-qvl JSON (tdx, az-tdx-vtpm).
    #[arg(long, value_name = "FILE")]
    collateral: Option<PathBuf>,
    /// TD quote of the HCL report from Azure's quoting service (az-tdx-vtpm).
    #[arg(long, value_name = "FILE")]
    td_quote: Option<PathBuf>,
}

fn parse_handle(s: &str) -> Result<u32, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(digits, 16).map_err(|_| format!("{s:?} is not a hex TPM handle"))
}

impl CollectArgs {
    fn attester(&self, tee: crate::attest::TeeKind) -> anyhow::Result<Box<dyn Attester>> {
        let opts = CollectOptions {
            tsm_dir: self.tsm_dir.clone(),
            privlevel: self.privlevel,
            nsm_device: self.nsm_device.clone(),
            tpm_device: self.tpm_device.clone(),
            ak_handle: self.ak_handle,
            ak_certs: self.ak_certs.clone(),
            pcrs: self.pcrs.clone(),
            certs: self.certs.clone(),
            collateral: self.collateral.clone(),
            td_quote: self.td_quote.clone(),
        };
        Ok(collectors::attester(tee, &opts)?)
    }
}
