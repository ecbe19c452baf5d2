//! Restoring an instance from one of its tenant's backups (RestoreInstance). The live
//! database is never written to: the dump goes into a fresh database, which is verified
//! against the facts the backup recorded, and only then does the service switch to it (a
//! new task-definition revision whose `WORDPRESS_DB_NAME` names it). wp-content is staged
//! beside the live files and swapped in. The old database and files are removed only when
//! everything else succeeded; until then any failure puts the instance back as it was.
//!
//! Steps:
//! - `check_backup`: the Backup is READY, of this tenant and environment; its manifest is
//!   read and the sha256 of the dump (and of the content archive) is checked by streaming
//!   the objects, before anything is touched.
//! - `restore_database` ∥ `stage_content`: the dump into `{db}_r{op}` (claimed for this
//!   instance first); the archiver task extracts the content archive into
//!   `.im-restore-{op}` in wp-content (checking its sha256 again as it streams).
//! - `verify_database`: row counts, `CHECKSUM TABLE`, collations, views, triggers, routines
//!   and events of the new database equal the backup's recorded facts; the tenant's user
//!   is granted the new database.
//! - `task_definition`: a revision like the current one, on the new database.
//! - `swap_content` ∥ `update_service`: the staged files replace the live ones (the live
//!   ones kept aside); the service rolls to the new revision.
//! - `wait_rollout`, then `health_check` (an ACTIVE instance's restore fails if the
//!   instance is UNHEALTHY afterwards; a SUSPENDED one runs no task and is not checked).
//! - `remove_previous`: the previous database is dropped and the set-aside files removed.
//!   Best effort: after the switch a failure here must not roll back onto a database that
//!   may be gone, so it is reported in the step's output and logged instead.
//!
//! Rollback, newest first: the service back on the previous revision (which names the
//! previous database), the files swapped back, the new database dropped and its claim
//! released, the staging directory removed.

use std::time::Duration;

use async_trait::async_trait;

use crate::backup::{self, DumpTools};
use crate::cloud::settings::Secret;
use crate::cloud::{CloudEnv, DatabaseClaim};
use crate::domain::{Backup, BackupName, BackupState, Instance, InstanceState, Operation, Verb};

use super::backup::{
    CONTENT_OBJECT, Location, MANIFEST_OBJECT, Manifest, NO_CONTENT, await_task, get_json,
    live_database, operation_database, start_content,
};
use super::provision::{
    ACCESS_POINT, DATABASE, SECRET, TASK_DEFINITION, master_credentials, task_definition_spec,
};
use super::rollout::{self, Previous, Size, Target};
use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const CHECK_BACKUP: &str = "check_backup";
pub const RESTORE_DATABASE: &str = "restore_database";
pub const STAGE_CONTENT: &str = "stage_content";
pub const VERIFY_DATABASE: &str = "verify_database";
pub const SWAP_CONTENT: &str = "swap_content";
pub const HEALTH_CHECK: &str = "health_check";
pub const HEALTH_BEFORE: &str = "health_before";
pub const REMOVE_PREVIOUS: &str = "remove_previous";

/// The params of a restore: the backup, the database and revision to go back to, and the
/// rollout's target (the instance's own size) and timeout.
pub fn params(
    backup: &BackupName,
    instance: &Instance,
    rollout_timeout: Option<Duration>,
) -> serde_json::Value {
    let mut params = rollout::params(
        &Target::size(Size::of(instance)),
        &Previous::of(instance),
        rollout_timeout,
    );
    params["backup"] = serde_json::json!(backup.to_string());
    params["previous_database"] = serde_json::json!(instance.resources.get(DATABASE));
    params
}

fn from_suspended(operation: &Operation) -> bool {
    operation.params["from_state"].as_str() == Some("SUSPENDED")
}

pub struct Restore;

#[async_trait]
impl Workflow for Restore {
    fn verb(&self) -> Verb {
        Verb::Restore
    }

