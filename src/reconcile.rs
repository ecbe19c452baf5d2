//! The reconciler: a periodic pass, run by every replica at once, comparing what the state
//! store says with what the environments hold.
//!
//! - **Stale operations**: an unfinished operation whose lease expired more than
//!   `stuck_after` ago, with no progress since (no step or event: its `updated_at` is as
//!   old), is ended STUCK by the engine ([`Engine::end_stale`]), conditional on the
//!   versions read, so of two replicas only one ends it and a replica resuming it wins.
//! - **Orphans**: resources carrying our tags (`managed-by`, the environment) whose owner,
//!   the instance their `instance-id` tag names, does not exist or is DEPROVISIONED with no
//!   operation running. Resources belong to an instance, not to a (tenant, environment)
//!   pair: a resource naming a live instance is never an orphan, whatever its state, since a
//!   provisioning creates resources before recording them; one without an instance tag is
//!   nobody's to judge. Where the kind tells its creation time, a resource younger than
//!   `orphan_grace` is left for the next pass. The owner is read again from the store just
//!   before a resource is counted, and removal (when enabled) uses the calls deprovisioning
//!   uses, which succeed when the resource is already gone: two replicas removing the same
//!   orphan both succeed. Rules go before target groups (a group in use cannot go).
//!   Kinds covered: access points, secrets, target groups, listener rules, and instances'
//!   IAM task roles (`task_role`: the roles under `/bbws/instances/`, listed with their
//!   tags; removed last, after anything that may still run as them).
//! - **Drift**: each resource recorded on an ACTIVE or SUSPENDED instance that has no
//!   operation running is looked up (access point, secret, target group, listener rule,
//!   ECS service, whose desired count must be the instance's, or 0 when suspended); what is
//!   missing or different becomes a DRIFT condition on the instance, and a condition whose
//!   cause is gone is cleared. The instance is written only when its conditions change,
//!   conditional on the version read; a conflict (an operation started, another replica
//!   wrote first) leaves it to the next pass.
//!
//! Everything found is counted in metrics (see [`crate::metrics`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudEnv, CloudError, ErrorKind, TaggedResource};
use crate::config::Config;
use crate::domain::naming::{ResourceNames, tag_keys};
use crate::domain::{
    ConditionType, Environment, Instance, InstanceCondition, InstanceState, Timestamp,
};
use crate::health::CloudEnvs;
use crate::metrics::{self, Metrics};
use crate::store::{InstanceQuery, StateStore, StoreError, Write};
use crate::workflow::Engine;
use crate::workflow::engine::StaleOutcome;

/// The orphan kinds the reconciler looks for, in the order they are removed.
pub const ORPHAN_KINDS: [&str; 5] = [
    "listener_rule",
    "target_group",
    "access_point",
    "secret",
    "task_role",
];

/// Stale operations taken per pass.
const STALE_BATCH: usize = 100;

/// Instances read per page.
const PAGE: usize = 200;

#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    pub remove_orphans: bool,
    pub orphan_grace: Duration,
    pub stuck_after: Duration,
    /// The tag keys' prefix (`bbws`).
    pub tag_prefix: String,
}

impl ReconcileSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            remove_orphans: config.reconcile_remove_orphans,
            orphan_grace: Duration::from_secs(config.orphan_grace_secs),
            stuck_after: Duration::from_secs(config.stuck_after_secs),
            tag_prefix: config.tag_prefix.clone(),
        }
    }
}

/// What one pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Orphans found, by (environment, kind).
    pub orphans: HashMap<(Environment, &'static str), usize>,
    /// Orphans this pass removed.
    pub removed: usize,
    /// DRIFT conditions on the instances checked, after the pass.
    pub drift: usize,
    /// Operations this pass ended STUCK.
    pub stuck: usize,
    /// Checks that could not be done (logged; retried on the next pass).
    pub failures: usize,
}

impl ReconcileReport {
    pub fn orphans_found(&self) -> usize {
        self.orphans.values().sum()
    }
}

