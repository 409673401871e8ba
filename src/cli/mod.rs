//! The `weightvault` command line: one file per command group. Every client command reads the
//! vault address and TLS files from `WEIGHTVAULT_*` environment variables; flags override them.

pub mod access;
pub mod approvals;
pub mod attest;
pub mod audit;
pub mod config;
pub mod grants;
pub mod keys;
pub mod model;
pub mod node;
pub mod operator;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::{ENV_ADDR, ENV_CACERT, ENV_CLIENT_CERT, ENV_CLIENT_KEY, Endpoint};

#[derive(Parser)]
#[command(
    name = "weightvault",
    version,
    about = "Model weights encrypted at rest, released only to attested inference nodes, every access on the record.",
    long_about = "Model weights encrypted at rest, released only to attested inference nodes, every access on the record.\n\n\
Start a development vault with `weightvault serve --dev`; it prints the WEIGHTVAULT_* variables the other commands read.\n\
Docs: README.md (quickstart), docs/protocol.md, docs/format.md, docs/audit-log.md."
)]
pub struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line (for log
    /// shippers). Lines about a request carry its request_id, the same id as its audit entry.
    #[arg(long, global = true, value_enum, env = "WEIGHTVAULT_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the vault server.
    Serve(serve::ServeArgs),
    /// Push, list, show and destroy model versions (admin).
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Decide which attested nodes may read which model (admin).
    #[command(subcommand)]
    Access(access::AccessCmd),
    /// M-of-N approval of sensitive changes (admin).
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCmd),
    /// List grants with expiry and bytes served (admin).
    #[command(subcommand)]
    Grants(grants::GrantsCmd),
    /// Rotate the key-encryption key and follow the re-wrapping (admin).
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Inference-node commands: attest and fetch weights.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Read the audit log (auditor).
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Verify or produce attestation evidence offline.
    #[command(subcommand)]
    Attest(attest::AttestCmd),
    /// The root key's seal: status, init, unseal, rekey (docs/key-ceremony.md).
    #[command(subcommand)]
    Operator(operator::OperatorCmd),
    /// Check a server configuration file before deploying it.
    #[command(subcommand)]
    Config(config::ConfigCmd),
}

/// How to reach the vault.
#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// Vault address, host:port.
    #[arg(long, env = ENV_ADDR, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// CA certificate (PEM) that issued the vault's server certificate.
    #[arg(long, env = ENV_CACERT, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) carrying the admin or auditor role.
    #[arg(long, env = ENV_CLIENT_CERT, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = ENV_CLIENT_KEY, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl ConnArgs {
    /// The endpoint; `with_identity` says whether the client certificate is used.
    pub fn endpoint(&self, with_identity: bool) -> anyhow::Result<Endpoint> {
        let addr = self.addr.as_deref().ok_or_else(|| {
            anyhow::anyhow!("no vault address: set {ENV_ADDR} or pass --addr (`weightvault serve --dev` prints it)")
        })?;
        let ca = self.cacert.as_deref().ok_or_else(|| {
            anyhow::anyhow!("no CA certificate: set {ENV_CACERT} or pass --cacert")
        })?;
        let (cert, key) = if with_identity {
            let cert = self.cert.as_deref().ok_or_else(|| {
                anyhow::anyhow!("no client certificate: set {ENV_CLIENT_CERT} or pass --cert")
            })?;
            let key = self.key.as_deref().ok_or_else(|| {
                anyhow::anyhow!("no client key: set {ENV_CLIENT_KEY} or pass --key")
            })?;
            (Some(cert), Some(key))
        } else {
            (None, None)
        };
        Ok(Endpoint::from_files(addr, ca, cert, key)?)
    }
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIGHTVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Parses the command line and runs the command; errors print as one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_serve = matches!(cli.command, Command::Serve(_));
    init_logging(if is_serve { "info" } else { "warn" }, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Model(c) => model::run(c).await,
            Command::Access(c) => access::run(c).await,
            Command::Node(c) => node::run(c).await,
            Command::Grants(c) => grants::run(c).await,
            Command::Keys(c) => keys::run(c).await,
            Command::Approvals(c) => approvals::run(c).await,
            Command::Audit(c) => audit::run(c).await,
            Command::Attest(c) => attest::run(c).await,
            Command::Operator(c) => operator::run(c).await,
            Command::Config(c) => config::run(c).await,
        }
    });
    match result {
        Ok(code) => code,
        // 1 is a negative answer (evidence rejected, log verification failed); 2 is an error.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
