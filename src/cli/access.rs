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
        /// Measurement as lowercase hex: SNP MEASUREMENT, TDX MRTD, Nitro PCR0, TPM PCR digest,
        /// sim: the value the node's evidence reports.
        #[arg(long)]
        measurement: String,
        /// A further claim the evidence must carry, CLAIM=VALUE (for example rtmr0=<hex> or
        /// pcr8=<hex>; names in docs/attestation.md); repeatable.
        #[arg(long = "require", value_name = "CLAIM=VALUE")]
        require: Vec<String>,
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
            require,
            conn,
        } => {
            let require = require
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--require {kv:?} is not CLAIM=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let created = client
                .allow_with(&name, &tee, &measurement.to_ascii_lowercase(), require)
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
                let mut require: Vec<String> =
                    r.require.iter().map(|(k, v)| format!("{k}={v}")).collect();
                require.sort();
                println!(
                    "{:<32} {:<12} {}{}",
                    r.model,
                    r.tee,
                    r.measurement,
                    if require.is_empty() {
                        String::new()
                    } else {
                        format!(" requires {}", require.join(","))
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
