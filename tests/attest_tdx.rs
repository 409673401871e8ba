//! Intel TDX verifier on the real DCAP samples of vectors/attest/INDEX.md §3 (and §5 G1 for the
//! status/advisory policy), plus mutations of every signed part.

#[path = "common/vectors.rs"]
mod vectors;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use weightvault::attest::tdx::{
    FORMAT, RULE_ADVISORY, RULE_TCB_LEVEL, RULE_TCB_STATUS, TdxPolicy, TdxVerifier,
    bundle_from_inputs, fuzz_parse,
};
use weightvault::attest::{AttestError, TeeKind, Verifier};

/// 2025-06-20T11:46:40Z: inside T1's collateral window (2025-06-19T10:32:27Z → CRLs' nextUpdate
/// 2025-07-19T10:00:35Z).
const T1_NOW_MS: u64 = 1_750_420_000_000;
/// T1 TD report offsets (v4: 48-byte header, then the 584-byte TD report body).
const V4_BODY: usize = 48;
const V4_SIGNED: usize = 48 + 584;

fn vectors() -> Option<PathBuf> {
    vectors::shared("attest", "tdx", "TDX")
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

fn t1_quote(dir: &Path) -> Vec<u8> {
    read(dir, "tdx/dcap-qvl/tdx_quote")
}

fn t1_collateral(dir: &Path) -> Vec<u8> {
    read(dir, "tdx/dcap-qvl/tdx_quote_collateral.json")
}

fn bundle(quote: &[u8], collateral: &[u8]) -> Vec<u8> {
    bundle_from_inputs(quote, &[], Some(collateral)).unwrap()
}

fn report_data(quote: &[u8], body_offset: usize) -> [u8; 64] {
    let mut rd = [0u8; 64];
    rd.copy_from_slice(&quote[body_offset + 520..body_offset + 584]);
    rd
}

fn verifier() -> TdxVerifier {
    TdxVerifier::new(TdxPolicy::default()).unwrap()
}

fn with_collateral_field(
    collateral: &[u8],
    field: &str,
    f: impl FnOnce(&str) -> String,
) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(collateral).unwrap();
    let old = v[field].as_str().unwrap().to_string();
    v[field] = serde_json::Value::String(f(&old));
    serde_json::to_vec(&v).unwrap()
}

fn flip_hex_byte(hex_text: &str, byte_index: usize) -> String {
    let mut bytes = hex::decode(hex_text).unwrap();
    bytes[byte_index] ^= 0x01;
    hex::encode(bytes)
}

/// Changes one base64 character well inside the signature of the first certificate of a PEM
/// text, so the DER stays well-formed and only the signature value changes.
fn corrupt_first_cert_signature(pem: &[u8]) -> Vec<u8> {
    let end = b"-----END CERTIFICATE-----";
    let pos = pem.windows(end.len()).position(|w| w == end).unwrap();
    let mut out = pem.to_vec();
    let mut i = pos - 20;
    while !out[i].is_ascii_alphanumeric() {
        i -= 1;
    }
    out[i] = if out[i] == b'A' { b'B' } else { b'A' };
    out
}

