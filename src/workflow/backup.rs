//! Backing up an instance (CreateBackup, and the final archive of a DeleteInstance): the
//! tenant database as a consistent logical dump and wp-content as a tar.gz, each streamed
//! into the environment's archive bucket, with a manifest beside them. The instance keeps
//! serving (its state does not change); no other operation runs on it meanwhile.
//!
//! Objects, under `backups/{env}/{tenant}/{instance}/{backup}/`:
//! - `database.sql.gz` — `mariadb-dump`/`mysqldump --single-transaction` → gzip →
//!   multipart upload, run by the control plane ([`crate::backup::dump_to`]);
//!   `database.json` — its summary (sizes, sha256 of the object and of every part, server
//!   version);
//! - `facts.json` — what the dump holds, measured by restoring it into a scratch database
//!   and reading row counts, `CHECKSUM TABLE`, collations, views, triggers, routines and
//!   events there (so every READY backup has been restored once, and a restore compares
//!   against exactly what the dump contains, not the live database of a moment later);
//! - `wp-content.tar.gz` and `wp-content.tar.gz.json` (sha256, size) — written by the
//!   archiver task ([`crate::backup::content`]) through the instance's access point;
//! - `manifest.json` — all of the above, the WordPress image, the instance's spec and times.
//!
//! Steps: `open_backup` → `dump_database` ∥ `start_content_backup` → `verify_dump` ∥
//! `await_content_backup` → `write_manifest` (which also marks the Backup READY). A failure
//! rolls back: the undo of `open_backup` (the last to run) removes every object under the
//! prefix and marks the Backup FAILED with the reason; the scratch database is dropped by
//! the undo of `verify_dump`.

use std::time::Duration;

use async_trait::async_trait;

use crate::backup::content::{self, ContentSummary};
use crate::backup::{self, DatabaseFacts, DumpSummary, DumpTools};
use crate::cloud::aws::WP_CONTENT_PATH;
use crate::cloud::{CloudEnv, DEFAULT_PART_SIZE, OneOffTaskSpec};
use crate::domain::{
    Backup, BackupName, BackupOrigin, BackupState, Instance, InstanceState, Operation, Timestamp,
    Verb,
};
use crate::store::Write;

use super::provision::{ACCESS_POINT, DATABASE, master_credentials};
use super::{Failure, StepCtx, StepError, StepResult, Workflow};

pub const OPEN_BACKUP: &str = "open_backup";
pub const DUMP_DATABASE: &str = "dump_database";
pub const START_CONTENT_BACKUP: &str = "start_content_backup";
pub const VERIFY_DUMP: &str = "verify_dump";
pub const AWAIT_CONTENT_BACKUP: &str = "await_content_backup";
pub const WRITE_MANIFEST: &str = "write_manifest";

/// What `start_content_backup` records when the instance owns no access point.
pub const NO_CONTENT: &str = "none";

pub const DATABASE_OBJECT: &str = "database.sql.gz";
pub const DATABASE_SUMMARY: &str = "database.json";
pub const FACTS_OBJECT: &str = "facts.json";
pub const CONTENT_OBJECT: &str = "wp-content.tar.gz";
pub const MANIFEST_OBJECT: &str = "manifest.json";

/// The params of a backup operation.
pub fn params(backup: &BackupName) -> serde_json::Value {
    serde_json::json!({ "backup": backup.to_string() })
}

pub fn backup_name(operation: &Operation) -> StepResult<BackupName> {
    operation.params["backup"]
        .as_str()
        .and_then(|name| BackupName::parse(name).ok())
        .ok_or_else(|| StepError::Fatal("the operation names no valid backup".into()))
}

