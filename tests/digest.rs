//! Plaintext digests are optional (docs/format.md §7.1): a push records them only when asked
//! (`PushOptions::record_digest`, `model push --digest`); otherwise the signed manifest carries
//! `"sha256":null`. A fetch with `verify_digest` of a version without digests is refused before
//! any chunk is asked for; with digests it checks them.

mod common;

use std::path::Path;

use aws_lc_rs::digest::{SHA256, digest};
use common::cli::{BIN, CLI_MEASUREMENT, serve, stderr};
use common::{MEASUREMENT, Vault, model_dir, with_action};
use weightvault::client::ClientError;
use weightvault::client::node::{DirSink, FetchOptions, WeightSink};

/// A sink that records whether anything reached it.
#[derive(Default)]
struct Watch {
    begun: bool,
    bytes: u64,
    aborted: bool,
}

impl WeightSink for Watch {
    fn begin(&mut self, _files: &[(String, u64)]) -> Result<(), ClientError> {
        self.begun = true;
        Ok(())
    }
    fn write_at(&mut self, _file: usize, _offset: u64, p: &[u8]) -> Result<(), ClientError> {
        self.bytes += p.len() as u64;
        Ok(())
    }
    fn commit(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
    fn abort(&mut self) {
        self.aborted = true;
    }
}

fn sha256_of(path: &Path) -> [u8; 32] {
    digest(&SHA256, &std::fs::read(path).unwrap())
        .as_ref()
        .try_into()
        .unwrap()
}

async fn fetch(
    v: &Vault,
    version: u64,
    verify_digest: bool,
    sink: &mut dyn WeightSink,
) -> Result<weightvault::client::node::FetchReport, ClientError> {
    v.node()
        .await
        .fetch(
            "m",
            &FetchOptions {
                version,
                verify_digest,
                ..FetchOptions::default()
            },
            &v.attester(MEASUREMENT),
            sink,
            &mut |_, _| {},
        )
        .await
}

#[tokio::test]
async fn digests_are_recorded_only_when_the_push_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    let src = model_dir(tmp.path());
    assert_eq!(v.push_dir("m", &src).await, 1);
    assert_eq!(v.push_dir_with_digest("m", &src).await, 2);
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();

    // The signed manifests, as a node receives them.
    for (version, recorded) in [(1, false), (2, true)] {
        let granted = v
            .node()
            .await
            .grant(
                "m",
                &FetchOptions {
                    version,
                    ..FetchOptions::default()
                },
                &v.attester(MEASUREMENT),
            )
            .await
            .unwrap();
        let m = granted.manifest();
        assert_eq!(m.files.len(), 3);
        for f in &m.files {
            let want = recorded.then(|| sha256_of(&src.join(&f.path)));
            assert_eq!(f.sha256, want, "version {version}, {}", f.path);
        }
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert_eq!(
            text.matches("\"sha256\":null").count(),
            if recorded { 0 } else { 3 },
            "{text}"
        );
    }

    // `GetModel` shows the digest as hex, or empty when none was recorded.
    let shown = v.admin().await.show("m").await.unwrap();
    for ver in &shown.versions {
        for f in &ver.files {
            if ver.version == 1 {
                assert_eq!(f.sha256, "", "{}", f.path);
            } else {
                assert_eq!(f.sha256, hex::encode(sha256_of(&src.join(&f.path))));
            }
        }
    }

    // Without a digest check both versions fetch; the check needs version 2.
    let out = tmp.path().join("out-1");
    fetch(&v, 1, false, &mut DirSink::new(&out)).await.unwrap();
    common::assert_same_tree(&out, &src);
    let out = tmp.path().join("out-2");
    fetch(&v, 2, true, &mut DirSink::new(&out)).await.unwrap();
    common::assert_same_tree(&out, &src);
}

#[tokio::test]
async fn verify_digest_of_a_version_without_digests_is_refused_before_fetching() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    v.admin()
        .await
        .allow("m", "sim", MEASUREMENT)
        .await
        .unwrap();

    let mut sink = Watch::default();
    let err = fetch(&v, 0, true, &mut sink).await.unwrap_err();
    let ClientError::Usage(msg) = &err else {
        panic!("{err:?}");
    };
    for part in [
        "m@1",
        "\"config.json\"",
        "\"model-00001.safetensors\"",
        "\"tokenizer/empty.txt\"",
        "model push --digest",
    ] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
    // Nothing reached the sink and the vault served no chunk.
    assert!(!sink.begun && sink.bytes == 0, "begun {}", sink.begun);
    let entries = v.audit_entries().await;
    assert!(with_action(&entries, "fetch_start").is_empty());

    // The same fetch without the check works.
    let mut sink = Watch::default();
    let r = fetch(&v, 0, false, &mut sink).await.unwrap();
    assert!(sink.begun && !sink.aborted);
    assert_eq!(sink.bytes, r.bytes);
    assert_eq!(r.bytes, 300_000 + 14);
}

#[test]
fn cli_push_digest_flag_and_verify_digest_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("w.bin"), common::bytes(70_000, 3)).unwrap();
    std::fs::write(src.join("sub/a.json"), b"{}").unwrap();
    let s = serve(&tmp.path().join("data"));
    let src_arg = src.to_str().unwrap();
    assert!(
        s.ok(&["model", "push", "demo", src_arg])
            .starts_with("pushed demo@1")
    );
    let out = s.ok(&["model", "push", "demo", src_arg, "--digest"]);
    assert!(out.starts_with("pushed demo@2"), "{out}");
    s.ok(&[
        "access",
        "allow",
        "demo",
        "--tee",
        "sim",
        "--measurement",
        CLI_MEASUREMENT,
    ]);

    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["model", "show", "demo", "--json"])).unwrap();
    for v in json["versions"].as_array().unwrap() {
        for f in v["files"].as_array().unwrap() {
            let want = if v["version"] == 1 {
                serde_json::Value::Null
            } else {
                let p = f["path"].as_str().unwrap();
                hex::encode(sha256_of(&src.join(p))).into()
            };
            assert_eq!(f["sha256"], want, "{v}");
        }
    }
    let table = s.ok(&["model", "show", "demo"]);
    assert!(
        table.contains("sha256 - (pushed without --digest)"),
        "{table}"
    );

    let key = s.dir.join("sim-tee.key");
    let fetch = |model: &str, out: &Path| {
        s.run(&[
            "node",
            "fetch",
            model,
            "--out",
            out.to_str().unwrap(),
            "--tee",
            "sim",
            "--sim-measurement",
            CLI_MEASUREMENT,
            "--sim-key",
            key.to_str().unwrap(),
            "--verify-digest",
        ])
    };
    let out1 = tmp.path().join("out1");
    let o = fetch("demo@1", &out1);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("demo@1 has no recorded SHA-256 for \"sub/a.json\", \"w.bin\"")
            && err.contains("weightvault model push --digest"),
        "{err}"
    );
    assert!(!out1.join("w.bin").exists());

    let out2 = tmp.path().join("out2");
    let o = fetch("demo@2", &out2);
    assert!(o.status.success(), "{}", stderr(&o));
    common::assert_same_tree(&out2, &src);

    // `--help` says what the flag is for.
    let help = std::process::Command::new(BIN)
        .args(["model", "push", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.contains("--digest")
            && help.contains("provenance")
            && help.contains("--verify-digest"),
        "{help}"
    );
}
