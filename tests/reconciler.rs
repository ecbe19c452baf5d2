//! The reconciler on moto and MariaDB: orphans made by hand are found, and removed only when
//! enabled (never a live instance's resources, nor those of a provisioning under way);
//! resources deleted or changed behind the control plane's back become DRIFT conditions in
//! GetInstance and clear when the drift goes; a long-expired lease ends STUCK, once, and a
//! recent one does not. Every effect is checked with the AWS SDK (or DynamoDB) directly.

mod common;
mod platform;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use instance_manager::cloud::accounts::Accounts;
use instance_manager::config::Config;
use instance_manager::domain::naming::ResourceNames;
use instance_manager::domain::operation::Lease;
use instance_manager::domain::{
    Environment, Instance, InstanceId, InstanceName, InstanceSpec, InstanceState, Operation,
    OperationStatus, Step, TenantId, Tier, Timestamp, Verb,
};
use instance_manager::proto::v1;
use instance_manager::reconcile::{ReconcileSettings, Reconciler};
use instance_manager::store::{DynamoStore, StateStore, Write};
use instance_manager::workflow::{Engine, EngineSettings, EventBus, StepHook, StepResult};
use platform::{ControlPlane, account_sdk, inventory_of, metadata};

fn settings(remove_orphans: bool, grace: Duration) -> ReconcileSettings {
    ReconcileSettings {
        remove_orphans,
        orphan_grace: grace,
        stuck_after: Duration::from_secs(3600),
        tag_prefix: "bbws".into(),
    }
}

fn reconciler(cp: &ControlPlane, settings: ReconcileSettings) -> Reconciler {
    Reconciler::new(
        cp.store.clone(),
        cp.accounts.clone(),
        cp.engine.clone(),
        vec![Environment::Dev],
        settings,
    )
}

