//! OperatorService and the seal gate (docs/key-ceremony.md). While the root key is sealed the
//! vault opens its store and serves only this service and health; [`Gated`] answers every call
//! of the other services with UNAVAILABLE until [`super::unlock`] has built the [`Vault`].
//!
//! Shares submitted while sealed cannot be audited yet (the log's signing key is wrapped by the
//! root key). Each attempt is logged at once and kept in memory; the kept attempts are appended
//! to the audit log right after the unseal. A restart before that loses them from the log (the
//! server log still has them).

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::auth::{Role, Roles};
use super::error::{ApiError, internal};
use super::{ServerError, UnlockInputs, Vault, request_id};
use crate::audit::entry::ActorKind;
use crate::audit::{Action, Actor, AuditEntry, Decision};
use crate::config::SealConfig;
use crate::keys::boot::{Boot, SealEvent, current_root, wrap_in_hsm};
use crate::keys::seal::{SealKind, SealState, hsm_wrapper, stored_state};
use crate::keys::shamir::{self, Share};
use crate::keys::{KeyError, RootKey, rekey};
use crate::proto::v1::operator_service_server::OperatorService;
use crate::proto::v1::{
    InitRequest, InitResponse, RekeyCommitRequest, RekeyRequest, RekeyResponse, SealStatusRequest,
    SealStatusResponse, UnsealRequest,
};

/// At most this many unseal attempts are kept for the audit log while sealed.
const MAX_KEPT_EVENTS: usize = 1000;

/// The vault once unsealed, shared by the gate, the operator service and `RunningServer`.
pub type VaultCell = Arc<OnceLock<Arc<Vault>>>;

/// A service that exists only once the vault is unsealed; until then every call is refused with
/// UNAVAILABLE. The inner service is built on the first call after the unseal.
pub struct Gated<S> {
    vault: VaultCell,
    inner: Arc<OnceLock<S>>,
    make: Arc<dyn Fn(Arc<Vault>) -> S + Send + Sync>,
}

impl<S> Clone for Gated<S> {
    fn clone(&self) -> Self {
        Self {
            vault: self.vault.clone(),
            inner: self.inner.clone(),
            make: self.make.clone(),
        }
    }
}

impl<S> Gated<S> {
    pub fn new(vault: VaultCell, make: impl Fn(Arc<Vault>) -> S + Send + Sync + 'static) -> Self {
        Self {
            vault,
            inner: Arc::new(OnceLock::new()),
            make: Arc::new(make),
        }
    }
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

/// The refusal of every call while sealed.
pub fn sealed_status() -> Status {
    let rid = request_id();
    let mut s = Status::unavailable(format!(
        "vault is sealed: submit unseal shares with `weightvault operator unseal` (request {rid})"
    ));
    if let Ok(v) = rid.parse() {
        s.metadata_mut().insert(super::error::REQUEST_ID_HEADER, v);
    }
    s
}

impl<S, B> Service<http::Request<B>> for Gated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Generated tonic services are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.vault.get() {
            Some(v) => {
                let mut svc = self.inner.get_or_init(|| (self.make)(v.clone())).clone();
                Box::pin(svc.call(req))
            }
            None => Box::pin(async { Ok(sealed_status().into_http()) }),
        }
    }
}

enum Phase {
    Uninitialized,
    Sealed {
        state: SealState,
        shares: Vec<Share>,
    },
    Unsealed,
}

/// The seal's state machine and the operator API.
pub struct SealControl {
    inputs: Arc<UnlockInputs>,
    vault: VaultCell,
    roles: Roles,
    phase: tokio::sync::Mutex<Phase>,
    /// The seal state in force (`None`: file seal).
    current: Mutex<Option<SealState>>,
    /// Unseal attempts waiting for the audit log.
    kept: Mutex<Kept>,
}

/// Seal events waiting for the audit log, and how many were dropped at the cap.
#[derive(Default)]
struct Kept {
    entries: Vec<AuditEntry>,
    dropped: u64,
}

fn actor_of<T>(req: &Request<T>) -> Actor {
    match req.peer_certs().and_then(|c| {
        c.first()
            .map(|l| crate::config::cert_fingerprint(l.as_ref()))
    }) {
        Some(fp) => Actor::new(ActorKind::Anonymous, fp),
        None => Actor {
            kind: ActorKind::Anonymous,
            id: None,
        },
    }
}

