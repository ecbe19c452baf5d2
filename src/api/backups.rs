//! The backup catalogue: GetBackup, ListBackups, DeleteBackup. Backups are written by
//! CreateBackup's and DeleteInstance's workflows; these read them and remove them.
//!
//! Errors: INVALID_ARGUMENT (malformed name or parent, negative page_size, bad page_token),
//! NOT_FOUND (`BACKUP_NOT_FOUND`; ListBackups: `INSTANCE_NOT_FOUND`), and for DeleteBackup
//! ABORTED (`ETAG_MISMATCH`, or `CONCURRENT_MODIFICATION` when the backup changed while
//! being deleted), FAILED_PRECONDITION (`WRONG_STATE` while CREATING, `BACKUP_IN_USE` while
//! a restore from it runs, `ENVIRONMENT_UNAVAILABLE`), UNAVAILABLE
//! (`ENVIRONMENT_UNAVAILABLE`: no cloud access here, or the objects could not be removed —
//! the backup then stays DELETING and the retention sweeper finishes the removal).

use crate::domain::{Backup, BackupName, BackupState, InstanceName, Timestamp, Verb, Violations};
use crate::proto::v1;
use crate::retention::{self, DeleteError, DeleteOutcome};
use crate::store::BackupCursor;

use super::Api;
use super::convert;
use super::error::{ApiError, ApiResult, reason};

fn parse_backup_name(raw: &str) -> ApiResult<BackupName> {
    BackupName::parse(raw).map_err(|e| ApiError::invalid("name", e.to_string()))
}

impl Api {
    async fn stored_backup(&self, name: &BackupName) -> ApiResult<Backup> {
        self.store
            .get_backup(name)
            .await?
            .ok_or_else(|| ApiError::backup_not_found(name.to_string()))
    }

    pub async fn get_backup(&self, request: v1::GetBackupRequest) -> ApiResult<v1::Backup> {
        let name = parse_backup_name(&request.name)?;
        Ok(convert::backup_to_proto(&self.stored_backup(&name).await?))
    }

    pub async fn list_backups(
        &self,
        request: v1::ListBackupsRequest,
    ) -> ApiResult<v1::ListBackupsResponse> {
        let mut violations = Violations::new();
        let parent = violations.check("parent", InstanceName::parse(&request.parent));
        let page_size = match self.page_size(request.page_size) {
            Ok(size) => size,
            Err(ApiError::Invalid(more)) => {
                violations.append(more);
                0
            }
            Err(other) => return Err(other),
        };
        let parent = match parent {
            Some(parent) if violations.is_empty() => parent,
            _ => return Err(ApiError::Invalid(violations)),
        };
        let query = format!("backups|{parent}");
        let after: Option<BackupCursor> = self.page_cursor(&query, &request.page_token)?;
        // Backups outlive the instance's resources (a DEPROVISIONED instance keeps its
        // offboarding archive), not its record: no record, no such parent.
        if self.store.get_instance(&parent).await?.is_none() {
            return Err(ApiError::instance_not_found(parent.to_string()));
        }
        let page = self
            .store
            .list_backups(&parent, after.as_ref(), page_size)
            .await?;
        Ok(v1::ListBackupsResponse {
            backups: page.items.iter().map(convert::backup_to_proto).collect(),
            next_page_token: page
                .next
                .map(|cursor| self.tokens.encode(&query, &cursor))
                .unwrap_or_default(),
        })
    }

    /// The restore that uses `backup`, if one runs on its instance now (RestoreInstance
    /// records the backup's name in its operation's `backup` parameter).
    async fn running_restore(&self, backup: &Backup) -> ApiResult<Option<String>> {
        let Some(instance) = self.store.get_instance(&backup.name.instance).await? else {
            return Ok(None);
        };
        let Some(id) = &instance.current_operation else {
            return Ok(None);
        };
        let Some(operation) = self.store.get_operation(id).await? else {
            return Ok(None);
        };
        let uses = operation.verb == Verb::Restore
            && !operation.status.is_done()
            && operation.params["backup"].as_str() == Some(backup.name.to_string().as_str());
        Ok(uses.then(|| operation.id.name()))
    }

