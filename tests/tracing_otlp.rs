//! Trace export on the real binary, into a fake OTLP collector (a tonic `TraceService` in
//! this test): one provisioning is one trace — the CreateInstance call continuing the
//! caller's `traceparent`, the operation run by the engine as its child, the steps inside,
//! and the AWS calls inside those carrying AWS's request ids; `sample_ratio = 0` exports
//! nothing of an operation; without `[tracing]` nothing connects, whatever `OTEL_*`
//! variables say. The servers are stopped with SIGTERM before the collector is read: the
//! graceful shutdown flushes the exporter, so after the exit everything that will ever be
//! exported has been, and no wait for "nothing more arrives" is needed.

mod common;
mod platform;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instance_manager::config::Config;
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use platform::{Client, metadata};
use tokio_stream::StreamExt as _;

/// How long a provisioning on the emulator may take.
const PROVISION_LIMIT: Duration = Duration::from_secs(180);
/// How long a stopped server may take to drain and flush its spans.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// One exported span with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

impl Exported {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn text(values: &[KeyValue]) -> HashMap<String, String> {
    values
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// A fake OTLP/gRPC collector: keeps every span, and counts the connections made to it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
    connections: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| text(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        attributes: text(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a port of its own until the test ends; its `http://` address.
    async fn start() -> (Self, String) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let connections = collector.connections.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |io| {
            connections.fetch_add(1, Ordering::SeqCst);
            io
        });
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        (collector, address)
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }
}

/// `config` on a fresh table of its own (so two servers never claim each other's work),
/// with `tracing`, written for a server process in `dir`.
async fn own_config(
    config: &Config,
    dir: &std::path::Path,
    tracing: instance_manager::config::TracingConfig,
) -> std::path::PathBuf {
    let mut config = config.clone();
    config.table = common::unique_name("otel");
    config.tracing = tracing;
    platform::create_table(&config.table).await;
    std::fs::create_dir_all(dir).unwrap();
    platform::write_config(&config, dir, 15)
}

/// `serve --config path` with extra environment variables; its process and address.
async fn serve(path: &std::path::Path, envs: &[(&str, &str)]) -> (common::ServerProcess, String) {
    let path = path.to_str().unwrap().to_owned();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (&**k, &**v)).collect();
        let mut server = common::ServerProcess::spawn(
            ["serve", "--config", &path, "--listen", common::ANY_PORT],
            &envs,
        );
        let addr = server.wait_serving();
        (server, addr.to_string())
    })
    .await
    .unwrap()
}

/// SIGTERM, then the exit (the graceful path flushes the exporter).
async fn stop(mut server: common::ServerProcess) -> String {
    server.signal("TERM");
    let status = platform::exited(&mut server, EXIT_LIMIT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        server.logs()
    );
    server.logs()
}

/// A W3C `traceparent` of a sampled caller span, and its trace and span ids.
fn caller_traceparent() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace}-{span}-01"), trace, span)
}

/// Creates an instance (with `traceparent` if given) and waits until it is ACTIVE; the
/// operation's id (the part after `operations/`).
async fn provision(addr: &str, tenant: &str, traceparent: Option<&str>) -> String {
    let mut client = Client::connect(addr).await;
    let operation = client
        .instances
        .create_instance(with_traceparent(
            platform::create_request(tenant, "wp", v1::Environment::Dev),
            traceparent,
        ))
        .await
        .unwrap()
        .into_inner();
    let done = tokio::time::timeout(PROVISION_LIMIT, client.completed(&operation.name))
        .await
        .expect("provisioning finished in time");
    assert!(metadata(&done).status() == v1::OperationStatus::Completed);
    let instance = client.instance(tenant).await;
    assert_eq!(instance.state(), v1::InstanceState::Active);
    operation
        .name
        .strip_prefix("operations/")
        .unwrap_or(&operation.name)
        .to_owned()
}

/// `message` as a request carrying `traceparent` when given.
fn with_traceparent<T>(message: T, traceparent: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", value.parse().unwrap());
    }
    request
}