fn event_entry(
    now: u64,
    action: Action,
    decision: Decision,
    actor: Actor,
    reason: String,
) -> AuditEntry {
    let mut e = AuditEntry::new(now, action, decision, actor);
    e.reason = Some(reason);
    e
}

impl SealControl {
    /// Applies what the seal said at start: unlocks now, or waits sealed.
    pub async fn start(
        inputs: Arc<UnlockInputs>,
        vault: VaultCell,
        boot: Boot,
    ) -> Result<Arc<Self>, ServerError> {
        let roles = Roles::from_config(&inputs.cfg.roles);
        let now = inputs.clock.now_ms();
        let (phase, current, root) = match boot {
            Boot::Root {
                root,
                state,
                events,
            } => {
                let notes = events
                    .into_iter()
                    .map(|e| {
                        let (action, text) = match e {
                            SealEvent::Init(t) => (Action::SealInit, t),
                            SealEvent::Migrate(t) => (Action::SealMigrate, t),
                            SealEvent::KeyCreate(t) => (Action::KeyCreate, t),
                        };
                        event_entry(now, action, Decision::Info, Actor::system(), text)
                    })
                    .collect();
                (Phase::Unsealed, state, Some((root, notes)))
            }
            Boot::Sealed(state) => (
                Phase::Sealed {
                    state: state.clone(),
                    shares: Vec::new(),
                },
                Some(state),
                None,
            ),
            Boot::Uninitialized => (Phase::Uninitialized, None, None),
        };
        let control = Arc::new(Self {
            inputs,
            vault,
            roles,
            phase: tokio::sync::Mutex::new(phase),
            current: Mutex::new(current),
            kept: Mutex::new(Kept::default()),
        });
        match root {
            Some((root, notes)) => {
                super::unlock(&control.inputs, &control.vault, root, notes).await?;
            }
            None => {
                control.inputs.serving.set_sealed(true);
                tracing::warn!(
                    "vault is sealed: every call except operator status/unseal and health is refused until a threshold of shares is submitted"
                );
            }
        }
        Ok(control)
    }

    fn keep(&self, action: Action, decision: Decision, actor: Actor, reason: String) {
        tracing::warn!(action = ?action, reason = %reason, "seal event while sealed");
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        // Anyone can make attempts while sealed; the cap bounds memory, but must not let a flood
        // of refused calls push the init itself off the record. Dropped attempts are counted
        // and the count goes on the record.
        if kept.entries.len() < MAX_KEPT_EVENTS || action == Action::SealInit {
            kept.entries.push(event_entry(
                self.inputs.clock.now_ms(),
                action,
                decision,
                actor,
                reason,
            ));
        } else {
            kept.dropped += 1;
        }
    }