pub struct Reconciler {
    store: Arc<dyn StateStore>,
    clouds: Arc<dyn CloudEnvs>,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    environments: Vec<Environment>,
    settings: ReconcileSettings,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Reconciler {
    pub fn new(
        store: Arc<dyn StateStore>,
        clouds: Arc<dyn CloudEnvs>,
        engine: Arc<Engine>,
        environments: Vec<Environment>,
        settings: ReconcileSettings,
    ) -> Self {
        let metrics = engine.metrics();
        Self {
            store,
            clouds,
            engine,
            metrics,
            environments,
            settings,
        }
    }

    fn fail(&self, report: &mut ReconcileReport, check: &'static str) {
        report.failures += 1;
        self.metrics
            .increment(metrics::RECONCILE_FAILURES, &[("check", check)]);
    }

    /// One pass at `now`: stale operations, then each environment's orphans and drift.
    pub async fn reconcile_once(&self, now: Timestamp) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.end_stale_operations(now, &mut report).await;
        let mut drift_by_kind: HashMap<String, i64> = HashMap::new();
        for &environment in &self.environments {
            let cloud = match self.clouds.env(environment).await {
                Ok(cloud) => cloud,
                Err(error) => {
                    tracing::warn!(%environment, %error, "environment unavailable: not reconciled");
                    self.fail(&mut report, "environment");
                    continue;
                }
            };
            let Some(instances) = self.instances(environment, &mut report).await else {
                continue;
            };
            self.orphans(&cloud, &instances, now, &mut report).await;
            for instance in instances.values() {
                let conditions = self.drift(&cloud, instance, now, &mut report).await;
                for condition in &conditions {
                    *drift_by_kind
                        .entry(condition.resource_kind.clone())
                        .or_default() += 1;
                }
                report.drift += conditions.len();
            }
        }
        for kind in [
            "access_point",
            "secret",
            "target_group",
            "listener_rule",
            "service",
        ] {
            let value = drift_by_kind.get(kind).copied().unwrap_or(0);
            self.metrics.set(metrics::DRIFT, &[("kind", kind)], value);
        }
        report
    }