fn our_tags(tenant: &str, instance: &str) -> Vec<(String, String)> {
    let mut tags = platform::tenant_tags(tenant, Environment::Dev);
    tags.push(("bbws:instance-id".into(), instance.into()));
    tags.push(("bbws:component".into(), "secret".into()));
    tags
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Holds one tenant's provisioning before its `database` step (after the access point,
/// secret and target group exist, before the instance records them).
struct Gate {
    tenant: String,
    reached: tokio::sync::Notify,
    release: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl StepHook for Gate {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        if step == "database" && operation.target.tenant.as_str() == self.tenant {
            self.reached.notify_one();
            let mut release = self.release.clone();
            let _ = release.wait_for(|open| *open).await;
        }
        Ok(())
    }
}

async fn secret_exists(sdk: &aws_config::SdkConfig, arn: &str) -> bool {
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    match client.describe_secret().secret_id(arn).send().await {
        Ok(described) => described.deleted_date().is_none(),
        Err(error) => {
            let text = format!("{error:?}");
            assert!(text.contains("ResourceNotFound"), "{text}");
            false
        }
    }
}

async fn target_group_exists(sdk: &aws_config::SdkConfig, arn: &str) -> bool {
    let client = aws_sdk_elasticloadbalancingv2::Client::new(sdk);
    match client
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
    {
        Ok(described) => !described.target_groups().is_empty(),
        Err(error) => {
            let text = format!("{error:?}");
            assert!(text.contains("TargetGroupNotFound"), "{text}");
            false
        }
    }
}

#[tokio::test]
async fn orphans_are_reported_removed_only_when_enabled_and_live_resources_are_untouched() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let (open, release) = tokio::sync::watch::channel(false);
    let busy = platform::tenant("busy");
    let gate = Arc::new(Gate {
        tenant: busy.clone(),
        reached: tokio::sync::Notify::new(),
        release,
    });
    let mut cp = platform::start(config, Some(gate.clone())).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = account_sdk(&cloud).await;

    // A live instance, and one whose provisioning is held after its first resources exist.
    let live = platform::tenant("live");
    let created = cp.create(&live, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let pending = cp.create(&busy, v1::Environment::Dev).await;
    tokio::time::timeout(Duration::from_secs(60), gate.reached.notified())
        .await
        .expect("the provisioning reaches its database step");
    let live_before = inventory_of(&cloud, &live, "wp").await;
    let busy_before = inventory_of(&cloud, &busy, "wp").await;
    assert!(live_before.secrets == 1 && live_before.target_groups == 1);
    assert!(busy_before.secrets == 1 && busy_before.target_groups == 1);

    // Orphans by hand: our tags, naming an instance that does not exist.
    let ghost = platform::tenant("ghost");
    let secrets = aws_sdk_secretsmanager::Client::new(&sdk);
    let tags = our_tags(&ghost, "gone");
    let orphan_secret = secrets
        .create_secret()
        .name(format!("bbws/dev/tenants/{ghost}/database"))
        .secret_string("{}")
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| {
                    aws_sdk_secretsmanager::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                })
                .collect(),
        ))
        .send()
        .await
        .unwrap()
        .arn()
        .unwrap()
        .to_owned();
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let orphan_group = elb
        .create_target_group()
        .name(format!(
            "orphan-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ))
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
        .port(80)
        .vpc_id(&cloud.platform.vpc_id)
        .target_type(aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Ip)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| {
                    aws_sdk_elasticloadbalancingv2::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                })
                .collect(),
        ))
        .send()
        .await
        .unwrap()
        .target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_owned();

    // Within the grace period the new secret is not judged; the target group tells no
    // creation time, so it is.
    let young = reconciler(&cp, settings(true, Duration::from_secs(3600)))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(young.orphans[&(Environment::Dev, "secret")], 0, "{young:?}");
    assert_eq!(young.orphans[&(Environment::Dev, "target_group")], 1);
    assert_eq!(young.removed, 1);
    assert!(!target_group_exists(&sdk, &orphan_group).await);
    assert!(secret_exists(&sdk, &orphan_secret).await);

    // Reported, not removed, when removal is off.
    let reported = reconciler(&cp, settings(false, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(
        reported.orphans[&(Environment::Dev, "secret")],
        1,
        "{reported:?}"
    );
    assert_eq!(reported.orphans[&(Environment::Dev, "target_group")], 0);
    assert_eq!(reported.orphans[&(Environment::Dev, "access_point")], 0);
    assert_eq!(reported.removed, 0);
    assert_eq!(reported.failures, 0);
    assert!(secret_exists(&sdk, &orphan_secret).await);
    let text = cp.engine.render_metrics();
    assert!(
        has_line(
            &text,
            "im_reconcile_orphans{environment=\"DEV\",kind=\"secret\"} 1"
        ),
        "{text}"
    );

    // Removed when enabled; two replicas at once both succeed, one removal each at most.
    let (one, two) = (
        reconciler(&cp, settings(true, Duration::ZERO)),
        reconciler(&cp, settings(true, Duration::ZERO)),
    );
    let (first, second) = tokio::join!(
        one.reconcile_once(Timestamp::now()),
        two.reconcile_once(Timestamp::now()),
    );
    assert_eq!(first.failures + second.failures, 0, "{first:?} {second:?}");
    assert!(first.removed + second.removed >= 1);
    assert!(!secret_exists(&sdk, &orphan_secret).await);
    let text = cp.engine.render_metrics();
    for line in [
        "im_reconcile_orphans_removed_total{environment=\"DEV\",kind=\"target_group\"} 1",
        "im_reconcile_orphans_removed_total{environment=\"DEV\",kind=\"secret\"}",
    ] {
        assert!(text.lines().any(|l| l.starts_with(line)), "{line}\n{text}");
    }
    let again = reconciler(&cp, settings(true, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(again.orphans_found(), 0, "{again:?}");

    // Neither the live instance nor the provisioning under way lost anything.
    assert_eq!(inventory_of(&cloud, &live, "wp").await, live_before);
    assert_eq!(inventory_of(&cloud, &busy, "wp").await, busy_before);
    open.send(true).unwrap();
    let (events, done) = cp.watch(&pending.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    platform::drop_tenant_databases(&[live, busy]).await;
}

#[tokio::test]
async fn drift_becomes_a_condition_and_clears_when_it_goes() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = account_sdk(&cloud).await;
    let tenant = platform::tenant("drift");
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let reconcile = reconciler(&cp, settings(false, Duration::ZERO));

    let clean = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!(clean.drift, 0, "{clean:?}");
    let instance = cp.instance(&tenant).await;
    assert!(instance.conditions.is_empty(), "{instance:#?}");
    let etag = instance.etag.clone();
    // Nothing changed: nothing written.
    assert_eq!(cp.instance(&tenant).await.etag, etag);

    // Behind our back: the secret deleted, the service scaled.
    let secret = instance.resources["secret"].clone();
    aws_sdk_secretsmanager::Client::new(&sdk)
        .delete_secret()
        .secret_id(&secret)
        .force_delete_without_recovery(true)
        .send()
        .await
        .unwrap();
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let service = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Dev).stack;
    ecs.update_service()
        .cluster(&cloud.platform.cluster)
        .service(&service)
        .desired_count(instance.desired_count + 3)
        .send()
        .await
        .unwrap();

    let found = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!(found.drift, 2, "{found:?}");
    let drifted = cp.instance(&tenant).await;
    let kinds: Vec<(&str, v1::instance_condition::Type)> = drifted
        .conditions
        .iter()
        .map(|c| (c.resource_kind.as_str(), c.r#type()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("secret", v1::instance_condition::Type::Drift),
            ("service", v1::instance_condition::Type::Drift)
        ],
        "{drifted:#?}"
    );
    assert_eq!(drifted.conditions[0].resource_id, secret);
    assert!(drifted.conditions[1].message.contains("desired count"));
    let first_seen = drifted.conditions[0].first_seen_time;
    let text = cp.engine.render_metrics();
    for line in [
        "im_reconcile_drift_detected_total{kind=\"secret\"} 1",
        "im_reconcile_drift{kind=\"service\"} 1",
    ] {
        assert!(has_line(&text, line), "{line}\n{text}");
    }

    // The count back as the instance says: that condition goes, the other stays as it was.
    ecs.update_service()
        .cluster(&cloud.platform.cluster)
        .service(&service)
        .desired_count(instance.desired_count)
        .send()
        .await
        .unwrap();
    let after = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!(after.drift, 1, "{after:?}");
    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.conditions.len(), 1, "{instance:#?}");
    assert_eq!(instance.conditions[0].resource_kind, "secret");
    assert_eq!(instance.conditions[0].first_seen_time, first_seen);
    assert!(has_line(
        &cp.engine.render_metrics(),
        "im_reconcile_drift{kind=\"service\"} 0"
    ));
    platform::drop_tenant_databases(&[tenant]).await;
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        environment: Environment::Dev,
        organization_name: "Stale Ltd".to_owned(),
        contact_email: "ops@example.com".to_owned(),
        tier: Tier::Standard,
        desired_count: 2,
        cpu: 512,
        memory_mib: 1024,
        wordpress_image: "wordpress".to_owned(),
        wordpress_version: "6.7-php8.3-apache".to_owned(),
        labels: Default::default(),
        opportunity_id: String::new(),
        cost_center: String::new(),
        custom_domains: Vec::new(),
    }
}

