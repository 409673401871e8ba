//! `weightvault config check FILE`: everything `serve` would refuse, reported before any port
//! is bound or any file created.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{Config, ConfigError};

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Check a configuration file (with its WEIGHTVAULT_SECTION__KEY environment overrides
    /// applied) the way `serve` reads it: unknown keys, values, TLS files and keys, attestation
    /// policies and pinned roots. Exit 0 when it would start, 1 with every problem listed.
    #[command(
        after_help = "Environment overrides: WEIGHTVAULT_ + the key path in upper case with \
`__` between levels, e.g. WEIGHTVAULT_STORAGE__CHUNK_SIZE=1048576 or WEIGHTVAULT__LISTEN=0.0.0.0:7443."
    )]
    Check {
        /// The TOML file (see deploy/weightvault.example.toml).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub async fn run(cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCmd::Check { file } => check(&file),
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = match Config::load(file) {
        Ok(cfg) => cfg,
        Err(ConfigError::Read { path, source }) => {
            anyhow::bail!("cannot read {path}: {source}")
        }
        Err(e) => {
            println!("{}: NOT OK", file.display());
            println!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let problems = crate::server::preflight(&cfg);
    if !problems.is_empty() {
        println!("{}: NOT OK", file.display());
        for p in &problems {
            println!("  - {p}");
        }
        return Ok(ExitCode::from(1));
    }
    println!("{}: OK", file.display());
    println!("  listen       {}", cfg.listen);
    println!("  data_dir     {}", cfg.data_dir.display());
    match cfg.ops.listen {
        Some(a) => println!("  ops listen   {a} (plaintext /metrics and gRPC health)"),
        None => println!("  ops listen   off"),
    }
    let mut tees: Vec<&str> = cfg
        .attest
        .enabled_verifiers()
        .map(|v| v.keys().map(|t| t.as_str()).collect())
        .unwrap_or_default();
    tees.sort_unstable();
    println!("  tees         [{}]", tees.join(", "));
    match cfg.limits.peer_calls_per_sec {
        0 => println!("  call limit   off"),
        rate => println!(
            "  call limit   {rate}/s per address, burst {} (calls without a live nonce, session or grant)",
            cfg.limits.peer_burst
        ),
    }
    Ok(ExitCode::SUCCESS)
}
