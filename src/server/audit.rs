//! AuditService: read and prove the log. Requires the auditor role.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Role;
use super::error::{ApiError, internal};
use super::{Vault, request_id};
use crate::audit::merkle;
use crate::proto::v1::audit_service_server::AuditService;
use crate::proto::v1::{
    AuditEntry as PbEntry, Checkpoint, Evidence, GetCheckpointRequest, GetConsistencyProofRequest,
    GetEntriesRequest, GetEvidenceRequest, GetInclusionProofRequest, Proof, TailRequest,
};

const PAGE: u32 = 256;

pub struct AuditApi {
    vault: Arc<Vault>,
}

impl AuditApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// Every AuditService call requires the auditor role.
    async fn require<T>(&self, req: &Request<T>, method: &str) -> Result<String, Status> {
        let rid = request_id();
        self.vault
            .authorize(req, Role::Auditor, method, &rid)
            .await?;
        Ok(rid)
    }

    /// Streams entries `[start, end)` (or without end when `follow`) into a channel.
    fn stream(&self, rid: String, start: u64, end: Option<u64>) -> EntryStream {
        let (tx, rx) = mpsc::channel(PAGE as usize);
        let vault = self.vault.clone();
        tokio::spawn(async move {
            let mut size = vault.audit.size();
            let mut next = start;
            loop {
                let limit = end.unwrap_or(*size.borrow_and_update());
                while next < limit {
                    let page = match vault.store.audit_entries(next, limit, PAGE).await {
                        Ok(p) if !p.is_empty() => p,
                        Ok(_) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Err(internal(&rid, "reading audit log", e).into_status(&rid)))
                                .await;
                            return;
                        }
                    };
                    for (index, entry) in page {
                        next = index + 1;
                        if tx.send(Ok(PbEntry { index, entry })).await.is_err() {
                            return;
                        }
                    }
                }
                if end.is_some() {
                    return;
                }
                // Follow: wait for the log to grow, or for the client to leave.
                tokio::select! {
                    changed = size.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = vault.shutdown.cancelled() => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<PbEntry, Status>> + Send>>;

fn proof_of(hashes: Vec<merkle::Hash>) -> Proof {
    Proof {
        hashes: hashes.into_iter().map(|h| h.to_vec()).collect(),
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn get_checkpoint(
        &self,
        req: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        let rid = self.require(&req, "get_checkpoint").await?;
        let cp = self.vault.audit.checkpoint().await.map_err(|e| {
            tracing::error!(request_id = rid, error = %e, "checkpoint");
            ApiError::AuditUnavailable.into_status(&rid)
        })?;
        Ok(Response::new(Checkpoint {
            note: cp.note,
            verifier_key: self.vault.audit.verifier_key().to_string(),
            size: cp.size,
            root: cp.root.to_vec(),
        }))
    }

    type GetEntriesStream = EntryStream;

    async fn get_entries(
        &self,
        req: Request<GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        let rid = self.require(&req, "get_entries").await?;
        let GetEntriesRequest { start, end } = req.into_inner();
        let size = *self.vault.audit.size().borrow();
        let end = if end == 0 { size } else { end.min(size) };
        Ok(Response::new(self.stream(rid, start, Some(end))))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<GetInclusionProofRequest>,
    ) -> Result<Response<Proof>, Status> {
        let rid = self.require(&req, "get_inclusion_proof").await?;
        let GetInclusionProofRequest { index, tree_size } = req.into_inner();
        let leaves = self.vault.audit.leaves().clone();
        let r = tokio::task::spawn_blocking(move || {
            let prefix = leaves.prefix(tree_size).ok_or_else(|| {
                ApiError::OutOfRange(format!("tree size {tree_size} is beyond the log"))
            })?;
            merkle::inclusion_proof(index, tree_size, &mut |i| prefix[i as usize])
                .map_err(|e| ApiError::OutOfRange(format!("inclusion proof: {e}")))
        })
        .await
        .map_err(|e| internal(&rid, "proof task", e).into_status(&rid))?;
        r.map(|h| Response::new(proof_of(h)))
            .map_err(|e| e.into_status(&rid))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<GetConsistencyProofRequest>,
    ) -> Result<Response<Proof>, Status> {
        let rid = self.require(&req, "get_consistency_proof").await?;
        let GetConsistencyProofRequest { old_size, new_size } = req.into_inner();
        let leaves = self.vault.audit.leaves().clone();
        let r = tokio::task::spawn_blocking(move || {
            let prefix = leaves.prefix(new_size).ok_or_else(|| {
                ApiError::OutOfRange(format!("tree size {new_size} is beyond the log"))
            })?;
            merkle::consistency_proof(old_size, new_size, &mut |i| prefix[i as usize])
                .map_err(|e| ApiError::OutOfRange(format!("consistency proof: {e}")))
        })
        .await
        .map_err(|e| internal(&rid, "proof task", e).into_status(&rid))?;
        r.map(|h| Response::new(proof_of(h)))
            .map_err(|e| e.into_status(&rid))
    }

    type TailStream = EntryStream;

    async fn tail(&self, req: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let rid = self.require(&req, "tail").await?;
        Ok(Response::new(self.stream(rid, req.get_ref().start, None)))
    }

    async fn get_evidence(
        &self,
        req: Request<GetEvidenceRequest>,
    ) -> Result<Response<Evidence>, Status> {
        let rid = self.require(&req, "get_evidence").await?;
        let sha: [u8; 32] = req.get_ref().sha256.as_slice().try_into().map_err(|_| {
            ApiError::InvalidArgument("sha256 must be 32 bytes".into()).into_status(&rid)
        })?;
        let ev = self
            .vault
            .store
            .get_evidence(&sha)
            .await
            .map_err(|e| internal(&rid, "reading evidence", e).into_status(&rid))?
            .ok_or_else(|| {
                ApiError::NotFound("no evidence with that hash".into()).into_status(&rid)
            })?;
        Ok(Response::new(Evidence { evidence: ev }))
    }
}