    pub async fn delete_backup(&self, request: v1::DeleteBackupRequest) -> ApiResult<()> {
        let name = parse_backup_name(&request.name)?;
        let backup = self.stored_backup(&name).await?;
        if !request.etag.is_empty() && request.etag != backup.etag() {
            return Err(ApiError::Aborted {
                reason: reason::ETAG_MISMATCH,
                message: format!(
                    "etag {} does not match the current {}; read the backup again",
                    request.etag,
                    backup.etag()
                ),
            });
        }
        if backup.state == BackupState::Creating {
            return Err(ApiError::FailedPrecondition {
                reason: reason::WRONG_STATE,
                message: format!(
                    "{name} is still being created; wait for {} to end",
                    backup.operation.name()
                ),
                metadata: vec![("state", backup.state.as_str().to_owned())],
            });
        }
        if let Some(operation) = self.running_restore(&backup).await? {
            return Err(ApiError::FailedPrecondition {
                reason: reason::BACKUP_IN_USE,
                message: format!("{name} is being restored by {operation}; wait for it to end"),
                metadata: vec![("operation", operation)],
            });
        }
        let cloud = {
            self.check_environment(backup.environment)?;
            self.cloud_for(backup.environment).await?
        };
        match retention::delete_backup(self.store.as_ref(), &cloud, backup, Timestamp::now()).await
        {
            Ok(DeleteOutcome::Deleted | DeleteOutcome::AlreadyGone) => Ok(()),
            Ok(DeleteOutcome::Changed) => Err(ApiError::Aborted {
                reason: reason::CONCURRENT_MODIFICATION,
                message: format!("{name} changed while being deleted; read it again and retry"),
            }),
            Err(DeleteError::Store(error)) => Err(error.into()),
            Err(DeleteError::Cloud(error)) => {
                tracing::warn!(backup = %name, %error, "backup objects not removed");
                Err(ApiError::NoCloudAccess(format!(
                    "the objects of {name} could not all be removed; it stays DELETING and \
                     the retention sweeper finishes the removal, or retry"
                )))
            }
            Err(error @ DeleteError::Location { .. }) => {
                Err(ApiError::Internal(format!("{name}: {error}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::domain::{BackupId, BackupOrigin, Environment, OperationId};

    use super::*;

    #[test]
    fn a_backup_renders_every_field() {
        let name = BackupName::new(
            InstanceName::parse("tenants/acme/instances/wp").unwrap(),
            BackupId::parse("bk-1").unwrap(),
        );
        let mut backup = Backup {
            name,
            environment: Environment::Dev,
            description: "before the upgrade".into(),
            labels: BTreeMap::from([("why".to_owned(), "upgrade".to_owned())]),
            state: BackupState::Ready,
            origin: BackupOrigin::Requested,
            operation: OperationId::parse("op-1").unwrap(),
            created_at: Timestamp(1_700_000_000_250),
            expire_at: Timestamp(1_707_776_000_000),
            updated_at: Timestamp(1_700_000_100_000),
            location: "s3://archive/backups/dev/acme/wp/bk-1/".into(),
            database_uri: Some("s3://archive/backups/dev/acme/wp/bk-1/database.sql.gz".into()),
            content_uri: None,
            manifest_uri: Some("s3://archive/backups/dev/acme/wp/bk-1/manifest.json".into()),
            size_bytes: 123_456_789,
            failure_reason: None,
            version: 3,
        };
        let proto = convert::backup_to_proto(&backup);
        assert_eq!(
            proto,
            v1::Backup {
                name: "tenants/acme/instances/wp/backups/bk-1".into(),
                description: "before the upgrade".into(),
                state: v1::BackupState::Ready.into(),
                create_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 250_000_000
                }),
                expire_time: Some(prost_types::Timestamp {
                    seconds: 1_707_776_000,
                    nanos: 0
                }),
                database_dump_uri: "s3://archive/backups/dev/acme/wp/bk-1/database.sql.gz".into(),
                content_archive_uri: String::new(),
                size_bytes: 123_456_789,
                labels: [("why".to_owned(), "upgrade".to_owned())]
                    .into_iter()
                    .collect(),
                etag: "\"3\"".into(),
            }
        );
        for (state, expected) in [
            (BackupState::Creating, v1::BackupState::Creating),
            (BackupState::Failed, v1::BackupState::Failed),
            (BackupState::Deleting, v1::BackupState::Deleting),
        ] {
            backup.state = state;
            assert_eq!(convert::backup_to_proto(&backup).state(), expected);
        }
        // Sizes beyond what the proto's int64 holds saturate instead of wrapping.
        backup.size_bytes = u64::MAX;
        assert_eq!(convert::backup_to_proto(&backup).size_bytes, i64::MAX);
    }
}
