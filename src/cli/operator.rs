//! `weightvault operator`: the root key's seal (docs/key-ceremony.md). `status` and `unseal`
//! need no client certificate; `init`, `rekey` and `rekey-commit` need the admin role. Shares are read from
//! standard input, one per line, never from the command line (where other users and shell
//! history would see them).

use std::io::BufRead;
use std::process::ExitCode;

use clap::Subcommand;
use zeroize::Zeroizing;

use super::ConnArgs;
use crate::client::operator::OperatorClient;
use crate::proto::v1::SealStatusResponse;

#[derive(Subcommand)]
pub enum OperatorCmd {
    /// Show whether the vault is sealed, its seal and the unseal progress (k of M).
    Status {
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Shamir seal: generate the root key and print its N shares once (admin). The vault keeps
    /// none of them and stays sealed until M are submitted with `operator unseal`.
    Init {
        /// Number of shares to issue (N), 2..=255.
        #[arg(long, value_name = "N")]
        shares: u32,
        /// Shares needed to unseal (M), 2..=N.
        #[arg(long, value_name = "M")]
        threshold: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Submit one share, read from standard input (for example `read -rs S; echo "$S" | weightvault operator unseal`).
    Unseal {
        /// Forget the shares submitted so far instead.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Replace the root key (admin); shamir: staged until `operator rekey-commit`.
    ///
    /// The key ring and signing keys are wrapped again under a new root key. A shamir-sealed
    /// vault reads M current shares from standard input first. `--to shamir` on a file-sealed
    /// vault migrates it. pkcs11: in force at once. shamir: the new shares are printed and the
    /// rekey is only staged (the old root key and shares stay in force) until
    /// `operator rekey-commit` brings back M of the new shares.
    Rekey {
        /// The seal of the new root key: shamir or pkcs11 (default: the current one).
        #[arg(long, value_name = "SEAL")]
        to: Option<String>,
        /// Shares to issue (shamir).
        #[arg(long, value_name = "N", default_value_t = 0)]
        shares: u32,
        /// Shares needed to unseal (shamir).
        #[arg(long, value_name = "M", default_value_t = 0)]
        threshold: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Put a staged shamir rekey in force with M of the NEW shares (admin).
    ///
    /// Reads the new shares from standard input, one per line; bringing them back proves they
    /// reached their custodians. From then on the old root key and every old share are useless.
    RekeyCommit {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

fn print_status(s: &SealStatusResponse, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "state": s.state,
                "seal": s.seal,
                "threshold": s.threshold,
                "shares": s.shares,
                "progress": s.progress,
                "generation": s.generation,
                "rekey_pending": s.rekey_pending,
            })
        );
        return;
    }
    println!("state: {}", s.state);
    println!("seal: {}", s.seal);
    if s.seal == "shamir" && s.threshold > 0 {
        println!(
            "shares: {} needed of {} issued; {} submitted",
            s.threshold, s.shares, s.progress
        );
    }
    if !s.generation.is_empty() {
        println!("root generation: {}", s.generation);
    }
    if s.rekey_pending {
        println!("a rekey is staged and waits for its commit");
    }
}

fn print_shares(shares: &[String], threshold: u32) {
    println!(
        "{} shares; any {threshold} of them unseal the vault. They are shown once and the vault keeps none:",
        shares.len()
    );
    println!("give each to a different custodian and store it offline.");
    for (i, s) in shares.iter().enumerate() {
        println!("share {}: {s}", i + 1);
    }
}

/// Reads `n` non-empty lines from standard input (`usize::MAX`: up to the end of the input).
fn read_shares(n: usize) -> anyhow::Result<Vec<Zeroizing<String>>> {
    let stdin = std::io::stdin();
    let mut out = Vec::new();
    for line in stdin.lock().lines() {
        let line = Zeroizing::new(line?);
        if !line.trim().is_empty() {
            out.push(Zeroizing::new(line.trim().to_string()));
        }
        if out.len() == n {
            break;
        }
    }
    if n == usize::MAX {
        if out.is_empty() {
            anyhow::bail!("expected shares on standard input, one per line; got none");
        }
        return Ok(out);
    }
    if out.len() < n {
        anyhow::bail!(
            "expected {n} share(s) on standard input, one per line; got {}",
            out.len()
        );
    }
    Ok(out)
}

pub async fn run(cmd: OperatorCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OperatorCmd::Status { json, conn } => {
            let mut c = OperatorClient::new(conn.endpoint(false)?.connect().await?);
            print_status(&c.status().await?, json);
        }
        OperatorCmd::Init {
            shares,
            threshold,
            conn,
        } => {
            let mut c = OperatorClient::new(conn.endpoint(true)?.connect().await?);
            let r = c.init(shares, threshold).await?;
            let shares = Zeroizing::new(r.shares);
            print_shares(&shares, r.threshold);
            println!("root generation: {}", r.generation);
            println!(
                "the vault is sealed: submit {} shares with `weightvault operator unseal`",
                r.threshold
            );
        }
        OperatorCmd::Unseal { reset, conn } => {
            let mut c = OperatorClient::new(conn.endpoint(false)?.connect().await?);
            let s = if reset {
                c.reset().await?
            } else {
                if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    eprintln!(
                        "share (one line; the input is echoed: prefer `read -rs S; echo \"$S\" | weightvault operator unseal`):"
                    );
                }
                let share = read_shares(1)?;
                c.unseal(&share[0]).await?
            };
            print_status(&s, false);
        }
        OperatorCmd::Rekey {
            to,
            shares,
            threshold,
            conn,
        } => {
            let mut c = OperatorClient::new(conn.endpoint(true)?.connect().await?);
            let status = c.status().await?;
            let current = if status.seal == "shamir" {
                eprintln!(
                    "reading {} current shares from standard input, one per line",
                    status.threshold
                );
                read_shares(status.threshold as usize)?
            } else {
                Vec::new()
            };
            let target = to.unwrap_or_default();
            let r = c.rekey(&target, shares, threshold, &current).await?;
            if r.committed {
                println!(
                    "root key replaced ({}), root generation {}",
                    r.seal, r.generation
                );
                return Ok(ExitCode::SUCCESS);
            }
            let shares = Zeroizing::new(r.shares);
            print_shares(&shares, r.threshold);
            // Not committed here: shares that were printed are not shares that were received.
            // Until a threshold of them comes back the old root key stays in force, so a lost
            // terminal, a custodian who never got a share or a typo loses nothing.
            println!("root generation (staged): {}", r.generation);
            println!(
                "the rekey is STAGED, not in force: the current root key and shares still open the vault."
            );
            println!(
                "once the custodians hold their shares, run `weightvault operator rekey-commit` with {} of the new shares on standard input",
                r.threshold
            );
        }
        OperatorCmd::RekeyCommit { conn } => {
            let mut c = OperatorClient::new(conn.endpoint(true)?.connect().await?);
            let before = c.status().await?;
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!(
                    "new shares, one per line, then end of input (Ctrl-D); the input is echoed"
                );
            }
            let new_shares = read_shares(usize::MAX)?;
            let texts = Zeroizing::new(
                new_shares
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<String>>(),
            );
            let done = c.rekey_commit(&texts).await?;
            println!(
                "rekey committed: root generation {}; the old root key and its shares no longer open the vault",
                done.generation
            );
            if before.seal == "file" {
                println!(
                    "set [seal] kind = \"shamir\" in the config before the next start, and destroy the old root key file"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
