//! The backup catalogue end to end, in process, on moto: GetBackup, ListBackups and
//! DeleteBackup through the real gRPC server, and the retention sweeper, two at once.
//!
//! Backups are made here as a finished CreateBackup leaves them: a record in the state store
//! and objects under its prefix in the environment's archive bucket (written and checked
//! with the S3 SDK in the environment's account, not with the product's adapters).

mod common;
mod platform;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instance_manager::domain::operation::Lease;
use instance_manager::domain::{
    Backup, BackupId, BackupName, BackupOrigin, BackupState, Environment, Instance, InstanceId,
    InstanceName, InstanceSpec, InstanceState, Operation, OperationId, OperationStatus, TenantId,
    Tier, Timestamp, Verb,
};
use instance_manager::metrics::{BACKUPS_SWEPT, Metrics};
use instance_manager::proto::v1;
use instance_manager::retention::Sweeper;
use instance_manager::store::{StateStore, Write};
use platform::ControlPlane;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const ENV: Environment = Environment::Dev;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "instance-manager.bbws.io");
    info.reason
}

#[track_caller]
fn assert_invalid(status: &Status, field: &str, expected_reason: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(status), expected_reason, "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"))
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, [field], "{status:?}");
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        environment: ENV,
        organization_name: "Acme Corp".to_owned(),
        contact_email: "ops@example.com".to_owned(),
        tier: Tier::Standard,
        desired_count: 2,
        cpu: 512,
        memory_mib: 1024,
        wordpress_image: "wordpress".to_owned(),
        wordpress_version: "6.7-php8.3-apache".to_owned(),
        labels: BTreeMap::new(),
        opportunity_id: "opp-1".to_owned(),
        cost_center: "cc-1".to_owned(),
        custom_domains: Vec::new(),
    }
}

fn instance_name(tenant: &str, instance: &str) -> InstanceName {
    InstanceName::new(
        TenantId::parse(tenant).unwrap(),
        InstanceId::parse(instance).unwrap(),
    )
}

/// An instance record in `state`, as its workflows leave it (no resources are needed: the
/// catalogue never touches them).
async fn put_instance(
    store: &dyn StateStore,
    name: &InstanceName,
    state: InstanceState,
) -> Instance {
    let mut instance = Instance::new_pending(
        name.clone(),
        spec(),
        OperationId::parse("op-create").unwrap(),
        Timestamp::now(),
    );
    instance.state = state;
    instance.current_operation = None;
    store
        .commit(vec![Write::CreateInstance(instance.clone())])
        .await
        .unwrap();
    instance.version = 1;
    instance
}

/// `operation` as running on another replica: IN_PROGRESS under a live lease, so this
/// control plane's engine leaves it alone.
fn running_elsewhere(mut operation: Operation) -> Operation {
    operation.status = OperationStatus::InProgress;
    operation.attempt = 1;
    operation.lease = Some(Lease {
        owner: "another-replica".to_owned(),
        expires_at: Timestamp(Timestamp::now().millis() + 60 * 60 * 1000),
    });
    operation
}

async fn put_operation(store: &dyn StateStore, operation: &Operation) {
    store
        .commit(vec![Write::CreateOperation(operation.clone())])
        .await
        .unwrap();
}

/// The S3 client of the environment's account, and its archive bucket.
struct Archive {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl Archive {
    async fn of(plane: &ControlPlane) -> Self {
        let cloud = plane.cloud(ENV).await;
        let sdk = platform::account_sdk(&cloud).await;
        let config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build();
        Archive {
            s3: aws_sdk_s3::Client::from_conf(config),
            bucket: cloud.platform.archive_bucket.clone(),
        }
    }

    async fn put(&self, key: &str) {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(format!("contents of {key}").into_bytes().into())
            .send()
            .await
            .unwrap();
    }

    /// Every key under `prefix`, listed with the SDK.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let pages: Vec<_> = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .unwrap();
        let mut keys: Vec<String> = pages
            .iter()
            .flat_map(|page| page.contents())
            .filter_map(|object| object.key().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    }

