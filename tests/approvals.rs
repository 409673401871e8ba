//! M-of-N approval: a 2-of-3 quorum of distinct admins, the same admin twice counting once,
//! expiry, rejection, and proposals surviving a restart.

mod common;

use common::{MEASUREMENT, Vault, connect_as, issue, model_dir, with_action};
use tonic::Code;
use weightvault::client::admin::AdminClient;

#[tokio::test]
async fn two_of_three_admins_allow_access() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    weightvault::config::dev::ensure(&dir).unwrap();
    let b = issue(&dir, "admin b", None);
    let c = issue(&dir, "admin c", None);
    let fps = [
        weightvault::config::cert_fingerprint(&b.2),
        weightvault::config::cert_fingerprint(&c.2),
    ];
    let clock = weightvault::time::ManualClock::new(weightvault::time::Clock::now_ms(
        &weightvault::time::SystemClock,
    ));
    let start = |clock: weightvault::time::ManualClock| {
        let (dir, fps) = (dir.clone(), fps.clone());
        async move {
            Vault::start_configured(&dir, clock, move |cfg| {
                cfg.roles.admins.extend(fps);
                cfg.approvals.quorum = 2;
                cfg.approvals.ttl_secs = 3600;
            })
            .await
        }
    };
    let mut v = start(clock.clone()).await;
    v.push_dir("m", &model_dir(tmp.path())).await;
    let mut a = v.admin().await;
    let r = a
        .allow_or_propose("m", "sim", MEASUREMENT, Default::default())
        .await
        .unwrap();
    assert!(!r.created);
    let id = r.proposal_id.clone();
    assert!(id.starts_with("p-"));
    // Not in effect yet.
    assert!(
        fetch(&v, &tmp.path().join("o1"))
            .await
            .unwrap_err()
            .to_string()
            .contains("no access rule")
    );
    // The proposer approving again counts once.
    let p = a.decide(&id, true).await.unwrap();
    assert_eq!((p.state.as_str(), p.approvers.len()), ("pending", 1));

    // A restart keeps the proposal.
    v.stop().await;
    let v = start(clock.clone()).await;
    let mut b_client = AdminClient::new(connect_as(&v, Some(&b)).await);
    let pending = b_client.proposals(false).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, id);
    // A second, distinct admin reaches the quorum and the rule takes effect.
    let p = b_client.decide(&id, true).await.unwrap();
    assert_eq!((p.state.as_str(), p.approvers.len()), ("applied", 2));
    fetch(&v, &tmp.path().join("o2")).await.unwrap();
    let again = b_client.decide(&id, true).await.unwrap_err();
    assert_eq!(again.code(), Some(Code::FailedPrecondition));

    // An expired proposal cannot be approved; a rejected one cannot either.
    let mut c_client = AdminClient::new(connect_as(&v, Some(&c)).await);
    let r = c_client
        .allow_or_propose("m", "sim", "00aa", Default::default())
        .await
        .unwrap();
    clock.advance_ms(3_600_001);
    let err = b_client.decide(&r.proposal_id, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("expired"), "{err}");
    let r = c_client
        .allow_or_propose("m", "sim", "00bb", Default::default())
        .await
        .unwrap();
    assert_eq!(
        b_client.decide(&r.proposal_id, false).await.unwrap().state,
        "rejected"
    );
    assert_eq!(
        v.admin()
            .await
            .decide(&r.proposal_id, true)
            .await
            .unwrap_err()
            .code(),
        Some(Code::FailedPrecondition)
    );
    assert_eq!(
        v.admin().await.access_rules(Some("m")).await.unwrap().len(),
        1
    );

    let entries = v.audit_entries().await;
    assert_eq!(with_action(&entries, "propose").len(), 3);
    assert!(with_action(&entries, "approve").len() >= 2);
    assert_eq!(with_action(&entries, "reject").len(), 1);
    let applied = with_action(&entries, "access_allow");
    assert!(
        applied.last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("approved by")
    );
}

async fn fetch(
    v: &Vault,
    out: &std::path::Path,
) -> Result<weightvault::client::node::FetchReport, weightvault::client::ClientError> {
    v.fetch_into("m", out).await
}
