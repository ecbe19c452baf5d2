//! What a client subcommand ends with: its exit code, and errors told the way an operator
//! reads them — the status code, the message, the reason and every field violation from
//! the `google.rpc` details, never a debug dump.

use std::fmt::Write as _;
use std::process::ExitCode;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::output::clean;
use crate::api::error::code_name;

/// The call or the command line was fine and, for an operation, it ended COMPLETED.
pub const EXIT_OK: u8 = 0;
/// An RPC failed (the server answered an error, or could not be reached) or local input
/// (a file, a flag value) was unusable.
pub const EXIT_ERROR: u8 = 1;
/// The command line itself was malformed (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// The operation ended, but not COMPLETED: FAILED, STUCK or CANCELLED.
pub const EXIT_OPERATION_FAILED: u8 = 3;

#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error status.
    Rpc(Status),
    /// Something on this side: a connection, a file, a flag value.
    Local(String),
    /// The operation ended without completing; the text says how.
    OperationFailed(String),
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Rpc(status)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Rpc(status) => f.write_str(&describe_status(status)),
            CliError::Local(message) | CliError::OperationFailed(message) => f.write_str(message),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Rpc(_) | CliError::Local(_) => EXIT_ERROR,
            CliError::OperationFailed(_) => EXIT_OPERATION_FAILED,
        })
    }
}

/// `CODE: message`, then one indented line per detail the status carries: the ErrorInfo
/// reason (and its metadata), each BadRequest field violation, precondition failures,
/// the resource, the retry delay, help links.
pub fn describe_status(status: &Status) -> String {
    let mut text = format!("{}: {}", code_name(status.code()), clean(status.message()));
    if status.message().is_empty() {
        text.truncate(text.len() - 2);
    }
    let Ok(details) = status.check_error_details() else {
        text.push_str("\n  (the status details could not be decoded)");
        return text;
    };
    if let Some(info) = details.error_info() {
        let _ = write!(text, "\n  reason: {}", clean(&info.reason));
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (key, value) in metadata {
            let _ = write!(text, "\n  {}: {}", clean(key), clean(value));
        }
    }
    if let Some(bad) = details.bad_request() {
        for violation in &bad.field_violations {
            if violation.field.is_empty() {
                let _ = write!(text, "\n  invalid: {}", clean(&violation.description));
            } else {
                let _ = write!(
                    text,
                    "\n  invalid field {}: {}",
                    clean(&violation.field),
                    clean(&violation.description)
                );
            }
        }
    }
    if let Some(failure) = details.precondition_failure() {
        for violation in &failure.violations {
            let _ = write!(
                text,
                "\n  precondition {} {}: {}",
                clean(&violation.r#type),
                clean(&violation.subject),
                clean(&violation.description)
            );
        }
    }
    if let Some(quota) = details.quota_failure() {
        for violation in &quota.violations {
            let _ = write!(
                text,
                "\n  quota {}: {}",
                clean(&violation.subject),
                clean(&violation.description)
            );
        }
    }
    if let Some(resource) = details.resource_info() {
        let _ = write!(
            text,
            "\n  resource: {} {}",
            clean(&resource.resource_type),
            clean(&resource.resource_name)
        );
    }
    if let Some(retry) = details.retry_info()
        && let Some(delay) = retry.retry_delay
    {
        let _ = write!(text, "\n  retry after: {:.1} s", delay.as_secs_f64());
    }
    if let Some(help) = details.help() {
        for link in &help.links {
            let _ = write!(
                text,
                "\n  see: {} {}",
                clean(&link.description),
                clean(&link.url)
            );
        }
    }
    if let Some(localized) = details.localized_message() {
        let _ = write!(text, "\n  {}", clean(&localized.message));
    }
    text
}

/// A `google.rpc.Status` (an operation's error) as a tonic status, for [`describe_status`].
pub fn rpc_status(status: &tonic_types::pb::Status) -> Status {
    use prost::Message as _;
    Status::with_details(
        Code::from_i32(status.code),
        status.message.clone(),
        status.encode_to_vec().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn a_status_is_told_with_its_reason_and_field_violations() {
        let mut details = ErrorDetails::with_bad_request_violation(
            "parent",
            "tenant id must start with a letter",
        );
        details.add_bad_request_violation("instance_id", "too long\u{1b}[2J");
        details.set_error_info(
            "INVALID_ARGUMENT",
            "instance-manager.bbws.io",
            [("resource".to_owned(), "tenants/x".to_owned())],
        );
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid request: parent: tenant id must start with a letter",
            details,
        );
        let text = describe_status(&status);
        assert!(
            text.starts_with("INVALID_ARGUMENT: invalid request: parent:"),
            "{text}"
        );
        assert!(text.contains("\n  reason: INVALID_ARGUMENT"), "{text}");
        assert!(
            text.contains("\n  invalid field parent: tenant id must start with a letter"),
            "{text}"
        );
        assert!(text.contains("\n  resource: tenants/x"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "control characters escaped: {text}"
        );
        assert!(!text.contains("Status {"), "no debug dump: {text}");
    }

    #[test]
    fn an_operation_error_keeps_its_details() {
        let details = ErrorDetails::with_error_info("STEP_FAILED", "d", []);
        let status = Status::with_error_details(Code::Aborted, "step failed", details);
        let pb = tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: {
                use prost::Message as _;
                tonic_types::pb::Status::decode(status.details())
                    .unwrap()
                    .details
            },
        };
        let text = describe_status(&rpc_status(&pb));
        assert!(text.starts_with("ABORTED: step failed"), "{text}");
        assert!(text.contains("reason: STEP_FAILED"), "{text}");
    }
}
