//! Embedded metadata backend: one SQLite file in the data directory, WAL journal with
//! `synchronous=FULL`, so a committed transaction survives a power cut.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{
    AccessRule, CheckpointRecord, DestroyedVersion, GrantRecord, KekRecord, MetadataStore,
    ModelSummary, ProposalRecord, Revocation, RevocationKind, SessionRecord, StoreError,
    VersionRecord,
};
use crate::time::UnixMs;

/// Schema, applied in order; the applied count is kept in `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE audit_log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE keks (version INTEGER PRIMARY KEY, wrapped BLOB NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE wrapped_secrets (name TEXT PRIMARY KEY, wrapped BLOB NOT NULL);
CREATE TABLE uploads (upload_id BLOB PRIMARY KEY, model TEXT NOT NULL, started_ms INTEGER NOT NULL);
CREATE TABLE versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, version_id BLOB NOT NULL UNIQUE,
    kek_version INTEGER NOT NULL, wrapped_dek BLOB NOT NULL, manifest BLOB NOT NULL,
    manifest_sig BLOB NOT NULL, total_bytes INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (model, version));
CREATE TABLE access_rules (
    model TEXT NOT NULL, tee TEXT NOT NULL, measurement TEXT NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (model, tee, measurement));
CREATE TABLE challenges (nonce BLOB PRIMARY KEY, expires_ms INTEGER NOT NULL);
CREATE TABLE sessions (
    token_sha256 BLOB PRIMARY KEY, claims_json TEXT NOT NULL, node_public_key BLOB NOT NULL,
    evidence_sha256 BLOB NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
CREATE TABLE evidence (sha256 BLOB PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE grants (
    grant_id TEXT PRIMARY KEY, session_sha256 BLOB NOT NULL, model TEXT NOT NULL,
    version INTEGER NOT NULL, node_public_key BLOB NOT NULL, created_ms INTEGER NOT NULL,
    not_after_ms INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
    bytes_served INTEGER NOT NULL DEFAULT 0);
"#,
    r#"
CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL, note TEXT NOT NULL,
    created_ms INTEGER NOT NULL);
"#,
    r#"
CREATE TABLE access_rules_v3 (
    model TEXT NOT NULL, tee TEXT NOT NULL, measurement TEXT NOT NULL,
    require TEXT NOT NULL DEFAULT '{}', created_ms INTEGER NOT NULL,
    PRIMARY KEY (model, tee, measurement, require));
INSERT INTO access_rules_v3 (model, tee, measurement, require, created_ms)
    SELECT model, tee, measurement, '{}', created_ms FROM access_rules;
DROP TABLE access_rules;
ALTER TABLE access_rules_v3 RENAME TO access_rules;
"#,
    r#"
ALTER TABLE grants ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
ALTER TABLE grants ADD COLUMN tee TEXT NOT NULL DEFAULT '';
ALTER TABLE grants ADD COLUMN measurement TEXT NOT NULL DEFAULT '';
CREATE INDEX grants_by_model ON grants (model, version);
CREATE TABLE revocations (
    kind TEXT NOT NULL, value TEXT NOT NULL, created_ms INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (kind, value));
"#,
    r#"
CREATE TABLE proposals (
    id TEXT PRIMARY KEY, operation TEXT NOT NULL, payload TEXT NOT NULL, proposer TEXT NOT NULL,
    approvers TEXT NOT NULL, quorum INTEGER NOT NULL, state TEXT NOT NULL,
    created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
"#,
    r#"
CREATE TABLE destroyed_versions (
    version_id BLOB PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL,
    destroyed_ms INTEGER NOT NULL, blobs_pending INTEGER NOT NULL DEFAULT 1);
CREATE INDEX versions_by_kek ON versions (kek_version);
"#,
];

/// Every write transaction starts with `BEGIN IMMEDIATE`: it takes the write lock up front and
/// waits for it (busy timeout). A deferred transaction that reads and then writes would fail at
/// once with SQLITE_BUSY whenever another connection committed in between (WAL snapshot rule).
pub struct SqliteStore {
    pool: SqlitePool,
    /// [`MetadataStore::revocation_epoch`]: bumped when a revocation's transaction has ended.
    revocations: Arc<AtomicU64>,
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

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit is fsynced before it returns (durability rule, docs/architecture.md).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let store = Self {
            pool,
            revocations: Arc::new(AtomicU64::new(0)),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let applied: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        let applied = usize::try_from(applied).unwrap_or(usize::MAX);
        if applied > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema {applied} is newer than this binary ({})",
                MIGRATIONS.len()
            )));
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PRAGMA user_version = {}",
                n + 1
            )))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn version_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<VersionRecord, StoreError> {
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

    fn grant_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<GrantRecord, StoreError> {
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
            revoked: row.try_get::<i64, _>("revoked")? != 0,
            bytes_served: u(row.try_get("bytes_served")?),
        })
    }
}

