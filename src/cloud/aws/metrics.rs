//! ECS service utilisation from CloudWatch metrics (GetMetricData).
//!
//! GetMetricData answers a slice at a time: a result may be `PartialData` with a
//! `NextToken` to continue, or `InternalError` (retry, from the token if there is one);
//! `Forbidden` means the caller may not read the metric. Every page is followed, at most
//! [`MAX_PAGES`] of them, and the points of both series are merged oldest first.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_cloudwatch::Client;
use aws_sdk_cloudwatch::types::{
    Dimension, Metric, MetricDataQuery, MetricDataResult, MetricStat, ScanBy, StatusCode,
};
use aws_smithy_types::DateTime;

use crate::cloud::error::classify;
use crate::cloud::{CloudError, CloudResult, ErrorKind, Metrics, ServiceUtilization};

/// GetMetricData calls one answer may take (each returns up to 100 800 points; ours ask for
/// a few thousand at most, so more pages mean CloudWatch is slicing its scan).
pub const MAX_PAGES: usize = 20;

const CPU: &str = "cpu";
const MEMORY: &str = "memory";

pub struct AwsMetrics {
    client: Client,
}

impl AwsMetrics {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self::from_client(super::traced_client!(aws_sdk_cloudwatch, sdk))
    }

    /// On a client built elsewhere (tests give one whose answers are mocked).
    pub fn from_client(client: Client) -> Self {
        Self { client }
    }
}

fn query(id: &str, metric: &str, cluster: &str, service: &str, period: i32) -> MetricDataQuery {
    let dimension = |name: &str, value: &str| Dimension::builder().name(name).value(value).build();
    MetricDataQuery::builder()
        .id(id)
        .metric_stat(
            MetricStat::builder()
                .metric(
                    Metric::builder()
                        .namespace("AWS/ECS")
                        .metric_name(metric)
                        .dimensions(dimension("ClusterName", cluster))
                        .dimensions(dimension("ServiceName", service))
                        .build(),
                )
                .period(period)
                .stat("Average")
                .build(),
        )
        .return_data(true)
        .build()
}

/// Adds a result's points to `series`; an error if the result says it failed.
fn absorb(result: &MetricDataResult, series: &mut BTreeMap<i64, f64>) -> CloudResult<()> {
    for (at, value) in result.timestamps().iter().zip(result.values()) {
        if let Ok(millis) = at.to_millis() {
            series.insert(millis, *value);
        }
    }
    let detail = || {
        result
            .messages()
            .iter()
            .map(|m| format!("{}: {}", m.code().unwrap_or("?"), m.value().unwrap_or("")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    match result.status_code() {
        Some(StatusCode::Forbidden) => Err(CloudError::fatal(format!(
            "cloudwatch:GetMetricData: {}: forbidden: {}",
            result.id().unwrap_or("?"),
            detail()
        ))),
        Some(StatusCode::InternalError) => Err(CloudError::new(
            ErrorKind::Retryable,
            format!(
                "cloudwatch:GetMetricData: {}: internal error: {}",
                result.id().unwrap_or("?"),
                detail()
            ),
        )),
        _ => Ok(()),
    }
}

#[async_trait]
impl Metrics for AwsMetrics {
    async fn service_utilization(
        &self,
        cluster: &str,
        service: &str,
        start_ms: i64,
        end_ms: i64,
        period_secs: u32,
    ) -> CloudResult<ServiceUtilization> {
        let period = i32::try_from(period_secs)
            .map_err(|_| CloudError::fatal("cloudwatch:GetMetricData: period too long"))?;
        let mut cpu = BTreeMap::new();
        let mut memory = BTreeMap::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let out = self
                .client
                .get_metric_data()
                .metric_data_queries(query(CPU, "CPUUtilization", cluster, service, period))
                .metric_data_queries(query(MEMORY, "MemoryUtilization", cluster, service, period))
                .start_time(DateTime::from_millis(start_ms))
                .end_time(DateTime::from_millis(end_ms))
                .scan_by(ScanBy::TimestampAscending)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| classify("cloudwatch:GetMetricData", &e))?;
            for result in out.metric_data_results() {
                match result.id() {
                    Some(CPU) => absorb(result, &mut cpu)?,
                    Some(MEMORY) => absorb(result, &mut memory)?,
                    _ => {}
                }
            }
            match out.next_token().filter(|t| !t.is_empty()) {
                // A token handed back unchanged would loop forever: the scan is over.
                Some(next) if token.as_deref() != Some(next) => token = Some(next.to_owned()),
                _ => {
                    return Ok(ServiceUtilization {
                        cpu: cpu.into_iter().collect(),
                        memory: memory.into_iter().collect(),
                    });
                }
            }
        }
        Err(CloudError::new(
            ErrorKind::Retryable,
            format!("cloudwatch:GetMetricData: still paging after {MAX_PAGES} pages"),
        ))
    }
}
