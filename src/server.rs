//! Server wiring: the API services, `grpc.health.v1`, reflection (v1 and v1alpha, since
//! grpcurl 1.8 speaks only v1alpha), gRPC-Web for browsers on the same port (with a CORS
//! allow-list of origins), a span per RPC carrying a request id, and graceful shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use std::sync::Arc;

use tracing::Instrument;

use crate::api::{Api, ApiSettings, PageTokens};
use crate::cloud::{self, accounts::Accounts};
use crate::config::Config;
use crate::proto;
use crate::proto::google_longrunning::operations_server::OperationsServer;
use crate::proto::v1::instance_service_server::InstanceServiceServer;
use crate::store::{DynamoStore, StateStore};
use crate::workflow::failpoints::Failpoints;
use crate::workflow::{Engine, EngineSettings, EventBus};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid failpoints: {0}")]
    Failpoints(String),
    #[error("cannot build reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Service names whose health is reported, besides the overall "" entry.
const SERVICE_NAMES: [&str; 2] = [
    "bbws.instance.v1.InstanceService",
    "google.longrunning.Operations",
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Marks the server SERVING once the state store answers; until then health says
/// NOT_SERVING, so a load balancer sends no traffic to a replica that cannot work.
async fn become_ready(api: Api, reporter: HealthReporter, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        match api.store.ping().await {
            Ok(()) => {
                if !shutdown.is_cancelled() {
                    set_health(&reporter, ServingStatus::Serving).await;
                    tracing::info!("ready: state store reachable");
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "state store not ready"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The span of one call. Without a usable `x-request-id` the request id is left empty
/// here: [`crate::request_id::RequestIdLayer`] generates one, puts it into the request for
/// the handlers and the audit trail, and records it on this span. A call that starts an
/// operation records its id (`operation_id`). When spans are exported, a caller's W3C
/// `traceparent` makes this span a child of the caller's.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        method = %request.uri().path(),
        request_id = tracing::field::Empty,
        principal = tracing::field::Empty,
        operation_id = tracing::field::Empty
    );
    if let Some(id) = crate::request_id::usable(request.headers().get(crate::request_id::HEADER)) {
        span.record("request_id", id);
    }
    crate::telemetry::extract_parent(&span, request.headers());
    span
}

/// Turns Nagle's algorithm off on an accepted connection. With it on, a response larger
/// than one write (a page of instances) waits for the client's delayed ACK, ~40 ms on Linux,
/// before its last frames leave (measured by `make bench`, benches/unary_api.rs).
pub(crate) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// Serves until `shutdown` is cancelled, with gRPC-Web open to no browser origin and
/// authentication disabled (tests that are not about either; see [`serve_with`]).
pub async fn serve(
    api: Api,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    serve_with(api, listener, shutdown, grace, &ServeOptions::default()).await
}

/// Serves until `shutdown` is cancelled. Health turns NOT_SERVING at once; in-flight calls
/// and open streams then get `grace` to finish before the server stops regardless.
///
/// The port speaks native gRPC (HTTP/2) and gRPC-Web (HTTP/1.1 or HTTP/2,
/// `application/grpc-web[-text][+proto]`), so the Admin Portal's browsers call the same
/// services as every other client.
pub async fn serve_with(
    api: Api,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
    options: &ServeOptions,
) -> Result<(), ServeError> {
    let web = &options.web;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::GOOGLE_RPC_FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let local = listener.local_addr().ok();
    tokio::spawn(tracing::Instrument::instrument(
        become_ready(api.clone(), reporter.clone(), shutdown.clone()),
        tracing::info_span!("readiness"),
    ));

    let stopping = {
        let reporter = reporter.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            set_health(&reporter, ServingStatus::NotServing).await;
            tracing::info!(
                grace_secs = grace.as_secs_f64(),
                "shutting down: draining calls and streams"
            );
        }
    };
    let max_request_bytes = api.settings.max_request_bytes;
    let router = Server::builder()
        // gRPC-Web from browsers comes over HTTP/1.1 as well as HTTP/2.
        .accept_http1(true)
        .trace_fn(rpc_span)
        // Outermost: a browser origin that is not allowed gets 403 before anything runs,
        // then CORS answers preflights and marks responses for the allowed ones, then
        // gRPC-Web is translated to gRPC for everything inside.
        .layer(OriginGateLayer::new(web.allowed_origins.clone()))
        .layer(cors_layer(&web.allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        // Every call gets a request id (the client's or a new one) before anything logs it.
        .layer(crate::request_id::RequestIdLayer)
        // Every call's latency by method and code, refused ones included.
        .layer(crate::rpc_metrics::RpcMetricsLayer::new(
            options.metrics.clone(),
            crate::rpc_metrics::served_methods(&[
                proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ]),
        ))
        // Who is calling: a principal for every call but health and reflection, or
        // UNAUTHENTICATED before any handler runs.
        .layer(crate::auth::AuthLayer::new(options.auth.clone()))
        // Statuses tonic answers before a handler runs (too large, undecodable, unknown
        // method) get ErrorInfo like every other error.
        .layer(tower::util::MapResponseLayer::new(
            move |response: http::Response<tonic::body::Body>| {
                crate::api::error::add_error_info(response, max_request_bytes)
            },
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            InstanceServiceServer::new(api.clone()).max_decoding_message_size(max_request_bytes),
        )
        .add_service(OperationsServer::new(api).max_decoding_message_size(max_request_bytes));
    let tls = options.tls.is_some();
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match &options.tls {
        Some(tls) => Box::pin(
            router.serve_with_incoming_shutdown(tls.incoming(listener, shutdown.clone()), stopping),
        ),
        None => Box::pin(router.serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |accepted| {
                accepted.inspect(no_delay)
            }),
            stopping,
        )),
    };
    match local {
        // Tests and scripts that listen on port 0 read the bound address from this line.
        Some(address) => tracing::info!(%address, tls, "serving gRPC"),
        None => tracing::info!(tls, "serving gRPC"),
    }

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over: closing remaining calls and streams");
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

/// How the server meets its callers: browsers (gRPC-Web), authentication and TLS, and
/// where its RPC latencies go.
#[derive(Clone)]
pub struct ServeOptions {
    pub web: WebSettings,
    pub auth: Arc<crate::auth::Authenticator>,
    /// TLS (and mutual TLS) on the port; `None`: plain text.
    pub tls: Option<Arc<crate::tls::TlsServer>>,
    /// Where RPC latencies go (`im_rpc_duration_seconds`); `None`: not measured.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for ServeOptions {
    /// No browser origin, authentication disabled.
    fn default() -> Self {
        Self {
            web: WebSettings::default(),
            auth: Arc::new(crate::auth::Authenticator::disabled()),
            tls: None,
            metrics: None,
        }
    }
}

impl ServeOptions {
    /// From the configuration; an `[auth]` that configures no way to authenticate (and
    /// does not disable it) is refused, and so are TLS files that do not load.
    pub fn from_config(config: &Config) -> Result<Self, ServeError> {
        let auth = crate::auth::Authenticator::from_config(&config.auth)?;
        if auth.is_disabled() {
            tracing::warn!(
                "AUTHENTICATION IS DISABLED: every caller is an admin of every tenant; never run a shared or production server like this"
            );
        }
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(crate::tls::TlsServer::from_config(tls)?)),
            None => None,
        };
        Ok(Self {
            web: WebSettings::from_config(config),
            auth: Arc::new(auth),
            tls,
            metrics: None,
        })
    }
}

/// Browser access (gRPC-Web) settings of the server.
#[derive(Debug, Clone, Default)]
pub struct WebSettings {
    /// Origins (`scheme://host[:port]`) whose pages may call the API. A request carrying an
    /// `Origin` header that is not listed is refused with HTTP 403; requests without one
    /// (native gRPC clients, gRPC-Web from non-browser programs) are not affected.
    pub allowed_origins: Vec<http::HeaderValue>,
}

impl WebSettings {
    /// From the configuration's `cors_allowed_origins` (validated by `Config::validate`).
    pub fn from_config(config: &Config) -> Self {
        Self {
            allowed_origins: config
                .cors_allowed_origins
                .iter()
                .filter_map(|origin| http::HeaderValue::from_str(origin).ok())
                .collect(),
        }
    }
}

/// Request headers a gRPC-Web client sends (asked for in a preflight).
const GRPC_WEB_REQUEST_HEADERS: [&str; 7] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "authorization",
    "x-request-id",
];

/// Response headers a browser script must be allowed to read: the status travels in them
/// when the response has no body (trailers-only).
const GRPC_WEB_EXPOSED_HEADERS: [&str; 3] =
    ["grpc-status", "grpc-message", "grpc-status-details-bin"];

fn cors_layer(allowed: &[http::HeaderValue]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed.iter().cloned()))
        .allow_methods([http::Method::POST])
        .allow_headers(GRPC_WEB_REQUEST_HEADERS.map(http::HeaderName::from_static))
        .expose_headers(GRPC_WEB_EXPOSED_HEADERS.map(http::HeaderName::from_static))
        // Browsers cap the preflight cache (Chromium at 2 h).
        .max_age(Duration::from_secs(2 * 60 * 60))
}

