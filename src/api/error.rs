//! The one mapping from failures to gRPC statuses. Every status carries a
//! `google.rpc.ErrorInfo` with a stable reason; invalid input also carries `BadRequest`
//! field violations. Messages never contain secrets or internal error text.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::Violations;
use crate::store::StoreError;

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "instance-manager.bbws.io";

/// Stable `ErrorInfo.reason` values; clients may switch on them.
pub mod reason {
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    pub const INVALID_PAGE_TOKEN: &str = "INVALID_PAGE_TOKEN";
    pub const REQUEST_ID_REUSED: &str = "REQUEST_ID_REUSED";
    pub const INSTANCE_NOT_FOUND: &str = "INSTANCE_NOT_FOUND";
    pub const OPERATION_NOT_FOUND: &str = "OPERATION_NOT_FOUND";
    pub const INSTANCE_ALREADY_EXISTS: &str = "INSTANCE_ALREADY_EXISTS";
    pub const TENANT_ENVIRONMENT_TAKEN: &str = "TENANT_ENVIRONMENT_TAKEN";
    pub const CONCURRENT_MODIFICATION: &str = "CONCURRENT_MODIFICATION";
    pub const STATE_STORE_UNAVAILABLE: &str = "STATE_STORE_UNAVAILABLE";
    pub const NOT_IMPLEMENTED: &str = "NOT_IMPLEMENTED";
    pub const NOT_SUPPORTED: &str = "NOT_SUPPORTED";
    pub const ETAG_MISMATCH: &str = "ETAG_MISMATCH";
    pub const INSTANCE_BUSY: &str = "INSTANCE_BUSY";
    pub const WRONG_STATE: &str = "WRONG_STATE";
    pub const ENVIRONMENT_UNAVAILABLE: &str = "ENVIRONMENT_UNAVAILABLE";
    pub const OPERATION_DONE: &str = "OPERATION_DONE";
    pub const NOT_RETRYABLE: &str = "NOT_RETRYABLE";
    pub const NOT_CANCELLABLE: &str = "NOT_CANCELLABLE";
    pub const INTERNAL: &str = "INTERNAL";
}

/// What went wrong, in the API's terms.
#[derive(Debug)]
pub enum ApiError {
    /// Bad input: nothing was written.
    Invalid(Violations),
    /// Like `Invalid`, with a more specific reason (for example a bad page token).
    InvalidWithReason {
        reason: &'static str,
        violations: Violations,
    },
    NotFound {
        reason: &'static str,
        resource: String,
    },
    AlreadyExists {
        reason: &'static str,
        message: String,
        metadata: Vec<(&'static str, String)>,
    },
    /// The resource is not in a state that allows the request.
    FailedPrecondition {
        reason: &'static str,
        message: String,
        metadata: Vec<(&'static str, String)>,
    },
    /// A concurrent change won; the client may re-read and retry.
    Aborted {
        reason: &'static str,
        message: String,
    },
    Unavailable(String),
    /// The RPC belongs to work that has not landed yet.
    NotImplemented {
        rpc: &'static str,
    },
    /// A standard method this service deliberately does not offer.
    Unsupported {
        rpc: &'static str,
        why: &'static str,
    },
    /// A bug or corrupt state; details are logged, not returned.
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        let mut violations = Violations::new();
        violations.add(field, description);
        ApiError::Invalid(violations)
    }

    pub fn instance_not_found(name: impl Into<String>) -> Self {
        ApiError::NotFound {
            reason: reason::INSTANCE_NOT_FOUND,
            resource: name.into(),
        }
    }

    pub fn operation_not_found(name: impl Into<String>) -> Self {
        ApiError::NotFound {
            reason: reason::OPERATION_NOT_FOUND,
            resource: name.into(),
        }
    }
}

impl From<Violations> for ApiError {
    fn from(violations: Violations) -> Self {
        ApiError::Invalid(violations)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(detail) => ApiError::Unavailable(detail),
            StoreError::Contention => ApiError::Aborted {
                reason: reason::CONCURRENT_MODIFICATION,
                message: "a concurrent request changed the same resources; retry".into(),
            },
            StoreError::Conflict { .. } => ApiError::Aborted {
                reason: reason::CONCURRENT_MODIFICATION,
                message: "the resource was changed concurrently; re-read and retry".into(),
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn status(code: Code, message: String, mut details: ErrorDetails, reason: &str) -> Status {
    details.set_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
    Status::with_error_details(code, message, details)
}

fn with_metadata(
    code: Code,
    message: String,
    reason: &str,
    metadata: Vec<(&'static str, String)>,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

fn bad_request(violations: &Violations) -> ErrorDetails {
    let mut details = ErrorDetails::new();
    for violation in violations.iter() {
        details.add_bad_request_violation(violation.field.clone(), violation.description.clone());
    }
    details
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let status = into_status(error);
        tracing::info!(code = ?status.code(), message = status.message(), "rpc failed");
        status
    }
}

fn into_status(error: ApiError) -> Status {
    {
        match error {
            ApiError::Invalid(violations) => status(
                Code::InvalidArgument,
                format!("invalid request: {violations}"),
                bad_request(&violations),
                reason::INVALID_ARGUMENT,
            ),
            ApiError::InvalidWithReason { reason, violations } => status(
                Code::InvalidArgument,
                format!("invalid request: {violations}"),
                bad_request(&violations),
                reason,
            ),
            ApiError::NotFound { reason, resource } => with_metadata(
                Code::NotFound,
                format!("{resource} not found"),
                reason,
                vec![("resource", resource)],
            ),
            ApiError::AlreadyExists {
                reason,
                message,
                metadata,
            } => with_metadata(Code::AlreadyExists, message, reason, metadata),
            ApiError::FailedPrecondition {
                reason,
                message,
                metadata,
            } => with_metadata(Code::FailedPrecondition, message, reason, metadata),
            ApiError::Aborted { reason, message } => {
                with_metadata(Code::Aborted, message, reason, Vec::new())
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "state store unavailable");
                with_metadata(
                    Code::Unavailable,
                    "the state store is unavailable; retry with backoff".into(),
                    reason::STATE_STORE_UNAVAILABLE,
                    Vec::new(),
                )
            }
            ApiError::NotImplemented { rpc } => with_metadata(
                Code::Unimplemented,
                format!("{rpc} is not implemented yet"),
                reason::NOT_IMPLEMENTED,
                vec![("rpc", rpc.to_owned())],
            ),
            ApiError::Unsupported { rpc, why } => with_metadata(
                Code::Unimplemented,
                format!("{rpc} is not supported: {why}"),
                reason::NOT_SUPPORTED,
                vec![("rpc", rpc.to_owned())],
            ),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                with_metadata(
                    Code::Internal,
                    "internal error".into(),
                    reason::INTERNAL,
                    Vec::new(),
                )
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
