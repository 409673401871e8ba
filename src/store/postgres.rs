//! Scale-out metadata backend: PostgreSQL, shared by every replica of a vault. Same semantics
//! as [`super::sqlite`]; what differs is how concurrent writers from several processes are
//! ordered: audit appends serialize on the row lock of `audit_head`, and the sequencer's
//! background duties go to the holder of the `audit_lease` row (docs/architecture.md,
//! Scale-out). Durability is PostgreSQL's commit: [`PgStore::open`] refuses a server that
//! acknowledges commits before they reach its WAL on disk.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};

use super::{
    AccessRule, CheckpointRecord, DestroyedVersion, GrantRecord, KekRecord, MetadataStore,
    ModelSummary, ProposalRecord, Revocation, RevocationKind, RootChange, SessionRecord,
    StoreError, VersionRecord,
};
use crate::time::UnixMs;

/// Key of the transaction-level advisory lock that serializes schema migrations of replicas
/// starting at the same time ("wvschema" in ASCII).
const MIGRATION_LOCK: i64 = 0x7776_7363_6865_6d61;

/// Schema, applied in order; the applied count is the row of `weightvault_schema`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE audit_log (idx BIGINT PRIMARY KEY, entry BYTEA NOT NULL);
CREATE TABLE audit_head (id SMALLINT PRIMARY KEY CHECK (id = 1), size BIGINT NOT NULL);
INSERT INTO audit_head (id, size) VALUES (1, 0);
CREATE TABLE audit_lease (
    id SMALLINT PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, expires_at TIMESTAMPTZ NOT NULL);
CREATE TABLE checkpoints (size BIGINT PRIMARY KEY, root BYTEA NOT NULL, note TEXT NOT NULL,
    created_ms BIGINT NOT NULL);
CREATE TABLE keks (version BIGINT PRIMARY KEY, wrapped BYTEA NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE wrapped_secrets (name TEXT PRIMARY KEY, wrapped BYTEA NOT NULL);
CREATE TABLE uploads (upload_id BYTEA PRIMARY KEY, model TEXT NOT NULL, started_ms BIGINT NOT NULL);
CREATE TABLE versions (
    model TEXT NOT NULL, version BIGINT NOT NULL, version_id BYTEA NOT NULL UNIQUE,
    kek_version BIGINT NOT NULL, wrapped_dek BYTEA NOT NULL, manifest BYTEA NOT NULL,
    manifest_sig BYTEA NOT NULL, total_bytes BIGINT NOT NULL, created_ms BIGINT NOT NULL,
    PRIMARY KEY (model, version));
CREATE TABLE access_rules (
    model TEXT NOT NULL, tee TEXT NOT NULL, measurement TEXT NOT NULL,
    require TEXT NOT NULL DEFAULT '{}', created_ms BIGINT NOT NULL,
    PRIMARY KEY (model, tee, measurement, require));
CREATE TABLE challenges (nonce BYTEA PRIMARY KEY, expires_ms BIGINT NOT NULL);
CREATE TABLE sessions (
    token_sha256 BYTEA PRIMARY KEY, claims_json TEXT NOT NULL, node_public_key BYTEA NOT NULL,
    evidence_sha256 BYTEA NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL);
CREATE TABLE evidence (sha256 BYTEA PRIMARY KEY, bytes BYTEA NOT NULL);
CREATE TABLE grants (
    grant_id TEXT PRIMARY KEY, session_sha256 BYTEA NOT NULL, model TEXT NOT NULL,
    version BIGINT NOT NULL, node_public_key BYTEA NOT NULL, created_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE,
    bytes_served BIGINT NOT NULL DEFAULT 0, instance_id TEXT NOT NULL DEFAULT '',
    tee TEXT NOT NULL DEFAULT '', measurement TEXT NOT NULL DEFAULT '');
CREATE INDEX grants_by_model ON grants (model, version);
CREATE INDEX grants_by_created ON grants (created_ms);
CREATE TABLE revocations (
    kind TEXT NOT NULL, value TEXT NOT NULL, created_ms BIGINT NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (kind, value));
CREATE TABLE proposals (
    id TEXT PRIMARY KEY, operation TEXT NOT NULL, payload TEXT NOT NULL, proposer TEXT NOT NULL,
    approvers TEXT NOT NULL, quorum BIGINT NOT NULL, state TEXT NOT NULL,
    created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL);
"#,
    r#"
CREATE TABLE destroyed_versions (
    version_id BYTEA PRIMARY KEY, model TEXT NOT NULL, version BIGINT NOT NULL,
    destroyed_ms BIGINT NOT NULL, blobs_pending BOOLEAN NOT NULL DEFAULT TRUE);
CREATE INDEX versions_by_kek ON versions (kek_version);
"#,
];

