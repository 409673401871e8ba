//! AMD SEV-SNP: verifies an attestation report signed by a VCEK or VLEK that chains to a pinned
//! AMD root (ARK-Milan, ARK-Genoa, ARK-Turin), and turns it into claims.
//!
//! Evidence is the JSON bundle of [`bundle`] (report + endorsement key certificate + optional
//! chain); docs/attestation/snp.md describes it, the order of checks, the policy and the claims.
//! Pure: no I/O, no clock, no fetch from AMD's KDS; the operator supplies certificates.

mod bundle;
mod certs;
mod policy;
mod report;

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use bundle::{Bundle, FORMAT, MAX_BUNDLE_LEN, bundle_from_inputs};
pub use certs::{CertTcb, EndorsementKey};
pub use policy::{SnpPolicy, SnpRootOverride, SnpTcbFloor, SnpTcbFloors};
pub use report::{REPORT_LEN, Report, SIGNED_LEN, SigningKey, Tcb};

use super::{AttestError, AttestationVerified, Claims, TeeKind, Verifier};
use crate::time::UnixMs;
use certs::TrustStore;

/// The AMD EPYC generations whose roots are pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnpProduct {
    Milan,
    Genoa,
    Turin,
}

impl SnpProduct {
    pub const ALL: [SnpProduct; 3] = [SnpProduct::Milan, SnpProduct::Genoa, SnpProduct::Turin];

    /// Lowercase name used in claims and config.
    pub fn as_str(self) -> &'static str {
        match self {
            SnpProduct::Milan => "milan",
            SnpProduct::Genoa => "genoa",
            SnpProduct::Turin => "turin",
        }
    }

    /// The name AMD uses in certificate subjects (`ARK-Milan`, `SEV-Milan`).
    pub fn amd_name(self) -> &'static str {
        match self {
            SnpProduct::Milan => "Milan",
            SnpProduct::Genoa => "Genoa",
            SnpProduct::Turin => "Turin",
        }
    }

    /// Length of the VCEK hwID extension: Turin certifies only CHIP_ID[0..8] (57230, "VCEK
    /// Certificate Extensions").
    pub fn hwid_len(self) -> usize {
        match self {
            SnpProduct::Turin => 8,
            SnpProduct::Milan | SnpProduct::Genoa => 64,
        }
    }
}

impl std::fmt::Display for SnpProduct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// AMD's published ASK, ARK and ASVK per product (KDS `cert_chain` plus the ASVK), pinned.
pub const PINNED_ROOTS: [(SnpProduct, &[u8]); 3] = [
    (
        SnpProduct::Milan,
        include_bytes!("roots/snp/milan_ask_ark_asvk.pem"),
    ),
    (
        SnpProduct::Genoa,
        include_bytes!("roots/snp/genoa_ask_ark_asvk.pem"),
    ),
    (
        SnpProduct::Turin,
        include_bytes!("roots/snp/turin_ask_ark_asvk.pem"),
    ),
];

/// Verifies SEV-SNP evidence bundles.
#[derive(Debug)]
pub struct SnpVerifier {
    policy: SnpPolicy,
    store: TrustStore,
}

fn now_seconds(now_ms: UnixMs) -> i64 {
    i64::try_from(now_ms / 1000).unwrap_or(i64::MAX)
}

impl SnpVerifier {
    /// Parses and verifies the pinned (or overriding) roots once.
    pub fn new(policy: SnpPolicy) -> Result<Self, AttestError> {
        policy.validate()?;
        let sets: Vec<(SnpProduct, Vec<u8>)> = if policy.roots.is_empty() {
            PINNED_ROOTS
                .iter()
                .map(|(p, pem)| (*p, pem.to_vec()))
                .collect()
        } else {
            policy
                .roots
                .iter()
                .map(|r| (r.product, r.pem.as_bytes().to_vec()))
                .collect()
        };
        let store = TrustStore::new(&sets)?;
        Ok(Self { policy, store })
    }

    pub fn policy(&self) -> &SnpPolicy {
        &self.policy
    }

    /// SHA-256 fingerprints of the trusted ARKs.
    pub fn root_fingerprints(&self) -> Vec<(SnpProduct, [u8; 32])> {
        self.store.anchor_fingerprints()
    }

    /// Verifies a VCEK/VLEK certificate on its own (chain, validity at `now_ms`, key, TCB and
    /// hwID extensions) — for operators checking a certificate fetched from AMD's KDS.
    pub fn verify_endorsement_key(
        &self,
        vek_der: &[u8],
        chain: &[Vec<u8>],
        now_ms: UnixMs,
    ) -> Result<EndorsementKey, AttestError> {
        self.store.verify_leaf(vek_der, chain, now_seconds(now_ms))
    }
}

fn policy_err(rule: &'static str, detail: String) -> AttestError {
    AttestError::Policy { rule, detail }
}

impl Verifier for SnpVerifier {
    fn tee(&self) -> TeeKind {
        TeeKind::Snp
    }

