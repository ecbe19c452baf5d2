//! The crash windows of every step, on the real binary: the process ends right after a
//! step's AWS or SQL call returned and before its outcome was saved (a failpoint that exits
//! the process, nothing test-only saves the resource), another process resumes, and the
//! operation converges with exactly one of each resource — or, for a deprovisioning, none.
//! And a crash in the middle of a rollback: the rollback resumes and ends FAILED with
//! nothing left, never a forward run to COMPLETED.
//!
//! Each scenario has its own table (so the scenarios' processes never claim each other's
//! operations) on one shared platform, and they run side by side.

mod common;
mod platform;

use std::time::Duration;

use instance_manager::cloud::accounts::Accounts;
use instance_manager::config::Config;
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use instance_manager::store::DynamoStore;
use instance_manager::workflow::failpoints::EXIT_STATUS;
use platform::{
    Client, Inventory, exited, inventory, metadata, provisioned, serve_process, write_config,
};

/// Short leases: the next process takes over soon after the crash.
const LEASE_SECS: u64 = 5;
const CRASH_LIMIT: Duration = Duration::from_secs(180);
/// Scenarios running at once: each is two or three server processes on one emulator, which
/// answers one request at a time.
const AT_ONCE: usize = 4;

/// [`serve_process`] without blocking the runtime while the process starts.
async fn serve(path: &std::path::Path, failpoints: &str) -> (common::ServerProcess, String) {
    let (path, failpoints) = (path.to_owned(), failpoints.to_owned());
    tokio::task::spawn_blocking(move || serve_process(&path, &failpoints))
        .await
        .unwrap()
}

/// Runs `scenarios` at most [`AT_ONCE`] at a time.
async fn run_all(scenarios: impl Iterator<Item = impl std::future::Future<Output = ()>>) {
    use futures::StreamExt;
    futures::stream::iter(scenarios)
        .buffer_unordered(AT_ONCE)
        .collect::<Vec<()>>()
        .await;
}

/// `config` on a fresh table of its own, written for server processes in `dir`.
async fn own_table(config: &Config, dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = config.clone();
    config.table = common::unique_name("crash");
    // Many processes poll one emulator: keep their claim loops light.
    config.poll_interval_ms = 500;
    DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&common::test_sdk_config().await),
        config.table.clone(),
    )
    .ensure_table()
    .await
    .expect("create table");
    write_config(&config, dir, LEASE_SECS)
}

async fn cloud(config: &Config, environment: Environment) -> instance_manager::cloud::CloudEnv {
    Accounts::with_control_plane(&common::test_sdk_config().await, config)
        .await
        .env(environment)
        .await
        .unwrap()
}