    /// The kept events, with a note of any dropped at the cap, for the audit log.
    fn kept_notes(&self) -> Vec<AuditEntry> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let mut notes = kept.entries.clone();
        if kept.dropped > 0 {
            notes.push(event_entry(
                self.inputs.clock.now_ms(),
                Action::Unseal,
                Decision::Info,
                Actor::system(),
                format!(
                    "{} further attempts while sealed were not kept (limit {MAX_KEPT_EVENTS}); the server log has them",
                    kept.dropped
                ),
            ));
        }
        notes
    }

    fn current(&self) -> Option<SealState> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn status(&self) -> SealStatusResponse {
        let phase = self.phase.lock().await;
        let current = self.current();
        let kind = current
            .as_ref()
            .map(|s| s.kind)
            .unwrap_or(match &self.inputs.cfg.seal {
                SealConfig::Shamir {} => SealKind::Shamir,
                SealConfig::Pkcs11 { .. } => SealKind::Pkcs11,
                _ => SealKind::File,
            });
        let mut r = SealStatusResponse {
            seal: kind.as_str().into(),
            generation: current
                .as_ref()
                .map(|s| s.generation.clone())
                .unwrap_or_default(),
            threshold: current.as_ref().map_or(0, |s| u32::from(s.threshold)),
            shares: current.as_ref().map_or(0, |s| u32::from(s.shares)),
            ..Default::default()
        };
        match &*phase {
            Phase::Uninitialized => {
                r.state = "uninitialized".into();
                r.message =
                    "not initialized: run `weightvault operator init --shares N --threshold M`"
                        .into();
            }
            Phase::Sealed { state, shares } => {
                r.state = "sealed".into();
                r.progress = shares.len() as u32;
                r.message = format!(
                    "sealed: {} of {} shares submitted",
                    shares.len(),
                    state.threshold
                );
            }
            Phase::Unsealed => {
                r.state = "unsealed".into();
                r.message = "unsealed".into();
                r.rekey_pending = matches!(
                    rekey::pending(self.inputs.store.as_ref()).await,
                    Ok(Some(_))
                );
            }
        }
        r
    }

    async fn init(&self, req: Request<InitRequest>) -> Result<InitResponse, ApiError> {
        let rid = request_id();
        let actor = match self.roles.require(&req, Role::Admin) {
            Ok(a) => a,
            Err(e) => {
                self.keep(
                    Action::AuthDenied,
                    Decision::Deny,
                    actor_of(&req),
                    format!("OperatorService.Init: {}", e.reason()),
                );
                return Err(e);
            }
        };
        let InitRequest { shares, threshold } = req.into_inner();
        let (n, m) = share_params(shares, threshold)?;
        let mut phase = self.phase.lock().await;
        let store = self.inputs.store.as_ref();
        let expect = match &*phase {
            Phase::Uninitialized => None,
            // Shares of an init whose shares never reached anyone can be replaced while nothing
            // is protected by that root key yet.
            Phase::Sealed { .. }
                if !crate::keys::seal::ring_exists(store)
                    .await
                    .map_err(|e| internal(&rid, "reading the key ring", e))? =>
            {
                self.current().map(|s| s.encode())
            }
            _ => {
                return Err(ApiError::FailedPrecondition(
                    "already initialized: use `weightvault operator rekey` to replace the root key"
                        .into(),
                ));
            }
        };
        if !matches!(self.inputs.cfg.seal, SealConfig::Shamir {}) {
            return Err(ApiError::FailedPrecondition(
                "operator init is for seal.kind = \"shamir\"; this seal initializes itself at start"
                    .into(),
            ));
        }
        let root = RootKey::generate().map_err(|e| internal(&rid, "generating the root key", e))?;
        let now = self.inputs.clock.now_ms();
        let state = SealState::new(SealKind::Shamir, &root, m, n, now)
            .map_err(|e| internal(&rid, "seal state", e))?;
        let dealt = shamir::split(&root, state.generation_bytes(), n, m)
            .map_err(|e| internal(&rid, "splitting the root key", e))?;
        drop(root);
        store
            .change_root_material(&crate::store::RootChange {
                expect: vec![(crate::keys::seal::STATE_NAME.into(), expect)],
                put: vec![(crate::keys::seal::STATE_NAME.into(), state.encode())],
                ..Default::default()
            })
            .await
            .map_err(|e| internal(&rid, "storing the seal state", e))?;
        self.keep(
            Action::SealInit,
            Decision::Info,
            actor,
            format!(
                "shamir seal initialized: {m} of {n} shares, root generation {}",
                state.generation
            ),
        );
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        *phase = Phase::Sealed {
            state: state.clone(),
            shares: Vec::new(),
        };
        tracing::info!(generation = %state.generation, shares = n, threshold = m, "shamir seal initialized; vault sealed");
        Ok(InitResponse {
            shares: dealt.iter().map(|s| s.to_text().to_string()).collect(),
            generation: state.generation,
            threshold: u32::from(m),
        })
    }

    async fn unseal(&self, req: Request<UnsealRequest>) -> Result<SealStatusResponse, ApiError> {
        let rid = request_id();
        let actor = actor_of(&req);
        let UnsealRequest { share, reset } = req.into_inner();
        let share = zeroize::Zeroizing::new(share);
        let mut phase = self.phase.lock().await;
        let (state, shares) = match &mut *phase {
            Phase::Unsealed => {
                return Err(ApiError::FailedPrecondition(
                    "the vault is not sealed".into(),
                ));
            }
            Phase::Uninitialized => {
                return Err(ApiError::FailedPrecondition(
                    "not initialized: run `weightvault operator init` first".into(),
                ));
            }
            Phase::Sealed { state, shares } => (state.clone(), shares),
        };
        if reset {
            shares.clear();
            self.keep(
                Action::Unseal,
                Decision::Info,
                actor,
                "unseal progress reset".into(),
            );
            drop(phase);
            return Ok(self.status().await);
        }
        let parsed = match Share::parse(&share) {
            Ok(s) => s,
            Err(e) => {
                self.keep(
                    Action::Unseal,
                    Decision::Deny,
                    actor,
                    "malformed share refused".into(),
                );
                return Err(ApiError::InvalidArgument(e.to_string()));
            }
        };
        if parsed.generation != state.generation_bytes() || parsed.threshold != state.threshold {
            self.keep(
                Action::Unseal,
                Decision::Deny,
                actor,
                "share of another root key generation refused".into(),
            );
            return Err(ApiError::InvalidArgument(format!(
                "this share belongs to another root key (generation {}); the current generation is {}",
                hex::encode(parsed.generation),
                state.generation
            )));
        }
        if shares.iter().any(|s| s.x == parsed.x) {
            self.keep(
                Action::Unseal,
                Decision::Deny,
                actor,
                "duplicate share refused".into(),
            );
            return Err(ApiError::InvalidArgument(format!(
                "share {} was already submitted ({} of {} so far)",
                parsed.x,
                shares.len(),
                state.threshold
            )));
        }
        shares.push(parsed);
        self.keep(
            Action::Unseal,
            Decision::Info,
            actor.clone(),
            format!("share accepted ({} of {})", shares.len(), state.threshold),
        );
        if shares.len() < usize::from(state.threshold) {
            drop(phase);
            return Ok(self.status().await);
        }
        let candidate = shamir::combine(shares);
        shares.clear();
        let root = match candidate {
            Some(r) if state.opens(&r) => r,
            _ => {
                // Which share was wrong is not knowable, and nothing about it is said.
                self.keep(
                    Action::Unseal,
                    Decision::Deny,
                    actor,
                    "the combined shares did not open the seal; progress reset".into(),
                );
                return Err(ApiError::PermissionDenied(format!(
                    "the submitted shares do not open this vault; progress reset to 0 of {}: submit the shares again",
                    state.threshold
                )));
            }
        };
        // Copied, not taken: if the unlock fails the vault stays sealed and they still wait.
        let mut notes = self.kept_notes();
        notes.push(event_entry(
            self.inputs.clock.now_ms(),
            Action::Unseal,
            Decision::Allow,
            Actor::system(),
            format!(
                "unsealed with {} of {} shares (root generation {})",
                state.threshold, state.shares, state.generation
            ),
        ));
        if let Err(e) = super::unlock(&self.inputs, &self.vault, root, notes).await {
            // The vault stays sealed; the shares are gone and must be submitted again.
            return Err(internal(&rid, "unlocking after the unseal", e));
        }
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Kept::default();
        *phase = Phase::Unsealed;
        drop(phase);
        Ok(self.status().await)
    }

    async fn rekey(&self, req: Request<RekeyRequest>) -> Result<RekeyResponse, Status> {
        let rid = request_id();
        let vault = self.vault.get().cloned().ok_or_else(sealed_status)?;
        let actor = vault
            .authorize(&req, Role::Admin, "OperatorService.Rekey", &rid)
            .await?;
        let RekeyRequest {
            target,
            shares,
            threshold,
            current_shares,
        } = req.into_inner();
        self.do_rekey(
            &vault,
            &rid,
            actor,
            &target,
            shares,
            threshold,
            &current_shares,
        )
        .await
        .map_err(|e| e.into_status(&rid))
    }

    #[allow(clippy::too_many_arguments)]
    async fn do_rekey(
        &self,
        vault: &Arc<Vault>,
        rid: &str,
        actor: Actor,
        target: &str,
        shares: u32,
        threshold: u32,
        current_shares: &[String],
    ) -> Result<RekeyResponse, ApiError> {
        let store = vault.store.as_ref();
        let current = stored_state(store)
            .await
            .map_err(|e| internal(rid, "reading the seal state", e))?;
        let from = current.as_ref().map_or(SealKind::File, |s| s.kind);
        let to = match target {
            "" if from == SealKind::File => {
                return Err(ApiError::InvalidArgument(
                    "a file-sealed vault must name the new seal: --to shamir".into(),
                ));
            }
            "" => from,
            t => SealKind::parse(t).ok_or_else(|| {
                ApiError::InvalidArgument(format!("unknown seal {t:?} (shamir or pkcs11)"))
            })?,
        };
        match (from, to) {
            (_, SealKind::File) => {
                return Err(ApiError::InvalidArgument(
                    "the file seal is for development only; rekey to shamir or pkcs11".into(),
                ));
            }
            (SealKind::Pkcs11, SealKind::Pkcs11) => {}
            (_, SealKind::Pkcs11) => {
                return Err(ApiError::FailedPrecondition(
                    "moving to pkcs11 happens at start: configure the pkcs11 seal with \
                     seal.migrate_from_file (docs/key-ceremony.md)"
                        .into(),
                ));
            }
            _ => {}
        }
        // The current root key: from the custodians' shares, or read again from its seal.
        let old = match &current {
            Some(s) if s.kind == SealKind::Shamir => {
                combine_for(s, current_shares).ok_or_else(|| {
                    ApiError::PermissionDenied(format!(
                        "a rekey of a shamir-sealed vault needs {} of the current shares, and they must open the seal",
                        s.threshold
                    ))
                })?
            }
            _ => current_root(&self.inputs.cfg.seal, current.as_ref())
                .await
                .map_err(|e| internal(rid, "reading the current root key", e))?,
        };
        let _run = vault.keys.begin_rotation().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "a KEK rotation is running; rekey once it has finished".into(),
            )
        })?;
        let new = RootKey::generate().map_err(|e| internal(rid, "generating a root key", e))?;
        let now = vault.now();
        let base = current.as_ref().map(|s| s.encode());
        let rewrapped = rekey::rewrap_all(&old, &new, store)
            .await
            .map_err(|e| internal(rid, "re-wrapping under the new root key", e))?;
        drop(old);
        if to == SealKind::Shamir {
            let (n, m) = share_params(shares, threshold)?;
            let state = SealState::new(SealKind::Shamir, &new, m, n, now)
                .map_err(|e| internal(rid, "seal state", e))?;
            let dealt = shamir::split(&new, state.generation_bytes(), n, m)
                .map_err(|e| internal(rid, "splitting the root key", e))?;
            let mut entry = vault.entry(Action::Rekey, Decision::Info, actor);
            entry.reason = Some(format!(
                "rekey staged: {} to shamir {m} of {n}, new root generation {}; in force after RekeyCommit",
                from.as_str(),
                state.generation
            ));
            vault.record(rid, entry).await?;
            rekey::stage(store, rewrapped, state.clone(), base, now)
                .await
                .map_err(|e| seal_error(rid, e))?;
            return Ok(RekeyResponse {
                shares: dealt.iter().map(|s| s.to_text().to_string()).collect(),
                generation: state.generation,
                seal: "shamir".into(),
                committed: false,
                threshold: u32::from(m),
            });
        }
        // pkcs11 to pkcs11: the HSM holds the new key at once; nothing has to come back.
        let hsm = Arc::new(
            hsm_wrapper(&self.inputs.cfg.seal).map_err(|e| internal(rid, "opening the HSM", e))?,
        );
        let mut state = SealState::new(SealKind::Pkcs11, &new, 0, 0, now)
            .map_err(|e| internal(rid, "seal state", e))?;
        state.wrapped_root = Some(hex::encode(
            wrap_in_hsm(&hsm, &new, &state)
                .await
                .map_err(|e| internal(rid, "wrapping in the HSM", e))?,
        ));
        let mut entry = vault.entry(Action::Rekey, Decision::Info, actor);
        entry.reason = Some(format!(
            "root key replaced (pkcs11), new root generation {}",
            state.generation
        ));
        vault.record(rid, entry).await?;
        rekey::apply_now(store, rewrapped, Some(&state), base)
            .await
            .map_err(|e| seal_error(rid, e))?;
        vault.keys.replace_root(new);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        Ok(RekeyResponse {
            generation: state.generation,
            seal: "pkcs11".into(),
            committed: true,
            ..Default::default()
        })
    }

    async fn rekey_commit(
        &self,
        req: Request<RekeyCommitRequest>,
    ) -> Result<RekeyResponse, Status> {
        let rid = request_id();
        let vault = self.vault.get().cloned().ok_or_else(sealed_status)?;
        let actor = vault
            .authorize(&req, Role::Admin, "OperatorService.RekeyCommit", &rid)
            .await?;
        let shares = req.into_inner().new_shares;
        self.do_commit(&vault, &rid, actor, &shares)
            .await
            .map_err(|e| e.into_status(&rid))
    }

    async fn do_commit(
        &self,
        vault: &Arc<Vault>,
        rid: &str,
        actor: Actor,
        shares: &[String],
    ) -> Result<RekeyResponse, ApiError> {
        let store = vault.store.as_ref();
        let pending = rekey::pending(store)
            .await
            .map_err(|e| internal(rid, "reading the pending rekey", e))?
            .ok_or_else(|| ApiError::FailedPrecondition("no rekey is pending".into()))?;
        let from = self.current().map_or(SealKind::File, |s| s.kind);
        let root = combine_for(&pending.state, shares).ok_or_else(|| {
            ApiError::PermissionDenied(format!(
                "the shares do not open the pending rekey ({} shares of generation {} are needed)",
                pending.state.threshold, pending.state.generation
            ))
        })?;
        let _run = vault.keys.begin_rotation().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "a KEK rotation is running; commit once it has finished".into(),
            )
        })?;
        let state = pending.state;
        let (action, reason) = if from == SealKind::File {
            (
                Action::SealMigrate,
                format!(
                    "root key moved from the file seal to shamir {} of {}, root generation {}; set [seal] kind = \"shamir\" before the next start",
                    state.threshold, state.shares, state.generation
                ),
            )
        } else {
            (
                Action::Rekey,
                format!(
                    "rekey committed: shamir {} of {}, root generation {}; the old shares are useless",
                    state.threshold, state.shares, state.generation
                ),
            )
        };
        let mut entry = vault.entry(action, Decision::Info, actor);
        entry.reason = Some(reason);
        vault.record(rid, entry).await?;
        let committed = rekey::commit(store, &root)
            .await
            .map_err(|e| seal_error(rid, e))?;
        vault.keys.replace_root(root);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(committed.clone());
        if from == SealKind::File {
            tracing::warn!(
                "the root key now has the shamir seal: set [seal] kind = \"shamir\" in the config before the next start, and destroy the old root key file"
            );
        }
        Ok(RekeyResponse {
            generation: committed.generation,
            seal: "shamir".into(),
            committed: true,
            threshold: u32::from(committed.threshold),
            ..Default::default()
        })
    }
}

