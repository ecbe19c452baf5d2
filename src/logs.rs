//! An instance's container logs: pages of a historical query (QueryLogs) and a live tail
//! (TailLogs), both on [`Logs::filter_events`].
//!
//! An instance's logs are the streams `{tenant}/…` of its environment's log group (the
//! ECS `awslogs` driver names them `{prefix}/{container}/{task-id}` and the prefix is the
//! tenant id; one instance per tenant and environment).
//!
//! The tail polls. Each round reads from `newest - lookback` (never before `since`) to
//! now and skips the events it has already sent (by event id), so an event that reaches
//! CloudWatch late, with a timestamp earlier than others already sent, is still sent once,
//! as long as it is at most `lookback` older than the newest event seen. Events go out in
//! the order they are found: oldest first within a round; a late event after the newer
//! ones sent before it. The ids remembered are those inside the lookback window, at most
//! `max_seen` of them (past that the window shrinks), so memory stays bounded, and each
//! batch waits for room in a bounded channel, so a client that stops reading stops the
//! polling instead of growing a buffer.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cloud::{CloudError, CloudResult, LogEvent, LogQuery, Logs};

/// Tuning of QueryLogs and TailLogs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// How often a following tail asks for new events.
    pub poll_interval: Duration,
    /// How late (behind the newest event seen) an event may arrive and still be tailed.
    pub lookback: Duration,
    /// Events per FilterLogEvents call of a tail, and so at most per streamed message.
    pub tail_page: u32,
    /// Messages a tail may have ready for a client that is not reading (the bounded
    /// channel between the poller and the gRPC stream).
    pub tail_buffer: usize,
    /// Event ids a tail remembers at most.
    pub max_seen: usize,
    /// FilterLogEvents calls one QueryLogs page may take (empty pages with a token are
    /// normal: CloudWatch scans a slice of the range per call).
    pub max_calls_per_page: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            lookback: Duration::from_secs(5 * 60),
            tail_page: 500,
            tail_buffer: 8,
            max_seen: 100_000,
            max_calls_per_page: 20,
        }
    }
}

impl LogSettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            poll_interval: Duration::from_millis(config.tail_poll_interval_ms),
            lookback: Duration::from_secs(config.tail_lookback_secs),
            tail_page: config.tail_page_events,
            tail_buffer: config.tail_buffer,
            ..Self::default()
        }
    }
}

/// Where an instance's logs are and which of them to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSource {
    pub group: String,
    pub stream_prefix: String,
    pub filter: String,
}

impl LogSource {
    /// The streams of `tenant`'s tasks in `group` (see the module documentation).
    pub fn for_tenant(group: &str, log_stream_prefix: &str, filter: &str) -> Self {
        Self {
            group: group.to_owned(),
            // The slash keeps tenant `acme` from reading `acme-corp/…`.
            stream_prefix: format!("{log_stream_prefix}/"),
            filter: filter.to_owned(),
        }
    }
}

/// Longest filter pattern CloudWatch Logs accepts.
pub const MAX_FILTER_LEN: usize = 1024;

/// Checks what can be checked of a filter pattern without CloudWatch (which has the last
/// word): its length, no control characters, balanced quotes and brackets.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.len() > MAX_FILTER_LEN {
        return Err(format!("must be at most {MAX_FILTER_LEN} bytes"));
    }
    if filter.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    let mut open: Vec<char> = Vec::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in filter.chars() {
        if in_quotes {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(want) {
                    return Err(format!("unbalanced {c:?}"));
                }
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err("unterminated quoted term".into());
    }
    if let Some(c) = open.pop() {
        return Err(format!("unclosed {c:?}"));
    }
    Ok(())
}

