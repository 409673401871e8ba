//! AWS Nitro Enclaves verifier against real AWS-signed documents (vectors/attest/INDEX.md §6)
//! and against synthetic documents under a throwaway PKI built with rcgen.

#[path = "common/vectors.rs"]
mod vectors;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ciborium::Value;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, SignatureAlgorithm,
};
use weightvault::attest::nitro::{
    NitroPolicy, NitroVerifier, bundle_from_inputs, report_data_for_fields,
};
use weightvault::attest::{AttestError, TeeKind, Verifier, report_data};

// ---------------------------------------------------------------------------------------------
// Real documents.

fn vectors() -> Option<PathBuf> {
    vectors::shared("attest/nitro", "", "Nitro")
}

/// A stored document, turned into a bundle and decoded independently of the verifier.
struct Sample {
    bundle: Vec<u8>,
    payload: Vec<(Value, Value)>,
}

impl Sample {
    fn load(dir: &Path, file: &str) -> Self {
        let stored = std::fs::read(dir.join(file)).unwrap();
        let bundle = bundle_from_inputs(&stored, &[], None).unwrap();
        assert_eq!(bundle, STANDARD.decode(stored.trim_ascii()).unwrap());
        let cose: Value = ciborium::de::from_reader(bundle.as_slice()).unwrap();
        let Value::Array(items) = cose else {
            panic!("not an array")
        };
        let Value::Bytes(payload) = &items[2] else {
            panic!("payload")
        };
        let Value::Map(payload) = ciborium::de::from_reader(payload.as_slice()).unwrap() else {
            panic!("payload map")
        };
        Self { bundle, payload }
    }

    fn field(&self, name: &str) -> Option<&Value> {
        self.payload
            .iter()
            .find(|(k, _)| k.as_text() == Some(name))
            .map(|(_, v)| v)
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        self.field(name).unwrap().as_bytes().unwrap().clone()
    }

    fn timestamp(&self) -> u64 {
        u64::try_from(self.field("timestamp").unwrap().as_integer().unwrap()).unwrap()
    }

    /// The vector's own binding: SHA-512(domain || nonce || public_key), computed here.
    fn report_data(&self) -> [u8; 64] {
        let mut ctx = digest::Context::new(&digest::SHA512);
        ctx.update(b"weightvault/attest/v1");
        ctx.update(&self.bytes("nonce"));
        ctx.update(&self.bytes("public_key"));
        let mut out = [0u8; 64];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn pcr(&self, i: u8) -> String {
        let Value::Map(pcrs) = self.field("pcrs").unwrap() else {
            panic!()
        };
        let v = pcrs
            .iter()
            .find(|(k, _)| k.as_integer() == Some(i.into()))
            .unwrap();
        hex::encode(v.1.as_bytes().unwrap())
    }

    /// Position of `needle` inside the bundle.
    fn find(&self, needle: &[u8]) -> usize {
        self.bundle
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }

    fn cabundle(&self, i: usize) -> Vec<u8> {
        let Value::Array(certs) = self.field("cabundle").unwrap() else {
            panic!()
        };
        certs[i].as_bytes().unwrap().clone()
    }
}

/// Third-party documents carry 1024-byte or 426-byte fields, not our 32-byte ones.
fn vector_verifier() -> NitroVerifier {
    NitroVerifier::new(NitroPolicy {
        require_protocol_field_sizes: false,
        ..NitroPolicy::default()
    })
    .unwrap()
}

const N1: &str = "blocky-nitrite/nitro_attestation.b64";
const N2: &str = "blocky-nitrite/nitro_attestation_debug.b64";
const N3: &str = "blocky-nitrite-2023/nitro-stag-attestation.b64";
const N9: &str = "blocky-nitrite/selfsigned_attestation.b64";

#[test]
fn n1_prod_document_accepted_at_its_time() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N1);
    let v = vector_verifier();
    let ts = s.timestamp();
    assert_eq!(ts, 1_725_719_859_545); // 2024-09-07 14:37:39.545 UTC
    assert_eq!(s.bytes("nonce").len(), 1024);
    let ok = v.verify(&s.bundle, &s.report_data(), ts).unwrap();
    let c = ok.claims();
    assert_eq!(c.tee, TeeKind::Nitro);
    assert_eq!(
        c.measurement,
        "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a"
    );
    assert_eq!(c.instance_id, "i-0a22e5c5f24d22174-enc0191cceb4289903f");
    assert_eq!(c.evidence_time_ms, ts);
    assert!(!c.debug && !c.simulated);
    let keys: Vec<&str> = c.details.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "digest",
            "module_id",
            "pcr0",
            "pcr1",
            "pcr2",
            "pcr3",
            "pcr4",
            "pcr8"
        ]
    );
    assert_eq!(c.details["digest"], "SHA384");
    assert_eq!(c.details["module_id"], c.instance_id);
    for i in [0u8, 1, 2, 3, 4, 8] {
        assert_eq!(c.details[&format!("pcr{i}")], s.pcr(i));
    }
    assert!(c.details["pcr1"].starts_with("0343b056") && c.details["pcr1"].ends_with("d8b0c6aa"));
    assert!(c.details["pcr2"].starts_with("d5dcbdea") && c.details["pcr2"].ends_with("24b9b75c"));
    // Inside max_age still accepted.
    assert!(
        v.verify(&s.bundle, &s.report_data(), ts + 4 * 60_000)
            .is_ok()
    );
}

