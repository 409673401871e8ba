//! The storage backends: one conformance suite for every `MetadataStore` (SQLite and
//! PostgreSQL) and every `BlobStore` (local directory and S3), concurrency of the shared
//! backends, storage config validation, and the key flows of a vault on PostgreSQL + S3.
//! PostgreSQL and S3 come from WEIGHTVAULT_TEST_PG and WEIGHTVAULT_TEST_S3 (.ci/services/).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use common::{MEASUREMENT, Vault, model_dir, service, with_action};
use tonic::Code;
use weightvault::audit::merkle;
use weightvault::audit::note::NoteVerifier;
use weightvault::audit::replay::{self, Input};
use weightvault::client::node::{DirSink, FetchOptions};
use weightvault::config::Config;
use weightvault::proto::v1::FetchWeightsRequest;
use weightvault::proto::v1::revoke_request::Target;
use weightvault::store::local::LocalBlobs;
use weightvault::store::postgres::PgStore;
use weightvault::store::s3::{S3Blobs, S3Options};
use weightvault::store::sqlite::SqliteStore;
use weightvault::store::{
    AccessRule, BlobStore, CheckpointRecord, GrantRecord, KekRecord, MetadataStore, ProposalRecord,
    Revocation, RevocationKind, RootChange, SessionRecord, StoreError, VersionRecord,
};
use weightvault::time::{ManualClock, SystemClock};

fn version(model: &str, n: u64, id: u8) -> VersionRecord {
    VersionRecord {
        model: model.into(),
        version: n,
        version_id: [id; 16],
        kek_version: 1,
        wrapped_dek: vec![id, 1],
        manifest: vec![id, 2],
        manifest_sig: vec![id, 3],
        total_bytes: 100 + u64::from(id),
        created_ms: 1000 + u64::from(id),
    }
}

fn rule(model: &str, m: &str, require: &[(&str, &str)]) -> AccessRule {
    AccessRule {
        model: model.into(),
        tee: "sim".into(),
        measurement: m.into(),
        require: require
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        created_ms: 7,
    }
}

fn grant(id: &str, model: &str, v: u64, node: &str, m: &str, created: u64) -> GrantRecord {
    GrantRecord {
        grant_id: id.into(),
        session_sha256: [9; 32],
        model: model.into(),
        version: v,
        node_public_key: [8; 32],
        instance_id: node.into(),
        tee: "sim".into(),
        measurement: m.into(),
        created_ms: created,
        not_after_ms: created + 1000,
        revoked: false,
        bytes_served: 0,
    }
}

fn ids(gs: &[GrantRecord]) -> Vec<&str> {
    gs.iter().map(|g| g.grant_id.as_str()).collect()
}

