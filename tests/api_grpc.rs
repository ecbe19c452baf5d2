//! The gRPC API through our own tonic client, against an in-process server whose state
//! lives in DynamoDB on moto.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::domain::ScaleBounds;
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::google_longrunning::operations_client::OperationsClient;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::DynamoStore;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

struct TestServer {
    instances: InstanceServiceClient<Channel>,
    operations: OperationsClient<Channel>,
    channel: Channel,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> TestServer {
    let sdk = common::test_sdk_config().await;
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        common::unique_name("api"),
    );
    store.ensure_table().await.expect("create table");
    start_with(store).await
}

async fn start_with(store: DynamoStore) -> TestServer {
    let settings = ApiSettings {
        scale_bounds: ScaleBounds::default(),
        idempotency_ttl_secs: 3600,
        default_page_size: 50,
        max_page_size: 100,
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
    // The listener is bound already, so connecting cannot race the server start.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    TestServer {
        instances: InstanceServiceClient::new(channel.clone()),
        operations: OperationsClient::new(channel.clone()),
        channel,
        shutdown,
    }
}

fn instance(environment: v1::Environment) -> v1::Instance {
    v1::Instance {
        environment: environment.into(),
        organization_name: "Acme Corp".into(),
        contact_email: "ops@acme.example".into(),
        ..Default::default()
    }
}

fn create_request(
    tenant: &str,
    id: &str,
    environment: v1::Environment,
) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: id.into(),
        instance: Some(instance(environment)),
        request_id: String::new(),
    }
}

fn metadata(operation: &lro::Operation) -> v1::OperationMetadata {
    let any = operation.metadata.as_ref().expect("metadata");
    assert_eq!(
        any.type_url,
        "type.googleapis.com/bbws.instance.v1.OperationMetadata"
    );
    v1::OperationMetadata::decode(any.value.as_slice()).unwrap()
}

/// Every error carries ErrorInfo; returns its reason.
fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "instance-manager.bbws.io");
    info.reason
}

fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    reason(status);
    status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"))
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Everything the table holds, as seen through the API: instance names and operation names.
async fn snapshot(server: &mut TestServer) -> (BTreeSet<String>, BTreeSet<String>) {
    let instances = server
        .instances
        .list_instances(v1::ListInstancesRequest {
            parent: "tenants/-".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|i| i.name)
        .collect();
    let operations = server
        .operations
        .list_operations(lro::ListOperationsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .into_iter()
        .map(|o| o.name)
        .collect();
    (instances, operations)
}

#[tokio::test]
async fn create_then_get_instance_and_operation() {
    let mut server = start().await;
    let operation = server
        .instances
        .create_instance(create_request("acme", "wp-main", v1::Environment::Sit))
        .await
        .unwrap()
        .into_inner();
    assert!(
        operation.name.starts_with("operations/"),
        "{}",
        operation.name
    );
    assert!(!operation.done);
    let meta = metadata(&operation);
    assert_eq!(meta.target, "tenants/acme/instances/wp-main");
    assert_eq!(meta.verb, "create");
    assert_eq!(meta.status(), v1::OperationStatus::Pending);

    let got = server
        .instances
        .get_instance(v1::GetInstanceRequest {
            name: "tenants/acme/instances/wp-main".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), v1::InstanceState::PendingProvisioning);
    assert_eq!(got.environment(), v1::Environment::Sit);
    assert_eq!(got.current_operation, operation.name);
    assert_eq!(
        (got.desired_count, got.cpu, got.memory_mib),
        (2, 512, 1024),
        "defaults"
    );
    assert_eq!(got.organization_name, "Acme Corp");
    assert!(!got.etag.is_empty());

    let fetched = server
        .operations
        .get_operation(lro::GetOperationRequest {
            name: operation.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.name, operation.name);
    assert_eq!(metadata(&fetched).target, meta.target);

    for (name, code, expected_reason) in [
        (
            "tenants/acme/instances/missing",
            Code::NotFound,
            "INSTANCE_NOT_FOUND",
        ),
        (
            "tenants/ACME/instances/x",
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
    ] {
        let status = server
            .instances
            .get_instance(v1::GetInstanceRequest { name: name.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{name}");
        assert_eq!(reason(&status), expected_reason);
    }
    let status = server
        .operations
        .get_operation(lro::GetOperationRequest {
            name: "operations/0123abcd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "OPERATION_NOT_FOUND")
    );
}

#[tokio::test]
async fn request_id_replays_return_the_same_operation() {
    let mut server = start().await;
    let mut request = create_request("idem", "", v1::Environment::Dev);
    request.request_id = "7c9e6679-7425-40de-944b-e07fc1f90ae7".into();
    let first = server
        .instances
        .create_instance(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = server
        .instances
        .create_instance(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.name, again.name);
    assert_eq!(
        metadata(&first).target,
        metadata(&again).target,
        "a generated id is not regenerated"
    );
    let before = snapshot(&mut server).await;
    assert_eq!(before.0.len(), 1);

    let mut different = request.clone();
    different.instance.as_mut().unwrap().contact_email = "other@acme.example".into();
    let status = server
        .instances
        .create_instance(different)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["request_id"]);
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    assert_eq!(
        snapshot(&mut server).await,
        before,
        "a rejected replay writes nothing"
    );
}

#[tokio::test]
async fn one_instance_per_tenant_and_environment() {
    let mut server = start().await;
    server
        .instances
        .create_instance(create_request("solo", "first", v1::Environment::Prod))
        .await
        .unwrap();
    let status = server
        .instances
        .create_instance(create_request("solo", "second", v1::Environment::Prod))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason(&status), "TENANT_ENVIRONMENT_TAKEN");
    assert!(
        status.message().contains("tenants/solo/instances/first"),
        "{}",
        status.message()
    );
    // The same tenant may have one instance in each environment.
    server
        .instances
        .create_instance(create_request("solo", "second", v1::Environment::Dev))
        .await
        .unwrap();
    // The same name cannot be reused, even in another environment.
    let status = server
        .instances
        .create_instance(create_request("solo", "first", v1::Environment::Sit))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::AlreadyExists, "INSTANCE_ALREADY_EXISTS")
    );
}

#[tokio::test]
async fn concurrent_creates_for_one_tenant_environment_admit_exactly_one() {
    let server = start().await;
    let attempts = (0..10).map(|i| {
        let mut client = server.instances.clone();
        async move {
            client
                .create_instance(create_request(
                    "race",
                    &format!("wp-{i}"),
                    v1::Environment::Dev,
                ))
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(status.code(), Code::AlreadyExists | Code::Aborted),
            "{status:?}"
        );
    }
    let mut server = server;
    assert_eq!(snapshot(&mut server).await.0.len(), 1);
}

#[tokio::test]
async fn invalid_create_requests_name_the_field_and_write_nothing() {
    let mut server = start().await;
    let long = "a".repeat(41);
    let mut cases: Vec<(&str, v1::CreateInstanceRequest, &str)> = Vec::new();
    for tenant in [
        "",
        "Acme",
        "ACME",
        long.as_str(),
        "acmé",
        "a;drop",
        "../x",
        "a b",
        "ab",
    ] {
        cases.push((
            "tenant id",
            create_request(tenant, "wp", v1::Environment::Dev),
            "parent",
        ));
    }
    let mut with = |label: &'static str,
                    field: &'static str,
                    edit: &dyn Fn(&mut v1::CreateInstanceRequest)| {
        let mut request = create_request("valid", "wp", v1::Environment::Dev);
        edit(&mut request);
        cases.push((label, request, field));
    };
    with("unknown environment", "instance.environment", &|r| {
        r.instance.as_mut().unwrap().environment = 99
    });
    with("missing environment", "instance.environment", &|r| {
        r.instance.as_mut().unwrap().environment = 0
    });
    with("unknown tier", "instance.tier", &|r| {
        r.instance.as_mut().unwrap().tier = 7
    });
    with("count too low", "instance.desired_count", &|r| {
        r.instance.as_mut().unwrap().desired_count = 1
    });
    with("count too high", "instance.desired_count", &|r| {
        r.instance.as_mut().unwrap().desired_count = 11
    });
    with("negative count", "instance.desired_count", &|r| {
        r.instance.as_mut().unwrap().desired_count = -3
    });
    with("cpu/memory pair", "instance.memory_mib", &|r| {
        let i = r.instance.as_mut().unwrap();
        i.cpu = 256;
        i.memory_mib = 4096;
    });
    with("bad email", "instance.contact_email", &|r| {
        r.instance.as_mut().unwrap().contact_email = "ops@".into()
    });
    with("bad instance id", "instance_id", &|r| {
        r.instance_id = "Bad_Id".into()
    });
    with("bad request id", "request_id", &|r| {
        r.request_id = "has space".into()
    });
    with("missing instance", "instance", &|r| r.instance = None);
    with("shell in image", "instance.wordpress_image", &|r| {
        r.instance.as_mut().unwrap().wordpress_image = "wp;rm -rf".into()
    });

    for (label, request, field) in cases {
        let status = server.instances.create_instance(request).await.unwrap_err();
        let fields = violated_fields(&status);
        assert!(
            fields.contains(&field.to_string()),
            "{label}: expected {field}, got {fields:?}"
        );
    }
    assert_eq!(
        snapshot(&mut server).await,
        Default::default(),
        "invalid input wrote something"
    );
}

#[tokio::test]
async fn list_instances_pages_and_filters() {
    let mut server = start().await;
    let specs = [
        ("alpha", "one", v1::Environment::Dev),
        ("alpha", "two", v1::Environment::Sit),
        ("beta", "one", v1::Environment::Dev),
        ("beta", "two", v1::Environment::Prod),
        ("gamma", "one", v1::Environment::Dev),
        ("gamma", "two", v1::Environment::Sit),
        ("delta", "one", v1::Environment::Prod),
    ];
    for (tenant, id, env) in specs {
        server
            .instances
            .create_instance(create_request(tenant, id, env))
            .await
            .unwrap();
    }
    let list = |parent: &str, environment: v1::Environment, page_size: i32, page_token: String| {
        v1::ListInstancesRequest {
            parent: parent.into(),
            page_size,
            page_token,
            environment: environment.into(),
            state: 0,
        }
    };

    // Every instance exactly once, in pages of three.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = server
            .instances
            .list_instances(list("tenants/-", v1::Environment::Unspecified, 3, token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.instances.len() <= 3);
        seen.extend(page.instances.into_iter().map(|i| i.name));
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!((seen.len(), unique.len()), (7, 7));

    let names = |response: v1::ListInstancesResponse| -> Vec<String> {
        response.instances.into_iter().map(|i| i.name).collect()
    };
    let by_tenant = server
        .instances
        .list_instances(list(
            "tenants/beta",
            v1::Environment::Unspecified,
            0,
            String::new(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(by_tenant),
        vec!["tenants/beta/instances/one", "tenants/beta/instances/two"]
    );
    let dev = server
        .instances
        .list_instances(list("tenants/-", v1::Environment::Dev, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(dev).len(), 3);
    let mut by_state = list("tenants/alpha", v1::Environment::Sit, 0, String::new());
    by_state.state = v1::InstanceState::PendingProvisioning.into();
    let got = server
        .instances
        .list_instances(by_state.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(got), vec!["tenants/alpha/instances/two"]);
    by_state.state = v1::InstanceState::Active.into();
    assert!(
        server
            .instances
            .list_instances(by_state)
            .await
            .unwrap()
            .into_inner()
            .instances
            .is_empty()
    );

    // Tokens are bound to their query and cannot be forged or cut.
    let first = server
        .instances
        .list_instances(list(
            "tenants/-",
            v1::Environment::Unspecified,
            2,
            String::new(),
        ))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let mut bad_tokens = vec![
        list("tenants/-", v1::Environment::Dev, 2, token.clone()),
        list(
            "tenants/-",
            v1::Environment::Unspecified,
            2,
            token[..token.len() - 4].to_string(),
        ),
        list(
            "tenants/-",
            v1::Environment::Unspecified,
            2,
            "bm90LWEtdG9rZW4".into(),
        ),
    ];
    let mut forged = token.clone().into_bytes();
    forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
    bad_tokens.push(list(
        "tenants/-",
        v1::Environment::Unspecified,
        2,
        String::from_utf8(forged).unwrap(),
    ));
    for request in bad_tokens {
        let status = server.instances.list_instances(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), vec!["page_token"]);
        assert_eq!(reason(&status), "INVALID_PAGE_TOKEN");
    }
    // A different page size with the same filters is fine (AIP-158).
    server
        .instances
        .list_instances(list("tenants/-", v1::Environment::Unspecified, 5, token))
        .await
        .unwrap();

    let invalid = [
        (
            list("tenants/-", v1::Environment::Unspecified, -1, String::new()),
            "page_size",
        ),
        (
            list(
                "tenants/A B",
                v1::Environment::Unspecified,
                0,
                String::new(),
            ),
            "parent",
        ),
        (
            list("tenants/-", v1::Environment::Unspecified, 0, String::new()),
            "state",
        ),
        (
            list("orgs/x", v1::Environment::Unspecified, 0, String::new()),
            "parent",
        ),
    ];
    for (i, (mut request, field)) in invalid.into_iter().enumerate() {
        if i == 2 {
            request.state = 42;
        }
        let status = server.instances.list_instances(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), vec![field]);
    }
    let mut unknown_env = list("tenants/-", v1::Environment::Unspecified, 0, String::new());
    unknown_env.environment = 9;
    let status = server
        .instances
        .list_instances(unknown_env)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["environment"]);
}

#[tokio::test]
async fn list_operations_filters_and_pages() {
    let mut server = start().await;
    for tenant in ["op-a", "op-b", "op-c"] {
        server
            .instances
            .create_instance(create_request(tenant, "wp", v1::Environment::Dev))
            .await
            .unwrap();
    }
    let request = |filter: &str, page_size: i32, page_token: String| lro::ListOperationsRequest {
        name: String::new(),
        filter: filter.into(),
        page_size,
        page_token,
    };
    let page = server
        .operations
        .list_operations(request("", 2, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.operations.len(), 2);
    let rest = server
        .operations
        .list_operations(request("", 2, page.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.operations.len(), 1);
    assert!(rest.next_page_token.is_empty());

    let filtered = server
        .operations
        .list_operations(request(
            "target = \"tenants/op-b/instances/wp\" AND done = false",
            0,
            String::new(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.operations.len(), 1);
    assert_eq!(
        metadata(&filtered.operations[0]).target,
        "tenants/op-b/instances/wp"
    );
    let none = server
        .operations
        .list_operations(request("status = COMPLETED", 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert!(none.operations.is_empty());

    for (bad, field) in [
        (request("colour = red", 0, String::new()), "filter"),
        (request("", -5, String::new()), "page_size"),
        (
            request("", 2, page.next_page_token.clone()[3..].to_string()),
            "page_token",
        ),
        (
            request("done = true", 2, page.next_page_token),
            "page_token",
        ),
    ] {
        let status = server.operations.list_operations(bad).await.unwrap_err();
        assert_eq!(violated_fields(&status), vec![field]);
    }
}

#[tokio::test]
async fn reads_of_a_missing_instance_and_unsupported_methods_carry_error_info() {
    let mut server = start().await;
    let status = server
        .instances
        .get_resource_usage(v1::GetResourceUsageRequest {
            name: "tenants/acme/instances/wp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "INSTANCE_NOT_FOUND")
    );
    // A missing operation is NOT_FOUND before anything else (its tenant, which
    // authorisation needs, is only known from the stored operation); an existing one is
    // not deleted.
    let status = server
        .operations
        .delete_operation(lro::DeleteOperationRequest {
            name: "operations/x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "OPERATION_NOT_FOUND")
    );
    let operation = server
        .instances
        .create_instance(create_request("acme", "wp", v1::Environment::Dev))
        .await
        .unwrap()
        .into_inner();
    let status = server
        .operations
        .delete_operation(lro::DeleteOperationRequest {
            name: operation.name,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::Unimplemented, "NOT_SUPPORTED")
    );
}

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = start().await;
    let mut client = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "bbws.instance.v1.InstanceService",
        "google.longrunning.Operations",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(service), "{service} missing from {names:?}");
    }
}

#[tokio::test]
async fn health_is_not_serving_until_the_state_store_answers() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    // The table does not exist yet: the store cannot answer.
    let table = common::unique_name("late");
    let sdk = common::test_sdk_config().await;
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table.clone());
    let server = start_with(store).await;
    let mut health = HealthClient::new(server.channel.clone());
    let check = HealthCheckRequest {
        service: String::new(),
    };
    let status = health.check(check.clone()).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::NotServing);
    let mut watch = health.watch(check).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), table)
        .ensure_table()
        .await
        .unwrap();
    // The readiness loop keeps trying; the watch reports the change.
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
}
