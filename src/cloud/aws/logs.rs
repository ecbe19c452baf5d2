//! The instances' container logs in the environment's CloudWatch Logs group, read with
//! FilterLogEvents (one page per call; the paging and tailing logic is in
//! [`crate::logs`]).
//!
//! Live tail (StartLiveTail) is deliberately not used: AWS samples a session's events once
//! they pass 500 per second (`isSampled`), which breaks the no-gaps promise of TailLogs,
//! and an account may hold only a few sessions at once.

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_cloudwatchlogs::Client;

use crate::cloud::error::classify;
use crate::cloud::{CloudResult, LogEvent, LogPage, LogQuery, Logs};

pub struct AwsLogs {
    client: Client,
}

impl AwsLogs {
    pub fn new(sdk: &SdkConfig) -> Self {
        Self {
            client: super::traced_client!(aws_sdk_cloudwatchlogs, sdk),
        }
    }
}

#[async_trait]
impl Logs for AwsLogs {
    async fn filter_events(&self, query: &LogQuery) -> CloudResult<LogPage> {
        let mut request = self
            .client
            .filter_log_events()
            .log_group_name(&query.group)
            .start_time(query.start_ms)
            .limit(query.limit.clamp(1, 10_000) as i32)
            .set_next_token(query.token.clone());
        if !query.stream_prefix.is_empty() {
            request = request.log_stream_name_prefix(&query.stream_prefix);
        }
        // CloudWatch's end time is inclusive; ours is exclusive.
        if let Some(end) = query.end_ms {
            request = request.end_time(end.saturating_sub(1));
        }
        if !query.filter.is_empty() {
            request = request.filter_pattern(&query.filter);
        }
        let out = request
            .send()
            .await
            .map_err(|e| classify("logs:FilterLogEvents", &e))?;
        // A stream outside the prefix is never the instance's, whatever the service
        // answered (moto ignores the prefix).
        let events = out
            .events()
            .iter()
            .filter(|event| {
                event
                    .log_stream_name()
                    .unwrap_or_default()
                    .starts_with(&query.stream_prefix)
            })
            .map(|event| LogEvent {
                timestamp_ms: event.timestamp().unwrap_or_default(),
                ingestion_ms: event.ingestion_time().unwrap_or_default(),
                stream: event.log_stream_name().unwrap_or_default().to_owned(),
                message: event.message().unwrap_or_default().to_owned(),
                event_id: event.event_id().unwrap_or_default().to_owned(),
            })
            .collect();
        Ok(LogPage {
            events,
            next_token: out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }
}
