//! Events that could not be published yet: kept in order, bounded, and sent
//! when the API answers again, so an outage delays a VM's Events (an exit, a
//! restart) instead of losing them. An Event carries the time it was
//! published, not the time it happened; its note says what happened.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// At most this many Events wait; beyond it the oldest are dropped (and counted).
pub const CAPACITY: usize = 1024;

/// How long one publish may take before the rest waits for the next flush.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// One Event to publish about one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// The object.
    pub reference: ObjectReference,
    /// A Warning (else Normal).
    pub warning: bool,
    /// The Event's reason.
    pub reason: String,
    /// What happened.
    pub note: String,
    /// The Event's action.
    pub action: String,
}

impl Pending {
    fn event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(self.note.clone()),
            action: self.action.clone(),
            secondary: None,
        }
    }
}

/// The Events waiting to be published, oldest first.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Pending>>,
    /// Held by whoever is publishing from the queue.
    draining: tokio::sync::Mutex<()>,
    dropped: AtomicU64,
}

impl Outbox {
    /// Queues `event` after any that wait, and publishes what it can.
    pub async fn publish(&self, recorder: &Recorder, event: Pending) {
        self.push(event);
        self.flush(recorder).await;
    }

    fn push(&self, event: Pending) {
        let mut queue = lock(&self.queue);
        queue.push_back(event);
        if queue.len() > CAPACITY {
            queue.pop_front();
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped = n,
                "too many Events wait for the API; dropping the oldest"
            );
        }
    }

    /// Publishes waiting Events in order until one fails (it stays first).
    /// Returns at once if another task is publishing them.
    pub async fn flush(&self, recorder: &Recorder) {
        let Ok(_draining) = self.draining.try_lock() else {
            return;
        };
        loop {
            let Some(next) = lock(&self.queue).front().cloned() else {
                return;
            };
            match tokio::time::timeout(
                PUBLISH_TIMEOUT,
                recorder.publish(&next.event(), &next.reference),
            )
            .await
            {
                Ok(Ok(())) => {
                    lock(&self.queue).pop_front();
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot publish an Event; it waits");
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
