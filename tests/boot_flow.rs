//! The whole boot flow against a real vault on 127.0.0.1:0, and every bad-input case of it.

mod common;

use common::{MEASUREMENT, Vault, assert_same_tree, attest, grant, model_dir, raw, with_action};
use tonic::Code;
use weightvault::attest::report_data;
use weightvault::client::node::{Attester, DirSink, FetchOptions};
use weightvault::grant::hpke::NodeKeyPair;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::proto::v1::{AttestRequest, FetchWeightsRequest, GetChallengeRequest};

async fn fetch_all(
    c: &mut NodeServiceClient<tonic::transport::Channel>,
    token: &[u8],
    grant_id: &str,
    file: &str,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let mut s = c
        .fetch_weights(FetchWeightsRequest {
            session_token: token.to_vec(),
            grant_id: grant_id.into(),
            file: file.into(),
            first_chunk: 0,
            end_chunk: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ch) = s.message().await? {
        out.push(ch.ciphertext.to_vec());
    }
    Ok(out)
}

/// Sets up a vault with model "m" pushed and MEASUREMENT allowed.
async fn ready(tmp: &std::path::Path) -> Vault {
    let v = Vault::start(&tmp.join("data")).await;
    // With digests: the library test below fetches with `verify_digest`.
    v.push_dir_with_digest("m", &model_dir(tmp)).await;
    assert!(
        v.admin()
            .await
            .allow("m", "sim", MEASUREMENT)
            .await
            .unwrap()
    );
    v
}

#[tokio::test]
async fn boot_flow_through_the_client_library() {
    let tmp = tempfile::tempdir().unwrap();
    let v = ready(tmp.path()).await;
    let out = tmp.path().join("out");
    let report = v
        .node()
        .await
        .fetch(
            "m",
            &FetchOptions {
                verify_digest: true,
                ..FetchOptions::default()
            },
            &v.attester(MEASUREMENT),
            &mut DirSink::new(&out),
            &mut |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!((report.version, report.files), (1, 3));
    assert_same_tree(&tmp.path().join("model-src"), &out);
    // Only the files: the staging directory is gone.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 3);

    let entries = v.audit_entries().await;
    for action in [
        "server_start",
        "key_create",
        "push",
        "access_allow",
        "challenge",
        "attest",
        "grant",
    ] {
        assert!(
            !with_action(&entries, action).is_empty(),
            "no {action} entry"
        );
    }
    let g = with_action(&entries, "grant")[0];
    assert_eq!(g["decision"], "allow");
    assert_eq!(g["grant_id"], report.grant_id.as_str());
    assert_eq!(g["simulated"], true);
    let ends = with_action(&entries, "fetch_end");
    assert_eq!(ends.len(), 3);
    let served: u64 = ends.iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    // Ciphertext: plaintext plus a 16-byte tag per chunk (5 + 1 + 1 chunks).
    assert_eq!(served, 300_000 + 14 + 7 * 16);
    assert!(with_action(&entries, "attest")[0]["evidence_sha256"].is_string());
}

#[tokio::test]
async fn sealed_dek_opens_with_an_independent_hpke_implementation() {
    use hpke::{Deserializable, Kem as KemTrait, OpModeR, Serializable};
    type Kem = hpke::kem::X25519HkdfSha256;

    let tmp = tempfile::tempdir().unwrap();
    let v = ready(tmp.path()).await;
    let mut c = raw(&v).await;
    // The node key comes from the RustCrypto hpke crate, not from the vault's code.
    let (sk, pk) = Kem::gen_keypair();
    let pk_bytes: [u8; 32] = pk.to_bytes().as_slice().try_into().unwrap();
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let attester = v.attester(MEASUREMENT);
    let evidence = attester
        .evidence(&report_data(&nonce.clone().try_into().unwrap(), &pk_bytes))
        .unwrap();
    let token = c
        .attest(AttestRequest {
            tee: "sim".into(),
            evidence,
            node_public_key: pk_bytes.to_vec(),
            nonce,
        })
        .await
        .unwrap()
        .into_inner()
        .session_token;
    let g = grant(&mut c, &token, "m", 0).await.unwrap();
    let enc = <Kem as KemTrait>::EncappedKey::from_bytes(&g.sealed_dek_enc).unwrap();
    let dek = hpke::single_shot_open::<hpke::aead::AesGcm256, hpke::kdf::HkdfSha256, Kem>(
        &OpModeR::Base,
        &sk,
        &enc,
        &g.hpke_info,
        &g.sealed_dek,
        b"",
    )
    .expect("RFC 9180 open by an independent implementation");
    assert_eq!(dek.len(), 32);

    // The DEK it opened decrypts the model's chunks.
    let manifest = weightvault::envelope::manifest::Manifest::from_bytes(&g.manifest).unwrap();
    let file = &manifest.files[1];
    assert_eq!(file.path, "model-00001.safetensors");
    let mut raw_dek: [u8; 32] = dek.as_slice().try_into().unwrap();
    let dek = weightvault::keys::Dek::from_bytes(&mut raw_dek);
    let ctx = weightvault::envelope::FileContext {
        model: "m",
        version_id: &manifest.version_id,
        path: &file.path,
    };
    let opener = weightvault::envelope::FileOpener::new(&dek, &ctx, &file.decode_header().unwrap());
    let chunks = fetch_all(&mut c, &token, &g.grant_id, &file.path)
        .await
        .unwrap();
    let mut plain = Vec::new();
    let mut buf = Vec::new();
    for (i, ch) in chunks.iter().enumerate() {
        opener.open_into(i as u64, ch, &mut buf).unwrap();
        plain.extend_from_slice(&buf);
    }
    assert_eq!(plain, common::bytes(300_000, 7));
}

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, reason: &str) {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(reason),
        "{:?} lacks {reason:?}",
        s.message()
    );
    assert!(s.metadata().get("x-request-id").is_some());
    assert!(s.message().contains("(request "), "{}", s.message());
}

