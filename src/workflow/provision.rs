//! Provisioning: every per-tenant resource of DESIGN.md §1, independent ones in parallel,
//! then the ECS service, then waiting until it is steady and its targets are healthy.

use std::time::Duration;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};

use crate::cloud::{
    AccessPointSpec, CloudEnv, CloudError, DEFAULT_DEREGISTRATION_DELAY_SECS, DatabaseClaim,
    ErrorKind, HOSTS_PER_RULE, HostRuleSpec, MasterCredentials, Readiness, SecretSpec, ServiceSpec,
    ServiceStatus, TargetGroupSpec, TaskDefinitionSpec, TaskRoleSpec, UserPoolSpec,
};
use crate::config::Secret;
use crate::domain::naming::{ResourceNames, TASK_ROLE_PATH};
use crate::domain::{
    DnsPurpose, DnsRecordInfo, Instance, InstanceState, Operation, OperationStatus, Timestamp, Verb,
};
use crate::store::{PriorityClaim, StoreError, Write};

use super::placement::{self, LOAD_BALANCER};
use super::{Failure, StepCtx, StepError, StepResult, Workflow, domains};

pub const ACCESS_POINT: &str = "access_point";
pub const SECRET: &str = "secret";
pub const TARGET_GROUP: &str = "target_group";
pub const USER_POOL: &str = "user_pool";
pub const DATABASE: &str = "database";
pub const LISTENER_RULE: &str = "listener_rule";
/// The instance's own IAM task role (its ARN is recorded).
pub const TASK_ROLE: &str = "task_role";
pub const TASK_DEFINITION: &str = "task_definition";
pub const SERVICE: &str = "service";
pub const WAIT_STEADY: &str = "wait_steady";
/// The alias record `{tenant}.{domain}` → the instance's load balancer (output: the
/// Route53 change id), when the platform names its hosted zone.
pub const DNS_RECORD: &str = "dns_record";
/// Waits until Route53 reports that change INSYNC (every name server has it).
pub const WAIT_DNS: &str = "wait_dns";

/// www-data in the official WordPress image.
const WWW_DATA: u32 = 33;
const HIGHEST_PRIORITY: u32 = 50_000;
/// How many of the lowest free priorities a new rule chooses from.
const PRIORITY_SPREAD: usize = 64;

/// How long after a step started ECS may still refuse the instance's new task role as one
/// it cannot assume: IAM propagates a new role within seconds, rarely a minute or more.
pub const ROLE_PROPAGATION: Duration = Duration::from_secs(120);

pub struct Provision;

#[async_trait]
impl Workflow for Provision {
    fn verb(&self) -> Verb {
        Verb::Create
    }