/// An instance provisioning under `operation`, whose lease expired `ago` ms before `now`
/// with no progress since.
async fn stale_provisioning(store: &dyn StateStore, tenant: &str, now: i64, ago: i64) -> Operation {
    let name = InstanceName::new(
        TenantId::parse(tenant).unwrap(),
        InstanceId::parse("wp").unwrap(),
    );
    let then = Timestamp(now - ago);
    let mut operation = Operation::new(
        Verb::Create,
        name.clone(),
        vec![Step::pending("access_point")],
        None,
        Timestamp(now - ago - 60_000),
    );
    operation.status = OperationStatus::InProgress;
    operation.attempt = 1;
    operation.updated_at = then;
    operation.lease = Some(Lease {
        owner: "replica-gone".into(),
        expires_at: then,
    });
    let mut instance = Instance::new_pending(name, spec(), operation.id.clone(), then);
    instance.state = InstanceState::Provisioning;
    store
        .commit(vec![
            Write::CreateInstance(instance),
            Write::CreateOperation(operation.clone()),
        ])
        .await
        .unwrap();
    operation
}

/// The operation's status as DynamoDB holds it.
async fn stored_status(
    dynamo: &aws_sdk_dynamodb::Client,
    table: &str,
    operation: &Operation,
) -> String {
    use aws_sdk_dynamodb::types::AttributeValue;
    let item = dynamo
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(format!("OP#{}", operation.id)))
        .key("sk", AttributeValue::S("OP".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    item.item().unwrap()["status"].as_s().unwrap().clone()
}

#[tokio::test]
async fn a_long_expired_lease_ends_stuck_once_and_a_recent_one_does_not() {
    let config = Config {
        aws_endpoint: Some(common::aws_endpoint()),
        table: common::unique_name("stale"),
        ..Config::default()
    };
    let sdk = common::test_sdk_config().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let store = Arc::new(DynamoStore::new(dynamo.clone(), config.table.clone()));
    store.ensure_table().await.unwrap();
    let store: Arc<dyn StateStore> = store;
    let accounts = Arc::new(Accounts::with_control_plane(&sdk, &config).await);
    // No engine runs here: nobody resumes the operations, as when every replica's claim
    // loop is wedged. Two reconcilers (replicas) share the table.
    let engine = |store: Arc<dyn StateStore>| {
        Engine::new(
            store,
            accounts.clone(),
            EngineSettings::from_config(&config),
            EventBus::new(),
        )
    };
    let (one, two) = (engine(store.clone()), engine(store.clone()));
    let reconciler = |engine: &Arc<Engine>| {
        Reconciler::new(
            store.clone(),
            accounts.clone(),
            engine.clone(),
            Vec::new(),
            settings(false, Duration::ZERO),
        )
    };
    let now = Timestamp::now().millis();
    let old = stale_provisioning(
        store.as_ref(),
        &platform::tenant("old"),
        now,
        2 * 3600 * 1000,
    )
    .await;
    let recent = stale_provisioning(store.as_ref(), &platform::tenant("recent"), now, 10_000).await;

    let (first, second) = (reconciler(&one), reconciler(&two));
    let (a, b) = tokio::join!(
        first.reconcile_once(Timestamp(now)),
        second.reconcile_once(Timestamp(now)),
    );
    assert_eq!(a.stuck + b.stuck, 1, "{a:?} {b:?}");
    assert_eq!(stored_status(&dynamo, &config.table, &old).await, "STUCK");
    // Left waiting: the recent one, its lease expired 10 s ago (the old one has ended).
    for (report, engine) in [(&a, &one), (&b, &two)] {
        assert_eq!(
            (report.waiting, report.waiting_oldest_secs),
            (1, 10),
            "{report:?}"
        );
        let text = engine.render_metrics();
        assert!(has_line(&text, "im_operations_waiting 1"), "{text}");
        assert!(
            has_line(&text, "im_operations_waiting_oldest_seconds 10"),
            "{text}"
        );
    }
    assert_eq!(
        stored_status(&dynamo, &config.table, &recent).await,
        "IN_PROGRESS"
    );
    let stuck_line = "im_operations_stuck_total{reason=\"LEASE_EXPIRED\",verb=\"create\"} 1";
    let counted: Vec<bool> = [&one, &two]
        .iter()
        .map(|engine| has_line(&engine.render_metrics(), stuck_line))
        .collect();
    assert_eq!(counted.iter().filter(|c| **c).count(), 1, "{counted:?}");
    let ended = if counted[0] { &one } else { &two };
    assert!(ended.render_metrics().lines().any(|l| {
        l.starts_with("im_operation_duration_seconds_count{status=\"STUCK\",verb=\"create\"} 1")
    }));
    // The instance no longer names it, so it can be retried or deleted.
    let instance = store.get_instance(&old.target).await.unwrap().unwrap();
    assert_eq!(instance.current_operation, None);
    assert_eq!(instance.state, InstanceState::Failed);

    let again = reconciler(&one).reconcile_once(Timestamp(now)).await;
    assert_eq!(again.stuck, 0, "{again:?}");
    assert_eq!(
        stored_status(&dynamo, &config.table, &recent).await,
        "IN_PROGRESS"
    );
}

/// An instance of `tenant` in DEV that was deprovisioned: in the store only, owning nothing.
async fn deprovisioned(store: &dyn StateStore, tenant: &str) -> InstanceName {
    let name = InstanceName::new(
        TenantId::parse(tenant).unwrap(),
        InstanceId::parse("wp").unwrap(),
    );
    let now = Timestamp::now();
    let mut instance = Instance::new_pending(
        name.clone(),
        spec(),
        instance_manager::domain::OperationId::generate(),
        now,
    );
    instance.state = InstanceState::Deprovisioned;
    instance.current_operation = None;
    store
        .commit(vec![Write::CreateInstance(instance)])
        .await
        .unwrap();
    name
}

async fn sql(statements: &[String]) {
    use mysql_async::prelude::Queryable;
    let mut conn = platform::sql::master_conn().await;
    for statement in statements {
        conn.query_drop(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let _ = conn.disconnect().await;
}

/// (the database exists, its user exists, its claim exists), by the test's own SQL.
async fn database_state(database: &str, user: &str) -> (bool, bool, bool) {
    use mysql_async::prelude::Queryable;
    let mut conn = platform::sql::master_conn().await;
    let mut found = Vec::new();
    for (query, value) in [
        (
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
            database,
        ),
        ("SELECT COUNT(*) FROM mysql.user WHERE User = ?", user),
        (
            "SELECT COUNT(*) FROM instance_manager.owned_databases WHERE database_name = ?",
            database,
        ),
    ] {
        let n: Option<u64> = conn.exec_first(query, (value,)).await.unwrap();
        found.push(n.unwrap_or(0) > 0);
    }
    let _ = conn.disconnect().await;
    (found[0], found[1], found[2])
}

/// The service's status as ECS describes it (`None`: never heard of).
async fn service_state(sdk: &aws_config::SdkConfig, cluster: &str, name: &str) -> Option<String> {
    let described = aws_sdk_ecs::Client::new(sdk)
        .describe_services()
        .cluster(cluster)
        .services(name)
        .send()
        .await
        .unwrap();
    described
        .services()
        .first()
        .and_then(|s| s.status())
        .map(str::to_owned)
}

/// Revisions of `family` that are ACTIVE or INACTIVE (not deleted).
async fn revisions(sdk: &aws_config::SdkConfig, family: &str) -> usize {
    let ecs = aws_sdk_ecs::Client::new(sdk);
    let mut n = 0;
    for status in [
        aws_sdk_ecs::types::TaskDefinitionStatus::Active,
        aws_sdk_ecs::types::TaskDefinitionStatus::Inactive,
    ] {
        n += ecs
            .list_task_definitions()
            .family_prefix(family)
            .status(status)
            .send()
            .await
            .unwrap()
            .task_definition_arns()
            .len();
    }
    n
}

async fn user_pool_exists(sdk: &aws_config::SdkConfig, id: &str) -> bool {
    match aws_sdk_cognitoidentityprovider::Client::new(sdk)
        .describe_user_pool()
        .user_pool_id(id)
        .send()
        .await
    {
        Ok(_) => true,
        Err(error) => {
            let text = format!("{error:?}");
            assert!(text.contains("ResourceNotFound"), "{text}");
            false
        }
    }
}

fn ecs_tags(tags: &[(String, String)]) -> Vec<aws_sdk_ecs::types::Tag> {
    tags.iter()
        .map(|(k, v)| aws_sdk_ecs::types::Tag::builder().key(k).value(v).build())
        .collect()
}

/// Registers a revision of `family` running `image`, tagged `tags`; returns its ARN.
async fn register(
    sdk: &aws_config::SdkConfig,
    family: &str,
    image: &str,
    tags: &[(String, String)],
) -> String {
    aws_sdk_ecs::Client::new(sdk)
        .register_task_definition()
        .family(family)
        .requires_compatibilities(aws_sdk_ecs::types::Compatibility::Fargate)
        .network_mode(aws_sdk_ecs::types::NetworkMode::Awsvpc)
        .cpu("512")
        .memory("1024")
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name("wordpress")
                .image(image)
                .memory(1024)
                .build(),
        )
        .set_tags(Some(ecs_tags(tags)))
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .task_definition_arn()
        .unwrap()
        .to_owned()
}

fn kind_count(report: &instance_manager::reconcile::ReconcileReport, kind: &str) -> usize {
    report.orphans[&(Environment::Dev, kind)]
}

#[tokio::test]
async fn orphaned_services_task_definitions_user_pools_and_databases() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    assert!(config.environments[0].platform.cognito_enabled);
    let mut cp = platform::start(config, None).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = account_sdk(&cloud).await;
    let cluster = cloud.platform.cluster.clone();

    // A live instance (with a user pool), whose resources are never reported.
    let live = platform::tenant("alive");
    let created = cp.create(&live, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let live_before = inventory_of(&cloud, &live, "wp").await;
    assert_eq!(live_before, platform::provisioned(true));

    // By hand, with our tags, for an instance that does not exist: a service running a
    // task definition of its family, and a user pool with a domain.
    let ghost = platform::tenant("ghost");
    let tags = our_tags(&ghost, "gone");
    let names = ResourceNames::derive(&TenantId::parse(&ghost).unwrap(), Environment::Dev);
    let family = names.stack.clone();
    let revision = register(&sdk, &family, "wordpress:6.7", &tags).await;
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    ecs.create_service()
        .cluster(&cluster)
        .service_name(&names.stack)
        .task_definition(&revision)
        .desired_count(2)
        .launch_type(aws_sdk_ecs::types::LaunchType::Fargate)
        .set_tags(Some(ecs_tags(&tags)))
        .send()
        .await
        .unwrap();
    let cognito = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    let pool = cognito
        .create_user_pool()
        .pool_name(&names.user_pool)
        .set_user_pool_tags(Some(tags.iter().cloned().collect()))
        .send()
        .await
        .unwrap()
        .user_pool()
        .unwrap()
        .id()
        .unwrap()
        .to_owned();
    cognito
        .create_user_pool_domain()
        .user_pool_id(&pool)
        .domain(&names.cognito_domain)
        .send()
        .await
        .unwrap();

    // By SQL: a database and user claimed by an instance that was deprovisioned, and an
    // unclaimed database named for another deprovisioned instance's tenant.
    let claimed_tenant = platform::tenant("dbgone");
    let owner = deprovisioned(cp.store.as_ref(), &claimed_tenant).await;
    let claimed = ResourceNames::derive(&owner.tenant, Environment::Dev);
    let unclaimed_tenant = platform::tenant("dbhand");
    deprovisioned(cp.store.as_ref(), &unclaimed_tenant).await;
    let unclaimed = ResourceNames::derive(
        &TenantId::parse(&unclaimed_tenant).unwrap(),
        Environment::Dev,
    );
    sql(&[
        format!("CREATE DATABASE `{}`", claimed.database),
        format!(
            "CREATE USER `{}`@'%' IDENTIFIED BY 'orphan-password'",
            claimed.database_user
        ),
        format!(
            "INSERT INTO instance_manager.owned_databases (database_name, user_name, owner) \
             VALUES ('{}', '{}', '{owner}')",
            claimed.database, claimed.database_user
        ),
        format!("CREATE DATABASE `{}`", unclaimed.database),
    ])
    .await;
    assert_eq!(
        database_state(&claimed.database, &claimed.database_user).await,
        (true, true, true)
    );

    // Young: the pool (CreationDate) and the claim (its time) wait; moto tells no service
    // or task definition creation time, and the unclaimed database has none.
    let young = reconciler(&cp, settings(false, Duration::from_secs(3600)))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(young.failures, 0, "{young:?}");
    assert_eq!(kind_count(&young, "user_pool"), 0, "{young:?}");
    assert_eq!(kind_count(&young, "database"), 1, "{young:?}");
    assert_eq!(kind_count(&young, "service"), 1, "{young:?}");
    assert_eq!(kind_count(&young, "task_definition"), 1, "{young:?}");

    // Reported, not removed, when removal is off.
    let reported = reconciler(&cp, settings(false, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(reported.failures, 0, "{reported:?}");
    for (kind, n) in [
        ("service", 1),
        ("task_definition", 1),
        ("user_pool", 1),
        ("database", 2),
        ("secret", 0),
        ("target_group", 0),
        ("listener_rule", 0),
        ("access_point", 0),
    ] {
        assert_eq!(kind_count(&reported, kind), n, "{kind}: {reported:?}");
    }
    assert_eq!(reported.removed, 0);
    let text = cp.engine.render_metrics();
    for line in [
        "im_reconcile_orphans{environment=\"DEV\",kind=\"service\"} 1",
        "im_reconcile_orphans{environment=\"DEV\",kind=\"task_definition\"} 1",
        "im_reconcile_orphans{environment=\"DEV\",kind=\"user_pool\"} 1",
        "im_reconcile_orphans{environment=\"DEV\",kind=\"database\"} 2",
    ] {
        assert!(has_line(&text, line), "{line}\n{text}");
    }
    assert_eq!(
        service_state(&sdk, &cluster, &names.stack).await.as_deref(),
        Some("ACTIVE")
    );
    assert_eq!(revisions(&sdk, &family).await, 1);
    assert!(user_pool_exists(&sdk, &pool).await);
    assert_eq!(
        database_state(&claimed.database, &claimed.database_user).await,
        (true, true, true)
    );

    // Removed when enabled, each checked directly; the unclaimed database stays.
    let removed = reconciler(&cp, settings(true, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(removed.failures, 0, "{removed:?}");
    assert_eq!(removed.removed, 4, "{removed:?}");
    assert_ne!(
        service_state(&sdk, &cluster, &names.stack).await.as_deref(),
        Some("ACTIVE")
    );
    assert_eq!(revisions(&sdk, &family).await, 0);
    assert!(!user_pool_exists(&sdk, &pool).await);
    assert_eq!(
        database_state(&claimed.database, &claimed.database_user).await,
        (false, false, false)
    );
    assert_eq!(
        database_state(&unclaimed.database, &unclaimed.database_user).await,
        (true, false, false)
    );
    let text = cp.engine.render_metrics();
    for kind in ["service", "task_definition", "user_pool", "database"] {
        let line =
            format!("im_reconcile_orphans_removed_total{{environment=\"DEV\",kind=\"{kind}\"}} 1");
        assert!(has_line(&text, &line), "{line}\n{text}");
    }

    let again = reconciler(&cp, settings(true, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(again.failures, 0, "{again:?}");
    assert_eq!(again.orphans_found(), 1, "{again:?}");
    assert_eq!(kind_count(&again, "database"), 1, "{again:?}");
    assert_eq!(again.removed, 0);

    // The live instance lost nothing, and is not drifted.
    assert_eq!(inventory_of(&cloud, &live, "wp").await, live_before);
    assert!(cp.instance(&live).await.conditions.is_empty());
    sql(&[format!("DROP DATABASE `{}`", unclaimed.database)]).await;
    platform::drop_tenant_databases(&[live]).await;
}

#[tokio::test]
async fn drift_of_the_database_task_definition_and_user_pool() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = account_sdk(&cloud).await;
    let tenant = platform::tenant("drift2");
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    let reconcile = reconciler(&cp, settings(false, Duration::ZERO));
    let clean = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!((clean.drift, clean.failures), (0, 0), "{clean:?}");
    let instance = cp.instance(&tenant).await;
    assert!(instance.conditions.is_empty(), "{instance:#?}");
    let names = ResourceNames::derive(&TenantId::parse(&tenant).unwrap(), Environment::Dev);
    let database = instance.resources["database"].clone();
    assert_eq!(database, names.database);
    let recorded = instance.resources["task_definition"].clone();
    let pool: serde_json::Value = serde_json::from_str(&instance.resources["user_pool"]).unwrap();
    let pool = pool["pool_id"].as_str().unwrap().to_owned();
    let conditions = |instance: &v1::Instance| -> Vec<(String, String, String)> {
        instance
            .conditions
            .iter()
            .map(|c| {
                assert_eq!(c.r#type(), v1::instance_condition::Type::Drift);
                (
                    c.resource_kind.clone(),
                    c.resource_id.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    };

    // The tenant user dropped behind our back.
    sql(&[format!("DROP USER `{}`@'%'", names.database_user)]).await;
    let found = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!(found.drift, 1, "{found:?}");
    let seen = conditions(&cp.instance(&tenant).await);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].0.as_str(), seen[0].1.as_str()),
        ("database", database.as_str())
    );
    assert!(seen[0].2.contains(&names.database_user), "{seen:?}");

    // Then the database, the service's image and the user pool.
    sql(&[format!("DROP DATABASE `{database}`")]).await;
    let family = names.stack.clone();
    let other = register(
        &sdk,
        &family,
        "wordpress:0.1-defaced",
        &platform::tenant_tags(&tenant, Environment::Dev),
    )
    .await;
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let switch = |arn: String| {
        let ecs = ecs.clone();
        let cluster = cloud.platform.cluster.clone();
        let service = names.stack.clone();
        async move {
            ecs.update_service()
                .cluster(cluster)
                .service(service)
                .task_definition(arn)
                .send()
                .await
                .unwrap();
        }
    };
    switch(other.clone()).await;
    let cognito = aws_sdk_cognitoidentityprovider::Client::new(&sdk);
    cognito
        .delete_user_pool_domain()
        .user_pool_id(&pool)
        .domain(&names.cognito_domain)
        .send()
        .await
        .unwrap();
    cognito
        .delete_user_pool()
        .user_pool_id(&pool)
        .send()
        .await
        .unwrap();
    let found = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!((found.drift, found.failures), (3, 0), "{found:?}");
    let seen = conditions(&cp.instance(&tenant).await);
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|(kind, id, _)| (kind.as_str(), id.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("database", database.as_str()),
            ("task_definition", recorded.as_str()),
            ("user_pool", pool.as_str())
        ],
        "{seen:#?}"
    );
    assert!(seen[0].2.contains(&database) && seen[0].2.contains("no longer exists"));
    assert!(
        seen[1].2.contains("wordpress:0.1-defaced") && seen[1].2.contains(&other),
        "{seen:?}"
    );
    assert!(seen[2].2.contains(&pool));
    let text = cp.engine.render_metrics();
    for line in [
        "im_reconcile_drift{kind=\"database\"} 1",
        "im_reconcile_drift{kind=\"task_definition\"} 1",
        "im_reconcile_drift{kind=\"user_pool\"} 1",
        "im_reconcile_drift_detected_total{kind=\"task_definition\"} 1",
        "im_reconcile_drift_detected_total{kind=\"user_pool\"} 1",
    ] {
        assert!(has_line(&text, line), "{line}\n{text}");
    }

    // Put back what can be: the database and its user, the recorded revision. A deleted
    // pool cannot come back under its id: that condition stays.
    sql(&[
        format!("CREATE DATABASE `{database}`"),
        format!(
            "CREATE USER `{}`@'%' IDENTIFIED BY 'restored-password'",
            names.database_user
        ),
    ])
    .await;
    switch(recorded.clone()).await;
    let after = reconcile.reconcile_once(Timestamp::now()).await;
    assert_eq!((after.drift, after.failures), (1, 0), "{after:?}");
    let seen = conditions(&cp.instance(&tenant).await);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "user_pool");
    let text = cp.engine.render_metrics();
    for line in [
        "im_reconcile_drift{kind=\"database\"} 0",
        "im_reconcile_drift{kind=\"task_definition\"} 0",
        "im_reconcile_drift{kind=\"user_pool\"} 1",
    ] {
        assert!(has_line(&text, line), "{line}\n{text}");
    }

    // A deregistered recorded revision is drift too.
    ecs.deregister_task_definition()
        .task_definition(&recorded)
        .send()
        .await
        .unwrap();
    reconcile.reconcile_once(Timestamp::now()).await;
    let seen = conditions(&cp.instance(&tenant).await);
    assert!(
        seen.iter()
            .any(|(kind, _, message)| kind == "task_definition" && message.contains("INACTIVE")),
        "{seen:?}"
    );
    platform::drop_tenant_databases(&[tenant]).await;
}

/// Whether ACM still knows the certificate (DescribeCertificate, with the SDK).
async fn certificate_exists(sdk: &aws_config::SdkConfig, arn: &str) -> bool {
    match aws_sdk_acm::Client::new(sdk)
        .describe_certificate()
        .certificate_arn(arn)
        .send()
        .await
    {
        Ok(_) => true,
        Err(error) => {
            let code = aws_sdk_acm::error::ProvideErrorMetadata::code(&error);
            assert_eq!(code, Some("ResourceNotFoundException"), "{error:?}");
            false
        }
    }
}

/// The listener's certificates besides its default one (DescribeListenerCertificates).
async fn listener_certificates(sdk: &aws_config::SdkConfig, listener: &str) -> Vec<String> {
    aws_sdk_elasticloadbalancingv2::Client::new(sdk)
        .describe_listener_certificates()
        .listener_arn(listener)
        .send()
        .await
        .unwrap()
        .certificates()
        .iter()
        .filter(|c| c.is_default() != Some(true))
        .filter_map(|c| c.certificate_arn().map(str::to_owned))
        .collect()
}

/// Requests a certificate for `domain` with `tags` and puts it on `listener`.
async fn certificate_on_listener(
    sdk: &aws_config::SdkConfig,
    listener: &str,
    domain: &str,
    tags: &[(String, String)],
) -> String {
    let acm = aws_sdk_acm::Client::new(sdk);
    let arn = acm
        .request_certificate()
        .domain_name(domain)
        .validation_method(aws_sdk_acm::types::ValidationMethod::Dns)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| {
                    aws_sdk_acm::types::Tag::builder()
                        .key(k)
                        .value(v)
                        .build()
                        .unwrap()
                })
                .collect(),
        ))
        .send()
        .await
        .unwrap()
        .certificate_arn()
        .unwrap()
        .to_owned();
    aws_sdk_elasticloadbalancingv2::Client::new(sdk)
        .add_listener_certificates()
        .listener_arn(listener)
        .certificates(
            aws_sdk_elasticloadbalancingv2::types::Certificate::builder()
                .certificate_arn(&arn)
                .build(),
        )
        .send()
        .await
        .unwrap();
    arn
}

#[tokio::test]
async fn orphaned_certificates_are_taken_off_the_listener_and_deleted() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let cp = platform::start(config, None).await;
    let cloud = cp.cloud(Environment::Dev).await;
    let sdk = account_sdk(&cloud).await;
    let listener = cloud.platform.listener_arn.clone();

    // By hand, on the listener: a custom domain's certificate tagged for an instance that
    // does not exist; one of ours naming no instance; one that is not ours at all.
    let ghost = platform::tenant("certghost");
    let mut orphan_tags = platform::tenant_tags(&ghost, Environment::Dev);
    orphan_tags.push(("bbws:instance-id".into(), "gone".into()));
    orphan_tags.push(("bbws:component".into(), "certificate".into()));
    let orphan = certificate_on_listener(&sdk, &listener, "shop.ghost.example", &orphan_tags).await;
    let unowned = certificate_on_listener(
        &sdk,
        &listener,
        "shop.unowned.example",
        &platform::tenant_tags(&ghost, Environment::Dev),
    )
    .await;
    let foreign = certificate_on_listener(
        &sdk,
        &listener,
        "shop.foreign.example",
        &[("team".to_owned(), "web".to_owned())],
    )
    .await;
    let mut all = vec![orphan.clone(), unowned.clone(), foreign.clone()];
    all.sort();

    // Reported, and left, when removal is off.
    let reported = reconciler(&cp, settings(false, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(reported.failures, 0, "{reported:?}");
    assert_eq!(kind_count(&reported, "certificate"), 1, "{reported:?}");
    assert!(certificate_exists(&sdk, &orphan).await);
    let mut on_listener = listener_certificates(&sdk, &listener).await;
    on_listener.sort();
    assert_eq!(on_listener, all);

    // Removed when enabled: off the listener, then deleted; the others stay.
    let removed = reconciler(&cp, settings(true, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(removed.failures, 0, "{removed:?}");
    assert_eq!(removed.removed, 1, "{removed:?}");
    assert!(!certificate_exists(&sdk, &orphan).await);
    assert!(certificate_exists(&sdk, &unowned).await);
    assert!(certificate_exists(&sdk, &foreign).await);
    let mut left = listener_certificates(&sdk, &listener).await;
    left.sort();
    let mut want = vec![unowned.clone(), foreign.clone()];
    want.sort();
    assert_eq!(left, want);
    let text = cp.engine.render_metrics();
    let line = "im_reconcile_orphans_removed_total{environment=\"DEV\",kind=\"certificate\"} 1";
    assert!(has_line(&text, line), "{line}\n{text}");

    let again = reconciler(&cp, settings(true, Duration::ZERO))
        .reconcile_once(Timestamp::now())
        .await;
    assert_eq!(kind_count(&again, "certificate"), 0, "{again:?}");
}
