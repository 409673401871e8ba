//! Node-side evidence collection (src/client/collect/) against fakes of the real interfaces: a
//! configfs-tsm tree in a temp dir answered by a thread, an NSM transport and a TPM transport
//! that sign with test keys. Every collected evidence goes through the vault's real verifier
//! with the binding the node protocol computes, and each failure mode has its error.

#[path = "common/vectors.rs"]
mod vectors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ciborium::Value;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, date_time_ymd,
};
use tpm2_protocol::frame::{
    TpmCommand, TpmNvReadCommand, TpmPcrReadCommand, TpmQuoteCommand, TpmReadPublicCommand,
};
use weightvault::attest::azure::{AzureVtpmPolicy, AzureVtpmVerifier};
use weightvault::attest::nitro::{NitroPolicy, NitroVerifier};
use weightvault::attest::snp::{
    REPORT_LEN, SnpPolicy, SnpProduct, SnpRootOverride, SnpTcbFloor, SnpTcbFloors, SnpVerifier,
};
use weightvault::attest::tdx::{TdxPolicy, TdxVerifier};
use weightvault::attest::tpm::{TpmPolicy, TpmVerifier};
use weightvault::attest::{TeeKind, Verifier, report_data};
use weightvault::client::ClientError;
use weightvault::client::collect::nsm::{NsmAttester, NsmTransport};
use weightvault::client::collect::tpm::{AzureHardware, PcrSelection, TpmAttester, TpmTransport};
use weightvault::client::collect::tsm::{SNP_PROVIDER, TDX_PROVIDER, TsmAttester};
use weightvault::client::collect::{self, CollectError, CollectOptions};
use weightvault::client::node::Attester;

/// 2025-06-01T00:00:00Z, inside the synthetic VCEK's validity.
const NOW: u64 = 1_748_736_000_000;
const NONCE: [u8; 32] = [0x5a; 32];
const NODE_KEY: [u8; 32] = [0xc3; 32];

fn bound() -> [u8; 64] {
    report_data(&NONCE, &NODE_KEY)
}

fn usage_text(e: ClientError) -> String {
    match e {
        ClientError::Usage(m) => m,
        other => panic!("expected a usage error, got {other}"),
    }
}

// ---- A fake configfs-tsm ----------------------------------------------------------------------

type Answer = dyn Fn(&[u8]) -> (Vec<u8>, Vec<u8>) + Send + Sync;

