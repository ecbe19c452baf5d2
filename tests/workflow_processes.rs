//! The real binary, as operators run it: several server processes on one table, a crash in
//! the middle of a provisioning, and a client that is not ours watching progress.

mod common;
mod platform;

use std::collections::BTreeSet;
use std::process::Command;

use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use platform::{Client, inventory, metadata, provisioned, serve_process as serve, write_config};

fn started_events(events: &[v1::OperationEvent]) -> usize {
    events
        .iter()
        .filter(|e| e.message.starts_with("started by "))
        .count()
}

#[tokio::test]
async fn a_killed_replica_s_operation_is_resumed_without_duplicates() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let dir = tempfile::tempdir().unwrap();
    // A short lease: the next replica takes over soon after the kill.
    let path = write_config(&config, dir.path(), 5);
    let (mut first, addr) = serve(&path, "service=pause");
    let mut client = Client::connect(&addr).await;
    let tenant = platform::tenant("crash");
    let operation = client.create(&tenant, v1::Environment::Sit).await;

    // Wait until the service step has started (the failpoint holds it there), then kill -9.
    client
        .wait_for_step(&operation.name, "service", v1::StepStatus::Running)
        .await;
    first.kill();

    let (_second, addr) = serve(&path, "");
    let mut client = Client::connect(&addr).await;
    let (events, done) = client.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.message.starts_with("resumed by ")),
        "{events:#?}"
    );
    let cp_accounts = instance_manager::cloud::accounts::Accounts::with_control_plane(
        &common::test_sdk_config().await,
        &config,
    )
    .await;
    let cloud = cp_accounts.env(Environment::Sit).await.unwrap();
    assert_eq!(
        inventory(&cloud, &tenant).await,
        provisioned(false),
        "duplicated or missing resources"
    );
}

#[tokio::test]
async fn two_replicas_run_twenty_creates_exactly_once() {
    let config = platform::config_with_platforms(&[Environment::Sit]).await;
    let dir = tempfile::tempdir().unwrap();
    // The default lease: renewals keep up even while the emulator is busy with 20
    // provisionings, so no operation changes hands.
    let path = write_config(&config, dir.path(), 30);
    let (_a, addr_a) = serve(&path, "");
    let (_b, addr_b) = serve(&path, "");
    let clients = [
        Client::connect(&addr_a).await,
        Client::connect(&addr_b).await,
    ];
    let tenants: Vec<String> = (0..20).map(|_| platform::tenant("pair")).collect();
    let creates = tenants.iter().enumerate().map(|(i, tenant)| {
        let mut client = clients[i % 2].clone();
        async move { client.create(tenant, v1::Environment::Sit).await.name }
    });
    let operations = futures::future::join_all(creates).await;
    assert_eq!(operations.iter().collect::<BTreeSet<_>>().len(), 20);

    let accounts = instance_manager::cloud::accounts::Accounts::with_control_plane(
        &common::test_sdk_config().await,
        &config,
    )
    .await;
    let cloud = accounts.env(Environment::Sit).await.unwrap();
    let mut claimed_by = BTreeSet::new();
    for (i, (operation, tenant)) in operations.iter().zip(&tenants).enumerate() {
        let mut client = clients[(i + 1) % 2].clone();
        let (events, done) = client.watch(operation).await;
        assert_eq!(
            metadata(&done).status(),
            v1::OperationStatus::Completed,
            "{events:#?}"
        );
        assert_eq!(
            started_events(&events),
            1,
            "{operation} was started more than once: {events:#?}"
        );
        assert!(
            !events.iter().any(|e| e.message.starts_with("resumed by ")),
            "{events:#?}"
        );
        let starter = events
            .iter()
            .find(|e| e.message.starts_with("started by "))
            .unwrap();
        claimed_by.insert(
            starter
                .message
                .split_whitespace()
                .nth(2)
                .unwrap()
                .to_owned(),
        );
        assert_eq!(
            inventory(&cloud, tenant).await,
            provisioned(false),
            "{tenant}"
        );
    }
    // Both replicas took work (each claims what it can; with 20 operations both get some).
    assert_eq!(claimed_by.len(), 2, "{claimed_by:?}");
}

