//! Azure vTPM verifier (`az-snp-vtpm`, `az-tdx-vtpm`) on the real samples of
//! vectors/attest/INDEX.md §2 and §4 (A1 trio, A2 evidence-v0.json, A3 evidence-v1.json, the
//! TDX evidence-v0.json), plus mutations of every signed part.

#[path = "common/vectors.rs"]
mod vectors;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use weightvault::attest::azure::{
    AzureVtpmPolicy, AzureVtpmVerifier, Bundle, RULE_CONSOLE, bundle_from_inputs, fuzz_parse,
};
use weightvault::attest::snp::{SnpProduct, SnpRootOverride, SnpTcbFloor};
use weightvault::attest::{AttestError, TeeKind, Verifier};

/// 2025-06-01T00:00:00Z: inside both VCEKs' validity (A1 2023-05-02→2030-05-02, A2/A3
/// 2025-01-28→2032-01-28).
const NOW_MS: u64 = 1_748_736_000_000;
/// 2033-01-01T00:00:00Z: after both VCEKs' notAfter.
const AFTER_MS: u64 = 1_988_150_400_000;
/// 2024-01-01T00:00:00Z: before the A2 VCEK's notBefore.
const BEFORE_MS: u64 = 1_704_067_200_000;
const NONCE: &[u8] = b"challenge";
const A1_PCR0: &str = "f3a7e99a5f819a034386bce753a48a73cfdaa0bea0ecfc124bedbf5a8c4799be";
const A2_PCR0: &str = "e15c44796beabf46abcec7c57e590942041e47497e4ec27571c8b7664f48dced";

fn vectors() -> Option<PathBuf> {
    vectors::shared("attest", "az-snp-vtpm", "Azure")
}

macro_rules! vectors_or_skip {
    () => {
        match vectors() {
            Some(d) => d,
            None => return,
        }
    };
}

fn read(dir: &Path, p: &str) -> Vec<u8> {
    std::fs::read(dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn a1(dir: &Path) -> Vec<u8> {
    let s = "az-snp-vtpm/trustee/";
    bundle_from_inputs(
        &read(dir, &format!("{s}hcl-report.bin")),
        &[
            read(dir, &format!("{s}tpm-quote-v1.json")),
            read(dir, &format!("{s}vcek.pem")),
        ],
        None,
    )
    .unwrap()
}

fn a2(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "az-snp-vtpm/trustee/evidence-v0.json"),
        &[],
        None,
    )
    .unwrap()
}

fn a3(dir: &Path) -> Vec<u8> {
    bundle_from_inputs(
        &read(dir, "az-snp-vtpm/trustee/evidence-v1.json"),
        &[],
        None,
    )
    .unwrap()
}

fn console_ok() -> AzureVtpmPolicy {
    AzureVtpmPolicy {
        allow_console: true,
        ..AzureVtpmPolicy::default()
    }
}

/// A1 is a report v2 with SNP SVN 8: below the default Milan floor (INDEX.md §10).
fn a1_policy() -> AzureVtpmPolicy {
    let mut p = console_ok();
    p.snp.min_tcb.milan = Some(SnpTcbFloor {
        bootloader: 0,
        tee: 0,
        snp: 0,
        microcode: 0,
        fmc: 0,
    });
    p
}

fn snp(p: AzureVtpmPolicy) -> AzureVtpmVerifier {
    AzureVtpmVerifier::new(TeeKind::AzSnpVtpm, p).unwrap()
}

fn edit(bundle: &[u8], f: impl FnOnce(&mut Bundle)) -> Vec<u8> {
    let mut b = Bundle::parse(bundle).unwrap();
    f(&mut b);
    b.encode().unwrap()
}