/// Every trait method's contract, on an empty store.
async fn metadata_conformance(s: &dyn MetadataStore) {
    // Audit sequence: consecutive indexes from 0, ranges, limits, size.
    assert_eq!(s.audit_size().await.unwrap(), 0);
    assert_eq!(
        s.append_audit(&[b"a".to_vec(), b"b".to_vec()])
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.append_audit(&[b"c".to_vec()]).await.unwrap(), 2);
    let big: Vec<Vec<u8>> = (0..1203u32).map(|n| n.to_be_bytes().to_vec()).collect();
    assert_eq!(s.append_audit(&big).await.unwrap(), 3);
    assert_eq!(s.audit_size().await.unwrap(), 1206);
    assert_eq!(
        s.audit_entries(1, 3, 10).await.unwrap(),
        vec![(1, b"b".to_vec()), (2, b"c".to_vec())]
    );
    let page = s.audit_entries(0, u64::MAX, 600).await.unwrap();
    assert_eq!(page.len(), 600);
    assert!(page.iter().enumerate().all(|(n, (i, _))| *i == n as u64));
    assert_eq!(page[503].1, 500u32.to_be_bytes().to_vec());
    assert!(
        s.audit_entries(1206, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Checkpoints: the largest size wins; same size replaces.
    assert!(s.latest_checkpoint().await.unwrap().is_none());
    let cp = |size, note: &str| CheckpointRecord {
        size,
        root: [size as u8; 32],
        note: note.into(),
        created_ms: size,
    };
    s.put_checkpoint(&cp(3, "three")).await.unwrap();
    s.put_checkpoint(&cp(5, "five")).await.unwrap();
    s.put_checkpoint(&cp(4, "four")).await.unwrap();
    s.put_checkpoint(&cp(5, "five again")).await.unwrap();
    let latest = s.latest_checkpoint().await.unwrap().unwrap();
    assert_eq!((latest.size, latest.note.as_str()), (5, "five again"));
    assert_eq!(latest.root, [5; 32]);

    // KEKs and wrapped secrets.
    let kek = |v| KekRecord {
        version: v,
        wrapped: vec![v as u8; 40],
        created_ms: 1,
    };
    s.insert_kek(&kek(2)).await.unwrap();
    s.insert_kek(&kek(1)).await.unwrap();
    assert!(matches!(
        s.insert_kek(&kek(1)).await,
        Err(StoreError::Conflict(_))
    ));
    let keks = s.keks().await.unwrap();
    assert_eq!(
        keks.iter().map(|k| k.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(keks[1].wrapped, vec![2; 40]);
    assert_eq!(s.get_wrapped_secret("sig").await.unwrap(), None);
    assert!(s.put_wrapped_secret_if_absent("sig", b"one").await.unwrap());
    assert!(!s.put_wrapped_secret_if_absent("sig", b"two").await.unwrap());
    assert_eq!(
        s.get_wrapped_secret("sig").await.unwrap(),
        Some(b"one".to_vec())
    );

    // Uploads and versions.
    s.begin_upload(&[1; 16], "m", 100).await.unwrap();
    s.begin_upload(&[2; 16], "m", 200).await.unwrap();
    s.begin_upload(&[3; 16], "m", 300).await.unwrap();
    let mut pending = s.pending_uploads().await.unwrap();
    pending.sort();
    assert_eq!(pending, vec![[1; 16], [2; 16], [3; 16]]);
    let mut old = s.pending_uploads_before(250).await.unwrap();
    old.sort();
    assert_eq!(old, vec![[1; 16], [2; 16]]);
    assert_eq!(s.next_version("m").await.unwrap(), 1);
    s.commit_version(&version("m", 1, 1)).await.unwrap();
    s.commit_version(&version("m", 2, 2)).await.unwrap();
    assert!(matches!(
        s.commit_version(&version("m", 2, 3)).await,
        Err(StoreError::Conflict(_))
    ));
    // The refused commit changed nothing: its upload is still pending.
    assert_eq!(s.pending_uploads().await.unwrap(), vec![[3; 16]]);
    s.end_upload(&[3; 16]).await.unwrap();
    assert!(s.pending_uploads().await.unwrap().is_empty());
    s.commit_version(&version("a", 1, 4)).await.unwrap();
    assert_eq!(s.next_version("m").await.unwrap(), 3);
    let models = s.list_models().await.unwrap();
    assert_eq!(
        models
            .iter()
            .map(|m| (m.name.as_str(), m.latest_version, m.versions))
            .collect::<Vec<_>>(),
        vec![("a", 1, 1), ("m", 2, 2)]
    );
    let vs = s.versions("m").await.unwrap();
    assert_eq!(vs.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2]);
    assert!(s.versions("nope").await.unwrap().is_empty());
    let latest = s.get_version("m", None).await.unwrap().unwrap();
    assert_eq!(latest.version_id, [2; 16]);
    assert_eq!(latest.wrapped_dek, vec![2, 1]);
    assert_eq!(latest.manifest_sig, vec![2, 3]);
    assert_eq!(latest.total_bytes, 102);
    assert_eq!(
        s.get_version("m", Some(1))
            .await
            .unwrap()
            .unwrap()
            .version_id,
        [1; 16]
    );
    assert!(s.get_version("m", Some(9)).await.unwrap().is_none());

    // Rules: identity is (model, tee, measurement, requirements); ordered.
    assert!(s.add_rule(&rule("m", "bb", &[])).await.unwrap());
    assert!(s.add_rule(&rule("m", "aa", &[])).await.unwrap());
    assert!(!s.add_rule(&rule("m", "aa", &[])).await.unwrap());
    assert!(
        s.add_rule(&rule("m", "aa", &[("debug", "false")]))
            .await
            .unwrap()
    );
    assert!(s.add_rule(&rule("a", "zz", &[])).await.unwrap());
    let rules = s.rules(Some("m")).await.unwrap();
    assert_eq!(
        rules
            .iter()
            .map(|r| (r.measurement.as_str(), r.require.len()))
            .collect::<Vec<_>>(),
        // Requirements sort as their JSON text, bytewise: `{"debug":...}` before `{}`.
        vec![("aa", 1), ("aa", 0), ("bb", 0)]
    );
    assert_eq!(rules[0].require["debug"], "false");
    let all = s.rules(None).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].model, "a");
    assert!(s.remove_rule(&rule("m", "aa", &[])).await.unwrap());
    assert!(!s.remove_rule(&rule("m", "aa", &[])).await.unwrap());
    assert_eq!(s.rules(Some("m")).await.unwrap().len(), 2);

    // Challenges are single use; purge removes expired challenges and sessions.
    s.put_challenge(&[1; 32], 50).await.unwrap();
    s.put_challenge(&[2; 32], 500).await.unwrap();
    assert_eq!(s.take_challenge(&[1; 32]).await.unwrap(), Some(50));
    assert_eq!(s.take_challenge(&[1; 32]).await.unwrap(), None);
    assert_eq!(s.take_challenge(&[7; 32]).await.unwrap(), None);
    let session = |t: u8, exp| SessionRecord {
        token_sha256: [t; 32],
        claims_json: format!("{{\"n\":{t}}}"),
        node_public_key: [t + 1; 32],
        evidence_sha256: [t + 2; 32],
        created_ms: 1,
        expires_ms: exp,
    };
    s.put_session(&session(1, 50)).await.unwrap();
    s.put_session(&session(2, 500)).await.unwrap();
    let got = s.get_session(&[2; 32]).await.unwrap().unwrap();
    assert_eq!(
        (
            got.claims_json.as_str(),
            got.node_public_key,
            got.expires_ms
        ),
        ("{\"n\":2}", [3; 32], 500)
    );
    s.purge_expired(100).await.unwrap();
    assert!(s.get_session(&[1; 32]).await.unwrap().is_none());
    assert!(s.get_session(&[2; 32]).await.unwrap().is_some());
    assert_eq!(s.take_challenge(&[2; 32]).await.unwrap(), Some(500));

    // Evidence is content-addressed and idempotent.
    s.put_evidence(&[5; 32], b"ev").await.unwrap();
    s.put_evidence(&[5; 32], b"ev").await.unwrap();
    assert_eq!(
        s.get_evidence(&[5; 32]).await.unwrap(),
        Some(b"ev".to_vec())
    );
    assert_eq!(s.get_evidence(&[6; 32]).await.unwrap(), None);

    // Grants: filters, newest first, live filter, byte counter.
    s.put_grant(&grant("g1", "m", 1, "n1", "aa", 10))
        .await
        .unwrap();
    s.put_grant(&grant("g2", "m", 2, "n2", "bb", 20))
        .await
        .unwrap();
    s.put_grant(&grant("g3", "a", 1, "n1", "bb", 30))
        .await
        .unwrap();
    s.put_grant(&grant("g4", "m", 2, "n3", "cc", 40))
        .await
        .unwrap();
    assert_eq!(
        ids(&s.grants(None, None, None).await.unwrap()),
        ["g4", "g3", "g2", "g1"]
    );
    assert_eq!(
        ids(&s.grants(Some("m"), None, None).await.unwrap()),
        ["g4", "g2", "g1"]
    );
    assert_eq!(
        ids(&s.grants(None, Some("n1"), None).await.unwrap()),
        ["g3", "g1"]
    );
    assert_eq!(
        ids(&s.grants(None, None, Some(1015)).await.unwrap()),
        ["g4", "g3", "g2"]
    );
    s.add_grant_bytes("g1", 10).await.unwrap();
    s.add_grant_bytes("g1", 5).await.unwrap();
    let g1 = s.get_grant("g1").await.unwrap().unwrap();
    assert_eq!((g1.bytes_served, g1.instance_id.as_str()), (15, "n1"));
    assert!(s.get_grant("nope").await.unwrap().is_none());

    // Revocations mark what they cover, once; the same kind and value replaces.
    let rev = |kind, value: &str, at| Revocation {
        kind,
        value: value.into(),
        created_ms: at,
        reason: format!("r{at}"),
    };
    assert_eq!(
        s.revoke(&rev(RevocationKind::Model, "m@2", 5))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.revoke(&rev(RevocationKind::Node, "n1", 6)).await.unwrap(),
        2
    );
    assert_eq!(
        s.revoke(&rev(RevocationKind::Measurement, "bb", 7))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.revoke(&rev(RevocationKind::Grant, "g1", 8))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.revoke(&rev(RevocationKind::Node, "n1", 9)).await.unwrap(),
        0
    );
    assert!(matches!(
        s.revoke(&rev(RevocationKind::Model, "m@x", 10)).await,
        Err(StoreError::Corrupt(_))
    ));
    let revs = s.revocations().await.unwrap();
    assert_eq!(
        revs.iter()
            .map(|r| (r.kind, r.value.as_str(), r.created_ms))
            .collect::<Vec<_>>(),
        vec![
            (RevocationKind::Model, "m@2", 5),
            (RevocationKind::Measurement, "bb", 7),
            (RevocationKind::Grant, "g1", 8),
            (RevocationKind::Node, "n1", 9),
        ]
    );
    assert_eq!(revs[3].reason, "r9");
    assert!(s.get_grant("g4").await.unwrap().unwrap().revoked);
    assert!(s.grants(None, None, Some(0)).await.unwrap().is_empty());

    // Proposals: newest first, pending filter, compare-and-swap updates.
    let prop = |id: &str, at| ProposalRecord {
        id: id.into(),
        operation: "access_allow".into(),
        payload: "{}".into(),
        proposer: "aa".into(),
        approvers: vec!["aa".into()],
        quorum: 2,
        state: "pending".into(),
        created_ms: at,
        expires_ms: at + 100,
    };
    s.put_proposal(&prop("p1", 1)).await.unwrap();
    s.put_proposal(&prop("p2", 2)).await.unwrap();
    let mut next = prop("p1", 1);
    next.approvers.push("bb".into());
    next.state = "applied".into();
    assert!(s.update_proposal(&prop("p1", 1), &next).await.unwrap());
    assert!(!s.update_proposal(&prop("p1", 1), &next).await.unwrap());
    assert_eq!(s.get_proposal("p1").await.unwrap().unwrap(), next);
    assert!(s.get_proposal("p9").await.unwrap().is_none());
    let all: Vec<String> = s
        .proposals(false)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(all, ["p2", "p1"]);
    let pending: Vec<String> = s
        .proposals(true)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(pending, ["p2"]);
}

/// The key-rotation, root-change and crypto-shredding methods, on an empty store.
async fn key_methods_conformance(s: &dyn MetadataStore) {
    let kek = |v, b: u8| KekRecord {
        version: v,
        wrapped: vec![b; 40],
        created_ms: 1,
    };
    s.insert_kek(&kek(1, 1)).await.unwrap();
    s.insert_kek(&kek(2, 2)).await.unwrap();
    s.put_wrapped_secret_if_absent("a", b"old").await.unwrap();
    s.commit_version(&version("m", 1, 1)).await.unwrap();
    s.commit_version(&version("m", 2, 2)).await.unwrap();

    // Root change: a failed expectation is a conflict and changes nothing.
    let refused = RootChange {
        keks: Some(vec![kek(1, 11), kek(2, 12)]),
        expect: vec![("a".into(), Some(b"other".to_vec()))],
        put: vec![("b".into(), b"new".to_vec())],
        delete: vec!["a".into()],
    };
    assert!(matches!(
        s.change_root_material(&refused).await,
        Err(StoreError::Conflict(_))
    ));
    let wrong_keks = RootChange {
        keks: Some(vec![kek(1, 11)]),
        ..RootChange::default()
    };
    assert!(matches!(
        s.change_root_material(&wrong_keks).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.keks().await.unwrap()[0].wrapped, vec![1; 40]);
    assert_eq!(s.get_wrapped_secret("b").await.unwrap(), None);
    let ok = RootChange {
        expect: vec![("a".into(), Some(b"old".to_vec())), ("b".into(), None)],
        ..refused
    };
    s.change_root_material(&ok).await.unwrap();
    let keks = s.keks().await.unwrap();
    assert_eq!((keks[0].wrapped[0], keks[1].wrapped[0]), (11, 12));
    assert_eq!(s.get_wrapped_secret("a").await.unwrap(), None);
    assert_eq!(
        s.get_wrapped_secret("b").await.unwrap(),
        Some(b"new".to_vec())
    );

    // Rewrap is compare-and-swap on the KEK version; a KEK in use is not retired.
    assert!(!s.retire_kek(1).await.unwrap());
    assert!(s.rewrap_dek(&[1; 16], 1, 2, b"rewrapped").await.unwrap());
    assert!(!s.rewrap_dek(&[1; 16], 1, 2, b"again").await.unwrap());
    let v1 = s.get_version("m", Some(1)).await.unwrap().unwrap();
    assert_eq!(
        (v1.kek_version, v1.wrapped_dek.as_slice()),
        (2, &b"rewrapped"[..])
    );
    assert!(s.rewrap_dek(&[2; 16], 1, 2, b"r2").await.unwrap());
    assert!(s.retire_kek(1).await.unwrap());
    assert!(!s.retire_kek(2).await.unwrap());
    assert_eq!(
        s.keks()
            .await
            .unwrap()
            .iter()
            .map(|k| k.version)
            .collect::<Vec<_>>(),
        vec![2]
    );

    // Destroying a version: gone, its number never reused, its grants revoked, blobs pending.
    s.put_grant(&grant("g1", "m", 2, "n", "aa", 1))
        .await
        .unwrap();
    s.put_grant(&grant("g2", "m", 1, "n", "aa", 2))
        .await
        .unwrap();
    let d = s
        .destroy_version("m", 2, 50, "shred")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.version_id, d.grants_revoked, d.destroyed_ms),
        ([2; 16], 1, 50)
    );
    assert!(s.get_version("m", Some(2)).await.unwrap().is_none());
    assert_eq!(s.get_version("m", None).await.unwrap().unwrap().version, 1);
    assert_eq!(s.next_version("m").await.unwrap(), 3);
    assert!(s.get_grant("g1").await.unwrap().unwrap().revoked);
    assert!(!s.get_grant("g2").await.unwrap().unwrap().revoked);
    let revs = s.revocations().await.unwrap();
    assert_eq!(
        (
            revs[0].kind,
            revs[0].value.as_str(),
            revs[0].reason.as_str()
        ),
        (RevocationKind::Model, "m@2", "shred")
    );
    assert_eq!(s.destroyed_pending_blobs().await.unwrap(), vec![[2; 16]]);
    s.blobs_collected(&[2; 16]).await.unwrap();
    assert!(s.destroyed_pending_blobs().await.unwrap().is_empty());
    assert!(
        s.destroy_version("m", 2, 60, "again")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.destroy_version("m", 9, 60, "never")
            .await
            .unwrap()
            .is_none()
    );
}

