//! The root key's seals against a real vault: shamir init and unseal (threshold met, one short,
//! wrong, duplicate and malformed shares), every other RPC refused while sealed, a restart seals
//! again, rekey and the file → shamir migration keep every model readable, PKCS#11 on SoftHSM,
//! and the file seal refused outside `--dev`.

mod common;

use std::path::Path;

use common::{MEASUREMENT, Vault, model_dir, with_action};
use tonic::Code;
use weightvault::client::operator::OperatorClient;
use weightvault::config::SealConfig;
use weightvault::config::dev::files;
use weightvault::keys::shamir;
use weightvault::time::{Clock, ManualClock, SystemClock};
use zeroize::Zeroizing;

fn clock() -> ManualClock {
    ManualClock::new(SystemClock.now_ms())
}

async fn start_shamir(dir: &Path) -> Vault {
    Vault::start_configured(dir, clock(), |c| c.seal = SealConfig::Shamir {}).await
}

/// Starts a vault from `cfg` expecting a refusal; returns the whole error chain as text.
async fn start_refused(cfg: &weightvault::config::Config, why: &str) -> String {
    let err = weightvault::server::start(
        cfg,
        weightvault::server::StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .err()
    .expect(why);
    format!("{:#}", anyhow::Error::from(err))
}

async fn operator(v: &Vault) -> OperatorClient {
    OperatorClient::new(v.channel(None).await)
}

async fn admin_operator(v: &Vault) -> OperatorClient {
    OperatorClient::new(v.channel(Some((files::ADMIN_CERT, files::ADMIN_KEY))).await)
}

fn code(e: weightvault::client::ClientError) -> (Code, String) {
    match e {
        weightvault::client::ClientError::Status(s) => (s.code(), s.message().to_string()),
        other => panic!("not a status: {other}"),
    }
}

/// Every RPC named in the proto files, as (service, method).
fn all_rpcs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/weightvault/v1")).unwrap()
    {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = Some(rest.trim_end_matches('{').trim().to_string());
            } else if let (Some(s), Some(rest)) = (&service, line.strip_prefix("rpc ")) {
                let name = rest.split('(').next().unwrap().trim().to_string();
                out.push((s.clone(), name));
            }
        }
    }
    assert!(out.len() >= 25, "proto parse found only {}", out.len());
    out
}

#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// Calls `/weightvault.v1.<service>/<method>` with an empty message; returns the status code.
async fn raw_call(ch: tonic::transport::Channel, service: &str, method: &str) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/weightvault.v1.{service}/{method}")
            .parse()
            .unwrap();
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    match grpc.unary(tonic::Request::new(Empty {}), path, codec).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// Walks every RPC with and without the admin certificate; all but the operator's Status,
/// Unseal and Init must be UNAVAILABLE with the sealed message.
async fn assert_everything_refused_while_sealed(v: &Vault) {
    for ch in [
        v.channel(None).await,
        v.channel(Some((files::ADMIN_CERT, files::ADMIN_KEY))).await,
    ] {
        for (service, method) in all_rpcs() {
            let (code, msg) = raw_call(ch.clone(), &service, &method).await;
            if service == "OperatorService" {
                assert_ne!(code, Code::Unimplemented, "{service}/{method}");
                if matches!(method.as_str(), "Rekey" | "RekeyCommit") {
                    assert_eq!(code, Code::Unavailable, "{service}/{method}: {msg}");
                }
                continue;
            }
            assert_eq!(code, Code::Unavailable, "{service}/{method}: {msg}");
            assert!(msg.contains("vault is sealed"), "{service}/{method}: {msg}");
        }
    }
    // Health answers while sealed, and says NOT_SERVING from the first call on.
    use tonic_health::pb::health_check_response::ServingStatus;
    for service in ["", "weightvault.v1.NodeService"] {
        let r = tonic_health::pb::health_client::HealthClient::new(v.channel(None).await)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers while sealed")
            .into_inner();
        assert_eq!(r.status, ServingStatus::NotServing as i32, "{service:?}");
    }
}

async fn fetch_ok(v: &Vault, tmp: &Path, out: &str) {
    let out = tmp.join(out);
    v.fetch_into("m", &out).await.unwrap();
    common::assert_same_tree(&tmp.join("model-src"), &out);
}

