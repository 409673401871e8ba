//! Configuration: one TOML file parsed once into typed values. Unknown keys are rejected and
//! every problem is reported together, before the server binds a port. `serve --dev` writes a
//! complete config into its data directory ([`dev`]).

pub mod dev;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::attest::{AttestError, TeeKind, Verifier};
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
    #[serde(default)]
    pub budgets: BudgetsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    #[serde(default)]
    pub ops: OpsConfig,
}

/// The plaintext operations listener: `GET /metrics` (Prometheus) and `grpc.health.v1` for
/// probes that cannot speak TLS. Off unless `listen` is set; keep it on a private address.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// For example "127.0.0.1:9464".
    pub listen: Option<SocketAddr>,
}

/// Environment variables that override config keys: `WEIGHTVAULT_` + the key path in upper case
/// with `__` between levels, for example `WEIGHTVAULT_STORAGE__CHUNK_SIZE=1048576` or
/// `WEIGHTVAULT__LISTEN=0.0.0.0:7443` for a top-level key. Only names containing `__` are
/// overrides; the client variables (`WEIGHTVAULT_ADDR`, ...) never are.
pub const ENV_PREFIX: &str = "WEIGHTVAULT_";

/// M-of-N approval of sensitive changes (docs/access-control.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Distinct admins needed (the proposer counts once). 1 = changes apply at once.
    #[serde(default = "default_quorum")]
    pub quorum: u32,
    /// Operations that need the quorum. Known: "access_allow", "model_rm", "keys_rotate".
    #[serde(default = "default_operations")]
    pub operations: Vec<String>,
    /// A proposal not decided within this many seconds expires.
    #[serde(default = "default_proposal_ttl")]
    pub ttl_secs: u64,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        Self {
            quorum: default_quorum(),
            operations: default_operations(),
            ttl_secs: default_proposal_ttl(),
        }
    }
}

fn default_quorum() -> u32 {
    1
}

/// Operations `[approvals] operations` may list: adding an access rule, destroying a model
/// version (`model rm`) and rotating the KEK (`keys rotate`).
pub const APPROVABLE_OPERATIONS: &[&str] = &["access_allow", "model_rm", "keys_rotate"];

fn default_operations() -> Vec<String> {
    vec!["access_allow".to_string()]
}

fn default_proposal_ttl() -> u64 {
    86_400
}

/// Egress budgets (docs/access-control.md). 0 means no limit for the windowed budgets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// A grant may serve the version's ciphertext size plus this percentage (retries) plus one
    /// chunk.
    #[serde(default = "default_allowance")]
    pub grant_allowance_percent: u32,
    /// Bytes one node (TEE + instance id) may fetch per window; 0 = unlimited.
    #[serde(default)]
    pub node_bytes_per_window: u64,
    /// Bytes of one model all nodes together may fetch per window; 0 = unlimited.
    #[serde(default)]
    pub model_bytes_per_window: u64,
    #[serde(default = "default_window")]
    pub window_secs: u64,
}

/// Limits on the node-service calls that present no live credential (`GetChallenge`; `Attest`,
/// `RequestGrant` and `FetchWeights` whose nonce, session or grant is not live), per client
/// address: an IPv4 address, or the /64 prefix of an IPv6 one (docs/access-control.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Calls per second one address may make on average; 0 = no limit.
    #[serde(default = "default_peer_rate")]
    pub peer_calls_per_sec: u32,
    /// Calls one address may make at once before the rate applies.
    #[serde(default = "default_peer_burst")]
    pub peer_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            peer_calls_per_sec: default_peer_rate(),
            peer_burst: default_peer_burst(),
        }
    }
}

fn default_peer_rate() -> u32 {
    50
}

fn default_peer_burst() -> u32 {
    500
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            grant_allowance_percent: default_allowance(),
            node_bytes_per_window: 0,
            model_bytes_per_window: 0,
            window_secs: default_window(),
        }
    }
}

fn default_allowance() -> u32 {
    10
}

