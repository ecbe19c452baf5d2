//! Authorisation of every call, and the audit trail of every mutating one.
//!
//! Each RPC of the two services goes through [`Api::read`] or [`Api::mutate`] with the
//! target it names. In this order:
//! 1. no principal → UNAUTHENTICATED;
//! 2. the target's tenant (from its name, or for `operations/{id}` from the stored
//!    operation): a principal limited to another tenant gets the NOT_FOUND a missing
//!    resource of that kind gets — same code, message and ErrorInfo — whether or not it
//!    exists (for an operation, a missing one is NOT_FOUND here already, for everyone);
//! 3. the role the authorisation table ([`crate::auth::authz`]) asks for → PERMISSION_DENIED
//!    (reason ROLE_REQUIRED);
//! 4. the handler, which validates and may still answer NOT_FOUND for a missing resource.
//!
//! A malformed name has no tenant: step 2 passes and the handler answers INVALID_ARGUMENT.
//! Lists are filtered by their handlers with the principal they are given.
//!
//! [`Api::mutate`] records an [`AuditEvent`] for every call, allowed or refused, once its
//! answer is known. Recording is best effort: a store failure is logged and does not
//! change the answer (the change itself is already durable).

use std::future::Future;

use tonic::{Request, Response, Status};

use crate::auth::{self, Principal, authz};
use crate::domain::audit::audit_text;
use crate::domain::ids::parse_tenant_parent;
use crate::domain::{AuditEvent, BackupName, InstanceName, OperationId, TenantId, Timestamp};
use crate::proto::google_longrunning as lro;

use super::Api;
use super::error::{ApiError, ApiResult, code_name};

/// What a call names, for its tenant.
#[derive(Debug, Clone)]
pub enum Target {
    /// `tenants/{tenant}` as a parent where something is created.
    Tenant(String),
    /// `tenants/{tenant}/instances/{instance}`.
    Instance(String),
    /// `tenants/{tenant}/instances/{instance}/backups/{backup}`.
    Backup(String),
    /// `operations/{id}`: its tenant is its target instance's.
    Operation(String),
    /// A list whose handler filters by the principal (`parent` for the audit trail).
    List(String),
}

impl Target {
    fn raw(&self) -> &str {
        match self {
            Target::Tenant(raw)
            | Target::Instance(raw)
            | Target::Backup(raw)
            | Target::Operation(raw)
            | Target::List(raw) => raw,
        }
    }
}

/// One call being authorised: its method, principal and request id.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    pub principal: Option<Principal>,
    pub request_id: String,
}

impl Call {
    pub fn of<T>(request: &Request<T>, method: &'static str) -> Self {
        Self {
            method,
            principal: auth::principal(request).cloned(),
            request_id: crate::request_id::of(request).unwrap_or_default(),
        }
    }
}

/// The operation a mutating call's answer names, for its audit event.
pub trait AuditedResponse {
    fn operation(&self) -> Option<String>;
}

