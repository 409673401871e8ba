//! AWS Nitro Enclaves attestation documents (docs/attestation/nitro.md).
//!
//! Evidence is the raw COSE_Sign1 (RFC 9052 §4.2) the Nitro Secure Module returns: an ES384
//! signature by a per-document leaf certificate over a CBOR attestation document that carries its
//! own CA bundle. The chain must start at the pinned AWS Nitro Enclaves Root-G1 (or an operator's
//! override roots); nothing is fetched. "AWS attestation process §x" refers to AWS's "Nitro
//! Enclaves Attestation Process" (aws-nitro-enclaves-nsm-api `docs/attestation_process.md`).
//!
//! Check order (the first failure is reported; everything is checked before acceptance):
//! envelope and document syntax ([`document`]) → certificate chain at the document time and at
//! `now_ms` ([`chain`]) → COSE headers and the ES384 signature → debug PCRs → nonce/key binding →
//! freshness. The chain comes before the signature so that a document not issued under a trusted
//! root is reported as such.

mod bundle;
mod chain;
mod document;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use coset::{SignatureContext, sig_structure_data};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use self::bundle::bundle_from_inputs;
use self::chain::Root;
pub use self::document::{MAX_DOCUMENT_LEN, MAX_PAYLOAD_LEN};
use super::{
    AttestError, AttestationVerified, Claims, NODE_KEY_LEN, NONCE_LEN, REPORT_DATA_DOMAIN, TeeKind,
    Verifier,
};
use crate::time::UnixMs;

/// AWS Nitro Enclaves Root-G1 (DER of `root.pem` in AWS_NitroEnclaves_Root-G1.zip, zip SHA-256
/// 8cf60e2b…faff7c as AWS publishes it), valid 2019-10-28 → 2049-10-28.
pub const AWS_NITRO_ROOT_G1_DER: &[u8] =
    include_bytes!("roots/nitro/aws_nitro_enclaves_root_g1.der");
/// SHA-256 of [`AWS_NITRO_ROOT_G1_DER`] (vectors/attest/INDEX.md, trust anchors).
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";
/// Tolerated clock skew between the Nitro hypervisor and the vault.
pub const MAX_SKEW_MS: u64 = 60_000;
/// Default maximum age of a document.
pub const DEFAULT_MAX_AGE_MS: u64 = 5 * 60_000;
/// Upper bound on `max_age_ms`; signing certificates live about three hours.
pub const MAX_MAX_AGE_MS: u64 = 60 * 60_000;

/// What a Nitro document must satisfy beyond signature, chain and binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NitroPolicy {
    /// Maximum age of the document `timestamp` relative to the verification time (1..=1 h).
    pub max_age_ms: u64,
    /// PEM certificates that replace the pinned AWS Nitro Enclaves Root-G1. Empty: the pinned
    /// root only. `cabundle[0]` of a document must equal one of them byte for byte.
    pub roots_pem: Vec<String>,
    /// Require `nonce` and `public_key` to be exactly 32 bytes, as the weightvault protocol sends
    /// them. Only tests on third-party documents turn this off.
    pub require_protocol_field_sizes: bool,
}

impl Default for NitroPolicy {
    fn default() -> Self {
        Self {
            max_age_ms: DEFAULT_MAX_AGE_MS,
            roots_pem: Vec::new(),
            require_protocol_field_sizes: true,
        }
    }
}

/// Verifies Nitro attestation documents against roots parsed once at construction.
pub struct NitroVerifier {
    roots: Vec<Root>,
    policy: NitroPolicy,
}

impl std::fmt::Debug for NitroVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NitroVerifier")
            .field("roots", &self.roots.len())
            .field("policy", &self.policy)
            .finish()
    }
}

fn malformed(detail: impl Into<String>) -> AttestError {
    AttestError::Malformed(detail.into())
}

fn policy_error(rule: &'static str, detail: impl Into<String>) -> AttestError {
    AttestError::Policy {
        rule,
        detail: detail.into(),
    }
}

