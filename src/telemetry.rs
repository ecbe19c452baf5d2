//! Logging and tracing setup: human or JSON lines on stderr, filtered by directives, and,
//! when `[tracing] otlp_endpoint` is set, the same spans exported with OTLP over gRPC.
//!
//! Trace context crosses three boundaries: a caller's W3C `traceparent` becomes the parent
//! of the RPC's span ([`extract_parent`]); the span that creates an operation is stored on
//! it ([`current_traceparent`]) and becomes the parent of the operation's span on whichever
//! replica runs it ([`parent_from_traceparent`]); and every AWS SDK call's span carries the
//! request id AWS answered with ([`AwsRequestIds`]).

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TracingConfig};

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot set up trace export to {endpoint}: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Keeps the trace exporter of the process; [`Telemetry::shutdown`] sends what is queued.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes queued spans to the collector (bounded by [`FLUSH_TIMEOUT`]) and stops the
    /// exporter. The SDK blocks while it flushes, so this runs off the async workers.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match flushed {
            Ok(Ok(())) => tracing::info!("trace exporter flushed"),
            Ok(Err(error)) => tracing::warn!(%error, "trace exporter did not flush"),
            Err(error) => tracing::warn!(%error, "trace exporter did not flush"),
        }
    }
}

/// Installs the global subscriber without trace export (bootstrap, tools); later calls
/// (for example in tests) are ignored.
pub fn init(format: LogFormat, filter: &str) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(format, filter, std::io::stderr().is_terminal()))
        .try_init();
}

/// Installs the global subscriber and, when `tracing` has an endpoint, the OTLP exporter
/// (inside a Tokio runtime: the gRPC channel lives there). Nothing connects until a span
/// is exported, so a collector that is down does not hold start-up.
pub fn init_with_traces(
    format: LogFormat,
    filter: &str,
    tracing: &TracingConfig,
    replica: &str,
) -> Result<Telemetry, TelemetryError> {
    let logs = log_layer(format, filter, std::io::stderr().is_terminal());
    if !tracing.enabled() {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry::default());
    }
    let provider = tracer_provider(tracing, replica).map_err(|reason| TelemetryError {
        endpoint: tracing.otlp_endpoint.clone(),
        reason,
    })?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("instance-manager"))
        // Only what the spans mean: no source locations, threads or tracing targets.
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(Exported);
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Spans that last as long as the process (background loops): never exported, so that what
/// runs inside them is not one trace per replica. Operations started by the engine's loop
/// are roots (or children of the request that created them), not children of `engine`.
const PROCESS_SPANS: [&str; 6] = [
    "engine",
    "reconcile",
    "retention",
    "readiness",
    "jwks_refresh",
    "tls_accept",
];

/// What goes to the collector, whatever the log filter says: our spans and events at info
/// and above but the process-long ones, and the span the AWS SDK makes around each call
/// (`DynamoDB.PutItem`, …: at debug, in the generated `aws_sdk_*` crates) when it is inside
/// an exported span, none of the SDK's inner spans. The engine's claim loop polls the
/// store twice a second: those calls belong to no trace and are not exported.
struct Exported;

impl Exported {
    fn is_sdk_call(metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_span() && metadata.target().starts_with("aws_sdk_")
    }

