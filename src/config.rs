//! Typed configuration, layered: defaults, then a TOML file, then `IM_*` environment
//! variables, then command-line flags (clap gives flags precedence over the environment).
//! `--dump-config` prints the result with secrets redacted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cloud::settings::{CloudSettings, DbTimeouts, SdkTimeouts, SessionSettings};
use crate::domain::ScaleBounds;

// The environment settings are the cloud layer's plain data; configuration files hold them
// as they are.
pub use crate::cloud::settings::{EnvironmentConfig, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The whole configuration of a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// DynamoDB table holding all state.
    pub table: String,
    /// AWS endpoint override (an emulator such as moto); unset in production.
    pub aws_endpoint: Option<String>,
    /// AWS region of the control plane's own account (DynamoDB); unset: the SDK's default.
    pub aws_region: Option<String>,
    pub log_format: LogFormat,
    /// `tracing` filter directives, e.g. `info` or `instance_manager=debug,info`.
    pub log_filter: String,
    /// Key that signs list page tokens. Replicas behind one load balancer must share it;
    /// when empty a random key is made at start, and tokens do not survive a restart.
    pub page_token_secret: Secret,
    /// How long a `request_id` is remembered for idempotent replays.
    pub idempotency_ttl_secs: u64,
    /// How long open streams may take to drain after the first shutdown signal.
    pub shutdown_grace_secs: u64,
    /// Bounds on an instance's desired task count.
    pub scale_bounds: ScaleBounds,
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// Server streams one replica keeps open at once.
    pub max_streams: usize,
    /// How often a server stream's feed re-reads the store: the delay of events written by
    /// another replica, against one read per watched operation per interval (whatever the
    /// number of watchers).
    pub watch_poll_ms: u64,
    /// This replica's name (lease owner); defaults to host name and process id.
    pub replica_id: String,
    /// Prefix of the unified tag keys (`{prefix}:tenant-id`, …).
    pub tag_prefix: String,
    /// Value of the `{prefix}:project` tag.
    pub project: String,
    /// Operations one replica runs at once.
    pub workers: u32,
    /// How long a claimed operation stays leased without renewal.
    pub lease_secs: u64,
    /// How often idle workers look for runnable operations.
    pub poll_interval_ms: u64,
    /// Where `GET /metrics` (Prometheus text format) is served; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Length of the role sessions assumed in each environment's account.
    pub role_session_secs: u64,
    /// How long before a role session expires it is assumed again.
    pub role_refresh_margin_secs: u64,
    /// How long one attempt of a provisioning may run before it ends STUCK.
    pub provision_deadline_secs: u64,
    /// How long one attempt of a deprovisioning may run before it ends STUCK.
    pub deprovision_deadline_secs: u64,
    /// How long the new tasks of a scale or update may take to be steady and healthy
    /// before the rollout is rolled back (the operation ends FAILED).
    pub rollout_timeout_secs: u64,
    /// How long a backup is kept before the retention sweeper removes it (1..=3650).
    pub backup_retention_days: u32,
    /// How often each replica looks for expired backups to remove.
    pub backup_sweep_interval_secs: u64,
    /// How often each replica's reconciler looks for orphans, drift and stale operations;
    /// 0 turns the reconciler off.
    pub reconcile_interval_secs: u64,
    /// Whether the reconciler removes the orphans it finds (otherwise it only reports them).
    pub reconcile_remove_orphans: bool,
    /// How young a resource (where its kind tells its creation time) may be and still not
    /// count as an orphan.
    pub orphan_grace_secs: u64,
    /// How long after its lease expired an unfinished operation that nobody resumed (no
    /// step or event since) is ended STUCK by the reconciler.
    pub stuck_after_secs: u64,
    /// How long an audit event is kept (1..=3650); DynamoDB's TTL removes it afterwards.
    pub audit_retention_days: u32,
    /// AWS SDK: time to establish a connection.
    pub aws_connect_timeout_secs: u64,
    /// AWS SDK: time for one attempt of a call (request and response); the SDK retries a
    /// timed-out attempt.
    pub aws_attempt_timeout_secs: u64,
    /// AWS SDK: time for a whole call, retries included.
    pub aws_operation_timeout_secs: u64,
    /// MySQL: time to connect and log in to an environment's server.
    pub db_connect_timeout_secs: u64,
    /// MySQL: how long a statement waits for a metadata or row lock (`lock_wait_timeout`,
    /// `innodb_lock_wait_timeout`).
    pub db_lock_wait_timeout_secs: u64,
    /// MySQL: how long one statement may run (MariaDB `max_statement_time`; MySQL
    /// `max_execution_time`, SELECTs only). The client gives up a few seconds later.
    pub db_statement_timeout_secs: u64,
    /// CheckInstanceHealth: the whole report (its checks run in parallel) is bounded by this.
    pub health_timeout_ms: u64,
    /// CheckInstanceHealth: one check (AWS calls, the database login, the HTTP probe); a
    /// check that takes longer is UNHEALTHY, "timed out".
    pub health_check_timeout_ms: u64,
    /// TailLogs: how often a following tail polls the log store.
    pub tail_poll_interval_ms: u64,
    /// TailLogs: how late (behind the newest line sent) a line may reach the log store and
    /// still be tailed.
    pub tail_lookback_secs: u64,
    /// TailLogs: lines per log-store call, and so at most per streamed message (1..=10000).
    pub tail_page_events: u32,
    /// TailLogs: messages kept ready for a client that is not reading; past them the tail
    /// stops polling until the client reads (memory stays bounded).
    pub tail_buffer: usize,
    /// Deliberate faults for tests (`STEP=pause|error|error-after`); never set in production.
    pub failpoints: Vec<String>,
    /// Browser origins allowed to call the API with gRPC-Web, exactly as browsers send them
    /// in `Origin`: `scheme://host[:port]`, lower case, no path. A request with any other
    /// `Origin` is refused (HTTP 403); requests without one (native gRPC, non-browser
    /// gRPC-Web clients) are unaffected. Empty (the default): no browser may call.
    pub cors_allowed_origins: Vec<String>,
    /// Who may call the API (`[auth]`): static tokens, or explicitly none.
    pub auth: crate::auth::AuthConfig,
    /// TLS on the gRPC port (`[tls]`); absent: plain text.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Trace export (`[tracing]`): OTLP over gRPC, off unless an endpoint is set.
    pub tracing: TracingConfig,
    /// Repositories (or repository prefixes, compared on whole path segments) that an
    /// instance's `wordpress_image` may name, e.g. `docker.io/library/wordpress` or
    /// `123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws`. Docker Hub names are normalised
    /// (`wordpress` is `docker.io/library/wordpress`). Anything else is INVALID_ARGUMENT.
    pub allowed_image_repositories: Vec<String>,
    pub environments: Vec<EnvironmentConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            table: "instance-manager".into(),
            aws_endpoint: None,
            aws_region: None,
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            page_token_secret: Secret::default(),
            idempotency_ttl_secs: 24 * 60 * 60,
            shutdown_grace_secs: 10,
            scale_bounds: ScaleBounds::default(),
            default_page_size: 50,
            max_page_size: 1000,
            max_request_bytes: 1024 * 1024,
            max_streams: 1000,
            watch_poll_ms: 250,
            replica_id: String::new(),
            tag_prefix: "bbws".into(),
            project: "bbws-wordpress".into(),
            workers: 10,
            lease_secs: 30,
            poll_interval_ms: 500,
            metrics_listen: None,
            role_session_secs: 60 * 60,
            role_refresh_margin_secs: 5 * 60,
            provision_deadline_secs: 30 * 60,
            deprovision_deadline_secs: 20 * 60,
            rollout_timeout_secs: 15 * 60,
            backup_retention_days: 90,
            backup_sweep_interval_secs: 60 * 60,
            reconcile_interval_secs: 5 * 60,
            reconcile_remove_orphans: false,
            orphan_grace_secs: 60 * 60,
            stuck_after_secs: 60 * 60,
            audit_retention_days: 365,
            aws_connect_timeout_secs: 5,
            aws_attempt_timeout_secs: 30,
            aws_operation_timeout_secs: 120,
            db_connect_timeout_secs: 5,
            db_lock_wait_timeout_secs: 30,
            db_statement_timeout_secs: 300,
            health_timeout_ms: 5000,
            health_check_timeout_ms: 4000,
            tail_poll_interval_ms: 1000,
            tail_lookback_secs: 300,
            tail_page_events: 500,
            tail_buffer: 8,
            failpoints: Vec::new(),
            cors_allowed_origins: Vec::new(),
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            tracing: TracingConfig::default(),
            allowed_image_repositories: crate::domain::image::DEFAULT_ALLOWED_REPOSITORIES
                .map(str::to_owned)
                .to_vec(),
            environments: Vec::new(),
        }
    }
}

