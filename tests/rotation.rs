//! `keys rotate`: a new KEK, every DEK re-wrapped in the background without touching weight data,
//! resumable after a crash, on the record, the old KEK retired at the end.

mod common;

use std::sync::atomic::Ordering;

use common::{MEASUREMENT, Vault, bytes, with_action};
use weightvault::client::node::{DirSink, FetchOptions};
use weightvault::proto::v1::KeyStatus;

/// Three versions of two models, each a directory with one distinct file.
async fn push_versions(
    v: &Vault,
    root: &std::path::Path,
) -> Vec<(String, u64, std::path::PathBuf)> {
    let mut out = Vec::new();
    for (i, model) in ["a", "a", "b", "a"].iter().enumerate() {
        let dir = root.join(format!("src-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.bin"), bytes(100_000 + i * 1000, i as u64 + 1)).unwrap();
        // With digests: `fetch_all` checks them.
        let version = v.push_dir_with_digest(model, &dir).await;
        out.push((model.to_string(), version, dir));
    }
    v.admin()
        .await
        .allow("a", "sim", MEASUREMENT)
        .await
        .unwrap();
    v.admin()
        .await
        .allow("b", "sim", MEASUREMENT)
        .await
        .unwrap();
    out
}

/// Polls the status until `done` holds (bounded: a rotation of four DEKs takes milliseconds).
async fn wait_for(v: &Vault, done: impl Fn(&KeyStatus) -> bool) -> KeyStatus {
    let mut admin = v.admin().await;
    let mut last = None;
    common::wait_until("the expected key status", async || {
        let s = admin.key_status().await.unwrap();
        let ok = done(&s);
        last = Some(s);
        ok
    })
    .await;
    last.expect("polled at least once")
}

async fn fetch_all(
    v: &Vault,
    versions: &[(String, u64, std::path::PathBuf)],
    out: &std::path::Path,
) {
    for (model, version, src) in versions {
        let dir = out.join(format!("{model}-{version}"));
        v.node()
            .await
            .fetch(
                model,
                &FetchOptions {
                    version: *version,
                    verify_digest: true,
                    ..FetchOptions::default()
                },
                &v.attester(MEASUREMENT),
                &mut DirSink::new(&dir),
                &mut |_, _| {},
            )
            .await
            .unwrap();
        common::assert_same_tree(&dir, src);
    }
}

/// Every blob file and its bytes, to show rotation never touches weight data.
fn blobs(root: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = weightvault::client::collect_files(&root.join("blobs"))
        .unwrap()
        .into_iter()
        .map(|(rel, p, _)| (rel, std::fs::read(p).unwrap()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_every_dek_and_retires_the_old_kek() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut v = Vault::start(&data).await;
    let versions = push_versions(&v, tmp.path()).await;
    let before = blobs(&data);
    let mut admin = v.admin().await;
    let s = admin.key_status().await.unwrap();
    assert_eq!((s.active_kek_version, s.total, s.pending), (1, 4, 0));

    let r = admin.rotate_keys().await.unwrap();
    assert_eq!(r.kek_version, 2);
    assert_eq!(r.pending, 4);
    // From the answer on, status says the rotation runs until no DEK is left (the background
    // pass may not have begun yet; `keys rotate` stops waiting on "not running, DEKs left").
    let s = admin.key_status().await.unwrap();
    assert!(
        s.running || s.pending == 0,
        "{} DEKs left, not running",
        s.pending
    );
    let s = wait_for(&v, |s| s.pending == 0 && s.keks.len() == 1 && !s.running).await;
    assert_eq!(s.active_kek_version, 2);
    assert_eq!(s.keks[0].version, 2);
    assert_eq!(s.keks[0].deks, 4);
    for m in ["a", "b"] {
        for ver in admin.show(m).await.unwrap().versions {
            assert_eq!(ver.kek_version, 2, "{m}@{}", ver.version);
        }
    }
    assert_eq!(blobs(&data), before, "rotation must not touch weight data");
    fetch_all(&v, &versions, &tmp.path().join("out1")).await;

    let entries = v.audit_entries().await;
    let rotate = with_action(&entries, "key_rotate");
    assert_eq!(rotate.len(), 1);
    assert_eq!(rotate[0]["actor"]["kind"], "admin");
    assert!(
        rotate[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("kek version 2 created")
    );
    let rewrap = with_action(&entries, "key_rewrap");
    assert_eq!(rewrap.len(), 4);
    assert!(
        rewrap
            .iter()
            .all(|e| e["reason"] == "dek re-wrapped from kek 1 to kek 2")
    );
    let retire = with_action(&entries, "key_retire");
    assert_eq!(retire.len(), 1);
    assert_eq!(
        retire[0]["reason"],
        "kek version 1 retired: it wraps no DEK"
    );

    // A new push is wrapped by the new KEK, and everything survives a restart.
    let src = tmp.path().join("src-new");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.bin"), bytes(5000, 99)).unwrap();
    assert_eq!(v.push_dir_with_digest("b", &src).await, 2);
    v.stop().await;
    let v = Vault::start(&data).await;
    let s = v.admin().await.key_status().await.unwrap();
    assert_eq!(s.keks.iter().map(|k| k.version).collect::<Vec<_>>(), [2]);
    let mut all = versions.clone();
    all.push(("b".into(), 2, src));
    fetch_all(&v, &all, &tmp.path().join("out2")).await;
    // A second rotation while none runs goes to version 3.
    assert_eq!(v.admin().await.rotate_keys().await.unwrap().kek_version, 3);
    wait_for(&v, |s| s.keks.len() == 1 && s.active_kek_version == 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_resumes_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (wrap, slot) = common::faulty_wrapper();
    let mut v = Vault::start_wrapped(&data, wrap).await;
    let versions = push_versions(&v, tmp.path()).await;
    // Two re-wraps succeed, then the store fails as a crash mid-rotation would leave it.
    slot.get().unwrap().rewraps_left.store(2, Ordering::SeqCst);
    let r = v.admin().await.rotate_keys().await.unwrap();
    assert_eq!(r.kek_version, 2);
    let s = wait_for(&v, |s| !s.running && s.pending < 4).await;
    assert_eq!(s.pending, 2);
    assert_eq!(s.keks.len(), 2, "the old KEK still wraps two DEKs");
    // Half-way, every version still reads (each DEK names the KEK that wraps it).
    fetch_all(&v, &versions, &tmp.path().join("out1")).await;
    // Restarting resumes the unfinished rotation.
    v.stop().await;

    let v = Vault::start(&data).await;
    let s = wait_for(&v, |s| s.pending == 0 && s.keks.len() == 1 && !s.running).await;
    assert_eq!(s.active_kek_version, 2);
    fetch_all(&v, &versions, &tmp.path().join("out2")).await;
    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "key_rotate").len(), 1);
    assert_eq!(with_action(&entries, "key_rewrap").len(), 4);
    let retire = with_action(&entries, "key_retire");
    assert_eq!(retire.len(), 1);
    assert_eq!(retire[0]["actor"]["kind"], "system");
}
