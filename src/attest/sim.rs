//! The development TEE (`sim`). Evidence is a report signed with an Ed25519 key (RFC 8032) that
//! the operator registers with the vault. It proves nothing about hardware: it exists so the whole
//! protocol can run on laptops and in tests, and every claim it yields says `simulated: true`.
//!
//! Evidence encoding (docs/protocol.md): JSON
//! `{"format":"weightvault-sim-evidence/v1","report":BASE64,"signature":BASE64}` where `report` is
//! the canonical JSON of [`SimReport`] and `signature` is Ed25519 over
//! `"weightvault/sim-evidence/v1\n" || report`.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{AttestError, AttestationVerified, Claims, TeeKind, Verifier};
use crate::time::UnixMs;

pub const FORMAT: &str = "weightvault-sim-evidence/v1";
const SIGNING_DOMAIN: &[u8] = b"weightvault/sim-evidence/v1\n";
/// Evidence larger than this is rejected before parsing.
pub const MAX_EVIDENCE_LEN: usize = 16 * 1024;
/// Tolerated clock skew between node and vault.
pub const MAX_SKEW_MS: u64 = 60_000;
/// Default maximum age of evidence.
pub const DEFAULT_MAX_AGE_MS: u64 = 5 * 60_000;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimEvidence {
    format: String,
    report: String,
    signature: String,
}

/// The signed body of sim evidence. Field order is the canonical order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimReport {
    /// Lowercase hex, 1 to 64 bytes.
    pub measurement: String,
    /// Lowercase hex, exactly 64 bytes.
    pub report_data: String,
    pub instance_id: String,
    pub debug: bool,
    pub issued_ms: UnixMs,
}

/// Produces sim evidence (the node side, tests and `weightvault attest sim-quote`).
pub struct SimSigner {
    key: Ed25519KeyPair,
}

impl SimSigner {
    /// From a PKCS#8 v1 or v2 document (RFC 5958) holding an Ed25519 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AttestError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map(|key| Self { key })
            .map_err(|_| AttestError::Malformed("not an Ed25519 PKCS#8 key".into()))
    }

    /// A new random key, returned as PKCS#8 v2 bytes to store.
    pub fn generate_pkcs8() -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("ed25519 key generation")
            .as_ref()
            .to_vec()
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    pub fn sign(&self, report: &SimReport) -> Vec<u8> {
        let body = serde_json::to_vec(report).expect("report serializes");
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        let sig = self.key.sign(&msg);
        serde_json::to_vec(&SimEvidence {
            format: FORMAT.to_string(),
            report: STANDARD.encode(&body),
            signature: STANDARD.encode(sig.as_ref()),
        })
        .expect("evidence serializes")
    }
}

/// Verifies sim evidence against a set of registered public keys.
pub struct SimVerifier {
    trusted: Vec<[u8; 32]>,
    max_age_ms: u64,
}

impl SimVerifier {
    pub fn new(trusted: Vec<[u8; 32]>, max_age_ms: u64) -> Self {
        Self {
            trusted,
            max_age_ms,
        }
    }
}

