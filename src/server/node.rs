//! NodeService: GetChallenge → Attest → RequestGrant → FetchWeights (docs/protocol.md).
//! Every decision is on the record before the response that depends on it leaves.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::error::{ApiError, internal};
use super::wire::{self, ServedChunk, StreamTally};
use super::{MAX_MESSAGE, Vault, check_model_name, node_actor, request_id};
use crate::attest::{self, AttestError, NODE_KEY_LEN, NONCE_LEN, TeeKind};
use crate::audit::entry::ActorKind;
use crate::audit::{Action, Actor, Decision};
use crate::envelope::manifest::{Manifest, ManifestFile};
use crate::grant::{self, AttestedSession, CHALLENGE_TTL_MS, SESSION_TTL_MS, token_sha256};
use crate::proto::node_server::node_service_server::{NodeService, NodeServiceServer};
use crate::proto::v1::{
    AttestRequest, AttestResponse, FetchWeightsRequest, GetChallengeRequest, GetChallengeResponse,
    RequestGrantRequest, RequestGrantResponse,
};
use crate::store::{GrantRecord, Revocation, RevocationKind, SessionRecord, chunk_key};

pub struct NodeApi {
    vault: Arc<Vault>,
}

impl NodeApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

fn anonymous() -> Actor {
    Actor {
        kind: ActorKind::Anonymous,
        id: None,
    }
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], ApiError> {
    bytes
        .try_into()
        .map_err(|_| ApiError::InvalidArgument(format!("{what} must be {N} bytes")))
}

impl NodeApi {
    async fn get_challenge(&self, rid: &str) -> Result<GetChallengeResponse, ApiError> {
        let v = &self.vault;
        let nonce = grant::random::<NONCE_LEN>().map_err(|e| internal(rid, "rng", e))?;
        let expires = v.now() + CHALLENGE_TTL_MS;
        v.store
            .put_challenge(&nonce, expires)
            .await
            .map_err(|e| internal(rid, "storing challenge", e))?;
        v.record(rid, v.entry(Action::Challenge, Decision::Info, anonymous()))
            .await?;
        Ok(GetChallengeResponse {
            nonce: nonce.to_vec(),
            expires_at_ms: expires,
        })
    }

