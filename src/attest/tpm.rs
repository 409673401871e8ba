//! TPM 2.0 quotes: a `TPMS_ATTEST` made by `TPM2_Quote` (TPM 2.0 Library Part 3 §18.4), signed
//! by an attestation key (AK) that the vault trusts only through an AK certificate chaining to a
//! configured root or because the operator pinned it, never because it came with the evidence.
//! The quote binds the node's report data through `extraData` and the PCR values through
//! `pcrDigest`. Bundle format, checks, policy and claims: docs/attestation/tpm.md.

mod bundle;
mod chain;
mod wire;

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use bundle::{FORMAT, MAX_BUNDLE_LEN, bundle_from_inputs};

use super::{AttestError, AttestationVerified, Claims, TeeKind, Verifier};
use crate::time::UnixMs;

/// Verifier policy. Every field has a strict default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TpmPolicy {
    /// Trust anchors for AK certificate chains, each a PEM text (one or more certificates) or the
    /// base64 of one DER certificate. `None`: the pinned Google vTPM roots. `Some([])`: no chain
    /// is trusted, only `pinned_aks`.
    pub ak_roots: Option<Vec<String>>,
    /// Intermediates used to build paths (they confer no trust), same encodings. `None`: the
    /// pinned Google intermediates.
    pub ak_intermediates: Option<Vec<String>>,
    /// CRLs checked against every certificate of an AK path (PEM or base64 DER). A listed CRL
    /// must be current (its nextUpdate after the verification time) for paths it covers.
    pub ak_crls: Vec<String>,
    /// AKs trusted without a certificate: hex SHA-256 of the AK's DER SubjectPublicKeyInfo.
    pub pinned_aks: Vec<String>,
    /// PCRs the quote must cover (SHA-256 bank). Default 0-7, the firmware and boot loader PCRs
    /// of the TCG PC Client Platform Firmware Profile ("PCR usage").
    pub required_pcrs: Vec<u8>,
}

impl Default for TpmPolicy {
    fn default() -> Self {
        Self {
            ak_roots: None,
            ak_intermediates: None,
            ak_crls: Vec::new(),
            pinned_aks: Vec::new(),
            required_pcrs: (0..=7).collect(),
        }
    }
}

fn policy_error(detail: String) -> AttestError {
    AttestError::Policy {
        rule: "tpm policy",
        detail,
    }
}

fn certs_from_policy(field: &str, list: &[String]) -> Result<Vec<Vec<u8>>, AttestError> {
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        out.extend(
            chain::certs_from_config(s).map_err(|e| policy_error(format!("{field}[{i}]: {e}")))?,
        );
    }
    Ok(out)
}

/// Verifies TPM evidence bundles. Roots and intermediates are parsed once, in [`Self::new`].
pub struct TpmVerifier {
    store: chain::AkTrustStore,
    pinned: Vec<[u8; 32]>,
    required_pcrs: Vec<u8>,
}

