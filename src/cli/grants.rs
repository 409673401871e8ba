//! `weightvault grants list` (admin): live grants with expiry and bytes served.

use std::process::ExitCode;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::admin::AdminClient;

#[derive(Subcommand)]
pub enum GrantsCmd {
    /// List grants, live ones unless --all.
    List {
        #[arg(long)]
        model: Option<String>,
        /// Node identity (instance id from its claims).
        #[arg(long)]
        node: Option<String>,
        /// Include expired and revoked grants.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(cmd: GrantsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        GrantsCmd::List {
            model,
            node,
            all,
            conn,
        } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let grants = client
                .grants(model.as_deref(), node.as_deref(), all)
                .await?;
            if grants.is_empty() {
                println!("no {}grants", if all { "" } else { "live " });
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36} {:<20} {:>4} {:<20} {:<14} {:>15} {:>14} STATE",
                "GRANT", "MODEL", "VER", "NODE", "TEE", "NOT_AFTER_MS", "BYTES"
            );
            for g in grants {
                println!(
                    "{:<36} {:<20} {:>4} {:<20} {:<14} {:>15} {:>14} {}",
                    g.grant_id,
                    g.model,
                    g.version,
                    g.node,
                    g.tee,
                    g.not_after_ms,
                    g.bytes_served,
                    if g.revoked { "revoked" } else { "valid" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
