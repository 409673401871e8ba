//! AdminService: push model versions, list them, and set access rules. Every call requires the
//! admin role; every change is an audit entry.

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_lc_rs::digest;
use bytes::Bytes;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Role;
use super::error::{ApiError, internal};
use super::{Vault, check_model_name, request_id};
use crate::attest::TeeKind;
use crate::audit::{Action, Actor, Decision};
use crate::envelope::manifest::{
    MANIFEST_FORMAT, Manifest, ManifestFile, sign_manifest, validate_path,
};
use crate::envelope::{FileContext, FileSealer, Header, TAG_LEN};
use crate::keys::KeyError;
use crate::proto::v1::admin_service_server::AdminService;
use crate::proto::v1::push_model_request::Msg;
use crate::proto::v1::revoke_request::Target;
use crate::proto::v1::{
    AccessRule as PbRule, AllowAccessRequest, AllowAccessResponse, FileInfo, GetModelRequest,
    GetModelResponse, ListAccessRequest, ListAccessResponse, ListModelsRequest, ListModelsResponse,
    ModelSummary as PbSummary, PushModelRequest, PushModelResponse, VersionInfo,
};
use crate::proto::v1::{
    DecideProposalRequest, ListProposalsRequest, ListProposalsResponse, Proposal,
};
use crate::proto::v1::{
    DenyAccessRequest, DenyAccessResponse, GrantInfo, ListGrantsRequest, ListGrantsResponse,
    ListRevocationsRequest, ListRevocationsResponse, Revocation as PbRevocation, RevokeRequest,
    RevokeResponse,
};
use crate::proto::v1::{
    GetKeyStatusRequest, KekInfo, KeyStatus, RemoveVersionRequest, RemoveVersionResponse,
    RotateKeysRequest, RotateKeysResponse,
};
use crate::store::{
    AccessRule, ProposalRecord, Revocation, RevocationKind, StoreError, VersionRecord, chunk_key,
    version_prefix,
};

pub struct AdminApi {
    vault: Arc<Vault>,
}

impl AdminApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

/// Deletes an upload's blobs unless disarmed: a push that fails, or whose client disappears and
/// whose handler is dropped, leaves nothing behind.
struct UploadGuard {
    vault: Arc<Vault>,
    id: [u8; 16],
    armed: bool,
    /// Chunk writes in flight; each gives its buffer back when the store let go of it.
    puts: tokio::task::JoinSet<Result<Option<Vec<u8>>, StoreError>>,
    /// Chunk buffers handed back by finished writes, reused for the next chunks: a fresh
    /// multi-MiB allocation per chunk may come back from the allocator as new pages, each a
    /// page fault that the kernel zeroes. They hold ciphertext only (sealed in place).
    spare: Vec<Vec<u8>>,
}

/// Chunk writes in flight per push: writes overlap with receiving and sealing the next chunk,
/// and memory stays at a few chunks.
const PUTS_IN_FLIGHT: usize = 4;

impl UploadGuard {
    fn joined(
        &mut self,
        r: Result<Result<Option<Vec<u8>>, StoreError>, tokio::task::JoinError>,
    ) -> Result<(), StoreError> {
        let buf = r.map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))??;
        if let Some(mut buf) = buf {
            buf.clear();
            self.spare.push(buf);
        }
        Ok(())
    }

    /// An empty buffer with room for one sealed chunk: a recycled one when there is one.
    fn buffer(&mut self, capacity: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(buf) if buf.capacity() >= capacity => buf,
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Stores a chunk in the background, waiting first while [`PUTS_IN_FLIGHT`] are running.
    async fn put(&mut self, key: String, data: Vec<u8>) -> Result<(), StoreError> {
        while self.puts.len() >= PUTS_IN_FLIGHT {
            if let Some(r) = self.puts.join_next().await {
                self.joined(r)?;
            }
        }
        let blobs = self.vault.blobs.clone();
        self.puts.spawn(async move {
            // `Bytes::from(Vec)` and back are moves, not copies. The buffer comes back only if
            // the store kept no reference to it once `put` returned.
            let data = Bytes::from(data);
            blobs.put(&key, data.clone()).await?;
            Ok(data.try_into_mut().ok().map(Vec::from))
        });
        Ok(())
    }

    /// Waits for every chunk write; the first failure is returned.
    async fn flush(&mut self) -> Result<(), StoreError> {
        while let Some(r) = self.puts.join_next().await {
            self.joined(r)?;
        }
        Ok(())
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let vault = self.vault.clone();
        let id = self.id;
        let mut puts = std::mem::take(&mut self.puts);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                // Writes still running finish first, so none lands after the delete.
                while puts.join_next().await.is_some() {}
                if let Err(e) = vault.blobs.delete_prefix(&version_prefix(&id)).await {
                    tracing::warn!(error = %e, "cleaning an aborted upload; it is retried at restart");
                    return;
                }
                let _ = vault.store.end_upload(&id).await;
            });
        }
    }
}

/// One file being received: plaintext accumulates into `buf` and is sealed chunk by chunk.
struct FileInProgress {
    path: String,
    header: Header,
    sealer: Option<FileSealer>,
    buf: Vec<u8>,
    received: u64,
    /// Only when the push asked to record digests (`PushStart.record_digest`): integrity comes
    /// from the AEAD tags and the signed manifest, so the hot path does not hash by default.
    sha256: Option<digest::Context>,
}

/// A push that fails mid-chunk leaves plaintext in `buf` (a chunk is sealed in place only once
/// it is full): wiped before the memory goes back to the allocator.
impl Drop for FileInProgress {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf);
    }
}