#[test]
fn a2_and_a3_verify_with_the_challenge_nonce() {
    let dir = vectors_or_skip!();
    let v = snp(console_ok());
    let c2 = v.verify_with_nonce(&a2(&dir), NONCE, NOW_MS).unwrap();
    let c3 = v.verify_with_nonce(&a3(&dir), NONCE, NOW_MS).unwrap();
    // A3 is the same VM as A2 (two reports: quotes and TPM clock differ).
    assert_eq!(c2.measurement, c3.measurement);
    assert_eq!(c2.instance_id, c3.instance_id);
    assert_eq!(c3.details["pcr0"], A2_PCR0);
    assert_eq!(c2.tee, TeeKind::AzSnpVtpm);
    assert!(!c2.debug && !c2.simulated);
    assert_eq!(c2.measurement.len(), 96);
    assert_eq!(c2.instance_id.len(), 128);
    let d = &c2.details;
    assert_eq!(d["pcr0"], A2_PCR0);
    assert_eq!(d["vmpl"], "0");
    assert_eq!(d["report_version"], "3");
    assert_eq!(d["firmware_version"], "1.55.29");
    assert_eq!(
        (
            d["tcb.bootloader"].as_str(),
            d["tcb.tee"].as_str(),
            d["tcb.snp"].as_str(),
            d["tcb.microcode"].as_str()
        ),
        ("4", "0", "24", "219")
    );
    assert_eq!(d["product"], "milan");
    assert_eq!(d["vm_configuration.console-enabled"], "true");
    assert_eq!(d["vm_configuration.secure-boot"], "true");
    assert_eq!(d["pcr_bank"], "sha256");
    assert!(d.contains_key("pcr23") && d.contains_key("ak_spki_sha256"));
    assert_eq!(
        d["hcl.var_sha256"],
        "af2910341dd8108360e485f1b72494255190b9cdd5ccb44b73b883037cf99f21"
    );
    assert_eq!(c2.evidence_time_ms, NOW_MS);
}

#[test]
fn a1_trio_verifies_only_with_a_relaxed_tcb_floor() {
    let dir = vectors_or_skip!();
    let b = a1(&dir);
    // INDEX.md §10: report v2, SNP SVN 8 < 0x18.
    assert!(matches!(
        snp(console_ok()).verify_with_nonce(&b, NONCE, NOW_MS),
        Err(AttestError::Policy {
            rule: "tcb below minimum",
            ..
        })
    ));
    let c = snp(a1_policy())
        .verify_with_nonce(&b, NONCE, NOW_MS)
        .unwrap();
    assert_eq!(c.details["pcr0"], A1_PCR0);
    assert!(c.details["pcr0"].starts_with("f3a7e99a5f819a03"));
    assert_eq!(c.details["report_version"], "2");
    assert_eq!(c.details["vm_configuration.console-enabled"], "true");
}

#[test]
fn console_enabled_is_refused_by_default() {
    let dir = vectors_or_skip!();
    for b in [a2(&dir), a3(&dir)] {
        assert!(matches!(
            snp(AzureVtpmPolicy::default()).verify_with_nonce(&b, NONCE, NOW_MS),
            Err(AttestError::Policy {
                rule: RULE_CONSOLE,
                ..
            })
        ));
    }
    let mut p = a1_policy();
    p.allow_console = false;
    assert!(matches!(
        snp(p).verify_with_nonce(&a1(&dir), NONCE, NOW_MS),
        Err(AttestError::Policy {
            rule: RULE_CONSOLE,
            ..
        })
    ));
}

#[test]
fn wrong_nonce_and_report_data_are_binding_mismatches() {
    let dir = vectors_or_skip!();
    let v = snp(console_ok());
    let b = a2(&dir);
    for n in [&b"challengf"[..], b"challeng", b"challenge\0"] {
        assert_eq!(
            v.verify_with_nonce(&b, n, NOW_MS),
            Err(AttestError::BindingMismatch)
        );
    }
    assert!(matches!(
        v.verify_with_nonce(&b, b"", NOW_MS),
        Err(AttestError::Policy { .. })
    ));
    // The vault protocol: the samples bind "challenge", not 32/64 bytes of report data.
    let mut rd = [0u8; 64];
    rd[..9].copy_from_slice(NONCE);
    assert_eq!(
        v.verify(&b, &rd, NOW_MS).unwrap_err(),
        AttestError::BindingMismatch
    );
}

