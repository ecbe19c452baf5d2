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
    pub const BACKUP_NOT_FOUND: &str = "BACKUP_NOT_FOUND";
    pub const BACKUP_IN_USE: &str = "BACKUP_IN_USE";
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
    pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";
    pub const MALFORMED_REQUEST: &str = "MALFORMED_REQUEST";
    pub const UNKNOWN_METHOD: &str = "UNKNOWN_METHOD";
    pub const TOO_MANY_STREAMS: &str = "TOO_MANY_STREAMS";
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const ROLE_REQUIRED: &str = "ROLE_REQUIRED";
    pub const TENANT_NOT_FOUND: &str = "TENANT_NOT_FOUND";
}

/// Longest status message. The message and the details travel as trailers, which clients
/// limit (16 KiB in most gRPC implementations, and the details are base64): client input
/// echoed in an error is cut to these bounds, here, in one place.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest field path, violation description or ErrorInfo metadata value.
pub const MAX_DETAIL_BYTES: usize = 256;
/// Budget of all BadRequest field violations together; the rest are summarised.
pub const MAX_VIOLATIONS_BYTES: usize = 2048;

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
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
    /// This replica cannot reach the cloud for a read that needs it (it has no environments
    /// configured); another replica may.
    NoCloudAccess(String),
    /// The server is shutting down; the client may retry (another replica) or resume.
    ShuttingDown(String),
    /// A limit of this server was reached (for example the number of open streams).
    ResourceExhausted {
        reason: &'static str,
        message: String,
        metadata: Vec<(&'static str, String)>,
    },
    /// The RPC belongs to work that has not landed yet.
    NotImplemented {
        rpc: &'static str,
    },
    /// A standard method this service deliberately does not offer.
    Unsupported {
        rpc: &'static str,
        why: &'static str,
    },
    /// The call carries no principal (it did not pass the authentication layer).
    Unauthenticated,
    /// The principal's role is below the one the method needs (on a resource it may see).
    PermissionDenied {
        required: crate::auth::Role,
        method: &'static str,
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

    pub fn backup_not_found(name: impl Into<String>) -> Self {
        ApiError::NotFound {
            reason: reason::BACKUP_NOT_FOUND,
            resource: name.into(),
        }
    }

    /// A tenant the caller may not see, named as a parent where there is no resource to
    /// miss (creating an instance in it).
    pub fn tenant_not_found(name: impl Into<String>) -> Self {
        ApiError::NotFound {
            reason: reason::TENANT_NOT_FOUND,
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
    Status::with_error_details(code, bounded(&message, MAX_MESSAGE_BYTES), details)
}

fn with_metadata(
    code: Code,
    message: String,
    reason: &str,
    metadata: Vec<(&'static str, String)>,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), bounded(&v, MAX_DETAIL_BYTES)))
        .collect();
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, bounded(&message, MAX_MESSAGE_BYTES), details)
}

fn bad_request(violations: &Violations) -> ErrorDetails {
    let mut details = ErrorDetails::new();
    let mut used = 0;
    let total = violations.iter().count();
    for (i, violation) in violations.iter().enumerate() {
        let field = bounded(&violation.field, MAX_DETAIL_BYTES);
        let description = bounded(&violation.description, MAX_DETAIL_BYTES);
        used += field.len() + description.len();
        if used > MAX_VIOLATIONS_BYTES {
            details
                .add_bad_request_violation("", format!("{} more violations not shown", total - i));
            break;
        }
        details.add_bad_request_violation(field, description);
    }
    details
}

/// The status tonic (not a handler) answered with, given ErrorInfo and the code this API
/// documents: a request over `max_request_bytes` is RESOURCE_EXHAUSTED, one that cannot be
/// decoded is INVALID_ARGUMENT, an unknown method UNIMPLEMENTED. `None` when the status
/// carries details already (it came from a handler).
pub fn detailed_transport_status(status: &Status, max_request_bytes: usize) -> Option<Status> {
    if status.code() == Code::Ok || !status.details().is_empty() {
        return None;
    }
    let message = status.message();
    let (code, reason, message, metadata) = match status.code() {
        Code::OutOfRange if message.contains("message length too large") => (
            Code::ResourceExhausted,
            reason::REQUEST_TOO_LARGE,
            format!("the request is larger than the {max_request_bytes} bytes this server accepts"),
            vec![("max_request_bytes", max_request_bytes.to_string())],
        ),
        // tonic answers INTERNAL when a request cannot be decoded (the handler never ran;
        // a handler's INTERNAL always carries details).
        Code::Internal => (
            Code::InvalidArgument,
            reason::MALFORMED_REQUEST,
            format!("the request could not be decoded: {message}"),
            Vec::new(),
        ),
        Code::Unimplemented if message.is_empty() => (
            Code::Unimplemented,
            reason::UNKNOWN_METHOD,
            "this server has no such service or method".to_owned(),
            Vec::new(),
        ),
        Code::Unimplemented => (
            Code::Unimplemented,
            reason::NOT_SUPPORTED,
            message.to_owned(),
            Vec::new(),
        ),
        code => (code, code_reason(code), message.to_owned(), Vec::new()),
    };
    Some(with_metadata(code, message, reason, metadata))
}

/// The reason of a status that has no more specific one: the code's canonical name.
fn code_reason(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => reason::INVALID_ARGUMENT,
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => reason::NOT_IMPLEMENTED,
        Code::Internal => reason::INTERNAL,
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Response hook for the server's layer: a trailers-only error response from tonic itself
/// (decoding, routing) gets ErrorInfo and the documented code; others pass unchanged.
pub fn add_error_info<B>(
    mut response: http::Response<B>,
    max_request_bytes: usize,
) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.contains_key("grpc-status-details-bin") {
        return response;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return response;
    };
    if let Some(detailed) = detailed_transport_status(&status, max_request_bytes) {
        tracing::info!(code = ?detailed.code(), message = detailed.message(), "request refused before its handler");
        headers.remove("grpc-message");
        if detailed.add_header(headers).is_err() {
            tracing::warn!("cannot encode the detailed status");
        }
    }
    response
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
            ApiError::NoCloudAccess(message) => with_metadata(
                Code::Unavailable,
                message,
                reason::ENVIRONMENT_UNAVAILABLE,
                Vec::new(),
            ),
            ApiError::ShuttingDown(message) => with_metadata(
                Code::Unavailable,
                message,
                reason::SHUTTING_DOWN,
                Vec::new(),
            ),
            ApiError::ResourceExhausted {
                reason,
                message,
                metadata,
            } => with_metadata(Code::ResourceExhausted, message, reason, metadata),
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
            ApiError::Unauthenticated => with_metadata(
                Code::Unauthenticated,
                "missing credentials: send `authorization: Bearer <token>`".into(),
                reason::UNAUTHENTICATED,
                Vec::new(),
            ),
            ApiError::PermissionDenied { required, method } => {
                let rpc = crate::auth::authz::short_name(method);
                with_metadata(
                    Code::PermissionDenied,
                    format!("{rpc} needs the role {required} or higher"),
                    reason::ROLE_REQUIRED,
                    vec![
                        ("required_role", required.to_string()),
                        ("method", rpc.to_owned()),
                    ],
                )
            }
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

/// The canonical name of a status code (`INVALID_ARGUMENT`), as the API documents them,
/// the audit trail records them, the metrics label them and the CLI prints them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded(&"é".repeat(100), 11);
        assert!(cut.len() <= 11, "{cut}");
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn every_echo_of_input_is_bounded() {
        let mut violations = Violations::new();
        for i in 0..200 {
            violations.add(format!("f{i}{}", "x".repeat(500)), "y".repeat(5000));
        }
        let status = Status::from(ApiError::Invalid(violations));
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(
            status.details().len() < 4 * 1024,
            "{}",
            status.details().len()
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, reason::INVALID_ARGUMENT);
        let shown = status.get_details_bad_request().unwrap().field_violations;
        assert!(
            shown
                .last()
                .unwrap()
                .description
                .ends_with("more violations not shown")
        );
    }

    #[test]
    fn transport_statuses_get_error_info_and_handler_ones_are_left_alone() {
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 10485807 bytes, the limit is: 1048576 bytes",
        );
        let detailed = detailed_transport_status(&too_large, 1024).unwrap();
        assert_eq!(detailed.code(), Code::ResourceExhausted);
        assert_eq!(
            detailed.get_details_error_info().unwrap().reason,
            reason::REQUEST_TOO_LARGE
        );
        let undecodable = detailed_transport_status(&Status::internal("bad wire type"), 1024);
        assert_eq!(undecodable.unwrap().code(), Code::InvalidArgument);
        let ours = Status::from(ApiError::instance_not_found("tenants/a/instances/b"));
        assert!(detailed_transport_status(&ours, 1024).is_none());
    }
}