    fn plan(&self, operation: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        let mut stages = vec![
            if from_suspended(operation) {
                vec![CHECK_BACKUP]
            } else {
                vec![CHECK_BACKUP, HEALTH_BEFORE]
            },
            vec![RESTORE_DATABASE, STAGE_CONTENT],
            vec![VERIFY_DATABASE],
            vec![TASK_DEFINITION],
            vec![SWAP_CONTENT, rollout::UPDATE_SERVICE],
            vec![rollout::WAIT_ROLLOUT],
        ];
        if !from_suspended(operation) {
            stages.push(vec![HEALTH_CHECK]);
        }
        stages.push(vec![REMOVE_PREVIOUS]);
        stages
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            CHECK_BACKUP => check_backup(ctx).await.map(Some),
            RESTORE_DATABASE => restore_database(ctx).await.map(Some),
            STAGE_CONTENT => stage_content(ctx).await.map(Some),
            VERIFY_DATABASE => verify_database(ctx).await.map(Some),
            TASK_DEFINITION => register_revision(ctx).await.map(Some),
            SWAP_CONTENT => content_task(ctx, "swap").await.map(Some),
            rollout::UPDATE_SERVICE | rollout::WAIT_ROLLOUT => rollout::run(ctx, step).await,
            HEALTH_BEFORE => Ok(Some(passing(&health_report(ctx, false).await).join(","))),
            HEALTH_CHECK => health_check(ctx).await.map(Some),
            REMOVE_PREVIOUS => Ok(Some(remove_previous(ctx).await)),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            rollout::UPDATE_SERVICE => rollout::undo(ctx, step).await,
            // Puts the set-aside files back and removes the staging directory.
            SWAP_CONTENT | STAGE_CONTENT => content_task(ctx, "unswap").await.map(drop),
            RESTORE_DATABASE => drop_new_database(ctx).await,
            _ => Ok(()),
        }
    }

    fn rolls_back(&self) -> bool {
        true
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Restoring
    }

    fn on_complete(&self, instance: &mut Instance, operation: &Operation, _: &CloudEnv) -> bool {
        if let Some(database) = output(operation, RESTORE_DATABASE) {
            instance.resources.insert(DATABASE.into(), database);
        }
        if let Some(revision) = output(operation, TASK_DEFINITION) {
            instance.resources.insert(TASK_DEFINITION.into(), revision);
        }
        instance.state = if from_suspended(operation) {
            InstanceState::Suspended
        } else {
            InstanceState::Active
        };
        instance.failure_reason = None;
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = match (failure.rolled_back, failure.from_state) {
            (true, Some(InstanceState::Suspended)) => InstanceState::Suspended,
            (true, _) => InstanceState::Active,
            (false, _) => InstanceState::Failed,
        };
        instance.failure_reason = Some(format!("restore: {}", failure.message));
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(4 * 60 * 60)
    }

    fn on_retry(&self, operation: &mut Operation, instance: &Instance) {
        rollout::refresh_previous(operation, instance);
    }
}

fn output(operation: &Operation, step: &str) -> Option<String> {
    operation
        .steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| s.resource_id.clone())
}

async fn load_backup(ctx: &StepCtx) -> StepResult<(Backup, Location)> {
    let name = super::backup::backup_name(&ctx.operation)?;
    let backup = ctx
        .store
        .get_backup(&name)
        .await?
        .ok_or_else(|| StepError::Fatal(format!("{name} is gone")))?;
    let at = Location::of(ctx, &backup)?;
    Ok((backup, at))
}

async fn manifest(ctx: &StepCtx, at: &Location) -> StepResult<Manifest> {
    get_json(ctx, &at.bucket, &at.key(MANIFEST_OBJECT)).await
}

/// Reads an object's key back from its `s3://bucket/key` URI, refusing another bucket.
fn key_of<'a>(uri: &'a str, at: &Location) -> StepResult<&'a str> {
    uri.strip_prefix(&format!("s3://{}/", at.bucket))
        .ok_or_else(|| {
            StepError::Fatal(format!("{uri} is not in the archive bucket {}", at.bucket))
        })
}

async fn check_backup(ctx: &StepCtx) -> StepResult<String> {
    let (backup, at) = load_backup(ctx).await?;
    if backup.state != BackupState::Ready {
        return Err(StepError::Fatal(format!(
            "{} is {}, not READY",
            backup.name,
            backup.state.as_str()
        )));
    }
    if backup.name.instance.tenant != ctx.instance.name.tenant
        || backup.environment != ctx.instance.spec.environment
    {
        return Err(StepError::Fatal(format!(
            "{} is not a backup of this tenant in {}",
            backup.name, ctx.instance.spec.environment
        )));
    }
    let manifest = manifest(ctx, &at).await?;
    let objects = ctx.cloud.objects.as_ref();
    let database_key = key_of(&manifest.database.object, &at)?;
    let mut bytes = backup::verify_object(
        objects,
        &at.bucket,
        database_key,
        &manifest.database.summary.sha256,
    )
    .await?;
    if let Some(content) = &manifest.content {
        bytes += backup::verify_object(
            objects,
            &at.bucket,
            key_of(&content.object, &at)?,
            &content.sha256,
        )
        .await?;
    }
    Ok(format!("{} verified: {bytes} bytes", backup.name))
}

