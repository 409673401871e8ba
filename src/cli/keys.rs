//! `weightvault keys rotate|status` (admin): KEK rotation (docs/keys.md).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::admin::AdminClient;
use crate::proto::v1::KeyStatus;

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Rotate the key-encryption key (KEK).
    ///
    /// A new KEK version becomes active at once (new model versions are wrapped by it); the vault
    /// then re-wraps every model version's DEK under it in the background, without reading or
    /// rewriting any weight data, and retires (destroys) the old KEK once it wraps nothing. A
    /// rotation interrupted by a crash or a shutdown resumes when the vault starts. Every step is
    /// in the audit log. Waits and shows progress unless --no-wait is given.
    Rotate {
        /// Return once the rotation has started.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show the KEK versions, how many DEKs each wraps, and whether a rotation is running.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Rotate { no_wait, conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let r = client.rotate_keys().await?;
            if !r.proposal_id.is_empty() {
                println!(
                    "proposed a key rotation: proposal {} needs more approvals (weightvault approvals approve {})",
                    r.proposal_id, r.proposal_id
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "kek version {} is active; re-wrapping {} DEKs",
                r.kek_version, r.pending
            );
            if no_wait {
                return Ok(ExitCode::SUCCESS);
            }
            let bar = if std::io::stderr().is_terminal() {
                let b = indicatif::ProgressBar::new(r.pending);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "re-wrapping [{bar:30}] {pos}/{len} DEKs",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let status = loop {
                let s = client.key_status().await?;
                bar.set_length(s.total);
                bar.set_position(s.total - s.pending);
                if s.pending == 0 && s.keks.len() == 1 {
                    break s;
                }
                if !s.running && s.pending > 0 {
                    bar.finish_and_clear();
                    anyhow::bail!(
                        "the rotation stopped with {} DEKs left (see the vault's log); it resumes when the vault restarts or with another `keys rotate`",
                        s.pending
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            bar.finish_and_clear();
            println!(
                "rotation done: {} DEKs wrapped by kek version {}; older KEKs retired",
                status.total, status.active_kek_version
            );
        }
        KeysCmd::Status { conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            print_status(&client.key_status().await?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &KeyStatus) {
    println!("{:<8} {:>8} {:>16} STATE", "KEK", "DEKS", "CREATED_MS");
    for k in &s.keks {
        println!(
            "{:<8} {:>8} {:>16} {}",
            k.version,
            k.deks,
            k.created_ms,
            if k.active { "active" } else { "retiring" }
        );
    }
    println!(
        "{} of {} DEKs wrapped by the active KEK{}",
        s.total - s.pending,
        s.total,
        if s.running { "; rotation running" } else { "" }
    );
}