/// A report root in a temp dir. A thread gives each new instance directory its attributes, counts
/// writes to `privlevel` and `inblob` in `generation`, and answers an `inblob` with `outblob`
/// and (for sev_guest) `auxblob`. `disturb` makes that many answers also count a foreign write.
struct FakeTsm {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    answered: Arc<AtomicU32>,
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl FakeTsm {
    fn start(provider: &'static str, disturb: u32, answer: Arc<Answer>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU32::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut generations: HashMap<PathBuf, u64> = HashMap::new();
            let mut disturb = disturb;
            while !s.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir(&root).unwrap() {
                    let inst = entry.unwrap().path();
                    if !inst.is_dir() {
                        continue;
                    }
                    let Some(g) = generations.get_mut(&inst) else {
                        std::fs::write(inst.join("inblob"), b"").unwrap();
                        if provider == SNP_PROVIDER {
                            std::fs::write(inst.join("privlevel"), b"").unwrap();
                        }
                        std::fs::write(inst.join("provider"), format!("{provider}\n")).unwrap();
                        write_atomic(&inst.join("generation"), b"0\n");
                        generations.insert(inst, 0);
                        continue;
                    };
                    let before = *g;
                    let privlevel = inst.join("privlevel");
                    if std::fs::read(&privlevel).is_ok_and(|p| !p.is_empty()) {
                        std::fs::write(&privlevel, b"").unwrap();
                        *g += 1;
                    }
                    let inblob = std::fs::read(inst.join("inblob")).unwrap_or_default();
                    if inblob.len() == 64 {
                        let (out, aux) = answer(&inblob);
                        write_atomic(&inst.join("outblob"), &out);
                        if provider == SNP_PROVIDER {
                            write_atomic(&inst.join("auxblob"), &aux);
                        }
                        std::fs::write(inst.join("inblob"), b"").unwrap();
                        *g += 1;
                        if disturb > 0 {
                            disturb -= 1;
                            *g += 1;
                        }
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    if *g != before {
                        write_atomic(&inst.join("generation"), format!("{g}\n").as_bytes());
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            dir,
            stop,
            thread: Some(thread),
            answered,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FakeTsm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- Synthetic SEV-SNP chain (an operator root with AMD's names and extensions) ------------

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

fn amd_ext(arc: &[u64], content: Vec<u8>) -> CustomExtension {
    let mut oid = vec![1, 3, 6, 1, 4, 1, 3704, 1];
    oid.extend_from_slice(arc);
    CustomExtension::from_oid_content(&oid, content)
}

const CHIP: [u8; 64] = [0x42; 64];
/// bootloader, tee, snp, microcode.
const TCB: [u8; 4] = [7, 1, 30, 230];

struct Snp {
    roots_pem: String,
    ark: Vec<u8>,
    ask: Vec<u8>,
    vcek: Vec<u8>,
    vcek_key: EcdsaKeyPair,
}

impl Snp {
    fn new() -> Self {
        let ark_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let ark_params = ca_params("ARK-Milan");
        let ark = ark_params.self_signed(&ark_key).unwrap();
        let ark_issuer = Issuer::new(ark_params, ark_key);
        let ask_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut ask_params = ca_params("SEV-Milan");
        ask_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ask_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ask = ask_params.signed_by(&ask_key, &ark_issuer).unwrap();
        let ask_issuer = Issuer::new(ask_params, ask_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let vcek_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key.serialize_der())
                .unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = dn("SEV-VCEK");
        p.not_before = date_time_ymd(2024, 1, 1);
        p.not_after = date_time_ymd(2031, 1, 1);
        let der_int = |v: u8| {
            if v < 0x80 {
                vec![0x02, 0x01, v]
            } else {
                vec![0x02, 0x02, 0x00, v]
            }
        };
        let mut product = vec![0x16, 8];
        product.extend_from_slice(b"Milan-B0");
        p.custom_extensions = vec![amd_ext(&[2], product)];
        for (i, arc) in [1u64, 2, 3, 8].into_iter().enumerate() {
            p.custom_extensions
                .push(amd_ext(&[3, arc], der_int(TCB[i])));
        }
        p.custom_extensions.push(amd_ext(&[4], CHIP.to_vec()));
        let vcek = p.signed_by(&key, &ask_issuer).unwrap();
        Self {
            roots_pem: format!("{}{}", ark.pem(), ask.pem()),
            ark: ark.der().to_vec(),
            ask: ask.der().to_vec(),
            vcek: vcek.der().to_vec(),
            vcek_key,
        }
    }

    fn policy(&self) -> SnpPolicy {
        let f = SnpTcbFloor {
            bootloader: TCB[0],
            tee: TCB[1],
            snp: TCB[2],
            microcode: TCB[3],
            fmc: 0,
        };
        SnpPolicy {
            min_tcb: SnpTcbFloors {
                milan: Some(f),
                genoa: None,
                turin: None,
            },
            roots: vec![SnpRootOverride {
                product: SnpProduct::Milan,
                pem: self.roots_pem.clone(),
            }],
            ..SnpPolicy::default()
        }
    }

    /// An ATTESTATION_REPORT (AMD 56860) as the firmware makes it for `rd`, signed by the VCEK.
    fn report(&self, rd: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; REPORT_LEN];
        r[0] = 2;
        r[0x04] = 1;
        r[0x08..0x10].copy_from_slice(&0x3_0000u64.to_le_bytes());
        r[0x34] = 1;
        r[0x50..0x90].copy_from_slice(rd);
        r[0x90..0xC0].copy_from_slice(&[0x5A; 48]);
        r[0x180..0x188].copy_from_slice(&[TCB[0], TCB[1], 0, 0, 0, 0, TCB[2], TCB[3]]);
        r[0x1A0..0x1E0].copy_from_slice(&CHIP);
        r[0x1E8..0x1EB].copy_from_slice(&[29, 55, 1]);
        let sig = self
            .vcek_key
            .sign(&SystemRandom::new(), &r[..0x2A0])
            .unwrap();
        let sig = sig.as_ref();
        for i in 0..48 {
            r[0x2A0 + i] = sig[47 - i];
            r[0x2E8 + i] = sig[95 - i];
        }
        r
    }
}

/// A GHCB certificate table: GUID (RFC 9562 byte order) ‖ offset ‖ length, a zero entry, data.
fn cert_table(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let head = (entries.len() + 1) * 24;
    let mut table = Vec::new();
    let mut data = Vec::new();
    for (guid, cert) in entries {
        table.extend_from_slice(&hex::decode(guid.replace('-', "")).unwrap());
        table.extend_from_slice(&((head + data.len()) as u32).to_le_bytes());
        table.extend_from_slice(&(cert.len() as u32).to_le_bytes());
        data.extend_from_slice(cert);
    }
    table.extend_from_slice(&[0u8; 24]);
    table.extend_from_slice(&data);
    table
}

const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";

fn snp_fake(snp: &Arc<Snp>, with_table: bool, disturb: u32) -> FakeTsm {
    let s = snp.clone();
    FakeTsm::start(
        SNP_PROVIDER,
        disturb,
        Arc::new(move |inblob: &[u8]| {
            let aux = if with_table {
                cert_table(&[(GUID_VCEK, &s.vcek), (GUID_ASK, &s.ask), (GUID_ARK, &s.ark)])
            } else {
                Vec::new()
            };
            (s.report(inblob), aux)
        }),
    )
}

#[test]
fn snp_evidence_from_configfs_tsm_verifies_with_the_binding() {
    let snp = Arc::new(Snp::new());
    let fake = snp_fake(&snp, true, 0);
    let a = TsmAttester::snp(fake.root(), Some(0), Vec::new()).unwrap();
    assert_eq!(a.tee(), "snp");
    // The node protocol's path: nonce and key in, report_data(nonce, key) into inblob.
    let ev = a.evidence_for(&NONCE, &NODE_KEY).unwrap();
    let v = SnpVerifier::new(snp.policy()).unwrap();
    let ok = v.verify(&ev, &bound(), NOW).unwrap();
    assert_eq!(ok.claims().measurement, "5a".repeat(48));
    assert_eq!(ok.claims().instance_id, hex::encode(CHIP));
    assert_eq!(ok.claims().details["vmpl"], "0");
    // Bound to this attempt only.
    assert!(
        v.verify(&ev, &report_data(&NONCE, &[0xc4; 32]), NOW)
            .is_err()
    );
    assert_eq!(fake.answered.load(Ordering::SeqCst), 1);
}

#[test]
fn snp_without_host_certificates_takes_the_vcek_file_or_says_what_is_missing() {
    let snp = Arc::new(Snp::new());
    let fake = snp_fake(&snp, false, 0);
    let none = TsmAttester::snp(fake.root(), None, Vec::new()).unwrap();
    let msg = usage_text(none.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("no VCEK certificate") && msg.contains("--certs"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let vcek = dir.path().join("vcek.der");
    std::fs::write(&vcek, &snp.vcek).unwrap();
    let opts = CollectOptions {
        tsm_dir: fake.root().to_path_buf(),
        certs: vec![vcek],
        ..CollectOptions::default()
    };
    let a = collect::attester(TeeKind::Snp, &opts).unwrap();
    let ev = a.evidence(&bound()).unwrap();
    SnpVerifier::new(snp.policy())
        .unwrap()
        .verify(&ev, &bound(), NOW)
        .unwrap();
}

#[test]
fn configfs_tsm_failures_are_precise() {
    let snp = Arc::new(Snp::new());
    // Another TEE's provider.
    let tdx = FakeTsm::start(TDX_PROVIDER, 0, Arc::new(|_: &[u8]| (vec![], vec![])));
    let a = TsmAttester::snp(tdx.root(), None, Vec::new()).unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("provider is \"tdx_guest\", expected \"sev_guest\""),
        "{msg}"
    );
    // A short outblob.
    let short = FakeTsm::start(
        SNP_PROVIDER,
        0,
        Arc::new(|_: &[u8]| (vec![1u8; 100], vec![])),
    );
    let a = TsmAttester::snp(short.root(), None, Vec::new()).unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(msg.contains("outblob is 100 bytes"), "{msg}");
    // A report for other data than asked.
    let s = snp.clone();
    let other = FakeTsm::start(
        SNP_PROVIDER,
        0,
        Arc::new(move |_: &[u8]| (s.report(&[0u8; 64]), vec![])),
    );
    let a = TsmAttester::snp(other.root(), None, Vec::new()).unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("does not carry the requested report data"),
        "{msg}"
    );
    // No configfs-tsm at all.
    let missing = Path::new("/nonexistent/weightvault-test/tsm/report");
    let a = TsmAttester::snp(missing, None, Vec::new()).unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("/nonexistent/weightvault-test/tsm/report: not found"),
        "{msg}"
    );
    assert!(TsmAttester::snp(missing, Some(4), Vec::new()).is_err());
}

#[test]
fn a_concurrent_writer_is_detected_by_generation() {
    let snp = Arc::new(Snp::new());
    // One foreign write: the first attempt is discarded, the second succeeds.
    let once = snp_fake(&snp, true, 1);
    let a = TsmAttester::snp(once.root(), None, Vec::new()).unwrap();
    let ev = a.collect(&bound()).unwrap();
    SnpVerifier::new(snp.policy())
        .unwrap()
        .verify(&ev, &bound(), NOW)
        .unwrap();
    assert_eq!(once.answered.load(Ordering::SeqCst), 2);
    // A writer that never stops: every attempt fails, and nothing is returned.
    let always = snp_fake(&snp, true, u32::MAX);
    let a = TsmAttester::snp(always.root(), None, Vec::new()).unwrap();
    match a.collect(&bound()) {
        Err(CollectError::Race {
            attempts,
            found,
            expected,
            ..
        }) => {
            assert_eq!(attempts, 3);
            assert_eq!(found, expected + 1);
        }
        Err(other) => panic!("expected a race, got {other}"),
        Ok(_) => panic!("expected a race, got evidence"),
    }
}

fn tdx_vectors() -> Option<PathBuf> {
    vectors::shared("attest/tdx/dcap-qvl", "", "TDX")
}

/// 2025-06-20, inside the T1 collateral window (tests/attest_tdx.rs).
const T1_NOW_MS: u64 = 1_750_420_000_000;

#[test]
fn tdx_quote_from_configfs_tsm_is_bundled_with_collateral_and_verifies() {
    let Some(dir) = tdx_vectors() else { return };
    let quote = std::fs::read(dir.join("tdx_quote")).unwrap();
    let collateral = dir.join("tdx_quote_collateral.json");
    // The sample quote was made for its own report data; the fake TD returns it, so the
    // collector is asked for exactly that binding.
    let rd: [u8; 64] = quote[48 + 520..48 + 584].try_into().unwrap();
    let q = quote.clone();
    let fake = FakeTsm::start(
        TDX_PROVIDER,
        0,
        Arc::new(move |_: &[u8]| (q.clone(), vec![])),
    );
    let opts = CollectOptions {
        tsm_dir: fake.root().to_path_buf(),
        collateral: Some(collateral),
        ..CollectOptions::default()
    };
    let a = collect::attester(TeeKind::Tdx, &opts).unwrap();
    assert_eq!(a.tee(), "tdx");
    let ev = a.evidence(&rd).unwrap();
    let ok = TdxVerifier::new(TdxPolicy::default())
        .unwrap()
        .verify(&ev, &rd, T1_NOW_MS)
        .unwrap();
    assert_eq!(ok.claims().tee, TeeKind::Tdx);
    // Asked for another binding, the collector refuses the quote before the vault sees it.
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("does not carry the requested report data"),
        "{msg}"
    );
    // Without collateral the attester is not built.
    let no_collateral = CollectOptions {
        collateral: None,
        ..opts
    };
    let msg = usage_text(
        collect::attester(TeeKind::Tdx, &no_collateral)
            .err()
            .unwrap(),
    );
    assert!(msg.contains("--collateral"), "{msg}");
}

// ---- A fake Nitro Secure Module ---------------------------------------------------------------

/// 2030-01-01T00:00:00Z + 0.5 s.
fn nitro_t0() -> u64 {
    date_time_ymd(2030, 1, 1).unix_timestamp() as u64 * 1000 + 500
}

struct FakeNsm {
    root: CertifiedIssuer<'static, KeyPair>,
    inter: CertifiedIssuer<'static, KeyPair>,
    leaf_der: Vec<u8>,
    leaf_key: KeyPair,
    refuse: bool,
}

fn bytes32(v: Option<Value>) -> [u8; 32] {
    match v {
        Some(Value::Bytes(b)) => b.try_into().expect("32 bytes"),
        other => panic!("expected 32 bytes, got {other:?}"),
    }
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

impl FakeNsm {
    fn new(refuse: bool) -> Self {
        let kp = || KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let root = CertifiedIssuer::self_signed(ca_params("nsm test root"), kp()).unwrap();
        let inter = CertifiedIssuer::signed_by(ca_params("nsm test zone"), kp(), &root).unwrap();
        let leaf_key = kp();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = dn("i-0fake-enc0fake");
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let t0 = date_time_ymd(2030, 1, 1);
        p.not_before = t0 - Duration::from_secs(60);
        p.not_after = t0 + Duration::from_secs(3 * 3600);
        let leaf_der = p.signed_by(&leaf_key, &inter).unwrap().der().to_vec();
        Self {
            root,
            inter,
            leaf_der,
            leaf_key,
            refuse,
        }
    }

    fn verifier(&self) -> NitroVerifier {
        NitroVerifier::new(NitroPolicy {
            roots_pem: vec![self.root.pem()],
            ..NitroPolicy::default()
        })
        .unwrap()
    }
}

impl NsmTransport for FakeNsm {
    fn exchange(&self, request: &[u8]) -> Result<Vec<u8>, CollectError> {
        if self.refuse {
            return Ok(cbor(&Value::Map(vec![(
                Value::Text("Error".into()),
                Value::Text("InvalidArgument".into()),
            )])));
        }
        let t = |s: &str| Value::Text(s.into());
        let req: Value = ciborium::de::from_reader(request).unwrap();
        let Value::Map(outer) = req else {
            panic!("request is not a map")
        };
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, t("Attestation"));
        let Value::Map(fields) = &outer[0].1 else {
            panic!("no Attestation body")
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == t(name))
                .map(|(_, v)| v.clone())
        };
        let rd = report_data(&bytes32(field("nonce")), &bytes32(field("public_key")));
        assert_eq!(field("user_data"), Some(Value::Bytes(rd.to_vec())));
        let doc_map = vec![
            (t("module_id"), t("i-0fake-enc0fake")),
            (t("digest"), t("SHA384")),
            (t("timestamp"), Value::Integer(nitro_t0().into())),
            (
                t("pcrs"),
                Value::Map(
                    (0u8..4)
                        .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![0xa0 + i; 48])))
                        .collect(),
                ),
            ),
            (t("certificate"), Value::Bytes(self.leaf_der.clone())),
            (
                t("cabundle"),
                Value::Array(vec![
                    Value::Bytes(self.root.der().to_vec()),
                    Value::Bytes(self.inter.der().to_vec()),
                ]),
            ),
            (t("public_key"), field("public_key").unwrap()),
            (t("user_data"), field("user_data").unwrap()),
            (t("nonce"), field("nonce").unwrap()),
        ];
        let payload = cbor(&Value::Map(doc_map));
        let protected = vec![0xa1, 0x01, 0x38, 0x22];
        // RFC 9052 §4.4 Sig_structure.
        let tbs = cbor(&Value::Array(vec![
            t("Signature1"),
            Value::Bytes(protected.clone()),
            Value::Bytes(vec![]),
            Value::Bytes(payload.clone()),
        ]));
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            &self.leaf_key.serialize_der(),
        )
        .unwrap();
        let sig = signer.sign(&SystemRandom::new(), &tbs).unwrap();
        let document = cbor(&Value::Array(vec![
            Value::Bytes(protected),
            Value::Map(vec![]),
            Value::Bytes(payload),
            Value::Bytes(sig.as_ref().to_vec()),
        ]));
        Ok(cbor(&Value::Map(vec![(
            t("Attestation"),
            Value::Map(vec![(t("document"), Value::Bytes(document))]),
        )])))
    }
}

