//! `weightvault model push|list|show|rm` (admin).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::admin::{AdminClient, PushOptions};
use crate::client::collect_files;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Upload a file, or every regular file of a directory, as a new immutable version.
    Push {
        /// Model name: 1-128 characters of [A-Za-z0-9._-].
        name: String,
        /// A file or a directory (safetensors shards, config.json, tokenizer files, ...).
        path: PathBuf,
        /// Record each file's SHA-256 of the plaintext in the signed manifest, for provenance
        /// (for example to compare with a model-signing digest) and for
        /// `node fetch --verify-digest`, which refuses a version pushed without it. Costs the
        /// vault a SHA-256 pass over every byte. Integrity does not need it: every chunk is
        /// authenticated and the manifest is signed either way.
        #[arg(long)]
        digest: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List models with their latest version.
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Destroy one model version for good (crypto-shredding).
    ///
    /// The version's wrapped DEK is deleted first: from that instant the version cannot be
    /// granted or read, its grants are revoked and running fetches stop within one chunk. Then
    /// its ciphertext blobs are deleted (after a crash, at the next start). The destruction is
    /// in the audit log. The version number is never reused. There is no undo.
    Rm {
        /// NAME@VERSION (the version is required).
        model: String,
        /// Why, recorded in the audit log and the revocation.
        #[arg(long, default_value = "")]
        reason: String,
        /// Confirm the irreversible destruction.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show every version of a model with its files and sizes.
    Show {
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(cmd: ModelCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCmd::Push {
            name,
            path,
            digest,
            conn,
        } => {
            // Bad input is refused before anything is sent.
            let files = collect_files(&path)?;
            let total: u64 = files.iter().map(|f| f.2).sum();
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("pushing {name}"));
            let b = bar.clone();
            let opts = PushOptions {
                record_digest: digest,
            };
            let r = client
                .push_with(&name, files, &opts, move |sent| b.set_position(sent))
                .await;
            bar.finish_and_clear();
            let r = r?;
            println!(
                "pushed {}@{}: {} files, {} bytes",
                r.model, r.version, r.files, r.total_bytes
            );
        }
        ModelCmd::Rm {
            model,
            reason,
            yes,
            conn,
        } => {
            let (name, version) = crate::client::node::parse_model_ref(&model)?;
            if version == 0 {
                anyhow::bail!("give the version to destroy: {name}@VERSION");
            }
            if !yes {
                anyhow::bail!(
                    "destroying {name}@{version} cannot be undone; run again with --yes to confirm"
                );
            }
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let r = client.remove_version(&name, version, &reason).await?;
            if r.proposal_id.is_empty() {
                println!(
                    "destroyed {name}@{version} (version id {}): key deleted, {} grants revoked",
                    r.version_id, r.grants_revoked
                );
            } else {
                println!(
                    "proposed destroying {name}@{version}: proposal {} needs more approvals \
                     (weightvault approvals approve {})",
                    r.proposal_id, r.proposal_id
                );
            }
        }
        ModelCmd::List { conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let models = client.list().await?;
            if models.is_empty() {
                println!("no models");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<40} {:>8} {:>8}", "MODEL", "LATEST", "VERSIONS");
            for m in models {
                println!("{:<40} {:>8} {:>8}", m.name, m.latest_version, m.versions);
            }
        }
        ModelCmd::Show { name, json, conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let m = client.show(&name).await?;
            if json {
                let versions: Vec<_> = m
                    .versions
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "version": v.version,
                            "created_ms": v.created_ms,
                            "total_bytes": v.total_bytes,
                            "kek_version": v.kek_version,
                            "files": v.files.iter().map(|f| serde_json::json!({
                                "path": f.path, "size": f.size, "chunks": f.chunks,
                                // null: pushed without --digest.
                                "sha256": (!f.sha256.is_empty()).then_some(&f.sha256),
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "name": m.name, "versions": versions })
                );
            } else {
                println!("model {}", m.name);
                for v in &m.versions {
                    println!(
                        "  version {}: {} bytes in {} files (created {} ms, KEK v{})",
                        v.version,
                        v.total_bytes,
                        v.files.len(),
                        v.created_ms,
                        v.kek_version
                    );
                    for f in &v.files {
                        let sha256 = if f.sha256.is_empty() {
                            "- (pushed without --digest)"
                        } else {
                            &f.sha256
                        };
                        println!("    {:<48} {:>14} bytes  sha256 {sha256}", f.path, f.size);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
