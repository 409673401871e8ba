//! The node side of the boot protocol: challenge, evidence, attest, grant, fetch, decrypt.
//! Plaintext goes to a [`WeightSink`] the caller provides; [`DirSink`] writes files into a
//! directory only when every file of the version decrypted and verified.

use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use tonic::transport::Channel;

use super::ClientError;
use crate::attest::report_data;
use crate::attest::sim::{SimReport, SimSigner};
use crate::envelope::manifest::verify_manifest;
use crate::envelope::{FileContext, FileOpener};
use crate::grant::hpke::NodeKeyPair;
use crate::proto::v1::node_service_client::NodeServiceClient;
use crate::proto::v1::{
    AttestRequest, FetchWeightsRequest, GetChallengeRequest, RequestGrantRequest,
};
use crate::server::MAX_MESSAGE;
use crate::time::{Clock, SystemClock};

/// Produces evidence inside the TEE for the given report data.
pub trait Attester: Send + Sync {
    /// The TEE kind name sent to the vault ("sim", ...).
    fn tee(&self) -> &str;
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError>;
}

/// The development TEE: signs a report with the registered sim key.
pub struct SimAttester {
    signer: SimSigner,
    measurement: String,
    instance_id: String,
}

impl SimAttester {
    pub fn new(pkcs8: &[u8], measurement: &str, instance_id: &str) -> Result<Self, ClientError> {
        let signer = SimSigner::from_pkcs8(pkcs8).map_err(|e| ClientError::Usage(e.to_string()))?;
        Ok(Self {
            signer,
            measurement: measurement.to_ascii_lowercase(),
            instance_id: instance_id.to_string(),
        })
    }
}

impl Attester for SimAttester {
    fn tee(&self) -> &str {
        "sim"
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError> {
        Ok(self.signer.sign(&SimReport {
            measurement: self.measurement.clone(),
            report_data: hex::encode(report_data),
            instance_id: self.instance_id.clone(),
            debug: false,
            issued_ms: SystemClock.now_ms(),
        }))
    }
}

/// Receives decrypted weights, file by file, chunk by chunk, in order.
pub trait WeightSink {
    fn begin_file(&mut self, path: &str, size: u64) -> Result<(), ClientError>;
    fn write(&mut self, plaintext: &[u8]) -> Result<(), ClientError>;
    fn end_file(&mut self) -> Result<(), ClientError>;
    /// Everything was received and verified.
    fn commit(&mut self) -> Result<(), ClientError>;
    /// The fetch failed: discard what was received.
    fn abort(&mut self);
}

/// Writes files under a staging directory inside `out` and moves them into place on commit;
/// on failure the staging directory is removed, so a failed fetch writes nothing.
pub struct DirSink {
    out: PathBuf,
    staging: Option<PathBuf>,
    current: Option<std::io::BufWriter<std::fs::File>>,
    written: Vec<String>,
}

impl DirSink {
    pub fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            staging: None,
            current: None,
            written: Vec::new(),
        }
    }

    fn staging(&mut self) -> Result<PathBuf, ClientError> {
        if let Some(s) = &self.staging {
            return Ok(s.clone());
        }
        std::fs::create_dir_all(&self.out).map_err(|e| ClientError::io(&self.out, e))?;
        let tag = hex::encode(
            crate::grant::random::<6>().map_err(|_| ClientError::Protocol("rng".into()))?,
        );
        let s = self.out.join(format!(".weightvault-partial-{tag}"));
        std::fs::create_dir(&s).map_err(|e| ClientError::io(&s, e))?;
        self.staging = Some(s.clone());
        Ok(s)
    }
}