/// A cheap call carrying `traceparent` (its span proves the process exports at all); its
/// status code.
async fn traced_get(addr: &str, operation: &str, traceparent: &str) -> tonic::Code {
    let mut client = Client::connect(addr).await;
    let request = instance_manager::proto::google_longrunning::GetOperationRequest {
        name: format!("operations/{operation}"),
    };
    match client
        .operations
        .get_operation(with_traceparent(request, Some(traceparent)))
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_provisioning_is_one_trace_and_sampling_and_the_default_export_nothing() {
    let config = platform::config_with_platforms(&[Environment::Dev]).await;
    let dir = tempfile::tempdir().unwrap();
    let (sampled, sampled_url) = Collector::start().await;
    let (unsampled, unsampled_url) = Collector::start().await;
    let (unconfigured, unconfigured_url) = Collector::start().await;

    let traced = |endpoint: &str, ratio: f64| instance_manager::config::TracingConfig {
        otlp_endpoint: endpoint.to_owned(),
        sample_ratio: ratio,
        service_name: "im-trace-test".into(),
    };
    let all = own_config(&config, &dir.path().join("all"), traced(&sampled_url, 1.0)).await;
    let none = own_config(
        &config,
        &dir.path().join("none"),
        traced(&unsampled_url, 0.0),
    )
    .await;
    let off = own_config(
        &config,
        &dir.path().join("off"),
        instance_manager::config::TracingConfig::default(),
    )
    .await;

    // Ratio 1: a provisioning whose caller sends a traceparent.
    // Ratio 0: a provisioning without one, then one call with a sampled traceparent.
    let (caller, caller_trace, caller_span) = caller_traceparent();
    let (probe, probe_trace, _) = caller_traceparent();
    let (all_tenant, none_tenant) = (platform::tenant("otel"), platform::tenant("otel0"));
    let ((all_logs, all_op), (none_logs, none_op)) = tokio::join!(
        async {
            let (server, addr) = serve(&all, &[]).await;
            let op = provision(&addr, &all_tenant, Some(&caller)).await;
            (stop(server).await, op)
        },
        async {
            let (server, addr) = serve(&none, &[]).await;
            let op = provision(&addr, &none_tenant, None).await;
            assert_eq!(traced_get(&addr, &op, &probe).await, tonic::Code::Ok);
            (stop(server).await, op)
        }
    );

    // --- ratio 1: one trace, from the caller's span down to AWS.
    let spans = sampled.spans();
    assert!(
        spans.iter().all(|s| s.service == "im-trace-test"),
        "{spans:#?}"
    );
    let in_trace: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.trace_id == caller_trace)
        .collect();
    let rpc = in_trace
        .iter()
        .find(|s| {
            s.name == "rpc"
                && s.attr("method") == Some("/bbws.instance.v1.InstanceService/CreateInstance")
        })
        .unwrap_or_else(|| {
            panic!("no CreateInstance span in the caller's trace: {spans:#?}\n{all_logs}")
        });
    assert_eq!(
        rpc.parent_span_id, caller_span,
        "the caller's span is the parent"
    );
    assert_eq!(rpc.attr("operation_id"), Some(all_op.as_str()));
    let operation = in_trace
        .iter()
        .find(|s| s.name == "operation")
        .unwrap_or_else(|| panic!("no operation span in the trace: {spans:#?}\n{all_logs}"));
    assert_eq!(
        operation.parent_span_id, rpc.span_id,
        "the engine's span continues the call that created the operation"
    );
    assert_eq!(operation.attr("operation_id"), Some(all_op.as_str()));
    assert_eq!(operation.attr("operation.verb"), Some("create"));
    assert_eq!(
        operation.attr("instance"),
        Some(format!("tenants/{all_tenant}/instances/wp").as_str())
    );
    assert!(operation.attr("replica").is_some_and(|r| !r.is_empty()));
    let steps: Vec<&&Exported> = in_trace.iter().filter(|s| s.name == "step").collect();
    assert!(steps.len() >= 8, "{steps:#?}");
    for step in &steps {
        assert_eq!(step.parent_span_id, operation.span_id, "{step:?}");
        assert_eq!(step.attr("operation_id"), Some(all_op.as_str()), "{step:?}");
        assert_eq!(step.attr("operation.verb"), Some("create"), "{step:?}");
        assert_eq!(
            step.attr("instance"),
            operation.attr("instance"),
            "{step:?}"
        );
        assert_eq!(step.attr("replica"), operation.attr("replica"), "{step:?}");
        assert!(step.attr("step").is_some_and(|s| !s.is_empty()), "{step:?}");
    }
    // AWS calls made by steps: inside a step's span, with AWS's request id.
    let step_ids: Vec<&str> = steps.iter().map(|s| s.span_id.as_str()).collect();
    let aws_calls: Vec<&&Exported> = in_trace
        .iter()
        .filter(|s| s.attr("rpc.system") == Some("aws-api"))
        .collect();
    let with_ids: Vec<&&&Exported> = aws_calls
        .iter()
        .filter(|s| {
            s.attr("aws.request_id").is_some_and(|id| !id.is_empty())
                && s.attr("aws.operation").is_some_and(|op| !op.is_empty())
                && s.attr("aws.service").is_some_and(|sv| !sv.is_empty())
        })
        .collect();
    assert!(
        with_ids
            .iter()
            .any(|s| step_ids.contains(&s.parent_span_id.as_str())),
        "no AWS call span under a step carries aws.request_id: {aws_calls:#?}"
    );
    // The call span is the SDK's `Service.Operation`, named after what it did.
    for call in &with_ids {
        assert_eq!(
            call.name,
            format!(
                "{}.{}",
                call.attr("rpc.service").unwrap(),
                call.attr("aws.operation").unwrap()
            )
        );
    }

    // Background loops (the claim loop polls the store twice a second) are no trace: no
    // process-long span, and no AWS call outside an exported span.
    assert!(
        !spans
            .iter()
            .any(|s| ["engine", "reconcile", "readiness"].contains(&s.name.as_str())),
        "{spans:#?}"
    );
    let exported_ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for call in spans
        .iter()
        .filter(|s| s.attr("rpc.system") == Some("aws-api"))
    {
        assert!(
            exported_ids.contains(&call.parent_span_id.as_str()),
            "an AWS call outside any exported span: {call:#?}"
        );
    }

    // --- ratio 0: the pipeline works (the sampled probe arrived), the operation is absent.
    let spans = unsampled.spans();
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == probe_trace && s.name == "rpc"),
        "the probe call's span must arrive: {spans:#?}\n{none_logs}"
    );
    assert!(
        spans.iter().all(|s| s.trace_id == probe_trace),
        "only the probe's trace is exported: {spans:#?}"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.attr("operation_id") == Some(none_op.as_str()) && s.name != "rpc"),
        "{spans:#?}"
    );

    // --- no [tracing]: nothing connects, even with the SDK's own variables set.
    let otel_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", unconfigured_url.as_str()),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            unconfigured_url.as_str(),
        ),
        ("OTEL_TRACES_EXPORTER", "otlp"),
    ];
    let (server, addr) = serve(&off, &otel_env).await;
    let (probe, _, _) = caller_traceparent();
    // (The operation lives in another server's table: NOT_FOUND, after a whole call.)
    assert_eq!(
        traced_get(&addr, &all_op, &probe).await,
        tonic::Code::NotFound
    );
    let logs = stop(server).await;
    assert_eq!(unconfigured.connections.load(Ordering::SeqCst), 0, "{logs}");
    assert!(unconfigured.spans().is_empty());
    // The exporting servers did connect to theirs (so the count above can fail).
    assert!(sampled.connections.load(Ordering::SeqCst) > 0);
}