impl AdminApi {
    async fn push(
        &self,
        rid: &str,
        actor: Actor,
        mut stream: Streaming<PushModelRequest>,
    ) -> Result<PushModelResponse, ApiError> {
        let v = &self.vault;
        let next = |m: Result<Option<PushModelRequest>, Status>| -> Result<Option<Msg>, ApiError> {
            match m {
                Ok(Some(PushModelRequest { msg: Some(msg) })) => Ok(Some(msg)),
                Ok(Some(PushModelRequest { msg: None })) => {
                    Err(ApiError::InvalidArgument("empty push message".into()))
                }
                Ok(None) => Ok(None),
                Err(_) => Err(ApiError::InvalidArgument("upload stream broke off".into())),
            }
        };
        let (model, record_digest) = match next(stream.message().await)? {
            Some(Msg::Start(s)) => (s.model, s.record_digest),
            _ => {
                return Err(ApiError::InvalidArgument(
                    "a push must begin with start".into(),
                ));
            }
        };
        check_model_name(&model)?;

        let version_id = crate::grant::random::<16>().map_err(|e| internal(rid, "rng", e))?;
        v.store
            .begin_upload(&version_id, &model, v.now())
            .await
            .map_err(|e| internal(rid, "recording upload", e))?;
        let mut guard = UploadGuard {
            vault: v.clone(),
            id: version_id,
            armed: true,
            puts: tokio::task::JoinSet::new(),
            spare: Vec::new(),
        };
        // Wrapped only at commit, under the KEK active then (a rotation may run meanwhile).
        let dek = v
            .keys
            .generate_dek()
            .map_err(|e| internal(rid, "making DEK", e))?;

        let chunk_size = v.chunk_size;
        let mut files: Vec<ManifestFile> = Vec::new();
        let mut paths = BTreeSet::new();
        let mut current: Option<FileInProgress> = None;
        let mut finished = false;
        while let Some(msg) = next(stream.message().await)? {
            if finished {
                return Err(ApiError::InvalidArgument("message after finish".into()));
            }
            match msg {
                Msg::Start(_) => return Err(ApiError::InvalidArgument("start sent twice".into())),
                Msg::File(f) => {
                    if let Some(done) = current.take() {
                        files.push(self.finish_file(rid, &mut guard, &version_id, done).await?);
                    }
                    validate_path(&f.path).map_err(|e| {
                        ApiError::InvalidArgument(format!("file path {:?}: {e}", f.path))
                    })?;
                    if !paths.insert(f.path.clone()) {
                        return Err(ApiError::InvalidArgument(format!(
                            "file {:?} sent twice",
                            f.path
                        )));
                    }
                    let header = Header::new(chunk_size, f.size).map_err(|e| {
                        ApiError::InvalidArgument(format!("file {:?}: {e}", f.path))
                    })?;
                    let ctx = FileContext {
                        model: &model,
                        version_id: &version_id,
                        path: &f.path,
                    };
                    let sealer = FileSealer::new(&dek, &ctx, &header);
                    current = Some(FileInProgress {
                        path: f.path,
                        header,
                        sealer: Some(sealer),
                        buf: guard.buffer(chunk_size as usize + TAG_LEN),
                        received: 0,
                        sha256: record_digest.then(|| digest::Context::new(&digest::SHA256)),
                    });
                }
                Msg::Data(data) => {
                    let Some(file) = current.as_mut() else {
                        return Err(ApiError::InvalidArgument("data before a file start".into()));
                    };
                    self.take_data(rid, &mut guard, &version_id, file, &data)
                        .await?;
                }
                Msg::Finish(_) => finished = true,
            }
        }
        if !finished {
            return Err(ApiError::InvalidArgument(
                "upload ended without finish".into(),
            ));
        }
        if let Some(done) = current.take() {
            files.push(self.finish_file(rid, &mut guard, &version_id, done).await?);
        }
        if files.is_empty() {
            return Err(ApiError::InvalidArgument(
                "a model version needs at least one file".into(),
            ));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let total_bytes: u64 = files.iter().map(|f| f.size).sum();
        let file_count = files.len();
        guard
            .flush()
            .await
            .map_err(|e| internal(rid, "storing chunk", e))?;
        v.blobs
            .sync_prefix(&version_prefix(&version_id))
            .await
            .map_err(|e| internal(rid, "syncing blobs", e))?;

        // Held until the commit: the KEK that wraps this DEK cannot be retired in between.
        let gate = v.keys.commit_gate().await;
        let (kek_version, wrapped_dek) = v
            .keys
            .wrap_dek(&dek, &model, &version_id)
            .map_err(|e| internal(rid, "wrapping DEK", e))?;
        drop(dek);
        // The version number is fixed at commit; if another push took it meanwhile, sign anew.
        let mut attempts = 0;
        let version = loop {
            attempts += 1;
            let number = v
                .store
                .next_version(&model)
                .await
                .map_err(|e| internal(rid, "next version", e))?;
            let created_ms = v.now();
            let manifest = Manifest {
                format: MANIFEST_FORMAT.to_string(),
                model: model.clone(),
                version: number,
                version_id,
                chunk_size,
                created_ms,
                files: files.clone(),
            };
            let bytes = manifest.to_bytes();
            let sig = sign_manifest(v.keys.signing_key(), &bytes)
                .map_err(|e| internal(rid, "signing manifest", e))?;
            let rec = VersionRecord {
                model: model.clone(),
                version: number,
                version_id,
                kek_version,
                wrapped_dek: wrapped_dek.clone(),
                manifest: bytes,
                manifest_sig: sig.to_vec(),
                total_bytes,
                created_ms,
            };
            match v.store.commit_version(&rec).await {
                Ok(()) => break number,
                Err(StoreError::Conflict(_)) if attempts < 8 => continue,
                Err(e) => return Err(internal(rid, "committing version", e)),
            }
        };
        drop(gate);
        guard.armed = false;
        let mut entry = v.entry(Action::Push, Decision::Allow, actor);
        entry.model = Some(model.clone());
        entry.version = Some(version);
        entry.bytes = Some(total_bytes);
        entry.reason = Some(format!(
            "{file_count} files; version id {}",
            hex::encode(version_id)
        ));
        v.record(rid, entry).await?;
        Ok(PushModelResponse {
            model,
            version,
            total_bytes,
            files: u32::try_from(file_count).unwrap_or(u32::MAX),
        })
    }

    /// Adds plaintext to the current file, sealing and storing each full chunk.
    async fn take_data(
        &self,
        rid: &str,
        guard: &mut UploadGuard,
        version_id: &[u8; 16],
        file: &mut FileInProgress,
        mut data: &[u8],
    ) -> Result<(), ApiError> {
        let size = file.header.plaintext_len();
        if file.received + data.len() as u64 > size {
            return Err(ApiError::InvalidArgument(format!(
                "file {:?} has more bytes than its declared size {size}",
                file.path
            )));
        }
        file.received += data.len() as u64;
        if let Some(sha256) = file.sha256.as_mut() {
            sha256.update(data);
        }
        while !data.is_empty() {
            let sealer = file.sealer.as_ref().expect("sealer present until finish");
            let want = file
                .header
                .chunk_plain_len(sealer.next_index())
                .expect("index in range");
            let take = (want - file.buf.len()).min(data.len());
            file.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if file.buf.len() == want && !sealer.is_last_next() {
                let sealer = file.sealer.as_mut().expect("sealer");
                let index = sealer.seal_next(&mut file.buf);
                let next = guard.buffer(file.buf.capacity());
                let chunk = std::mem::replace(&mut file.buf, next);
                self.store_chunk(rid, guard, version_id, &file.path, index, chunk)
                    .await?;
            }
        }
        Ok(())
    }

    /// Hands a sealed chunk to the blob store as it is (no copy).
    async fn store_chunk(
        &self,
        rid: &str,
        guard: &mut UploadGuard,
        version_id: &[u8; 16],
        path: &str,
        index: u64,
        chunk: Vec<u8>,
    ) -> Result<(), ApiError> {
        guard
            .put(chunk_key(version_id, path, index), chunk)
            .await
            .map_err(|e| internal(rid, "storing chunk", e))
    }

    async fn finish_file(
        &self,
        rid: &str,
        guard: &mut UploadGuard,
        version_id: &[u8; 16],
        mut file: FileInProgress,
    ) -> Result<ManifestFile, ApiError> {
        let size = file.header.plaintext_len();
        if file.received != size {
            return Err(ApiError::InvalidArgument(format!(
                "file {:?} ended after {} of its declared {size} bytes",
                file.path, file.received
            )));
        }
        let sealer = file.sealer.take().expect("sealer");
        let index = sealer.finish(&mut file.buf);
        let chunk = std::mem::take(&mut file.buf);
        self.store_chunk(rid, guard, version_id, &file.path, index, chunk)
            .await?;
        let sha256 = file.sha256.take().map(|ctx| {
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.finish().as_ref());
            out
        });
        Ok(ManifestFile {
            path: std::mem::take(&mut file.path),
            size,
            chunks: file.header.chunk_count(),
            sha256,
            header: file.header.encode(),
        })
    }

