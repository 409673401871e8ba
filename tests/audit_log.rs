//! The verifiable audit log against a real vault: checkpoints, proofs, replay with tampering,
//! rollback and fork detection, fail-closed on write errors, the start-up tree check, tail.

mod common;

use std::sync::atomic::Ordering;

use common::{MEASUREMENT, Vault, model_dir, with_action};
use weightvault::audit::checkpoint::{Checkpoint, open_checkpoint, sign_checkpoint};
use weightvault::audit::merkle::{self, Hash};
use weightvault::audit::note::{NoteSigner, NoteVerifier};
use weightvault::audit::replay::{self, FindingKind, Input};
use weightvault::config::Config;
use weightvault::config::dev::{self, files};
use weightvault::server::{self, StartOptions};

/// A vault with a pushed model, an allowed measurement and one full fetch on the record.
async fn busy(tmp: &std::path::Path) -> Vault {
    let v = Vault::start(&tmp.join("data")).await;
    v.push_dir("m", &model_dir(tmp)).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    v.fetch_into("m", &tmp.join("out")).await.unwrap();
    v
}

async fn all_entries(v: &Vault, end: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    v.auditor()
        .await
        .entries(0, end, |_, e| {
            out.push(e.to_vec());
            Ok(())
        })
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn checkpoint_signs_the_tree_and_proofs_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let v = busy(tmp.path()).await;
    let mut a = v.auditor().await;
    let first = a.checkpoint().await.unwrap();
    let verifier = NoteVerifier::from_vkey(&first.verifier_key).unwrap();
    let cp = open_checkpoint(&first.note, std::slice::from_ref(&verifier)).unwrap();
    assert_eq!(cp.size, first.size);
    let entries = all_entries(&v, cp.size).await;
    assert_eq!(entries.len() as u64, cp.size);
    let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    assert_eq!(merkle::root(&leaves), cp.root);
    for i in 0..cp.size {
        let proof = a.inclusion_proof(i, cp.size).await.unwrap();
        merkle::verify_inclusion(&leaves[i as usize], i, cp.size, &proof, &cp.root).unwrap();
    }
    // More activity, a newer checkpoint, and a consistency proof between the two.
    v.push_dir("m2", &model_dir(tmp.path())).await;
    let second = a.checkpoint().await.unwrap();
    let cp2 = open_checkpoint(&second.note, std::slice::from_ref(&verifier)).unwrap();
    assert!(cp2.size > cp.size);
    let proof = a.consistency_proof(cp.size, cp2.size).await.unwrap();
    merkle::verify_consistency(cp.size, cp2.size, &cp.root, &cp2.root, &proof).unwrap();
    // Out-of-range requests are refused, not answered with something.
    let err = a
        .inclusion_proof(cp2.size + 5, cp2.size + 10)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::OutOfRange));
    // Stored evidence is served by hash and matches it.
    let attest = entries
        .iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(e).unwrap())
        .find(|e| e["action"] == "attest" && e["decision"] == "allow")
        .unwrap();
    let sha: [u8; 32] = hex::decode(attest["evidence_sha256"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let ev = a.evidence(&sha).await.unwrap();
    assert_eq!(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &ev).as_ref(),
        sha.as_slice()
    );
}