/// Refuses (HTTP 403, nothing run) a request whose `Origin` is not in the allow-list. CORS
/// alone only keeps a browser from reading the answer; this also keeps a page of another
/// origin from starting a mutating call at all.
#[derive(Debug, Clone)]
struct OriginGateLayer {
    allowed: Arc<[http::HeaderValue]>,
}

impl OriginGateLayer {
    fn new(allowed: Vec<http::HeaderValue>) -> Self {
        Self {
            allowed: allowed.into(),
        }
    }
}

impl<S> tower::Layer<S> for OriginGateLayer {
    type Service = OriginGate<S>;
    fn layer(&self, inner: S) -> OriginGate<S> {
        OriginGate {
            inner,
            allowed: self.allowed.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct OriginGate<S> {
    inner: S,
    allowed: Arc<[http::HeaderValue]>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for OriginGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<futures::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(origin) = request.headers().get(http::header::ORIGIN)
            && !self.allowed.contains(origin)
        {
            let shown =
                crate::api::error::bounded(&String::from_utf8_lossy(origin.as_bytes()), 256);
            tracing::info!(origin = %shown, path = %request.uri().path(), "refused: origin not allowed");
            let mut response = http::Response::new(ResBody::default());
            *response.status_mut() = http::StatusCode::FORBIDDEN;
            return futures::future::Either::Left(futures::future::ready(Ok(response)));
        }
        futures::future::Either::Right(self.inner.call(request))
    }
}

/// Everything a replica runs, from its configuration: the state store, the environments'
/// accounts (verified; a broken one is reported by name and not served), the workflow
/// engine, the gRPC server on `listener` and, given `metrics`, `GET /metrics` there. Returns
/// once `shutdown` is cancelled and both have stopped (the engine at most
/// `shutdown_grace_secs` later).
pub async fn run(
    config: &Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut options = ServeOptions::from_config(config)?;
    let tokens = if config.page_token_secret.is_empty() {
        tracing::warn!(
            "no page_token_secret configured: page tokens are valid only in this process"
        );
        PageTokens::random()
    } else {
        PageTokens::new(config.page_token_secret.expose().as_bytes())
    };
    let control_plane = cloud::control_plane_sdk_config(&config.cloud_settings()).await;
    let store: Arc<dyn StateStore> = Arc::new(DynamoStore::new(
        cloud::aws::traced_client!(aws_sdk_dynamodb, &control_plane),
        config.table.clone(),
    ));
    let accounts = Arc::new(Accounts::with_control_plane(&control_plane, config).await);
    for (environment, outcome) in accounts.verify().await {
        if let Err(reason) = outcome {
            tracing::error!(%environment, %reason, "environment not served");
        }
    }
    let failpoints = Failpoints::parse(&config.failpoints).map_err(ServeError::Failpoints)?;
    let bus = EventBus::new();
    let settings = EngineSettings::from_config(config);
    let engine = if failpoints.is_empty() {
        Engine::new(store.clone(), accounts.clone(), settings, bus.clone())
    } else {
        tracing::warn!(failpoints = ?config.failpoints, "FAILPOINTS ARE SET: steps will fail or pause on purpose");
        Engine::with_hook(
            store.clone(),
            accounts.clone(),
            settings,
            bus.clone(),
            Arc::new(failpoints),
        )
    };
    options.metrics = Some(engine.metrics());
    let mut api = Api::new(
        store,
        ApiSettings {
            scale_bounds: config.scale_bounds,
            idempotency_ttl_secs: config.idempotency_ttl_secs,
            default_page_size: config.default_page_size,
            max_page_size: config.max_page_size,
            max_request_bytes: config.max_request_bytes,
            max_streams: config.max_streams,
            watch_poll: Duration::from_millis(config.watch_poll_ms),
            environment_scale_bounds: config
                .environments
                .iter()
                .filter_map(|env| env.scale_bounds.map(|bounds| (env.name, bounds)))
                .collect(),
            environment_domains: config
                .environments
                .iter()
                .map(|env| (env.name, env.platform.domain_rules()))
                .collect(),
            rollout_timeout: Duration::from_secs(config.rollout_timeout_secs),
            backup_retention: Duration::from_secs(
                u64::from(config.backup_retention_days) * 24 * 60 * 60,
            ),
            health: crate::health::HealthSettings::from_config(config),
            logs: crate::logs::LogSettings::from_config(config),
            images: config.image_policy(),
            audit_retention: Duration::from_secs(
                u64::from(config.audit_retention_days) * 24 * 60 * 60,
            ),
        },
        tokens,
    )
    .with_engine(bus, engine.waker())
    .with_shutdown(shutdown.clone())
    .with_clouds(accounts.clone());
    if !config.environments.is_empty() {
        let served = Arc::new(std::sync::RwLock::new(accounts.served()));
        api = api.with_served_environments(served.clone());
        tokio::spawn(recheck_environments(
            accounts.clone(),
            served,
            Duration::from_secs(ENVIRONMENT_RECHECK_SECS),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "serving metrics at /metrics");
        }
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) =
                crate::metrics::serve(listener, move || engine.render_metrics(), shutdown).await
            {
                tracing::error!(%error, "metrics endpoint stopped");
            }
        });
    }
    if !config.environments.is_empty() {
        let sweeper =
            crate::retention::Sweeper::new(api.store.clone(), accounts.clone(), engine.metrics());
        tokio::spawn(
            sweeper
                .run(
                    Duration::from_secs(config.backup_sweep_interval_secs),
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("retention")),
        );
    }
    if config.reconcile_interval_secs > 0 && !config.environments.is_empty() {
        let reconciler = crate::reconcile::Reconciler::new(
            api.store.clone(),
            accounts.clone(),
            engine.clone(),
            config.environments.iter().map(|env| env.name).collect(),
            crate::reconcile::ReconcileSettings::from_config(config),
        );
        tokio::spawn(
            reconciler
                .run(
                    Duration::from_secs(config.reconcile_interval_secs),
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("reconcile")),
        );
    }
    let engine_task = tokio::spawn(
        engine
            .run(shutdown.clone())
            .instrument(tracing::info_span!("engine")),
    );
    serve_with(api, listener, shutdown, grace, &options).await?;
    if tokio::time::timeout(grace, engine_task).await.is_err() {
        tracing::warn!("workflow engine did not stop within the grace period");
    }
    Ok(())
}

/// How often environments that failed verification are checked again.
const ENVIRONMENT_RECHECK_SECS: u64 = 60;

/// Verifies the environments again while any is unavailable, so that one that failed at
/// start-up (credentials, network) is served again without a restart.
pub async fn recheck_environments(
    accounts: Arc<Accounts>,
    served: Arc<std::sync::RwLock<Vec<crate::domain::Environment>>>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let configured = accounts.configured();
        let now_served = {
            let current = served
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            current.len()
        };
        if now_served == configured.len() {
            continue;
        }
        accounts.verify().await;
        let available = accounts.served();
        tracing::info!(served = ?available, "environments re-checked");
        *served
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = available;
    }
}
