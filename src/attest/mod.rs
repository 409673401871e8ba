//! Evidence → verified claims. Pure: no I/O, no clock (the verification time is an argument).
//!
//! One [`Verifier`] per TEE. Success is an [`AttestationVerified`], a value only this module can
//! construct; the grant path cannot proceed without one.

pub mod azure;
pub mod nitro;
pub mod sim;
pub mod snp;
pub mod tdx;
pub mod tpm;

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use crate::time::UnixMs;

/// Domain separator of the report data (docs/protocol.md).
pub const REPORT_DATA_DOMAIN: &[u8] = b"weightvault/attest/v1";

/// Length of a challenge nonce.
pub const NONCE_LEN: usize = 32;

/// Length of a node's X25519 public key (RFC 7748 §5).
pub const NODE_KEY_LEN: usize = 32;

/// The 64 bytes a node's evidence must carry:
/// `SHA-512("weightvault/attest/v1" || nonce || node_public_key)`.
pub fn report_data(nonce: &[u8; NONCE_LEN], node_public_key: &[u8; NODE_KEY_LEN]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(REPORT_DATA_DOMAIN);
    ctx.update(nonce);
    ctx.update(node_public_key);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The kinds of TEE the vault knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeKind {
    /// Development TEE: evidence signed by an Ed25519 key the operator registers. Not hardware.
    Sim,
    /// AMD SEV-SNP attestation report.
    Snp,
    /// Intel TDX DCAP quote (v4/v5).
    Tdx,
    /// AWS Nitro Enclaves attestation document.
    Nitro,
    /// TPM 2.0 quote.
    Tpm,
    /// Azure confidential VM on SEV-SNP: HCL report plus vTPM quote.
    AzSnpVtpm,
    /// Azure confidential VM on TDX: HCL report plus vTPM quote.
    AzTdxVtpm,
}

impl TeeKind {
    pub const ALL: [TeeKind; 7] = [
        TeeKind::Sim,
        TeeKind::Snp,
        TeeKind::Tdx,
        TeeKind::Nitro,
        TeeKind::Tpm,
        TeeKind::AzSnpVtpm,
        TeeKind::AzTdxVtpm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TeeKind::Sim => "sim",
            TeeKind::Snp => "snp",
            TeeKind::Tdx => "tdx",
            TeeKind::Nitro => "nitro",
            TeeKind::Tpm => "tpm",
            TeeKind::AzSnpVtpm => "az-snp-vtpm",
            TeeKind::AzTdxVtpm => "az-tdx-vtpm",
        }
    }
}

impl fmt::Display for TeeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TeeKind {
    type Err = AttestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TeeKind::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| AttestError::UnknownTee(s.chars().take(32).collect()))
    }
}

/// What verified evidence says about the node. Field order is the canonical JSON order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub tee: TeeKind,
    /// Lowercase hex of the launch measurement.
    pub measurement: String,
    /// Chip, instance or node identity reported by the TEE.
    pub instance_id: String,
    pub debug: bool,
    /// When the evidence says it was produced.
    pub evidence_time_ms: UnixMs,
    /// True for the development TEE; it is never hardware-backed.
    pub simulated: bool,
    /// TEE-specific values, lowercase hex or decimal strings under stable names documented in
    /// docs/attestation.md (for example `rtmr0`, `pcr8`, `vmpl`, `tcb.snp`, `tcb_status`).
    /// Access rules may require any of them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub details: std::collections::BTreeMap<String, String>,
}

impl Claims {
    /// Canonical JSON (fixed field order, no floats).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("claims serialize")
    }
}

/// Proof that evidence was verified: only verifiers in this module construct it.
#[derive(Debug)]
pub struct AttestationVerified {
    claims: Claims,
    evidence_sha256: [u8; 32],
}

impl AttestationVerified {
    fn new(claims: Claims, evidence: &[u8]) -> Self {
        let mut evidence_sha256 = [0u8; 32];
        evidence_sha256.copy_from_slice(digest::digest(&digest::SHA256, evidence).as_ref());
        Self {
            claims,
            evidence_sha256,
        }
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// SHA-256 of the evidence bytes that were verified.
    pub fn evidence_sha256(&self) -> &[u8; 32] {
        &self.evidence_sha256
    }

    pub fn into_claims(self) -> Claims {
        self.claims
    }
}

/// Why evidence was rejected. `short_reason` is what a node is told; `Display` has detail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    #[error("unknown TEE kind {0:?}")]
    UnknownTee(String),
    #[error("TEE {0} is not enabled on this vault")]
    Disabled(TeeKind),
    #[error("malformed evidence: {0}")]
    Malformed(String),
    #[error("evidence signature does not verify")]
    BadSignature,
    #[error("evidence is not signed by a trusted key")]
    UntrustedKey,
    #[error("report data does not bind the nonce and node key")]
    BindingMismatch,
    #[error("evidence is older than the maximum age ({age_ms} ms > {max_ms} ms)")]
    Stale { age_ms: u64, max_ms: u64 },
    #[error("evidence time is in the future ({ahead_ms} ms ahead)")]
    FromFuture { ahead_ms: u64 },
    #[error("debug mode")]
    DebugMode,
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("not valid at the verification time: {0}")]
    Expired(String),
    /// A security floor of the verifier policy (TCB, VMPL, TDX status, ...) is not met.
    #[error("policy {rule}: {detail}")]
    Policy { rule: &'static str, detail: String },
}

impl AttestError {
    /// A stable, short reason for clients; never contains attacker-supplied bytes.
    pub fn short_reason(&self) -> &'static str {
        match self {
            AttestError::UnknownTee(_) => "unknown tee",
            AttestError::Disabled(_) => "tee not enabled",
            AttestError::Malformed(_) => "malformed evidence",
            AttestError::BadSignature => "bad evidence signature",
            AttestError::UntrustedKey => "untrusted evidence key",
            AttestError::BindingMismatch => "report data does not bind nonce and key",
            AttestError::Stale { .. } => "evidence too old",
            AttestError::FromFuture { .. } => "evidence from the future",
            AttestError::DebugMode => "debug mode",
            AttestError::Chain(_) => "untrusted certificate chain",
            AttestError::Expired(_) => "certificate or collateral not valid now",
            AttestError::Policy { rule, .. } => rule,
        }
    }
}

/// One TEE's evidence verifier.
pub trait Verifier: Send + Sync {
    fn tee(&self) -> TeeKind;

    /// Verifies `evidence` against the expected report data at time `now_ms`.
    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_binds_nonce_and_key() {
        let a = report_data(&[1; 32], &[2; 32]);
        assert_ne!(a, report_data(&[1; 32], &[3; 32]));
        assert_ne!(a, report_data(&[4; 32], &[2; 32]));
        // SHA-512 of the concatenation, computed independently.
        let mut msg = REPORT_DATA_DOMAIN.to_vec();
        msg.extend_from_slice(&[1; 32]);
        msg.extend_from_slice(&[2; 32]);
        assert_eq!(&a[..], digest::digest(&digest::SHA512, &msg).as_ref());
    }

    #[test]
    fn tee_kind_parses_only_known_names() {
        assert_eq!("sim".parse::<TeeKind>(), Ok(TeeKind::Sim));
        assert!(matches!(
            "SIM".parse::<TeeKind>(),
            Err(AttestError::UnknownTee(_))
        ));
    }
}
