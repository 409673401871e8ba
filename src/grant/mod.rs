//! Challenges, the access decision, HPKE sealing of the DEK and the grant itself.
//!
//! A grant is minted by [`mint`], which takes by value the three proofs the design requires:
//! an [`AttestedSession`] (built from an `attest::AttestationVerified`), an [`AccessApproved`]
//! (built only by [`decide`]) and an `audit::AuditDurable` (built only by the sequencer).

pub mod hpke;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use crate::attest::{AttestationVerified, Claims};
use crate::audit::AuditDurable;
use crate::keys::Dek;
use crate::store::{AccessRule, GrantRecord, Revocation, RevocationKind, SessionRecord};
use crate::time::UnixMs;

/// A challenge nonce is refused this long after it was issued (docs/protocol.md, GetChallenge).
pub const CHALLENGE_TTL_MS: u64 = 60_000;
/// An attestation session lives this long.
pub const SESSION_TTL_MS: u64 = 5 * 60_000;
/// Default grant lifetime.
pub const DEFAULT_GRANT_TTL_MS: u64 = 10 * 60_000;

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("random number generator failed")]
    Rng,
    #[error("stored session is corrupt")]
    CorruptSession,
    #[error("the durable audit entry does not name this grant")]
    AuditMismatch,
    #[error("HPKE sealing failed")]
    Seal,
}

/// `n` random bytes.
pub fn random<const N: usize>() -> Result<[u8; N], GrantError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| GrantError::Rng)?;
    Ok(out)
}

/// SHA-256 of a bearer token (what the store and the log keep instead of the token).
pub fn token_sha256(token: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token).as_ref());
    out
}

/// A live attestation session: verified claims bound to the node's X25519 key.
#[derive(Debug)]
pub struct AttestedSession {
    token_sha256: [u8; 32],
    claims: Claims,
    node_public_key: [u8; 32],
}

impl AttestedSession {
    /// A session from evidence that just verified.
    pub fn from_verified(
        verified: AttestationVerified,
        node_public_key: [u8; 32],
        token_sha256: [u8; 32],
    ) -> Self {
        Self {
            token_sha256,
            claims: verified.into_claims(),
            node_public_key,
        }
    }

    /// A session the vault stored when its evidence verified; `None` if it expired.
    pub fn from_record(rec: &SessionRecord, now: UnixMs) -> Result<Option<Self>, GrantError> {
        if now >= rec.expires_ms {
            return Ok(None);
        }
        let claims: Claims =
            serde_json::from_str(&rec.claims_json).map_err(|_| GrantError::CorruptSession)?;
        Ok(Some(Self {
            token_sha256: rec.token_sha256,
            claims,
            node_public_key: rec.node_public_key,
        }))
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn token_sha256(&self) -> &[u8; 32] {
        &self.token_sha256
    }
}

/// The access decision said yes; only [`decide`] constructs it.
#[derive(Debug)]
pub struct AccessApproved {
    grant_id: String,
    model: String,
    version: u64,
    not_after_ms: UnixMs,
    rule: AccessRule,
}

impl AccessApproved {
    pub fn grant_id(&self) -> &str {
        &self.grant_id
    }

    pub fn not_after_ms(&self) -> UnixMs {
        self.not_after_ms
    }

    /// The rule that allowed access.
    pub fn rule(&self) -> &AccessRule {
        &self.rule
    }
}

/// Why access was refused; `Display` is safe to show the node and names the rule that failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessDenied {
    #[error("no access rule allows {tee} measurement {measurement} to read model {model}")]
    NoMatchingRule {
        model: String,
        tee: String,
        measurement: String,
    },
    #[error(
        "rule {model}/{tee}/{measurement} requires {claim}={expected}, the evidence has {}",
        actual.as_deref().unwrap_or("none")
    )]
    RequirementFailed {
        model: String,
        tee: String,
        measurement: String,
        claim: String,
        expected: String,
        actual: Option<String>,
    },
}

/// A fresh grant id: `g-` and 16 random bytes in hex.
pub fn new_grant_id() -> Result<String, GrantError> {
    Ok(format!("g-{}", hex::encode(random::<16>()?)))
}

/// The revocation, if any, that forbids new grants of `model`@`version` to this session.
pub fn revoked_for(
    revocations: &[Revocation],
    session: &AttestedSession,
    model: &str,
    version: u64,
) -> Option<String> {
    let claims = session.claims();
    let versioned = format!("{model}@{version}");
    revocations.iter().find_map(|r| {
        let hit = match r.kind {
            RevocationKind::Grant => false,
            RevocationKind::Node => r.value == claims.instance_id,
            RevocationKind::Measurement => r.value == claims.measurement,
            RevocationKind::Model => r.value == model || r.value == versioned,
        };
        hit.then(|| format!("{} {} is revoked", r.kind.as_str(), r.value))
    })
}