#[test]
fn n1_outside_its_window_is_rejected() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N1);
    let v = vector_verifier();
    let rd = s.report_data();
    let ts = s.timestamp();
    assert!(matches!(
        v.verify(&s.bundle, &rd, ts + 6 * 60_000),
        Err(AttestError::Stale { .. })
    ));
    // Leaf valid 14:37:36 → 17:37:39 UTC.
    let not_after_ms = ts - 545 + 3 * 3_600_000;
    let leaf_not_before_ms = ts - 3_545;
    assert!(matches!(
        v.verify(&s.bundle, &rd, not_after_ms + 1_000),
        Err(AttestError::Expired(_))
    ));
    assert!(matches!(
        v.verify(&s.bundle, &rd, leaf_not_before_ms - 1_000),
        Err(AttestError::Expired(_))
    ));
}

#[test]
fn every_real_document_is_expired_now() {
    let Some(dir) = vectors() else { return };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let v = vector_verifier();
    for file in [N1, N2, N3] {
        let s = Sample::load(&dir, file);
        assert!(
            matches!(
                v.verify(&s.bundle, &s.report_data(), now),
                Err(AttestError::Expired(_))
            ),
            "{file}"
        );
    }
}

#[test]
fn n1_binding_is_enforced() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N1);
    let ts = s.timestamp();
    let mut other = s.report_data();
    other[63] ^= 1;
    assert_eq!(
        vector_verifier().verify(&s.bundle, &other, ts).unwrap_err(),
        AttestError::BindingMismatch
    );
    // Default policy: our protocol's 32-byte nonce and key only.
    let strict = NitroVerifier::new(NitroPolicy::default()).unwrap();
    assert_eq!(
        strict.verify(&s.bundle, &s.report_data(), ts).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        report_data_for_fields(&s.bytes("nonce"), &s.bytes("public_key")),
        s.report_data()
    );
}

#[test]
fn n2_debug_document_rejected() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N2);
    assert_eq!(s.pcr(0), "00".repeat(48));
    assert_eq!(
        vector_verifier()
            .verify(&s.bundle, &s.report_data(), s.timestamp())
            .unwrap_err(),
        AttestError::DebugMode
    );
}

