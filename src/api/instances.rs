//! `bbws.instance.v1.InstanceService`.

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::domain::ids::parse_tenant_parent;
use crate::domain::{
    Instance, InstanceId, InstanceName, InstanceSpec, Operation, OperationId, RequestId, TenantId,
    Timestamp, Verb, Violations,
};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;
use crate::proto::v1::instance_service_server::InstanceService;
use crate::store::{
    DomainClaim, Guard, InstanceCursor, InstanceQuery, RequestRecord, StoreError, Write, WriteKind,
};

use super::Api;
use super::authz::Target;
use super::convert::{self, parse_enum};
use super::error::{ApiError, ApiResult, reason};
use super::streams::RpcStream;
use crate::auth::Principal;
use crate::auth::authz::method;

/// A parsed, valid CreateInstance request.
struct CreateInstance {
    tenant: TenantId,
    requested_id: Option<InstanceId>,
    spec: InstanceSpec,
    request_id: Option<RequestId>,
}

impl CreateInstance {
    /// Identifies the request's payload, so a replayed `request_id` can be checked against
    /// the original (AIP-155).
    fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(&(&self.tenant, &self.requested_id, &self.spec))
            .expect("domain types serialise");
        hex::encode(Sha256::digest(canonical))
    }
}

fn parse_request_id(raw: &str, violations: &mut Violations) -> Option<RequestId> {
    if raw.is_empty() {
        return None;
    }
    violations.check("request_id", RequestId::parse(raw))
}

fn parse_create(api: &Api, request: &v1::CreateInstanceRequest) -> ApiResult<CreateInstance> {
    let mut violations = Violations::new();
    let tenant = violations
        .check("parent", parse_tenant_parent(&request.parent, false))
        .flatten();
    let requested_id = if request.instance_id.is_empty() {
        None
    } else {
        violations.check("instance_id", InstanceId::parse(&request.instance_id))
    };
    let request_id = parse_request_id(&request.request_id, &mut violations);
    let spec = match &request.instance {
        None => {
            violations.add("instance", "is required");
            None
        }
        Some(instance) => {
            let input = convert::spec_input(instance, "instance", &mut violations);
            let bounds = input.environment.map_or(api.settings.scale_bounds, |env| {
                api.settings.scale_bounds_for(env)
            });
            let domain_rules = input
                .environment
                .map_or_else(Default::default, |env| api.settings.domain_rules_for(env));
            match InstanceSpec::parse_with_domains(input, bounds, &domain_rules) {
                Ok(spec) => match api.settings.images.refusal(&spec.wordpress_image) {
                    Some(why) => {
                        violations.add("instance.wordpress_image", why);
                        None
                    }
                    None => Some(spec),
                },
                Err(errors) => {
                    violations.extend_prefixed("instance", errors);
                    None
                }
            }
        }
    };
    match (tenant, spec) {
        (Some(tenant), Some(spec)) if violations.is_empty() => Ok(CreateInstance {
            tenant,
            requested_id,
            spec,
            request_id,
        }),
        _ => Err(ApiError::Invalid(violations)),
    }
}

fn parse_instance_name(raw: &str) -> ApiResult<InstanceName> {
    InstanceName::parse(raw).map_err(|e| ApiError::invalid("name", e.to_string()))
}

impl Api {
    pub(crate) async fn replay(
        &self,
        record: &RequestRecord,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        if record.fingerprint != fingerprint {
            let mut violations = Violations::new();
            violations.add(
                "request_id",
                "was already used for a different request; use a new request_id",
            );
            return Err(ApiError::InvalidWithReason {
                reason: reason::REQUEST_ID_REUSED,
                violations,
            });
        }
        let operation = self
            .store
            .get_operation(&record.operation)
            .await?
            .ok_or_else(|| {
                ApiError::Internal(format!(
                    "request {} names a missing operation",
                    record.request_id
                ))
            })?;
        self.render_operation(&operation).await
    }

    /// The operation as a client sees it; a completed one carries its target's current state.
    pub async fn render_operation(&self, operation: &Operation) -> ApiResult<lro::Operation> {
        let target = if operation.status.is_done() {
            self.store.get_instance(&operation.target).await?
        } else {
            None
        };
        let mut rendered = convert::operation_to_proto(operation, target.as_ref());
        if operation.verb == crate::domain::Verb::Backup
            && operation.status == crate::domain::OperationStatus::Completed
            && let Some(name) = operation.params["backup"].as_str()
            && let Ok(name) = crate::domain::BackupName::parse(name)
            && let Some(backup) = self.store.get_backup(&name).await?
        {
            rendered.result = Some(lro::operation::Result::Response(convert::pack(
                &convert::backup_to_proto(&backup),
            )));
        }
        Ok(rendered)
    }