/// The step names of a finished operation, in plan order.
fn step_names(operation: &instance_manager::proto::google_longrunning::Operation) -> Vec<String> {
    metadata(operation)
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

/// Runs `operation` (started by `start`) on a process whose failpoint ends it at `point`;
/// once it has exited, a clean process resumes the operation. Returns the final state and
/// the events, and the address of the surviving process.
async fn crash_and_resume<F, Fut>(
    path: &std::path::Path,
    point: &str,
    start: F,
) -> (
    Vec<v1::OperationEvent>,
    instance_manager::proto::google_longrunning::Operation,
    common::ServerProcess,
)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let (mut crashing, addr) = serve(path, point).await;
    let operation = start(Client::connect(&addr).await).await;
    let status = exited(&mut crashing, CRASH_LIMIT)
        .await
        .unwrap_or_else(|| panic!("{point}: the process did not reach its failpoint"));
    assert_eq!(
        status.code(),
        Some(EXIT_STATUS),
        "{point}: {status}\n{}",
        crashing.logs()
    );
    let (survivor, addr) = serve(path, "").await;
    let (events, done) = Client::connect(&addr).await.watch(&operation).await;
    (events, done, survivor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_provisioning_call_converges_to_one_of_each() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let cloud = cloud(&config, Environment::Dev).await;
    let dir = tempfile::tempdir().unwrap();

    // The plan, as a clean run records it.
    let path = own_table(&config, &dir.path().join("reference")).await;
    let steps = {
        let (_server, addr) = serve(&path, "").await;
        let mut client = Client::connect(&addr).await;
        let tenant = platform::tenant("ref");
        let operation = client.create(&tenant, v1::Environment::Dev).await;
        step_names(&client.completed(&operation.name).await)
    };
    assert!(steps.len() >= 8, "{steps:?}");

    let scenarios = steps.iter().map(|step| {
        let dir = dir.path().join(step);
        let config = &config;
        let cloud = &cloud;
        async move {
            let path = own_table(config, &dir).await;
            let tenant = platform::tenant("crash");
            let point = format!("{step}=exit-after");
            let (events, done, _survivor) = crash_and_resume(&path, &point, |mut client| {
                let tenant = tenant.clone();
                async move { client.create(&tenant, v1::Environment::Dev).await.name }
            })
            .await;
            assert_eq!(
                metadata(&done).status(),
                v1::OperationStatus::Completed,
                "{point}: {events:#?}"
            );
            assert!(
                events.iter().any(|e| e.message.starts_with("resumed by ")),
                "{point}: {events:#?}"
            );
            assert_eq!(
                inventory(cloud, &tenant).await,
                provisioned(true),
                "{point}: duplicated or missing resources"
            );
        }
    });
    run_all(scenarios).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_deprovisioning_call_converges_to_nothing() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let cloud = cloud(&config, Environment::Dev).await;
    let dir = tempfile::tempdir().unwrap();

    // The plan, as a clean deletion records it.
    let path = own_table(&config, &dir.path().join("reference")).await;
    let steps = {
        let (_server, addr) = serve(&path, "").await;
        let mut client = Client::connect(&addr).await;
        let tenant = platform::tenant("ref");
        let created = client.create(&tenant, v1::Environment::Dev).await;
        client.completed(&created.name).await;
        let deleted = client.delete(&tenant).await;
        step_names(&client.completed(&deleted).await)
    };
    assert!(steps.len() >= 8, "{steps:?}");

    let scenarios = steps.iter().map(|step| {
        let dir = dir.path().join(step);
        let config = &config;
        let cloud = &cloud;
        async move {
            let path = own_table(config, &dir).await;
            let tenant = platform::tenant("crash");
            {
                let (_server, addr) = serve(&path, "").await;
                let mut client = Client::connect(&addr).await;
                let created = client.create(&tenant, v1::Environment::Dev).await;
                client.completed(&created.name).await;
            }
            let point = format!("{step}=exit-after");
            let (events, done, survivor) = crash_and_resume(&path, &point, |mut client| {
                let tenant = tenant.clone();
                async move { client.delete(&tenant).await }
            })
            .await;
            assert_eq!(
                metadata(&done).status(),
                v1::OperationStatus::Completed,
                "{point}: {events:#?}"
            );
            assert!(
                inventory(cloud, &tenant).await.is_empty(),
                "{point}: resources remain"
            );
            let mut client = Client::connect(survivor.addr.unwrap().to_string().as_str()).await;
            assert_eq!(
                client.instance(&tenant).await.state(),
                v1::InstanceState::Deprovisioned,
                "{point}"
            );
        }
    });
    run_all(scenarios).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_rollback_resumes_the_rollback() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let cloud = cloud(&config, Environment::Sit).await;
    let dir = tempfile::tempdir().unwrap();
    let path = own_table(&config, dir.path()).await;
    let tenant = platform::tenant("undo");
    // wait_steady fails, the rollback starts from the newest step, and the process dies
    // just before undoing the secret: the secret and the access point still exist.
    let (mut crashing, addr) = serve(&path, "wait_steady=error,undo:secret=exit").await;
    let operation = Client::connect(&addr)
        .await
        .create(&tenant, v1::Environment::Sit)
        .await
        .name;
    let status = exited(&mut crashing, CRASH_LIMIT)
        .await
        .expect("the process did not reach its failpoint");
    assert_eq!(status.code(), Some(EXIT_STATUS), "{}", crashing.logs());
    let left = inventory(&cloud, &tenant).await;
    assert!(
        left.secrets == 1 && left.access_points == 1,
        "the crash came before the secret's undo: {left:?}"
    );

    // A process without failpoints resumes: it must go on undoing, not run forward.
    let (_survivor, addr) = serve(&path, "").await;
    let mut client = Client::connect(&addr).await;
    let (events, done) = client.watch(&operation).await;
    let meta = metadata(&done);
    assert_eq!(meta.status(), v1::OperationStatus::Failed, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.message.starts_with("rollback resumed by ")),
        "{events:#?}"
    );
    // Nothing ran forward after the crash: no step started again.
    let resumed_at = events
        .iter()
        .position(|e| e.message.starts_with("rollback resumed by "))
        .unwrap();
    assert!(
        !events[resumed_at..]
            .iter()
            .any(|e| e.step_status() == v1::StepStatus::Running),
        "{events:#?}"
    );
    assert!(
        inventory(&cloud, &tenant).await.is_empty(),
        "resources remain after the resumed rollback"
    );
    let instance = client.instance(&tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Failed);
    assert!(
        meta.status_detail.contains("wait_steady"),
        "the original failure is kept: {meta:?}"
    );
}

