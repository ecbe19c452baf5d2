//! Server streams: WatchOperation, WatchInstance, and WaitOperation (which waits the same
//! way). One producer task per stream feeds a bounded channel; it reads the store (so events
//! written by any replica are seen), is woken early by local events, and stops when the
//! client goes away, when the stream is complete, or when the server shuts down.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::domain::{InstanceName, OperationId, Violations};
use crate::proto::google_longrunning as lro;
use crate::proto::v1;

use super::error::{ApiError, ApiResult};
use super::{Api, convert};

/// How often a watcher re-reads the store when nothing local woke it; bounds the latency
/// of events written by another replica.
const STORE_POLL: Duration = Duration::from_millis(250);
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
            () = tokio::time::sleep(STORE_POLL) => true,
        }
    }

    pub async fn watch_operation(
        &self,
        request: v1::WatchOperationRequest,
    ) -> ApiResult<RpcStream<v1::OperationEvent>> {
        let id = OperationId::from_name(&request.name)
            .map_err(|e| ApiError::invalid("name", e.to_string()))?;
        if request.from_sequence < 0 {
            return Err(ApiError::invalid("from_sequence", "must not be negative"));
        }
        self.get_operation_by_name(&request.name).await?;
        let (sender, receiver) = mpsc::channel(64);
        let api = self.clone();
        let mut next = u64::try_from(request.from_sequence).unwrap_or(0).max(1);
        let span = tracing::info_span!("watch_operation", operation = %id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut events = api.bus.subscribe();
                loop {
                    let batch = match api.store.read_events(&id, next, PAGE).await {
                        Ok(batch) => batch,
                        Err(error) => {
                            let _ = sender.send(Err(Status::from(ApiError::from(error)))).await;
                            return;
                        }
                    };
                    for event in &batch {
                        next = event.seq + 1;
                        if sender
                            .send(Ok(convert::event_to_proto(event)))
                            .await
                            .is_err()
                        {
                            return; // the client went away
                        }
                        if event.terminal {
                            return;
                        }
                    }
                    if batch.len() == PAGE {
                        continue;
                    }
                    tokio::select! {
                        () = sender.closed() => return,
                        more = api.wait_for_change(&mut events) => if !more {
                            let _ = sender
                                .send(Err(Status::unavailable(format!(
                                    "server shutting down; resume with from_sequence={next}"
                                ))))
                                .await;
                            return;
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
        let (sender, receiver) = mpsc::channel(16);
        let api = self.clone();
        let span = tracing::info_span!("watch_instance", instance = %name);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
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
                            let _ = sender.send(Err(Status::unavailable("server shutting down"))).await;
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