    pub(crate) fn tenant_environment_taken(guard: &Guard) -> ApiError {
        let existing = InstanceName::new(guard.tenant.clone(), guard.instance.clone());
        ApiError::AlreadyExists {
            reason: reason::TENANT_ENVIRONMENT_TAKEN,
            message: format!(
                "tenant {} already has an instance in {}: {existing}",
                guard.tenant, guard.environment
            ),
            metadata: vec![
                ("tenant", guard.tenant.to_string()),
                ("environment", guard.environment.to_string()),
                ("instance", existing.to_string()),
            ],
        }
    }

    /// A custom domain another instance holds. The holder is not named: it may be another
    /// tenant's.
    pub(crate) fn domain_taken(domain: &str) -> ApiError {
        ApiError::AlreadyExists {
            reason: crate::domain::operation::failure_reason::DOMAIN_TAKEN,
            message: format!("the custom domain {domain} is already used by another instance"),
            metadata: vec![("domain", domain.to_owned())],
        }
    }

    /// Claims of `domains` for `owner`: ALREADY_EXISTS (DOMAIN_TAKEN) for the first one that
    /// another instance holds now. The claims go in the transaction that starts the
    /// operation, whose precondition settles a race with another request.
    pub(crate) async fn domain_claims(
        &self,
        domains: &[String],
        owner: &InstanceName,
    ) -> ApiResult<Vec<Write>> {
        let mut writes = Vec::with_capacity(domains.len());
        for domain in domains {
            if let Some(claim) = self.store.get_domain_claim(domain).await?
                && &claim.owner != owner
            {
                return Err(Self::domain_taken(domain));
            }
            writes.push(Write::ClaimDomain(DomainClaim {
                domain: domain.clone(),
                owner: owner.clone(),
            }));
        }
        Ok(writes)
    }

    fn instance_exists(name: &InstanceName) -> ApiError {
        ApiError::AlreadyExists {
            reason: reason::INSTANCE_ALREADY_EXISTS,
            message: format!("{name} already exists; choose another instance_id"),
            metadata: vec![("instance", name.to_string())],
        }
    }

    pub async fn create_instance(
        &self,
        request: v1::CreateInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let create = parse_create(self, &request)?;
        let fingerprint = create.fingerprint();
        self.idempotent(
            create.request_id.as_ref(),
            &fingerprint,
            self.create_instance_once(&create, &fingerprint),
        )
        .await
    }

    async fn create_instance_once(
        &self,
        create: &CreateInstance,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let now = Timestamp::now();
        let environment = create.spec.environment;
        self.check_environment(environment)?;
        if let Some(guard) = self.store.get_guard(&create.tenant, environment).await? {
            return Err(Self::tenant_environment_taken(&guard));
        }
        let instance_id = create
            .requested_id
            .clone()
            .unwrap_or_else(InstanceId::generate);
        let name = InstanceName::new(create.tenant.clone(), instance_id.clone());
        if self.store.get_instance(&name).await?.is_some() {
            return Err(Self::instance_exists(&name));
        }

        let claims = self
            .domain_claims(&create.spec.custom_domains, &name)
            .await?;
        let mut operation = super::new_operation(
            Verb::Create,
            name.clone(),
            Vec::new(),
            create.request_id.clone(),
            now,
        );
        let event = operation.next_event(now, None, "operation created");
        let instance =
            Instance::new_pending(name.clone(), create.spec.clone(), operation.id.clone(), now);
        let guard = Guard {
            tenant: create.tenant.clone(),
            environment,
            instance: instance_id,
        };
        let mut writes = vec![
            Write::CreateInstance(instance),
            Write::ClaimGuard(guard),
            Write::CreateOperation(operation.clone()),
            Write::AppendEvent(event),
        ];
        let claimed: Vec<String> = create.spec.custom_domains.clone();
        let first_claim = writes.len();
        writes.extend(claims);
        writes.extend(self.request_write(create.request_id.as_ref(), fingerprint, &operation, now));
        match self.store.commit(writes).await {
            Ok(()) => {
                self.wake.notify_one();
                tracing::info!(instance = %name, operation = %operation.id, environment = %environment, "instance creation accepted");
                operation.version = 1;
                Ok(convert::operation_to_proto(&operation, None))
            }
            // Lost a race: report what won, so the answer is the same as if we had been second.
            Err(StoreError::Conflict {
                kind: WriteKind::ClaimGuard,
                ..
            }) => match self.store.get_guard(&create.tenant, environment).await? {
                Some(guard) => Err(Self::tenant_environment_taken(&guard)),
                None => Err(StoreError::Contention.into()),
            },
            Err(StoreError::Conflict {
                kind: WriteKind::CreateInstance,
                ..
            }) => Err(Self::instance_exists(&name)),
            // Another instance claimed one of the domains since they were checked.
            Err(StoreError::Conflict {
                kind: WriteKind::ClaimDomain,
                index,
            }) => match index.checked_sub(first_claim).and_then(|i| claimed.get(i)) {
                Some(domain) => Err(Self::domain_taken(domain)),
                None => Err(StoreError::Contention.into()),
            },
            Err(StoreError::Conflict {
                kind: WriteKind::PutRequest,
                ..
            }) => {
                let request_id = create
                    .request_id
                    .as_ref()
                    .expect("a request write implies an id");
                match self.store.get_request(request_id, now).await? {
                    Some(record) => self.replay(&record, fingerprint).await,
                    None => Err(StoreError::Contention.into()),
                }
            }
            Err(other) => Err(other.into()),
        }
    }

