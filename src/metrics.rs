//! The control plane's own metrics in the Prometheus text format, served over HTTP at
//! `GET /metrics` on `metrics_listen` (off unless configured). Alarms hang off these:
//! `im_operations_stuck_total` above zero needs an operator.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Labels of one series, sorted by name.
type Labels = Vec<(&'static str, String)>;

struct Family {
    help: &'static str,
    series: BTreeMap<Labels, u64>,
}

/// Counters of the workflow engine, and the gauges it reports when rendered.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<&'static str, Family>>,
}

pub const OPERATIONS_CLAIMED: &str = "im_operations_claimed_total";
pub const OPERATIONS_FINISHED: &str = "im_operations_finished_total";
pub const OPERATIONS_STUCK: &str = "im_operations_stuck_total";
pub const STEP_RETRIES: &str = "im_step_retries_total";
pub const BACKUPS_SWEPT: &str = "im_backups_swept_total";
pub const BACKUP_SWEEP_FAILURES: &str = "im_backup_sweep_failures_total";

fn help(name: &str) -> &'static str {
    match name {
        OPERATIONS_CLAIMED => "Operations this replica claimed (started or resumed).",
        OPERATIONS_FINISHED => "Operations this replica finished, by terminal status.",
        OPERATIONS_STUCK => {
            "Operations that ended STUCK (a failed undo or a passed deadline): they need an operator."
        }
        STEP_RETRIES => {
            "Step attempts retried after a transient error (throttling, 5xx, timeouts)."
        }
        BACKUPS_SWEPT => "Expired backups this replica removed (objects and record).",
        BACKUP_SWEEP_FAILURES => {
            "Expired backups this replica failed to remove (retried on the next sweep)."
        }
        _ => "",
    }
}

/// What the engine reports at render time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub running: usize,
    pub workers: usize,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one to the counter `name` with `labels`.
    pub fn increment(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        let mut labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        labels.sort();
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let family = counters.entry(name).or_insert_with(|| Family {
            help: help(name),
            series: BTreeMap::new(),
        });
        *family.series.entry(labels).or_default() += 1;
    }

    /// The current value of one counter series (0 when never incremented).
    pub fn value(&self, name: &str, labels: &[(&'static str, &str)]) -> u64 {
        let mut labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        labels.sort();
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters
            .get(name)
            .and_then(|family| family.series.get(&labels))
            .copied()
            .unwrap_or(0)
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: usize| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "im_operations_running",
            "Operations this replica is executing now.",
            gauges.running,
        );
        gauge(
            "im_workers",
            "Operations this replica may execute at once.",
            gauges.workers,
        );
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, family) in counters.iter() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, value) in &family.series {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
            }
        }
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
                        "text/plain; version=0.0.4; charset=utf-8",
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
        assert!(text.contains("# TYPE im_operations_running gauge\nim_operations_running 3\n"));
        assert!(text.contains("im_workers 10\n"));
        assert!(text.contains(
            "# TYPE im_operations_stuck_total counter\nim_operations_stuck_total{reason=\"UNDO_FAILED\",verb=\"create\"} 2\n"
        ));
        assert!(text.contains("im_step_retries_total{step=\"a\\\"b\",verb=\"create\"} 1\n"));
        assert!(!text.contains(OPERATIONS_CLAIMED));
    }
}
