//! Shared test harness: a real vault on 127.0.0.1:0 from a dev data directory, with a clock the
//! test controls, and clients for each role.
#![allow(dead_code)]

pub mod cli;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use weightvault::attest::sim::{SimReport, SimSigner};
use weightvault::client::node::{Attester, NodeClient};
use weightvault::client::{ClientError, Endpoint};
use weightvault::config::Config;
use weightvault::config::dev::{self, files};
use weightvault::server::{self, RunningServer, StartOptions};
use weightvault::time::{Clock, ManualClock, SystemClock};

pub const MEASUREMENT: &str = "5e11ab1e5e11ab1e5e11ab1e5e11ab1e5e11ab1e5e11ab1e5e11ab1e5e11ab1e";

pub struct Vault {
    pub dir: PathBuf,
    pub clock: ManualClock,
    pub server: Option<RunningServer>,
    pub cfg: Config,
}

impl Vault {
    /// A vault in `dir` (created on first use) with 64 KiB chunks so small files span chunks.
    pub async fn start(dir: &Path) -> Vault {
        Self::start_with_clock(dir, ManualClock::new(SystemClock.now_ms())).await
    }

    pub async fn start_with_clock(dir: &Path, clock: ManualClock) -> Vault {
        Self::start_configured(dir, clock, |_| {}).await
    }

    /// A vault whose config the test adjusts first.
    pub async fn start_configured(
        dir: &Path,
        clock: ManualClock,
        adjust: impl FnOnce(&mut Config),
    ) -> Vault {
        let (path, _) = dev::ensure(dir).expect("dev setup");
        let mut cfg = Config::load(&path).expect("config");
        cfg.storage.chunk_size = 64 * 1024;
        adjust(&mut cfg);
        let server = server::start(
            &cfg,
            StartOptions {
                clock: Arc::new(clock.clone()),
                listen: Some("127.0.0.1:0".parse().unwrap()),
                wrap_store: None,
            },
        )
        .await
        .expect("server starts");
        Vault {
            dir: dir.to_path_buf(),
            clock,
            server: Some(server),
            cfg,
        }
    }

    /// A vault whose opened metadata store is wrapped first (fault injection).
    pub async fn start_wrapped(dir: &Path, wrap: server::StoreWrapper) -> Vault {
        let clock = ManualClock::new(SystemClock.now_ms());
        let (path, _) = dev::ensure(dir).expect("dev setup");
        let mut cfg = Config::load(&path).expect("config");
        cfg.storage.chunk_size = 64 * 1024;
        let server = server::start(
            &cfg,
            StartOptions {
                clock: Arc::new(clock.clone()),
                listen: Some("127.0.0.1:0".parse().unwrap()),
                wrap_store: Some(wrap),
            },
        )
        .await
        .expect("server starts");
        Vault {
            dir: dir.to_path_buf(),
            clock,
            server: Some(server),
            cfg,
        }
    }

    pub fn addr(&self) -> String {
        self.server.as_ref().unwrap().local_addr.to_string()
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
    }

    fn endpoint(&self, cert: Option<(&str, &str)>) -> Endpoint {
        Endpoint::from_files(
            &self.addr(),
            &self.dir.join(files::CA_CERT),
            cert.map(|c| self.dir.join(c.0)).as_deref(),
            cert.map(|c| self.dir.join(c.1)).as_deref(),
        )
        .unwrap()
    }

    pub async fn channel(&self, cert: Option<(&str, &str)>) -> tonic::transport::Channel {
        self.endpoint(cert).connect().await.expect("connect")
    }

    pub async fn admin(&self) -> weightvault::client::admin::AdminClient {
        weightvault::client::admin::AdminClient::new(
            self.channel(Some((files::ADMIN_CERT, files::ADMIN_KEY)))
                .await,
        )
    }

    pub async fn auditor(&self) -> weightvault::client::audit::AuditClient {
        weightvault::client::audit::AuditClient::new(
            self.channel(Some((files::AUDITOR_CERT, files::AUDITOR_KEY)))
                .await,
        )
    }

    pub async fn node(&self) -> NodeClient {
        NodeClient::new(self.channel(None).await)
    }

    /// The whole node flow for `model` (latest version) with the default options, as a node
    /// measuring [`MEASUREMENT`], into the directory `out`.
    pub async fn fetch_into(
        &self,
        model: &str,
        out: &Path,
    ) -> Result<weightvault::client::node::FetchReport, ClientError> {
        self.node()
            .await
            .fetch(
                model,
                &weightvault::client::node::FetchOptions::default(),
                &self.attester(MEASUREMENT),
                &mut weightvault::client::node::DirSink::new(out),
                &mut |_, _| {},
            )
            .await
    }

    /// Pushes `dir` as `model` and allows the test measurement to read it.
    pub async fn push_allowed(&self, model: &str, dir: &Path) -> u64 {
        let version = self.push_dir(model, dir).await;
        self.admin()
            .await
            .allow(model, "sim", MEASUREMENT)
            .await
            .unwrap();
        version
    }

