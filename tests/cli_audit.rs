//! The auditor's commands end to end against a `serve --dev` child process: verify (live and
//! from an export, with a trusted checkpoint), tampering named by index, tlog proofs checked
//! offline, and a crash under grant load after which every received grant is on the record.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::cli::{CLI_MEASUREMENT as MEASUREMENT, Server, serve, stderr};

fn as_auditor(s: &Server, args: &[&str]) -> std::process::Output {
    let env: Vec<(&str, std::path::PathBuf)> = s.auditor();
    s.run_env(args, &env)
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Push a model, allow the measurement and fetch it, all through the CLI.
fn activity(s: &Server, tmp: &std::path::Path, tag: &str) {
    let src = tmp.join(format!("src-{tag}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.bin"), common::bytes(200_000, 5)).unwrap();
    s.ok(&["model", "push", "m", src.to_str().unwrap()]);
    s.ok(&[
        "access",
        "allow",
        "m",
        "--tee",
        "sim",
        "--measurement",
        MEASUREMENT,
    ]);
    let key = s.dir.join("sim-tee.key");
    let out = tmp.join(format!("out-{tag}"));
    s.ok(&[
        "node",
        "fetch",
        "m",
        "--out",
        out.to_str().unwrap(),
        "--tee",
        "sim",
        "--sim-measurement",
        MEASUREMENT,
        "--sim-key",
        key.to_str().unwrap(),
    ]);
}

#[test]
fn verify_export_tamper_and_proofs() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(&tmp.path().join("data"));
    activity(&s, tmp.path(), "a");
    let cfg = s.dir.join("weightvault.toml");
    let trusted = tmp.path().join("trusted.json");
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            "--trusted",
            trusted.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        as_auditor(&s, &args)
    };
    let out = ok(&verify(&[]));
    assert!(out.starts_with("OK: "), "{out}");
    assert!(out.contains("1 attestations re-verified"), "{out}");
    assert!(trusted.exists());

    // More activity; the next run checks consistency with the trusted checkpoint.
    activity(&s, tmp.path(), "b");
    let report: serde_json::Value =
        serde_json::from_str(ok(&verify(&["--json"])).lines().next().unwrap()).unwrap();
    assert_eq!(report["ok"], true);
    assert!(report["grants"].as_u64().unwrap() >= 2);
    assert_eq!(report["findings"].as_array().unwrap().len(), 0);

    // Export, verify offline, then tamper with one entry.
    let export = tmp.path().join("log.json");
    ok(&as_auditor(
        &s,
        &["audit", "export", "--out", export.to_str().unwrap()],
    ));
    let out = ok(&as_auditor(
        &s,
        &[
            "audit",
            "verify",
            "--file",
            export.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    ));
    assert!(out.starts_with("OK: "), "{out}");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    let entries = doc["entries"].as_array_mut().unwrap();
    let (victim, bytes) = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (i, STANDARD.decode(e.as_str().unwrap()).unwrap()))
        .find(|(_, b)| b.windows(7).any(|w| w == b"\"grant\""))
        .unwrap();
    let mut bytes = bytes;
    let pos = bytes.iter().rposition(|b| b.is_ascii_digit()).unwrap();
    bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
    entries[victim] = serde_json::Value::String(STANDARD.encode(&bytes));
    let bad = tmp.path().join("tampered.json");
    std::fs::write(&bad, serde_json::to_vec(&doc).unwrap()).unwrap();
    let o = as_auditor(
        &s,
        &[
            "audit",
            "verify",
            "--file",
            bad.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("FAILED"), "{out}");
    assert!(
        out.contains(&format!(
            "entry {victim} does not match its recorded leaf hash"
        )),
        "{out}"
    );

    // A tlog proof, checked offline by a third party with only the log key.
    let o = as_auditor(&s, &["audit", "proof", "--index", "3"]);
    let proof_text = ok(&o);
    let vkey = stderr(&o)
        .trim()
        .strip_prefix("log key: ")
        .unwrap()
        .to_string();
    assert!(
        proof_text.starts_with("c2sp.org/tlog-proof@v1\nextra "),
        "{proof_text}"
    );
    let proof = tmp.path().join("proof.txt");
    std::fs::write(&proof, &proof_text).unwrap();
    let out = ok(&s.run(&[
        "audit",
        "check-proof",
        "--proof",
        proof.to_str().unwrap(),
        "--log-key",
        &vkey,
    ]));
    assert!(out.starts_with("OK: entry 3 is in the log"), "{out}");
    let broken = proof_text.replacen("index 3", "index 4", 1);
    std::fs::write(&proof, broken).unwrap();
    let o = s.run(&[
        "audit",
        "check-proof",
        "--proof",
        proof.to_str().unwrap(),
        "--log-key",
        &vkey,
    ]);
    assert!(!o.status.success());

    // A rolled-back vault: the trusted checkpoint is ahead of the export.
    let mut t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trusted).unwrap()).unwrap();
    activity(&s, tmp.path(), "c");
    ok(&verify(&[]));
    t = serde_json::from_slice(&std::fs::read(&trusted).unwrap()).unwrap_or(t);
    let o = as_auditor(
        &s,
        &[
            "audit",
            "verify",
            "--file",
            export.to_str().unwrap(),
            "--trusted",
            trusted.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("[Rollback]"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A failed verification leaves the trusted checkpoint as it was.
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trusted).unwrap()).unwrap();
    assert_eq!(after, t);
}