    async fn get_model(&self, rid: &str, name: &str) -> Result<GetModelResponse, ApiError> {
        check_model_name(name)?;
        let versions = self
            .vault
            .store
            .versions(name)
            .await
            .map_err(|e| internal(rid, "listing versions", e))?;
        if versions.is_empty() {
            return Err(ApiError::NotFound(format!("model {name} not found")));
        }
        let mut out = Vec::with_capacity(versions.len());
        for ver in versions {
            let manifest = Manifest::from_bytes(&ver.manifest)
                .map_err(|e| internal(rid, "stored manifest", e))?;
            out.push(VersionInfo {
                version: ver.version,
                created_ms: ver.created_ms,
                total_bytes: ver.total_bytes,
                kek_version: ver.kek_version,
                files: manifest
                    .files
                    .into_iter()
                    .map(|f| FileInfo {
                        path: f.path,
                        size: f.size,
                        chunks: f.chunks,
                        sha256: f.sha256.map(hex::encode).unwrap_or_default(),
                    })
                    .collect(),
            });
        }
        Ok(GetModelResponse {
            name: name.to_string(),
            versions: out,
        })
    }

    async fn allow(
        &self,
        rid: &str,
        actor: Actor,
        req: AllowAccessRequest,
    ) -> Result<AllowAccessResponse, ApiError> {
        let v = &self.vault;
        check_model_name(&req.model)?;
        let tee: TeeKind = req.tee.parse().map_err(|_| {
            ApiError::InvalidArgument(format!(
                "unknown tee {:?}; known: {}",
                req.tee.chars().take(32).collect::<String>(),
                TeeKind::ALL.map(TeeKind::as_str).join(", ")
            ))
        })?;
        let m = &req.measurement;
        if m.is_empty()
            || m.len() > 128
            || !m.len().is_multiple_of(2)
            || !m
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ApiError::InvalidArgument(
                "measurement must be 1 to 64 bytes of lowercase hex".into(),
            ));
        }
        if v.store
            .get_version(&req.model, None)
            .await
            .map_err(|e| internal(rid, "loading model", e))?
            .is_none()
        {
            return Err(ApiError::NotFound(format!(
                "model {} not found; push it first",
                req.model
            )));
        }
        if req.require.len() > 16 {
            return Err(ApiError::InvalidArgument(
                "at most 16 required claims per rule".into(),
            ));
        }
        for (k, val) in &req.require {
            let key_ok = !k.is_empty()
                && k.len() <= 32
                && k.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_')
                });
            let val_ok = !val.is_empty() && val.len() <= 256 && !val.chars().any(char::is_control);
            if !key_ok || !val_ok {
                return Err(ApiError::InvalidArgument(format!(
                    "required claim {:?}: names are 1-32 characters of [a-z0-9._], values 1-256 printable characters",
                    k.chars().take(32).collect::<String>()
                )));
            }
        }
        let rule = AccessRule {
            model: req.model.clone(),
            tee: tee.to_string(),
            measurement: m.clone(),
            require: req.require.into_iter().collect(),
            created_ms: v.now(),
        };
        let approvals = &v.approvals;
        if approvals.quorum > 1 && approvals.operations.iter().any(|o| o == "access_allow") {
            let proposal = self
                .propose(rid, &actor, "access_allow", rule_payload(&rule))
                .await?;
            return Ok(AllowAccessResponse {
                created: false,
                proposal_id: proposal.id,
            });
        }
        let created = self.apply_rule(rid, actor, rule, None).await?;
        Ok(AllowAccessResponse {
            created,
            proposal_id: String::new(),
        })
    }

    /// Adds a rule and records it; `approved_by` names the proposal's approvers.
    async fn apply_rule(
        &self,
        rid: &str,
        actor: Actor,
        rule: AccessRule,
        approved_by: Option<&[String]>,
    ) -> Result<bool, ApiError> {
        let v = &self.vault;
        let created = v
            .store
            .add_rule(&rule)
            .await
            .map_err(|e| internal(rid, "storing rule", e))?;
        let mut entry = v.entry(Action::AccessAllow, Decision::Allow, actor);
        entry.simulated = (rule.tee == TeeKind::Sim.as_str()).then_some(true);
        let requires = rule
            .require
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        entry.model = Some(rule.model);
        entry.tee = Some(rule.tee);
        entry.measurement = Some(rule.measurement);
        entry.reason = Some(format!(
            "{}{}{}",
            if created {
                "rule added"
            } else {
                "rule already present"
            },
            if requires.is_empty() {
                String::new()
            } else {
                format!("; requires {requires}")
            },
            approved_by.map_or(String::new(), |a| format!("; approved by {}", a.join(",")))
        ));
        v.record(rid, entry).await?;
        Ok(created)
    }

    async fn propose(
        &self,
        rid: &str,
        actor: &Actor,
        operation: &str,
        payload: String,
    ) -> Result<ProposalRecord, ApiError> {
        let v = &self.vault;
        let now = v.now();
        let id = format!(
            "p-{}",
            hex::encode(crate::grant::random::<8>().map_err(|e| internal(rid, "rng", e))?)
        );
        let who = actor.id.clone().unwrap_or_default();
        let p = ProposalRecord {
            id,
            operation: operation.to_string(),
            payload,
            proposer: who.clone(),
            approvers: vec![who],
            quorum: v.approvals.quorum,
            state: "pending".into(),
            created_ms: now,
            expires_ms: now.saturating_add(v.approvals.ttl_secs.saturating_mul(1000)),
        };
        let mut entry = v.entry(Action::Propose, Decision::Info, actor.clone());
        entry.reason = Some(format!(
            "proposal {} {}: {} (1 of {})",
            p.id, operation, p.payload, p.quorum
        ));
        v.record(rid, entry).await?;
        v.store
            .put_proposal(&p)
            .await
            .map_err(|e| internal(rid, "storing proposal", e))?;
        Ok(p)
    }

    /// Approves (or rejects) a pending proposal; applies it when the quorum is reached.
    async fn decide(
        &self,
        rid: &str,
        actor: Actor,
        id: &str,
        approve: bool,
    ) -> Result<ProposalRecord, ApiError> {
        let v = &self.vault;
        let prev = v
            .store
            .get_proposal(id)
            .await
            .map_err(|e| internal(rid, "loading proposal", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no proposal {:?}",
                    id.chars().take(40).collect::<String>()
                ))
            })?;
        if prev.state != "pending" {
            return Err(ApiError::FailedPrecondition(format!(
                "proposal {id} is {}",
                prev.state
            )));
        }
        let who = actor.id.clone().unwrap_or_default();
        let mut next = prev.clone();
        if v.now() >= prev.expires_ms {
            next.state = "expired".into();
            let _ = v.store.update_proposal(&prev, &next).await;
            return Err(ApiError::FailedPrecondition(format!(
                "proposal {id} expired"
            )));
        }
        if approve {
            // The same admin twice counts once.
            if !next.approvers.contains(&who) {
                next.approvers.push(who);
            }
            if next.approvers.len() >= next.quorum as usize {
                next.state = "applied".into();
            }
        } else {
            next.state = "rejected".into();
        }
        let mut entry = v.entry(
            if approve {
                Action::Approve
            } else {
                Action::Reject
            },
            Decision::Info,
            actor.clone(),
        );
        entry.reason = Some(format!(
            "proposal {id} {}: {} of {} approvals; {}",
            prev.operation,
            next.approvers.len(),
            next.quorum,
            next.state
        ));
        v.record(rid, entry).await?;
        if !v
            .store
            .update_proposal(&prev, &next)
            .await
            .map_err(|e| internal(rid, "updating proposal", e))?
        {
            return Err(ApiError::FailedPrecondition(format!(
                "proposal {id} changed meanwhile; retry"
            )));
        }
        if next.state == "applied" {
            match next.operation.as_str() {
                "access_allow" => {
                    let rule = rule_from_payload(&next.payload)
                        .map_err(|e| internal(rid, "proposal payload", e))?;
                    self.apply_rule(rid, actor, rule, Some(&next.approvers))
                        .await?;
                }
                "model_rm" => {
                    let (model, version, reason) = rm_from_payload(&next.payload)
                        .map_err(|e| internal(rid, "proposal payload", e))?;
                    self.apply_remove(rid, actor, &model, version, &reason, Some(&next.approvers))
                        .await?;
                }
                "keys_rotate" => {
                    self.apply_rotate(rid, actor, Some(&next.approvers)).await?;
                }
                other => {
                    return Err(internal(
                        rid,
                        "applying proposal",
                        format!("unknown operation {other}"),
                    ));
                }
            }
        }
        Ok(next)
    }
}