/// The fresh database of this restore.
fn new_database(ctx: &StepCtx) -> String {
    operation_database(ctx, 'r')
}

async fn restore_database(ctx: &StepCtx) -> StepResult<String> {
    let (_, at) = load_backup(ctx).await?;
    let manifest = manifest(ctx, &at).await?;
    let master = master_credentials(ctx).await?;
    let database = new_database(ctx);
    if database == live_database(ctx) {
        return Err(StepError::Fatal(format!("{database} is the live database")));
    }
    let claim = ctx
        .cloud
        .database
        .claim_schema(&master, &database, &ctx.names.database_user, &ctx.owner())
        .await?;
    if let DatabaseClaim::Theirs(holder) = claim {
        return Err(StepError::Fatal(format!(
            "database {database} exists and belongs to {holder}"
        )));
    }
    // Ours: a resumed attempt may have left part of a restore.
    ctx.cloud.database.drop_schema(&master, &database).await?;
    backup::restore_from(
        &DumpTools::from_platform(&ctx.cloud.platform),
        &master,
        ctx.cloud.objects.as_ref(),
        &at.bucket,
        key_of(&manifest.database.object, &at)?,
        &manifest.database.summary.sha256,
        &database,
    )
    .await?;
    Ok(database)
}

async fn drop_new_database(ctx: &StepCtx) -> StepResult<()> {
    let database = new_database(ctx);
    if database == live_database(ctx) {
        return Ok(());
    }
    let master = master_credentials(ctx).await?;
    let owner = ctx
        .cloud
        .database
        .database_owner(&master, &database)
        .await?;
    if owner.as_deref() == Some(ctx.owner().as_str()) {
        ctx.cloud.database.drop_schema(&master, &database).await?;
        ctx.cloud
            .database
            .release_database(&master, &database, &ctx.owner())
            .await?;
    }
    Ok(())
}

async fn stage_content(ctx: &StepCtx) -> StepResult<String> {
    let (_, at) = load_backup(ctx).await?;
    match manifest(ctx, &at).await?.content {
        None => Ok(NO_CONTENT.into()),
        Some(content) => {
            if key_of(&content.object, &at)? != at.key(CONTENT_OBJECT) {
                return Err(StepError::Fatal(format!(
                    "unexpected content object {}",
                    content.object
                )));
            }
            content_task(ctx, "stage").await
        }
    }
}

/// Runs the archiver in `mode` on this instance's content and waits for it. `NO_CONTENT`
/// when the backup has no content archive (or the instance no access point).
async fn content_task(ctx: &StepCtx, mode: &str) -> StepResult<String> {
    if ctx.output(STAGE_CONTENT) == Some(NO_CONTENT) && mode != "stage" {
        return Ok(NO_CONTENT.into());
    }
    let (_, at) = load_backup(ctx).await?;
    let sha = match &manifest(ctx, &at).await?.content {
        Some(content) => content.sha256.clone(),
        None => return Ok(NO_CONTENT.into()),
    };
    let task = start_content(ctx, &at, mode, &[("EXPECTED_SHA256", &sha)]).await?;
    if task == NO_CONTENT {
        return Ok(task);
    }
    await_task(ctx, &task, &format!("content {mode}")).await?;
    Ok(task)
}

async fn verify_database(ctx: &StepCtx) -> StepResult<String> {
    let (_, at) = load_backup(ctx).await?;
    let manifest = manifest(ctx, &at).await?;
    let master = master_credentials(ctx).await?;
    let database = ctx.require_output(RESTORE_DATABASE)?.to_owned();
    let facts = backup::database_facts(&master, &database).await?;
    let differences = backup::differences(&manifest.database.facts, &facts);
    if !differences.is_empty() {
        return Err(StepError::Fatal(format!(
            "the restored database {database} differs from the backup: {}",
            differences.join("; ")
        )));
    }
    // The tenant's login gets the new database (its password stays what the secret says).
    let secret = ctx
        .cloud
        .secrets
        .read_secret(
            ctx.instance
                .resources
                .get(SECRET)
                .ok_or_else(|| StepError::Fatal("the instance recorded no secret".into()))?,
        )
        .await?;
    let value: serde_json::Value = serde_json::from_str(secret.expose())
        .map_err(|_| StepError::Fatal("the tenant secret is not JSON".into()))?;
    let password = value["password"]
        .as_str()
        .map(|p| Secret::new(p.to_owned()))
        .ok_or_else(|| StepError::Fatal("the tenant secret has no password".into()))?;
    ctx.cloud
        .database
        .ensure_tenant_database(
            &master,
            &database,
            &ctx.names.database_user,
            &password,
            ctx.cloud.platform.db_require_tls,
        )
        .await?;
    Ok(format!("{} tables as recorded", facts.tables.len()))
}