#[test]
fn nitro_document_binds_the_nonce_and_node_key_in_its_own_fields() {
    let nsm = FakeNsm::new(false);
    let v = nsm.verifier();
    let a = NsmAttester::new(Box::new(nsm));
    assert_eq!(a.tee(), "nitro");
    let ev = a.evidence_for(&NONCE, &NODE_KEY).unwrap();
    let ok = v.verify(&ev, &bound(), nitro_t0() + 1_000).unwrap();
    assert_eq!(ok.claims().measurement, "a0".repeat(48));
    assert_eq!(ok.claims().instance_id, "i-0fake-enc0fake");
    assert!(
        v.verify(&ev, &report_data(&[0u8; 32], &NODE_KEY), nitro_t0())
            .is_err()
    );
    // 64 bytes of report data cannot be unhashed into the two fields.
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(msg.contains("evidence_for"), "{msg}");
}

#[test]
fn nitro_errors_name_the_module_answer_and_the_device() {
    let a = NsmAttester::new(Box::new(FakeNsm::new(true)));
    let msg = usage_text(a.evidence_for(&NONCE, &NODE_KEY).unwrap_err());
    assert!(
        msg.contains("refused the attestation request: InvalidArgument"),
        "{msg}"
    );
    for bad in [&b""[..], b"\xa0", b"\xa1\x65Error\x01", b"\x82\x01\x02"] {
        assert!(matches!(
            collect::nsm::attestation_document(bad),
            Err(CollectError::Device(_))
        ));
    }
    let opts = CollectOptions {
        nsm_device: PathBuf::from("/nonexistent/weightvault-test/nsm"),
        ..CollectOptions::default()
    };
    // Reported when the attester is made, before the node asks the vault for a challenge.
    let msg = usage_text(collect::attester(TeeKind::Nitro, &opts).err().unwrap());
    assert!(
        msg.contains("/nonexistent/weightvault-test/nsm: not found"),
        "{msg}"
    );
}