#[test]
fn crash_under_grant_load_loses_no_received_grant() {
    use weightvault::attest::report_data;
    use weightvault::grant::hpke::NodeKeyPair;
    use weightvault::proto::v1::node_service_client::NodeServiceClient;
    use weightvault::proto::v1::{AttestRequest, GetChallengeRequest, RequestGrantRequest};

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = serve(&data);
    activity(&s, tmp.path(), "a");
    let addr = s
        .env
        .iter()
        .find(|(k, _)| k == "WEIGHTVAULT_ADDR")
        .unwrap()
        .1
        .clone();
    let signer = weightvault::attest::sim::SimSigner::from_pkcs8(
        &std::fs::read(data.join("sim-tee.key")).unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (addr, ca) = (addr.clone(), data.join("tls/ca.pem"));
        let (received, stop) = (received.clone(), stop.clone());
        let signer = weightvault::attest::sim::SimSigner::from_pkcs8(
            &std::fs::read(data.join("sim-tee.key")).unwrap(),
        )
        .unwrap();
        workers.push(rt.spawn(async move {
            let ep = weightvault::client::Endpoint::from_files(&addr, &ca, None, None).unwrap();
            let ch = match ep.connect().await {
                Ok(ch) => ch,
                Err(e) => {
                    eprintln!("connect: {e}");
                    return;
                }
            };
            let mut c = NodeServiceClient::new(ch);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let keys = NodeKeyPair::generate().unwrap();
                let n = match c.get_challenge(GetChallengeRequest {}).await {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("challenge: {e:?}");
                        return;
                    }
                };
                let nonce = n.into_inner().nonce;
                let rd = report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
                let evidence = signer.sign(&weightvault::attest::sim::SimReport {
                    measurement: MEASUREMENT.into(),
                    report_data: hex::encode(rd),
                    instance_id: "crash".into(),
                    debug: false,
                    issued_ms: weightvault::time::Clock::now_ms(&weightvault::time::SystemClock),
                });
                let a = match c
                    .attest(AttestRequest {
                        tee: "sim".into(),
                        evidence,
                        node_public_key: keys.public_key().to_vec(),
                        nonce,
                    })
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("attest: {e:?}");
                        return;
                    }
                };
                let token = a.into_inner().session_token;
                let g = match c
                    .request_grant(RequestGrantRequest {
                        session_token: token,
                        model: "m".into(),
                        version: 0,
                    })
                    .await
                {
                    Ok(g) => g,
                    Err(e) => {
                        eprintln!("grant refused: {e:?}");
                        return;
                    }
                };
                received.lock().unwrap().push(g.into_inner().grant_id);
            }
        }));
    }
    drop(signer);
    // Let grants flow, then kill the vault without warning (SIGKILL) mid-load.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while received.lock().unwrap().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "grants are not flowing: {:?}",
            workers.iter().map(|w| w.is_finished()).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(137));
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        let _ = rt.block_on(w);
    }
    let got = received.lock().unwrap().clone();
    assert!(got.len() >= 20);

    // Restart on the same directory: the tree check passes and every received grant is logged.
    let s = serve(&data);
    let o = as_auditor(&s, &["audit", "entries"]);
    let text = ok(&o);
    let logged: std::collections::HashSet<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["entry"]["action"] == "grant" && e["entry"]["decision"] == "allow")
        .map(|e| e["entry"]["grant_id"].as_str().unwrap().to_string())
        .collect();
    for g in &got {
        assert!(
            logged.contains(g),
            "grant {g} was received but is not in the log"
        );
    }
    let cfg = s.dir.join("weightvault.toml");
    let out = ok(&as_auditor(
        &s,
        &["audit", "verify", "--config", cfg.to_str().unwrap()],
    ));
    assert!(out.starts_with("OK: "), "{out}");
}
