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
//!   nobody's to judge. Where the kind tells its creation time (secrets, ECS services'
//!   `createdAt`, task definitions' `registeredAt`, user pools' `CreationDate`, database
//!   claims' time), a resource younger than `orphan_grace` is left for the next pass. The
//!   owner is read again from the store just before a resource is counted, and removal
//!   (when enabled) uses the calls deprovisioning uses, which succeed when the resource is
//!   already gone: two replicas removing the same orphan both succeed. Kinds, in removal
//!   order ([`ORPHAN_KINDS`]): ECS services (ACTIVE ones: scaled to 0 and deleted; a
//!   DRAINING service is already going and is not counted), listener rules, target groups
//!   (rules and the service go first: a group in use cannot go), task definition families
//!   (`bbws-{env}-…`, one per owner: its revisions deregistered and deleted, after the
//!   service), user pools (the domain, then the pool), access points, secrets, tenant
//!   databases, and instances' IAM task roles (`task_role`: the roles under
//!   `/bbws/instances/`, listed with their tags; removed last, after anything that may
//!   still run as them).
//! - **Databases** carry no tags: the server's ownership table records which instance
//!   claimed each database (and its user). A claim is judged when its owner is an instance
//!   of this environment in the store and its name follows the naming rule for that tenant
//!   here (`tenant_{t}_{env}_db`, or that with an operation's suffix, as a restore makes); it
//!   is an orphan when that owner is DEPROVISIONED with no operation running, and removal
//!   drops the database (with its user, unless a claim of another owner names the same
//!   user) and releases the claim. A claim naming an instance the store never recorded is
//!   not judged at all: instances are never purged from the store, so it belongs to another
//!   control plane sharing the server (as every test's does on the emulator's MariaDB). A
//!   database with no claim at all, named for a tenant that has instances here but none
//!   live, is reported as an orphan and **never removed**: only a claim proves a database
//!   is ours (claiming refuses a name that exists already, so an unclaimed one was made
//!   by someone else, or by hand).
//! - **Waiting operations**: unfinished operations no worker holds (never claimed, or
//!   their lease expired) are counted, with how long the oldest has waited, so that
//!   operations left PENDING can be alerted on.
//! - **Drift**: each resource recorded on an ACTIVE or SUSPENDED instance that has no
//!   operation running is looked up: access point, secret, target group, listener rule;
//!   the ECS service, whose desired count must be the instance's (0 when suspended); the
//!   task definition, which must still be registered (ACTIVE) and be the one the service
//!   runs; the database and its tenant user (through the database adapter, as the master
//!   user); the user pool, when the instance has one. What is missing or different becomes
//!   a DRIFT condition on the instance, naming the resource, and a condition whose cause is
//!   gone is cleared. The instance is written only when its conditions change, conditional
//!   on the version read; a conflict (an operation started, another replica wrote first)
//!   leaves it to the next pass.
//!
//! Everything found is counted in metrics (see [`crate::metrics`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cloud::{
    CloudEnv, CloudError, ErrorKind, TaggedResource, Tags, TaskDefinitionInfo, owner_tags,
};
use crate::config::Config;
use crate::domain::naming::{ResourceNames, tag_keys};
use crate::domain::{
    ConditionType, Environment, Instance, InstanceCondition, InstanceName, InstanceState, Timestamp,
};
use crate::health::CloudEnvs;
use crate::metrics::{self, Metrics};
use crate::store::{InstanceQuery, StateStore, StoreError, Write};
use crate::workflow::engine::StaleOutcome;
use crate::workflow::provision::environment_master;
use crate::workflow::{Engine, StepError};

/// The orphan kinds the reconciler looks for, in the order they are removed: the service
/// before the rule and target group it is attached to and the task definitions it runs; a
/// custom domain's certificate once its rule no longer routes to it.
pub const ORPHAN_KINDS: [&str; 10] = [
    "service",
    "listener_rule",
    "certificate",
    "target_group",
    "task_definition",
    "user_pool",
    "access_point",
    "secret",
    "database",
    "task_role",
];

