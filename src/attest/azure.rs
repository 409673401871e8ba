//! Azure confidential VMs with a vTPM (`az-snp-vtpm`, `az-tdx-vtpm`): the HCL report binds the
//! vTPM attestation key (AK) to an AMD SEV-SNP report or an Intel TDX quote, and a TPM 2.0 quote
//! signed by that AK binds the vault's report data and the PCRs.
//!
//! Built on the sibling verifiers: the hardware report goes through [`SnpVerifier`] or
//! [`TdxVerifier`] unchanged (same roots, policy and claims), the quote through [`TpmVerifier`]
//! with the AK pinned to the one the hardware report authenticated. Bundle format, order of
//! checks, policy and claims: docs/attestation/azure.md. Pure: no I/O, no clock, no fetch.

mod bundle;
mod hcl;

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use bundle::{Bundle, FORMAT, MAX_BUNDLE_LEN, bundle_from_inputs};
pub use hcl::{HclReport, REPORT_TYPE_SNP, REPORT_TYPE_TDX, VarData, parse_var_json};

use super::snp::{self, SnpPolicy, SnpVerifier};
use super::tdx::{self, TdxPolicy, TdxVerifier};
use super::tpm::{self, TpmPolicy, TpmVerifier};
use super::{AttestError, AttestationVerified, Claims, TeeKind, Verifier};
use crate::time::UnixMs;

/// Policy rule: the VM's serial console is enabled and `allow_console` is false.
pub const RULE_CONSOLE: &str = "azure serial console enabled";
/// Policy rule: the VM does not report secure boot and `require_secure_boot` is true.
pub const RULE_SECURE_BOOT: &str = "azure secure boot not enabled";
/// Policy rule: the HCL's SNP report does not come from VMPL 0.
pub const RULE_VMPL: &str = "azure hcl report not from vmpl 0";

/// What the vault accepts from an Azure CVM. Defaults are strict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureVtpmPolicy {
    /// Applied to the HCL's SEV-SNP report (az-snp-vtpm), exactly as for bare SNP.
    pub snp: SnpPolicy,
    /// Applied to the TD quote (az-tdx-vtpm), exactly as for bare TDX.
    pub tdx: TdxPolicy,
    /// Accept VMs whose `vm-configuration` says `console-enabled: true`. Default false: the
    /// serial console gives whoever holds the Azure control plane an interactive path into the
    /// guest.
    pub allow_console: bool,
    /// Require `vm-configuration.secure-boot: true`. Default true.
    pub require_secure_boot: bool,
    /// PCRs (SHA-256 bank) the vTPM quote must cover. Default 0-7.
    pub required_pcrs: Vec<u8>,
}

impl Default for AzureVtpmPolicy {
    fn default() -> Self {
        Self {
            snp: SnpPolicy::default(),
            tdx: TdxPolicy::default(),
            allow_console: false,
            require_secure_boot: true,
            required_pcrs: (0..=7).collect(),
        }
    }
}

enum Hardware {
    Snp(SnpVerifier),
    Tdx(TdxVerifier),
}

/// Verifies Azure vTPM evidence bundles of one kind. `Send + Sync`; AMD/Intel roots are parsed
/// once in [`AzureVtpmVerifier::new`].
pub struct AzureVtpmVerifier {
    kind: TeeKind,
    hw: Hardware,
    allow_console: bool,
    require_secure_boot: bool,
    required_pcrs: Vec<u8>,
}

/// What the quote's `extraData` must equal.
enum Binding<'a> {
    ReportData(&'a [u8; 64]),
    Nonce(&'a [u8]),
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, b).as_ref());
    out
}

fn pinned_tpm_policy(pins: Vec<String>, required_pcrs: Vec<u8>) -> TpmPolicy {
    TpmPolicy {
        ak_roots: Some(Vec::new()),
        ak_intermediates: Some(Vec::new()),
        ak_crls: Vec::new(),
        pinned_aks: pins,
        required_pcrs,
    }
}

