//! The per-address call limit on GetChallenge and on refused calls
//! (docs/access-control.md#call-limits): refusals are RESOURCE_EXHAUSTED, change nothing, are
//! recorded at most once a minute per address, and the node client waits and retries.

mod common;

use common::{MEASUREMENT, Vault, model_dir, with_action};
use tonic::Code;
use weightvault::attest::report_data;
use weightvault::client::node::Attester;
use weightvault::grant::hpke::NodeKeyPair;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::proto::v1::{
    AttestRequest, FetchWeightsRequest, GetChallengeRequest, RequestGrantRequest,
};
use weightvault::time::{Clock, ManualClock, SystemClock};

async fn limited(tmp: &std::path::Path, rate: u32, burst: u32) -> Vault {
    Vault::start_configured(
        &tmp.join("data"),
        ManualClock::new(SystemClock.now_ms()),
        |cfg| {
            cfg.limits.peer_calls_per_sec = rate;
            cfg.limits.peer_burst = burst;
        },
    )
    .await
}

fn rate_limited(entries: &[serde_json::Value]) -> Vec<String> {
    with_action(entries, "rate_limited")
        .iter()
        .map(|e| {
            assert_eq!(e["decision"], "deny");
            e["reason"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn calls_over_the_limit_are_refused_counted_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let v = limited(tmp.path(), 1, 3).await;
    let mut c = common::raw(&v).await;
    let before = v.audit_entries().await.len();

    // The burst: three calls at once.
    let mut nonces = Vec::new();
    for _ in 0..3 {
        nonces.push(
            c.get_challenge(GetChallengeRequest {})
                .await
                .unwrap()
                .into_inner()
                .nonce,
        );
    }
    // Over it: refused with when to come back, and recorded once.
    let e = c.get_challenge(GetChallengeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .starts_with("too many calls from this address; retry in 1000 ms"),
        "{e:?}"
    );
    assert_eq!(e.metadata().get("retry-after-ms").unwrap(), "1000");
    // An Attest naming a live challenge is not charged: its GetChallenge was.
    let keys = NodeKeyPair::generate().unwrap();
    let attester = v.attester(MEASUREMENT);
    let attest = |nonce: [u8; 32]| AttestRequest {
        tee: "sim".into(),
        evidence: attester
            .evidence(&report_data(&nonce, keys.public_key()))
            .unwrap(),
        node_public_key: keys.public_key().to_vec(),
        nonce: nonce.to_vec(),
    };
    let session = c
        .attest(attest(nonces[0].clone().try_into().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert!(!session.session_token.is_empty());
    // One naming no challenge is charged, and refused without a record of its own.
    let unknown = [7u8; 32];
    let e = c.attest(attest(unknown)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let entries = v.audit_entries().await;
    let new = &entries[before..];
    assert_eq!(with_action(new, "challenge").len(), 3);
    let attests = with_action(new, "attest");
    assert_eq!(attests.len(), 1);
    assert_eq!(attests[0]["decision"], "allow");
    assert_eq!(
        rate_limited(new),
        ["1 call(s) from 127.0.0.1 refused over the call limit since the last such entry"]
    );

    // A second on, one call is due again: the unknown nonce is refused for what it is, and
    // recorded.
    v.clock.advance_ms(1000);
    let e = c.attest(attest(unknown)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let entries = v.audit_entries().await;
    let attests = with_action(&entries[before..], "attest");
    assert_eq!(attests.len(), 2);
    assert_eq!(attests[1]["reason"], "unknown or already used nonce");

    // Refusals within the minute are counted, not recorded; the next entry carries them.
    for _ in 0..4 {
        let e = c.get_challenge(GetChallengeRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
    assert_eq!(rate_limited(&v.audit_entries().await[before..]).len(), 1);
    v.clock.advance_ms(60_000);
    for _ in 0..3 {
        c.get_challenge(GetChallengeRequest {}).await.unwrap();
    }
    assert_eq!(
        c.get_challenge(GetChallengeRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    let reports = rate_limited(&v.audit_entries().await[before..]);
    assert_eq!(reports.len(), 2, "{reports:?}");
    // The refused Attest, the four refused challenges and this one.
    assert!(
        reports[1].starts_with("6 call(s) from 127.0.0.1"),
        "{reports:?}"
    );
    // The signed checkpoint covers the new entries.
    let mut auditor = v.auditor().await;
    let size = auditor.checkpoint().await.unwrap().size;
    assert!(size as usize >= before + 2);
}

#[tokio::test]
async fn zero_turns_the_limit_off() {
    let tmp = tempfile::tempdir().unwrap();
    let v = limited(tmp.path(), 0, 0).await;
    let mut c = common::raw(&v).await;
    // More than the default burst of 500, on a clock that does not move.
    for _ in 0..600 {
        c.get_challenge(GetChallengeRequest {}).await.unwrap();
    }
    assert!(rate_limited(&v.audit_entries().await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_waits_and_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let v = limited(tmp.path(), 1, 1).await;
    let src = model_dir(tmp.path());
    v.push_allowed("m", &src).await;
    // Another node behind the same address took the one call there was: the fetch's challenge
    // is refused until a second has passed.
    common::raw(&v)
        .await
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap();
    // The clock moves only once the fetch has been refused (its `rate_limited` entry is on the
    // record), so the refusal does not depend on how fast this machine connects.
    let clock = v.clock.clone();
    let mut auditor = v.auditor().await;
    let ticker = tokio::spawn(async move {
        loop {
            let mut limited = false;
            auditor
                .entries(0, 0, |_, e| {
                    limited |= serde_json::from_slice::<serde_json::Value>(e).unwrap()["action"]
                        == "rate_limited";
                    Ok(())
                })
                .await
                .unwrap();
            if limited {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            clock.advance_ms(500);
        }
    });
    let out = tmp.path().join("out");
    let started = std::time::Instant::now();
    let r = v.fetch_into("m", &out).await;
    let took = started.elapsed();
    ticker.abort();
    r.unwrap();
    // The refusal said 1000 ms (the vault's clock had not moved yet), and the client waited at
    // least that before its next try, not just its first 200 ms backoff. (A lower bound on a
    // wait the client chose, not a performance measurement.)
    assert!(took >= std::time::Duration::from_millis(1000), "{took:?}");
    common::assert_same_tree(&src, &out);
    let entries = v.audit_entries().await;
    assert_eq!(rate_limited(&entries).len(), 1);
    assert_eq!(
        with_action(&entries, "attest")
            .iter()
            .filter(|e| e["decision"] == "allow")
            .count(),
        1
    );
}

/// How a FetchWeights call ends before any chunk (the status), or `None` when a chunk came.
async fn fetch_status(
    c: &mut NodeServiceClient<tonic::transport::Channel>,
    token: &[u8],
    grant_id: &str,
) -> Option<tonic::Status> {
    let req = FetchWeightsRequest {
        session_token: token.to_vec(),
        grant_id: grant_id.into(),
        file: "model-00001.safetensors".into(),
        first_chunk: 0,
        end_chunk: 0,
    };
    match c.fetch_weights(req).await {
        Err(e) => Some(e),
        Ok(r) => r.into_inner().message().await.err(),
    }
}

#[tokio::test]
async fn bogus_sessions_and_grants_are_charged_and_a_real_boot_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let v = limited(tmp.path(), 1, 2).await;
    v.push_allowed("m", &model_dir(tmp.path())).await;
    let mut c = common::raw(&v).await;
    let before = v.audit_entries().await.len();
    let bogus_grant = || RequestGrantRequest {
        session_token: vec![9; 32],
        model: "m".into(),
        version: 0,
    };

    // Two calls with nothing behind them use up the burst and are refused for what they are.
    let e = c.request_grant(bogus_grant()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = fetch_status(&mut c, &[9; 32], "g-0000").await.unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // The third and fourth are refused by the limit, without entries of their own.
    let e = c.request_grant(bogus_grant()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = fetch_status(&mut c, &[9; 32], "g-0000").await.unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let entries = v.audit_entries().await;
    let new = &entries[before..];
    assert_eq!(with_action(new, "grant").len(), 1);
    assert_eq!(with_action(new, "fetch_start").len(), 1);
    assert_eq!(rate_limited(new).len(), 1);

    // A second on there is one call: a real boot needs only that one (its GetChallenge); its
    // Attest, RequestGrant and FetchWeights present a live nonce, session and grant.
    v.clock.advance_ms(1000);
    let keys = NodeKeyPair::generate().unwrap();
    let token = common::attest(&mut c, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = common::grant(&mut c, &token, "m", 0).await.unwrap();
    assert!(fetch_status(&mut c, &token, &g.grant_id).await.is_none());
    // And the bucket is still empty for anything else: another challenge, a grant the live
    // session is refused, a call refused for its missing certificate.
    let e = c.get_challenge(GetChallengeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = common::grant(&mut c, &token, "no-such-model", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = weightvault::proto::v1::admin_service_client::AdminServiceClient::new(
        v.channel(None).await,
    )
    .list_models(weightvault::proto::v1::ListModelsRequest {})
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let entries = v.audit_entries().await;
    assert!(with_action(&entries, "auth_denied").is_empty());
    assert_eq!(
        with_action(&entries, "grant")
            .iter()
            .filter(|e| e["decision"] == "deny")
            .count(),
        1
    );
}

#[tokio::test]
async fn refusals_no_later_call_carries_are_recorded_after_a_minute_and_at_a_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = limited(tmp.path(), 1, 1).await;
    let mut c = common::raw(&v).await;
    c.get_challenge(GetChallengeRequest {}).await.unwrap();
    refuse(&mut c, 3).await;
    // The first refusal is on the record; the other two wait for a minute to pass.
    let server = v.server.as_ref().unwrap();
    assert_eq!(server.record_pending_refusals().await, 0);
    v.clock.advance_ms(60_000);
    assert_eq!(server.record_pending_refusals().await, 1);
    let reports = rate_limited(&v.audit_entries().await);
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(
        reports[1].starts_with("2 call(s) from 127.0.0.1"),
        "{reports:?}"
    );

    // One more refusal within the next minute, then a graceful stop records it.
    c.get_challenge(GetChallengeRequest {}).await.unwrap();
    refuse(&mut c, 1).await;
    assert_eq!(server.record_pending_refusals().await, 0);
    v.stop().await;
    let entries = common::stored_entries(&v.dir).await;
    let reports = rate_limited(&entries);
    assert_eq!(reports.len(), 3, "{reports:?}");
    assert!(
        reports[2].starts_with("1 call(s) from 127.0.0.1"),
        "{reports:?}"
    );
    assert_eq!(entries.last().unwrap()["action"], "server_stop");
}

/// Makes `n` calls that the limit refuses.
async fn refuse(c: &mut NodeServiceClient<tonic::transport::Channel>, n: usize) {
    for _ in 0..n {
        let e = c.get_challenge(GetChallengeRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    }
}