/// Connections per replica unless the URL's pool settings say otherwise.
const POOL_SIZE: u32 = 16;
/// Bound on waiting for a pooled connection: a stuck database fails calls instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PgStore {
    pool: PgPool,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn fixed<const N: usize>(v: Vec<u8>, what: &str) -> Result<[u8; N], StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} has the wrong length")))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`; the password from `PGPASSWORD` or
    /// `~/.pgpass`), checks that commits are durable and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await?;
        let store = Self { pool };
        store.check_durability().await?;
        store.migrate().await?;
        Ok(store)
    }

    /// The contract says a write is durable when it returns: refuse a server configured to
    /// acknowledge commits before they are flushed (PostgreSQL docs, "WAL Configuration":
    /// `fsync` and `synchronous_commit`).
    async fn check_durability(&self) -> Result<(), StoreError> {
        for setting in ["fsync", "synchronous_commit"] {
            let value: String =
                sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                    .bind(setting)
                    .fetch_one(&self.pool)
                    .await?;
            if value == "off" {
                return Err(StoreError::Corrupt(format!(
                    "PostgreSQL has {setting}=off: acknowledged writes could be lost; refusing"
                )));
            }
        }
        Ok(())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Replicas starting together take turns; DDL is transactional in PostgreSQL.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS weightvault_schema (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM weightvault_schema")
                .fetch_one(&mut *tx)
                .await?;
        let applied = usize::try_from(applied.unwrap_or(0)).unwrap_or(usize::MAX);
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema {applied} is newer than this binary ({})",
                MIGRATIONS.len()
            )));
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM weightvault_schema")
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO weightvault_schema (version) VALUES ($1)")
                .bind(i64::try_from(n + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Closes the pool: waits for connections in use and closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn version_from_row(row: &PgRow) -> Result<VersionRecord, StoreError> {
    Ok(VersionRecord {
        model: row.try_get("model")?,
        version: u(row.try_get("version")?),
        version_id: fixed(row.try_get("version_id")?, "version_id")?,
        kek_version: u32::try_from(row.try_get::<i64, _>("kek_version")?)
            .map_err(|_| StoreError::Corrupt("kek_version".into()))?,
        wrapped_dek: row.try_get("wrapped_dek")?,
        manifest: row.try_get("manifest")?,
        manifest_sig: row.try_get("manifest_sig")?,
        total_bytes: u(row.try_get("total_bytes")?),
        created_ms: u(row.try_get("created_ms")?),
    })
}

fn grant_from_row(row: &PgRow) -> Result<GrantRecord, StoreError> {
    Ok(GrantRecord {
        grant_id: row.try_get("grant_id")?,
        session_sha256: fixed(row.try_get("session_sha256")?, "session_sha256")?,
        model: row.try_get("model")?,
        version: u(row.try_get("version")?),
        node_public_key: fixed(row.try_get("node_public_key")?, "node_public_key")?,
        created_ms: u(row.try_get("created_ms")?),
        not_after_ms: u(row.try_get("not_after_ms")?),
        instance_id: row.try_get("instance_id")?,
        tee: row.try_get("tee")?,
        measurement: row.try_get("measurement")?,
        revoked: row.try_get("revoked")?,
        bytes_served: u(row.try_get("bytes_served")?),
    })
}

fn proposal_from_row(r: &PgRow) -> Result<ProposalRecord, StoreError> {
    Ok(ProposalRecord {
        id: r.try_get("id")?,
        operation: r.try_get("operation")?,
        payload: r.try_get("payload")?,
        proposer: r.try_get("proposer")?,
        approvers: serde_json::from_str(&r.try_get::<String, _>("approvers")?)
            .map_err(|e| StoreError::Corrupt(format!("proposal approvers: {e}")))?,
        quorum: u32::try_from(r.try_get::<i64, _>("quorum")?)
            .map_err(|_| StoreError::Corrupt("proposal quorum".into()))?,
        state: r.try_get("state")?,
        created_ms: u(r.try_get("created_ms")?),
        expires_ms: u(r.try_get("expires_ms")?),
    })
}

const VERSION_COLS: &str = "model, version, version_id, kek_version, wrapped_dek, manifest, \
                            manifest_sig, total_bytes, created_ms";

const GRANT_COLS: &str = "grant_id, session_sha256, model, version, node_public_key, created_ms, \
                          not_after_ms, revoked, bytes_served, instance_id, tee, measurement";

/// Rows per multi-row INSERT of audit entries (two bind parameters each, far below the
/// protocol's 65535).
const APPEND_ROWS: usize = 500;

#[async_trait]
impl MetadataStore for PgStore {
    async fn append_audit(&self, entries: &[Vec<u8>]) -> Result<u64, StoreError> {
        let n = i(entries.len() as u64);
        let mut tx = self.pool.begin().await?;
        // The row lock on audit_head is held until commit: appends from every replica take
        // turns, and each one sees the size its predecessor committed (READ COMMITTED
        // re-reads the updated row), so indexes are consecutive with no gaps or duplicates.
        let size: i64 = sqlx::query_scalar(
            "UPDATE audit_head SET size = size + $1 WHERE id = 1 RETURNING size - $1",
        )
        .bind(n)
        .fetch_one(&mut *tx)
        .await?;
        for (c, chunk) in entries.chunks(APPEND_ROWS).enumerate() {
            let mut q =
                sqlx::QueryBuilder::<sqlx::Postgres>::new("INSERT INTO audit_log (idx, entry) ");
            q.push_values(chunk.iter().enumerate(), |mut row, (k, e)| {
                row.push_bind(size + i((c * APPEND_ROWS + k) as u64))
                    .push_bind(e.as_slice());
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(u(size))
    }

    async fn audit_entries(
        &self,
        start: u64,
        end: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT idx, entry FROM audit_log WHERE idx >= $1 AND idx < $2 ORDER BY idx LIMIT $3",
        )
        .bind(i(start))
        .bind(i(end))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((u(r.try_get("idx")?), r.try_get("entry")?)))
            .collect()
    }

    async fn audit_size(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT size FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(u(n))
    }

    async fn audit_lease(&self, holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        // The database clock decides expiry, so replicas' clocks need not agree.
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO audit_lease (id, holder, expires_at) \
             VALUES (1, $1, clock_timestamp() + $2 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
             WHERE audit_lease.holder = EXCLUDED.holder OR audit_lease.expires_at <= clock_timestamp() \
             RETURNING holder",
        )
        .bind(holder)
        .bind(i(ttl_ms))
        .fetch_optional(&self.pool)
        .await?;
        Ok(got.is_some() && ttl_ms > 0)
    }

    async fn keks(&self) -> Result<Vec<KekRecord>, StoreError> {
        let rows = sqlx::query("SELECT version, wrapped, created_ms FROM keks ORDER BY version")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(KekRecord {
                    version: u32::try_from(r.try_get::<i64, _>("version")?)
                        .map_err(|_| StoreError::Corrupt("kek version".into()))?,
                    wrapped: r.try_get("wrapped")?,
                    created_ms: u(r.try_get("created_ms")?),
                })
            })
            .collect()
    }

    async fn insert_kek(&self, kek: &KekRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO keks (version, wrapped, created_ms) VALUES ($1, $2, $3)")
            .bind(i64::from(kek.version))
            .bind(kek.wrapped.as_slice())
            .bind(i(kek.created_ms))
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict("kek version exists")
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    async fn get_wrapped_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT wrapped FROM wrapped_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn put_wrapped_secret_if_absent(
        &self,
        name: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO wrapped_secrets (name, wrapped) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(wrapped)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn begin_upload(
        &self,
        upload_id: &[u8; 16],
        model: &str,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO uploads (upload_id, model, started_ms) VALUES ($1, $2, $3)")
            .bind(upload_id.as_slice())
            .bind(model)
            .bind(i(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn end_upload(&self, upload_id: &[u8; 16]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM uploads WHERE upload_id = $1")
            .bind(upload_id.as_slice())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn pending_uploads(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT upload_id FROM uploads")
            .fetch_all(&self.pool)
            .await?;
        ids.into_iter().map(|v| fixed(v, "upload_id")).collect()
    }

    async fn pending_uploads_before(
        &self,
        started_before: UnixMs,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT upload_id FROM uploads WHERE started_ms < $1")
                .bind(i(started_before))
                .fetch_all(&self.pool)
                .await?;
        ids.into_iter().map(|v| fixed(v, "upload_id")).collect()
    }

    async fn next_version(&self, model: &str) -> Result<u64, StoreError> {
        // Destroyed versions count: a version number is never reused for other weights.
        let max: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM versions WHERE model = $1 \
             UNION ALL SELECT MAX(version) FROM destroyed_versions WHERE model = $1) AS m",
        )
        .bind(model)
        .fetch_one(&self.pool)
        .await?;
        Ok(u(max.unwrap_or(0)) + 1)
    }

    async fn commit_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let insert = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO versions ({VERSION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )))
        .bind(&v.model)
        .bind(i(v.version))
        .bind(v.version_id.as_slice())
        .bind(i64::from(v.kek_version))
        .bind(v.wrapped_dek.as_slice())
        .bind(v.manifest.as_slice())
        .bind(v.manifest_sig.as_slice())
        .bind(i(v.total_bytes))
        .bind(i(v.created_ms))
        .execute(&mut *tx)
        .await;
        match insert {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict("version number taken"));
            }
            other => {
                other?;
            }
        }
        sqlx::query("DELETE FROM uploads WHERE upload_id = $1")
            .bind(v.version_id.as_slice())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_models(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, MAX(version) AS latest, COUNT(*) AS n FROM versions \
             GROUP BY model ORDER BY model",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ModelSummary {
                    name: r.try_get("model")?,
                    latest_version: u(r.try_get("latest")?),
                    versions: u32::try_from(r.try_get::<i64, _>("n")?).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VERSION_COLS} FROM versions WHERE model = $1 ORDER BY version"
        )))
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    async fn get_version(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let row = match version {
            Some(v) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {VERSION_COLS} FROM versions WHERE model = $1 AND version = $2"
                )))
                .bind(model)
                .bind(i(v))
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {VERSION_COLS} FROM versions WHERE model = $1 \
                     ORDER BY version DESC LIMIT 1"
                )))
                .bind(model)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.as_ref().map(version_from_row).transpose()
    }

    async fn add_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO access_rules (model, tee, measurement, require, created_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&rule.model)
        .bind(&rule.tee)
        .bind(&rule.measurement)
        // A BTreeMap serializes with sorted keys: one text per set of requirements.
        .bind(serde_json::to_string(&rule.require).expect("map serializes"))
        .bind(i(rule.created_ms))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn rules(&self, model: Option<&str>) -> Result<Vec<AccessRule>, StoreError> {
        // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        let rows = sqlx::query(
            "SELECT model, tee, measurement, require, created_ms FROM access_rules \
             WHERE $1::text IS NULL OR model = $1 \
             ORDER BY model COLLATE \"C\", tee COLLATE \"C\", measurement COLLATE \"C\", require COLLATE \"C\"",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AccessRule {
                    model: r.try_get("model")?,
                    tee: r.try_get("tee")?,
                    measurement: r.try_get("measurement")?,
                    require: serde_json::from_str(&r.try_get::<String, _>("require")?)
                        .map_err(|e| StoreError::Corrupt(format!("rule requirements: {e}")))?,
                    created_ms: u(r.try_get("created_ms")?),
                })
            })
            .collect()
    }

    async fn put_challenge(&self, nonce: &[u8; 32], expires_ms: UnixMs) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO challenges (nonce, expires_ms) VALUES ($1, $2)")
            .bind(nonce.as_slice())
            .bind(i(expires_ms))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn take_challenge(&self, nonce: &[u8; 32]) -> Result<Option<UnixMs>, StoreError> {
        // One DELETE ... RETURNING: of two concurrent takers (on any replica) only the one
        // whose delete removed the row gets it; the other waits on the row lock, then finds
        // nothing.
        let expires: Option<i64> =
            sqlx::query_scalar("DELETE FROM challenges WHERE nonce = $1 RETURNING expires_ms")
                .bind(nonce.as_slice())
                .fetch_optional(&self.pool)
                .await?;
        Ok(expires.map(u))
    }

    async fn purge_expired(&self, now: UnixMs) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM challenges WHERE expires_ms < $1")
            .bind(i(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE expires_ms < $1")
            .bind(i(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (token_sha256, claims_json, node_public_key, evidence_sha256, \
             created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.token_sha256.as_slice())
        .bind(&s.claims_json)
        .bind(s.node_public_key.as_slice())
        .bind(s.evidence_sha256.as_slice())
        .bind(i(s.created_ms))
        .bind(i(s.expires_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_session(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT token_sha256, claims_json, node_public_key, evidence_sha256, created_ms, \
             expires_ms FROM sessions WHERE token_sha256 = $1",
        )
        .bind(token_sha256.as_slice())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SessionRecord {
                token_sha256: fixed(r.try_get("token_sha256")?, "token")?,
                claims_json: r.try_get("claims_json")?,
                node_public_key: fixed(r.try_get("node_public_key")?, "node_public_key")?,
                evidence_sha256: fixed(r.try_get("evidence_sha256")?, "evidence_sha256")?,
                created_ms: u(r.try_get("created_ms")?),
                expires_ms: u(r.try_get("expires_ms")?),
            })
        })
        .transpose()
    }

    async fn put_evidence(&self, sha256: &[u8; 32], evidence: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO evidence (sha256, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(sha256.as_slice())
            .bind(evidence)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_evidence(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT bytes FROM evidence WHERE sha256 = $1")
                .bind(sha256.as_slice())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn put_checkpoint(&self, cp: &CheckpointRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (size, root, note, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (size) DO UPDATE SET root = EXCLUDED.root, note = EXCLUDED.note, \
             created_ms = EXCLUDED.created_ms",
        )
        .bind(i(cp.size))
        .bind(cp.root.as_slice())
        .bind(&cp.note)
        .bind(i(cp.created_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT size, root, note, created_ms FROM checkpoints ORDER BY size DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(CheckpointRecord {
                size: u(r.try_get("size")?),
                root: fixed(r.try_get("root")?, "checkpoint root")?,
                note: r.try_get("note")?,
                created_ms: u(r.try_get("created_ms")?),
            })
        })
        .transpose()
    }

    async fn put_grant(&self, g: &GrantRecord) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO grants ({GRANT_COLS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        )))
        .bind(&g.grant_id)
        .bind(g.session_sha256.as_slice())
        .bind(&g.model)
        .bind(i(g.version))
        .bind(g.node_public_key.as_slice())
        .bind(i(g.created_ms))
        .bind(i(g.not_after_ms))
        .bind(g.revoked)
        .bind(i(g.bytes_served))
        .bind(&g.instance_id)
        .bind(&g.tee)
        .bind(&g.measurement)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn grants(
        &self,
        model: Option<&str>,
        node: Option<&str>,
        live_at: Option<UnixMs>,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLS} FROM grants WHERE ($1::text IS NULL OR model = $1) \
             AND ($2::text IS NULL OR instance_id = $2) \
             AND ($3::bigint IS NULL OR (NOT revoked AND not_after_ms > $3)) \
             ORDER BY created_ms DESC LIMIT 10000"
        )))
        .bind(model)
        .bind(node)
        .bind(live_at.map(i))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(grant_from_row).collect()
    }

    async fn revoke(&self, r: &Revocation) -> Result<u64, StoreError> {
        // Parse before anything is written: bad input changes nothing.
        let versioned = match (r.kind, r.value.split_once('@')) {
            (RevocationKind::Model, Some((m, v))) => {
                let v: i64 = v
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("revocation value {:?}", r.value)))?;
                Some((m.to_string(), v))
            }
            _ => None,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO revocations (kind, value, created_ms, reason) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (kind, value) DO UPDATE SET created_ms = EXCLUDED.created_ms, \
             reason = EXCLUDED.reason",
        )
        .bind(r.kind.as_str())
        .bind(&r.value)
        .bind(i(r.created_ms))
        .bind(&r.reason)
        .execute(&mut *tx)
        .await?;
        let update = match (r.kind, versioned) {
            (RevocationKind::Grant, _) => {
                sqlx::query("UPDATE grants SET revoked = TRUE WHERE NOT revoked AND grant_id = $1")
                    .bind(&r.value)
            }
            (RevocationKind::Node, _) => sqlx::query(
                "UPDATE grants SET revoked = TRUE WHERE NOT revoked AND instance_id = $1",
            )
            .bind(&r.value),
            (RevocationKind::Measurement, _) => sqlx::query(
                "UPDATE grants SET revoked = TRUE WHERE NOT revoked AND measurement = $1",
            )
            .bind(&r.value),
            (RevocationKind::Model, Some((m, v))) => sqlx::query(
                "UPDATE grants SET revoked = TRUE WHERE NOT revoked AND model = $1 AND version = $2",
            )
            .bind(m)
            .bind(v),
            (RevocationKind::Model, None) => {
                sqlx::query("UPDATE grants SET revoked = TRUE WHERE NOT revoked AND model = $1")
                    .bind(&r.value)
            }
        };
        let n = update.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, value, created_ms, reason FROM revocations \
             ORDER BY created_ms, kind COLLATE \"C\", value COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(Revocation {
                    kind: RevocationKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("revocation kind {kind:?}")))?,
                    value: r.try_get("value")?,
                    created_ms: u(r.try_get("created_ms")?),
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    async fn put_proposal(&self, p: &ProposalRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO proposals (id, operation, payload, proposer, approvers, quorum, state, \
             created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&p.id)
        .bind(&p.operation)
        .bind(&p.payload)
        .bind(&p.proposer)
        .bind(serde_json::to_string(&p.approvers).expect("list serializes"))
        .bind(i64::from(p.quorum))
        .bind(&p.state)
        .bind(i(p.created_ms))
        .bind(i(p.expires_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_proposal(&self, id: &str) -> Result<Option<ProposalRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM proposals WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(proposal_from_row).transpose()
    }

    async fn proposals(&self, pending_only: bool) -> Result<Vec<ProposalRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM proposals WHERE NOT $1 OR state = 'pending' \
             ORDER BY created_ms DESC LIMIT 1000",
        )
        .bind(pending_only)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(proposal_from_row).collect()
    }

    async fn update_proposal(
        &self,
        prev: &ProposalRecord,
        next: &ProposalRecord,
    ) -> Result<bool, StoreError> {
        // One conditional UPDATE: the row lock makes a concurrent decider on another replica
        // re-check the condition against this one's result and match nothing.
        let r = sqlx::query(
            "UPDATE proposals SET approvers = $1, state = $2 \
             WHERE id = $3 AND approvers = $4 AND state = $5",
        )
        .bind(serde_json::to_string(&next.approvers).expect("list serializes"))
        .bind(&next.state)
        .bind(&prev.id)
        .bind(serde_json::to_string(&prev.approvers).expect("list serializes"))
        .bind(&prev.state)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn remove_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "DELETE FROM access_rules WHERE model = $1 AND tee = $2 AND measurement = $3 \
             AND require = $4",
        )
        .bind(&rule.model)
        .bind(&rule.tee)
        .bind(&rule.measurement)
        .bind(serde_json::to_string(&rule.require).expect("map serializes"))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    fn revocation_epoch(&self) -> Option<u64> {
        // Other replicas revoke too: every check reads the grant row.
        None
    }

    async fn get_grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {GRANT_COLS} FROM grants WHERE grant_id = $1"
        )))
        .bind(grant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(grant_from_row).transpose()
    }

    async fn add_grant_bytes(&self, grant_id: &str, bytes: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE grants SET bytes_served = bytes_served + $1 WHERE grant_id = $2")
            .bind(i(bytes))
            .bind(grant_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn change_root_material(&self, change: &RootChange) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // SHARE ROW EXCLUSIVE conflicts with itself and with every write: root changes from
        // several replicas (and KEK or secret inserts) take turns, so the checks below still
        // hold when the writes commit.
        sqlx::query("LOCK TABLE keks, wrapped_secrets IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        for (name, want) in &change.expect {
            let have: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT wrapped FROM wrapped_secrets WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?;
            if have.as_deref() != want.as_deref() {
                return Err(StoreError::Conflict("root material changed meanwhile"));
            }
        }
        if let Some(keks) = &change.keks {
            let stored: Vec<i64> = sqlx::query_scalar("SELECT version FROM keks ORDER BY version")
                .fetch_all(&mut *tx)
                .await?;
            let mut given: Vec<i64> = keks.iter().map(|k| i64::from(k.version)).collect();
            given.sort_unstable();
            if stored != given {
                return Err(StoreError::Conflict("the KEK versions changed meanwhile"));
            }
            for k in keks {
                sqlx::query("UPDATE keks SET wrapped = $1 WHERE version = $2")
                    .bind(k.wrapped.as_slice())
                    .bind(i64::from(k.version))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for (name, value) in &change.put {
            sqlx::query(
                "INSERT INTO wrapped_secrets (name, wrapped) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET wrapped = EXCLUDED.wrapped",
            )
            .bind(name)
            .bind(value.as_slice())
            .execute(&mut *tx)
            .await?;
        }
        for name in &change.delete {
            sqlx::query("DELETE FROM wrapped_secrets WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn destroy_version(
        &self,
        model: &str,
        version: u64,
        now: UnixMs,
        reason: &str,
    ) -> Result<Option<DestroyedVersion>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let id: Option<Vec<u8>> = sqlx::query_scalar(
            "DELETE FROM versions WHERE model = $1 AND version = $2 RETURNING version_id",
        )
        .bind(model)
        .bind(i(version))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let version_id: [u8; 16] = fixed(id, "version_id")?;
        sqlx::query(
            "INSERT INTO destroyed_versions (version_id, model, version, destroyed_ms, blobs_pending) \
             VALUES ($1, $2, $3, $4, TRUE)",
        )
        .bind(version_id.as_slice())
        .bind(model)
        .bind(i(version))
        .bind(i(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO revocations (kind, value, created_ms, reason) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (kind, value) DO UPDATE SET created_ms = EXCLUDED.created_ms, \
             reason = EXCLUDED.reason",
        )
        .bind(RevocationKind::Model.as_str())
        .bind(format!("{model}@{version}"))
        .bind(i(now))
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let grants_revoked = sqlx::query(
            "UPDATE grants SET revoked = TRUE WHERE NOT revoked AND model = $1 AND version = $2",
        )
        .bind(model)
        .bind(i(version))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Some(DestroyedVersion {
            model: model.to_string(),
            version,
            version_id,
            destroyed_ms: now,
            grants_revoked,
        }))
    }

    async fn destroyed_pending_blobs(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT version_id FROM destroyed_versions WHERE blobs_pending")
                .fetch_all(&self.pool)
                .await?;
        ids.into_iter().map(|v| fixed(v, "version_id")).collect()
    }

    async fn blobs_collected(&self, version_id: &[u8; 16]) -> Result<(), StoreError> {
        sqlx::query("UPDATE destroyed_versions SET blobs_pending = FALSE WHERE version_id = $1")
            .bind(version_id.as_slice())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn rewrap_dek(
        &self,
        version_id: &[u8; 16],
        from_kek: u32,
        to_kek: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        // One conditional UPDATE: a concurrent rewrap on another replica re-checks kek_version
        // after this one commits and matches nothing.
        let r = sqlx::query(
            "UPDATE versions SET kek_version = $1, wrapped_dek = $2 \
             WHERE version_id = $3 AND kek_version = $4",
        )
        .bind(i64::from(to_kek))
        .bind(wrapped)
        .bind(version_id.as_slice())
        .bind(i64::from(from_kek))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn retire_kek(&self, version: u32) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // SHARE mode waits for the writers of `versions` in flight and holds off new ones until
        // commit, so the check sees every version wrapped by this KEK, as SQLite's single
        // writer does; without it a version written under this KEK meanwhile could be missed.
        sqlx::query("LOCK TABLE versions IN SHARE MODE")
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query(
            "DELETE FROM keks WHERE version = $1 \
             AND NOT EXISTS (SELECT 1 FROM versions WHERE kek_version = $1)",
        )
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }
}
