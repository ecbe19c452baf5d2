//! QueryLogs, TailLogs and GetResourceUsage end to end, in process: a provisioned instance
//! on moto and MariaDB, its log lines written with the CloudWatch Logs SDK into the
//! environment's log group (moto), task counts from moto's ECS, the database size from
//! MariaDB's information_schema. CloudWatch metrics cannot be served by moto (TESTING.md):
//! the metrics adapter runs on an SDK client whose answers `aws-smithy-mocks` gives.

mod common;
mod platform;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_cloudwatch::operation::get_metric_data::{GetMetricDataError, GetMetricDataOutput};
use aws_sdk_cloudwatch::types::{MetricDataResult, StatusCode};
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use aws_smithy_mocks::{MockResponseInterceptor, Rule, RuleMode, mock};
use aws_smithy_types::DateTime;
use instance_manager::cloud::aws::AwsMetrics;
use instance_manager::cloud::{CloudEnv, CloudResult, ErrorKind, LogPage, LogQuery, Logs, Metrics};
use instance_manager::config::Config;
use instance_manager::domain::Environment;
use instance_manager::proto::v1;
use instance_manager::workflow::EngineOptions;
use mysql_async::prelude::Queryable;
use platform::ControlPlane;
use tonic::Code;
use tonic_types::StatusExt;

/// How long any one expected thing may take.
const PATIENCE: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn at(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000)
}

/// Counts the events the control plane read from the log store.
struct Counting {
    inner: Arc<dyn Logs>,
    events: Arc<AtomicUsize>,
}

#[async_trait]
impl Logs for Counting {
    async fn filter_events(&self, query: &LogQuery) -> CloudResult<LogPage> {
        let page = self.inner.filter_events(query).await?;
        self.events.fetch_add(page.events.len(), Ordering::SeqCst);
        Ok(page)
    }
}

/// A control plane with one provisioned instance of `tenant`.
struct World {
    cp: ControlPlane,
    tenant: String,
    group: String,
    read_events: Arc<AtomicUsize>,
}

async fn world(prefix: &str, tune: impl FnOnce(&mut Config), metrics: Option<Rule>) -> World {
    let mut config = platform::config_with_platforms(&[Environment::Dev]).await;
    config.tail_poll_interval_ms = 200;
    tune(&mut config);
    let group = config.environments[0].platform.log_group.clone();
    let read_events = Arc::new(AtomicUsize::new(0));
    let counter = read_events.clone();
    let metrics = metrics.map(|rule| Arc::new(mocked_metrics(&[&rule], RuleMode::MatchAny)));
    let wrap: platform::CloudWrapper = Arc::new(move |mut cloud: CloudEnv| {
        cloud.logs = Arc::new(Counting {
            inner: cloud.logs,
            events: counter.clone(),
        });
        if let Some(metrics) = &metrics {
            cloud.metrics = metrics.clone();
        }
        cloud
    });
    let mut cp = platform::start_with(config, EngineOptions::default(), |s| s, Some(wrap)).await;
    let tenant = platform::tenant(prefix);
    let created = cp.create(&tenant, v1::Environment::Dev).await;
    cp.completed(&created.name).await;
    World {
        cp,
        tenant,
        group,
        read_events,
    }
}

impl World {
    fn name(&self) -> String {
        format!("tenants/{}/instances/wp", self.tenant)
    }

    fn logs_client(&self) -> aws_sdk_cloudwatchlogs::Client {
        aws_sdk_cloudwatchlogs::Client::new(&self.cp.sdk(Environment::Dev))
    }

    /// Writes `lines` (timestamp, message) to `stream`, as the awslogs driver would.
    async fn write(&self, stream: &str, lines: &[(i64, String)]) {
        let client = self.logs_client();
        let created = client
            .create_log_stream()
            .log_group_name(&self.group)
            .log_stream_name(stream)
            .send()
            .await;
        if let Err(error) = created {
            let text = format!("{error:?}");
            assert!(text.contains("ResourceAlreadyExists"), "{text}");
        }
        let mut sorted = lines.to_vec();
        sorted.sort_by_key(|(ts, _)| *ts);
        // PutLogEvents takes at most 10 000 events and 1 MiB per call.
        for chunk in sorted.chunks(200) {
            client
                .put_log_events()
                .log_group_name(&self.group)
                .log_stream_name(stream)
                .set_log_events(Some(
                    chunk
                        .iter()
                        .map(|(ts, message)| {
                            InputLogEvent::builder()
                                .timestamp(*ts)
                                .message(message)
                                .build()
                                .unwrap()
                        })
                        .collect(),
                ))
                .send()
                .await
                .unwrap();
        }
    }

