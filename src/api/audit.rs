//! ListAuditEvents: the audit trail, newest first.

use crate::auth::Principal;
use crate::domain::ids::parse_tenant_parent;
use crate::domain::{AuditEvent, Timestamp, Violations};
use crate::proto::v1;
use crate::store::{AuditCursor, AuditQuery};

use super::Api;
use super::convert;
use super::error::{ApiError, ApiResult};

/// How long an audit event is kept unless configured (`audit_retention_days`).
pub const DEFAULT_RETENTION_DAYS: u64 = 365;

/// The filters ListAuditEvents understands: `principal`, `method` (the full path or the
/// last segment), `target` and `outcome`, each `= value` (optionally quoted), joined with
/// `AND`.
#[derive(Debug, Default, PartialEq)]
struct AuditFilter {
    principal: Option<String>,
    method: Option<String>,
    target: Option<String>,
    outcome: Option<String>,
}

fn parse_filter(filter: &str) -> Result<AuditFilter, String> {
    let mut parsed = AuditFilter::default();
    for (key, value) in super::operations::filter_terms(filter)? {
        let value = value.to_owned();
        if value.is_empty() {
            return Err(format!("{key} needs a value"));
        }
        match key {
            "principal" => parsed.principal = Some(value),
            "method" => {
                parsed.method = Some(if value.starts_with('/') {
                    value
                } else {
                    crate::auth::authz::RULES
                        .iter()
                        .find(|rule| crate::auth::authz::short_name(rule.method) == value)
                        .map(|rule| rule.method.to_owned())
                        .ok_or_else(|| format!("unknown method {value:?}"))?
                });
            }
            "target" => parsed.target = Some(value),
            "outcome" => parsed.outcome = Some(value.to_ascii_uppercase()),
            other => {
                return Err(format!(
                    "unknown filter field {other:?} (supported: principal, method, target, outcome)"
                ));
            }
        }
    }
    Ok(parsed)
}

pub fn audit_event_to_proto(event: &AuditEvent) -> v1::AuditEvent {
    v1::AuditEvent {
        id: event.id.clone(),
        event_time: Some(convert::timestamp(event.time)),
        principal: event.principal.clone(),
        method: event.method.clone(),
        target: event.target.clone(),
        tenant: event
            .tenant
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        request_id: event.request_id.clone(),
        outcome: event.outcome.clone(),
        operation: event.operation.clone().unwrap_or_default(),
    }
}

impl Api {
    /// The caller's view of the trail: a principal limited to one tenant sees that
    /// tenant's events only, and another tenant as `parent` lists nothing (as a tenant
    /// without events would).
    pub async fn list_audit_events(
        &self,
        request: v1::ListAuditEventsRequest,
        principal: &Principal,
    ) -> ApiResult<v1::ListAuditEventsResponse> {
        let mut violations = Violations::new();
        let parent = violations
            .check("parent", parse_tenant_parent(&request.parent, true))
            .flatten();
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
        let query = format!("audit|{}|{}", request.parent, request.filter.trim());
        let after: Option<AuditCursor> = self.page_cursor(&query, &request.page_token)?;
        let tenant = match (parent, &principal.tenant) {
            (Some(parent), _) if !principal.sees_tenant(&parent) => {
                return Ok(v1::ListAuditEventsResponse::default());
            }
            (Some(parent), _) => Some(parent),
            (None, own) => own.clone(),
        };
        let page = self
            .store
            .list_audit_events(&AuditQuery {
                tenant,
                principal: filter.principal,
                method: filter.method,
                target: filter.target,
                outcome: filter.outcome,
                now: Timestamp::now(),
                after,
                limit: page_size,
            })
            .await?;
        Ok(v1::ListAuditEventsResponse {
            audit_events: page.items.iter().map(audit_event_to_proto).collect(),
            next_page_token: page
                .next
                .map(|cursor| self.tokens.encode(&query, &cursor))
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(parse_filter(" ").unwrap(), AuditFilter::default());
        let parsed = parse_filter(
            "principal = \"token:ci\" AND method = DeleteInstance AND outcome=not_found",
        )
        .unwrap();
        assert_eq!(parsed.principal.as_deref(), Some("token:ci"));
        assert_eq!(
            parsed.method.as_deref(),
            Some("/bbws.instance.v1.InstanceService/DeleteInstance")
        );
        assert_eq!(parsed.outcome.as_deref(), Some("NOT_FOUND"));
        for bad in ["who = x", "method = Nope", "target", "principal = \"\""] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