/// The `[tracing]` section: where spans go, how many, and under which service name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, `http://host:4317` (or `https://`, verified against the public
    /// web PKI roots); empty (the default): no spans leave the process and nothing connects.
    pub otlp_endpoint: String,
    /// Share of new traces kept, 0..=1 (1: all). A call that arrives with a W3C
    /// `traceparent` follows its caller's decision instead.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: "instance-manager".into(),
        }
    }
}

impl TracingConfig {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "tracing.sample_ratio must be between 0 and 1, got {}",
                self.sample_ratio
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("tracing.service_name must not be empty".into());
        }
        if self.enabled() {
            check_otlp_endpoint(&self.otlp_endpoint).map_err(|why| {
                format!(
                    "tracing.otlp_endpoint {:?} {why} (expected http://host:port or https://host:port, for example http://otel-collector:4317)",
                    self.otlp_endpoint
                )
            })?;
        }
        Ok(())
    }
}

/// Whether `endpoint` is an absolute `http(s)://host[:port][/]` URI the OTLP exporter can
/// dial (it takes no path for gRPC).
fn check_otlp_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let uri: http::Uri = endpoint.parse().map_err(|_| "is not a URI")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must start with http:// or https://");
    }
    match uri.authority() {
        None => return Err("has no host"),
        Some(authority) if authority.host().is_empty() => return Err("has no host"),
        Some(authority) if authority.as_str().contains('@') => {
            return Err("must not carry credentials");
        }
        Some(authority) => {
            if let Some((_, port)) = authority.as_str().rsplit_once(':')
                && !authority.as_str().ends_with(']')
                && port.parse::<u16>().is_err()
            {
                return Err("has an invalid port");
            }
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must have no path or query (OTLP/gRPC has a fixed path)");
    }
    Ok(())
}