async fn push_and_allow(v: &Vault, tmp: &Path) {
    v.push_dir("m", &model_dir(tmp)).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
}

async fn unseal_with(v: &Vault, shares: &[&str]) -> weightvault::proto::v1::SealStatusResponse {
    let mut op = operator(v).await;
    let mut last = None;
    for s in shares {
        last = Some(op.unseal(s).await.unwrap());
    }
    last.unwrap()
}

#[tokio::test]
async fn shamir_init_then_unseal_at_exactly_the_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let v = start_shamir(&tmp.path().join("data")).await;
    let mut op = operator(&v).await;
    let s = op.status().await.unwrap();
    assert_eq!(
        (s.state.as_str(), s.seal.as_str()),
        ("uninitialized", "shamir")
    );

    // Init needs the admin role.
    let (c, _) = code(op.init(5, 3).await.unwrap_err());
    assert_eq!(c, Code::Unauthenticated);
    let mut admin = admin_operator(&v).await;
    let (c, m) = code(admin.init(2, 3).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    let init = admin.init(5, 3).await.unwrap();
    assert_eq!(init.shares.len(), 5);
    assert_eq!(init.threshold, 3);
    // A second init is refused once a ring exists; before that it may replace lost shares.
    let s = op.status().await.unwrap();
    assert_eq!(
        (s.state.as_str(), s.progress, s.threshold),
        ("sealed", 0, 3)
    );

    assert_everything_refused_while_sealed(&v).await;

    // Malformed: refused, progress unchanged.
    let (c, _) = code(op.unseal("wvs1-nothex").await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    let mut typo = init.shares[0].clone().into_bytes();
    let i = typo.len() - 20;
    typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
    let (c, m) = code(
        op.unseal(&String::from_utf8(typo).unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("malformed share"), "{m}");

    let s = op.unseal(&init.shares[0]).await.unwrap();
    assert_eq!((s.state.as_str(), s.progress), ("sealed", 1));
    // Duplicate: refused, progress unchanged.
    let (c, m) = code(op.unseal(&init.shares[0]).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("already submitted"), "{m}");
    // One short of the threshold: still sealed, still refusing.
    let s = op.unseal(&init.shares[3]).await.unwrap();
    assert_eq!((s.state.as_str(), s.progress), ("sealed", 2));
    let (c, _) = code(v.admin().await.list().await.unwrap_err());
    assert_eq!(c, Code::Unavailable);
    // The threshold exactly.
    let s = op.unseal(&init.shares[4]).await.unwrap();
    assert_eq!(s.state, "unsealed");
    let (c, _) = code(op.unseal(&init.shares[1]).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition);

    push_and_allow(&v, tmp.path()).await;
    fetch_ok(&v, tmp.path(), "out").await;

    // The attempts made while sealed are on the record now, with the outcome.
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "seal_init").len(), 1);
    let unseal = with_action(&entries, "unseal");
    let reasons: Vec<&str> = unseal
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"malformed share refused"), "{reasons:?}");
    assert!(reasons.contains(&"duplicate share refused"), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("unsealed with 3 of 5 shares")),
        "{reasons:?}"
    );
    // No share text is on the record.
    let all = serde_json::to_string(&entries).unwrap();
    for s in &init.shares {
        assert!(!all.contains(&s[5..40]));
    }
}

#[tokio::test]
async fn a_wrong_share_resets_progress_without_saying_which() {
    let tmp = tempfile::tempdir().unwrap();
    let v = start_shamir(&tmp.path().join("data")).await;
    let init = admin_operator(&v).await.init(3, 2).await.unwrap();
    let mut op = operator(&v).await;
    // A well-formed share of the same generation and threshold, from another root key.
    let generation: [u8; 8] = hex::decode(&init.generation).unwrap().try_into().unwrap();
    let other = weightvault::keys::RootKey::generate().unwrap();
    let forged = shamir::split(&other, generation, 3, 2).unwrap();
    op.unseal(&init.shares[0]).await.unwrap();
    let (c, m) = code(op.unseal(&forged[1].to_text()).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("do not open this vault"), "{m}");
    assert!(!m.contains("share 2") && !m.contains("share 1"), "{m}");
    let s = op.status().await.unwrap();
    assert_eq!((s.state.as_str(), s.progress), ("sealed", 0));
    // A share of another generation is refused up front.
    let stale = shamir::split(&other, [0xee; 8], 3, 2).unwrap();
    let (c, m) = code(op.unseal(&stale[0].to_text()).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("another root key"), "{m}");
    // The right ones still work.
    let s = unseal_with(&v, &[&init.shares[2], &init.shares[1]]).await;
    assert_eq!(s.state, "unsealed");
}

