//! Prometheus metrics and the plaintext ops listener.
//!
//! Every metric is named here, with bounded label values (TEE kinds, fixed reason words), so a
//! scrape never carries node identities, model names or anything secret. The ops listener
//! (`[ops] listen`) serves `GET /metrics` in the Prometheus text format and `grpc.health.v1` over
//! plaintext HTTP/2 for Kubernetes gRPC probes, which do not speak TLS. It exposes no vault API.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

pub const GRANTS_ISSUED: &str = "weightvault_grants_issued_total";
pub const GRANTS_DENIED: &str = "weightvault_grants_denied_total";
pub const ATTEST_SECONDS: &str = "weightvault_attestation_verify_seconds";
pub const BYTES_SERVED: &str = "weightvault_bytes_served_total";
pub const LIVE_STREAMS: &str = "weightvault_live_streams";
pub const AUDIT_APPEND_SECONDS: &str = "weightvault_audit_append_seconds";
pub const AUDIT_TREE_SIZE: &str = "weightvault_audit_tree_size";
pub const BUDGET_REFUSALS: &str = "weightvault_budget_refusals_total";
pub const RATE_LIMITED: &str = "weightvault_rate_limited_total";
pub const SERVING: &str = "weightvault_serving";

/// Latency buckets in seconds: from a cached-chain SNP check (~0.3 ms) to a slow DCAP quote.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once. Returns `None` when another recorder was installed
/// first (a host program embedding the library); the vault then records into that one.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(GRANTS_ISSUED, "Grants issued");
    metrics::describe_counter!(
        GRANTS_DENIED,
        "Attestations or grant requests refused, by reason"
    );
    metrics::describe_histogram!(
        ATTEST_SECONDS,
        metrics::Unit::Seconds,
        "Time to verify one piece of attestation evidence, by TEE kind"
    );
    metrics::describe_counter!(
        BYTES_SERVED,
        metrics::Unit::Bytes,
        "Ciphertext bytes sent to nodes"
    );
    metrics::describe_gauge!(LIVE_STREAMS, "Weight streams in flight");
    metrics::describe_histogram!(
        AUDIT_APPEND_SECONDS,
        metrics::Unit::Seconds,
        "Time from submitting an audit entry to it being durable"
    );
    metrics::describe_gauge!(AUDIT_TREE_SIZE, "Entries in the audit log's Merkle tree");
    metrics::describe_counter!(
        BUDGET_REFUSALS,
        "Streams refused or stopped by an egress budget, by scope"
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        "Node-service and authorization calls refused by the per-address call limit, by RPC"
    );
}

pub fn grant_issued() {
    metrics::counter!(GRANTS_ISSUED).increment(1);
}

/// `stage` is "attest" or "grant"; `reason` one of the fixed words of
/// [`crate::server::error::ApiError::metric_reason`].
pub fn grant_denied(stage: &'static str, reason: &'static str) {
    metrics::counter!(GRANTS_DENIED, "stage" => stage, "reason" => reason).increment(1);
}

pub fn attestation_verified(tee: &str, took: Duration) {
    metrics::histogram!(ATTEST_SECONDS, "tee" => tee.to_string()).record(took.as_secs_f64());
}

pub fn bytes_served(n: u64) {
    metrics::counter!(BYTES_SERVED).increment(n);
}

pub fn audit_appended(took: Duration) {
    metrics::histogram!(AUDIT_APPEND_SECONDS).record(took.as_secs_f64());
}

pub fn audit_tree_size(n: u64) {
    metrics::gauge!(AUDIT_TREE_SIZE).set(n as f64);
}

/// `rpc` is "GetChallenge", "Attest", "RequestGrant", "FetchWeights" or "authorization".
pub fn rate_limited(rpc: &'static str) {
    metrics::counter!(RATE_LIMITED, "rpc" => rpc).increment(1);
}

/// `scope` is "grant", "node" or "model".
pub fn budget_refused(scope: &'static str) {
    metrics::counter!(BUDGET_REFUSALS, "scope" => scope).increment(1);
}

/// Counts a weight stream as live until dropped.
pub struct LiveStream(());

impl LiveStream {
    pub fn start() -> Self {
        metrics::gauge!(LIVE_STREAMS).increment(1.0);
        LiveStream(())
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        metrics::gauge!(LIVE_STREAMS).decrement(1.0);
    }
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    match install() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => "# metrics are recorded by the embedding program's recorder\n".to_string(),
    }
}

/// Serves `/metrics` and plaintext gRPC health on `addr` until `stop`.
pub async fn serve_ops(
    addr: SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    serving: super::health::ServingState,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), super::ServerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| super::ServerError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| super::ServerError::Bind { addr, source })?;
    let state = serving.clone();
    let router = tonic::service::Routes::new(health)
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    // This vault's own state, not the process-wide recorder's: several vaults
                    // in one process (tests, embedding programs) must not see each other's.
                    let mut body = render();
                    body.push_str(&format!(
                        "# HELP {SERVING} 1 while the vault serves (unsealed, audit log writable, not stopping)\n\
                         # TYPE {SERVING} gauge\n{SERVING} {}\n",
                        u8::from(state.is_serving())
                    ));
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
    // Anything else is a plain 404 (tonic's default would answer HTTP 200 with a gRPC error).
    let router = router.fallback(|| async {
        (
            axum::http::StatusCode::NOT_FOUND,
            "not found: try /metrics\n",
        )
    });
    let routes = tonic::service::Routes::from(router);
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "ops listener stopped");
        }
    });
    tracing::info!(%local, "ops listener (metrics, health) on plaintext HTTP");
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        assert!(install().is_some());
        grant_issued();
        grant_denied("grant", "permission_denied");
        attestation_verified("snp", Duration::from_millis(2));
        bytes_served(4096);
        budget_refused("node");
        rate_limited("GetChallenge");
        let live = LiveStream::start();
        let text = render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("weightvault_grants_issued_total ")),
            "{text}"
        );
        assert!(text.contains(
            "weightvault_grants_denied_total{stage=\"grant\",reason=\"permission_denied\"}"
        ));
        assert!(text.contains("weightvault_attestation_verify_seconds_bucket{tee=\"snp\""));
        assert!(text.contains("weightvault_budget_refusals_total{scope=\"node\"}"));
        assert!(text.contains("weightvault_rate_limited_total{rpc=\"GetChallenge\"}"));
        assert!(text.contains("weightvault_live_streams"));
        drop(live);
    }
}
