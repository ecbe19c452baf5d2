//! The API contract (issue 8, streaming 7.11) through our own tonic client against an
//! in-process server on moto: idempotent retries under concurrency, bounded and always
//! detailed errors, and WatchOperation's ending rules.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use instance_manager::api::{Api, ApiSettings, PageTokens};
use instance_manager::domain::{
    InstanceName, InstanceState, OperationEvent, OperationId, OperationStatus, ScaleBounds,
    Timestamp,
};
use instance_manager::proto::google_longrunning as lro;
use instance_manager::proto::google_longrunning::operations_client::OperationsClient;
use instance_manager::proto::v1;
use instance_manager::proto::v1::instance_service_client::InstanceServiceClient;
use instance_manager::store::{DynamoStore, StateStore, Write};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

struct TestServer {
    instances: InstanceServiceClient<Channel>,
    operations: OperationsClient<Channel>,
    channel: Channel,
    store: Arc<DynamoStore>,
    api: Api,
    shutdown: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn settings() -> ApiSettings {
    ApiSettings {
        scale_bounds: ScaleBounds::default(),
        idempotency_ttl_secs: 3600,
        default_page_size: 50,
        max_page_size: 100,
        ..ApiSettings::default()
    }
}

async fn start() -> TestServer {
    start_with(settings()).await
}

async fn start_with(settings: ApiSettings) -> TestServer {
    let sdk = common::test_sdk_config().await;
    let store = Arc::new(DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        common::unique_name("contract"),
    ));
    store.ensure_table().await.expect("create table");
    let api = Api::new(store.clone(), settings, PageTokens::new(b"test-key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(instance_manager::server::serve(
        api.clone(),
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
        instances: InstanceServiceClient::new(channel.clone()),
        operations: OperationsClient::new(channel.clone()),
        channel,
        store,
        api,
        shutdown,
    }
}

fn create_request(tenant: &str, id: &str) -> v1::CreateInstanceRequest {
    v1::CreateInstanceRequest {
        parent: format!("tenants/{tenant}"),
        instance_id: id.into(),
        instance: Some(v1::Instance {
            environment: v1::Environment::Dev.into(),
            organization_name: "Acme Corp".into(),
            contact_email: "ops@acme.example".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
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

async fn operation_count(server: &mut TestServer) -> usize {
    server
        .operations
        .list_operations(lro::ListOperationsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .len()
}

/// Ends `name`'s operation with `status` through the store, as a workflow would: the
/// operation update and its terminal event in one commit.
async fn end_operation(server: &TestServer, name: &str, status: OperationStatus) {
    let id = OperationId::from_name(name).unwrap();
    let mut operation = server.store.get_operation(&id).await.unwrap().unwrap();
    let now = Timestamp::now();
    operation.status = status;
    operation.ended_at = Some(now);
    operation.updated_at = now;
    let event = operation.next_event(now, None, format!("operation {status}"));
    server
        .store
        .commit(vec![
            Write::UpdateOperation(operation),
            Write::AppendEvent(event),
        ])
        .await
        .unwrap();
}

async fn parallel_creates(
    server: &TestServer,
    request: v1::CreateInstanceRequest,
    n: usize,
) -> Vec<Result<lro::Operation, Status>> {
    let calls = (0..n).map(|_| {
        let mut client = server.instances.clone();
        let request = request.clone();
        async move {
            client
                .create_instance(request)
                .await
                .map(|r| r.into_inner())
        }
    });
    futures::future::join_all(calls).await
}

#[tokio::test]
async fn concurrent_retries_with_one_request_id_all_get_the_one_operation() {
    let mut server = start().await;
    for (tenant, instance_id) in [("same", "wp"), ("generated", "")] {
        let mut request = create_request(tenant, instance_id);
        request.request_id = format!("retry-{tenant}");
        let results = parallel_creates(&server, request.clone(), 20).await;
        let names: std::collections::BTreeSet<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap_or_else(|s| panic!("{s:?}")).name.clone())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // The same id with another payload, concurrently: REQUEST_ID_REUSED, never a
        // second operation.
        let mut other = request.clone();
        other.instance.as_mut().unwrap().organization_name = "Other Corp".into();
        for result in parallel_creates(&server, other, 5).await {
            let status = result.unwrap_err();
            assert_eq!(violated_fields(&status), vec!["request_id"]);
            assert_eq!(reason(&status), "REQUEST_ID_REUSED");
        }
    }
    assert_eq!(operation_count(&mut server).await, 2);
}

#[tokio::test]
async fn retry_operation_validates_and_honours_its_request_id() {
    let mut server = start().await;
    let first = server
        .instances
        .create_instance(create_request("retry", "wp"))
        .await
        .unwrap()
        .into_inner();
    let status = server
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: first.name.clone(),
            request_id: "no spaces allowed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["request_id"]);

    end_operation(&server, &first.name, OperationStatus::Failed).await;
    let request = v1::RetryOperationRequest {
        name: first.name.clone(),
        request_id: "retry-once".into(),
    };
    let calls = (0..10).map(|_| {
        let mut client = server.instances.clone();
        let request = request.clone();
        async move { client.retry_operation(request).await }
    });
    for result in futures::future::join_all(calls).await {
        let operation = result.unwrap_or_else(|s| panic!("{s:?}")).into_inner();
        assert_eq!(operation.name, first.name);
    }
    // Exactly one retry happened: one "retry requested" event.
    let id = OperationId::from_name(&first.name).unwrap();
    let events = server.store.read_events(&id, 1, 100).await.unwrap();
    let retries = events
        .iter()
        .filter(|e| e.message.starts_with("retry requested"))
        .count();
    assert_eq!(retries, 1, "{events:?}");

    // The same key for another operation is a reuse.
    let second = server
        .instances
        .create_instance(create_request("retry-two", "wp"))
        .await
        .unwrap()
        .into_inner();
    end_operation(&server, &second.name, OperationStatus::Failed).await;
    let status = server
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: second.name.clone(),
            request_id: "retry-once".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    assert_eq!(operation_count(&mut server).await, 2);
}

#[tokio::test]
async fn echoed_client_input_keeps_errors_under_the_metadata_limit() {
    let mut server = start().await;
    let status = server
        .operations
        .list_operations(lro::ListOperationsRequest {
            // Not of the form key = value: echoed in the violation and the message.
            filter: "x".repeat(5000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_ARGUMENT");
    assert!(status.message().len() <= 1024, "{}", status.message().len());
    assert!(status.details().len() <= 4096, "{}", status.details().len());

    let status = server
        .operations
        .get_operation(lro::GetOperationRequest {
            name: format!("operations/{}", "é".repeat(20_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    reason(&status);

    let status = server
        .instances
        .get_instance(v1::GetInstanceRequest {
            name: format!("tenants/a/instances/{}", "b".repeat(60_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    reason(&status);
}

/// A message with the field numbers of GetInstanceRequest, whose `name` is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

#[tokio::test]
async fn errors_raised_before_a_handler_carry_error_info() {
    let mut server = start().await;
    let mut request = create_request("big", "wp");
    request.instance.as_mut().unwrap().organization_name = "x".repeat(10 * 1024 * 1024);
    let status = server.instances.create_instance(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "REQUEST_TOO_LARGE");

    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<NotUtf8, v1::Instance, _>(
            tonic::Request::new(NotUtf8 {
                name: vec![0xff, 0xfe, 0xfd],
            }),
            "/bbws.instance.v1.InstanceService/GetInstance"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "MALFORMED_REQUEST");

    // An unknown method.
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<NotUtf8, v1::Instance, _>(
            tonic::Request::new(NotUtf8 { name: vec![] }),
            "/bbws.instance.v1.InstanceService/NoSuchMethod"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    reason(&status);

    // The server still serves normal requests.
    server
        .instances
        .create_instance(create_request("big", "wp"))
        .await
        .unwrap();
}

/// Collects a WatchOperation stream until it ends; panics if it does not end in `limit`.
async fn watch_to_end(
    server: &mut TestServer,
    name: &str,
    from_sequence: i64,
    limit: Duration,
) -> Vec<v1::OperationEvent> {
    let mut stream = server
        .instances
        .watch_operation(v1::WatchOperationRequest {
            name: name.into(),
            from_sequence,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(limit, async {
        while let Some(item) = stream.next().await {
            events.push(item.unwrap_or_else(|s| panic!("{s:?}")));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("stream did not end within {limit:?}; got {events:?}"));
    events
}

#[tokio::test]
async fn watching_a_finished_operation_past_its_end_ends_at_once() {
    let mut server = start().await;
    let operation = server
        .instances
        .create_instance(create_request("watch-end", "wp"))
        .await
        .unwrap()
        .into_inner();
    end_operation(&server, &operation.name, OperationStatus::Failed).await;
    let all = watch_to_end(&mut server, &operation.name, 0, Duration::from_secs(5)).await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[1].terminal);
    for from in [3, 4, 1000] {
        let none = watch_to_end(&mut server, &operation.name, from, Duration::from_secs(2)).await;
        assert!(none.is_empty(), "{none:?}");
    }
}

#[tokio::test]
async fn a_watcher_follows_a_retried_operation_to_its_latest_attempt() {
    let mut server = start().await;
    let operation = server
        .instances
        .create_instance(create_request("watch-retry", "wp"))
        .await
        .unwrap()
        .into_inner();
    end_operation(&server, &operation.name, OperationStatus::Failed).await;
    server
        .instances
        .retry_operation(v1::RetryOperationRequest {
            name: operation.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap();
    let watcher = {
        let mut client = server.instances.clone();
        let name = operation.name.clone();
        tokio::spawn(async move {
            let mut stream = client
                .watch_operation(v1::WatchOperationRequest {
                    name,
                    from_sequence: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut events = Vec::new();
            while let Some(item) = stream.next().await {
                events.push(item.unwrap());
            }
            events
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !watcher.is_finished(),
        "the stream ended at the first attempt's end"
    );
    end_operation(&server, &operation.name, OperationStatus::Completed).await;
    let events = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the stream ends after the latest attempt")
        .unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "{events:?}");
    assert!(events[1].terminal && events[3].terminal);
}

async fn open_watch(
    server: &TestServer,
    name: &str,
) -> Result<tonic::Streaming<v1::OperationEvent>, Status> {
    let mut client = server.instances.clone();
    let mut stream = client
        .watch_operation(v1::WatchOperationRequest {
            name: name.into(),
            from_sequence: 0,
        })
        .await?
        .into_inner();
    // The first event proves the stream is open on the server.
    stream.next().await.expect("a first event")?;
    Ok(stream)
}

#[tokio::test]
async fn watchers_share_one_feed_per_operation_and_streams_are_capped() {
    let server = start_with(ApiSettings {
        max_streams: 12,
        ..settings()
    })
    .await;
    let mut client = server.instances.clone();
    let operation = client
        .create_instance(create_request("feed", "wp"))
        .await
        .unwrap()
        .into_inner();
    let mut watchers = Vec::new();
    for _ in 0..12 {
        watchers.push(open_watch(&server, &operation.name).await.unwrap());
    }
    assert_eq!(
        server.api.feeds.active(),
        1,
        "one store reader for 12 watchers"
    );

    let status = open_watch(&server, &operation.name).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_STREAMS");

    // A live event reaches every watcher through the one feed.
    end_operation(&server, &operation.name, OperationStatus::Failed).await;
    for stream in &mut watchers {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the event within 5 s")
            .unwrap()
            .unwrap();
        assert!(event.terminal);
        assert!(stream.next().await.is_none(), "the stream ends");
    }
    drop(watchers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.api.feeds.active() > 0 || server.api.streams.available_permits() < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed and the permits are released when the watchers leave"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next event of `name` (not stored): what the engine would publish.
async fn next_event(server: &TestServer, name: &str, text: &str) -> OperationEvent {
    let id = OperationId::from_name(name).unwrap();
    let mut operation = server.store.get_operation(&id).await.unwrap().unwrap();
    let event = operation.next_event(Timestamp::now(), None, text);
    server
        .store
        .commit(vec![Write::UpdateOperation(operation)])
        .await
        .unwrap();
    event
}

/// The stream's next event (within 5 s).
async fn received(stream: &mut tonic::Streaming<v1::OperationEvent>) -> v1::OperationEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn the_running_replicas_events_reach_watchers_from_its_bus_and_gaps_from_the_store() {
    // A poll far longer than the test: whatever arrives came through the bus, or through a
    // store read the bus caused.
    let server = start_with(ApiSettings {
        watch_poll: Duration::from_secs(600),
        ..settings()
    })
    .await;
    let mut client = server.instances.clone();
    let operation = client
        .create_instance(create_request("bus", "wp"))
        .await
        .unwrap()
        .into_inner();
    let mut stream = open_watch(&server, &operation.name).await.unwrap();

    // The next event in order goes out as published: it is never read back (this one is
    // not even in the store, which the engine never does; it proves where it came from).
    let published = next_event(&server, &operation.name, "from the bus").await;
    server.api.bus.publish(published.clone());
    let got = received(&mut stream).await;
    assert_eq!(
        (got.sequence, got.message.as_str()),
        (published.seq as i64, "from the bus")
    );

    // One out of order (a gap: an event this replica did not publish, such as another
    // replica's): the feed reads the store, and the watcher gets both, in order.
    let id = OperationId::from_name(&operation.name).unwrap();
    let mut stored = server.store.get_operation(&id).await.unwrap().unwrap();
    let missed = stored.next_event(Timestamp::now(), None, "written elsewhere");
    let later = stored.next_event(Timestamp::now(), None, "published late");
    server
        .store
        .commit(vec![
            Write::UpdateOperation(stored),
            Write::AppendEvent(missed.clone()),
            Write::AppendEvent(later.clone()),
        ])
        .await
        .unwrap();
    server.api.bus.publish(later.clone());
    let first = received(&mut stream).await;
    let second = received(&mut stream).await;
    assert_eq!(
        [
            (first.sequence, first.message.as_str()),
            (second.sequence, second.message.as_str())
        ],
        [
            (missed.seq as i64, "written elsewhere"),
            (later.seq as i64, "published late")
        ]
    );
}

#[tokio::test]
async fn labels_follow_aws_tag_rules_at_the_api() {
    let mut server = start().await;
    let mut request = create_request("labels", "wp");
    let labels = &mut request.instance.as_mut().unwrap().labels;
    labels.insert("Team Name".into(), "Web Platform: EU/1".into());
    labels.insert("aws:reserved".into(), "x".into());
    labels.insert("bbws:tenant-id".into(), "spoof".into());
    labels.insert("bad;key".into(), "x".into());
    labels.insert("k".into(), "v".repeat(257));
    let status = server
        .instances
        .create_instance(request.clone())
        .await
        .unwrap_err();
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        vec![
            "instance.labels[\"aws:reserved\"]",
            "instance.labels[\"bad;key\"]",
            "instance.labels[\"bbws:tenant-id\"]",
            "instance.labels[\"k\"]",
        ]
    );

    // 42 labels and the service's 8 tags are AWS's 50; one more is refused.
    let labels = &mut request.instance.as_mut().unwrap().labels;
    labels.clear();
    for i in 0..43 {
        labels.insert(format!("Label {i}"), format!("Value {i}"));
    }
    let status = server
        .instances
        .create_instance(request.clone())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["instance.labels"]);
    request.instance.as_mut().unwrap().labels.remove("Label 42");
    let operation = server
        .instances
        .create_instance(request)
        .await
        .unwrap()
        .into_inner();
    assert!(!operation.name.is_empty());
}

#[tokio::test]
async fn concurrent_deletes_with_one_request_id_all_get_the_one_operation() {
    let mut server = start().await;
    let created = server
        .instances
        .create_instance(create_request("delete-race", "wp"))
        .await
        .unwrap()
        .into_inner();
    end_operation(&server, &created.name, OperationStatus::Completed).await;
    let name = InstanceName::parse("tenants/delete-race/instances/wp").unwrap();
    let mut instance = server.store.get_instance(&name).await.unwrap().unwrap();
    instance.state = InstanceState::Active;
    instance.current_operation = None;
    server
        .store
        .commit(vec![Write::UpdateInstance(instance)])
        .await
        .unwrap();

    let request = v1::DeleteInstanceRequest {
        name: name.to_string(),
        request_id: "delete-once".into(),
        ..Default::default()
    };
    let calls = (0..20).map(|_| {
        let mut client = server.instances.clone();
        let request = request.clone();
        async move { client.delete_instance(request).await }
    });
    let names: std::collections::BTreeSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|s| panic!("{s:?}")).into_inner().name)
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(operation_count(&mut server).await, 2);
}

#[tokio::test]
async fn an_environment_may_set_its_own_task_count_bounds() {
    let server = start_with(ApiSettings {
        environment_scale_bounds: vec![(
            instance_manager::domain::Environment::Prod,
            ScaleBounds { min: 3, max: 20 },
        )],
        ..settings()
    })
    .await;
    let mut client = server.instances.clone();
    let with = |tenant: &str, environment: v1::Environment, count: i32| {
        let mut request = create_request(tenant, "wp");
        let instance = request.instance.as_mut().unwrap();
        instance.environment = environment.into();
        instance.desired_count = count;
        request
    };
    // 15 tasks: within PROD's own bounds, beyond the deployment's (2–10) used by DEV.
    client
        .create_instance(with("bounds-prod", v1::Environment::Prod, 15))
        .await
        .expect("PROD allows 15 tasks");
    let status = client
        .create_instance(with("bounds-dev", v1::Environment::Dev, 15))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["instance.desired_count"]);
    // PROD's minimum is 3: 2 is refused there, and the default count is raised to it.
    let status = client
        .create_instance(with("bounds-prod2", v1::Environment::Prod, 2))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), vec!["instance.desired_count"]);
    client
        .create_instance(with("bounds-prod3", v1::Environment::Prod, 0))
        .await
        .unwrap();
    let instance = client
        .get_instance(v1::GetInstanceRequest {
            name: "tenants/bounds-prod3/instances/wp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(instance.desired_count, 3);
}

fn with_domains(
    mut request: v1::CreateInstanceRequest,
    domains: &[&str],
) -> v1::CreateInstanceRequest {
    request.instance.as_mut().unwrap().custom_domains =
        domains.iter().map(|d| d.to_string()).collect();
    request
}

/// Custom domains: host names checked per environment (the platform's domain and limit),
/// each violation naming its index; a domain held by another instance is ALREADY_EXISTS
/// (DOMAIN_TAKEN) for any tenant, decided by the create's own transaction when two race;
/// a create cancelled before it ran gives its domains back; UpdateInstance claims what it
/// adds.
#[tokio::test]
async fn custom_domains_are_validated_and_unique_across_tenants() {
    let mut server = start_with(ApiSettings {
        environment_domains: vec![(
            instance_manager::domain::Environment::Dev,
            instance_manager::domain::spec::DomainRules {
                platform_domain: "dev.sites.test".into(),
                limit: 2,
            },
        )],
        ..settings()
    })
    .await;
    let refused = server
        .instances
        .create_instance(with_domains(
            create_request("acme", "wp"),
            &[
                "ok.example.com",
                "bad_name.example.com",
                "acme.dev.sites.test",
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        vec![
            "instance.custom_domains",
            "instance.custom_domains[1]",
            "instance.custom_domains[2]"
        ]
    );
    let refused = server
        .instances
        .create_instance(with_domains(
            create_request("acme", "wp"),
            &["*.example.com", "www.example.com."],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        vec!["instance.custom_domains[0]", "instance.custom_domains[1]"]
    );
    assert_eq!(operation_count(&mut server).await, 0);

    let acme = server
        .instances
        .create_instance(with_domains(
            create_request("acme", "wp"),
            &["WWW.Acme.example"],
        ))
        .await
        .unwrap()
        .into_inner();
    let taken = server
        .instances
        .create_instance(with_domains(
            create_request("globex", "wp"),
            &["shop.globex.example", "www.acme.example"],
        ))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert_eq!(reason(&taken), "DOMAIN_TAKEN");
    let globex = InstanceName::parse("tenants/globex/instances/wp").unwrap();
    assert_eq!(server.store.get_instance(&globex).await.unwrap(), None);
    assert_eq!(
        server
            .store
            .get_domain_claim("shop.globex.example")
            .await
            .unwrap(),
        None,
        "nothing of the refused request is written"
    );

    // Two tenants race for one domain: one create wins, the other is ALREADY_EXISTS.
    let racers = ["initech", "umbrella", "hooli", "vandelay"];
    let calls = racers.iter().map(|tenant| {
        let mut client = server.instances.clone();
        let request = with_domains(create_request(tenant, "wp"), &["race.example.com"]);
        async move { client.create_instance(request).await }
    });
    let results = futures::future::join_all(calls).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
        assert_eq!(reason(refused), "DOMAIN_TAKEN");
    }

    // Cancelled before it ran: acme's domain is free again.
    server
        .operations
        .cancel_operation(lro::CancelOperationRequest {
            name: acme.name.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        server
            .store
            .get_domain_claim("www.acme.example")
            .await
            .unwrap(),
        None
    );
    let globex_op = server
        .instances
        .create_instance(with_domains(
            create_request("globex", "wp"),
            &["www.acme.example"],
        ))
        .await
        .unwrap()
        .into_inner();

    // An ACTIVE instance adds a domain with UpdateInstance: claimed with the operation.
    end_operation(&server, &globex_op.name, OperationStatus::Completed).await;
    let mut instance = server.store.get_instance(&globex).await.unwrap().unwrap();
    instance.state = InstanceState::Active;
    instance.current_operation = None;
    server
        .store
        .commit(vec![Write::UpdateInstance(instance)])
        .await
        .unwrap();
    let update = |domains: &[&str]| v1::UpdateInstanceRequest {
        instance: Some(v1::Instance {
            name: globex.to_string(),
            custom_domains: domains.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["custom_domains".into()],
        }),
        request_id: String::new(),
    };
    let refused = server
        .instances
        .update_instance(update(&["www.acme.example", "race.example.com"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert_eq!(reason(&refused), "DOMAIN_TAKEN");
    let refused = server
        .instances
        .update_instance(update(&["www.acme.example", "-x.example.com"]))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&refused),
        vec!["instance.custom_domains[1]"]
    );
    let accepted = server
        .instances
        .update_instance(update(&["www.acme.example", "blog.globex.example"]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !accepted.done,
        "a change of domains reaches AWS: a workflow"
    );
    assert_eq!(
        server
            .store
            .get_domain_claim("blog.globex.example")
            .await
            .unwrap()
            .map(|c| c.owner),
        Some(globex.clone())
    );
}
