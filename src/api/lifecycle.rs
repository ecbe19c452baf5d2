//! Lifecycle RPCs that start, cancel or retry operations: DeleteInstance, RestartInstance,
//! ScaleInstance, SuspendInstance, ResumeInstance, CancelOperation, RetryOperation. Each
//! writes the operation and the instance change in one transaction and returns at once; a
//! workflow engine (in any replica) does the work.

use sha2::{Digest, Sha256};

use crate::domain::operation::StepStatus;
use crate::domain::spec::{check_desired_count, check_fargate_size};
use crate::domain::{
    Environment, Instance, InstanceName, InstanceState, Operation, OperationId, OperationStatus,
    RequestId, Timestamp, Verb, Violations,
};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;
use crate::store::{Guard, RequestRecord, StoreError, Write, WriteKind};
use crate::workflow::{resume, scale, suspend};

use super::error::{ApiError, ApiResult, reason};
use super::{Api, convert};

pub(super) fn fingerprint(parts: &impl serde::Serialize) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(parts).expect("serialisable"),
    ))
}

pub(super) fn busy(instance: &Instance) -> ApiError {
    let operation = instance
        .current_operation
        .as_ref()
        .map(|id| id.name())
        .unwrap_or_default();
    ApiError::Aborted {
        reason: reason::INSTANCE_BUSY,
        message: format!(
            "{} is busy with {operation}; wait for it to finish",
            instance.name
        ),
    }
}

pub(super) fn wrong_state(instance: &Instance, wanted: &str) -> ApiError {
    ApiError::FailedPrecondition {
        reason: reason::WRONG_STATE,
        message: format!("{} is {}; {wanted}", instance.name, instance.state),
        metadata: vec![("state", instance.state.to_string())],
    }
}