impl AuditedResponse for lro::Operation {
    fn operation(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

impl AuditedResponse for () {
    fn operation(&self) -> Option<String> {
        None
    }
}

impl Api {
    /// The tenant `target` belongs to, and whether it exists as far as this step can tell
    /// (`false` only for an operation that is not stored).
    async fn target_tenant(&self, target: &Target) -> ApiResult<(Option<TenantId>, bool)> {
        Ok(match target {
            Target::Tenant(raw) | Target::List(raw) => {
                (parse_tenant_parent(raw, true).ok().flatten(), true)
            }
            Target::Instance(raw) => (InstanceName::parse(raw).ok().map(|n| n.tenant), true),
            Target::Backup(raw) => (BackupName::parse(raw).ok().map(|n| n.instance.tenant), true),
            Target::Operation(raw) => match OperationId::from_name(raw) {
                Ok(id) => match self.store.get_operation(&id).await? {
                    Some(operation) => (Some(operation.target.tenant), true),
                    None => (None, false),
                },
                Err(_) => (None, true),
            },
        })
    }

    /// Steps 1–3 of the module docs. Returns the target's tenant (for the audit trail,
    /// also when refused) and the principal or the refusal.
    pub(crate) async fn authorize(
        &self,
        call: &Call,
        target: &Target,
    ) -> (Option<TenantId>, ApiResult<Principal>) {
        let Some(principal) = call.principal.clone() else {
            return (None, Err(ApiError::Unauthenticated));
        };
        let Some(rule) = authz::rule(call.method) else {
            return (
                None,
                Err(ApiError::Internal(format!(
                    "{} is not in the authorisation table",
                    call.method
                ))),
            );
        };
        let (tenant, exists) = match self.target_tenant(target).await {
            Ok(found) => found,
            Err(error) => return (None, Err(error)),
        };
        let hidden = tenant
            .as_ref()
            .is_some_and(|tenant| !principal.sees_tenant(tenant));
        if !exists || (hidden && !matches!(target, Target::List(_))) {
            return (tenant, Err(not_found(target)));
        }
        if !principal.has_role(rule.role) {
            return (
                tenant,
                Err(ApiError::PermissionDenied {
                    required: rule.role,
                    method: rule.method,
                }),
            );
        }
        (tenant, Ok(principal))
    }

    /// A call that changes nothing: authorised, then `body` with the principal.
    pub(crate) async fn read<T, R, F, Fut>(
        &self,
        request: Request<T>,
        method: &'static str,
        target: impl FnOnce(&T) -> Target,
        body: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(T, Principal) -> Fut,
        Fut: Future<Output = ApiResult<R>>,
    {
        let call = Call::of(&request, method);
        let target = target(request.get_ref());
        let principal = self.authorize(&call, &target).await.1?;
        Ok(Response::new(body(request.into_inner(), principal).await?))
    }

    /// A call that changes something: authorised, then `body`, and in either case an
    /// audit event with the outcome.
    pub(crate) async fn mutate<T, R, F, Fut>(
        &self,
        request: Request<T>,
        method: &'static str,
        target: impl FnOnce(&T) -> Target,
        body: F,
    ) -> Result<Response<R>, Status>
    where
        R: AuditedResponse,
        F: FnOnce(T, Principal) -> Fut,
        Fut: Future<Output = ApiResult<R>>,
    {
        let call = Call::of(&request, method);
        let target = target(request.get_ref());
        let (tenant, admitted) = self.authorize(&call, &target).await;
        let result: Result<R, Status> = match admitted {
            Ok(principal) => body(request.into_inner(), principal)
                .await
                .map_err(Status::from),
            Err(refused) => Err(Status::from(refused)),
        };
        let (outcome, operation) = match &result {
            Ok(response) => (tonic::Code::Ok, response.operation()),
            Err(status) => (status.code(), None),
        };
        self.record_audit(&call, &target, tenant, outcome, operation)
            .await;
        result.map(Response::new)
    }

    async fn record_audit(
        &self,
        call: &Call,
        target: &Target,
        tenant: Option<TenantId>,
        outcome: tonic::Code,
        operation: Option<String>,
    ) {
        let time = Timestamp::now();
        let retention =
            i64::try_from(self.settings.audit_retention.as_millis()).unwrap_or(i64::MAX);
        let event = AuditEvent {
            id: uuid::Uuid::new_v4().to_string(),
            time,
            tenant,
            principal: call
                .principal
                .as_ref()
                .map_or_else(|| "unauthenticated".to_owned(), |p| p.subject.clone()),
            method: call.method.to_owned(),
            target: audit_text(target.raw()),
            request_id: audit_text(&call.request_id),
            outcome: code_name(outcome).to_owned(),
            operation,
            expires_at: time.plus_millis(retention),
        };
        if let Err(error) = self.store.record_audit_event(&event).await {
            tracing::error!(%error, method = call.method, outcome = %event.outcome, "cannot record the audit event");
        }
    }
}

/// The NOT_FOUND a missing resource named like `target` gets from its handler.
fn not_found(target: &Target) -> ApiError {
    match target {
        Target::Tenant(raw) | Target::List(raw) => ApiError::tenant_not_found(raw.clone()),
        Target::Instance(raw) => match InstanceName::parse(raw) {
            Ok(name) => ApiError::instance_not_found(name.to_string()),
            Err(_) => ApiError::instance_not_found(raw.clone()),
        },
        Target::Backup(raw) => match BackupName::parse(raw) {
            Ok(name) => ApiError::backup_not_found(name.to_string()),
            Err(_) => ApiError::backup_not_found(raw.clone()),
        },
        Target::Operation(raw) => ApiError::operation_not_found(raw.clone()),
    }
}
