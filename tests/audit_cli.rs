//! `instance-manager audit list` against a server process (authentication off, as process
//! tests run it): a refused DeleteInstance is in the trail, in JSON and as a table, and the
//! item is in DynamoDB (read with the SDK).

mod common;

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