async fn register_revision(ctx: &StepCtx) -> StepResult<String> {
    let resource = |key: &str| {
        ctx.instance
            .resources
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| StepError::Fatal(format!("the instance recorded no {key}")))
    };
    let spec = &ctx.instance.spec;
    let mut definition = task_definition_spec(
        ctx,
        spec.cpu,
        spec.memory_mib,
        resource(ACCESS_POINT)?,
        resource(SECRET)?,
    );
    definition.db_name = ctx.require_output(RESTORE_DATABASE)?.to_owned();
    Ok(ctx
        .cloud
        .compute
        .register_task_definition(&definition)
        .await?)
}

/// The instance's health report, before the switch or (with `restored`) on the restored
/// database.
async fn health_report(ctx: &StepCtx, restored: bool) -> crate::health::Report {
    let mut instance = ctx.instance.clone();
    instance.state = InstanceState::Active;
    if restored && let Some(database) = ctx.output(RESTORE_DATABASE) {
        instance
            .resources
            .insert(DATABASE.into(), database.to_owned());
    }
    let settings = crate::health::HealthSettings::default();
    let deadline = tokio::time::Instant::now() + settings.overall;
    crate::health::check(&instance, &ctx.cloud, &settings, deadline).await
}

/// The checks that are not UNHEALTHY.
fn passing(report: &crate::health::Report) -> Vec<&'static str> {
    report
        .checks
        .iter()
        .filter(|c| c.status != crate::health::Status::Unhealthy)
        .map(|c| c.name)
        .collect()
}

/// Fails when a check that passed before the restore (`health_before`) is UNHEALTHY now:
/// the restore must not break what worked. (What was already broken, the restore is not
/// judged by; the step's output names it.)
async fn health_check(ctx: &StepCtx) -> StepResult<String> {
    let before: Vec<&str> = ctx
        .output(HEALTH_BEFORE)
        .unwrap_or_default()
        .split(',')
        .filter(|name| !name.is_empty())
        .collect();
    let report = health_report(ctx, true).await;
    let broken: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.status == crate::health::Status::Unhealthy && before.contains(&c.name))
        .map(|c| format!("{}: {}", c.name, c.reason))
        .collect();
    if !broken.is_empty() {
        return Err(StepError::Fatal(format!(
            "the restored instance is unhealthy: {}",
            broken.join("; ")
        )));
    }
    let still: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == crate::health::Status::Unhealthy)
        .map(|c| c.name)
        .collect();
    Ok(if still.is_empty() {
        format!("{:?}", report.overall).to_lowercase()
    } else {
        format!(
            "nothing broken; unhealthy before and after: {}",
            still.join(", ")
        )
    })
}

/// Drops the previous database and removes the set-aside files; never fails (see the
/// module documentation): what could not be removed is named in the output.
async fn remove_previous(ctx: &StepCtx) -> String {
    let mut notes = Vec::new();
    let previous = live_database(ctx);
    let new = ctx.output(RESTORE_DATABASE).unwrap_or_default().to_owned();
    if !new.is_empty() && previous != new {
        let dropped = async {
            let master = master_credentials(ctx).await?;
            ctx.cloud.database.drop_schema(&master, &previous).await?;
            ctx.cloud
                .database
                .release_database(&master, &previous, &ctx.owner())
                .await?;
            StepResult::Ok(())
        }
        .await;
        match dropped {
            Ok(()) => notes.push(format!("dropped {previous}")),
            Err(error) => {
                tracing::warn!(database = %previous, error = error.message(), "the previous database is left behind");
                notes.push(format!("left {previous}: {}", error.message()));
            }
        }
    }
    match content_task(ctx, "cleanup").await {
        Ok(task) if task == NO_CONTENT => {}
        Ok(_) => {
            notes.push("previous files removed".into());
            if let Err(error) = super::backup::forget_archiver(ctx).await {
                notes.push(format!("archiver revisions left: {}", error.message()));
            }
        }
        Err(error) => {
            tracing::warn!(
                error = error.message(),
                "the previous wp-content files are left behind"
            );
            notes.push(format!("previous files left: {}", error.message()));
        }
    }
    notes.join("; ")
}
