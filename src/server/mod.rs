//! The gRPC server: NodeService, AdminService and AuditService over TLS, on the embedded store.
//! [`start`] brings a vault up from a [`Config`] and returns once it listens; shutdown is an
//! input ([`RunningServer::shutdown`]).

pub mod admin;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod error;
pub mod node;

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
use crate::config::{Config, SealConfig};
use crate::keys::{KeyRing, seal};
use crate::proto::v1::admin_service_server::AdminServiceServer;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::node_service_server::NodeServiceServer;
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
    pub approvals: crate::config::ApprovalsConfig,
    /// Cancelled when the server shuts down; endless streams (audit tail) end on it.
    pub shutdown: CancellationToken,
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
        self.audit.append(&entry).await.map_err(|e| {
            tracing::error!(request_id, error = %e, "audit append failed; refusing");
            error::ApiError::AuditUnavailable
        })
    }

    /// The one authorization check of admin and auditor calls: the caller's certificate must
    /// carry `role`. A refusal is recorded in the audit log before it is returned.
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
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
    audit: Sequencer,
    clock: SharedClock,
    sequencer_task: tokio::task::JoinHandle<()>,
    /// Held for the server's lifetime: one vault per data directory.
    _lock: std::fs::File,
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
        // The last entry and the final checkpoint, then the sequencer stops.
        let mut stop = AuditEntry::new(
            self.clock.now_ms(),
            Action::ServerStop,
            Decision::Info,
            Actor::system(),
        );
        stop.reason = Some(match &result {
            Ok(()) => "shutdown".to_string(),
            Err(e) => format!("server failed: {e}"),
        });
        if let Err(e) = self.audit.append(&stop).await {
            tracing::error!(error = %e, "could not record the shutdown");
        }
        self.audit.close().await;
        let _ = self.sequencer_task.await;
        result
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
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

    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServerError::Store(crate::store::StoreError::Io(e)))?;
    // Two vaults on one data directory would interleave the audit log: refuse the second.
    let lock_path = cfg.data_dir.join("LOCK");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ServerError::Store(crate::store::StoreError::Io(e)))?;
    lock.try_lock().map_err(|_| {
        ServerError::Config(format!(
            "data directory {} is in use by another vault (lock on {})",
            cfg.data_dir.display(),
            lock_path.display()
        ))
    })?;
    let mut store: Arc<dyn MetadataStore> =
        Arc::new(SqliteStore::open(&cfg.data_dir.join("metadata.db")).await?);
    if let Some(wrap) = opts.wrap_store {
        store = wrap(store);
    }
    let blobs: Arc<dyn BlobStore> = Arc::new(LocalBlobs::open(&cfg.data_dir.join("blobs"))?);
    let root = match &cfg.seal {
        SealConfig::File { path, create } => seal::load_file_root_key(path, *create)?,
    };
    let clock = opts.clock;
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

    // Uploads a crash interrupted never became visible; collect their blobs.
    for id in store.pending_uploads().await? {
        blobs.delete_prefix(&version_prefix(&id)).await?;
        store.end_upload(&id).await?;
        tracing::info!(upload = %hex::encode(id), "removed an interrupted upload");
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

    let shutdown = CancellationToken::new();
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
        budgets: budget::Budgets::new(cfg.budgets.clone()),
        approvals: cfg.approvals.clone(),
    });

    let addr = opts.listen.unwrap_or(cfg.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let purge = spawn_purger(vault.clone(), shutdown.clone());
    let router = builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(
            NodeServiceServer::new(node::NodeApi::new(vault.clone()))
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            AdminServiceServer::new(admin::AdminApi::new(vault.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(AuditServiceServer::new(audit::AuditApi::new(vault.clone())));
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await;
        purge.abort();
        r.map_err(ServerError::from)
    });
    tracing::info!(%local_addr, "weightvault listening");
    Ok(RunningServer {
        local_addr,
        shutdown,
        task,
        audit: vault.audit.clone(),
        clock: vault.clock.clone(),
        sequencer_task,
        _lock: lock,
    })
}

/// Deletes expired challenges and sessions every 30 seconds.
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
