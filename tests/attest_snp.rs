//! AMD SEV-SNP verifier against the real samples of ../shared/vectors/attest (INDEX.md §1) and
//! against synthetic chains made here (foreign roots, and every policy failure on a report we
//! sign ourselves under an operator-supplied root).

#[path = "common/vectors.rs"]
mod vectors;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, date_time_ymd,
};
use weightvault::attest::snp::{
    Bundle, REPORT_LEN, SigningKey, SnpPolicy, SnpProduct, SnpRootOverride, SnpTcbFloor,
    SnpTcbFloors, SnpVerifier, bundle_from_inputs,
};
use weightvault::attest::{AttestError, Verifier, report_data};

/// 2025-06-01T00:00:00Z: inside every SNP sample's VCEK validity (7 years from 2023/2024).
const NOW: u64 = 1_748_736_000_000;
/// 2032-01-01: after every sample VCEK has expired.
const AFTER: u64 = 1_956_528_000_000;
/// 2022-01-01: before the sample VCEKs were issued.
const BEFORE: u64 = 1_640_995_200_000;

fn vectors() -> Option<PathBuf> {
    vectors::shared("attest/snp", "", "SEV-SNP")
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn floor(bootloader: u8, tee: u8, snp: u8, microcode: u8, fmc: u8) -> SnpTcbFloor {
    SnpTcbFloor {
        bootloader,
        tee,
        snp,
        microcode,
        fmc,
    }
}

/// The samples' TCB (3/0/8/115) is below the default Milan floor; tests that want acceptance
/// set the floor to exactly the sample's TCB.
fn sample_policy() -> SnpPolicy {
    SnpPolicy {
        min_tcb: SnpTcbFloors {
            milan: Some(floor(3, 0, 8, 115, 0)),
            genoa: None,
            turin: None,
        },
        ..SnpPolicy::default()
    }
}

fn verifier(policy: SnpPolicy) -> SnpVerifier {
    SnpVerifier::new(policy).expect("verifier")
}

/// The report's own REPORT_DATA (the samples are not bound to our nonces).
fn own_report_data(bundle: &[u8]) -> [u8; 64] {
    let b = Bundle::parse(bundle).unwrap();
    b.report[0x50..0x90].try_into().unwrap()
}

fn s1_bundle(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "trustee-milan-vcek/test-report.bin"),
        &[read(dir, "trustee-milan-vcek/test-vcek.der")],
        None,
    )
    .unwrap()
}

fn s4_bundle(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "virtee-sev/report_milan.hex"),
        &[
            read(dir, "virtee-sev/vcek_milan.der"),
            read(dir, "virtee-sev/cert_chain_milan"),
        ],
        None,
    )
    .unwrap()
}

fn rebundle(bundle: &[u8], f: impl FnOnce(&mut Bundle)) -> Vec<u8> {
    let mut b = Bundle::parse(bundle).unwrap();
    f(&mut b);
    b.encode()
}

fn is_policy(r: Result<impl std::fmt::Debug, AttestError>, want: &str) -> bool {
    matches!(r, Err(AttestError::Policy { rule, .. }) if rule == want)
}