    fn stream(&self, task: &str) -> String {
        format!("{}/wordpress/{task}", self.tenant)
    }

    async fn query(
        &mut self,
        request: v1::QueryLogsRequest,
    ) -> Result<v1::QueryLogsResponse, tonic::Status> {
        self.cp
            .instances
            .query_logs(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Every page of `request`, with the number of pages.
    async fn query_all(&mut self, mut request: v1::QueryLogsRequest) -> (Vec<v1::LogEntry>, usize) {
        let mut entries = Vec::new();
        let mut pages = 0;
        loop {
            let page = self.query(request.clone()).await.unwrap();
            pages += 1;
            assert!(page.entries.len() <= request.page_size as usize);
            entries.extend(page.entries);
            if page.next_page_token.is_empty() {
                return (entries, pages);
            }
            assert!(pages < 100, "paging does not end");
            request.page_token = page.next_page_token;
        }
    }

    async fn tail(
        &mut self,
        request: v1::TailLogsRequest,
    ) -> tonic::Streaming<v1::TailLogsResponse> {
        self.cp
            .instances
            .tail_logs(request)
            .await
            .unwrap()
            .into_inner()
    }
}

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Reads the stream until an entry with `last` as its message arrives.
async fn read_until(
    stream: &mut tonic::Streaming<v1::TailLogsResponse>,
    last: &str,
) -> Vec<v1::LogEntry> {
    let mut entries = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !entries.iter().any(|e: &v1::LogEntry| e.message == last) {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{last:?} did not arrive; got {entries:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before {last:?}"));
        assert!(!message.entries.is_empty(), "empty batch");
        entries.extend(message.entries);
    }
    entries
}

fn messages(entries: &[v1::LogEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.message.as_str()).collect()
}

#[tokio::test]
async fn query_logs_pages_without_duplicates_and_the_filter_narrows() {
    let mut w = world("qlog", |_| {}, None).await;
    let base = now_ms() - 10 * 60 * 1000;
    // 26 lines in two task streams, every third one an error.
    let mut written = Vec::new();
    for (task, offset) in [("task-a", 0), ("task-b", 1)] {
        let lines: Vec<(i64, String)> = (0..13)
            .map(|i| {
                let n = i * 2 + offset;
                let level = if n % 3 == 0 { "ERROR" } else { "INFO" };
                (base + n * 1000, format!("{level} line {n:02} from {task}"))
            })
            .collect();
        w.write(&w.stream(task), &lines).await;
        written.extend(lines);
    }
    written.sort();
    // Not the instance's: another tenant whose id starts with this one's, and a line
    // outside the range.
    w.write(
        &format!("{}-other/wordpress/x", w.tenant),
        &[(base + 500, "ERROR someone else's".into())],
    )
    .await;
    w.write(
        &w.stream("task-a"),
        &[(base - 3_600_000, "ERROR too old".into())],
    )
    .await;

    let request = v1::QueryLogsRequest {
        name: w.name(),
        start_time: Some(at(base - 60_000)),
        end_time: Some(at(now_ms() + 60_000)),
        page_size: 5,
        ..Default::default()
    };
    let (entries, pages) = w.query_all(request.clone()).await;
    assert!(pages >= 3, "{pages} pages");
    // Every line once. (Each page is oldest first; across pages the order is CloudWatch's,
    // which interleaves streams by time, while moto answers stream by stream.)
    let mut got: Vec<(i64, String)> = entries
        .iter()
        .map(|e| (millis(e.time.as_ref().unwrap()), e.message.clone()))
        .collect();
    got.sort();
    assert_eq!(got, written, "every line once");
    let ids: HashSet<&str> = entries.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), entries.len(), "event ids are unique");
    assert!(
        entries
            .iter()
            .all(|e| e.stream.starts_with(&format!("{}/", w.tenant)))
    );

    let errors = v1::QueryLogsRequest {
        filter: "ERROR".into(),
        ..request.clone()
    };
    let (filtered, _) = w.query_all(errors.clone()).await;
    let want: Vec<&str> = written
        .iter()
        .filter(|(_, m)| m.starts_with("ERROR"))
        .map(|(_, m)| m.as_str())
        .collect();
    let mut narrowed = messages(&filtered);
    narrowed.sort_by_key(|m| m[m.find("line").unwrap()..].to_owned());
    assert_eq!(narrowed, want);
    assert!(want.len() < written.len() && !want.is_empty());

    // A token belongs to its query: another filter with it is refused.
    let first = w.query(errors.clone()).await.unwrap();
    assert!(!first.next_page_token.is_empty());
    let status = w
        .query(v1::QueryLogsRequest {
            filter: "INFO".into(),
            page_token: first.next_page_token,
            ..request.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["page_token"]);

    // Bad input: each field named.
    for (bad, field) in [
        (
            v1::QueryLogsRequest {
                filter: "{ $.level = \"error\"".into(),
                ..request.clone()
            },
            "filter",
        ),
        (
            v1::QueryLogsRequest {
                end_time: Some(at(base - 120_000)),
                ..request.clone()
            },
            "end_time",
        ),
        (
            v1::QueryLogsRequest {
                page_size: -1,
                ..request.clone()
            },
            "page_size",
        ),
    ] {
        let status = w.query(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), [field]);
    }
    let status = w
        .query(v1::QueryLogsRequest {
            name: format!("tenants/{}/instances/nope", w.tenant),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn tail_follows_new_and_late_lines_in_order_once_each_then_ends_at_shutdown() {
    let mut w = world("tlog", |_| {}, None).await;
    let started = now_ms();
    // Before the tail's `since`: never sent.
    w.write(
        &w.stream("t1"),
        &[(started - 120_000, "before since".into())],
    )
    .await;
    // Interleaved in two streams, merged in time order. (Written before the tail starts:
    // two PutLogEvents calls are not atomic, and a poll between them would rightly deliver
    // the second stream's lines after the first's, as late lines. Lines written while the
    // tail runs come below.)
    let t = now_ms();
    w.write(
        &w.stream("t1"),
        &[(t, "a1".into()), (t + 2, "a3".into()), (t + 4, "a5".into())],
    )
    .await;
    w.write(
        &w.stream("t2"),
        &[(t + 1, "a2".into()), (t + 3, "a4".into())],
    )
    .await;
    let mut stream = w
        .tail(v1::TailLogsRequest {
            name: w.name(),
            since: Some(at(started - 60_000)),
            follow: true,
            ..Default::default()
        })
        .await;
    let first = read_until(&mut stream, "a5").await;
    assert_eq!(messages(&first), ["a1", "a2", "a3", "a4", "a5"]);

    // A line that reaches CloudWatch late, stamped 30 s before the newest one sent.
    w.write(&w.stream("t2"), &[(t - 30_000, "late".into())])
        .await;
    let late = read_until(&mut stream, "late").await;
    assert_eq!(messages(&late), ["late"]);
    // Then more lines, and a marker: nothing in between is repeated.
    w.write(
        &w.stream("t1"),
        &[(t + 10, "b1".into()), (t + 11, "end".into())],
    )
    .await;
    let rest = read_until(&mut stream, "end").await;
    assert_eq!(messages(&rest), ["b1", "end"]);

    // Shutdown ends the stream with a status that says so and where to resume.
    w.cp.shutdown.cancel();
    let ended = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends at shutdown");
    let status = ended.expect_err("ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "SHUTTING_DOWN"
    );
    assert!(
        status.message().contains("resume with since="),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn tail_without_follow_ends_at_the_present_and_a_cancelled_tail_stops() {
    let mut w = world("tnow", |_| {}, None).await;
    let t = now_ms() - 5_000;
    w.write(
        &w.stream("t1"),
        &[(t, "x1".into()), (t + 1, "x2".into()), (t + 2, "x3".into())],
    )
    .await;
    let request = v1::TailLogsRequest {
        name: w.name(),
        since: Some(at(t - 1000)),
        follow: false,
        ..Default::default()
    };
    let mut stream = w.tail(request.clone()).await;
    let mut got = Vec::new();
    while let Some(message) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends by itself")
        .unwrap()
    {
        got.extend(message.entries);
    }
    assert_eq!(messages(&got), ["x1", "x2", "x3"]);

    // The filter narrows a tail too.
    let mut stream = w
        .tail(v1::TailLogsRequest {
            filter: "x2".into(),
            ..request.clone()
        })
        .await;
    let only = read_until(&mut stream, "x2").await;
    assert_eq!(messages(&only), ["x2"]);
    assert!(
        tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );

    // A client that goes away: its tail stops polling.
    let stream = w
        .tail(v1::TailLogsRequest {
            follow: true,
            ..request.clone()
        })
        .await;
    drop(stream);
    let deadline = Instant::now() + PATIENCE;
    let mut last = w.read_events.load(Ordering::SeqCst);
    let mut still_since = Instant::now();
    // Polls every 200 ms while it runs: no new reads for 2 s means it stopped.
    while still_since.elapsed() < Duration::from_secs(2) {
        assert!(
            Instant::now() < deadline,
            "the cancelled tail keeps polling"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = w.read_events.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }

    let status =
        w.cp.instances
            .tail_logs(v1::TailLogsRequest {
                filter: "\"open".into(),
                ..request
            })
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["filter"]);
}

#[tokio::test]
async fn a_tail_whose_client_stops_reading_stops_reading_the_log_store() {
    // Small pages and buffer, so that the bound is far below what is written.
    let mut w = world(
        "tbp",
        |config| {
            config.tail_page_events = 50;
            config.tail_buffer = 2;
        },
        None,
    )
    .await;
    let t = now_ms() - 60_000;
    // 2 KiB lines, 8 MiB in all: the client's HTTP/2 stream window (2 MiB with tonic's
    // defaults) holds a quarter of them; the server may hold only its small channel more.
    let total = 4000;
    let padding = "x".repeat(2000);
    let lines: Vec<(i64, String)> = (0..total)
        .map(|i| (t + i as i64, format!("{i:05} {padding}")))
        .collect();
    w.write(&w.stream("busy"), &lines).await;
    let mut stream = w
        .tail(v1::TailLogsRequest {
            name: w.name(),
            since: Some(at(t)),
            follow: true,
            ..Default::default()
        })
        .await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.entries.is_empty());
    // The client reads no more. The poller fills the channel, then waits: what it has read
    // stops growing, well short of everything.
    let deadline = Instant::now() + PATIENCE;
    let mut last = w.read_events.load(Ordering::SeqCst);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2) {
        assert!(Instant::now() < deadline, "the poller never stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = w.read_events.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    assert!(
        last < total / 2,
        "read {last} of {total} lines for a client that stopped reading"
    );
    // Reading again, everything arrives, in order, once.
    let mut got = first.entries;
    got.extend(read_until(&mut stream, &lines[total - 1].1).await);
    let want: Vec<&str> = lines.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(messages(&got), want);
}

/// GetMetricData's answer for `input`: one point per period over the window, CPU 10 + i,
/// memory 50 + i, in two pages (PartialData, then Complete).
fn metric_pages() -> Rule {
    mock!(aws_sdk_cloudwatch::Client::get_metric_data).then_compute_output(|input| {
        let start = input.start_time().unwrap().to_millis().unwrap();
        let end = input.end_time().unwrap().to_millis().unwrap();
        let queries = input.metric_data_queries().to_vec();
        let period = queries[0].metric_stat().unwrap().period().unwrap() as i64 * 1000;
        let first_page = input.next_token().is_none();
        let points: Vec<i64> = (0..)
            .map(|i| start + i * period)
            .take_while(|p| *p < end)
            .collect();
        let half = points.len() / 2;
        let slice = if first_page {
            &points[..half]
        } else {
            &points[half..]
        };
        let mut output = GetMetricDataOutput::builder();
        for query in &queries {
            let base = if query.id() == Some("cpu") {
                10.0
            } else {
                50.0
            };
            let mut result = MetricDataResult::builder()
                .id(query.id().unwrap())
                .status_code(if first_page {
                    StatusCode::PartialData
                } else {
                    StatusCode::Complete
                });
            for p in slice {
                let i = ((p - start) / period) as f64;
                result = result
                    .timestamps(DateTime::from_millis(*p))
                    .values(base + i);
            }
            output = output.metric_data_results(result.build());
        }
        if first_page {
            output = output.next_token("page-2");
        }
        output.build()
    })
}

fn mocked_metrics(rules: &[&Rule], mode: RuleMode) -> AwsMetrics {
    let mut interceptor = MockResponseInterceptor::new().rule_mode(mode);
    for rule in rules {
        interceptor = interceptor.with_rule(rule);
    }
    let config = aws_sdk_cloudwatch::Config::builder()
        .behavior_version(aws_sdk_cloudwatch::config::BehaviorVersion::latest())
        .region(aws_sdk_cloudwatch::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_cloudwatch::config::Credentials::new(
            "testing", "testing", None, None, "mock",
        ))
        // Our classification is under test, not the SDK's own retries.
        .retry_config(aws_sdk_cloudwatch::config::retry::RetryConfig::disabled())
        .http_client(aws_smithy_mocks::create_mock_http_client())
        .interceptor(interceptor)
        .build();
    AwsMetrics::from_client(aws_sdk_cloudwatch::Client::from_conf(config))
}

#[tokio::test]
async fn the_metrics_adapter_follows_pages_and_classifies_failures() {
    let pages = metric_pages();
    let metrics = mocked_metrics(&[&pages], RuleMode::MatchAny);
    let start = 1_700_000_000_000;
    let usage = metrics
        .service_utilization("cluster", "svc", start, start + 3_600_000, 300)
        .await
        .unwrap();
    assert_eq!(pages.num_calls(), 2, "both pages read");
    assert_eq!(usage.cpu.len(), 12);
    assert_eq!(usage.cpu[0], (start, 10.0));
    assert_eq!(usage.cpu[11], (start + 11 * 300_000, 21.0));
    assert_eq!(usage.memory[5], (start + 5 * 300_000, 55.0));

    // What is asked: the service's two AWS/ECS averages at the period.
    let asked = mock!(aws_sdk_cloudwatch::Client::get_metric_data)
        .match_requests(|input| {
            let queries = input.metric_data_queries();
            queries.len() == 2
                && queries.iter().all(|q| {
                    let stat = q.metric_stat().unwrap();
                    let metric = stat.metric().unwrap();
                    let dims: Vec<(&str, &str)> = metric
                        .dimensions()
                        .iter()
                        .map(|d| (d.name().unwrap(), d.value().unwrap()))
                        .collect();
                    metric.namespace() == Some("AWS/ECS")
                        && stat.stat() == Some("Average")
                        && stat.period() == Some(60)
                        && dims == [("ClusterName", "c1"), ("ServiceName", "s1")]
                })
                && matches!(
                    (
                        input.metric_data_queries()[0]
                            .metric_stat()
                            .unwrap()
                            .metric()
                            .unwrap()
                            .metric_name(),
                        input.metric_data_queries()[1]
                            .metric_stat()
                            .unwrap()
                            .metric()
                            .unwrap()
                            .metric_name()
                    ),
                    (Some("CPUUtilization"), Some("MemoryUtilization"))
                )
        })
        .then_output(|| GetMetricDataOutput::builder().build());
    let metrics = mocked_metrics(&[&asked], RuleMode::MatchAny);
    let empty = metrics
        .service_utilization("c1", "s1", start, start + 600_000, 60)
        .await
        .unwrap();
    assert!(empty.cpu.is_empty() && empty.memory.is_empty());
    assert_eq!(asked.num_calls(), 1);

    // Throttling is worth retrying; a Forbidden result is not; an InternalError result is.
    let throttled = mock!(aws_sdk_cloudwatch::Client::get_metric_data).then_error(|| {
        GetMetricDataError::generic(
            aws_smithy_types::error::ErrorMetadata::builder()
                .code("Throttling")
                .message("Rate exceeded")
                .build(),
        )
    });
    let error = mocked_metrics(&[&throttled], RuleMode::MatchAny)
        .service_utilization("c", "s", start, start + 600_000, 60)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Retryable, "{error}");
    for (status, kind) in [
        (StatusCode::Forbidden, ErrorKind::Fatal),
        (StatusCode::InternalError, ErrorKind::Retryable),
    ] {
        let answer = mock!(aws_sdk_cloudwatch::Client::get_metric_data).then_output(move || {
            GetMetricDataOutput::builder()
                .metric_data_results(
                    MetricDataResult::builder()
                        .id("cpu")
                        .status_code(status.clone())
                        .build(),
                )
                .build()
        });
        let error = mocked_metrics(&[&answer], RuleMode::MatchAny)
            .service_utilization("c", "s", start, start + 600_000, 60)
            .await
            .unwrap_err();
        assert_eq!(error.kind, kind, "{error}");
    }

    // A token handed back unchanged ends the scan instead of looping.
    let stuck = mock!(aws_sdk_cloudwatch::Client::get_metric_data)
        .then_output(|| GetMetricDataOutput::builder().next_token("same").build());
    let usage = mocked_metrics(&[&stuck], RuleMode::MatchAny)
        .service_utilization("c", "s", start, start + 600_000, 60)
        .await
        .unwrap();
    assert!(usage.cpu.is_empty());
    assert_eq!(stuck.num_calls(), 2);
}

#[tokio::test]
async fn resource_usage_reports_mocked_metrics_with_real_task_counts_and_database_size() {
    let mut w = world("use", |_| {}, Some(metric_pages())).await;
    // Some data in the tenant's database, as WordPress would have it.
    let name = w.name();
    let database = instance_manager::domain::naming::ResourceNames::derive(
        &instance_manager::domain::TenantId::parse(&w.tenant).unwrap(),
        Environment::Dev,
    )
    .database;
    let mut root = mysql_async::Conn::from_url(common::mysql_url())
        .await
        .unwrap();
    root.query_drop(format!(
        "CREATE TABLE `{database}`.wp_posts (id INT PRIMARY KEY AUTO_INCREMENT, body LONGTEXT)"
    ))
    .await
    .unwrap();
    for _ in 0..20 {
        root.query_drop(format!(
            "INSERT INTO `{database}`.wp_posts (body) VALUES (REPEAT('p', 100000))"
        ))
        .await
        .unwrap();
    }
    root.query_drop(format!("ANALYZE TABLE `{database}`.wp_posts"))
        .await
        .unwrap();
    let expected: u64 = root
        .exec_first(
            "SELECT CAST(SUM(DATA_LENGTH + INDEX_LENGTH) AS UNSIGNED) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
            (database.as_str(),),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(expected > 1_000_000, "{expected}");
    root.disconnect().await.unwrap();

    let usage =
        w.cp.instances
            .get_resource_usage(v1::GetResourceUsageRequest {
                name: name.clone(),
                window: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                period: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner();
    assert!(usage.unavailable.is_empty(), "{:?}", usage.unavailable);
    assert_eq!(usage.name, w.name());
    assert_eq!(usage.period.unwrap().seconds, 600);
    let window =
        millis(usage.end_time.as_ref().unwrap()) - millis(usage.start_time.as_ref().unwrap());
    assert_eq!(window, 3_600_000);
    assert_eq!(usage.cpu_utilization.len(), 6);
    assert_eq!(usage.memory_utilization.len(), 6);
    assert_eq!(usage.cpu_utilization[0].value, 10.0);
    assert_eq!(usage.memory_utilization[5].value, 55.0);
    assert_eq!(
        millis(usage.cpu_utilization[0].time.as_ref().unwrap()),
        millis(usage.start_time.as_ref().unwrap())
    );

    // Task counts as ECS (moto) reports them.
    let ecs = aws_sdk_ecs::Client::new(&w.cp.sdk(Environment::Dev));
    let cluster = w.cp.config.environments[0].platform.cluster.clone();
    let service = ecs
        .describe_services()
        .cluster(&cluster)
        .services(format!("bbws-dev-{}", w.tenant))
        .send()
        .await
        .unwrap()
        .services()[0]
        .clone();
    assert_eq!(usage.desired_tasks, service.desired_count());
    assert_eq!(usage.running_tasks, service.running_count());
    assert_eq!(usage.desired_tasks, 2);
    // The database size as information_schema reports it.
    assert_eq!(usage.database_size_bytes as u64, expected);

    // Bad windows and periods are named.
    for (window, period, field) in [
        (0, 60, "window"),
        (3600, 90, "period"),
        (600, 1200, "period"),
    ] {
        let status =
            w.cp.instances
                .get_resource_usage(v1::GetResourceUsageRequest {
                    name: name.clone(),
                    window: Some(prost_types::Duration {
                        seconds: window,
                        nanos: 0,
                    }),
                    period: Some(prost_types::Duration {
                        seconds: period,
                        nanos: 0,
                    }),
                })
                .await
                .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), [field]);
    }
}

#[tokio::test]
async fn resource_usage_without_cloudwatch_names_what_is_missing() {
    // No mock: the real SDK against moto, which cannot answer CloudWatch's protocol.
    let mut w = world("usenocw", |_| {}, None).await;
    let name = w.name();
    let usage =
        w.cp.instances
            .get_resource_usage(v1::GetResourceUsageRequest {
                name,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(usage.desired_tasks, 2);
    assert!(usage.database_size_bytes >= 0);
    let missing: Vec<&str> = usage
        .unavailable
        .iter()
        .map(|u| u.split(':').next().unwrap())
        .collect();
    assert_eq!(
        missing,
        ["cpu_utilization", "memory_utilization"],
        "{:?}",
        usage.unavailable
    );
    assert!(usage.cpu_utilization.is_empty());
    assert_eq!(usage.period.unwrap().seconds, 300);
}
