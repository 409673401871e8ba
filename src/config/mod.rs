//! Configuration: one TOML file parsed once into typed values. Unknown keys are rejected and
//! every problem is reported together, before the server binds a port. `serve --dev` writes a
//! complete config into its data directory ([`dev`]).

pub mod dev;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::envelope::DEFAULT_CHUNK_SIZE;
use crate::grant::DEFAULT_GRANT_TTL_MS;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, for example "127.0.0.1:7443".
    pub listen: SocketAddr,
    /// Directory of the embedded store (metadata database and blobs).
    pub data_dir: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub roles: RolesConfig,
    pub seal: SealConfig,
    #[serde(default)]
    pub attest: AttestConfig,
    #[serde(default)]
    pub grants: GrantsConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub audit: AuditConfig,
}

/// The audit log's checkpoints and heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Checkpoint origin (C2SP tlog-checkpoint), also the signed-note key name. Default:
    /// "weightvault/" followed by 16 hex digits of the log key's SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// How often a new checkpoint is signed while entries arrive, in milliseconds.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_interval_ms: u64,
    /// A heartbeat entry is written after this many seconds without entries.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            origin: None,
            checkpoint_interval_ms: default_checkpoint_ms(),
            heartbeat_secs: default_heartbeat_secs(),
        }
    }
}

fn default_checkpoint_ms() -> u64 {
    1000
}

fn default_heartbeat_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that issues admin and auditor client certificates (PEM).
    pub client_ca: PathBuf,
}

/// Client certificates that carry a role, by SHA-256 fingerprint of the certificate (DER), hex.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub auditors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum SealConfig {
    /// Root key in a file (32 bytes, mode 0600). For development and tests.
    File {
        path: PathBuf,
        /// Create the key file if it is missing (what `serve --dev` sets). Off by default, so a
        /// production vault never silently starts with a fresh, empty key hierarchy.
        #[serde(default)]
        create: bool,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestConfig {
    #[serde(default)]
    pub sim: SimConfig,
}

/// The development TEE. Off unless enabled; never hardware-backed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Ed25519 public keys (hex, 32 bytes) whose evidence is accepted.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    #[serde(default = "default_max_age_secs")]
    pub max_evidence_age_secs: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            trusted_keys: Vec::new(),
            max_evidence_age_secs: default_max_age_secs(),
        }
    }
}

fn default_max_age_secs() -> u64 {
    300
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsConfig {
    /// Grant lifetime in seconds.
    #[serde(default = "default_grant_ttl")]
    pub ttl_secs: u64,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        Self {
            ttl_secs: default_grant_ttl(),
        }
    }
}

fn default_grant_ttl() -> u64 {
    DEFAULT_GRANT_TTL_MS / 1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Plaintext bytes per at-rest chunk (4096 ..= 64 MiB).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            chunk_size: default_chunk_size(),
        }
    }
}

fn default_chunk_size() -> u32 {
    DEFAULT_CHUNK_SIZE
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
    #[error("dev setup in {dir}: {message}")]
    Dev { dir: String, message: String },
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                problems,
            });
        }
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        match &mut self.seal {
            SealConfig::File { path, .. } => fix(path),
        }
    }

    /// Every problem with the values, for one report.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, path) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if let Err(e) = std::fs::File::open(path) {
                p.push(format!("{name}: {}: {e}", path.display()));
            } else if !path.is_file() {
                p.push(format!("{name}: {} is not a file", path.display()));
            }
        }
        for (name, list) in [
            ("roles.admins", &self.roles.admins),
            ("roles.auditors", &self.roles.auditors),
        ] {
            for fp in list {
                if fp.len() != 64 || hex::decode(fp).is_err() {
                    p.push(format!(
                        "{name}: {fp:?} is not a SHA-256 fingerprint (64 hex digits)"
                    ));
                }
            }
        }
        for k in &self.attest.sim.trusted_keys {
            if k.len() != 64 || hex::decode(k).is_err() {
                p.push(format!(
                    "attest.sim.trusted_keys: {k:?} is not a 32-byte hex Ed25519 key"
                ));
            }
        }
        if self.attest.sim.enabled && self.attest.sim.trusted_keys.is_empty() {
            p.push("attest.sim.enabled is true but attest.sim.trusted_keys is empty".into());
        }
        if !(1..=3600).contains(&self.attest.sim.max_evidence_age_secs) {
            p.push(format!(
                "attest.sim.max_evidence_age_secs: {} is outside 1..=3600",
                self.attest.sim.max_evidence_age_secs
            ));
        }
        if self.grants.ttl_secs == 0 || self.grants.ttl_secs > 24 * 3600 {
            p.push(format!(
                "grants.ttl_secs: {} is outside 1..=86400",
                self.grants.ttl_secs
            ));
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.storage.chunk_size) {
            p.push(format!(
                "storage.chunk_size: {} is outside 4096..=67108864",
                self.storage.chunk_size
            ));
        }
        if let Some(o) = &self.audit.origin
            && (o.is_empty() || o.chars().any(|c| c.is_whitespace() || c == '+') || o.len() > 256)
        {
            p.push(format!(
                "audit.origin: {o:?} must be 1-256 characters without spaces or '+'"
            ));
        }
        if !(100..=60_000).contains(&self.audit.checkpoint_interval_ms) {
            p.push(format!(
                "audit.checkpoint_interval_ms: {} is outside 100..=60000",
                self.audit.checkpoint_interval_ms
            ));
        }
        if !(1..=86_400).contains(&self.audit.heartbeat_secs) {
            p.push(format!(
                "audit.heartbeat_secs: {} is outside 1..=86400",
                self.audit.heartbeat_secs
            ));
        }
        p
    }

    /// The sim TEE's trusted keys as bytes (validated by [`Config::problems`]).
    pub fn sim_trusted_keys(&self) -> Vec<[u8; 32]> {
        self.attest
            .sim
            .trusted_keys
            .iter()
            .filter_map(|k| hex::decode(k).ok()?.try_into().ok())
            .collect()
    }
}

/// SHA-256 fingerprint (lowercase hex) of a DER certificate, as used in `roles`.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}