/// The manifest of a READY backup (`manifest.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub backup: String,
    pub instance: String,
    pub operation: String,
    pub origin: crate::domain::BackupOrigin,
    pub created_at_ms: i64,
    pub completed_at_ms: i64,
    pub wordpress_image: String,
    pub spec: crate::domain::InstanceSpec,
    pub database: DatabaseManifest,
    /// Absent when the instance had no content (no access point of its own).
    pub content: Option<ContentManifest>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatabaseManifest {
    pub object: String,
    pub dump_program: String,
    pub summary: DumpSummary,
    pub facts: DatabaseFacts,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ContentManifest {
    pub object: String,
    pub sha256: String,
    pub bytes: u64,
}

pub struct BackupWorkflow;

#[async_trait]
impl Workflow for BackupWorkflow {
    fn verb(&self) -> Verb {
        Verb::Backup
    }

    fn plan(&self, _: &Operation, _: &Instance, _: &CloudEnv) -> Vec<Vec<&'static str>> {
        vec![
            vec![OPEN_BACKUP],
            vec![DUMP_DATABASE, START_CONTENT_BACKUP],
            vec![VERIFY_DUMP, AWAIT_CONTENT_BACKUP],
            vec![WRITE_MANIFEST],
        ]
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        let backup = load(ctx).await?;
        let at = Location::of(ctx, &backup)?;
        match step {
            OPEN_BACKUP => open(ctx, backup, &at).await.map(Some),
            DUMP_DATABASE => dump_database(ctx, &at, backup.origin).await.map(Some),
            START_CONTENT_BACKUP => start_content(ctx, &at, "backup", &[]).await.map(Some),
            VERIFY_DUMP => verify_dump(ctx, &at).await.map(Some),
            AWAIT_CONTENT_BACKUP => await_content_backup(ctx, &at, START_CONTENT_BACKUP)
                .await
                .map(Some),
            WRITE_MANIFEST => write_manifest(ctx, backup, &at).await.map(Some),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, _: Option<&str>) -> StepResult<()> {
        match step {
            VERIFY_DUMP => drop_scratch(ctx).await,
            OPEN_BACKUP => abandon(ctx).await,
            _ => Ok(()),
        }
    }

    fn rolls_back(&self) -> bool {
        true
    }

    /// The instance keeps its state (ACTIVE or SUSPENDED): a backup changes nothing on it.
    fn running_state(&self) -> InstanceState {
        InstanceState::Active
    }

    fn running_state_for(&self, current: InstanceState) -> InstanceState {
        current
    }

    fn on_complete(&self, _: &mut Instance, _: &Operation, _: &CloudEnv) -> bool {
        false
    }

    /// A failed backup changes nothing on the instance (the Backup says why it failed).
    fn on_fail(&self, _: &mut Instance, _: &Failure<'_>) -> bool {
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(4 * 60 * 60)
    }
}

/// Where a backup's objects go.
pub struct Location {
    pub bucket: String,
    pub prefix: String,
}

impl Location {
    pub fn of(ctx: &StepCtx, backup: &Backup) -> StepResult<Self> {
        let bucket = ctx.cloud.platform.archive_bucket.clone();
        let prefix = Backup::key_prefix(backup.environment, &backup.name);
        // Empty until the backup opens (the request is accepted without reaching AWS).
        if !backup.location.is_empty() && backup.location != format!("s3://{bucket}/{prefix}") {
            return Err(StepError::Fatal(format!(
                "the backup lives at {}, not in this environment's archive bucket {bucket}",
                backup.location
            )));
        }
        Ok(Self { bucket, prefix })
    }

    pub fn key(&self, object: &str) -> String {
        format!("{}{object}", self.prefix)
    }

    pub fn uri(&self, object: &str) -> String {
        format!("s3://{}/{}{object}", self.bucket, self.prefix)
    }
}

async fn load(ctx: &StepCtx) -> StepResult<Backup> {
    let name = backup_name(&ctx.operation)?;
    ctx.store
        .get_backup(&name)
        .await?
        .ok_or_else(|| StepError::Fatal(format!("{name} is gone")))
}

/// Checks the record can be written and records where its objects go.
async fn open(ctx: &StepCtx, mut backup: Backup, at: &Location) -> StepResult<String> {
    let location = format!("s3://{}/{}", at.bucket, at.prefix);
    match backup.state {
        BackupState::Creating | BackupState::Ready => {}
        other => {
            return Err(StepError::Fatal(format!(
                "{} is {}, not CREATING",
                backup.name,
                other.as_str()
            )));
        }
    }
    if backup.location.is_empty() {
        backup.location = location.clone();
        backup.updated_at = Timestamp::now();
        ctx.store
            .commit(vec![Write::UpdateBackup(backup)])
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict { .. } => {
                    StepError::Transient("the backup record changed meanwhile".into())
                }
                other => other.into(),
            })?;
    }
    Ok(location)
}