fn proposal_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ProposalRecord, StoreError> {
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

impl SqliteStore {
    /// Runs a transaction that revokes grants in its own task, so that it finishes even when
    /// the caller stops waiting, and moves the revocation epoch once it has ended, committed or
    /// not: a stream that read a grant before the commit then reads it again.
    async fn revoking<T: Send + 'static>(
        &self,
        tx: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let epoch = self.revocations.clone();
        tokio::spawn(async move {
            let out = tx.await;
            epoch.fetch_add(1, Ordering::SeqCst);
            out
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
    }
}

#[async_trait]
impl MetadataStore for SqliteStore {
    async fn append_audit(&self, entries: &[Vec<u8>]) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let size: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_log")
            .fetch_one(&mut *tx)
            .await?;
        // One multi-row INSERT per 500 entries: a statement is a round trip to sqlx's worker
        // thread, which dominated group commits of one INSERT per entry (docs/performance.md).
        for (c, chunk) in entries.chunks(500).enumerate() {
            let mut q =
                sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO audit_log (idx, entry) ");
            q.push_values(chunk.iter().enumerate(), |mut row, (n, e)| {
                row.push_bind(size + i((c * 500 + n) as u64))
                    .push_bind(e.clone());
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
            "SELECT idx, entry FROM audit_log WHERE idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
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
        let n: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_log")
            .fetch_one(&self.pool)
            .await?;
        Ok(u(n))
    }

    async fn audit_lease(&self, _holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        // One vault per data directory (its LOCK file): the only sequencer always holds it.
        Ok(ttl_ms > 0)
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
        sqlx::query("INSERT INTO keks (version, wrapped, created_ms) VALUES (?, ?, ?)")
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
            sqlx::query_scalar("SELECT wrapped FROM wrapped_secrets WHERE name = ?")
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
        let r = sqlx::query("INSERT OR IGNORE INTO wrapped_secrets (name, wrapped) VALUES (?, ?)")
            .bind(name)
            .bind(wrapped)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn change_root_material(&self, change: &super::RootChange) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (name, want) in &change.expect {
            let have: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT wrapped FROM wrapped_secrets WHERE name = ?")
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
                sqlx::query("UPDATE keks SET wrapped = ? WHERE version = ?")
                    .bind(k.wrapped.as_slice())
                    .bind(i64::from(k.version))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for (name, value) in &change.put {
            sqlx::query("INSERT OR REPLACE INTO wrapped_secrets (name, wrapped) VALUES (?, ?)")
                .bind(name)
                .bind(value.as_slice())
                .execute(&mut *tx)
                .await?;
        }
        for name in &change.delete {
            sqlx::query("DELETE FROM wrapped_secrets WHERE name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin_upload(
        &self,
        upload_id: &[u8; 16],
        model: &str,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO uploads (upload_id, model, started_ms) VALUES (?, ?, ?)")
            .bind(upload_id.as_slice())
            .bind(model)
            .bind(i(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn end_upload(&self, upload_id: &[u8; 16]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM uploads WHERE upload_id = ?")
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
            sqlx::query_scalar("SELECT upload_id FROM uploads WHERE started_ms < ?")
                .bind(i(started_before))
                .fetch_all(&self.pool)
                .await?;
        ids.into_iter().map(|v| fixed(v, "upload_id")).collect()
    }

    async fn next_version(&self, model: &str) -> Result<u64, StoreError> {
        // Destroyed versions count: a version number is never reused for other weights.
        let max: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM versions WHERE model = ?1 \
             UNION ALL SELECT MAX(version) FROM destroyed_versions WHERE model = ?1)",
        )
        .bind(model)
        .fetch_one(&self.pool)
        .await?;
        Ok(u(max.unwrap_or(0)) + 1)
    }

    async fn commit_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let insert = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO versions ({VERSION_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
        sqlx::query("DELETE FROM uploads WHERE upload_id = ?")
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
            "SELECT {VERSION_COLS} FROM versions WHERE model = ? ORDER BY version"
        )))
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::version_from_row).collect()
    }

    async fn get_version(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let row = match version {
            Some(v) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {VERSION_COLS} FROM versions WHERE model = ? AND version = ?"
                )))
                .bind(model)
                .bind(i(v))
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {VERSION_COLS} FROM versions WHERE model = ? \
                     ORDER BY version DESC LIMIT 1"
                )))
                .bind(model)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.as_ref().map(Self::version_from_row).transpose()
    }

    async fn add_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT OR IGNORE INTO access_rules (model, tee, measurement, require, created_ms) \
             VALUES (?, ?, ?, ?, ?)",
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
        let rows = sqlx::query(
            "SELECT model, tee, measurement, require, created_ms FROM access_rules \
             WHERE ?1 IS NULL OR model = ?1 ORDER BY model, tee, measurement, require",
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
        sqlx::query("INSERT INTO challenges (nonce, expires_ms) VALUES (?, ?)")
            .bind(nonce.as_slice())
            .bind(i(expires_ms))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn take_challenge(&self, nonce: &[u8; 32]) -> Result<Option<UnixMs>, StoreError> {
        // DELETE ... RETURNING is one statement: of two concurrent takers only one sees the row.
        let expires: Option<i64> =
            sqlx::query_scalar("DELETE FROM challenges WHERE nonce = ? RETURNING expires_ms")
                .bind(nonce.as_slice())
                .fetch_optional(&self.pool)
                .await?;
        Ok(expires.map(u))
    }

    async fn purge_expired(&self, now: UnixMs) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM challenges WHERE expires_ms < ?")
            .bind(i(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE expires_ms < ?")
            .bind(i(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (token_sha256, claims_json, node_public_key, evidence_sha256, \
             created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
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
             expires_ms FROM sessions WHERE token_sha256 = ?",
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
        sqlx::query("INSERT OR IGNORE INTO evidence (sha256, bytes) VALUES (?, ?)")
            .bind(sha256.as_slice())
            .bind(evidence)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_evidence(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT bytes FROM evidence WHERE sha256 = ?")
                .bind(sha256.as_slice())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn put_checkpoint(&self, cp: &CheckpointRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT OR REPLACE INTO checkpoints (size, root, note, created_ms) VALUES (?, ?, ?, ?)",
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
        sqlx::query(
            "INSERT INTO grants (grant_id, session_sha256, model, version, node_public_key, \
             created_ms, not_after_ms, revoked, bytes_served, instance_id, tee, measurement) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&g.grant_id)
        .bind(g.session_sha256.as_slice())
        .bind(&g.model)
        .bind(i(g.version))
        .bind(g.node_public_key.as_slice())
        .bind(i(g.created_ms))
        .bind(i(g.not_after_ms))
        .bind(i64::from(g.revoked))
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
        let rows = sqlx::query(
            "SELECT * FROM grants WHERE (?1 IS NULL OR model = ?1) AND (?2 IS NULL OR instance_id = ?2) \
             AND (?3 IS NULL OR (revoked = 0 AND not_after_ms > ?3)) ORDER BY created_ms DESC LIMIT 10000",
        )
        .bind(model)
        .bind(node)
        .bind(live_at.map(i))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::grant_from_row).collect()
    }

    async fn revoke(&self, r: &Revocation) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        let r = r.clone();
        self.revoking(async move { revoke_tx(&pool, &r).await })
            .await
    }

    fn revocation_epoch(&self) -> Option<u64> {
        Some(self.revocations.load(Ordering::SeqCst))
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query("SELECT kind, value, created_ms, reason FROM revocations ORDER BY created_ms, kind, value")
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
             created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        let row = sqlx::query("SELECT * FROM proposals WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(proposal_from_row).transpose()
    }

    async fn proposals(&self, pending_only: bool) -> Result<Vec<ProposalRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM proposals WHERE ?1 = 0 OR state = 'pending' ORDER BY created_ms DESC LIMIT 1000",
        )
        .bind(i64::from(pending_only))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(proposal_from_row).collect()
    }

    async fn update_proposal(
        &self,
        prev: &ProposalRecord,
        next: &ProposalRecord,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE proposals SET approvers = ?, state = ? WHERE id = ? AND approvers = ? AND state = ?",
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
        let r = sqlx::query("DELETE FROM access_rules WHERE model = ? AND tee = ? AND measurement = ? AND require = ?")
            .bind(&rule.model)
            .bind(&rule.tee)
            .bind(&rule.measurement)
            .bind(serde_json::to_string(&rule.require).expect("map serializes"))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn get_grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM grants WHERE grant_id = ?")
            .bind(grant_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::grant_from_row).transpose()
    }

    async fn add_grant_bytes(&self, grant_id: &str, bytes: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE grants SET bytes_served = bytes_served + ? WHERE grant_id = ?")
            .bind(i(bytes))
            .bind(grant_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn destroy_version(
        &self,
        model: &str,
        version: u64,
        now: UnixMs,
        reason: &str,
    ) -> Result<Option<DestroyedVersion>, StoreError> {
        let pool = self.pool.clone();
        let model = model.to_string();
        let reason = reason.to_string();
        self.revoking(async move { destroy_tx(&pool, &model, version, now, &reason).await })
            .await
    }

    async fn destroyed_pending_blobs(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        let ids: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT version_id FROM destroyed_versions WHERE blobs_pending = 1")
                .fetch_all(&self.pool)
                .await?;
        ids.into_iter().map(|v| fixed(v, "version_id")).collect()
    }

    async fn blobs_collected(&self, version_id: &[u8; 16]) -> Result<(), StoreError> {
        sqlx::query("UPDATE destroyed_versions SET blobs_pending = 0 WHERE version_id = ?")
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
        let r = sqlx::query(
            "UPDATE versions SET kek_version = ?, wrapped_dek = ? \
             WHERE version_id = ? AND kek_version = ?",
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
        let r = sqlx::query(
            "DELETE FROM keks WHERE version = ?1 \
             AND NOT EXISTS (SELECT 1 FROM versions WHERE kek_version = ?1)",
        )
        .bind(i64::from(version))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// The transaction of [`SqliteStore::revoke`].
async fn revoke_tx(pool: &SqlitePool, r: &Revocation) -> Result<u64, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "INSERT OR REPLACE INTO revocations (kind, value, created_ms, reason) VALUES (?, ?, ?, ?)",
    )
    .bind(r.kind.as_str())
    .bind(&r.value)
    .bind(i(r.created_ms))
    .bind(&r.reason)
    .execute(&mut *tx)
    .await?;
    let update = match r.kind {
        RevocationKind::Grant => {
            sqlx::query("UPDATE grants SET revoked = 1 WHERE revoked = 0 AND grant_id = ?")
                .bind(&r.value)
        }
        RevocationKind::Node => {
            sqlx::query("UPDATE grants SET revoked = 1 WHERE revoked = 0 AND instance_id = ?")
                .bind(&r.value)
        }
        RevocationKind::Measurement => {
            sqlx::query("UPDATE grants SET revoked = 1 WHERE revoked = 0 AND measurement = ?")
                .bind(&r.value)
        }
        RevocationKind::Model => {
            match r.value.split_once('@') {
                Some((m, v)) => {
                    let v: i64 = v.parse().map_err(|_| {
                        StoreError::Corrupt(format!("revocation value {:?}", r.value))
                    })?;
                    sqlx::query("UPDATE grants SET revoked = 1 WHERE revoked = 0 AND model = ? AND version = ?").bind(m.to_string()).bind(v)
                }
                None => {
                    sqlx::query("UPDATE grants SET revoked = 1 WHERE revoked = 0 AND model = ?")
                        .bind(&r.value)
                }
            }
        }
    };
    let n = update.execute(&mut *tx).await?.rows_affected();
    tx.commit().await?;
    Ok(n)
}

/// The transaction of [`SqliteStore::destroy_version`].
async fn destroy_tx(
    pool: &SqlitePool,
    model: &str,
    version: u64,
    now: UnixMs,
    reason: &str,
) -> Result<Option<DestroyedVersion>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let id: Option<Vec<u8>> = sqlx::query_scalar(
        "DELETE FROM versions WHERE model = ? AND version = ? RETURNING version_id",
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
             VALUES (?, ?, ?, ?, 1)",
    )
    .bind(version_id.as_slice())
    .bind(model)
    .bind(i(version))
    .bind(i(now))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT OR REPLACE INTO revocations (kind, value, created_ms, reason) VALUES (?, ?, ?, ?)",
    )
    .bind(RevocationKind::Model.as_str())
    .bind(format!("{model}@{version}"))
    .bind(i(now))
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    let grants_revoked = sqlx::query(
        "UPDATE grants SET revoked = 1 WHERE revoked = 0 AND model = ? AND version = ?",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_appends_are_sequential_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        {
            let s = SqliteStore::open(&path).await.unwrap();
            assert_eq!(
                s.append_audit(&[b"a".to_vec(), b"b".to_vec()])
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(s.append_audit(&[b"c".to_vec()]).await.unwrap(), 2);
        }
        let s = SqliteStore::open(&path).await.unwrap();
        assert_eq!(s.audit_size().await.unwrap(), 3);
        let got = s.audit_entries(1, 3, 10).await.unwrap();
        assert_eq!(got, vec![(1, b"b".to_vec()), (2, b"c".to_vec())]);
    }

    #[tokio::test]
    async fn challenges_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        s.put_challenge(&[1; 32], 99).await.unwrap();
        assert_eq!(s.take_challenge(&[1; 32]).await.unwrap(), Some(99));
        assert_eq!(s.take_challenge(&[1; 32]).await.unwrap(), None);
        assert_eq!(s.take_challenge(&[2; 32]).await.unwrap(), None);
    }

    #[tokio::test]
    async fn version_numbers_conflict_instead_of_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let mut v = VersionRecord {
            model: "m".into(),
            version: 1,
            version_id: [1; 16],
            kek_version: 1,
            wrapped_dek: vec![1],
            manifest: vec![2],
            manifest_sig: vec![3],
            total_bytes: 4,
            created_ms: 5,
        };
        s.begin_upload(&v.version_id, "m", 0).await.unwrap();
        s.commit_version(&v).await.unwrap();
        assert!(s.pending_uploads().await.unwrap().is_empty());
        v.version_id = [2; 16];
        assert!(matches!(
            s.commit_version(&v).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.next_version("m").await.unwrap(), 2);
        assert_eq!(
            s.get_version("m", None).await.unwrap().unwrap().version_id,
            [1; 16]
        );
    }

    #[tokio::test]
    async fn the_revocation_epoch_moves_with_every_revocation_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
        let start = s
            .revocation_epoch()
            .expect("the embedded store vouches for its grants");
        // Other writes leave it alone.
        s.put_challenge(&[1; 32], 99).await.unwrap();
        assert_eq!(s.revocation_epoch(), Some(start));
        let revocation = Revocation {
            kind: RevocationKind::Grant,
            value: "g-1".into(),
            created_ms: 1,
            reason: "test".into(),
        };
        s.revoke(&revocation).await.unwrap();
        let after_revoke = s.revocation_epoch().unwrap();
        assert!(after_revoke > start);
        // A destruction that finds no version still ended a revoking transaction.
        assert!(
            s.destroy_version("m", 1, 2, "gone")
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.revocation_epoch().unwrap() > after_revoke);
    }
}

#[cfg(test)]
mod concurrency_tests {
    use std::sync::Arc;

    use super::*;

    /// Interleaved read-then-write transactions from several connections must wait for the
    /// write lock, not fail with SQLITE_BUSY.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_do_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap());
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..50u8 {
                    s.append_audit(&[vec![t, n]]).await.unwrap();
                    s.put_challenge(&[t.wrapping_mul(64).wrapping_add(n); 32], 1)
                        .await
                        .unwrap();
                    s.purge_expired(0).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.audit_size().await.unwrap(), 200);
    }
}
