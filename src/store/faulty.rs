//! A metadata store wrapper that injects faults on demand, for failure tests: it delegates
//! every call to the wrapped store unless told to fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;

use super::{
    AccessRule, CheckpointRecord, DestroyedVersion, GrantRecord, KekRecord, MetadataStore,
    ModelSummary, ProposalRecord, Revocation, SessionRecord, StoreError, VersionRecord,
};
use crate::time::UnixMs;

pub struct FaultyStore {
    inner: Arc<dyn MetadataStore>,
    /// While set, every audit append fails as a full or broken disk would.
    pub fail_audit: AtomicBool,
    /// How many more `rewrap_dek` calls succeed; after that they fail (a KEK rotation that
    /// stops half way, as a crash would leave it). `u64::MAX` = never fail.
    pub rewraps_left: AtomicU64,
    /// How many of the next `get_grant` calls answer as if no revocation had committed yet (a
    /// read that raced one): the grant comes back with `revoked` false.
    pub stale_grant_reads: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn MetadataStore>) -> Self {
        Self {
            inner,
            fail_audit: AtomicBool::new(false),
            rewraps_left: AtomicU64::new(u64::MAX),
            stale_grant_reads: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl MetadataStore for FaultyStore {
    async fn append_audit(&self, entries: &[Vec<u8>]) -> Result<u64, StoreError> {
        if self.fail_audit.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::other(
                "injected fault: audit write fails",
            )));
        }
        self.inner.append_audit(entries).await
    }

    async fn audit_entries(
        &self,
        start: u64,
        end: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.audit_entries(start, end, limit).await
    }

    async fn audit_size(&self) -> Result<u64, StoreError> {
        self.inner.audit_size().await
    }

    async fn keks(&self) -> Result<Vec<KekRecord>, StoreError> {
        self.inner.keks().await
    }

    async fn insert_kek(&self, kek: &KekRecord) -> Result<(), StoreError> {
        self.inner.insert_kek(kek).await
    }

    async fn get_wrapped_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_wrapped_secret(name).await
    }

    async fn put_wrapped_secret_if_absent(
        &self,
        name: &str,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner.put_wrapped_secret_if_absent(name, wrapped).await
    }

    async fn begin_upload(
        &self,
        upload_id: &[u8; 16],
        model: &str,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        self.inner.begin_upload(upload_id, model, now).await
    }

    async fn end_upload(&self, upload_id: &[u8; 16]) -> Result<(), StoreError> {
        self.inner.end_upload(upload_id).await
    }

    async fn pending_uploads(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.pending_uploads().await
    }

    async fn pending_uploads_before(
        &self,
        started_before: UnixMs,
    ) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.pending_uploads_before(started_before).await
    }

    async fn audit_lease(&self, holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        self.inner.audit_lease(holder, ttl_ms).await
    }

    async fn change_root_material(&self, change: &super::RootChange) -> Result<(), StoreError> {
        self.inner.change_root_material(change).await
    }

    async fn next_version(&self, model: &str) -> Result<u64, StoreError> {
        self.inner.next_version(model).await
    }

    async fn commit_version(&self, v: &VersionRecord) -> Result<(), StoreError> {
        self.inner.commit_version(v).await
    }

    async fn list_models(&self) -> Result<Vec<ModelSummary>, StoreError> {
        self.inner.list_models().await
    }

    async fn versions(&self, model: &str) -> Result<Vec<VersionRecord>, StoreError> {
        self.inner.versions(model).await
    }

    async fn get_version(
        &self,
        model: &str,
        version: Option<u64>,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.inner.get_version(model, version).await
    }

    async fn add_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        self.inner.add_rule(rule).await
    }

    async fn rules(&self, model: Option<&str>) -> Result<Vec<AccessRule>, StoreError> {
        self.inner.rules(model).await
    }

    async fn put_challenge(&self, nonce: &[u8; 32], expires_ms: UnixMs) -> Result<(), StoreError> {
        self.inner.put_challenge(nonce, expires_ms).await
    }

    async fn take_challenge(&self, nonce: &[u8; 32]) -> Result<Option<UnixMs>, StoreError> {
        self.inner.take_challenge(nonce).await
    }

    async fn purge_expired(&self, now: UnixMs) -> Result<(), StoreError> {
        self.inner.purge_expired(now).await
    }

    async fn put_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        self.inner.put_session(s).await
    }

    async fn get_session(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.get_session(token_sha256).await
    }

    async fn put_evidence(&self, sha256: &[u8; 32], evidence: &[u8]) -> Result<(), StoreError> {
        self.inner.put_evidence(sha256, evidence).await
    }

    async fn get_evidence(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_evidence(sha256).await
    }

    async fn put_checkpoint(&self, cp: &CheckpointRecord) -> Result<(), StoreError> {
        self.inner.put_checkpoint(cp).await
    }

    async fn latest_checkpoint(&self) -> Result<Option<CheckpointRecord>, StoreError> {
        self.inner.latest_checkpoint().await
    }

    async fn put_grant(&self, g: &GrantRecord) -> Result<(), StoreError> {
        self.inner.put_grant(g).await
    }

    async fn grants(
        &self,
        model: Option<&str>,
        node: Option<&str>,
        live_at: Option<UnixMs>,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        self.inner.grants(model, node, live_at).await
    }

    async fn revoke(&self, r: &Revocation) -> Result<u64, StoreError> {
        self.inner.revoke(r).await
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.inner.revocations().await
    }

    async fn put_proposal(&self, p: &ProposalRecord) -> Result<(), StoreError> {
        self.inner.put_proposal(p).await
    }

    async fn get_proposal(&self, id: &str) -> Result<Option<ProposalRecord>, StoreError> {
        self.inner.get_proposal(id).await
    }

    async fn proposals(&self, pending_only: bool) -> Result<Vec<ProposalRecord>, StoreError> {
        self.inner.proposals(pending_only).await
    }

    async fn update_proposal(
        &self,
        prev: &ProposalRecord,
        next: &ProposalRecord,
    ) -> Result<bool, StoreError> {
        self.inner.update_proposal(prev, next).await
    }

    async fn remove_rule(&self, rule: &AccessRule) -> Result<bool, StoreError> {
        self.inner.remove_rule(rule).await
    }

    async fn get_grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        let stale = self
            .stale_grant_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let mut grant = self.inner.get_grant(grant_id).await?;
        if stale && let Some(g) = grant.as_mut() {
            g.revoked = false;
        }
        Ok(grant)
    }

    fn revocation_epoch(&self) -> Option<u64> {
        self.inner.revocation_epoch()
    }

    async fn add_grant_bytes(&self, grant_id: &str, bytes: u64) -> Result<(), StoreError> {
        self.inner.add_grant_bytes(grant_id, bytes).await
    }

    async fn destroy_version(
        &self,
        model: &str,
        version: u64,
        now: UnixMs,
        reason: &str,
    ) -> Result<Option<DestroyedVersion>, StoreError> {
        self.inner
            .destroy_version(model, version, now, reason)
            .await
    }

    async fn destroyed_pending_blobs(&self) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.destroyed_pending_blobs().await
    }

    async fn blobs_collected(&self, version_id: &[u8; 16]) -> Result<(), StoreError> {
        self.inner.blobs_collected(version_id).await
    }

    async fn rewrap_dek(
        &self,
        version_id: &[u8; 16],
        from_kek: u32,
        to_kek: u32,
        wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let left = self.rewraps_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Io(std::io::Error::other(
                "injected fault: rewrap fails",
            )));
        }
        if left != u64::MAX {
            self.rewraps_left.store(left - 1, Ordering::SeqCst);
        }
        self.inner
            .rewrap_dek(version_id, from_kek, to_kek, wrapped)
            .await
    }

    async fn retire_kek(&self, version: u32) -> Result<bool, StoreError> {
        self.inner.retire_kek(version).await
    }
}
