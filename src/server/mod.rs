//! The gRPC server: NodeService, AdminService and AuditService over TLS, on the embedded store.
//! [`start`] brings a vault up from a [`Config`] and returns once it listens; shutdown is an
//! input ([`RunningServer::shutdown`]).

pub mod admin;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod error;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::attest::{TeeKind, Verifier};
use crate::audit::entry::ActorKind;
use crate::audit::{Action, Actor, AuditEntry, Decision, Sequencer};
use crate::config::Config;
use crate::keys::{KeyRing, RootKey};
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::operator_service_server::OperatorServiceServer;
use crate::store::local::LocalBlobs;
use crate::store::sqlite::SqliteStore;
use crate::store::{BlobStore, MetadataStore, version_prefix};
use crate::time::SharedClock;

/// HTTP/2 flow-control windows and frame size, sized for multi-MiB chunk messages
/// (docs/performance.md): default 64 KiB windows cap a stream far below the link speed.
pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
pub const MAX_FRAME: u32 = 16 * 1024 * 1024 - 1;
/// How long a shutdown waits for in-flight calls.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Largest gRPC message either side accepts: a 64 MiB chunk plus framing.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024 + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("opening the store")]
    Store(#[from] crate::store::StoreError),
    #[error("unlocking keys")]
    Keys(#[from] crate::keys::KeyError),
    #[error("audit log")]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Config(String),
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server transport")]
    Transport(#[from] tonic::transport::Error),
}

/// Shared state of the services.
pub struct Vault {
    pub store: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub keys: KeyRing,
    pub audit: Sequencer,
    pub clock: SharedClock,
    pub verifiers: HashMap<TeeKind, Box<dyn Verifier>>,
    pub roles: auth::Roles,
    pub grant_ttl_ms: u64,
    pub chunk_size: u32,
    pub budgets: budget::Budgets,
    /// Call limits per client address (`charge_call`).
    pub peer_limits: limit::PeerLimiter,
    pub approvals: crate::config::ApprovalsConfig,
    /// Cancelled when the server shuts down; endless streams (audit tail) end on it.
    pub shutdown: CancellationToken,
    /// What grpc.health.v1 reports (sealed, audit log failed, stopping).
    pub serving: health::ServingState,
    /// FetchWeights streams sending at once (`node::stream_slots`): server memory stays bounded
    /// however many nodes fetch.
    pub stream_slots: Arc<tokio::sync::Semaphore>,
}

impl Vault {
    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Appends an entry and waits for it to be durable; a failure refuses the request.
    pub async fn record(
        &self,
        request_id: &str,
        mut entry: AuditEntry,
    ) -> Result<crate::audit::AuditDurable, error::ApiError> {
        entry.request_id = Some(request_id.to_string());
        let started = std::time::Instant::now();
        let durable = self.audit.append(&entry).await.map_err(|e| {
            tracing::error!(request_id, error = %e, "audit append failed; refusing");
            self.serving.set_audit_failed();
            error::ApiError::AuditUnavailable
        })?;
        metrics::audit_appended(started.elapsed());
        Ok(durable)
    }

    /// Charges a call to its address's call limit (`limit`): GetChallenge, and every refusal
    /// that would write an entry of its own (docs/access-control.md#call-limits). Over the limit
    /// the call is refused without an entry of its own (the store reads that found it refusable
    /// have run); it is counted, and recorded at most once a minute per address with the number
    /// refused since the last such entry.
    pub async fn charge_call(
        &self,
        request_id: &str,
        rpc: &'static str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), error::ApiError> {
        let key = limit::PeerKey::of(peer);
        let limit::Verdict::Refuse {
            retry_after_ms,
            report,
        } = self.peer_limits.check(key, self.now())
        else {
            return Ok(());
        };
        metrics::rate_limited(rpc);
        if let Some(refused) = report {
            let entry = self.rate_limited_entry(key, refused);
            if let Err(e) = self.record(request_id, entry).await {
                // Not on the record: counted again in the next entry.
                self.peer_limits.unreport(key, refused);
                return Err(e);
            }
        }
        Err(error::ApiError::RateLimited {
            reason: format!("too many calls from this address; retry in {retry_after_ms} ms"),
            retry_after_ms,
        })
    }

    fn rate_limited_entry(&self, who: impl std::fmt::Display, refused: u64) -> AuditEntry {
        let mut entry = self.entry(
            Action::RateLimited,
            Decision::Deny,
            Actor {
                kind: crate::audit::entry::ActorKind::Anonymous,
                id: None,
            },
        );
        entry.reason = Some(format!(
            "{refused} call(s) from {who} refused over the call limit since the last such entry"
        ));
        entry
    }

    /// Records the refusals no `rate_limited` entry carries yet: of addresses whose last entry
    /// is a minute old (`all`: of every address, at a graceful stop). Runs every 30 s, so every
    /// refusal is on the record within about 90 s. The [`limit::MAX_REPORTS`] addresses with
    /// the most refusals get an entry each and the rest one entry together, so a stop during a
    /// many-address flood does not wait on thousands of appends. Returns the entries written;
    /// counts whose entry fails to write go back to their addresses.
    pub async fn record_pending_refusals(&self, all: bool) -> usize {
        let pending = self.peer_limits.take_pending(self.now(), all);
        let mut reports = limit::group_reports(pending).into_iter();
        let mut written = 0;
        while let Some(report) = reports.next() {
            let entry = self.rate_limited_entry(&report.who, report.refused);
            if let Err(e) = self.record(&request_id(), entry).await {
                tracing::warn!(error = e.reason(), "could not record call-limit refusals");
                let counts = report.counts.into_iter();
                for (key, n) in counts.chain(reports.flat_map(|r| r.counts)) {
                    self.peer_limits.unreport(key, n);
                }
                break;
            }
            written += 1;
        }
        written
    }

    /// The one authorization check of admin and auditor calls: the caller's certificate must
    /// carry `role`. A refusal is recorded in the audit log before it is returned (and charged
    /// to the caller's call limit first).
    pub async fn authorize<T>(
        &self,
        req: &tonic::Request<T>,
        role: auth::Role,
        method: &str,
        request_id: &str,
    ) -> Result<Actor, tonic::Status> {
        match self.roles.require(req, role) {
            Ok(actor) => Ok(actor),
            Err(e) => {
                self.charge_call(request_id, "authorization", req.remote_addr())
                    .await
                    .map_err(|e| e.into_status(request_id))?;
                let fp = req.peer_certs().and_then(|c| {
                    c.first()
                        .map(|l| crate::config::cert_fingerprint(l.as_ref()))
                });
                let actor = match fp {
                    Some(fp) => Actor::new(crate::audit::entry::ActorKind::Anonymous, fp),
                    None => Actor {
                        kind: crate::audit::entry::ActorKind::Anonymous,
                        id: None,
                    },
                };
                let mut entry = self.entry(Action::AuthDenied, Decision::Deny, actor);
                entry.reason = Some(format!("{method}: {}", e.reason()));
                if let Err(audit) = self.record(request_id, entry).await {
                    return Err(audit.into_status(request_id));
                }
                Err(e.into_status(request_id))
            }
        }
    }

    pub fn entry(&self, action: Action, decision: Decision, actor: Actor) -> AuditEntry {
        AuditEntry::new(self.now(), action, decision, actor)
    }
}

/// A new request id (8 random bytes, hex), returned in every error and written to the log.
pub fn request_id() -> String {
    hex::encode(crate::grant::random::<8>().unwrap_or_default())
}

/// A running vault.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// Where `/metrics` and plaintext health listen (`[ops] listen`), if enabled.
    pub ops_addr: Option<SocketAddr>,
    serving: health::ServingState,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
    /// The vault once unsealed (no audit log before that).
    unlocked: operator::VaultCell,
    inputs: Arc<UnlockInputs>,
    _control: Arc<operator::SealControl>,
    /// Held for the server's lifetime: one vault per data directory (embedded store only).
    _lock: Option<std::fs::File>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight calls finish, and waits for the server to end.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits for the server to end: after a shutdown signal, in-flight calls get up to
    /// [`DRAIN_DEADLINE`] to finish before the server is stopped regardless.
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let joined = |r: Result<Result<(), ServerError>, tokio::task::JoinError>| match r {
            Ok(r) => r,
            Err(e) => Err(ServerError::Tls(format!("server task failed: {e}"))),
        };
        let result = tokio::select! {
            r = &mut self.task => joined(r),
            _ = self.shutdown.cancelled() => {
                self.serving.set_stopping();
                match tokio::time::timeout(DRAIN_DEADLINE, &mut self.task).await {
                    Ok(r) => joined(r),
                    Err(_) => {
                        tracing::warn!("connections still open after the drain deadline; stopping anyway");
                        self.task.abort();
                        Ok(())
                    }
                }
            }
        };
        // The last entry and the final checkpoint, then the sequencer stops. A vault that
        // never unsealed has no log to write.
        let Some(vault) = self.unlocked.get() else {
            return result;
        };
        // The purger ends on the token (cancelled here too when the server ended by itself);
        // once it has, the refusals it has not recorded are, before `server_stop`.
        self.shutdown.cancel();
        join_task(&self.inputs.purger_task).await;
        vault.record_pending_refusals(true).await;
        let mut stop = AuditEntry::new(
            vault.now(),
            Action::ServerStop,
            Decision::Info,
            Actor::system(),
        );
        stop.reason = Some(match &result {
            Ok(()) => "shutdown".to_string(),
            Err(e) => format!("server failed: {e}"),
        });
        if let Err(e) = vault.audit.append(&stop).await {
            tracing::error!(error = %e, "could not record the shutdown");
        }
        vault.audit.close().await;
        join_task(&self.inputs.sequencer_task).await;
        result
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether this vault's audit sequencer holds the lease for the log's background duties
    /// (with replicas, exactly one live replica does once the previous holder's lease expired).
    pub fn holds_audit_lease(&self) -> bool {
        self.unlocked.get().is_some_and(|v| v.audit.holds_lease())
    }

    /// Records call-limit refusals that are due (what the background task does every 30 s);
    /// returns the entries written. For tests that drive the clock.
    pub async fn record_pending_refusals(&self) -> usize {
        match self.unlocked.get() {
            Some(v) => v.record_pending_refusals(false).await,
            None => 0,
        }
    }

    /// Stops at once, as a crash would: no drain, no `server_stop` entry, no final checkpoint,
    /// the sequencer lease left to expire. For failure tests.
    pub fn abort(self) {
        self.shutdown.cancel();
        self.task.abort();
        if let Some(t) = self
            .inputs
            .sequencer_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// With replicas, an upload that has not committed after this long is taken for interrupted.
pub const SHARED_UPLOAD_MAX_AGE_MS: u64 = 24 * 3600 * 1000;

/// Opens the configured backends: PostgreSQL and S3 when `storage.metadata` / `storage.blobs`
/// name them, else the embedded SQLite file and blob directory in `data_dir`. The embedded
/// metadata store also takes the data directory's LOCK (one vault per directory).
async fn open_storage(
    cfg: &Config,
) -> Result<
    (
        Arc<dyn MetadataStore>,
        Arc<dyn BlobStore>,
        Option<std::fs::File>,
    ),
    ServerError,
> {
    let io = |e| ServerError::Store(crate::store::StoreError::Io(e));
    let embedded = cfg.storage.metadata.is_none() || cfg.storage.blobs.is_none();
    if embedded {
        std::fs::create_dir_all(&cfg.data_dir).map_err(io)?;
    }
    let (store, lock): (Arc<dyn MetadataStore>, _) = match &cfg.storage.metadata {
        Some(url) => (
            Arc::new(crate::store::postgres::PgStore::open(url).await?),
            None,
        ),
        None => {
            // Two vaults on one SQLite file would interleave the audit log: refuse the second.
            let lock_path = cfg.data_dir.join("LOCK");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io)?;
            lock.try_lock().map_err(|_| {
                ServerError::Config(format!(
                    "data directory {} is in use by another vault (lock on {})",
                    cfg.data_dir.display(),
                    lock_path.display()
                ))
            })?;
            (
                Arc::new(SqliteStore::open(&cfg.data_dir.join("metadata.db")).await?),
                Some(lock),
            )
        }
    };
    let blobs: Arc<dyn BlobStore> = match &cfg.storage.blobs {
        Some(url) => {
            let (bucket, prefix) = crate::store::s3::parse_url(url).map_err(ServerError::Config)?;
            let s3 = &cfg.storage.s3;
            let secret = match &s3.secret_access_key_file {
                Some(path) => {
                    let text =
                        zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                            ServerError::Config(format!(
                                "storage.s3.secret_access_key_file {}: {e}",
                                path.display()
                            ))
                        })?);
                    Some(zeroize::Zeroizing::new(text.trim_end().to_string()))
                }
                None => None,
            };
            Arc::new(
                crate::store::s3::S3Blobs::open(crate::store::s3::S3Options {
                    bucket,
                    prefix,
                    endpoint: s3.endpoint.clone(),
                    region: s3.region.clone(),
                    allow_http: s3.allow_http,
                    access_key_id: s3.access_key_id.clone(),
                    secret_access_key: secret,
                })
                .await?,
            )
        }
        None => Arc::new(LocalBlobs::open(&cfg.data_dir.join("blobs"))?),
    };
    Ok((store, blobs, lock))
}