impl AzureVtpmVerifier {
    /// `kind` must be [`TeeKind::AzSnpVtpm`] or [`TeeKind::AzTdxVtpm`].
    pub fn new(kind: TeeKind, policy: AzureVtpmPolicy) -> Result<Self, AttestError> {
        let hw = match kind {
            TeeKind::AzSnpVtpm => Hardware::Snp(SnpVerifier::new(policy.snp)?),
            TeeKind::AzTdxVtpm => Hardware::Tdx(TdxVerifier::new(policy.tdx)?),
            other => {
                return Err(AttestError::Policy {
                    rule: "azure verifier kind",
                    detail: format!("{other} is not an Azure vTPM kind"),
                });
            }
        };
        // Validates required_pcrs once.
        TpmVerifier::new(pinned_tpm_policy(Vec::new(), policy.required_pcrs.clone()))?;
        Ok(Self {
            kind,
            hw,
            allow_console: policy.allow_console,
            require_secure_boot: policy.require_secure_boot,
            required_pcrs: policy.required_pcrs,
        })
    }

    /// Verifies a bundle whose vTPM quote carries `nonce` itself as `extraData` (compared
    /// exactly), as Trustee's samples do (ASCII `challenge`). Not the vault protocol, which binds
    /// the node key too: so this returns bare [`Claims`], never an [`AttestationVerified`].
    pub fn verify_with_nonce(
        &self,
        evidence: &[u8],
        nonce: &[u8],
        now_ms: UnixMs,
    ) -> Result<Claims, AttestError> {
        self.check(evidence, Binding::Nonce(nonce), now_ms)
    }