// ---- A fake TPM 2.0 ---------------------------------------------------------------------------

const AK_HANDLE: u32 = 0x8101_0002;
const AZURE_AK: u32 = 0x8100_0003;
const HCL_INDEX: u32 = 0x0140_0001;

enum Ak {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

struct FakeTpm {
    ak: Ak,
    ak_handle: u32,
    pcrs: [[u8; 32]; 24],
    counter: u32,
    /// PCR_Read answers after which PCR 0 is extended (a measured event in between).
    extend_after_read: u32,
    nv: Option<Vec<u8>>,
    /// PKCS#8 of an EC AK, for certifying it.
    ak_pkcs8: Vec<u8>,
}

fn response(params: &[u8], sessions: bool) -> Vec<u8> {
    let mut body = Vec::new();
    if sessions {
        body.extend_from_slice(&(params.len() as u32).to_be_bytes());
        body.extend_from_slice(params);
        body.extend_from_slice(&[0, 0, 1, 0, 0]);
    } else {
        body.extend_from_slice(params);
    }
    let mut r = Vec::new();
    r.extend_from_slice(&(if sessions { 0x8002u16 } else { 0x8001 }).to_be_bytes());
    r.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend(body);
    r
}

fn rc_response(rc: u32) -> Vec<u8> {
    let mut r = vec![0x80, 0x01, 0, 0, 0, 10];
    r.extend_from_slice(&rc.to_be_bytes());
    r
}

fn tpm2b(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

fn selected(bitmap: &[u8]) -> Vec<usize> {
    (0..bitmap.len() * 8)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

impl FakeTpm {
    fn new(ak: Ak, ak_handle: u32) -> Self {
        let mut pcrs = [[0u8; 32]; 24];
        for (i, p) in pcrs.iter_mut().enumerate() {
            *p = [i as u8 * 3 + 1; 32];
        }
        Self {
            ak,
            ak_handle,
            pcrs,
            counter: 7,
            extend_after_read: 0,
            nv: None,
            ak_pkcs8: Vec::new(),
        }
    }

    /// TPMT_PUBLIC of a restricted ECDSA P-256 signing key (TPM 2.0 Part 2 §12.2.4).
    fn ak_tpmt_public(&self) -> Vec<u8> {
        let Ak::Ec(k) = &self.ak else {
            panic!("EC AK only")
        };
        let point = k.public_key().as_ref();
        let mut t = vec![0x00, 0x23, 0x00, 0x0b];
        t.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&[0x00, 0x10, 0x00, 0x18, 0x00, 0x0b, 0x00, 0x03, 0x00, 0x10]);
        t.extend(tpm2b(&point[1..33]));
        t.extend(tpm2b(&point[33..65]));
        t
    }

    fn spki(&self) -> Vec<u8> {
        match &self.ak {
            Ak::Ec(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
            Ak::Rsa(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
        }
    }

    fn quote(&self, extra: &[u8], bitmap: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let cat: Vec<u8> = selected(bitmap)
            .into_iter()
            .flat_map(|i| self.pcrs[i])
            .collect();
        let mut m = vec![0xff, 0x54, 0x43, 0x47, 0x80, 0x18];
        m.extend(tpm2b(
            &[0x00, 0x0b]
                .iter()
                .chain(&[0x11; 32])
                .copied()
                .collect::<Vec<_>>(),
        ));
        m.extend(tpm2b(extra));
        m.extend_from_slice(&1234u64.to_be_bytes());
        m.extend_from_slice(&5u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.push(1);
        m.extend_from_slice(&0x0001_0002_0003_0004u64.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&[0x00, 0x0b, bitmap.len() as u8]);
        m.extend_from_slice(bitmap);
        m.extend(tpm2b(digest::digest(&digest::SHA256, &cat).as_ref()));
        let sig = match &self.ak {
            Ak::Ec(k) => {
                let s = k.sign(&SystemRandom::new(), &m).unwrap();
                let (r, s) = s.as_ref().split_at(32);
                let mut out = vec![0x00, 0x18, 0x00, 0x0b];
                out.extend(tpm2b(r));
                out.extend(tpm2b(s));
                out
            }
            Ak::Rsa(k) => {
                let mut raw = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), &m, &mut raw)
                    .unwrap();
                let mut out = vec![0x00, 0x14, 0x00, 0x0b];
                out.extend(tpm2b(&raw));
                out
            }
        };
        (m, sig)
    }
}

impl TpmTransport for FakeTpm {
    fn transact(&mut self, command: &[u8]) -> Result<Vec<u8>, CollectError> {
        let cmd = TpmCommand::cast(command).expect("a well-formed command frame");
        let cc = u32::from_be_bytes(command[6..10].try_into().unwrap());
        Ok(match cc {
            0x173 => {
                let c: TpmReadPublicCommand = cmd.unmarshal().unwrap();
                if c.handles[0].value() != self.ak_handle {
                    return Ok(rc_response(0x18b));
                }
                let mut p = tpm2b(&self.ak_tpmt_public());
                p.extend_from_slice(&[0, 0, 0, 0]);
                response(&p, false)
            }
            0x17e => {
                let c: TpmPcrReadCommand = cmd.unmarshal().unwrap();
                let sel = &c.pcr_selection_in[0];
                assert_eq!(sel.hash.value(), 0x000b);
                // At most eight values per answer, like a real TPM.
                let idx: Vec<usize> = selected(&sel.pcr_select).into_iter().take(8).collect();
                let mut bitmap = [0u8; 3];
                for i in &idx {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
                let mut p = self.counter.to_be_bytes().to_vec();
                p.extend_from_slice(&1u32.to_be_bytes());
                p.extend_from_slice(&[0x00, 0x0b, 3]);
                p.extend_from_slice(&bitmap);
                p.extend_from_slice(&(idx.len() as u32).to_be_bytes());
                for i in &idx {
                    p.extend(tpm2b(&self.pcrs[*i]));
                }
                if self.extend_after_read > 0 {
                    self.extend_after_read -= 1;
                    self.pcrs[0][0] ^= 0xff;
                    self.counter += 1;
                }
                response(&p, false)
            }
            0x158 => {
                let c: TpmQuoteCommand = cmd.unmarshal().unwrap();
                if c.handles[0].value() != self.ak_handle {
                    return Ok(rc_response(0x18b));
                }
                let (m, s) = self.quote(&c.qualifying_data, &c.pcr_select[0].pcr_select);
                let mut p = tpm2b(&m);
                p.extend(s);
                response(&p, true)
            }
            0x169 => {
                let nv = self.nv.as_ref().expect("NV index defined");
                let mut public = HCL_INDEX.to_be_bytes().to_vec();
                public.extend_from_slice(&[0x00, 0x0b, 0x00, 0x04, 0x00, 0x04, 0x00, 0x00]);
                public.extend_from_slice(&(nv.len() as u16).to_be_bytes());
                let mut p = tpm2b(&public);
                p.extend_from_slice(&[0, 0]);
                response(&p, false)
            }
            0x14e => {
                let c: TpmNvReadCommand = cmd.unmarshal().unwrap();
                let nv = self.nv.as_ref().unwrap();
                let (o, n) = (usize::from(c.offset.value()), usize::from(c.size.value()));
                assert!(n <= 1024);
                response(&tpm2b(&nv[o..o + n]), true)
            }
            other => panic!("unexpected TPM command {other:#x}"),
        })
    }
}

/// A test AK CA: root → AK certificate with the TCG AIK purpose (2.23.133.8.3).
fn ak_certificate(tpm: &FakeTpm) -> (String, Vec<u8>) {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root = CertifiedIssuer::self_signed(ca_params("AK test root"), root_key).unwrap();
    let public = KeyPair::try_from(tpm.ak_pkcs8.as_slice()).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![2, 23, 133, 8, 3])];
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2030, 1, 1);
    let cert = p.signed_by(&public, &root).unwrap();
    (root.pem(), cert.der().to_vec())
}

fn ec_tpm() -> FakeTpm {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let mut tpm = FakeTpm::new(Ak::Ec(k), AK_HANDLE);
    tpm.ak_pkcs8 = pkcs8.as_ref().to_vec();
    tpm
}

#[test]
fn tpm_quote_with_ak_certificate_verifies_with_the_binding() {
    let tpm = ec_tpm();
    let (root_pem, cert) = ak_certificate(&tpm);
    let spki = tpm.spki();
    let pcrs = PcrSelection::new(&[0, 1, 2, 3, 4, 5, 6, 7, 14, 23]).unwrap();
    let a = TpmAttester::tpm(Box::new(tpm), AK_HANDLE, pcrs, vec![cert]).unwrap();
    assert_eq!(a.tee(), "tpm");
    let ev = a.evidence_for(&NONCE, &NODE_KEY).unwrap();
    let v = TpmVerifier::new(TpmPolicy {
        ak_roots: Some(vec![root_pem]),
        ..TpmPolicy::default()
    })
    .unwrap();
    let ok = v.verify(&ev, &bound(), NOW).unwrap();
    let c = ok.claims();
    assert_eq!(c.details["ak_trust"], "certificate");
    assert_eq!(c.details["pcr_selection"], "0,1,2,3,4,5,6,7,14,23");
    assert_eq!(c.details["pcr23"], hex::encode([70u8; 32]));
    assert_eq!(
        c.instance_id,
        hex::encode(digest::digest(&digest::SHA256, &spki))
    );
    assert!(
        v.verify(&ev, &report_data(&NONCE, &[0u8; 32]), NOW)
            .is_err()
    );
}

#[test]
fn tpm_pcr_changes_during_collection_are_retried_then_refused() {
    let mut tpm = ec_tpm();
    let fp = hex::encode(digest::digest(&digest::SHA256, &tpm.spki()));
    tpm.extend_after_read = 1;
    let a = TpmAttester::tpm(
        Box::new(tpm),
        AK_HANDLE,
        PcrSelection::new(&collect::DEFAULT_PCRS).unwrap(),
        vec![],
    )
    .unwrap();
    let ev = a.evidence(&bound()).unwrap();
    let v = TpmVerifier::new(TpmPolicy {
        pinned_aks: vec![fp],
        ..TpmPolicy::default()
    })
    .unwrap();
    assert_eq!(
        v.verify(&ev, &bound(), NOW).unwrap().claims().details["ak_trust"],
        "pinned"
    );

    let mut busy = ec_tpm();
    busy.extend_after_read = u32::MAX;
    let a = TpmAttester::tpm(
        Box::new(busy),
        AK_HANDLE,
        PcrSelection::new(&collect::DEFAULT_PCRS).unwrap(),
        vec![],
    )
    .unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("PCRs changed between reading and quoting"),
        "{msg}"
    );
}

