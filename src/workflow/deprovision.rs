//! Deprovisioning (offboarding): the site stopped, then its final archive — a regular
//! Backup (origin offboarding) written by the backup workflow's steps, listed with the
//! instance's backups and restorable into a new instance of the tenant until it expires —
//! then every resource removed in reverse order of creation, then proof by a tag scan that
//! nothing of the instance is left.

use std::time::Duration;

use async_trait::async_trait;

use crate::cloud::aws::WP_CONTENT_PATH;
use crate::cloud::{CloudEnv, OneOffTaskSpec};
use crate::domain::{Instance, InstanceState, Operation, Verb};

use super::backup::{self, BackupWorkflow};
use super::placement::{self, LOAD_BALANCER};
use super::provision::{
    self, ACCESS_POINT, DATABASE, DNS_RECORD, LISTENER_RULE, SECRET, SERVICE, TARGET_GROUP,
    TASK_DEFINITION, TASK_ROLE, USER_POOL, master_credentials,
};
use super::{Failure, StepCtx, StepError, StepResult, Workflow, domains};

pub const STOP_SITE: &str = "stop_site";
pub const REMOVE_CONTENT: &str = "remove_content";
pub const VERIFY: &str = "verify";

pub struct Deprovision;

/// Whether the deletion archives first: it names the Backup it writes (DeleteInstance
/// without `skip_archive`).
fn archived(operation: &Operation) -> bool {
    operation.params["backup"].is_string()
}

#[async_trait]
impl Workflow for Deprovision {
    fn verb(&self) -> Verb {
        Verb::Delete
    }

    fn plan(
        &self,
        operation: &Operation,
        instance: &Instance,
        cloud: &CloudEnv,
    ) -> Vec<Vec<&'static str>> {
        // A create that rolled back cleanly left nothing of this instance: there is nothing
        // to archive or remove, and the tenant's names may belong to a sibling by now.
        if instance.released {
            return Vec::new();
        }
        let mut stages = Vec::new();
        if archived(operation) {
            // The site stops first, so the database and the files archived agree; the
            // archive is a regular Backup (its steps are the backup workflow's).
            stages.push(vec![STOP_SITE]);
            stages.extend(BackupWorkflow.plan(operation, instance, cloud));
        }
        stages.push(vec![SERVICE]);
        // The task role goes once no task of the service runs as it any more.
        let mut third = vec![LISTENER_RULE, TASK_DEFINITION, TASK_ROLE];
        if !cloud.platform.hosted_zone_id.is_empty() {
            third.push(DNS_RECORD);
        }
        if cloud.platform.cognito_enabled || instance.resources.contains_key(USER_POOL) {
            third.push(USER_POOL);
        }
        stages.push(third);
        stages.push(vec![
            TARGET_GROUP,
            DATABASE,
            SECRET,
            ACCESS_POINT,
            REMOVE_CONTENT,
            // After the rules: the hosts are out of them; certificates off the listener and
            // deleted, managed records deleted.
            domains::REMOVE_CUSTOM_DOMAINS,
        ]);
        // Its room on the load balancer is given back once its rules and target group
        // are gone, never before (else another instance could overfill the listener).
        stages.push(vec![LOAD_BALANCER]);
        stages.push(vec![VERIFY]);
        stages
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            STOP_SITE => stop_site(ctx).await.map(Some),
            backup::OPEN_BACKUP
            | backup::DUMP_DATABASE
            | backup::START_CONTENT_BACKUP
            | backup::VERIFY_DUMP
            | backup::AWAIT_CONTENT_BACKUP
            | backup::WRITE_MANIFEST => BackupWorkflow.run(ctx, step).await,
            REMOVE_CONTENT => remove_content(ctx).await,
            VERIFY => verify(ctx).await.map(|()| None),
            // The instance recorded what provisioning made; names and tags find the rest.
            other => {
                let recorded = ctx.instance.resources.get(other).map(String::as_str);
                provision::remove(ctx, other, recorded).await.map(|()| None)
            }
        }
    }

    async fn undo(&self, _: &StepCtx, _: &str, _: Option<&str>) -> StepResult<()> {
        // Removal cannot be undone; a failed deprovisioning is retried instead.
        Ok(())
    }

    fn rolls_back(&self) -> bool {
        false
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Deprovisioning
    }

    fn on_complete(&self, instance: &mut Instance, _: &Operation, _: &CloudEnv) -> bool {
        instance.state = InstanceState::Deprovisioned;
        instance.failure_reason = None;
        instance.resources.clear();
        true
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = InstanceState::Failed;
        instance.failure_reason = Some(failure.message.to_owned());
        false
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(20 * 60)
    }
}