#[tokio::test]
async fn grpcurl_watches_a_provisioning_step_by_step() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&config, dir.path(), 30);
    let (_server, addr) = serve(&path, "");
    let tenant = platform::tenant("watch");
    let body = format!(
        r#"{{"parent": "tenants/{tenant}", "instance_id": "wp", "instance": {{"environment": "ENVIRONMENT_DEV", "organization_name": "Watch Ltd", "contact_email": "ops@example.com"}}}}"#
    );
    let grpcurl = |args: &[&str]| {
        let output = Command::new(common::grpcurl_path())
            .arg("-plaintext")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let created = grpcurl(&[
        "-d",
        &body,
        &addr,
        "bbws.instance.v1.InstanceService/CreateInstance",
    ]);
    let operation = created
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("\"name\": \"")
                .and_then(|r| r.strip_suffix("\","))
        })
        .expect("operation name")
        .to_owned();
    // The stream replays from the start and ends by itself at the terminal event.
    let watched = grpcurl(&[
        "-d",
        &format!(r#"{{"name": "{operation}"}}"#),
        &addr,
        "bbws.instance.v1.InstanceService/WatchOperation",
    ]);
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&watched)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect();
    let sequences: Vec<i64> = events
        .iter()
        .map(|e| e["sequence"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        sequences,
        (1..=events.len() as i64).collect::<Vec<_>>(),
        "{watched}"
    );
    let last = events.last().unwrap();
    assert_eq!(last["terminal"], true, "{watched}");
    assert_eq!(last["status"], "OPERATION_STATUS_COMPLETED", "{watched}");
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
        let position = |status: &str| {
            events
                .iter()
                .position(|e| e["step"] == step && e["stepStatus"] == status)
        };
        match (
            position("STEP_STATUS_RUNNING"),
            position("STEP_STATUS_SUCCEEDED"),
        ) {
            (Some(a), Some(b)) if a < b => {}
            other => panic!("{step}: {other:?}\n{watched}"),
        }
    }
}

#[tokio::test]
async fn the_metrics_endpoint_counts_operations() {
    let mut config = platform::config_with_platforms(&[Environment::Sit]).await;
    config.metrics_listen = Some(common::ANY_PORT.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&config, dir.path(), 30);
    let (mut server, addr) = serve(&path, "");
    let metrics = server.wait_logged_address("serving metrics");

    let (content_type, before) = common::scrape_metrics(metrics).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(before.contains("\nim_workers 10\n"), "{before}");
    assert!(!before.contains("im_operations_finished_total"), "{before}");

    let mut client = Client::connect(&addr).await;
    let tenant = platform::tenant("metered");
    let operation = client.create(&tenant, v1::Environment::Sit).await;
    let (events, done) = client.watch(&operation.name).await;
    assert_eq!(
        metadata(&done).status(),
        v1::OperationStatus::Completed,
        "{events:#?}"
    );
    // A call answered NOT_FOUND.
    let missing = client
        .instances
        .get_instance(v1::GetInstanceRequest {
            name: format!("tenants/{tenant}/instances/nope"),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let (_, after) = common::scrape_metrics(metrics).await;
    for line in [
        "im_operations_running 0",
        "im_operations_claimed_total{resumed=\"false\",verb=\"create\"} 1",
        "im_operations_finished_total{status=\"COMPLETED\",verb=\"create\"} 1",
        // Latencies by method and code: the create, the watch stream (to its end), the
        // NOT_FOUND; and the operation's duration by verb.
        "im_rpc_duration_seconds_count{code=\"OK\",method=\"/bbws.instance.v1.InstanceService/CreateInstance\"} 1",
        "im_rpc_duration_seconds_count{code=\"OK\",method=\"/bbws.instance.v1.InstanceService/WatchOperation\"} 1",
        "im_rpc_duration_seconds_count{code=\"NOT_FOUND\",method=\"/bbws.instance.v1.InstanceService/GetInstance\"} 1",
        "im_rpc_duration_seconds_bucket{code=\"NOT_FOUND\",method=\"/bbws.instance.v1.InstanceService/GetInstance\",le=\"+Inf\"} 1",
        "im_operation_duration_seconds_count{status=\"COMPLETED\",verb=\"create\"} 1",
    ] {
        assert!(after.lines().any(|l| l == line), "{line}\n{after}");
    }
    assert!(
        after.contains("# TYPE im_operation_duration_seconds histogram\n"),
        "{after}"
    );
}
