//! `google.longrunning.Operations`, so generic tooling can follow our operations.

use tonic::{Request, Response, Status};

use crate::domain::{InstanceName, OperationStatus, Violations};
use crate::proto::google_longrunning as lro;
use crate::proto::google_longrunning::operations_server::Operations;
use crate::store::{OperationCursor, OperationQuery};

use super::Api;
use super::authz::Target;
use super::error::{ApiError, ApiResult};
use crate::auth::Principal;
use crate::auth::authz::method;

/// The filters ListOperations understands: `target = "tenants/a/instances/b"`,
/// `status = FAILED`, `done = true`, joined with `AND`.
#[derive(Debug, Default, PartialEq)]
struct OperationFilter {
    target: Option<InstanceName>,
    status: Option<OperationStatus>,
    done: Option<bool>,
}

fn parse_filter(filter: &str) -> Result<OperationFilter, String> {
    let mut parsed = OperationFilter::default();
    for (key, unquoted) in filter_terms(filter)? {
        match key {
            "target" => {
                parsed.target =
                    Some(InstanceName::parse(unquoted).map_err(|e| format!("target {e}"))?);
            }
            "status" => {
                parsed.status = Some(OperationStatus::parse(unquoted).ok_or_else(|| {
                    format!("status must be one of PENDING, IN_PROGRESS, COMPLETED, FAILED, STUCK, CANCELLED (got {unquoted:?})")
                })?);
            }
            "done" => {
                parsed.done = Some(match unquoted {
                    "true" => true,
                    "false" => false,
                    other => return Err(format!("done must be true or false (got {other:?})")),
                });
            }
            other => {
                return Err(format!(
                    "unknown filter field {other:?} (supported: target, status, done)"
                ));
            }
        }
    }
    Ok(parsed)
}

/// The terms of an AIP-160-like filter of the simple kind the list methods take:
/// `key = value` (the value optionally in double quotes), joined with `AND`; each as
/// (key, unquoted value), trimmed.
pub(crate) fn filter_terms(filter: &str) -> Result<Vec<(&str, &str)>, String> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    filter
        .split(" AND ")
        .map(|term| {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| format!("term {:?} is not of the form key = value", term.trim()))?;
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Ok((key.trim(), unquoted))
        })
        .collect()
}

impl Api {
    /// A principal limited to one tenant lists the operations on that tenant's instances.
    async fn list_operations(
        &self,
        request: lro::ListOperationsRequest,
        principal: &Principal,
    ) -> ApiResult<lro::ListOperationsResponse> {
        let mut violations = Violations::new();
        if !(request.name.is_empty() || request.name == "operations") {
            violations.add("name", "must be empty or \"operations\"");
        }
        let filter = violations.check("filter", parse_filter(&request.filter));
        let page_size = match self.page_size(request.page_size) {
            Ok(size) => size,
            Err(ApiError::Invalid(more)) => {
                violations.append(more);
                0
            }
            Err(other) => return Err(other),
        };
        let filter = match filter {
            Some(filter) if violations.is_empty() => filter,
            _ => return Err(ApiError::Invalid(violations)),
        };
        let query = format!("operations|{}", request.filter.trim());
        let after: Option<OperationCursor> = self.page_cursor(&query, &request.page_token)?;
        let page = self
            .store
            .list_operations(&OperationQuery {
                tenant: principal.tenant.clone(),
                target: filter.target,
                status: filter.status,
                done: filter.done,
                after,
                limit: page_size,
            })
            .await?;
        let mut operations = Vec::with_capacity(page.items.len());
        for operation in &page.items {
            operations.push(self.render_operation(operation).await?);
        }
        Ok(lro::ListOperationsResponse {
            operations,
            next_page_token: page
                .next
                .map(|cursor| self.tokens.encode(&query, &cursor))
                .unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl Operations for Api {
    async fn list_operations(
        &self,
        request: Request<lro::ListOperationsRequest>,
    ) -> Result<Response<lro::ListOperationsResponse>, Status> {
        self.read(
            request,
            method::LIST_OPERATIONS,
            |_| Target::List(String::new()),
            |r, principal| async move { Api::list_operations(self, r, &principal).await },
        )
        .await
    }

    async fn get_operation(
        &self,
        request: Request<lro::GetOperationRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.read(
            request,
            method::GET_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |r, _| async move {
                let operation = self.get_operation_by_name(&r.name).await?;
                self.render_operation(&operation).await
            },
        )
        .await
    }

    async fn delete_operation(
        &self,
        request: Request<lro::DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.mutate(
            request,
            method::DELETE_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |_, _| async {
                Err(ApiError::Unsupported {
                    rpc: "DeleteOperation",
                    why: "operations are the audit trail and are kept",
                })
            },
        )
        .await
    }

    async fn cancel_operation(
        &self,
        request: Request<lro::CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.mutate(
            request,
            method::CANCEL_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |r, _| async move { Api::cancel_operation(self, &r.name).await },
        )
        .await
    }

    async fn wait_operation(
        &self,
        request: Request<lro::WaitOperationRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.read(
            request,
            method::WAIT_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |r, _| Api::wait_operation(self, r),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(parse_filter("").unwrap(), OperationFilter::default());
        let parsed = parse_filter(
            "target = \"tenants/acme/instances/wp\" AND status = FAILED AND done=true",
        )
        .unwrap();
        assert_eq!(
            parsed.target.unwrap().to_string(),
            "tenants/acme/instances/wp"
        );
        assert_eq!(parsed.status, Some(OperationStatus::Failed));
        assert_eq!(parsed.done, Some(true));
        for bad in [
            "verb = create",
            "status = DONE",
            "done = maybe",
            "target = x",
            "status",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
