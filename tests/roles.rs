//! The authorization matrix: every RPC × {no certificate (a node), admin, auditor, revoked admin,
//! certificate from the vault's CA without a role, admin by SAN URI} and the decision each gets.

mod common;

use common::{Vault, issue, model_dir};
use tonic::Code;
use tonic::transport::Channel;
use weightvault::config::dev::files;
use weightvault::proto::v1::admin_service_client::AdminServiceClient;
use weightvault::proto::v1::audit_service_client::AuditServiceClient;
use weightvault::proto::v1::node_service_client::NodeServiceClient;
use weightvault::proto::v1::*;

async fn connect(v: &Vault, id: Option<&(String, String, Vec<u8>)>) -> Channel {
    let ep = weightvault::client::Endpoint {
        addr: v.addr(),
        ca_pem: std::fs::read(v.dir.join(files::CA_CERT)).unwrap(),
        identity: id.map(|(c, k, _)| (c.clone().into_bytes(), k.clone().into_bytes())),
    };
    ep.connect().await.unwrap()
}

/// A client certificate: PEM, key PEM, DER.
type Identity = (String, String, Vec<u8>);

/// The outcome class of a call: a refusal for the caller's certificate or role, or "allowed"
/// (any other answer; node calls without an attested session are refused by attestation, which
/// tests/boot_flow.rs covers).
fn class<T>(r: Result<T, tonic::Status>) -> &'static str {
    match r {
        Err(s)
            if s.code() == Code::Unauthenticated && s.message().contains("client certificate") =>
        {
            "unauthenticated"
        }
        Err(s) if s.code() == Code::PermissionDenied && s.message().contains("role") => "denied",
        Err(s) if s.code() == Code::PermissionDenied && s.message().contains("is revoked") => {
            "denied"
        }
        _ => "allowed",
    }
}

#[tokio::test]
async fn every_rpc_checks_its_role() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    weightvault::config::dev::ensure(&dir).unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let admin = (read(files::ADMIN_CERT), read(files::ADMIN_KEY), Vec::new());
    let auditor = (
        read(files::AUDITOR_CERT),
        read(files::AUDITOR_KEY),
        Vec::new(),
    );
    let revoked = issue(&dir, "revoked admin", None);
    let nobody = issue(&dir, "no role", None);
    let by_uri = issue(
        &dir,
        "uri admin",
        Some("spiffe://example.org/weightvault/admin"),
    );
    let clock = weightvault::time::ManualClock::new(weightvault::time::Clock::now_ms(
        &weightvault::time::SystemClock,
    ));
    let revoked_fp = weightvault::config::cert_fingerprint(&revoked.2);
    let v = Vault::start_configured(&dir, clock, |c| {
        c.roles.admins.push(revoked_fp.clone());
        c.roles.revoked.push(revoked_fp.clone());
        c.roles
            .admins
            .push("spiffe://example.org/weightvault/admin".into());
    })
    .await;
    v.push_dir("m", &model_dir(tmp.path())).await;

    let identities: [(&str, Option<&Identity>); 6] = [
        ("none", None),
        ("admin", Some(&admin)),
        ("auditor", Some(&auditor)),
        ("revoked", Some(&revoked)),
        ("nobody", Some(&nobody)),
        ("uri-admin", Some(&by_uri)),
    ];
    // Expected class per role requirement, in the identity order above.
    let node = ["allowed"; 6];
    let admin_only = [
        "unauthenticated",
        "allowed",
        "denied",
        "denied",
        "denied",
        "allowed",
    ];
    let auditor_only = [
        "unauthenticated",
        "denied",
        "allowed",
        "denied",
        "denied",
        "denied",
    ];

    for (i, (who, id)) in identities.iter().enumerate() {
        let ch = connect(&v, *id).await;
        let mut n = NodeServiceClient::new(ch.clone());
        let mut a = AdminServiceClient::new(ch.clone());
        let mut au = AuditServiceClient::new(ch.clone());
        let results: Vec<(&str, &str, &str)> = vec![
            (
                "GetChallenge",
                class(n.get_challenge(GetChallengeRequest {}).await),
                node[i],
            ),
            (
                "Attest",
                class(n.attest(AttestRequest::default()).await),
                node[i],
            ),
            (
                "RequestGrant",
                class(n.request_grant(RequestGrantRequest::default()).await),
                node[i],
            ),
            (
                "FetchWeights",
                class(n.fetch_weights(FetchWeightsRequest::default()).await),
                node[i],
            ),
            (
                "PushModel",
                class(
                    a.push_model(tokio_stream::iter(Vec::<PushModelRequest>::new()))
                        .await,
                ),
                admin_only[i],
            ),
            (
                "ListModels",
                class(a.list_models(ListModelsRequest {}).await),
                admin_only[i],
            ),
            (
                "GetModel",
                class(a.get_model(GetModelRequest { name: "m".into() }).await),
                admin_only[i],
            ),
            (
                "AllowAccess",
                class(a.allow_access(AllowAccessRequest::default()).await),
                admin_only[i],
            ),
            (
                "ListAccess",
                class(a.list_access(ListAccessRequest::default()).await),
                admin_only[i],
            ),
            (
                "DenyAccess",
                class(a.deny_access(DenyAccessRequest::default()).await),
                admin_only[i],
            ),
            (
                "Revoke",
                class(a.revoke(RevokeRequest::default()).await),
                admin_only[i],
            ),
            (
                "ListRevocations",
                class(a.list_revocations(ListRevocationsRequest {}).await),
                admin_only[i],
            ),
            (
                "ListGrants",
                class(a.list_grants(ListGrantsRequest::default()).await),
                admin_only[i],
            ),
            (
                "ListProposals",
                class(a.list_proposals(ListProposalsRequest::default()).await),
                admin_only[i],
            ),
            (
                "ApproveProposal",
                class(a.approve_proposal(DecideProposalRequest::default()).await),
                admin_only[i],
            ),
            (
                "RejectProposal",
                class(a.reject_proposal(DecideProposalRequest::default()).await),
                admin_only[i],
            ),
            (
                "GetCheckpoint",
                class(au.get_checkpoint(GetCheckpointRequest {}).await),
                auditor_only[i],
            ),
            (
                "GetEntries",
                class(au.get_entries(GetEntriesRequest::default()).await),
                auditor_only[i],
            ),
            (
                "GetInclusionProof",
                class(
                    au.get_inclusion_proof(GetInclusionProofRequest {
                        index: 0,
                        tree_size: 1,
                    })
                    .await,
                ),
                auditor_only[i],
            ),
            (
                "GetConsistencyProof",
                class(
                    au.get_consistency_proof(GetConsistencyProofRequest {
                        old_size: 1,
                        new_size: 2,
                    })
                    .await,
                ),
                auditor_only[i],
            ),
            (
                "Tail",
                class(au.tail(TailRequest { start: u64::MAX }).await),
                auditor_only[i],
            ),
            (
                "GetEvidence",
                class(au.get_evidence(GetEvidenceRequest::default()).await),
                auditor_only[i],
            ),
        ];
        for (rpc, got, want) in results {
            assert_eq!(got, want, "{rpc} as {who}");
        }
    }
    // Every refusal is on the record, naming the call.
    let entries = v.audit_entries().await;
    let denied = common::with_action(&entries, "auth_denied");
    // 4 identities refused × 12 admin calls + 5 refused × 6 auditor calls.
    assert_eq!(denied.len(), 4 * 12 + 5 * 6);
    assert!(
        denied
            .iter()
            .any(|e| { e["reason"].as_str().unwrap().starts_with("revoke: ") })
    );
}