/// One page of a historical query over `[start_ms, end_ms)`, oldest first: at most `limit`
/// events, and the FilterLogEvents token to continue from (`None` at the end). Follows
/// CloudWatch's tokens through empty pages, at most `settings.max_calls_per_page` calls;
/// a token handed back unchanged ends the scan. A missing log group has no events.
pub async fn query_page(
    logs: &dyn Logs,
    source: &LogSource,
    start_ms: i64,
    end_ms: i64,
    limit: usize,
    mut token: Option<String>,
    settings: &LogSettings,
) -> CloudResult<(Vec<LogEvent>, Option<String>)> {
    let mut events = Vec::new();
    for _ in 0..settings.max_calls_per_page.max(1) {
        let want = limit.saturating_sub(events.len());
        let query = LogQuery {
            group: source.group.clone(),
            stream_prefix: source.stream_prefix.clone(),
            start_ms,
            end_ms: Some(end_ms),
            filter: source.filter.clone(),
            limit: u32::try_from(want).unwrap_or(u32::MAX).clamp(1, 10_000),
            token: token.clone(),
        };
        let page = match logs.filter_events(&query).await {
            Ok(page) => page,
            Err(error) if error.is_not_found() => return Ok((events, None)),
            Err(error) => return Err(error),
        };
        let mut page_events = page.events;
        // CloudWatch interleaves the streams by time; an emulator may not.
        page_events
            .sort_by(|a, b| (a.timestamp_ms, &a.event_id).cmp(&(b.timestamp_ms, &b.event_id)));
        events.extend(page_events);
        match page.next_token {
            Some(next) if token.as_deref() != Some(next.as_str()) => token = Some(next),
            _ => return Ok((events, None)),
        }
        if events.len() >= limit {
            break;
        }
    }
    events.truncate(limit);
    Ok((events, token))
}

/// What to tail.
#[derive(Debug, Clone)]
pub struct TailSpec {
    pub source: LogSource,
    /// Events from this time (milliseconds since the Unix epoch).
    pub since_ms: i64,
    /// Keep polling; otherwise end once everything before the start of the tail is sent.
    pub follow: bool,
}

/// Why a tail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEnd {
    /// Not following, and everything up to the start of the tail was sent.
    CaughtUp,
    /// The receiver went away.
    Closed,
    /// The server is shutting down; a new tail from `resume_since_ms` (the newest event
    /// sent, or `since`) continues without gaps (it may repeat events of that millisecond).
    Shutdown { resume_since_ms: i64 },
    /// CloudWatch Logs failed (and kept failing, if it was worth retrying).
    Failed(CloudError),
}

/// Consecutive retryable failures a tail tolerates before it gives up.
const MAX_RETRIES: u32 = 8;

/// The ids of events sent, ordered by timestamp so that old ones can be forgotten.
#[derive(Default)]
struct Seen {
    ids: BTreeSet<(i64, String)>,
}

impl Seen {
    /// Records the event; false if it was seen before. The stream is part of the key:
    /// ids are unique in a log group on AWS, but moto numbers them per stream.
    fn first_time(&mut self, event: &LogEvent) -> bool {
        let key = format!("{}\u{0}{}", event.stream, event.event_id);
        self.ids.insert((event.timestamp_ms, key))
    }

    /// Forgets events before `floor` (never read again); if more than `max` remain, also
    /// the oldest timestamps, returning the new floor (events before it are not read).
    fn prune(&mut self, floor: i64, max: usize) -> i64 {
        self.ids = self.ids.split_off(&(floor, String::new()));
        let mut floor = floor;
        while self.ids.len() > max {
            let Some((oldest, _)) = self.ids.first().cloned() else {
                break;
            };
            floor = oldest + 1;
            self.ids = self.ids.split_off(&(floor, String::new()));
        }
        floor
    }
}

