//! The command line end to end: `serve --dev` in a child process, then the README's quickstart
//! (push, list, show, allow, fetch, audit entries) and the offline evidence check.

mod common;

use std::process::Command;

use common::cli::{BIN, CLI_MEASUREMENT as MEASUREMENT, serve, stderr};

#[test]
fn quickstart_push_allow_fetch_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("tok")).unwrap();
    let weights: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("model.safetensors"), &weights).unwrap();
    std::fs::write(src.join("config.json"), b"{}").unwrap();
    std::fs::write(src.join("tok/tokenizer.json"), b"{\"v\":1}").unwrap();
    let s = serve(&data);

    // With --digest: the fetch below checks them with --verify-digest.
    let out = s.ok(&["model", "push", "demo", src.to_str().unwrap(), "--digest"]);
    assert_eq!(out.trim(), "pushed demo@1: 3 files, 5000009 bytes");
    let out = s.ok(&["model", "list"]);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["demo", "1", "1"]),
        "{out}"
    );
    let out = s.ok(&["model", "show", "demo"]);
    assert!(out.contains("version 1: 5000009 bytes in 3 files"), "{out}");
    assert!(out.contains("tok/tokenizer.json"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["model", "show", "demo", "--json"])).unwrap();
    assert_eq!(json["versions"][0]["files"].as_array().unwrap().len(), 3);

    // A KEK rotation waited for by the CLI (it stops waiting only when the pass ends), before
    // the fetch below reads the re-wrapped DEK.
    let out = s.ok(&["keys", "rotate"]);
    assert!(
        out.contains("rotation done: 1 DEKs wrapped by kek version 2"),
        "{out}"
    );
    let out = s.ok(&["keys", "status"]);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().next() == Some("2") && l.ends_with("active")),
        "{out}"
    );

    let out = s.ok(&[
        "access",
        "allow",
        "demo",
        "--tee",
        "sim",
        "--measurement",
        MEASUREMENT,
    ]);
    assert!(out.starts_with("allowed sim measurement"), "{out}");
    assert!(s.ok(&["access", "list"]).contains(MEASUREMENT));

    let dest = tmp.path().join("fetched");
    let key = data.join("sim-tee.key");
    let out = s.ok(&[
        "node",
        "fetch",
        "demo@1",
        "--out",
        dest.to_str().unwrap(),
        "--tee",
        "sim",
        "--sim-measurement",
        MEASUREMENT,
        "--sim-key",
        key.to_str().unwrap(),
        "--verify-digest",
    ]);
    assert!(
        out.starts_with("fetched demo@1: 3 files, 5000009 bytes"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(dest.join("tok/tokenizer.json")).unwrap(),
        b"{\"v\":1}"
    );

    // A measurement that is not allowed: PERMISSION_DENIED, short reason, nothing written.
    let denied = tmp.path().join("denied");
    let o = s.run(&[
        "node",
        "fetch",
        "demo",
        "--out",
        denied.to_str().unwrap(),
        "--tee",
        "sim",
        "--sim-measurement",
        "bad0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.starts_with(
            "error: PERMISSION_DENIED: access denied: no access rule allows sim measurement bad0"
        ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line, no inner causes: {err}");
    assert!(!denied.exists());

    // The auditor sees every step as JSON lines.
    let o = s.run_env(
        &["audit", "entries"],
        &s.auditor()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let entries: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["index"], i as u64);
    }
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["entry"]["action"].as_str().unwrap())
        .collect();
    for a in [
        "push",
        "access_allow",
        "challenge",
        "attest",
        "grant",
        "fetch_start",
        "fetch_end",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    assert!(
        entries
            .iter()
            .any(|e| e["entry"]["action"] == "grant" && e["entry"]["decision"] == "deny")
    );
    // The admin certificate cannot read the log.
    let o = s.run(&["audit", "entries"]);
    assert!(stderr(&o).contains("PERMISSION_DENIED"), "{}", stderr(&o));
}

#[test]
fn push_refuses_bad_paths_before_sending_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(&tmp.path().join("data"));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = s.run(&["model", "push", "m", empty.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("directory has no regular files to push"),
        "{}",
        stderr(&o)
    );
    let o = s.run(&[
        "model",
        "push",
        "m",
        tmp.path().join("missing").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("No such file"), "{}", stderr(&o));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp.path().join("unreadable");
        std::fs::create_dir(&d).unwrap();
        let f = d.join("w.bin");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
        // Root reads anything; the check only means something for other users.
        if std::fs::read(&f).is_err() {
            let o = s.run(&["model", "push", "m", d.to_str().unwrap()]);
            assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
        }
    }
    let out = s.ok(&["model", "list"]);
    assert!(out.starts_with("no models"), "{out}");
    let o = s.run(&[
        "node",
        "fetch",
        "m@zero",
        "--out",
        "x",
        "--tee",
        "sim",
        "--sim-measurement",
        "00",
    ]);
    assert!(
        stderr(&o).contains("version after @ must be a positive integer"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serve_refuses_to_start_without_config_or_dev() {
    let o = Command::new(BIN).arg("serve").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("refusing to start without a configuration"),
        "{}",
        stderr(&o)
    );
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nsurprise = true\n").unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("surprise"), "{}", stderr(&o));
}

#[test]
fn attest_verify_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = serve(&data);
    let rd = "ab".repeat(64);
    let ev = tmp.path().join("ev.json");
    let key = data.join("sim-tee.key");
    s.ok(&[
        "attest",
        "sim-evidence",
        "--measurement",
        MEASUREMENT,
        "--report-data",
        &rd,
        "--sim-key",
        key.to_str().unwrap(),
        "--out",
        ev.to_str().unwrap(),
    ]);
    let cfg = data.join("weightvault.toml");
    let verify = |rd: &str| {
        s.run(&[
            "attest",
            "verify",
            "--tee",
            "sim",
            "--evidence",
            ev.to_str().unwrap(),
            "--report-data",
            rd,
            "--config",
            cfg.to_str().unwrap(),
        ])
    };
    let o = verify(&rd);
    assert!(o.status.success(), "{}", stderr(&o));
    let claims: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(claims["measurement"], MEASUREMENT);
    assert_eq!(claims["simulated"], true);
    let o = verify(&"cd".repeat(64));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("report data does not bind"),
        "{}",
        stderr(&o)
    );
    // Another trusted key: the signature does not verify.
    let o = s.run(&[
        "attest",
        "verify",
        "--tee",
        "sim",
        "--evidence",
        ev.to_str().unwrap(),
        "--report-data",
        &rd,
        "--trusted-key",
        &"11".repeat(32),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("signature"), "{}", stderr(&o));
    let o = s.run(&[
        "attest",
        "verify",
        "--tee",
        "sim",
        "--evidence",
        ev.to_str().unwrap(),
        "--report-data",
        "zz",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(stderr(&o).contains("64 bytes of hex"), "{}", stderr(&o));
}
