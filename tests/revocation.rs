//! Revocation: by grant, node, measurement and model[@version]; a running stream stops within
//! one chunk; revocations survive restart and are on the record; deny removes a rule.

mod common;

use common::{MEASUREMENT, Vault, model_dir, with_action};
use tonic::Code;
use weightvault::client::node::{DirSink, FetchOptions};
use weightvault::proto::v1::FetchWeightsRequest;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::proto::v1::revoke_request::Target;
use weightvault::server::MAX_MESSAGE;

async fn fetch(
    v: &Vault,
    out: &std::path::Path,
) -> Result<weightvault::client::node::FetchReport, weightvault::client::ClientError> {
    v.fetch_into("m", out).await
}

#[tokio::test]
async fn revoking_a_grant_stops_its_running_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.bin"), common::bytes(40_000_000, 9)).unwrap();
    v.push_dir("m", &src).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();

    // Attest and get a grant through the library, then stream by hand so the test controls pace.
    use weightvault::grant::hpke::NodeKeyPair;
    let mut c = common::raw(&v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let token = common::attest(&mut c, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = common::grant(&mut c, &token, "m", 0).await.unwrap();
    let live = v
        .admin()
        .await
        .grants(Some("m"), None, false)
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].grant_id, g.grant_id);
    assert_eq!(live[0].node, "test-node");

    let mut s = c
        .fetch_weights(FetchWeightsRequest {
            session_token: token,
            grant_id: g.grant_id.clone(),
            file: "w.bin".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().index, 0);
    let n = v
        .admin()
        .await
        .revoke(Target::GrantId(g.grant_id.clone()), "lost laptop")
        .await
        .unwrap();
    assert_eq!(n, 1);
    let mut received = 1u64;
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("stream completed after revocation"),
            Err(e) => break e,
        }
    };
    assert!(received < 40_000_000u64.div_ceil(64 * 1024));
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("grant revoked"), "{}", err.message());
    assert!(
        v.admin()
            .await
            .grants(Some("m"), None, false)
            .await
            .unwrap()
            .is_empty()
    );
    let all = v.admin().await.grants(Some("m"), None, true).await.unwrap();
    assert!(all[0].revoked);
    let entries = v.audit_entries().await;
    let rev = with_action(&entries, "revoke");
    assert_eq!(rev.len(), 1);
    assert_eq!(rev[0]["grant_id"], g.grant_id.as_str());
    assert!(rev[0]["reason"].as_str().unwrap().contains("lost laptop"));
}

#[tokio::test]
async fn revoking_a_measurement_node_or_model_refuses_new_grants_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut v = Vault::start(&data).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    fetch(&v, &tmp.path().join("o1")).await.unwrap();

    // Measurement ("TCB recovery").
    v.admin()
        .await
        .revoke(Target::Measurement(MEASUREMENT.to_uppercase()), "cve")
        .await
        .unwrap();
    let err = fetch(&v, &tmp.path().join("o2")).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(
        err.to_string().contains(&format!(
            "access denied: measurement {MEASUREMENT} is revoked"
        )),
        "{err}"
    );
    assert!(!tmp.path().join("o2").exists());
    let clock = v.clock.clone();
    v.stop().await;

    // Still revoked after a restart.
    let v = Vault::start_with_clock(&data, clock).await;
    let err = fetch(&v, &tmp.path().join("o3")).await.unwrap_err();
    assert!(err.to_string().contains("is revoked"), "{err}");
    let revs = v.admin().await.revocations().await.unwrap();
    assert_eq!(
        (revs[0].kind.as_str(), revs[0].value.as_str()),
        ("measurement", MEASUREMENT)
    );

    // Node and model@version on a second model and measurement.
    let other = "0123456789abcdef";
    v.push_dir("m2", &model_dir(tmp.path())).await;
    v.admin().await.allow("m2", "sim", other).await.unwrap();
    let mut node = v.attester(other);
    node.instance = "node-7".into();
    let get = |attester: common::TestAttester, out: &str| {
        let v = &v;
        let out = tmp.path().join(out);
        async move {
            v.node()
                .await
                .fetch(
                    "m2",
                    &FetchOptions::default(),
                    &attester,
                    &mut DirSink::new(&out),
                    &mut |_, _| {},
                )
                .await
        }
    };
    get(v.attester(other), "a").await.unwrap();
    v.admin()
        .await
        .revoke(Target::Node("node-7".into()), "")
        .await
        .unwrap();
    let err = get(node, "b").await.unwrap_err();
    assert!(err.to_string().contains("node node-7 is revoked"), "{err}");
    get(v.attester(other), "c").await.unwrap();
    v.admin()
        .await
        .revoke(Target::Model("m2@1".into()), "")
        .await
        .unwrap();
    let err = get(v.attester(other), "d").await.unwrap_err();
    assert!(err.to_string().contains("model m2@1 is revoked"), "{err}");
    let bad = v
        .admin()
        .await
        .revoke(Target::Model("m2@zero".into()), "")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(Code::InvalidArgument));
}

