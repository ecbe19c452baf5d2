//! CreateBackup end to end, in process, on moto and MariaDB: the objects checked with the S3
//! SDK, the manifest's facts against the test's own SQL on the live database, ABORTED while
//! another operation runs, and a failed backup leaving no object and no scratch database.

mod common;
mod platform;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::{BackupName, BackupState, Environment, Operation, TenantId, Verb};
use instance_manager::proto::v1;
use instance_manager::workflow::{StepError, StepHook, StepResult};
use mysql_async::prelude::Queryable;
use platform::ControlPlane;
use platform::sql::{damage, databases_like, fill, master_conn, table_sums};
use tokio::sync::Notify;
use tonic::Code;

fn instance_name(tenant: &str) -> String {
    format!("tenants/{tenant}/instances/wp")
}

async fn provisioned(cp: &mut ControlPlane, prefix: &str) -> String {
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    tenant
}

fn database(tenant: &str) -> String {
    ResourceNames::derive(&TenantId::parse(tenant).unwrap(), Environment::Dev).database
}

/// Keys under `prefix` in the environment's archive bucket, listed with the S3 SDK.
async fn keys_under(cp: &ControlPlane, prefix: &str) -> Vec<String> {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let s3 = aws_sdk_s3::Client::new(&sdk);
    let listed = s3
        .list_objects_v2()
        .bucket(&cloud.platform.archive_bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect();
    keys.sort();
    keys
}

async fn object_json(cp: &ControlPlane, key: &str) -> serde_json::Value {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let s3 = aws_sdk_s3::Client::new(&sdk);
    let body = s3
        .get_object()
        .bucket(&cloud.platform.archive_bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn backup_request(tenant: &str, id: &str) -> v1::CreateBackupRequest {
    v1::CreateBackupRequest {
        parent: instance_name(tenant),
        backup_id: id.into(),
        backup: Some(v1::Backup {
            description: "before the theme change".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_the_dump_its_facts_and_a_manifest() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "bk").await;
    let db = database(&tenant);
    fill(&db).await;
    let expected = table_sums(&db).await;

    let operation = cp
        .instances
        .create_backup(backup_request(&tenant, "first"))
        .await
        .unwrap()
        .into_inner();
    let done = cp.completed(&operation.name).await;
    assert!(done.done);

    let name = BackupName::parse(&format!("{}/backups/first", instance_name(&tenant))).unwrap();
    let backup = cp.store.get_backup(&name).await.unwrap().expect("recorded");
    assert_eq!(backup.state, BackupState::Ready);
    assert_eq!(backup.description, "before the theme change");
    let prefix = format!("backups/dev/{tenant}/wp/first/");
    assert_eq!(
        keys_under(&cp, &prefix).await,
        [
            "database.json",
            "database.sql.gz",
            "facts.json",
            "manifest.json"
        ]
        .map(|k| format!("{prefix}{k}"))
    );
    assert!(backup.size_bytes > 0);
    assert!(backup.expire_at.millis() - backup.created_at.millis() >= 89 * 24 * 3600 * 1000);

    // The manifest's facts (measured on a restored copy of the dump) are the live
    // database's, table by table, as the test's own SQL sees them.
    let manifest = object_json(&cp, &format!("{prefix}manifest.json")).await;
    let tables = manifest["database"]["facts"]["tables"].as_object().unwrap();
    let found: BTreeMap<String, (u64, Option<u64>)> = tables
        .iter()
        .map(|(t, f)| {
            (
                t.clone(),
                (f["rows"].as_u64().unwrap(), f["checksum"].as_u64()),
            )
        })
        .collect();
    assert_eq!(found, expected);
    assert_eq!(
        manifest["database"]["facts"]["views"],
        serde_json::json!(["wp_titles"])
    );
    assert_eq!(
        manifest["database"]["facts"]["triggers"],
        serde_json::json!(["wp_meta_count"])
    );
    assert_eq!(
        manifest["database"]["facts"]["routines"],
        serde_json::json!(["PROCEDURE wp_count"])
    );
    let parts = manifest["database"]["summary"]["parts"].as_array().unwrap();
    assert!(
        !parts.is_empty()
            && parts
                .iter()
                .all(|p| p["sha256"].as_str().unwrap().len() == 64)
    );
    assert!(!manifest["wordpress_image"].as_str().unwrap().is_empty());
    // No scratch database is left, and the instance is still ACTIVE.
    assert_eq!(
        databases_like(&format!("{db}_")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Active
    );

    // The same id again is ALREADY_EXISTS.
    let again = cp
        .instances
        .create_backup(backup_request(&tenant, "first"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");

    // Deleted without an archive, the instance leaves nothing tagged behind — the
    // archiver's task definitions included (the deletion's verify step counts them).
    let deleted = cp.delete_skipping_archive(&tenant).await;
    cp.completed(&deleted).await;
    let cloud = cp.cloud(Environment::Dev).await;
    assert!(platform::inventory(&cloud, &tenant).await.is_empty());
}

/// Holds one step of every operation of `verb` until released.
struct Hold {
    verb: Verb,
    step: &'static str,
    reached: Notify,
    release: Notify,
}

#[async_trait]
impl StepHook for Hold {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == self.step && operation.verb == self.verb {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_while_another_operation_runs_is_aborted() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hold = Arc::new(Hold {
        verb: Verb::Restart,
        step: "wait_rollout",
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(hold.clone())).await;
    let tenant = provisioned(&mut cp, "bkbusy").await;
    let restart = cp
        .instances
        .restart_instance(v1::RestartInstanceRequest {
            name: instance_name(&tenant),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    hold.reached.notified().await;
    let refused = cp
        .instances
        .create_backup(backup_request(&tenant, "busy"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    let name = BackupName::parse(&format!("{}/backups/busy", instance_name(&tenant))).unwrap();
    assert!(
        cp.store.get_backup(&name).await.unwrap().is_none(),
        "nothing written"
    );
    hold.release.notify_one();
    cp.completed(&restart.name).await;
}

/// Fails `verify_dump` of backups for good, after its action ran.
struct VerifyFails;

#[async_trait]
impl StepHook for VerifyFails {
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if operation.verb == Verb::Backup && step == "verify_dump" {
            return Err(StepError::Fatal("injected: verify_dump failed".into()));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_leaves_no_object_and_no_scratch_database() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(VerifyFails))).await;
    let tenant = provisioned(&mut cp, "bkfail").await;
    let db = database(&tenant);
    fill(&db).await;
    let operation = cp
        .instances
        .create_backup(backup_request(&tenant, "doomed"))
        .await
        .unwrap()
        .into_inner();
    let (_, done) = cp.watch(&operation.name).await;
    assert!(
        matches!(
            done.result,
            Some(instance_manager::proto::google_longrunning::operation::Result::Error(_))
        ),
        "{done:?}"
    );
    let name = BackupName::parse(&format!("{}/backups/doomed", instance_name(&tenant))).unwrap();
    let backup = cp.store.get_backup(&name).await.unwrap().expect("kept");
    assert_eq!(backup.state, BackupState::Failed);
    assert!(
        backup
            .failure_reason
            .as_deref()
            .unwrap_or_default()
            .contains("verify_dump"),
        "{backup:?}"
    );
    assert_eq!(
        keys_under(&cp, &format!("backups/dev/{tenant}/wp/doomed/")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        databases_like(&format!("{db}_")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Active
    );
}

/// Before the archive of a deletion, reads the service's desired count with the ECS SDK.
struct SeeCountAtArchive {
    ecs: std::sync::OnceLock<(aws_sdk_ecs::Client, String, String)>,
    seen: std::sync::Mutex<Vec<i32>>,
}

#[async_trait]
impl StepHook for SeeCountAtArchive {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if operation.verb == Verb::Delete && step == "dump_database" {
            let (ecs, cluster, service) = self.ecs.get().expect("set before the delete");
            let found = ecs
                .describe_services()
                .cluster(cluster)
                .services(service)
                .send()
                .await
                .unwrap();
            let count = found.services()[0].desired_count();
            self.seen.lock().unwrap().push(count);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_stops_the_site_before_its_archive() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(SeeCountAtArchive {
        ecs: std::sync::OnceLock::new(),
        seen: std::sync::Mutex::new(Vec::new()),
    });
    let mut cp = platform::start(config, Some(hook.clone())).await;
    let tenant = provisioned(&mut cp, "bkoff").await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let stack = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Dev).stack;
    hook.ecs
        .set((
            aws_sdk_ecs::Client::new(&sdk),
            cloud.platform.cluster.clone(),
            stack,
        ))
        .unwrap();
    assert!(cp.instance(&tenant).await.desired_count > 0);
    let operation = cp.delete(&tenant).await;
    cp.completed(&operation).await;
    assert_eq!(*hook.seen.lock().unwrap(), vec![0]);
}

async fn restore(cp: &mut ControlPlane, tenant: &str, backup: &str) -> String {
    cp.instances
        .restore_instance(v1::RestoreInstanceRequest {
            name: instance_name(tenant),
            backup: format!("{}/backups/{backup}", instance_name(tenant)),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name
}

async fn backed_up(cp: &mut ControlPlane, tenant: &str, id: &str) {
    let operation = cp
        .instances
        .create_backup(backup_request(tenant, id))
        .await
        .unwrap()
        .into_inner();
    cp.completed(&operation.name).await;
}

async fn task_definition_database(cp: &ControlPlane, arn: &str) -> String {
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let found = ecs
        .describe_task_definition()
        .task_definition(arn)
        .send()
        .await
        .unwrap();
    let definition = found.task_definition().unwrap();
    definition.container_definitions()[0]
        .environment()
        .iter()
        .find(|e| e.name() == Some("WORDPRESS_DB_NAME"))
        .and_then(|e| e.value())
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_switches_to_a_verified_copy_and_drops_the_old_database() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "rs").await;
    let db = database(&tenant);
    // The WordPress-like database: ≥ 100 000 rows, emoji and right-to-left text, a
    // longtext of several MB, blobs, NULLs, zero dates, a view, a trigger, a procedure
    // and an event.
    common::wordpress::create_wordpress_like(&mut master_conn().await, &db).await;
    let original = table_sums(&db).await;
    let rows: u64 = original.values().map(|(count, _)| count).sum();
    assert!(rows >= 100_000, "{rows} rows");
    backed_up(&mut cp, &tenant, "good").await;
    // The live data damaged after the backup: rows changed, deleted and added, the view
    // dropped.
    let mut conn = master_conn().await;
    for statement in [
        format!("UPDATE `{db}`.wp_posts SET post_title = 'defaced' WHERE ID % 3 = 0"),
        format!("DELETE FROM `{db}`.wp_postmeta WHERE meta_id % 2 = 0"),
        format!("DELETE FROM `{db}`.wp_options WHERE option_name = 'all_bytes'"),
        format!("INSERT INTO `{db}`.wp_legacy VALUES (4, 'spam')"),
        format!("DROP VIEW `{db}`.wp_published"),
    ] {
        conn.query_drop(&statement).await.unwrap();
    }
    assert_ne!(table_sums(&db).await, original);
    let before = cp.instance(&tenant).await;

    let operation = restore(&mut cp, &tenant, "good").await;
    cp.completed(&operation).await;

    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    let live = after.resources["database"].clone();
    assert!(live.starts_with(&format!("{db}_r")), "{live}");
    assert_eq!(table_sums(&live).await, original);
    // The view, trigger, procedure and event, as information_schema lists them.
    let mut conn = master_conn().await;
    for (sql, expected) in [
        (
            "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ?",
            "wp_published",
        ),
        (
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
            "wp_postmeta_count",
        ),
        (
            "SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ?",
            "wp_count_meta",
        ),
        (
            "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ?",
            "wp_purge_transients",
        ),
    ] {
        let found: Vec<String> = conn.exec(sql, (&live,)).await.unwrap();
        assert_eq!(found, [expected], "{sql}");
    }
    // The old database is gone; the service runs a new revision on the restored one.
    assert_eq!(databases_like(&db).await, vec![live.clone()]);
    assert_ne!(
        after.resources["task_definition"],
        before.resources["task_definition"]
    );
    assert_eq!(
        task_definition_database(&cp, &after.resources["task_definition"]).await,
        live
    );
    // The tenant's own login reads the restored database.
    let cloud = cp.cloud(Environment::Dev).await;
    let secret = cloud
        .secrets
        .read_secret(&after.resources["secret"])
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(secret.expose()).unwrap();
    let master = platform::mariadb();
    let mut tenant_conn = mysql_async::Conn::new(
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(master.host.clone())
            .tcp_port(master.port)
            .user(value["username"].as_str())
            .pass(value["password"].as_str())
            .db_name(Some(live.clone())),
    )
    .await
    .unwrap();
    let posts: u64 = tenant_conn
        .query_first("SELECT COUNT(*) FROM wp_posts")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(posts, original["wp_posts"].0);

    // A later scale keeps the restored database, and deleting the instance drops it.
    let deleted = cp.delete(&tenant).await;
    cp.completed(&deleted).await;
    assert_eq!(databases_like(&db).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_backup_fails_the_restore_before_the_live_database_is_touched() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "rsbad").await;
    let db = database(&tenant);
    fill(&db).await;
    backed_up(&mut cp, &tenant, "spoiled").await;
    damage(&db).await;
    let live = table_sums(&db).await;
    let before = cp.instance(&tenant).await;
    // One byte of the dump changes in the bucket.
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let s3 = aws_sdk_s3::Client::new(&sdk);
    let key = format!("backups/dev/{tenant}/wp/spoiled/database.sql.gz");
    let mut body = s3
        .get_object()
        .bucket(&cloud.platform.archive_bucket)
        .key(&key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec();
    let middle = body.len() / 2;
    body[middle] ^= 0x01;
    s3.put_object()
        .bucket(&cloud.platform.archive_bucket)
        .key(&key)
        .body(body.into())
        .send()
        .await
        .unwrap();

    let operation = restore(&mut cp, &tenant, "spoiled").await;
    let (events, done) = cp.watch(&operation).await;
    let Some(instance_manager::proto::google_longrunning::operation::Result::Error(error)) =
        done.result
    else {
        panic!("not failed: {done:?}");
    };
    assert!(error.message.contains("sha256"), "{error:?}");
    assert!(
        events
            .iter()
            .all(|e| e.step != "restore_database" || e.step_status() != v1::StepStatus::Running),
        "the database step never started: {events:#?}"
    );
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert_eq!(after.resources, before.resources);
    assert_eq!(table_sums(&db).await, live);
    assert_eq!(
        databases_like(&format!("{db}_")).await,
        Vec::<String>::new()
    );
}

/// Fails `wait_rollout` of restores for good, after the service was switched.
struct RolloutFails;

#[async_trait]
impl StepHook for RolloutFails {
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if operation.verb == Verb::Restore && step == "wait_rollout" {
            return Err(StepError::Fatal(
                "injected: the new tasks never became healthy".into(),
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_fails_after_the_switch_puts_everything_back() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, Some(Arc::new(RolloutFails))).await;
    let tenant = provisioned(&mut cp, "rsback").await;
    let db = database(&tenant);
    fill(&db).await;
    backed_up(&mut cp, &tenant, "b1").await;
    damage(&db).await;
    let live = table_sums(&db).await;
    let before = cp.instance(&tenant).await;

    let operation = restore(&mut cp, &tenant, "b1").await;
    let (events, done) = cp.watch(&operation).await;
    assert!(
        matches!(
            done.result,
            Some(instance_manager::proto::google_longrunning::operation::Result::Error(_))
        ),
        "{events:#?}"
    );
    let after = cp.instance(&tenant).await;
    assert_eq!(after.state(), v1::InstanceState::Active);
    assert!(after.failure_reason.starts_with("restore: "), "{after:?}");
    assert_eq!(after.resources, before.resources);
    // The service is back on the revision that names the live database, which is as it was.
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = platform::account_sdk(&cloud).await;
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let services = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(&before.resources["service"])
        .send()
        .await
        .unwrap();
    let running = services.services()[0].task_definition().unwrap().to_owned();
    assert_eq!(running, before.resources["task_definition"]);
    assert_eq!(task_definition_database(&cp, &running).await, db);
    assert_eq!(table_sums(&db).await, live);
    assert_eq!(
        databases_like(&format!("{db}_")).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offboarding_archive_is_a_backup_a_new_instance_of_the_tenant_restores() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = provisioned(&mut cp, "rsoff").await;
    let db = database(&tenant);
    fill(&db).await;
    let original = table_sums(&db).await;
    let deleted = cp.delete(&tenant).await;
    cp.completed(&deleted).await;
    assert_eq!(databases_like(&db).await, Vec::<String>::new());

    // The final archive is listed with the deleted instance's backups, READY.
    let listed = cp
        .instances
        .list_backups(v1::ListBackupsRequest {
            parent: instance_name(&tenant),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let [archive] = listed.backups.as_slice() else {
        panic!("not one backup: {listed:?}");
    };
    assert_eq!(archive.state(), v1::BackupState::Ready);
    assert!(
        archive.name.contains("/backups/offboarding-"),
        "{}",
        archive.name
    );

    // A new instance of the tenant (another id: the deleted one keeps its name) gets the
    // data back.
    let created = cp.create_named(&tenant, "wp2", v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let restored = cp
        .instances
        .restore_instance(v1::RestoreInstanceRequest {
            name: format!("tenants/{tenant}/instances/wp2"),
            backup: archive.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    cp.completed(&restored.name).await;
    let instance = cp.instance_named(&tenant, "wp2").await;
    let live = instance.resources["database"].clone();
    assert!(live.starts_with(&format!("{db}_r")), "{live}");
    assert_eq!(table_sums(&live).await, original);
    assert_eq!(databases_like(&db).await, vec![live]);
}