/// Stops the instance's tasks (desired count 0) and waits until none runs, so nothing
/// writes to the database or wp-content while they are archived. An instance without a
/// service of its own (a failed provisioning) has nothing to stop.
async fn stop_site(ctx: &StepCtx) -> StepResult<String> {
    let platform = &ctx.cloud.platform;
    let compute = &ctx.cloud.compute;
    let ours = compute
        .service_tags(&platform.cluster, &ctx.names.stack)
        .await?
        .is_some_and(|tags| ctx.owns(&tags));
    let Some(status) = compute
        .service_status(&platform.cluster, &ctx.names.stack)
        .await?
        .filter(|status| ours && status.status == "ACTIVE")
    else {
        return Ok("no service of this instance runs".into());
    };
    if status.desired != 0 {
        compute
            .update_service(&platform.cluster, &ctx.names.stack, Some(0), None, false)
            .await?;
        return Err(StepError::NotYet("stopping the tasks".into()));
    }
    super::suspend::stopped(&status, ctx.cloud.readiness.as_ref())?;
    Ok("stopped".into())
}

fn cleaner_family(ctx: &StepCtx) -> String {
    format!("{}-cleaner", ctx.names.stack)
}

/// The tenant's directory on the shared file system, as the cleaner sees it: a single path
/// component `tenant-{id}` (never empty, never a path that climbs out).
fn tenant_directory(ctx: &StepCtx) -> StepResult<String> {
    let directory = ctx.names.access_point_root.trim_start_matches('/');
    let valid = directory.starts_with("tenant-")
        && directory
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(directory.to_owned())
    } else {
        Err(StepError::Fatal(format!(
            "refusing to remove {directory:?}: not a tenant directory"
        )))
    }
}