#[tokio::test]
async fn a_restart_seals_again_and_other_shares_unseal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut v = start_shamir(&dir).await;
    let init = admin_operator(&v).await.init(4, 2).await.unwrap();
    unseal_with(&v, &[&init.shares[0], &init.shares[1]]).await;
    push_and_allow(&v, tmp.path()).await;
    v.stop().await;

    let v = start_shamir(&dir).await;
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!(
        (s.state.as_str(), s.generation.as_str()),
        ("sealed", init.generation.as_str())
    );
    assert_everything_refused_while_sealed(&v).await;
    // Init cannot replace the root key once it protects a ring.
    let (c, _) = code(admin_operator(&v).await.init(3, 2).await.unwrap_err());
    assert_eq!(c, Code::FailedPrecondition);
    unseal_with(&v, &[&init.shares[3], &init.shares[2]]).await;
    fetch_ok(&v, tmp.path(), "out").await;
}

#[tokio::test]
async fn rekey_keeps_every_model_readable_and_old_shares_useless() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut v = start_shamir(&dir).await;
    let init = admin_operator(&v).await.init(3, 2).await.unwrap();
    unseal_with(&v, &[&init.shares[0], &init.shares[1]]).await;
    push_and_allow(&v, tmp.path()).await;

    let mut admin = admin_operator(&v).await;
    // Without a threshold of the current shares: refused, nothing staged.
    let one = [Zeroizing::new(init.shares[0].clone())];
    let (c, _) = code(admin.rekey("", 5, 3, &one).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    let current: Vec<Zeroizing<String>> = init.shares[1..]
        .iter()
        .map(|s| Zeroizing::new(s.clone()))
        .collect();
    let staged = admin.rekey("", 5, 3, &current).await.unwrap();
    assert!(!staged.committed);
    assert_eq!(staged.shares.len(), 5);
    // Committing with too few or foreign shares changes nothing.
    let (c, _) = code(admin.rekey_commit(&staged.shares[..2]).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    assert!(operator(&v).await.status().await.unwrap().rekey_pending);
    let done = admin.rekey_commit(&staged.shares[2..]).await.unwrap();
    assert!(done.committed);
    assert_eq!(done.generation, staged.generation);
    fetch_ok(&v, tmp.path(), "out1").await;
    v.stop().await;

    let v = start_shamir(&dir).await;
    let mut op = operator(&v).await;
    let (c, m) = code(op.unseal(&init.shares[0]).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("another root key"), "{m}");
    unseal_with(
        &v,
        &[&staged.shares[0], &staged.shares[4], &staged.shares[2]],
    )
    .await;
    fetch_ok(&v, tmp.path(), "out2").await;
    let entries = v.audit_entries().await;
    let rekeys = with_action(&entries, "rekey");
    assert!(
        rekeys
            .iter()
            .any(|e| e["reason"].as_str().unwrap().starts_with("rekey staged"))
    );
    assert!(
        rekeys
            .iter()
            .any(|e| e["reason"].as_str().unwrap().starts_with("rekey committed"))
    );
}

#[tokio::test]
async fn migration_from_file_to_shamir_keeps_models_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut v = Vault::start(&dir).await;
    push_and_allow(&v, tmp.path()).await;
    let mut admin = admin_operator(&v).await;
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!((s.state.as_str(), s.seal.as_str()), ("unsealed", "file"));
    let (c, _) = code(admin.rekey("", 3, 2, &[]).await.unwrap_err());
    assert_eq!(c, Code::InvalidArgument);
    let staged = admin.rekey("shamir", 3, 2, &[]).await.unwrap();
    let done = admin.rekey_commit(&staged.shares[..2]).await.unwrap();
    assert!(done.committed);
    fetch_ok(&v, tmp.path(), "out1").await;
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "seal_migrate").len(), 1);
    v.stop().await;

    // The file key no longer opens anything: starting with the file seal is refused clearly.
    let (path, _) = weightvault::config::dev::ensure(&dir).unwrap();
    let cfg = weightvault::config::Config::load(&path).unwrap();
    let text = start_refused(&cfg, "file seal refused after the migration").await;
    assert!(text.contains("sealed with shamir"), "{text}");

    let v = start_shamir(&dir).await;
    unseal_with(&v, &[&staged.shares[2], &staged.shares[0]]).await;
    fetch_ok(&v, tmp.path(), "out2").await;
}