#[test]
fn n3_2023_document_matches_upstream_decoding() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N3);
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("blocky-nitrite-2023/nitro-stag-attestation-doc.json")).unwrap(),
    )
    .unwrap();
    let ts = json["timestamp"].as_u64().unwrap();
    assert_eq!(ts, 1_688_992_470_620);
    // Present but empty in the document (the JSON omits it).
    assert!(s.bytes("nonce").is_empty());
    assert_eq!(s.bytes("public_key").len(), 426);
    let ok = vector_verifier()
        .verify(&s.bundle, &s.report_data(), ts)
        .unwrap();
    let c = ok.claims();
    assert_eq!(c.evidence_time_ms, ts);
    assert_eq!(c.instance_id, json["module_id"].as_str().unwrap());
    assert_eq!(c.details["module_id"], json["module_id"].as_str().unwrap());
    assert_eq!(c.details["digest"], json["digest"].as_str().unwrap());
    assert_eq!(
        c.measurement,
        "7048a0ff10dc087e1ec62792684e68d77d004c7f5785e7dd983f1b7d97610026477aba57124244b1b34848cdafa18c08"
    );
    for i in [0u8, 1, 2, 3, 4, 8] {
        let b64 = json["pcrs"][i.to_string()].as_str().unwrap();
        assert_eq!(
            c.details[&format!("pcr{i}")],
            hex::encode(STANDARD.decode(b64).unwrap())
        );
    }
    let pk = STANDARD
        .decode(json["public_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(pk, s.bytes("public_key"));
    assert_eq!(
        STANDARD
            .decode(json["certificate"].as_str().unwrap())
            .unwrap(),
        s.bytes("certificate")
    );
    for (i, cert) in json["cabundle"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            STANDARD.decode(cert.as_str().unwrap()).unwrap(),
            s.cabundle(i)
        );
    }
}

#[test]
fn n9_self_signed_document_rejected_as_chain() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N9);
    let leaf = std::fs::read(dir.join("blocky-nitrite/selfsigned_cert.der")).unwrap();
    assert_eq!(s.bytes("certificate"), leaf);
    let ts = s.timestamp(); // seconds, not ms
    for now in [ts, ts * 1000] {
        assert!(matches!(
            vector_verifier().verify(&s.bundle, &s.report_data(), now),
            Err(AttestError::Chain(_))
        ));
    }
}

#[test]
fn n1_mutations_are_rejected() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N1);
    let v = vector_verifier();
    let rd = s.report_data();
    let ts = s.timestamp();
    let flipped = |pos: usize| {
        let mut b = s.bundle.clone();
        b[pos] ^= 0x02;
        v.verify(&b, &rd, ts)
    };
    // Signed part: a byte of user_data (key text, then 0x59 0x04 0x00, then the value).
    let user_data = s.find(b"\x69user_data\x59\x04\x00") + 13;
    assert_eq!(
        flipped(user_data + 10).unwrap_err(),
        AttestError::BadSignature
    );
    // The signature (the last 96 bytes).
    assert_eq!(
        flipped(s.bundle.len() - 1).unwrap_err(),
        AttestError::BadSignature
    );
    assert_eq!(
        flipped(s.bundle.len() - 60).unwrap_err(),
        AttestError::BadSignature
    );
    // The leaf certificate, an intermediate and the root (their last byte is in the signature
    // or, for the root, anywhere: it no longer equals the pinned root).
    for der in [
        s.bytes("certificate"),
        s.cabundle(1),
        s.cabundle(3),
        s.cabundle(0),
    ] {
        let end = s.find(&der) + der.len() - 1;
        assert!(
            matches!(flipped(end), Err(AttestError::Chain(_))),
            "cert flip"
        );
    }
    // The protected header {1: -35} → {1: -36}.
    let mut b = s.bundle.clone();
    assert_eq!(&b[1..6], b"\x44\xa1\x01\x38\x22");
    b[5] = 0x23;
    assert!(matches!(
        v.verify(&b, &rd, ts),
        Err(AttestError::Malformed(_))
    ));
    // Truncated and padded.
    assert!(matches!(
        v.verify(&s.bundle[..s.bundle.len() - 1], &rd, ts),
        Err(AttestError::Malformed(_))
    ));
    let mut longer = s.bundle.clone();
    longer.push(0);
    assert!(matches!(
        v.verify(&longer, &rd, ts),
        Err(AttestError::Malformed(_))
    ));
}

