//! The one mapping from internal outcomes to what a client sees: a stable gRPC code, a short
//! reason and the request id. Inner errors and key material never reach the client; the detail
//! goes to the server log under the same request id.

use tonic::{Code, Status};

/// Metadata key carrying the request id on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Metadata of a call-limit refusal: milliseconds until the address has a call again.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

/// A client-facing failure. The strings are short reasons written by this crate, never
/// `Display` of an inner error.
#[derive(Debug)]
pub enum ApiError {
    Unauthenticated(String),
    PermissionDenied(String),
    InvalidArgument(String),
    NotFound(String),
    OutOfRange(String),
    /// The call is valid but the object is not in a state that allows it.
    FailedPrecondition(String),
    /// An egress budget is used up (or, in a proto-level check, a resource limit).
    ResourceExhausted(String),
    /// The caller's address is over its call limit (`server::limit`); sent as
    /// RESOURCE_EXHAUSTED with the wait in the [`RETRY_AFTER_HEADER`] metadata.
    RateLimited {
        reason: String,
        retry_after_ms: u64,
    },
    /// The audit log cannot write: the vault refuses access (fail closed).
    AuditUnavailable,
    /// Something failed inside the vault; the detail was logged.
    Internal,
}

impl ApiError {
    pub fn code(&self) -> Code {
        match self {
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::OutOfRange(_) => Code::OutOfRange,
            ApiError::ResourceExhausted(_) | ApiError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::AuditUnavailable => Code::Unavailable,
            ApiError::Internal => Code::Internal,
        }
    }

    /// A fixed word per kind of refusal, for metric labels (never the free-text reason).
    pub fn metric_reason(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::NotFound(_) => "not_found",
            ApiError::OutOfRange(_) => "out_of_range",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::ResourceExhausted(_) | ApiError::RateLimited { .. } => "resource_exhausted",
            ApiError::AuditUnavailable => "audit_unavailable",
            ApiError::Internal => "internal",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            ApiError::Unauthenticated(r)
            | ApiError::PermissionDenied(r)
            | ApiError::InvalidArgument(r)
            | ApiError::NotFound(r)
            | ApiError::OutOfRange(r)
            | ApiError::ResourceExhausted(r)
            | ApiError::FailedPrecondition(r)
            | ApiError::RateLimited { reason: r, .. } => r,
            ApiError::AuditUnavailable => "audit log unavailable; access refused",
            ApiError::Internal => "internal error",
        }
    }

    /// The status sent to the client, tagged with the request id.
    pub fn into_status(self, request_id: &str) -> Status {
        let mut status = Status::new(
            self.code(),
            format!("{} (request {request_id})", self.reason()),
        );
        if let Ok(v) = request_id.parse() {
            status.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        if let ApiError::RateLimited { retry_after_ms, .. } = self {
            status
                .metadata_mut()
                .insert(RETRY_AFTER_HEADER, retry_after_ms.into());
        }
        status
    }
}

/// Logs an internal failure with its request id and returns the opaque client error.
pub fn internal(request_id: &str, what: &str, err: impl std::fmt::Display) -> ApiError {
    tracing::error!(request_id, error = %err, "{what}");
    ApiError::Internal
}