fn rm_payload(model: &str, version: u64, reason: &str) -> String {
    serde_json::json!({ "model": model, "version": version, "reason": reason }).to_string()
}

fn rm_from_payload(payload: &str) -> Result<(String, u64, String), serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct P {
        model: String,
        version: u64,
        reason: String,
    }
    let p: P = serde_json::from_str(payload)?;
    Ok((p.model, p.version, p.reason))
}

fn approved_suffix(approved_by: Option<&[String]>) -> String {
    approved_by.map_or(String::new(), |a| format!("; approved by {}", a.join(",")))
}

/// Whether `op` needs the M-of-N quorum.
fn gated(v: &Vault, op: &str) -> bool {
    v.approvals.quorum > 1 && v.approvals.operations.iter().any(|o| o == op)
}

impl AdminApi {
    /// `model rm NAME@VERSION`: crypto-shredding (docs/keys.md).
    async fn remove_version(
        &self,
        rid: &str,
        actor: Actor,
        req: RemoveVersionRequest,
    ) -> Result<RemoveVersionResponse, ApiError> {
        let v = &self.vault;
        check_model_name(&req.model)?;
        if req.version == 0 {
            return Err(ApiError::InvalidArgument(
                "give the version to destroy (NAME@VERSION)".into(),
            ));
        }
        let reason: String = req.reason.chars().take(256).collect();
        if reason.chars().any(char::is_control) {
            return Err(ApiError::InvalidArgument(
                "reason must not contain control characters".into(),
            ));
        }
        v.store
            .get_version(&req.model, Some(req.version))
            .await
            .map_err(|e| internal(rid, "loading version", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "model {} version {} not found",
                    req.model, req.version
                ))
            })?;
        if gated(v, "model_rm") {
            let p = self
                .propose(
                    rid,
                    &actor,
                    "model_rm",
                    rm_payload(&req.model, req.version, &reason),
                )
                .await?;
            return Ok(RemoveVersionResponse {
                proposal_id: p.id,
                ..Default::default()
            });
        }
        self.apply_remove(rid, actor, &req.model, req.version, &reason, None)
            .await
    }

    /// Step 1 destroys the wrapped DEK (with the grants and a revocation, in one transaction),
    /// step 2 deletes the blobs; a crash between them is finished at the next start.
    async fn apply_remove(
        &self,
        rid: &str,
        actor: Actor,
        model: &str,
        version: u64,
        reason: &str,
        approved_by: Option<&[String]>,
    ) -> Result<RemoveVersionResponse, ApiError> {
        let v = &self.vault;
        let rec = v
            .store
            .get_version(model, Some(version))
            .await
            .map_err(|e| internal(rid, "loading version", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!("model {model} version {version} not found"))
            })?;
        // On the record before the key is gone.
        let mut entry = v.entry(Action::ModelRm, Decision::Info, actor);
        entry.model = Some(model.to_string());
        entry.version = Some(version);
        entry.reason = Some(format!(
            "destroy version id {}: wrapped DEK (kek {}), grants, then blobs{}{}",
            hex::encode(rec.version_id),
            rec.kek_version,
            if reason.is_empty() {
                String::new()
            } else {
                format!("; reason: {reason}")
            },
            approved_suffix(approved_by)
        ));
        v.record(rid, entry).await?;
        let why = if reason.is_empty() {
            "model version destroyed".to_string()
        } else {
            format!("model version destroyed: {reason}")
        };
        let gone = v
            .store
            .destroy_version(model, version, v.now(), &why)
            .await
            .map_err(|e| internal(rid, "destroying version", e))?
            .ok_or_else(|| {
                ApiError::NotFound(format!("model {model} version {version} not found"))
            })?;
        tracing::info!(request_id = rid, model, version, version_id = %hex::encode(gone.version_id), "wrapped DEK destroyed");
        collect_destroyed(v, &gone.version_id).await;
        Ok(RemoveVersionResponse {
            version_id: hex::encode(gone.version_id),
            grants_revoked: gone.grants_revoked,
            proposal_id: String::new(),
        })
    }

    async fn rotate(&self, rid: &str, actor: Actor) -> Result<RotateKeysResponse, ApiError> {
        if gated(&self.vault, "keys_rotate") {
            let p = self
                .propose(rid, &actor, "keys_rotate", "{}".into())
                .await?;
            return Ok(RotateKeysResponse {
                proposal_id: p.id,
                ..Default::default()
            });
        }
        self.apply_rotate(rid, actor, None).await
    }

    async fn apply_rotate(
        &self,
        rid: &str,
        actor: Actor,
        approved_by: Option<&[String]>,
    ) -> Result<RotateKeysResponse, ApiError> {
        let v = &self.vault;
        // Held until the new KEK is stored: no root rekey or other rotation in between.
        let run = v.keys.begin_rotation().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "a key rotation or root rekey is running; follow it with `weightvault keys status`"
                    .into(),
            )
        })?;
        let next = v
            .keys
            .next_kek_version(v.store.as_ref())
            .await
            .map_err(|e| internal(rid, "next KEK version", e))?;
        let status = key_status(v)
            .await
            .map_err(|e| internal(rid, "counting DEKs", e))?;
        // On the record before the new KEK exists.
        let mut entry = v.entry(Action::KeyRotate, Decision::Info, actor);
        entry.reason = Some(format!(
            "kek version {next} created and active; {} DEKs to re-wrap{}",
            status.total,
            approved_suffix(approved_by)
        ));
        v.record(rid, entry).await?;
        v.keys
            .add_kek(v.store.as_ref(), next, v.now())
            .await
            .map_err(|e| match e {
                KeyError::Store(StoreError::Conflict(_)) => ApiError::FailedPrecondition(
                    "another rotation created that KEK version meanwhile; retry".into(),
                ),
                e => internal(rid, "creating KEK", e),
            })?;
        drop(run);
        spawn_rotation(v.clone());
        Ok(RotateKeysResponse {
            kek_version: next,
            pending: status.total,
            proposal_id: String::new(),
        })
    }
}

