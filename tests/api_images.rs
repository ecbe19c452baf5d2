//! The WordPress image allow-list at the API edge: CreateInstance and UpdateInstance with an
//! image from a repository that is not on `allowed_image_repositories` are INVALID_ARGUMENT
//! on `instance.wordpress_image`, and nothing is written — checked by scanning the DynamoDB
//! table (moto) with the SDK, not through the service.

mod common;

use std::sync::Arc;
use std::time::Duration;

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::domain::ImagePolicy;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::DynamoStore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const ECR: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws";

struct TestServer {
    instances: InstanceServiceClient<Channel>,
    table: String,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A server whose allow-list is Docker Hub's official WordPress image and our ECR prefix.
async fn start() -> TestServer {
    let table = common::unique_name("images");
    let store = DynamoStore::new(common::dynamodb_client().await, table.clone());
    store.ensure_table().await.expect("create table");
    let settings = ApiSettings {
        images: ImagePolicy::new(["docker.io/library/wordpress", ECR]).unwrap(),
        ..ApiSettings::default()
    };
    let api = Api::new(Arc::new(store), settings, PageTokens::new(b"test-key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(instance_manager::server::serve(
        api,
        listener,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    TestServer {
        instances: InstanceServiceClient::new(channel),
        table,
        shutdown,
    }
}

/// Every item of the table (consistent scan), rendered and sorted.
/// Every item but the audit trail's (a refused call is audited: that record is the one
/// write it is meant to make, and `audit_trail` tests it).
async fn items(table: &str) -> Vec<String> {
    let client = common::dynamodb_client().await;
    let mut all = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan");
        for item in page.items() {
            let audit = item
                .get("pk")
                .and_then(|pk| pk.as_s().ok())
                .is_some_and(|pk| pk.starts_with("AUDIT#"));
            if audit {
                continue;
            }
            let sorted: std::collections::BTreeMap<_, _> = item.iter().collect();
            all.push(format!("{sorted:?}"));
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            break;
        }
    }
    all.sort();
    all
}

fn create(tenant: &str, image: &str, request_id: &str) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: "wp".into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: "Acme Corp".into(),
            contact_email: "ops@acme.example".into(),
            wordpress_image: image.into(),
            ..Default::default()
        }),
        request_id: request_id.into(),
    }
}

fn update(tenant: &str, image: &str, version: &str, paths: &[&str]) -> v1::UpdateInstanceRequest {
    v1::UpdateInstanceRequest {
        instance: Some(v1::Instance {
            name: format!("tenants/{tenant}/instances/wp"),
            wordpress_image: image.into(),
            wordpress_version: version.into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        request_id: String::new(),
    }
}

/// The violation of `instance.wordpress_image`: asserts the code, the reason and that it is
/// the only field named.
fn image_violation(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.get_details_error_info().is_some(), "{status:?}");
    let violations = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"))
        .field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "instance.wordpress_image");
    violations[0].description.clone()
}

#[tokio::test]
async fn an_image_off_the_allow_list_is_refused_and_nothing_is_written() {
    let mut server = start().await;
    for (image, why) in [
        ("bitnami/wordpress", "not allowed"),
        ("wordpress-evil", "not allowed"),
        ("docker.io/library/wordpress-evil", "not allowed"),
        ("evil.example/docker.io/library/wordpress", "not allowed"),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws-evil/wp",
            "not allowed",
        ),
        (
            "999999999999.dkr.ecr.eu-west-1.amazonaws.com/bbws/wp",
            "not allowed",
        ),
        // A tag or digest smuggled into the repository field.
        ("wordpress:latest", "tag"),
        ("docker.io/library/wordpress@sha256:0000", "digest"),
    ] {
        // With a request id too: a refused request must not leave an idempotency key.
        let status = server
            .instances
            .create_instance(create("imt-img", image, "req-img-1"))
            .await
            .unwrap_err();
        let description = image_violation(&status);
        assert!(description.contains(why), "{image}: {description}");
    }
    assert_eq!(
        items(&server.table).await,
        Vec::<String>::new(),
        "a refused create wrote something"
    );

    // Allowed images are accepted: the default, and one under the ECR prefix, recorded as
    // given.
    server
        .instances
        .create_instance(create("imt-img-hub", "", ""))
        .await
        .expect("the default image is allowed");
    server
        .instances
        .create_instance(create("imt-img-ecr", &format!("{ECR}/wordpress"), ""))
        .await
        .expect("an image under an allowed prefix");
    let written = items(&server.table).await;
    assert!(
        written
            .iter()
            .any(|item| item.contains(&format!("{ECR}/wordpress"))),
        "{written:#?}"
    );
}

#[tokio::test]
async fn an_update_to_an_image_off_the_allow_list_is_refused_and_changes_nothing() {
    let mut server = start().await;
    server
        .instances
        .create_instance(create("imt-upd", "", ""))
        .await
        .unwrap();
    let before = items(&server.table).await;
    for request in [
        update(
            "imt-upd",
            "ghcr.io/evil/wordpress",
            "",
            &["wordpress_image"],
        ),
        update(
            "imt-upd",
            "docker.io/library/wordpress-evil",
            "6.8",
            &["wordpress_image", "wordpress_version"],
        ),
        update("imt-upd", "wordpress:6.8", "", &["wordpress_image"]),
    ] {
        let status = server.instances.update_instance(request).await.unwrap_err();
        image_violation(&status);
    }
    assert_eq!(
        items(&server.table).await,
        before,
        "a refused update changed the table"
    );
    // An allowed image passes the check (and is then refused for the instance's state: its
    // create is still pending, with no engine in this test).
    let status = server
        .instances
        .update_instance(update(
            "imt-upd",
            &format!("{ECR}/wordpress"),
            "",
            &["wordpress_image"],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::Aborted | Code::FailedPrecondition),
        "{status:?}"
    );
}