fn seal_error(rid: &str, e: KeyError) -> ApiError {
    match e {
        KeyError::Seal(msg) => {
            tracing::warn!(request_id = rid, "{msg}");
            ApiError::FailedPrecondition(msg)
        }
        KeyError::UnwrapFailed => ApiError::PermissionDenied("the shares do not open it".into()),
        e => internal(rid, "changing the root key", e),
    }
}

/// Rebuilds the root key of `state` from text shares; `None` if they are malformed, of another
/// generation, too few, or do not open the verifier (deliberately one answer).
fn combine_for(state: &SealState, texts: &[String]) -> Option<RootKey> {
    let mut shares: Vec<Share> = Vec::new();
    for t in texts {
        let s = Share::parse(t).ok()?;
        if s.generation != state.generation_bytes() || s.threshold != state.threshold {
            return None;
        }
        if !shares.iter().any(|o| o.x == s.x) {
            shares.push(s);
        }
    }
    if shares.len() < usize::from(state.threshold) {
        return None;
    }
    let root = shamir::combine(&shares)?;
    state.opens(&root).then_some(root)
}

/// `N` shares with threshold `M`: 2 <= M <= N <= 255.
fn share_params(shares: u32, threshold: u32) -> Result<(u8, u8), ApiError> {
    match (u8::try_from(shares), u8::try_from(threshold)) {
        (Ok(n), Ok(m)) if m >= 2 && m <= n => Ok((n, m)),
        _ => Err(ApiError::InvalidArgument(format!(
            "shares and threshold must satisfy 2 <= threshold <= shares <= 255 (got {threshold} of {shares})"
        ))),
    }
}

/// The gRPC face of [`SealControl`].
pub struct OperatorApi {
    control: Arc<SealControl>,
}

impl OperatorApi {
    pub fn new(control: Arc<SealControl>) -> Self {
        Self { control }
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn status(
        &self,
        _req: Request<SealStatusRequest>,
    ) -> Result<Response<SealStatusResponse>, Status> {
        Ok(Response::new(self.control.status().await))
    }

    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let rid = request_id();
        self.control
            .init(req)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn unseal(
        &self,
        req: Request<UnsealRequest>,
    ) -> Result<Response<SealStatusResponse>, Status> {
        let rid = request_id();
        self.control
            .unseal(req)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn rekey(&self, req: Request<RekeyRequest>) -> Result<Response<RekeyResponse>, Status> {
        self.control.rekey(req).await.map(Response::new)
    }

    async fn rekey_commit(
        &self,
        req: Request<RekeyCommitRequest>,
    ) -> Result<Response<RekeyResponse>, Status> {
        self.control.rekey_commit(req).await.map(Response::new)
    }
}
