//! `weightvault audit entries` (auditor).

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use super::ConnArgs;
use crate::client::ClientError;
use crate::client::audit::AuditClient;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print log entries as JSON lines (`{"index":N,"entry":{...}}`), in log order.
    Entries {
        /// First index.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// End index, exclusive (default: the current end of the log).
        #[arg(long)]
        end: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

pub async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Entries { start, end, conn } => {
            let mut client = AuditClient::new(conn.endpoint(true)?.connect().await?);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            client
                .entries(start, end.unwrap_or(0), |index, entry| {
                    let text = std::str::from_utf8(entry).map_err(|_| {
                        ClientError::Protocol(format!("entry {index} is not UTF-8"))
                    })?;
                    writeln!(out, "{{\"index\":{index},\"entry\":{text}}}")
                        .map_err(|e| ClientError::Protocol(e.to_string()))
                })
                .await?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