fn default_window() -> u64 {
    3600
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
    /// With replicas (PostgreSQL metadata): seconds the sequencer lease lives without renewal,
    /// so how long a dead holder's duties (heartbeats, periodic checkpoints) wait for another.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            origin: None,
            checkpoint_interval_ms: default_checkpoint_ms(),
            heartbeat_secs: default_heartbeat_secs(),
            lease_secs: default_lease_secs(),
        }
    }
}

fn default_checkpoint_ms() -> u64 {
    1000
}

fn default_heartbeat_secs() -> u64 {
    60
}

fn default_lease_secs() -> u64 {
    10
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

/// Client certificates (issued by `tls.client_ca`) that carry a role. Each entry is either the
/// SHA-256 fingerprint of the certificate (DER, 64 hex digits) or a URI matched against the
/// certificate's subject alternative name URIs (for example a SPIFFE id).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub auditors: Vec<String>,
    /// Fingerprints of certificates refused whatever they would otherwise match.
    #[serde(default)]
    pub revoked: Vec<String>,
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
        /// `weightvault serve` refuses the file seal without `--dev` unless this is set.
        #[serde(default)]
        allow_file_outside_dev: bool,
    },
    /// Root key split into shares (`weightvault operator init`); the vault starts sealed until
    /// a threshold of shares is submitted (docs/key-ceremony.md).
    Shamir {},
    /// Root key encrypted by a non-extractable AES-256 key inside a PKCS#11 HSM; the vault
    /// unseals itself at start.
    Pkcs11 {
        /// The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so.
        module: PathBuf,
        /// Slot id; or leave it out and give `token_label`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_label: Option<String>,
        /// Label of the AES-256 wrapping key (created in the token at the first start if absent).
        key_label: String,
        /// User PIN. Prefer `pin_env`: a PIN in the file is readable by whoever reads the file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin: Option<crate::keys::secret::SecretText>,
        /// Environment variable holding the PIN (default WEIGHTVAULT_PKCS11_PIN).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_env: Option<String>,
        /// Migration from the file seal: the old root key file, read once at start to move the
        /// key ring under a new HSM-sealed root key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migrate_from_file: Option<PathBuf>,
    },
    /// Auto-unseal through a cloud KMS: planned, refused by validation in this version.
    CloudKms {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
}

impl SealConfig {
    /// Value problems of `[seal]` (see docs/key-ceremony.md).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            SealConfig::CloudKms { .. } => p.push(
                "seal.kind = \"cloud_kms\" is not implemented in this version (planned; see \
                 docs/key-ceremony.md): use \"shamir\" or \"pkcs11\""
                    .into(),
            ),
            SealConfig::Pkcs11 {
                slot,
                token_label,
                key_label,
                pin,
                pin_env,
                ..
            } => {
                if slot.is_none() && token_label.as_deref().is_none_or(str::is_empty) {
                    p.push("seal: pkcs11 needs seal.slot or seal.token_label".into());
                }
                if key_label.is_empty() {
                    p.push("seal.key_label: must not be empty".into());
                }
                if pin.is_some() && pin_env.is_some() {
                    p.push("seal: set seal.pin or seal.pin_env, not both".into());
                }
            }
            SealConfig::File { .. } | SealConfig::Shamir {} => {}
        }
        p
    }
}

/// Which TEEs the vault accepts, and each verifier's policy (docs/attestation.md). Every
/// hardware verifier is off unless enabled; its policy defaults are the strict ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestConfig {
    #[serde(default)]
    pub sim: SimConfig,
    #[serde(default)]
    pub snp: TeeConfig<crate::attest::snp::SnpPolicy>,
    #[serde(default)]
    pub tdx: TeeConfig<crate::attest::tdx::TdxPolicy>,
    #[serde(default)]
    pub nitro: TeeConfig<crate::attest::nitro::NitroPolicy>,
    #[serde(default)]
    pub tpm: TeeConfig<crate::attest::tpm::TpmPolicy>,
    #[serde(default, rename = "az-snp-vtpm")]
    pub az_snp_vtpm: TeeConfig<crate::attest::azure::AzureVtpmPolicy>,
    #[serde(default, rename = "az-tdx-vtpm")]
    pub az_tdx_vtpm: TeeConfig<crate::attest::azure::AzureVtpmPolicy>,
}