/// Wraps the metadata store (tests inject faults this way).
pub type StoreWrapper = Box<dyn FnOnce(Arc<dyn MetadataStore>) -> Arc<dyn MetadataStore> + Send>;

/// Options that are inputs rather than configuration.
pub struct StartOptions {
    pub clock: SharedClock,
    /// Overrides `config.listen` (for example `127.0.0.1:0` in tests).
    pub listen: Option<SocketAddr>,
    /// Wraps the opened metadata store before anything uses it.
    pub wrap_store: Option<StoreWrapper>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(crate::time::SystemClock),
            listen: None,
            wrap_store: None,
        }
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))
}

/// Opens the store, unlocks the keys, starts the audit sequencer and serves until shut down.
pub async fn start(cfg: &Config, opts: StartOptions) -> Result<RunningServer, ServerError> {
    // Only the aws-lc-rs provider is compiled in; installing it twice is harmless.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&cfg.tls.cert)?,
            read(&cfg.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&cfg.tls.client_ca)?))
        .client_auth_optional(true);
    // TLS material is parsed here, before anything is opened, created or logged.
    let builder = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| ServerError::Tls(format!("server certificate, key or client CA: {e}")))?;

    let (mut store, blobs, lock) = open_storage(cfg).await?;
    if let Some(wrap) = opts.wrap_store {
        store = wrap(store);
    }
    let clock = opts.clock;
    // Memory hygiene: no core dumps of a process that will hold keys.
    crate::keys::locked::harden_process();
    let boot = crate::keys::boot::boot(&cfg.seal, store.as_ref(), clock.now_ms()).await?;
    let shutdown = CancellationToken::new();
    let serving = health::ServingState::new();
    let inputs = Arc::new(UnlockInputs {
        cfg: cfg.clone(),
        store,
        blobs,
        clock,
        shutdown: shutdown.clone(),
        serving: serving.clone(),
        sequencer_task: std::sync::Mutex::new(None),
        purger_task: std::sync::Mutex::new(None),
    });
    // Set once the root key is in: at once for the file and pkcs11 seals, at the unseal for
    // shamir. Until then every service but OperatorService and health answers UNAVAILABLE.
    let unlocked: operator::VaultCell = Arc::default();
    let control = operator::SealControl::start(inputs.clone(), unlocked.clone(), boot).await?;

    let addr = opts.listen.unwrap_or(cfg.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    metrics::install();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    serving.publish(&reporter).await;
    let health_task = {
        let cell = unlocked.clone();
        serving.spawn_reporter(
            reporter.clone(),
            move || cell.get().is_some_and(|v| v.audit.is_failed()),
            shutdown.clone(),
        )
    };
    let ops_addr = match cfg.ops.listen {
        Some(addr) => {
            let ops_health = tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(reporter),
            );
            let (addr, _task) =
                metrics::serve_ops(addr, ops_health, serving.clone(), shutdown.clone()).await?;
            Some(addr)
        }
        None => None,
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection descriptors: {e}")))?;
    let router = builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(operator::Gated::new(
            unlocked.clone(),
            node::NodeServer::new,
        ))
        .add_service(operator::Gated::new(unlocked.clone(), |v| {
            AdminServiceServer::new(admin::AdminApi::new(v)).max_decoding_message_size(MAX_MESSAGE)
        }))
        .add_service(operator::Gated::new(unlocked.clone(), |v| {
            AuditServiceServer::new(audit::AuditApi::new(v))
        }))
        .add_service(OperatorServiceServer::new(operator::OperatorApi::new(
            control.clone(),
        )))
        .add_service(health_service)
        .add_service(reflection);
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await;
        health_task.abort();
        r.map_err(ServerError::from)
    });
    tracing::info!(%local_addr, "weightvault listening");
    Ok(RunningServer {
        local_addr,
        ops_addr,
        serving,
        shutdown,
        task,
        unlocked,
        inputs,
        _control: control,
        _lock: lock,
    })
}