    fn plan(&self, _: &Operation, instance: &Instance, cloud: &CloudEnv) -> Vec<Vec<&'static str>> {
        let mut independent = vec![ACCESS_POINT, SECRET, TARGET_GROUP];
        if cloud.platform.cognito_enabled {
            independent.push(USER_POOL);
        }
        let dns = !cloud.platform.hosted_zone_id.is_empty();
        if dns {
            independent.push(DNS_RECORD);
        }
        let mut second = vec![DATABASE, LISTENER_RULE, TASK_ROLE];
        if dns {
            second.push(WAIT_DNS);
        }
        // The task role names the access point; the task definition names the role.
        // Placement comes first, alone: a full pool fails the operation before anything
        // exists.
        let mut stages = vec![
            vec![LOAD_BALANCER],
            independent,
            second,
            vec![TASK_DEFINITION],
            vec![SERVICE],
            vec![WAIT_STEADY],
        ];
        // Last: the site is up at its platform host while certificates wait for validation.
        if !instance.spec.custom_domains.is_empty() {
            stages.push(vec![domains::CUSTOM_DOMAINS]);
        }
        stages
    }

    async fn run(&self, ctx: &StepCtx, step: &str) -> StepResult<Option<String>> {
        match step {
            LOAD_BALANCER => placement::place(ctx).await.map(Some),
            DNS_RECORD => upsert_dns_record(ctx).await.map(Some),
            WAIT_DNS => wait_dns(ctx).await.map(|()| None),
            ACCESS_POINT => ensure_access_point(ctx).await.map(Some),
            SECRET => ensure_secret(ctx).await.map(Some),
            TARGET_GROUP => ensure_target_group(ctx).await.map(Some),
            USER_POOL => ensure_user_pool(ctx).await.map(Some),
            DATABASE => ensure_database(ctx).await.map(Some),
            LISTENER_RULE => ensure_listener_rule(ctx).await.map(Some),
            TASK_ROLE => ensure_task_role(ctx).await.map(Some),
            TASK_DEFINITION => register_task_definition(ctx).await.map(Some),
            SERVICE => ensure_service(ctx).await.map(Some),
            WAIT_STEADY => wait_steady(ctx).await.map(|()| None),
            domains::CUSTOM_DOMAINS => domains::ensure(ctx).await.map(Some),
            other => Err(StepError::Fatal(format!("unknown step {other}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx, step: &str, resource: Option<&str>) -> StepResult<()> {
        remove(ctx, step, resource).await
    }

    fn rolls_back(&self) -> bool {
        true
    }

    fn running_state(&self) -> InstanceState {
        InstanceState::Provisioning
    }

    fn on_start(&self, instance: &mut Instance) {
        instance.released = false;
    }

    fn on_complete(
        &self,
        instance: &mut Instance,
        operation: &Operation,
        cloud: &CloudEnv,
    ) -> bool {
        instance.state = InstanceState::Active;
        instance.failure_reason = None;
        instance.released = false;
        instance.resources.extend(
            operation
                .steps
                .iter()
                .filter_map(|s| s.resource_id.clone().map(|id| (s.name.clone(), id))),
        );
        instance.load_balancer = instance
            .resources
            .get(LOAD_BALANCER)
            .and_then(|name| cloud.platform.load_balancer(name))
            .map(|lb| crate::domain::Placement {
                name: lb.name,
                listener_arn: lb.listener_arn,
                dns_name: lb.dns_name,
            });
        let domain = &cloud.platform.domain;
        let host = ResourceNames::host(&instance.name.tenant, domain);
        instance
            .dns_records
            .retain(|r| !(r.purpose == DnsPurpose::Traffic && r.name == host));
        if let Some(lb) = &instance.load_balancer
            && instance.resources.contains_key(DNS_RECORD)
        {
            instance.dns_records.insert(
                0,
                DnsRecordInfo {
                    name: host,
                    record_type: "A".into(),
                    value: lb.dns_name.clone(),
                    purpose: DnsPurpose::Traffic,
                    managed: true,
                    in_sync: true,
                },
            );
        }
        if !domain.is_empty() {
            instance.resources.insert(
                "url".into(),
                format!(
                    "https://{}",
                    ResourceNames::host(&instance.name.tenant, domain)
                ),
            );
        }
        false
    }

    fn on_fail(&self, instance: &mut Instance, failure: &Failure<'_>) -> bool {
        instance.state = InstanceState::Failed;
        instance.failure_reason = Some(failure.message.to_owned());
        // A clean rollback leaves nothing: the (tenant, environment) slot is free again, and
        // deleting this instance later must not touch anything (a sibling may exist).
        let released = failure.rolled_back && failure.status != OperationStatus::Stuck;
        if released {
            instance.resources.clear();
            instance.load_balancer = None;
            instance.dns_records.clear();
            instance.released = true;
        }
        released
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(30 * 60)
    }
}

/// Removes what one step made; shared by the provisioning undo and deprovisioning, and
/// succeeds when nothing is left.
///
/// Only what THIS instance owns is removed: names are per (tenant, environment), so a
/// sibling instance of the tenant (say a new one, created after this one failed) uses the
/// same secret, service, task-definition family and database names. Resources found by
/// tag are found by this instance's owner tags; resources found by name are checked for
/// them (the database against the server's ownership table) and left alone otherwise.
/// The recorded id is not trusted alone: what is removed is found by owner tags (which also
/// covers a crash between making a resource and recording it).
pub async fn remove(ctx: &StepCtx, step: &str, _recorded: Option<&str>) -> StepResult<()> {
    let cloud = &ctx.cloud;
    let platform = &cloud.platform;
    match step {
        ACCESS_POINT => {
            let ids = cloud
                .files
                .find_tagged(&platform.file_system_id, &ctx.component_tags("efs"))
                .await?;
            for id in dedup(ids) {
                cloud.files.delete_access_point(&id).await?;
            }
        }
        SECRET => {
            if let Some(tags) = cloud.secrets.secret_tags(&ctx.names.secret).await? {
                if ctx.owns(&tags) {
                    cloud.secrets.delete_secret(&ctx.names.secret).await?;
                } else {
                    tracing::info!(secret = %ctx.names.secret, "not removing a secret another instance owns");
                }
            }
        }
        LOAD_BALANCER => placement::release(ctx).await?,
        DNS_RECORD => {
            // The record is per (tenant, environment): only the instance holding that slot
            // (the guard) ever runs this, so it is this instance's record.
            if !platform.hosted_zone_id.is_empty() {
                let host = ResourceNames::host(&ctx.instance.name.tenant, &platform.domain);
                cloud
                    .dns
                    .delete_record(&platform.hosted_zone_id, &host, "A")
                    .await?;
            }
        }
        WAIT_DNS => {}
        TARGET_GROUP => {
            // Target groups are found by tag alone (the listener only narrows rules).
            let listener = placement::load_balancer_of(ctx)?.listener_arn;
            let tagged = cloud
                .routing
                .find_tagged(&listener, &ctx.component_tags("target-group"))
                .await?;
            for arn in dedup(tagged) {
                cloud.routing.delete_target_group(&arn).await?;
            }
        }
        USER_POOL => {
            let ids = cloud
                .identity
                .find_tagged(&ctx.component_tags("cognito"))
                .await?;
            for id in dedup(ids) {
                cloud.identity.delete_user_pool(&id).await?;
            }
        }
        DATABASE => {
            // Every database this instance claimed: the provisioned one, and any a restore
            // made (the live one after a restore, or one a killed restore left behind).
            let master = master_credentials(ctx).await?;
            let owned = cloud
                .database
                .databases_owned_by(&master, &ctx.owner())
                .await?;
            if owned.is_empty() {
                tracing::info!(database = %ctx.names.database, "this instance owns no database; dropping none");
            }
            for database in &owned {
                cloud
                    .database
                    .drop_database(&master, database, &ctx.names.database_user)
                    .await?;
                cloud
                    .database
                    .release_database(&master, database, &ctx.owner())
                    .await?;
            }
        }
        LISTENER_RULE => {
            let listener = placement::load_balancer_of(ctx)?.listener_arn;
            let arns = cloud
                .routing
                .find_tagged(&listener, &ctx.component_tags("listener-rule"))
                .await?;
            for arn in dedup(arns) {
                cloud.routing.delete_rule(&arn).await?;
            }
            release_priority(ctx, &listener).await?;
        }
        TASK_DEFINITION => {
            // The service's family, and the one-off archiver's (backups and restores run
            // it; an instance deleted without an archive must not keep its revisions).
            for family in [ctx.names.stack.clone(), super::backup::archiver_family(ctx)] {
                cloud
                    .compute
                    .delete_task_definitions(&family, &ctx.owner_tags())
                    .await?;
            }
        }
        TASK_ROLE => {
            let name = task_role_name(ctx);
            if let Some(tags) = cloud.task_roles.role_tags(&name).await? {
                if ctx.owns(&tags) {
                    cloud.task_roles.delete_task_role(&name).await?;
                } else {
                    tracing::info!(role = %name, "not removing an IAM role another instance owns");
                }
            }
        }
        SERVICE => {
            let tags = cloud
                .compute
                .service_tags(&platform.cluster, &ctx.names.stack)
                .await?;
            match tags {
                Some(tags) if ctx.owns(&tags) => {
                    let status = cloud
                        .compute
                        .service_status(&platform.cluster, &ctx.names.stack)
                        .await?;
                    if status.as_ref().is_some_and(|s| s.status != "DRAINING") {
                        cloud
                            .compute
                            .delete_service(&platform.cluster, &ctx.names.stack)
                            .await?;
                    }
                    // A deleted service drains its targets (the target group's
                    // deregistration delay) before it is INACTIVE and its name free.
                    if let Some(status) = cloud
                        .compute
                        .service_status(&platform.cluster, &ctx.names.stack)
                        .await?
                    {
                        return Err(StepError::NotYet(format!(
                            "service {} is {}",
                            ctx.names.stack, status.status
                        )));
                    }
                }
                Some(_) => {
                    tracing::info!(service = %ctx.names.stack, "not removing a service another instance owns");
                }
                None => {}
            }
        }
        WAIT_STEADY => {}
        domains::CUSTOM_DOMAINS => domains::undo_ensure(ctx).await?,
        domains::REMOVE_CUSTOM_DOMAINS => domains::remove_dropped(ctx).await?,
        other => return Err(StepError::Fatal(format!("unknown step {other}"))),
    }
    Ok(())
}

fn dedup(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items.dedup();
    items
}

async fn ensure_access_point(ctx: &StepCtx) -> StepResult<String> {
    let spec = AccessPointSpec {
        file_system_id: ctx.cloud.platform.file_system_id.clone(),
        // Per instance: EFS refuses a reused client token with other parameters (tags), and
        // a sibling instance must never be answered with this one's access point.
        client_token: ctx.instance_token(
            &ctx.names.access_point_token,
            crate::domain::naming::limits::EFS_CREATION_TOKEN,
        ),
        root_path: ctx.names.access_point_root.clone(),
        uid: WWW_DATA,
        gid: WWW_DATA,
        permissions: "755".into(),
        tags: ctx.tags("efs"),
    };
    Ok(ctx.cloud.files.ensure_access_point(&spec).await?)
}

/// The tenant's database credentials. The password comes from the OS CSPRNG (through
/// `rand`'s thread RNG) and is only ever stored in Secrets Manager.
async fn ensure_secret(ctx: &StepCtx) -> StepResult<String> {
    /// The secret's JSON, written straight into the string the [`Secret`] keeps (no copy of
    /// the password is left behind un-wiped).
    #[derive(serde::Serialize)]
    struct Credentials<'a> {
        engine: &'a str,
        host: &'a str,
        port: u16,
        dbname: &'a str,
        username: &'a str,
        password: &'a str,
    }
    let platform = &ctx.cloud.platform;
    let password = zeroize::Zeroizing::new(Alphanumeric.sample_string(&mut rand::rng(), 32));
    let value = serde_json::to_string(&Credentials {
        engine: "mysql",
        host: &platform.db_host,
        port: platform.db_port,
        dbname: &ctx.names.database,
        username: &ctx.names.database_user,
        password: &password,
    })
    .map_err(|e| StepError::Fatal(format!("cannot render the tenant secret: {e}")))?;
    let spec = SecretSpec {
        name: ctx.names.secret.clone(),
        description: format!("database credentials of {}", ctx.instance.name),
        value: Secret::new(value),
        tags: ctx.tags("secret"),
    };
    let (arn, _) = ctx.cloud.secrets.ensure_secret(&spec).await?;
    Ok(arn)
}

async fn ensure_target_group(ctx: &StepCtx) -> StepResult<String> {
    let spec = TargetGroupSpec {
        name: ctx.names.target_group.clone(),
        vpc_id: ctx.cloud.platform.vpc_id.clone(),
        health_check_path: "/".into(),
        matcher: "200,301,302".into(),
        deregistration_delay_secs: Some(
            ctx.cloud
                .platform
                .deregistration_delay_secs
                .unwrap_or(DEFAULT_DEREGISTRATION_DELAY_SECS),
        ),
        tags: ctx.tags("target-group"),
    };
    Ok(ctx.cloud.routing.ensure_target_group(&spec).await?)
}

async fn ensure_user_pool(ctx: &StepCtx) -> StepResult<String> {
    let host = ResourceNames::host(&ctx.instance.name.tenant, &ctx.cloud.platform.domain);
    let spec = UserPoolSpec {
        name: ctx.names.user_pool.clone(),
        domain_prefix: ctx.names.cognito_domain.clone(),
        callback_url: format!("https://{host}/wp-login.php"),
        tags: ctx.tags("cognito"),
    };
    let pool = ctx.cloud.identity.ensure_user_pool(&spec).await?;
    Ok(serde_json::json!({
        "pool_id": pool.pool_id,
        "client_id": pool.client_id,
        "domain": pool.domain,
    })
    .to_string())
}

fn json_secret(what: &str, secret: &Secret) -> StepResult<serde_json::Value> {
    serde_json::from_str(secret.expose())
        .map_err(|_| StepError::Fatal(format!("{what} is not a JSON secret")))
}

/// The environment's MySQL master credentials: an RDS IAM token when the platform enables
/// it, else from its master secret.
pub async fn master_credentials(ctx: &StepCtx) -> StepResult<MasterCredentials> {
    environment_master(&ctx.cloud).await
}

/// [`master_credentials`] of an environment, outside any operation (the reconciler).
pub async fn environment_master(cloud: &CloudEnv) -> StepResult<MasterCredentials> {
    let platform = &cloud.platform;
    if platform.db_iam_auth {
        return Ok(iam_credentials(cloud).await?);
    }
    let secret = cloud
        .secrets
        .read_secret(&platform.master_secret_arn)
        .await?;
    let value = json_secret("the master secret", &secret)?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| StepError::Fatal(format!("the master secret has no {name}")))
    };
    let port = value["port"]
        .as_u64()
        .or_else(|| value["port"].as_str().and_then(|p| p.parse().ok()))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(platform.db_port);
    Ok(MasterCredentials {
        host: value["host"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| platform.db_host.clone()),
        port,
        username: field("username")?,
        password: Secret::new(field("password")?),
        tls: platform.db_tls,
        ca_file: (!platform.db_ca_file.is_empty())
            .then(|| std::path::PathBuf::from(&platform.db_ca_file)),
    })
}