/// The last audit entry, which must record the refusal.
async fn last_entry(v: &Vault) -> serde_json::Value {
    v.audit_entries().await.pop().unwrap()
}

#[tokio::test]
async fn attestation_bad_inputs_are_refused_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let v = ready(tmp.path()).await;
    let mut c = raw(&v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let good = v.attester(MEASUREMENT);

    // A nonce the vault never issued.
    let rd = report_data(&[7; 32], keys.public_key());
    let r = c
        .attest(AttestRequest {
            tee: "sim".into(),
            evidence: good.evidence(&rd).unwrap(),
            node_public_key: keys.public_key().to_vec(),
            nonce: vec![7; 32],
        })
        .await;
    assert_status(r, Code::PermissionDenied, "unknown or already used nonce");
    let e = last_entry(&v).await;
    assert_eq!(
        (e["action"].as_str(), e["decision"].as_str()),
        (Some("attest"), Some("deny"))
    );

    // A reused nonce.
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let req = |evidence: Vec<u8>, nonce: Vec<u8>| AttestRequest {
        tee: "sim".into(),
        evidence,
        node_public_key: keys.public_key().to_vec(),
        nonce,
    };
    let rd = report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
    c.attest(req(good.evidence(&rd).unwrap(), nonce.clone()))
        .await
        .unwrap();
    let r = c
        .attest(req(good.evidence(&rd).unwrap(), nonce.clone()))
        .await;
    assert_status(r, Code::PermissionDenied, "unknown or already used nonce");
    assert_eq!(
        last_entry(&v).await["reason"],
        "unknown or already used nonce"
    );

    // An expired nonce (60 s).
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    v.clock.advance_ms(61_000);
    let rd = report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
    let r = c.attest(req(good.evidence(&rd).unwrap(), nonce)).await;
    assert_status(r, Code::PermissionDenied, "nonce expired");
    assert_eq!(last_entry(&v).await["reason"], "nonce expired");

    // Evidence signed by another key.
    let other = common::TestAttester {
        signer: weightvault::attest::sim::SimSigner::from_pkcs8(
            &weightvault::attest::sim::SimSigner::generate_pkcs8(),
        )
        .unwrap(),
        measurement: MEASUREMENT.into(),
        clock: v.clock.clone(),
        instance: "evil".into(),
    };
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let rd = report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
    let r = c.attest(req(other.evidence(&rd).unwrap(), nonce)).await;
    assert_status(r, Code::PermissionDenied, "bad evidence signature");
    let e = last_entry(&v).await;
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["simulated"], true);

    // Report data that binds another node key.
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let rd = report_data(&nonce.clone().try_into().unwrap(), &[9; 32]);
    let r = c.attest(req(good.evidence(&rd).unwrap(), nonce)).await;
    assert_status(
        r,
        Code::PermissionDenied,
        "report data does not bind nonce and key",
    );

    // Truncated and garbage evidence.
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let rd = report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
    let ev = good.evidence(&rd).unwrap();
    let r = c.attest(req(ev[..ev.len() / 2].to_vec(), nonce)).await;
    assert_status(r, Code::InvalidArgument, "malformed evidence");
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let r = c.attest(req(b"\x00\xffgarbage".to_vec(), nonce)).await;
    assert_status(r, Code::InvalidArgument, "malformed evidence");

    // Unknown TEE and malformed fields.
    let nonce = c
        .get_challenge(GetChallengeRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let mut bad = req(vec![], nonce);
    bad.tee = "sgx-magic".into();
    assert_status(c.attest(bad).await, Code::InvalidArgument, "unknown tee");
    let r = c.attest(req(vec![], vec![1, 2, 3])).await;
    assert_status(r, Code::InvalidArgument, "nonce must be 32 bytes");

    // A failed attestation opened no session.
    let entries = v.audit_entries().await;
    let allowed = with_action(&entries, "attest")
        .iter()
        .filter(|e| e["decision"] == "allow")
        .count();
    assert_eq!(allowed, 1, "only the one good attestation");
}

