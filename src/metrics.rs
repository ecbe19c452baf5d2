//! The control plane's own metrics, kept in a `prometheus-client` registry and served in
//! the Prometheus text format (0.0.4) over HTTP at `GET /metrics` on `metrics_listen` (off
//! unless configured). Alarms hang off these: `im_operations_stuck_total` above zero needs
//! an operator, and so do the reconciler's orphans and drift.
//!
//! `prometheus-client` is the Prometheus project's own Rust client: typed counters, gauges
//! and histograms without a process-global registry (each engine, and so each test, has
//! its own), and a 0.0.4 text encoder, so scrapers and the names they know stay as they
//! were.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Labels of one series, sorted by name.
type Labels = Vec<(String, String)>;

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

pub const OPERATIONS_CLAIMED: &str = "im_operations_claimed_total";
pub const OPERATIONS_FINISHED: &str = "im_operations_finished_total";
pub const OPERATIONS_STUCK: &str = "im_operations_stuck_total";
pub const STEP_RETRIES: &str = "im_step_retries_total";
pub const BACKUPS_SWEPT: &str = "im_backups_swept_total";
pub const BACKUP_SWEEP_FAILURES: &str = "im_backup_sweep_failures_total";
pub const ORPHANS_REMOVED: &str = "im_reconcile_orphans_removed_total";
pub const DRIFT_DETECTED: &str = "im_reconcile_drift_detected_total";
pub const RECONCILE_FAILURES: &str = "im_reconcile_failures_total";

pub const ORPHANS: &str = "im_reconcile_orphans";
pub const DRIFT: &str = "im_reconcile_drift";
pub const OPERATIONS_WAITING: &str = "im_operations_waiting";
pub const OPERATIONS_WAITING_OLDEST: &str = "im_operations_waiting_oldest_seconds";
pub const LOAD_BALANCER_SLOTS: &str = "im_load_balancer_slots";
pub const LOAD_BALANCER_QUOTA: &str = "im_load_balancer_quota";

pub const RPC_DURATION: &str = "im_rpc_duration_seconds";
pub const OPERATION_DURATION: &str = "im_operation_duration_seconds";

const COUNTERS: [(&str, &str); 9] = [
    (
        OPERATIONS_CLAIMED,
        "Operations this replica claimed (started or resumed)",
    ),
    (
        OPERATIONS_FINISHED,
        "Operations this replica finished, by terminal status",
    ),
    (
        OPERATIONS_STUCK,
        "Operations that ended STUCK (a failed undo, a passed deadline, a lease expired long ago without progress): they need an operator",
    ),
    (
        STEP_RETRIES,
        "Step attempts retried after a transient error (throttling, 5xx, timeouts)",
    ),
    (
        BACKUPS_SWEPT,
        "Expired backups this replica removed (objects and record)",
    ),
    (
        BACKUP_SWEEP_FAILURES,
        "Expired backups this replica failed to remove (retried on the next sweep)",
    ),
    (
        ORPHANS_REMOVED,
        "Orphaned resources (tagged as ours, no live instance owns them) this replica's reconciler removed, by environment and kind",
    ),
    (
        DRIFT_DETECTED,
        "Drift conditions this replica's reconciler recorded on instances (a recorded resource missing or changed), by kind",
    ),
    (
        RECONCILE_FAILURES,
        "Reconciler checks that could not be completed (retried on the next pass), by check",
    ),
];

const GAUGES: [(&str, &str); 6] = [
    (
        LOAD_BALANCER_SLOTS,
        "Rules, target groups and certificates instances hold on each load balancer of the pool (the state store's slots), by environment, load_balancer and kind, at this replica's last reconcile pass",
    ),
    (
        LOAD_BALANCER_QUOTA,
        "What each load balancer of the pool may hold, by environment, load_balancer and kind",
    ),
    (
        ORPHANS,
        "Orphaned resources (tagged as ours, no live instance owns them) found by this replica's last reconcile pass, by environment and kind",
    ),
    (
        DRIFT,
        "Drift conditions on instances seen by this replica's last reconcile pass, by kind",
    ),
    (
        OPERATIONS_WAITING,
        "Unfinished operations no worker holds (never claimed, or their lease expired), seen by this replica's last reconcile pass",
    ),
    (
        OPERATIONS_WAITING_OLDEST,
        "How long the longest-waiting of those has waited (since its creation, or since its lease expired), in seconds, at this replica's last reconcile pass",
    ),
];

/// RPC latencies: 1 ms to about 33 s.
fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Operation durations: 1 s to about 4.5 h.
fn operation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// What the engine reports at render time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub running: usize,
    pub workers: usize,
}

