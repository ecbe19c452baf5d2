//! Provisioning and deprovisioning end to end, in process, on moto and MariaDB: every
//! resource checked with direct SDK calls, across two accounts, with failures injected at
//! every step, and with cancellation.

mod common;
mod platform;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use instance_manager::domain::{Environment, Operation};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::v1;
use instance_manager::workflow::{StepError, StepHook, StepResult};
use mysql_async::prelude::Queryable;
use platform::{inventory, metadata, provisioned};
use tokio::sync::Notify;
use tonic::Code;

fn status(operation: &lro::Operation) -> v1::OperationStatus {
    metadata(operation).status()
}

fn create_request(tenant: &str, id: &str) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: id.into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: "Again Ltd".into(),
            contact_email: "ops@example.com".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn tenant_login(secret_json: &str) -> mysql_async::Conn {
    let value: serde_json::Value = serde_json::from_str(secret_json).unwrap();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(value["host"].as_str().unwrap())
        .tcp_port(value["port"].as_u64().unwrap() as u16)
        .user(value["username"].as_str())
        .pass(value["password"].as_str())
        .db_name(value["dbname"].as_str());
    mysql_async::Conn::new(opts)
        .await
        .expect("the tenant user logs in")
}

#[tokio::test]
async fn provision_then_deprovision_leaves_nothing_but_the_archive() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let mut cp = platform::start(config, None).await;
    let tenant = platform::tenant("acme");
    let operation = cp.create(&tenant, v1::Environment::Dev).await;
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    // The log is complete and ordered: sequences 1..=n, every step started and done.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, i as i64 + 1);
    }
    assert!(events.last().unwrap().terminal);
    for step in [
        "access_point",
        "secret",
        "target_group",
        "user_pool",
        "database",
        "listener_rule",
        "task_role",
        "task_definition",
        "service",
        "wait_steady",
    ] {
        let started = events
            .iter()
            .position(|e| e.step == step && e.step_status() == v1::StepStatus::Running);
        let succeeded = events
            .iter()
            .position(|e| e.step == step && e.step_status() == v1::StepStatus::Succeeded);
        assert!(
            matches!((started, succeeded), (Some(a), Some(b)) if a < b),
            "{step}: {events:#?}"
        );
    }
    let Some(lro::operation::Result::Response(response)) = &done.result else {
        panic!("no response: {done:?}");
    };
    assert_eq!(
        response.type_url,
        "type.googleapis.com/bbws.instance.v1.Instance"
    );

    let instance = cp.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    assert_eq!(instance.url, format!("https://{tenant}.dev.sites.test"));
    let cloud = cp.cloud(Environment::Dev).await;
    assert_eq!(inventory(&cloud, &tenant).await, provisioned(true));

    let sdk = cp.sdk(Environment::Dev);
    let tag = |tags: &[(String, String)], key: &str| {
        tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    // EFS access point: root, POSIX user, tags.
    let efs = aws_sdk_efs::Client::new(&sdk);
    let ap = &efs
        .describe_access_points()
        .access_point_id(&instance.resources["access_point"])
        .send()
        .await
        .unwrap()
        .access_points
        .unwrap()[0];
    assert_eq!(
        ap.root_directory().unwrap().path().unwrap(),
        format!("/tenant-{tenant}")
    );
    assert_eq!(ap.posix_user().unwrap().uid(), 33);
    let ap_tags: Vec<(String, String)> = ap
        .tags()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect();
    assert_eq!(tag(&ap_tags, "bbws:tenant-id"), Some(tenant.clone()));
    assert_eq!(tag(&ap_tags, "bbws:cost-center"), Some("cc-42".into()));
    assert_eq!(tag(&ap_tags, "bbws:opportunity"), Some("opp-7".into()));

    // The secret's credentials work in the tenant database and nowhere else.
    let secrets = aws_sdk_secretsmanager::Client::new(&sdk);
    let secret = secrets
        .get_secret_value()
        .secret_id(&instance.resources["secret"])
        .send()
        .await
        .unwrap();
    let mut conn = tenant_login(secret.secret_string().unwrap()).await;
    conn.query_drop("CREATE TABLE wp_probe (id INT PRIMARY KEY)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO wp_probe VALUES (1)")
        .await
        .unwrap();
    assert!(
        conn.query_drop("CREATE TABLE test.intruder (id INT)")
            .await
            .is_err(),
        "reached another database"
    );
    assert!(
        conn.query_drop("CREATE DATABASE other_db").await.is_err(),
        "may create databases"
    );
    drop(conn);

    // Routing: the target group and the host rule.
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let tg = &elb
        .describe_target_groups()
        .target_group_arns(&instance.resources["target_group"])
        .send()
        .await
        .unwrap()
        .target_groups
        .unwrap()[0];
    assert_eq!(tg.matcher().unwrap().http_code(), Some("200,301,302"));
    assert_eq!(tg.target_type().unwrap().as_str(), "ip");
    assert_eq!(tg.port(), Some(80));
    let rules = elb
        .describe_rules()
        .listener_arn(&cloud.platform.listener_arn)
        .send()
        .await
        .unwrap()
        .rules
        .unwrap();
    let rule = rules
        .iter()
        .find(|r| r.rule_arn() == Some(instance.resources["listener_rule"].as_str()))
        .expect("rule");
    let hosts = format!("{:?}", rule.conditions());
    assert!(
        hosts.contains(&format!("{tenant}.dev.sites.test")),
        "{hosts}"
    );

    // ECS: the task definition and the service as the design card says.
    let ecs = aws_sdk_ecs::Client::new(&sdk);
    let definition = ecs
        .describe_task_definition()
        .task_definition(&instance.resources["task_definition"])
        .send()
        .await
        .unwrap()
        .task_definition
        .unwrap();
    assert_eq!(
        (definition.cpu(), definition.memory()),
        (Some("512"), Some("1024"))
    );
    let container = &definition.container_definitions()[0];
    assert_eq!(container.name(), Some("wordpress"));
    assert_eq!(container.port_mappings()[0].container_port(), Some(80));
    let volume = definition.volumes()[0].efs_volume_configuration().unwrap();
    assert_eq!(volume.transit_encryption().unwrap().as_str(), "ENABLED");
    assert_eq!(
        volume.authorization_config().unwrap().access_point_id(),
        Some(instance.resources["access_point"].as_str())
    );
    let secret_refs: Vec<&str> = container.secrets().iter().map(|s| s.value_from()).collect();
    assert!(
        secret_refs
            .iter()
            .all(|r| r.starts_with(&instance.resources["secret"])),
        "{secret_refs:?}"
    );
    let service = &ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(&instance.resources["service"])
        .send()
        .await
        .unwrap()
        .services
        .unwrap()[0];
    assert_eq!(service.desired_count(), 2);
    let network = service
        .network_configuration()
        .unwrap()
        .awsvpc_configuration()
        .unwrap();
    assert_eq!(network.assign_public_ip().unwrap().as_str(), "DISABLED");
    // moto does not keep deploymentConfiguration (circuit breaker, 50/200 %): the adapter
    // test (tests/cloud_aws.rs) checks what CreateService sends instead.
    assert_eq!(
        service.propagate_tags().map(|p| p.as_str()),
        Some("SERVICE")
    );

    // Deprovision: archive, remove, verify.
    let deleted = cp
        .instances
        .delete_instance(v1::DeleteInstanceRequest {
            name: instance.name.clone(),
            etag: instance.etag.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (events, done) = cp.watch(&deleted.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(
        cp.instance(&tenant).await.state(),
        v1::InstanceState::Deprovisioned
    );
    assert!(
        inventory(&cloud, &tenant).await.is_empty(),
        "{:?}",
        inventory(&cloud, &tenant).await
    );
    let archive = cloud
        .objects
        .list_objects(
            &cloud.platform.archive_bucket,
            &format!("backups/dev/{tenant}/wp/"),
        )
        .await
        .unwrap();
    assert!(
        archive.iter().any(|k| k.ends_with("database.sql.gz")),
        "{archive:?}"
    );
    assert!(
        archive.iter().any(|k| k.ends_with("manifest.json")),
        "{archive:?}"
    );
    // The dump holds the tenant's data.
    let s3 = aws_sdk_s3::Client::new(&sdk);
    let key = archive
        .iter()
        .find(|k| k.ends_with("database.sql.gz"))
        .unwrap();
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
    let mut sql = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut sql).unwrap();
    assert!(sql.contains("wp_probe"), "{sql}");
    // The standard dump program made it (its header), and database.json beside it records
    // the object's size and sha256 as stored.
    assert!(
        sql.lines()
            .take(3)
            .any(|l| l.starts_with("-- MariaDB dump")),
        "{}",
        &sql[..sql.len().min(200)]
    );
    let manifest_key = key.replace("database.sql.gz", "database.json");
    let manifest = s3
        .get_object()
        .bucket(&cloud.platform.archive_bucket)
        .key(&manifest_key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let summary: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let manifest = serde_json::json!({ "summary": summary });
    assert_eq!(
        manifest["summary"]["sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
        "{manifest}"
    );
    assert_eq!(
        manifest["summary"]["compressed_bytes"],
        body.len(),
        "{manifest}"
    );
    assert_eq!(
        manifest["summary"]["uncompressed_bytes"],
        sql.len(),
        "{manifest}"
    );

    // The slot is free again: the tenant can have a new instance in DEV, under a new name
    // (the deprovisioned record keeps its name for the audit trail).
    let reused = cp
        .instances
        .create_instance(create_request(&tenant, "wp"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    cp.instances
        .create_instance(create_request(&tenant, "wp-2"))
        .await
        .unwrap();
}

#[tokio::test]
async fn each_environment_provisions_in_its_own_account() {
    let config = platform::config_with_platforms(&[Environment::Dev, Environment::Sit]).await;
    let mut cp = platform::start(config, None).await;
    let (dev_tenant, sit_tenant) = (platform::tenant("dev"), platform::tenant("sit"));
    let dev = cp.create(&dev_tenant, v1::Environment::Dev).await;
    let sit = cp.create(&sit_tenant, v1::Environment::Sit).await;
    for name in [dev.name, sit.name] {
        let (events, done) = cp.watch(&name).await;
        assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    }
    let dev_cloud = cp.cloud(Environment::Dev).await;
    let sit_cloud = cp.cloud(Environment::Sit).await;
    assert_ne!(dev_cloud.account_id, sit_cloud.account_id);
    assert_eq!(inventory(&dev_cloud, &dev_tenant).await, provisioned(true));
    assert_eq!(inventory(&sit_cloud, &sit_tenant).await, provisioned(false));
    // Nothing of either tenant in the other's account (the database server is shared locally).
    let dev_in_sit = inventory(&sit_cloud, &dev_tenant).await;
    let sit_in_dev = inventory(&dev_cloud, &sit_tenant).await;
    for found in [dev_in_sit, sit_in_dev] {
        // Only MySQL is shared (the databases are on one local server).
        assert_eq!(
            found,
            platform::Inventory {
                databases: found.databases,
                database_users: found.database_users,
                ..Default::default()
            }
        );
    }
    // And raw: each account's secrets list only its own tenant's.
    for (sdk, own, other) in [
        (cp.sdk(Environment::Dev), &dev_tenant, &sit_tenant),
        (cp.sdk(Environment::Sit), &sit_tenant, &dev_tenant),
    ] {
        let names: Vec<String> = aws_sdk_secretsmanager::Client::new(&sdk)
            .list_secrets()
            .send()
            .await
            .unwrap()
            .secret_list()
            .iter()
            .filter_map(|s| s.name().map(str::to_owned))
            .collect();
        assert!(names.iter().any(|n| n.contains(own.as_str())), "{names:?}");
        assert!(
            !names.iter().any(|n| n.contains(other.as_str())),
            "{names:?}"
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Before,
    After,
}

/// Fails one step of one tenant's provisioning, once.
#[derive(Default)]
struct FailOnce {
    armed: Mutex<HashMap<String, (String, Phase)>>,
}

impl FailOnce {
    fn arm(&self, tenant: &str, step: &str, phase: Phase) {
        self.armed
            .lock()
            .unwrap()
            .insert(tenant.into(), (step.into(), phase));
    }

    fn fire(&self, operation: &Operation, step: &str, phase: Phase) -> StepResult<()> {
        let mut armed = self.armed.lock().unwrap();
        let tenant = operation.target.tenant.to_string();
        if armed.get(&tenant) == Some(&(step.to_owned(), phase)) {
            armed.remove(&tenant);
            return Err(StepError::Fatal(format!(
                "injected failure in {step} ({phase:?})"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl StepHook for FailOnce {
    async fn before(&self, operation: &Operation, step: &str) -> StepResult<()> {
        self.fire(operation, step, Phase::Before)
    }
    async fn after(&self, operation: &Operation, step: &str) -> StepResult<()> {
        self.fire(operation, step, Phase::After)
    }
}

#[tokio::test]
async fn a_failure_at_any_step_rolls_back_completely_and_a_retry_succeeds() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let hook = Arc::new(FailOnce::default());
    let cp = platform::start(config, Some(hook.clone())).await;
    let steps = [
        "access_point",
        "secret",
        "target_group",
        "user_pool",
        "database",
        "listener_rule",
        "task_role",
        "task_definition",
        "service",
        "wait_steady",
    ];
    let mut cases = Vec::new();
    for step in steps {
        for phase in [Phase::Before, Phase::After] {
            let tenant = platform::tenant("fail");
            hook.arm(&tenant, step, phase);
            cases.push((tenant, step, phase));
        }
    }
    let cloud = cp.cloud(Environment::Dev).await;
    let runs = cases.iter().map(|(tenant, step, phase)| {
        let mut cp = cp.client();
        let cloud = cloud.clone();
        async move {
            let label = format!("{step} {phase:?}");
            let operation = cp.create(tenant, v1::Environment::Dev).await;
            let (events, failed) = cp.watch(&operation.name).await;
            assert_eq!(
                status(&failed),
                v1::OperationStatus::Failed,
                "{label}: {events:#?}"
            );
            let Some(lro::operation::Result::Error(error)) = &failed.result else {
                panic!("{label}: no error")
            };
            assert!(error.message.contains(step), "{label}: {}", error.message);
            let instance = cp.instance(tenant).await;
            assert_eq!(instance.state(), v1::InstanceState::Failed, "{label}");
            assert!(
                inventory(&cloud, tenant).await.is_empty(),
                "{label}: left {:?}",
                inventory(&cloud, tenant).await
            );

            // Retry: resumes, adopts nothing stale, and ends with exactly one of everything.
            let retried = cp
                .instances
                .retry_operation(v1::RetryOperationRequest {
                    name: operation.name.clone(),
                    request_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(retried.name, operation.name);
            let (events, done) = cp
                .watch_from(&operation.name, events.len() as i64 + 1)
                .await;
            assert_eq!(
                status(&done),
                v1::OperationStatus::Completed,
                "{label}: {events:#?}"
            );
            assert_eq!(metadata(&done).attempt, 2, "{label}");
            assert_eq!(
                inventory(&cloud, tenant).await,
                provisioned(true),
                "{label}"
            );
            assert_eq!(
                cp.instance(tenant).await.state(),
                v1::InstanceState::Active,
                "{label}"
            );
        }
    });
    // A few at a time: moto answers one request at a time.
    let mut runs = std::pin::pin!(futures::stream::iter(runs).buffer_unordered(6));
    while runs.next().await.is_some() {}
}

#[tokio::test]
async fn a_new_create_succeeds_after_a_failed_one() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let hook = Arc::new(FailOnce::default());
    let mut cp = platform::start(config, Some(hook.clone())).await;
    let tenant = platform::tenant("again");
    hook.arm(&tenant, "service", Phase::After);
    let first = cp.create(&tenant, v1::Environment::Sit).await;
    let (_, failed) = cp.watch(&first.name).await;
    assert_eq!(status(&failed), v1::OperationStatus::Failed);
    let mut request = create_request(&tenant, "wp-2");
    request.instance.as_mut().unwrap().environment = v1::Environment::Sit.into();
    let second = cp
        .instances
        .create_instance(request)
        .await
        .unwrap()
        .into_inner();
    let (events, done) = cp.watch(&second.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed, "{events:#?}");
    assert_eq!(
        inventory(&cp.cloud(Environment::Sit).await, &tenant).await,
        provisioned(false)
    );
    // The failed operation can no longer be retried into a second instance of the slot.
    let status = cp
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: first.name,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

/// Holds one step until released.
struct Gate {
    step: &'static str,
    reached: Notify,
    release: Notify,
}

#[async_trait]
impl StepHook for Gate {
    async fn before(&self, _: &Operation, step: &str) -> StepResult<()> {
        if step == self.step {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn cancel_stops_at_the_next_step_boundary_and_undoes() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let gate = Arc::new(Gate {
        step: "service",
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(gate.clone())).await;
    let tenant = platform::tenant("cancel");
    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    gate.reached.notified().await;

    // Busy: a second mutating operation is refused while this one runs.
    let busy = cp
        .instances
        .delete_instance(v1::DeleteInstanceRequest {
            name: format!("tenants/{tenant}/instances/wp"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");

    cp.operations
        .cancel_operation(lro::CancelOperationRequest {
            name: operation.name.clone(),
        })
        .await
        .unwrap();
    gate.release.notify_one();
    let (events, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Cancelled, "{events:#?}");
    assert!(events.iter().any(|e| e.message == "cancellation requested"));
    assert!(
        !events
            .iter()
            .any(|e| e.step == "wait_steady" && e.step_status() == v1::StepStatus::Running),
        "ran past the boundary"
    );
    assert!(
        inventory(&cp.cloud(Environment::Sit).await, &tenant)
            .await
            .is_empty()
    );
    let status = cp
        .operations
        .cancel_operation(lro::CancelOperationRequest {
            name: operation.name,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn watch_instance_reports_each_state_change() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    // Held at its first step, the operation cannot finish before the watch starts: the
    // watch must then see the real transition, not just the final state.
    let gate = Arc::new(Gate {
        step: "access_point",
        reached: Notify::new(),
        release: Notify::new(),
    });
    let mut cp = platform::start(config, Some(gate.clone())).await;
    let tenant = platform::tenant("watched");
    let operation = cp.create(&tenant, v1::Environment::Sit).await;
    gate.reached.notified().await;
    let mut stream = cp
        .instances
        .watch_instance(v1::WatchInstanceRequest {
            name: format!("tenants/{tenant}/instances/wp"),
        })
        .await
        .unwrap()
        .into_inner();
    // The first message is the current state, without a previous one.
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.previous_state(), v1::InstanceState::Unspecified);
    let mut seen = vec![first.instance.unwrap().state()];
    gate.release.notify_one();
    while seen.last() != Some(&v1::InstanceState::Active) {
        let change = tokio::time::timeout(std::time::Duration::from_secs(120), stream.message())
            .await
            .expect("no state change within 120 s")
            .unwrap()
            .expect("stream ended early");
        assert_eq!(change.previous_state(), *seen.last().unwrap(), "{seen:?}");
        seen.push(change.instance.unwrap().state());
    }
    assert_eq!(
        seen,
        [v1::InstanceState::Provisioning, v1::InstanceState::Active]
    );
    let (_, done) = cp.watch(&operation.name).await;
    assert_eq!(status(&done), v1::OperationStatus::Completed);
}