    pub fn sim_key(&self) -> Vec<u8> {
        std::fs::read(self.dir.join(files::SIM_KEY)).unwrap()
    }

    pub fn attester(&self, measurement: &str) -> TestAttester {
        TestAttester {
            signer: SimSigner::from_pkcs8(&self.sim_key()).unwrap(),
            measurement: measurement.to_string(),
            clock: self.clock.clone(),
            instance: "test-node".into(),
        }
    }

    /// Every audit entry, parsed.
    pub async fn audit_entries(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        self.auditor()
            .await
            .entries(0, 0, |_, e| {
                out.push(serde_json::from_slice(e).unwrap());
                Ok(())
            })
            .await
            .unwrap();
        out
    }

    pub async fn push_dir(&self, model: &str, dir: &Path) -> u64 {
        let files = weightvault::client::collect_files(dir).unwrap();
        self.admin()
            .await
            .push(model, files, |_| {})
            .await
            .unwrap()
            .version
    }

    /// Like [`Self::push_dir`], with each file's plaintext SHA-256 recorded in the manifest
    /// (what a fetch with `verify_digest` needs).
    pub async fn push_dir_with_digest(&self, model: &str, dir: &Path) -> u64 {
        let files = weightvault::client::collect_files(dir).unwrap();
        let opts = weightvault::client::admin::PushOptions {
            record_digest: true,
        };
        self.admin()
            .await
            .push_with(model, files, &opts, |_| {})
            .await
            .unwrap()
            .version
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown_token().cancel();
        }
    }
}

/// Sim evidence stamped with the test's clock.
pub struct TestAttester {
    pub signer: SimSigner,
    pub measurement: String,
    pub clock: ManualClock,
    pub instance: String,
}

impl Attester for TestAttester {
    fn tee(&self) -> &str {
        "sim"
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, ClientError> {
        Ok(self.signer.sign(&SimReport {
            measurement: self.measurement.clone(),
            report_data: hex::encode(report_data),
            instance_id: self.instance.clone(),
            debug: false,
            issued_ms: self.clock.now_ms(),
        }))
    }
}

/// Deterministic pseudo-random bytes (xorshift), so files are not trivially compressible.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A model directory: a multi-chunk shard, a small JSON file, an empty file in a subdirectory.
pub fn model_dir(root: &Path) -> PathBuf {
    let dir = root.join("model-src");
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    std::fs::write(dir.join("model-00001.safetensors"), bytes(300_000, 7)).unwrap();
    std::fs::write(dir.join("config.json"), b"{\"layers\": 2}\n").unwrap();
    std::fs::write(dir.join("tokenizer/empty.txt"), b"").unwrap();
    dir
}

/// Asserts two directory trees hold the same files with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let list = |root: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = weightvault::client::collect_files(root)
            .unwrap()
            .into_iter()
            .map(|(rel, p, _)| (rel, std::fs::read(p).unwrap()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(a), list(b));
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after 30 s. A guard against
/// hanging, not a timing assertion: background work on a loaded 2-core machine can take seconds.
pub async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every audit entry of a stopped vault's embedded store in `data_dir`, parsed.
pub async fn stored_entries(data_dir: &Path) -> Vec<serde_json::Value> {
    use weightvault::store::MetadataStore;
    weightvault::store::sqlite::SqliteStore::open(&data_dir.join("metadata.db"))
        .await
        .unwrap()
        .audit_entries(0, u64::MAX, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| serde_json::from_slice(&e).unwrap())
        .collect()
}

/// The entries with a given action.
pub fn with_action<'a>(
    entries: &'a [serde_json::Value],
    action: &str,
) -> Vec<&'a serde_json::Value> {
    entries.iter().filter(|e| e["action"] == action).collect()
}

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Issues a client certificate from the dev CA; returns (cert PEM, key PEM, DER).
pub fn issue(dir: &std::path::Path, name: &str, uri: Option<&str>) -> (String, String, Vec<u8>) {
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(dir.join(weightvault::config::dev::files::CA_KEY)).unwrap(),
    )
    .unwrap();
    // The same issuer name and key as the dev CA (config/dev.rs), so the chain verifies.
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "weightvault dev CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if let Some(u) = uri {
        p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())];
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// A connection presenting `id` (cert PEM, key PEM) or no certificate.
pub async fn connect_as(
    v: &Vault,
    id: Option<&(String, String, Vec<u8>)>,
) -> tonic::transport::Channel {
    let ep = Endpoint {
        addr: v.addr(),
        ca_pem: std::fs::read(v.dir.join(files::CA_CERT)).unwrap(),
        identity: id.map(|(c, k, _)| (c.clone().into_bytes(), k.clone().into_bytes())),
    };
    ep.connect().await.unwrap()
}

/// A raw NodeService client without a certificate (a node).
pub async fn raw(
    v: &Vault,
) -> weightvault::proto::v1::node_service_client::NodeServiceClient<tonic::transport::Channel> {
    weightvault::proto::v1::node_service_client::NodeServiceClient::new(v.channel(None).await)
        .max_decoding_message_size(weightvault::server::MAX_MESSAGE)
}

