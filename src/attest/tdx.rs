//! Intel TDX: DCAP quotes v4 (TDX 1.0) and v5 (TDX 1.5) verified offline with operator-supplied
//! collateral (TCB info, QE identity, CRLs) by dcap-qvl, against the Intel SGX Root CA pinned
//! here, at the injected verification time. On top of dcap-qvl this module: rejects any TD under
//! debug before anything else, requires the canonical quote layout, checks the whole QE report
//! data, binds the TD report data to the vault's nonce and node key, and appraises the TCB status
//! and advisories against an allow-list. Bundle format and policy: docs/attestation/tdx.md.

mod bundle;
mod dcap_error;

use std::collections::{BTreeMap, BTreeSet};

use aws_lc_rs::digest;
use dcap_qvl::configs::RustCryptoConfig;
use dcap_qvl::quote::AuthData;
use dcap_qvl::verify::QuoteVerifier;
use dcap_qvl::{Policy, QuoteClaims, TcbStatus};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use bundle::{FORMAT, MAX_BUNDLE_LEN, MAX_QUOTE_LEN, bundle_from_inputs};
pub use dcap_error::{RULE_TCB_LEVEL, RULE_TD_ATTRIBUTES};

use super::{AttestError, AttestationVerified, Claims, TeeKind, Verifier};
use crate::time::UnixMs;

/// Intel SGX Root CA (DER), the anchor of PCK, TCB-signing and CRL chains for SGX and TDX.
pub const INTEL_SGX_ROOT_CA_DER: &[u8] = include_bytes!("roots/tdx/intel_sgx_root_ca.der");
/// SHA-256 of [`INTEL_SGX_ROOT_CA_DER`] (vectors/attest/INDEX.md, trust anchors).
pub const INTEL_SGX_ROOT_CA_SHA256: &str =
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3";

pub const RULE_TCB_STATUS: &str = "tdx tcb status not accepted";
pub const RULE_ADVISORY: &str = "tdx advisory not accepted";
pub const RULE_EVAL_NUMBER: &str = "tdx tcb evaluation data too old";
pub const RULE_CONFIG: &str = "tdx policy configuration";

/// What the vault accepts from TDX evidence. Debug TDs are never accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TdxPolicy {
    /// Converged TCB statuses (Intel names: `UpToDate`, `SWHardeningNeeded`,
    /// `ConfigurationNeeded`, `ConfigurationAndSWHardeningNeeded`, `OutOfDate`,
    /// `OutOfDateConfigurationNeeded`, `TDRelaunchAdvised`,
    /// `TDRelaunchAdvisedConfigurationNeeded`). `Revoked` can never be accepted.
    pub accepted_statuses: Vec<String>,
    /// Intel advisory ids (`INTEL-SA-NNNNN`) tolerated; evidence with any other advisory is
    /// rejected, whatever its status.
    pub accepted_advisories: Vec<String>,
    /// Minimum `tcbEvaluationDataNumber` of the collateral (lower of TCB info and QE identity);
    /// 0 accepts any.
    pub min_tcb_eval_data_number: u32,
    /// PEM roots replacing the pinned Intel SGX Root CA; empty means the pinned root.
    pub roots_pem: Vec<String>,
}

impl Default for TdxPolicy {
    fn default() -> Self {
        Self {
            accepted_statuses: vec!["UpToDate".to_string()],
            accepted_advisories: Vec::new(),
            min_tcb_eval_data_number: 0,
            roots_pem: Vec::new(),
        }
    }
}

/// One trust anchor, parsed once.
struct Root {
    dcap: QuoteVerifier<RustCryptoConfig>,
    not_before_s: i64,
    not_after_s: i64,
}

/// Verifies TDX evidence bundles. `Send + Sync`; roots are parsed once in [`TdxVerifier::new`].
pub struct TdxVerifier {
    roots: Vec<Root>,
    statuses: Vec<TcbStatus>,
    advisories: BTreeSet<String>,
    min_tcb_eval_data_number: u32,
}

fn config_err(detail: String) -> AttestError {
    AttestError::Policy {
        rule: RULE_CONFIG,
        detail,
    }
}