    fn always(metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::INFO
            && !(metadata.is_span() && PROCESS_SPANS.contains(&metadata.name()))
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Exported
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        context: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if Self::is_sdk_call(metadata) {
            // The nearest span this filter exported, if any.
            return context.lookup_current().is_some();
        }
        Self::always(metadata)
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::is_sdk_call(metadata) {
            tracing::subscriber::Interest::sometimes()
        } else if Self::always(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

fn tracer_provider(tracing: &TracingConfig, replica: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(tracing.otlp_endpoint.clone())
        .with_timeout(Duration::from_secs(10));
    if tracing.otlp_endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    }
    let exporter = exporter.build().map_err(|error| error.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(tracing.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            replica.to_owned(),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            tracing.sample_ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// Log lines on stderr. Colour only for human lines on a terminal: JSON is for machines
/// and never carries escape codes, and files or pipes get plain text.
fn log_layer<S>(
    format: LogFormat,
    filter: &str,
    terminal: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    log_layer_to(format, filter, terminal, std::io::stderr)
}

fn log_layer_to<S, W>(
    format: LogFormat,
    filter: &str,
    terminal: bool,
    writer: W,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_ansi(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Human => layer.with_ansi(terminal).with_filter(filter).boxed(),
    }
}

/// The W3C trace context of the current span (`00-{trace}-{span}-{flags}`), to store with
/// work that continues elsewhere; `None` when spans are not exported.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = TraceParent(None);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.0
}

/// Makes `span` (not yet entered) a child of the stored `traceparent`, so work resumed on
/// any replica joins the trace of the request that asked for it. A malformed or absent
/// value leaves the span a root.
pub fn parent_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(value) = traceparent else {
        return;
    };
    // On an empty base: a value that does not parse must not adopt whatever is current.
    let context = TraceContextPropagator::new().extract_with_context(
        &opentelemetry::Context::new(),
        &TraceParent(Some(value.to_owned())),
    );
    if context.span().span_context().is_valid() {
        // Fails only when spans are not exported (no layer) or the span is disabled.
        let _ = span.set_parent(context);
    }
}

/// Makes the span of an incoming call (not yet entered) a child of the caller's span when
/// the request carries a W3C `traceparent` (and `tracestate`).
pub fn extract_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let context = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &Headers(headers));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A carrier holding only `traceparent` (what an operation record keeps).
struct TraceParent(Option<String>);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

impl Extractor for TraceParent {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent")
            .then_some(self.0.as_deref())
            .flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// An AWS SDK interceptor that puts on the span of each call (the SDK's own
/// `Service.Operation` span, the innermost one exported) the AWS request id of the answer,
/// and the service and operation. Install it on every client ([`crate::cloud::aws`]); it
/// does nothing when spans are not exported.
#[derive(Debug, Clone, Copy, Default)]
pub struct AwsRequestIds;

/// Response headers that carry the request id: most services, then S3 (whose extended id
/// is kept as well; AWS support asks for both).
const REQUEST_ID_HEADERS: [&str; 2] = ["x-amzn-requestid", "x-amz-request-id"];
const EXTENDED_REQUEST_ID_HEADER: &str = "x-amz-id-2";

impl aws_smithy_runtime_api::client::interceptors::Intercept for AwsRequestIds {
    fn name(&self) -> &'static str {
        "AwsRequestIds"
    }

    /// After every attempt, answered or not: a retried call shows the id of its last try.
    fn read_after_attempt(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        // The SDK's call span is the current one for the exporter (its inner spans are not
        // exported), whatever the log filter enables.
        let current = opentelemetry::Context::current();
        let span = current.span();
        if !span.is_recording() {
            return Ok(());
        }
        if let Some(metadata) = cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
        {
            span.set_attribute(opentelemetry::KeyValue::new(
                "aws.service",
                metadata.service().to_owned(),
            ));
            span.set_attribute(opentelemetry::KeyValue::new(
                "aws.operation",
                metadata.name().to_owned(),
            ));
        }
        let Some(response) = context.response() else {
            return Ok(());
        };
        let headers = response.headers();
        if let Some(id) = REQUEST_ID_HEADERS
            .iter()
            .find_map(|name| headers.get(*name))
        {
            span.set_attribute(opentelemetry::KeyValue::new(
                "aws.request_id",
                id.to_owned(),
            ));
        }
        if let Some(id) = headers.get(EXTENDED_REQUEST_ID_HEADER) {
            span.set_attribute(opentelemetry::KeyValue::new(
                "aws.extended_request_id",
                id.to_owned(),
            ));
        }
        span.set_attribute(opentelemetry::KeyValue::new(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(format: LogFormat, terminal: bool) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(log_layer_to(
            format,
            "info",
            terminal,
            move || writer.clone(),
        ));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("operation", operation = "op-1");
            let _entered = span.enter();
            tracing::warn!(step = "database", "step failed");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_never_carry_colour_codes() {
        // On a terminal human lines are coloured (so the check below can see codes)…
        assert!(logged(LogFormat::Human, true).contains('\u{1b}'));
        // …and JSON lines never are, terminal or not; each is one JSON object.
        for terminal in [true, false] {
            let text = logged(LogFormat::Json, terminal);
            assert!(!text.contains('\u{1b}'), "{text}");
            let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
            assert_eq!(line["message"], "step failed");
            assert_eq!(line["span"]["operation"], "op-1");
        }
        assert!(!logged(LogFormat::Human, false).contains('\u{1b}'));
    }

    #[test]
    fn traceparent_round_trips_and_bad_values_are_ignored() {
        let provider = SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("operation");
            parent_from_traceparent(&span, Some(stored));
            let _entered = span.enter();
            let child = current_traceparent().expect("a sampled span has a context");
            assert!(
                child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{child}"
            );
            assert!(
                !child.contains("00f067aa0ba902b7"),
                "a new span id: {child}"
            );
            let root = tracing::info_span!(parent: None, "other");
            parent_from_traceparent(&root, Some("00-garbage"));
            let _entered = root.enter();
            let own = current_traceparent().unwrap();
            assert!(!own.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{own}");
        });
        // Without the layer nothing is stored.
        assert_eq!(current_traceparent(), None);
    }
}
