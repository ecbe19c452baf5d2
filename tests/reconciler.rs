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