fn parse_root(der: &[u8]) -> Result<Root, AttestError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|_| config_err("root is not an X.509 certificate".into()))?;
    if !rest.is_empty() {
        return Err(config_err("trailing bytes after root certificate".into()));
    }
    // RFC 5280 §6.1: a trust anchor here is a self-signed CA certificate.
    if !cert.is_ca() || cert.subject() != cert.issuer() || cert.verify_signature(None).is_err() {
        return Err(config_err(
            "root is not a self-signed CA certificate".into(),
        ));
    }
    Ok(Root {
        dcap: QuoteVerifier::<RustCryptoConfig>::new_with_config(der.to_vec()),
        not_before_s: cert.validity().not_before.timestamp(),
        not_after_s: cert.validity().not_after.timestamp(),
    })
}

fn parse_status(name: &str) -> Result<TcbStatus, AttestError> {
    serde_json::from_value::<TcbStatus>(serde_json::Value::String(name.to_string()))
        .map_err(|_| config_err(format!("unknown TCB status {name:?}")))
}

/// dcap-qvl policy hook: appraisal happens in this module, with typed errors.
struct AppraiseHere;

impl Policy for AppraiseHere {
    fn validate(&self, _: &QuoteClaims) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TdxVerifier {
    pub fn new(policy: TdxPolicy) -> Result<Self, AttestError> {
        let roots = if policy.roots_pem.is_empty() {
            vec![parse_root(INTEL_SGX_ROOT_CA_DER)?]
        } else {
            let mut roots = Vec::new();
            for pem_text in &policy.roots_pem {
                let (rest, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
                    .map_err(|_| config_err("root is not PEM".into()))?;
                if !rest.trim_ascii().is_empty() {
                    return Err(config_err("one certificate per roots_pem entry".into()));
                }
                if pem.label != "CERTIFICATE" {
                    return Err(config_err("root PEM is not a CERTIFICATE".into()));
                }
                roots.push(parse_root(&pem.contents)?);
            }
            roots
        };
        let statuses = policy
            .accepted_statuses
            .iter()
            .map(|s| parse_status(s))
            .collect::<Result<Vec<_>, _>>()?;
        if statuses.contains(&TcbStatus::Revoked) {
            return Err(config_err("Revoked can never be accepted".into()));
        }
        Ok(Self {
            roots,
            statuses,
            advisories: policy.accepted_advisories.into_iter().collect(),
            min_tcb_eval_data_number: policy.min_tcb_eval_data_number,
        })
    }

    /// The TCB appraisal step alone (status, advisories, collateral generation), for reuse
    /// on verdicts produced elsewhere (e.g. an SGX quote in tests).
    pub fn appraise_tcb(
        &self,
        status: TcbStatus,
        advisories: &[String],
        eval_data_number: u32,
    ) -> Result<(), AttestError> {
        // Intel PCS API v4, TCB Info V3 `tcbLevels[].tcbStatus` converged with the QE identity
        // and TDX module levels (dcap-qvl, like Intel QVL): only listed statuses pass.
        if !self.statuses.contains(&status) {
            return Err(AttestError::Policy {
                rule: RULE_TCB_STATUS,
                detail: status.to_string(),
            });
        }
        // Same structure, `advisoryIDs`: every advisory must be explicitly tolerated.
        if let Some(id) = advisories.iter().find(|id| !self.advisories.contains(*id)) {
            return Err(AttestError::Policy {
                rule: RULE_ADVISORY,
                detail: id.chars().take(64).collect(),
            });
        }
        // `tcbEvaluationDataNumber`: refuse collateral older than the configured TCB recovery.
        if eval_data_number < self.min_tcb_eval_data_number {
            return Err(AttestError::Policy {
                rule: RULE_EVAL_NUMBER,
                detail: format!("{eval_data_number} < {}", self.min_tcb_eval_data_number),
            });
        }
        Ok(())
    }

    /// Full DCAP verification under each configured root valid at `now`; the first success wins.
    /// If all fail, an error past the chain stage (the chain validated under that root) is the
    /// more precise reason.
    fn dcap_verify(
        &self,
        quote: &[u8],
        collateral: &dcap_qvl::QuoteCollateralV3,
        now_ms: UnixMs,
    ) -> Result<QuoteClaims, AttestError> {
        let now_s = now_ms / 1000;
        let now_i = i64::try_from(now_s).unwrap_or(i64::MAX);
        let mut errors = Vec::new();
        for root in &self.roots {
            // RFC 5280 §4.1.2.5: the anchor itself must be valid at the verification time.
            if now_i < root.not_before_s || now_i > root.not_after_s {
                errors.push(AttestError::Expired("trust anchor not valid now".into()));
                continue;
            }
            // Intel TDX DCAP Quoting Library API, §A.3 / Intel QVL flow (dcap-qvl `verify_impl`):
            // TCB info and QE identity signatures and validity windows, CRLs, the PCK chain to
            // this root, the QE report signature by the PCK key, SHA-256(attestation key ‖ QE
            // auth data) in the QE report, the QE identity, the quote signature by the
            // attestation key, the platform, TDX module and QE TCB levels, and TD attributes.
            match root
                .dcap
                .verify_with_policy(quote, collateral, now_s, &AppraiseHere)
            {
                Ok(claims) => return Ok(claims),
                Err(e) => errors.push(dcap_error::map(&e)),
            }
        }
        let pos = errors
            .iter()
            .position(|e| !matches!(e, AttestError::Chain(_)))
            .unwrap_or(0);
        Err(errors
            .into_iter()
            .nth(pos)
            .unwrap_or_else(|| AttestError::Chain("no trust anchor".into())))
    }
}

/// QE report data = SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes.
fn check_qe_report_data(quote: &dcap_qvl::quote::Quote) -> Result<(), AttestError> {
    let AuthData::V4(auth) = &quote.auth_data else {
        return Err(AttestError::Malformed(
            "quote signature data is not v4".into(),
        ));
    };
    // Intel TDX DCAP Quoting Library API, §A.3 QE Report Certification Data: the QE report's
    // REPORTDATA is the hash above followed by 32 bytes of 0x00 (report_data at offset 320).
    let report_data = quote
        .qe_report()
        .get(320..384)
        .ok_or_else(|| AttestError::Malformed("QE report too short".into()))?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&auth.ecdsa_attestation_key);
    ctx.update(&auth.qe_report_data.qe_auth_data.data);
    let mut expected = [0u8; 64];
    expected[..32].copy_from_slice(ctx.finish().as_ref());
    if !bool::from(report_data.ct_eq(&expected[..])) {
        return Err(AttestError::UntrustedKey);
    }
    Ok(())
}

impl Verifier for TdxVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Tdx
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        let parsed = bundle::parse_bundle(evidence)?;
        // Intel TDX Module ABI spec (348551) TDREPORT_STRUCT.TDINFO.ATTRIBUTES, TUD group
        // (bits 7:0, bit 0 = DEBUG): any bit set means the host can read and alter the TD. No
        // policy accepts it, so it is refused first, before (and whatever) the signatures say.
        if parsed.td_report()?.td_attributes[0] != 0 {
            return Err(AttestError::DebugMode);
        }
        let collateral = parsed.collateral.as_ref().ok_or_else(|| {
            AttestError::Malformed("bundle has no collateral (TCB info, QE identity, CRLs)".into())
        })?;
        let claims = self.dcap_verify(&parsed.quote_bytes, collateral, now_ms)?;
        check_qe_report_data(&parsed.quote)?;
        let td = claims
            .report
            .as_td10()
            .ok_or_else(|| AttestError::Malformed("quote body is not a TD report".into()))?;
        // docs/protocol.md (binding): REPORTDATA (64 bytes) = SHA-512(domain ‖ nonce ‖ key).
        if !bool::from(td.report_data[..].ct_eq(&expected_report_data[..])) {
            return Err(AttestError::BindingMismatch);
        }
        self.appraise_tcb(
            claims.tcb.status,
            &claims.tcb.advisory_ids,
            claims.tcb.eval_data_number,
        )?;
        let claims = to_claims(&claims, now_ms)?;
        Ok(AttestationVerified::new(claims, evidence))
    }
}

