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
    /// Remove an allow rule (the same MODEL, --tee, --measurement and --require as allowed).
    /// Live grants keep running until they expire; revoke them to stop them now.
    Deny {
        name: String,
        #[arg(long)]
        tee: String,
        #[arg(long)]
        measurement: String,
        #[arg(long = "require", value_name = "CLAIM=VALUE")]
        require: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Revoke now: future grants are refused, existing grants invalidated, running streams stop
    /// within one chunk. Exactly one target.
    #[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
    Revoke {
        #[arg(long, group = "target", value_name = "ID")]
        grant: Option<String>,
        /// Node identity as its claims report it (chip id, instance id).
        #[arg(long, group = "target", value_name = "ID")]
        node: Option<String>,
        /// Measurement (hex): every grant issued on evidence with it ("TCB recovery").
        #[arg(long, group = "target", value_name = "HEX")]
        measurement: Option<String>,
        /// NAME or NAME@VERSION.
        #[arg(long, group = "target", value_name = "MODEL")]
        model: Option<String>,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show the rules, revocations and live grants of one model.
    Show {
        name: String,
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
            let require = parse_require(&require)?;
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let r = client
                .allow_or_propose(&name, &tee, &measurement.to_ascii_lowercase(), require)
                .await?;
            if !r.proposal_id.is_empty() {
                println!(
                    "proposed {}: needs approval by other admins (`weightvault approvals approve {}`)",
                    r.proposal_id, r.proposal_id
                );
                return Ok(ExitCode::SUCCESS);
            }
            let created = r.created;
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
        AccessCmd::Deny {
            name,
            tee,
            measurement,
            require,
            conn,
        } => {
            let require = parse_require(&require)?;
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            client
                .deny(&name, &tee, &measurement.to_ascii_lowercase(), require)
                .await?;
            println!(
                "removed the rule for {tee} measurement {} on model {name}",
                measurement.to_ascii_lowercase()
            );
        }
        AccessCmd::Revoke {
            grant,
            node,
            measurement,
            model,
            reason,
            conn,
        } => {
            use crate::proto::v1::revoke_request::Target;
            let target = match (grant, node, measurement, model) {
                (Some(g), ..) => Target::GrantId(g),
                (_, Some(n), ..) => Target::Node(n),
                (_, _, Some(m), _) => Target::Measurement(m),
                (_, _, _, Some(m)) => Target::Model(m),
                _ => anyhow::bail!("give one of --grant, --node, --measurement, --model"),
            };
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let n = client.revoke(target, &reason).await?;
            println!("revoked; {n} live grant(s) invalidated");
        }
        AccessCmd::Show { name, conn } => {
            let mut client = AdminClient::new(conn.endpoint(true)?.connect().await?);
            println!("model {name}");
            println!("rules:");
            for r in client.access_rules(Some(&name)).await? {
                println!(
                    "  allow {} {}{}",
                    r.tee,
                    r.measurement,
                    fmt_require(&r.require)
                );
            }
            println!("revocations:");
            for r in client.revocations().await? {
                let applies = r.kind != "model"
                    || r.value == name
                    || r.value.starts_with(&format!("{name}@"));
                if applies {
                    println!(
                        "  {} {}{}",
                        r.kind,
                        r.value,
                        if r.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.reason)
                        }
                    );
                }
            }
            println!("live grants:");
            for g in client.grants(Some(&name), None, false).await? {
                println!(
                    "  {} v{} node {} until {} ms, {} bytes served",
                    g.grant_id, g.version, g.node, g.not_after_ms, g.bytes_served
                );
            }
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

fn parse_require(require: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    require
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--require {kv:?} is not CLAIM=VALUE"))
        })
        .collect()
}

fn fmt_require(r: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() {
        String::new()
    } else {
        format!(" requires {}", v.join(","))
    }
}
