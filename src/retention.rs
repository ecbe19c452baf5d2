//! Removing backups: the one routine DeleteBackup and the retention sweeper share
//! ([`delete_backup`]), and the sweeper ([`Sweeper`]) that every replica runs.
//!
//! A removal is three steps, each safe to repeat and to race with another replica doing
//! the same:
//!
//! 1. the record goes to DELETING with `expire_at = now`, a write conditional on the
//!    version read (so only one of two racing deleters proceeds, and a deleter that dies
//!    after it leaves a record the sweeper picks up at once);
//! 2. every object under the backup's `location` prefix is removed (a missing object is
//!    no error, so two deleters may both do it);
//! 3. the record is deleted, conditional on the DELETING version: whoever comes second
//!    finds it gone and reports [`DeleteOutcome::AlreadyGone`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudEnv, CloudError};
use crate::domain::{Backup, BackupState, Environment, Timestamp};
use crate::health::CloudEnvs;
use crate::metrics::{self, Metrics};
use crate::store::{StateStore, StoreError, Write};

/// Expired backups taken per query of the sweeper.
pub const SWEEP_BATCH: usize = 50;

/// How a [`delete_backup`] ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// This call removed the record (and the objects).
    Deleted,
    /// The objects are gone and another deleter removed the record first.
    AlreadyGone,
    /// The record changed since it was read (another deleter moved it to DELETING first,
    /// or a writer updated it): nothing was removed by this call.
    Changed,
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listing or removing the objects failed; the record stays DELETING (expired), so a
    /// later DeleteBackup or sweep finishes the job.
    #[error("cannot remove the backup's objects: {0}")]
    Cloud(#[from] CloudError),
    /// The record's `location` is not a prefix this backup may own; nothing was removed.
    #[error("refusing to remove objects at {location:?}: {why}")]
    Location { location: String, why: &'static str },
}

/// `s3://bucket/prefix/` split into bucket and key prefix, if the prefix is one this
/// backup may own: in the environment's archive bucket, ending with `/`, and below the
/// backup's tenant and instance as consecutive path segments (`…/{tenant}/{instance}/x/`,
/// which both `Backup::key_prefix` and the offboarding archives' layout are). A corrupt or foreign
/// location must never widen a removal to other tenants' objects or the whole bucket.
fn owned_prefix<'a>(
    backup: &'a Backup,
    archive_bucket: &str,
) -> Result<(&'a str, &'a str), DeleteError> {
    let refuse = |why| DeleteError::Location {
        location: backup.location.clone(),
        why,
    };
    let rest = backup
        .location
        .strip_prefix("s3://")
        .ok_or_else(|| refuse("not an s3:// URI"))?;
    let (bucket, prefix) = rest
        .split_once('/')
        .ok_or_else(|| refuse("no key prefix"))?;
    if bucket != archive_bucket {
        return Err(refuse("not in the environment's archive bucket"));
    }
    if !prefix.ends_with('/') {
        return Err(refuse("the key prefix does not end with '/'"));
    }
    let owner = format!(
        "/{}/{}/",
        backup.name.instance.tenant, backup.name.instance.instance
    );
    // Below the instance's segments, not the instance's whole tree (its other backups).
    let rooted = format!("/{prefix}");
    match rooted.find(&owner) {
        Some(at) if rooted.len() > at + owner.len() => Ok((bucket, prefix)),
        Some(_) => Err(refuse("the key prefix is the instance's, not one backup's")),
        None => Err(refuse("the key prefix is not under the backup's instance")),
    }
}

