//! CheckInstanceHealth: one report on an instance, a check per dependency, run in
//! parallel, each bounded, none ever an error of the RPC.
//!
//! The checks (each reports a status, a reason and its latency):
//!
//! - `ecs_service`: the service as DescribeServices shows it: running, desired and pending
//!   tasks, the primary deployment's rollout state and the service's last few events.
//!   UNHEALTHY when the service is missing or not ACTIVE, or no task runs though some are
//!   desired; DEGRADED while fewer run than desired, a rollout is in progress (or failed, the
//!   circuit breaker rolling back) or more than one deployment exists.
//! - `alb_targets`: every target of the instance's target group with its state and ELB's
//!   reason. UNHEALTHY with no healthy target; DEGRADED with fewer healthy targets than the
//!   instance's desired count, or any target `unhealthy`, `unused` or `unavailable`.
//!   Targets still `initial` (registering) or `draining` (being replaced) are normal during a
//!   rollout and degrade nothing as long as enough targets are healthy.
//! - `http`: `GET {health_probe_path}` at `health_probe_url` (default the site,
//!   `https://{tenant}.{domain}`) with the instance's host as `Host` and TLS server name; a
//!   status in `health_probe_codes` (default `200-399`) is HEALTHY, anything else, or no
//!   answer, UNHEALTHY. Redirects are not followed.
//! - `database`: a login as the tenant's user with the password from its secret, to its
//!   database, and `SELECT 1`, with the platform's TLS settings. The password is never part
//!   of a reason.
//! - `db_instance`: the environment's RDS DB instance (`db_instance_identifier`):
//!   `available` is HEALTHY; transitional states that keep serving (`backing-up`,
//!   `modifying`, `maintenance`, `upgrading`, `configuring-*`, `storage-optimization`, …) and
//!   changes pending for the next maintenance window (`PendingModifiedValues`: they may
//!   reboot it) are DEGRADED; anything else (`stopped`, `rebooting`, `storage-full`,
//!   `failed`, missing, …) is UNHEALTHY. Storage is reported as allocated (free space is a
//!   CloudWatch metric, not read here).
//! - `efs_access_point`: the access point's lifecycle state: `available` HEALTHY,
//!   `creating`/`updating` DEGRADED, anything else or missing UNHEALTHY.
//!
//! A check that could not be made (a cloud call failed) is UNHEALTHY with the error as its
//! reason; one not made on purpose is UNSPECIFIED ("skipped: …"): a SUSPENDED instance's
//! `alb_targets` and `http` (it runs no task and its listener rule answers a fixed
//! response), and `db_instance` when the platform names no DB instance. A SUSPENDED
//! instance's `ecs_service` is HEALTHY when it runs no task ("suspended: scaled to 0") and
//! DEGRADED while tasks still run.
//!
//! The overall status ([`overall`]), over the checks that were made:
//!
//! 1. UNHEALTHY if `ecs_service`, `http`, `database`, `db_instance` or `efs_access_point`
//!    is UNHEALTHY; also if `alb_targets` is, unless the HTTP probe succeeded (an ALB with no
//!    healthy target fails open and still routes, so the site serves, degraded).
//! 2. DEGRADED if any check is DEGRADED (or `alb_targets` is UNHEALTHY while `http` works).
//! 3. HEALTHY otherwise.
//!
//! Time: every check has `health_check_timeout_ms`, and the whole report
//! `health_timeout_ms` (from the start of the RPC); a check still running at its limit is
//! UNHEALTHY, "timed out after …", and the report is returned regardless.

pub mod probe;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::cloud::{
    CloudEnv, CloudResult, DbInstanceStatus, MasterCredentials, Secret, ServiceStatus, TargetHealth,
};
use crate::domain::naming::ResourceNames;
use crate::domain::{Environment, Instance, InstanceState, Timestamp};
use crate::workflow::provision::{ACCESS_POINT, SECRET, TARGET_GROUP};

pub const ECS_SERVICE: &str = "ecs_service";
pub const ALB_TARGETS: &str = "alb_targets";
pub const HTTP: &str = "http";
pub const DATABASE: &str = "database";
pub const DB_INSTANCE: &str = "db_instance";
pub const EFS_ACCESS_POINT: &str = "efs_access_point";

