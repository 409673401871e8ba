//! Key hygiene over a whole life cycle: shamir init and unseal, push, allow, a node fetch and a
//! rekey, with every server log line captured at TRACE level. Afterwards the root keys (old and
//! new), every KEK, the DEK and both Ed25519 signing keys are recovered from the store and
//! searched for (raw, hex, base64) in the captured logs and in every audit entry: none may
//! appear. Also: core dumps are off and key pages are locked (or the refusal was counted).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{MEASUREMENT, Vault, model_dir};
use weightvault::client::operator::OperatorClient;
use weightvault::config::SealConfig;
use weightvault::config::dev::files;
use weightvault::keys::{shamir, wrap};
use weightvault::store::MetadataStore;
use weightvault::store::sqlite::SqliteStore;
use weightvault::time::{Clock, ManualClock, SystemClock};
use zeroize::Zeroizing;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The encodings a key could leak in.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        b64.encode(secret).into_bytes(),
        b64url.encode(secret).into_bytes(),
        // A prefix long enough to be no accident, in case a value was cut.
        hex::encode(&secret[..16]).into_bytes(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn unwrap32(key: &[u8; 32], wrapped: &[u8], aad: &[u8]) -> [u8; 32] {
    wrap::unwrap(key, wrapped, aad).unwrap()[..]
        .try_into()
        .unwrap()
}

fn kek_aad(version: u32) -> Vec<u8> {
    let mut aad = b"weightvault/kek/v1".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn dek_aad(kek_version: u32, model: &str, version_id: &[u8; 16]) -> Vec<u8> {
    let mut aad = b"weightvault/dek/v1".to_vec();
    aad.extend_from_slice(&kek_version.to_be_bytes());
    aad.extend_from_slice(&(model.len() as u64).to_be_bytes());
    aad.extend_from_slice(model.as_bytes());
    aad.extend_from_slice(version_id);
    aad
}

fn root_of(shares: &[String]) -> [u8; 32] {
    let parsed: Vec<shamir::Share> = shares
        .iter()
        .map(|s| shamir::Share::parse(s).unwrap())
        .collect();
    *shamir::combine(&parsed).unwrap().expose_secret()
}

#[tokio::test]
async fn no_key_material_in_logs_or_audit_entries() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let clock = ManualClock::new(SystemClock.now_ms());
    let mut v = Vault::start_configured(&dir, clock, |c| c.seal = SealConfig::Shamir {}).await;
    assert_eq!(
        rlimit::getrlimit(rlimit::Resource::CORE).unwrap(),
        (0, 0),
        "core dumps are off once the server started"
    );
    let admin_ch = v.channel(Some((files::ADMIN_CERT, files::ADMIN_KEY))).await;
    let init = OperatorClient::new(admin_ch.clone())
        .init(3, 2)
        .await
        .unwrap();
    let mut op = OperatorClient::new(v.channel(None).await);
    for s in &init.shares[..2] {
        op.unseal(s).await.unwrap();
    }
    assert!(
        weightvault::keys::locked::locked_pages() > 0
            || weightvault::keys::locked::lock_refusals() > 0
    );
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    let out = tmp.path().join("out");
    v.fetch_into("m", &out).await.unwrap();
    common::assert_same_tree(&tmp.path().join("model-src"), &out);
    // A rekey: a second root key, shares over the wire once more.
    let current: Vec<Zeroizing<String>> = init.shares[1..]
        .iter()
        .map(|s| Zeroizing::new(s.clone()))
        .collect();
    let mut admin_op = OperatorClient::new(admin_ch);
    let staged = admin_op.rekey("", 3, 2, &current).await.unwrap();
    admin_op.rekey_commit(&staged.shares[..2]).await.unwrap();
    v.stop().await;

    // Recover every key from the store, as only a holder of the root key could.
    let old_root = root_of(&init.shares[..2]);
    let new_root = root_of(&staged.shares[1..]);
    assert_ne!(old_root, new_root);
    let store = SqliteStore::open(&dir.join("metadata.db")).await.unwrap();
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("old root key".into(), old_root.to_vec()),
        ("new root key".into(), new_root.to_vec()),
    ];
    let keks = store.keks().await.unwrap();
    assert!(!keks.is_empty());
    let mut kek_by_version = std::collections::HashMap::new();
    for k in &keks {
        let kek = unwrap32(&new_root, &k.wrapped, &kek_aad(k.version));
        kek_by_version.insert(k.version, kek);
        secrets.push((format!("KEK v{}", k.version), kek.to_vec()));
    }
    let versions = store.versions("m").await.unwrap();
    assert_eq!(versions.len(), 1);
    for ver in &versions {
        let dek = unwrap32(
            &kek_by_version[&ver.kek_version],
            &ver.wrapped_dek,
            &dek_aad(ver.kek_version, &ver.model, &ver.version_id),
        );
        secrets.push(("DEK".into(), dek.to_vec()));
    }
    for name in ["vault-signing-key/v1", "log-signing-key/v1"] {
        let w = store.get_wrapped_secret(name).await.unwrap().unwrap();
        let pkcs8 = wrap::unwrap(
            &new_root,
            &w,
            format!("weightvault/ed25519/{name}").as_bytes(),
        )
        .unwrap();
        // RFC 8410 PrivateKeyInfo: the 32-byte seed follows a 16-byte prefix.
        secrets.push((format!("{name} seed"), pkcs8[16..48].to_vec()));
        secrets.push((format!("{name} pkcs8"), pkcs8.to_vec()));
    }

    let log_bytes = logs.0.lock().unwrap().clone();
    assert!(
        contains(&log_bytes, b"vault unsealed"),
        "the logs were captured"
    );
    let entries = store.audit_entries(0, u64::MAX, 100_000).await.unwrap();
    assert!(entries.len() > 10);
    for (what, secret) in &secrets {
        for form in forms(secret) {
            assert!(
                !contains(&log_bytes, &form),
                "{what} appears in the server log"
            );
            for (i, e) in &entries {
                assert!(!contains(e, &form), "{what} appears in audit entry {i}");
            }
        }
    }
    // Share texts are not logged or audited either.
    for s in init.shares.iter().chain(&staged.shares) {
        assert!(
            !contains(&log_bytes, &s.as_bytes()[5..]),
            "a share appears in the log"
        );
        for (i, e) in &entries {
            assert!(
                !contains(e, &s.as_bytes()[5..]),
                "a share appears in audit entry {i}"
            );
        }
    }
}

