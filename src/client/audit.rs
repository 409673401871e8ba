//! Auditor calls: read the log.

use tonic::transport::Channel;

use super::ClientError;
use crate::proto::v1::GetEntriesRequest;
use crate::proto::v1::audit_service_client::AuditServiceClient;

pub struct AuditClient {
    inner: AuditServiceClient<Channel>,
}

impl AuditClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: AuditServiceClient::new(channel),
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
        while let Some(e) = stream.message().await? {
            each(e.index, &e.entry)?;
            n += 1;
        }
        Ok(n)
    }
}
