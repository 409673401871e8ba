//! The node side of the boot protocol: challenge, evidence, attest, grant, fetch, decrypt
//! (docs/protocol.md). [`NodeClient::grant`] runs the protocol up to an opened grant;
//! [`Granted`] then fetches the whole version (files and ranges of files in parallel, each
//! stream resumed after a dropped connection from the first chunk it has not received) or one
//! chunk range. Plaintext goes to a [`WeightSink`]: [`DirSink`] writes files into a directory
//! only when every file decrypted and verified, [`MemorySink`] fills memory the caller provides.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::ClientError;
use super::chunk_stream;
use crate::attest::report_data;
use crate::attest::sim::{SimReport, SimSigner};
use crate::envelope::manifest::{Manifest, verify_manifest};
use crate::envelope::{FileContext, FileOpener};
use crate::grant::hpke::NodeKeyPair;
use crate::proto::v1::node_service_client::NodeServiceClient;
use crate::proto::v1::{
    AttestRequest, FetchWeightsRequest, GetChallengeRequest, RequestGrantRequest,
};
use crate::server::MAX_MESSAGE;
use crate::server::error::REQUEST_ID_HEADER;
use crate::time::{Clock, SystemClock};

/// Streams in flight at once when [`FetchOptions::parallel`] is 0.
pub const DEFAULT_PARALLEL: usize = 4;
/// A file is split into ranges for parallel streams only in pieces of at least this many chunks.
const MIN_RANGE_CHUNKS: u64 = 4;
/// Retries of the attestation step after the vault's call limit refused it.
const LIMIT_RETRIES: u32 = 5;
/// The longest a retry waits for the vault's `retry-after-ms` hint.
const MAX_LIMIT_WAIT_MS: u64 = 10_000;

/// Produces evidence inside the TEE for the given report data.
pub trait Attester: Send + Sync {
    /// The TEE kind name sent to the vault ("sim", ...).
    fn tee(&self) -> &str;
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError>;

