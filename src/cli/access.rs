//! `weightvault access allow|list` (admin).

use std::process::ExitCode;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::admin::AdminClient;

#[derive(Subcommand)]
pub enum AccessCmd {
    /// Allow nodes whose evidence carries MEASUREMENT to read model NAME.
    Allow {
        name: String,
        /// TEE kind of the nodes: sim.
        #[arg(long)]
        tee: String,
        /// Measurement as lowercase hex (sim: the value the node's evidence reports).
        #[arg(long)]
        measurement: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List access rules, of one model or all.
    List {
        name: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(cmd: AccessCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AccessCmd::Allow {
            name,
            tee,
            measurement,
            conn,
        } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let created = client
                .allow(&name, &tee, &measurement.to_ascii_lowercase())
                .await?;
            println!(
                "{} {tee} measurement {} for model {name}",
                if created {
                    "allowed"
                } else {
                    "already allowed:"
                },
                measurement.to_ascii_lowercase()
            );
        }
        AccessCmd::List { name, conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let rules = client.access_rules(name.as_deref()).await?;
            if rules.is_empty() {
                println!("no access rules");
            }
            for r in rules {
                println!("{:<32} {:<6} {}", r.model, r.tee, r.measurement);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
