//! AuditService: read the log. Requires the auditor role.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Role;
use super::error::internal;
use super::{Vault, request_id};
use crate::proto::v1::audit_service_server::AuditService;
use crate::proto::v1::{AuditEntry as PbEntry, GetEntriesRequest};

const PAGE: u32 = 256;

pub struct AuditApi {
    vault: Arc<Vault>,
}

impl AuditApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<PbEntry, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    type GetEntriesStream = EntryStream;

    async fn get_entries(
        &self,
        req: Request<GetEntriesRequest>,
    ) -> Result<Response<Self::GetEntriesStream>, Status> {
        let rid = request_id();
        self.vault
            .roles
            .require(&req, Role::Auditor)
            .map_err(|e| e.into_status(&rid))?;
        let GetEntriesRequest { start, end } = req.into_inner();
        let size = self
            .vault
            .store
            .audit_size()
            .await
            .map_err(|e| internal(&rid, "audit size", e).into_status(&rid))?;
        let end = if end == 0 { size } else { end.min(size) };
        let (tx, rx) = mpsc::channel(PAGE as usize);
        let vault = self.vault.clone();
        tokio::spawn(async move {
            let mut next = start;
            while next < end {
                let page = match vault.store.audit_entries(next, end, PAGE).await {
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
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
