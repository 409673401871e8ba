//! `weightvault serve`: run the vault until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::client::{ENV_ADDR, ENV_CACERT, ENV_CLIENT_CERT, ENV_CLIENT_KEY};
use crate::config::Config;
use crate::config::dev::{self, files};
use crate::server::{self, StartOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// Development vault: create (first run) or reuse a data directory holding a root key file,
    /// a TLS CA with server/admin/auditor certificates, a sim TEE key and the config.
    #[arg(long, conflicts_with = "config")]
    pub dev: bool,
    /// Configuration file (TOML); see deploy/weightvault.example.toml.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory for --dev [default: ~/.local/share/weightvault/dev].
    #[arg(long, value_name = "DIR", requires = "dev")]
    pub data_dir: Option<PathBuf>,
    /// Listen address, overriding the config (use 127.0.0.1:0 for any free port).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (config_path, dev_dir) = if args.dev {
        let dir = args.data_dir.clone().unwrap_or_else(dev::default_data_dir);
        let (path, created) = dev::ensure(&dir)?;
        println!(
            "weightvault dev vault: data directory {} ({})",
            dir.display(),
            if created { "created" } else { "existing" }
        );
        (path, Some(dir))
    } else if let Some(c) = args.config.clone() {
        (c, None)
    } else {
        eprintln!(
            "error: refusing to start without a configuration: pass --config FILE \
             (see deploy/weightvault.example.toml), or --dev for a development vault"
        );
        return Ok(ExitCode::from(2));
    };
    let cfg = Config::load(&config_path)?;
    // The file seal is for development: refused without --dev unless the config allows it.
    crate::keys::seal::check_file_seal_allowed(&cfg.seal, args.dev)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    let running = server::start(
        &cfg,
        StartOptions {
            listen: args.listen,
            ..StartOptions::default()
        },
    )
    .await
    .with_context(|| format!("starting the vault from {}", config_path.display()))?;

    if let Some(dir) = dev_dir {
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        println!("  the simulated TEE is enabled: its evidence is NOT hardware-backed");
        println!("Client environment (admin):");
        println!("export {ENV_ADDR}={}", running.local_addr);
        println!("export {ENV_CACERT}={}", dir.join(files::CA_CERT).display());
        println!(
            "export {ENV_CLIENT_CERT}={}",
            dir.join(files::ADMIN_CERT).display()
        );
        println!(
            "export {ENV_CLIENT_KEY}={}",
            dir.join(files::ADMIN_KEY).display()
        );
        println!(
            "Auditor: {ENV_CLIENT_CERT}={} {ENV_CLIENT_KEY}={}",
            dir.join(files::AUDITOR_CERT).display(),
            dir.join(files::AUDITOR_KEY).display()
        );
        println!(
            "Sim TEE key (for `weightvault node fetch --tee sim`): {}",
            dir.join(files::SIM_KEY).display()
        );
    } else {
        println!("weightvault listening on {}", running.local_addr);
    }
    // The handlers are in place before "ready" is printed: a supervisor that signals as soon as
    // it reads that line must get a clean stop, not the default action of SIGTERM.
    let signals = StopSignals::install()?;
    println!("ready");

    let token = running.shutdown_token();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    running.wait().await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, registered when made (tokio registers `ctrl_c()` only when first
/// polled, which would leave a window where the default action still applies).
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
