//! CreateBackup (and, with it, the Backup record a backup operation fills in).

use std::collections::BTreeMap;

use crate::domain::{
    Backup, BackupId, BackupName, BackupOrigin, BackupState, InstanceName, InstanceState,
    Operation, RequestId, Timestamp, Verb, Violations,
};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;
use crate::store::Write;
use crate::workflow::backup;

use super::Api;
use super::error::{ApiError, ApiResult};
use super::lifecycle::{busy, fingerprint, optional_request_id, wrong_state};

/// At most this many characters of description.
pub const MAX_DESCRIPTION_CHARS: usize = 500;

/// The retention of a backup unless the deployment sets one.
pub const DEFAULT_RETENTION_DAYS: u64 = 90;

const BACKUP_ALREADY_EXISTS: &str = "BACKUP_ALREADY_EXISTS";
const BACKUP_NOT_FOUND: &str = "BACKUP_NOT_FOUND";
const BACKUP_NOT_READY: &str = "BACKUP_NOT_READY";

struct BackupRequest {
    parent: InstanceName,
    backup_id: Option<BackupId>,
    description: String,
    labels: BTreeMap<String, String>,
    request_id: Option<RequestId>,
}

fn parse(request: v1::CreateBackupRequest) -> ApiResult<BackupRequest> {
    let mut violations = Violations::new();
    let parent = violations.check("parent", InstanceName::parse(&request.parent));
    let backup_id = if request.backup_id.is_empty() {
        None
    } else {
        violations.check("backup_id", BackupId::parse(&request.backup_id))
    };
    let body = request.backup.unwrap_or_default();
    if body.description.chars().count() > MAX_DESCRIPTION_CHARS {
        violations.add(
            "backup.description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        );
    }
    if body
        .description
        .chars()
        .any(|c| c.is_control() && c != '\n')
    {
        violations.add("backup.description", "must not contain control characters");
    }
    let labels: BTreeMap<String, String> = body.labels.into_iter().collect();
    let mut label_violations = Violations::new();
    crate::domain::spec::check_labels(&labels, &mut label_violations);
    violations.extend_prefixed("backup", label_violations);
    let request_id = optional_request_id(&mut violations, &request.request_id);
    match parent {
        Some(parent) if violations.is_empty() => Ok(BackupRequest {
            parent,
            backup_id,
            description: body.description,
            labels,
            request_id,
        }),
        _ => Err(ApiError::Invalid(violations)),
    }
}

impl Api {
    /// How long a new backup is kept.
    pub fn backup_retention_millis(&self) -> i64 {
        i64::try_from(self.settings.backup_retention.as_millis()).unwrap_or(i64::MAX)
    }

    pub async fn create_backup(
        &self,
        request: v1::CreateBackupRequest,
    ) -> ApiResult<lro::Operation> {
        let request = parse(request)?;
        let fingerprint = fingerprint(&(
            "backup",
            &request.parent,
            &request.backup_id,
            &request.description,
            &request.labels,
        ));
        self.idempotent(
            request.request_id.as_ref(),
            &fingerprint,
            self.create_backup_once(&request, &fingerprint),
        )
        .await
    }

    async fn create_backup_once(
        &self,
        request: &BackupRequest,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let now = Timestamp::now();
        let instance = self
            .store
            .get_instance(&request.parent)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(request.parent.to_string()))?;
        if self.is_busy(&instance).await? {
            return Err(busy(&instance));
        }
        if !matches!(
            instance.state,
            InstanceState::Active | InstanceState::Suspended
        ) {
            return Err(wrong_state(
                &instance,
                "only ACTIVE or SUSPENDED instances can be backed up",
            ));
        }
        self.check_environment(instance.spec.environment)?;
        let backup_id = request
            .backup_id
            .clone()
            .unwrap_or_else(|| BackupId::generate(now));
        let name = BackupName::new(request.parent.clone(), backup_id);
        if self.store.get_backup(&name).await?.is_some() {
            return Err(backup_exists(&name));
        }
        let mut operation = super::new_operation(
            Verb::Backup,
            request.parent.clone(),
            Vec::new(),
            request.request_id.clone(),
            now,
        );
        operation.params = backup::params(&name);
        operation.params["from_state"] = serde_json::json!(instance.state);
        let record = self
            .new_backup(
                &instance,
                name.clone(),
                BackupOrigin::Requested,
                &operation,
                now,
            )
            .await?;
        let mut record = record;
        record.description = request.description.clone();
        record.labels = request.labels.clone();
        let event = operation.next_event(now, None, format!("backup requested: {name}"));
        let state = instance.state;
        self.start_operation(
            instance,
            state,
            operation,
            event,
            request.request_id.as_ref(),
            fingerprint,
            now,
            vec![Write::CreateBackup(record)],
        )
        .await
        .map_err(|error| match error {
            // The record was taken between the read and the commit.
            ApiError::Aborted { .. } | ApiError::Unavailable { .. } => error,
            other => other,
        })
    }

    /// The cloud adapters of `environment`, as this replica reaches them.
    pub(crate) async fn cloud_for(
        &self,
        environment: crate::domain::Environment,
    ) -> ApiResult<crate::cloud::CloudEnv> {
        let Some(clouds) = &self.clouds else {
            return Err(ApiError::NoCloudAccess(
                "this replica has no cloud access (no environments configured); try another".into(),
            ));
        };
        clouds
            .env(environment)
            .await
            .map_err(|error| ApiError::FailedPrecondition {
                reason: super::error::reason::ENVIRONMENT_UNAVAILABLE,
                message: format!("environment {environment} cannot be reached: {error}"),
                metadata: vec![("environment", environment.to_string())],
            })
    }

    /// A CREATING backup record of `instance`, written by `operation`.
    pub(crate) async fn new_backup(
        &self,
        instance: &crate::domain::Instance,
        name: BackupName,
        origin: BackupOrigin,
        operation: &Operation,
        now: Timestamp,
    ) -> ApiResult<Backup> {
        Ok(Backup {
            name,
            environment: instance.spec.environment,
            description: String::new(),
            labels: BTreeMap::new(),
            state: BackupState::Creating,
            origin,
            operation: operation.id.clone(),
            created_at: now,
            expire_at: now.plus_millis(self.backup_retention_millis()),
            updated_at: now,
            // Set when the backup opens, in the environment's archive bucket.
            location: String::new(),
            database_uri: None,
            content_uri: None,
            manifest_uri: None,
            size_bytes: 0,
            failure_reason: None,
            version: 0,
        })
    }
}