#[test]
fn bundle_forms_of_stored_vectors() {
    let Some(dir) = vectors() else { return };
    let s = Sample::load(&dir, N1);
    let hex_form = hex::encode(&s.bundle).into_bytes();
    assert_eq!(bundle_from_inputs(&hex_form, &[], None).unwrap(), s.bundle);
    assert_eq!(bundle_from_inputs(&s.bundle, &[], None).unwrap(), s.bundle);
    let json =
        std::fs::read(dir.join("blocky-nitrite-2023/nitro-stag-attestation-doc.json")).unwrap();
    assert!(matches!(
        bundle_from_inputs(&json, &[], None),
        Err(AttestError::Malformed(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Synthetic documents under a foreign PKI.

/// 2030-01-01T00:00:00Z + 0.5 s.
fn t0_ms() -> u64 {
    rcgen::date_time_ymd(2030, 1, 1).unix_timestamp() as u64 * 1000 + 500
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "ZZ");
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
    p
}

/// How the leaf deviates from an AWS-like signing certificate.
#[derive(Clone, Copy, PartialEq)]
enum Leaf {
    Good,
    IsCa,
    NoDigitalSignature,
    P256,
    ExpiredAtDocTime,
}

struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
    inters: Vec<CertifiedIssuer<'static, KeyPair>>,
    leaf_der: Vec<u8>,
    leaf_key: KeyPair,
}

impl Pki {
    fn new(leaf: Leaf) -> Self {
        let root =
            CertifiedIssuer::self_signed(ca_params("test root"), kp(&PKCS_ECDSA_P384_SHA384))
                .unwrap();
        let i1 = CertifiedIssuer::signed_by(
            ca_params("test intermediate 1"),
            kp(&PKCS_ECDSA_P384_SHA384),
            &root,
        )
        .unwrap();
        let i2 = CertifiedIssuer::signed_by(
            ca_params("test intermediate 2"),
            kp(&PKCS_ECDSA_P384_SHA384),
            &i1,
        )
        .unwrap();
        let leaf_key = kp(if leaf == Leaf::P256 {
            &PKCS_ECDSA_P256_SHA256
        } else {
            &PKCS_ECDSA_P384_SHA384
        });
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = name("i-0123-enc0456.test");
        p.is_ca = if leaf == Leaf::IsCa {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = if leaf == Leaf::NoDigitalSignature {
            vec![KeyUsagePurpose::KeyAgreement]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        let t0 = rcgen::date_time_ymd(2030, 1, 1);
        if leaf == Leaf::ExpiredAtDocTime {
            p.not_before = t0 - Duration::from_secs(4 * 3600);
            p.not_after = t0 - Duration::from_secs(3600);
        } else {
            p.not_before = t0 - Duration::from_secs(3);
            p.not_after = t0 + Duration::from_secs(3 * 3600);
        }
        let leaf_der = p.signed_by(&leaf_key, &i2).unwrap().der().to_vec();
        Self {
            root,
            inters: vec![i1, i2],
            leaf_der,
            leaf_key,
        }
    }

    fn root_der(&self) -> Vec<u8> {
        self.root.der().to_vec()
    }

    /// AWS order: [root, intermediate 1, intermediate 2].
    fn cabundle(&self) -> Vec<Vec<u8>> {
        let mut b = vec![self.root_der()];
        b.extend(self.inters.iter().map(|i| i.der().to_vec()));
        b
    }

    fn verifier(&self) -> NitroVerifier {
        NitroVerifier::new(NitroPolicy {
            roots_pem: vec![self.root.pem()],
            ..NitroPolicy::default()
        })
        .unwrap()
    }
}

fn kp(alg: &'static SignatureAlgorithm) -> KeyPair {
    KeyPair::generate_for(alg).unwrap()
}

const NONCE: [u8; 32] = [0x11; 32];
const NODE_KEY: [u8; 32] = [0x22; 32];

struct Doc {
    timestamp_ms: u64,
    pcrs: Vec<(u8, Vec<u8>)>,
    nonce: Option<Vec<u8>>,
    public_key: Option<Vec<u8>>,
    cabundle: Option<Vec<Vec<u8>>>,
}

impl Doc {
    fn good(pki: &Pki) -> Self {
        Self {
            timestamp_ms: t0_ms(),
            pcrs: (0u8..16)
                .map(|i| (i, vec![i.wrapping_add(0xa0); 48]))
                .collect(),
            nonce: Some(NONCE.to_vec()),
            public_key: Some(NODE_KEY.to_vec()),
            cabundle: Some(pki.cabundle()),
        }
    }

    fn sign(&self, pki: &Pki) -> Vec<u8> {
        self.sign_with(pki, &pki.leaf_key)
    }

    fn sign_with(&self, pki: &Pki, key: &KeyPair) -> Vec<u8> {
        let t = |s: &str| Value::Text(s.into());
        let mut map = vec![
            (t("module_id"), t("i-0123-enc0456")),
            (t("digest"), t("SHA384")),
            (t("timestamp"), Value::Integer(self.timestamp_ms.into())),
            (
                t("pcrs"),
                Value::Map(
                    self.pcrs
                        .iter()
                        .map(|(i, v)| (Value::Integer((*i).into()), Value::Bytes(v.clone())))
                        .collect(),
                ),
            ),
            (t("certificate"), Value::Bytes(pki.leaf_der.clone())),
        ];
        if let Some(b) = &self.cabundle {
            map.push((
                t("cabundle"),
                Value::Array(b.iter().cloned().map(Value::Bytes).collect()),
            ));
        }
        if let Some(pk) = &self.public_key {
            map.push((t("public_key"), Value::Bytes(pk.clone())));
        }
        map.push((t("user_data"), Value::Bytes(vec![])));
        if let Some(n) = &self.nonce {
            map.push((t("nonce"), Value::Bytes(n.clone())));
        }
        let payload = cbor(&Value::Map(map));
        let protected = vec![0xa1, 0x01, 0x38, 0x22];
        // RFC 9052 §4.4, built independently of the verifier (which uses coset).
        let tbs = cbor(&Value::Array(vec![
            t("Signature1"),
            Value::Bytes(protected.clone()),
            Value::Bytes(vec![]),
            Value::Bytes(payload.clone()),
        ]));
        let signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key.serialize_der())
                .unwrap();
        let sig = signer.sign(&SystemRandom::new(), &tbs).unwrap();
        cbor(&Value::Array(vec![
            Value::Bytes(protected),
            Value::Map(vec![]),
            Value::Bytes(payload),
            Value::Bytes(sig.as_ref().to_vec()),
        ]))
    }
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

fn expected() -> [u8; 64] {
    report_data(&NONCE, &NODE_KEY)
}

#[test]
fn synthetic_document_binds_nonce_and_node_key() {
    let pki = Pki::new(Leaf::Good);
    let v = pki.verifier();
    let doc = Doc::good(&pki).sign(&pki);
    let ok = v.verify(&doc, &expected(), t0_ms() + 1_000).unwrap();
    assert_eq!(ok.claims().measurement, "a0".repeat(48));
    assert_eq!(ok.claims().instance_id, "i-0123-enc0456");
    assert_eq!(
        ok.evidence_sha256().as_slice(),
        digest::digest(&digest::SHA256, &doc).as_ref()
    );
    // Another nonce or another node key: not bound.
    assert_eq!(
        v.verify(&doc, &report_data(&[0x12; 32], &NODE_KEY), t0_ms())
            .unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        v.verify(&doc, &report_data(&NONCE, &[0x23; 32]), t0_ms())
            .unwrap_err(),
        AttestError::BindingMismatch
    );
    // Missing fields, or a 31/33 split of the same 64 bytes.
    let pki_doc = |nonce: Option<Vec<u8>>, public_key: Option<Vec<u8>>| {
        let d = Doc {
            nonce,
            public_key,
            ..Doc::good(&pki)
        };
        v.verify(&d.sign(&pki), &expected(), t0_ms())
    };
    assert_eq!(
        pki_doc(None, Some(NODE_KEY.to_vec())).unwrap_err(),
        AttestError::BindingMismatch
    );
    assert_eq!(
        pki_doc(Some(NONCE.to_vec()), None).unwrap_err(),
        AttestError::BindingMismatch
    );
    let mut joined = NONCE.to_vec();
    joined.extend_from_slice(&NODE_KEY);
    assert_eq!(
        pki_doc(Some(joined[..31].to_vec()), Some(joined[31..].to_vec())).unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn synthetic_foreign_root_is_not_trusted_by_default() {
    let pki = Pki::new(Leaf::Good);
    let doc = Doc::good(&pki).sign(&pki);
    let aws = NitroVerifier::new(NitroPolicy::default()).unwrap();
    assert!(matches!(
        aws.verify(&doc, &expected(), t0_ms()),
        Err(AttestError::Chain(_))
    ));
    // A bundle that claims the AWS root but chains to the foreign one.
    let mut bundle = pki.cabundle();
    bundle[0] = weightvault::attest::nitro::AWS_NITRO_ROOT_G1_DER.to_vec();
    let d = Doc {
        cabundle: Some(bundle),
        ..Doc::good(&pki)
    };
    assert!(matches!(
        aws.verify(&d.sign(&pki), &expected(), t0_ms()),
        Err(AttestError::Chain(_))
    ));
}

#[test]
fn synthetic_chain_defects_are_rejected() {
    let pki = Pki::new(Leaf::Good);
    let v = pki.verifier();
    let with_bundle = |b: Option<Vec<Vec<u8>>>| {
        let d = Doc {
            cabundle: b,
            ..Doc::good(&pki)
        };
        v.verify(&d.sign(&pki), &expected(), t0_ms())
    };
    let b = pki.cabundle();
    for bundle in [
        None,
        Some(vec![]),
        Some(vec![b[0].clone(), b[2].clone(), b[1].clone()]), // out of AWS order
        Some(vec![b[0].clone(), b[2].clone()]),               // intermediate missing
        Some(vec![b[0].clone(), b[1].clone(), b[2].clone(), b[2].clone()]), // unused extra
        Some(vec![b[1].clone(), b[2].clone()]),               // root missing
    ] {
        assert!(matches!(with_bundle(bundle), Err(AttestError::Chain(_))));
    }
    for (leaf, want_expired) in [
        (Leaf::IsCa, false),
        (Leaf::NoDigitalSignature, false),
        (Leaf::P256, false),
        (Leaf::ExpiredAtDocTime, true),
    ] {
        let pki = Pki::new(leaf);
        // A P-256 leaf key cannot make an ES384 signature; the chain check fails first anyway.
        let signer = kp(&PKCS_ECDSA_P384_SHA384);
        let key = if leaf == Leaf::P256 {
            &signer
        } else {
            &pki.leaf_key
        };
        let r = pki
            .verifier()
            .verify(&Doc::good(&pki).sign_with(&pki, key), &expected(), t0_ms());
        if want_expired {
            assert!(matches!(r, Err(AttestError::Expired(_))));
        } else {
            assert!(matches!(r, Err(AttestError::Chain(_))));
        }
    }
}

#[test]
fn synthetic_signature_time_and_debug_checks() {
    let pki = Pki::new(Leaf::Good);
    let v = pki.verifier();
    // Signed by a key other than the certificate's.
    let other = kp(&PKCS_ECDSA_P384_SHA384);
    assert_eq!(
        v.verify(
            &Doc::good(&pki).sign_with(&pki, &other),
            &expected(),
            t0_ms()
        )
        .unwrap_err(),
        AttestError::BadSignature
    );
    let doc = Doc::good(&pki).sign(&pki);
    assert!(matches!(
        v.verify(&doc, &expected(), t0_ms() + 5 * 60_000 + 1),
        Err(AttestError::Stale { .. })
    ));
    assert!(v.verify(&doc, &expected(), t0_ms() + 5 * 60_000).is_ok());
    let future = Doc {
        timestamp_ms: t0_ms() + 120_000,
        ..Doc::good(&pki)
    };
    assert_eq!(
        v.verify(&future.sign(&pki), &expected(), t0_ms())
            .unwrap_err(),
        AttestError::FromFuture { ahead_ms: 120_000 }
    );
    let near_future = Doc {
        timestamp_ms: t0_ms() + 60_000,
        ..Doc::good(&pki)
    };
    assert!(
        v.verify(&near_future.sign(&pki), &expected(), t0_ms())
            .is_ok()
    );
    // Leaf issued 3 s before t0 and valid for 3 h: verified after that → Expired.
    assert!(matches!(
        v.verify(&doc, &expected(), t0_ms() + 3 * 3_600_000 + 2_000),
        Err(AttestError::Expired(_))
    ));
    for zeroed in [vec![0u8, 1, 2], vec![0], vec![2]] {
        let mut d = Doc::good(&pki);
        for (i, value) in d.pcrs.iter_mut() {
            if zeroed.contains(i) {
                *value = vec![0; 48];
            }
        }
        assert_eq!(
            v.verify(&d.sign(&pki), &expected(), t0_ms()).unwrap_err(),
            AttestError::DebugMode
        );
    }
}