/// The database the instance serves from: the one a restore switched it to, or the
/// provisioned one.
pub fn live_database(ctx: &StepCtx) -> String {
    ctx.instance
        .resources
        .get(DATABASE)
        .cloned()
        .unwrap_or_else(|| ctx.names.database.clone())
}

/// A database name of this operation: the tenant database's name and a suffix, fitted to
/// MySQL's 64 characters.
pub fn operation_database(ctx: &StepCtx, tag: char) -> String {
    ctx.names.operation_database(tag, ctx.operation.id.as_str())
}

/// Streams the dump into `database.sql.gz` and writes its summary beside it.
async fn dump_database(ctx: &StepCtx, at: &Location, origin: BackupOrigin) -> StepResult<String> {
    let master = master_credentials(ctx).await?;
    let database = live_database(ctx);
    if origin == BackupOrigin::Offboarding {
        // A FAILED instance may be deleted before it ever had a database (or after a
        // sibling took the name): its final archive says so instead of failing.
        let ours = ctx
            .cloud
            .database
            .database_owner(&master, &database)
            .await?
            .is_some_and(|owner| owner == ctx.owner());
        if !ours
            || !ctx
                .cloud
                .database
                .database_exists(&master, &database)
                .await?
        {
            return placeholder_dump(ctx, at).await;
        }
    }
    let tools = DumpTools::from_platform(&ctx.cloud.platform);
    let summary = backup::dump_to(
        &tools,
        &master,
        &database,
        ctx.cloud.objects.as_ref(),
        &at.bucket,
        &at.key(DATABASE_OBJECT),
        &ctx.tags("backup"),
        DEFAULT_PART_SIZE,
    )
    .await?;
    put_json(ctx, at, DATABASE_SUMMARY, &summary).await?;
    Ok(at.uri(DATABASE_OBJECT))
}

/// A dump that restores to an empty database, for an instance that had none.
async fn placeholder_dump(ctx: &StepCtx, at: &Location) -> StepResult<String> {
    use sha2::Digest as _;
    use std::io::Write as _;
    let text = b"-- this instance had no database of its own when it was deleted\n";
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(text)
        .map_err(|e| StepError::Fatal(format!("cannot compress the placeholder: {e}")))?;
    let body = encoder
        .finish()
        .map_err(|e| StepError::Fatal(format!("cannot compress the placeholder: {e}")))?;
    let summary = DumpSummary {
        uncompressed_bytes: text.len() as u64,
        compressed_bytes: body.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&body)),
        server_version: "none".into(),
        parts: Vec::new(),
    };
    ctx.cloud
        .objects
        .put_object(
            &at.bucket,
            &at.key(DATABASE_OBJECT),
            body,
            &ctx.tags("backup"),
        )
        .await?;
    put_json(ctx, at, DATABASE_SUMMARY, &summary).await?;
    Ok(at.uri(DATABASE_OBJECT))
}

async fn put_json(
    ctx: &StepCtx,
    at: &Location,
    object: &str,
    value: &impl serde::Serialize,
) -> StepResult<()> {
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| StepError::Fatal(format!("cannot encode {object}: {e}")))?;
    ctx.cloud
        .objects
        .put_object(&at.bucket, &at.key(object), body, &ctx.tags("backup"))
        .await?;
    Ok(())
}

