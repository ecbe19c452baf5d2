//! gRPC services: request validation, domain ↔ proto mapping, errors as `Status`. This and
//! `server` are the only modules that know about tonic.

pub mod audit;
pub mod authz;
pub mod backup_ops;
pub mod backups;
pub mod convert;
pub mod error;
pub mod health;
pub mod instances;
pub mod lifecycle;
pub mod observe;
pub mod operations;
pub mod page_token;
pub mod streams;
pub mod update;

use std::sync::Arc;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::domain::spec::DomainRules;
use crate::domain::{Environment, ScaleBounds};
use crate::store::StateStore;
use crate::workflow::EventBus;

pub use error::{ApiError, ApiResult};
pub use page_token::PageTokens;

/// A new operation for the current call: its id goes on the call's span (`operation_id`),
/// and the call's trace context is kept on it, so the replica that runs the operation
/// continues the caller's trace.
pub(crate) fn new_operation(
    verb: crate::domain::Verb,
    target: crate::domain::InstanceName,
    steps: Vec<crate::domain::Step>,
    request_id: Option<crate::domain::RequestId>,
    now: crate::domain::Timestamp,
) -> crate::domain::Operation {
    let mut operation = crate::domain::Operation::new(verb, target, steps, request_id, now);
    operation.trace_parent = crate::telemetry::current_traceparent();
    tracing::Span::current().record("operation_id", operation.id.as_str());
    operation
}

/// Settings the API layer needs from the configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub scale_bounds: ScaleBounds,
    pub idempotency_ttl_secs: u64,
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Largest request message accepted (bigger ones: RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE).
    pub max_request_bytes: usize,
    /// Server streams (WatchOperation, WatchInstance) one replica keeps open at once; past
    /// it a new one is refused with RESOURCE_EXHAUSTED (TOO_MANY_STREAMS).
    pub max_streams: usize,
    /// How often a stream's feed re-reads the store: bounds the delay of events written by
    /// another replica (this replica's own come from its bus at once).
    pub watch_poll: std::time::Duration,
    /// CheckInstanceHealth's time limits.
    pub health: crate::health::HealthSettings,
    /// Task-count bounds of environments that set their own (others use `scale_bounds`).
    pub environment_scale_bounds: Vec<(Environment, ScaleBounds)>,
    /// The custom-domain rules of each configured environment (its platform's `domain` and
    /// `custom_domains_limit()`); others use [`DomainRules::default`].
    pub environment_domains: Vec<(Environment, DomainRules)>,
    /// How long the new tasks of a scale or update may take to be steady and healthy before
    /// the rollout is rolled back.
    pub rollout_timeout: std::time::Duration,
    /// How long a new backup is kept: its `expire_at` is its creation time plus this.
    pub backup_retention: std::time::Duration,
    /// QueryLogs' and TailLogs' tuning.
    pub logs: crate::logs::LogSettings,
    /// The repositories `wordpress_image` may name (CreateInstance, UpdateInstance).
    pub images: crate::domain::ImagePolicy,
    /// How long an audit event is kept.
    pub audit_retention: std::time::Duration,
}

impl ApiSettings {
    /// The task-count bounds in `environment`.
    pub fn scale_bounds_for(&self, environment: Environment) -> ScaleBounds {
        self.environment_scale_bounds
            .iter()
            .find(|(env, _)| *env == environment)
            .map_or(self.scale_bounds, |(_, bounds)| *bounds)
    }

    /// The custom-domain rules in `environment`.
    pub fn domain_rules_for(&self, environment: Environment) -> DomainRules {
        self.environment_domains
            .iter()
            .find(|(env, _)| *env == environment)
            .map_or_else(DomainRules::default, |(_, rules)| rules.clone())
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            scale_bounds: ScaleBounds::default(),
            idempotency_ttl_secs: 24 * 60 * 60,
            default_page_size: 50,
            max_page_size: 1000,
            max_request_bytes: 1024 * 1024,
            max_streams: 1000,
            watch_poll: std::time::Duration::from_millis(250),
            environment_scale_bounds: Vec::new(),
            environment_domains: Vec::new(),
            rollout_timeout: std::time::Duration::from_secs(15 * 60),
            backup_retention: std::time::Duration::from_secs(
                backup_ops::DEFAULT_RETENTION_DAYS * 24 * 60 * 60,
            ),
            health: crate::health::HealthSettings::default(),
            logs: crate::logs::LogSettings::default(),
            images: crate::domain::ImagePolicy::default(),
            audit_retention: std::time::Duration::from_secs(
                audit::DEFAULT_RETENTION_DAYS * 24 * 60 * 60,
            ),
        }
    }
}