    pub async fn get_instance(&self, request: v1::GetInstanceRequest) -> ApiResult<v1::Instance> {
        let name = parse_instance_name(&request.name)?;
        let instance = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        Ok(convert::instance_to_proto(&instance))
    }

    /// A principal limited to one tenant lists that tenant's instances for `tenants/-`,
    /// and nothing for another tenant (as for a tenant without instances).
    pub async fn list_instances(
        &self,
        request: v1::ListInstancesRequest,
        principal: &Principal,
    ) -> ApiResult<v1::ListInstancesResponse> {
        let mut violations = Violations::new();
        let tenant = violations
            .check("parent", parse_tenant_parent(&request.parent, true))
            .flatten();
        let environment = parse_enum(
            request.environment,
            "environment",
            &mut violations,
            convert::environment_from_proto,
        );
        let state = parse_enum(
            request.state,
            "state",
            &mut violations,
            convert::state_from_proto,
        );
        let page_size = match self.page_size(request.page_size) {
            Ok(size) => size,
            Err(ApiError::Invalid(more)) => {
                violations.append(more);
                0
            }
            Err(other) => return Err(other),
        };
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations));
        }
        // The query a page token is bound to: the parent and every filter.
        let query = format!(
            "instances|{}|{}|{}",
            request.parent,
            environment.map(|e| e.as_str()).unwrap_or("*"),
            state.map(|s| s.as_str()).unwrap_or("*")
        );
        let after: Option<InstanceCursor> = self.page_cursor(&query, &request.page_token)?;
        let tenant = match (tenant, &principal.tenant) {
            (Some(tenant), _) if !principal.sees_tenant(&tenant) => {
                return Ok(v1::ListInstancesResponse::default());
            }
            (Some(tenant), _) => Some(tenant),
            (None, own) => own.clone(),
        };
        let page = self
            .store
            .list_instances(&InstanceQuery {
                tenant,
                environment,
                state,
                after,
                limit: page_size,
            })
            .await?;
        Ok(v1::ListInstancesResponse {
            instances: page.items.iter().map(convert::instance_to_proto).collect(),
            next_page_token: page
                .next
                .map(|cursor| self.tokens.encode(&query, &cursor))
                .unwrap_or_default(),
        })
    }

    pub async fn get_operation_by_name(&self, name: &str) -> ApiResult<Operation> {
        let id =
            OperationId::from_name(name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
        self.store
            .get_operation(&id)
            .await?
            .ok_or_else(|| ApiError::operation_not_found(name))
    }
}

