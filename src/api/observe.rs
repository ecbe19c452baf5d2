//! Reads that look inside an instance: QueryLogs, TailLogs (a server stream) and
//! GetResourceUsage. None is an operation; all read the cloud directly (see
//! [`crate::logs`] and [`crate::usage`] for what they read and how).

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cloud::{CloudEnv, CloudError, LogEvent};
use crate::domain::naming::ResourceNames;
use crate::domain::{Instance, InstanceName, InstanceState, Violations};
use crate::logs::{self, LogSource, TailEnd, TailSpec};
use crate::proto::v1;
use crate::usage;

use super::Api;
use super::error::{ApiError, ApiResult, reason};
use super::streams::RpcStream;

/// Where a QueryLogs page token continues: CloudWatch's token and the time range it was
/// issued for (resolved on the first page, so "now" does not move between pages).
#[derive(serde::Serialize, serde::Deserialize)]
struct LogCursor {
    token: String,
    start_ms: i64,
    end_ms: i64,
}

const DEFAULT_QUERY_RANGE_MS: i64 = 60 * 60 * 1000;

/// A proto timestamp in milliseconds since the Unix epoch, or a violation of `field`.
fn millis(
    value: Option<&prost_types::Timestamp>,
    field: &str,
    violations: &mut Violations,
) -> Option<i64> {
    let value = value?;
    // Years 1 to 9999, as google.protobuf.Timestamp defines them.
    if !(-62_135_596_800..=253_402_300_799).contains(&value.seconds)
        || !(0..1_000_000_000).contains(&value.nanos)
    {
        violations.add(field, "is not a valid timestamp");
        return None;
    }
    Some(value.seconds * 1000 + i64::from(value.nanos / 1_000_000))
}

fn duration(
    value: Option<&prost_types::Duration>,
    default: Duration,
    field: &str,
    violations: &mut Violations,
) -> Option<Duration> {
    let Some(value) = value else {
        return Some(default);
    };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        violations.add(field, "must be positive");
        return None;
    }
    Some(Duration::new(value.seconds as u64, value.nanos as u32))
}

fn timestamp_of(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn rfc3339(millis: i64) -> String {
    aws_smithy_types::DateTime::from_millis(millis)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| millis.to_string())
}

fn entry(event: LogEvent) -> v1::LogEntry {
    v1::LogEntry {
        time: Some(timestamp_of(event.timestamp_ms)),
        stream: event.stream,
        message: event.message,
        event_id: event.event_id,
    }
}

fn check_filter(filter: &str, violations: &mut Violations) {
    if let Err(why) = logs::check_filter(filter) {
        violations.add("filter", why);
    }
}

/// A failure of the log store as the client sees it: a refused filter is the client's
/// mistake; the rest is the environment's.
fn log_store_error(error: CloudError, filter: &str) -> ApiError {
    if error.is_retryable() {
        return ApiError::NoCloudAccess(format!("the log store is unavailable, retry: {error}"));
    }
    if !filter.is_empty() && error.message.contains("InvalidParameterException") {
        return ApiError::invalid(
            "filter",
            format!("refused by CloudWatch Logs: {}", error.message),
        );
    }
    ApiError::FailedPrecondition {
        reason: reason::ENVIRONMENT_UNAVAILABLE,
        message: format!("the log store refused the request: {error}"),
        metadata: Vec::new(),
    }
}