/// One hardware TEE: whether nodes may attest with it, and its verifier policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeConfig<P> {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub policy: P,
}

impl AttestConfig {
    /// The verifier of one TEE with its configured policy, whether or not it is enabled (the
    /// offline `attest verify` and `audit verify` use this).
    pub fn verifier(&self, tee: TeeKind) -> Result<Box<dyn Verifier>, AttestError> {
        use crate::attest::{nitro, sim, snp, tdx, tpm};
        Ok(match tee {
            TeeKind::Sim => Box::new(sim::SimVerifier::new(
                self.sim
                    .trusted_keys
                    .iter()
                    .filter_map(|k| hex::decode(k).ok()?.try_into().ok())
                    .collect(),
                self.sim.max_evidence_age_secs.saturating_mul(1000),
            )),
            TeeKind::Snp => Box::new(snp::SnpVerifier::new(self.snp.policy.clone())?),
            TeeKind::Tdx => Box::new(tdx::TdxVerifier::new(self.tdx.policy.clone())?),
            TeeKind::Nitro => Box::new(nitro::NitroVerifier::new(self.nitro.policy.clone())?),
            TeeKind::Tpm => Box::new(tpm::TpmVerifier::new(self.tpm.policy.clone())?),
            TeeKind::AzSnpVtpm => Box::new(crate::attest::azure::AzureVtpmVerifier::new(
                tee,
                self.az_snp_vtpm.policy.clone(),
            )?),
            TeeKind::AzTdxVtpm => Box::new(crate::attest::azure::AzureVtpmVerifier::new(
                tee,
                self.az_tdx_vtpm.policy.clone(),
            )?),
        })
    }

    /// Whether nodes may attest with `tee`.
    pub fn enabled(&self, tee: TeeKind) -> bool {
        match tee {
            TeeKind::Sim => self.sim.enabled,
            TeeKind::Snp => self.snp.enabled,
            TeeKind::Tdx => self.tdx.enabled,
            TeeKind::Nitro => self.nitro.enabled,
            TeeKind::Tpm => self.tpm.enabled,
            TeeKind::AzSnpVtpm => self.az_snp_vtpm.enabled,
            TeeKind::AzTdxVtpm => self.az_tdx_vtpm.enabled,
        }
    }

    /// The verifiers of every enabled TEE.
    pub fn enabled_verifiers(
        &self,
    ) -> Result<std::collections::HashMap<TeeKind, Box<dyn Verifier>>, AttestError> {
        TeeKind::ALL
            .into_iter()
            .filter(|t| self.enabled(*t))
            .map(|t| Ok((t, self.verifier(t)?)))
            .collect()
    }
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
    /// Metadata backend. Unset: SQLite in `data_dir`. `postgres://user@host:port/db` (no
    /// password in the URL: it comes from `PGPASSWORD` or a pgpass file) for replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// Blob backend. Unset: `data_dir/blobs`. `s3://bucket/prefix` for replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blobs: Option<String>,
    /// How to reach the bucket of an `s3://` `blobs`; unset keys come from the AWS environment.
    #[serde(default)]
    pub s3: S3Config,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            chunk_size: default_chunk_size(),
            metadata: None,
            blobs: None,
            s3: S3Config::default(),
        }
    }
}

impl StorageConfig {
    /// Whether the metadata store is shared with other replicas (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.metadata.is_some()
    }
}