#[test]
fn tpm_errors_name_the_command_and_the_device() {
    let a = TpmAttester::tpm(
        Box::new(ec_tpm()),
        0x8101_0009,
        PcrSelection::new(&[0]).unwrap(),
        vec![],
    )
    .unwrap();
    let msg = usage_text(a.evidence(&bound()).unwrap_err());
    assert!(
        msg.contains("TPM2_ReadPublic failed with response code 0x018b"),
        "{msg}"
    );
    for bad in [&[][..], &[24u8][..], &[3, 3][..]] {
        assert!(PcrSelection::new(bad).is_err());
    }
    let opts = CollectOptions {
        tpm_device: PathBuf::from("/nonexistent/weightvault-test/tpmrm0"),
        ak_handle: Some(AK_HANDLE),
        ..CollectOptions::default()
    };
    let msg = usage_text(collect::attester(TeeKind::Tpm, &opts).err().unwrap());
    assert!(
        msg.contains("/nonexistent/weightvault-test/tpmrm0: not found"),
        "{msg}"
    );
    let device = tempfile::NamedTempFile::new().unwrap();
    let no_handle = CollectOptions {
        ak_handle: None,
        tpm_device: device.path().to_path_buf(),
        ..opts
    };
    let msg = usage_text(collect::attester(TeeKind::Tpm, &no_handle).err().unwrap());
    assert!(msg.contains("--ak-handle"), "{msg}");
}

