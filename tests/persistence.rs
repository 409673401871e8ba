//! Durability: restart keeps everything; an interrupted push leaves no visible version and no
//! blobs; uploads a crash interrupted are collected at the next start.

mod common;

use common::{MEASUREMENT, Vault, assert_same_tree, model_dir};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weightvault::client::node::{DirSink, FetchOptions};
use weightvault::proto::v1::admin_service_client::AdminServiceClient;
use weightvault::proto::v1::push_model_request::Msg;
use weightvault::proto::v1::{FileStart, PushModelRequest, PushStart};
use weightvault::store::MetadataStore;

fn blob_versions(data: &std::path::Path) -> usize {
    match std::fs::read_dir(data.join("blobs/v")) {
        Ok(d) => d.count(),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn restart_keeps_models_rules_grants_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = model_dir(tmp.path());
    let mut v = Vault::start(&data).await;
    v.push_dir("m", &src).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();
    v.fetch_into("m", &tmp.path().join("o1")).await.unwrap();
    let before = v.audit_entries().await;
    let clock = v.clock.clone();
    v.stop().await;

    let v = Vault::start_with_clock(&data, clock).await;
    let after = v.audit_entries().await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "earlier entries unchanged"
    );
    assert_eq!(after[before.len()]["action"], "server_stop");
    assert_eq!(after[before.len() + 1]["action"], "server_start");
    assert!(
        !after[before.len()..]
            .iter()
            .any(|e| e["action"] == "key_create"),
        "keys reused, not recreated"
    );
    let models = v.admin().await.list().await.unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].latest_version, 1);
    assert_eq!(v.admin().await.access_rules(None).await.unwrap().len(), 1);
    let out = tmp.path().join("o2");
    v.fetch_into("m", &out).await.unwrap();
    assert_same_tree(&src, &out);
    // A second push is version 2; version 1 stays fetchable by number.
    v.push_dir("m", &src).await;
    let out = tmp.path().join("o3");
    let r = v
        .node()
        .await
        .fetch(
            "m",
            &FetchOptions {
                version: 1,
                ..FetchOptions::default()
            },
            &v.attester(MEASUREMENT),
            &mut DirSink::new(&out),
            &mut |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(r.version, 1);
}

#[tokio::test]
async fn interrupted_push_leaves_nothing_and_the_vault_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let v = Vault::start(&data).await;
    let (tx, rx) = mpsc::channel(8);
    let channel = v
        .channel(Some((
            weightvault::config::dev::files::ADMIN_CERT,
            weightvault::config::dev::files::ADMIN_KEY,
        )))
        .await;
    let call = tokio::spawn(async move {
        AdminServiceClient::new(channel)
            .push_model(ReceiverStream::new(rx))
            .await
    });
    let msg = |m| PushModelRequest { msg: Some(m) };
    tx.send(msg(Msg::Start(PushStart {
        model: "big".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    tx.send(msg(Msg::File(FileStart {
        path: "w.bin".into(),
        size: 10_000_000,
    })))
    .await
    .unwrap();
    for _ in 0..3 {
        tx.send(msg(Msg::Data(vec![1u8; 100_000].into())))
            .await
            .unwrap();
    }
    // Wait until the vault has stored some chunks of the upload.
    common::wait_until("chunks being stored", async || blob_versions(&data) > 0).await;
    assert_eq!(blob_versions(&data), 1, "chunks were being stored");
    // The client dies: its connection goes away without `finish`.
    call.abort();
    drop(tx);
    common::wait_until("blobs of the aborted upload removed", async || {
        blob_versions(&data) == 0
    })
    .await;
    assert!(
        v.admin().await.list().await.unwrap().is_empty(),
        "no version is visible"
    );
    // Still serving.
    v.push_dir("other", &model_dir(tmp.path())).await;
    assert_eq!(v.admin().await.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn uploads_interrupted_by_a_crash_are_collected_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut v = Vault::start(&data).await;
    v.stop().await;
    // What a crash mid-push leaves: an upload record and some chunks.
    let id = [0xab; 16];
    {
        let store = weightvault::store::sqlite::SqliteStore::open(&data.join("metadata.db"))
            .await
            .unwrap();
        store.begin_upload(&id, "m", 1).await.unwrap();
    }
    let chunk = data
        .join("blobs")
        .join(weightvault::store::chunk_key(&id, "w.bin", 0));
    std::fs::create_dir_all(chunk.parent().unwrap()).unwrap();
    std::fs::write(&chunk, b"half").unwrap();
    let v = Vault::start(&data).await;
    assert!(!chunk.exists());
    assert_eq!(blob_versions(&data), 0);
    assert!(v.admin().await.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn push_refuses_bad_uploads_before_committing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let v = Vault::start(&data).await;
    let channel = v
        .channel(Some((
            weightvault::config::dev::files::ADMIN_CERT,
            weightvault::config::dev::files::ADMIN_KEY,
        )))
        .await;
    let msg = |m| PushModelRequest { msg: Some(m) };
    let cases: Vec<(Vec<PushModelRequest>, &str)> = vec![
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::Finish(Default::default())),
            ],
            "at least one file",
        ),
        (
            vec![msg(Msg::File(FileStart {
                path: "a".into(),
                size: 1,
            }))],
            "must begin with start",
        ),
        (
            vec![msg(Msg::Start(PushStart {
                model: "bad/name".into(),
                ..Default::default()
            }))],
            "model name",
        ),
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::File(FileStart {
                    path: "../x".into(),
                    size: 1,
                })),
            ],
            "file path",
        ),
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::File(FileStart {
                    path: "a".into(),
                    size: 5,
                })),
                msg(Msg::Data(vec![0u8; 3].into())),
                msg(Msg::Finish(Default::default())),
            ],
            "ended after 3 of its declared 5 bytes",
        ),
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::File(FileStart {
                    path: "a".into(),
                    size: 2,
                })),
                msg(Msg::Data(vec![0u8; 3].into())),
            ],
            "more bytes than its declared size",
        ),
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::File(FileStart {
                    path: "a".into(),
                    size: 0,
                })),
                msg(Msg::File(FileStart {
                    path: "a".into(),
                    size: 0,
                })),
            ],
            "sent twice",
        ),
        (
            vec![
                msg(Msg::Start(PushStart {
                    model: "m".into(),
                    ..Default::default()
                })),
                msg(Msg::File(FileStart {
                    path: "a".into(),
                    size: 0,
                })),
            ],
            "without finish",
        ),
    ];
    for (msgs, reason) in cases {
        let r = AdminServiceClient::new(channel.clone())
            .push_model(tokio_stream::iter(msgs))
            .await;
        let s = r.expect_err(reason);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{reason}: {s:?}");
        assert!(
            s.message().contains(reason),
            "{:?} lacks {reason:?}",
            s.message()
        );
    }
    assert!(v.admin().await.list().await.unwrap().is_empty());
    common::wait_until("blobs of refused uploads removed", async || {
        blob_versions(&data) == 0
    })
    .await;
}

#[tokio::test]
async fn a_second_vault_on_the_same_data_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut v = Vault::start(&data).await;
    let cfg = v.cfg.clone();
    let err = weightvault::server::start(
        &cfg,
        weightvault::server::StartOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("second vault refused");
    assert!(
        err.to_string().contains("is in use by another vault"),
        "{err}"
    );
    // Once the first stops, the directory is free again.
    v.stop().await;
    let again = Vault::start(&data).await;
    assert!(again.admin().await.list().await.unwrap().is_empty());
}