#[test]
fn t1_v4_up_to_date_is_accepted_with_its_claims() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let rd = report_data(&quote, V4_BODY);
    assert!(hex::encode(rd).starts_with("9a9d48e7"));
    assert!(hex::encode(rd).ends_with("2b523f20"));
    let ev = bundle(&quote, &t1_collateral(&dir));
    let ok = verifier().verify(&ev, &rd, T1_NOW_MS).unwrap();
    let c = ok.claims();
    assert_eq!(c.tee, TeeKind::Tdx);
    assert_eq!(
        c.measurement,
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    );
    assert_eq!(c.instance_id, "811dca2a26b952e85bb6448b097ba4fd");
    assert!(!c.debug && !c.simulated);
    assert_eq!(c.evidence_time_ms, T1_NOW_MS);
    let d = &c.details;
    assert_eq!(d["td_attributes"], "0000001000000000");
    assert_eq!(d["xfam"], "e702060000000000");
    assert_eq!(d["tcb_status"], "UpToDate");
    assert_eq!(d["advisories"], "");
    assert_eq!(d["fmspc"], "b0c06f000000");
    assert_eq!(d["quote_version"], "4");
    for key in [
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
        "mr_seam",
    ] {
        assert_eq!(d[key].len(), 96, "{key}");
        assert!(
            d[key]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
    assert_eq!(d["tee_tcb_svn"].len(), 32);
    assert!(!d.contains_key("tee_tcb_svn2"));
    // Collateral expiry = the earliest nextUpdate/notAfter: the CRLs' 2025-07-19T10:00:35Z.
    assert_eq!(d["collateral_expiry_ms"], "1752919235000");
    assert_eq!(ok.evidence_sha256().len(), 32);
}

#[test]
fn t1_other_report_data_is_a_binding_mismatch() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let ev = bundle(&quote, &t1_collateral(&dir));
    let mut rd = report_data(&quote, V4_BODY);
    rd[63] ^= 1;
    assert_eq!(
        verifier().verify(&ev, &rd, T1_NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
    let ours = weightvault::attest::report_data(&[7; 32], &[9; 32]);
    assert_eq!(
        verifier().verify(&ev, &ours, T1_NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn t1_outside_collateral_window_is_expired() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let rd = report_data(&quote, V4_BODY);
    let ev = bundle(&quote, &t1_collateral(&dir));
    for (when, reason) in [
        // 2025-06-19T08:00Z: before the TCB info issueDate.
        (1_750_320_000_000, "TCBInfo issue date is in the future"),
        // 2025-07-19T10:13Z: the CRLs are past their nextUpdate (10:00:35Z).
        (1_752_920_000_000, "CrlExpired"),
        // 2025-07-20: the TCB info is past its nextUpdate too.
        (1_752_990_000_000, "TCBInfo expired"),
        // 2033: everything, the root CA CRL first.
        (2_000_000_000_000, "CrlExpired"),
    ] {
        let err = verifier().verify(&ev, &rd, when).unwrap_err();
        assert!(
            matches!(&err, AttestError::Expired(d) if d.contains(reason)),
            "{reason}: {err:?}"
        );
    }
}

#[test]
fn t4_debug_td_is_rejected_with_or_without_collateral() {
    let dir = vectors_or_skip!();
    let quote = read(&dir, "tdx/trustee/tdx_quote_4.dat");
    assert_eq!(
        hex::encode(&quote[V4_BODY + 120..V4_BODY + 128]),
        "0100001000000000"
    );
    assert!(hex::encode(&quote[V4_BODY + 136..V4_BODY + 184]).starts_with("705ee9381b8633a9"));
    let rd = report_data(&quote, V4_BODY);
    assert!(hex::encode(rd).starts_with("7c71fe2c"));
    let alone = bundle_from_inputs(&quote, &[], None).unwrap();
    let with_t1 = bundle(&quote, &t1_collateral(&dir));
    for ev in [alone, with_t1] {
        assert_eq!(
            verifier().verify(&ev, &rd, T1_NOW_MS).unwrap_err(),
            AttestError::DebugMode
        );
    }
    // Even the most permissive policy keeps it out.
    let lax = TdxVerifier::new(TdxPolicy {
        accepted_statuses: ["UpToDate", "OutOfDate", "SWHardeningNeeded"]
            .map(String::from)
            .to_vec(),
        ..TdxPolicy::default()
    })
    .unwrap();
    let ev = bundle_from_inputs(&quote, &[], None).unwrap();
    assert_eq!(
        lax.verify(&ev, &rd, T1_NOW_MS).unwrap_err(),
        AttestError::DebugMode
    );
}

#[test]
fn t5_v5_with_t1_collateral_is_not_appraisable() {
    let dir = vectors_or_skip!();
    let quote = read(&dir, "tdx/trustee/tdx_quote_5.dat");
    assert_eq!(u16::from_le_bytes([quote[0], quote[1]]), 5);
    // v5: 48-byte header, 6-byte body descriptor (type 3 = TD report 1.5, size 648).
    assert_eq!(&quote[48..54], &[3, 0, 0x88, 0x02, 0, 0]);
    let body = 54;
    assert!(hex::encode(&quote[body + 136..body + 184]).starts_with("dfba221b48a22af8"));
    assert_eq!(quote[body + 120] & 1, 0, "T5 is not a debug TD");
    let rd = report_data(&quote, body);
    let ev = bundle(&quote, &t1_collateral(&dir));
    // T1's collateral is for FMSPC B0C06F000000, T5's platform is 90C06F000000.
    match verifier().verify(&ev, &rd, T1_NOW_MS).unwrap_err() {
        AttestError::Policy { rule, detail } => {
            assert_eq!(rule, RULE_TCB_LEVEL);
            assert!(detail.contains("Fmspc mismatch"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // No collateral at all: refused as incomplete evidence.
    let alone = bundle_from_inputs(&quote, &[], None).unwrap();
    assert!(matches!(
        verifier().verify(&alone, &rd, T1_NOW_MS),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn t7_hex_quote_predates_t1_collateral() {
    let dir = vectors_or_skip!();
    let hex_text = read(&dir, "tdx/dcap-qvl/tdx-quote.hex");
    let derived = read(&dir, "tdx/dcap-qvl/tdx-quote.derived.bin");
    let collateral = t1_collateral(&dir);
    let from_hex = bundle(&hex_text, &collateral);
    assert_eq!(from_hex, bundle(&derived, &collateral));
    assert!(hex::encode(&derived[V4_BODY + 136..V4_BODY + 184]).starts_with("7ba9e262"));
    let rd = report_data(&derived, V4_BODY);
    match verifier().verify(&from_hex, &rd, T1_NOW_MS).unwrap_err() {
        AttestError::Policy { rule, detail } => {
            assert_eq!(rule, RULE_TCB_LEVEL);
            assert!(detail.contains("No matching TCB level"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stored_forms_give_the_same_bundle() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let collateral = t1_collateral(&dir);
    let canonical = bundle(&quote, &collateral);
    let b64 = STANDARD.encode(&quote);
    let wrapped = format!(r#"{{"quote":"{b64}"}}"#);
    let array = serde_json::to_vec(&serde_json::json!({ "td_quote": quote })).unwrap();
    for form in [
        b64.as_bytes(),
        wrapped.as_bytes(),
        &array,
        hex::encode(&quote).as_bytes(),
    ] {
        assert_eq!(bundle(form, &collateral), canonical);
    }
    // A bundle comes back unchanged, and is JSON with the documented fields.
    assert_eq!(
        bundle_from_inputs(&canonical, &[], None).unwrap(),
        canonical
    );
    let v: serde_json::Value = serde_json::from_slice(&canonical).unwrap();
    assert_eq!(v["format"], FORMAT);
    assert_eq!(
        STANDARD.decode(v["quote"].as_str().unwrap()).unwrap(),
        quote
    );
    assert!(
        v["collateral"]["tcb_info"]
            .as_str()
            .unwrap()
            .contains("\"TDX\"")
    );
    // Collateral with an unknown field, or not hex where hex is due, is refused.
    let mut extra: serde_json::Value = serde_json::from_slice(&collateral).unwrap();
    extra["surprise"] = serde_json::json!(1);
    let extra = serde_json::to_vec(&extra).unwrap();
    assert!(matches!(
        bundle_from_inputs(&quote, &[], Some(&extra)),
        Err(AttestError::Malformed(_))
    ));
    let nothex = with_collateral_field(&collateral, "pck_crl", |_| "zz".into());
    assert!(matches!(
        bundle_from_inputs(&quote, &[], Some(&nothex)),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn quote_layout_must_be_exact() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let collateral = t1_collateral(&dir);
    let rd = report_data(&quote, V4_BODY);
    // T1 ends in 70 zero bytes of padding outside every length field: tolerated. Any other
    // byte there, or a quote cut inside its declared lengths, is not.
    let declared_end = V4_SIGNED + 4 + 4300;
    assert_eq!(quote.len(), declared_end + 70);
    assert!(bundle_from_inputs(&quote[..declared_end], &[], Some(&collateral)).is_ok());
    let mut nonzero_tail = quote.clone();
    nonzero_tail[declared_end + 3] = 1;
    for bad in [
        nonzero_tail,
        quote[..declared_end - 1].to_vec(),
        quote[..700].to_vec(),
    ] {
        assert!(matches!(
            bundle_from_inputs(&bad, &[], Some(&collateral)),
            Err(AttestError::Malformed(_))
        ));
        let ev = serde_json::to_vec(&serde_json::json!({
            "format": FORMAT,
            "quote": STANDARD.encode(&bad),
        }))
        .unwrap();
        assert!(matches!(
            verifier().verify(&ev, &rd, T1_NOW_MS),
            Err(AttestError::Malformed(_))
        ));
    }
}

#[test]
fn mutated_quote_parts_are_rejected() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let collateral = t1_collateral(&dir);
    let rd = report_data(&quote, V4_BODY);
    let sig = V4_SIGNED + 4;
    let att_key = sig + 64;
    let qe_report = att_key + 64 + 6;
    let qe_auth = qe_report + 384 + 64 + 2;
    let cases: [(&str, usize, AttestError); 6] = [
        ("MRTD (signed)", V4_BODY + 136, AttestError::BadSignature),
        (
            "report data (signed)",
            V4_BODY + 530,
            AttestError::BadSignature,
        ),
        ("quote signature", sig + 5, AttestError::BadSignature),
        (
            "QE report (signed by PCK)",
            qe_report + 100,
            AttestError::BadSignature,
        ),
        (
            "attestation key (QE binding)",
            att_key + 3,
            AttestError::UntrustedKey,
        ),
        (
            "QE auth data (QE binding)",
            qe_auth + 1,
            AttestError::UntrustedKey,
        ),
    ];
    for (what, at, want) in cases {
        let mut q = quote.clone();
        q[at] ^= 0x01;
        let err = verifier()
            .verify(&bundle(&q, &collateral), &rd, T1_NOW_MS)
            .unwrap_err();
        assert_eq!(err, want, "{what}");
    }
    // PCK leaf certificate inside the quote.
    let q = corrupt_first_cert_signature(&quote);
    assert_eq!(q.len(), quote.len());
    let err = verifier()
        .verify(&bundle(&q, &collateral), &rd, T1_NOW_MS)
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::Chain(d) if d.contains("InvalidSignatureForPublicKey")),
        "{err:?}"
    );
}

#[test]
fn mutated_collateral_is_rejected() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let collateral = t1_collateral(&dir);
    let rd = report_data(&quote, V4_BODY);
    let run = |c: Vec<u8>| {
        verifier()
            .verify(&bundle(&quote, &c), &rd, T1_NOW_MS)
            .unwrap_err()
    };
    let tcb = with_collateral_field(&collateral, "tcb_info", |s| {
        s.replace(
            "\"tcbEvaluationDataNumber\":17",
            "\"tcbEvaluationDataNumber\":18",
        )
    });
    assert_ne!(tcb, collateral);
    assert_eq!(run(tcb), AttestError::BadSignature);
    let tcb_sig =
        with_collateral_field(&collateral, "tcb_info_signature", |s| flip_hex_byte(s, 10));
    assert_eq!(run(tcb_sig), AttestError::BadSignature);
    let qe = with_collateral_field(&collateral, "qe_identity", |s| {
        s.replacen("\"isvsvn\":4", "\"isvsvn\":3", 1)
    });
    assert_ne!(qe, collateral);
    assert_eq!(run(qe), AttestError::BadSignature);
    let qe_sig = with_collateral_field(&collateral, "qe_identity_signature", |s| {
        flip_hex_byte(s, 40)
    });
    assert_eq!(run(qe_sig), AttestError::BadSignature);
    // Certificates and CRLs of the collateral.
    let signer = with_collateral_field(&collateral, "tcb_info_issuer_chain", |s| {
        String::from_utf8(corrupt_first_cert_signature(s.as_bytes())).unwrap()
    });
    let err = run(signer);
    assert!(
        matches!(&err, AttestError::Chain(d) if d.contains("InvalidSignatureForPublicKey")),
        "{err:?}"
    );
    for field in ["root_ca_crl", "pck_crl"] {
        let crl = with_collateral_field(&collateral, field, |s| {
            let n = s.len() / 2;
            flip_hex_byte(s, n - 10)
        });
        let err = run(crl);
        assert!(
            matches!(&err, AttestError::Chain(d) if d.contains("InvalidCrlSignatureForPublicKey")),
            "{field}: {err:?}"
        );
    }
}

struct ForeignRoot {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A CA that copies the Intel root's name but holds its own key.
fn foreign_root() -> ForeignRoot {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "Intel SGX Root CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Intel Corporation");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    ForeignRoot {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

#[test]
fn foreign_roots_are_not_trusted() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let collateral = t1_collateral(&dir);
    let rd = report_data(&quote, V4_BODY);
    let foreign = foreign_root();

    // Collateral re-signed by a TCB signer that chains to the foreign root.
    let signer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "Intel SGX TCB Signing");
    let signer = params.signed_by(&signer_key, &foreign.issuer).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&collateral).unwrap();
    let tcb_info = v["tcb_info"].as_str().unwrap().to_string();
    let sign_key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        signer_key.serialized_der(),
    )
    .unwrap();
    let sig = sign_key
        .sign(&SystemRandom::new(), tcb_info.as_bytes())
        .unwrap();
    v["tcb_info_signature"] = hex::encode(sig.as_ref()).into();
    v["tcb_info_issuer_chain"] = format!("{}{}", signer.pem(), foreign.pem).into();
    let forged = serde_json::to_vec(&v).unwrap();
    let err = verifier()
        .verify(&bundle(&quote, &forged), &rd, T1_NOW_MS)
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::Chain(d) if d.contains("UnknownIssuer")),
        "{err:?}"
    );

    // A verifier configured with only the foreign root refuses Intel-signed evidence.
    let only_foreign = TdxVerifier::new(TdxPolicy {
        roots_pem: vec![foreign.pem.clone()],
        ..TdxPolicy::default()
    })
    .unwrap();
    let ev = bundle(&quote, &collateral);
    let err = only_foreign.verify(&ev, &rd, T1_NOW_MS).unwrap_err();
    assert!(
        matches!(&err, AttestError::Chain(d) if d.contains("root CA CRL")),
        "{err:?}"
    );

    // The override list is a list: with the Intel root added back, the evidence passes.
    let intel_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        STANDARD.encode(weightvault::attest::tdx::INTEL_SGX_ROOT_CA_DER)
    );
    let both = TdxVerifier::new(TdxPolicy {
        roots_pem: vec![foreign.pem, intel_pem],
        ..TdxPolicy::default()
    })
    .unwrap();
    assert!(both.verify(&ev, &rd, T1_NOW_MS).is_ok());
}

#[test]
fn g1_sgx_quote_is_not_tdx_and_its_verdict_drives_the_policy() {
    let dir = vectors_or_skip!();
    let quote = read(&dir, "sgx/dcap-qvl/sgx_quote");
    let collateral = read(&dir, "sgx/dcap-qvl/sgx_quote_collateral.json");
    assert!(matches!(
        bundle_from_inputs(&quote, &[], Some(&collateral)),
        Err(AttestError::Malformed(_))
    ));
    // dcap-qvl's verdict on G1 inside its window (2025-06-19T10:56:11Z → 2025-07-19T10:01:18Z).
    let now_s = 1_750_420_000;
    let coll: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(&collateral).unwrap();
    let root = weightvault::attest::tdx::INTEL_SGX_ROOT_CA_DER.to_vec();
    let verdict =
        dcap_qvl::verify::QuoteVerifier::<dcap_qvl::configs::RustCryptoConfig>::new_with_config(
            root,
        )
        .verify(&quote, &coll, now_s)
        .unwrap();
    assert_eq!(verdict.status, "ConfigurationAndSWHardeningNeeded");
    assert_eq!(verdict.advisory_ids, ["INTEL-SA-00289", "INTEL-SA-00615"]);
    let status = dcap_qvl::TcbStatus::ConfigurationAndSWHardeningNeeded;
    let ids = verdict.advisory_ids.clone();
    assert!(matches!(
        verifier().appraise_tcb(status, &ids, 17),
        Err(AttestError::Policy {
            rule: RULE_TCB_STATUS,
            ..
        })
    ));
    let status_only = TdxVerifier::new(TdxPolicy {
        accepted_statuses: vec![
            "UpToDate".into(),
            "ConfigurationAndSWHardeningNeeded".into(),
        ],
        accepted_advisories: vec!["INTEL-SA-00289".into()],
        ..TdxPolicy::default()
    })
    .unwrap();
    match status_only.appraise_tcb(status, &ids, 17).unwrap_err() {
        AttestError::Policy { rule, detail } => {
            assert_eq!(rule, RULE_ADVISORY);
            assert_eq!(detail, "INTEL-SA-00615");
        }
        other => panic!("{other:?}"),
    }
    let both = TdxVerifier::new(TdxPolicy {
        accepted_statuses: vec!["ConfigurationAndSWHardeningNeeded".into()],
        accepted_advisories: vec!["INTEL-SA-00289".into(), "INTEL-SA-00615".into()],
        ..TdxPolicy::default()
    })
    .unwrap();
    assert!(both.appraise_tcb(status, &ids, 17).is_ok());
}

#[test]
fn fuzz_entry_point_survives_vectors_and_their_prefixes() {
    let dir = vectors_or_skip!();
    let quote = t1_quote(&dir);
    let ev = bundle(&quote, &t1_collateral(&dir));
    fuzz_parse(&ev);
    for cut in (0..quote.len()).step_by(97) {
        fuzz_parse(&quote[..cut]);
    }
    for cut in (0..ev.len()).step_by(1013) {
        fuzz_parse(&ev[..cut]);
    }
}