/// Every `BlobStore` contract point.
async fn blob_conformance(b: &dyn BlobStore) {
    b.put("v/ab/01/0", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    b.put("v/ab/01/1", Bytes::from(vec![7u8; 300_000]))
        .await
        .unwrap();
    b.put("v/abc/01/0", Bytes::from_static(b"other"))
        .await
        .unwrap();
    b.sync_prefix("v/ab").await.unwrap();
    assert_eq!(&b.get("v/ab/01/0").await.unwrap()[..], b"hello");
    assert_eq!(b.get("v/ab/01/1").await.unwrap().len(), 300_000);
    assert!(matches!(
        b.get("v/ab/01/2").await,
        Err(StoreError::NotFound)
    ));
    for key in ["../x", "a//b", "A", "a/./b", "", "v/ab/"] {
        assert!(b.get(key).await.is_err(), "{key:?}");
        assert!(b.put(key, Bytes::new()).await.is_err(), "{key:?}");
    }
    // A prefix is whole segments: deleting v/ab leaves v/abc.
    b.delete_prefix("v/ab").await.unwrap();
    assert!(matches!(
        b.get("v/ab/01/0").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        b.get("v/ab/01/1").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(&b.get("v/abc/01/0").await.unwrap()[..], b"other");
    b.delete_prefix("v/never").await.unwrap();
}

async fn pg_store(test: &str) -> Option<PgStore> {
    let base = service("WEIGHTVAULT_TEST_PG", test)?;
    Some(
        PgStore::open(&common::fresh_database(&base).await)
            .await
            .unwrap(),
    )
}

async fn s3_blobs(test: &str) -> Option<S3Blobs> {
    let url = service("WEIGHTVAULT_TEST_S3", test)?;
    let (endpoint, bucket) = common::s3_endpoint_bucket(&url);
    Some(
        S3Blobs::open(S3Options {
            bucket,
            prefix: format!("conformance/{}", common::fresh_prefix()),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            allow_http: true,
            access_key_id: Some("test".into()),
            secret_access_key: Some(zeroize::Zeroizing::new("test".into())),
        })
        .await
        .unwrap(),
    )
}

#[tokio::test]
async fn sqlite_meets_the_metadata_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("m.db")).await.unwrap();
    metadata_conformance(&s).await;
    let s = SqliteStore::open(&dir.path().join("k.db")).await.unwrap();
    key_methods_conformance(&s).await;
}

#[tokio::test]
async fn postgres_meets_the_metadata_contract() {
    let Some(s) = pg_store("postgres_meets_the_metadata_contract").await else {
        return;
    };
    metadata_conformance(&s).await;
    s.close().await;
    let Some(s) = pg_store("postgres_meets_the_metadata_contract").await else {
        return;
    };
    key_methods_conformance(&s).await;
    s.close().await;
}

#[tokio::test]
async fn local_blobs_meet_the_blob_contract() {
    let dir = tempfile::tempdir().unwrap();
    blob_conformance(&LocalBlobs::open(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn s3_blobs_meet_the_blob_contract() {
    let Some(b) = s3_blobs("s3_blobs_meet_the_blob_contract").await else {
        return;
    };
    blob_conformance(&b).await;
}

#[tokio::test]
async fn s3_open_fails_on_a_missing_bucket() {
    let Some(url) = service("WEIGHTVAULT_TEST_S3", "s3_open_fails_on_a_missing_bucket") else {
        return;
    };
    let (endpoint, _) = common::s3_endpoint_bucket(&url);
    let r = S3Blobs::open(S3Options {
        bucket: "no-such-bucket-here".into(),
        prefix: String::new(),
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        access_key_id: Some("test".into()),
        secret_access_key: Some(zeroize::Zeroizing::new("test".into())),
    })
    .await;
    assert!(matches!(
        r,
        Err(StoreError::Io(_)) | Err(StoreError::NotFound)
    ));
}

/// Two pools on one database behave as two replicas: concurrent appends get one total order
/// without gaps or duplicates, and a challenge is taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_orders_appends_from_several_replicas() {
    let Some(base) = service(
        "WEIGHTVAULT_TEST_PG",
        "postgres_orders_appends_from_several_replicas",
    ) else {
        return;
    };
    let url = common::fresh_database(&base).await;
    // Replicas starting together both migrate safely.
    let (a, b) = tokio::join!(PgStore::open(&url), PgStore::open(&url));
    let stores: [Arc<dyn MetadataStore>; 2] = [Arc::new(a.unwrap()), Arc::new(b.unwrap())];
    let mut tasks = Vec::new();
    for t in 0..8u8 {
        let s = stores[usize::from(t % 2)].clone();
        tasks.push(tokio::spawn(async move {
            let mut firsts = Vec::new();
            for n in 0..25u8 {
                let batch = vec![vec![t, n, 0], vec![t, n, 1]];
                firsts.push((s.append_audit(&batch).await.unwrap(), t, n));
            }
            firsts
        }));
    }
    let mut expected = BTreeMap::new();
    for t in tasks {
        for (first, t, n) in t.await.unwrap() {
            expected.insert(first, vec![t, n, 0]);
            expected.insert(first + 1, vec![t, n, 1]);
        }
    }
    assert_eq!(expected.len(), 400);
    assert_eq!(stores[1].audit_size().await.unwrap(), 400);
    let stored = stores[0].audit_entries(0, u64::MAX, 1000).await.unwrap();
    assert_eq!(stored.len(), 400);
    for (i, e) in stored {
        assert_eq!(expected.get(&i), Some(&e), "entry {i}");
    }

    stores[0].put_challenge(&[3; 32], 9).await.unwrap();
    let (x, y) = tokio::join!(
        stores[0].take_challenge(&[3; 32]),
        stores[1].take_challenge(&[3; 32])
    );
    let mut got = [x.unwrap(), y.unwrap()];
    got.sort();
    assert_eq!(got, [None, Some(9)]);
}

#[tokio::test]
async fn postgres_lease_has_one_holder_and_can_be_taken_over() {
    let Some(s) = pg_store("postgres_lease_has_one_holder_and_can_be_taken_over").await else {
        return;
    };
    assert!(s.audit_lease("a", 60_000).await.unwrap());
    assert!(!s.audit_lease("b", 60_000).await.unwrap());
    assert!(s.audit_lease("a", 60_000).await.unwrap());
    // Released by its holder: free at once.
    assert!(!s.audit_lease("a", 0).await.unwrap());
    assert!(s.audit_lease("b", 60_000).await.unwrap());
    assert!(!s.audit_lease("a", 60_000).await.unwrap());
    // A holder that stops renewing loses it when it expires (the database's clock).
    assert!(!s.audit_lease("b", 0).await.unwrap());
    assert!(s.audit_lease("a", 1).await.unwrap());
    common::wait_until("the expired lease taken over", async || {
        s.audit_lease("b", 60_000).await.unwrap()
    })
    .await;
    assert!(!s.audit_lease("a", 60_000).await.unwrap());
}

#[test]
fn storage_config_is_validated_before_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = weightvault::config::dev::ensure(&tmp.path().join("d")).unwrap();
    // The dev config without the sections the cases below write.
    let mut table: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    table.remove("storage");
    table.remove("audit");
    let base = toml::to_string(&table).unwrap();
    let load = |extra: &str| {
        std::fs::write(&path, format!("{base}\n{extra}")).unwrap();
        Config::load(&path)
    };
    let good = load(
        "[storage]\nmetadata = \"postgres://vault@db.internal:5432/weightvault\"\n\
         blobs = \"s3://weights/prod\"\n[storage.s3]\nregion = \"eu-west-1\"\n",
    )
    .unwrap();
    assert!(good.storage.is_shared());
    assert_eq!(good.storage.blobs.as_deref(), Some("s3://weights/prod"));
    let err = load(
        "[storage]\nmetadata = \"postgres://vault:hunter2@db/weightvault\"\n\
         blobs = \"s3://Bad_Bucket/x\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:9000\"\n\
         access_key_id = \"AKIA\"\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "storage.metadata: the URL must not contain a password",
        "storage.blobs: bucket \"Bad_Bucket\" is not a valid S3 bucket name",
        "storage.s3.endpoint: \"http://127.0.0.1:9000\" is plain HTTP",
        "storage.s3: access_key_id and secret_access_key_file go together",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!err.contains("hunter2"), "{err}");
    let err = load("[storage]\nmetadata = \"mysql://x/y\"\n[storage.s3]\nregion = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("storage.metadata: \"mysql://x/y\" is not a postgres:// URL"),
        "{err}"
    );
    assert!(
        err.contains("storage.s3 is set but storage.blobs is not an s3:// URL"),
        "{err}"
    );
    let err = load("[audit]\nlease_secs = 0\n").unwrap_err().to_string();
    assert!(
        err.contains("audit.lease_secs: 0 is outside 1..=300"),
        "{err}"
    );
}

/// A vault on PostgreSQL + S3, or `None` (skipped) when the services are not configured.
async fn shared_vault(test: &str, dir: &std::path::Path) -> Option<Vault> {
    let pg = service("WEIGHTVAULT_TEST_PG", test)?;
    let s3 = service("WEIGHTVAULT_TEST_S3", test)?;
    let db = common::fresh_database(&pg).await;
    let prefix = common::fresh_prefix();
    let data = dir.join("data");
    Some(
        Vault::start_configured(&data, ManualClock::new(SystemClock.now_ms()), |cfg| {
            common::use_shared_storage(cfg, &db, &s3, &prefix, dir)
        })
        .await,
    )
}

use weightvault::time::Clock;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_fetch_revoke_and_verify_on_postgres_and_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut v) = shared_vault(
        "push_fetch_revoke_and_verify_on_postgres_and_s3",
        tmp.path(),
    )
    .await
    else {
        return;
    };
    // Nothing of the store is in the data directory: metadata and blobs live in the services.
    assert!(!v.dir.join("metadata.db").exists());
    assert!(!v.dir.join("blobs").exists());
    let src = model_dir(tmp.path());
    assert_eq!(v.push_dir("m", &src).await, 1);
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
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
    assert_eq!(report.version, 1);
    common::assert_same_tree(&src, &out);

    // A revoked grant serves nothing more (running streams: tests/replicas.rs, revocation.rs).
    use weightvault::grant::hpke::NodeKeyPair;
    let mut c = common::raw(&v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let token = common::attest(&mut c, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = common::grant(&mut c, &token, "m", 1).await.unwrap();
    let n = v
        .admin()
        .await
        .revoke(Target::GrantId(g.grant_id.clone()), "test")
        .await
        .unwrap();
    assert_eq!(n, 1);
    let err = c
        .fetch_weights(FetchWeightsRequest {
            session_token: token,
            grant_id: g.grant_id.clone(),
            file: "config.json".into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("grant revoked"), "{}", err.message());

    // The log verifies: signed checkpoint, every entry, nothing missing.
    let mut a = v.auditor().await;
    let cp = a.checkpoint().await.unwrap();
    let mut entries = Vec::new();
    a.entries(0, cp.size, |_, e| {
        entries.push(e.to_vec());
        Ok(())
    })
    .await
    .unwrap();
    let verifier = NoteVerifier::from_vkey(&cp.verifier_key).unwrap();
    let r = replay::replay(
        &Input {
            entries: &entries,
            recorded_leaf_hashes: None,
            checkpoint_note: &cp.note,
            verifier: &verifier,
            trusted: None,
        },
        &mut |_, _| Ok(false),
    );
    assert!(r.ok, "{:?}", r.findings);
    assert_eq!(r.entries_checked, cp.size);
    let parsed: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::from_slice(e).unwrap())
        .collect();
    assert_eq!(with_action(&parsed, "revoke").len(), 1);
    assert_eq!(
        merkle::root(
            &entries
                .iter()
                .map(|e| merkle::leaf_hash(e))
                .collect::<Vec<_>>()
        )
        .to_vec(),
        cp.root
    );

    // A restart on the same services keeps everything.
    let clock = v.clock.clone();
    let cfg = v.cfg.clone();
    v.stop().await;
    let again = weightvault::server::start(
        &cfg,
        weightvault::server::StartOptions {
            clock: Arc::new(clock),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            wrap_store: None,
        },
    )
    .await
    .unwrap();
    v.server = Some(again);
    let models = v.admin().await.list().await.unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].latest_version, 1);
    let again = tmp.path().join("again");
    v.fetch_into("m", &again).await.unwrap();
    common::assert_same_tree(&src, &again);
}
