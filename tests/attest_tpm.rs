//! TPM 2.0 quote verifier on the real samples of vectors/attest/INDEX.md §7 (P1 Trustee swtpm,
//! P2/P3 go-tpm-tools GCE vTPM), plus synthetic quotes signed here (ECDSA AK with a certificate
//! chain made by rcgen, RSA-PSS AK pinned) and mutations of every signed part.

#[path = "common/vectors.rs"]
mod vectors;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PSS_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber, date_time_ymd,
};
use serde_json::{Value, json};
use weightvault::attest::tpm::{
    FORMAT, TpmPolicy, TpmVerifier, ak_fingerprint, bundle_from_inputs, fuzz_parse,
};
use weightvault::attest::{AttestError, TeeKind, Verifier};

/// 2025-01-01T00:00:00Z: inside P2's AK certificate validity (2021-08-31 → 2051-08-24).
const NOW_MS: u64 = 1_735_689_600_000;
/// 2052-01-01T00:00:00Z: after the AK certificate's notAfter.
const AFTER_MS: u64 = 2_587_680_000_000;
/// 2021-01-01T00:00:00Z: before the AK certificate's notBefore.
const BEFORE_MS: u64 = 1_609_459_200_000;
/// go-tpm-tools' nonce for gce-cos-85-nonce9009.pb: the two bytes 0x90 0x09.
const GCE_NONCE: &[u8] = &[0x90, 0x09];
/// P1's extraData: a 48-byte value and 16 zero bytes (Trustee's report_data layout).
const P1_EXTRA_DATA: &str = "a04182b506878d4f29b91ee606a71a0d3361ccf1b22db20c98adcaa537bea393\
                             ef0e41a18b3569ab678f1497fbc5c12000000000000000000000000000000000";
const P1_AK: &str = "a517f03ffdaee469aef1a19569547e330726335d0461c3ef6383409c6295679e";
/// Serial number of the synthetic AK certificates.
const AK_SERIAL: u64 = 0x4b;
const P2_AK: &str = "6a114d75ad6e7b75f7da33dead50f2e29bf509108646ced2e588bebc35f0d5b6";

fn vectors() -> Option<PathBuf> {
    vectors::shared("attest", "tpm", "TPM")
}

macro_rules! vectors_or_skip {
    () => {
        match vectors() {
            Some(d) => d,
            None => return,
        }
    };
}

fn read(dir: &Path, rel: &str) -> Vec<u8> {
    std::fs::read(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn p1(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(&read(dir, "tpm/trustee/tpm_evidence.json"), &[], None).unwrap()
}

fn p2(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "tpm/gce-go-tpm-tools/gce-cos-85-nonce9009.pb"),
        &[],
        None,
    )
    .unwrap()
}

fn p3(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "tpm/gce-go-tpm-tools/gce-cos-85-no-nonce.pb"),
        &[],
        None,
    )
    .unwrap()
}

fn p1_report_data() -> [u8; 64] {
    hex::decode(P1_EXTRA_DATA).unwrap().try_into().unwrap()
}

fn default_verifier() -> TpmVerifier {
    TpmVerifier::new(TpmPolicy::default()).unwrap()
}

fn pinned_verifier(fingerprint: &str) -> TpmVerifier {
    TpmVerifier::new(TpmPolicy {
        pinned_aks: vec![fingerprint.to_string()],
        ..TpmPolicy::default()
    })
    .unwrap()
}

fn pem(der: &[u8]) -> String {
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        STANDARD.encode(der)
    )
}

/// Edits one base64 field of a bundle (`path` = JSON pointer) by flipping one bit of byte `at`
/// (negative: from the end).
fn flip(bundle: &[u8], path: &str, at: isize) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bundle).unwrap();
    let field = v.pointer_mut(path).unwrap();
    let mut bytes = STANDARD.decode(field.as_str().unwrap()).unwrap();
    let i = if at < 0 {
        bytes.len() - at.unsigned_abs()
    } else {
        at as usize
    };
    bytes[i] ^= 0x01;
    *field = Value::String(STANDARD.encode(&bytes));
    serde_json::to_vec(&v).unwrap()
}