/// Every metric of one replica: the workflow engine's, the retention sweeper's, the
/// reconciler's and the gRPC server's.
pub struct Metrics {
    registry: Registry,
    counters: HashMap<&'static str, Family<Labels, Counter>>,
    gauges: HashMap<&'static str, Family<Labels, Gauge>>,
    histograms: HashMap<&'static str, Histograms>,
    running: Gauge,
    workers: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn labels(labels: &[(&'static str, &str)]) -> Labels {
    let mut labels: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let running = Gauge::default();
        let workers = Gauge::default();
        registry.register(
            "im_operations_running",
            "Operations this replica is executing now",
            running.clone(),
        );
        registry.register(
            "im_workers",
            "Operations this replica may execute at once",
            workers.clone(),
        );
        let mut counters = HashMap::new();
        for (name, help) in COUNTERS {
            let family = Family::<Labels, Counter>::default();
            // The text encoder adds `_total` to a counter's name.
            let base = name.strip_suffix("_total").unwrap_or(name);
            registry.register(base, help, family.clone());
            counters.insert(name, family);
        }
        let mut gauges = HashMap::new();
        for (name, help) in GAUGES {
            let family = Family::<Labels, Gauge>::default();
            registry.register(name, help, family.clone());
            gauges.insert(name, family);
        }
        let mut histograms = HashMap::new();
        let rpc: Histograms = Family::new_with_constructor(rpc_histogram);
        registry.register(
            RPC_DURATION,
            "gRPC calls by method and status code: unary calls until their answer, streams until they end (their whole duration)",
            rpc.clone(),
        );
        histograms.insert(RPC_DURATION, rpc);
        let operations: Histograms = Family::new_with_constructor(operation_histogram);
        registry.register(
            OPERATION_DURATION,
            "Operations this replica ended, by verb and terminal status: from the request that created them to their end",
            operations.clone(),
        );
        histograms.insert(OPERATION_DURATION, operations);
        Self {
            registry,
            counters,
            gauges,
            histograms,
            running,
            workers,
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one to the counter `name` with `labels`.
    pub fn increment(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        self.add(name, labels, 1);
    }

    /// Adds `by` to the counter `name` with `labels`.
    pub fn add(&self, name: &'static str, labels_: &[(&'static str, &str)], by: u64) {
        match self.counters.get(name) {
            Some(family) => {
                family.get_or_create(&labels(labels_)).inc_by(by);
            }
            None => tracing::warn!(metric = name, "no such counter"),
        }
    }

    /// The current value of one counter series (0 when never incremented).
    pub fn value(&self, name: &str, labels_: &[(&'static str, &str)]) -> u64 {
        self.counters
            .get(name)
            .and_then(|family| family.get(&labels(labels_)).map(|c| c.get()))
            .unwrap_or(0)
    }

    /// Sets the gauge `name` with `labels`.
    pub fn set(&self, name: &'static str, labels_: &[(&'static str, &str)], value: i64) {
        match self.gauges.get(name) {
            Some(family) => {
                family.get_or_create(&labels(labels_)).set(value);
            }
            None => tracing::warn!(metric = name, "no such gauge"),
        }
    }

    /// The current value of one gauge series (0 when never set).
    pub fn gauge(&self, name: &str, labels_: &[(&'static str, &str)]) -> i64 {
        self.gauges
            .get(name)
            .and_then(|family| family.get(&labels(labels_)).map(|g| g.get()))
            .unwrap_or(0)
    }

    /// Records one observation (in seconds) in the histogram `name`.
    pub fn observe(&self, name: &'static str, labels_: &[(&'static str, &str)], seconds: f64) {
        match self.histograms.get(name) {
            Some(family) => family.get_or_create(&labels(labels_)).observe(seconds),
            None => tracing::warn!(metric = name, "no such histogram"),
        }
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: Gauges) -> String {
        self.running
            .set(i64::try_from(gauges.running).unwrap_or(i64::MAX));
        self.workers
            .set(i64::try_from(gauges.workers).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(error) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "cannot encode the metrics");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        prometheus_text::CONTENT_TYPE,
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` for [`serve`], naming the address when it is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("cannot listen for metrics on {addr}: {error}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let metrics = Metrics::default();
        metrics.increment(
            OPERATIONS_STUCK,
            &[("verb", "create"), ("reason", "UNDO_FAILED")],
        );
        metrics.increment(
            OPERATIONS_STUCK,
            &[("reason", "UNDO_FAILED"), ("verb", "create")],
        );
        metrics.increment(STEP_RETRIES, &[("verb", "create"), ("step", "a\"b")]);
        metrics.observe(
            RPC_DURATION,
            &[("method", "/x.Y/Get"), ("code", "OK")],
            0.003,
        );
        assert_eq!(
            metrics.value(
                OPERATIONS_STUCK,
                &[("verb", "create"), ("reason", "UNDO_FAILED")]
            ),
            2
        );
        let text = metrics.render(Gauges {
            running: 3,
            workers: 10,
        });
        assert!(
            text.contains("# TYPE im_operations_running gauge\nim_operations_running 3\n"),
            "{text}"
        );
        assert!(text.contains("\nim_workers 10\n"), "{text}");
        assert!(text.contains(
            "# TYPE im_operations_stuck_total counter\nim_operations_stuck_total{reason=\"UNDO_FAILED\",verb=\"create\"} 2\n"
        ), "{text}");
        assert!(
            text.contains("im_step_retries_total{step=\"a\\\"b\",verb=\"create\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "im_rpc_duration_seconds_bucket{code=\"OK\",method=\"/x.Y/Get\",le=\"0.004\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("im_rpc_duration_seconds_count{code=\"OK\",method=\"/x.Y/Get\"} 1\n"),
            "{text}"
        );
        // A family without a series is left out.
        assert!(!text.contains(OPERATIONS_CLAIMED), "{text}");
        assert!(!text.contains(OPERATION_DURATION), "{text}");
    }
}