    fn verify(
        &self,
        evidence: &[u8],
        expected_report_data: &[u8; 64],
        now_ms: UnixMs,
    ) -> Result<AttestationVerified, AttestError> {
        let bundle = Bundle::parse(evidence)?;
        let report = Report::parse(&bundle.report)?;
        let signer = report.signing_key()?;

        // 57230 "Certificate Chain": VCEK ← ASK ← ARK (VLEK ← ASVK ← ARK), all valid now.
        let key = self.verify_endorsement_key(&bundle.vek, &bundle.chain, now_ms)?;
        // 56860 "ATTESTATION_REPORT Structure", SIGNING_KEY: the key type the firmware used must
        // be the one whose certificate was supplied.
        if key.kind != signer {
            return Err(AttestError::UntrustedKey);
        }
        if signer == SigningKey::Vlek && !self.policy.allow_vlek {
            return Err(policy_err("vlek not allowed", "allow_vlek is false".into()));
        }

        // 56860 "ATTESTATION_REPORT Structure" SIGNATURE over bytes 0h..29Fh, and "ECDSA P-384
        // with SHA-384 Signature Format".
        let sig = report.signature_fixed()?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &key.point)
            .verify(&bundle.report[..SIGNED_LEN], &sig)
            .map_err(|_| AttestError::BadSignature)?;

        // From here on the report is authentic. 57230 "VCEK Certificate Extensions": the key was
        // derived for exactly the reported TCB (and, for a VCEK, this chip).
        let tcb = Tcb::decode(report.reported_tcb, key.product)?;
        let cert_tcb = CertTcb {
            bootloader: tcb.bootloader,
            tee: tcb.tee,
            snp: tcb.snp,
            microcode: tcb.microcode,
            fmc: tcb.fmc,
        };
        if cert_tcb != key.tcb {
            return Err(AttestError::Chain(format!(
                "certificate TCB {:?} differs from REPORTED_TCB {:?}",
                key.tcb, cert_tcb
            )));
        }
        if let Some(hwid) = &key.hwid
            && report.chip_id.get(..hwid.len()) != Some(hwid.as_slice())
        {
            return Err(AttestError::Chain(
                "VCEK hwID differs from the report's CHIP_ID".into(),
            ));
        }
        // CPUID fields (version 3+) name the generation; it must be the one the key chains to.
        match report.cpuid_product() {
            Some(Ok(p)) if p != key.product => {
                return Err(AttestError::Chain(format!(
                    "report CPUID is {p} but the key chains to ARK-{}",
                    key.product.amd_name()
                )));
            }
            Some(Err((family, model))) => {
                return Err(AttestError::Malformed(format!(
                    "unknown CPUID family {family:#x} model {model:#x}"
                )));
            }
            _ => {}
        }

        // docs/protocol.md (binding): REPORT_DATA carries
        // SHA-512(domain || nonce || node key); compared in constant time.
        if !bool::from(report.report_data.ct_eq(expected_report_data)) {
            return Err(AttestError::BindingMismatch);
        }
        // 56860 "GUEST_POLICY Structure" bit 19 DEBUG: the hypervisor can read and alter guest
        // memory. Never accepted.
        if report.policy & report::POLICY_DEBUG != 0 {
            return Err(AttestError::DebugMode);
        }
        // 56860 "GUEST_POLICY Structure" bit 18 MIGRATE_MA.
        if report.policy & report::POLICY_MIGRATE_MA != 0 && !self.policy.allow_migration_agent {
            return Err(policy_err(
                "migration agent allowed by guest policy",
                format!("guest policy {:#x}", report.policy),
            ));
        }
        if !self.policy.allowed_vmpls.contains(&report.vmpl) {
            return Err(policy_err(
                "vmpl not allowed",
                format!("report VMPL {}", report.vmpl),
            ));
        }
        if report.version < self.policy.min_report_version {
            return Err(policy_err(
                "report version too old",
                format!(
                    "version {} < {}",
                    report.version, self.policy.min_report_version
                ),
            ));
        }
        if report.chip_id.iter().all(|b| *b == 0) && !self.policy.allow_masked_chip_id {
            return Err(policy_err("chip id masked", "CHIP_ID is zero".into()));
        }
        self.policy.check_tcb(key.product, &tcb)?;

        let claims = claims(&report, &tcb, &key, now_ms);
        Ok(AttestationVerified::new(claims, evidence))
    }
}

fn claims(report: &Report, tcb: &Tcb, key: &EndorsementKey, now_ms: UnixMs) -> Claims {
    let mut d = std::collections::BTreeMap::new();
    let (major, minor, build) = report.current_version;
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), v);
    };
    put("vmpl", report.vmpl.to_string());
    put("policy", format!("{:016x}", report.policy));
    put("report_version", report.version.to_string());
    put("guest_svn", report.guest_svn.to_string());
    put("platform_info", format!("{:016x}", report.platform_info));
    put("firmware_version", format!("{major}.{minor}.{build}"));
    put("tcb.bootloader", tcb.bootloader.to_string());
    put("tcb.tee", tcb.tee.to_string());
    put("tcb.snp", tcb.snp.to_string());
    put("tcb.microcode", tcb.microcode.to_string());
    if let Some(fmc) = tcb.fmc {
        put("tcb.fmc", fmc.to_string());
    }
    put("host_data", hex::encode(report.host_data));
    put("id_key_digest", hex::encode(report.id_key_digest));
    put("author_key_digest", hex::encode(report.author_key_digest));
    put("family_id", hex::encode(report.family_id));
    put("image_id", hex::encode(report.image_id));
    put("product", key.product.as_str().to_string());
    put("signer", key.kind.as_str().to_string());
    Claims {
        tee: TeeKind::Snp,
        measurement: hex::encode(report.measurement),
        instance_id: hex::encode(report.chip_id),
        debug: false,
        // The report carries no time; freshness comes from the nonce in REPORT_DATA.
        evidence_time_ms: now_ms,
        simulated: false,
        details: d,
    }
}