#[tokio::test]
async fn grant_and_fetch_bad_inputs_are_refused_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let v = ready(tmp.path()).await;
    let mut c = raw(&v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let token = attest(&mut c, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();

    assert_status(
        grant(&mut c, &token, "nope", 0).await,
        Code::NotFound,
        "model nope not found",
    );
    let e = last_entry(&v).await;
    assert_eq!(
        (e["action"].as_str(), e["decision"].as_str()),
        (Some("grant"), Some("deny"))
    );
    assert_status(
        grant(&mut c, &token, "m", 9).await,
        Code::NotFound,
        "model m version 9 not found",
    );
    assert_status(
        grant(&mut c, &[1; 32], "m", 0).await,
        Code::Unauthenticated,
        "unknown or expired attestation session",
    );
    assert_status(
        grant(&mut c, &token, "../etc", 0).await,
        Code::InvalidArgument,
        "model name",
    );

    // A measurement that is not allowed: refused, recorded, and nothing written.
    let other_keys = NodeKeyPair::generate().unwrap();
    let other_token = attest(&mut c, &v.attester("00ff"), &other_keys)
        .await
        .unwrap();
    assert_status(
        grant(&mut c, &other_token, "m", 0).await,
        Code::PermissionDenied,
        "access denied: no access rule allows sim measurement 00ff",
    );
    let e = last_entry(&v).await;
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["measurement"], "00ff");
    let out = tmp.path().join("denied-out");
    let r = v
        .node()
        .await
        .fetch(
            "m",
            &FetchOptions::default(),
            &v.attester("00ff"),
            &mut DirSink::new(&out),
            &mut |_, _| {},
        )
        .await;
    assert_eq!(r.unwrap_err().code(), Some(Code::PermissionDenied));
    assert!(!out.exists(), "a refused fetch writes nothing");

    // Another node's grant.
    let g = grant(&mut c, &token, "m", 0).await.unwrap();
    let r = fetch_all(&mut c, &other_token, &g.grant_id, "config.json").await;
    assert_status(
        r,
        Code::PermissionDenied,
        "grant was issued to another session",
    );
    let e = last_entry(&v).await;
    assert_eq!(
        (e["action"].as_str(), e["decision"].as_str()),
        (Some("fetch_start"), Some("deny"))
    );

    // Unknown grant, unknown file, bad range.
    assert_status(
        fetch_all(&mut c, &token, "g-00", "config.json").await,
        Code::NotFound,
        "unknown grant",
    );
    assert_status(
        fetch_all(&mut c, &token, &g.grant_id, "nope.bin").await,
        Code::NotFound,
        "is not in the manifest",
    );
    let r = c
        .fetch_weights(FetchWeightsRequest {
            session_token: token.clone(),
            grant_id: g.grant_id.clone(),
            file: "config.json".into(),
            first_chunk: 3,
            end_chunk: 0,
        })
        .await;
    assert_status(r.map(|_| ()), Code::OutOfRange, "chunk range");

    // The owner can fetch; after expiry nobody can.
    assert_eq!(
        fetch_all(&mut c, &token, &g.grant_id, "config.json")
            .await
            .unwrap()
            .len(),
        1
    );
    v.clock
        .advance_ms(g.not_after_ms - v.clock.now_ms_for_test());
    assert_status(
        fetch_all(&mut c, &token, &g.grant_id, "config.json").await,
        Code::PermissionDenied,
        "grant expired",
    );
    assert_eq!(last_entry(&v).await["reason"], "grant expired");
}