/// What the quote's `extraData` must equal.
enum Binding<'a> {
    /// The vault protocol: `expected_report_data[..32]` (or all 64 bytes).
    ReportData(&'a [u8; 64]),
    /// A caller-chosen nonce, compared exactly.
    Nonce(&'a [u8]),
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    out
}

/// Hex SHA-256 of the AK `SubjectPublicKeyInfo` in a bundle: the value to put in `pinned_aks`
/// after checking out of band that the key is a restricted AK of the intended TPM.
pub fn ak_fingerprint(evidence: &[u8]) -> Result<String, AttestError> {
    Ok(hex::encode(sha256(&bundle::decode(evidence)?.ak_spki)))
}

impl TpmVerifier {
    pub fn new(policy: TpmPolicy) -> Result<Self, AttestError> {
        let roots = match &policy.ak_roots {
            Some(list) => certs_from_policy("ak_roots", list)?,
            None => chain::BUILTIN_ROOTS.iter().map(|r| r.1.to_vec()).collect(),
        };
        let intermediates = match &policy.ak_intermediates {
            Some(list) => certs_from_policy("ak_intermediates", list)?,
            None => chain::BUILTIN_INTERMEDIATES
                .iter()
                .map(|r| r.1.to_vec())
                .collect(),
        };
        let mut crls = Vec::new();
        for (i, s) in policy.ak_crls.iter().enumerate() {
            crls.extend(
                chain::crls_from_config(s)
                    .map_err(|e| policy_error(format!("ak_crls[{i}]: {e}")))?,
            );
        }
        let store = chain::AkTrustStore::new(&roots, intermediates, &crls)?;
        let mut pinned = Vec::with_capacity(policy.pinned_aks.len());
        for (i, fp) in policy.pinned_aks.iter().enumerate() {
            let mut out = [0u8; 32];
            hex::decode_to_slice(fp.trim(), &mut out).map_err(|_| {
                policy_error(format!("pinned_aks[{i}] is not 64 hex digits (SHA-256)"))
            })?;
            pinned.push(out);
        }
        let mut required_pcrs = policy.required_pcrs.clone();
        required_pcrs.sort_unstable();
        required_pcrs.dedup();
        if required_pcrs.iter().any(|i| *i > wire::MAX_PCR_INDEX) {
            return Err(policy_error("required_pcrs must be 0..=31".into()));
        }
        Ok(Self {
            store,
            pinned,
            required_pcrs,
        })
    }

    /// Verifies a bundle whose quote carries `nonce` itself as `extraData` (compared exactly),
    /// as third-party vectors do (go-tpm-tools' nonce `0x9009`). Not the vault protocol, which
    /// binds the node key too: so this returns bare [`Claims`], never an [`AttestationVerified`].
    pub fn verify_with_nonce(
        &self,
        evidence: &[u8],
        nonce: &[u8],
        now_ms: UnixMs,
    ) -> Result<Claims, AttestError> {
        if nonce.is_empty() {
            return Err(AttestError::Policy {
                rule: "tpm nonce",
                detail: "an empty nonce binds nothing".into(),
            });
        }
        self.check(evidence, Binding::Nonce(nonce), now_ms)
    }

    fn check(
        &self,
        evidence: &[u8],
        binding: Binding<'_>,
        now_ms: UnixMs,
    ) -> Result<Claims, AttestError> {
        let b = bundle::decode(evidence)?;
        let kind = wire::spki_kind(&b.ak_spki)?;
        let fingerprint = sha256(&b.ak_spki);
        if let Some(tpm_public) = &b.ak_tpm_public {
            let public = wire::parse_tpm_public(tpm_public)?;
            if public.spki != b.ak_spki {
                return Err(AttestError::Malformed(
                    "ak_tpm_public and ak_public are different keys".into(),
                ));
            }
            wire::check_ak_attributes(public.attributes)?;
        }
        let quote = wire::parse_quote(&b.message)?;
        let sig = wire::parse_signature(&b.signature)?;

        // Trust in the AK comes from the operator (a pinned key) or from a certificate chain to a
        // configured root, never from the evidence alone (the self-asserted-AK attack).
        let trust = if self.pinned.contains(&fingerprint) {
            "pinned"
        } else if !b.ak_cert_chain.is_empty() {
            self.store.verify(&b.ak_cert_chain, &b.ak_spki, now_ms)?;
            "certificate"
        } else {
            return Err(AttestError::UntrustedKey);
        };

        // TPM 2.0 Part 3 §18.4: the AK signature over the marshalled TPMS_ATTEST.
        wire::verify_signature(&b.ak_spki, kind, &sig, &b.message)?;

        // TPM 2.0 Part 2 §10.12 TPMS_ATTEST.extraData: the qualifying data the caller passed to
        // TPM2_Quote. docs/protocol.md (binding): the first 32 bytes of the report data.
        let expected: &[u8] = match binding {
            Binding::ReportData(rd) => match quote.extra_data.len() {
                32 => &rd[..32],
                64 => &rd[..],
                _ => return Err(AttestError::BindingMismatch),
            },
            Binding::Nonce(n) => n,
        };
        if quote.extra_data.is_empty() || !bool::from(quote.extra_data.as_slice().ct_eq(expected)) {
            return Err(AttestError::BindingMismatch);
        }

        // TPM 2.0 Part 2 §10.9.7 TPML_PCR_SELECTION: one bank, SHA-256.
        let [(bank, bitmap)] = quote.selections.as_slice() else {
            return Err(AttestError::Policy {
                rule: "tpm pcr selection",
                detail: "the quote must select exactly one PCR bank".into(),
            });
        };
        if *bank != wire::TPM_ALG_SHA256 {
            return Err(AttestError::Policy {
                rule: "tpm pcr selection",
                detail: format!("PCR bank {bank:#06x} is not SHA-256"),
            });
        }
        let selected = wire::selected_indices(bitmap);
        if let Some(missing) = self.required_pcrs.iter().find(|i| !selected.contains(i)) {
            return Err(AttestError::Policy {
                rule: "tpm pcr selection",
                detail: format!("the quote does not cover PCR {missing}"),
            });
        }
        if selected.is_empty() {
            return Err(AttestError::Policy {
                rule: "tpm pcr selection",
                detail: "the quote covers no PCR".into(),
            });
        }
        if !b.pcrs.keys().copied().eq(selected.iter().copied()) {
            return Err(AttestError::Malformed(
                "the supplied PCRs are not exactly those the quote selects".into(),
            ));
        }
        // TPM 2.0 Part 3 §18.4: pcrDigest = H_sign(PCR values concatenated in selection order),
        // H_sign being the signing scheme's hash, SHA-256 here. Values that do not hash to the
        // signed digest are not covered by the signature.
        let mut ctx = digest::Context::new(&digest::SHA256);
        for value in b.pcrs.values() {
            ctx.update(value);
        }
        if ctx.finish().as_ref() != quote.pcr_digest.as_slice() {
            return Err(AttestError::BadSignature);
        }

        let ak_hex = hex::encode(fingerprint);
        let mut details = BTreeMap::new();
        for (i, v) in &b.pcrs {
            details.insert(format!("pcr{i}"), hex::encode(v));
        }
        details.insert("pcr_bank".into(), "sha256".into());
        details.insert(
            "pcr_selection".into(),
            selected
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
        details.insert(
            "firmware_version".into(),
            format!("{:016x}", quote.firmware_version),
        );
        details.insert("clock".into(), quote.clock.to_string());
        details.insert("reset_count".into(), quote.reset_count.to_string());
        details.insert("restart_count".into(), quote.restart_count.to_string());
        details.insert(
            "qualified_signer".into(),
            hex::encode(&quote.qualified_signer),
        );
        details.insert("signature_scheme".into(), sig.scheme.as_str().into());
        details.insert("ak_trust".into(), trust.into());
        details.insert("ak_spki_sha256".into(), ak_hex.clone());
        Ok(Claims {
            tee: TeeKind::Tpm,
            measurement: hex::encode(&quote.pcr_digest),
            instance_id: ak_hex,
            debug: false,
            // A quote carries the TPM's clock since its last clear, not wall time; freshness
            // comes from the single-use nonce inside extraData.
            evidence_time_ms: now_ms,
            simulated: false,
            details,
        })
    }
}

impl Verifier for TpmVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Tpm
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        let claims = self.check(evidence, Binding::ReportData(expected_report_data), now_ms)?;
        Ok(AttestationVerified::new(claims, evidence))
    }
}