#[test]
fn an_hsm_pin_never_prints_with_the_config() {
    let seal = SealConfig::Pkcs11 {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        slot: None,
        token_label: Some("t".into()),
        key_label: "k".into(),
        pin: Some(weightvault::keys::secret::SecretText::new(
            "pin-4711-secret".into(),
        )),
        pin_env: None,
        migrate_from_file: None,
    };
    let shown = format!("{seal:?}");
    assert!(!shown.contains("pin-4711-secret"), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
}

#[tokio::test]
async fn a_wrong_hsm_pin_is_refused_without_being_repeated() {
    let (Ok(module), Ok(_)) = (
        std::env::var("WEIGHTVAULT_TEST_PKCS11_MODULE"),
        std::env::var("SOFTHSM2_CONF"),
    ) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "SOFTHSM2_CONF / WEIGHTVAULT_TEST_PKCS11_MODULE unset under CI=true"
        );
        eprintln!("skipped: SOFTHSM2_CONF and WEIGHTVAULT_TEST_PKCS11_MODULE are not set");
        return;
    };
    let token = std::env::var("WEIGHTVAULT_TEST_PKCS11_TOKEN").unwrap_or("weightvault".into());
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = weightvault::config::dev::ensure(&tmp.path().join("data")).unwrap();
    let mut cfg = weightvault::config::Config::load(&path).unwrap();
    let wrong_pin = "wrong-pin-8642097531";
    cfg.seal = SealConfig::Pkcs11 {
        module: module.into(),
        slot: None,
        token_label: Some(token),
        key_label: "wv-hygiene-never-created".into(),
        pin: Some(weightvault::keys::secret::SecretText::new(wrong_pin.into())),
        pin_env: None,
        migrate_from_file: None,
    };
    let err = weightvault::server::start(
        &cfg,
        weightvault::server::StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("a wrong PIN stops the start");
    let text = format!("{:#} {:?}", anyhow::Error::from(err), cfg.seal);
    assert!(text.contains("login"), "{text}");
    assert!(!text.contains(wrong_pin), "{text}");
}