    async fn end_stale_operations(&self, now: Timestamp, report: &mut ReconcileReport) {
        let cutoff = Timestamp(now.millis() - millis(self.settings.stuck_after));
        let candidates = match self.store.runnable_operations(cutoff, STALE_BATCH).await {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::warn!(%error, "cannot list operations with expired leases");
                self.fail(report, "stuck");
                return;
            }
        };
        for operation in candidates {
            // Never claimed (no lease) is the claim loop's business, not a stale lease.
            let Some(lease) = &operation.lease else {
                continue;
            };
            if lease.expires_at > cutoff || operation.updated_at > cutoff {
                continue;
            }
            let message = format!(
                "the lease of {} expired at {} and nobody resumed the operation for {} s",
                lease.owner,
                lease.expires_at.utc_compact(),
                self.settings.stuck_after.as_secs()
            );
            match self.engine.end_stale(&operation, &message).await {
                Ok(StaleOutcome::Stuck) => {
                    report.stuck += 1;
                    tracing::warn!(operation = %operation.id, verb = %operation.verb, "stale operation ended STUCK");
                }
                Ok(StaleOutcome::Changed) => {}
                Err(error) => {
                    tracing::warn!(operation = %operation.id, %error, "cannot end a stale operation");
                    self.fail(report, "stuck");
                }
            }
        }
    }

    /// Every instance of `environment`, by (tenant, instance id).
    async fn instances(
        &self,
        environment: Environment,
        report: &mut ReconcileReport,
    ) -> Option<HashMap<(String, String), Instance>> {
        let mut all = HashMap::new();
        let mut after = None;
        loop {
            let query = InstanceQuery {
                environment: Some(environment),
                after: after.take(),
                limit: PAGE,
                ..InstanceQuery::default()
            };
            match self.store.list_instances(&query).await {
                Ok(page) => {
                    for instance in page.items {
                        let key = (
                            instance.name.tenant.to_string(),
                            instance.name.instance.to_string(),
                        );
                        all.insert(key, instance);
                    }
                    match page.next {
                        Some(next) => after = Some(next),
                        None => return Some(all),
                    }
                }
                Err(error) => {
                    tracing::warn!(%environment, %error, "cannot list instances");
                    self.fail(report, "instances");
                    return None;
                }
            }
        }
    }

    /// Whether the instance `tenant`/`instance` (read again now) leaves its resources
    /// ownerless: it does not exist, or it is DEPROVISIONED with no operation running.
    async fn ownerless(&self, tenant: &str, instance: &str) -> Result<bool, StoreError> {
        let Ok(name) =
            crate::domain::InstanceName::parse(&format!("tenants/{tenant}/instances/{instance}"))
        else {
            // Tags naming no valid instance: nothing of ours can own it, but nothing proves
            // it is ours either.
            return Ok(false);
        };
        Ok(match self.store.get_instance(&name).await? {
            None => true,
            Some(owner) => {
                owner.state == InstanceState::Deprovisioned && owner.current_operation.is_none()
            }
        })
    }

    async fn orphans(
        &self,
        cloud: &CloudEnv,
        instances: &HashMap<(String, String), Instance>,
        now: Timestamp,
        report: &mut ReconcileReport,
    ) {
        let environment = cloud.environment;
        let prefix = &self.settings.tag_prefix;
        let ours = vec![
            (
                format!("{prefix}:{}", tag_keys::MANAGED_BY),
                "instance-manager".to_owned(),
            ),
            (
                format!("{prefix}:{}", tag_keys::ENVIRONMENT),
                environment.as_str().to_owned(),
            ),
        ];
        let platform = &cloud.platform;
        let mut tagged: Vec<TaggedResource> = Vec::new();
        let listings = [
            (
                "access_point",
                cloud
                    .files
                    .tagged_access_points(&platform.file_system_id, &ours)
                    .await,
            ),
            ("secret", cloud.secrets.tagged_secrets(&ours).await),
            (
                "task_role",
                cloud
                    .task_roles
                    .tagged_roles(crate::domain::naming::TASK_ROLE_PATH, &ours)
                    .await,
            ),
            (
                "routing",
                cloud
                    .routing
                    .tagged_routing(&platform.listener_arn, &ours)
                    .await,
            ),
        ];
        for (what, listing) in listings {
            match listing {
                Ok(found) => tagged.extend(found),
                Err(error) => {
                    tracing::warn!(%environment, what, %error, "cannot list tagged resources");
                    self.fail(report, "orphans");
                }
            }
        }
        let grace = millis(self.settings.orphan_grace);
        let mut orphans: Vec<TaggedResource> = Vec::new();
        for resource in tagged {
            let (Some(tenant), Some(instance)) = (
                resource.tag(tag_keys::TENANT_ID),
                resource.tag(tag_keys::INSTANCE_ID),
            ) else {
                continue;
            };
            // A live owner in the listing: certainly not an orphan.
            if let Some(owner) = instances.get(&(tenant.to_owned(), instance.to_owned()))
                && owner.state != InstanceState::Deprovisioned
            {
                continue;
            }
            if resource
                .created_at
                .is_some_and(|created| now.millis() - created.millis() < grace)
            {
                continue;
            }
            // The listing may be older than an instance created since: ask again.
            match self.ownerless(tenant, instance).await {
                Ok(true) => orphans.push(resource),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%environment, %error, "cannot read an owner");
                    self.fail(report, "orphans");
                }
            }
        }
        for kind in ORPHAN_KINDS {
            let found = orphans.iter().filter(|r| r.kind == kind).count();
            report.orphans.insert((environment, kind), found);
            self.metrics.set(
                metrics::ORPHANS,
                &[("environment", environment.as_str()), ("kind", kind)],
                i64::try_from(found).unwrap_or(i64::MAX),
            );
        }
        for resource in &orphans {
            tracing::warn!(
                %environment,
                kind = resource.kind,
                id = %resource.id,
                tenant = resource.tag(tag_keys::TENANT_ID),
                instance = resource.tag(tag_keys::INSTANCE_ID),
                removing = self.settings.remove_orphans,
                "orphaned resource"
            );
        }
        if !self.settings.remove_orphans {
            return;
        }
        for kind in ORPHAN_KINDS {
            for resource in orphans.iter().filter(|r| r.kind == kind) {
                let (Some(tenant), Some(instance)) = (
                    resource.tag(tag_keys::TENANT_ID),
                    resource.tag(tag_keys::INSTANCE_ID),
                ) else {
                    continue;
                };
                // Checked once more right before the removal.
                if !matches!(self.ownerless(tenant, instance).await, Ok(true)) {
                    continue;
                }
                match remove(cloud, resource).await {
                    Ok(()) => {
                        report.removed += 1;
                        self.metrics.increment(
                            metrics::ORPHANS_REMOVED,
                            &[("environment", environment.as_str()), ("kind", kind)],
                        );
                        tracing::info!(%environment, kind, id = %resource.id, "orphan removed");
                    }
                    Err(error) => {
                        tracing::warn!(%environment, kind, id = %resource.id, %error, "cannot remove orphan");
                        self.fail(report, "orphan_removal");
                    }
                }
            }
        }
    }

    /// The instance's DRIFT conditions after this pass (stored when they changed).
    async fn drift(
        &self,
        cloud: &CloudEnv,
        instance: &Instance,
        now: Timestamp,
        report: &mut ReconcileReport,
    ) -> Vec<InstanceCondition> {
        let checked = matches!(
            instance.state,
            InstanceState::Active | InstanceState::Suspended
        ) && instance.current_operation.is_none()
            && !instance.released;
        if !checked {
            return instance.conditions.clone();
        }
        let mut found: Vec<(String, String, String)> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        for (kind, id) in &instance.resources {
            match check(cloud, instance, kind, id).await {
                Ok(None) => {}
                Ok(Some(message)) => found.push((kind.clone(), id.clone(), message)),
                Err(error) => {
                    tracing::warn!(instance = %instance.name, kind, %error, "cannot check a resource");
                    self.fail(report, "drift");
                    unknown.push(kind.clone());
                }
            }
        }
        let mut conditions: Vec<InstanceCondition> = Vec::new();
        for (kind, id, message) in found {
            let since = instance
                .conditions
                .iter()
                .find(|c| {
                    c.kind == ConditionType::Drift && c.resource_kind == kind && c.resource_id == id
                })
                .map_or(now, |c| c.since);
            conditions.push(InstanceCondition {
                kind: ConditionType::Drift,
                resource_kind: kind,
                resource_id: id,
                message,
                since,
            });
        }
        // A resource that could not be checked keeps what was known about it.
        for kept in instance
            .conditions
            .iter()
            .filter(|c| unknown.contains(&c.resource_kind))
        {
            conditions.push(kept.clone());
        }
        conditions.sort_by(|a, b| a.resource_kind.cmp(&b.resource_kind));
        if conditions == instance.conditions {
            return conditions;
        }
        let added: Vec<&InstanceCondition> = conditions
            .iter()
            .filter(|c| !instance.conditions.contains(c))
            .filter(|c| c.since == now)
            .collect();
        let mut updated = instance.clone();
        updated.conditions = conditions.clone();
        match self
            .store
            .commit(vec![Write::UpdateInstance(updated)])
            .await
        {
            Ok(()) => {
                for condition in added {
                    self.metrics.increment(
                        metrics::DRIFT_DETECTED,
                        &[("kind", condition.resource_kind.as_str())],
                    );
                    tracing::warn!(instance = %instance.name, kind = %condition.resource_kind, id = %condition.resource_id, message = %condition.message, "drift");
                }
                conditions
            }
            // An operation started, or another replica wrote first: the next pass sees it.
            Err(StoreError::Conflict { .. } | StoreError::Contention) => {
                instance.conditions.clone()
            }
            Err(error) => {
                tracing::warn!(instance = %instance.name, %error, "cannot record drift");
                self.fail(report, "drift");
                instance.conditions.clone()
            }
        }
    }

    /// Passes at once, then every `every`, until `shutdown`; a pass in progress is
    /// abandoned between steps, each of which is safe to cut short.
    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        loop {
            let report = tokio::select! {
                () = shutdown.cancelled() => return,
                report = self.reconcile_once(Timestamp::now()) => report,
            };
            if report.orphans_found() > 0
                || report.drift > 0
                || report.stuck > 0
                || report.failures > 0
            {
                tracing::info!(
                    orphans = report.orphans_found(),
                    removed = report.removed,
                    drift = report.drift,
                    stuck = report.stuck,
                    failures = report.failures,
                    "reconcile pass"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Removes one orphan with the call deprovisioning uses for its kind.
async fn remove(cloud: &CloudEnv, resource: &TaggedResource) -> Result<(), CloudError> {
    match resource.kind {
        "listener_rule" => cloud.routing.delete_rule(&resource.id).await,
        "target_group" => cloud.routing.delete_target_group(&resource.id).await,
        "access_point" => cloud.files.delete_access_point(&resource.id).await,
        "secret" => cloud.secrets.delete_secret(&resource.id).await,
        "task_role" => cloud.task_roles.delete_task_role(&resource.id).await,
        other => Err(CloudError::fatal(format!("no removal for kind {other}"))),
    }
}

/// What is wrong with one recorded resource (`None`: nothing found, or a kind not checked).
async fn check(
    cloud: &CloudEnv,
    instance: &Instance,
    kind: &str,
    id: &str,
) -> Result<Option<String>, CloudError> {
    let missing = |what: &str| Some(format!("{what} {id} no longer exists"));
    Ok(match kind {
        "access_point" => match cloud.files.access_point_state(id).await? {
            None => missing("access point"),
            Some(_) => None,
        },
        "secret" => match cloud.secrets.secret_tags(id).await? {
            None => missing("secret"),
            Some(_) => None,
        },
        "target_group" => match cloud.routing.target_health(id).await {
            Ok(_) => None,
            Err(error) if error.kind == ErrorKind::NotFound => missing("target group"),
            Err(error) => return Err(error),
        },
        "listener_rule" => match cloud.routing.rule_action(id).await? {
            None => missing("listener rule"),
            Some(_) => None,
        },
        "service" => {
            let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
            match cloud
                .compute
                .service_status(&cloud.platform.cluster, &names.stack)
                .await?
            {
                None => missing("ECS service"),
                Some(status) if status.status == "INACTIVE" => missing("ECS service"),
                Some(status) => {
                    let expected = if instance.state == InstanceState::Suspended {
                        0
                    } else {
                        instance.spec.desired_count
                    };
                    (status.desired != expected).then(|| {
                        format!(
                            "ECS service {} runs a desired count of {}, the instance's is {expected}",
                            names.stack, status.desired
                        )
                    })
                }
            }
        }
        // The database, task definition and user pool are not checked (yet).
        _ => None,
    })
}