fn to_claims(q: &QuoteClaims, now_ms: UnixMs) -> Result<Claims, AttestError> {
    let td = q
        .report
        .as_td10()
        .ok_or_else(|| AttestError::Malformed("quote body is not a TD report".into()))?;
    let mut d = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), v);
    };
    put("rtmr0", hex::encode(td.rt_mr0));
    put("rtmr1", hex::encode(td.rt_mr1));
    put("rtmr2", hex::encode(td.rt_mr2));
    put("rtmr3", hex::encode(td.rt_mr3));
    put("mr_config_id", hex::encode(td.mr_config_id));
    put("mr_owner", hex::encode(td.mr_owner));
    put("mr_owner_config", hex::encode(td.mr_owner_config));
    put("mr_seam", hex::encode(td.mr_seam));
    put("td_attributes", hex::encode(td.td_attributes));
    put("xfam", hex::encode(td.xfam));
    put("tee_tcb_svn", hex::encode(td.tee_tcb_svn));
    if let Some(td15) = q.report.as_td15() {
        put("tee_tcb_svn2", hex::encode(td15.tee_tcb_svn2));
    }
    put("tcb_status", q.tcb.status.to_string());
    put("advisories", q.tcb.advisory_ids.join(","));
    put("tcb_eval_data_number", q.tcb.eval_data_number.to_string());
    put("fmspc", hex::encode(q.platform.pck.fmspc));
    put("quote_version", q.header.version.to_string());
    put(
        "collateral_expiry_ms",
        q.earliest_expiration_date.saturating_mul(1000).to_string(),
    );
    let instance_id = if q.platform.pck.ppid.is_empty() {
        hex::encode(q.platform.pck.fmspc)
    } else {
        hex::encode(&q.platform.pck.ppid)
    };
    Ok(Claims {
        tee: TeeKind::Tdx,
        measurement: hex::encode(td.mr_td),
        instance_id,
        debug: false,
        // A DCAP quote carries no time; freshness comes from the nonce in REPORTDATA.
        evidence_time_ms: now_ms,
        simulated: false,
        details: d,
    })
}

