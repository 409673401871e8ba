//! Storage: the metadata store (models, versions, wrapped keys, policies, challenges, sessions,
//! grants, the audit sequence) and the blob store (ciphertext chunks). Each trait's contract is in
//! its doc comment; backends are sibling files. The embedded default is [`sqlite::SqliteStore`]
//! plus [`local::LocalBlobs`] in one data directory.

pub mod faulty;
pub mod local;
pub mod postgres;
pub mod s3;
pub mod sqlite;

use async_trait::async_trait;
use bytes::Bytes;

use crate::time::UnixMs;

/// Storage failures. `NotFound` and `Conflict` are expected outcomes callers act on; `Backend`
/// and `Io` are faults (detail for the log, never for clients).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(&'static str),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("metadata backend: {0}")]
    Backend(#[from] sqlx::Error),
    #[error("blob store: {0}")]
    Io(#[from] std::io::Error),
}

/// One version of the KEK ring, wrapped by the root key.
#[derive(Debug, Clone)]
pub struct KekRecord {
    pub version: u32,
    pub wrapped: Vec<u8>,
    pub created_ms: UnixMs,
}

/// See [`MetadataStore::change_root_material`].
#[derive(Debug, Clone, Default)]
pub struct RootChange {
    pub keks: Option<Vec<KekRecord>>,
    pub expect: Vec<(String, Option<Vec<u8>>)>,
    pub put: Vec<(String, Vec<u8>)>,
    pub delete: Vec<String>,
}

/// An immutable model version as committed.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    pub model: String,
    pub version: u64,
    pub version_id: [u8; 16],
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub manifest: Vec<u8>,
    pub manifest_sig: Vec<u8>,
    pub total_bytes: u64,
    pub created_ms: UnixMs,
}

#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub latest_version: u64,
    pub versions: u32,
}

/// An admin rule: nodes of `tee` whose evidence carries `measurement`, and every claim detail
/// in `require` with exactly that value, may read `model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    pub model: String,
    pub tee: String,
    pub measurement: String,
    pub require: std::collections::BTreeMap<String, String>,
    pub created_ms: UnixMs,
}

/// An attestation session: what was verified, bound to the node's key. Only the SHA-256 of the
/// bearer token is stored.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub token_sha256: [u8; 32],
    pub claims_json: String,
    pub node_public_key: [u8; 32],
    pub evidence_sha256: [u8; 32],
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
}

/// What a revocation targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationKind {
    Grant,
    /// A node identity (`instance_id` of the claims).
    Node,
    /// A measurement, whatever the TEE.
    Measurement,
    /// A model (`value` = name) or one version of it (`value` = name@version).
    Model,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Grant => "grant",
            RevocationKind::Node => "node",
            RevocationKind::Measurement => "measurement",
            RevocationKind::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Grant, Self::Node, Self::Measurement, Self::Model]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub kind: RevocationKind,
    pub value: String,
    pub created_ms: UnixMs,
    pub reason: String,
}

/// A sensitive change waiting for M-of-N approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposalRecord {
    pub id: String,
    pub operation: String,
    pub payload: String,
    pub proposer: String,
    /// Distinct admin fingerprints that approved, the proposer first.
    pub approvers: Vec<String>,
    pub quorum: u32,
    /// pending, applied, rejected, expired.
    pub state: String,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
}

#[derive(Debug, Clone)]
pub struct GrantRecord {
    pub grant_id: String,
    pub session_sha256: [u8; 32],
    pub model: String,
    pub version: u64,
    pub node_public_key: [u8; 32],
    /// From the claims the grant was issued on, for revocation by node or measurement.
    pub instance_id: String,
    pub tee: String,
    pub measurement: String,
    pub created_ms: UnixMs,
    pub not_after_ms: UnixMs,
    pub revoked: bool,
    pub bytes_served: u64,
}

