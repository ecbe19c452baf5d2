//! Cloud errors, and the one place that decides which SDK failures are worth retrying.

use std::fmt;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling, 5xx, timeouts, connection failures: try again with backoff.
    Retryable,
    /// The resource does not exist.
    NotFound,
    /// The resource (or a name, priority, …) is taken.
    Conflict,
    /// The request was refused as invalid or unauthorised; retrying will not help.
    Fatal,
    /// Refused because something made a moment ago is not visible yet to the service that
    /// refused it: ECS "unable to assume the role" for an IAM role just created (IAM is
    /// eventually consistent). Worth retrying only for a bounded time after the change;
    /// otherwise as fatal as [`ErrorKind::Fatal`].
    NotYetVisible,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudError {
    pub kind: ErrorKind,
    /// What failed, without secrets: `operation: code: message`.
    pub message: String,
}

impl CloudError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Retryable
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CloudError {}

pub type CloudResult<T> = Result<T, CloudError>;

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalError",
    "InternalServerError",
    "RequestTimeout",
    "RequestTimeoutException",
    // IAM: another request is changing the same entity.
    "ConcurrentModification",
];

/// ECS's refusal of a task role it cannot assume (yet), with the codes it comes with
/// (RegisterTaskDefinition: ClientException; CreateService, RunTask:
/// InvalidParameterException).
const ROLE_NOT_ASSUMABLE: &str = "unable to assume the role";
const ROLE_NOT_ASSUMABLE_CODES: &[&str] = &["ClientException", "InvalidParameterException"];

const NOT_FOUND_SUFFIXES: &[&str] = &[
    "NotFound",
    "NotFoundException",
    "NoSuchEntity",
    "NoSuchKey",
    "NoSuchBucket",
];

/// Codes that mean "gone" without saying NotFound.
const NOT_FOUND: &[&str] = &[
    // ECS: the service was deleted (it is INACTIVE or DRAINING).
    "ServiceNotActiveException",
];

const CONFLICT: &[&str] = &[
    "ResourceExistsException",
    "AccessPointAlreadyExists",
    "FileSystemAlreadyExists",
    "DuplicateTargetGroupName",
    "PriorityInUse",
    "ResourceInUseException",
    "InvalidParameterException.AlreadyExists",
    // ELBv2: a target group still used by a listener rule.
    "ResourceInUse",
    // Cognito: a group of that name exists in the pool.
    "GroupExistsException",
];

/// Classifies an SDK error for operation `what` (named in the message).
pub fn classify<E>(what: &str, error: &SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => CloudError::new(
            ErrorKind::Retryable,
            format!("{what}: no response: {error}"),
        ),
        SdkError::ResponseError(_) => {
            CloudError::new(ErrorKind::Retryable, format!("{what}: unreadable response"))
        }
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("Unknown");
            let message = err.message().unwrap_or("");
            let text = format!("{what}: {code}: {message}");
            let server_error = service.raw().status().is_server_error();
            let kind = if THROTTLING.contains(&code) || server_error {
                ErrorKind::Retryable
            } else if ROLE_NOT_ASSUMABLE_CODES.contains(&code)
                && message.to_ascii_lowercase().contains(ROLE_NOT_ASSUMABLE)
            {
                ErrorKind::NotYetVisible
            } else if NOT_FOUND.contains(&code)
                || NOT_FOUND_SUFFIXES.iter().any(|s| code.ends_with(s))
            {
                ErrorKind::NotFound
            } else if CONFLICT.contains(&code)
                || code.ends_with("AlreadyExists")
                || code.ends_with("AlreadyExistsException")
            {
                ErrorKind::Conflict
            } else {
                ErrorKind::Fatal
            };
            CloudError::new(kind, text)
        }
        _ => CloudError::new(ErrorKind::Fatal, format!("{what}: {error}")),
    }
}