/// Reads a small JSON object of the backup (a summary or the manifest).
pub async fn get_json<T: serde::de::DeserializeOwned>(
    ctx: &StepCtx,
    bucket: &str,
    key: &str,
) -> StepResult<T> {
    use tokio::io::AsyncReadExt as _;
    let mut reader = ctx.cloud.objects.download_stream(bucket, key).await?;
    let mut body = Vec::new();
    // Summaries are small; refuse anything that is not.
    let read = (&mut reader)
        .take(16 * 1024 * 1024)
        .read_to_end(&mut body)
        .await
        .map_err(|e| StepError::Transient(format!("reading s3://{bucket}/{key}: {e}")))?;
    if read >= 16 * 1024 * 1024 {
        return Err(StepError::Fatal(format!(
            "s3://{bucket}/{key} is too large"
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| StepError::Fatal(format!("s3://{bucket}/{key} is not valid: {e}")))
}

/// Restores the dump into a scratch database, measures it and drops it: `facts.json`.
async fn verify_dump(ctx: &StepCtx, at: &Location) -> StepResult<String> {
    let master = master_credentials(ctx).await?;
    let summary: DumpSummary = get_json(ctx, &at.bucket, &at.key(DATABASE_SUMMARY)).await?;
    let scratch = operation_database(ctx, 'v');
    // A resumed attempt may have left a partial scratch copy.
    ctx.cloud.database.drop_schema(&master, &scratch).await?;
    let tools = DumpTools::from_platform(&ctx.cloud.platform);
    let restored = backup::restore_from(
        &tools,
        &master,
        ctx.cloud.objects.as_ref(),
        &at.bucket,
        &at.key(DATABASE_OBJECT),
        &summary.sha256,
        &scratch,
    )
    .await;
    let facts = match restored {
        Ok(_) => backup::database_facts(&master, &scratch).await,
        Err(error) => Err(error),
    };
    ctx.cloud.database.drop_schema(&master, &scratch).await?;
    let facts =
        facts.map_err(|e| StepError::Fatal(format!("the dump does not restore: {}", e.message)))?;
    put_json(ctx, at, FACTS_OBJECT, &facts).await?;
    Ok(format!(
        "{} tables, {} views, {} triggers, {} routines, {} events",
        facts.tables.len(),
        facts.views.len(),
        facts.triggers.len(),
        facts.routines.len(),
        facts.events.len()
    ))
}

async fn drop_scratch(ctx: &StepCtx) -> StepResult<()> {
    let master = master_credentials(ctx).await?;
    ctx.cloud
        .database
        .drop_schema(&master, &operation_database(ctx, 'v'))
        .await?;
    Ok(())
}

pub fn archiver_family(ctx: &StepCtx) -> String {
    format!("{}-archiver", ctx.names.stack)
}

/// The instance's own access point (tagged with its owner tags), if any.
pub async fn own_access_point(ctx: &StepCtx) -> StepResult<Option<String>> {
    let platform = &ctx.cloud.platform;
    let ours = ctx
        .cloud
        .files
        .find_tagged(&platform.file_system_id, &ctx.component_tags("efs"))
        .await?;
    let recorded = ctx.instance.resources.get(ACCESS_POINT);
    Ok(recorded
        .filter(|id| ours.contains(*id))
        .or_else(|| ours.first())
        .cloned())
}

/// Starts the archiver task in `mode` (see [`crate::backup::content`]) on the instance's
/// access point; [`NO_CONTENT`] when it has none. One task per (operation, attempt, mode),
/// however often the step is resumed (RunTask's client token).
pub async fn start_content(
    ctx: &StepCtx,
    at: &Location,
    mode: &str,
    extra: &[(&str, &str)],
) -> StepResult<String> {
    let platform = &ctx.cloud.platform;
    let Some(access_point) = own_access_point(ctx).await? else {
        return Ok(NO_CONTENT.into());
    };
    let mut environment = vec![
        ("MODE".to_owned(), mode.to_owned()),
        ("OPERATION".to_owned(), ctx.operation.id.to_string()),
        ("ARCHIVE_BUCKET".to_owned(), at.bucket.clone()),
        ("ARCHIVE_KEY".to_owned(), at.key(CONTENT_OBJECT)),
        ("CONTENT_DIR".to_owned(), WP_CONTENT_PATH.to_owned()),
    ];
    environment.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let spec = OneOffTaskSpec {
        cluster: platform.cluster.clone(),
        family: archiver_family(ctx),
        image: platform.archiver_image.clone(),
        command: vec!["sh".into(), "-c".into(), content::SCRIPT.into()],
        environment,
        file_system_id: platform.file_system_id.clone(),
        access_point_id: access_point,
        subnets: platform.subnets.clone(),
        security_groups: platform.security_groups.clone(),
        execution_role_arn: platform.execution_role_arn.clone(),
        task_role_arn: platform.task_role_arn.clone(),
        client_token: format!("{}/{}/{mode}", ctx.operation.id, ctx.operation.attempt),
        tags: ctx.tags("archiver"),
    };
    Ok(ctx.cloud.compute.run_task(&spec).await?)
}

/// Waits for the archiver task `task` to stop and checks that it succeeded.
pub async fn await_task(ctx: &StepCtx, task: &str, what: &str) -> StepResult<()> {
    let platform = &ctx.cloud.platform;
    let status = ctx
        .cloud
        .compute
        .task_status(&platform.cluster, task)
        .await?
        .ok_or_else(|| StepError::Fatal(format!("{what} task {task} is gone")))?;
    if status.last_status != "STOPPED" {
        return Err(StepError::NotYet(format!(
            "{what} task is {}",
            status.last_status
        )));
    }
    if !ctx.cloud.readiness.task_succeeded(status.exit_code) {
        let why = match status.exit_code {
            Some(127) => " (the archiver image lacks a tool it needs)".to_owned(),
            Some(3) => " (the content archive failed its sha256 check)".to_owned(),
            _ => String::new(),
        };
        return Err(StepError::Fatal(format!(
            "{what} task stopped with exit code {:?}{why}",
            status.exit_code
        )));
    }
    Ok(())
}

/// Removes the archiver's task definitions (tagged ours) once no task of it is needed.
pub async fn forget_archiver(ctx: &StepCtx) -> StepResult<()> {
    ctx.cloud
        .compute
        .delete_task_definitions(&archiver_family(ctx), &ctx.owner_tags())
        .await?;
    Ok(())
}

/// Waits for the content backup and reads what it wrote: the archive's summary, or
/// [`NO_CONTENT`].
async fn await_content_backup(ctx: &StepCtx, at: &Location, started: &str) -> StepResult<String> {
    let task = ctx.require_output(started)?.to_owned();
    if task == NO_CONTENT {
        return Ok(NO_CONTENT.into());
    }
    await_task(ctx, &task, "content backup").await?;
    // The task is done with: leave none of its revisions tagged behind.
    forget_archiver(ctx).await?;
    let summary_key = format!("{}.json", at.key(CONTENT_OBJECT));
    let written = ctx
        .cloud
        .objects
        .list_objects(&at.bucket, &summary_key)
        .await?
        .contains(&summary_key);
    if !written {
        if ctx.cloud.readiness.task_output_required() {
            return Err(StepError::Fatal(format!(
                "the content backup task succeeded but wrote no s3://{}/{summary_key}",
                at.bucket
            )));
        }
        // An emulator runs no task: there is nothing to record.
        return Ok(NO_CONTENT.into());
    }
    let summary: ContentSummary = get_json(ctx, &at.bucket, &summary_key).await?;
    Ok(serde_json::to_string(&summary).unwrap_or_default())
}

/// Writes `manifest.json` and marks the Backup READY (with its objects and size).
async fn write_manifest(ctx: &StepCtx, mut backup: Backup, at: &Location) -> StepResult<String> {
    if backup.state == BackupState::Ready {
        return Ok(at.uri(MANIFEST_OBJECT));
    }
    let summary: DumpSummary = get_json(ctx, &at.bucket, &at.key(DATABASE_SUMMARY)).await?;
    let facts: DatabaseFacts = get_json(ctx, &at.bucket, &at.key(FACTS_OBJECT)).await?;
    let content = match ctx.require_output(AWAIT_CONTENT_BACKUP)? {
        NO_CONTENT => None,
        json => {
            let summary: ContentSummary = serde_json::from_str(json)
                .map_err(|e| StepError::Fatal(format!("bad content summary: {e}")))?;
            Some(ContentManifest {
                object: at.uri(CONTENT_OBJECT),
                sha256: summary.sha256,
                bytes: summary.bytes,
            })
        }
    };
    let spec = &ctx.instance.spec;
    let manifest = Manifest {
        format: 1,
        backup: backup.name.to_string(),
        instance: ctx.instance.name.to_string(),
        operation: ctx.operation.id.to_string(),
        origin: backup.origin,
        created_at_ms: backup.created_at.millis(),
        completed_at_ms: Timestamp::now().millis(),
        wordpress_image: format!("{}:{}", spec.wordpress_image, spec.wordpress_version),
        spec: spec.clone(),
        database: DatabaseManifest {
            object: at.uri(DATABASE_OBJECT),
            dump_program: DumpTools::from_platform(&ctx.cloud.platform).dump_command,
            summary: summary.clone(),
            facts,
        },
        content: content.clone(),
    };
    put_json(ctx, at, MANIFEST_OBJECT, &manifest).await?;
    let now = Timestamp::now();
    backup.state = BackupState::Ready;
    backup.database_uri = Some(at.uri(DATABASE_OBJECT));
    backup.content_uri = content.as_ref().map(|c| c.object.clone());
    backup.manifest_uri = Some(at.uri(MANIFEST_OBJECT));
    backup.size_bytes = summary.compressed_bytes + content.as_ref().map_or(0, |c| c.bytes);
    backup.updated_at = now;
    backup.failure_reason = None;
    // A conflict means someone else changed the record (a concurrent delete): the next
    // attempt of this step reads it again.
    ctx.store
        .commit(vec![Write::UpdateBackup(backup)])
        .await
        .map_err(|e| match e {
            crate::store::StoreError::Conflict { .. } => {
                StepError::Transient("the backup record changed meanwhile".into())
            }
            other => other.into(),
        })?;
    Ok(at.uri(MANIFEST_OBJECT))
}

/// The rollback's last undo: no object of the backup is left, and the record says FAILED.
async fn abandon(ctx: &StepCtx) -> StepResult<()> {
    let Some(mut backup) = ctx.store.get_backup(&backup_name(&ctx.operation)?).await? else {
        return Ok(());
    };
    if let Ok(at) = Location::of(ctx, &backup) {
        let keys = ctx
            .cloud
            .objects
            .list_objects(&at.bucket, &at.prefix)
            .await?;
        ctx.cloud.objects.delete_objects(&at.bucket, &keys).await?;
    }
    if backup.state == BackupState::Creating {
        let now = Timestamp::now();
        backup.state = BackupState::Failed;
        backup.updated_at = now;
        backup.failure_reason = Some(
            ctx.operation
                .failure
                .as_ref()
                .map(|f| f.message.clone())
                .unwrap_or_else(|| "the backup did not complete".into()),
        );
        ctx.store
            .commit(vec![Write::UpdateBackup(backup)])
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict { .. } => {
                    StepError::Transient("the backup record changed meanwhile".into())
                }
                other => other.into(),
            })?;
    }
    Ok(())
}