/// The control plane's login with RDS IAM database authentication: the endpoint of the
/// platform's DB instance as RDS describes it (never typed into configuration), the
/// platform's IAM user, a fresh 15-minute token as its password, and verified TLS (the
/// server's CA from `db_ca_file`, RDS's global bundle).
pub async fn iam_credentials(
    cloud: &crate::cloud::CloudEnv,
) -> crate::cloud::CloudResult<MasterCredentials> {
    use crate::cloud::{CloudError, ErrorKind};
    let platform = &cloud.platform;
    let id = &platform.db_instance_identifier;
    let described = cloud
        .db_instances
        .db_instance(id)
        .await?
        .ok_or_else(|| CloudError::fatal(format!("RDS DB instance {id} does not exist")))?;
    let endpoint = described.endpoint.ok_or_else(|| {
        CloudError::new(
            ErrorKind::Retryable,
            format!(
                "RDS DB instance {id} has no endpoint yet (status {})",
                described.status
            ),
        )
    })?;
    if !endpoint.iam_auth_enabled {
        return Err(CloudError::fatal(format!(
            "RDS DB instance {id} does not have IAM database authentication enabled"
        )));
    }
    let password = cloud
        .db_instances
        .auth_token(&endpoint.address, endpoint.port, &platform.db_iam_user)
        .await?;
    Ok(MasterCredentials {
        host: endpoint.address,
        port: endpoint.port,
        username: platform.db_iam_user.clone(),
        password,
        tls: crate::cloud::DbTls::Verified,
        ca_file: (!platform.db_ca_file.is_empty())
            .then(|| std::path::PathBuf::from(&platform.db_ca_file)),
    })
}