#[tokio::test]
async fn deny_removes_a_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    fetch(&v, &tmp.path().join("o1")).await.unwrap();
    v.admin()
        .await
        .deny("m", "sim", MEASUREMENT, Default::default())
        .await
        .unwrap();
    let err = fetch(&v, &tmp.path().join("o2")).await.unwrap_err();
    assert!(err.to_string().contains("no access rule allows"), "{err}");
    let again = v
        .admin()
        .await
        .deny("m", "sim", MEASUREMENT, Default::default())
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(Code::NotFound));
    assert_eq!(
        with_action(&v.audit_entries().await, "access_deny").len(),
        2
    );
}

#[tokio::test]
async fn egress_budgets_per_grant_node_and_model() {
    use weightvault::grant::hpke::NodeKeyPair;

    let tmp = tempfile::tempdir().unwrap();
    let clock = weightvault::time::ManualClock::new(weightvault::time::Clock::now_ms(
        &weightvault::time::SystemClock,
    ));
    let v = Vault::start_configured(&tmp.path().join("data"), clock, |c| {
        c.budgets.node_bytes_per_window = 1_000_000;
        c.budgets.model_bytes_per_window = 1_500_000;
        c.budgets.window_secs = 60;
    })
    .await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();

    // One grant, the 300 kB shard fetched again and again: the grant's budget (version size +
    // 10 % + one chunk) stops the second full pass.
    let mut c =
        NodeServiceClient::new(v.channel(None).await).max_decoding_message_size(MAX_MESSAGE);
    let grant_for = |instance: &'static str| {
        let v = &v;
        async move {
            let mut c = common::raw(v).await;
            let keys = NodeKeyPair::generate().unwrap();
            let mut a = v.attester(MEASUREMENT);
            a.instance = instance.into();
            let token = common::attest(&mut c, &a, &keys).await.unwrap();
            let g = common::grant(&mut c, &token, "m", 0).await.unwrap();
            (token, g.grant_id)
        }
    };
    let (t1, g1) = grant_for("node-a").await;
    assert_eq!(
        pass(&mut c, t1.clone(), g1.clone()).await.unwrap(),
        300_000 + 5 * 16
    );
    let err = pass(&mut c, t1, g1).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("egress budget of the grant exhausted"),
        "{}",
        err.message()
    );

    // Node budget: node-b may fetch 1,000,000 bytes per minute across grants.
    let mut served = 0u64;
    let err = loop {
        let (t, g) = grant_for("node-b").await;
        match pass(&mut c, t, g).await {
            Ok(n) => served += n,
            Err(e) => break e,
        }
    };
    assert!(served <= 1_000_000);
    assert!(
        err.message()
            .contains("egress budget of the node exhausted"),
        "{}",
        err.message()
    );

    // Model budget: all nodes together, 1,500,000 bytes per minute.
    let err = loop {
        let (t, g) = grant_for("node-c").await;
        if let Err(e) = pass(&mut c, t, g).await {
            break e;
        }
    };
    assert!(
        err.message()
            .contains("egress budget of the model exhausted"),
        "{}",
        err.message()
    );
    let alerts = with_action(&v.audit_entries().await, "budget_exceeded").len();
    assert_eq!(alerts, 3);
}

/// Streams the whole shard once; returns the ciphertext bytes received.
async fn pass(
    c: &mut NodeServiceClient<tonic::transport::Channel>,
    token: Vec<u8>,
    grant: String,
) -> Result<u64, tonic::Status> {
    let mut s = c
        .fetch_weights(FetchWeightsRequest {
            session_token: token,
            grant_id: grant,
            file: "model-00001.safetensors".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await?
        .into_inner();
    let mut n = 0u64;
    while let Some(ch) = s.message().await? {
        n += ch.ciphertext.len() as u64;
    }
    Ok(n)
}