impl Api {
    pub async fn restore_instance(
        &self,
        request: v1::RestoreInstanceRequest,
    ) -> ApiResult<lro::Operation> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let backup = violations.check("backup", BackupName::parse(&request.backup));
        let request_id = optional_request_id(&mut violations, &request.request_id);
        if let (Some(name), Some(backup)) = (&name, &backup)
            && name.tenant != backup.instance.tenant
        {
            violations.add(
                "backup",
                format!("must be a backup of an instance of tenant {}", name.tenant),
            );
        }
        let (Some(name), Some(backup)) = (name, backup) else {
            return Err(ApiError::Invalid(violations));
        };
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations));
        }
        let fingerprint = fingerprint(&("restore", &name, &backup));
        self.idempotent(
            request_id.as_ref(),
            &fingerprint,
            self.restore_instance_once(name, backup, request_id.as_ref(), &fingerprint),
        )
        .await
    }

    async fn restore_instance_once(
        &self,
        name: InstanceName,
        backup_name: BackupName,
        request_id: Option<&RequestId>,
        fingerprint: &str,
    ) -> ApiResult<lro::Operation> {
        let backup =
            self.store
                .get_backup(&backup_name)
                .await?
                .ok_or_else(|| ApiError::NotFound {
                    reason: BACKUP_NOT_FOUND,
                    resource: backup_name.to_string(),
                })?;
        if backup.state != BackupState::Ready {
            return Err(ApiError::FailedPrecondition {
                reason: BACKUP_NOT_READY,
                message: format!(
                    "{backup_name} is {}; only a READY backup can be restored",
                    backup.state.as_str()
                ),
                metadata: vec![("state", backup.state.as_str().to_owned())],
            });
        }
        let instance = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        if self.is_busy(&instance).await? {
            return Err(busy(&instance));
        }
        if !matches!(
            instance.state,
            InstanceState::Active | InstanceState::Suspended
        ) {
            return Err(wrong_state(
                &instance,
                "only ACTIVE or SUSPENDED instances can be restored",
            ));
        }
        if instance.spec.environment != backup.environment {
            return Err(ApiError::FailedPrecondition {
                reason: BACKUP_NOT_READY,
                message: format!(
                    "{backup_name} is in {}, the instance in {}: a backup restores only within its environment",
                    backup.environment, instance.spec.environment
                ),
                metadata: vec![("environment", backup.environment.to_string())],
            });
        }
        self.check_environment(instance.spec.environment)?;
        let now = Timestamp::now();
        let mut operation =
            super::new_operation(Verb::Restore, name, Vec::new(), request_id.cloned(), now);
        operation.params = crate::workflow::restore::params(
            &backup_name,
            &instance,
            Some(self.settings.rollout_timeout),
        );
        operation.params["from_state"] = serde_json::json!(instance.state);
        let event =
            operation.next_event(now, None, format!("restore requested from {backup_name}"));
        // Rewriting the backup (unchanged but for its version) in the same transaction
        // makes a DeleteBackup that read it before this commit fail its condition.
        let mut touched = backup.clone();
        touched.updated_at = now;
        self.start_operation(
            instance,
            InstanceState::Restoring,
            operation,
            event,
            request_id,
            fingerprint,
            now,
            vec![Write::UpdateBackup(touched)],
        )
        .await
    }
}

fn backup_exists(name: &BackupName) -> ApiError {
    ApiError::AlreadyExists {
        reason: BACKUP_ALREADY_EXISTS,
        message: format!("{name} already exists; choose another backup_id"),
        metadata: vec![("backup", name.to_string())],
    }
}
