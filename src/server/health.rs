//! `grpc.health.v1` (the gRPC health checking protocol) for grpcurl and Kubernetes probes.
//!
//! The vault is SERVING only while it can do its job: keys unsealed, the audit log writable and
//! no shutdown under way. Anything else reports NOT_SERVING, for the whole server (service name
//! `""`) and for each weightvault service, so a load balancer stops sending nodes to a vault
//! that would refuse them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Names reported besides the whole server (`""`).
pub const SERVICES: [&str; 3] = [
    "weightvault.v1.NodeService",
    "weightvault.v1.AdminService",
    "weightvault.v1.AuditService",
];

/// How often a failed audit log is looked for (its flag is set by the sequencer task).
const POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flags {
    sealed: bool,
    audit_failed: bool,
    stopping: bool,
}

impl Flags {
    fn status(self) -> ServingStatus {
        if self.sealed || self.audit_failed || self.stopping {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }
    }

    fn reason(self) -> &'static str {
        if self.stopping {
            "shutting down"
        } else if self.sealed {
            "sealed"
        } else if self.audit_failed {
            "audit log cannot write"
        } else {
            "serving"
        }
    }
}

/// What the health service reports. Cheap to clone; setters never block.
#[derive(Clone)]
pub struct ServingState {
    flags: Arc<watch::Sender<Flags>>,
}

impl Default for ServingState {
    fn default() -> Self {
        Self::new()
    }
}

impl ServingState {
    pub fn new() -> Self {
        Self {
            // Fail closed: not serving until the key ring is open (`set_sealed(false)`).
            flags: Arc::new(watch::Sender::new(Flags {
                sealed: true,
                ..Flags::default()
            })),
        }
    }

    /// The root key is not loaded (a Shamir seal waiting for shares).
    pub fn set_sealed(&self, sealed: bool) {
        self.flags.send_modify(|f| f.sealed = sealed);
    }

    /// The audit log refused a write; the vault refuses access until restart.
    pub fn set_audit_failed(&self) {
        self.flags
            .send_if_modified(|f| !std::mem::replace(&mut f.audit_failed, true));
    }

    /// Shutdown began: probes should stop routing here while streams drain.
    pub fn set_stopping(&self) {
        self.flags.send_modify(|f| f.stopping = true);
    }

    pub fn is_serving(&self) -> bool {
        self.flags.borrow().status() == ServingStatus::Serving
    }

    /// A short word for status output and the metrics endpoint.
    pub fn reason(&self) -> &'static str {
        self.flags.borrow().reason()
    }

    /// Writes the current status into `reporter` before the server accepts its first call, so a
    /// probe can never see the library's initial SERVING while the vault is sealed.
    pub async fn publish(&self, reporter: &HealthReporter) {
        let status = self.flags.borrow().status();
        reporter.set_service_status("", status).await;
        for s in SERVICES {
            reporter.set_service_status(s, status).await;
        }
    }

    /// Keeps `reporter` in step with this state until `stop`; `audit_failed` is polled because the
    /// sequencer only raises a flag.
    pub fn spawn_reporter(
        &self,
        reporter: HealthReporter,
        audit_failed: impl Fn() -> bool + Send + 'static,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        let mut rx = self.flags.subscribe();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                if audit_failed() {
                    state.set_audit_failed();
                }
                let flags = *rx.borrow_and_update();
                let status = flags.status();
                if last != Some(status) {
                    if last.is_some() {
                        tracing::info!(status = flags.reason(), "health status changed");
                    }
                    reporter.set_service_status("", status).await;
                    for s in SERVICES {
                        reporter.set_service_status(s, status).await;
                    }
                    last = Some(status);
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        // Probes that still reach the process see it leave service.
                        reporter.set_service_status("", ServingStatus::NotServing).await;
                        for s in SERVICES {
                            reporter.set_service_status(s, ServingStatus::NotServing).await;
                        }
                        return;
                    }
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_flag_takes_the_vault_out_of_service() {
        let s = ServingState::new();
        assert!(
            !s.is_serving(),
            "a new state is sealed until the keys are in"
        );
        assert!(!s.is_serving());
        assert_eq!(s.reason(), "sealed");
        s.set_sealed(false);
        assert!(s.is_serving());
        s.set_audit_failed();
        assert!(!s.is_serving());
        assert_eq!(s.reason(), "audit log cannot write");
        s.set_stopping();
        assert_eq!(s.reason(), "shutting down");
    }
}
