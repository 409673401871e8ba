//! Admin calls: push a model version, list, show and destroy models, access policy, KEK
//! rotation.

use std::io::Read;
use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::ClientError;
use crate::proto::v1::admin_service_client::AdminServiceClient;
use crate::proto::v1::push_model_request::Msg;
use crate::proto::v1::{
    AccessRule, AllowAccessRequest, FileStart, GetModelRequest, GetModelResponse,
    ListAccessRequest, ListModelsRequest, ModelSummary, PushFinish, PushModelRequest,
    PushModelResponse, PushStart,
};
use crate::server::MAX_MESSAGE;

/// Plaintext bytes per upload message.
const UPLOAD_PIECE: usize = 1024 * 1024;
/// Upload messages read ahead of the network.
const READ_AHEAD: usize = 4;

/// Options of one push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Have the vault record each file's SHA-256 of the plaintext in the signed manifest
    /// (`weightvault model push --digest`). Provenance only: integrity comes from the AEAD tags
    /// and the manifest signature. Needed by fetches with `FetchOptions::verify_digest`; costs
    /// the vault a SHA-256 pass over every byte, so it is off by default.
    pub record_digest: bool,
}

pub struct AdminClient {
    inner: AdminServiceClient<Channel>,
}

impl AdminClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: AdminServiceClient::new(channel).max_encoding_message_size(MAX_MESSAGE),
        }
    }

    /// Uploads files as a new version of `model` with the default [`PushOptions`] (no digests).
    /// `files` are `(path in model, path on disk, size)` as from [`super::collect_files`];
    /// `progress` gets the bytes sent so far.
    pub async fn push(
        &mut self,
        model: &str,
        files: Vec<(String, PathBuf, u64)>,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<PushModelResponse, ClientError> {
        self.push_with(model, files, &PushOptions::default(), progress)
            .await
    }

    /// Like [`Self::push`], with options.
    pub async fn push_with(
        &mut self,
        model: &str,
        files: Vec<(String, PathBuf, u64)>,
        opts: &PushOptions,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<PushModelResponse, ClientError> {
        let (tx, rx) = mpsc::channel::<PushModelRequest>(READ_AHEAD);
        let start = PushStart {
            model: model.to_string(),
            record_digest: opts.record_digest,
        };
        // One blocking thread reads the files with plain `read` calls straight into each
        // message's buffer (no zero-fill, no intermediate buffer as with `tokio::fs`) while the
        // runtime encodes and sends the previous pieces.
        let reader = tokio::task::spawn_blocking(move || read_files(&tx, start, files, progress));
        let result = self.inner.push_model(ReceiverStream::new(rx)).await;
        let read = reader
            .await
            .map_err(|e| ClientError::Protocol(format!("upload reader failed: {e}")))?;
        read?;
        Ok(result?.into_inner())
    }

    pub async fn list(&mut self) -> Result<Vec<ModelSummary>, ClientError> {
        Ok(self
            .inner
            .list_models(ListModelsRequest {})
            .await?
            .into_inner()
            .models)
    }

    pub async fn show(&mut self, name: &str) -> Result<GetModelResponse, ClientError> {
        Ok(self
            .inner
            .get_model(GetModelRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Returns whether the rule was new.
    pub async fn allow(
        &mut self,
        model: &str,
        tee: &str,
        measurement: &str,
    ) -> Result<bool, ClientError> {
        self.allow_with(model, tee, measurement, Default::default())
            .await
    }

    /// Like [`Self::allow`], with further claims the evidence must carry.
    pub async fn allow_with(
        &mut self,
        model: &str,
        tee: &str,
        measurement: &str,
        require: std::collections::HashMap<String, String>,
    ) -> Result<bool, ClientError> {
        Ok(self
            .inner
            .allow_access(AllowAccessRequest {
                model: model.to_string(),
                tee: tee.to_string(),
                measurement: measurement.to_string(),
                require,
            })
            .await?
            .into_inner()
            .created)
    }

    pub async fn access_rules(
        &mut self,
        model: Option<&str>,
    ) -> Result<Vec<AccessRule>, ClientError> {
        Ok(self
            .inner
            .list_access(ListAccessRequest {
                model: model.unwrap_or_default().to_string(),
            })
            .await?
            .into_inner()
            .rules)
    }

    /// Removes an allow rule (NOT_FOUND if there is none).
    pub async fn deny(
        &mut self,
        model: &str,
        tee: &str,
        measurement: &str,
        require: std::collections::HashMap<String, String>,
    ) -> Result<(), ClientError> {
        self.inner
            .deny_access(crate::proto::v1::DenyAccessRequest {
                model: model.to_string(),
                tee: tee.to_string(),
                measurement: measurement.to_string(),
                require,
            })
            .await?;
        Ok(())
    }

    /// Revokes; returns the number of grants invalidated.
    pub async fn revoke(
        &mut self,
        target: crate::proto::v1::revoke_request::Target,
        reason: &str,
    ) -> Result<u64, ClientError> {
        Ok(self
            .inner
            .revoke(crate::proto::v1::RevokeRequest {
                target: Some(target),
                reason: reason.to_string(),
            })
            .await?
            .into_inner()
            .grants_revoked)
    }

    pub async fn revocations(&mut self) -> Result<Vec<crate::proto::v1::Revocation>, ClientError> {
        Ok(self
            .inner
            .list_revocations(crate::proto::v1::ListRevocationsRequest {})
            .await?
            .into_inner()
            .revocations)
    }

    pub async fn grants(
        &mut self,
        model: Option<&str>,
        node: Option<&str>,
        all: bool,
    ) -> Result<Vec<crate::proto::v1::GrantInfo>, ClientError> {
        Ok(self
            .inner
            .list_grants(crate::proto::v1::ListGrantsRequest {
                model: model.unwrap_or_default().to_string(),
                node: node.unwrap_or_default().to_string(),
                all,
            })
            .await?
            .into_inner()
            .grants)
    }

    pub async fn proposals(
        &mut self,
        all: bool,
    ) -> Result<Vec<crate::proto::v1::Proposal>, ClientError> {
        Ok(self
            .inner
            .list_proposals(crate::proto::v1::ListProposalsRequest { all })
            .await?
            .into_inner()
            .proposals)
    }

    /// Approves (`true`) or rejects a proposal; returns it as it now stands.
    pub async fn decide(
        &mut self,
        id: &str,
        approve: bool,
    ) -> Result<crate::proto::v1::Proposal, ClientError> {
        let req = crate::proto::v1::DecideProposalRequest { id: id.to_string() };
        Ok(if approve {
            self.inner.approve_proposal(req).await?
        } else {
            self.inner.reject_proposal(req).await?
        }
        .into_inner())
    }

    /// Like [`Self::allow_with`], also returning the proposal id when approvals are needed.
    pub async fn allow_or_propose(
        &mut self,
        model: &str,
        tee: &str,
        measurement: &str,
        require: std::collections::HashMap<String, String>,
    ) -> Result<crate::proto::v1::AllowAccessResponse, ClientError> {
        Ok(self
            .inner
            .allow_access(AllowAccessRequest {
                model: model.to_string(),
                tee: tee.to_string(),
                measurement: measurement.to_string(),
                require,
            })
            .await?
            .into_inner())
    }
    /// Destroys one model version (crypto-shredding): its wrapped DEK, then its blobs.
    pub async fn remove_version(
        &mut self,
        model: &str,
        version: u64,
        reason: &str,
    ) -> Result<crate::proto::v1::RemoveVersionResponse, ClientError> {
        Ok(self
            .inner
            .remove_version(crate::proto::v1::RemoveVersionRequest {
                model: model.to_string(),
                version,
                reason: reason.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Starts a KEK rotation; the DEKs are re-wrapped in the background.
    pub async fn rotate_keys(
        &mut self,
    ) -> Result<crate::proto::v1::RotateKeysResponse, ClientError> {
        Ok(self
            .inner
            .rotate_keys(crate::proto::v1::RotateKeysRequest {})
            .await?
            .into_inner())
    }

    pub async fn key_status(&mut self) -> Result<crate::proto::v1::KeyStatus, ClientError> {
        Ok(self
            .inner
            .get_key_status(crate::proto::v1::GetKeyStatusRequest {})
            .await?
            .into_inner())
    }
}

/// Sends start, then each file's start and bytes, then finish. Stops at the first error and
/// drops the sender without `finish`, so the vault discards the partial upload; stops quietly
/// when the call ended (the vault's answer says why).
fn read_files(
    tx: &mpsc::Sender<PushModelRequest>,
    start: PushStart,
    files: Vec<(String, PathBuf, u64)>,
    progress: impl Fn(u64),
) -> Result<(), ClientError> {
    let send = |msg| {
        tx.blocking_send(PushModelRequest { msg: Some(msg) })
            .is_ok()
    };
    if !send(Msg::Start(start)) {
        return Ok(());
    }
    let mut sent = 0u64;
    for (rel, path, size) in files {
        let mut f = std::fs::File::open(&path).map_err(|e| ClientError::io(&path, e))?;
        if !send(Msg::File(FileStart { path: rel, size })) {
            return Ok(());
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(UPLOAD_PIECE as u64);
            let mut buf = Vec::with_capacity(want as usize);
            // `read_to_end` fills the spare capacity without initializing it first.
            let got = (&mut f)
                .take(want)
                .read_to_end(&mut buf)
                .map_err(|e| ClientError::io(&path, e))?;
            if (got as u64) < want {
                return Err(ClientError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "file ended after {} of {size} bytes (did the file change during \
                             the push?)",
                            size - left + got as u64
                        ),
                    ),
                ));
            }
            left -= want;
            sent += want;
            if !send(Msg::Data(buf.into())) {
                return Ok(());
            }
            progress(sent);
        }
    }
    let _ = send(Msg::Finish(PushFinish {}));
    Ok(())
}