#[tonic::async_trait]
impl InstanceService for Api {
    async fn create_instance(
        &self,
        request: Request<v1::CreateInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::CREATE_INSTANCE,
            |r| Target::Tenant(r.parent.clone()),
            |r, _| Api::create_instance(self, r),
        )
        .await
    }

    async fn get_instance(
        &self,
        request: Request<v1::GetInstanceRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.read(
            request,
            method::GET_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::get_instance(self, r),
        )
        .await
    }

    async fn list_instances(
        &self,
        request: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        self.read(
            request,
            method::LIST_INSTANCES,
            |r| Target::List(r.parent.clone()),
            |r, principal| async move { Api::list_instances(self, r, &principal).await },
        )
        .await
    }

    async fn update_instance(
        &self,
        request: Request<v1::UpdateInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::UPDATE_INSTANCE,
            |r| {
                Target::Instance(
                    r.instance
                        .as_ref()
                        .map(|i| i.name.clone())
                        .unwrap_or_default(),
                )
            },
            |r, _| Api::update_instance(self, r),
        )
        .await
    }

    async fn delete_instance(
        &self,
        request: Request<v1::DeleteInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::DELETE_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::delete_instance(self, r),
        )
        .await
    }

    async fn suspend_instance(
        &self,
        request: Request<v1::SuspendInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::SUSPEND_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::suspend_instance(self, r),
        )
        .await
    }

    async fn resume_instance(
        &self,
        request: Request<v1::ResumeInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::RESUME_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::resume_instance(self, r),
        )
        .await
    }

    async fn restart_instance(
        &self,
        request: Request<v1::RestartInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::RESTART_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::restart_instance(self, r),
        )
        .await
    }

    async fn scale_instance(
        &self,
        request: Request<v1::ScaleInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::SCALE_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::scale_instance(self, r),
        )
        .await
    }

    async fn check_instance_health(
        &self,
        request: Request<v1::CheckInstanceHealthRequest>,
    ) -> Result<Response<v1::HealthReport>, Status> {
        self.read(
            request,
            method::CHECK_INSTANCE_HEALTH,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::check_instance_health(self, r),
        )
        .await
    }

    async fn get_resource_usage(
        &self,
        request: Request<v1::GetResourceUsageRequest>,
    ) -> Result<Response<v1::ResourceUsage>, Status> {
        self.read(
            request,
            method::GET_RESOURCE_USAGE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::get_resource_usage(self, r),
        )
        .await
    }

    async fn create_backup(
        &self,
        request: Request<v1::CreateBackupRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::CREATE_BACKUP,
            |r| Target::Instance(r.parent.clone()),
            |r, _| Api::create_backup(self, r),
        )
        .await
    }

    async fn restore_instance(
        &self,
        request: Request<v1::RestoreInstanceRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::RESTORE_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::restore_instance(self, r),
        )
        .await
    }

    async fn get_backup(
        &self,
        request: Request<v1::GetBackupRequest>,
    ) -> Result<Response<v1::Backup>, Status> {
        self.read(
            request,
            method::GET_BACKUP,
            |r| Target::Backup(r.name.clone()),
            |r, _| Api::get_backup(self, r),
        )
        .await
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        self.read(
            request,
            method::LIST_BACKUPS,
            |r| Target::Instance(r.parent.clone()),
            |r, _| Api::list_backups(self, r),
        )
        .await
    }

    async fn delete_backup(
        &self,
        request: Request<v1::DeleteBackupRequest>,
    ) -> Result<Response<()>, Status> {
        self.mutate(
            request,
            method::DELETE_BACKUP,
            |r| Target::Backup(r.name.clone()),
            |r, _| Api::delete_backup(self, r),
        )
        .await
    }

    async fn query_logs(
        &self,
        request: Request<v1::QueryLogsRequest>,
    ) -> Result<Response<v1::QueryLogsResponse>, Status> {
        self.read(
            request,
            method::QUERY_LOGS,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::query_logs(self, r),
        )
        .await
    }

    type TailLogsStream = RpcStream<v1::TailLogsResponse>;

    async fn tail_logs(
        &self,
        request: Request<v1::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        self.read(
            request,
            method::TAIL_LOGS,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::tail_logs(self, r),
        )
        .await
    }

    type WatchOperationStream = RpcStream<v1::OperationEvent>;

    async fn watch_operation(
        &self,
        request: Request<v1::WatchOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        self.read(
            request,
            method::WATCH_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |r, _| Api::watch_operation(self, r),
        )
        .await
    }

    type WatchInstanceStream = RpcStream<v1::WatchInstanceResponse>;

    async fn watch_instance(
        &self,
        request: Request<v1::WatchInstanceRequest>,
    ) -> Result<Response<Self::WatchInstanceStream>, Status> {
        self.read(
            request,
            method::WATCH_INSTANCE,
            |r| Target::Instance(r.name.clone()),
            |r, _| Api::watch_instance(self, r),
        )
        .await
    }

    async fn retry_operation(
        &self,
        request: Request<v1::RetryOperationRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        self.mutate(
            request,
            method::RETRY_OPERATION,
            |r| Target::Operation(r.name.clone()),
            |r, _| Api::retry_operation(self, r),
        )
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<v1::ListAuditEventsRequest>,
    ) -> Result<Response<v1::ListAuditEventsResponse>, Status> {
        self.read(
            request,
            method::LIST_AUDIT_EVENTS,
            |r| Target::List(r.parent.clone()),
            |r, principal| async move { Api::list_audit_events(self, r, &principal).await },
        )
        .await
    }
}