/// Deletes a destroyed version's blobs (crypto-shredding step 2); on failure the next start
/// retries.
pub async fn collect_destroyed(v: &Vault, version_id: &[u8; 16]) {
    match v.blobs.delete_prefix(&version_prefix(version_id)).await {
        Ok(()) => {
            if let Err(e) = v.store.blobs_collected(version_id).await {
                tracing::warn!(error = %e, "recording deleted blobs; retried at restart");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "deleting the blobs of a destroyed version; retried at restart")
        }
    }
}

/// How many DEKs each KEK version wraps.
pub async fn key_status(v: &Vault) -> Result<KeyStatus, StoreError> {
    // A pass that ends while the counts are read would pair its old counts with "not running";
    // the run counter read before and after the reads tells.
    let runs_before = v.keys.rotation_runs();
    let active = v.keys.active_kek_version();
    let mut counts: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    let mut total = 0;
    for m in v.store.list_models().await? {
        for ver in v.store.versions(&m.name).await? {
            *counts.entry(ver.kek_version).or_default() += 1;
            total += 1;
        }
    }
    let keks = v
        .store
        .keks()
        .await?
        .into_iter()
        .map(|k| KekInfo {
            version: k.version,
            created_ms: k.created_ms,
            deks: counts.get(&k.version).copied().unwrap_or(0),
            active: k.version == active,
        })
        .collect();
    Ok(KeyStatus {
        active_kek_version: active,
        keks,
        pending: total - counts.get(&active).copied().unwrap_or(0),
        total,
        running: runs_before % 2 == 1
            || v.keys.rotation_runs() != runs_before
            || v.keys.rotation_pending_start(),
    })
}

