//! `instance-manager audit list` against a server process: with authentication off (as
//! process tests run it), a refused DeleteInstance is in the trail, in JSON and as a table,
//! and the item is in DynamoDB (read with the SDK); with static tokens and the engine
//! running, a real provisioning, scale and deletion made with the CLI are listed in order
//! with the token's principal, each naming the operation that then completed.

mod common;
mod platform;

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::ServerProcess;
use serde_json::Value;

/// Bounds a hung command; nothing here measures time.
const BOUND: Duration = Duration::from_secs(120);

#[tokio::test]
async fn audit_list_shows_a_refused_delete() {
    let endpoint = common::aws_endpoint();
    let table = common::unique_name("auditcli");
    ServerProcess::run(
        ["bootstrap", "--aws-endpoint", &endpoint, "--table", &table],
        &[],
        BOUND,
    )
    .assert_success();
    let mut server = ServerProcess::spawn(
        [
            "serve",
            "--listen",
            common::ANY_PORT,
            "--aws-endpoint",
            &endpoint,
            "--table",
            &table,
        ],
        &[],
    );
    let addr = server.wait_serving();
    let url = format!("http://{addr}");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &url]);
        ServerProcess::run(&all, &[], BOUND)
    };

    let refused = cli(&[
        "delete",
        "tenants/imt-audit/instances/nope",
        "--skip-archive",
    ]);
    assert!(!refused.status.success(), "{refused:?}");

    let out = cli(&["audit", "list", "imt-audit", "--output", "json"]);
    out.assert_success();
    let listed: Value = serde_json::from_str(&out.stdout).unwrap();
    let events = listed["auditEvents"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(events.len(), 1, "{listed}");
    let event = &events[0];
    assert_eq!(
        event["method"],
        "/bbws.instance.v1.InstanceService/DeleteInstance"
    );
    assert_eq!(event["target"], "tenants/imt-audit/instances/nope");
    assert_eq!(event["outcome"], "NOT_FOUND");
    assert_eq!(event["tenant"], "imt-audit");
    assert_eq!(event["principal"], "anonymous (authentication disabled)");

    let table_out = cli(&["audit", "list", "tenants/imt-audit"]);
    table_out.assert_success();
    assert!(table_out.stdout.contains("DeleteInstance"), "{table_out:?}");
    assert!(table_out.stdout.contains("NOT_FOUND"), "{table_out:?}");

    // The item itself, with its TTL attribute.
    let items = common::dynamodb_client()
        .await
        .query()
        .table_name(&table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("AUDIT#imt-audit".into()))
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    assert_eq!(items.len(), 1);
    assert!(items[0].contains_key("expires_at"), "{:?}", items[0]);
    assert_eq!(items[0]["outcome"], AttributeValue::S("NOT_FOUND".into()));
}

#[tokio::test]
async fn create_scale_delete_through_the_engine_are_audited_with_the_token() {
    use instance_manager::auth::{Role, StaticTokenConfig};
    use instance_manager::domain::Environment;
    use sha2::Digest;

    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    let token = |name: &str, role: Role| {
        let secret = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        let entry = StaticTokenConfig {
            name: name.into(),
            sha256: hex::encode(sha2::Sha256::digest(secret.as_bytes())),
            role,
            tenant: None,
        };
        (secret, entry)
    };
    let (operator, operator_entry) = token("ci-deployer", Role::Operator);
    let (admin, admin_entry) = token("auditor", Role::Admin);
    config.auth.disabled = false;
    config.auth.tokens = vec![operator_entry, admin_entry];
    let dir = tempfile::tempdir_in(common::target_tmpdir()).unwrap();
    let path = platform::write_config(&config, dir.path(), 30);
    let mut server = ServerProcess::spawn(
        [
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            common::ANY_PORT,
        ],
        &[("IM_AUTH_DISABLED", "false")],
    );
    let addr = server.wait_serving();
    let url = format!("http://{addr}");
    let tenant = platform::tenant("audit");
    let instance = format!("{tenant}/wp");
    let cli = |token: &str, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &url, "--output", "json"]);
        ServerProcess::run(&all, &[("IM_TOKEN", token)], BOUND)
    };

    // Without a token nothing is done.
    let anonymous = ServerProcess::run(["list", "--server", &url], &[], BOUND);
    assert!(!anonymous.status.success(), "{anonymous:?}");
    assert!(
        anonymous.stderr.contains("UNAUTHENTICATED"),
        "{anonymous:?}"
    );

    cli(
        &operator,
        &[
            "create",
            &instance,
            "--environment",
            "dev",
            "--organization",
            "Audit Ltd",
            "--contact-email",
            "it@audit.example",
            "--watch",
        ],
    )
    .assert_success();
    cli(&operator, &["scale", &instance, "--count", "3", "--watch"]).assert_success();
    // Deleting needs an admin: the operator's attempt is refused, and recorded.
    let refused = cli(&operator, &["delete", &instance, "--skip-archive"]);
    assert!(refused.stderr.contains("PERMISSION_DENIED"), "{refused:?}");
    cli(&admin, &["delete", &instance, "--skip-archive", "--watch"]).assert_success();
    // The operator may not read the trail (admins only).
    let refused = cli(&operator, &["audit", "list", &tenant]);
    assert!(refused.stderr.contains("PERMISSION_DENIED"), "{refused:?}");

    let out = cli(&admin, &["audit", "list", &tenant]);
    out.assert_success();
    let listed: Value = serde_json::from_str(&out.stdout).unwrap();
    let events = listed["auditEvents"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"));
    let seen: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap(),
                e["principal"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    // Newest first.
    let service = "/bbws.instance.v1.InstanceService";
    assert_eq!(
        seen,
        [
            (&*format!("{service}/DeleteInstance"), "token:auditor", "OK"),
            (
                &*format!("{service}/DeleteInstance"),
                "token:ci-deployer",
                "PERMISSION_DENIED"
            ),
            (
                &*format!("{service}/ScaleInstance"),
                "token:ci-deployer",
                "OK"
            ),
            (
                &*format!("{service}/CreateInstance"),
                "token:ci-deployer",
                "OK"
            ),
        ],
        "{listed}"
    );
    let times: Vec<&str> = events
        .iter()
        .map(|e| e["eventTime"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let instance_name = format!("tenants/{tenant}/instances/wp");
    for event in events {
        // A create names its parent (the instance does not exist yet).
        let target = if event["method"] == format!("{service}/CreateInstance") {
            format!("tenants/{tenant}")
        } else {
            instance_name.clone()
        };
        assert_eq!(event["target"], target.as_str(), "{event}");
        assert_eq!(event["tenant"], tenant.as_str(), "{event}");
        if event["outcome"] != "OK" {
            assert!(event.get("operation").is_none(), "{event}");
            continue;
        }
        // The operation each accepted call started, run by the engine to its end.
        let operation = event["operation"].as_str().expect("an operation");
        let got = cli(&admin, &["operations", "get", operation]);
        got.assert_success();
        let got: Value = serde_json::from_str(&got.stdout).unwrap();
        assert_eq!(got["done"], true, "{got}");
        assert_eq!(
            got["metadata"]["status"], "OPERATION_STATUS_COMPLETED",
            "{got}"
        );
    }
    drop(server);
}