/// Fuzz entry point: parses a bundle and everything inside it, ignoring results. Never panics.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(b) = Bundle::parse(data) {
        if let Ok(r) = Report::parse(&b.report) {
            let _ = r.signing_key();
            let _ = r.signature_fixed();
            let _ = r.cpuid_product();
            for p in SnpProduct::ALL {
                let _ = Tcb::decode(r.reported_tcb, p);
            }
        }
        for der in std::iter::once(&b.vek).chain(b.chain.iter()) {
            let _ = certs::parse_cert(der);
        }
    }
    let _ = Report::parse(data);
    let _ = bundle_from_inputs(data, &[data.to_vec()], None);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// INDEX.md "Trust anchors": SHA-256 of the ARK DER (full values computed from the PEMs;
    /// INDEX.md lists their first and last bytes).
    #[test]
    fn pinned_root_fingerprints() {
        let v = SnpVerifier::new(SnpPolicy::default()).unwrap();
        let got: Vec<(SnpProduct, String)> = v
            .root_fingerprints()
            .into_iter()
            .map(|(p, f)| (p, hex::encode(f)))
            .collect();
        let want = [
            (
                SnpProduct::Milan,
                "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
            ),
            (
                SnpProduct::Genoa,
                "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
            ),
            (
                SnpProduct::Turin,
                "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
            ),
        ];
        assert_eq!(got.len(), 3);
        for ((gp, gf), (wp, wf)) in got.iter().zip(want) {
            assert_eq!((*gp, gf.as_str()), (wp, wf));
        }
        // INDEX.md's abbreviated forms.
        assert!(got[0].1.starts_with("69d063b4") && got[0].1.ends_with("0bcd"));
        assert!(got[1].1.starts_with("4c6598d1") && got[1].1.ends_with("3db2f1"));
        assert!(got[2].1.starts_with("1f084161") && got[2].1.ends_with("dd3f6a"));
    }

    #[test]
    fn verifier_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<SnpVerifier>();
    }

    #[test]
    fn bad_policies_and_roots_are_refused() {
        let mut p = SnpPolicy {
            allowed_vmpls: vec![4],
            ..SnpPolicy::default()
        };
        assert!(SnpVerifier::new(p.clone()).is_err());
        p.allowed_vmpls = vec![0];
        p.min_report_version = 1;
        assert!(SnpVerifier::new(p.clone()).is_err());
        p.min_report_version = 2;
        p.roots = vec![SnpRootOverride {
            product: SnpProduct::Milan,
            pem: "not a pem".into(),
        }];
        assert!(SnpVerifier::new(p.clone()).is_err());
        // A Genoa PEM offered as Milan: the ARK's name does not fit.
        p.roots = vec![SnpRootOverride {
            product: SnpProduct::Milan,
            pem: String::from_utf8(PINNED_ROOTS[1].1.to_vec()).unwrap(),
        }];
        assert!(matches!(SnpVerifier::new(p), Err(AttestError::Chain(_))));
    }

    #[test]
    fn policy_json_rejects_unknown_fields() {
        let p: SnpPolicy = serde_json::from_str(r#"{"min_report_version":3}"#).unwrap();
        assert_eq!(p.min_report_version, 3);
        assert_eq!(p.allowed_vmpls, vec![0]);
        assert!(serde_json::from_str::<SnpPolicy>(r#"{"allow_debug":true}"#).is_err());
    }

    #[test]
    fn garbage_is_malformed_never_panics() {
        let v = SnpVerifier::new(SnpPolicy::default()).unwrap();
        let big = vec![b'{'; MAX_BUNDLE_LEN + 10];
        let truncated = Bundle {
            report: vec![0u8; REPORT_LEN],
            vek: vec![0x30, 0x82],
            chain: vec![],
        }
        .encode();
        for input in [
            &b""[..],
            b"garbage",
            b"{\"format\":\"weightvault-snp-evidence/v1\"}",
            &big,
            &truncated[..truncated.len() / 2],
            &truncated,
        ] {
            assert!(
                matches!(
                    v.verify(input, &[0; 64], 1_700_000_000_000),
                    Err(AttestError::Malformed(_))
                ),
                "{:?}",
                v.verify(input, &[0; 64], 1_700_000_000_000)
            );
            fuzz_parse(input);
        }
    }
}
