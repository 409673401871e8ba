//! Operator calls: seal status, init, unseal, rekey (docs/key-ceremony.md). Status and unseal
//! work without a client certificate; init and rekey need the admin role.

use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::ClientError;
use crate::proto::v1::operator_service_client::OperatorServiceClient;
use crate::proto::v1::{
    InitRequest, InitResponse, RekeyCommitRequest, RekeyRequest, RekeyResponse, SealStatusRequest,
    SealStatusResponse, UnsealRequest,
};

pub struct OperatorClient {
    inner: OperatorServiceClient<Channel>,
}

impl OperatorClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: OperatorServiceClient::new(channel),
        }
    }

    pub async fn status(&mut self) -> Result<SealStatusResponse, ClientError> {
        Ok(self.inner.status(SealStatusRequest {}).await?.into_inner())
    }

    /// Generates the root key of a shamir-sealed vault; the shares come back once.
    pub async fn init(&mut self, shares: u32, threshold: u32) -> Result<InitResponse, ClientError> {
        Ok(self
            .inner
            .init(InitRequest { shares, threshold })
            .await?
            .into_inner())
    }

    /// Submits one share.
    pub async fn unseal(&mut self, share: &str) -> Result<SealStatusResponse, ClientError> {
        Ok(self
            .inner
            .unseal(UnsealRequest {
                share: share.to_string(),
                reset: false,
            })
            .await?
            .into_inner())
    }

    /// Forgets the shares submitted so far.
    pub async fn reset(&mut self) -> Result<SealStatusResponse, ClientError> {
        Ok(self
            .inner
            .unseal(UnsealRequest {
                share: String::new(),
                reset: true,
            })
            .await?
            .into_inner())
    }

    /// Stages (shamir) or applies (pkcs11) a new root key.
    pub async fn rekey(
        &mut self,
        target: &str,
        shares: u32,
        threshold: u32,
        current_shares: &[Zeroizing<String>],
    ) -> Result<RekeyResponse, ClientError> {
        Ok(self
            .inner
            .rekey(RekeyRequest {
                target: target.to_string(),
                shares,
                threshold,
                current_shares: current_shares.iter().map(|s| s.to_string()).collect(),
            })
            .await?
            .into_inner())
    }

    /// Puts a staged rekey in force with a threshold of its new shares.
    pub async fn rekey_commit(
        &mut self,
        new_shares: &[String],
    ) -> Result<RekeyResponse, ClientError> {
        Ok(self
            .inner
            .rekey_commit(RekeyCommitRequest {
                new_shares: new_shares.to_vec(),
            })
            .await?
            .into_inner())
    }
}