impl WeightSink for DirSink {
    fn begin_file(&mut self, path: &str, _size: u64) -> Result<(), ClientError> {
        let p = self.staging()?.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ClientError::io(parent, e))?;
        }
        let f = std::fs::File::create(&p).map_err(|e| ClientError::io(&p, e))?;
        self.current = Some(std::io::BufWriter::with_capacity(1 << 20, f));
        self.written.push(path.to_string());
        Ok(())
    }

    fn write(&mut self, plaintext: &[u8]) -> Result<(), ClientError> {
        use std::io::Write;
        let f = self.current.as_mut().expect("begin_file first");
        f.write_all(plaintext)
            .map_err(|e| ClientError::io(&self.out, e))
    }

    fn end_file(&mut self) -> Result<(), ClientError> {
        use std::io::Write;
        if let Some(mut f) = self.current.take() {
            f.flush().map_err(|e| ClientError::io(&self.out, e))?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ClientError> {
        let staging = self.staging()?;
        for rel in &self.written {
            let from = staging.join(rel);
            let to = self.out.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| ClientError::io(parent, e))?;
            }
            std::fs::rename(&from, &to).map_err(|e| ClientError::io(&to, e))?;
        }
        let _ = std::fs::remove_dir_all(&staging);
        self.staging = None;
        Ok(())
    }

    fn abort(&mut self) {
        self.current = None;
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// Options of one fetch.
#[derive(Default)]
pub struct FetchOptions {
    /// 0 = latest.
    pub version: u64,
    /// Also check each file's SHA-256 from the signed manifest (costs a SHA-256 pass).
    pub verify_digest: bool,
    /// Pin the vault's manifest signing key instead of trusting the one the vault sends.
    pub manifest_key: Option<[u8; 32]>,
}

/// What a fetch received.
#[derive(Debug)]
pub struct FetchReport {
    pub model: String,
    pub version: u64,
    pub grant_id: String,
    pub files: usize,
    pub bytes: u64,
}

pub struct NodeClient {
    inner: NodeServiceClient<Channel>,
}

impl NodeClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: NodeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
        }
    }

    /// Runs the whole boot protocol for `model` and streams the plaintext into `sink`.
    /// `progress(total, done)` is called as bytes arrive.
    pub async fn fetch(
        &mut self,
        model: &str,
        opts: &FetchOptions,
        attester: &dyn Attester,
        sink: &mut dyn WeightSink,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FetchReport, ClientError> {
        match self
            .fetch_inner(model, opts, attester, sink, progress)
            .await
        {
            Ok(r) => Ok(r),
            Err(e) => {
                sink.abort();
                Err(e)
            }
        }
    }

    async fn fetch_inner(
        &mut self,
        model: &str,
        opts: &FetchOptions,
        attester: &dyn Attester,
        sink: &mut dyn WeightSink,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FetchReport, ClientError> {
        let challenge = self
            .inner
            .get_challenge(GetChallengeRequest {})
            .await?
            .into_inner();
        let nonce: [u8; 32] = challenge
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Protocol("nonce is not 32 bytes".into()))?;
        let keys = NodeKeyPair::generate().map_err(|e| ClientError::Protocol(e.to_string()))?;
        let evidence = attester.evidence(&report_data(&nonce, keys.public_key()))?;
        let session = self
            .inner
            .attest(AttestRequest {
                tee: attester.tee().to_string(),
                evidence,
                node_public_key: keys.public_key().to_vec(),
                nonce: nonce.to_vec(),
            })
            .await?
            .into_inner();
        let grant = self
            .inner
            .request_grant(RequestGrantRequest {
                session_token: session.session_token.clone(),
                model: model.to_string(),
                version: opts.version,
            })
            .await?
            .into_inner();

        let vault_key: [u8; 32] = grant
            .manifest_public_key
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Protocol("manifest key is not 32 bytes".into()))?;
        if opts.manifest_key.is_some_and(|pinned| pinned != vault_key) {
            return Err(ClientError::Protocol(
                "the vault's manifest key is not the pinned one".into(),
            ));
        }
        let manifest = verify_manifest(&vault_key, &grant.manifest, &grant.manifest_signature)
            .map_err(|e| ClientError::Protocol(format!("manifest: {e}")))?;
        if manifest.model != model
            || manifest.version != grant.version
            || (opts.version != 0 && grant.version != opts.version)
        {
            return Err(ClientError::Protocol(
                "manifest names another model or version".into(),
            ));
        }
        // The HPKE info must be the one this grant implies (RFC 9180 §5.1: info binds context).
        let info = crate::grant::hpke::grant_info(
            &grant.grant_id,
            model,
            grant.version,
            grant.not_after_ms,
        );
        if info != grant.hpke_info {
            return Err(ClientError::Protocol(
                "grant info does not match the grant".into(),
            ));
        }
        let dek = keys
            .open_dek(&grant.sealed_dek_enc, &grant.sealed_dek, &info)
            .map_err(|_| ClientError::DecryptionFailed)?;

        let total: u64 = manifest.files.iter().map(|f| f.size).sum();
        let mut done = 0u64;
        progress(total, 0);
        let mut plain = Vec::new();
        for file in &manifest.files {
            let header = file
                .decode_header()
                .map_err(|e| ClientError::Protocol(format!("header of {}: {e}", file.path)))?;
            let ctx = FileContext {
                model: &manifest.model,
                version_id: &manifest.version_id,
                path: &file.path,
            };
            let opener = FileOpener::new(&dek, &ctx, &header);
            let mut sha = opts
                .verify_digest
                .then(|| digest::Context::new(&digest::SHA256));
            sink.begin_file(&file.path, file.size)?;
            let mut stream = self
                .inner
                .fetch_weights(FetchWeightsRequest {
                    session_token: session.session_token.clone(),
                    grant_id: grant.grant_id.clone(),
                    file: file.path.clone(),
                    first_chunk: 0,
                    end_chunk: 0,
                })
                .await?
                .into_inner();
            let mut expect = 0u64;
            while let Some(chunk) = stream.message().await? {
                // Chunks arrive in order; a gap, repeat or extra chunk is refused (truncation
                // and extension are also caught by the last-chunk flag in the nonce).
                if chunk.index != expect || expect >= file.chunks {
                    return Err(ClientError::Protocol(format!(
                        "unexpected chunk {} of {}",
                        chunk.index, file.path
                    )));
                }
                opener
                    .open_into(chunk.index, &chunk.ciphertext, &mut plain)
                    .map_err(|_| ClientError::DecryptionFailed)?;
                if let Some(s) = sha.as_mut() {
                    s.update(&plain);
                }
                sink.write(&plain)?;
                done += plain.len() as u64;
                progress(total, done);
                expect += 1;
            }
            if expect != file.chunks {
                return Err(ClientError::Protocol(format!(
                    "{}: received {expect} of {} chunks",
                    file.path, file.chunks
                )));
            }
            if sha.is_some_and(|s| s.finish().as_ref() != file.sha256) {
                return Err(ClientError::Protocol(format!(
                    "{}: SHA-256 differs from the manifest",
                    file.path
                )));
            }
            sink.end_file()?;
        }
        drop(dek);
        plain.fill(0);
        sink.commit()?;
        Ok(FetchReport {
            model: manifest.model.clone(),
            version: manifest.version,
            grant_id: grant.grant_id,
            files: manifest.files.len(),
            bytes: done,
        })
    }
}

/// A parsed `NAME[@VERSION]`.
pub fn parse_model_ref(s: &str) -> Result<(String, u64), ClientError> {
    match s.split_once('@') {
        None => Ok((s.to_string(), 0)),
        Some((name, v)) => {
            let v: u64 = v.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                ClientError::Usage(format!("{s:?}: version after @ must be a positive integer"))
            })?;
            Ok((name.to_string(), v))
        }
    }
}