impl Api {
    async fn instance_named(&self, name: &InstanceName) -> ApiResult<Instance> {
        self.store
            .get_instance(name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))
    }

    /// The adapters of the instance's environment (which must be served here).
    async fn cloud_of(&self, instance: &Instance) -> ApiResult<CloudEnv> {
        let environment = instance.spec.environment;
        self.check_environment(environment)?;
        let Some(clouds) = &self.clouds else {
            return Err(ApiError::NoCloudAccess(
                "this replica has no cloud access (no environments configured); try another".into(),
            ));
        };
        clouds
            .env(environment)
            .await
            .map_err(|error| ApiError::FailedPrecondition {
                reason: reason::ENVIRONMENT_UNAVAILABLE,
                message: format!("environment {environment} cannot be reached: {error}"),
                metadata: vec![("environment", environment.to_string())],
            })
    }

    fn log_source(instance: &Instance, cloud: &CloudEnv, filter: &str) -> LogSource {
        let names = ResourceNames::derive(&instance.name.tenant, instance.spec.environment);
        LogSource::for_tenant(&cloud.platform.log_group, &names.log_stream_prefix, filter)
    }

    pub async fn query_logs(
        &self,
        request: v1::QueryLogsRequest,
    ) -> ApiResult<v1::QueryLogsResponse> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let start = millis(request.start_time.as_ref(), "start_time", &mut violations);
        let end = millis(request.end_time.as_ref(), "end_time", &mut violations);
        if let (Some(start), Some(end)) = (start, end)
            && end <= start
        {
            violations.add("end_time", "must be after start_time");
        }
        check_filter(&request.filter, &mut violations);
        let page_size = match self.page_size(request.page_size) {
            Ok(size) => size,
            Err(ApiError::Invalid(more)) => {
                violations.append(more);
                0
            }
            Err(other) => return Err(other),
        };
        let Some(name) = name else {
            return Err(ApiError::Invalid(violations));
        };
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations));
        }
        // A token belongs to the name, range and filter as sent (unset stays unset).
        let query = {
            let raw = serde_json::to_vec(&("logs", &request.name, start, end, &request.filter))
                .unwrap_or_default();
            format!("logs|{}", hex::encode(&Sha256::digest(raw)[..16]))
        };
        let cursor: Option<LogCursor> = self.page_cursor(&query, &request.page_token)?;
        let instance = self.instance_named(&name).await?;
        let cloud = self.cloud_of(&instance).await?;
        let source = Self::log_source(&instance, &cloud, &request.filter);
        let (start_ms, end_ms, token) = match cursor {
            Some(cursor) => (cursor.start_ms, cursor.end_ms, Some(cursor.token)),
            None => {
                let end_ms = end.unwrap_or_else(logs::now_ms);
                let start_ms = start.unwrap_or(end_ms - DEFAULT_QUERY_RANGE_MS);
                (start_ms, end_ms, None)
            }
        };
        let (events, next) = logs::query_page(
            cloud.logs.as_ref(),
            &source,
            start_ms,
            end_ms,
            page_size,
            token,
            &self.settings.logs,
        )
        .await
        .map_err(|error| log_store_error(error, &request.filter))?;
        Ok(v1::QueryLogsResponse {
            entries: events.into_iter().map(entry).collect(),
            next_page_token: next
                .map(|token| {
                    self.tokens.encode(
                        &query,
                        &LogCursor {
                            token,
                            start_ms,
                            end_ms,
                        },
                    )
                })
                .unwrap_or_default(),
        })
    }

    pub async fn tail_logs(
        &self,
        request: v1::TailLogsRequest,
    ) -> ApiResult<RpcStream<v1::TailLogsResponse>> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let since = millis(request.since.as_ref(), "since", &mut violations);
        check_filter(&request.filter, &mut violations);
        let (Some(name), true) = (name, violations.is_empty()) else {
            return Err(ApiError::Invalid(violations));
        };
        let instance = self.instance_named(&name).await?;
        let cloud = self.cloud_of(&instance).await?;
        let permit = self.stream_permit()?;
        let spec = TailSpec {
            source: Self::log_source(&instance, &cloud, &request.filter),
            since_ms: since.unwrap_or_else(logs::now_ms),
            follow: request.follow,
        };
        let settings = self.settings.logs;
        let (sender, receiver) = mpsc::channel(settings.tail_buffer.max(1));
        let shutdown = self.shutdown.clone();
        let filter = request.filter;
        let span = tracing::info_span!("tail_logs", instance = %name, follow = spec.follow);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _permit = permit;
                let end = logs::tail(
                    cloud.logs.as_ref(),
                    &spec,
                    &settings,
                    &sender,
                    |events| v1::TailLogsResponse {
                        entries: events.into_iter().map(entry).collect(),
                    },
                    &shutdown,
                )
                .await;
                tracing::debug!(?end, "tail ended");
                let last = match end {
                    TailEnd::CaughtUp | TailEnd::Closed => return,
                    TailEnd::Shutdown { resume_since_ms } => ApiError::ShuttingDown(format!(
                        "server shutting down; resume with since={}",
                        rfc3339(resume_since_ms)
                    )),
                    TailEnd::Failed(error) => log_store_error(error, &filter),
                };
                // A client that is not reading does not hold the task up.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    sender.send(Err(tonic::Status::from(last))),
                )
                .await;
            },
            span,
        ));
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    pub async fn get_resource_usage(
        &self,
        request: v1::GetResourceUsageRequest,
    ) -> ApiResult<v1::ResourceUsage> {
        let mut violations = Violations::new();
        let name = violations.check("name", InstanceName::parse(&request.name));
        let window = duration(
            request.window.as_ref(),
            usage::limits::DEFAULT_WINDOW,
            "window",
            &mut violations,
        );
        let period = duration(
            request.period.as_ref(),
            usage::limits::DEFAULT_PERIOD,
            "period",
            &mut violations,
        );
        if let (Some(window), Some(period)) = (window, period)
            && let Err((field, why)) = usage::check_window(window, period)
        {
            violations.add(field, why);
        }
        let (Some(name), Some(window), Some(period), true) =
            (name, window, period, violations.is_empty())
        else {
            return Err(ApiError::Invalid(violations));
        };
        let instance = self.instance_named(&name).await?;
        let no_resources = match instance.state {
            InstanceState::PendingProvisioning | InstanceState::Deprovisioned => true,
            InstanceState::Failed => instance.released || instance.resources.is_empty(),
            _ => false,
        };
        if no_resources {
            return Err(ApiError::FailedPrecondition {
                reason: reason::WRONG_STATE,
                message: format!(
                    "{} is {}; it has no resources to measure",
                    instance.name, instance.state
                ),
                metadata: vec![("state", instance.state.to_string())],
            });
        }
        let cloud = self.cloud_of(&instance).await?;
        let end_ms = logs::now_ms();
        let start_ms = end_ms - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let measured = usage::measure(
            &instance,
            &cloud,
            start_ms,
            end_ms,
            period,
            self.settings.health.overall,
        )
        .await;
        if !measured.unavailable.is_empty() {
            tracing::info!(instance = %instance.name, unavailable = ?measured.unavailable, "usage partly measured");
        }
        let points = |series: Vec<(i64, f64)>| {
            series
                .into_iter()
                .map(|(at, value)| v1::UsageDataPoint {
                    time: Some(timestamp_of(at)),
                    value,
                })
                .collect()
        };
        Ok(v1::ResourceUsage {
            name: instance.name.to_string(),
            start_time: Some(timestamp_of(start_ms)),
            end_time: Some(timestamp_of(end_ms)),
            period: Some(prost_types::Duration {
                seconds: i64::try_from(period.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            cpu_utilization: points(measured.utilization.cpu),
            memory_utilization: points(measured.utilization.memory),
            running_tasks: i32::try_from(measured.running_tasks).unwrap_or(i32::MAX),
            desired_tasks: i32::try_from(measured.desired_tasks).unwrap_or(i32::MAX),
            database_size_bytes: i64::try_from(measured.database_bytes).unwrap_or(i64::MAX),
            unavailable: measured.unavailable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_outside_the_proto_range_are_violations() {
        let mut violations = Violations::new();
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(
            millis(Some(&at(1, 5_000_000)), "t", &mut violations),
            Some(1005)
        );
        assert_eq!(millis(Some(&at(1, -1)), "t", &mut violations), None);
        assert_eq!(
            millis(Some(&at(300_000_000_000, 0)), "t", &mut violations),
            None
        );
        assert_eq!(violations.iter().count(), 2);
        assert_eq!(timestamp_of(-1), at(-1, 999_000_000));
    }
}