/// The S3 endpoint and credentials. The secret key is never in this file: it is read at start
/// from `secret_access_key_file`, or comes from `AWS_SECRET_ACCESS_KEY` / instance credentials.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `https://host[:port]` of an S3-compatible store (path-style requests); unset: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Permit an `http://` endpoint (a loopback test server; never across a network).
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// File holding the secret access key (trailing newline ignored); mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
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
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let applied = apply_env_overrides(&mut table, std::env::vars()).map_err(|message| {
            ConfigError::Parse {
                path: path.display().to_string(),
                message,
            }
        })?;
        let mut cfg: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: if applied.is_empty() {
                        e.to_string()
                    } else {
                        format!("{e} (after environment overrides {})", applied.join(", "))
                    },
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
            SealConfig::Pkcs11 {
                module,
                migrate_from_file,
                ..
            } => {
                fix(module);
                if let Some(p) = migrate_from_file {
                    fix(p);
                }
            }
            SealConfig::Shamir {} | SealConfig::CloudKms { .. } => {}
        }
        if let Some(p) = &mut self.storage.s3.secret_access_key_file {
            fix(p);
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
        for (name, list, uris) in [
            ("roles.admins", &self.roles.admins, true),
            ("roles.auditors", &self.roles.auditors, true),
            ("roles.revoked", &self.roles.revoked, false),
        ] {
            for fp in list {
                let is_fp = fp.len() == 64 && hex::decode(fp).is_ok();
                let is_uri = uris && fp.contains("://") && !fp.chars().any(char::is_whitespace);
                if !is_fp && !is_uri {
                    p.push(format!(
                        "{name}: {fp:?} is not a SHA-256 fingerprint (64 hex digits){}",
                        if uris { " or a SAN URI" } else { "" }
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
        // Roots, floors and overrides are parsed now, so a bad policy stops the start.
        for tee in TeeKind::ALL
            .into_iter()
            .filter(|t| self.attest.enabled(*t) && *t != TeeKind::Sim)
        {
            if let Err(e) = self.attest.verifier(tee) {
                p.push(format!("attest.{}: {e}", tee.as_str()));
            }
        }
        p.extend(self.seal.problems());
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
        p.extend(self.storage.problems());
        if !(1..=300).contains(&self.audit.lease_secs) {
            p.push(format!(
                "audit.lease_secs: {} is outside 1..=300",
                self.audit.lease_secs
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
        if !(1..=16).contains(&self.approvals.quorum) {
            p.push(format!(
                "approvals.quorum: {} is outside 1..=16",
                self.approvals.quorum
            ));
        }
        for op in &self.approvals.operations {
            if !APPROVABLE_OPERATIONS.contains(&op.as_str()) {
                p.push(format!(
                    "approvals.operations: unknown operation {op:?} (known: {})",
                    APPROVABLE_OPERATIONS.join(", ")
                ));
            }
        }
        if !(60..=30 * 86_400).contains(&self.approvals.ttl_secs) {
            p.push(format!(
                "approvals.ttl_secs: {} is outside 60..=2592000",
                self.approvals.ttl_secs
            ));
        }
        if self.budgets.grant_allowance_percent > 1000 {
            p.push(format!(
                "budgets.grant_allowance_percent: {} is above 1000",
                self.budgets.grant_allowance_percent
            ));
        }
        if !(1..=30 * 86_400).contains(&self.budgets.window_secs) {
            p.push(format!(
                "budgets.window_secs: {} is outside 1..=2592000",
                self.budgets.window_secs
            ));
        }
        let l = &self.limits;
        if l.peer_calls_per_sec > 1_000_000 {
            p.push(format!(
                "limits.peer_calls_per_sec: {} is above 1000000",
                l.peer_calls_per_sec
            ));
        }
        if l.peer_calls_per_sec > 0 && !(1..=1_000_000).contains(&l.peer_burst) {
            p.push(format!(
                "limits.peer_burst: {} is outside 1..=1000000 (set limits.peer_calls_per_sec = 0 to turn the limit off)",
                l.peer_burst
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

/// Applies `WEIGHTVAULT_A__B=value` overrides to a parsed config table and returns the names of
/// the variables applied. A value is read as a TOML value when it parses as one (numbers, booleans,
/// arrays, quoted strings), otherwise as a plain string. Unknown keys are caught afterwards by the
/// typed parse, which names the key.
pub fn apply_env_overrides(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, String> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let rest = name[ENV_PREFIX.len()..].trim_start_matches('_');
        let keys: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(format!(
                "environment variable {name}: empty key segment (use {ENV_PREFIX}SECTION__KEY)"
            ));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let (last, parents) = keys.split_last().expect("at least one segment");
        let mut t = &mut *table;
        for k in parents {
            let entry = t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = entry.as_table_mut().ok_or_else(|| {
                format!("environment variable {name}: config key {k:?} is not a section")
            })?;
        }
        t.insert(last.clone(), value);
        applied.push(name);
    }
    Ok(applied)
}

impl StorageConfig {
    /// Problems with the backend URLs and S3 settings (part of [`Config::problems`]).
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(url) = &self.metadata {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                p.push(format!(
                    "storage.metadata: {url:?} is not a postgres:// URL (leave it unset for the embedded store)"
                ));
            } else {
                use std::str::FromStr;
                // RFC 3986 §3.2.1: a password is the part of the userinfo after ':'.
                let authority = url
                    .split_once("://")
                    .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
                let has_password = authority
                    .rsplit_once('@')
                    .is_some_and(|(userinfo, _)| userinfo.contains(':'));
                if has_password {
                    p.push(
                        "storage.metadata: the URL must not contain a password (use PGPASSWORD or a pgpass file)"
                            .into(),
                    );
                } else if let Err(e) = sqlx::postgres::PgConnectOptions::from_str(url) {
                    p.push(format!("storage.metadata: {e}"));
                }
            }
        }
        let s3 = &self.s3;
        match &self.blobs {
            Some(url) => {
                if let Err(e) = crate::store::s3::parse_url(url) {
                    p.push(format!("storage.blobs: {e}"));
                }
            }
            None => {
                let set = s3.endpoint.is_some()
                    || s3.region.is_some()
                    || s3.allow_http
                    || s3.access_key_id.is_some()
                    || s3.secret_access_key_file.is_some();
                if set {
                    p.push("storage.s3 is set but storage.blobs is not an s3:// URL".into());
                }
            }
        }
        if let Some(e) = &s3.endpoint {
            if e.starts_with("http://") {
                if !s3.allow_http {
                    p.push(format!(
                        "storage.s3.endpoint: {e:?} is plain HTTP; set storage.s3.allow_http = true only for a loopback test server"
                    ));
                }
            } else if !e.starts_with("https://") {
                p.push(format!(
                    "storage.s3.endpoint: {e:?} must start with https:// (or http:// with allow_http)"
                ));
            }
        }
        match (&s3.access_key_id, &s3.secret_access_key_file) {
            (Some(_), None) | (None, Some(_)) => p.push(
                "storage.s3: access_key_id and secret_access_key_file go together (or leave both to the AWS environment)"
                    .into(),
            ),
            (Some(_), Some(path)) if !path.is_file() => p.push(format!(
                "storage.s3.secret_access_key_file: {} is not a readable file",
                path.display()
            )),
            _ => {}
        }
        p
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn overrides_nested_and_top_level_keys_with_typed_values() {
        let mut t: toml::Table =
            toml::from_str("listen = \"127.0.0.1:1\"\n[storage]\nchunk_size = 4096\n").unwrap();
        let applied = apply_env_overrides(
            &mut t,
            vars(&[
                ("WEIGHTVAULT_STORAGE__CHUNK_SIZE", "65536"),
                ("WEIGHTVAULT__LISTEN", "0.0.0.0:7443"),
                ("WEIGHTVAULT_OPS__LISTEN", "127.0.0.1:9464"),
                ("WEIGHTVAULT_ADDR", "ignored:1"),
                ("OTHER__X", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(applied.len(), 3);
        assert_eq!(t["storage"]["chunk_size"].as_integer(), Some(65536));
        assert_eq!(t["listen"].as_str(), Some("0.0.0.0:7443"));
        assert_eq!(t["ops"]["listen"].as_str(), Some("127.0.0.1:9464"));
        assert!(!t.contains_key("addr"));
    }

    #[test]
    fn a_key_under_a_scalar_is_refused_with_the_variable_name() {
        let mut t: toml::Table = toml::from_str("listen = \"127.0.0.1:1\"").unwrap();
        let e = apply_env_overrides(&mut t, vars(&[("WEIGHTVAULT_LISTEN__X", "1")])).unwrap_err();
        assert!(e.contains("WEIGHTVAULT_LISTEN__X"), "{e}");
        let e = apply_env_overrides(&mut t, vars(&[("WEIGHTVAULT_A____B", "1")])).unwrap_err();
        assert!(e.contains("empty key segment"), "{e}");
    }
}