/// Flags shared by every subcommand that needs configuration. Each one can also come from
/// the `IM_*` environment variable named beside it.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "IM_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "IM_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "IM_TABLE")]
    pub table: Option<String>,
    #[arg(long, env = "IM_AWS_ENDPOINT")]
    pub aws_endpoint: Option<String>,
    #[arg(long, env = "IM_AWS_REGION")]
    pub aws_region: Option<String>,
    #[arg(long, env = "IM_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[arg(long, env = "IM_LOG")]
    pub log_filter: Option<String>,
    #[arg(long, env = "IM_PAGE_TOKEN_SECRET", hide_env_values = true)]
    pub page_token_secret: Option<String>,
    #[arg(long, env = "IM_IDEMPOTENCY_TTL_SECS")]
    pub idempotency_ttl_secs: Option<u64>,
    #[arg(long, env = "IM_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    #[arg(long, env = "IM_SCALE_MIN")]
    pub scale_min: Option<u32>,
    #[arg(long, env = "IM_SCALE_MAX")]
    pub scale_max: Option<u32>,
    #[arg(long, env = "IM_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    #[arg(long, env = "IM_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    #[arg(long, env = "IM_WATCH_POLL_MS")]
    pub watch_poll_ms: Option<u64>,
    #[arg(long, env = "IM_REPLICA_ID")]
    pub replica_id: Option<String>,
    #[arg(long, env = "IM_WORKERS")]
    pub workers: Option<u32>,
    #[arg(long, env = "IM_LEASE_SECS")]
    pub lease_secs: Option<u64>,
    /// Address for `GET /metrics` (for example 0.0.0.0:9090).
    #[arg(long, env = "IM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, env = "IM_PROVISION_DEADLINE_SECS")]
    pub provision_deadline_secs: Option<u64>,
    #[arg(long, env = "IM_DEPROVISION_DEADLINE_SECS")]
    pub deprovision_deadline_secs: Option<u64>,
    #[arg(long, env = "IM_ROLLOUT_TIMEOUT_SECS")]
    pub rollout_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_BACKUP_RETENTION_DAYS")]
    pub backup_retention_days: Option<u32>,
    #[arg(long, env = "IM_BACKUP_SWEEP_INTERVAL_SECS")]
    pub backup_sweep_interval_secs: Option<u64>,
    /// Reconciler interval (0: off).
    #[arg(long, env = "IM_RECONCILE_INTERVAL_SECS")]
    pub reconcile_interval_secs: Option<u64>,
    /// Remove the orphans the reconciler finds (`true`/`false`).
    #[arg(long, env = "IM_RECONCILE_REMOVE_ORPHANS")]
    pub reconcile_remove_orphans: Option<bool>,
    #[arg(long, env = "IM_ORPHAN_GRACE_SECS")]
    pub orphan_grace_secs: Option<u64>,
    #[arg(long, env = "IM_STUCK_AFTER_SECS")]
    pub stuck_after_secs: Option<u64>,
    #[arg(long, env = "IM_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    #[arg(long, env = "IM_AWS_CONNECT_TIMEOUT_SECS")]
    pub aws_connect_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_AWS_ATTEMPT_TIMEOUT_SECS")]
    pub aws_attempt_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_AWS_OPERATION_TIMEOUT_SECS")]
    pub aws_operation_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_DB_CONNECT_TIMEOUT_SECS")]
    pub db_connect_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_DB_LOCK_WAIT_TIMEOUT_SECS")]
    pub db_lock_wait_timeout_secs: Option<u64>,
    #[arg(long, env = "IM_DB_STATEMENT_TIMEOUT_SECS")]
    pub db_statement_timeout_secs: Option<u64>,
    /// Deliberate faults for tests, comma separated (`STEP=pause|error|error-after`).
    #[arg(long, env = "IM_FAILPOINTS", value_delimiter = ',')]
    pub failpoints: Option<Vec<String>>,
    /// Browser origins allowed to use gRPC-Web, comma separated
    /// (`https://admin.example.com,http://localhost:8080`); an empty value allows none.
    #[arg(long, env = "IM_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Option<Vec<String>>,
    /// Serve without authentication (every caller is an admin of every tenant); for local
    /// development only. Sets `auth.disabled`.
    #[arg(long = "no-auth", env = "IM_AUTH_DISABLED")]
    pub no_auth: bool,
    /// Repositories `wordpress_image` may name, comma separated
    /// (`docker.io/library/wordpress,123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws`).
    #[arg(long, env = "IM_ALLOWED_IMAGE_REPOSITORIES", value_delimiter = ',')]
    pub allowed_image_repositories: Option<Vec<String>>,
    /// OTLP/gRPC collector for traces (`http://otel-collector:4317`); empty: off.
    #[arg(long, env = "IM_TRACING_OTLP_ENDPOINT")]
    pub tracing_otlp_endpoint: Option<String>,
    /// Share of new traces exported, 0..=1.
    #[arg(long, env = "IM_TRACING_SAMPLE_RATIO")]
    pub tracing_sample_ratio: Option<f64>,
    /// `service.name` of the exported spans.
    #[arg(long, env = "IM_TRACING_SERVICE_NAME")]
    pub tracing_service_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigArgs {
    /// Defaults, then the file, then environment and flags.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => Config::default(),
        };
        macro_rules! overlay {
            ($($field:ident),*) => {$(
                if let Some(value) = &self.$field {
                    config.$field = value.clone().into();
                }
            )*};
        }
        overlay!(listen, table, log_format, log_filter, idempotency_ttl_secs);
        overlay!(max_request_bytes, max_streams, watch_poll_ms);
        overlay!(
            shutdown_grace_secs,
            replica_id,
            workers,
            lease_secs,
            failpoints,
            provision_deadline_secs,
            deprovision_deadline_secs,
            rollout_timeout_secs
        );
        overlay!(
            backup_retention_days,
            backup_sweep_interval_secs,
            audit_retention_days
        );
        overlay!(
            reconcile_interval_secs,
            reconcile_remove_orphans,
            orphan_grace_secs,
            stuck_after_secs
        );
        overlay!(
            aws_connect_timeout_secs,
            aws_attempt_timeout_secs,
            aws_operation_timeout_secs,
            db_connect_timeout_secs,
            db_lock_wait_timeout_secs,
            db_statement_timeout_secs
        );
        if let Some(origins) = &self.cors_allowed_origins {
            // `IM_CORS_ALLOWED_ORIGINS=` (empty) means none.
            config.cors_allowed_origins = origins
                .iter()
                .map(|origin| origin.trim().to_owned())
                .filter(|origin| !origin.is_empty())
                .collect();
        }
        if let Some(endpoint) = &self.aws_endpoint {
            config.aws_endpoint = Some(endpoint.clone());
        }
        if let Some(addr) = self.metrics_listen {
            config.metrics_listen = Some(addr);
        }
        if let Some(region) = &self.aws_region {
            config.aws_region = Some(region.clone());
        }
        if let Some(secret) = &self.page_token_secret {
            config.page_token_secret = Secret::new(secret.clone());
        }
        if self.no_auth {
            config.auth.disabled = true;
        }
        if let Some(repositories) = &self.allowed_image_repositories {
            config.allowed_image_repositories = repositories
                .iter()
                .map(|repository| repository.trim().to_owned())
                .filter(|repository| !repository.is_empty())
                .collect();
        }
        if let Some(endpoint) = &self.tracing_otlp_endpoint {
            config.tracing.otlp_endpoint = endpoint.trim().to_owned();
        }
        if let Some(ratio) = self.tracing_sample_ratio {
            config.tracing.sample_ratio = ratio;
        }
        if let Some(name) = &self.tracing_service_name {
            config.tracing.service_name = name.clone();
        }
        if let Some(min) = self.scale_min {
            config.scale_bounds.min = min;
        }
        if let Some(max) = self.scale_max {
            config.scale_bounds.max = max;
        }
        external_ids_from(&mut config.environments, |name| std::env::var(name).ok());
        config.validate()?;
        Ok(config)
    }
}

