//! Server streams: WatchOperation, WatchInstance, and WaitOperation (which waits the same
//! way). One producer task per stream feeds a bounded channel; it reads the store (so events
//! written by any replica are seen), takes this replica's events from its in-process bus as
//! they are published, and stops when the client goes away, when the stream is complete,
//! or when the server shuts down.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::domain::{InstanceName, OperationEvent, OperationId, Violations};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;

use super::error::{ApiError, ApiResult, reason};
use super::{Api, convert};

/// One store reader per watched operation in this replica, shared by all its watchers: it
/// polls the store every `watch_poll` (events written by any replica), passes on the events
/// this replica's engine publishes as they come (reading the store only when one is out of
/// order), and stops when the last watcher is gone.
#[derive(Clone, Default)]
pub struct OperationFeeds {
    feeds: Arc<Mutex<HashMap<OperationId, broadcast::Sender<OperationEvent>>>>,
}

impl OperationFeeds {
    /// Operations with a running feed (for tests and metrics).
    pub fn active(&self) -> usize {
        self.feeds.lock().expect("feeds lock").len()
    }

    /// Subscribes to `id`'s feed, starting one that reads from `from_seq` if none runs.
    fn subscribe(
        &self,
        api: &Api,
        id: &OperationId,
        from_seq: u64,
    ) -> broadcast::Receiver<OperationEvent> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(sender) = feeds.get(id) {
            return sender.subscribe();
        }
        // Lagging watchers lose events from the channel, then re-read the store.
        let (sender, receiver) = broadcast::channel(256);
        feeds.insert(id.clone(), sender.clone());
        let span = tracing::debug_span!("operation_feed", operation = %id);
        // Subscribed before the feed's first read, so no event published from here on is
        // missed.
        let local = api.bus.subscribe();
        tokio::spawn(tracing::Instrument::instrument(
            self.clone()
                .run(api.clone(), id.clone(), sender, local, from_seq),
            span,
        ));
        receiver
    }

    async fn run(
        self,
        api: Api,
        id: OperationId,
        sender: broadcast::Sender<OperationEvent>,
        mut local: broadcast::Receiver<OperationEvent>,
        mut next: u64,
    ) {
        // The bus is listened to while a store read is in flight (a read at a busy store
        // must not hold up the events this replica publishes). At most one read at a time;
        // `again` asks for another as soon as it ends (a full page, or a gap the bus showed
        // that the read may have started before).
        let mut reading = Some(read_events(&api, &id, next));
        let mut again = false;
        let mut bus_open = true;
        let poll = tokio::time::sleep(api.settings.watch_poll);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                () = api.shutdown.cancelled() => {
                    self.feeds.lock().expect("feeds lock").remove(&id);
                    return;
                }
                result = async { reading.as_mut().expect("a read in flight").await },
                    if reading.is_some() =>
                {
                    reading = None;
                    match result {
                        Ok(batch) => {
                            again |= batch.len() == PAGE;
                            // What the bus delivered meanwhile is not sent twice.
                            for event in batch {
                                if event.seq >= next {
                                    next = event.seq + 1;
                                    let _ = sender.send(event);
                                }
                            }
                        }
                        // Watchers keep waiting; the next round reads again.
                        Err(error) => {
                            again = false;
                            tracing::warn!(%error, "cannot read operation events");
                        }
                    }
                    if std::mem::take(&mut again) {
                        reading = Some(read_events(&api, &id, next));
                        continue;
                    }
                    {
                        let mut feeds = self.feeds.lock().expect("feeds lock");
                        if sender.receiver_count() == 0 {
                            feeds.remove(&id);
                            return;
                        }
                    }
                    poll.as_mut()
                        .reset(tokio::time::Instant::now() + api.settings.watch_poll);
                }
                () = &mut poll, if reading.is_none() => {
                    reading = Some(read_events(&api, &id, next));
                }
                event = local.recv(), if bus_open => match event {
                    Ok(event) if event.operation != id || event.seq < next => {}
                    // The engine publishes an event once its transaction landed: the next
                    // one in order goes out without reading it back.
                    Ok(event) if event.seq == next => {
                        next += 1;
                        let _ = sender.send(event);
                    }
                    Err(broadcast::error::RecvError::Closed) => bus_open = false,
                    // A gap (an event this replica did not publish came first) or a lag:
                    // read the store now.
                    _ if reading.is_some() => again = true,
                    _ => reading = Some(read_events(&api, &id, next)),
                },
            }
        }
    }
}