#[test]
fn the_file_seal_is_refused_outside_dev() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = weightvault::config::dev::ensure(&tmp.path().join("data")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weightvault"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seal.allow_file_outside_dev"), "{err}");
}

/// SoftHSM settings from the environment (.ci/services/softhsm.sh), or `None` with a skip note.
fn softhsm() -> Option<(String, String, String)> {
    let module = std::env::var("WEIGHTVAULT_TEST_PKCS11_MODULE").ok();
    let conf = std::env::var("SOFTHSM2_CONF").ok();
    match (module, conf) {
        (Some(m), Some(_)) => Some((
            m,
            std::env::var("WEIGHTVAULT_TEST_PKCS11_TOKEN").unwrap_or_else(|_| "weightvault".into()),
            std::env::var("WEIGHTVAULT_TEST_PKCS11_PIN").unwrap_or_else(|_| "1234".into()),
        )),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "SOFTHSM2_CONF / WEIGHTVAULT_TEST_PKCS11_MODULE unset under CI=true (.ci/services/softhsm.sh sets them)"
            );
            eprintln!(
                "skipped: SOFTHSM2_CONF and WEIGHTVAULT_TEST_PKCS11_MODULE are not set (source .ci/services/softhsm.sh)"
            );
            None
        }
    }
}

fn pkcs11_seal(module: &str, token: &str, pin: &str, key_label: &str) -> SealConfig {
    SealConfig::Pkcs11 {
        module: module.into(),
        slot: None,
        token_label: Some(token.into()),
        key_label: key_label.into(),
        pin: Some(weightvault::keys::secret::SecretText::new(pin.into())),
        pin_env: None,
        migrate_from_file: None,
    }
}

fn unique_label(what: &str) -> String {
    format!(
        "wv-test-{what}-{}",
        hex::encode(weightvault::grant::random::<6>().unwrap())
    )
}

#[tokio::test]
async fn pkcs11_seal_round_trip_on_softhsm() {
    let Some((module, token, pin)) = softhsm() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let seal = pkcs11_seal(&module, &token, &pin, &unique_label("rt"));
    let s2 = seal.clone();
    let mut v = Vault::start_configured(&dir, clock(), move |c| c.seal = s2).await;
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!((s.state.as_str(), s.seal.as_str()), ("unsealed", "pkcs11"));
    push_and_allow(&v, tmp.path()).await;
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "seal_init").len(), 1);
    // Rekey inside the HSM: in force at once.
    let r = admin_operator(&v).await.rekey("", 0, 0, &[]).await.unwrap();
    assert!(r.committed);
    v.stop().await;

    // Auto-unseal at the next start, under the new root key.
    let s2 = seal.clone();
    let mut v = Vault::start_configured(&dir, clock(), move |c| c.seal = s2).await;
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!(
        (s.state.as_str(), s.generation.as_str()),
        ("unsealed", r.generation.as_str())
    );
    fetch_ok(&v, tmp.path(), "out").await;
    v.stop().await;

    // Without its HSM key the vault cannot open: the start fails, nothing is reset.
    let mut cfg = v.cfg.clone();
    cfg.seal = pkcs11_seal(&module, &token, &pin, &unique_label("other"));
    let text = start_refused(&cfg, "another HSM key is refused").await;
    assert!(text.contains("no AES key labelled"), "{text}");
}

#[tokio::test]
async fn pkcs11_migration_from_the_file_seal() {
    let Some((module, token, pin)) = softhsm() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut v = Vault::start(&dir).await;
    push_and_allow(&v, tmp.path()).await;
    v.stop().await;
    let label = unique_label("mig");
    let root_file = dir.join(files::ROOT_KEY);
    let mut seal = pkcs11_seal(&module, &token, &pin, &label);
    if let SealConfig::Pkcs11 {
        migrate_from_file, ..
    } = &mut seal
    {
        *migrate_from_file = Some(root_file.clone());
    }
    let v = Vault::start_configured(&dir, clock(), move |c| c.seal = seal).await;
    fetch_ok(&v, tmp.path(), "out").await;
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "seal_migrate").len(), 1);
}