    fn check(
        &self,
        evidence: &[u8],
        binding: Binding<'_>,
        now_ms: UnixMs,
    ) -> Result<Claims, AttestError> {
        let b = Bundle::parse(evidence)?;
        let hcl = HclReport::parse(&b.hcl_report)?;

        // (1) The hardware report, through the bare SNP / TDX verifier.
        let (hw_claims, report_data, vmpl) = match &self.hw {
            Hardware::Snp(v) => {
                if hcl.report_type != REPORT_TYPE_SNP {
                    return Err(AttestError::Malformed("HCL report is not SEV-SNP".into()));
                }
                if b.td_quote.is_some() || b.collateral.is_some() {
                    return Err(AttestError::Malformed(
                        "az-snp-vtpm bundle carries TDX fields".into(),
                    ));
                }
                let vek = b.vcek.clone().ok_or_else(|| {
                    AttestError::Malformed("az-snp-vtpm bundle needs the VCEK".into())
                })?;
                let raw = hcl
                    .hw_report
                    .get(..snp::REPORT_LEN)
                    .ok_or_else(|| AttestError::Malformed("SNP report truncated".into()))?;
                let report = snp::Report::parse(raw)?;
                let sb = snp::Bundle {
                    report: raw.to_vec(),
                    vek,
                    chain: b.chain.clone(),
                }
                .encode();
                // AMD SEV-SNP ABI spec (56860) "ATTESTATION_REPORT Structure": signature, VCEK
                // chain to the pinned ARK, TCB, guest policy — all of SnpVerifier. Its REPORT_DATA
                // is checked below against the var JSON, so it is passed as its own expectation.
                let c = v.verify(&sb, &report.report_data, now_ms)?.into_claims();
                (c, report.report_data, Some(report.vmpl))
            }
            Hardware::Tdx(v) => {
                if hcl.report_type != REPORT_TYPE_TDX {
                    return Err(AttestError::Malformed("HCL report is not TDX".into()));
                }
                if b.vcek.is_some() || !b.chain.is_empty() {
                    return Err(AttestError::Malformed(
                        "az-tdx-vtpm bundle carries SNP certificates".into(),
                    ));
                }
                let quote = b.td_quote.as_deref().ok_or_else(|| {
                    AttestError::Malformed("az-tdx-vtpm bundle needs the TD quote".into())
                })?;
                let collateral = b.collateral.as_deref().ok_or_else(|| {
                    AttestError::Malformed(
                        "az-tdx-vtpm bundle needs DCAP collateral (TCB info, QE identity, CRLs)"
                            .into(),
                    )
                })?;
                let tb = tdx::bundle_from_inputs(quote, &[], Some(collateral))?;
                let parsed = dcap_qvl::quote::Quote::parse(quote)
                    .map_err(|_| AttestError::Malformed("TD quote does not parse".into()))?;
                let rd = parsed
                    .report
                    .as_td10()
                    .ok_or_else(|| AttestError::Malformed("quote body is not a TD report".into()))?
                    .report_data;
                // Intel TDX DCAP Quote Library API §A.3: quote signature, QE report, PCK chain to
                // the pinned Intel root, collateral and TCB appraisal — all of TdxVerifier.
                let c = v.verify(&tb, &rd, now_ms)?.into_claims();
                // The HCL's (unsigned) TDREPORT must be the one the quote was made from.
                if !bool::from(hcl.tdreport_report_data()?.ct_eq(&rd[..])) {
                    return Err(AttestError::BindingMismatch);
                }
                (c, rd, None)
            }
        };

        // (2) Azure HCL, IGVM request data hash_type 1: REPORT_DATA = SHA-256(var JSON) ‖ 0^32.
        // This is what makes the AK in the var JSON hardware-attested.
        let mut want = [0u8; 64];
        want[..32].copy_from_slice(&sha256(hcl.var_json));
        if !bool::from(report_data[..].ct_eq(&want[..])) {
            return Err(AttestError::BindingMismatch);
        }

        // (3) AK = keys[kid == "HCLAkPub"], an RSA JWK (RFC 7517 §4.5, RFC 7518 §6.3).
        let var = parse_var_json(hcl.var_json)?;

        // (4)-(6) TPM 2.0 Part 2 §10.12.8 TPMS_ATTEST (type TPM_ST_ATTEST_QUOTE 0x8018) signed
        // with RSASSA-SHA256 by that AK, extraData, and pcrDigest over the selected PCRs: all of
        // TpmVerifier, with the AK pinned because the hardware report vouched for it.
        let pin = hex::encode(sha256(&var.ak_spki));
        let tpm_verifier =
            TpmVerifier::new(pinned_tpm_policy(vec![pin], self.required_pcrs.clone()))?;
        let tpm_bundle = tpm_bundle(&var.ak_spki, &b)?;
        let tpm_claims = match binding {
            Binding::ReportData(rd) => tpm_verifier.verify(&tpm_bundle, rd, now_ms)?.into_claims(),
            Binding::Nonce(n) => tpm_verifier.verify_with_nonce(&tpm_bundle, n, now_ms)?,
        };

        // (7) 56860 "ATTESTATION_REPORT Structure" VMPL: the HCL (paravisor) runs at VMPL 0; a
        // report requested from a less privileged level could carry any var JSON.
        if vmpl.is_some_and(|v| v != 0) {
            return Err(AttestError::Policy {
                rule: RULE_VMPL,
                detail: format!("VMPL {}", vmpl.unwrap_or_default()),
            });
        }

        let cfg = |k: &str| {
            var.vm_configuration
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        if cfg("console-enabled") != Some("false") && !self.allow_console {
            return Err(AttestError::Policy {
                rule: RULE_CONSOLE,
                detail: format!("console-enabled is {:?}", cfg("console-enabled")),
            });
        }
        if self.require_secure_boot && cfg("secure-boot") != Some("true") {
            return Err(AttestError::Policy {
                rule: RULE_SECURE_BOOT,
                detail: format!("secure-boot is {:?}", cfg("secure-boot")),
            });
        }

        let mut details: BTreeMap<String, String> = hw_claims.details;
        for (k, v) in tpm_claims.details {
            let key = if k.starts_with("pcr") || k == "ak_spki_sha256" {
                k
            } else if k == "ak_trust" {
                continue;
            } else {
                format!("tpm.{k}")
            };
            details.insert(key, v);
        }
        for (k, v) in &var.vm_configuration {
            details.insert(format!("vm_configuration.{k}"), v.clone());
        }
        if let Some(u) = var.user_data {
            details.insert("user_data".into(), u);
        }
        details.insert("hcl.var_sha256".into(), hex::encode(&want[..32]));
        Ok(Claims {
            tee: self.kind,
            measurement: hw_claims.measurement,
            instance_id: hw_claims.instance_id,
            debug: false,
            // Neither report carries wall time; freshness comes from the nonce in extraData.
            evidence_time_ms: now_ms,
            simulated: false,
            details,
        })
    }
}

/// The TPM module's bundle for the quote, with the AK from the var JSON and the signature as
/// TPM 2.0 Part 2 §11.3.4 TPMT_SIGNATURE (RSASSA 0x0014, SHA-256 0x000b, TPM2B).
fn tpm_bundle(ak_spki: &[u8], b: &Bundle) -> Result<Vec<u8>, AttestError> {
    let len = u16::try_from(b.signature.len())
        .map_err(|_| AttestError::Malformed("signature too large".into()))?;
    let mut sig = vec![0x00, 0x14, 0x00, 0x0b];
    sig.extend_from_slice(&len.to_be_bytes());
    sig.extend_from_slice(&b.signature);
    serde_json::to_vec(&serde_json::json!({
        "format": tpm::FORMAT,
        "ak_public": STANDARD.encode(ak_spki),
        "quote": {"message": STANDARD.encode(&b.message), "signature": STANDARD.encode(&sig)},
        "pcrs": b.pcrs,
    }))
    .map_err(|_| AttestError::Malformed("TPM bundle does not encode".into()))
}

impl Verifier for AzureVtpmVerifier {
    fn tee(&self) -> TeeKind {
        self.kind
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        // docs/protocol.md (binding): the quote's extraData is the report data's first
        // 32 bytes (or all 64), compared in constant time by the TPM verifier.
        let claims = self.check(evidence, Binding::ReportData(expected_report_data), now_ms)?;
        Ok(AttestationVerified::new(claims, evidence))
    }
}

/// Fuzz entry point: parses a bundle and everything inside it, ignoring results. Never panics.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(b) = Bundle::parse(data)
        && let Ok(h) = HclReport::parse(&b.hcl_report)
    {
        let _ = parse_var_json(h.var_json);
        let _ = h.tdreport_report_data();
    }
    if let Ok(h) = HclReport::parse(data) {
        let _ = parse_var_json(h.var_json);
        let _ = h.tdreport_report_data();
    }
    let _ = parse_var_json(data);
    let _ = bundle_from_inputs(data, &[data.to_vec()], None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<AzureVtpmVerifier>();
    }