/// Runs a re-wrap pass in the background (after `keys rotate`, and at start when a previous
/// rotation did not finish).
pub fn spawn_rotation(vault: Arc<Vault>) {
    vault.keys.rotation_queued();
    tokio::spawn(async move {
        if let Err(e) = rotation_pass(&vault).await {
            tracing::error!(error = %e, "key rotation stopped; it resumes at the next start or `keys rotate`");
        }
    });
}

/// Moves every DEK under the active KEK (compare and swap per version, so a crash or a second
/// replica never loses one), then retires every older KEK that wraps nothing.
async fn rotation_pass(v: &Vault) -> Result<(), String> {
    let run = v.keys.begin_rotation();
    // After the attempt: a status read in between sees either the queue or the running pass.
    v.keys.rotation_dequeued();
    let Some(_run) = run else {
        return Ok(());
    };
    let rid = request_id();
    for _ in 0..8 {
        let target = v.keys.active_kek_version();
        let models = v.store.list_models().await.map_err(|e| e.to_string())?;
        for m in models {
            for ver in v.store.versions(&m.name).await.map_err(|e| e.to_string())? {
                if v.shutdown.is_cancelled() {
                    return Ok(());
                }
                let Some((to, wrapped)) = v.keys.rewrap(&ver).map_err(|e| e.to_string())? else {
                    continue;
                };
                let moved = v
                    .store
                    .rewrap_dek(&ver.version_id, ver.kek_version, to, &wrapped)
                    .await
                    .map_err(|e| e.to_string())?;
                if moved {
                    let mut e = v.entry(Action::KeyRewrap, Decision::Info, Actor::system());
                    e.model = Some(ver.model.clone());
                    e.version = Some(ver.version);
                    e.reason = Some(format!(
                        "dek re-wrapped from kek {} to kek {to}",
                        ver.kek_version
                    ));
                    v.record(&rid, e)
                        .await
                        .map_err(|e| e.reason().to_string())?;
                }
            }
        }
        let mut left = false;
        for k in v.keys.kek_versions() {
            if k >= target {
                continue;
            }
            if v.keys
                .retire(v.store.as_ref(), k)
                .await
                .map_err(|e| e.to_string())?
            {
                let mut e = v.entry(Action::KeyRetire, Decision::Info, Actor::system());
                e.reason = Some(format!("kek version {k} retired: it wraps no DEK"));
                v.record(&rid, e)
                    .await
                    .map_err(|e| e.reason().to_string())?;
            } else {
                left = true;
            }
        }
        if !left {
            return Ok(());
        }
    }
    Err("DEKs kept appearing under old KEKs; gave up after 8 passes".into())
}