fn decode_hex(field: &str, s: &str, min: usize, max: usize) -> Result<Vec<u8>, AttestError> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(AttestError::Malformed(format!(
            "{field} is not lowercase hex"
        )));
    }
    let bytes =
        hex::decode(s).map_err(|_| AttestError::Malformed(format!("{field} is not hex")))?;
    if bytes.len() < min || bytes.len() > max {
        return Err(AttestError::Malformed(format!(
            "{field} has {} bytes, expected {min}..={max}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

impl Verifier for SimVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Sim
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        if evidence.len() > MAX_EVIDENCE_LEN {
            return Err(AttestError::Malformed("evidence too large".into()));
        }
        let outer: SimEvidence = serde_json::from_slice(evidence)
            .map_err(|_| AttestError::Malformed("not sim evidence JSON".into()))?;
        if outer.format != FORMAT {
            return Err(AttestError::Malformed("unknown sim evidence format".into()));
        }
        let body = STANDARD
            .decode(&outer.report)
            .map_err(|_| AttestError::Malformed("report is not base64".into()))?;
        let sig = STANDARD
            .decode(&outer.signature)
            .map_err(|_| AttestError::Malformed("signature is not base64".into()))?;
        if sig.len() != 64 {
            return Err(AttestError::Malformed("signature is not 64 bytes".into()));
        }
        let mut msg = SIGNING_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        // RFC 8032 §5.1.7: the signature must verify under one of the registered keys.
        let signed_by_trusted = self.trusted.iter().any(|pk| {
            UnparsedPublicKey::new(&signature::ED25519, pk)
                .verify(&msg, &sig)
                .is_ok()
        });
        if !signed_by_trusted {
            return Err(if self.trusted.is_empty() {
                AttestError::UntrustedKey
            } else {
                AttestError::BadSignature
            });
        }
        let report: SimReport = serde_json::from_slice(&body)
            .map_err(|_| AttestError::Malformed("report is not valid JSON".into()))?;
        let measurement = decode_hex("measurement", &report.measurement, 1, 64)?;
        let report_data = decode_hex("report_data", &report.report_data, 64, 64)?;
        if report.instance_id.is_empty() || report.instance_id.len() > 128 {
            return Err(AttestError::Malformed(
                "instance_id must be 1..=128 bytes".into(),
            ));
        }
        // Binding (docs/protocol.md, Attest): constant-time comparison with the expected report data.
        if !bool::from(
            report_data
                .as_slice()
                .ct_eq(expected_report_data.as_slice()),
        ) {
            return Err(AttestError::BindingMismatch);
        }
        if report.debug {
            return Err(AttestError::DebugMode);
        }
        if report.issued_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(AttestError::FromFuture {
                ahead_ms: report.issued_ms - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(report.issued_ms);
        if age_ms > self.max_age_ms {
            return Err(AttestError::Stale {
                age_ms,
                max_ms: self.max_age_ms,
            });
        }
        let claims = Claims {
            tee: TeeKind::Sim,
            measurement: hex::encode(measurement),
            instance_id: report.instance_id,
            debug: false,
            evidence_time_ms: report.issued_ms,
            simulated: true,
            details: Default::default(),
        };
        Ok(AttestationVerified::new(claims, evidence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMs = 1_800_000_000_000;

    fn report(rd: &[u8; 64]) -> SimReport {
        SimReport {
            measurement: "ab".repeat(48),
            report_data: hex::encode(rd),
            instance_id: "node-1".into(),
            debug: false,
            issued_ms: NOW - 1_000,
        }
    }

    fn setup() -> (SimSigner, SimVerifier) {
        let signer = SimSigner::from_pkcs8(&SimSigner::generate_pkcs8()).unwrap();
        let verifier = SimVerifier::new(vec![signer.public_key()], DEFAULT_MAX_AGE_MS);
        (signer, verifier)
    }

    #[test]
    fn accepts_good_evidence() {
        let (signer, verifier) = setup();
        let rd = [9u8; 64];
        let ev = signer.sign(&report(&rd));
        let ok = verifier.verify(&ev, &rd, NOW).unwrap();
        assert_eq!(ok.claims().measurement, "ab".repeat(48));
        assert!(ok.claims().simulated);
    }

    #[test]
    fn rejects_each_failure_with_its_reason() {
        let (signer, verifier) = setup();
        let rd = [9u8; 64];
        let other = SimSigner::from_pkcs8(&SimSigner::generate_pkcs8()).unwrap();
        assert_eq!(
            verifier
                .verify(&other.sign(&report(&rd)), &rd, NOW)
                .unwrap_err(),
            AttestError::BadSignature
        );
        assert_eq!(
            verifier
                .verify(&signer.sign(&report(&rd)), &[8u8; 64], NOW)
                .unwrap_err(),
            AttestError::BindingMismatch
        );
        let mut dbg = report(&rd);
        dbg.debug = true;
        assert_eq!(
            verifier.verify(&signer.sign(&dbg), &rd, NOW).unwrap_err(),
            AttestError::DebugMode
        );
        let mut old = report(&rd);
        old.issued_ms = NOW - DEFAULT_MAX_AGE_MS - 1;
        assert!(matches!(
            verifier.verify(&signer.sign(&old), &rd, NOW),
            Err(AttestError::Stale { .. })
        ));
        let mut future = report(&rd);
        future.issued_ms = NOW + MAX_SKEW_MS + 1;
        assert!(matches!(
            verifier.verify(&signer.sign(&future), &rd, NOW),
            Err(AttestError::FromFuture { .. })
        ));
        let ev = signer.sign(&report(&rd));
        assert!(matches!(
            verifier.verify(&ev[..ev.len() / 2], &rd, NOW),
            Err(AttestError::Malformed(_))
        ));
        assert!(matches!(
            verifier.verify(b"\x00garbage", &rd, NOW),
            Err(AttestError::Malformed(_))
        ));
        let none = SimVerifier::new(vec![], DEFAULT_MAX_AGE_MS);
        assert_eq!(
            none.verify(&ev, &rd, NOW).unwrap_err(),
            AttestError::UntrustedKey
        );
    }

    #[test]
    fn tampered_report_fails_signature() {
        let (signer, verifier) = setup();
        let rd = [9u8; 64];
        let ev = signer.sign(&report(&rd));
        let mut outer: SimEvidence = serde_json::from_slice(&ev).unwrap();
        let mut body = STANDARD.decode(&outer.report).unwrap();
        let pos = body.iter().position(|b| *b == b'a').unwrap();
        body[pos] = b'c';
        outer.report = STANDARD.encode(&body);
        let ev = serde_json::to_vec(&outer).unwrap();
        assert_eq!(
            verifier.verify(&ev, &rd, NOW).unwrap_err(),
            AttestError::BadSignature
        );
    }
}