const DEFAULT_PROBE_PATH: &str = "/";
const DEFAULT_PROBE_CODES: &str = "200-399";

/// CheckInstanceHealth's time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// The whole report.
    pub overall: Duration,
    /// One check.
    pub per_check: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            overall: Duration::from_millis(5000),
            per_check: Duration::from_millis(4000),
        }
    }
}

impl HealthSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            overall: Duration::from_millis(config.health_timeout_ms),
            per_check: Duration::from_millis(config.health_check_timeout_ms),
        }
    }
}

/// The adapters of an environment, for reads outside any operation.
#[async_trait]
pub trait CloudEnvs: Send + Sync {
    async fn env(&self, environment: Environment) -> CloudResult<CloudEnv>;
}

#[async_trait]
impl CloudEnvs for crate::cloud::accounts::Accounts {
    async fn env(&self, environment: Environment) -> CloudResult<CloudEnv> {
        crate::cloud::accounts::Accounts::env(self, environment).await
    }
}

/// Wraps another [`CloudEnvs`], changing the adapters it returns (tests inject
/// realistic AWS states through it).
pub struct WrappedCloudEnvs {
    pub inner: Arc<dyn CloudEnvs>,
    pub wrap: Arc<dyn Fn(CloudEnv) -> CloudEnv + Send + Sync>,
}