/// An Azure HCL report: header, the SNP report, IGVM request data with the var JSON, and the
/// zero padding of the NV index.
fn hcl_report(hw: &[u8], var: &[u8]) -> Vec<u8> {
    let data_size = 20 + var.len();
    let report_size = 0x20 + REPORT_LEN + data_size;
    let mut b = b"HCLA".to_vec();
    for v in [2u32, report_size as u32, 2, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(0x20, 0);
    b.extend_from_slice(hw);
    for v in [data_size as u32, 1, 2, 1, var.len() as u32] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(var);
    b.resize(report_size + 300, 0);
    b
}

#[test]
fn azure_snp_vtpm_hcl_report_and_quote_verify_with_the_binding() {
    let snp = Snp::new();
    let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let public = rsa.public_key();
    let var = serde_json::to_vec(&serde_json::json!({
        "keys": [{
            "kid": "HCLAkPub",
            "kty": "RSA",
            "key_ops": ["sign"],
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        }],
        "vm-configuration": {"console-enabled": false, "secure-boot": true, "tpm-enabled": true},
        "user-data": "00",
    }))
    .unwrap();
    let mut rd = digest::digest(&digest::SHA256, &var).as_ref().to_vec();
    rd.resize(64, 0);
    let mut tpm = FakeTpm::new(Ak::Rsa(rsa), AZURE_AK);
    tpm.nv = Some(hcl_report(&snp.report(&rd), &var));
    let a = TpmAttester::azure(
        TeeKind::AzSnpVtpm,
        Box::new(tpm),
        collect::AZURE_AK_HANDLE,
        PcrSelection::new(&collect::DEFAULT_PCRS).unwrap(),
        AzureHardware::snp(vec![snp.vcek.clone(), snp.ask.clone()]).unwrap(),
    )
    .unwrap();
    assert_eq!(a.tee(), "az-snp-vtpm");
    let ev = a.evidence_for(&NONCE, &NODE_KEY).unwrap();
    let v = AzureVtpmVerifier::new(
        TeeKind::AzSnpVtpm,
        AzureVtpmPolicy {
            snp: snp.policy(),
            ..AzureVtpmPolicy::default()
        },
    )
    .unwrap();
    let ok = v.verify(&ev, &bound(), NOW).unwrap();
    assert_eq!(ok.claims().tee, TeeKind::AzSnpVtpm);
    assert_eq!(ok.claims().measurement, "5a".repeat(48));
    assert!(
        v.verify(&ev, &report_data(&[1u8; 32], &NODE_KEY), NOW)
            .is_err()
    );
    // Without a VCEK there is nothing to anchor the HCL report.
    assert!(AzureHardware::snp(vec![snp.ask.clone()]).is_err());
}

#[test]
fn attesters_are_chosen_by_tee_kind() {
    let fake = FakeTsm::start(SNP_PROVIDER, 0, Arc::new(|_: &[u8]| (vec![], vec![])));
    // Stand-ins for the device nodes: the attester only checks that they exist when made.
    let devices = tempfile::tempdir().unwrap();
    let (nsm, tpm) = (devices.path().join("nsm"), devices.path().join("tpmrm0"));
    std::fs::write(&nsm, b"").unwrap();
    std::fs::write(&tpm, b"").unwrap();
    let opts = CollectOptions {
        tsm_dir: fake.root().to_path_buf(),
        nsm_device: nsm,
        tpm_device: tpm,
        ak_handle: Some(AK_HANDLE),
        ..CollectOptions::default()
    };
    for (tee, name) in [
        (TeeKind::Snp, "snp"),
        (TeeKind::Nitro, "nitro"),
        (TeeKind::Tpm, "tpm"),
    ] {
        assert_eq!(collect::attester(tee, &opts).unwrap().tee(), name);
    }
    let msg = usage_text(collect::attester(TeeKind::Sim, &opts).err().unwrap());
    assert!(msg.contains("sim"), "{msg}");
    let msg = usage_text(collect::attester(TeeKind::AzSnpVtpm, &opts).err().unwrap());
    assert!(msg.contains("VCEK"), "{msg}");
    let bad_pcrs = CollectOptions {
        pcrs: vec![40],
        ..opts
    };
    assert!(collect::attester(TeeKind::Tpm, &bad_pcrs).is_err());
}