/// A day-2 operation whose every step gets a crash window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Day2 {
    Restart,
    /// Count and size: a new revision.
    Scale,
    /// A new image tag: a new revision.
    Update,
    Suspend,
    /// Of an instance suspended beforehand.
    Resume,
}

impl Day2 {
    const ALL: [Day2; 5] = [
        Day2::Restart,
        Day2::Scale,
        Day2::Update,
        Day2::Suspend,
        Day2::Resume,
    ];

    /// Brings a freshly provisioned instance to where the operation starts from.
    async fn prepare(self, client: &mut Client, tenant: &str) {
        if self == Day2::Resume {
            let operation = Day2::Suspend.start(client, tenant).await;
            client.completed(&operation).await;
        }
    }

    /// The instance's state once the operation completed.
    fn ends(self) -> v1::InstanceState {
        match self {
            Day2::Suspend => v1::InstanceState::Suspended,
            _ => v1::InstanceState::Active,
        }
    }

    /// Starts the operation on the provisioned instance of `tenant`; its name.
    async fn start(self, client: &mut Client, tenant: &str) -> String {
        let name = format!("tenants/{tenant}/instances/wp");
        let instances = &mut client.instances;
        let operation = match self {
            Day2::Restart => instances
                .restart_instance(v1::RestartInstanceRequest {
                    name,
                    request_id: String::new(),
                })
                .await
                .unwrap(),
            Day2::Scale => instances
                .scale_instance(v1::ScaleInstanceRequest {
                    name,
                    desired_count: 3,
                    cpu: 1024,
                    memory_mib: 2048,
                    request_id: String::new(),
                })
                .await
                .unwrap(),
            Day2::Update => instances
                .update_instance(v1::UpdateInstanceRequest {
                    instance: Some(v1::Instance {
                        name,
                        wordpress_version: "6.8-php8.3-apache".into(),
                        ..v1::Instance::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["wordpress_version".into()],
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap(),
            Day2::Suspend => instances
                .suspend_instance(v1::SuspendInstanceRequest {
                    name,
                    reason: "non-payment".into(),
                    request_id: String::new(),
                })
                .await
                .unwrap(),
            Day2::Resume => instances
                .resume_instance(v1::ResumeInstanceRequest {
                    name,
                    request_id: String::new(),
                })
                .await
                .unwrap(),
        };
        operation.into_inner().name
    }

    /// Task-definition revisions of the family once the operation completed: one per size
    /// or image the service ever ran, never a duplicate from a replayed step.
    fn revisions(self) -> usize {
        match self {
            Day2::Scale | Day2::Update => 2,
            Day2::Restart | Day2::Suspend | Day2::Resume => 1,
        }
    }
}

/// The type of the only action of the listener rule `rule_arn`, as ELBv2 reports it.
async fn rule_action(cloud: &instance_manager::cloud::CloudEnv, rule_arn: &str) -> String {
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&platform::account_sdk(cloud).await);
    let rules = elb
        .describe_rules()
        .rule_arns(rule_arn)
        .send()
        .await
        .unwrap();
    let [rule] = rules.rules() else {
        panic!("not one rule: {rules:?}");
    };
    let [action] = rule.actions() else {
        panic!("not one action: {rule:?}");
    };
    action.r#type().unwrap().as_str().to_owned()
}

/// The service as ECS reports it, and the ACTIVE revisions of its family.
async fn ecs_service(
    cloud: &instance_manager::cloud::CloudEnv,
    tenant: &str,
) -> (i32, String, String, usize) {
    let ecs = aws_sdk_ecs::Client::new(&platform::account_sdk(cloud).await);
    let names = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(tenant).unwrap(),
        cloud.environment,
    );
    let answer = ecs
        .describe_services()
        .cluster(&cloud.platform.cluster)
        .services(&names.stack)
        .send()
        .await
        .unwrap();
    let service = &answer.services()[0];
    let definition = service.task_definition().unwrap().to_owned();
    let image = ecs
        .describe_task_definition()
        .task_definition(&definition)
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .container_definitions()[0]
        .image()
        .unwrap()
        .to_owned();
    let revisions = ecs
        .list_task_definitions()
        .family_prefix(&names.stack)
        .status(aws_sdk_ecs::types::TaskDefinitionStatus::Active)
        .send()
        .await
        .unwrap()
        .task_definition_arns()
        .len();
    (service.desired_count(), definition, image, revisions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_day2_call_converges() {
    // restart, scale, update, suspend and resume: every step of each.
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let cloud = cloud(&config, Environment::Dev).await;
    let dir = tempfile::tempdir().unwrap();

    // The plans, as clean runs record them (one instance, one operation after another).
    let path = own_table(&config, &dir.path().join("reference")).await;
    let mut plans = Vec::new();
    {
        let (_server, addr) = serve(&path, "").await;
        let mut client = Client::connect(&addr).await;
        let tenant = platform::tenant("ref");
        let created = client.create(&tenant, v1::Environment::Dev).await;
        client.completed(&created.name).await;
        for day2 in Day2::ALL {
            // Suspend leaves the instance where Resume starts from.
            let operation = day2.start(&mut client, &tenant).await;
            for step in step_names(&client.completed(&operation).await) {
                plans.push((day2, step));
            }
        }
    }
    assert!(plans.len() >= 8, "{plans:?}");

    let scenarios = plans.iter().map(|(day2, step)| {
        let dir = dir.path().join(format!("{day2:?}-{step}"));
        let (config, cloud, day2) = (&config, &cloud, *day2);
        async move {
            let path = own_table(config, &dir).await;
            let tenant = platform::tenant("crash2");
            {
                let (_server, addr) = serve(&path, "").await;
                let mut client = Client::connect(&addr).await;
                let created = client.create(&tenant, v1::Environment::Dev).await;
                client.completed(&created.name).await;
                day2.prepare(&mut client, &tenant).await;
            }
            let point = format!("{step}=exit-after");
            let (events, done, survivor) = crash_and_resume(&path, &point, |mut client| {
                let tenant = tenant.clone();
                async move { day2.start(&mut client, &tenant).await }
            })
            .await;
            let what = format!("{day2:?} {point}");
            assert_eq!(
                metadata(&done).status(),
                v1::OperationStatus::Completed,
                "{what}: {events:#?}"
            );
            assert!(
                events.iter().any(|e| e.message.starts_with("resumed by ")),
                "{what}: {events:#?}"
            );
            // ECS and the record agree, with no revision registered twice.
            let mut client = Client::connect(survivor.addr.unwrap().to_string().as_str()).await;
            let instance = client.instance(&tenant).await;
            assert_eq!(instance.state(), day2.ends(), "{what}");
            let (count, definition, image, revisions) = ecs_service(cloud, &tenant).await;
            let action = rule_action(cloud, &instance.resources["listener_rule"]).await;
            if day2 == Day2::Suspend {
                // No task, and the host answers the suspended page.
                assert_eq!((count, action.as_str()), (0, "fixed-response"), "{what}");
            } else {
                assert_eq!(count, instance.desired_count, "{what}");
                assert_eq!(action, "forward", "{what}");
            }
            assert_eq!(
                instance.resources.get("task_definition"),
                Some(&definition),
                "{what}"
            );
            assert!(
                image.ends_with(&format!(":{}", instance.wordpress_version)),
                "{what}: {image}"
            );
            assert_eq!(revisions, day2.revisions(), "{what}");
            match day2 {
                Day2::Restart | Day2::Suspend | Day2::Resume => {}
                Day2::Scale => assert_eq!(
                    (instance.desired_count, instance.cpu, instance.memory_mib),
                    (3, 1024, 2048),
                    "{what}"
                ),
                Day2::Update => assert_eq!(instance.wordpress_version, "6.8-php8.3-apache"),
            }
            // Nothing of the tenant was made twice or lost (a new revision is a task
            // definition more).
            let expected = Inventory {
                task_definitions: day2.revisions(),
                ..provisioned(true)
            };
            assert_eq!(inventory(cloud, &tenant).await, expected, "{what}");
        }
    });
    run_all(scenarios).await;
}

async fn start_backup(client: &mut Client, tenant: &str, id: &str) -> String {
    client
        .instances
        .create_backup(v1::CreateBackupRequest {
            parent: format!("tenants/{tenant}/instances/wp"),
            backup_id: id.into(),
            backup: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name
}

async fn start_restore(client: &mut Client, tenant: &str, id: &str) -> String {
    client
        .instances
        .restore_instance(v1::RestoreInstanceRequest {
            name: format!("tenants/{tenant}/instances/wp"),
            backup: format!("tenants/{tenant}/instances/wp/backups/{id}"),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .name
}

fn tenant_database(tenant: &str) -> String {
    instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(tenant).unwrap(),
        Environment::Dev,
    )
    .database
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_backup_or_restore_call_converges() {
    use platform::sql::{damage, databases_like, fill, table_sums};
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let cloud = cloud(&config, Environment::Dev).await;
    let dir = tempfile::tempdir().unwrap();

    // The plans, as clean runs record them: a backup, then a restore from it.
    let path = own_table(&config, &dir.path().join("reference")).await;
    let mut plans = Vec::new();
    {
        let (_server, addr) = serve(&path, "").await;
        let mut client = Client::connect(&addr).await;
        let tenant = platform::tenant("refbr");
        let created = client.create(&tenant, v1::Environment::Dev).await;
        client.completed(&created.name).await;
        let backup = start_backup(&mut client, &tenant, "ref").await;
        for step in step_names(&client.completed(&backup).await) {
            plans.push((false, step));
        }
        let restore = start_restore(&mut client, &tenant, "ref").await;
        for step in step_names(&client.completed(&restore).await) {
            plans.push((true, step));
        }
    }
    assert!(plans.len() >= 12, "{plans:?}");

    let scenarios = plans.iter().map(|(restoring, step)| {
        let what = if *restoring { "restore" } else { "backup" };
        let dir = dir.path().join(format!("{what}-{step}"));
        let (config, cloud, restoring) = (&config, &cloud, *restoring);
        async move {
            let path = own_table(config, &dir).await;
            let tenant = platform::tenant("crashbr");
            let db = tenant_database(&tenant);
            let original;
            {
                let (_server, addr) = serve(&path, "").await;
                let mut client = Client::connect(&addr).await;
                let created = client.create(&tenant, v1::Environment::Dev).await;
                client.completed(&created.name).await;
                fill(&db).await;
                original = table_sums(&db).await;
                if restoring {
                    let backup = start_backup(&mut client, &tenant, "b1").await;
                    client.completed(&backup).await;
                    damage(&db).await;
                }
            }
            let point = format!("{step}=exit-after");
            let (events, done, survivor) = crash_and_resume(&path, &point, |mut client| {
                let tenant = tenant.clone();
                async move {
                    if restoring {
                        start_restore(&mut client, &tenant, "b1").await
                    } else {
                        start_backup(&mut client, &tenant, "b1").await
                    }
                }
            })
            .await;
            let what = format!("{what} {point}");
            assert_eq!(
                metadata(&done).status(),
                v1::OperationStatus::Completed,
                "{what}: {events:#?}"
            );
            assert!(
                events.iter().any(|e| e.message.starts_with("resumed by ")),
                "{what}: {events:#?}"
            );
            let mut client = Client::connect(survivor.addr.unwrap().to_string().as_str()).await;
            let backup = client
                .instances
                .get_backup(v1::GetBackupRequest {
                    name: format!("tenants/{tenant}/instances/wp/backups/b1"),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(backup.state(), v1::BackupState::Ready, "{what}");
            let prefix = format!("backups/dev/{tenant}/wp/b1/");
            let mut keys = cloud
                .objects
                .list_objects(&cloud.platform.archive_bucket, &prefix)
                .await
                .unwrap();
            keys.sort();
            assert_eq!(
                keys,
                [
                    "database.json",
                    "database.sql.gz",
                    "facts.json",
                    "manifest.json"
                ]
                .map(|k| format!("{prefix}{k}")),
                "{what}"
            );
            let instance = client.instance(&tenant).await;
            assert_eq!(instance.state(), v1::InstanceState::Active, "{what}");
            if restoring {
                // Switched to one restored database, the old one dropped, nothing half-made
                // left over.
                let live = instance.resources["database"].clone();
                assert!(live.starts_with(&format!("{db}_r")), "{what}: {live}");
                assert_eq!(databases_like(&db).await, vec![live.clone()], "{what}");
                assert_eq!(table_sums(&live).await, original, "{what}");
            } else {
                // No scratch database left, the live one untouched.
                assert_eq!(databases_like(&db).await, vec![db.clone()], "{what}");
                assert_eq!(table_sums(&db).await, original, "{what}");
            }
        }
    });
    run_all(scenarios).await;
}