/// The listings that find them: one call each (the routing listing holds rules and target
/// groups).
const LISTINGS: [&str; 9] = [
    "access_point",
    "secret",
    "routing",
    "service",
    "task_definition",
    "user_pool",
    "database",
    "task_role",
    "certificate",
];

/// The kinds of recorded resources drift is looked for in (a metric each).
pub const DRIFT_KINDS: [&str; 8] = [
    "access_point",
    "secret",
    "target_group",
    "listener_rule",
    "service",
    "task_definition",
    "database",
    "user_pool",
];

/// One resource a listing found.
struct Found {
    resource: TaggedResource,
    /// Its owner is proven (by its tags, or a database's claim). An unclaimed database is
    /// reported, never removed.
    provable: bool,
}

/// Stale operations taken per pass.
const STALE_BATCH: usize = 100;

/// Waiting operations counted per pass (the gauge saturates there).
const WAITING_BATCH: usize = 1000;

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
    /// Unfinished operations no worker held (never claimed, or lease expired), at most
    /// 1000, and how long the oldest of them had waited, in seconds.
    pub waiting: usize,
    pub waiting_oldest_secs: i64,
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
        self.measure_waiting(now, &mut report).await;
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
        for kind in DRIFT_KINDS {
            let value = drift_by_kind.get(kind).copied().unwrap_or(0);
            self.metrics.set(metrics::DRIFT, &[("kind", kind)], value);
        }
        report
    }

    /// Counts the operations no worker holds and how long the oldest has waited, so that
    /// operations left PENDING (every worker busy, no replica claiming) can be alerted on.
    async fn measure_waiting(&self, now: Timestamp, report: &mut ReconcileReport) {
        let waiting = match self.store.runnable_operations(now, WAITING_BATCH).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(%error, "cannot list the operations waiting for a worker");
                self.fail(report, "waiting");
                return;
            }
        };
        let oldest = waiting
            .iter()
            .map(|operation| {
                let since = operation
                    .lease
                    .as_ref()
                    .map_or(operation.created_at, |lease| lease.expires_at);
                (now.millis() - since.millis()).max(0) / 1000
            })
            .max()
            .unwrap_or(0);
        report.waiting = waiting.len();
        report.waiting_oldest_secs = oldest;
        self.metrics
            .set(metrics::OPERATIONS_WAITING, &[], waiting.len() as i64);
        self.metrics
            .set(metrics::OPERATIONS_WAITING_OLDEST, &[], oldest);
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
        let mut tagged: Vec<Found> = Vec::new();
        for listing in LISTINGS {
            match self.listing(cloud, listing, &ours, instances).await {
                Ok(found) => tagged.extend(found),
                Err(error) => {
                    tracing::warn!(%environment, listing, %error, "cannot list tagged resources");
                    self.fail(report, "orphans");
                }
            }
        }
        let grace = millis(self.settings.orphan_grace);
        let mut orphans: Vec<Found> = Vec::new();
        for found in tagged {
            let resource = &found.resource;
            if !found.provable {
                orphans.push(found);
                continue;
            }
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
            let ownerless = self.ownerless(tenant, instance).await;
            match ownerless {
                Ok(true) => orphans.push(found),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%environment, %error, "cannot read an owner");
                    self.fail(report, "orphans");
                }
            }
        }
        for kind in ORPHAN_KINDS {
            let found = orphans.iter().filter(|f| f.resource.kind == kind).count();
            report.orphans.insert((environment, kind), found);
            self.metrics.set(
                metrics::ORPHANS,
                &[("environment", environment.as_str()), ("kind", kind)],
                i64::try_from(found).unwrap_or(i64::MAX),
            );
        }
        for Found { resource, provable } in &orphans {
            tracing::warn!(
                %environment,
                kind = resource.kind,
                id = %resource.id,
                tenant = resource.tag(tag_keys::TENANT_ID),
                instance = resource.tag(tag_keys::INSTANCE_ID),
                removing = self.settings.remove_orphans && *provable,
                "orphaned resource{}",
                if *provable { "" } else { " (unclaimed: not provably ours, never removed)" }
            );
        }
        if !self.settings.remove_orphans {
            return;
        }
        for kind in ORPHAN_KINDS {
            let removable = orphans
                .iter()
                .filter(|f| f.provable && f.resource.kind == kind);
            for Found { resource, .. } in removable {
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
                match self.remove(cloud, resource).await {
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

    /// What one listing finds in the environment (see [`LISTINGS`]).
    async fn listing(
        &self,
        cloud: &CloudEnv,
        listing: &str,
        ours: &Tags,
        instances: &HashMap<(String, String), Instance>,
    ) -> Result<Vec<Found>, CloudError> {
        let platform = &cloud.platform;
        let tagged = match listing {
            "access_point" => {
                cloud
                    .files
                    .tagged_access_points(&platform.file_system_id, ours)
                    .await?
            }
            "secret" => cloud.secrets.tagged_secrets(ours).await?,
            "routing" => {
                // Rules on every listener of the pool; target groups (found by tag, not
                // by listener) once.
                let mut found: Vec<crate::cloud::TaggedResource> = Vec::new();
                for listener in platform.listeners() {
                    for resource in cloud.routing.tagged_routing(&listener, ours).await? {
                        if !found.iter().any(|f| f.id == resource.id) {
                            found.push(resource);
                        }
                    }
                }
                found
            }
            "service" => {
                cloud
                    .compute
                    .tagged_services(&platform.cluster, ours)
                    .await?
            }
            "task_definition" => {
                let prefix = ResourceNames::stack_prefix(cloud.environment);
                cloud.compute.tagged_task_families(&prefix, ours).await?
            }
            "user_pool" => cloud.identity.tagged_user_pools(ours).await?,
            "task_role" => {
                cloud
                    .task_roles
                    .tagged_roles(crate::domain::naming::TASK_ROLE_PATH, ours)
                    .await?
            }
            "certificate" => cloud.certificates.tagged_certificates(ours).await?,
            "database" => return self.databases(cloud, instances).await,
            other => return Err(CloudError::fatal(format!("no listing {other}"))),
        };
        Ok(tagged
            .into_iter()
            .map(|resource| Found {
                resource,
                provable: true,
            })
            .collect())
    }

    /// The environment's tenant databases, as far as this control plane knows their
    /// tenants (one database server may serve several environments, or control planes): each
    /// claim of an instance of this environment whose name follows the naming rule for its
    /// tenant here, as a resource tagged with that owner (its claim time as its creation);
    /// and each unclaimed database named for a tenant that has instances here but none live.
    async fn databases(
        &self,
        cloud: &CloudEnv,
        instances: &HashMap<(String, String), Instance>,
    ) -> Result<Vec<Found>, CloudError> {
        let environment = cloud.environment;
        let master = environment_master(cloud).await.map_err(step_error)?;
        let records = cloud.database.ownership_records(&master).await?;
        let prefix = &self.settings.tag_prefix;
        let mut found = Vec::new();
        for record in &records {
            let Ok(owner) = InstanceName::parse(&record.owner) else {
                continue;
            };
            let key = (owner.tenant.to_string(), owner.instance.to_string());
            // An owner this control plane never recorded is nobody's to judge here.
            if !instances.contains_key(&key)
                || !ResourceNames::derive(&owner.tenant, environment).is_database(&record.database)
            {
                continue;
            }
            found.push(Found {
                resource: TaggedResource {
                    kind: "database",
                    id: record.database.clone(),
                    tags: vec![
                        (format!("{prefix}:{}", tag_keys::TENANT_ID), key.0),
                        (format!("{prefix}:{}", tag_keys::INSTANCE_ID), key.1),
                    ],
                    created_at: Some(record.claimed_at),
                },
                provable: true,
            });
        }
        let mut tenants: HashMap<&str, (ResourceNames, bool)> = HashMap::new();
        for instance in instances.values() {
            let entry = tenants
                .entry(instance.name.tenant.as_str())
                .or_insert_with(|| {
                    (
                        ResourceNames::derive(&instance.name.tenant, environment),
                        false,
                    )
                });
            entry.1 |= instance.state != InstanceState::Deprovisioned;
        }
        for database in cloud.database.databases_named(&master, "tenant_").await? {
            let unclaimed = !records.iter().any(|r| r.database == database)
                && tenants
                    .values()
                    .any(|(names, live)| !live && names.is_database(&database));
            if unclaimed {
                found.push(Found {
                    resource: TaggedResource {
                        kind: "database",
                        id: database,
                        tags: Vec::new(),
                        created_at: None,
                    },
                    provable: false,
                });
            }
        }
        Ok(found)
    }

    /// Removes one orphan with the calls deprovisioning uses for its kind.
    async fn remove(&self, cloud: &CloudEnv, resource: &TaggedResource) -> Result<(), CloudError> {
        match resource.kind {
            "service" => remove_service(cloud, resource).await,
            "listener_rule" => cloud.routing.delete_rule(&resource.id).await,
            "target_group" => cloud.routing.delete_target_group(&resource.id).await,
            "task_definition" => {
                cloud
                    .compute
                    .delete_task_definitions(&resource.id, &owner_tags(&resource.tags))
                    .await
            }
            "user_pool" => cloud.identity.delete_user_pool(&resource.id).await,
            "access_point" => cloud.files.delete_access_point(&resource.id).await,
            "secret" => cloud.secrets.delete_secret(&resource.id).await,
            "database" => self.remove_database(cloud, resource).await,
            "task_role" => cloud.task_roles.delete_task_role(&resource.id).await,
            "certificate" => remove_certificate(cloud, &resource.id).await,
            other => Err(CloudError::fatal(format!("no removal for kind {other}"))),
        }
    }

    /// Drops an orphaned database as deprovisioning does (the database and its user, then
    /// the claim), if the claim is still the orphan owner's. The user stays when a claim of
    /// another owner names it too.
    async fn remove_database(
        &self,
        cloud: &CloudEnv,
        resource: &TaggedResource,
    ) -> Result<(), CloudError> {
        let (Some(tenant), Some(instance)) = (
            resource.tag(tag_keys::TENANT_ID),
            resource.tag(tag_keys::INSTANCE_ID),
        ) else {
            return Ok(());
        };
        let owner = format!("tenants/{tenant}/instances/{instance}");
        let master = environment_master(cloud).await.map_err(step_error)?;
        let records = cloud.database.ownership_records(&master).await?;
        let Some(record) = records
            .iter()
            .find(|r| r.database == resource.id && r.owner == owner)
        else {
            // Released since the listing (another replica removed it).
            return Ok(());
        };
        let shared = records
            .iter()
            .any(|r| r.user == record.user && r.owner != owner);
        if shared {
            cloud
                .database
                .drop_schema(&master, &record.database)
                .await?;
        } else {
            cloud
                .database
                .drop_database(&master, &record.database, &record.user)
                .await?;
        }
        cloud
            .database
            .release_database(&master, &record.database, &owner)
            .await
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
                Ok(Some(message)) => found.push((kind.clone(), condition_id(kind, id), message)),
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

/// Deletes an orphaned service as deprovisioning does (scaled to 0, then deleted), if it
/// is still ACTIVE and still the orphan owner's: its name is the tenant's, so a service of
/// a new instance of the tenant may carry it by now.
/// Takes the certificate off every listener of the pool, then deletes it. ELB lets go of
/// it asynchronously: until it has, ACM refuses (retryable), and a later pass deletes it.
async fn remove_certificate(cloud: &CloudEnv, arn: &str) -> Result<(), CloudError> {
    for listener in cloud.platform.listeners() {
        cloud
            .routing
            .remove_listener_certificate(&listener, arn)
            .await?;
    }
    cloud.certificates.delete_certificate(arn).await
}

async fn remove_service(cloud: &CloudEnv, resource: &TaggedResource) -> Result<(), CloudError> {
    let cluster = &cloud.platform.cluster;
    let Some(tags) = cloud.compute.service_tags(cluster, &resource.id).await? else {
        return Ok(());
    };
    if owner_tags(&tags) != owner_tags(&resource.tags) {
        return Ok(());
    }
    match cloud.compute.service_status(cluster, &resource.id).await? {
        Some(status) if status.status == "ACTIVE" => {
            cloud.compute.delete_service(cluster, &resource.id).await
        }
        // DRAINING: already going.
        _ => Ok(()),
    }
}

fn step_error(error: StepError) -> CloudError {
    match error {
        StepError::Transient(message) | StepError::NotYet(message) => {
            CloudError::new(ErrorKind::Retryable, message)
        }
        StepError::Fatal(message) | StepError::Refused { message, .. } => {
            CloudError::fatal(message)
        }
    }
}

/// How a drift condition names a recorded resource: its id, or for a user pool (recorded
/// with its client and domain) the pool's id.
fn condition_id(kind: &str, recorded: &str) -> String {
    if kind == "user_pool"
        && let Some(pool) = pool_id(recorded)
    {
        return pool;
    }
    recorded.to_owned()
}

fn pool_id(recorded: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(recorded)
        .ok()?
        .get("pool_id")?
        .as_str()
        .map(str::to_owned)
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
        "listener_rule" => {
            // One rule per three host names, recorded together.
            let mut gone = Vec::new();
            for rule in crate::workflow::provision::recorded_rules(id) {
                if cloud.routing.rule_action(rule).await?.is_none() {
                    gone.push(rule);
                }
            }
            (!gone.is_empty())
                .then(|| format!("listener rule {} no longer exists", gone.join(", ")))
        }
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
        "task_definition" => task_definition_drift(cloud, instance, id).await?,
        "database" => {
            let master = environment_master(cloud).await.map_err(step_error)?;
            let user = ResourceNames::derive(&instance.name.tenant, instance.spec.environment)
                .database_user;
            if !cloud.database.database_exists(&master, id).await? {
                missing("database")
            } else if !cloud.database.user_exists(&master, &user).await? {
                Some(format!(
                    "database user {user} of database {id} no longer exists"
                ))
            } else {
                None
            }
        }
        "user_pool" => {
            let pool = pool_id(id).unwrap_or_else(|| id.to_owned());
            (!cloud.identity.user_pool_exists(&pool).await?)
                .then(|| format!("user pool {pool} no longer exists"))
        }
        // Anything else recorded (the site's URL) is not a resource to look up.
        _ => None,
    })
}

/// The recorded task definition must still be registered and be what the service runs.
async fn task_definition_drift(
    cloud: &CloudEnv,
    instance: &Instance,
    recorded: &str,
) -> Result<Option<String>, CloudError> {
    let Some(definition) = cloud.compute.task_definition(recorded).await? else {
        return Ok(Some(format!("task definition {recorded} no longer exists")));
    };
    if definition.status != "ACTIVE" {
        return Ok(Some(format!(
            "task definition {recorded} is {}",
            definition.status
        )));
    }
    let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
    // A missing service is the service's drift.
    let Some(service) = cloud
        .compute
        .service_status(&cloud.platform.cluster, &names.stack)
        .await?
    else {
        return Ok(None);
    };
    if service.task_definition == recorded {
        return Ok(None);
    }
    let running = cloud
        .compute
        .task_definition(&service.task_definition)
        .await?;
    let image = |d: Option<&TaskDefinitionInfo>| {
        d.and_then(|d| d.image.clone())
            .unwrap_or_else(|| "unknown".into())
    };
    Ok(Some(format!(
        "ECS service {} runs task definition {} (image {}), the instance's is {recorded} (image {})",
        names.stack,
        service.task_definition,
        image(running.as_ref()),
        image(Some(&definition)),
    )))
}