/// What [`unlock`] needs, kept from [`start`] until the root key is in.
pub struct UnlockInputs {
    pub cfg: Config,
    pub store: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub clock: SharedClock,
    pub shutdown: CancellationToken,
    pub serving: health::ServingState,
    sequencer_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The background task that purges challenges and records call-limit refusals; awaited at
    /// a stop before the last entries, so none of its appends comes after `server_stop`.
    purger_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Start-up steps 3 to 7 (docs/architecture.md): opens the key ring with the root key, starts
/// the audit sequencer, appends `notes` (seal events that waited for the log), and makes the
/// vault serve. Runs once: during [`start`] for the file and pkcs11 seals, at the unseal for
/// shamir (`operator::SealControl`). The caller's root key is dropped (wiped) here.
pub(crate) async fn unlock(
    u: &UnlockInputs,
    cell: &operator::VaultCell,
    root: RootKey,
    notes: Vec<AuditEntry>,
) -> Result<Arc<Vault>, ServerError> {
    if cell.get().is_some() {
        return Err(ServerError::Config("the vault is already unsealed".into()));
    }
    let cfg = &u.cfg;
    let store = u.store.clone();
    let blobs = u.blobs.clone();
    let clock = u.clock.clone();
    let shutdown = u.shutdown.clone();
    let serving = u.serving.clone();
    let (mut keys, created) = KeyRing::open(&root, store.as_ref(), clock.now_ms()).await?;
    drop(root);
    let log_key = keys.take_log_key().expect("log key present after open");
    let origin = cfg.audit.origin.clone().unwrap_or_else(|| {
        use aws_lc_rs::signature::KeyPair;
        let d =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, log_key.public_key().as_ref());
        format!("weightvault/{}", hex::encode(&d.as_ref()[..8]))
    });
    let signer = crate::audit::note::NoteSigner::new(&origin, log_key)
        .map_err(|e| ServerError::Config(format!("audit.origin {origin:?}: {e}")))?;
    let (audit, sequencer_task) = Sequencer::start(
        store.clone(),
        signer,
        origin,
        clock.clone(),
        crate::audit::sequencer::SequencerOptions {
            checkpoint_interval: Duration::from_millis(cfg.audit.checkpoint_interval_ms),
            heartbeat_interval: Duration::from_secs(cfg.audit.heartbeat_secs),
            // Replicas share the log: one of them holds the lease for the background duties.
            lease: cfg
                .storage
                .is_shared()
                .then(|| Duration::from_secs(cfg.audit.lease_secs)),
        },
    )
    .await?;
    let key_entry = |reason: String| {
        let mut e = AuditEntry::new(
            clock.now_ms(),
            Action::KeyCreate,
            Decision::Info,
            Actor::system(),
        );
        e.reason = Some(reason);
        e
    };
    if let Some(v) = created.kek_version {
        audit
            .append(&key_entry(format!("kek version {v} created")))
            .await?;
    }
    if created.signing_key {
        audit
            .append(&key_entry(format!(
                "manifest signing key created: ed25519 {}",
                hex::encode(keys.signing_public_key())
            )))
            .await?;
    }
    if created.log_key {
        audit
            .append(&key_entry(format!(
                "log signing key created: {}",
                audit.verifier_key()
            )))
            .await?;
    }