/// The access decision: a rule for this model must name the session's TEE and measurement.
/// On approval the grant gets `grant_id` and expires `grant_ttl_ms` after `now`.
// The denial carries the rule and claim it names; it is built once per refused request.
#[allow(clippy::result_large_err)]
pub fn decide(
    grant_id: String,
    session: &AttestedSession,
    model: &str,
    version: u64,
    rules: &[AccessRule],
    now: UnixMs,
    grant_ttl_ms: u64,
) -> Result<AccessApproved, AccessDenied> {
    let claims = session.claims();
    let candidates = rules.iter().filter(|r| {
        r.model == model && r.tee == claims.tee.as_str() && r.measurement == claims.measurement
    });
    let mut first_failure = None;
    let mut rule = None;
    for r in candidates {
        let unmet = r
            .require
            .iter()
            .find(|(k, v)| claims.details.get(*k) != Some(*v));
        match unmet {
            None => {
                rule = Some(r);
                break;
            }
            Some((k, v)) if first_failure.is_none() => {
                first_failure = Some(AccessDenied::RequirementFailed {
                    model: model.to_string(),
                    tee: r.tee.clone(),
                    measurement: r.measurement.clone(),
                    claim: k.clone(),
                    expected: v.clone(),
                    actual: claims.details.get(k).cloned(),
                });
            }
            Some(_) => {}
        }
    }
    if let (None, Some(denied)) = (rule, first_failure) {
        return Err(denied);
    }
    match rule {
        Some(rule) => Ok(AccessApproved {
            grant_id,
            model: model.to_string(),
            version,
            not_after_ms: now.saturating_add(grant_ttl_ms),
            rule: rule.clone(),
        }),
        None => Err(AccessDenied::NoMatchingRule {
            model: model.to_string(),
            tee: claims.tee.to_string(),
            measurement: claims.measurement.clone(),
        }),
    }
}

/// A minted grant: the record to store and the DEK sealed to the node.
pub struct MintedGrant {
    pub record: GrantRecord,
    pub sealed: hpke::SealedDek,
    pub info: Vec<u8>,
}

/// Mints a grant. Consumes the three proofs; the audit entry must name this grant.
pub fn mint(
    session: AttestedSession,
    approval: AccessApproved,
    durable: AuditDurable,
    dek: &Dek,
    now: UnixMs,
) -> Result<MintedGrant, GrantError> {
    if durable.grant_id() != Some(approval.grant_id.as_str()) {
        return Err(GrantError::AuditMismatch);
    }
    let info = hpke::grant_info(
        &approval.grant_id,
        &approval.model,
        approval.version,
        approval.not_after_ms,
    );
    let sealed = hpke::seal_dek(dek, &session.node_public_key, &info)?;
    Ok(MintedGrant {
        record: GrantRecord {
            grant_id: approval.grant_id,
            session_sha256: session.token_sha256,
            model: approval.model,
            version: approval.version,
            node_public_key: session.node_public_key,
            instance_id: session.claims.instance_id.clone(),
            tee: session.claims.tee.to_string(),
            measurement: session.claims.measurement.clone(),
            created_ms: now,
            not_after_ms: approval.not_after_ms,
            revoked: false,
            bytes_served: 0,
        },
        sealed,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::TeeKind;

    fn session(measurement: &str) -> AttestedSession {
        AttestedSession {
            token_sha256: [1; 32],
            claims: Claims {
                tee: TeeKind::Sim,
                measurement: measurement.into(),
                instance_id: "n".into(),
                debug: false,
                evidence_time_ms: 0,
                simulated: true,
                details: Default::default(),
            },
            node_public_key: [2; 32],
        }
    }

    fn rule(model: &str, tee: &str, m: &str) -> AccessRule {
        AccessRule {
            model: model.into(),
            tee: tee.into(),
            measurement: m.into(),
            require: Default::default(),
            created_ms: 0,
        }
    }

    #[test]
    fn required_claims_must_all_match() {
        let mut strict = rule("m", "sim", "aa");
        strict.require.insert("rtmr0".into(), "01".into());
        strict.require.insert("pcr8".into(), "02".into());
        let mut s = session("aa");
        s.claims.details.insert("rtmr0".into(), "01".into());
        let denied =
            decide("g".into(), &s, "m", 1, std::slice::from_ref(&strict), 0, 1).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "rule m/sim/aa requires pcr8=02, the evidence has none"
        );
        s.claims.details.insert("pcr8".into(), "03".into());
        let denied =
            decide("g".into(), &s, "m", 1, std::slice::from_ref(&strict), 0, 1).unwrap_err();
        assert!(
            denied
                .to_string()
                .ends_with("requires pcr8=02, the evidence has 03")
        );
        s.claims.details.insert("pcr8".into(), "02".into());
        assert!(decide("g".into(), &s, "m", 1, std::slice::from_ref(&strict), 0, 1).is_ok());
        // A looser rule for the same measurement also allows.
        let loose = rule("m", "sim", "aa");
        let s = session("aa");
        assert!(decide("g".into(), &s, "m", 1, &[strict, loose], 0, 1).is_ok());
    }

    #[test]
    fn only_a_rule_naming_model_tee_and_measurement_allows() {
        let rules = [
            rule("m", "sim", "aa"),
            rule("other", "sim", "bb"),
            rule("m", "snp", "bb"),
        ];
        let ok = decide("g-1".into(), &session("aa"), "m", 3, &rules, 100, 50).unwrap();
        assert_eq!((ok.grant_id(), ok.not_after_ms()), ("g-1", 150));
        assert_eq!(ok.rule(), &rules[0]);
        // The measurement is allowed for another model, or for another TEE: both refused.
        let denied = decide("g-2".into(), &session("bb"), "m", 3, &rules, 100, 50).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "no access rule allows sim measurement bb to read model m"
        );
        assert!(decide("g-3".into(), &session("aa"), "x", 1, &rules, 100, 50).is_err());
        assert!(decide("g-4".into(), &session("aa"), "m", 1, &[], 100, 50).is_err());
    }

    #[test]
    fn mint_requires_the_audit_entry_of_this_grant() {
        let rules = [rule("m", "sim", "aa")];
        let node = hpke::NodeKeyPair::generate().unwrap();
        let mut s = session("aa");
        s.node_public_key = *node.public_key();
        let approval = decide("g-1".into(), &s, "m", 1, &rules, 0, 10).unwrap();
        let wrong = AuditDurable::for_tests(7, Some("g-other".into()));
        let dek = Dek::generate().unwrap();
        assert!(matches!(
            mint(s, approval, wrong, &dek, 0),
            Err(GrantError::AuditMismatch)
        ));
    }
}