#[test]
fn verification_time_outside_the_vcek_validity_is_expired() {
    let dir = vectors_or_skip!();
    let v = snp(console_ok());
    for t in [AFTER_MS, BEFORE_MS] {
        assert!(matches!(
            v.verify_with_nonce(&a2(&dir), NONCE, t),
            Err(AttestError::Expired(_))
        ));
    }
}

#[test]
fn mutations_are_rejected() {
    let dir = vectors_or_skip!();
    let v = snp(console_ok());
    let good = a2(&dir);
    let check = |b: Vec<u8>, want: fn(&AttestError) -> bool, what: &str| {
        let r = v.verify_with_nonce(&b, NONCE, NOW_MS);
        assert!(r.as_ref().is_err_and(want), "{what}: {r:?}");
    };
    // A bit of the var JSON (inside the JSON string of the AK modulus): REPORT_DATA mismatch.
    check(
        edit(&good, |b| b.hcl_report[0x4c0 + 20 + 120] ^= 0x01),
        |e| *e == AttestError::BindingMismatch,
        "var json",
    );
    // A bit of the signed SNP report (MEASUREMENT at 0x90).
    check(
        edit(&good, |b| b.hcl_report[0x20 + 0x90] ^= 0x01),
        |e| *e == AttestError::BadSignature,
        "snp report",
    );
    // The SNP signature.
    check(
        edit(&good, |b| b.hcl_report[0x20 + 0x2a0] ^= 0x01),
        |e| *e == AttestError::BadSignature,
        "snp signature",
    );
    // The TPM quote (clock field) and its signature.
    check(
        edit(&good, |b| b.message[60] ^= 0x01),
        |e| *e == AttestError::BadSignature,
        "tpm quote",
    );
    check(
        edit(&good, |b| b.signature[10] ^= 0x01),
        |e| *e == AttestError::BadSignature,
        "tpm signature",
    );
    // A PCR value no longer hashes to the signed pcrDigest.
    check(
        edit(&good, |b| {
            let p = b.pcrs.get_mut("5").unwrap();
            let flipped = if p.starts_with('0') { "1" } else { "0" };
            p.replace_range(0..1, flipped);
        }),
        |e| *e == AttestError::BadSignature,
        "pcr",
    );
    // The VCEK (a byte of its signature, at the end of the DER).
    check(
        edit(&good, |b| {
            let vcek = b.vcek.as_mut().unwrap();
            let n = vcek.len() - 5;
            vcek[n] ^= 0x01;
        }),
        |e| matches!(e, AttestError::Chain(_) | AttestError::UntrustedKey),
        "vcek",
    );
    // Trailing garbage in the HCL padding.
    check(
        edit(&good, |b| b.hcl_report[2599] = 1),
        |e| matches!(e, AttestError::Malformed(_)),
        "padding",
    );
}

/// INDEX.md §10: the legacy `tpm-quote.{msg,sig}` do not verify with the AK of hcl-report.bin.
/// That pair is not in this selection of vectors; the same situation — a genuine quote signed by
/// another vTPM's AK — is built from A2's quote with A1's HCL report.
#[test]
fn quote_signed_by_another_ak_is_bad_signature() {
    let dir = vectors_or_skip!();
    let legacy = dir.join("az-snp-vtpm/trustee/tpm-quote.msg");
    let a2b = Bundle::parse(&a2(&dir)).unwrap();
    let foreign = edit(&a1(&dir), |b| {
        if legacy.is_file() {
            b.message = read(&dir, "az-snp-vtpm/trustee/tpm-quote.msg");
            b.signature = read(&dir, "az-snp-vtpm/trustee/tpm-quote.sig");
        } else {
            eprintln!("legacy tpm-quote.msg not present: using A2's quote under A1's AK");
            b.message = a2b.message.clone();
            b.signature = a2b.signature.clone();
            b.pcrs = a2b.pcrs.clone();
        }
    });
    assert_eq!(
        snp(a1_policy()).verify_with_nonce(&foreign, NONCE, NOW_MS),
        Err(AttestError::BadSignature)
    );
}