#[tokio::test]
async fn pkcs11_missing_module_or_token_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (path, _) = weightvault::config::dev::ensure(&dir).unwrap();
    let mut cfg = weightvault::config::Config::load(&path).unwrap();
    let start = |cfg: weightvault::config::Config| async move {
        let err = weightvault::server::start(
            &cfg,
            weightvault::server::StartOptions {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("start refused");
        format!("{:#}", anyhow::Error::from(err))
    };
    cfg.seal = pkcs11_seal("/nonexistent/libpkcs11.so", "t", "1234", "k");
    let text = start(cfg.clone()).await;
    assert!(
        text.contains("/nonexistent/libpkcs11.so: no such file"),
        "{text}"
    );
    let Some((module, _, pin)) = softhsm() else {
        return;
    };
    cfg.seal = pkcs11_seal(&module, "no-such-token-label", &pin, "k");
    let text = start(cfg).await;
    assert!(
        text.contains("no token labelled \"no-such-token-label\""),
        "{text}"
    );
}

/// Runs `weightvault operator <args>` against `v` with the admin certificate, `stdin` as input.
fn cli_operator(v: &Vault, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weightvault"))
        .arg("operator")
        .args(args)
        .arg("--addr")
        .arg(v.addr())
        .arg("--cacert")
        .arg(v.dir.join(files::CA_CERT))
        .arg("--cert")
        .arg(v.dir.join(files::ADMIN_CERT))
        .arg("--key")
        .arg(v.dir.join(files::ADMIN_KEY))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rekey_stays_staged_until_new_shares_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let v = Vault::start(&dir).await;
    push_and_allow(&v, tmp.path()).await;
    let out = tokio::task::block_in_place(|| {
        cli_operator(
            &v,
            &[
                "rekey",
                "--to",
                "shamir",
                "--shares",
                "3",
                "--threshold",
                "2",
            ],
            "",
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("STAGED, not in force"), "{stdout}");
    let shares: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_once(": wvs1-").map(|(_, s)| format!("wvs1-{s}")))
        .collect();
    assert_eq!(shares.len(), 3, "{stdout}");
    // Printing the shares did not put them in force: still the file seal, a rekey pending.
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!((s.seal.as_str(), s.rekey_pending), ("file", true));
    fetch_ok(&v, tmp.path(), "out0").await;

    // One new share is not enough; nothing changes.
    let out = tokio::task::block_in_place(|| {
        cli_operator(&v, &["rekey-commit"], &format!("{}\n", shares[2]))
    });
    assert!(!out.status.success());
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!((s.seal.as_str(), s.rekey_pending), ("file", true));

    let out = tokio::task::block_in_place(|| {
        cli_operator(
            &v,
            &["rekey-commit"],
            &format!("{}\n\n{}\n", shares[2], shares[0]),
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rekey committed"), "{stdout}");
    let s = operator(&v).await.status().await.unwrap();
    assert_eq!((s.seal.as_str(), s.rekey_pending), ("shamir", false));
    fetch_ok(&v, tmp.path(), "out1").await;
}

#[tokio::test]
async fn a_flood_of_refused_calls_while_sealed_cannot_push_the_init_off_the_record() {
    let tmp = tempfile::tempdir().unwrap();
    let v = start_shamir(&tmp.path().join("data")).await;
    // Without the admin certificate: each refusal is kept for the audit log, up to a cap.
    let mut anon = operator(&v).await;
    for _ in 0..1005 {
        let (c, _) = code(anon.init(3, 2).await.unwrap_err());
        assert_ne!(c, Code::Ok);
    }
    let init = admin_operator(&v).await.init(3, 2).await.unwrap();
    unseal_with(&v, &[&init.shares[0], &init.shares[2]]).await;
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "seal_init").len(), 1);
    assert_eq!(with_action(&entries, "auth_denied").len(), 1000);
    // Past the cap only a count is kept: the 5 extra refusals and the 2 accepted shares.
    let unseal = with_action(&entries, "unseal");
    assert!(
        unseal.iter().any(|e| e["reason"]
            .as_str()
            .unwrap()
            .starts_with("7 further attempts while sealed were not kept")),
        "{unseal:?}"
    );
}
