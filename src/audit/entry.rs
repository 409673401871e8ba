//! One audit entry and its canonical encoding (docs/audit-log.md): JSON with a fixed field order,
//! absent optional fields omitted, integers only, no secrets (hashes of evidence and tokens).

use serde::{Deserialize, Serialize};

use crate::time::UnixMs;

/// Schema version of the entry encoding.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The vault started serving (records the mode, for example that `sim` is enabled).
    ServerStart,
    Challenge,
    Attest,
    Grant,
    FetchStart,
    FetchEnd,
    Push,
    AccessAllow,
    /// An allow rule was removed.
    AccessDeny,
    /// A grant, node, measurement or model was revoked.
    Revoke,
    /// An egress budget stopped a fetch (an alert for operators).
    BudgetExceeded,
    /// Calls from one client address over its call limit were refused (at most one entry per
    /// address per minute, with the count).
    RateLimited,
    /// A call refused for its client certificate or role.
    AuthDenied,
    /// A sensitive change was proposed, approved or rejected (M-of-N).
    Propose,
    Approve,
    Reject,
    KeyCreate,
    /// The shamir seal was initialized: a root key generated and split into shares.
    SealInit,
    /// An unseal attempt or its outcome (shares submitted while sealed are recorded once the log
    /// is writable again, that is right after the unseal).
    Unseal,
    /// A new root key was staged or put in force (the key ring re-wrapped under it).
    Rekey,
    /// The root key moved to another seal (file to shamir or pkcs11).
    SealMigrate,
    /// A KEK rotation started: a new KEK version is active (docs/keys.md).
    KeyRotate,
    /// One model version's DEK was re-wrapped under the active KEK (rotation).
    KeyRewrap,
    /// A KEK version that no longer wraps any DEK was destroyed (end of a rotation).
    KeyRetire,
    /// A model version was destroyed (crypto-shredding): its wrapped DEK first, then its blobs.
    ModelRm,
    /// Written when the log has been quiet for a while, so a quiet period is told from a gap.
    Heartbeat,
    /// The vault stopped serving (graceful shutdown).
    ServerStop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    System,
    Node,
    Admin,
    Auditor,
    Anonymous,
}

/// Who acted: a node (by the SHA-256 of its session token), an admin or auditor (by the SHA-256
/// fingerprint of the client certificate), or the vault itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub kind: ActorKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
}

impl Actor {
    pub fn system() -> Self {
        Actor {
            kind: ActorKind::System,
            id: None,
        }
    }

    pub fn new(kind: ActorKind, id: impl Into<String>) -> Self {
        Actor {
            kind,
            id: Some(id.into()),
        }
    }
}

/// One entry. Field order here is the canonical order of the encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub v: u32,
    pub time_ms: UnixMs,
    pub action: Action,
    pub decision: Decision,
    pub actor: Actor,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tee: Option<String>,
    /// Set on every entry about simulated (non-hardware) attestation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub simulated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub measurement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub evidence_sha256: Option<String>,
    /// Attest entries: the challenge nonce and the node's X25519 key (hex), so an auditor can
    /// recompute the report data and re-verify the stored evidence.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node_key: Option<String>,
    /// Grant entries: when the grant expires.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_after_ms: Option<UnixMs>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// Why bytes are not a canonical entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("not a valid audit entry: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("entry is not in canonical form")]
    NotCanonical,
}

impl AuditEntry {
    /// An entry with only the required fields set.
    pub fn new(time_ms: UnixMs, action: Action, decision: Decision, actor: Actor) -> Self {
        AuditEntry {
            v: SCHEMA_VERSION,
            time_ms,
            action,
            decision,
            actor,
            request_id: None,
            model: None,
            version: None,
            grant_id: None,
            tee: None,
            simulated: None,
            measurement: None,
            evidence_sha256: None,
            nonce: None,
            node_key: None,
            not_after_ms: None,
            file: None,
            bytes: None,
            reason: None,
        }
    }

    /// The canonical bytes: these are what the log stores and what a Merkle leaf hashes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("audit entry serializes")
    }

    /// Parses stored bytes and checks they are canonical (re-encoding gives the same bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let entry: AuditEntry = serde_json::from_slice(bytes)?;
        if entry.encode() != bytes {
            return Err(EntryError::NotCanonical);
        }
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_canonical_and_stable() {
        let mut e = AuditEntry::new(
            1_700_000_000_123,
            Action::Grant,
            Decision::Allow,
            Actor::new(ActorKind::Node, "ab12"),
        );
        e.model = Some("llama".into());
        e.version = Some(3);
        e.grant_id = Some("g1".into());
        let bytes = e.encode();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"v":1,"time_ms":1700000000123,"action":"grant","decision":"allow","actor":{"kind":"node","id":"ab12"},"model":"llama","version":3,"grant_id":"g1"}"#
        );
        assert_eq!(AuditEntry::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn decode_rejects_non_canonical_and_unknown() {
        let reordered =
            br#"{"time_ms":1,"v":1,"action":"push","decision":"info","actor":{"kind":"system"}}"#;
        assert!(matches!(
            AuditEntry::decode(reordered),
            Err(EntryError::NotCanonical)
        ));
        let spaced =
            br#"{"v":1, "time_ms":1,"action":"push","decision":"info","actor":{"kind":"system"}}"#;
        assert!(matches!(
            AuditEntry::decode(spaced),
            Err(EntryError::NotCanonical)
        ));
        let unknown = br#"{"v":1,"time_ms":1,"action":"push","decision":"info","actor":{"kind":"system"},"x":1}"#;
        assert!(matches!(
            AuditEntry::decode(unknown),
            Err(EntryError::Invalid(_))
        ));
    }
}