impl Api {
    /// The operation a replayed `request_id` made, or an error if it was made for another
    /// request; `None` when the id is new.
    pub(crate) async fn replayed(
        &self,
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<Option<lro::Operation>> {
        let Some(request_id) = request_id else {
            return Ok(None);
        };
        match self.store.get_request(request_id, Timestamp::now()).await? {
            Some(record) => self.replay(&record, fingerprint).await.map(Some),
            None => Ok(None),
        }
    }

    /// Runs a mutating request under its `request_id` (AIP-155): a known id is answered from
    /// its record, and when `body` fails, a concurrent request with the same id may be the
    /// reason (it won the commit, or changed what `body` read): if its record is there now,
    /// the answer is that request's operation (same payload) or REQUEST_ID_REUSED, as if
    /// this request had come second.
    pub(crate) async fn idempotent<F>(
        &self,
        request_id: Option<&RequestId>,
        fingerprint: &str,
        body: F,
    ) -> ApiResult<lro::Operation>
    where
        F: std::future::Future<Output = ApiResult<lro::Operation>>,
    {
        if let Some(operation) = self.replayed(request_id, fingerprint).await? {
            return Ok(operation);
        }
        let error = match body.await {
            Ok(operation) => return Ok(operation),
            Err(error) => error,
        };
        if request_id.is_none() || matches!(error, ApiError::Invalid(_)) {
            return Err(error);
        }
        // A transaction that lost to a concurrent one (CONCURRENT_MODIFICATION) may see the
        // winner's record only a moment later.
        let contended = matches!(
            error,
            ApiError::Aborted {
                reason: reason::CONCURRENT_MODIFICATION,
                ..
            }
        );
        let attempts = if contended { 4 } else { 1 };
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
            }
            if let Some(operation) = self.replayed(request_id, fingerprint).await? {
                return Ok(operation);
            }
        }
        Err(error)
    }

    pub(crate) fn request_write(
        &self,
        request_id: Option<&RequestId>,
        fingerprint: &str,
        operation: &Operation,
        now: Timestamp,
    ) -> Option<Write> {
        let ttl = i64::try_from(self.settings.idempotency_ttl_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX);
        request_id.map(|id| {
            Write::PutRequest(RequestRecord {
                request_id: id.clone(),
                fingerprint: fingerprint.to_owned(),
                operation: operation.id.clone(),
                created_at: now,
                expires_at: now.plus_millis(ttl),
            })
        })
    }

    /// Refuses environments this deployment cannot reach.
    pub(crate) fn check_environment(&self, environment: Environment) -> ApiResult<()> {
        let served = self.environments.as_ref().map(|served| {
            served
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(&environment)
        });
        match served {
            Some(false) => Err(ApiError::FailedPrecondition {
                reason: reason::ENVIRONMENT_UNAVAILABLE,
                message: format!("environment {environment} is not configured or not reachable"),
                metadata: vec![("environment", environment.to_string())],
            }),
            _ => Ok(()),
        }
    }

    pub(super) async fn is_busy(&self, instance: &Instance) -> ApiResult<bool> {
        let Some(id) = &instance.current_operation else {
            return Ok(false);
        };
        Ok(match self.store.get_operation(id).await? {
            Some(operation) => !operation.status.is_done(),
            None => false,
        })
    }

    pub(super) async fn commit_new_operation(
        &self,
        writes: Vec<Write>,
        request_id: Option<&RequestId>,
        fingerprint: &str,
        mut operation: Operation,
    ) -> ApiResult<lro::Operation> {
        let claims: Vec<Option<String>> = writes
            .iter()
            .map(|write| match write {
                Write::ClaimDomain(claim) => Some(claim.domain.clone()),
                _ => None,
            })
            .collect();
        match self.store.commit(writes).await {
            Ok(()) => {
                operation.version = 1;
                self.wake.notify_one();
                tracing::info!(operation = %operation.id, verb = %operation.verb, target = %operation.target, "operation accepted");
                Ok(convert::operation_to_proto(&operation, None))
            }
            Err(StoreError::Conflict {
                kind: WriteKind::PutRequest,
                ..
            }) => match self.replayed(request_id, fingerprint).await? {
                Some(operation) => Ok(operation),
                None => Err(StoreError::Contention.into()),
            },
            // Another instance claimed the domain since it was checked.
            Err(StoreError::Conflict {
                kind: WriteKind::ClaimDomain,
                index,
            }) => match claims.get(index).cloned().flatten() {
                Some(domain) => Err(Self::domain_taken(&domain)),
                None => Err(StoreError::Contention.into()),
            },
            Err(other) => Err(other.into()),
        }
    }

    pub async fn delete_instance(
        &self,
        request: v1::DeleteInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let request_id = optional_request_id(&mut violations, &request.request_id);
        let Some(name) = name.filter(|_| violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let fingerprint = fingerprint(&("delete", &name, request.skip_archive));
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.delete_instance_once(name, request, request_id.as_ref(), &fingerprint),
        )
        .await
    }

    async fn delete_instance_once(
        &self,
        name: InstanceName,
        request: v1::DeleteInstanceRequest,
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let request_id = request_id.cloned();
        let instance = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        if !request.etag.is_empty() && request.etag != instance.etag() {
            return Err(ApiError::Aborted {
                reason: reason::ETAG_MISMATCH,
                message: format!(
                    "etag {} does not match the current {}",
                    request.etag,
                    instance.etag()
                ),
            });
        }
        if self.is_busy(&instance).await? {
            return Err(busy(&instance));
        }
        if !instance
            .state
            .can_transition_to(InstanceState::PendingDeprovisioning)
        {
            return Err(wrong_state(
                &instance,
                "only ACTIVE, SUSPENDED or FAILED instances can be deleted",
            ));
        }
        self.check_environment(instance.spec.environment)?;
        let now = Timestamp::now();
        let mut operation = super::new_operation(
            Verb::Delete,
            name.clone(),
            Vec::new(),
            request_id.clone(),
            now,
        );
        operation.params = serde_json::json!({
            "skip_archive": request.skip_archive,
            "from_state": instance.state,
        });
        // The final archive is a regular Backup, written in the same transaction (a
        // create that rolled back cleanly left nothing to archive).
        let mut extra = Vec::new();
        if !request.skip_archive && !instance.released {
            let id = crate::domain::BackupId::parse(&format!("offboarding-{}", now.utc_compact()))
                .map_err(|e| ApiError::Internal(format!("offboarding backup id: {e}")))?;
            let backup_name = crate::domain::BackupName::new(name.clone(), id);
            let mut record = self
                .new_backup(
                    &instance,
                    backup_name.clone(),
                    crate::domain::BackupOrigin::Offboarding,
                    &operation,
                    now,
                )
                .await?;
            record.description = format!("final archive of {name}, made when it was deleted");
            operation.params["backup"] = serde_json::json!(backup_name.to_string());
            extra.push(Write::CreateBackup(record));
        }
        let event = operation.next_event(
            now,
            None,
            if request.skip_archive {
                "deprovisioning requested without archive"
            } else {
                "deprovisioning requested"
            },
        );
        let state = InstanceState::PendingDeprovisioning;
        self.start_operation(
            instance,
            state,
            operation,
            event,
            request_id.as_ref(),
            fingerprint,
            now,
            extra,
        )
        .await
    }

    pub async fn restart_instance(
        &self,
        request: v1::RestartInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        self.start_named(
            &request.name,
            &request.request_id,
            Verb::Restart,
            InstanceState::Active,
            "restart requested",
            serde_json::json!({}),
        )
        .await
    }

    pub async fn scale_instance(
        &self,
        request: v1::ScaleInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let request_id = optional_request_id(&mut violations, &request.request_id);
        // Checked against the instance's environment's bounds once it is read.
        let desired = (request.desired_count != 0).then_some(i64::from(request.desired_count));
        for (field, value) in [
            ("desired_count", request.desired_count),
            ("cpu", request.cpu),
            ("memory_mib", request.memory_mib),
        ] {
            if value < 0 {
                violations.add(
                    field,
                    format!("must be positive, or 0 to leave it unchanged (got {value})"),
                );
            }
        }
        if request.desired_count == 0 && request.cpu == 0 && request.memory_mib == 0 {
            violations.add(
                "desired_count",
                "nothing to change: set desired_count, cpu and/or memory_mib",
            );
        }
        let Some(name) = name.filter(|_| violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let (cpu, memory) = (request.cpu, request.memory_mib);
        let fingerprint = fingerprint(&("scale", &name, desired, cpu, memory));
        let bounds =
            |instance: &Instance| self.settings.scale_bounds_for(instance.spec.environment);
        let timeout = self.settings.rollout_timeout;
        let make_params = move |instance: &Instance| -> ApiResult<serde_json::Value> {
            let previous = scale::Previous::of(instance);
            let mut target = previous.size;
            if let Some(count) = desired {
                target.desired_count = check_desired_count(count, bounds(instance))
                    .map_err(|e| ApiError::invalid("desired_count", e))?;
            }
            if cpu != 0 || memory != 0 {
                let want_cpu = if cpu == 0 {
                    i64::from(target.cpu)
                } else {
                    i64::from(cpu)
                };
                let want_memory = if memory == 0 {
                    i64::from(target.memory_mib)
                } else {
                    i64::from(memory)
                };
                let field = if memory != 0 { "memory_mib" } else { "cpu" };
                (target.cpu, target.memory_mib) = check_fargate_size(want_cpu, want_memory)
                    .map_err(|e| ApiError::invalid(field, e))?;
            }
            if target == previous.size {
                return Err(ApiError::invalid(
                    "desired_count",
                    format!(
                        "nothing to change: the instance already runs {} tasks of {} CPU / {} MiB",
                        target.desired_count, target.cpu, target.memory_mib
                    ),
                ));
            }
            Ok(scale::params(target, &previous, Some(timeout)))
        };
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.start_on(
                name,
                Verb::Scale,
                &[InstanceState::Active],
                request_id.as_ref(),
                &fingerprint,
                "scale requested",
                make_params,
            ),
        )
        .await
    }

    pub async fn suspend_instance(
        &self,
        request: v1::SuspendInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let request_id = optional_request_id(&mut violations, &request.request_id);
        let reason = request.reason.trim().to_owned();
        if let Err(problem) = check_suspend_reason(&reason) {
            violations.add("reason", problem);
        }
        let Some(name) = name.filter(|_| violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let fingerprint = fingerprint(&("suspend", &name, &reason));
        let message = if reason.is_empty() {
            "suspend requested".to_owned()
        } else {
            format!("suspend requested: {reason}")
        };
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.start_on(
                name,
                Verb::Suspend,
                &[InstanceState::Active],
                request_id.as_ref(),
                &fingerprint,
                &message,
                |_| Ok(suspend::params(&reason)),
            ),
        )
        .await
    }

    pub async fn resume_instance(
        &self,
        request: v1::ResumeInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        self.start_named(
            &request.name,
            &request.request_id,
            Verb::Resume,
            InstanceState::Suspended,
            "resume requested",
            resume::params(Some(self.settings.rollout_timeout)),
        )
        .await
    }

    /// A request that names an instance (and an optional request id) and nothing else to
    /// check: starts `verb` on it from `from`, with `params`, under its request id.
    async fn start_named(
        &self,
        raw_name: &str,
        raw_request_id: &str,
        verb: Verb,
        from: InstanceState,
        message: &str,
        params: serde_json::Value,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(raw_name));
        let request_id = optional_request_id(&mut violations, raw_request_id);
        let Some(name) = name.filter(|_| violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let fingerprint = fingerprint(&(verb.as_str(), &name));
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.start_on(
                name,
                verb,
                &[from],
                request_id.as_ref(),
                &fingerprint,
                message,
                |_| Ok(params),
            ),
        )
        .await
    }

    /// Starts a `verb` operation on an instance that runs none and is in one of `from`: the
    /// instance moves to the workflow's running state in the transaction that writes the
    /// operation. `params` sees the instance as read and may refuse the request.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start_on(
        &self,
        name: InstanceName,
        verb: Verb,
        from: &[InstanceState],
        request_id: Option<&RequestId>,
        fingerprint: &str,
        message: &str,
        params: impl FnOnce(&Instance) -> ApiResult<serde_json::Value>,
    ) -> ApiResult<lro::Operation> {
        let workflow = crate::workflow::workflow_for(verb)
            .ok_or(ApiError::NotImplemented { rpc: "this verb" })?;
        let instance = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        if self.is_busy(&instance).await? {
            return Err(busy(&instance));
        }
        if !from.contains(&instance.state) {
            let states: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
            return Err(wrong_state(
                &instance,
                &format!("only {} instances can {verb}", states.join(" or ")),
            ));
        }
        self.check_environment(instance.spec.environment)?;
        let mut params = params(&instance)?;
        params["from_state"] = serde_json::json!(instance.state);
        let now = Timestamp::now();
        let mut operation = super::new_operation(verb, name, Vec::new(), request_id.cloned(), now);
        operation.params = params;
        let event = operation.next_event(now, None, message);
        let state = workflow.running_state_for(instance.state);
        self.start_operation(
            instance,
            state,
            operation,
            event,
            request_id,
            fingerprint,
            now,
            Vec::new(),
        )
        .await
    }

    /// Writes a new operation on an existing instance, moving the instance to `state`, in
    /// one transaction with its first event and the request record.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_operation(
        &self,
        mut instance: Instance,
        state: InstanceState,
        operation: Operation,
        event: crate::domain::OperationEvent,
        request_id: Option<&RequestId>,
        fingerprint: &str,
        now: Timestamp,
        extra: Vec<Write>,
    ) -> ApiResult<lro::Operation> {
        instance.state = state;
        instance.state_changed_at = now;
        instance.updated_at = now;
        instance.current_operation = Some(operation.id.clone());
        let mut writes = vec![
            Write::UpdateInstance(instance),
            Write::CreateOperation(operation.clone()),
            Write::AppendEvent(event),
        ];
        writes.extend(extra);
        writes.extend(self.request_write(request_id, fingerprint, &operation, now));
        self.commit_new_operation(writes, request_id, fingerprint, operation)
            .await
    }

    pub async fn retry_operation(
        &self,
        request: v1::RetryOperationRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let id = violations.check("name", OperationId::from_name(&request.name));
        let request_id = optional_request_id(&mut violations, &request.request_id);
        let Some(id) = id.filter(|_| violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let fingerprint = fingerprint(&("retry", &id));
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.retry_operation_once(&request.name, request_id.as_ref(), &fingerprint),
        )
        .await
    }

    async fn retry_operation_once(
        &self,
        name: &str,
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let mut operation = self.get_operation_by_name(name).await?;
        if !matches!(
            operation.status,
            OperationStatus::Failed | OperationStatus::Stuck
        ) {
            return Err(ApiError::FailedPrecondition {
                reason: reason::NOT_RETRYABLE,
                message: format!(
                    "{} is {}; only FAILED or STUCK operations can be retried",
                    operation.id.name(),
                    operation.status
                ),
                metadata: vec![("status", operation.status.to_string())],
            });
        }
        let Some(workflow) = crate::workflow::workflow_for(operation.verb) else {
            return Err(ApiError::NotImplemented {
                rpc: "RetryOperation for this verb",
            });
        };
        let mut instance = self
            .store
            .get_instance(&operation.target)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{} has no target", operation.id)))?;
        if instance.current_operation.as_ref() != Some(&operation.id)
            && self.is_busy(&instance).await?
        {
            return Err(busy(&instance));
        }
        if instance.state == InstanceState::Deprovisioned {
            return Err(wrong_state(
                &instance,
                "a deprovisioned instance cannot be changed",
            ));
        }
        if !matches!(operation.verb, Verb::Create | Verb::Delete)
            && instance.state != workflow.running_state_for(instance.state)
            && !instance
                .state
                .can_transition_to(workflow.running_state_for(instance.state))
        {
            return Err(wrong_state(
                &instance,
                &format!("{} cannot be retried from this state", operation.verb),
            ));
        }
        // For example a scale rolls back to what the instance runs now, not to what it ran
        // when the operation was first requested.
        workflow.on_retry(&mut operation, &instance);
        let environment = instance.spec.environment;
        self.check_environment(environment)?;
        let now = Timestamp::now();
        let mut writes = Vec::new();
        if operation.verb == Verb::Create {
            // A clean rollback gave the (tenant, environment) slot back: take it again.
            match self
                .store
                .get_guard(&instance.name.tenant, instance.spec.environment)
                .await?
            {
                Some(guard) if guard.instance == instance.name.instance => {}
                Some(guard) => return Err(Self::tenant_environment_taken(&guard)),
                None => writes.push(Write::ClaimGuard(Guard {
                    tenant: instance.name.tenant.clone(),
                    environment: instance.spec.environment,
                    instance: instance.name.instance.clone(),
                })),
            }
        }
        // The custom domains the operation gives the instance: a clean rollback or a failed
        // update gave back their claims, so take them again (a repeated claim of one still
        // held changes nothing).
        let domains: Vec<String> = match operation.verb {
            Verb::Create => instance.spec.custom_domains.clone(),
            Verb::Update => {
                serde_json::from_value(operation.params["spec"]["custom_domains"].clone())
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        writes.extend(self.domain_claims(&domains, &instance.name).await?);
        operation.status = OperationStatus::Pending;
        operation.error = None;
        operation.ended_at = None;
        operation.cancel_requested = false;
        operation.lease = None;
        operation.updated_at = now;
        if let Some(params) = operation.params.as_object_mut() {
            params.remove("rolling_back");
        }
        for step in &mut operation.steps {
            if !matches!(step.status, StepStatus::Succeeded | StepStatus::Skipped) {
                step.status = StepStatus::Pending;
                step.error = None;
            }
        }
        let event = operation.next_event(
            now,
            None,
            "retry requested: resuming from the recorded steps",
        );
        instance.current_operation = Some(operation.id.clone());
        instance.updated_at = now;
        writes.push(Write::UpdateOperation(operation.clone()));
        writes.push(Write::AppendEvent(event));
        writes.push(Write::UpdateInstance(instance));
        writes.extend(self.request_write(request_id, fingerprint, &operation, now));
        let claimed: Vec<Option<String>> = writes
            .iter()
            .map(|write| match write {
                Write::ClaimDomain(claim) => Some(claim.domain.clone()),
                _ => None,
            })
            .collect();
        match self.store.commit(writes).await {
            Ok(()) => {}
            Err(StoreError::Conflict {
                kind: WriteKind::ClaimDomain,
                index,
            }) => {
                return match claimed.get(index).cloned().flatten() {
                    Some(domain) => Err(Self::domain_taken(&domain)),
                    None => Err(StoreError::Contention.into()),
                };
            }
            Err(StoreError::Conflict {
                kind: WriteKind::ClaimGuard,
                ..
            }) => {
                return match self
                    .store
                    .get_guard(&operation.target.tenant, environment)
                    .await?
                {
                    Some(guard) => Err(Self::tenant_environment_taken(&guard)),
                    None => Err(StoreError::Contention.into()),
                };
            }
            Err(other) => return Err(other.into()),
        }
        operation.version += 1;
        self.wake.notify_one();
        tracing::info!(operation = %operation.id, "operation retry accepted");
        Ok(convert::operation_to_proto(&operation, None))
    }

    pub async fn cancel_operation(&self, name: &str) -> ApiResult<()> {
        for _ in 0..5 {
            let mut operation = self.get_operation_by_name(name).await?;
            let now = Timestamp::now();
            let writes = match operation.status {
                status if status.is_done() => {
                    return Err(ApiError::FailedPrecondition {
                        reason: reason::OPERATION_DONE,
                        message: format!("{name} is already {status}"),
                        metadata: vec![("status", status.to_string())],
                    });
                }
                OperationStatus::InProgress if operation.verb == Verb::Delete => {
                    return Err(ApiError::FailedPrecondition {
                        reason: reason::NOT_CANCELLABLE,
                        message: "a running deprovisioning cannot be cancelled: removed resources cannot come back; let it finish or retry it".into(),
                        metadata: Vec::new(),
                    });
                }
                OperationStatus::InProgress => {
                    if operation.cancel_requested {
                        return Ok(());
                    }
                    // The worker holding the lease sees this at its next step boundary.
                    operation.cancel_requested = true;
                    operation.updated_at = now;
                    let event = operation.next_event(now, None, "cancellation requested");
                    vec![
                        Write::UpdateOperation(operation.clone()),
                        Write::AppendEvent(event),
                    ]
                }
                _ => self.cancel_pending(&mut operation, now).await?,
            };
            match self.store.commit(writes).await {
                Ok(()) => {
                    tracing::info!(operation = %operation.id, "cancellation accepted");
                    return Ok(());
                }
                // The worker renewed its lease or moved on: look again.
                Err(StoreError::Conflict { .. } | StoreError::Contention) => continue,
                Err(other) => return Err(other.into()),
            }
        }
        Err(StoreError::Contention.into())
    }

    /// Nothing ran yet: end the operation now and put the instance back.
    async fn cancel_pending(
        &self,
        operation: &mut Operation,
        now: Timestamp,
    ) -> ApiResult<Vec<Write>> {
        let mut instance = self
            .store
            .get_instance(&operation.target)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("{} has no target", operation.id)))?;
        operation.status = OperationStatus::Cancelled;
        operation.ended_at = Some(now);
        operation.updated_at = now;
        let event = operation.next_event(now, None, "cancelled before it started");
        let mut writes = vec![
            Write::UpdateOperation(operation.clone()),
            Write::AppendEvent(event),
        ];
        instance.current_operation = None;
        instance.updated_at = now;
        instance.state_changed_at = now;
        match operation.verb {
            Verb::Create => {
                instance.state = InstanceState::Failed;
                instance.failure_reason = Some("creation cancelled before it started".into());
                writes.push(Write::ReleaseGuard(Guard {
                    tenant: instance.name.tenant.clone(),
                    environment: instance.spec.environment,
                    instance: instance.name.instance.clone(),
                }));
                writes.extend(domain_releases(
                    &instance.spec.custom_domains,
                    &instance.name,
                ));
            }
            Verb::Update => {
                // The domains it would have added were claimed with it.
                let wanted: Vec<String> =
                    serde_json::from_value(operation.params["spec"]["custom_domains"].clone())
                        .unwrap_or_default();
                let added: Vec<String> = wanted
                    .into_iter()
                    .filter(|domain| !instance.spec.custom_domains.contains(domain))
                    .collect();
                writes.extend(domain_releases(&added, &instance.name));
                instance.state = serde_json::from_value(operation.params["from_state"].clone())
                    .unwrap_or(InstanceState::Active);
            }
            _ => {
                instance.state = serde_json::from_value(operation.params["from_state"].clone())
                    .unwrap_or(InstanceState::Active);
            }
        }
        writes.push(Write::UpdateInstance(instance));
        Ok(writes)
    }
}

/// Releases of the claims `owner` holds on `domains` (idempotent: an absent claim is fine).
fn domain_releases(domains: &[String], owner: &InstanceName) -> Vec<Write> {
    domains
        .iter()
        .map(|domain| {
            Write::ReleaseDomain(crate::store::DomainClaim {
                domain: domain.clone(),
                owner: owner.clone(),
            })
        })
        .collect()
}

/// The longest suspension reason kept, in characters.
pub const SUSPEND_REASON_MAX: usize = 500;

/// A suspension reason (already trimmed) is free text for the audit trail: at most
/// [`SUSPEND_REASON_MAX`] characters, on one line, without control characters.
fn check_suspend_reason(reason: &str) -> Result<(), String> {
    let length = reason.chars().count();
    if length > SUSPEND_REASON_MAX {
        return Err(format!(
            "at most {SUSPEND_REASON_MAX} characters (got {length})"
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("must be one line without control characters".into());
    }
    Ok(())
}

/// An optional AIP-155 request id: empty means none; anything else must be valid.
pub(super) fn optional_request_id(violations: &mut Violations, raw: &str) -> Option<RequestId> {
    if raw.is_empty() {
        None
    } else {
        violations.check("request_id", RequestId::parse(raw))
    }
}