    /// A backup as a finished CreateBackup leaves it: the record, and three objects under
    /// its prefix (one in a "directory" below it).
    async fn backup(
        &self,
        store: &dyn StateStore,
        instance: &InstanceName,
        id: &str,
        created_at: Timestamp,
        expire_at: Timestamp,
        state: BackupState,
    ) -> Backup {
        let name = BackupName::new(instance.clone(), BackupId::parse(id).unwrap());
        let prefix = Backup::key_prefix(ENV, &name);
        for object in [
            "database.sql.gz",
            "wp-content.tar.gz",
            "parts/manifest.json",
        ] {
            self.put(&format!("{prefix}{object}")).await;
        }
        let uri = |key: &str| format!("s3://{}/{prefix}{key}", self.bucket);
        let backup = Backup {
            environment: ENV,
            description: format!("backup {id}"),
            labels: BTreeMap::from([("by".to_owned(), "test".to_owned())]),
            state,
            origin: BackupOrigin::Requested,
            operation: OperationId::parse(&format!("op-{id}")).unwrap(),
            created_at,
            expire_at,
            updated_at: created_at,
            location: format!("s3://{}/{prefix}", self.bucket),
            database_uri: Some(uri("database.sql.gz")),
            content_uri: Some(uri("wp-content.tar.gz")),
            manifest_uri: Some(uri("parts/manifest.json")),
            size_bytes: 3 * 1024,
            failure_reason: None,
            version: 0,
            name,
        };
        store
            .commit(vec![Write::CreateBackup(backup.clone())])
            .await
            .unwrap();
        Backup {
            version: 1,
            ..backup
        }
    }
}

fn prefix_of(backup: &Backup) -> String {
    Backup::key_prefix(ENV, &backup.name)
}

async fn start() -> (ControlPlane, Archive) {
    let config = platform::config_with_platforms(&[ENV]).await;
    let plane = platform::start(config, None).await;
    let archive = Archive::of(&plane).await;
    (plane, archive)
}

async fn get(plane: &mut ControlPlane, name: &str) -> Result<v1::Backup, Status> {
    plane
        .instances
        .get_backup(v1::GetBackupRequest {
            name: name.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(
    plane: &mut ControlPlane,
    parent: &str,
    page_size: i32,
    page_token: &str,
) -> Result<v1::ListBackupsResponse, Status> {
    plane
        .instances
        .list_backups(v1::ListBackupsRequest {
            parent: parent.to_owned(),
            page_size,
            page_token: page_token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn delete(plane: &mut ControlPlane, name: &str, etag: &str) -> Result<(), Status> {
    plane
        .instances
        .delete_backup(v1::DeleteBackupRequest {
            name: name.to_owned(),
            etag: etag.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn get_and_list_backups_newest_first() {
    let (mut plane, archive) = start().await;
    let store = plane.store.clone();
    let tenant = platform::tenant("cat");
    let wp = instance_name(&tenant, "wp");
    let sibling = instance_name(&tenant, "wp2");
    let other_tenant = platform::tenant("cat");
    let theirs = instance_name(&other_tenant, "wp");
    put_instance(store.as_ref(), &wp, InstanceState::Active).await;
    put_instance(store.as_ref(), &sibling, InstanceState::Active).await;
    put_instance(store.as_ref(), &theirs, InstanceState::Active).await;

    let base = Timestamp::now().millis();
    let mut ours = Vec::new();
    for i in 0..7 {
        let created = Timestamp(base + i * 1000);
        let state = if i == 3 {
            BackupState::Failed
        } else {
            BackupState::Ready
        };
        ours.push(
            archive
                .backup(
                    store.as_ref(),
                    &wp,
                    &format!("bk-{i}"),
                    created,
                    Timestamp(base + 90 * DAY_MS),
                    state,
                )
                .await,
        );
    }
    for (instance, id) in [(&sibling, "bk-s"), (&theirs, "bk-t")] {
        archive
            .backup(
                store.as_ref(),
                instance,
                id,
                Timestamp(base + 500),
                Timestamp(base + 90 * DAY_MS),
                BackupState::Ready,
            )
            .await;
    }

    // GetBackup: every field as stored.
    let fourth = get(&mut plane, &ours[3].name.to_string()).await.unwrap();
    assert_eq!(fourth.name, format!("{wp}/backups/bk-3"));
    assert_eq!(fourth.state(), v1::BackupState::Failed);
    assert_eq!(fourth.description, "backup bk-3");
    assert_eq!(fourth.etag, "\"1\"");
    assert_eq!(fourth.size_bytes, 3 * 1024);
    assert_eq!(fourth.labels.get("by").map(String::as_str), Some("test"));
    assert_eq!(
        fourth.database_dump_uri,
        format!(
            "s3://{}/{}database.sql.gz",
            archive.bucket,
            prefix_of(&ours[3])
        )
    );
    assert_eq!(
        fourth.content_archive_uri,
        format!(
            "s3://{}/{}wp-content.tar.gz",
            archive.bucket,
            prefix_of(&ours[3])
        )
    );
    let create = fourth.create_time.unwrap();
    assert_eq!(
        create.seconds * 1000 + i64::from(create.nanos / 1_000_000),
        base + 3000
    );
    let expire = fourth.expire_time.unwrap();
    assert_eq!(
        expire.seconds * 1000 + i64::from(expire.nanos / 1_000_000),
        base + 90 * DAY_MS
    );

    let missing = get(&mut plane, &format!("{wp}/backups/bk-nope"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(reason(&missing), "BACKUP_NOT_FOUND");
    // Another instance's backup id under this instance is not found either.
    let elsewhere = get(&mut plane, &format!("{wp}/backups/bk-s"))
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound);
    for bad in [
        "",
        "tenants/x/instances/wp",
        &format!("{wp}/backups/"),
        &format!("{wp}/backups/BK_1"),
        &format!("{wp}/backups/{}", "b".repeat(64)),
        "backups/bk-1",
    ] {
        let status = get(&mut plane, bad).await.unwrap_err();
        assert_invalid(&status, "name", "INVALID_ARGUMENT");
    }

    // ListBackups: newest first, three pages of 3, 3 and 1, only this instance's.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&mut plane, &wp.to_string(), 3, &token).await.unwrap();
        pages += 1;
        assert!(page.backups.len() <= 3);
        seen.extend(page.backups.iter().map(|b| b.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        assert_eq!(page.backups.len(), 3, "a page before the last is full");
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let newest_first: Vec<String> = ours.iter().rev().map(|b| b.name.to_string()).collect();
    assert_eq!(seen, newest_first);
    // The default page size holds them all; the same listing, with no token.
    let all = list(&mut plane, &wp.to_string(), 0, "").await.unwrap();
    assert_eq!(
        all.backups
            .iter()
            .map(|b| b.name.clone())
            .collect::<Vec<_>>(),
        newest_first
    );
    assert!(all.next_page_token.is_empty());
    assert_eq!(all.backups[3], fourth);
    let only_theirs = list(&mut plane, &theirs.to_string(), 10, "").await.unwrap();
    assert_eq!(
        only_theirs
            .backups
            .iter()
            .map(|b| b.name.clone())
            .collect::<Vec<_>>(),
        [format!("{theirs}/backups/bk-t")]
    );

    // A token belongs to its listing: forged, truncated or another parent's is refused.
    let first = list(&mut plane, &wp.to_string(), 3, "").await.unwrap();
    let token = first.next_page_token;
    for bad in [
        "not-a-token".to_owned(),
        token[..token.len() - 2].to_owned(),
        format!("{token}x"),
    ] {
        let status = list(&mut plane, &wp.to_string(), 3, &bad)
            .await
            .unwrap_err();
        assert_invalid(&status, "page_token", "INVALID_PAGE_TOKEN");
    }
    let status = list(&mut plane, &sibling.to_string(), 3, &token)
        .await
        .unwrap_err();
    assert_invalid(&status, "page_token", "INVALID_PAGE_TOKEN");
    // The page size may change between pages.
    let rest = list(&mut plane, &wp.to_string(), 10, &token).await.unwrap();
    assert_eq!(rest.backups.len(), 4);

    let status = list(&mut plane, &wp.to_string(), -1, "").await.unwrap_err();
    assert_invalid(&status, "page_size", "INVALID_ARGUMENT");
    for bad in [
        "",
        "tenants/x",
        &format!("{wp}/backups/bk-1"),
        "tenants/-/instances/wp",
    ] {
        let status = list(&mut plane, bad, 0, "").await.unwrap_err();
        assert_invalid(&status, "parent", "INVALID_ARGUMENT");
    }
    let unknown = list(
        &mut plane,
        &instance_name(&tenant, "nope").to_string(),
        0,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert_eq!(reason(&unknown), "INSTANCE_NOT_FOUND");

    // A DEPROVISIONED instance keeps its backups listed (its offboarding archive).
    let gone = instance_name(&tenant, "gone");
    put_instance(store.as_ref(), &gone, InstanceState::Deprovisioned).await;
    let archived = archive
        .backup(
            store.as_ref(),
            &gone,
            "bk-final",
            Timestamp(base),
            Timestamp(base + 90 * DAY_MS),
            BackupState::Ready,
        )
        .await;
    let listed = list(&mut plane, &gone.to_string(), 0, "").await.unwrap();
    assert_eq!(
        listed
            .backups
            .iter()
            .map(|b| b.name.clone())
            .collect::<Vec<_>>(),
        [archived.name.to_string()]
    );
}

#[tokio::test]
async fn delete_backup_checks_etag_state_and_restores_then_removes_objects_and_record() {
    let (mut plane, archive) = start().await;
    let store = plane.store.clone();
    let tenant = platform::tenant("del");
    let wp = instance_name(&tenant, "wp");
    let mut instance = put_instance(store.as_ref(), &wp, InstanceState::Active).await;
    let now = Timestamp::now();
    let later = Timestamp(now.millis() + 90 * DAY_MS);
    let ready = archive
        .backup(store.as_ref(), &wp, "bk-1", now, later, BackupState::Ready)
        .await;
    // A neighbour whose prefix extends ours as a string (`bk-1` / `bk-10`) keeps its objects.
    let neighbour = archive
        .backup(store.as_ref(), &wp, "bk-10", now, later, BackupState::Ready)
        .await;
    let creating = archive
        .backup(
            store.as_ref(),
            &wp,
            "bk-2",
            now,
            later,
            BackupState::Creating,
        )
        .await;
    let restored = archive
        .backup(store.as_ref(), &wp, "bk-3", now, later, BackupState::Ready)
        .await;
    let instance_prefix = format!("backups/{}/{}/{}/", ENV.short(), wp.tenant, wp.instance);
    let all_keys = archive.keys(&instance_prefix).await;
    assert_eq!(all_keys.len(), 12);

    // A stale etag: ABORTED, nothing removed.
    let status = delete(&mut plane, &ready.name.to_string(), "\"7\"")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(reason(&status), "ETAG_MISMATCH");
    assert_eq!(
        store.get_backup(&ready.name).await.unwrap(),
        Some(ready.clone())
    );
    assert_eq!(archive.keys(&instance_prefix).await, all_keys);

    // Still being written: FAILED_PRECONDITION.
    let status = delete(&mut plane, &creating.name.to_string(), "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "WRONG_STATE");
    assert_eq!(
        store.get_backup(&creating.name).await.unwrap(),
        Some(creating.clone())
    );

    // A restore from it runs: FAILED_PRECONDITION; a restore from another backup does not
    // hold this one.
    let mut restore = running_elsewhere(Operation::new(
        Verb::Restore,
        wp.clone(),
        Vec::new(),
        None,
        now,
    ));
    restore.params = serde_json::json!({ "backup": restored.name.to_string() });
    put_operation(store.as_ref(), &restore).await;
    instance.current_operation = Some(restore.id.clone());
    instance.state = InstanceState::Restoring;
    store
        .commit(vec![Write::UpdateInstance(instance.clone())])
        .await
        .unwrap();
    let status = delete(&mut plane, &restored.name.to_string(), &restored.etag())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "BACKUP_IN_USE");
    assert_eq!(
        store.get_backup(&restored.name).await.unwrap(),
        Some(restored.clone())
    );
    assert_eq!(archive.keys(&instance_prefix).await, all_keys);

    // With the right etag (while the restore of bk-3 runs): the objects under its prefix,
    // then the record, are gone; nothing else is touched.
    delete(&mut plane, &ready.name.to_string(), &ready.etag())
        .await
        .unwrap();
    assert!(archive.keys(&prefix_of(&ready)).await.is_empty());
    assert_eq!(store.get_backup(&ready.name).await.unwrap(), None);
    let status = get(&mut plane, &ready.name.to_string()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let left: Vec<String> = all_keys
        .iter()
        .filter(|key| !key.starts_with(&prefix_of(&ready)))
        .cloned()
        .collect();
    assert_eq!(left.len(), 9);
    assert_eq!(archive.keys(&instance_prefix).await, left);
    assert_eq!(archive.keys(&prefix_of(&neighbour)).await.len(), 3);
    // A second delete finds nothing.
    let status = delete(&mut plane, &ready.name.to_string(), "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "BACKUP_NOT_FOUND");

    // Once the restore is over, its backup can go.
    restore.status = OperationStatus::Completed;
    restore.lease = None;
    restore.version = 1;
    instance.current_operation = None;
    instance.state = InstanceState::Active;
    instance.version = 2;
    store
        .commit(vec![
            Write::UpdateOperation(restore),
            Write::UpdateInstance(instance),
        ])
        .await
        .unwrap();
    delete(&mut plane, &restored.name.to_string(), &restored.etag())
        .await
        .unwrap();
    assert!(archive.keys(&prefix_of(&restored)).await.is_empty());
    assert_eq!(store.get_backup(&restored.name).await.unwrap(), None);

    // A removal cut short (DELETING, objects partly there) is finished by another delete.
    let mut interrupted = neighbour.clone();
    interrupted.state = BackupState::Deleting;
    interrupted.expire_at = now;
    store
        .commit(vec![Write::UpdateBackup(interrupted)])
        .await
        .unwrap();
    delete(&mut plane, &neighbour.name.to_string(), "")
        .await
        .unwrap();
    assert!(archive.keys(&prefix_of(&neighbour)).await.is_empty());
    assert_eq!(store.get_backup(&neighbour.name).await.unwrap(), None);

    // What is left: the CREATING backup, whole.
    assert_eq!(
        archive.keys(&instance_prefix).await,
        archive.keys(&prefix_of(&creating)).await
    );
    assert_eq!(archive.keys(&prefix_of(&creating)).await.len(), 3);
    for bad in ["", "tenants/x/instances/wp/backups/bk-1", "operations/x"] {
        let status = delete(&mut plane, bad, "").await.unwrap_err();
        assert_invalid(&status, "name", "INVALID_ARGUMENT");
    }
}

#[tokio::test]
async fn two_sweepers_remove_each_expired_backup_once_and_nothing_else() {
    let (plane, archive) = start().await;
    let store = plane.store.clone();
    let tenant = platform::tenant("sweep");
    let wp = instance_name(&tenant, "wp");
    let other = instance_name(&tenant, "wp2");
    put_instance(store.as_ref(), &wp, InstanceState::Active).await;
    put_instance(store.as_ref(), &other, InstanceState::Deprovisioned).await;
    let now = Timestamp::now();
    let ago = |days: i64| Timestamp(now.millis() - days * DAY_MS);

    let mut expired = Vec::new();
    for i in 0..9 {
        let instance = if i % 2 == 0 { &wp } else { &other };
        let state = match i {
            0 => BackupState::Failed,
            1 => BackupState::Deleting, // a DeleteBackup that died mid-way
            _ => BackupState::Ready,
        };
        expired.push(
            archive
                .backup(
                    store.as_ref(),
                    instance,
                    &format!("old-{i}"),
                    ago(100),
                    ago(10 - i),
                    state,
                )
                .await,
        );
    }
    // CREATING and expired: its operation FAILED (removed), or still running (kept).
    let abandoned = archive
        .backup(
            store.as_ref(),
            &wp,
            "stale-failed",
            ago(100),
            ago(5),
            BackupState::Creating,
        )
        .await;
    let mut failed = Operation::new(Verb::Backup, wp.clone(), Vec::new(), None, ago(100));
    failed.id = abandoned.operation.clone();
    failed.status = OperationStatus::Failed;
    put_operation(store.as_ref(), &failed).await;
    expired.push(abandoned);
    let writing = archive
        .backup(
            store.as_ref(),
            &wp,
            "stale-running",
            ago(100),
            ago(5),
            BackupState::Creating,
        )
        .await;
    let mut running = running_elsewhere(Operation::new(
        Verb::Backup,
        wp.clone(),
        Vec::new(),
        None,
        ago(100),
    ));
    running.id = writing.operation.clone();
    put_operation(store.as_ref(), &running).await;
    let mut kept = vec![writing];
    for i in 0..3 {
        let future = Timestamp(now.millis() + (i + 1) * DAY_MS);
        kept.push(
            archive
                .backup(
                    store.as_ref(),
                    &wp,
                    &format!("new-{i}"),
                    ago(1),
                    future,
                    BackupState::Ready,
                )
                .await,
        );
    }

    // Two replicas at once, in batches smaller than the work.
    let clouds: Arc<dyn instance_manager::health::CloudEnvs> = plane.accounts.clone();
    let metrics = [Metrics::new(), Metrics::new()];
    let sweepers: Vec<Sweeper> = metrics
        .iter()
        .map(|m| Sweeper::new(store.clone(), clouds.clone(), m.clone()).with_batch(3))
        .collect();
    let (a, b) = tokio::join!(sweepers[0].sweep_once(now), sweepers[1].sweep_once(now));
    assert_eq!(a.failed + b.failed, 0, "{a:?} {b:?}");
    let swept = |m: &Metrics| m.value(BACKUPS_SWEPT, &[("environment", "DEV")]);
    // Each expired backup was removed by exactly one of them.
    assert_eq!(a.deleted + b.deleted, expired.len(), "{a:?} {b:?}");
    assert_eq!(
        swept(&metrics[0]) + swept(&metrics[1]),
        expired.len() as u64
    );
    for backup in &expired {
        assert_eq!(
            store.get_backup(&backup.name).await.unwrap(),
            None,
            "{}",
            backup.name
        );
        assert!(
            archive.keys(&prefix_of(backup)).await.is_empty(),
            "{}",
            backup.name
        );
    }
    for backup in &kept {
        assert_eq!(
            store.get_backup(&backup.name).await.unwrap().as_ref(),
            Some(backup),
            "{}",
            backup.name
        );
        assert_eq!(
            archive.keys(&prefix_of(backup)).await.len(),
            3,
            "{}",
            backup.name
        );
    }
    // A second pass finds nothing more to do.
    let again = sweepers[0].sweep_once(now).await;
    assert_eq!((again.deleted, again.failed), (0, 0), "{again:?}");
}

#[tokio::test]
async fn the_sweeper_loop_sweeps_repeatedly_and_stops_on_shutdown() {
    let (plane, archive) = start().await;
    let store = plane.store.clone();
    let tenant = platform::tenant("loop");
    let wp = instance_name(&tenant, "wp");
    put_instance(store.as_ref(), &wp, InstanceState::Active).await;
    let metrics = Metrics::new();
    let sweeper = Sweeper::new(store.clone(), plane.accounts.clone(), metrics.clone());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sweeper.run(Duration::from_millis(200), shutdown.clone()));

    // Backups that expire while the loop runs are removed by a later pass.
    let now = Timestamp::now();
    let mut backups = Vec::new();
    for i in 0..2 {
        backups.push(
            archive
                .backup(
                    store.as_ref(),
                    &wp,
                    &format!("bk-{i}"),
                    now,
                    Timestamp(now.millis() + 500),
                    BackupState::Ready,
                )
                .await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for backup in &backups {
        while store.get_backup(&backup.name).await.unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "{} not swept within 30 s",
                backup.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(archive.keys(&prefix_of(backup)).await.is_empty());
    }
    assert_eq!(metrics.value(BACKUPS_SWEPT, &[("environment", "DEV")]), 2);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the sweeper stops on shutdown")
        .unwrap();
}