async fn ensure_database(ctx: &StepCtx) -> StepResult<String> {
    let master = master_credentials(ctx).await?;
    // Claim the names first: a database or user of that name that this instance did not
    // create is never adopted (and so never dropped by our undo).
    let claim = ctx
        .cloud
        .database
        .claim_database(
            &master,
            &ctx.names.database,
            &ctx.names.database_user,
            &ctx.owner(),
        )
        .await?;
    if let DatabaseClaim::Theirs(holder) = claim {
        return Err(StepError::Fatal(format!(
            "database {} already exists and belongs to {holder}",
            ctx.names.database
        )));
    }
    let tenant = ctx
        .cloud
        .secrets
        .read_secret(ctx.require_output(SECRET)?)
        .await?;
    let password = json_secret("the tenant secret", &tenant)?["password"]
        .as_str()
        .map(|p| Secret::new(p.to_owned()))
        .ok_or_else(|| StepError::Fatal("the tenant secret has no password".into()))?;
    ctx.cloud
        .database
        .ensure_tenant_database(
            &master,
            &ctx.names.database,
            &ctx.names.database_user,
            &password,
            ctx.cloud.platform.db_require_tls,
        )
        .await?;
    Ok(ctx.names.database.clone())
}

/// A priority for a new rule of the instance: one it holds in the store that no rule on the
/// listener uses (claimed by an earlier attempt that died before creating its rule), else a
/// new claim (a conditional put, so two replicas can never take the same one), skipping
/// every priority used on the listener or claimed by anyone.
async fn claim_priority(ctx: &StepCtx, listener: &str) -> StepResult<u32> {
    for attempt in 0..20 {
        let claims = ctx.store.listener_priorities(listener).await?;
        let on_listener = ctx.cloud.routing.rule_priorities(listener).await?;
        if let Some(mine) = claims
            .iter()
            .find(|c| c.owner == ctx.instance.name && !on_listener.contains(&c.priority))
        {
            return Ok(mine.priority);
        }
        let mut used: Vec<u32> = claims.iter().map(|c| c.priority).collect();
        used.extend(on_listener);
        // One of the lowest free priorities, from an offset of the instance's own (see
        // `placement::spread`), so that rules claimed at once do not collide.
        let lowest: Vec<u32> = (1..=HIGHEST_PRIORITY)
            .filter(|p| !used.contains(p))
            .take(PRIORITY_SPREAD)
            .collect();
        if lowest.is_empty() {
            return Err(StepError::Fatal(
                "the listener has no free rule priority".into(),
            ));
        }
        let free = lowest[placement::spread(&ctx.instance.name, attempt) % lowest.len()];
        let claim = PriorityClaim {
            listener_arn: listener.to_owned(),
            priority: free,
            owner: ctx.instance.name.clone(),
        };
        match ctx.store.commit(vec![Write::ClaimPriority(claim)]).await {
            Ok(()) => return Ok(free),
            Err(StoreError::Conflict { .. } | StoreError::Contention) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(StepError::Transient(
        "listener priorities are contended".into(),
    ))
}

/// Gives back every priority the instance holds on `listener`.
async fn release_priority(ctx: &StepCtx, listener: &str) -> StepResult<()> {
    release_priorities_where(ctx, listener, |_| true).await
}

async fn release_priorities_where(
    ctx: &StepCtx,
    listener: &str,
    release: impl Fn(u32) -> bool,
) -> StepResult<()> {
    let claims = ctx.store.listener_priorities(listener).await?;
    for claim in claims
        .into_iter()
        .filter(|c| c.owner == ctx.instance.name && release(c.priority))
    {
        match ctx.store.commit(vec![Write::ReleasePriority(claim)]).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

/// The host names the instance's rules route: its platform host, then its custom domains.
pub fn routed_hosts(ctx: &StepCtx, custom_domains: &[String]) -> Vec<String> {
    let mut hosts = vec![ResourceNames::host(
        &ctx.instance.name.tenant,
        &ctx.cloud.platform.domain,
    )];
    hosts.extend(custom_domains.iter().cloned());
    hosts
}

/// The instance's listener rules as recorded (`listener_rule`: ARNs joined with `,`).
pub fn recorded_rules(recorded: &str) -> Vec<&str> {
    recorded.split(',').filter(|arn| !arn.is_empty()).collect()
}

/// Makes the instance's rules on its listener route exactly `hosts`, [`HOSTS_PER_RULE`] per
/// rule (an ALB host-header condition takes at most three values), each rule forwarding to
/// the instance's target group at a priority of its own: a rule already routing a chunk's
/// first host is kept (its hosts set to the chunk), then any spare rule of the instance is
/// reused, then new rules are made; rules left over are deleted and their priorities given
/// back. The rule slots must be reserved already (see `placement::reserve`). Returns the
/// rules' ARNs joined with `,`, the platform host's rule first.
pub async fn sync_listener_rules(ctx: &StepCtx, hosts: &[String]) -> StepResult<String> {
    let listener = placement::load_balancer_of(ctx)?.listener_arn;
    let routing = &ctx.cloud.routing;
    let target_group = ctx
        .output(TARGET_GROUP)
        .or_else(|| ctx.instance.resources.get(TARGET_GROUP).map(String::as_str))
        .ok_or_else(|| StepError::Fatal("the instance has no target group".into()))?
        .to_owned();
    let mut mine = Vec::new();
    for arn in dedup(
        routing
            .find_tagged(&listener, &ctx.component_tags("listener-rule"))
            .await?,
    ) {
        if let Some(current) = routing.rule_hosts(&arn).await? {
            mine.push((arn, current));
        }
    }
    let mut kept: Vec<String> = Vec::new();
    for chunk in hosts.chunks(HOSTS_PER_RULE) {
        let spare = |(arn, _): &&(String, Vec<String>)| !kept.contains(arn);
        let existing = mine
            .iter()
            .filter(spare)
            .find(|(_, current)| current.contains(&chunk[0]))
            .or_else(|| mine.iter().find(spare))
            .cloned();
        let arn = match existing {
            Some((arn, current)) => {
                if current != chunk {
                    routing.set_rule_hosts(&arn, chunk).await?;
                }
                arn
            }
            None => create_rule(ctx, &listener, chunk, &target_group).await?,
        };
        kept.push(arn);
    }
    for (arn, _) in mine.iter().filter(|(arn, _)| !kept.contains(arn)) {
        routing.delete_rule(arn).await?;
    }
    // Priorities no rule uses any more (a rule just deleted may still be listed for a
    // moment: its priority then goes with the next sync, or at deprovisioning).
    let on_listener = routing.rule_priorities(&listener).await?;
    release_priorities_where(ctx, &listener, |p| !on_listener.contains(&p)).await?;
    Ok(kept.join(","))
}

async fn create_rule(
    ctx: &StepCtx,
    listener: &str,
    hosts: &[String],
    target_group: &str,
) -> StepResult<String> {
    let priority = claim_priority(ctx, listener).await?;
    let spec = HostRuleSpec {
        listener_arn: listener.to_owned(),
        hosts: hosts.to_vec(),
        target_group_arn: target_group.to_owned(),
        priority,
        tags: ctx.tags("listener-rule"),
    };
    match ctx.cloud.routing.ensure_host_rule(&spec).await {
        Ok(arn) => Ok(arn),
        // Someone outside the control plane took the priority: give ours back and retry;
        // the next claim skips every priority the listener already uses.
        Err(error) if error.kind == crate::cloud::ErrorKind::Conflict => {
            release_priorities_where(ctx, listener, |p| p == priority).await?;
            Err(StepError::Transient(error.message))
        }
        Err(error) => Err(error.into()),
    }
}

async fn ensure_listener_rule(ctx: &StepCtx) -> StepResult<String> {
    let hosts = routed_hosts(ctx, &ctx.instance.spec.custom_domains);
    sync_listener_rules(ctx, &hosts).await
}

/// UPSERTs the instance's alias record to its load balancer; the output is the change id.
async fn upsert_dns_record(ctx: &StepCtx) -> StepResult<String> {
    let platform = &ctx.cloud.platform;
    let lb = placement::load_balancer_of(ctx)?;
    if lb.dns_name.is_empty() || lb.hosted_zone_id.is_empty() {
        return Err(StepError::Fatal(format!(
            "load balancer {} has no dns_name or hosted_zone_id in the platform configuration, \
             which its alias records need",
            lb.name
        )));
    }
    let host = ResourceNames::host(&ctx.instance.name.tenant, &platform.domain);
    Ok(ctx
        .cloud
        .dns
        .upsert_alias(
            &platform.hosted_zone_id,
            &host,
            &lb.dns_name,
            &lb.hosted_zone_id,
        )
        .await?)
}

/// Waits for the alias record's change to be INSYNC.
async fn wait_dns(ctx: &StepCtx) -> StepResult<()> {
    let change = ctx.require_output(DNS_RECORD)?;
    if ctx.cloud.dns.change_in_sync(change).await? {
        Ok(())
    } else {
        Err(StepError::NotYet(format!(
            "Route53 change {change} is PENDING"
        )))
    }
}

/// The instance's task role's name (per instance, see `ResourceNames::task_role`).
pub fn task_role_name(ctx: &StepCtx) -> String {
    ctx.names.task_role(ctx.instance.name.instance.as_str())
}

/// The AWS partition of a region (`aws-cn`, `aws-us-gov` or `aws`).
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The ARN of an EFS resource (`file-system/{id}` or `access-point/{id}`) of the
/// environment, as EFS forms it.
fn efs_arn(cloud: &CloudEnv, resource: &str) -> String {
    format!(
        "arn:{}:elasticfilesystem:{}:{}:{resource}",
        partition(&cloud.region),
        cloud.region,
        cloud.account_id
    )
}

/// The instance's own role: ECS tasks of this account may assume it, and it may mount the
/// platform's file system only through this instance's access point.
async fn ensure_task_role(ctx: &StepCtx) -> StepResult<String> {
    let cloud = &ctx.cloud;
    let platform = &cloud.platform;
    let access_point = ctx.require_output(ACCESS_POINT)?;
    let spec = TaskRoleSpec {
        name: task_role_name(ctx),
        path: TASK_ROLE_PATH.to_owned(),
        description: format!("tasks of {}", ctx.instance.name),
        account_id: cloud.account_id.clone(),
        file_system_arn: efs_arn(cloud, &format!("file-system/{}", platform.file_system_id)),
        access_point_arn: efs_arn(cloud, &format!("access-point/{access_point}")),
        permissions_boundary: (!platform.task_role_permissions_boundary.is_empty())
            .then(|| platform.task_role_permissions_boundary.clone()),
        tags: ctx.tags("task-role"),
    };
    Ok(cloud.task_roles.ensure_task_role(&spec).await?)
}

/// A step's failure to use the instance's task role: while ECS may still be catching up with
/// IAM (the role is new, and the step started less than [`ROLE_PROPAGATION`] ago) it is
/// waited for; after that, or for any other error, it is what it is.
pub fn role_refusal(ctx: &StepCtx, step: &str, error: CloudError) -> StepError {
    let started = ctx
        .operation
        .steps
        .iter()
        .find(|s| s.name == step)
        .and_then(|s| s.started_at);
    waiting_for_role(error, started, Timestamp::now())
}

/// The decision of [`role_refusal`], apart from the clock.
pub fn waiting_for_role(
    error: CloudError,
    started: Option<Timestamp>,
    now: Timestamp,
) -> StepError {
    if error.kind != ErrorKind::NotYetVisible {
        return error.into();
    }
    let window = i64::try_from(ROLE_PROPAGATION.as_millis()).unwrap_or(i64::MAX);
    match started {
        Some(started) if now.millis() - started.millis() < window => StepError::NotYet(format!(
            "waiting for IAM to propagate the task role: {}",
            error.message
        )),
        _ => StepError::Fatal(format!(
            "{} (still refused {} s after the step started)",
            error.message,
            ROLE_PROPAGATION.as_secs()
        )),
    }
}

async fn register_task_definition(ctx: &StepCtx) -> StepResult<String> {
    let spec = &ctx.instance.spec;
    let definition = task_definition_spec(
        ctx,
        spec.cpu,
        spec.memory_mib,
        ctx.require_output(ACCESS_POINT)?,
        ctx.require_output(SECRET)?,
    );
    ctx.cloud
        .compute
        .register_task_definition(&definition)
        .await
        .map_err(|error| role_refusal(ctx, TASK_DEFINITION, error))
}

/// The role the instance's tasks run as: its own (this provisioning's, or the one recorded
/// on the instance), else the platform's shared `task_role_arn` (an instance provisioned
/// before instances had roles of their own keeps that one).
pub fn task_role_arn(ctx: &StepCtx) -> String {
    ctx.output(TASK_ROLE)
        .or_else(|| ctx.instance.resources.get(TASK_ROLE).map(String::as_str))
        .unwrap_or(&ctx.cloud.platform.task_role_arn)
        .to_owned()
}

/// The instance's WordPress task definition with the given size, mounting `access_point`
/// and reading the database credentials from `secret_arn` (shared with scaling).
pub fn task_definition_spec(
    ctx: &StepCtx,
    cpu: u32,
    memory_mib: u32,
    access_point: &str,
    secret_arn: &str,
) -> TaskDefinitionSpec {
    let platform = &ctx.cloud.platform;
    let spec = &ctx.instance.spec;
    TaskDefinitionSpec {
        family: ctx.names.stack.clone(),
        cpu,
        memory_mib,
        image: format!("{}:{}", spec.wordpress_image, spec.wordpress_version),
        file_system_id: platform.file_system_id.clone(),
        access_point_id: access_point.to_owned(),
        secret_arn: secret_arn.to_owned(),
        db_host: format!("{}:{}", platform.db_host, platform.db_port),
        // After a restore the instance serves from the restored database.
        db_name: super::backup::live_database(ctx),
        log_group: platform.log_group.clone(),
        log_region: ctx.cloud.region.clone(),
        log_stream_prefix: ctx.names.log_stream_prefix.clone(),
        execution_role_arn: platform.execution_role_arn.clone(),
        task_role_arn: task_role_arn(ctx),
        db_tls: platform.db_require_tls,
        tags: ctx.tags("task-definition"),
    }
}

async fn ensure_service(ctx: &StepCtx) -> StepResult<String> {
    let platform = &ctx.cloud.platform;
    // A service of this name deleted a moment ago drains for up to the target group's
    // deregistration delay; its name is free once it is INACTIVE.
    if let Some(status) = ctx
        .cloud
        .compute
        .service_status(&platform.cluster, &ctx.names.stack)
        .await?
        && status.status == "DRAINING"
    {
        return Err(StepError::NotYet(format!(
            "an earlier service {} is still draining",
            ctx.names.stack
        )));
    }
    let spec = ServiceSpec {
        cluster: platform.cluster.clone(),
        name: ctx.names.stack.clone(),
        task_definition_arn: ctx.require_output(TASK_DEFINITION)?.to_owned(),
        desired_count: ctx.instance.spec.desired_count,
        subnets: platform.subnets.clone(),
        security_groups: platform.security_groups.clone(),
        target_group_arn: ctx.require_output(TARGET_GROUP)?.to_owned(),
        tags: ctx.tags("service"),
    };
    ctx.cloud
        .compute
        .ensure_service(&spec)
        .await
        .map_err(|error| role_refusal(ctx, SERVICE, error))
}

/// Steady: every desired task running, one completed deployment, and enough healthy targets.
async fn wait_steady(ctx: &StepCtx) -> StepResult<()> {
    let platform = &ctx.cloud.platform;
    let Some(status) = ctx
        .cloud
        .compute
        .service_status(&platform.cluster, &ctx.names.stack)
        .await?
    else {
        return Err(StepError::Fatal("the ECS service disappeared".into()));
    };
    let targets = ctx
        .cloud
        .routing
        .target_health(ctx.require_output(TARGET_GROUP)?)
        .await?;
    let healthy = targets
        .iter()
        .filter(|(_, state)| state == "healthy")
        .count() as u32;
    let required = platform.min_healthy_targets.unwrap_or(status.desired);
    steadiness(&status, healthy, required, ctx.cloud.readiness.as_ref())
}

/// The decision of `wait_steady`, apart from the calls that observe the service. What a
/// finished rollout looks like comes from the environment's [`Readiness`] policy.
pub fn steadiness(
    status: &ServiceStatus,
    healthy: u32,
    required: u32,
    readiness: &dyn Readiness,
) -> StepResult<()> {
    super::restart::rollout_finished(status, None, None, readiness)?;
    if healthy < required {
        return Err(StepError::NotYet(format!(
            "{healthy}/{required} healthy targets"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{AwsReadiness, EmulatorReadiness};

    fn status(running: u32, deployments: u32, rollout: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            status: "ACTIVE".into(),
            desired: 2,
            running,
            pending: 0,
            rollout_state: rollout.map(str::to_owned),
            deployments,
            task_definition: "td".into(),
            ..ServiceStatus::default()
        }
    }

    #[test]
    fn a_refused_role_is_waited_for_a_bounded_time() {
        let refused = || {
            CloudError::new(
                ErrorKind::NotYetVisible,
                "ECS was unable to assume the role",
            )
        };
        let started = Timestamp(1_000_000);
        let window = ROLE_PROPAGATION.as_millis() as i64;
        assert!(matches!(
            waiting_for_role(refused(), Some(started), Timestamp(1_000_000 + window - 1)),
            StepError::NotYet(_)
        ));
        assert!(matches!(
            waiting_for_role(refused(), Some(started), Timestamp(1_000_000 + window)),
            StepError::Fatal(_)
        ));
        assert!(matches!(
            waiting_for_role(refused(), None, started),
            StepError::Fatal(_)
        ));
        // Other errors keep their meaning.
        assert!(matches!(
            waiting_for_role(
                CloudError::new(ErrorKind::Retryable, "x"),
                Some(started),
                started
            ),
            StepError::Transient(_)
        ));
        assert!(matches!(
            waiting_for_role(CloudError::fatal("x"), Some(started), started),
            StepError::Fatal(_)
        ));
        assert_eq!(partition("eu-west-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }

    fn not_yet(result: StepResult<()>) -> bool {
        matches!(result, Err(StepError::NotYet(_)))
    }

    #[test]
    fn steady_needs_tasks_one_deployment_and_healthy_targets() {
        assert_eq!(
            steadiness(&status(2, 1, Some("COMPLETED")), 2, 2, &AwsReadiness),
            Ok(())
        );
        assert!(not_yet(steadiness(
            &status(1, 1, Some("COMPLETED")),
            2,
            2,
            &AwsReadiness
        )));
        assert!(not_yet(steadiness(
            &status(2, 2, Some("COMPLETED")),
            2,
            2,
            &AwsReadiness
        )));
        assert!(not_yet(steadiness(
            &status(2, 1, Some("IN_PROGRESS")),
            2,
            2,
            &AwsReadiness
        )));
        assert!(not_yet(steadiness(
            &status(2, 1, Some("COMPLETED")),
            1,
            2,
            &AwsReadiness
        )));
        assert!(matches!(
            steadiness(&status(2, 1, Some("FAILED")), 2, 2, &AwsReadiness),
            Err(StepError::Fatal(_))
        ));
        let mut draining = status(2, 1, None);
        draining.status = "DRAINING".into();
        assert!(not_yet(steadiness(&draining, 2, 2, &AwsReadiness)));
        // An emulator runs no tasks: counts are not observable there, the rest still is.
        assert_eq!(
            steadiness(&status(0, 1, Some("IN_PROGRESS")), 0, 0, &EmulatorReadiness),
            Ok(())
        );
        assert!(not_yet(steadiness(
            &status(0, 2, None),
            0,
            0,
            &EmulatorReadiness
        )));
    }
}
