//! `weightvault approvals list|show|approve|reject` (admin): M-of-N approval of sensitive
//! changes (docs/access-control.md).

use std::process::ExitCode;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::admin::AdminClient;
use crate::proto::v1::Proposal;

#[derive(Subcommand)]
pub enum ApprovalsCmd {
    /// List pending proposals (all with --all).
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show one proposal.
    Show {
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Approve a proposal; it takes effect when the quorum of distinct admins is reached.
    Approve {
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Reject a proposal; it can no longer take effect.
    Reject {
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

fn print(p: &Proposal) {
    println!(
        "{} {} [{}] {} of {} approvals, expires {} ms\n  {}\n  proposer {}\n  approvers {}",
        p.id,
        p.operation,
        p.state,
        p.approvers.len(),
        p.quorum,
        p.expires_ms,
        p.payload,
        p.proposer,
        p.approvers.join(", ")
    );
}

pub async fn run(cmd: ApprovalsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ApprovalsCmd::List { all, conn } => {
            let mut c = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let list = c.proposals(all).await?;
            if list.is_empty() {
                println!("no {}proposals", if all { "" } else { "pending " });
            }
            for p in &list {
                print(p);
            }
        }
        ApprovalsCmd::Show { id, conn } => {
            let mut c = AdminClient::new(conn.endpoint(true)?.connect().await?);
            let list = c.proposals(true).await?;
            let p = list
                .iter()
                .find(|p| p.id == id)
                .ok_or_else(|| anyhow::anyhow!("no proposal {id}"))?;
            print(p);
        }
        ApprovalsCmd::Approve { id, conn } => {
            let mut c = AdminClient::new(conn.endpoint(true)?.connect().await?);
            print(&c.decide(&id, true).await?);
        }
        ApprovalsCmd::Reject { id, conn } => {
            let mut c = AdminClient::new(conn.endpoint(true)?.connect().await?);
            print(&c.decide(&id, false).await?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
