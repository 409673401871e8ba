//! Auditor calls: read the log, its checkpoint, proofs and stored evidence.

use tonic::transport::Channel;

use super::ClientError;
use crate::audit::merkle::Hash;
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::proto::v1::{
    Checkpoint, GetCheckpointRequest, GetConsistencyProofRequest, GetEntriesRequest,
    GetEvidenceRequest, GetInclusionProofRequest, TailRequest,
};

pub struct AuditClient {
    inner: AuditServiceClient<Channel>,
}

fn hashes(p: crate::proto::v1::Proof) -> Result<Vec<Hash>, ClientError> {
    p.hashes
        .into_iter()
        .map(|h| {
            h.as_slice()
                .try_into()
                .map_err(|_| ClientError::Protocol("proof hash is not 32 bytes".into()))
        })
        .collect()
}

impl AuditClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: AuditServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        }
    }

    /// Streams entries with index in `[start, end)` (`end` 0 = to the current end) to `each`.
    pub async fn entries(
        &mut self,
        start: u64,
        end: u64,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), ClientError>,
    ) -> Result<u64, ClientError> {
        let mut stream = self
            .inner
            .get_entries(GetEntriesRequest { start, end })
            .await?
            .into_inner();
        let mut n = 0;
        let mut expect = start;
        while let Some(e) = stream.message().await? {
            if e.index != expect {
                return Err(ClientError::Protocol(format!(
                    "entry {expect} missing from the stream"
                )));
            }
            each(e.index, &e.entry)?;
            expect += 1;
            n += 1;
        }
        Ok(n)
    }

    /// Follows the log from `start`: existing entries, then new ones as they become durable.
    pub async fn tail(
        &mut self,
        start: u64,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut stream = self.inner.tail(TailRequest { start }).await?.into_inner();
        while let Some(e) = stream.message().await? {
            each(e.index, &e.entry)?;
        }
        Ok(())
    }

    /// A checkpoint covering every entry durable now.
    pub async fn checkpoint(&mut self) -> Result<Checkpoint, ClientError> {
        Ok(self
            .inner
            .get_checkpoint(GetCheckpointRequest {})
            .await?
            .into_inner())
    }

    pub async fn inclusion_proof(
        &mut self,
        index: u64,
        tree_size: u64,
    ) -> Result<Vec<Hash>, ClientError> {
        hashes(
            self.inner
                .get_inclusion_proof(GetInclusionProofRequest { index, tree_size })
                .await?
                .into_inner(),
        )
    }

    pub async fn consistency_proof(
        &mut self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<Hash>, ClientError> {
        hashes(
            self.inner
                .get_consistency_proof(GetConsistencyProofRequest { old_size, new_size })
                .await?
                .into_inner(),
        )
    }

    pub async fn evidence(&mut self, sha256: &[u8; 32]) -> Result<Vec<u8>, ClientError> {
        Ok(self
            .inner
            .get_evidence(GetEvidenceRequest {
                sha256: sha256.to_vec(),
            })
            .await?
            .into_inner()
            .evidence)
    }
}