impl NitroVerifier {
    pub fn new(policy: NitroPolicy) -> Result<Self, AttestError> {
        if policy.max_age_ms == 0 || policy.max_age_ms > MAX_MAX_AGE_MS {
            return Err(policy_error(
                "nitro.max_age_ms",
                format!("must be 1..={MAX_MAX_AGE_MS}"),
            ));
        }
        let roots = if policy.roots_pem.is_empty() {
            vec![Root::from_der(AWS_NITRO_ROOT_G1_DER.to_vec())?]
        } else {
            policy
                .roots_pem
                .iter()
                .map(|pem| Root::from_pem(pem))
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self { roots, policy })
    }

    pub fn policy(&self) -> &NitroPolicy {
        &self.policy
    }
}

/// `SHA-512("weightvault/attest/v1" || nonce || public_key)` over the document's own fields:
/// what `expected_report_data` must equal for a Nitro document.
pub fn report_data_for_fields(nonce: &[u8], public_key: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(REPORT_DATA_DOMAIN);
    ctx.update(nonce);
    ctx.update(public_key);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Verifier for NitroVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Nitro
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        let env = document::parse_envelope(evidence)?;
        let doc = document::parse_document(&env.payload)?;
        let leaf_point = chain::verify_chain(&self.roots, &doc, now_ms)?;
        let protected = document::check_headers(&env)?;
        // RFC 9052 §4.4: Sig_structure = ["Signature1", protected, external_aad = h'', payload];
        // AWS attestation process §3.2.1: verified with the leaf certificate's key.
        let tbs = sig_structure_data(
            SignatureContext::CoseSign1,
            protected,
            None,
            &[],
            &env.payload,
        );
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &leaf_point)
            .verify(&tbs, &env.signature)
            .map_err(|_| AttestError::BadSignature)?;
        // AWS Nitro Enclaves User Guide, "nitro-cli run-enclave --debug-mode": a debug enclave's
        // attestation documents carry all-zero PCRs 0–2. A zero in any of them is refused.
        if (0..3).any(|i| doc.pcrs.get(&i).is_none_or(|p| p.iter().all(|b| *b == 0))) {
            return Err(AttestError::DebugMode);
        }
        // Binding (docs/protocol.md, Attest): the enclave put the vault's nonce and its node key in
        // the signed `nonce` and `public_key` fields.
        let (Some(nonce), Some(public_key)) = (&doc.nonce, &doc.public_key) else {
            return Err(AttestError::BindingMismatch);
        };
        if self.policy.require_protocol_field_sizes
            && (nonce.len() != NONCE_LEN || public_key.len() != NODE_KEY_LEN)
        {
            return Err(AttestError::BindingMismatch);
        }
        let bound = report_data_for_fields(nonce, public_key);
        if !bool::from(bound.as_slice().ct_eq(expected_report_data.as_slice())) {
            return Err(AttestError::BindingMismatch);
        }
        // Freshness: AWS attestation process §2.2, `timestamp` is the creation time in ms.
        if doc.timestamp_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(AttestError::FromFuture {
                ahead_ms: doc.timestamp_ms - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(doc.timestamp_ms);
        if age_ms > self.policy.max_age_ms {
            return Err(AttestError::Stale {
                age_ms,
                max_ms: self.policy.max_age_ms,
            });
        }
        let mut details = BTreeMap::new();
        for i in [0u8, 1, 2, 3, 4, 8] {
            if let Some(v) = doc.pcrs.get(&i) {
                details.insert(format!("pcr{i}"), hex::encode(v));
            }
        }
        details.insert("module_id".into(), doc.module_id.clone());
        details.insert("digest".into(), doc.digest.clone());
        let measurement = details.get("pcr0").cloned().unwrap_or_default();
        let claims = Claims {
            tee: TeeKind::Nitro,
            measurement,
            instance_id: doc.module_id,
            debug: false,
            evidence_time_ms: doc.timestamp_ms,
            simulated: false,
            details,
        };
        Ok(AttestationVerified::new(claims, evidence))
    }
}