/// Marks `backup` DELETING and expired at `now` (conditional on its version), unless it is
/// DELETING already. Returns the stored record, or `None` when the record changed since it
/// was read.
async fn begin_deletion(
    store: &dyn StateStore,
    backup: Backup,
    now: Timestamp,
) -> Result<Option<Backup>, StoreError> {
    if backup.state == BackupState::Deleting {
        return Ok(Some(backup));
    }
    let mut deleting = backup;
    deleting.state = BackupState::Deleting;
    deleting.expire_at = now;
    deleting.updated_at = now;
    match store
        .commit(vec![Write::UpdateBackup(deleting.clone())])
        .await
    {
        Ok(()) => {
            deleting.version += 1;
            Ok(Some(deleting))
        }
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Removes a backup: its objects in `cloud`'s archive bucket, then its record (see the
/// module docs for why each step is safe to repeat and to race). `backup` is the record as
/// read; the caller has decided that it may go (DeleteBackup's etag and state checks, the
/// sweeper's expiry). A CREATING backup is removed like any other: callers that must not
/// remove one check first.
pub async fn delete_backup(
    store: &dyn StateStore,
    cloud: &CloudEnv,
    backup: Backup,
    now: Timestamp,
) -> Result<DeleteOutcome, DeleteError> {
    // A backup that never opened has no location yet; its objects, if any, would be at
    // its own prefix.
    let mut backup = backup;
    if backup.location.is_empty() {
        backup.location = format!(
            "s3://{}/{}",
            cloud.platform.archive_bucket,
            Backup::key_prefix(backup.environment, &backup.name)
        );
    }
    // Checked before anything is written: a record whose objects cannot be located must
    // not be marked for a removal nobody can finish.
    let (bucket, prefix) = owned_prefix(&backup, &cloud.platform.archive_bucket)?;
    let (bucket, prefix) = (bucket.to_owned(), prefix.to_owned());
    let Some(deleting) = begin_deletion(store, backup, now).await? else {
        return Ok(DeleteOutcome::Changed);
    };
    let keys = cloud.objects.list_objects(&bucket, &prefix).await?;
    if !keys.is_empty() {
        cloud.objects.delete_objects(&bucket, &keys).await?;
    }
    match store
        .commit(vec![Write::DeleteBackup(deleting.clone())])
        .await
    {
        Ok(()) => {
            tracing::info!(backup = %deleting.name, objects = keys.len(), "backup deleted");
            Ok(DeleteOutcome::Deleted)
        }
        Err(StoreError::Conflict { .. }) => match store.get_backup(&deleting.name).await? {
            None => Ok(DeleteOutcome::AlreadyGone),
            Some(_) => Ok(DeleteOutcome::Changed),
        },
        Err(other) => Err(other.into()),
    }
}

/// What one pass of the sweeper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Backups this replica removed.
    pub deleted: usize,
    /// Expired CREATING backups left alone: their operation still runs.
    pub skipped: usize,
    /// Backups another replica was removing at the same time (or had removed).
    pub raced: usize,
    /// Removals that failed (logged; retried on the next pass).
    pub failed: usize,
}

/// The retention sweeper: removes backups whose `expire_at` has passed, exactly as
/// DeleteBackup does. Safe in every replica at once (see the module docs).
pub struct Sweeper {
    store: Arc<dyn StateStore>,
    clouds: Arc<dyn CloudEnvs>,
    metrics: Arc<Metrics>,
    batch: usize,
}

impl Sweeper {
    pub fn new(
        store: Arc<dyn StateStore>,
        clouds: Arc<dyn CloudEnvs>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            clouds,
            metrics,
            batch: SWEEP_BATCH,
        }
    }

    /// Takes at most `batch` expired backups per query (tests use small batches).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// A CREATING backup is still being written while its operation runs: it is removed
    /// only once that operation is over (or gone), having failed to make it READY.
    async fn still_being_written(&self, backup: &Backup) -> Result<bool, StoreError> {
        if backup.state != BackupState::Creating {
            return Ok(false);
        }
        Ok(self
            .store
            .get_operation(&backup.operation)
            .await?
            .is_some_and(|operation| !operation.status.is_done()))
    }

    /// One pass over the backups expired at `now`: batch after batch while batches come
    /// back full (more may be waiting) and someone (this replica or another) made progress
    /// on the last one; a full batch of backups that cannot go now ends the pass.
    pub async fn sweep_once(&self, now: Timestamp) -> SweepReport {
        let mut report = SweepReport::default();
        let mut clouds: HashMap<Environment, CloudEnv> = HashMap::new();
        loop {
            let expired = match self.store.expired_backups(now, self.batch).await {
                Ok(expired) => expired,
                Err(error) => {
                    tracing::warn!(%error, "cannot list expired backups");
                    report.failed += 1;
                    return report;
                }
            };
            let full = expired.len() >= self.batch;
            let before = report;
            for backup in expired {
                self.sweep_one(backup, now, &mut clouds, &mut report).await;
            }
            let progress = report.deleted - before.deleted + report.raced - before.raced;
            if !full || progress == 0 {
                return report;
            }
        }
    }

    async fn sweep_one(
        &self,
        backup: Backup,
        now: Timestamp,
        clouds: &mut HashMap<Environment, CloudEnv>,
        report: &mut SweepReport,
    ) {
        let name = backup.name.to_string();
        match self.still_being_written(&backup).await {
            Ok(false) => {}
            Ok(true) => {
                report.skipped += 1;
                return;
            }
            Err(error) => {
                tracing::warn!(backup = %name, %error, "cannot read the operation of a creating backup");
                report.failed += 1;
                return;
            }
        }
        let environment = backup.environment;
        let cloud = match clouds.get(&environment) {
            Some(cloud) => cloud.clone(),
            None => match self.clouds.env(environment).await {
                Ok(cloud) => {
                    clouds.insert(environment, cloud.clone());
                    cloud
                }
                Err(error) => {
                    tracing::warn!(backup = %name, %environment, %error, "environment unavailable: expired backup kept for now");
                    report.failed += 1;
                    return;
                }
            },
        };
        match delete_backup(self.store.as_ref(), &cloud, backup, now).await {
            Ok(DeleteOutcome::Deleted) => {
                report.deleted += 1;
                self.metrics.increment(
                    metrics::BACKUPS_SWEPT,
                    &[("environment", environment.as_str())],
                );
                tracing::info!(backup = %name, "expired backup removed");
            }
            Ok(DeleteOutcome::AlreadyGone | DeleteOutcome::Changed) => report.raced += 1,
            Err(error) => {
                report.failed += 1;
                self.metrics.increment(
                    metrics::BACKUP_SWEEP_FAILURES,
                    &[("environment", environment.as_str())],
                );
                tracing::warn!(backup = %name, %error, "cannot remove expired backup");
            }
        }
    }

    /// Sweeps at once, then every `every`, until `shutdown`. A pass in progress when
    /// shutdown comes is abandoned between steps; every step is safe to cut short.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        loop {
            let report = tokio::select! {
                () = shutdown.cancelled() => return,
                report = self.sweep_once(Timestamp::now()) => report,
            };
            if report != SweepReport::default() {
                tracing::info!(
                    deleted = report.deleted,
                    skipped = report.skipped,
                    raced = report.raced,
                    failed = report.failed,
                    "retention sweep"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BackupId, BackupName, BackupOrigin, InstanceName, OperationId};

    fn backup(location: &str) -> Backup {
        let name = BackupName::new(
            InstanceName::parse("tenants/acme/instances/wp").unwrap(),
            BackupId::parse("bk-1").unwrap(),
        );
        Backup {
            name,
            environment: Environment::Dev,
            description: String::new(),
            labels: Default::default(),
            state: BackupState::Ready,
            origin: BackupOrigin::Requested,
            operation: OperationId::parse("op-1").unwrap(),
            created_at: Timestamp(0),
            expire_at: Timestamp(0),
            updated_at: Timestamp(0),
            location: location.to_owned(),
            database_uri: None,
            content_uri: None,
            manifest_uri: None,
            size_bytes: 0,
            failure_reason: None,
            version: 1,
        }
    }

    #[test]
    fn only_the_backups_own_prefix_is_removed() {
        let ok = backup("s3://archive/backups/dev/acme/wp/bk-1/");
        assert_eq!(
            owned_prefix(&ok, "archive").unwrap(),
            ("archive", "backups/dev/acme/wp/bk-1/")
        );
        // An offboarding archive's layout is accepted too.
        let archive = backup("s3://archive/archives/dev/acme/wp/op-1/");
        assert!(owned_prefix(&archive, "archive").is_ok());
        for bad in [
            "s3://archive/",
            "s3://archive",
            "s3://archive/backups/dev/acme/wp/bk-1",
            "s3://archive/backups/dev/acme/",
            "s3://archive/backups/dev/acme/wp/",
            "s3://archive/backups/dev/acme/wp2/bk-1/",
            "s3://archive/backups/dev/other/wp/bk-1/",
            "s3://archive/backups/dev/xacme/wp/bk-1/",
            "s3://elsewhere/backups/dev/acme/wp/bk-1/",
            "https://archive/backups/dev/acme/wp/bk-1/",
            "",
        ] {
            assert!(
                matches!(
                    owned_prefix(&backup(bad), "archive"),
                    Err(DeleteError::Location { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
