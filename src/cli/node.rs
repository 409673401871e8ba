//! `weightvault node fetch`: the whole boot protocol from the command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::ConnArgs;
use crate::client::node::{DirSink, FetchOptions, NodeClient, SimAttester, parse_model_ref};
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
        /// TEE to attest with: sim (hardware evidence collection is not in this version).
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
        /// Also check every file's SHA-256 against the signed manifest.
        #[arg(long)]
        verify_digest: bool,
        /// Require the vault's manifest signing key (Ed25519 public key, hex) instead of
        /// accepting the one the vault sends.
        #[arg(long, value_name = "HEX")]
        manifest_key: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
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
            manifest_key,
            conn,
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
            let attester = match tee.as_str() {
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
                    SimAttester::new(&pkcs8, &m, &instance_id)?
                }
                other => match other.parse::<crate::attest::TeeKind>() {
                    Ok(t) => anyhow::bail!(
                        "collecting {t} evidence on the node (configfs-tsm, /dev/nsm, /dev/tpmrm0) is \
                         not implemented in this version; the vault verifies {t} evidence, and the \
                         library's `client::node::Attester` trait takes any evidence source"
                    ),
                    Err(_) => anyhow::bail!("unknown --tee {other:?}"),
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
            };
            let b = bar.clone();
            let r = client
                .fetch(&name, &opts, &attester, &mut sink, &mut |total, done| {
                    b.set_length(total);
                    b.set_position(done);
                })
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