/// Shared state of the gRPC services.
#[derive(Clone)]
pub struct Api {
    pub store: Arc<dyn StateStore>,
    pub settings: ApiSettings,
    pub tokens: PageTokens,
    /// Local operation events (watchers also read the store, for other replicas' events).
    pub bus: EventBus,
    /// Wakes this replica's workflow engine when a new operation is written.
    pub wake: Arc<Notify>,
    /// Cancelled when the server shuts down: open streams end.
    pub shutdown: CancellationToken,
    /// Environments that can be served; `None` when no environment is configured (then
    /// operations are accepted and wait until a replica with environments runs them).
    pub environments: Option<Arc<std::sync::RwLock<Vec<Environment>>>>,
    /// One store reader per watched operation, shared by its watchers.
    pub feeds: streams::OperationFeeds,
    /// Open server streams, at most `settings.max_streams`.
    pub streams: Arc<Semaphore>,
    /// The environments' adapters, for the reads that look at the cloud directly
    /// (CheckInstanceHealth); `None`: such RPCs answer UNAVAILABLE.
    pub clouds: Option<Arc<dyn crate::health::CloudEnvs>>,
}

impl Api {
    pub fn new(store: Arc<dyn StateStore>, settings: ApiSettings, tokens: PageTokens) -> Self {
        Self {
            store,
            streams: Arc::new(Semaphore::new(settings.max_streams)),
            feeds: streams::OperationFeeds::default(),
            settings,
            tokens,
            bus: EventBus::new(),
            wake: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
            environments: None,
            clouds: None,
        }
    }

    /// Gives the API the environments' adapters (see [`Api::clouds`]).
    pub fn with_clouds(mut self, clouds: Arc<dyn crate::health::CloudEnvs>) -> Self {
        self.clouds = Some(clouds);
        self
    }

    pub fn with_engine(mut self, bus: EventBus, wake: Arc<Notify>) -> Self {
        self.bus = bus;
        self.wake = wake;
        self
    }

    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub fn with_environments(self, environments: Vec<Environment>) -> Self {
        self.with_served_environments(Arc::new(std::sync::RwLock::new(environments)))
    }

    /// Serves the environments in `served`, which the server updates as environments are
    /// re-verified (one that failed at start-up is served once it verifies).
    pub fn with_served_environments(
        mut self,
        served: Arc<std::sync::RwLock<Vec<Environment>>>,
    ) -> Self {
        self.environments = Some(served);
        self
    }

    /// AIP-158 page size: negative is invalid, zero means the default, above the maximum
    /// is lowered to it.
    pub fn page_size(&self, requested: i32) -> ApiResult<usize> {
        let size = match requested {
            n if n < 0 => return Err(ApiError::invalid("page_size", "must not be negative")),
            0 => self.settings.default_page_size,
            n => u32::try_from(n)
                .unwrap_or(u32::MAX)
                .min(self.settings.max_page_size),
        };
        Ok(size as usize)
    }

    /// Decodes a page token for `query`, or `None` for the first page.
    pub fn page_cursor<C: serde::de::DeserializeOwned>(
        &self,
        query: &str,
        token: &str,
    ) -> ApiResult<Option<C>> {
        if token.is_empty() {
            return Ok(None);
        }
        self.tokens.decode(query, token).map(Some).map_err(|e| {
            let mut violations = crate::domain::Violations::new();
            violations.add("page_token", e.to_string());
            ApiError::InvalidWithReason {
                reason: error::reason::INVALID_PAGE_TOKEN,
                violations,
            }
        })
    }
}