fn edit(bundle: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(bundle).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

// ---- P1: Trustee swtpm quote, self-asserted AK ----------------------------------------------

#[test]
fn p1_self_asserted_ak_is_untrusted() {
    let dir = vectors_or_skip!();
    let b = p1(&dir);
    assert_eq!(ak_fingerprint(&b).unwrap(), P1_AK);
    assert_eq!(
        default_verifier()
            .verify(&b, &p1_report_data(), NOW_MS)
            .unwrap_err(),
        AttestError::UntrustedKey
    );
}

#[test]
fn p1_verifies_when_its_ak_is_pinned() {
    let dir = vectors_or_skip!();
    let b = p1(&dir);
    let v = pinned_verifier(P1_AK);
    let ok = v.verify(&b, &p1_report_data(), NOW_MS).unwrap();
    let c = ok.claims();
    assert_eq!(c.tee, TeeKind::Tpm);
    assert_eq!(
        c.measurement,
        "019de64c9318655e422c3d03831169896e31f02a1d74e4d8fef575bf4e0d75fa"
    );
    assert_eq!(c.instance_id, P1_AK);
    assert!(!c.debug && !c.simulated);
    assert_eq!(c.evidence_time_ms, NOW_MS);
    let d = &c.details;
    assert_eq!(d["firmware_version"], "2019102300163636");
    assert_eq!(d["clock"], "1913548331");
    assert_eq!(d["reset_count"], "2");
    assert_eq!(d["restart_count"], "0");
    assert_eq!(d["ak_trust"], "pinned");
    assert_eq!(d["ak_spki_sha256"], P1_AK);
    assert_eq!(d["signature_scheme"], "rsassa-sha256");
    assert_eq!(d["pcr_bank"], "sha256");
    assert_eq!(
        d["pcr_selection"],
        (0..24).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    assert_eq!(d["pcr0"], "00".repeat(32));
    assert_eq!(d["pcr17"], "ff".repeat(32));
    assert_eq!(
        d.keys()
            .filter(|k| k.starts_with("pcr") && k[3..].parse::<u8>().is_ok())
            .count(),
        24
    );
    // The measurement is SHA-256 over the selected PCR values in index order.
    let mut cat = Vec::new();
    for i in 0..24 {
        cat.extend(hex::decode(&d[&format!("pcr{i}")]).unwrap());
    }
    assert_eq!(
        hex::encode(digest::digest(&digest::SHA256, &cat)),
        c.measurement
    );
    // The same quote through the exact-nonce path.
    let claims = v
        .verify_with_nonce(&b, &hex::decode(P1_EXTRA_DATA).unwrap(), NOW_MS)
        .unwrap();
    assert_eq!(&claims, c);
}

#[test]
fn p1_with_other_report_data_is_a_binding_mismatch() {
    let dir = vectors_or_skip!();
    let b = p1(&dir);
    let v = pinned_verifier(P1_AK);
    let mut rd = p1_report_data();
    rd[63] ^= 1;
    assert_eq!(
        v.verify(&b, &rd, NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        v.verify(&b, &[0u8; 64], NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn p1_mutations_are_rejected() {
    let dir = vectors_or_skip!();
    let b = p1(&dir);
    let v = pinned_verifier(P1_AK);
    let rd = p1_report_data();
    // A bit of the clock in the signed TPMS_ATTEST: magic 4, type 2, qualifiedSigner 2+34,
    // extraData 2+64, so the clock starts at offset 108.
    assert_eq!(
        v.verify(&flip(&b, "/quote/message", 110), &rd, NOW_MS)
            .unwrap_err(),
        AttestError::BadSignature
    );
    // The last byte of the RSA signature.
    assert_eq!(
        v.verify(&flip(&b, "/quote/signature", -1), &rd, NOW_MS)
            .unwrap_err(),
        AttestError::BadSignature
    );
    // A PCR value that the signed pcrDigest does not cover.
    let b2 = edit(&b, |j| j["pcrs"]["7"] = json!("01".repeat(32)));
    assert_eq!(
        v.verify(&b2, &rd, NOW_MS).unwrap_err(),
        AttestError::BadSignature
    );
    // A missing PCR.
    let b3 = edit(&b, |j| {
        j["pcrs"].as_object_mut().unwrap().remove("23");
    });
    assert!(matches!(
        v.verify(&b3, &rd, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    // Another key in ak_public: not pinned any more.
    let b4 = flip(&b, "/ak_public", -5);
    assert!(matches!(
        v.verify(&b4, &rd, NOW_MS),
        Err(AttestError::UntrustedKey | AttestError::Malformed(_))
    ));
    // A foreign certificate chain does not make a self-asserted AK trusted.
    let foreign = TestCa::new();
    let cert = foreign.issue_for(&EcAk::new());
    let b5 = bundle_from_inputs(&b, &[cert], None).unwrap();
    assert!(matches!(
        default_verifier().verify(&b5, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
}

// ---- P2/P3: go-tpm-tools GCE vTPM quotes with a Google AK certificate ------------------------

#[test]
fn p2_chains_to_the_pinned_google_root() {
    let dir = vectors_or_skip!();
    let b = p2(&dir);
    let c = default_verifier()
        .verify_with_nonce(&b, GCE_NONCE, NOW_MS)
        .unwrap();
    assert_eq!(c.tee, TeeKind::Tpm);
    assert_eq!(
        c.measurement,
        "048937cbaaf28af85a5b0c0997e725097a0d94e05fcda104a82ee3fb6b2e1808"
    );
    assert_eq!(c.instance_id, P2_AK);
    assert!(!c.debug && !c.simulated);
    let d = &c.details;
    assert_eq!(
        d["pcr0"],
        "0f35c214608d93c7a6e68ae7359b4a8be5a0e99eea9107ece427c4dea4e439cf"
    );
    assert_eq!(
        d["pcr7"],
        "3365d7fa2b024c852913c06e04ffbfa6ea5289f743bbf1a76f7ffdf21ed84793"
    );
    assert_eq!(d["firmware_version"], "2016051100162800");
    assert_eq!(d["clock"], "8219159552");
    assert_eq!(d["reset_count"], "10");
    assert_eq!(d["restart_count"], "0");
    assert_eq!(d["ak_trust"], "certificate");
    assert_eq!(d["signature_scheme"], "rsassa-sha256");
    assert_eq!(
        d["qualified_signer"],
        "000bde01fe4b4ade2f8b7ae19b8a8897e0cb77ae417731d8ce38697ec4f6c095030a"
    );
}

#[test]
fn p2_from_text_forms_and_with_operator_roots() {
    let dir = vectors_or_skip!();
    let raw = read(&dir, "tpm/gce-go-tpm-tools/gce-cos-85-nonce9009.pb");
    let b = p2(&dir);
    assert_eq!(
        bundle_from_inputs(hex::encode(&raw).as_bytes(), &[], None).unwrap(),
        b
    );
    assert_eq!(
        bundle_from_inputs(STANDARD.encode(&raw).as_bytes(), &[], None).unwrap(),
        b
    );
    assert_eq!(bundle_from_inputs(&b, &[], None).unwrap(), b);
    assert!(matches!(
        bundle_from_inputs(&raw, &[], Some(b"collateral")),
        Err(AttestError::Malformed(_))
    ));

    // Only the operator's root, no built-in intermediates: the intermediate must come with the
    // evidence (`--certs`).
    let root = read(&dir, "tpm/gce-go-tpm-tools/ca-certs/tpm_ek_root_1.cer");
    let inter = read(
        &dir,
        "tpm/gce-go-tpm-tools/ca-certs/tpm_ek_intermediate_2.crt",
    );
    let v = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![pem(&root)]),
        ak_intermediates: Some(vec![]),
        ..TpmPolicy::default()
    })
    .unwrap();
    assert!(matches!(
        v.verify_with_nonce(&b, GCE_NONCE, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    let with_inter = bundle_from_inputs(&raw, &[inter], None).unwrap();
    assert_eq!(
        v.verify_with_nonce(&with_inter, GCE_NONCE, NOW_MS)
            .unwrap()
            .instance_id,
        P2_AK
    );
    // The other Google root alone does not anchor this AK.
    let other = read(&dir, "tpm/gce-go-tpm-tools/ca-certs/gcp_ek_ak_ca_root.crt");
    let v = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![STANDARD.encode(other)]),
        ..TpmPolicy::default()
    })
    .unwrap();
    assert!(matches!(
        v.verify_with_nonce(&b, GCE_NONCE, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // No roots at all: nothing is trusted through a chain.
    let v = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![]),
        ..TpmPolicy::default()
    })
    .unwrap();
    assert!(matches!(
        v.verify_with_nonce(&b, GCE_NONCE, NOW_MS),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn p2_outside_the_certificate_window_is_expired() {
    let dir = vectors_or_skip!();
    let b = p2(&dir);
    let v = default_verifier();
    for t in [AFTER_MS, BEFORE_MS] {
        assert!(matches!(
            v.verify_with_nonce(&b, GCE_NONCE, t),
            Err(AttestError::Expired(_))
        ));
    }
}

#[test]
fn p2_binding_is_exact() {
    let dir = vectors_or_skip!();
    let b = p2(&dir);
    let v = default_verifier();
    assert_eq!(
        v.verify_with_nonce(&b, &[0x90, 0x08], NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        v.verify_with_nonce(&b, b"9009", NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    // The vault protocol needs 32 (or 64) bytes of report data in extraData; "9009" is 2.
    let mut rd = [0u8; 64];
    rd[..2].copy_from_slice(GCE_NONCE);
    assert_eq!(
        v.verify(&b, &rd, NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn p2_mutations_are_rejected() {
    let dir = vectors_or_skip!();
    let b = p2(&dir);
    let v = default_verifier();
    // The last clock byte of the signed TPMS_ATTEST: magic 4, type 2, qualifiedSigner 2+34,
    // extraData 2+2, then the 8-byte clock.
    assert_eq!(
        v.verify_with_nonce(
            &flip(&b, "/quote/message", 4 + 2 + 2 + 34 + 2 + 2 + 7),
            GCE_NONCE,
            NOW_MS
        )
        .unwrap_err(),
        AttestError::BadSignature
    );
    assert_eq!(
        v.verify_with_nonce(&flip(&b, "/quote/signature", -1), GCE_NONCE, NOW_MS)
            .unwrap_err(),
        AttestError::BadSignature
    );
    // The AK certificate's signature value.
    assert!(matches!(
        v.verify_with_nonce(&flip(&b, "/ak_cert_chain/0", -3), GCE_NONCE, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // A PCR value.
    let b2 = edit(&b, |j| j["pcrs"]["0"] = json!("00".repeat(32)));
    assert_eq!(
        v.verify_with_nonce(&b2, GCE_NONCE, NOW_MS).unwrap_err(),
        AttestError::BadSignature
    );
    // An AK public area whose attributes say it is not a restricted signing key.
    let b3 = flip(&b, "/ak_tpm_public", 5);
    assert!(matches!(
        v.verify_with_nonce(&b3, GCE_NONCE, NOW_MS),
        Err(AttestError::Policy {
            rule: "tpm ak attributes",
            ..
        })
    ));
    // A TPMT_PUBLIC that is another key than ak_public.
    let b4 = flip(&b, "/ak_tpm_public", -1);
    assert!(matches!(
        v.verify_with_nonce(&b4, GCE_NONCE, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    // A foreign root in the policy.
    let foreign = TestCa::new();
    let v2 = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![pem(&foreign.root_der)]),
        ..TpmPolicy::default()
    })
    .unwrap();
    assert!(matches!(
        v2.verify_with_nonce(&b, GCE_NONCE, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // Requiring a PCR the quote does not cover (24 PCRs are selected; 30 is not).
    let v3 = TpmVerifier::new(TpmPolicy {
        required_pcrs: vec![0, 30],
        ..TpmPolicy::default()
    })
    .unwrap();
    assert!(matches!(
        v3.verify_with_nonce(&b, GCE_NONCE, NOW_MS),
        Err(AttestError::Policy {
            rule: "tpm pcr selection",
            ..
        })
    ));
}

#[test]
fn p3_empty_nonce_is_rejected() {
    let dir = vectors_or_skip!();
    let b = p3(&dir);
    let v = default_verifier();
    assert_eq!(
        v.verify_with_nonce(&b, GCE_NONCE, NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        v.verify(&b, &[0u8; 64], NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert!(matches!(
        v.verify_with_nonce(&b, &[], NOW_MS),
        Err(AttestError::Policy {
            rule: "tpm nonce",
            ..
        })
    ));
}

#[test]
fn vector_files_never_panic_the_fuzz_entry() {
    let dir = vectors_or_skip!();
    for rel in [
        "tpm/trustee/tpm_evidence.json",
        "tpm/gce-go-tpm-tools/gce-cos-85-nonce9009.pb",
        "tpm/gce-go-tpm-tools/gce-cos-85-no-nonce.pb",
    ] {
        let raw = read(&dir, rel);
        fuzz_parse(&raw);
        for cut in [1, raw.len() / 3, raw.len() / 2, raw.len() - 1] {
            fuzz_parse(&raw[..cut]);
        }
    }
    fuzz_parse(&p2(&dir));
}

// ---- Synthetic quotes --------------------------------------------------------------------------

/// A test CA: root → AK certificate (ECDSA P-256), valid 2024-01-01 → 2030-01-01.
struct TestCa {
    root_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "weightvault test AK root");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(2030, 1, 1);
        let root = params.self_signed(&key).unwrap();
        Self {
            root_der: root.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, ak: &EcAk, eku: Option<Vec<u64>>) -> Vec<u8> {
        let public = KeyPair::try_from(ak.pkcs8.as_slice()).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = eku
            .map(|oid| vec![ExtendedKeyUsagePurpose::Other(oid)])
            .unwrap_or_default();
        params.not_before = date_time_ymd(2024, 1, 1);
        params.not_after = date_time_ymd(2030, 1, 1);
        params.serial_number = Some(SerialNumber::from(AK_SERIAL));
        params
            .signed_by(&public, &self.issuer)
            .unwrap()
            .der()
            .to_vec()
    }

    /// A CRL valid 2024-06-01 → 2025-06-01 revoking `serials`, as PEM.
    fn crl(&self, serials: &[u64]) -> String {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 6, 1),
            next_update: date_time_ymd(2025, 6, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2024, 6, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    /// An AK certificate with the TCG AIK purpose (2.23.133.8.3).
    fn issue_for(&self, ak: &EcAk) -> Vec<u8> {
        self.issue(ak, Some(vec![2, 23, 133, 8, 3]))
    }
}

/// A `TPMS_ATTEST` quote over one PCR bank.
fn quote_message(extra: &[u8], bank: u16, bitmap: &[u8], pcr_digest: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x18];
    m.extend_from_slice(&34u16.to_be_bytes());
    m.extend_from_slice(&[0x00, 0x0b]);
    m.extend_from_slice(&[0x11; 32]);
    m.extend_from_slice(&(extra.len() as u16).to_be_bytes());
    m.extend_from_slice(extra);
    m.extend_from_slice(&1234u64.to_be_bytes());
    m.extend_from_slice(&5u32.to_be_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.push(1);
    m.extend_from_slice(&0x0001_0002_0003_0004u64.to_be_bytes());
    m.extend_from_slice(&1u32.to_be_bytes());
    m.extend_from_slice(&bank.to_be_bytes());
    m.push(bitmap.len() as u8);
    m.extend_from_slice(bitmap);
    m.extend_from_slice(&(pcr_digest.len() as u16).to_be_bytes());
    m.extend_from_slice(pcr_digest);
    m
}

fn pcr_values() -> Vec<[u8; 32]> {
    (0u8..8).map(|i| [i.wrapping_mul(17); 32]).collect()
}

fn pcr_digest(values: &[[u8; 32]]) -> Vec<u8> {
    let cat: Vec<u8> = values.iter().flatten().copied().collect();
    digest::digest(&digest::SHA256, &cat).as_ref().to_vec()
}

fn bundle_json(
    spki: &[u8],
    chain: &[Vec<u8>],
    msg: &[u8],
    sig: &[u8],
    pcrs: &[[u8; 32]],
) -> Vec<u8> {
    let pcr_map: serde_json::Map<String, Value> = pcrs
        .iter()
        .enumerate()
        .map(|(i, v)| (i.to_string(), json!(hex::encode(v))))
        .collect();
    serde_json::to_vec(&json!({
        "format": FORMAT,
        "ak_public": STANDARD.encode(spki),
        "ak_cert_chain": chain.iter().map(|c| STANDARD.encode(c)).collect::<Vec<_>>(),
        "quote": {"message": STANDARD.encode(msg), "signature": STANDARD.encode(sig)},
        "pcrs": pcr_map,
    }))
    .unwrap()
}

struct EcAk {
    pkcs8: Vec<u8>,
    key: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl EcAk {
    fn new() -> Self {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let spki = key.public_key().as_der().unwrap().as_ref().to_vec();
        Self {
            pkcs8: pkcs8.as_ref().to_vec(),
            key,
            spki,
        }
    }

    /// `TPMT_SIGNATURE` with TPM_ALG_ECDSA / SHA-256.
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(&SystemRandom::new(), msg).unwrap();
        let (r, s) = sig.as_ref().split_at(32);
        let mut out = vec![0x00, 0x18, 0x00, 0x0b, 0x00, 0x20];
        out.extend_from_slice(r);
        out.extend_from_slice(&[0x00, 0x20]);
        out.extend_from_slice(s);
        out
    }
}

fn report_data() -> [u8; 64] {
    weightvault::attest::report_data(&[7u8; 32], &[9u8; 32])
}

#[test]
fn synthetic_ecdsa_ak_with_certificate_chain() {
    let ca = TestCa::new();
    let ak = EcAk::new();
    let cert = ca.issue_for(&ak);
    let v = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![pem(&ca.root_der)]),
        ..TpmPolicy::default()
    })
    .unwrap();
    let rd = report_data();
    let pcrs = pcr_values();
    let msg = quote_message(&rd[..32], 0x000b, &[0xff, 0x00, 0x00], &pcr_digest(&pcrs));
    let b = bundle_json(
        &ak.spki,
        std::slice::from_ref(&cert),
        &msg,
        &ak.sign(&msg),
        &pcrs,
    );

    let ok = v.verify(&b, &rd, NOW_MS).unwrap();
    let c = ok.claims();
    assert_eq!(c.measurement, hex::encode(pcr_digest(&pcrs)));
    assert_eq!(
        c.instance_id,
        hex::encode(digest::digest(&digest::SHA256, &ak.spki))
    );
    assert_eq!(c.details["signature_scheme"], "ecdsa-p256-sha256");
    assert_eq!(c.details["ak_trust"], "certificate");
    assert_eq!(c.details["pcr_selection"], "0,1,2,3,4,5,6,7");
    assert_eq!(c.details["firmware_version"], "0001000200030004");
    assert_eq!(c.details["restart_count"], "1");
    assert_eq!(
        ok.evidence_sha256(),
        &<[u8; 32]>::try_from(digest::digest(&digest::SHA256, &b).as_ref()).unwrap()
    );

    // Other report data (same nonce, other node key): the first 32 bytes differ.
    let other = weightvault::attest::report_data(&[7u8; 32], &[8u8; 32]);
    assert_eq!(
        v.verify(&b, &other, NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    // Outside the certificate window.
    assert!(matches!(
        v.verify(&b, &rd, AFTER_MS),
        Err(AttestError::Expired(_))
    ));
    // Not trusted under the default (Google) roots.
    assert!(matches!(
        default_verifier().verify(&b, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // The same chain, but the quote is signed by another AK that claims the certified key.
    let impostor = EcAk::new();
    let forged = bundle_json(
        &ak.spki,
        std::slice::from_ref(&cert),
        &msg,
        &impostor.sign(&msg),
        &pcrs,
    );
    assert_eq!(
        v.verify(&forged, &rd, NOW_MS).unwrap_err(),
        AttestError::BadSignature
    );
    // A certificate for another key than the one that signed.
    let b2 = bundle_json(&impostor.spki, &[cert], &msg, &impostor.sign(&msg), &pcrs);
    assert_eq!(
        v.verify(&b2, &rd, NOW_MS).unwrap_err(),
        AttestError::UntrustedKey
    );
    // A certificate without a TCG key purpose.
    let no_eku = ca.issue(&ak, None);
    let b3 = bundle_json(&ak.spki, &[no_eku], &msg, &ak.sign(&msg), &pcrs);
    assert!(matches!(
        v.verify(&b3, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // A certificate with a non-TCG purpose (serverAuth).
    let tls = ca.issue(&ak, Some(vec![1, 3, 6, 1, 5, 5, 7, 3, 1]));
    let b4 = bundle_json(&ak.spki, &[tls], &msg, &ak.sign(&msg), &pcrs);
    assert!(matches!(
        v.verify(&b4, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn synthetic_quote_contents_are_checked() {
    let ak = EcAk::new();
    let v = pinned_verifier(&hex::encode(digest::digest(&digest::SHA256, &ak.spki)));
    let rd = report_data();
    let pcrs = pcr_values();
    let good = |extra: &[u8], bank: u16, bitmap: &[u8], pcrs: &[[u8; 32]]| {
        let msg = quote_message(extra, bank, bitmap, &pcr_digest(pcrs));
        bundle_json(&ak.spki, &[], &msg, &ak.sign(&msg), pcrs)
    };
    let ok = v
        .verify(&good(&rd[..32], 0x000b, &[0xff, 0, 0], &pcrs), &rd, NOW_MS)
        .unwrap();
    assert_eq!(ok.claims().details["ak_trust"], "pinned");
    // The full 64 bytes are accepted too; any other length or content is not.
    assert!(
        v.verify(&good(&rd, 0x000b, &[0xff, 0, 0], &pcrs), &rd, NOW_MS)
            .is_ok()
    );
    for extra in [&rd[..31], &rd[..33], &[][..], &rd[32..]] {
        assert_eq!(
            v.verify(&good(extra, 0x000b, &[0xff, 0, 0], &pcrs), &rd, NOW_MS)
                .unwrap_err(),
            AttestError::BindingMismatch
        );
    }
    // The SHA-1 bank is not accepted.
    assert!(matches!(
        v.verify(&good(&rd[..32], 0x0004, &[0xff, 0, 0], &pcrs), &rd, NOW_MS),
        Err(AttestError::Policy {
            rule: "tpm pcr selection",
            ..
        })
    ));
    // PCRs 0-7 are required by default.
    assert!(matches!(
        v.verify(
            &good(&rd[..32], 0x000b, &[0x7f, 0, 0], &pcrs[..7]),
            &rd,
            NOW_MS
        ),
        Err(AttestError::Policy {
            rule: "tpm pcr selection",
            ..
        })
    ));
    // Supplied PCRs must be exactly the selected ones.
    let msg = quote_message(&rd[..32], 0x000b, &[0xff, 0, 0], &pcr_digest(&pcrs));
    let mut nine = pcrs.clone();
    nine.push([0xee; 32]);
    let extra_pcr = bundle_json(&ak.spki, &[], &msg, &ak.sign(&msg), &nine);
    assert!(matches!(
        v.verify(&extra_pcr, &rd, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    // An ECDSA signature labelled as RSASSA does not verify.
    let mut sig = ak.sign(&msg);
    sig[1] = 0x14;
    let relabelled = bundle_json(&ak.spki, &[], &msg, &sig, &pcrs);
    assert!(v.verify(&relabelled, &rd, NOW_MS).is_err());
    // A quote that is not TPM_ST_ATTEST_QUOTE.
    let mut certify = msg.clone();
    certify[5] = 0x17;
    let b = bundle_json(&ak.spki, &[], &certify, &ak.sign(&certify), &pcrs);
    assert!(matches!(
        v.verify(&b, &rd, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    // Not TPM_GENERATED_VALUE: external data signed by the key.
    let mut external = msg.clone();
    external[0] = 0x00;
    let b = bundle_json(&ak.spki, &[], &external, &ak.sign(&external), &pcrs);
    assert!(matches!(
        v.verify(&b, &rd, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn synthetic_rsa_pss_ak_pinned() {
    let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let spki = key.public_key().as_der().unwrap().as_ref().to_vec();
    let fp = hex::encode(digest::digest(&digest::SHA256, &spki));
    let rd = report_data();
    let pcrs = pcr_values();
    let msg = quote_message(&rd[..32], 0x000b, &[0xff, 0, 0], &pcr_digest(&pcrs));
    let mut raw = vec![0u8; key.public_modulus_len()];
    key.sign(&RSA_PSS_SHA256, &SystemRandom::new(), &msg, &mut raw)
        .unwrap();
    let mut sig = vec![0x00, 0x16, 0x00, 0x0b];
    sig.extend_from_slice(&(raw.len() as u16).to_be_bytes());
    sig.extend_from_slice(&raw);
    let b = bundle_json(&spki, &[], &msg, &sig, &pcrs);

    assert_eq!(
        default_verifier().verify(&b, &rd, NOW_MS).unwrap_err(),
        AttestError::UntrustedKey
    );
    let v = pinned_verifier(&fp.to_uppercase());
    let ok = v.verify(&b, &rd, NOW_MS).unwrap();
    assert_eq!(ok.claims().details["signature_scheme"], "rsapss-sha256");
    assert_eq!(ok.claims().instance_id, fp);
    // Relabelled as PKCS#1 v1.5: no longer verifies.
    let mut ssa = sig.clone();
    ssa[1] = 0x14;
    assert_eq!(
        v.verify(&bundle_json(&spki, &[], &msg, &ssa, &pcrs), &rd, NOW_MS)
            .unwrap_err(),
        AttestError::BadSignature
    );
}

#[test]
fn synthetic_chain_with_crls() {
    let ca = TestCa::new();
    let ak = EcAk::new();
    let cert = ca.issue_for(&ak);
    let rd = report_data();
    let pcrs = pcr_values();
    let msg = quote_message(&rd[..32], 0x000b, &[0xff, 0, 0], &pcr_digest(&pcrs));
    let b = bundle_json(&ak.spki, &[cert], &msg, &ak.sign(&msg), &pcrs);
    let with_crl = |crl: String| {
        TpmVerifier::new(TpmPolicy {
            ak_roots: Some(vec![pem(&ca.root_der)]),
            ak_crls: vec![crl],
            ..TpmPolicy::default()
        })
        .unwrap()
    };
    // A current CRL that does not list the AK certificate.
    assert!(with_crl(ca.crl(&[7])).verify(&b, &rd, NOW_MS).is_ok());
    // A current CRL that lists it.
    assert!(matches!(
        with_crl(ca.crl(&[7, AK_SERIAL])).verify(&b, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // A CRL past its nextUpdate (2025-06-01) at the verification time (2026-01-01).
    assert!(matches!(
        with_crl(ca.crl(&[7])).verify(&b, &rd, 1_767_225_600_000),
        Err(AttestError::Expired(_))
    ));
    // A CRL in this CA's name but signed by another key fails closed.
    assert!(matches!(
        with_crl(TestCa::new().crl(&[7])).verify(&b, &rd, NOW_MS),
        Err(AttestError::Chain(_))
    ));
    // Garbage in the policy is refused at construction.
    assert!(matches!(
        TpmVerifier::new(TpmPolicy {
            ak_crls: vec!["not a crl".into()],
            ..TpmPolicy::default()
        }),
        Err(AttestError::Policy { .. })
    ));
}