fn rule_payload(rule: &AccessRule) -> String {
    serde_json::json!({
        "model": rule.model,
        "tee": rule.tee,
        "measurement": rule.measurement,
        "require": rule.require,
    })
    .to_string()
}

fn rule_from_payload(payload: &str) -> Result<AccessRule, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct P {
        model: String,
        tee: String,
        measurement: String,
        require: std::collections::BTreeMap<String, String>,
    }
    let p: P = serde_json::from_str(payload)?;
    Ok(AccessRule {
        model: p.model,
        tee: p.tee,
        measurement: p.measurement,
        require: p.require,
        created_ms: 0,
    })
}

fn proposal_pb(p: ProposalRecord, now: u64) -> Proposal {
    // A pending proposal past its expiry is shown as expired (it can no longer be approved).
    let state = if p.state == "pending" && now >= p.expires_ms {
        "expired".to_string()
    } else {
        p.state
    };
    Proposal {
        id: p.id,
        operation: p.operation,
        payload: p.payload,
        proposer: p.proposer,
        approvers: p.approvers,
        quorum: p.quorum,
        state,
        created_ms: p.created_ms,
        expires_ms: p.expires_ms,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn push_model(
        &self,
        req: Request<Streaming<PushModelRequest>>,
    ) -> Result<Response<PushModelResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "push_model", &rid)
            .await?;
        self.push(&rid, actor, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "list_models", &rid)
            .await?;
        let models = self
            .vault
            .store
            .list_models()
            .await
            .map_err(|e| internal(&rid, "listing models", e).into_status(&rid))?;
        Ok(Response::new(ListModelsResponse {
            models: models
                .into_iter()
                .map(|m| PbSummary {
                    name: m.name,
                    latest_version: m.latest_version,
                    versions: m.versions,
                })
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        req: Request<GetModelRequest>,
    ) -> Result<Response<GetModelResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "get_model", &rid)
            .await?;
        self.get_model(&rid, &req.get_ref().name)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn allow_access(
        &self,
        req: Request<AllowAccessRequest>,
    ) -> Result<Response<AllowAccessResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "allow_access", &rid)
            .await?;
        self.allow(&rid, actor, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn list_access(
        &self,
        req: Request<ListAccessRequest>,
    ) -> Result<Response<ListAccessResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "list_access", &rid)
            .await?;
        let model = &req.get_ref().model;
        let rules = self
            .vault
            .store
            .rules((!model.is_empty()).then_some(model.as_str()))
            .await
            .map_err(|e| internal(&rid, "listing rules", e).into_status(&rid))?;
        Ok(Response::new(ListAccessResponse {
            rules: rules
                .into_iter()
                .map(|r| PbRule {
                    model: r.model,
                    tee: r.tee,
                    measurement: r.measurement,
                    created_ms: r.created_ms,
                    require: r.require.into_iter().collect(),
                })
                .collect(),
        }))
    }

    async fn deny_access(
        &self,
        req: Request<DenyAccessRequest>,
    ) -> Result<Response<DenyAccessResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "deny_access", &rid)
            .await?;
        let r = req.into_inner();
        let rule = AccessRule {
            model: r.model,
            tee: r.tee,
            measurement: r.measurement.to_ascii_lowercase(),
            require: r.require.into_iter().collect(),
            created_ms: 0,
        };
        let removed = self
            .vault
            .store
            .remove_rule(&rule)
            .await
            .map_err(|e| internal(&rid, "removing rule", e).into_status(&rid))?;
        let mut entry = self.vault.entry(Action::AccessDeny, Decision::Info, actor);
        entry.model = Some(rule.model.chars().take(128).collect());
        entry.tee = Some(rule.tee.chars().take(32).collect());
        entry.measurement = Some(rule.measurement.chars().take(128).collect());
        let requires = rule
            .require
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        entry.simulated = (rule.tee == TeeKind::Sim.as_str()).then_some(true);
        entry.reason = Some(format!(
            "{}{}",
            if removed {
                "rule removed"
            } else {
                "no such rule"
            },
            if requires.is_empty() {
                String::new()
            } else {
                format!("; requires {requires}")
            }
        ));
        self.vault
            .record(&rid, entry)
            .await
            .map_err(|e| e.into_status(&rid))?;
        if !removed {
            return Err(ApiError::NotFound("no such access rule".into()).into_status(&rid));
        }
        Ok(Response::new(DenyAccessResponse { removed }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "revoke", &rid)
            .await?;
        let r = req.into_inner();
        let bad = |m: &str| ApiError::InvalidArgument(m.to_string()).into_status(&rid);
        let (kind, value) = match r.target {
            Some(Target::GrantId(g)) if !g.is_empty() && g.len() <= 64 => {
                (RevocationKind::Grant, g)
            }
            Some(Target::Node(n)) if !n.is_empty() && n.len() <= 128 => (RevocationKind::Node, n),
            Some(Target::Measurement(m))
                if !m.is_empty()
                    && m.len() <= 128
                    && m.len().is_multiple_of(2)
                    && m.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                (RevocationKind::Measurement, m.to_ascii_lowercase())
            }
            Some(Target::Model(m)) => {
                let (name, version) = match m.split_once('@') {
                    Some((n, v)) => (n, Some(v)),
                    None => (m.as_str(), None),
                };
                check_model_name(name).map_err(|e| e.into_status(&rid))?;
                // Canonical form (no sign, no leading zeros): the grant check compares text.
                let canonical = match version {
                    None => name.to_string(),
                    Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                        match v.parse::<u64>() {
                            Ok(n) if n > 0 => format!("{name}@{n}"),
                            _ => {
                                return Err(bad(
                                    "model version after @ must be a positive integer",
                                ));
                            }
                        }
                    }
                    Some(_) => return Err(bad("model version after @ must be a positive integer")),
                };
                (RevocationKind::Model, canonical)
            }
            _ => {
                return Err(bad(
                    "give exactly one of grant id, node, measurement (hex) or model[@version]",
                ));
            }
        };
        let rev = Revocation {
            kind,
            value,
            created_ms: self.vault.now(),
            reason: r.reason.chars().take(256).collect(),
        };
        // On the record first: a revocation takes effect only once it is logged.
        let mut entry = self.vault.entry(Action::Revoke, Decision::Info, actor);
        entry.reason = Some(if rev.reason.is_empty() {
            format!("{} {}", kind.as_str(), rev.value)
        } else {
            format!("{} {}: {}", kind.as_str(), rev.value, rev.reason)
        });
        if kind == RevocationKind::Grant {
            entry.grant_id = Some(rev.value.clone());
        }
        self.vault
            .record(&rid, entry)
            .await
            .map_err(|e| e.into_status(&rid))?;
        let grants_revoked = self
            .vault
            .store
            .revoke(&rev)
            .await
            .map_err(|e| internal(&rid, "revoking", e).into_status(&rid))?;
        Ok(Response::new(RevokeResponse { grants_revoked }))
    }

    async fn list_revocations(
        &self,
        req: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "list_revocations", &rid)
            .await?;
        let list = self
            .vault
            .store
            .revocations()
            .await
            .map_err(|e| internal(&rid, "listing revocations", e).into_status(&rid))?;
        Ok(Response::new(ListRevocationsResponse {
            revocations: list
                .into_iter()
                .map(|r| PbRevocation {
                    kind: r.kind.as_str().into(),
                    value: r.value,
                    created_ms: r.created_ms,
                    reason: r.reason,
                })
                .collect(),
        }))
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "list_grants", &rid)
            .await?;
        let r = req.into_inner();
        let grants = self
            .vault
            .store
            .grants(
                (!r.model.is_empty()).then_some(r.model.as_str()),
                (!r.node.is_empty()).then_some(r.node.as_str()),
                (!r.all).then(|| self.vault.now()),
            )
            .await
            .map_err(|e| internal(&rid, "listing grants", e).into_status(&rid))?;
        Ok(Response::new(ListGrantsResponse {
            grants: grants
                .into_iter()
                .map(|g| GrantInfo {
                    grant_id: g.grant_id,
                    model: g.model,
                    version: g.version,
                    node: g.instance_id,
                    tee: g.tee,
                    measurement: g.measurement,
                    created_ms: g.created_ms,
                    not_after_ms: g.not_after_ms,
                    revoked: g.revoked,
                    bytes_served: g.bytes_served,
                })
                .collect(),
        }))
    }

    async fn list_proposals(
        &self,
        req: Request<ListProposalsRequest>,
    ) -> Result<Response<ListProposalsResponse>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "list_proposals", &rid)
            .await?;
        let list = self
            .vault
            .store
            .proposals(!req.get_ref().all)
            .await
            .map_err(|e| internal(&rid, "listing proposals", e).into_status(&rid))?;
        Ok(Response::new(ListProposalsResponse {
            proposals: list
                .into_iter()
                .map(|p| proposal_pb(p, self.vault.now()))
                .collect(),
        }))
    }

    async fn approve_proposal(
        &self,
        req: Request<DecideProposalRequest>,
    ) -> Result<Response<Proposal>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "approve_proposal", &rid)
            .await?;
        self.decide(&rid, actor, &req.get_ref().id, true)
            .await
            .map(|p| Response::new(proposal_pb(p, self.vault.now())))
            .map_err(|e| e.into_status(&rid))
    }

    async fn remove_version(
        &self,
        req: Request<RemoveVersionRequest>,
    ) -> Result<Response<RemoveVersionResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "remove_version", &rid)
            .await?;
        self.remove_version(&rid, actor, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn rotate_keys(
        &self,
        req: Request<RotateKeysRequest>,
    ) -> Result<Response<RotateKeysResponse>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "rotate_keys", &rid)
            .await?;
        self.rotate(&rid, actor)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn get_key_status(
        &self,
        req: Request<GetKeyStatusRequest>,
    ) -> Result<Response<KeyStatus>, Status> {
        let rid = request_id();
        self.vault
            .authorize(&req, Role::Admin, "get_key_status", &rid)
            .await?;
        key_status(&self.vault)
            .await
            .map(Response::new)
            .map_err(|e| internal(&rid, "key status", e).into_status(&rid))
    }

    async fn reject_proposal(
        &self,
        req: Request<DecideProposalRequest>,
    ) -> Result<Response<Proposal>, Status> {
        let rid = request_id();
        let actor = self
            .vault
            .authorize(&req, Role::Admin, "reject_proposal", &rid)
            .await?;
        self.decide(&rid, actor, &req.get_ref().id, false)
            .await
            .map(|p| Response::new(proposal_pb(p, self.vault.now())))
            .map_err(|e| e.into_status(&rid))
    }
}