#[test]
fn foreign_root_is_untrusted() {
    let dir = vectors_or_skip!();
    let genoa = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/attest/roots/snp/genoa_ask_ark_asvk.pem"),
    )
    .unwrap();
    let mut p = console_ok();
    p.snp.roots = vec![SnpRootOverride {
        product: SnpProduct::Genoa,
        pem: genoa,
    }];
    let r = snp(p).verify_with_nonce(&a2(&dir), NONCE, NOW_MS);
    assert!(
        matches!(r, Err(AttestError::Chain(_) | AttestError::UntrustedKey)),
        "{r:?}"
    );
}

#[test]
fn bundle_forms_agree_and_round_trip() {
    let dir = vectors_or_skip!();
    let b2 = a2(&dir);
    assert_eq!(bundle_from_inputs(&b2, &[], None).unwrap(), b2);
    let (p2, p3) = (
        Bundle::parse(&b2).unwrap(),
        Bundle::parse(&a3(&dir)).unwrap(),
    );
    assert_eq!(p2.hcl_report.len(), 2600);
    assert_eq!(p3.hcl_report.len(), 2600);
    assert_eq!(p2.pcrs["0"], p3.pcrs["0"]);
    assert_eq!(p2.vcek, p3.vcek, "same VM, same VCEK");
    assert_eq!(p2.signature.len(), 256);
    // The trio: the HCL report as base64 text works too.
    let s = "az-snp-vtpm/trustee/";
    let text = STANDARD.encode(read(&dir, &format!("{s}hcl-report.bin")));
    let from_text = bundle_from_inputs(
        text.as_bytes(),
        &[
            read(&dir, &format!("{s}tpm-quote-v1.json")),
            read(&dir, &format!("{s}vcek.pem")),
        ],
        None,
    )
    .unwrap();
    assert_eq!(from_text, a1(&dir));
    // Without a quote there is no bundle.
    assert!(matches!(
        bundle_from_inputs(&read(&dir, &format!("{s}hcl-report.bin")), &[], None),
        Err(AttestError::Malformed(_))
    ));
    for b in [&b2, &from_text] {
        fuzz_parse(b);
    }
}

#[test]
fn tdx_sample_needs_collateral() {
    let dir = vectors_or_skip!();
    let raw = read(&dir, "az-tdx-vtpm/trustee/evidence-v0.json");
    let b = bundle_from_inputs(&raw, &[], None).unwrap();
    let parsed = Bundle::parse(&b).unwrap();
    assert_eq!(parsed.td_quote.as_ref().map(Vec::len), Some(5006));
    assert_eq!(parsed.pcrs.len(), 24);
    let tdx = AzureVtpmVerifier::new(TeeKind::AzTdxVtpm, console_ok()).unwrap();
    assert_eq!(tdx.tee(), TeeKind::AzTdxVtpm);
    // INDEX.md §4: no DCAP collateral was published with the sample.
    match tdx.verify_with_nonce(&b, NONCE, NOW_MS) {
        Err(AttestError::Malformed(m)) => assert!(m.contains("collateral"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The kinds do not mix.
    assert!(matches!(
        snp(console_ok()).verify_with_nonce(&b, NONCE, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    assert!(matches!(
        tdx.verify_with_nonce(&a2(&dir), NONCE, NOW_MS),
        Err(AttestError::Malformed(_))
    ));
    // The var JSON hash is what the TD quote's REPORTDATA carries (self-check of the sample).
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert!(v.get("td_quote").is_some());
}