/// A feed's store read of `id`'s events from `from` (one page).
fn read_events(
    api: &Api,
    id: &OperationId,
    from: u64,
) -> Pin<Box<dyn Future<Output = crate::store::StoreResult<Vec<OperationEvent>>> + Send>> {
    let (store, id) = (api.store.clone(), id.clone());
    Box::pin(async move { store.read_events(&id, from, PAGE).await })
}

const PAGE: usize = 100;

pub type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Api {
    /// Sleeps until something might have changed: a local event, the poll interval, or
    /// shutdown (returns false then).
    async fn wait_for_change(
        &self,
        events: &mut tokio::sync::broadcast::Receiver<crate::domain::OperationEvent>,
    ) -> bool {
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            _ = events.recv() => true,
            () = tokio::time::sleep(self.settings.watch_poll) => true,
        }
    }

    /// A permit for one more open stream, or RESOURCE_EXHAUSTED when this replica serves
    /// `max_streams` already. The stream holds it until it ends.
    pub(super) fn stream_permit(&self) -> ApiResult<OwnedSemaphorePermit> {
        self.streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::ResourceExhausted {
                reason: reason::TOO_MANY_STREAMS,
                message: format!(
                    "this server has {} streams open, its limit; retry later",
                    self.settings.max_streams
                ),
                metadata: vec![("max_streams", self.settings.max_streams.to_string())],
            })
    }

    /// Has the operation ended with event `next - 1`: done, with no later event (a retry
    /// appends one and makes it PENDING again in the same transaction)?
    async fn ended_before(&self, id: &OperationId, next: u64) -> ApiResult<bool> {
        Ok(match self.store.get_operation(id).await? {
            Some(operation) => operation.status.is_done() && operation.last_event_seq < next,
            None => true,
        })
    }

    /// WatchOperation. Each watcher replays the recorded events from the store itself, then
    /// follows the one feed this replica keeps per watched operation. It ends after a
    /// terminal event only when no later attempt (RetryOperation) follows it; a finished
    /// operation watched from past its last event ends at once, with no event.
    pub async fn watch_operation(
        &self,
        request: v1::WatchOperationRequest,
    ) -> ApiResult<RpcStream<v1::OperationEvent>> {
        let id = OperationId::from_name(&request.name)
            .map_err(|e| ApiError::invalid("name", e.to_string()))?;
        if request.from_sequence < 0 {
            return Err(ApiError::invalid("from_sequence", "must not be negative"));
        }
        let operation = self.get_operation_by_name(&request.name).await?;
        let mut next = u64::try_from(request.from_sequence).unwrap_or(0).max(1);
        if operation.status.is_done() && next > operation.last_event_seq {
            return Ok(Box::pin(futures::stream::empty()));
        }
        let permit = self.stream_permit()?;
        let mut feed = self
            .feeds
            .subscribe(self, &id, operation.last_event_seq + 1);
        let (sender, receiver) = mpsc::channel(64);
        let api = self.clone();
        let span = tracing::info_span!("watch_operation", operation = %id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _permit = permit;
                let send = |event: &OperationEvent| sender.send(Ok(convert::event_to_proto(event)));
                let fail = |error: ApiError| sender.send(Err(Status::from(error)));
                loop {
                    // Catch up from the store: the replay, or a gap the feed skipped.
                    let mut last_terminal = false;
                    loop {
                        let batch = match api.store.read_events(&id, next, PAGE).await {
                            Ok(batch) => batch,
                            Err(error) => {
                                let _ = fail(error.into()).await;
                                return;
                            }
                        };
                        for event in &batch {
                            if send(event).await.is_err() {
                                return; // the client went away
                            }
                            next = event.seq + 1;
                            last_terminal = event.terminal;
                        }
                        if batch.len() < PAGE {
                            break;
                        }
                    }
                    if last_terminal {
                        match api.ended_before(&id, next).await {
                            Ok(true) => return,
                            Ok(false) => {}
                            Err(error) => {
                                let _ = fail(error).await;
                                return;
                            }
                        }
                    }
                    // Follow the feed until it skips ahead of us.
                    loop {
                        let event = tokio::select! {
                            () = sender.closed() => return,
                            () = api.shutdown.cancelled() => {
                                let _ = fail(ApiError::ShuttingDown(format!(
                                    "server shutting down; resume with from_sequence={next}"
                                )))
                                .await;
                                return;
                            }
                            event = feed.recv() => event,
                        };
                        match event {
                            Ok(event) if event.seq < next => continue,
                            Ok(event) if event.seq == next => {
                                if send(&event).await.is_err() {
                                    return;
                                }
                                next += 1;
                                if event.terminal {
                                    match api.ended_before(&id, next).await {
                                        Ok(true) => return,
                                        Ok(false) => {}
                                        Err(error) => {
                                            let _ = fail(error).await;
                                            return;
                                        }
                                    }
                                }
                            }
                            // A gap, or we lagged behind the feed: read the store again.
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                            // The feed stops only when the server shuts down.
                            Err(broadcast::error::RecvError::Closed) => {
                                let _ = fail(ApiError::ShuttingDown(format!(
                                    "server shutting down; resume with from_sequence={next}"
                                )))
                                .await;
                                return;
                            }
                        }
                    }
                }
            },
            span,
        ));
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    pub async fn watch_instance(
        &self,
        request: v1::WatchInstanceRequest,
    ) -> ApiResult<RpcStream<v1::WatchInstanceResponse>> {
        let name = InstanceName::parse(&request.name)
            .map_err(|e| ApiError::invalid("name", e.to_string()))?;
        let first = self
            .store
            .get_instance(&name)
            .await?
            .ok_or_else(|| ApiError::instance_not_found(name.to_string()))?;
        let permit = self.stream_permit()?;
        let (sender, receiver) = mpsc::channel(16);
        let api = self.clone();
        let span = tracing::info_span!("watch_instance", instance = %name);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _permit = permit;
                let mut events = api.bus.subscribe();
                let mut last = first.clone();
                let response =
                    |instance: &crate::domain::Instance,
                     previous: Option<crate::domain::InstanceState>| {
                        v1::WatchInstanceResponse {
                            instance: Some(convert::instance_to_proto(instance)),
                            previous_state: previous
                                .map(convert::state_to_proto)
                                .unwrap_or(v1::InstanceState::Unspecified)
                                .into(),
                            change_time: Some(convert::timestamp(instance.state_changed_at)),
                            operation: instance
                                .current_operation
                                .as_ref()
                                .map(|id| id.name())
                                .unwrap_or_default(),
                        }
                    };
                if sender.send(Ok(response(&first, None))).await.is_err() {
                    return;
                }
                while !last.state.is_terminal() {
                    tokio::select! {
                        () = sender.closed() => return,
                        more = api.wait_for_change(&mut events) => if !more {
                            let _ = sender.send(Err(ApiError::ShuttingDown("server shutting down".into()).into())).await;
                            return;
                        }
                    }
                    let current = match api.store.get_instance(&name).await {
                        Ok(Some(instance)) => instance,
                        Ok(None) => return,
                        Err(error) => {
                            let _ = sender.send(Err(Status::from(ApiError::from(error)))).await;
                            return;
                        }
                    };
                    if current.state != last.state
                        && sender
                            .send(Ok(response(&current, Some(last.state))))
                            .await
                            .is_err()
                    {
                        return;
                    }

                    last = current;
                }
            },
            span,
        ));
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    /// WaitOperation: returns once the operation is done or `timeout` (default and at most
    /// 60 s) has passed, whichever is first.
    pub async fn wait_operation(
        &self,
        request: lro::WaitOperationRequest,
    ) -> ApiResult<lro::Operation> {
        let timeout = match request.timeout {
            None => Duration::from_secs(60),
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                let mut violations = Violations::new();
                violations.add("timeout", "must not be negative");
                return Err(ApiError::Invalid(violations));
            }
            Some(t) => Duration::new(t.seconds as u64, t.nanos as u32).min(Duration::from_secs(60)),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.bus.subscribe();
        loop {
            let operation = self.get_operation_by_name(&request.name).await?;
            if operation.status.is_done() || tokio::time::Instant::now() >= deadline {
                return self.render_operation(&operation).await;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                more = self.wait_for_change(&mut events) => if !more {
                    return self.render_operation(&operation).await;
                }
            }
        }
    }
}
