//! The one place that decides what an AWS SDK error means for a caller of the store:
//! a precondition that failed, contention, a retryable outage, or a bug.

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::CancellationReason;

use crate::store::{StoreError, Write};

/// Error codes DynamoDB answers when it is overloaded or briefly unable to serve: the
/// request did not take effect and may be retried.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "LimitExceededException",
];

/// Classifies an SDK error that is not a precondition failure (callers check those
/// first, because only they know which write the condition belonged to).
pub(super) fn classify<E>(operation: &str, error: &SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = || format!("dynamodb {operation}: {}", DisplayErrorContext(error));
    match error {
        // The request may or may not have reached DynamoDB: the caller must re-read.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(detail())
        }
        SdkError::ServiceError(context) => {
            let code = context.err().code().unwrap_or_default();
            if code == "TransactionConflictException" {
                StoreError::Contention
            } else if RETRYABLE_CODES.contains(&code) || context.raw().status().is_server_error() {
                StoreError::Unavailable(detail())
            } else {
                StoreError::Internal(detail())
            }
        }
        _ => StoreError::Internal(detail()),
    }
}

/// Maps the cancellation reasons of a `TransactionCanceledException` (one per write, in
/// the order of `writes`) to the store's error: the first failed condition wins, because
/// it is definitive; a conflicting transaction means contention; capacity means outage.
pub(super) fn cancellation_error(reasons: &[CancellationReason], writes: &[Write]) -> StoreError {
    let code_at = |index: usize| reasons.get(index).and_then(CancellationReason::code);
    if let Some(index) = (0..reasons.len()).find(|&i| code_at(i) == Some("ConditionalCheckFailed"))
        && let Some(write) = writes.get(index)
    {
        return StoreError::Conflict {
            index,
            kind: write.kind(),
        };
    }
    let codes: Vec<&str> = reasons
        .iter()
        .filter_map(CancellationReason::code)
        .filter(|code| *code != "None")
        .collect();
    if codes.contains(&"TransactionConflict") {
        return StoreError::Contention;
    }
    if codes
        .iter()
        .any(|code| matches!(*code, "ThrottlingError" | "ProvisionedThroughputExceeded"))
    {
        return StoreError::Unavailable(format!(
            "dynamodb transaction cancelled: {}",
            codes.join(", ")
        ));
    }
    StoreError::Internal(format!(
        "dynamodb transaction cancelled: {}",
        if codes.is_empty() {
            "no reason given".to_owned()
        } else {
            codes.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(codes: &[&str]) -> Vec<CancellationReason> {
        codes
            .iter()
            .map(|code| CancellationReason::builder().code(*code).build())
            .collect()
    }

    fn guard_writes(count: usize) -> Vec<Write> {
        use crate::domain::{Environment, InstanceId, TenantId};
        (0..count)
            .map(|i| {
                Write::ClaimGuard(crate::store::Guard {
                    tenant: TenantId::parse(&format!("tenant{i}")).unwrap(),
                    environment: Environment::Dev,
                    instance: InstanceId::parse("wp").unwrap(),
                })
            })
            .collect()
    }

    #[test]
    fn first_failed_condition_wins_over_other_reasons() {
        let writes = guard_writes(3);
        let error = cancellation_error(
            &reasons(&[
                "TransactionConflict",
                "ConditionalCheckFailed",
                "ConditionalCheckFailed",
            ]),
            &writes,
        );
        assert!(
            matches!(error, StoreError::Conflict { index: 1, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn other_cancellations() {
        let writes = guard_writes(2);
        let contention = cancellation_error(&reasons(&["None", "TransactionConflict"]), &writes);
        assert!(matches!(contention, StoreError::Contention));
        let throttled = cancellation_error(&reasons(&["ThrottlingError", "None"]), &writes);
        assert!(matches!(throttled, StoreError::Unavailable(_)));
        let invalid = cancellation_error(&reasons(&["ValidationError", "None"]), &writes);
        assert!(matches!(invalid, StoreError::Internal(_)));
    }
}