/// GetChallenge + Attest with evidence from `attester`; returns the session token.
pub async fn attest(
    c: &mut weightvault::proto::v1::node_service_client::NodeServiceClient<
        tonic::transport::Channel,
    >,
    attester: &dyn weightvault::client::node::Attester,
    keys: &weightvault::grant::hpke::NodeKeyPair,
) -> Result<Vec<u8>, tonic::Status> {
    let nonce = c
        .get_challenge(weightvault::proto::v1::GetChallengeRequest {})
        .await?
        .into_inner()
        .nonce;
    let rd =
        weightvault::attest::report_data(&nonce.clone().try_into().unwrap(), keys.public_key());
    let evidence = attester.evidence(&rd).unwrap();
    Ok(c.attest(weightvault::proto::v1::AttestRequest {
        tee: "sim".into(),
        evidence,
        node_public_key: keys.public_key().to_vec(),
        nonce,
    })
    .await?
    .into_inner()
    .session_token)
}

/// RequestGrant for `model`@`version` (0 = latest).
pub async fn grant(
    c: &mut weightvault::proto::v1::node_service_client::NodeServiceClient<
        tonic::transport::Channel,
    >,
    token: &[u8],
    model: &str,
    version: u64,
) -> Result<weightvault::proto::v1::RequestGrantResponse, tonic::Status> {
    Ok(
        c.request_grant(weightvault::proto::v1::RequestGrantRequest {
            session_token: token.to_vec(),
            model: model.into(),
            version,
        })
        .await?
        .into_inner(),
    )
}

/// The URL of an external service a test needs, from `var`. When it is unset the test fails
/// under `CI=true` and otherwise says it is skipped (the caller then returns).
pub fn service(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {var} is not set, and CI=true requires this test to run (.ci/run starts the service)"
            );
            eprintln!("skipped: {test}: {var} is not set");
            None
        }
    }
}

/// A fresh, empty PostgreSQL database on the server of `base` (a `postgres://` URL), so tests
/// can run in parallel; returns its URL.
pub async fn fresh_database(base: &str) -> String {
    use sqlx::Connection;
    let (url, query) = base.split_once('?').unwrap_or((base, ""));
    let (server, _) = url
        .rsplit_once('/')
        .filter(|(s, _)| s.contains("://") && !s.ends_with('/'))
        .unwrap_or((url, ""));
    let name = format!(
        "wv_{}",
        hex::encode(weightvault::grant::random::<8>().unwrap())
    );
    let mut c = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to WEIGHTVAULT_TEST_PG");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut c)
        .await
        .expect("create test database");
    c.close().await.ok();
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

/// Endpoint and bucket from `WEIGHTVAULT_TEST_S3` (`http://host:port[/bucket]`, bucket
/// `weightvault-test` by default; .ci/services/s3.sh creates it).
pub fn s3_endpoint_bucket(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.split_once('/') {
        Some((_, bucket)) if !bucket.trim_matches('/').is_empty() => (
            url[..url.len() - bucket.len() - 1].to_string(),
            bucket.trim_matches('/').to_string(),
        ),
        _ => (
            url.trim_end_matches('/').to_string(),
            "weightvault-test".to_string(),
        ),
    }
}

/// A key prefix no other test uses.
pub fn fresh_prefix() -> String {
    format!(
        "t-{}",
        hex::encode(weightvault::grant::random::<8>().unwrap())
    )
}

/// Points a config at PostgreSQL (`pg`, a fresh database URL) and at a fresh prefix of the
/// test bucket of `s3` (credentials through a secret file in `dir`, as in production).
pub fn use_shared_storage(cfg: &mut Config, pg: &str, s3: &str, prefix: &str, dir: &Path) {
    let (endpoint, bucket) = s3_endpoint_bucket(s3);
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, "test-secret\n").unwrap();
    cfg.storage.metadata = Some(pg.to_string());
    cfg.storage.blobs = Some(format!("s3://{bucket}/{prefix}"));
    cfg.storage.s3 = weightvault::config::S3Config {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        access_key_id: Some("test".into()),
        secret_access_key_file: Some(secret),
    };
}

/// A store wrapper for `StartOptions::wrap_store` that puts a fault-injecting
/// [`weightvault::store::faulty::FaultyStore`] around the real store, and the slot where that
/// store appears once the server opened it.
pub fn faulty_wrapper() -> (
    weightvault::server::StoreWrapper,
    Arc<std::sync::OnceLock<Arc<weightvault::store::faulty::FaultyStore>>>,
) {
    let slot = Arc::new(std::sync::OnceLock::new());
    let set = slot.clone();
    let wrap: weightvault::server::StoreWrapper = Box::new(move |inner| {
        let f = Arc::new(weightvault::store::faulty::FaultyStore::new(inner));
        let _ = set.set(f.clone());
        f as Arc<dyn weightvault::store::MetadataStore>
    });
    (wrap, slot)
}