#[test]
fn s1_trustee_milan_vcek_is_accepted_with_claims() {
    let Some(dir) = vectors() else { return };
    let bundle = s1_bundle(&dir);
    let mut expected = [0u8; 64];
    expected[..32].copy_from_slice(
        &hex::decode("ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2").unwrap(),
    );
    let ok = verifier(sample_policy())
        .verify(&bundle, &expected, NOW)
        .expect("S1 verifies");
    let c = ok.claims();
    assert_eq!(c.tee, weightvault::attest::TeeKind::Snp);
    assert_eq!(
        c.measurement,
        "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c"
    );
    assert!(c.instance_id.starts_with("c38427a30d4c7af9"));
    assert_eq!(c.instance_id.len(), 128);
    assert!(!c.debug && !c.simulated);
    assert_eq!(c.evidence_time_ms, NOW);
    let d = &c.details;
    for (k, v) in [
        ("vmpl", "0"),
        ("policy", "000000000003001f"),
        ("report_version", "2"),
        ("tcb.bootloader", "3"),
        ("tcb.tee", "0"),
        ("tcb.snp", "8"),
        ("tcb.microcode", "115"),
        ("firmware_version", "1.52.4"),
        ("product", "milan"),
        ("signer", "vcek"),
    ] {
        assert_eq!(d.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!d.contains_key("tcb.fmc"));
    for k in [
        "host_data",
        "id_key_digest",
        "author_key_digest",
        "family_id",
        "image_id",
    ] {
        assert!(
            d[k].bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
    assert_eq!(d["id_key_digest"].len(), 96);
    assert_eq!(d["host_data"].len(), 64);
}

#[test]
fn s4_virtee_milan_is_accepted_from_hex_and_pem_chain() {
    let Some(dir) = vectors() else { return };
    let bundle = s4_bundle(&dir);
    assert_eq!(Bundle::parse(&bundle).unwrap().chain.len(), 2);
    let rd = own_report_data(&bundle);
    assert!(hex::encode(rd).starts_with("d447b55d") && hex::encode(rd).ends_with("6a93ebfd"));
    let ok = verifier(sample_policy()).verify(&bundle, &rd, NOW).unwrap();
    let c = ok.claims();
    assert_eq!(
        c.measurement,
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
    );
    assert_eq!(c.details["policy"], "0000000000030000");
    assert_eq!(c.details["vmpl"], "0");
    assert_eq!(
        (
            c.details["tcb.bootloader"].as_str(),
            c.details["tcb.tee"].as_str(),
            c.details["tcb.snp"].as_str(),
            c.details["tcb.microcode"].as_str()
        ),
        ("3", "0", "8", "115")
    );
    // The derived binary and the stored hex give the same bundle.
    let from_bin = bundle_from_inputs(
        &read(&dir, "virtee-sev/report_milan.bin"),
        &[
            read(&dir, "virtee-sev/vcek_milan.der"),
            read(&dir, "virtee-sev/cert_chain_milan"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(from_bin, bundle);
    // Without the optional chain the pinned ASK/ARK serve.
    let no_chain = rebundle(&bundle, |b| b.chain.clear());
    assert!(
        verifier(sample_policy())
            .verify(&no_chain, &rd, NOW)
            .is_ok()
    );
}

#[test]
fn samples_fail_the_default_policy_and_stricter_floors() {
    let Some(dir) = vectors() else { return };
    for bundle in [s1_bundle(&dir), s4_bundle(&dir)] {
        let rd = own_report_data(&bundle);
        // INDEX.md §10: SNP SVN 8 < 0x18, the Milan floor for AMD-SB-3019.
        assert!(is_policy(
            verifier(SnpPolicy::default()).verify(&bundle, &rd, NOW),
            "tcb below minimum"
        ));
        // INDEX.md §10: version 2; Trustee requires 3.
        let v3 = SnpPolicy {
            min_report_version: 3,
            ..sample_policy()
        };
        assert!(is_policy(
            verifier(v3).verify(&bundle, &rd, NOW),
            "report version too old"
        ));
        for f in [
            floor(4, 0, 8, 115, 0),
            floor(3, 1, 8, 115, 0),
            floor(3, 0, 9, 115, 0),
            floor(3, 0, 8, 116, 0),
        ] {
            let p = SnpPolicy {
                min_tcb: SnpTcbFloors {
                    milan: Some(f),
                    genoa: None,
                    turin: None,
                },
                ..SnpPolicy::default()
            };
            assert!(is_policy(
                verifier(p).verify(&bundle, &rd, NOW),
                "tcb below minimum"
            ));
        }
        let no_milan = SnpPolicy {
            min_tcb: SnpTcbFloors {
                milan: None,
                genoa: None,
                turin: None,
            },
            ..SnpPolicy::default()
        };
        assert!(is_policy(
            verifier(no_milan).verify(&bundle, &rd, NOW),
            "no minimum tcb configured for this cpu"
        ));
        let vmpl1_only = SnpPolicy {
            allowed_vmpls: vec![1],
            ..sample_policy()
        };
        assert!(is_policy(
            verifier(vmpl1_only).verify(&bundle, &rd, NOW),
            "vmpl not allowed"
        ));
    }
}

#[test]
fn samples_outside_validity_are_expired() {
    let Some(dir) = vectors() else { return };
    let v = verifier(sample_policy());
    for bundle in [s1_bundle(&dir), s4_bundle(&dir)] {
        let rd = own_report_data(&bundle);
        for t in [AFTER, BEFORE] {
            assert!(matches!(
                v.verify(&bundle, &rd, t),
                Err(AttestError::Expired(_))
            ));
        }
    }
    // S1's VCEK: notAfter 2030-01-24T17:58:26Z.
    let s1 = s1_bundle(&dir);
    let rd = own_report_data(&s1);
    assert!(v.verify(&s1, &rd, 1_895_443_200_000).is_ok());
    assert!(matches!(
        v.verify(&s1, &rd, 1_895_529_600_000),
        Err(AttestError::Expired(_))
    ));
}

#[test]
fn binding_mismatch() {
    let Some(dir) = vectors() else { return };
    let bundle = s1_bundle(&dir);
    let mut rd = own_report_data(&bundle);
    rd[63] ^= 1;
    assert_eq!(
        verifier(sample_policy())
            .verify(&bundle, &rd, NOW)
            .unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        verifier(sample_policy())
            .verify(&bundle, &report_data(&[1; 32], &[2; 32]), NOW)
            .unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn forged_vceks_do_not_chain_to_the_ask() {
    let Some(dir) = vectors() else { return };
    let v = verifier(sample_policy());
    for forged in ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"] {
        let bundle = bundle_from_inputs(
            &read(&dir, "trustee-milan-vcek/test-report.bin"),
            &[read(&dir, &format!("trustee-milan-vcek/{forged}"))],
            None,
        )
        .unwrap();
        let rd = own_report_data(&bundle);
        let err = v.verify(&bundle, &rd, NOW).unwrap_err();
        assert!(matches!(err, AttestError::Chain(_)), "{forged}: {err:?}");
        assert!(matches!(
            v.verify_endorsement_key(
                &read(&dir, &format!("trustee-milan-vcek/{forged}")),
                &[],
                NOW
            ),
            Err(AttestError::Chain(_))
        ));
    }
}

#[test]
fn turin_vcek_chains_to_ark_turin() {
    let Some(dir) = vectors() else { return };
    let v = verifier(SnpPolicy::default());
    let chain: Vec<Vec<u8>> =
        x509_parser::pem::Pem::iter_from_buffer(&read(&dir, "virtee-sev/cert_chain_turin"))
            .map(|p| p.unwrap().contents)
            .collect();
    assert_eq!(chain.len(), 2);
    let vcek = read(&dir, "virtee-sev/vcek_turin.der");
    for c in [&chain[..], &[]] {
        let key = v.verify_endorsement_key(&vcek, c, NOW).unwrap();
        assert_eq!(key.product, SnpProduct::Turin);
        assert_eq!(key.kind, SigningKey::Vcek);
        assert_eq!(
            (
                key.tcb.fmc,
                key.tcb.bootloader,
                key.tcb.tee,
                key.tcb.snp,
                key.tcb.microcode
            ),
            (Some(0), 0, 0, 0, 9)
        );
        assert_eq!(hex::encode(key.hwid.unwrap()), "1e550a8ee5cf9f4d");
        assert_eq!(key.product_name.as_deref(), Some("Turin"));
    }
    assert!(matches!(
        v.verify_endorsement_key(&vcek, &chain, AFTER),
        Err(AttestError::Expired(_))
    ));
    // A Milan chain does not vouch for the Turin VCEK.
    let milan_chain: Vec<Vec<u8>> =
        x509_parser::pem::Pem::iter_from_buffer(&read(&dir, "virtee-sev/cert_chain_milan"))
            .map(|p| p.unwrap().contents)
            .collect();
    let only_milan = SnpPolicy {
        roots: vec![SnpRootOverride {
            product: SnpProduct::Milan,
            pem: String::from_utf8(read(&dir, "amd-roots/milan_ask_ark_asvk.pem")).unwrap(),
        }],
        ..SnpPolicy::default()
    };
    assert!(matches!(
        verifier(only_milan).verify_endorsement_key(&vcek, &milan_chain, NOW),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn wrong_vcek_for_report_is_bad_signature() {
    let Some(dir) = vectors() else { return };
    // S4's report with S1's (valid, chained) VCEK: hwID differs, but first the signature fails.
    let bundle = rebundle(&s4_bundle(&dir), |b| {
        b.vek = read(&dir, "trustee-milan-vcek/test-vcek.der");
    });
    let rd = own_report_data(&bundle);
    assert_eq!(
        verifier(sample_policy())
            .verify(&bundle, &rd, NOW)
            .unwrap_err(),
        AttestError::BadSignature
    );
}

#[test]
fn mutations_are_rejected() {
    let Some(dir) = vectors() else { return };
    let v = verifier(sample_policy());
    let good = s4_bundle(&dir);
    let rd = own_report_data(&good);
    assert!(v.verify(&good, &rd, NOW).is_ok());

    // A bit in the signed part (MEASUREMENT; and GUEST_SVN).
    for off in [0x90usize, 0x04] {
        let m = rebundle(&good, |b| b.report[off] ^= 1);
        assert_eq!(
            v.verify(&m, &rd, NOW).unwrap_err(),
            AttestError::BadSignature
        );
    }
    // A bit in the signature's r and s.
    for off in [0x2A0usize, 0x2E8 + 10] {
        let m = rebundle(&good, |b| b.report[off] ^= 0x80);
        assert_eq!(
            v.verify(&m, &rd, NOW).unwrap_err(),
            AttestError::BadSignature
        );
    }
    // Non-zero high bytes of r, or reserved signature bytes.
    let m = rebundle(&good, |b| b.report[0x2A0 + 60] = 1);
    assert_eq!(
        v.verify(&m, &rd, NOW).unwrap_err(),
        AttestError::BadSignature
    );
    let m = rebundle(&good, |b| b.report[0x400] = 1);
    assert!(matches!(
        v.verify(&m, &rd, NOW),
        Err(AttestError::Malformed(_))
    ));

    // A bit in the VCEK: in its public key (inside the signed TBS) and in its signature.
    let vcek = Bundle::parse(&good).unwrap().vek;
    // BIT STRING of 0x62 bytes, no unused bits, uncompressed point.
    let key_at = vcek
        .windows(4)
        .position(|w| w == [0x03, 0x62, 0x00, 0x04])
        .expect("EC point in VCEK");
    for off in [key_at + 20, vcek.len() - 5] {
        let m = rebundle(&good, |b| b.vek[off] ^= 1);
        assert!(
            matches!(v.verify(&m, &rd, NOW), Err(AttestError::Chain(_))),
            "VCEK byte {off}: {:?}",
            v.verify(&m, &rd, NOW)
        );
    }
    // A bit in the supplied ASK (the bundle's collateral): a bundle certificate that does not
    // chain to a pinned root is refused even though the pinned ASK would serve.
    let m = rebundle(&good, |b| {
        let n = b.chain[0].len();
        b.chain[0][n - 5] ^= 1;
    });
    assert!(matches!(v.verify(&m, &rd, NOW), Err(AttestError::Chain(_))));
    // Truncated certificate.
    let m = rebundle(&good, |b| b.vek.truncate(100));
    assert!(matches!(
        v.verify(&m, &rd, NOW),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn random_mutations_never_panic() {
    let Some(dir) = vectors() else { return };
    let v = verifier(sample_policy());
    let good = s4_bundle(&dir);
    let rd = own_report_data(&good);
    let parsed = Bundle::parse(&good).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..1500 {
        let r = next();
        let (bundle, inner) = if i % 3 == 0 {
            // Raw JSON bytes.
            let mut b = good.clone();
            let at = (r as usize) % b.len();
            b[at] = (r >> 32) as u8;
            (b, false)
        } else {
            let mut p = parsed.clone();
            let target = match i % 3 {
                1 => &mut p.report,
                _ => &mut p.vek,
            };
            let at = (r as usize) % target.len();
            target[at] ^= 1 << ((r >> 40) % 8);
            (p.encode(), true)
        };
        let res = v.verify(&bundle, &rd, NOW);
        if inner {
            assert!(res.is_err(), "mutation {i} accepted");
        }
        weightvault::attest::snp::fuzz_parse(&bundle);
    }
}

#[test]
fn bundle_inputs_in_every_stored_form() {
    let Some(dir) = vectors() else { return };
    let report = read(&dir, "trustee-milan-vcek/test-report.bin");
    let vcek = read(&dir, "trustee-milan-vcek/test-vcek.der");
    let want = s1_bundle(&dir);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let vcek_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        b64.encode(&vcek)
    );
    for (ev, cert) in [
        (hex::encode(&report).into_bytes(), vcek.clone()),
        (
            b64.encode(&report).into_bytes(),
            b64.encode(&vcek).into_bytes(),
        ),
        (
            serde_json::json!({ "report": report })
                .to_string()
                .into_bytes(),
            vcek_pem.into_bytes(),
        ),
    ] {
        assert_eq!(bundle_from_inputs(&ev, &[cert], None).unwrap(), want);
    }
    // A bundle passes through unchanged; the certificate may also come as "collateral".
    assert_eq!(bundle_from_inputs(&want, &[], None).unwrap(), want);
    assert_eq!(bundle_from_inputs(&report, &[], Some(&vcek)).unwrap(), want);
    // No endorsement key, or two: refused.
    assert!(matches!(
        bundle_from_inputs(&report, &[], None),
        Err(AttestError::Malformed(_))
    ));
    assert!(matches!(
        bundle_from_inputs(&report, &[vcek.clone(), vcek.clone()], None),
        Err(AttestError::Malformed(_))
    ));
    assert!(matches!(
        bundle_from_inputs(&report[..1000], &[vcek], None),
        Err(AttestError::Malformed(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Synthetic chains: an operator root (ECDSA P-384) with AMD's naming and extensions, and reports
// signed here, so that every check can be exercised on a report that is otherwise valid.

fn der_int(v: u8) -> Vec<u8> {
    if v < 0x80 {
        vec![0x02, 0x01, v]
    } else {
        vec![0x02, 0x02, 0x00, v]
    }
}

fn ext(arc: &[u64], content: Vec<u8>) -> CustomExtension {
    let mut oid = vec![1, 3, 6, 1, 4, 1, 3704, 1];
    oid.extend_from_slice(arc);
    CustomExtension::from_oid_content(&oid, content)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "Synthetic Devices");
    d.push(DnType::CommonName, cn);
    d
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2045, 1, 1);
    p
}

struct LeafSpec {
    cn: &'static str,
    tcb: [u8; 5], // bootloader, tee, snp, microcode, fmc (fmc only for Turin)
    hwid: Option<Vec<u8>>,
}

struct Synthetic {
    product: SnpProduct,
    roots_pem: String,
    chain: Vec<Vec<u8>>,
    vcek: Vec<u8>,
    vcek_key: EcdsaKeyPair,
    vlek: Vec<u8>,
    vlek_key: EcdsaKeyPair,
}

fn leaf(
    spec: &LeafSpec,
    product: SnpProduct,
    issuer: &Issuer<'_, KeyPair>,
) -> (Vec<u8>, EcdsaKeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let signer =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key.serialize_der()).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn(spec.cn);
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2031, 1, 1);
    let name = product_name(product);
    p.custom_extensions = vec![ext(&[2], {
        let mut v = vec![0x16, name.len() as u8];
        v.extend_from_slice(name.as_bytes());
        v
    })];
    for (i, arc) in [1u64, 2, 3, 8].into_iter().enumerate() {
        p.custom_extensions
            .push(ext(&[3, arc], der_int(spec.tcb[i])));
    }
    if product == SnpProduct::Turin {
        p.custom_extensions.push(ext(&[3, 9], der_int(spec.tcb[4])));
    }
    if let Some(h) = &spec.hwid {
        p.custom_extensions.push(ext(&[4], h.clone()));
    }
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.der().to_vec(), signer)
}

fn product_name(p: SnpProduct) -> &'static str {
    match p {
        SnpProduct::Milan => "Milan-B0",
        SnpProduct::Genoa => "Genoa-B1",
        SnpProduct::Turin => "Turin",
    }
}

const CHIP: [u8; 64] = {
    let mut c = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        c[i] = (i as u8).wrapping_mul(7).wrapping_add(1);
        i += 1;
    }
    c
};

const TCB: [u8; 5] = [7, 1, 30, 230, 2];

fn synthetic(product: SnpProduct, vcek_tcb: [u8; 5], hwid: Option<Vec<u8>>) -> Synthetic {
    let amd = match product {
        SnpProduct::Milan => "Milan",
        SnpProduct::Genoa => "Genoa",
        SnpProduct::Turin => "Turin",
    };
    let ark_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let ark_params = ca_params(&format!("ARK-{amd}"));
    let ark = ark_params.self_signed(&ark_key).unwrap();
    let ark_issuer = Issuer::new(ark_params, ark_key);
    let mut issuers = Vec::new();
    let mut pems = vec![ark.pem()];
    let mut chain = Vec::new();
    for cn in [format!("SEV-{amd}"), format!("SEV-VLEK-{amd}")] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = ca_params(&cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.signed_by(&key, &ark_issuer).unwrap();
        pems.push(cert.pem());
        chain.push(cert.der().to_vec());
        issuers.push(Issuer::new(params, key));
    }
    let hwid = hwid.unwrap_or_else(|| CHIP[..product.hwid_len()].to_vec());
    let (vcek, vcek_key) = leaf(
        &LeafSpec {
            cn: "SEV-VCEK",
            tcb: vcek_tcb,
            hwid: Some(hwid),
        },
        product,
        &issuers[0],
    );
    let (vlek, vlek_key) = leaf(
        &LeafSpec {
            cn: "SEV-VLEK",
            tcb: vcek_tcb,
            hwid: None,
        },
        product,
        &issuers[1],
    );
    Synthetic {
        product,
        roots_pem: pems.concat(),
        chain,
        vcek,
        vcek_key,
        vlek,
        vlek_key,
    }
}

fn raw_tcb(product: SnpProduct, t: [u8; 5]) -> [u8; 8] {
    match product {
        SnpProduct::Turin => [t[4], t[0], t[1], t[2], 0, 0, 0, t[3]],
        _ => [t[0], t[1], 0, 0, 0, 0, t[2], t[3]],
    }
}

/// A report as the firmware would produce it, signed with `key`.
fn report(
    product: SnpProduct,
    key: &EcdsaKeyPair,
    edit: impl FnOnce(&mut [u8]),
    rd: &[u8; 64],
) -> Vec<u8> {
    let mut r = vec![0u8; REPORT_LEN];
    r[0] = 2; // VERSION
    r[0x04] = 1; // GUEST_SVN
    r[0x08..0x10].copy_from_slice(&0x3_0000u64.to_le_bytes()); // POLICY: SMT, reserved bit 17
    r[0x34] = 1; // SIGNATURE_ALGO: ECDSA P-384 with SHA-384
    r[0x50..0x90].copy_from_slice(rd);
    r[0x90..0xC0].copy_from_slice(&[0x5A; 48]);
    r[0x180..0x188].copy_from_slice(&raw_tcb(product, TCB));
    r[0x1A0..0x1E0].copy_from_slice(&CHIP);
    r[0x1E8..0x1EB].copy_from_slice(&[29, 55, 1]);
    edit(&mut r);
    sign(&mut r, key);
    r
}

fn sign(r: &mut [u8], key: &EcdsaKeyPair) {
    let sig = key.sign(&SystemRandom::new(), &r[..0x2A0]).unwrap();
    let sig = sig.as_ref();
    assert_eq!(sig.len(), 96);
    r[0x2A0..0x4A0].fill(0);
    for i in 0..48 {
        r[0x2A0 + i] = sig[47 - i];
        r[0x2E8 + i] = sig[95 - i];
    }
}

fn syn_policy(s: &Synthetic) -> SnpPolicy {
    let f = floor(TCB[0], TCB[1], TCB[2], TCB[3], 0);
    let t = floor(TCB[0], TCB[1], TCB[2], TCB[3], TCB[4]);
    SnpPolicy {
        min_tcb: SnpTcbFloors {
            milan: Some(f),
            genoa: Some(f),
            turin: Some(t),
        },
        roots: vec![SnpRootOverride {
            product: s.product,
            pem: s.roots_pem.clone(),
        }],
        ..SnpPolicy::default()
    }
}

fn syn_bundle(s: &Synthetic, report: Vec<u8>, vlek: bool) -> Vec<u8> {
    Bundle {
        report,
        vek: if vlek { s.vlek.clone() } else { s.vcek.clone() },
        chain: vec![],
    }
    .encode()
}

fn bound() -> [u8; 64] {
    report_data(&[0x11; 32], &[0x22; 32])
}

#[test]
fn foreign_root_is_refused_by_pinned_roots_and_accepted_when_configured() {
    let s = synthetic(SnpProduct::Milan, TCB, None);
    let rd = bound();
    let r = report(SnpProduct::Milan, &s.vcek_key, |_| {}, &rd);
    let with_chain = Bundle {
        report: r.clone(),
        vek: s.vcek.clone(),
        chain: s.chain.clone(),
    }
    .encode();
    let pinned = verifier(sample_policy());
    for b in [&with_chain, &syn_bundle(&s, r.clone(), false)] {
        assert!(matches!(
            pinned.verify(b, &rd, NOW),
            Err(AttestError::Chain(_))
        ));
    }
    let ok = verifier(syn_policy(&s))
        .verify(&with_chain, &rd, NOW)
        .unwrap();
    let c = ok.claims();
    assert_eq!(c.measurement, "5a".repeat(48));
    assert_eq!(c.instance_id, hex::encode(CHIP));
    assert_eq!(c.details["firmware_version"], "1.55.29");
    assert_eq!(c.details["tcb.snp"], "30");
    assert_eq!(c.details["tcb.microcode"], "230");
    assert_eq!(c.details["signer"], "vcek");
    // Under the synthetic root set, AMD's real ARK in the bundle is a foreign root.
    let amd_ark =
        x509_parser::pem::Pem::iter_from_buffer(weightvault::attest::snp::PINNED_ROOTS[0].1)
            .nth(1)
            .unwrap()
            .unwrap()
            .contents;
    let with_amd = Bundle {
        report: r,
        vek: s.vcek.clone(),
        chain: vec![amd_ark],
    }
    .encode();
    assert!(matches!(
        verifier(syn_policy(&s)).verify(&with_amd, &rd, NOW),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn synthetic_security_bits() {
    let s = synthetic(SnpProduct::Milan, TCB, None);
    let v = verifier(syn_policy(&s));
    let rd = bound();
    let make = |edit: &dyn Fn(&mut [u8])| {
        syn_bundle(
            &s,
            report(SnpProduct::Milan, &s.vcek_key, |r| edit(r), &rd),
            false,
        )
    };

    assert!(v.verify(&make(&|_| {}), &rd, NOW).is_ok());
    assert_eq!(
        v.verify(&make(&|_| {}), &[0u8; 64], NOW).unwrap_err(),
        AttestError::BindingMismatch
    );
    // GUEST_POLICY.DEBUG (bit 19): always refused, whatever the policy.
    let debug = make(&|r| r[0x0A] |= 0x08);
    assert_eq!(
        v.verify(&debug, &rd, NOW).unwrap_err(),
        AttestError::DebugMode
    );
    let lax = SnpPolicy {
        allowed_vmpls: vec![0, 1, 2, 3],
        allow_migration_agent: true,
        allow_masked_chip_id: true,
        ..syn_policy(&s)
    };
    assert_eq!(
        verifier(lax.clone()).verify(&debug, &rd, NOW).unwrap_err(),
        AttestError::DebugMode
    );
    // MIGRATE_MA (bit 18).
    let ma = make(&|r| r[0x0A] |= 0x04);
    assert!(is_policy(
        v.verify(&ma, &rd, NOW),
        "migration agent allowed by guest policy"
    ));
    assert!(verifier(lax.clone()).verify(&ma, &rd, NOW).is_ok());
    // VMPL 1.
    let vmpl1 = make(&|r| r[0x30] = 1);
    assert!(is_policy(v.verify(&vmpl1, &rd, NOW), "vmpl not allowed"));
    let ok = verifier(lax.clone()).verify(&vmpl1, &rd, NOW).unwrap();
    assert_eq!(ok.claims().details["vmpl"], "1");
    // Report versions: 3 with Milan CPUID ok; Genoa CPUID under a Milan key refused; unknown
    // CPUID and version 6 malformed.
    let v3 = make(&|r| {
        r[0] = 3;
        r[0x188] = 0x19;
        r[0x189] = 0x01;
    });
    let strict = SnpPolicy {
        min_report_version: 3,
        ..syn_policy(&s)
    };
    assert!(verifier(strict.clone()).verify(&v3, &rd, NOW).is_ok());
    assert!(is_policy(
        verifier(strict).verify(&make(&|_| {}), &rd, NOW),
        "report version too old"
    ));
    let genoa_cpuid = make(&|r| {
        r[0] = 3;
        r[0x188] = 0x19;
        r[0x189] = 0x11;
    });
    assert!(matches!(
        v.verify(&genoa_cpuid, &rd, NOW),
        Err(AttestError::Chain(_))
    ));
    let odd_cpuid = make(&|r| {
        r[0] = 3;
        r[0x188] = 0x17;
    });
    assert!(matches!(
        v.verify(&odd_cpuid, &rd, NOW),
        Err(AttestError::Malformed(_))
    ));
    assert!(matches!(
        v.verify(&make(&|r| r[0] = 6), &rd, NOW),
        Err(AttestError::Malformed(_))
    ));
    // REPORTED_TCB that differs from the VCEK's extensions, and a different CHIP_ID.
    let tcb_lie = make(&|r| r[0x186] = TCB[2] + 1);
    assert!(matches!(
        v.verify(&tcb_lie, &rd, NOW),
        Err(AttestError::Chain(_))
    ));
    let other_chip = make(&|r| r[0x1A0] ^= 1);
    assert!(matches!(
        v.verify(&other_chip, &rd, NOW),
        Err(AttestError::Chain(_))
    ));
    // Reserved TCB bytes set.
    let reserved = make(&|r| r[0x183] = 1);
    assert!(matches!(
        v.verify(&reserved, &rd, NOW),
        Err(AttestError::Malformed(_))
    ));
    // The report claims VLEK while the certificate is a VCEK; MASK_CHIP_KEY set.
    let says_vlek = make(&|r| r[0x48] = 1 << 2);
    assert_eq!(
        v.verify(&says_vlek, &rd, NOW).unwrap_err(),
        AttestError::UntrustedKey
    );
    let masked_key = make(&|r| r[0x48] = 0b10);
    assert_eq!(
        v.verify(&masked_key, &rd, NOW).unwrap_err(),
        AttestError::UntrustedKey
    );
    // TCB floor above the report.
    let mut high = syn_policy(&s);
    high.min_tcb.milan = Some(floor(TCB[0], TCB[1], TCB[2], TCB[3] + 1, 0));
    assert!(is_policy(
        verifier(high).verify(&make(&|_| {}), &rd, NOW),
        "tcb below minimum"
    ));
    // Chain validity: the synthetic VCEK expires 2031-01-01.
    assert!(matches!(
        v.verify(&make(&|_| {}), &rd, AFTER),
        Err(AttestError::Expired(_))
    ));
}

#[test]
fn synthetic_vlek() {
    let s = synthetic(SnpProduct::Genoa, TCB, None);
    let v = verifier(syn_policy(&s));
    let rd = bound();
    let vlek_report = |edit: &dyn Fn(&mut [u8])| {
        report(
            SnpProduct::Genoa,
            &s.vlek_key,
            |r| {
                r[0x48] = 1 << 2;
                edit(r)
            },
            &rd,
        )
    };
    let ok = v
        .verify(&syn_bundle(&s, vlek_report(&|_| {}), true), &rd, NOW)
        .unwrap();
    assert_eq!(ok.claims().details["signer"], "vlek");
    assert_eq!(ok.claims().details["product"], "genoa");
    // A VLEK-signed report offered with the VCEK certificate, and the reverse.
    assert_eq!(
        v.verify(&syn_bundle(&s, vlek_report(&|_| {}), false), &rd, NOW)
            .unwrap_err(),
        AttestError::UntrustedKey
    );
    let vcek_report = report(SnpProduct::Genoa, &s.vcek_key, |_| {}, &rd);
    assert_eq!(
        v.verify(&syn_bundle(&s, vcek_report, true), &rd, NOW)
            .unwrap_err(),
        AttestError::UntrustedKey
    );
    let no_vlek = SnpPolicy {
        allow_vlek: false,
        ..syn_policy(&s)
    };
    assert!(is_policy(
        verifier(no_vlek).verify(&syn_bundle(&s, vlek_report(&|_| {}), true), &rd, NOW),
        "vlek not allowed"
    ));
    // A VLEK is not chip-bound: a masked CHIP_ID passes only when the policy allows it.
    let masked = syn_bundle(&s, vlek_report(&|r| r[0x1A0..0x1E0].fill(0)), true);
    assert!(is_policy(v.verify(&masked, &rd, NOW), "chip id masked"));
    let allow = SnpPolicy {
        allow_masked_chip_id: true,
        ..syn_policy(&s)
    };
    assert!(verifier(allow).verify(&masked, &rd, NOW).is_ok());
    // Genoa without a configured floor (the default) is refused.
    let default_floors = SnpPolicy {
        min_tcb: SnpTcbFloors::default(),
        ..syn_policy(&s)
    };
    assert!(is_policy(
        verifier(default_floors).verify(&syn_bundle(&s, vlek_report(&|_| {}), true), &rd, NOW),
        "no minimum tcb configured for this cpu"
    ));
}

#[test]
fn synthetic_turin_uses_its_tcb_layout_and_short_hwid() {
    let s = synthetic(SnpProduct::Turin, TCB, None);
    let v = verifier(syn_policy(&s));
    let rd = bound();
    let r = report(
        SnpProduct::Turin,
        &s.vcek_key,
        |r| {
            r[0] = 3;
            r[0x188] = 0x1A;
            r[0x189] = 0x02;
        },
        &rd,
    );
    let ok = v.verify(&syn_bundle(&s, r, false), &rd, NOW).unwrap();
    let d = &ok.claims().details;
    assert_eq!(
        (
            d["tcb.fmc"].as_str(),
            d["tcb.bootloader"].as_str(),
            d["tcb.snp"].as_str(),
            d["product"].as_str()
        ),
        ("2", "7", "30", "turin")
    );
    let mut high = syn_policy(&s);
    high.min_tcb.turin = Some(floor(TCB[0], TCB[1], TCB[2], TCB[3], TCB[4] + 1));
    let r = report(SnpProduct::Turin, &s.vcek_key, |_| {}, &rd);
    assert!(is_policy(
        verifier(high).verify(&syn_bundle(&s, r, false), &rd, NOW),
        "tcb below minimum"
    ));
    // A 64-byte hwID on a Turin VCEK is refused.
    let wrong = synthetic(SnpProduct::Turin, TCB, Some(CHIP.to_vec()));
    let r = report(SnpProduct::Turin, &wrong.vcek_key, |_| {}, &rd);
    assert!(matches!(
        verifier(syn_policy(&wrong)).verify(&syn_bundle(&wrong, r, false), &rd, NOW),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn weak_chain_algorithms_are_refused() {
    // An operator root signed with ECDSA P-256/SHA-256 is not accepted as an SNP root.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ark = ca_params("ARK-Milan").self_signed(&key).unwrap();
    let p = SnpPolicy {
        roots: vec![SnpRootOverride {
            product: SnpProduct::Milan,
            pem: ark.pem(),
        }],
        ..SnpPolicy::default()
    };
    assert!(matches!(SnpVerifier::new(p), Err(AttestError::Chain(_))));
}

#[test]
fn default_policy_accepts_milan_at_the_floor_only() {
    let at_floor = [4, 0, 0x18, 0xDB, 0];
    let s = synthetic(SnpProduct::Milan, at_floor, None);
    let policy = SnpPolicy {
        roots: syn_policy(&s).roots,
        ..SnpPolicy::default()
    };
    let rd = bound();
    let r = report(
        SnpProduct::Milan,
        &s.vcek_key,
        |r| r[0x180..0x188].copy_from_slice(&raw_tcb(SnpProduct::Milan, at_floor)),
        &rd,
    );
    let ok = verifier(policy.clone())
        .verify(&syn_bundle(&s, r, false), &rd, NOW)
        .unwrap();
    assert_eq!(ok.claims().details["tcb.snp"], "24");
    let below = [4, 0, 0x17, 0xDB, 0];
    let s = synthetic(SnpProduct::Milan, below, None);
    let policy = SnpPolicy {
        roots: syn_policy(&s).roots,
        ..SnpPolicy::default()
    };
    let r = report(
        SnpProduct::Milan,
        &s.vcek_key,
        |r| r[0x180..0x188].copy_from_slice(&raw_tcb(SnpProduct::Milan, below)),
        &rd,
    );
    assert!(is_policy(
        verifier(policy).verify(&syn_bundle(&s, r, false), &rd, NOW),
        "tcb below minimum"
    ));
}
