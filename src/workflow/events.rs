//! In-process fan-out of operation events for low latency. The store stays the source of
//! truth (watchers on another replica read it); this bus only wakes local watchers early.

use tokio::sync::broadcast;

use crate::domain::OperationEvent;

#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<OperationEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        // Lagging receivers lose events, which is fine: they re-read the store.
        let (sender, _) = broadcast::channel(1024);
        Self { sender }
    }

    pub fn publish(&self, event: OperationEvent) {
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<OperationEvent> {
        self.sender.subscribe()
    }
}
