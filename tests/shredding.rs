//! `model rm NAME@VERSION`: crypto-shredding. The wrapped DEK goes first (grants revoked, running
//! streams stopped, the version unreadable), then the blobs; a crash between the two steps is
//! finished at the next start.

mod common;

use common::{MEASUREMENT, Vault, bytes, model_dir, with_action};
use weightvault::client::node::{DirSink, FetchOptions};
use weightvault::grant::hpke::NodeKeyPair;
use weightvault::proto::v1::FetchWeightsRequest;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::store::MetadataStore;
use weightvault::store::sqlite::SqliteStore;
use weightvault::time::{Clock, ManualClock, SystemClock};

/// A node client, an attestation session and a grant for `m`@`version`.
async fn granted(
    v: &Vault,
    version: u64,
) -> (
    NodeServiceClient<tonic::transport::Channel>,
    Vec<u8>,
    weightvault::proto::v1::RequestGrantResponse,
) {
    let mut raw = common::raw(v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let token = common::attest(&mut raw, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = common::grant(&mut raw, &token, "m", version).await.unwrap();
    (raw, token, g)
}

fn blob_dir(v: &Vault, version_id: &str) -> std::path::PathBuf {
    v.dir.join("blobs").join("v").join(version_id)
}

async fn version_id(v: &Vault, model: &str, version: u64) -> String {
    // The push entry names the version id.
    let entries = v.audit_entries().await;
    with_action(&entries, "push")
        .into_iter()
        .find(|e| e["model"] == model && e["version"] == version)
        .and_then(|e| e["reason"].as_str())
        .and_then(|r| r.rsplit(' ').next())
        .map(str::to_string)
        .expect("push entry names the version id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_destroys_the_key_then_the_blobs_and_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    // 24 MiB in 64 KiB chunks: more than the HTTP/2 window, so a stream is still running
    // when the version is destroyed.
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(big.join("weights.bin"), bytes(24 << 20, 3)).unwrap();
    assert_eq!(v.push_dir("m", &big).await, 1);
    assert_eq!(v.push_dir("m", &model_dir(tmp.path())).await, 2);
    let mut admin = v.admin().await;
    admin.allow("m", "sim", MEASUREMENT).await.unwrap();
    let vid = version_id(&v, "m", 1).await;
    assert!(blob_dir(&v, &vid).is_dir());

    // A live grant for version 1 and a stream on it that has started.
    let (mut raw, token, g) = granted(&v, 1).await;
    let mut stream = raw
        .fetch_weights(FetchWeightsRequest {
            session_token: token.clone(),
            grant_id: g.grant_id.clone(),
            file: "weights.bin".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().index, 0);

    let r = admin
        .remove_version("m", 1, "licence withdrawn")
        .await
        .unwrap();
    assert_eq!(r.version_id, vid);
    assert_eq!(r.grants_revoked, 1);
    assert!(r.proposal_id.is_empty());

    // The running stream stops before the end of the file.
    let mut received = 1u64;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ran to the end after the version was destroyed"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().starts_with("grant revoked"), "{err:?}");
    assert!(received < 384, "received {received} of 384 chunks");

    // The grant is dead, the version is gone, and so are its blobs.
    let again = raw
        .fetch_weights(FetchWeightsRequest {
            session_token: token.clone(),
            grant_id: g.grant_id.clone(),
            file: "weights.bin".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    let refused = common::grant(&mut raw, &token, "m", 1).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    assert!(!blob_dir(&v, &vid).exists());
    let grants = admin.grants(Some("m"), None, true).await.unwrap();
    assert!(grants.iter().all(|x| x.revoked));

    // The other version still reads; the latest is now 2, and 1 is never reused.
    let out = tmp.path().join("out");
    let report = v
        .node()
        .await
        .fetch(
            "m",
            &FetchOptions::default(),
            &v.attester(MEASUREMENT),
            &mut DirSink::new(&out),
            &mut |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(report.version, 2);
    common::assert_same_tree(&out, &model_dir(tmp.path()));
    let shown = admin.show("m").await.unwrap();
    assert_eq!(
        shown.versions.iter().map(|x| x.version).collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(v.push_dir("m", &big).await, 3);

    // Destroying twice, or without a version, is refused and changes nothing.
    let twice = admin.remove_version("m", 1, "").await.unwrap_err();
    assert_eq!(twice.code(), Some(tonic::Code::NotFound));
    let no_version = admin.remove_version("m", 0, "").await.unwrap_err();
    assert_eq!(no_version.code(), Some(tonic::Code::InvalidArgument));

    // On the record: one destruction, naming the version id and the reason.
    let entries = v.audit_entries().await;
    let rm = with_action(&entries, "model_rm");
    assert_eq!(rm.len(), 1, "{rm:?}");
    assert_eq!(rm[0]["model"], "m");
    assert_eq!(rm[0]["version"], 1);
    assert_eq!(rm[0]["actor"]["kind"], "admin");
    let reason = rm[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&vid) && reason.contains("licence withdrawn"),
        "{reason}"
    );
    let rev = admin.revocations().await.unwrap();
    assert!(rev.iter().any(|r| r.kind == "model" && r.value == "m@1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_key_and_blobs_leaves_nothing_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut v = Vault::start(&data).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    let vid = version_id(&v, "m", 1).await;
    v.stop().await;

    // Step 1 only, as a crash right after it would leave the store.
    {
        let store = SqliteStore::open(&data.join("metadata.db")).await.unwrap();
        let gone = store
            .destroy_version("m", 1, 1, "model version destroyed")
            .await
            .unwrap()
            .expect("version existed");
        assert_eq!(hex::encode(gone.version_id), vid);
        assert_eq!(store.destroyed_pending_blobs().await.unwrap().len(), 1);
        assert!(store.get_version("m", Some(1)).await.unwrap().is_none());
    }
    assert!(blob_dir(&v, &vid).is_dir(), "blobs are still there");

    // The next start collects them; the version stays unreadable.
    let v = Vault::start(&data).await;
    assert!(!blob_dir(&v, &vid).exists());
    let err = v
        .node()
        .await
        .fetch(
            "m",
            &FetchOptions::default(),
            &v.attester(MEASUREMENT),
            &mut DirSink::new(&tmp.path().join("o")),
            &mut |_, _| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    assert!(!tmp.path().join("o").exists());
    drop(v);
    let store = SqliteStore::open(&data.join("metadata.db")).await.unwrap();
    assert!(store.destroyed_pending_blobs().await.unwrap().is_empty());
    assert_eq!(store.next_version("m").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_can_require_approvals() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start_configured(
        &tmp.path().join("data"),
        ManualClock::new(SystemClock.now_ms()),
        |cfg| {
            cfg.approvals.quorum = 2;
            cfg.approvals.operations = vec!["model_rm".into()];
        },
    )
    .await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    let mut admin = v.admin().await;
    let r = admin.remove_version("m", 1, "").await.unwrap();
    assert!(r.proposal_id.starts_with("p-"), "{r:?}");
    assert!(r.version_id.is_empty());
    // Nothing destroyed yet; the same admin approving again does not reach the quorum.
    assert_eq!(admin.show("m").await.unwrap().versions.len(), 1);
    let p = admin.decide(&r.proposal_id, true).await.unwrap();
    assert_eq!(p.state, "pending");
    assert_eq!(admin.show("m").await.unwrap().versions.len(), 1);
    let entries = v.audit_entries().await;
    assert!(with_action(&entries, "model_rm").is_empty());
    assert_eq!(with_action(&entries, "propose").len(), 1);
}

/// A stream whose grant check passed just before `model rm` revoked the grant, and whose next
/// blob read finds the blobs gone, ends as the revocation it met ("grant revoked",
/// PERMISSION_DENIED), not as a store fault. The race is made deterministic: the store answers
/// the vault's first grant reads as they were before the revocation, and the blobs are
/// removed by hand. A missing blob under a live grant stays an internal error.
#[tokio::test]
async fn a_blob_gone_after_the_grant_check_reports_the_revocation() {
    let tmp = tempfile::tempdir().unwrap();
    let (wrap, slot) = common::faulty_wrapper();
    let v = Vault::start_wrapped(&tmp.path().join("data"), wrap).await;
    let faulty = slot.get().unwrap().clone();
    assert_eq!(v.push_dir("m", &model_dir(tmp.path())).await, 1);
    let mut admin = v.admin().await;
    admin.allow("m", "sim", MEASUREMENT).await.unwrap();
    let vid = version_id(&v, "m", 1).await;

    let (mut raw, token, g) = granted(&v, 1).await;
    let request = || FetchWeightsRequest {
        session_token: token.clone(),
        grant_id: g.grant_id.clone(),
        file: "model-00001.safetensors".into(),
        first_chunk: 0,
        end_chunk: 0,
    };
    std::fs::remove_dir_all(blob_dir(&v, &vid)).unwrap();

    // Live grant, blobs gone: a store fault.
    let err = first_error(&mut raw, request()).await;
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");

    // Revoked grant, read stale twice (the start check and the first chunk's check): the
    // blob read fails, and the grant as it is now names the reason.
    admin
        .revoke(
            weightvault::proto::v1::revoke_request::Target::GrantId(g.grant_id.clone()),
            "test",
        )
        .await
        .unwrap();
    faulty
        .stale_grant_reads
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let err = first_error(&mut raw, request()).await;
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().starts_with("grant revoked"), "{err:?}");
    assert_eq!(
        faulty
            .stale_grant_reads
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let ends = with_action(&v.audit_entries().await, "fetch_end")
        .into_iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(ends, ["chunk unreadable", "grant revoked"]);
}

/// The status a FetchWeights call ends with before any chunk, whether the vault refused it at
/// once or after starting the response.
async fn first_error(
    raw: &mut NodeServiceClient<tonic::transport::Channel>,
    req: FetchWeightsRequest,
) -> tonic::Status {
    match raw.fetch_weights(req).await {
        Err(e) => e,
        Ok(r) => match r.into_inner().message().await {
            Err(e) => e,
            Ok(m) => panic!("a chunk or the end came instead of an error: {m:?}"),
        },
    }
}