    // Seal events (init, migration, unseal attempts) that waited for the log to be writable.
    for n in &notes {
        audit.append(n).await?;
    }

    // Uploads a crash interrupted never became visible; collect their blobs. With replicas,
    // an upload in progress may belong to a live replica: only those older than a day count.
    let interrupted = if cfg.storage.is_shared() {
        store
            .pending_uploads_before(clock.now_ms().saturating_sub(SHARED_UPLOAD_MAX_AGE_MS))
            .await?
    } else {
        store.pending_uploads().await?
    };
    for id in interrupted {
        blobs.delete_prefix(&version_prefix(&id)).await?;
        store.end_upload(&id).await?;
        tracing::info!(upload = %hex::encode(id), "removed an interrupted upload");
    }
    // Versions destroyed just before a crash: their DEK is already gone (crypto-shredding step 1);
    // finish step 2. Not a security decision, so a backend without it only warns.
    match store.destroyed_pending_blobs().await {
        Ok(ids) => {
            for id in ids {
                blobs.delete_prefix(&version_prefix(&id)).await?;
                store.blobs_collected(&id).await?;
                tracing::info!(version = %hex::encode(id), "removed the blobs of a destroyed version");
            }
        }
        Err(e) => tracing::warn!(error = %e, "collecting blobs of destroyed versions"),
    }

