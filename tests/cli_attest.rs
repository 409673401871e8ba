//! `weightvault attest verify` on real evidence as it is stored in ../shared/vectors/attest:
//! form detection, certificates and collateral from files, the time as RFC 3339, the strict
//! default policy and an operator policy from --config.

#[path = "common/vectors.rs"]
mod vectors;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_weightvault");

/// The vectors directory, or None (skipped) outside CI; under CI=true a missing one fails.
fn vectors() -> Option<PathBuf> {
    vectors::shared("attest", "", "attestation")
}

fn verify(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["attest", "verify", "--json"])
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn tdx_quote_with_collateral_file() {
    let Some(v) = vectors() else { return };
    let quote = v.join("tdx/dcap-qvl/tdx_quote");
    // TD report body after the 48-byte header; REPORTDATA at offset 520 (Intel TDX DCAP Quote
    // Library API, TD report layout).
    let bytes = std::fs::read(&quote).unwrap();
    let rd = hex::encode(&bytes[48 + 520..48 + 584]);
    let coll = v.join("tdx/dcap-qvl/tdx_quote_collateral.json");
    let args = |at: &'static str| {
        vec![
            "--tee".to_string(),
            "tdx".into(),
            "--evidence".into(),
            quote.display().to_string(),
            "--collateral".into(),
            coll.display().to_string(),
            "--report-data".into(),
            rd.clone(),
            "--at".into(),
            at.into(),
        ]
    };
    let ok = verify(
        &args("2025-06-20T12:00:00Z")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let j = json(&ok);
    assert_eq!(
        j["claims"]["measurement"].as_str().unwrap()[..16],
        *"91eb2b44d141d4ec"
    );
    assert_eq!(j["claims"]["details"]["tcb_status"], "UpToDate");
    // After the collateral's nextUpdate.
    let late = verify(
        &args("2025-08-01T00:00:00Z")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(late.status.code(), Some(1));
    assert_eq!(json(&late)["ok"], false);
    // The debug TD (T4) is refused whatever else holds.
    let t4 = verify(&[
        "--tee",
        "tdx",
        "--evidence",
        v.join("tdx/trustee/tdx_quote_4.dat").to_str().unwrap(),
        "--report-data",
        &"00".repeat(64),
    ]);
    assert_eq!(json(&t4)["reason"], "debug mode");
}

#[test]
fn tpm_quote_from_go_tpm_tools_protobuf() {
    let Some(v) = vectors() else { return };
    let pb = v.join("tpm/gce-go-tpm-tools/gce-cos-85-nonce9009.pb");
    let o = verify(&[
        "--tee",
        "tpm",
        "--evidence",
        pb.to_str().unwrap(),
        "--nonce",
        "9009",
        "--at",
        "2025-01-01T00:00:00Z",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        json(&o)["claims"]["measurement"]
            .as_str()
            .unwrap()
            .starts_with("048937cb")
    );
    let no_nonce = v.join("tpm/gce-go-tpm-tools/gce-cos-85-no-nonce.pb");
    let o = verify(&[
        "--tee",
        "tpm",
        "--evidence",
        no_nonce.to_str().unwrap(),
        "--nonce",
        "9009",
        "--at",
        "2025-01-01T00:00:00Z",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn snp_strict_default_policy_and_an_operator_floor() {
    let Some(v) = vectors() else { return };
    let report = v.join("snp/trustee-milan-vcek/test-report.bin");
    let vcek = v.join("snp/trustee-milan-vcek/test-vcek.der");
    let rd = format!(
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2{}",
        "00".repeat(32)
    );
    let base = [
        "--tee",
        "snp",
        "--evidence",
        report.to_str().unwrap(),
        "--certs",
        vcek.to_str().unwrap(),
        "--report-data",
        &rd,
        "--at",
        "2025-06-01T00:00:00Z",
    ];
    // Default policy: the reported TCB (SNP SVN 8) is below the Milan floor.
    let o = verify(&base);
    assert_eq!(o.status.code(), Some(1));
    let j = json(&o);
    assert_eq!(j["ok"], false);
    assert!(j["detail"].as_str().unwrap().contains("tcb"), "{j}");
    // An operator who accepts that TCB says so in the config.
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = weightvault::config::dev::ensure(tmp.path()).unwrap();
    let mut cfg = weightvault::config::Config::load(&path).unwrap();
    cfg.attest.snp.policy.min_tcb.milan = Some(weightvault::attest::snp::SnpTcbFloor {
        bootloader: 3,
        tee: 0,
        snp: 8,
        microcode: 115,
        fmc: 0,
    });
    let custom = tmp.path().join("custom.toml");
    std::fs::write(&custom, toml::to_string(&cfg).unwrap()).unwrap();
    let mut args = base.to_vec();
    args.extend(["--config", custom.to_str().unwrap()]);
    let o = verify(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let j = json(&o);
    assert_eq!(j["claims"]["tee"], "snp");
    assert_eq!(j["claims"]["details"]["vmpl"], "0");
    // Another report data: the binding fails.
    let mut wrong = args.clone();
    let other = "11".repeat(64);
    wrong[7] = &other;
    assert_eq!(
        json(&verify(&wrong))["reason"],
        "report data does not bind nonce and key"
    );
}