    #[test]
    fn policy_defaults_are_strict() {
        let p: AzureVtpmPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, AzureVtpmPolicy::default());
        assert!(!p.allow_console);
        assert!(p.require_secure_boot);
        assert_eq!(p.snp.allowed_vmpls, vec![0]);
        assert!(serde_json::from_str::<AzureVtpmPolicy>(r#"{"allow_debug":true}"#).is_err());
        assert!(AzureVtpmVerifier::new(TeeKind::AzSnpVtpm, p.clone()).is_ok());
        assert!(AzureVtpmVerifier::new(TeeKind::AzTdxVtpm, p.clone()).is_ok());
        assert!(AzureVtpmVerifier::new(TeeKind::Snp, p.clone()).is_err());
        let bad = AzureVtpmPolicy {
            required_pcrs: vec![40],
            ..p
        };
        assert!(AzureVtpmVerifier::new(TeeKind::AzSnpVtpm, bad).is_err());
    }

    #[test]
    fn garbage_is_malformed_never_panics() {
        for kind in [TeeKind::AzSnpVtpm, TeeKind::AzTdxVtpm] {
            let v = AzureVtpmVerifier::new(kind, AzureVtpmPolicy::default()).unwrap();
            assert_eq!(v.tee(), kind);
            let big = vec![b'{'; MAX_BUNDLE_LEN + 1];
            let truncated = Bundle {
                hcl_report: b"HCLA".to_vec(),
                vcek: Some(vec![0x30]),
                chain: vec![],
                td_quote: None,
                collateral: None,
                message: vec![0xff],
                signature: vec![1],
                pcrs: BTreeMap::new(),
            }
            .encode()
            .unwrap();
            for input in [
                &b""[..],
                b"garbage",
                b"{\"format\":\"weightvault-azure-vtpm-evidence/v1\"}",
                &big,
                &truncated,
                &truncated[..truncated.len() / 2],
            ] {
                assert!(
                    matches!(v.verify(input, &[0; 64], 0), Err(AttestError::Malformed(_))),
                    "{:?}",
                    v.verify(input, &[0; 64], 0)
                );
                fuzz_parse(input);
            }
        }
    }

    #[test]
    fn fuzz_parse_survives_arbitrary_bytes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 4, 31, 100, 1203, 1300, 2600, 9000] {
            let mut data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            fuzz_parse(&data);
            if data.len() >= 4 {
                data[..4].copy_from_slice(b"HCLA");
                fuzz_parse(&data);
            }
        }
    }
}