/// Fuzz entry point: every parser of this module on arbitrary bytes; results are ignored and
/// nothing may panic.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(b) = bundle::decode(data) {
        let _ = wire::spki_kind(&b.ak_spki);
        if let Some(t) = &b.ak_tpm_public {
            let _ = wire::parse_tpm_public(t);
        }
        let _ = wire::parse_quote(&b.message);
        let _ = wire::parse_signature(&b.signature);
        for c in &b.ak_cert_chain {
            let _ = chain::certs_from_blob(c);
        }
    }
    let _ = wire::parse_quote(data);
    let _ = wire::parse_signature(data);
    let _ = wire::parse_tpm_public(data);
    let _ = wire::spki_kind(data);
    let _ = chain::certs_from_blob(data);
    let _ = bundle_from_inputs(data, &[], None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_strict_and_round_trips() {
        let p = TpmPolicy::default();
        assert!(p.pinned_aks.is_empty());
        assert_eq!(p.required_pcrs, (0..=7).collect::<Vec<u8>>());
        let json = serde_json::to_string(&p).unwrap();
        let back: TpmPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back.required_pcrs, p.required_pcrs);
        assert!(serde_json::from_str::<TpmPolicy>("{\"allow_debug\":true}").is_err());
        let empty: TpmPolicy = serde_json::from_str("{}").unwrap();
        assert!(empty.ak_roots.is_none());
        assert!(TpmVerifier::new(p).is_ok());
    }

    #[test]
    fn bad_policies_are_refused() {
        let bad_pin = TpmPolicy {
            pinned_aks: vec!["abcd".into()],
            ..TpmPolicy::default()
        };
        assert!(matches!(
            TpmVerifier::new(bad_pin),
            Err(AttestError::Policy { .. })
        ));
        let bad_root = TpmPolicy {
            ak_roots: Some(vec!["not a certificate".into()]),
            ..TpmPolicy::default()
        };
        assert!(matches!(
            TpmVerifier::new(bad_root),
            Err(AttestError::Policy { .. })
        ));
        let bad_pcr = TpmPolicy {
            required_pcrs: vec![32],
            ..TpmPolicy::default()
        };
        assert!(TpmVerifier::new(bad_pcr).is_err());
    }

    #[test]
    fn garbage_truncated_and_oversized_evidence_is_malformed() {
        let v = TpmVerifier::new(TpmPolicy::default()).unwrap();
        let rd = [0u8; 64];
        for input in [
            &b""[..],
            b"\x00garbage",
            b"{\"format\":\"weightvault-tpm-evidence/v1\"",
            b"[1,2,3]",
            &vec![b'{'; MAX_BUNDLE_LEN + 1][..],
        ] {
            assert!(matches!(
                v.verify(input, &rd, 0),
                Err(AttestError::Malformed(_))
            ));
        }
        assert!(matches!(
            v.verify_with_nonce(b"{}", &[], 0),
            Err(AttestError::Policy { .. })
        ));
    }

    #[test]
    fn fuzz_parse_survives_arbitrary_bytes() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..300usize {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            fuzz_parse(&data);
            let mut quote = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x18];
            quote.extend_from_slice(&data);
            fuzz_parse(&quote);
        }
    }

    #[test]
    fn verifier_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TpmVerifier>();
    }
}