/// The variable that gives an environment's `external_id`: `IM_EXTERNAL_ID_PROD`, ….
pub fn external_id_variable(environment: crate::domain::Environment) -> String {
    format!("IM_EXTERNAL_ID_{}", environment.as_str())
}

/// Sets each environment's `external_id` from its variable ([`external_id_variable`]) where
/// that is set and not empty, over the file's: a secret can then stay out of the file (the
/// Helm chart takes it from a Kubernetes Secret).
fn external_ids_from(
    environments: &mut [EnvironmentConfig],
    variable: impl Fn(&str) -> Option<String>,
) {
    for environment in environments {
        if let Some(value) = variable(&external_id_variable(environment.name))
            && !value.is_empty()
        {
            environment.external_id = Secret::new(value);
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.table.is_empty() {
            return invalid("table must not be empty");
        }
        if self.scale_bounds.min == 0 || self.scale_bounds.min > self.scale_bounds.max {
            return invalid("scale_bounds must satisfy 1 <= min <= max");
        }
        if self.default_page_size == 0 || self.default_page_size > self.max_page_size {
            return invalid("page sizes must satisfy 1 <= default_page_size <= max_page_size");
        }
        if self.max_request_bytes < 1024 || self.max_streams == 0 {
            return invalid("max_request_bytes must be at least 1024 and max_streams positive");
        }
        if !(20..=60_000).contains(&self.watch_poll_ms) {
            return invalid("watch_poll_ms must be between 20 and 60000");
        }
        self.auth
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.idempotency_ttl_secs == 0 {
            return invalid("idempotency_ttl_secs must be positive");
        }
        // The rollback of a timed-out rollout needs time inside the 30-minute deadline of a
        // scale or update.
        if self.rollout_timeout_secs == 0 || self.rollout_timeout_secs > 25 * 60 {
            return invalid("rollout_timeout_secs must be between 1 and 1500");
        }
        if !(1..=3650).contains(&self.backup_retention_days) {
            return invalid("backup_retention_days must be between 1 and 3650");
        }
        if !(1..=3650).contains(&self.audit_retention_days) {
            return invalid("audit_retention_days must be between 1 and 3650");
        }
        if self.backup_sweep_interval_secs == 0 {
            return invalid("backup_sweep_interval_secs must be positive");
        }
        // Below a lease's length, an operation whose replica is merely slow to renew would
        // be ended under it.
        if self.stuck_after_secs < self.lease_secs {
            return invalid("stuck_after_secs must be at least lease_secs");
        }
        for environment in &self.environments {
            if let Some(bounds) = environment.scale_bounds
                && (bounds.min == 0 || bounds.min > bounds.max)
            {
                return Err(ConfigError::Invalid(format!(
                    "environments.{}.scale_bounds must satisfy 1 <= min <= max",
                    environment.name
                )));
            }
        }
        if self.workers == 0 || self.lease_secs < 5 || self.poll_interval_ms == 0 {
            return invalid(
                "workers must be positive, lease_secs at least 5, poll_interval_ms positive",
            );
        }
        // STS allows sessions of 15 minutes to 12 hours.
        if !(900..=43_200).contains(&self.role_session_secs)
            || self.role_refresh_margin_secs >= self.role_session_secs
        {
            return invalid(
                "role_session_secs must be 900..=43200 and above role_refresh_margin_secs",
            );
        }
        if self.provision_deadline_secs == 0 || self.deprovision_deadline_secs == 0 {
            return invalid(
                "provision_deadline_secs and deprovision_deadline_secs must be positive",
            );
        }
        if self.aws_connect_timeout_secs == 0
            || self.aws_connect_timeout_secs > self.aws_attempt_timeout_secs
            || self.aws_attempt_timeout_secs > self.aws_operation_timeout_secs
        {
            return invalid(
                "aws timeouts must satisfy 1 <= aws_connect_timeout_secs <= \
                 aws_attempt_timeout_secs <= aws_operation_timeout_secs",
            );
        }
        // The servers' own upper limit of lock_wait_timeout is one year.
        if self.db_connect_timeout_secs == 0
            || !(1..=31_536_000).contains(&self.db_lock_wait_timeout_secs)
            || self.db_statement_timeout_secs == 0
        {
            return invalid(
                "db_connect_timeout_secs and db_statement_timeout_secs must be positive, \
                 db_lock_wait_timeout_secs 1..=31536000",
            );
        }
        if self.health_check_timeout_ms == 0
            || self.health_check_timeout_ms > self.health_timeout_ms
        {
            return invalid(
                "health timeouts must satisfy 1 <= health_check_timeout_ms <= health_timeout_ms",
            );
        }
        if self.tail_poll_interval_ms == 0
            || !(1..=10_000).contains(&self.tail_page_events)
            || self.tail_buffer == 0
        {
            return invalid(
                "tail settings must satisfy tail_poll_interval_ms >= 1, 1 <= tail_page_events <= 10000, tail_buffer >= 1",
            );
        }
        crate::domain::ImagePolicy::new(&self.allowed_image_repositories)
            .map_err(|why| ConfigError::Invalid(format!("allowed_image_repositories: {why}")))?;
        self.tracing.validate().map_err(ConfigError::Invalid)?;
        for origin in &self.cors_allowed_origins {
            if let Err(why) = check_origin(origin) {
                return Err(ConfigError::Invalid(format!(
                    "cors_allowed_origins: {origin:?} {why}"
                )));
            }
        }
        for (i, env) in self.environments.iter().enumerate() {
            if self.environments[..i].iter().any(|e| e.name == env.name) {
                return Err(ConfigError::Invalid(format!(
                    "environment {} is listed twice",
                    env.name
                )));
            }
            if env.platform.db_iam_auth
                && (env.platform.db_instance_identifier.is_empty()
                    || env.platform.db_iam_user.is_empty())
            {
                return Err(ConfigError::Invalid(format!(
                    "environment {}: db_iam_auth needs db_instance_identifier (the endpoint is \
                     read from RDS) and db_iam_user",
                    env.name
                )));
            }
            let pool = &env.platform.load_balancers;
            for (j, lb) in pool.iter().enumerate() {
                let problem = if lb.name.is_empty() {
                    Some("has no name".to_owned())
                } else if pool[..j].iter().any(|other| other.name == lb.name) {
                    Some("is listed twice".to_owned())
                } else if pool[..j].iter().any(|other| {
                    !lb.listener_arn.is_empty() && other.listener_arn == lb.listener_arn
                }) {
                    Some("has the listener of an earlier member".to_owned())
                } else if lb.listener_arn.is_empty() && !env.platform.cluster.is_empty() {
                    // Before `bootstrap --emulate-platform` a member may carry only its
                    // quotas; a platform in use needs every member's listener.
                    Some("has no listener_arn".to_owned())
                } else if lb.max_rules == Some(0) || lb.max_target_groups == Some(0) {
                    Some("allows no rules or no target groups".to_owned())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(ConfigError::Invalid(format!(
                        "environment {}: load balancer {:?} (load_balancers[{j}]) {problem}",
                        env.name, lb.name
                    )));
                }
            }
            if env.account_id.len() != 12 || !env.account_id.chars().all(|c| c.is_ascii_digit()) {
                return Err(ConfigError::Invalid(format!(
                    "environment {}: account_id must be 12 digits",
                    env.name
                )));
            }
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by `<redacted>` (what
    /// [`Secret`] serializes to).
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// The configuration as TOML *with* its secrets' values, for `bootstrap --write-config`
    /// (a file only its owner may read, fed back to `serve --config`). The one place
    /// secrets are written out: everything else serializes them redacted.
    pub fn toml_with_secrets(&self) -> Result<String, ConfigError> {
        let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid(e.to_string());
        let mut table = toml::Table::try_from(self).map_err(|e| invalid(&e))?;
        let exposed = |secret: &Secret| toml::Value::String(secret.expose().to_owned());
        if !self.page_token_secret.is_empty() {
            table.insert("page_token_secret".into(), exposed(&self.page_token_secret));
        }
        if let Some(toml::Value::Array(environments)) = table.get_mut("environments") {
            for (shown, environment) in environments.iter_mut().zip(&self.environments) {
                if let (Some(shown), false) =
                    (shown.as_table_mut(), environment.external_id.is_empty())
                {
                    shown.insert("external_id".into(), exposed(&environment.external_id));
                }
            }
        }
        toml::to_string_pretty(&table).map_err(|e| invalid(&e))
    }

    /// The allow-list of WordPress image repositories (validated by [`Config::validate`]; an
    /// invalid list allows nothing).
    pub fn image_policy(&self) -> crate::domain::ImagePolicy {
        crate::domain::ImagePolicy::new(&self.allowed_image_repositories)
            .unwrap_or_else(|_| crate::domain::ImagePolicy::nothing())
    }

    /// What the cloud layer takes from this configuration.
    pub fn cloud_settings(&self) -> CloudSettings {
        CloudSettings {
            aws_endpoint: self.aws_endpoint.clone(),
            aws_region: self.aws_region.clone(),
            replica: self.replica_id(),
            session: SessionSettings {
                length: Duration::from_secs(self.role_session_secs),
                refresh_margin: Duration::from_secs(self.role_refresh_margin_secs),
            },
            sdk_timeouts: SdkTimeouts {
                connect: Duration::from_secs(self.aws_connect_timeout_secs),
                attempt: Duration::from_secs(self.aws_attempt_timeout_secs),
                operation: Duration::from_secs(self.aws_operation_timeout_secs),
            },
            db_timeouts: DbTimeouts {
                connect: Duration::from_secs(self.db_connect_timeout_secs),
                lock_wait: Duration::from_secs(self.db_lock_wait_timeout_secs),
                statement: Duration::from_secs(self.db_statement_timeout_secs),
            },
            environments: self.environments.clone(),
        }
    }

    /// The replica id, or `{hostname}-{pid}` when none is configured.
    pub fn replica_id(&self) -> String {
        if !self.replica_id.is_empty() {
            return self.replica_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "replica".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Whether `origin` is one a browser can send in `Origin`: `http(s)://host[:port]`, lower
/// case (browsers serialise origins so, and they are compared byte for byte), nothing after.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return Err("must start with https:// or http://");
    };
    if rest.is_empty() || rest.starts_with(':') {
        return Err("has no host");
    }
    if rest.contains(['/', '?', '#', '@']) {
        return Err("must be scheme://host[:port] with no path, query or user (no trailing /)");
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:[]".contains(c))
    {
        return Err("may hold only lower-case letters, digits, '-', '.', ':' and brackets");
    }
    if let Some((_, port)) = rest.rsplit_once(':')
        && !rest.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err("has an invalid port");
    }
    Ok(())
}

impl From<&Config> for CloudSettings {
    fn from(config: &Config) -> Self {
        config.cloud_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "table = \"from-file\"\nlisten = \"127.0.0.1:6000\"\npage_token_secret = \"s3cr3t\"\n[scale_bounds]\nmin = 1\nmax = 20\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..ConfigArgs::default()
        };
        let config = args.load().unwrap();
        assert_eq!(config.table, "from-file");
        assert_eq!(config.listen.port(), 7000, "flags beat the file");
        assert_eq!(config.scale_bounds, ScaleBounds { min: 1, max: 20 });
        assert_eq!(config.log_filter, "info", "defaults fill the rest");
        let dump = config.redacted_toml();
        assert!(!dump.contains("s3cr3t"), "{dump}");
        assert!(dump.contains("<redacted>"));
        assert!(!format!("{config:?}").contains("s3cr3t"));
        assert!(!serde_json::to_string(&config).unwrap().contains("s3cr3t"));
    }

    #[test]
    fn only_the_written_config_holds_the_secrets_and_reads_back() {
        let config: Config = toml::from_str(
            "page_token_secret = \"tok-s3cr3t\"\n[[environments]]\nname = \"DEV\"\naccount_id = \"111122223333\"\nregion = \"eu-west-1\"\nexternal_id = \"ext-s3cr3t\"\n[[environments]]\nname = \"SIT\"\naccount_id = \"111122223334\"\nregion = \"eu-west-1\"\n",
        )
        .unwrap();
        let dump = config.redacted_toml();
        assert!(!dump.contains("s3cr3t"), "{dump}");
        let written = config.toml_with_secrets().unwrap();
        assert!(written.contains("tok-s3cr3t") && written.contains("ext-s3cr3t"));
        let read: Config = toml::from_str(&written).unwrap();
        assert_eq!(read, config, "{written}");
        assert!(read.environments[1].external_id.is_empty());
    }

    #[test]
    fn external_ids_come_from_their_variables() {
        let mut config: Config = toml::from_str(
            "[[environments]]\nname = \"PROD\"\naccount_id = \"111122223333\"\nregion = \"eu-west-1\"\nexternal_id = \"from-file\"\n[[environments]]\nname = \"DEV\"\naccount_id = \"111122223334\"\nregion = \"eu-west-1\"\nexternal_id = \"dev-file\"\n[[environments]]\nname = \"SIT\"\naccount_id = \"111122223335\"\nregion = \"eu-west-1\"\n",
        )
        .unwrap();
        let variables = |name: &str| match name {
            "IM_EXTERNAL_ID_PROD" => Some("prod-s3cr3t".to_owned()),
            "IM_EXTERNAL_ID_DEV" => Some(String::new()),
            _ => None,
        };
        external_ids_from(&mut config.environments, variables);
        let ids: Vec<&str> = config
            .environments
            .iter()
            .map(|e| e.external_id.expose())
            .collect();
        assert_eq!(ids, ["prod-s3cr3t", "dev-file", ""]);
        assert!(!config.redacted_toml().contains("s3cr3t"));
    }

    #[test]
    fn bad_files_and_values_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(&path, "tabel = \"typo\"\n").unwrap();
        let args = ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        };
        assert!(matches!(args.load(), Err(ConfigError::Parse { .. })));
        let args = ConfigArgs {
            scale_min: Some(5),
            scale_max: Some(3),
            ..ConfigArgs::default()
        };
        assert!(matches!(args.load(), Err(ConfigError::Invalid(_))));
        let path = dir.path().join("session.toml");
        std::fs::write(&path, "role_session_secs = 600\n").unwrap();
        let args = ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        };
        assert!(
            matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("role_session_secs"))
        );
        let args = ConfigArgs {
            provision_deadline_secs: Some(0),
            ..ConfigArgs::default()
        };
        assert!(matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("deadline")));
        for poll in [0, 19, 60_001] {
            let args = ConfigArgs {
                watch_poll_ms: Some(poll),
                ..ConfigArgs::default()
            };
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("watch_poll_ms")),
                "watch_poll_ms {poll}"
            );
        }
    }

    #[test]
    fn operational_settings_come_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "workers = 4\nprovision_deadline_secs = 900\nrole_session_secs = 1800\nrole_refresh_margin_secs = 120\nmetrics_listen = \"127.0.0.1:9100\"\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path),
            deprovision_deadline_secs: Some(600),
            metrics_listen: Some("0.0.0.0:9090".parse().unwrap()),
            ..ConfigArgs::default()
        };
        let config = args.load().unwrap();
        assert_eq!(config.workers, 4);
        assert_eq!(config.provision_deadline_secs, 900);
        assert_eq!(config.deprovision_deadline_secs, 600);
        assert_eq!(config.role_session_secs, 1800);
        assert_eq!(config.role_refresh_margin_secs, 120);
        assert_eq!(config.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(Config::default().metrics_listen, None);
        assert_eq!(config.watch_poll_ms, 250);
        let args = ConfigArgs {
            watch_poll_ms: Some(50),
            ..ConfigArgs::default()
        };
        assert_eq!(args.load().unwrap().watch_poll_ms, 50);
    }

    #[test]
    fn backup_retention_and_sweep_interval() {
        let defaults = Config::default();
        assert_eq!(defaults.backup_retention_days, 90);
        assert_eq!(defaults.backup_sweep_interval_secs, 3600);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "backup_retention_days = 30\nbackup_sweep_interval_secs = 600\n",
        )
        .unwrap();
        let file = ConfigArgs {
            config: Some(path.clone()),
            ..ConfigArgs::default()
        };
        let config = file.load().unwrap();
        assert_eq!(
            (
                config.backup_retention_days,
                config.backup_sweep_interval_secs
            ),
            (30, 600)
        );
        // Flags (and their IM_* variables) win over the file, and show in --dump-config.
        let flags = ConfigArgs {
            config: Some(path),
            backup_retention_days: Some(7),
            backup_sweep_interval_secs: Some(5),
            ..ConfigArgs::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(
            (
                config.backup_retention_days,
                config.backup_sweep_interval_secs
            ),
            (7, 5)
        );
        let dumped = config.redacted_toml();
        assert!(dumped.contains("backup_retention_days = 7"), "{dumped}");
        assert!(
            dumped.contains("backup_sweep_interval_secs = 5"),
            "{dumped}"
        );
        for (days, interval) in [(0, 60), (3651, 60), (90, 0)] {
            let args = ConfigArgs {
                backup_retention_days: Some(days),
                backup_sweep_interval_secs: Some(interval),
                ..ConfigArgs::default()
            };
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("backup_")),
                "{days} {interval}"
            );
        }
        for days in [1, 3650] {
            let args = ConfigArgs {
                backup_retention_days: Some(days),
                ..ConfigArgs::default()
            };
            assert_eq!(args.load().unwrap().backup_retention_days, days);
        }
    }

    #[test]
    fn rollout_timeout_and_environment_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "rollout_timeout_secs = 300\n[[environments]]\nname = \"PROD\"\naccount_id = \"111122223333\"\nregion = \"eu-west-1\"\nscale_bounds = { min = 3, max = 20 }\n[[environments]]\nname = \"DEV\"\naccount_id = \"111122223334\"\nregion = \"eu-west-1\"\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path.clone()),
            ..ConfigArgs::default()
        };
        let config = args.load().unwrap();
        assert_eq!(config.rollout_timeout_secs, 300);
        assert_eq!(
            config.environments[0].scale_bounds,
            Some(ScaleBounds { min: 3, max: 20 })
        );
        assert_eq!(config.environments[1].scale_bounds, None);
        assert_eq!(Config::default().rollout_timeout_secs, 900);
        let flag = ConfigArgs {
            config: Some(path),
            rollout_timeout_secs: Some(60),
            ..ConfigArgs::default()
        };
        assert_eq!(flag.load().unwrap().rollout_timeout_secs, 60);
        for bad in [0, 1501] {
            let args = ConfigArgs {
                rollout_timeout_secs: Some(bad),
                ..ConfigArgs::default()
            };
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("rollout_timeout_secs")),
                "{bad}"
            );
        }
        let path = dir.path().join("bounds.toml");
        std::fs::write(
            &path,
            "[[environments]]\nname = \"SIT\"\naccount_id = \"111122223333\"\nregion = \"eu-west-1\"\nscale_bounds = { min = 5, max = 4 }\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path),
            ..ConfigArgs::default()
        };
        assert!(
            matches!(args.load(), Err(ConfigError::Invalid(m)) if m.contains("environments.SIT.scale_bounds"))
        );
    }

    #[test]
    fn timeouts_have_defaults_layer_and_reach_the_cloud_settings() {
        let defaults = Config::default().cloud_settings();
        assert_eq!(defaults.sdk_timeouts, SdkTimeouts::default());
        assert_eq!(defaults.db_timeouts, DbTimeouts::default());
        assert_eq!(defaults.sdk_timeouts.connect, Duration::from_secs(5));
        assert_eq!(defaults.sdk_timeouts.attempt, Duration::from_secs(30));
        assert_eq!(defaults.sdk_timeouts.operation, Duration::from_secs(120));
        assert_eq!(defaults.db_timeouts.lock_wait, Duration::from_secs(30));
        assert_eq!(defaults.db_timeouts.statement, Duration::from_secs(300));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "aws_connect_timeout_secs = 2\naws_attempt_timeout_secs = 10\naws_operation_timeout_secs = 60\ndb_lock_wait_timeout_secs = 7\ndb_statement_timeout_secs = 90\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(path),
            aws_operation_timeout_secs: Some(45),
            db_connect_timeout_secs: Some(3),
            ..ConfigArgs::default()
        };
        let settings = args.load().unwrap().cloud_settings();
        assert_eq!(
            settings.sdk_timeouts,
            SdkTimeouts {
                connect: Duration::from_secs(2),
                attempt: Duration::from_secs(10),
                operation: Duration::from_secs(45),
            }
        );
        assert_eq!(
            settings.db_timeouts,
            DbTimeouts {
                connect: Duration::from_secs(3),
                lock_wait: Duration::from_secs(7),
                statement: Duration::from_secs(90),
            }
        );
        let sdk = settings.sdk_timeouts.timeout_config();
        assert_eq!(sdk.connect_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(
            sdk.operation_attempt_timeout(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(sdk.operation_timeout(), Some(Duration::from_secs(45)));
    }

    #[test]
    fn timeouts_are_validated() {
        let rejected = |args: ConfigArgs, what: &str| {
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(ref m)) if m.contains(what)),
                "{what}"
            );
        };
        for args in [
            ConfigArgs {
                aws_connect_timeout_secs: Some(0),
                ..ConfigArgs::default()
            },
            ConfigArgs {
                aws_attempt_timeout_secs: Some(200),
                ..ConfigArgs::default()
            },
            ConfigArgs {
                aws_connect_timeout_secs: Some(40),
                ..ConfigArgs::default()
            },
        ] {
            rejected(args, "aws timeouts");
        }
        for args in [
            ConfigArgs {
                db_connect_timeout_secs: Some(0),
                ..ConfigArgs::default()
            },
            ConfigArgs {
                db_lock_wait_timeout_secs: Some(0),
                ..ConfigArgs::default()
            },
            ConfigArgs {
                db_lock_wait_timeout_secs: Some(31_536_001),
                ..ConfigArgs::default()
            },
            ConfigArgs {
                db_statement_timeout_secs: Some(0),
                ..ConfigArgs::default()
            },
        ] {
            rejected(args, "db_");
        }
        let args = ConfigArgs {
            aws_attempt_timeout_secs: Some(120),
            aws_operation_timeout_secs: Some(120),
            db_lock_wait_timeout_secs: Some(1),
            ..ConfigArgs::default()
        };
        assert!(args.load().is_ok());
    }

    #[test]
    fn cors_origins_layer_and_are_validated() {
        assert!(Config::default().cors_allowed_origins.is_empty());
        let config: Config = toml::from_str(
            "cors_allowed_origins = [\"https://admin.example.com\", \"http://localhost:8080\"]\n",
        )
        .unwrap();
        assert!(config.validate().is_ok());
        assert_eq!(config.cors_allowed_origins.len(), 2);
        let flag = ConfigArgs {
            cors_allowed_origins: Some(vec!["http://127.0.0.1:3000".into(), " ".into()]),
            ..ConfigArgs::default()
        };
        assert_eq!(
            flag.load().unwrap().cors_allowed_origins,
            ["http://127.0.0.1:3000"]
        );
        let none = ConfigArgs {
            cors_allowed_origins: Some(vec![String::new()]),
            ..ConfigArgs::default()
        };
        assert!(none.load().unwrap().cors_allowed_origins.is_empty());
        for good in [
            "https://a.example",
            "http://[::1]:8080",
            "http://localhost:1",
        ] {
            assert!(check_origin(good).is_ok(), "{good}");
        }
        for bad in [
            "*",
            "admin.example.com",
            "https://",
            "https://admin.example.com/",
            "https://Admin.example.com",
            "https://a.example:99999",
            "https://a.example:x",
            "ftp://a.example",
            "https://a.example/path",
            "https://user@a.example",
            "https://a b",
        ] {
            let args = ConfigArgs {
                cors_allowed_origins: Some(vec![bad.into()]),
                ..ConfigArgs::default()
            };
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(ref m)) if m.contains("cors_allowed_origins")),
                "{bad}"
            );
        }
    }

    #[test]
    fn image_repositories_layer_and_are_validated() {
        let defaults = Config::default();
        assert_eq!(
            defaults.allowed_image_repositories,
            ["docker.io/library/wordpress"]
        );
        assert!(defaults.image_policy().allows("wordpress"));
        let config: Config = toml::from_str(
            "allowed_image_repositories = [\"123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws\"]\n",
        )
        .unwrap();
        assert!(config.validate().is_ok());
        let policy = config.image_policy();
        assert!(policy.allows("123456789012.dkr.ecr.eu-west-1.amazonaws.com/bbws/wordpress"));
        assert!(!policy.allows("wordpress"), "the file replaces the default");
        let flag = ConfigArgs {
            allowed_image_repositories: Some(vec!["ghcr.io/bbws".into(), " ".into()]),
            ..ConfigArgs::default()
        };
        assert_eq!(
            flag.load().unwrap().allowed_image_repositories,
            ["ghcr.io/bbws"]
        );
        for bad in ["wordpress:latest", "wordpress@sha256:00", "Bad/Repo"] {
            let args = ConfigArgs {
                allowed_image_repositories: Some(vec![bad.into()]),
                ..ConfigArgs::default()
            };
            assert!(
                matches!(args.load(), Err(ConfigError::Invalid(ref m)) if m.contains("allowed_image_repositories")),
                "{bad}"
            );
        }
    }

    #[test]
    fn iam_database_authentication_needs_the_instance_and_the_user() {
        let base = "[[environments]]\nname = \"PROD\"\naccount_id = \"111122223333\"\nregion = \"eu-west-1\"\n[environments.platform]\ndb_iam_auth = true\n";
        for (extra, ok) in [
            ("", false),
            ("db_instance_identifier = \"bbws-prod\"\n", false),
            ("db_iam_user = \"instance_manager\"\n", false),
            (
                "db_instance_identifier = \"bbws-prod\"\ndb_iam_user = \"instance_manager\"\n",
                true,
            ),
        ] {
            let config: Config = toml::from_str(&format!("{base}{extra}")).unwrap();
            match config.validate() {
                Ok(()) => assert!(ok, "{extra}"),
                Err(ConfigError::Invalid(m)) => assert!(!ok && m.contains("db_iam_auth"), "{m}"),
                Err(other) => panic!("{other}"),
            }
        }
    }

    #[test]
    fn health_timeouts_come_from_the_file_and_must_nest() {
        let config: Config =
            toml::from_str("health_timeout_ms = 8000\nhealth_check_timeout_ms = 3000\n").unwrap();
        assert_eq!(config.health_timeout_ms, 8000);
        assert_eq!(config.health_check_timeout_ms, 3000);
        assert!(config.validate().is_ok());
        for (overall, each) in [(5000, 6000), (5000, 0)] {
            let config = Config {
                health_timeout_ms: overall,
                health_check_timeout_ms: each,
                ..Config::default()
            };
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("health"), "{error}");
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn tracing_is_off_by_default_layers_and_is_validated() {
        let defaults = Config::default();
        assert!(!defaults.tracing.enabled());
        assert_eq!(defaults.tracing.sample_ratio, 1.0);
        assert_eq!(defaults.tracing.service_name, "instance-manager");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "[tracing]\notlp_endpoint = \"http://collector:4317\"\nsample_ratio = 0.25\n",
        )
        .unwrap();
        let file = ConfigArgs {
            config: Some(path.clone()),
            ..ConfigArgs::default()
        };
        let config = file.load().unwrap();
        assert!(config.tracing.enabled());
        assert_eq!(config.tracing.sample_ratio, 0.25);
        assert!(config.redacted_toml().contains("[tracing]"));
        let flags = ConfigArgs {
            config: Some(path),
            tracing_sample_ratio: Some(0.0),
            tracing_service_name: Some("im-prod".into()),
            tracing_otlp_endpoint: Some("https://otel.example.com".into()),
            ..ConfigArgs::default()
        };
        let config = flags.load().unwrap();
        assert_eq!(
            config.tracing,
            TracingConfig {
                otlp_endpoint: "https://otel.example.com".into(),
                sample_ratio: 0.0,
                service_name: "im-prod".into(),
            }
        );
        // An empty endpoint from the environment turns a file's endpoint off.
        let off = ConfigArgs {
            tracing_otlp_endpoint: Some(String::new()),
            ..ConfigArgs::default()
        };
        assert!(!off.load().unwrap().tracing.enabled());
        let rejected = |args: ConfigArgs, what: &str| match args.load() {
            Err(ConfigError::Invalid(message)) => {
                assert!(message.contains(what), "{message}");
            }
            other => panic!("{what}: {other:?}"),
        };
        for ratio in [-0.1, 1.5, f64::NAN] {
            let args = ConfigArgs {
                tracing_sample_ratio: Some(ratio),
                ..ConfigArgs::default()
            };
            rejected(args, "tracing.sample_ratio must be between 0 and 1");
        }
        for endpoint in [
            "collector:4317",
            "localhost",
            "grpc://collector:4317",
            "http://",
            "http://collector:4317/v1/traces",
            "http://user:pw@collector:4317",
            "http://collector:port",
            "http://collector:99999",
        ] {
            let args = ConfigArgs {
                tracing_otlp_endpoint: Some(endpoint.into()),
                ..ConfigArgs::default()
            };
            rejected(args, "tracing.otlp_endpoint");
        }
        let args = ConfigArgs {
            tracing_service_name: Some(" ".into()),
            ..ConfigArgs::default()
        };
        rejected(args, "tracing.service_name");
    }
}