#[async_trait]
impl CloudEnvs for WrappedCloudEnvs {
    async fn env(&self, environment: Environment) -> CloudResult<CloudEnv> {
        Ok((self.wrap)(self.inner.env(environment).await?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Not checked on purpose (reason says why).
    Skipped,
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub reason: String,
    pub latency: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub overall: Status,
    pub checks: Vec<Check>,
    pub checked_at: Timestamp,
}

type Outcome = (Status, String);

fn healthy(reason: impl Into<String>) -> Outcome {
    (Status::Healthy, reason.into())
}
fn degraded(reason: impl Into<String>) -> Outcome {
    (Status::Degraded, reason.into())
}
fn unhealthy(reason: impl Into<String>) -> Outcome {
    (Status::Unhealthy, reason.into())
}
fn skipped(reason: impl Into<String>) -> Outcome {
    (Status::Skipped, format!("skipped: {}", reason.into()))
}

/// The overall status of a report (see the module documentation).
pub fn overall(checks: &[Check]) -> Status {
    let status_of = |name: &str| {
        checks
            .iter()
            .find(|c| c.name == name)
            .map_or(Status::Skipped, |c| c.status)
    };
    let serving = status_of(HTTP) == Status::Healthy;
    let mut worst = Status::Skipped;
    for check in checks {
        let status = match (check.name, check.status) {
            (ALB_TARGETS, Status::Unhealthy) if serving => Status::Degraded,
            (_, status) => status,
        };
        worst = worst.max(status);
    }
    if worst == Status::Skipped {
        // Nothing was checked: nothing is known to work.
        return Status::Unhealthy;
    }
    worst
}

fn when(millis: Option<i64>) -> String {
    millis
        .map(aws_smithy_types::DateTime::from_millis)
        .and_then(|at| at.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
        .unwrap_or_else(|| "?".into())
}

/// The `ecs_service` check of what DescribeServices reported.
pub fn ecs_check(status: Option<&ServiceStatus>, suspended: bool) -> Outcome {
    let Some(s) = status else {
        return unhealthy("the ECS service does not exist");
    };
    let mut counts = format!(
        "running {}, desired {}, pending {}, rollout {}",
        s.running,
        s.desired,
        s.pending,
        s.rollout_state.as_deref().unwrap_or("unknown")
    );
    if s.deployments > 1 {
        counts.push_str(&format!(", {} deployments", s.deployments));
    }
    if !s.recent_events.is_empty() {
        let events: Vec<String> = s
            .recent_events
            .iter()
            .map(|e| format!("{} {}", when(e.created_at_ms), e.message))
            .collect();
        counts.push_str(&format!("; recent events: {}", events.join(" | ")));
    }
    let (status, summary) = if s.status != "ACTIVE" {
        unhealthy(format!("the service is {}", s.status))
    } else if suspended {
        if s.running == 0 && s.desired == 0 {
            healthy("suspended: scaled to 0 as intended")
        } else {
            degraded("suspended, but tasks are still wanted or running")
        }
    } else if s.desired == 0 {
        unhealthy("the service wants no task (desired 0) though the instance is not suspended")
    } else if s.running == 0 {
        unhealthy("no task is running")
    } else if s.rollout_state.as_deref() == Some("FAILED") {
        degraded("the last rollout failed")
    } else if s.running < s.desired {
        degraded("fewer tasks running than desired")
    } else if s.rollout_state.as_deref() == Some("IN_PROGRESS") || s.deployments > 1 {
        degraded("a rollout is in progress")
    } else {
        healthy("all desired tasks running")
    };
    (status, format!("{summary}: {counts}"))
}

/// The `alb_targets` check of what DescribeTargetHealth reported, for an instance that
/// wants `desired` tasks.
pub fn targets_check(targets: &[TargetHealth], desired: u32) -> Outcome {
    if targets.is_empty() {
        return unhealthy("no target is registered");
    }
    let listed: Vec<String> = targets
        .iter()
        .map(|t| {
            let mut text = match t.port {
                Some(port) => format!("{}:{port} {}", t.id, t.state),
                None => format!("{} {}", t.id, t.state),
            };
            match (&t.reason, &t.description) {
                (Some(reason), Some(description)) => {
                    text.push_str(&format!(" ({reason}: {description})"))
                }
                (Some(reason), None) => text.push_str(&format!(" ({reason})")),
                (None, Some(description)) => text.push_str(&format!(" ({description})")),
                (None, None) => {}
            }
            text
        })
        .collect();
    let healthy_count = targets.iter().filter(|t| t.state == "healthy").count();
    let failing = targets.iter().any(|t| {
        matches!(
            t.state.as_str(),
            "unhealthy" | "unhealthy.draining" | "unused" | "unavailable"
        )
    });
    let wanted = usize::try_from(desired).unwrap_or(usize::MAX);
    let summary = format!("{healthy_count} healthy of {} registered", targets.len());
    let detail = format!("{summary}, {desired} desired: {}", listed.join(", "));
    if healthy_count == 0 {
        unhealthy(format!("no healthy target; {detail}"))
    } else if healthy_count < wanted || failing {
        degraded(detail)
    } else {
        healthy(detail)
    }
}

/// The `efs_access_point` check of the access point's lifecycle state.
pub fn access_point_check(id: &str, state: Option<&str>) -> Outcome {
    match state {
        None => unhealthy(format!("access point {id} does not exist")),
        Some("available") => healthy(format!("access point {id} is available")),
        Some(state @ ("creating" | "updating")) => {
            degraded(format!("access point {id} is {state}"))
        }
        Some(state) => unhealthy(format!("access point {id} is {state}")),
    }
}

/// RDS states in which the instance keeps serving (possibly briefly slower).
const RDS_SERVING: &[&str] = &[
    "backing-up",
    "modifying",
    "maintenance",
    "upgrading",
    "storage-optimization",
    "renaming",
    "resetting-master-credentials",
    "moving-to-vpc",
    "converting-to-vpc",
    "storage-config-upgrade",
];

/// The `db_instance` check of what DescribeDBInstances reported.
pub fn db_instance_check(identifier: &str, instance: Option<&DbInstanceStatus>) -> Outcome {
    let Some(db) = instance else {
        return unhealthy(format!("RDS DB instance {identifier} does not exist"));
    };
    let mut detail = format!("{} ({}) is {}", db.identifier, db.engine, db.status);
    if let Some(gib) = db.allocated_storage_gib {
        detail.push_str(&format!(", storage {gib} GiB"));
        if let Some(max) = db.max_allocated_storage_gib {
            detail.push_str(&format!(" (autoscaling to {max} GiB)"));
        }
    }
    if !db.pending_maintenance.is_empty() {
        detail.push_str(&format!(
            "; pending maintenance: {}",
            db.pending_maintenance.join(", ")
        ));
        if let Some(window) = &db.maintenance_window {
            detail.push_str(&format!(" (window {window} UTC)"));
        }
    }
    let status = db.status.as_str();
    if status == "available" {
        if db.pending_maintenance.is_empty() {
            healthy(detail)
        } else {
            degraded(detail)
        }
    } else if RDS_SERVING.contains(&status) || status.starts_with("configuring-") {
        degraded(detail)
    } else {
        unhealthy(detail)
    }
}

/// Runs `check` for at most until `deadline`, measuring its latency.
async fn timed(
    name: &'static str,
    deadline: Instant,
    check: impl Future<Output = Outcome>,
) -> Check {
    let started = Instant::now();
    let (status, reason) = match tokio::time::timeout_at(deadline, check).await {
        Ok(outcome) => outcome,
        Err(_) => unhealthy(format!(
            "timed out after {} ms",
            deadline.saturating_duration_since(started).as_millis()
        )),
    };
    Check {
        name,
        status,
        reason,
        latency: started.elapsed(),
    }
}

/// Runs every check of `instance` in `cloud`, by `deadline` at the latest (each check also
/// within `settings.per_check`).
pub async fn check(
    instance: &Instance,
    cloud: &CloudEnv,
    settings: &HealthSettings,
    deadline: Instant,
) -> Report {
    let checked_at = Timestamp::now();
    let limit = deadline.min(Instant::now() + settings.per_check);
    let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
    let suspended = instance.state == InstanceState::Suspended;
    let (ecs, targets, http, database, db_instance, efs) = tokio::join!(
        timed(ECS_SERVICE, limit, check_ecs(cloud, &names, suspended)),
        timed(
            ALB_TARGETS,
            limit,
            check_targets(instance, cloud, suspended)
        ),
        timed(HTTP, limit, check_http(instance, cloud, suspended)),
        timed(DATABASE, limit, check_database(instance, cloud, &names)),
        timed(DB_INSTANCE, limit, check_db_instance(cloud)),
        timed(EFS_ACCESS_POINT, limit, check_access_point(instance, cloud)),
    );
    let checks = vec![ecs, targets, http, database, db_instance, efs];
    Report {
        overall: overall(&checks),
        checks,
        checked_at,
    }
}

async fn check_ecs(cloud: &CloudEnv, names: &ResourceNames, suspended: bool) -> Outcome {
    match cloud
        .compute
        .service_status(&cloud.platform.cluster, &names.stack)
        .await
    {
        Ok(status) => ecs_check(status.as_ref(), suspended),
        Err(error) => unhealthy(format!("cannot describe the service: {error}")),
    }
}

fn recorded<'a>(instance: &'a Instance, kind: &str) -> Result<&'a str, Outcome> {
    instance
        .resources
        .get(kind)
        .map(String::as_str)
        .ok_or_else(|| unhealthy(format!("the instance has no {kind} recorded")))
}

async fn check_targets(instance: &Instance, cloud: &CloudEnv, suspended: bool) -> Outcome {
    if suspended {
        return skipped("the instance is SUSPENDED: it runs no task, so no target is expected");
    }
    let arn = match recorded(instance, TARGET_GROUP) {
        Ok(arn) => arn,
        Err(outcome) => return outcome,
    };
    match cloud.routing.target_health_details(arn).await {
        Ok(targets) => targets_check(&targets, instance.spec.desired_count),
        Err(error) if error.is_not_found() => {
            unhealthy(format!("the target group does not exist: {error}"))
        }
        Err(error) => unhealthy(format!("cannot describe target health: {error}")),
    }
}

async fn check_http(instance: &Instance, cloud: &CloudEnv, suspended: bool) -> Outcome {
    if suspended {
        return skipped("the instance is SUSPENDED: its listener rule answers a fixed response");
    }
    let platform = &cloud.platform;
    let host = ResourceNames::host(&instance.name.tenant, &platform.domain);
    let url = if platform.health_probe_url.is_empty() {
        format!("https://{host}")
    } else {
        platform.health_probe_url.clone()
    };
    let path = if platform.health_probe_path.is_empty() {
        DEFAULT_PROBE_PATH
    } else {
        platform.health_probe_path.as_str()
    };
    let codes = if platform.health_probe_codes.is_empty() {
        DEFAULT_PROBE_CODES
    } else {
        platform.health_probe_codes.as_str()
    };
    let codes = match probe::AcceptedCodes::parse(codes) {
        Ok(codes) => codes,
        Err(error) => return unhealthy(format!("invalid health_probe_codes: {error}")),
    };
    if !path.starts_with('/') {
        return unhealthy(format!(
            "invalid health_probe_path {path:?}: must start with /"
        ));
    }
    let target = match probe::ProbeTarget::parse(&url) {
        Ok(target) => target,
        Err(error) => return unhealthy(format!("invalid health_probe_url: {error}")),
    };
    let what = format!("GET {path} (Host: {host}) at {}", target.url());
    match probe::get(&target, &host, path).await {
        Ok(answer) => {
            let mut detail = format!("{what}: HTTP {}", answer.status);
            if let Some(location) = &answer.location {
                detail.push_str(&format!(", redirect to {location} (not followed)"));
            }
            if codes.accepts(answer.status) {
                healthy(detail)
            } else {
                unhealthy(format!("{detail}, not an accepted code ({codes})"))
            }
        }
        Err(error) => unhealthy(format!("{what}: {error}")),
    }
}

/// The tenant's login from its secret (JSON `username`, `password`, `dbname`), to the
/// platform's database server with the platform's TLS settings, and the database it
/// serves from: the one the instance recorded (a restore switches it), else the secret's.
pub(crate) fn tenant_login(
    secret: &Secret,
    cloud: &CloudEnv,
    names: &ResourceNames,
    instance: &Instance,
) -> Result<(MasterCredentials, String), String> {
    let value: serde_json::Value = serde_json::from_str(secret.expose())
        .map_err(|_| "the tenant secret is not JSON".to_owned())?;
    let text = |key: &str| value[key].as_str().map(str::to_owned);
    let username = text("username").ok_or("the tenant secret has no username")?;
    let password = text("password").ok_or("the tenant secret has no password")?;
    let database = instance
        .resources
        .get(crate::workflow::provision::DATABASE)
        .cloned()
        .or_else(|| text("dbname"))
        .unwrap_or_else(|| names.database.clone());
    let platform = &cloud.platform;
    Ok((
        MasterCredentials {
            host: platform.db_host.clone(),
            port: platform.db_port,
            username,
            password: Secret::new(password),
            tls: platform.db_tls,
            ca_file: (!platform.db_ca_file.is_empty())
                .then(|| std::path::PathBuf::from(&platform.db_ca_file)),
        },
        database,
    ))
}

async fn check_database(instance: &Instance, cloud: &CloudEnv, names: &ResourceNames) -> Outcome {
    let secret_arn = match recorded(instance, SECRET) {
        Ok(arn) => arn,
        Err(outcome) => return outcome,
    };
    let secret = match cloud.secrets.read_secret(secret_arn).await {
        Ok(secret) => secret,
        Err(error) => return unhealthy(format!("cannot read the tenant secret: {error}")),
    };
    let (login, database) = match tenant_login(&secret, cloud, names, instance) {
        Ok(login) => login,
        Err(error) => return unhealthy(error),
    };
    let what = format!(
        "login as {} to {database} at {}:{}",
        login.username, login.host, login.port
    );
    match cloud.database.check_login(&login, &database).await {
        Ok(()) => healthy(format!("{what}: SELECT 1 answered")),
        // The adapter redacts the password from its errors; this is a second guard.
        Err(error) => {
            let mut message = error.to_string();
            if !login.password.is_empty() {
                message = message.replace(login.password.expose(), "<redacted>");
            }
            unhealthy(format!("{what}: {message}"))
        }
    }
}

async fn check_db_instance(cloud: &CloudEnv) -> Outcome {
    let identifier = &cloud.platform.db_instance_identifier;
    if identifier.is_empty() {
        return skipped("the platform names no db_instance_identifier");
    }
    match cloud.db_instances.db_instance(identifier).await {
        Ok(db) => db_instance_check(identifier, db.as_ref()),
        Err(error) => unhealthy(format!(
            "cannot describe RDS DB instance {identifier}: {error}"
        )),
    }
}

async fn check_access_point(instance: &Instance, cloud: &CloudEnv) -> Outcome {
    let id = match recorded(instance, ACCESS_POINT) {
        Ok(id) => id,
        Err(outcome) => return outcome,
    };
    match cloud.files.access_point_state(id).await {
        Ok(state) => access_point_check(id, state.as_deref()),
        Err(error) => unhealthy(format!("cannot describe access point {id}: {error}")),
    }
}

#[cfg(test)]
mod tests;