/// Replays the live log with the sim key for evidence; returns the findings' kinds.
fn kinds(r: &replay::Report) -> Vec<FindingKind> {
    r.findings.iter().map(|f| f.kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_detects_tampering_truncation_rollback_fork_and_foreign_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let v = busy(tmp.path()).await;
    let mut a = v.auditor().await;
    let cp = a.checkpoint().await.unwrap();
    let verifier = NoteVerifier::from_vkey(&cp.verifier_key).unwrap();
    let entries = all_entries(&v, cp.size).await;
    let recorded: Vec<Hash> = entries.iter().map(|e| merkle::leaf_hash(e)).collect();
    let sim = weightvault::attest::sim::SimVerifier::new(
        v.cfg.sim_trusted_keys(),
        weightvault::attest::sim::DEFAULT_MAX_AGE_MS,
    );
    let evidence_ok = |_: u64, _: &weightvault::audit::AuditEntry| Ok(false);
    let run = |entries: &[Vec<u8>], note: &str, trusted: Option<&Checkpoint>| {
        replay::replay(
            &Input {
                entries,
                recorded_leaf_hashes: Some(&recorded),
                checkpoint_note: note,
                verifier: &verifier,
                trusted,
            },
            &mut evidence_ok.clone(),
        )
    };
    // The honest log passes, with the semantic checks seeing grants and fetches.
    let ok = run(&entries, &cp.note, None);
    assert!(ok.ok, "{:?}", ok.findings);
    assert!(ok.grants >= 1 && ok.fetches >= 3, "{ok:?}");
    assert_eq!(ok.entries_checked, cp.size);

    // Evidence re-verification through the real sim verifier passes on stored evidence.
    let mut evidence = std::collections::HashMap::new();
    let r = replay::replay(
        &Input {
            entries: &entries,
            recorded_leaf_hashes: None,
            checkpoint_note: &cp.note,
            verifier: &verifier,
            trusted: None,
        },
        &mut |_, e| {
            let sha: [u8; 32] = hex::decode(e.evidence_sha256.as_ref().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let ev = evidence
                .entry(sha)
                .or_insert_with(|| futures_lite_block(&v, sha))
                .clone();
            let nonce: [u8; 32] = hex::decode(e.nonce.as_ref().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let key: [u8; 32] = hex::decode(e.node_key.as_ref().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            use weightvault::attest::Verifier;
            sim.verify(
                &ev,
                &weightvault::attest::report_data(&nonce, &key),
                e.time_ms,
            )
            .map(|_| true)
            .map_err(|err| err.to_string())
        },
    );
    assert!(r.ok && r.attestations_reverified >= 1, "{:?}", r.findings);

    // A changed byte in an entry is named by its index.
    let victim = entries
        .iter()
        .position(|e| e.windows(5).any(|w| w == b"grant"))
        .unwrap();
    let mut tampered = entries.clone();
    let pos = tampered[victim]
        .iter()
        .rposition(|b| b.is_ascii_digit())
        .unwrap();
    tampered[victim][pos] = if tampered[victim][pos] == b'9' {
        b'8'
    } else {
        tampered[victim][pos] + 1
    };
    let r = run(&tampered, &cp.note, None);
    assert!(!r.ok);
    assert!(
        r.findings
            .iter()
            .any(|f| f.kind == FindingKind::EntryModified && f.index == Some(victim as u64)),
        "{:?}",
        r.findings
    );
    assert!(kinds(&r).contains(&FindingKind::RootMismatch));

    // A dropped tail entry.
    let r = run(&entries[..entries.len() - 1], &cp.note, None);
    assert_eq!(kinds(&r), vec![FindingKind::Truncated]);

    // Rollback: the trusted checkpoint is larger than what the log now offers.
    let bigger = Checkpoint {
        origin: "x".into(),
        size: cp.size + 3,
        root: [7; 32],
        extensions: vec![],
    };
    assert!(kinds(&run(&entries, &cp.note, Some(&bigger))).contains(&FindingKind::Rollback));

    // Fork: another checkpoint of the same size, validly signed by the log key, other root.
    let signer = log_signer(&v).await;
    let origin = open_checkpoint(&cp.note, std::slice::from_ref(&verifier))
        .unwrap()
        .origin;
    let forged = Checkpoint {
        origin: origin.clone(),
        size: cp.size,
        root: [9; 32],
        extensions: vec![],
    };
    let forged_note = sign_checkpoint(&signer, &forged).unwrap();
    let trusted_forged = open_checkpoint(&forged_note, std::slice::from_ref(&verifier)).unwrap();
    assert!(kinds(&run(&entries, &cp.note, Some(&trusted_forged))).contains(&FindingKind::Fork));
    // And a trusted prefix that no longer matches.
    let earlier = Checkpoint {
        origin: origin.clone(),
        size: 3,
        root: [1; 32],
        extensions: vec![],
    };
    assert!(kinds(&run(&entries, &cp.note, Some(&earlier))).contains(&FindingKind::Fork));

    // A checkpoint signed by another key.
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let other = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let impostor = NoteSigner::new(&origin, other).unwrap();
    let honest = open_checkpoint(&cp.note, std::slice::from_ref(&verifier)).unwrap();
    let foreign = sign_checkpoint(&impostor, &honest).unwrap();
    assert_eq!(
        kinds(&run(&entries, &foreign, None)),
        vec![FindingKind::BadSignature]
    );

    // Zero entries is never a success.
    let empty = Checkpoint {
        origin,
        size: 0,
        root: merkle::empty_root(),
        extensions: vec![],
    };
    let empty_note = sign_checkpoint(&signer, &empty).unwrap();
    assert_eq!(
        kinds(&run(&[], &empty_note, None)),
        vec![FindingKind::Empty]
    );
}

/// Fetches evidence synchronously inside a replay callback (the test runs on a multi-thread
/// runtime, so blocking in place is allowed).
fn futures_lite_block(v: &Vault, sha: [u8; 32]) -> Vec<u8> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(async { v.auditor().await.evidence(&sha).await.unwrap() })
    })
}

/// The log's signing key, unwrapped the way the vault does it.
async fn log_signer(v: &Vault) -> NoteSigner {
    let store = weightvault::store::sqlite::SqliteStore::open(&v.dir.join("metadata.db"))
        .await
        .unwrap();
    let root =
        weightvault::keys::seal::load_file_root_key(&v.dir.join(files::ROOT_KEY), false).unwrap();
    let (mut ring, _) = weightvault::keys::KeyRing::open(&root, &store, 0)
        .await
        .unwrap();
    let cp = v.auditor().await.checkpoint().await.unwrap();
    let name = cp.verifier_key.split('+').next().unwrap().to_string();
    NoteSigner::new(&name, ring.take_log_key().unwrap()).unwrap()
}

#[tokio::test]
async fn a_failed_log_write_refuses_all_access() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (path, _) = dev::ensure(&dir).unwrap();
    let cfg = Config::load(&path).unwrap();
    let (wrap, faulty) = common::faulty_wrapper();
    let running = server::start(
        &cfg,
        StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            wrap_store: Some(wrap),
            ..StartOptions::default()
        },
    )
    .await
    .unwrap();
    let ep = weightvault::client::Endpoint::from_files(
        &running.local_addr.to_string(),
        &dir.join(files::CA_CERT),
        None,
        None,
    )
    .unwrap();
    let mut node = weightvault::proto::v1::node_service_client::NodeServiceClient::new(
        ep.connect().await.unwrap(),
    );
    node.get_challenge(weightvault::proto::v1::GetChallengeRequest {})
        .await
        .unwrap();
    faulty
        .get()
        .unwrap()
        .fail_audit
        .store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let err = node
            .get_challenge(weightvault::proto::v1::GetChallengeRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().contains("audit log unavailable"),
            "{}",
            err.message()
        );
    }
    // It stays closed even once the disk recovers: only a restart (and its tree check) reopens.
    faulty
        .get()
        .unwrap()
        .fail_audit
        .store(false, Ordering::SeqCst);
    let err = node
        .get_challenge(weightvault::proto::v1::GetChallengeRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    running.shutdown_token().cancel();
}