    let verifiers: HashMap<TeeKind, Box<dyn Verifier>> = cfg
        .attest
        .enabled_verifiers()
        .map_err(|e| ServerError::Config(format!("attestation policy: {e}")))?;
    let sim_enabled = verifiers.contains_key(&TeeKind::Sim);
    if sim_enabled {
        tracing::warn!(
            simulated = true,
            "the simulated TEE (sim) is enabled: its evidence is not hardware-backed"
        );
    }

    let mut start_entry = AuditEntry::new(
        clock.now_ms(),
        Action::ServerStart,
        Decision::Info,
        Actor::system(),
    );
    let mut tees: Vec<&str> = verifiers.keys().map(|t| t.as_str()).collect();
    tees.sort_unstable();
    start_entry.reason = Some(format!(
        "weightvault {} serving; tees: [{}]",
        env!("CARGO_PKG_VERSION"),
        tees.join(",")
    ));
    if sim_enabled {
        start_entry.simulated = Some(true);
    }
    audit.append(&start_entry).await?;

    let vault = Arc::new(Vault {
        store,
        blobs,
        keys,
        audit,
        clock,
        verifiers,
        roles: auth::Roles::from_config(&cfg.roles),
        grant_ttl_ms: cfg.grants.ttl_secs.saturating_mul(1000),
        chunk_size: cfg.storage.chunk_size,
        shutdown: shutdown.clone(),
        serving: serving.clone(),
        budgets: budget::Budgets::new(cfg.budgets.clone()),
        peer_limits: limit::PeerLimiter::new(&cfg.limits),
        approvals: cfg.approvals.clone(),
        stream_slots: Arc::new(tokio::sync::Semaphore::new(node::stream_slots(
            cfg.storage.chunk_size,
        ))),
    });