/// A model version whose wrapped DEK was destroyed (crypto-shredding, docs/keys.md).
#[derive(Debug, Clone)]
pub struct DestroyedVersion {
    pub model: String,
    pub version: u64,
    pub version_id: [u8; 16],
    pub destroyed_ms: UnixMs,
    /// Grants of the version this destruction invalidated.
    pub grants_revoked: u64,
}

/// A signed checkpoint of the audit log: the tree `root` over its first `size` entries, and the
/// C2SP signed note that commits to it.
#[derive(Debug, Clone)]
pub struct CheckpointRecord {
    pub size: u64,
    pub root: [u8; 32],
    pub note: String,
    pub created_ms: UnixMs,
}

/// Metadata store contract.
///
/// - Every method that changes state has committed durably (fsync or the backend's equivalent)
///   when it returns `Ok`; a crash after that loses nothing, a crash before leaves the old state.
/// - Every method is atomic: a failed call changes nothing.
/// - `Conflict` means a uniqueness rule refused the write; the caller decides whether to retry.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Appends entries as the next indexes of the audit sequence, in order, in one transaction.
    /// Returns the index of the first. Durable on return (the log-before-release rule).
    async fn append_audit(&self, entries: &[Vec<u8>]) -> Result<u64, StoreError>;
    /// Entries with index in `[start, end)`, at most `limit` of them, in index order.
    async fn audit_entries(
        &self,
        start: u64,
        end: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Number of entries in the audit sequence.
    async fn audit_size(&self) -> Result<u64, StoreError>;
    /// Takes or renews the audit sequencer's lease for `holder` for `ttl_ms` milliseconds
    /// (measured by the backend's clock); returns whether `holder` now holds it. Nobody else
    /// gets it until it expires or its holder calls again with `ttl_ms = 0`, which releases it
    /// (and returns `false`). Used only when several replicas share the store: the holder
    /// writes heartbeats and periodic checkpoints (docs/architecture.md, Scale-out).
    async fn audit_lease(&self, holder: &str, ttl_ms: u64) -> Result<bool, StoreError>;

    async fn keks(&self) -> Result<Vec<KekRecord>, StoreError>;
    /// `Conflict` if that KEK version exists.
    async fn insert_kek(&self, kek: &KekRecord) -> Result<(), StoreError>;
    /// A named wrapped secret (for example the manifest signing key).
    async fn get_wrapped_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores it unless the name exists; returns whether it was stored.
    async fn put_wrapped_secret_if_absent(
        &self,
        name: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError>;
    /// One atomic change of what the root key protects (seal init, rekey, seal migration;
    /// `keys::rekey`). Checks first, all in one transaction: each `expect` name must hold exactly
    /// that value (`None`: absent), and when `keks` is `Some` the stored KEK versions must be
    /// exactly those given. Any mismatch is `Conflict` and changes nothing. Then each given KEK's
    /// `wrapped` replaces the stored one, `put` secrets are stored (replacing) and `delete`
    /// secrets removed. Durable on return; a crash leaves either the old or the new state.
    async fn change_root_material(&self, change: &RootChange) -> Result<(), StoreError>;

    /// Records an upload in progress, so its blobs can be collected if it never commits.
    async fn begin_upload(
        &self,
        upload_id: &[u8; 16],
        model: &str,
        now: UnixMs,
    ) -> Result<(), StoreError>;
    /// Forgets an upload (after its blobs were deleted).
    async fn end_upload(&self, upload_id: &[u8; 16]) -> Result<(), StoreError>;
    /// Every upload that has not committed (at startup: uploads a crash interrupted).
    async fn pending_uploads(&self) -> Result<Vec<[u8; 16]>, StoreError>;
    /// The uploads that have not committed and started before `started_before`. With replicas
    /// an upload may belong to another live replica, so only old ones are collected at start.
    async fn pending_uploads_before(
        &self,
        started_before: UnixMs,
    ) -> Result<Vec<[u8; 16]>, StoreError>;
    /// The number the next version of `model` would get.
    async fn next_version(&self, model: &str) -> Result<u64, StoreError>;
    /// Makes a version visible and forgets its upload, atomically. `Conflict` if that version
    /// number was taken meanwhile.
    async fn commit_version(&self, v: &VersionRecord) -> Result<(), StoreError>;
    async fn list_models(&self) -> Result<Vec<ModelSummary>, StoreError>;
    /// All versions of a model, oldest first (empty if the model is unknown).
    async fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError>;
    /// One version, or the latest when `version` is `None`.
    async fn get_version(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<Option<VersionRecord>, StoreError>;

    /// Returns whether the rule was new.
    async fn add_rule(&self, rule: &AccessRule) -> Result<bool, StoreError>;
    async fn rules(&self, model: Option<&str>) -> Result<Vec<AccessRule>, StoreError>;

    async fn put_challenge(&self, nonce: &[u8; 32], expires_ms: UnixMs) -> Result<(), StoreError>;
    /// Removes the nonce and returns its expiry; `None` if it was never issued or already used.
    /// Two concurrent callers never both get `Some` (single use).
    async fn take_challenge(&self, nonce: &[u8; 32]) -> Result<Option<UnixMs>, StoreError>;
    /// Deletes challenges and sessions that expired before `now`.
    async fn purge_expired(&self, now: UnixMs) -> Result<(), StoreError>;

    async fn put_session(&self, s: &SessionRecord) -> Result<(), StoreError>;
    async fn get_session(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<SessionRecord>, StoreError>;
    /// Stores evidence content-addressed by its SHA-256 (idempotent).
    async fn put_evidence(&self, sha256: &[u8; 32], evidence: &[u8]) -> Result<(), StoreError>;

    async fn get_evidence(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores a signed checkpoint of the audit log (replacing one of the same size).
    async fn put_checkpoint(&self, cp: &CheckpointRecord) -> Result<(), StoreError>;
    /// The checkpoint with the largest size.
    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRecord>, StoreError>;

    async fn put_grant(&self, g: &GrantRecord) -> Result<(), StoreError>;
    /// Grants, newest first; `live_at` keeps only unrevoked grants not expired at that time.
    async fn grants(
        &self,
        model: Option<&str>,
        node: Option<&str>,
        live_at: Option<UnixMs>,
    ) -> Result<Vec<GrantRecord>, StoreError>;
    /// Records a revocation and marks every grant it covers revoked, atomically; returns how
    /// many grants it invalidated.
    async fn revoke(&self, r: &Revocation) -> Result<u64, StoreError>;
    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    async fn put_proposal(&self, p: &ProposalRecord) -> Result<(), StoreError>;
    async fn get_proposal(&self, id: &str) -> Result<Option<ProposalRecord>, StoreError>;
    async fn proposals(&self, pending_only: bool) -> Result<Vec<ProposalRecord>, StoreError>;
    /// Replaces a proposal only if its stored approvers and state are still `prev`'s (two
    /// admins deciding at once cannot both win); returns whether it was replaced.
    async fn update_proposal(
        &self,
        prev: &ProposalRecord,
        next: &ProposalRecord,
    ) -> Result<bool, StoreError>;
    /// Removes an allow rule; returns whether it existed.
    async fn remove_rule(&self, rule: &AccessRule) -> Result<bool, StoreError>;
    async fn get_grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError>;
    /// A counter that changes after every revocation this store commits (`revoke`,
    /// `destroy_version`), when this process is the only one that can revoke (the embedded
    /// store, held under the data directory's LOCK); `None` for stores other processes also
    /// write (PostgreSQL shared by replicas). A caller that read a grant while the counter had
    /// value `n` and sees `n` again knows no revocation has committed through this store since;
    /// with `None` it must read the grant again. The counter moves only once a revocation's
    /// commit has finished (or failed), also when the caller of `revoke` stopped waiting.
    fn revocation_epoch(&self) -> Option<u64>;
    /// Adds to the bytes a grant has served.
    async fn add_grant_bytes(&self, grant_id: &str, bytes: u64) -> Result<(), StoreError>;

    /// Crypto-shredding, step 1 (docs/keys.md). In one transaction: deletes the version row and
    /// with it the only copy of its wrapped DEK, records the version as destroyed with its blobs
    /// pending collection, adds the revocation `model name@version` (reason `reason`) and marks
    /// every grant of the version revoked. `None` (and no change) if the version does not exist.
    /// Durable on return; from then on the version cannot be granted or read, and its number is
    /// never given to another version (`next_version` counts destroyed versions).
    async fn destroy_version(
        &self,
        model: &str,
        version: u64,
        now: UnixMs,
        reason: &str,
    ) -> Result<Option<DestroyedVersion>, StoreError>;
    /// Destroyed versions whose blobs are not deleted yet (after a crash between the two steps
    /// of a destruction), by version id.
    async fn destroyed_pending_blobs(&self) -> Result<Vec<[u8; 16]>, StoreError>;
    /// Records that every blob of a destroyed version is deleted (crypto-shredding, step 2).
    async fn blobs_collected(&self, _version_id: &[u8; 16]) -> Result<(), StoreError>;
    /// KEK rotation: replaces the wrapped DEK of the version `version_id` only if it is still
    /// wrapped by `from_kek` (compare and swap, one atomic write); returns whether it replaced.
    async fn rewrap_dek(
        &self,
        _version_id: &[u8; 16],
        _from_kek: u32,
        _to_kek: u32,
        _wrapped: &[u8],
    ) -> Result<bool, StoreError>;
    /// Deletes the wrapped KEK `version` only if no model version's DEK is wrapped by it (one
    /// atomic statement); returns whether it was deleted.
    async fn retire_kek(&self, version: u32) -> Result<bool, StoreError>;
}

/// Blob store contract: immutable objects under `/`-separated keys of `[a-z0-9_-]` segments.
///
/// - `put` has written the whole object when it returns, so `get` returns it; a partially
///   written object is never returned by `get`. It need not be durable yet: after a crash an
///   object whose prefix was not synced may be missing, empty or truncated.
/// - `sync_prefix` makes every object put under a prefix before the call durable, data and
///   names (the local backend fsyncs each file and directory once). Call it after the last `put`
///   and before committing metadata that points at the objects; an upload that never reached
///   its commit is deleted at start, whatever state its objects were left in.
/// - `get` of a missing key is `NotFound`.
/// - `open` is `get` for sending an object on: the same object, either as bytes or as an open
///   file of exactly `len` bytes that the sender reads itself (the local backend, so a chunk goes
///   from the page cache straight into the message buffer HTTP/2 sends). A missing key is
///   `NotFound`.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    async fn sync_prefix(&self, prefix: &str) -> Result<(), StoreError>;
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    async fn open(&self, key: &str) -> Result<BlobBody, StoreError>;
    /// Deletes every object under the prefix (missing is fine).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;
}

/// An object opened for sending ([`BlobStore::open`]).
pub enum BlobBody {
    /// The whole object in memory.
    Bytes(Bytes),
    /// An open file holding the object: `len` bytes from offset 0. Objects are immutable, so the
    /// length read at open time stays right while the file is open.
    File { file: std::fs::File, len: u64 },
}

impl BlobBody {
    /// The object's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            BlobBody::Bytes(b) => b.len() as u64,
            BlobBody::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The blob prefix of one model version.
pub fn version_prefix(version_id: &[u8; 16]) -> String {
    format!("v/{}", hex::encode(version_id))
}

/// The blob key of chunk `index` of file `path` in a version.
pub fn chunk_key(version_id: &[u8; 16], path: &str, index: u64) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, path.as_bytes());
    format!(
        "{}/{}/{index}",
        version_prefix(version_id),
        hex::encode(&digest.as_ref()[..16])
    )
}