#[tokio::test]
async fn start_refuses_a_log_that_does_not_match_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = busy(tmp.path()).await;
    let size = v.auditor().await.checkpoint().await.unwrap().size;
    v.stop().await;
    // Rewrite one entry behind the vault's back.
    let db = v.dir.join("metadata.db");
    let conn_opts = format!("sqlite://{}", db.display());
    let pool = sqlx::SqlitePool::connect(&conn_opts).await.unwrap();
    sqlx::query("UPDATE audit_log SET entry = CAST('{\"forged\":1}' AS BLOB) WHERE idx = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(size > 2);
    let (path, _) = dev::ensure(&v.dir).unwrap();
    let cfg = Config::load(&path).unwrap();
    let err = server::start(
        &cfg,
        StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..StartOptions::default()
        },
    )
    .await
    .err()
    .expect("start must refuse");
    let chain = format!("{:?}", anyhow::Error::from(err));
    assert!(chain.contains("do not hash to the signed root"), "{chain}");
}

#[tokio::test]
async fn tail_follows_new_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    let start = v.auditor().await.checkpoint().await.unwrap().size;
    let mut a = v.auditor().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        let _ = a
            .tail(start, |i, e| {
                let _ = tx.send((i, serde_json::from_slice::<serde_json::Value>(e).unwrap()));
                Ok(())
            })
            .await;
    });
    v.push_dir("m", &model_dir(tmp.path())).await;
    let (i, e) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(i, start);
    assert_eq!(e["action"], "push");
    follower.abort();
}

#[tokio::test]
async fn quiet_periods_get_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (path, _) = dev::ensure(&dir).unwrap();
    let mut cfg = Config::load(&path).unwrap();
    cfg.audit.heartbeat_secs = 1;
    let running = server::start(
        &cfg,
        StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..StartOptions::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    running.shutdown().await.unwrap();
    let entries = common::stored_entries(&dir).await;
    assert!(
        !with_action(&entries, "heartbeat").is_empty(),
        "{entries:?}"
    );
    assert_eq!(entries.last().unwrap()["action"], "server_stop");
}