    // A KEK rotation that a crash or shutdown interrupted resumes (docs/keys.md).
    if vault.keys.kek_versions().len() > 1 {
        admin::spawn_rotation(vault.clone());
    }
    // Both end on the shutdown token.
    *u.purger_task.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(spawn_purger(vault.clone(), shutdown.clone()));
    spawn_tree_size_gauge(vault.audit.size(), shutdown.clone());
    *u.sequencer_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(sequencer_task);
    if cell.set(vault.clone()).is_err() {
        return Err(ServerError::Config("the vault is already unsealed".into()));
    }
    serving.set_sealed(false);
    tracing::info!("vault unsealed: key ring open, audit log writable");
    Ok(vault)
}

/// Mirrors the audit tree size into its gauge.
fn spawn_tree_size_gauge(
    mut size: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            metrics::audit_tree_size(*size.borrow_and_update());
            tokio::select! {
                _ = stop.cancelled() => return,
                r = size.changed() => if r.is_err() { return },
            }
        }
    })
}

/// Deletes expired challenges and sessions every 30 seconds.
/// Waits for the background task kept in `slot`, if one is there.
async fn join_task(slot: &std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>) {
    let task = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = task {
        let _ = t.await;
    }
}

fn spawn_purger(vault: Arc<Vault>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            if let Err(e) = vault.store.purge_expired(vault.now()).await {
                tracing::warn!(error = %e, "purging expired challenges failed");
            }
            vault.record_pending_refusals(false).await;
        }
    })
}

/// An audit actor for a node, by the hash of its session token.
pub fn node_actor(token_sha256: &[u8; 32]) -> Actor {
    Actor::new(ActorKind::Node, hex::encode(token_sha256))
}

/// Model names: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_model_name(name: &str) -> Result<(), error::ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(error::ApiError::InvalidArgument(
            "model name must be 1-128 characters of [A-Za-z0-9._-], not starting with . or -"
                .into(),
        ))
    }
}

/// Everything [`start`] would refuse about `cfg` that [`Config::load`] cannot see (TLS material
/// that does not parse, attestation policies or roots that do not build), checked without
/// opening the store, binding a port or creating a file. `weightvault config check` prints it.
pub fn preflight(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match (
        read(&cfg.tls.cert),
        read(&cfg.tls.key),
        read(&cfg.tls.client_ca),
    ) {
        (Ok(cert), Ok(key), Ok(ca)) => {
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(cert, key))
                .client_ca_root(Certificate::from_pem(ca));
            if let Err(e) = tonic::transport::Server::builder().tls_config(tls) {
                problems.push(format!("tls: server certificate, key or client CA: {e}"));
            }
        }
        (a, b, c) => {
            for e in [a.err(), b.err(), c.err()].into_iter().flatten() {
                problems.push(format!("tls: {e}"));
            }
        }
    }
    if let Err(e) = cfg.attest.enabled_verifiers() {
        problems.push(format!("attestation policy: {e}"));
    }
    problems
}