    /// Evidence for one attempt, given the vault's nonce and the node's X25519 key. By default
    /// the evidence carries `attest::report_data(nonce, key)`; a TEE whose evidence has its own
    /// fields for the two (Nitro's `nonce` and `public_key`) overrides this.
    fn evidence_for(
        &self,
        nonce: &[u8; 32],
        node_public_key: &[u8; 32],
    ) -> Result<Vec<u8>, ClientError> {
        self.evidence(&report_data(nonce, node_public_key))
    }
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

/// Receives authenticated plaintext. Pieces of different files (and of different ranges of one
/// file) arrive interleaved when streams run in parallel; every byte of every file arrives
/// exactly once, and nothing arrives before `begin` or after `commit`/`abort`.
pub trait WeightSink: Send {
    /// The verified manifest's files as `(path, size)`, in manifest order, before any data.
    fn begin(&mut self, files: &[(String, u64)]) -> Result<(), ClientError>;
    /// Plaintext of file number `file` (index into `begin`'s list) starting at byte `offset`.
    fn write_at(&mut self, file: usize, offset: u64, plaintext: &[u8]) -> Result<(), ClientError>;
    /// Every file was received, decrypted and (with `verify_digest`) checked.
    fn commit(&mut self) -> Result<(), ClientError>;
    /// The fetch failed: discard what was received.
    fn abort(&mut self);
}

/// Writes files under a staging directory inside `out` and moves them into place on commit;
/// on failure the staging directory is removed, so a failed fetch writes nothing. Put `out` on
/// tmpfs to keep plaintext off disk.
pub struct DirSink {
    out: PathBuf,
    staging: Option<PathBuf>,
    files: Vec<(String, u64)>,
    open: Vec<Option<std::fs::File>>,
    left: Vec<u64>,
}

impl DirSink {
    pub fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            staging: None,
            files: Vec::new(),
            open: Vec::new(),
            left: Vec::new(),
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
    fn begin(&mut self, files: &[(String, u64)]) -> Result<(), ClientError> {
        let staging = self.staging()?;
        for (path, size) in files {
            let p = staging.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| ClientError::io(parent, e))?;
            }
            let f = std::fs::File::create(&p).map_err(|e| ClientError::io(&p, e))?;
            // Sized up front: pieces are written where they belong, in any order.
            f.set_len(*size).map_err(|e| ClientError::io(&p, e))?;
            // Opened again on first write; a model of thousands of files keeps few open.
            self.open.push(None);
            self.left.push(*size);
        }
        self.files = files.to_vec();
        Ok(())
    }

    fn write_at(&mut self, file: usize, offset: u64, plaintext: &[u8]) -> Result<(), ClientError> {
        use std::os::unix::fs::FileExt;
        let staging = self.staging()?;
        let p = staging.join(&self.files[file].0);
        if self.open[file].is_none() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| ClientError::io(&p, e))?;
            self.open[file] = Some(f);
        }
        let f = self.open[file].as_ref().expect("opened above");
        f.write_all_at(plaintext, offset)
            .map_err(|e| ClientError::io(&p, e))?;
        self.left[file] = self.left[file].saturating_sub(plaintext.len() as u64);
        if self.left[file] == 0 {
            self.open[file] = None;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ClientError> {
        let staging = self.staging()?;
        self.open.clear();
        for (rel, _) in &self.files {
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
        self.open.clear();
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// Decrypts into memory the caller provides (for example pinned host memory an inference
/// engine maps), so no plaintext touches a disk. One region per file, exactly the file's size;
/// [`Granted::manifest`] tells the sizes before the fetch. On failure every region is zeroed.
pub struct MemorySink<'a> {
    regions: Vec<(String, &'a mut [u8])>,
    /// Region index of each manifest file, set by `begin`.
    order: Vec<usize>,
}

impl<'a> MemorySink<'a> {
    /// `regions`: `(path in the manifest, memory of exactly that file's size)`.
    pub fn new(regions: Vec<(String, &'a mut [u8])>) -> Self {
        Self {
            regions,
            order: Vec::new(),
        }
    }
}

impl WeightSink for MemorySink<'_> {
    fn begin(&mut self, files: &[(String, u64)]) -> Result<(), ClientError> {
        if files.len() != self.regions.len() {
            return Err(ClientError::Usage(format!(
                "the version has {} files, {} memory regions were given",
                files.len(),
                self.regions.len()
            )));
        }
        self.order.clear();
        for (path, size) in files {
            let i = self
                .regions
                .iter()
                .position(|(p, _)| p == path)
                .ok_or_else(|| ClientError::Usage(format!("no memory region for {path:?}")))?;
            if self.regions[i].1.len() as u64 != *size {
                return Err(ClientError::Usage(format!(
                    "memory region for {path:?} is {} bytes, the file is {size}",
                    self.regions[i].1.len()
                )));
            }
            self.order.push(i);
        }
        Ok(())
    }

    fn write_at(&mut self, file: usize, offset: u64, plaintext: &[u8]) -> Result<(), ClientError> {
        let region = &mut self.regions[self.order[file]].1;
        let start = usize::try_from(offset).map_err(|_| ClientError::Protocol("offset".into()))?;
        region
            .get_mut(start..start + plaintext.len())
            .ok_or_else(|| ClientError::Protocol("piece outside its file".into()))?
            .copy_from_slice(plaintext);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), ClientError> {
        Ok(())
    }

    fn abort(&mut self) {
        for (_, r) in &mut self.regions {
            r.fill(0);
        }
    }
}

/// Options of one fetch.
pub struct FetchOptions {
    /// 0 = latest.
    pub version: u64,
    /// Also check each file's SHA-256 from the signed manifest (costs a SHA-256 pass; files are
    /// then not split into ranges). The version must have been pushed with digests
    /// (`PushOptions::record_digest`); otherwise the fetch is refused before any chunk is asked
    /// for.
    pub verify_digest: bool,
    /// Pin the vault's manifest signing key instead of trusting the one the vault sends.
    pub manifest_key: Option<[u8; 32]>,
    /// Streams in flight at once (files, or chunk ranges of large files); 0 = [`DEFAULT_PARALLEL`].
    pub parallel: usize,
    /// How often one stream is resumed after it broke off (dropped connection) before the fetch
    /// fails. Resuming asks only for the chunks not yet received, under the same grant.
    pub retries: u32,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            version: 0,
            verify_digest: false,
            manifest_key: None,
            parallel: 0,
            retries: 5,
        }
    }
}

/// What a fetch received.
#[derive(Debug)]
pub struct FetchReport {
    pub model: String,
    pub version: u64,
    pub grant_id: String,
    pub files: usize,
    pub bytes: u64,
    /// Streams resumed after a dropped connection.
    pub resumed: u32,
}

pub struct NodeClient {
    inner: NodeServiceClient<Channel>,
    /// FetchWeights streams bypass the generated client (see `chunk_stream`).
    channel: Channel,
}

impl NodeClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: NodeServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
            channel,
        }
    }

    /// Runs the whole boot protocol for `model` and streams the plaintext into `sink`.
    /// `progress(total, done)` is called as bytes are written.
    pub async fn fetch(
        &mut self,
        model: &str,
        opts: &FetchOptions,
        attester: &dyn Attester,
        sink: &mut dyn WeightSink,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<FetchReport, ClientError> {
        let granted = match self.grant(model, opts, attester).await {
            Ok(g) => g,
            Err(e) => {
                sink.abort();
                return Err(e);
            }
        };
        granted.fetch(opts, sink, progress).await
    }

    /// Challenge, evidence and attestation. Nodes behind one address that boot together can
    /// meet the vault's per-address call limit (RESOURCE_EXHAUSTED, docs/access-control.md):
    /// then the whole step is retried, with a fresh challenge and evidence, after 0.2, 0.4,
    /// 0.8, 1.6 and 3.2 s or the vault's `retry-after-ms` hint if longer (at most 10 s), each
    /// plus up to half again at random so that nodes refused together do not come back
    /// together, before the refusal is returned.
    async fn attest(
        &mut self,
        attester: &dyn Attester,
    ) -> Result<(NodeKeyPair, crate::proto::v1::AttestResponse), ClientError> {
        let mut attempt = 0u32;
        loop {
            match self.attest_once(attester).await {
                Err(ClientError::Status(s))
                    if s.code() == tonic::Code::ResourceExhausted && attempt < LIMIT_RETRIES =>
                {
                    // The vault says when the address has a call again; wait at least that.
                    let hint = s
                        .metadata()
                        .get(crate::server::error::RETRY_AFTER_HEADER)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(0)
                        .min(MAX_LIMIT_WAIT_MS);
                    let base = (200u64 << attempt).max(hint);
                    let jitter = crate::grant::random::<2>()
                        .map(|r| u64::from(u16::from_le_bytes(r)) % (base / 2))
                        .unwrap_or(0);
                    let wait = Duration::from_millis(base + jitter);
                    tracing::warn!(
                        wait_ms = wait.as_millis() as u64,
                        "the vault's call limit refused the attestation ({}); retrying",
                        s.message()
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn attest_once(
        &mut self,
        attester: &dyn Attester,
    ) -> Result<(NodeKeyPair, crate::proto::v1::AttestResponse), ClientError> {
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
        let evidence = attester.evidence_for(&nonce, keys.public_key())?;
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
        Ok((keys, session))
    }

    /// Challenge, evidence, attestation and grant; checks the signed manifest and the grant and
    /// opens the DEK (docs/protocol.md §6, steps 1-5). The DEK is dropped once the per-file keys
    /// are derived.
    pub async fn grant(
        &mut self,
        model: &str,
        opts: &FetchOptions,
        attester: &dyn Attester,
    ) -> Result<Granted, ClientError> {
        let (keys, session) = self.attest(attester).await?;
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
        let mut openers = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            let header = file
                .decode_header()
                .map_err(|e| ClientError::Protocol(format!("header of {}: {e}", file.path)))?;
            let ctx = FileContext {
                model: &manifest.model,
                version_id: &manifest.version_id,
                path: &file.path,
            };
            openers.push(Arc::new(FileOpener::new(&dek, &ctx, &header)));
        }
        drop(dek);
        Ok(Granted {
            channel: self.channel.clone(),
            token: Bytes::from(session.session_token),
            grant_id: grant.grant_id,
            not_after_ms: grant.not_after_ms,
            manifest,
            openers,
        })
    }
}

/// An opened grant: the verified manifest and the per-file keys. Fetches run under it until it
/// expires or is revoked.
pub struct Granted {
    channel: Channel,
    token: Bytes,
    grant_id: String,
    not_after_ms: u64,
    manifest: Manifest,
    openers: Vec<Arc<FileOpener>>,
}

/// One stream: chunks `[first, end)` of manifest file `file`.
#[derive(Clone, Copy)]
struct Range {
    file: usize,
    first: u64,
    end: u64,
}

/// Authenticated plaintext of one chunk: decrypted where the message landed when the receive
/// buffer is ours alone, else into a recycled buffer.
enum Plain {
    InPlace(BytesMut, usize),
    Buf(Vec<u8>),
}

impl std::ops::Deref for Plain {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Plain::InPlace(b, n) => &b[..*n],
            Plain::Buf(v) => v,
        }
    }
}

struct Piece {
    file: usize,
    offset: u64,
    plain: Plain,
}

/// Buffers handed back by the writer, so steady-state decryption allocates nothing.
type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

impl Granted {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn grant_id(&self) -> &str {
        &self.grant_id
    }

    pub fn not_after_ms(&self) -> u64 {
        self.not_after_ms
    }

    /// Fetches and decrypts chunks `[first, end)` of one file (`end` 0 = to the end of the file)
    /// and returns their plaintext. A range proves the authenticity of that range only
    /// (docs/format.md §8).
    pub async fn read_range(
        &self,
        path: &str,
        first: u64,
        end: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let file = self
            .manifest
            .files
            .iter()
            .position(|f| f.path == path)
            .ok_or_else(|| ClientError::Usage(format!("{path:?} is not in the manifest")))?;
        let chunks = self.manifest.files[file].chunks;
        let end = if end == 0 { chunks } else { end };
        if first >= end || end > chunks {
            return Err(ClientError::Usage(format!(
                "chunk range {first}..{end} is outside 0..{chunks}"
            )));
        }
        let (tx, mut rx) = mpsc::channel(2);
        let task = tokio::spawn(self.stream_range(
            Range { file, first, end },
            None,
            FetchOptions::default().retries,
            Pool::default(),
            tx,
        ));
        let start = first * u64::from(self.manifest.chunk_size);
        let mut out = Vec::new();
        while let Some(piece) = rx.recv().await {
            let piece = piece?;
            debug_assert_eq!(piece.offset, start + out.len() as u64);
            out.extend_from_slice(&piece.plain);
        }
        task.await
            .map_err(|e| ClientError::Protocol(format!("fetch task failed: {e}")))?;
        Ok(out)
    }

    /// Fetches every file of the version into `sink`: up to `opts.parallel` streams at once,
    /// network, decryption and output overlapping. On any failure the sink is aborted.
    pub async fn fetch(
        &self,
        opts: &FetchOptions,
        sink: &mut dyn WeightSink,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<FetchReport, ClientError> {
        match self.fetch_inner(opts, sink, progress).await {
            Ok(r) => Ok(r),
            Err(e) => {
                sink.abort();
                Err(e)
            }
        }
    }

    async fn fetch_inner(
        &self,
        opts: &FetchOptions,
        sink: &mut dyn WeightSink,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<FetchReport, ClientError> {
        if opts.verify_digest {
            self.check_digests_recorded()?;
        }
        let parallel = if opts.parallel == 0 {
            DEFAULT_PARALLEL
        } else {
            opts.parallel
        };
        let files: Vec<(String, u64)> = self
            .manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.size))
            .collect();
        sink.begin(&files)?;
        let total: u64 = files.iter().map(|f| f.1).sum();
        progress(total, 0);

        let ranges = Arc::new(Mutex::new(self.plan(parallel, opts.verify_digest)));
        let resumed = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // Two pieces per stream in flight between decryption and output: bounded memory.
        let (tx, mut rx) = mpsc::channel::<Result<Piece, ClientError>>(2 * parallel);
        let pool = Pool::default();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallel {
            let ranges = ranges.clone();
            let tx = tx.clone();
            let pool = pool.clone();
            let resumed = resumed.clone();
            let this = self.handle();
            let verify = opts.verify_digest;
            let retries = opts.retries;
            workers.spawn(async move {
                loop {
                    let Some(r) = ranges.lock().expect("range queue").pop_front() else {
                        return;
                    };
                    // Present for every file: checked before the fetch started.
                    let digest = if verify {
                        this.manifest.files[r.file].sha256
                    } else {
                        None
                    };
                    let n = match this
                        .stream_range(r, digest, retries, pool.clone(), tx.clone())
                        .await
                    {
                        Some(n) => n,
                        None => return,
                    };
                    resumed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        drop(tx);
        let mut done = 0u64;
        while let Some(piece) = rx.recv().await {
            // Returning drops the JoinSet, which stops every stream.
            let piece = piece?;
            sink.write_at(piece.file, piece.offset, &piece.plain)?;
            done += piece.plain.len() as u64;
            progress(total, done);
            if let Plain::Buf(v) = piece.plain {
                pool.lock().expect("pool").push(v);
            }
        }
        while let Some(r) = workers.join_next().await {
            r.map_err(|e| ClientError::Protocol(format!("fetch task failed: {e}")))?;
        }
        if done != total {
            return Err(ClientError::Protocol(format!(
                "received {done} of {total} bytes"
            )));
        }
        sink.commit()?;
        pool.lock()
            .expect("pool")
            .iter_mut()
            .for_each(|b| b.fill(0));
        Ok(FetchReport {
            model: self.manifest.model.clone(),
            version: self.manifest.version,
            grant_id: self.grant_id.clone(),
            files: files.len(),
            bytes: done,
            resumed: resumed.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// A digest check needs a digest for every file: refuses, before anything is fetched, a
    /// version pushed without them (its manifest's `sha256` is null, docs/format.md §7.1).
    fn check_digests_recorded(&self) -> Result<(), ClientError> {
        let missing: Vec<&str> = self
            .manifest
            .files
            .iter()
            .filter(|f| f.sha256.is_none())
            .map(|f| f.path.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 5;
        let mut list = missing
            .iter()
            .take(SHOWN)
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        if missing.len() > SHOWN {
            list.push_str(&format!(" and {} more", missing.len() - SHOWN));
        }
        Err(ClientError::Usage(format!(
            "cannot verify digests: {}@{} has no recorded SHA-256 for {list}; it was pushed \
             without digests (push it again with `weightvault model push --digest`, or fetch \
             without --verify-digest: every chunk is authenticated either way)",
            self.manifest.model, self.manifest.version
        )))
    }

    /// The streams of a whole-version fetch, largest first: one per file, and large files cut
    /// into ranges while there are fewer files than streams (not with a digest check, which
    /// needs a file's chunks in order).
    fn plan(&self, parallel: usize, verify_digest: bool) -> VecDeque<Range> {
        let files = &self.manifest.files;
        let mut out: Vec<Range> = Vec::new();
        let per_file = if verify_digest || files.len() >= parallel {
            1
        } else {
            parallel.div_ceil(files.len().max(1)) as u64
        };
        for (file, f) in files.iter().enumerate() {
            let pieces = per_file.min(f.chunks / MIN_RANGE_CHUNKS).max(1);
            let step = f.chunks.div_ceil(pieces);
            let mut first = 0;
            while first < f.chunks {
                let end = (first + step).min(f.chunks);
                out.push(Range { file, first, end });
                first = end;
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.end - r.first));
        out.into()
    }

    /// What a spawned stream needs, owned.
    fn handle(&self) -> Arc<Granted> {
        Arc::new(Granted {
            channel: self.channel.clone(),
            token: self.token.clone(),
            grant_id: self.grant_id.clone(),
            not_after_ms: self.not_after_ms,
            manifest: self.manifest.clone(),
            openers: self.openers.clone(),
        })
    }

    /// Receives, checks and decrypts one range, resuming after a broken stream from the first
    /// chunk not received. Pieces and the first error go to `tx`. Returns how many times it
    /// resumed, or `None` after an error (or when the receiver is gone).
    fn stream_range(
        &self,
        r: Range,
        digest_of: Option<[u8; 32]>,
        retries: u32,
        pool: Pool,
        tx: mpsc::Sender<Result<Piece, ClientError>>,
    ) -> impl Future<Output = Option<u32>> + Send + 'static {
        let mut channel = self.channel.clone();
        let token = self.token.clone();
        let grant_id = self.grant_id.clone();
        let file = self.manifest.files[r.file].clone();
        let chunk_size = u64::from(self.manifest.chunk_size);
        let opener = self.openers[r.file].clone();
        async move {
            let mut sha = digest_of.map(|_| digest::Context::new(&digest::SHA256));
            let mut next = r.first;
            let mut resumed = 0u32;
            let outcome: Result<(), ClientError> = loop {
                let attempt = async {
                    let request = FetchWeightsRequest {
                        session_token: token.to_vec(),
                        grant_id: grant_id.clone(),
                        file: file.path.clone(),
                        first_chunk: next,
                        end_chunk: r.end,
                    };
                    let mut stream =
                        chunk_stream::fetch_weights(&mut channel, request, MAX_MESSAGE).await?;
                    while let Some(chunk) = stream.message().await? {
                        // In order, no gap, repeat or extra chunk (truncation and extension are
                        // also caught by the last-chunk flag in the nonce, docs/format.md §6.1).
                        if chunk.index != next || next >= r.end {
                            return Err(Fatal(ClientError::Protocol(format!(
                                "unexpected chunk {} of {}",
                                chunk.index, file.path
                            ))));
                        }
                        let plain =
                            open(&opener, chunk.index, chunk.ciphertext, &pool).map_err(Fatal)?;
                        if let Some(s) = sha.as_mut() {
                            s.update(&plain);
                        }
                        let piece = Piece {
                            file: r.file,
                            offset: next * chunk_size,
                            plain,
                        };
                        next += 1;
                        if tx.send(Ok(piece)).await.is_err() {
                            return Err(Fatal(ClientError::Protocol("fetch cancelled".into())));
                        }
                    }
                    Ok(())
                };
                match attempt.await {
                    Ok(()) if next == r.end => break Ok(()),
                    // The vault ends a stream whose node stalled; ask for the rest again.
                    Ok(()) if resumed < retries => {
                        resumed += 1;
                        tracing::info!(file = %file.path, next, "stream ended early; resuming");
                    }
                    Ok(()) => {
                        break Err(ClientError::Protocol(format!(
                            "{}: stream ended before chunk {next} of {}",
                            file.path, r.end
                        )));
                    }
                    Err(Fatal(ClientError::Status(s))) if resumable(&s) && resumed < retries => {
                        resumed += 1;
                        tracing::info!(file = %file.path, next, code = ?s.code(), "stream broke off; resuming");
                        tokio::time::sleep(Duration::from_millis(100 << resumed.min(5))).await;
                    }
                    Err(Fatal(e)) => break Err(e),
                }
            };
            let outcome = outcome.and_then(|()| {
                if let (Some(s), Some(want)) = (sha, digest_of)
                    && s.finish().as_ref() != want
                {
                    return Err(ClientError::Protocol(format!(
                        "{}: SHA-256 differs from the manifest",
                        file.path
                    )));
                }
                Ok(())
            });
            match outcome {
                Ok(()) => Some(resumed),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    None
                }
            }
        }
    }
}

/// Any error inside one attempt (the name says the caller decides whether to resume).
struct Fatal(ClientError);

impl From<tonic::Status> for Fatal {
    fn from(s: tonic::Status) -> Self {
        Fatal(ClientError::Status(s))
    }
}

/// A stream that broke off in transport (no answer from the vault: no request id), or a vault
/// that could not log for a moment, is resumed; every refusal by the vault is final.
fn resumable(s: &tonic::Status) -> bool {
    use tonic::Code;
    let from_vault = s.metadata().get(REQUEST_ID_HEADER).is_some();
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal
        | Code::DeadlineExceeded => !from_vault,
        _ => false,
    }
}

/// Decrypts one chunk: in place when the message buffer is not shared, else into a pooled
/// buffer. Every failure is the one opaque error.
fn open(
    opener: &FileOpener,
    index: u64,
    ciphertext: Bytes,
    pool: &Pool,
) -> Result<Plain, ClientError> {
    match ciphertext.try_into_mut() {
        Ok(mut buf) => {
            let n = opener
                .open_in_place(index, &mut buf)
                .map_err(|_| ClientError::DecryptionFailed)?
                .len();
            Ok(Plain::InPlace(buf, n))
        }
        Err(shared) => {
            let mut out = pool.lock().expect("pool").pop().unwrap_or_default();
            opener
                .open_into(index, &shared, &mut out)
                .map_err(|_| ClientError::DecryptionFailed)?;
            Ok(Plain::Buf(out))
        }
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