    /// `peer`: the caller's address, for the call limit. An Attest that names a live challenge
    /// is not charged (its GetChallenge was, and the nonce is single use); one whose nonce is
    /// malformed, unknown or used is charged before its refusal is recorded.
    async fn attest(
        &self,
        rid: &str,
        req: AttestRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<AttestResponse, ApiError> {
        let v = &self.vault;
        let mut deny = v.entry(Action::Attest, Decision::Deny, anonymous());
        deny.tee = Some(req.tee.chars().take(32).collect());
        let refuse = |mut entry: crate::audit::AuditEntry, detail: String, err: ApiError| async move {
            entry.reason = Some(detail);
            v.record(rid, entry).await?;
            Err::<AttestResponse, ApiError>(err)
        };

        let nonce = match fixed::<NONCE_LEN>(&req.nonce, "nonce") {
            Ok(n) => n,
            Err(e) => {
                self.vault.charge_call(rid, "Attest", peer).await?;
                return refuse(deny, e.reason().to_string(), e).await;
            }
        };
        deny.nonce = Some(hex::encode(nonce));
        // Single use (docs/protocol.md, GetChallenge): the nonce is consumed by any attempt, good or bad.
        let expires = v
            .store
            .take_challenge(&nonce)
            .await
            .map_err(|e| internal(rid, "taking challenge", e))?;
        let now = v.now();
        match expires {
            None => {
                self.vault.charge_call(rid, "Attest", peer).await?;
                return refuse(
                    deny,
                    "unknown or already used nonce".into(),
                    ApiError::PermissionDenied(
                        "attestation rejected: unknown or already used nonce".into(),
                    ),
                )
                .await;
            }
            Some(exp) if now >= exp => {
                return refuse(
                    deny,
                    "nonce expired".into(),
                    ApiError::PermissionDenied("attestation rejected: nonce expired".into()),
                )
                .await;
            }
            Some(_) => {}
        }
        let tee: TeeKind = match req.tee.parse() {
            Ok(t) => {
                deny.simulated = (t == TeeKind::Sim).then_some(true);
                t
            }
            Err(e) => {
                return refuse(
                    deny,
                    format!("{e}"),
                    ApiError::InvalidArgument(format!(
                        "attestation rejected: {}",
                        AttestError::short_reason(&e)
                    )),
                )
                .await;
            }
        };
        let node_key = match fixed::<NODE_KEY_LEN>(&req.node_public_key, "node_public_key") {
            Ok(k) => k,
            Err(e) => return refuse(deny, e.reason().to_string(), e).await,
        };
        deny.node_key = Some(hex::encode(node_key));
        let Some(verifier) = v.verifiers.get(&tee) else {
            let e = AttestError::Disabled(tee);
            return refuse(
                deny,
                e.to_string(),
                ApiError::PermissionDenied(format!("attestation rejected: {}", e.short_reason())),
            )
            .await;
        };
        let expected = attest::report_data(&nonce, &node_key);
        let started = std::time::Instant::now();
        let verdict = verifier.verify(&req.evidence, &expected, now);
        crate::server::metrics::attestation_verified(tee.as_str(), started.elapsed());
        let verified = match verdict {
            Ok(ok) => ok,
            Err(e) => {
                tracing::info!(request_id = rid, tee = %tee, reason = %e, simulated = (tee == TeeKind::Sim), "attestation rejected");
                deny.evidence_sha256 = Some(hex::encode(token_sha256(&req.evidence)));
                let client = format!("attestation rejected: {}", e.short_reason());
                let err = match e {
                    AttestError::Malformed(_) => ApiError::InvalidArgument(client),
                    _ => ApiError::PermissionDenied(client),
                };
                return refuse(deny, e.to_string(), err).await;
            }
        };
        let claims = verified.claims().clone();
        let evidence_sha256 = *verified.evidence_sha256();
        v.store
            .put_evidence(&evidence_sha256, &req.evidence)
            .await
            .map_err(|e| internal(rid, "storing evidence", e))?;
        let token = grant::random::<32>().map_err(|e| internal(rid, "rng", e))?;
        let token_hash = token_sha256(&token);
        let session = AttestedSession::from_verified(verified, node_key, token_hash);
        let expires_ms = now + SESSION_TTL_MS;
        v.store
            .put_session(&SessionRecord {
                token_sha256: token_hash,
                claims_json: claims.to_json(),
                node_public_key: node_key,
                evidence_sha256,
                created_ms: now,
                expires_ms,
            })
            .await
            .map_err(|e| internal(rid, "storing session", e))?;
        let mut ok = v.entry(
            Action::Attest,
            Decision::Allow,
            node_actor(session.token_sha256()),
        );
        ok.tee = Some(tee.to_string());
        ok.simulated = claims.simulated.then_some(true);
        ok.measurement = Some(claims.measurement.clone());
        ok.evidence_sha256 = Some(hex::encode(evidence_sha256));
        ok.nonce = Some(hex::encode(nonce));
        ok.node_key = Some(hex::encode(node_key));
        ok.reason = Some(format!("instance {}", claims.instance_id));
        v.record(rid, ok).await?;
        tracing::info!(request_id = rid, tee = %tee, measurement = %claims.measurement, simulated = claims.simulated, "attestation accepted");
        Ok(AttestResponse {
            session_token: token.to_vec(),
            expires_at_ms: expires_ms,
            claims_json: claims.to_json(),
        })
    }

    /// The live session a bearer token names.
    async fn session(&self, rid: &str, token: &[u8]) -> Result<AttestedSession, ApiError> {
        let v = &self.vault;
        let rec = v
            .store
            .get_session(&token_sha256(token))
            .await
            .map_err(|e| internal(rid, "loading session", e))?;
        let expired = || ApiError::Unauthenticated("unknown or expired attestation session".into());
        let rec = rec.ok_or_else(expired)?;
        AttestedSession::from_record(&rec, v.now())
            .map_err(|e| internal(rid, "loading session", e))?
            .ok_or_else(expired)
    }

    /// `peer`: the caller's address; a refused call is charged to its call limit before the
    /// refusal is recorded.
    async fn request_grant(
        &self,
        rid: &str,
        req: RequestGrantRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<RequestGrantResponse, ApiError> {
        let v = &self.vault;
        let session = match self.session(rid, &req.session_token).await {
            Ok(s) => s,
            Err(e) => {
                if !matches!(e, ApiError::Internal) {
                    self.vault.charge_call(rid, "RequestGrant", peer).await?;
                }
                let mut deny = v.entry(Action::Grant, Decision::Deny, anonymous());
                deny.model = Some(req.model.chars().take(128).collect());
                deny.reason = Some(e.reason().to_string());
                v.record(rid, deny).await?;
                return Err(e);
            }
        };
        let claims = session.claims().clone();
        let mut entry = v.entry(
            Action::Grant,
            Decision::Deny,
            node_actor(session.token_sha256()),
        );
        entry.model = Some(req.model.chars().take(128).collect());
        entry.version = (req.version != 0).then_some(req.version);
        entry.tee = Some(claims.tee.to_string());
        entry.simulated = claims.simulated.then_some(true);
        entry.measurement = Some(claims.measurement.clone());

        let found = match check_model_name(&req.model) {
            Ok(()) => v
                .store
                .get_version(&req.model, (req.version != 0).then_some(req.version))
                .await
                .map_err(|e| internal(rid, "loading version", e))?
                .ok_or_else(|| {
                    ApiError::NotFound(if req.version == 0 {
                        format!("model {} not found", req.model)
                    } else {
                        format!("model {} version {} not found", req.model, req.version)
                    })
                }),
            Err(e) => Err(e),
        };
        let version = match found {
            Ok(ver) => ver,
            Err(e) => {
                entry.reason = Some(e.reason().to_string());
                self.vault.charge_call(rid, "RequestGrant", peer).await?;
                v.record(rid, entry).await?;
                return Err(e);
            }
        };
        entry.version = Some(version.version);
        let rules = v
            .store
            .rules(Some(&req.model))
            .await
            .map_err(|e| internal(rid, "loading rules", e))?;
        let now = v.now();
        let revocations = v
            .store
            .revocations()
            .await
            .map_err(|e| internal(rid, "loading revocations", e))?;
        if let Some(why) = grant::revoked_for(&revocations, &session, &req.model, version.version) {
            entry.reason = Some(why.clone());
            self.vault.charge_call(rid, "RequestGrant", peer).await?;
            v.record(rid, entry).await?;
            return Err(ApiError::PermissionDenied(format!("access denied: {why}")));
        }
        let grant_id = grant::new_grant_id().map_err(|e| internal(rid, "rng", e))?;
        let approval = match grant::decide(
            grant_id,
            &session,
            &req.model,
            version.version,
            &rules,
            now,
            v.grant_ttl_ms,
        ) {
            Ok(a) => a,
            Err(denied) => {
                entry.reason = Some(denied.to_string());
                self.vault.charge_call(rid, "RequestGrant", peer).await?;
                v.record(rid, entry).await?;
                return Err(ApiError::PermissionDenied(format!(
                    "access denied: {denied}"
                )));
            }
        };
        entry.decision = Decision::Allow;
        entry.grant_id = Some(approval.grant_id().to_string());
        entry.not_after_ms = Some(approval.not_after_ms());
        entry.reason = Some(format!(
            "rule {}/{}/{}",
            approval.rule().model,
            approval.rule().tee,
            approval.rule().measurement,
        ));
        // Everything that can fail is done before the entry that authorizes the grant.
        let dek = v
            .keys
            .unwrap_version_dek(v.store.as_ref(), &version)
            .await
            .map_err(|e| internal(rid, "unwrapping DEK", e))?;
        // Log before release: the grant exists for the node only once this entry is durable.
        let durable = v.record(rid, entry).await?;
        let minted = grant::mint(session, approval, durable, &dek, now)
            .map_err(|e| internal(rid, "minting grant", e))?;
        drop(dek);
        v.store
            .put_grant(&minted.record)
            .await
            .map_err(|e| internal(rid, "storing grant", e))?;
        // A revocation that committed between the check above and this grant's insertion did
        // not mark it: look again now that the grant is stored, and refuse if it is covered.
        let late = v
            .store
            .revocations()
            .await
            .map_err(|e| internal(rid, "loading revocations", e))?;
        if late.len() != revocations.len() {
            let g = &minted.record;
            let versioned = format!("{}@{}", g.model, g.version);
            let covered = late.iter().any(|r| match r.kind {
                RevocationKind::Node => r.value == g.instance_id,
                RevocationKind::Measurement => r.value == g.measurement,
                RevocationKind::Model => r.value == g.model || r.value == versioned,
                RevocationKind::Grant => r.value == g.grant_id,
            });
            if covered {
                let _ = v
                    .store
                    .revoke(&Revocation {
                        kind: RevocationKind::Grant,
                        value: g.grant_id.clone(),
                        created_ms: now,
                        reason: "revoked while being issued".into(),
                    })
                    .await;
                return Err(ApiError::PermissionDenied(
                    "access denied: revoked while the grant was being issued".into(),
                ));
            }
        }
        Ok(RequestGrantResponse {
            grant_id: minted.record.grant_id.clone(),
            version: version.version,
            not_after_ms: minted.record.not_after_ms,
            manifest: version.manifest,
            manifest_signature: version.manifest_sig,
            manifest_public_key: v.keys.signing_public_key().to_vec(),
            sealed_dek_enc: minted.sealed.enc,
            sealed_dek: minted.sealed.ciphertext,
            hpke_info: minted.info,
        })
    }

    /// Checks a grant for the caller; returns it and the manifest of its version.
    async fn usable_grant(
        &self,
        rid: &str,
        token: &[u8],
        grant_id: &str,
    ) -> Result<GrantRecord, ApiError> {
        let v = &self.vault;
        let grant = v
            .store
            .get_grant(grant_id)
            .await
            .map_err(|e| internal(rid, "loading grant", e))?
            .ok_or_else(|| ApiError::NotFound("unknown grant".into()))?;
        if !bool::from(token_sha256(token).ct_eq(&grant.session_sha256)) {
            return Err(ApiError::PermissionDenied(
                "grant was issued to another session".into(),
            ));
        }
        check_live(&grant, v.now())?;
        Ok(grant)
    }

    /// `peer`: the caller's address; a refused call is charged to its call limit before the
    /// refusal is recorded.
    async fn fetch(
        &self,
        rid: &str,
        req: FetchWeightsRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<mpsc::Receiver<Result<ServedChunk, Status>>, ApiError> {
        let v = &self.vault;
        let mut entry = v.entry(
            Action::FetchStart,
            Decision::Deny,
            node_actor(&token_sha256(&req.session_token)),
        );
        entry.grant_id = Some(req.grant_id.chars().take(64).collect());
        entry.file = Some(req.file.chars().take(256).collect());
        let checked = async {
            let grant = self
                .usable_grant(rid, &req.session_token, &req.grant_id)
                .await?;
            let version = v
                .store
                .get_version(&grant.model, Some(grant.version))
                .await
                .map_err(|e| internal(rid, "loading version", e))?
                .ok_or_else(|| ApiError::NotFound("model version no longer exists".into()))?;
            let manifest = Manifest::from_bytes(&version.manifest)
                .map_err(|e| internal(rid, "stored manifest", e))?;
            let file = manifest
                .files
                .iter()
                .find(|f| f.path == req.file)
                .ok_or_else(|| {
                    ApiError::NotFound(format!("file {:?} is not in the manifest", req.file))
                })?
                .clone();
            let end = if req.end_chunk == 0 {
                file.chunks
            } else {
                req.end_chunk
            };
            if req.first_chunk >= end || end > file.chunks {
                return Err(ApiError::OutOfRange(format!(
                    "chunk range {}..{} is outside 0..{}",
                    req.first_chunk, end, file.chunks
                )));
            }
            // The grant's egress budget: the whole version's ciphertext plus the allowance.
            let cipher_bytes: u64 = manifest
                .files
                .iter()
                .map(|f| f.size + f.chunks * crate::envelope::TAG_LEN as u64)
                .sum();
            let limit = v.budgets.grant_limit(
                cipher_bytes,
                u64::from(manifest.chunk_size) + crate::envelope::TAG_LEN as u64,
            );
            Ok((
                grant,
                version.version_id,
                file,
                end,
                limit,
                manifest.chunk_size,
            ))
        }
        .await;
        let (grant, version_id, file, end, grant_limit, chunk_size) = match checked {
            Ok(x) => x,
            Err(e) => {
                if !matches!(e, ApiError::Internal) {
                    self.vault.charge_call(rid, "FetchWeights", peer).await?;
                }
                entry.reason = Some(e.reason().to_string());
                v.record(rid, entry).await?;
                return Err(e);
            }
        };
        entry.decision = Decision::Allow;
        entry.model = Some(grant.model.clone());
        entry.version = Some(grant.version);
        entry.reason = Some(format!("chunks {}..{}", req.first_chunk, end));
        v.record(rid, entry).await?;

        // Two chunks queued at most: memory stays bounded whatever the model size.
        let (tx, rx) = mpsc::channel(2);
        let tally = Arc::new(StreamTally::default());
        let vault = v.clone();
        let rid = rid.to_string();
        let token_hash = token_sha256(&req.session_token);
        let stream_tally = tally.clone();
        tokio::spawn(async move {
            let tally = stream_tally;
            let _live = crate::server::metrics::LiveStream::start();
            let mut queued: u64 = 0;
            let mut queued_chunks: u64 = 0;
            // An error ending the stream is sent only after its `fetch_end` record.
            let mut final_error: Option<Status> = None;
            let mut stalled = false;
            let mut outcome = "complete".to_string();
            // Bounded server memory: wait for a sending slot (held until the stream ends).
            let _slot = vault.stream_slots.clone().acquire_owned().await;
            // The grant as last read, the store's revocation epoch before that read, and when.
            let mut last_read: Option<(GrantRecord, Option<u64>, u64)> = None;
            for index in req.first_chunk..end {
                // A chunk the response body could not send ends the stream (the body sends its
                // error once this task has recorded the end below and let go).
                if tally.failed() {
                    break;
                }
                // Validity is checked per chunk, so revocation and expiry stop a stream within
                // one chunk. The grant row is read again unless the store vouches that no
                // revocation committed since the last read (the embedded store, which only
                // this process writes), and at least every GRANT_REREAD_MS regardless.
                let now = vault.now();
                let epoch = vault.store.revocation_epoch();
                // A clock that stepped back (now < at) also forces a read.
                let unchanged = last_read.as_ref().filter(|(_, seen, at)| {
                    epoch.is_some() && *seen == epoch && now >= *at && now - *at < GRANT_REREAD_MS
                });
                let live = match unchanged {
                    Some((g, _, _)) => check_live(g, now),
                    None => match vault.store.get_grant(&grant.grant_id).await {
                        Ok(Some(g)) => {
                            let live = check_live(&g, vault.now());
                            last_read = Some((g, epoch, now));
                            live
                        }
                        Ok(None) => {
                            Err(ApiError::PermissionDenied("grant no longer exists".into()))
                        }
                        Err(e) => Err(internal(&rid, "loading grant", e)),
                    },
                };
                if let Err(e) = live {
                    outcome = e.reason().to_string();
                    final_error = Some(e.into_status(&rid));
                    break;
                }
                let data = match vault
                    .blobs
                    .open(&chunk_key(&version_id, &file.path, index))
                    .await
                {
                    Ok(d) => d,
                    Err(e) => {
                        // `model rm` revokes the version's grants, then deletes its blobs: a
                        // blob gone between the check above and this read is that, not a
                        // store fault. The grant as it is now says which.
                        let denied = match vault.store.get_grant(&grant.grant_id).await {
                            Ok(Some(g)) => check_live(&g, vault.now()).err(),
                            Ok(None) => {
                                Some(ApiError::PermissionDenied("grant no longer exists".into()))
                            }
                            Err(_) => None,
                        };
                        let e = match denied {
                            Some(denied) => {
                                tracing::warn!(
                                    request_id = %rid,
                                    error = %e,
                                    "chunk unreadable; the grant is no longer live, reporting that"
                                );
                                outcome = denied.reason().to_string();
                                denied
                            }
                            None => {
                                outcome = "chunk unreadable".into();
                                internal(&rid, "reading chunk", e)
                            }
                        };
                        final_error = Some(e.into_status(&rid));
                        break;
                    }
                };
                let len = data.len();
                // A blob whose size is not the chunk's (a damaged or replaced store) is not
                // sent, nor is memory reserved for it.
                let expected = chunk_cipher_len(&file, chunk_size, index);
                if len != expected {
                    outcome = "chunk unreadable".into();
                    let why = format!("chunk {index} is {len} bytes, not {expected}");
                    let e = internal(&rid, "chunk blob has the wrong size", why);
                    final_error = Some(e.into_status(&rid));
                    break;
                }
                if let Err(scope) = vault.budgets.charge(&grant, grant_limit, len, vault.now()) {
                    crate::server::metrics::budget_refused(scope.as_str());
                    let why = format!("egress budget of the {} exhausted", scope.as_str());
                    outcome = why.clone();
                    let mut alert = vault.entry(
                        Action::BudgetExceeded,
                        Decision::Deny,
                        node_actor(&token_hash),
                    );
                    alert.model = Some(grant.model.clone());
                    alert.version = Some(grant.version);
                    alert.grant_id = Some(grant.grant_id.clone());
                    alert.file = Some(file.path.clone());
                    alert.bytes = Some(queued);
                    alert.reason = Some(why.clone());
                    let status = match vault.record(&rid, alert).await {
                        Ok(_) => ApiError::ResourceExhausted(why).into_status(&rid),
                        Err(e) => e.into_status(&rid),
                    };
                    final_error = Some(status);
                    break;
                }
                // A node that stops reading gives its slot back; it can resume the range.
                let chunk = ServedChunk {
                    index,
                    body: data,
                    tally: tally.clone(),
                };
                match tokio::time::timeout(SEND_STALL, tx.send(Ok(chunk))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        outcome = "client went away".into();
                        break;
                    }
                    Err(_) => {
                        outcome = "client stalled; stream ended".into();
                        stalled = true;
                        break;
                    }
                }
                queued += len;
                queued_chunks += 1;
            }
            // What reached the response is known once the body is done with every queued
            // chunk (or the node went away). The stream ends only after `fetch_end` is
            // durable, so a node that saw its stream complete finds it on the record. (Not
            // after a stall: the node is not taking chunks, and the slot goes back now.)
            while !stalled && !tally.failed() && tally.chunks_done() < queued_chunks {
                let next = tally.chunks_done() + 1;
                let waited = tokio::time::timeout(SEND_STALL, async {
                    tokio::select! {
                        () = tally.settled(next) => true,
                        () = tx.closed() => false,
                    }
                })
                .await;
                match waited {
                    Ok(true) => {}
                    // The node went away: what was encoded is all it got.
                    Ok(false) => {
                        if outcome == "complete" {
                            outcome = "client went away".into();
                        }
                        break;
                    }
                    Err(_) => {
                        outcome = "client stalled; stream ended".into();
                        stalled = true;
                    }
                }
            }
            let sent = tally.encoded_bytes();
            if tally.failed() {
                outcome = "chunk unreadable".into();
            }
            if let Err(e) = vault.store.add_grant_bytes(&grant.grant_id, sent).await {
                tracing::error!(request_id = rid, error = %e, "recording bytes served");
            }
            let mut end_entry =
                vault.entry(Action::FetchEnd, Decision::Info, node_actor(&token_hash));
            end_entry.model = Some(grant.model.clone());
            end_entry.version = Some(grant.version);
            end_entry.grant_id = Some(grant.grant_id.clone());
            end_entry.file = Some(file.path.clone());
            end_entry.bytes = Some(sent);
            end_entry.reason = Some(outcome);
            let _ = vault.record(&rid, end_entry).await;
            // Only now does the response end, with its error if there is one.
            if let Some(status) = final_error {
                let _ = tokio::time::timeout(SEND_STALL, tx.send(Err(status))).await;
            }
            drop(tx);
        });
        Ok(rx)
    }
}

/// Longest time a stream relies on a grant row it read earlier, when the store reports that no
/// revocation committed since ([`crate::store::MetadataStore::revocation_epoch`]).
const GRANT_REREAD_MS: u64 = 1000;

/// Memory the chunks of all FetchWeights streams may hold at once, roughly: each sending stream
/// has up to four chunks in flight (two queued as open files, one being read into its message
/// buffer, one or two waiting in HTTP/2's send queue, whose buffers the stream then reuses); the
/// budget is sized for four whole chunks per stream.
pub const STREAM_MEMORY_BUDGET: u64 = 32 * 1024 * 1024;

/// How long a stream waits for its node to take the next chunk before it ends (and frees its
/// slot); the node resumes from the chunk it has not received.
pub const SEND_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Streams that send at once; the others wait for a slot before their first chunk.
pub fn stream_slots(chunk_size: u32) -> usize {
    let per_stream = 4 * (u64::from(chunk_size) + crate::envelope::TAG_LEN as u64);
    usize::try_from(STREAM_MEMORY_BUDGET / per_stream)
        .unwrap_or(usize::MAX)
        .max(2)
}

/// Stored length of chunk `index` of `file`: its plaintext (a full chunk, or what is left for
/// the last one; an empty file has one empty chunk) plus the tag (docs/format.md §5).
fn chunk_cipher_len(file: &ManifestFile, chunk_size: u32, index: u64) -> u64 {
    let start = index.saturating_mul(u64::from(chunk_size));
    let plain = file.size.saturating_sub(start).min(u64::from(chunk_size));
    plain + crate::envelope::TAG_LEN as u64
}

fn check_live(grant: &GrantRecord, now: u64) -> Result<(), ApiError> {
    if grant.revoked {
        return Err(ApiError::PermissionDenied("grant revoked".into()));
    }
    if now >= grant.not_after_ms {
        return Err(ApiError::PermissionDenied("grant expired".into()));
    }
    Ok(())
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_challenge(
        &self,
        req: Request<GetChallengeRequest>,
    ) -> Result<Response<GetChallengeResponse>, Status> {
        let rid = request_id();
        self.vault
            .charge_call(&rid, "GetChallenge", req.remote_addr())
            .await
            .map_err(|e| e.into_status(&rid))?;
        self.get_challenge(&rid)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status(&rid))
    }

    async fn attest(
        &self,
        req: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        let rid = request_id();
        let peer = req.remote_addr();
        self.attest(&rid, req.into_inner(), peer)
            .await
            .map(Response::new)
            .map_err(|e| {
                crate::server::metrics::grant_denied("attest", e.metric_reason());
                e.into_status(&rid)
            })
    }

    async fn request_grant(
        &self,
        req: Request<RequestGrantRequest>,
    ) -> Result<Response<RequestGrantResponse>, Status> {
        let rid = request_id();
        let peer = req.remote_addr();
        match self.request_grant(&rid, req.into_inner(), peer).await {
            Ok(r) => {
                crate::server::metrics::grant_issued();
                Ok(Response::new(r))
            }
            Err(e) => {
                crate::server::metrics::grant_denied("grant", e.metric_reason());
                Err(e.into_status(&rid))
            }
        }
    }
}

/// NodeService as the vault serves it: the generated server answers GetChallenge, Attest and
/// RequestGrant, and FetchWeights is answered by [`wire::serve_fetch`] (which writes each chunk
/// message from the blob file into a reused send buffer instead of going through tonic's codec).
#[derive(Clone)]
pub struct NodeServer {
    api: Arc<NodeApi>,
    unary: NodeServiceServer<NodeApi>,
}

impl NodeServer {
    pub fn new(vault: Arc<Vault>) -> Self {
        let api = Arc::new(NodeApi::new(vault));
        Self {
            unary: NodeServiceServer::from_arc(api.clone()).max_encoding_message_size(MAX_MESSAGE),
            api,
        }
    }
}

impl NamedService for NodeServer {
    const NAME: &'static str = <NodeServiceServer<NodeApi> as NamedService>::NAME;
}

/// The client's address as tonic's transport records it (what `Request::remote_addr` reads).
fn peer_addr<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
}

impl Service<http::Request<tonic::body::Body>> for NodeServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != wire::FETCH_PATH {
            return self.unary.call(req);
        }
        let api = self.api.clone();
        let peer = peer_addr(&req);
        Box::pin(async move {
            Ok(wire::serve_fetch(req, MAX_MESSAGE, |message| async move {
                let rid = request_id();
                api.fetch(&rid, message, peer)
                    .await
                    .map_err(|e| e.into_status(&rid))
            })
            .await)
        })
    }
}
