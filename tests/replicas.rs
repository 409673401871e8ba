//! Two replicas of one vault on the same PostgreSQL database and S3 prefix: a push on one is
//! fetchable on the other, a revocation through one stops a stream served by the other, and
//! when the first dies mid-flight the second takes the sequencer duties over and the log still
//! verifies (one total order, no gaps or duplicates, one consistent tree).
//! PostgreSQL and S3 come from WEIGHTVAULT_TEST_PG and WEIGHTVAULT_TEST_S3 (.ci/services/).

mod common;

use std::time::Duration;

use common::{MEASUREMENT, Vault, model_dir, service, with_action};
use tonic::Code;
use weightvault::audit::checkpoint::open_checkpoint;
use weightvault::audit::note::NoteVerifier;
use weightvault::audit::replay::{self, Input};
use weightvault::grant::hpke::NodeKeyPair;
use weightvault::proto::v1::revoke_request::Target;
use weightvault::proto::v1::{FetchWeightsRequest, GetChallengeRequest};
use weightvault::time::{Clock, ManualClock, SystemClock};

/// Polls `cond` every 50 ms for up to a minute (a deadline for a hung test, not a timing
/// assertion).
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..1200 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within a minute");
}

async fn fetch_via(v: &Vault, out: &std::path::Path) -> weightvault::client::node::FetchReport {
    v.fetch_into("m", out).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_models_grants_revocations_and_one_log() {
    const TEST: &str = "two_replicas_share_models_grants_revocations_and_one_log";
    let Some(pg) = service("WEIGHTVAULT_TEST_PG", TEST) else {
        return;
    };
    let Some(s3) = service("WEIGHTVAULT_TEST_S3", TEST) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let db = common::fresh_database(&pg).await;
    let prefix = common::fresh_prefix();
    // One dev directory gives both replicas the same root key, TLS material and roles.
    let data = tmp.path().join("data");
    let clock = ManualClock::new(SystemClock.now_ms());
    let adjust = |cfg: &mut weightvault::config::Config| {
        common::use_shared_storage(cfg, &db, &s3, &prefix, tmp.path());
        // Short enough for a quick takeover, with room for late renewals on a busy machine.
        cfg.audit.lease_secs = 3;
        cfg.audit.heartbeat_secs = 1;
        // The challenge hammer below must not meet the call limit before A dies.
        cfg.limits.peer_calls_per_sec = 0;
    };
    let mut a = Vault::start_configured(&data, clock.clone(), adjust).await;
    let b = Vault::start_configured(&data, clock.clone(), adjust).await;
    // One sequencer lease: exactly one replica holds it (A, unless a renewal failed or stalled
    // on a busy machine; a transient miss clears A's flag until its next tick).
    let (sa, sb) = (a.server.as_ref().unwrap(), b.server.as_ref().unwrap());
    eventually("exactly one replica holding the lease", async || {
        sa.holds_audit_lease() != sb.holds_audit_lease()
    })
    .await;

    // Push via A, fetch via B.
    let src = model_dir(tmp.path());
    assert_eq!(a.push_dir("m", &src).await, 1);
    a.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    let out = tmp.path().join("out-b");
    assert_eq!(fetch_via(&b, &out).await.version, 1);
    common::assert_same_tree(&src, &out);

    // A grant issued by A, streamed from A, revoked through B: the stream stops.
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    // 367 chunks of 64 KiB: more than the 16 MiB HTTP/2 stream window can hold, so a stream
    // the vault did not stop would deliver them all.
    const BIG: usize = 24_000_000;
    let chunks = BIG.div_ceil(64 * 1024) as u64;
    std::fs::write(big.join("w.bin"), common::bytes(BIG, 5)).unwrap();
    assert_eq!(a.push_dir("m", &big).await, 2);
    let keys = NodeKeyPair::generate().unwrap();
    let mut ca = common::raw(&a).await;
    let token = common::attest(&mut ca, &a.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = common::grant(&mut ca, &token, "m", 2).await.unwrap();
    // B sees A's grant.
    let seen = b
        .admin()
        .await
        .grants(Some("m"), None, false)
        .await
        .unwrap();
    assert!(seen.iter().any(|x| x.grant_id == g.grant_id));
    let request = FetchWeightsRequest {
        session_token: token.clone(),
        grant_id: g.grant_id.clone(),
        file: "w.bin".into(),
        first_chunk: 0,
        end_chunk: 0,
    };
    let mut s = ca
        .fetch_weights(request.clone())
        .await
        .unwrap()
        .into_inner();
    // The client reads nothing more until the revocation is done: A can only run ahead by
    // what flow control lets it buffer.
    assert_eq!(s.message().await.unwrap().unwrap().index, 0);
    assert_eq!(
        b.admin()
            .await
            .revoke(Target::GrantId(g.grant_id.clone()), "stolen")
            .await
            .unwrap(),
        1
    );
    let mut received = 1u64;
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("A's stream completed after the revocation through B"),
            Err(e) => break e,
        }
    };
    assert!(received < chunks, "{received} of {chunks} chunks");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("grant revoked"), "{}", err.message());
    // A's stream ended on its per-chunk grant check, and says so in the shared log.
    eventually("A's fetch_end entry", async || {
        b.audit_entries().await.iter().any(|e| {
            e["action"] == "fetch_end"
                && e["grant_id"] == g.grant_id.as_str()
                && e["reason"] == "grant revoked"
        })
    })
    .await;
    // A new fetch of the revoked grant is refused by A as well.
    let refused = ca.fetch_weights(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // The checkpoint an auditor trusted before the crash, from A.
    let before = a.auditor().await.checkpoint().await.unwrap();

    // Kill A mid-flight: a stream and a stream of appends are running on it.
    let g2 = common::grant(&mut ca, &token, "m", 2).await.unwrap();
    let mut s2 = ca
        .fetch_weights(FetchWeightsRequest {
            session_token: token,
            grant_id: g2.grant_id,
            file: "w.bin".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s2.message().await.unwrap().unwrap().index, 0);
    let mut hammer_client = common::raw(&a).await;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = answered.clone();
    let hammer = tokio::spawn(async move {
        while hammer_client
            .get_challenge(GetChallengeRequest {})
            .await
            .is_ok()
        {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        counted.load(std::sync::atomic::Ordering::SeqCst)
    });
    // A dies while appends are running, however slowly this machine commits them.
    eventually("A answering challenges", async || {
        answered.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    a.server.take().unwrap().abort();
    drop(s2);
    let hammered = tokio::time::timeout(Duration::from_secs(60), hammer)
        .await
        .expect("A stops answering once aborted")
        .unwrap();
    assert!(hammered > 0, "no appends were running on A when it died");

    // B takes the sequencer lease over once A's expires, and its duties: a heartbeat.
    let bs = b.server.as_ref().unwrap();
    eventually("B taking over the sequencer lease", async || {
        bs.holds_audit_lease()
    })
    .await;
    let taken_at = b.auditor().await.checkpoint().await.unwrap().size;
    eventually("a heartbeat from B", async || {
        let entries = b.audit_entries().await;
        entries.len() as u64 > taken_at
            && !with_action(&entries[taken_at as usize..], "heartbeat").is_empty()
    })
    .await;

    // B goes on serving: a push and a fetch.
    assert_eq!(b.push_dir("m", &src).await, 3);
    let out3 = tmp.path().join("out-3");
    assert_eq!(fetch_via(&b, &out3).await.version, 3);
    common::assert_same_tree(&src, &out3);

    // The log verifies from B: one signed tree over every entry, consistent with the
    // checkpoint A served before it died.
    let mut auditor = b.auditor().await;
    let cp = auditor.checkpoint().await.unwrap();
    let mut entries = Vec::new();
    let mut indexes = Vec::new();
    auditor
        .entries(0, cp.size, |i, e| {
            indexes.push(i);
            entries.push(e.to_vec());
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(indexes, (0..cp.size).collect::<Vec<_>>());
    let verifier = NoteVerifier::from_vkey(&cp.verifier_key).unwrap();
    assert_eq!(before.verifier_key, cp.verifier_key);
    let trusted = open_checkpoint(&before.note, std::slice::from_ref(&verifier)).unwrap();
    assert!(cp.size > trusted.size);
    let r = replay::replay(
        &Input {
            entries: &entries,
            recorded_leaf_hashes: None,
            checkpoint_note: &cp.note,
            verifier: &verifier,
            trusted: Some(&trusted),
        },
        &mut |_, _| Ok(false),
    );
    assert!(r.ok, "{:?}", r.findings);
    assert_eq!(r.entries_checked, cp.size);
    let parsed: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::from_slice(e).unwrap())
        .collect();
    // Both replicas' start entries are in the one log, and A's appends are all there.
    assert_eq!(with_action(&parsed, "server_start").len(), 2);
    assert!(with_action(&parsed, "challenge").len() as u32 >= hammered);
    assert_eq!(with_action(&parsed, "revoke").len(), 1);
}