/// Tails `spec` into `sender`, each batch (oldest first, at most `settings.tail_page`
/// events) mapped by `wrap`. Waits for room in the channel before reading more, so a
/// receiver that stops reading stops the polling. Returns why it ended; the caller tells
/// the receiver.
pub async fn tail<T, E>(
    logs: &dyn Logs,
    spec: &TailSpec,
    settings: &LogSettings,
    sender: &mpsc::Sender<Result<T, E>>,
    wrap: impl Fn(Vec<LogEvent>) -> T,
    shutdown: &CancellationToken,
) -> TailEnd {
    let started_ms = now_ms();
    let lookback_ms = i64::try_from(settings.lookback.as_millis()).unwrap_or(i64::MAX);
    let mut seen = Seen::default();
    let mut floor = spec.since_ms;
    let mut newest = spec.since_ms;
    let mut failures = 0u32;
    loop {
        let from = floor.max(newest.saturating_sub(lookback_ms));
        let mut token: Option<String> = None;
        let mut round_done = false;
        while !round_done {
            let query = LogQuery {
                group: spec.source.group.clone(),
                stream_prefix: spec.source.stream_prefix.clone(),
                start_ms: from,
                // Not following: what existed when the tail started.
                end_ms: (!spec.follow).then_some(started_ms),
                filter: spec.source.filter.clone(),
                limit: settings.tail_page.max(1),
                token: token.clone(),
            };
            let answer = tokio::select! {
                () = shutdown.cancelled() => return TailEnd::Shutdown { resume_since_ms: newest },
                () = sender.closed() => return TailEnd::Closed,
                answer = logs.filter_events(&query) => answer,
            };
            let page = match answer {
                Ok(page) => {
                    failures = 0;
                    page
                }
                // No log group (yet): nothing to send this round.
                Err(error) if error.is_not_found() => break,
                Err(error) if error.is_retryable() && failures < MAX_RETRIES => {
                    failures += 1;
                    tracing::warn!(%error, failures, "log poll failed; retrying");
                    let backoff = Duration::from_millis(250 * (1u64 << failures.min(6)));
                    tokio::select! {
                        () = shutdown.cancelled() => return TailEnd::Shutdown { resume_since_ms: newest },
                        () = sender.closed() => return TailEnd::Closed,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
                Err(error) => return TailEnd::Failed(error),
            };
            let mut fresh: Vec<LogEvent> = page
                .events
                .into_iter()
                .filter(|event| event.timestamp_ms >= from && seen.first_time(event))
                .collect();
            fresh.sort_by(|a, b| (a.timestamp_ms, &a.event_id).cmp(&(b.timestamp_ms, &b.event_id)));
            if let Some(last) = fresh.last() {
                newest = newest.max(last.timestamp_ms);
            }
            if !fresh.is_empty() {
                // Back-pressure: wait for room before reading the next page.
                let permit = tokio::select! {
                    () = shutdown.cancelled() => return TailEnd::Shutdown { resume_since_ms: newest },
                    permit = sender.reserve() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return TailEnd::Closed,
                    },
                };
                permit.send(Ok(wrap(fresh)));
            }
            match page.next_token {
                Some(next) if token.as_deref() != Some(next.as_str()) => token = Some(next),
                _ => round_done = true,
            }
        }
        if !spec.follow {
            return TailEnd::CaughtUp;
        }
        let next_from = floor.max(newest.saturating_sub(lookback_ms));
        floor = floor.max(seen.prune(next_from, settings.max_seen));
        tokio::select! {
            () = shutdown.cancelled() => return TailEnd::Shutdown { resume_since_ms: newest },
            () = sender.closed() => return TailEnd::Closed,
            () = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_for_what_cloudwatch_would_refuse() {
        for good in [
            "",
            "ERROR",
            "\"GET /wp-admin\"",
            "{ $.level = \"error\" }",
            "[ip, user, status=5*]",
            "?ERROR ?WARN",
            "\"a \\\" quote\"",
        ] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for bad in ["\"open", "{ $.a = 1", "[a, b", "a ] b", "x\ny"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert!(check_filter(&"a".repeat(MAX_FILTER_LEN + 1)).is_err());
    }

    fn event(ts: i64, id: &str) -> LogEvent {
        LogEvent {
            timestamp_ms: ts,
            event_id: id.into(),
            ..LogEvent::default()
        }
    }

    #[test]
    fn seen_ids_are_forgotten_below_the_floor_and_past_the_cap() {
        let mut seen = Seen::default();
        assert!(seen.first_time(&event(10, "a")));
        assert!(!seen.first_time(&event(10, "a")));
        assert!(seen.first_time(&event(10, "b")));
        assert!(seen.first_time(&event(20, "c")));
        assert!(seen.first_time(&event(30, "d")));
        assert_eq!(seen.prune(15, 10), 15);
        assert_eq!(seen.ids.len(), 2);
        // Over the cap: whole timestamps go, and the floor moves past them.
        assert!(seen.first_time(&event(30, "e")));
        assert_eq!(seen.prune(15, 2), 21);
        assert_eq!(
            seen.ids
                .iter()
                .map(|(_, id)| id.as_str())
                .collect::<Vec<_>>(),
            ["\u{0}d", "\u{0}e"]
        );
        // The same id in another stream is another event.
        let other = LogEvent {
            stream: "s2".into(),
            ..event(30, "d")
        };
        assert!(seen.first_time(&other));
    }

    #[test]
    fn a_tenant_source_does_not_reach_into_a_longer_tenant_name() {
        let source = LogSource::for_tenant("g", "acme", "");
        assert_eq!(source.stream_prefix, "acme/");
        assert!(!"acme-corp/wordpress/1".starts_with(&source.stream_prefix));
    }
}