trait NowForTest {
    fn now_ms_for_test(&self) -> u64;
}

impl NowForTest for weightvault::time::ManualClock {
    fn now_ms_for_test(&self) -> u64 {
        weightvault::time::Clock::now_ms(self)
    }
}

#[tokio::test]
async fn grant_expiry_stops_a_running_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    // 40 MB in 64 KiB chunks: far more than the HTTP/2 windows and the two queued chunks hold,
    // so the server is still producing when the grant expires.
    let src = tmp.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.bin"), common::bytes(40_000_000, 3)).unwrap();
    v.push_dir("big", &src).await;
    v.admin()
        .await
        .allow("big", "sim", MEASUREMENT)
        .await
        .unwrap();
    let mut c = raw(&v).await;
    let keys = NodeKeyPair::generate().unwrap();
    let token = attest(&mut c, &v.attester(MEASUREMENT), &keys)
        .await
        .unwrap();
    let g = grant(&mut c, &token, "big", 0).await.unwrap();
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
    v.clock
        .advance_ms(g.not_after_ms - v.clock.now_ms_for_test());
    let mut received = 1u64;
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("stream completed after expiry"),
            Err(e) => break e,
        }
    };
    let total = 40_000_000u64.div_ceil(64 * 1024);
    assert!(received < total, "{received} of {total} chunks");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("grant expired"));
    // The server recorded where it stopped.
    let mut end = None;
    common::wait_until("a fetch_end entry", async || {
        end = with_action(&v.audit_entries().await, "fetch_end")
            .first()
            .map(|e| (*e).clone());
        end.is_some()
    })
    .await;
    let end = end.expect("fetch_end entry");
    assert_eq!(end["reason"], "grant expired");
    assert!(end["bytes"].as_u64().unwrap() < 40_000_000);
}

#[tokio::test]
async fn admin_and_audit_calls_need_their_role() {
    use weightvault::config::dev::files;
    use weightvault::proto::v1::ListModelsRequest;
    use weightvault::proto::v1::admin_service_client::AdminServiceClient;
    use weightvault::proto::v1::audit_service_client::AuditServiceClient;

    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    let none = AdminServiceClient::new(v.channel(None).await)
        .list_models(ListModelsRequest {})
        .await;
    assert_status(
        none,
        Code::Unauthenticated,
        "client certificate with role admin",
    );
    let auditor = AdminServiceClient::new(
        v.channel(Some((files::AUDITOR_CERT, files::AUDITOR_KEY)))
            .await,
    )
    .list_models(ListModelsRequest {})
    .await;
    assert_status(auditor, Code::PermissionDenied, "does not have role admin");
    let admin_reads_log =
        AuditServiceClient::new(v.channel(Some((files::ADMIN_CERT, files::ADMIN_KEY))).await)
            .get_entries(weightvault::proto::v1::GetEntriesRequest { start: 0, end: 0 })
            .await;
    assert_status(
        admin_reads_log.map(|_| ()),
        Code::PermissionDenied,
        "does not have role auditor",
    );
}

#[tokio::test]
async fn a_rule_with_unmet_required_claims_is_named_in_the_denial() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::start(&tmp.path().join("data")).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    let require = [("rtmr0".to_string(), "ab".to_string())]
        .into_iter()
        .collect();
    assert!(
        v.admin()
            .await
            .allow_with("m", "sim", MEASUREMENT, require)
            .await
            .unwrap()
    );
    let rules = v.admin().await.access_rules(Some("m")).await.unwrap();
    assert_eq!(
        rules[0].require.get("rtmr0").map(String::as_str),
        Some("ab")
    );
    let r = v
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
    assert_eq!(r.code(), Some(Code::PermissionDenied));
    let msg = r.to_string();
    assert!(
        msg.contains(&format!(
            "rule m/sim/{MEASUREMENT} requires rtmr0=ab, the evidence has none"
        )),
        "{msg}"
    );
    let e = last_entry(&v).await;
    assert_eq!(
        (e["action"].as_str(), e["decision"].as_str()),
        (Some("grant"), Some("deny"))
    );
    assert!(e["reason"].as_str().unwrap().contains("requires rtmr0=ab"));
}