/// Fuzz entry point: every parser on arbitrary bytes; results are ignored, panics are bugs.
pub fn fuzz_parse(data: &[u8]) {
    static VERIFIER: OnceLock<Option<NitroVerifier>> = OnceLock::new();
    let _ = bundle_from_inputs(data, &[], None);
    let _ = document::parse_document(data);
    if let Ok(env) = document::parse_envelope(data) {
        let _ = document::check_headers(&env);
        if let Ok(doc) = document::parse_document(&env.payload) {
            for der in doc.cabundle.iter().chain([&doc.certificate]) {
                if let Ok(cert) = chain::parse_cert(der) {
                    let _ = chain::leaf_p384_point(&cert);
                }
            }
        }
    }
    if let Some(v) = VERIFIER.get_or_init(|| NitroVerifier::new(NitroPolicy::default()).ok()) {
        // Sample N1's time, so mutated real documents get past the validity checks.
        let _ = v.verify(data, &[0u8; 64], 1_725_719_859_545);
    }
}

#[cfg(test)]
mod tests {
    use super::document::tests::{is_malformed, sample_bundle};
    use super::*;

    #[test]
    fn pinned_root_is_aws_nitro_root_g1() {
        let d = digest::digest(&digest::SHA256, AWS_NITRO_ROOT_G1_DER);
        assert_eq!(hex::encode(d.as_ref()), AWS_NITRO_ROOT_G1_SHA256);
        let cert = chain::parse_cert(AWS_NITRO_ROOT_G1_DER).unwrap();
        assert_eq!(
            cert.subject().to_string(),
            "C=US, O=Amazon, OU=AWS, CN=aws.nitro-enclaves"
        );
        let pem = include_str!("roots/nitro/aws_nitro_enclaves_root_g1.pem");
        assert_eq!(Root::from_pem(pem).unwrap().der(), AWS_NITRO_ROOT_G1_DER);
        let v = NitroVerifier::new(NitroPolicy::default()).unwrap();
        assert_eq!(v.roots.len(), 1);
        assert_eq!(v.roots[0].der(), AWS_NITRO_ROOT_G1_DER);
    }

    #[test]
    fn policy_defaults_are_strict_and_unknown_fields_rejected() {
        let p = NitroPolicy::default();
        assert_eq!(p.max_age_ms, DEFAULT_MAX_AGE_MS);
        assert!(p.require_protocol_field_sizes && p.roots_pem.is_empty());
        let parsed: NitroPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, p);
        assert!(serde_json::from_str::<NitroPolicy>(r#"{"allow_debug":true}"#).is_err());
        for max_age_ms in [0, MAX_MAX_AGE_MS + 1] {
            let p = NitroPolicy {
                max_age_ms,
                ..NitroPolicy::default()
            };
            assert!(matches!(
                NitroVerifier::new(p),
                Err(AttestError::Policy { .. })
            ));
        }
        let pem = include_str!("roots/nitro/aws_nitro_enclaves_root_g1.pem");
        for bad in [
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string(),
            format!("{pem}\n{pem}"),
            pem.replace("CERTIFICATE", "PUBLIC KEY"),
        ] {
            let p = NitroPolicy {
                roots_pem: vec![bad],
                ..NitroPolicy::default()
            };
            assert!(matches!(
                NitroVerifier::new(p),
                Err(AttestError::Policy { .. })
            ));
        }
    }

    #[test]
    fn verify_rejects_truncated_and_garbage_as_malformed() {
        let verifier = NitroVerifier::new(NitroPolicy::default()).unwrap();
        let good = sample_bundle();
        for input in [&good[..good.len() / 2], b"", b"\x84", b"\x00garbage"] {
            assert!(is_malformed(verifier.verify(input, &[0; 64], 0)));
        }
        assert!(is_malformed(verifier.verify(
            &vec![0x84; MAX_DOCUMENT_LEN + 1],
            &[0; 64],
            0
        )));
    }

    #[test]
    fn fuzz_parse_survives_edge_inputs() {
        let good = sample_bundle();
        for input in [
            &[][..],
            b"\x84",
            b"\xd2\x84\x40\xa0\x40\x40",
            &good[..],
            &good[..good.len() - 3],
        ] {
            fuzz_parse(input);
        }
    }
}