#[test]
fn a_bad_ratio_or_endpoint_stops_start_up_with_the_key_named() {
    for (args, envs, expected) in [
        (
            vec!["serve", "--dump-config", "--tracing-sample-ratio", "1.5"],
            vec![],
            "invalid configuration: tracing.sample_ratio must be between 0 and 1, got 1.5",
        ),
        (
            vec!["serve", "--dump-config"],
            vec![("IM_TRACING_SAMPLE_RATIO", "-1")],
            "tracing.sample_ratio must be between 0 and 1",
        ),
        (
            vec!["serve", "--dump-config"],
            vec![("IM_TRACING_OTLP_ENDPOINT", "otel-collector:4317")],
            "tracing.otlp_endpoint \"otel-collector:4317\" must start with http:// or https://",
        ),
    ] {
        let output = common::ServerProcess::run(args.clone(), &envs, Duration::from_secs(30));
        assert!(!output.status.success(), "{args:?}: {}", output.stderr);
        assert!(
            output.stderr.contains(expected),
            "{args:?}: {}",
            output.stderr
        );
    }
    // A good one is accepted and shown by --dump-config.
    let output = common::ServerProcess::run(
        ["serve", "--dump-config"],
        &[
            ("IM_TRACING_OTLP_ENDPOINT", "http://otel-collector:4317"),
            ("IM_TRACING_SAMPLE_RATIO", "0.1"),
        ],
        Duration::from_secs(30),
    );
    output.assert_success();
    assert!(
        output
            .stdout
            .contains("otlp_endpoint = \"http://otel-collector:4317\""),
        "{}",
        output.stdout
    );
    assert!(
        output.stdout.contains("sample_ratio = 0.1"),
        "{}",
        output.stdout
    );
}