/// Removes `/tenant-{id}` — files and directory — from the shared file system, so that a
/// later tenant with the same id inherits nothing, and checks it is gone: a one-off task
/// mounts the file system's root, removes the directory and exits 0 only if it no longer
/// exists. Runs even when the archive was skipped. Left alone while an access point of
/// another instance (a live sibling) still uses the directory.
async fn remove_content(ctx: &StepCtx) -> StepResult<Option<String>> {
    let platform = &ctx.cloud.platform;
    let directory = tenant_directory(ctx)?;
    let ours = ctx
        .cloud
        .files
        .find_tagged(&platform.file_system_id, &ctx.component_tags("efs"))
        .await?;
    let all = ctx
        .cloud
        .files
        .find_tagged(&platform.file_system_id, &ctx.tenant_tags())
        .await?;
    if all.iter().any(|id| !ours.contains(id)) {
        return Ok(Some("kept: another instance's access point uses it".into()));
    }
    let script = "set -e; case \"$TENANT_DIR\" in tenant-*) ;; *) exit 2 ;; esac; \
                  rm -rf \"$FS_ROOT/$TENANT_DIR\"; [ ! -e \"$FS_ROOT/$TENANT_DIR\" ]";
    let spec = OneOffTaskSpec {
        cluster: platform.cluster.clone(),
        family: cleaner_family(ctx),
        image: platform.archiver_image.clone(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        environment: vec![
            ("FS_ROOT".into(), WP_CONTENT_PATH.into()),
            ("TENANT_DIR".into(), directory.clone()),
        ],
        file_system_id: platform.file_system_id.clone(),
        // The file system's root: the directory itself is what goes.
        access_point_id: String::new(),
        subnets: platform.subnets.clone(),
        security_groups: platform.security_groups.clone(),
        execution_role_arn: platform.execution_role_arn.clone(),
        task_role_arn: platform.task_role_arn.clone(),
        // One task per attempt of this operation, however often the step is resumed.
        client_token: format!("{}/{}/cleaner", ctx.operation.id, ctx.operation.attempt),
        tags: ctx.tags("cleaner"),
    };
    // Idempotent: a resumed step finds the task it started (client token) and waits for it.
    let task = ctx.cloud.compute.run_task(&spec).await?;
    let status = ctx
        .cloud
        .compute
        .task_status(&platform.cluster, &task)
        .await?
        .ok_or_else(|| StepError::Fatal(format!("cleaner task {task} is gone")))?;
    if status.last_status != "STOPPED" {
        return Err(StepError::NotYet(format!(
            "cleaner is {}",
            status.last_status
        )));
    }
    if !ctx.cloud.readiness.task_succeeded(status.exit_code) {
        return Err(StepError::Fatal(format!(
            "the cleaner could not remove /{directory} (exit code {:?})",
            status.exit_code
        )));
    }
    ctx.cloud
        .compute
        .delete_task_definitions(&cleaner_family(ctx), &ctx.owner_tags())
        .await?;
    Ok(Some(format!("removed /{directory}")))
}

/// Nothing tagged for this instance may remain (ACTIVE or INACTIVE task definitions
/// included), and neither its database nor its user. A sibling instance's resources (same
/// tenant and environment, other instance id) are not this instance's to count.
async fn verify(ctx: &StepCtx) -> StepResult<()> {
    let cloud = &ctx.cloud;
    let platform = &cloud.platform;
    // A deleted service drains for up to the deregistration delay: wait, do not fail.
    if let Some(tags) = cloud
        .compute
        .service_tags(&platform.cluster, &ctx.names.stack)
        .await?
        && ctx.owns(&tags)
        && let Some(status) = cloud
            .compute
            .service_status(&platform.cluster, &ctx.names.stack)
            .await?
        && status.status == "DRAINING"
    {
        return Err(StepError::NotYet(format!(
            "service {} is draining",
            ctx.names.stack
        )));
    }
    let tags = ctx.owner_tags();
    let mut left = Vec::new();
    left.extend(
        cloud
            .files
            .find_tagged(&platform.file_system_id, &tags)
            .await?,
    );
    left.extend(cloud.secrets.find_tagged(&tags).await?);
    // Rules on any listener of the pool (and on the instance's own, should the pool no
    // longer name it); target groups are found by tag wherever they are.
    let mut listeners = platform.listeners();
    if let Ok(lb) = placement::load_balancer_of(ctx)
        && !listeners.contains(&lb.listener_arn)
    {
        listeners.push(lb.listener_arn);
    }
    let mut routing = Vec::new();
    for listener in listeners.iter().filter(|l| !l.is_empty()) {
        routing.extend(cloud.routing.find_tagged(listener, &tags).await?);
    }
    routing.sort();
    routing.dedup();
    left.extend(routing);
    // The alias record, if this removal planned it (a record written by hand for the host
    // afterwards is someone else's business).
    let planned_dns = ctx.operation.steps.iter().any(|s| s.name == DNS_RECORD);
    if planned_dns && !platform.hosted_zone_id.is_empty() {
        let host =
            crate::domain::naming::ResourceNames::host(&ctx.instance.name.tenant, &platform.domain);
        if cloud
            .dns
            .record(&platform.hosted_zone_id, &host, "A")
            .await?
            .is_some()
        {
            left.push(format!("DNS record {host}"));
        }
    }
    if placement::holds_any_slot(ctx).await? {
        left.push("load-balancer slots (state store)".into());
    }
    left.extend(cloud.compute.find_tagged(&platform.cluster, &tags).await?);
    // Certificates of the custom domains, and their records in managed zones.
    left.extend(domains::leftovers(ctx).await?);
    // The persisted plan says whether a pool was removed, whatever the setting says now.
    let planned_pool = ctx.operation.steps.iter().any(|s| s.name == USER_POOL);
    if platform.cognito_enabled || planned_pool {
        left.extend(cloud.identity.find_tagged(&tags).await?);
    }
    let role = provision::task_role_name(ctx);
    if let Some(role_tags) = cloud.task_roles.role_tags(&role).await?
        && ctx.owns(&role_tags)
    {
        left.push(format!("IAM role {role}"));
    }
    let master = master_credentials(ctx).await?;
    // A claim is released only after the drop; either way something is left.
    for database in cloud
        .database
        .databases_owned_by(&master, &ctx.owner())
        .await?
    {
        left.push(format!("database {database} (claimed)"));
    }
    if left.is_empty() {
        Ok(())
    } else {
        // Some deletions settle a moment later; retry with backoff before declaring
        // orphans.
        Err(StepError::Transient(format!(
            "resources remain: {}",
            left.join(", ")
        )))
    }
}