/// Fuzz entry point: parses a bundle and its inner structures, ignores the results.
pub fn fuzz_parse(data: &[u8]) {
    bundle::fuzz(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_root_fingerprint() {
        let fp = digest::digest(&digest::SHA256, INTEL_SGX_ROOT_CA_DER);
        assert_eq!(hex::encode(fp.as_ref()), INTEL_SGX_ROOT_CA_SHA256);
        assert!(TdxVerifier::new(TdxPolicy::default()).is_ok());
    }

    #[test]
    fn verifier_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TdxVerifier>();
    }

    fn intel_pem() -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(INTEL_SGX_ROOT_CA_DER);
        format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
    }

    #[test]
    fn policy_defaults_are_strict_and_config_is_checked() {
        let p = TdxPolicy::default();
        assert_eq!(p.accepted_statuses, ["UpToDate"]);
        assert!(p.accepted_advisories.is_empty());
        let one = TdxPolicy {
            roots_pem: vec![intel_pem()],
            ..TdxPolicy::default()
        };
        assert!(TdxVerifier::new(one).is_ok());
        let parsed: TdxPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, p);
        assert!(serde_json::from_str::<TdxPolicy>(r#"{"allow_debug":true}"#).is_err());
        for bad in [
            TdxPolicy {
                accepted_statuses: vec!["Revoked".into()],
                ..TdxPolicy::default()
            },
            TdxPolicy {
                accepted_statuses: vec!["Fine".into()],
                ..TdxPolicy::default()
            },
            TdxPolicy {
                roots_pem: vec!["not pem".into()],
                ..TdxPolicy::default()
            },
            TdxPolicy {
                roots_pem: vec![format!("{}{}", intel_pem(), intel_pem())],
                ..TdxPolicy::default()
            },
        ] {
            assert!(matches!(
                TdxVerifier::new(bad),
                Err(AttestError::Policy {
                    rule: RULE_CONFIG,
                    ..
                })
            ));
        }
    }

    #[test]
    fn tcb_appraisal() {
        let v = TdxVerifier::new(TdxPolicy::default()).unwrap();
        assert!(v.appraise_tcb(TcbStatus::UpToDate, &[], 17).is_ok());
        assert!(matches!(
            v.appraise_tcb(TcbStatus::SWHardeningNeeded, &[], 17),
            Err(AttestError::Policy {
                rule: RULE_TCB_STATUS,
                ..
            })
        ));
        assert!(matches!(
            v.appraise_tcb(TcbStatus::UpToDate, &["INTEL-SA-00001".into()], 17),
            Err(AttestError::Policy {
                rule: RULE_ADVISORY,
                ..
            })
        ));
        let strict = TdxVerifier::new(TdxPolicy {
            min_tcb_eval_data_number: 18,
            ..TdxPolicy::default()
        })
        .unwrap();
        assert!(matches!(
            strict.appraise_tcb(TcbStatus::UpToDate, &[], 17),
            Err(AttestError::Policy {
                rule: RULE_EVAL_NUMBER,
                ..
            })
        ));
    }

    #[test]
    fn garbage_evidence_is_malformed() {
        let v = TdxVerifier::new(TdxPolicy::default()).unwrap();
        for ev in [&b""[..], b"\x00garbage", b"{}", &[b'{'; 4096]] {
            assert!(matches!(
                v.verify(ev, &[0; 64], 0),
                Err(AttestError::Malformed(_))
            ));
        }
    }
}
