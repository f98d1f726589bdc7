//! What every reconcile shares: the client, the caches, the placement lock,
//! the event recorder, metrics, the error policy's failure counts and settings.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use runv_crds::retry::Retry;
use runv_crds::{MicroVM, SecureWorkload};
use tokio::sync::{Mutex, watch};

use crate::metrics::Metrics;
use crate::nodes;
use crate::placement::Bound;

/// Field manager of every write the operator makes.
pub use runv_crds::contract::OPERATOR_MANAGER as MANAGER;

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the agents' Leases (and of the operator's own).
    pub lease_namespace: String,
    /// How long after an agent's Lease expired its node is fenced.
    pub fence_after: Duration,
    /// Whether the operator fences nodes itself (otherwise an administrator or
    /// a fencing system adds the taint). Off by default: see
    /// [`crate::fencing`] for when it may fire.
    pub auto_fence: bool,
    /// How often an unschedulable MicroVM is retried without any trigger.
    pub retry_unschedulable: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_namespace: "runv-system".into(),
            fence_after: Duration::from_secs(300),
            auto_fence: false,
            retry_unschedulable: Duration::from_secs(15),
        }
    }
}

/// How long a placement is assumed without the cache confirming it. A write
/// whose outcome is unknown (a dropped connection, an unreadable response) may
/// or may not have happened; after this long without the cache showing the VM
/// bound, it is taken as not having happened and the VM is placed again.
pub const ASSUME_TTL: Duration = Duration::from_secs(30);

/// Placements written (or being written) but maybe not yet seen in the cache,
/// keyed by MicroVM uid. Held under a lock for the whole decide-and-write step,
/// so two reconciles can never place against the same free capacity.
#[derive(Debug, Default)]
pub struct Assumed {
    /// uid → what was bound, and when.
    pub bindings: HashMap<String, (Bound, Instant)>,
}

impl Assumed {
    /// Whether `uid` has a placement that has not expired.
    pub fn holds(&self, uid: &str) -> bool {
        self.bindings
            .get(uid)
            .is_some_and(|(_, at)| at.elapsed() < ASSUME_TTL)
    }
}

/// Shared state of the controllers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Nodes cache.
    pub nodes: Store<Node>,
    /// Agent Leases cache.
    pub leases: Store<Lease>,
    /// MicroVMs cache.
    pub microvms: Store<MicroVM>,
    /// Namespaces cache (labels only): tenants and the administrator's policy
    /// ([`crate::tenancy`]).
    pub namespaces: Store<Namespace>,
    /// The placement lock and its assumed bindings.
    pub placer: Mutex<Assumed>,
    /// Publishes events.k8s.io/v1 Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: Config,
    /// Nodes seen without an agent Lease, and since when (see
    /// [`Context::lease_missing_for`]).
    pub lease_missing: std::sync::Mutex<HashMap<String, Timestamp>>,
    /// Since when this operator has watched Leases without a break
    /// ([`LeaseWatch`]).
    pub lease_watch: Arc<LeaseWatch>,
    /// Whether the Node, Lease and MicroVM caches have been filled.
    pub synced: Synced,
    /// Failed MicroVM reconciles in a row, for the error policy's backoff.
    pub microvm_retry: Retry<ObjectRef<MicroVM>>,
    /// Failed SecureWorkload reconciles in a row, likewise.
    pub workload_retry: Retry<ObjectRef<SecureWorkload>>,
}

/// Since when the operator has watched agent Leases without a break. Starts
/// at the operator's start and moves to the first event after a failed
/// watch: an agent cannot renew its Lease while the API is down, so no Lease
/// is judged expired by time in which the operator could not see the API
/// either.
#[derive(Debug)]
pub struct LeaseWatch {
    since: std::sync::Mutex<Timestamp>,
    broken: std::sync::atomic::AtomicBool,
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self {
            since: std::sync::Mutex::new(Timestamp::now()),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl LeaseWatch {
    /// Leases watched without a break since `at`.
    pub fn since_at(at: Timestamp) -> Self {
        Self {
            since: std::sync::Mutex::new(at),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records one result of the Lease watch at `now`.
    pub fn observe(&self, ok: bool, now: Timestamp) {
        use std::sync::atomic::Ordering;
        if !ok {
            self.broken.store(true, Ordering::SeqCst);
        } else if self.broken.swap(false, Ordering::SeqCst) {
            *self
                .since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
        }
    }

    /// Since when Leases have been watched without a break.
    pub fn since(&self) -> Timestamp {
        *self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether each cache has been filled by its first list, as its watch stream
/// reports it (`watcher::Event::InitDone`, see [`mark_synced`]).
///
/// Not `Store::wait_until_ready`: kube-runtime keeps a store's readiness in a
/// oneshot receiver with a single waker, so when several tasks await one store
/// only the last to poll it is woken and the others wait forever. A controller
/// already awaits its own store that way; nothing else may.
#[derive(Clone, Debug)]
pub struct Synced {
    /// The Node cache.
    pub nodes: watch::Receiver<bool>,
    /// The agent Lease cache.
    pub leases: watch::Receiver<bool>,
    /// The MicroVM cache.
    pub microvms: watch::Receiver<bool>,
    /// The Namespace cache.
    pub namespaces: watch::Receiver<bool>,
}

impl Synced {
    /// Flags already set, for caches that are filled from the start.
    pub fn already() -> Self {
        Self {
            nodes: watch::channel(true).1,
            leases: watch::channel(true).1,
            microvms: watch::channel(true).1,
            namespaces: watch::channel(true).1,
        }
    }

    /// Waits until all four caches are filled; false if a watch ended first.
    pub async fn wait(&self) -> bool {
        for flag in [&self.nodes, &self.leases, &self.microvms, &self.namespaces] {
            // Each result is dropped at once: its guard must not live across an await.
            if flag.clone().wait_for(|s| *s).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The caches not filled yet, for logs.
    pub fn waiting(&self) -> Vec<&'static str> {
        [
            ("Node", &self.nodes),
            ("Lease", &self.leases),
            ("MicroVM", &self.microvms),
            ("Namespace", &self.namespaces),
        ]
        .into_iter()
        .filter(|(_, rx)| !*rx.borrow())
        .map(|(kind, _)| kind)
        .collect()
    }
}

/// An `inspect` step for a reflector's event stream that sets `flag` once the
/// store has applied the first list (and again after each relist).
pub fn mark_synced<K>(
    flag: watch::Sender<bool>,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) {
    move |event| {
        if let Ok(watcher::Event::InitDone) = event {
            flag.send_replace(true);
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish()
    }
}

impl Context {
    /// Waits until the caches every reconcile reads (Nodes, agent Leases,
    /// MicroVMs, Namespaces) have been filled by their first list; false if a cache's
    /// watch ended first. kube-runtime only holds a controller until its own
    /// cache is filled: a MicroVM reconciled against an empty Node cache would
    /// look bound to a deleted node, and a SecureWorkload against an empty
    /// MicroVM cache would look like it has no replicas.
    pub async fn caches_synced(&self) -> bool {
        self.synced.wait().await
    }

    /// How long `node` has had no agent Lease: counted from when this operator
    /// first saw it without one, or from the Node's creation if that is later.
    /// A missing Lease thus gets the same grace as an expired one, also right
    /// after the operator starts.
    pub fn lease_missing_for(&self, node: &Node, now: Timestamp) -> Duration {
        let mut seen = self
            .lease_missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = *seen.entry(node.name_any()).or_insert(now);
        let since = node
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(first, |created| created.0.max(first));
        Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
    }

    /// What `node`'s agent Lease says at `now` ([`nodes::agent_lease`]).
    pub fn agent_lease(&self, node: &str, now: Timestamp) -> nodes::AgentLease {
        let lease = self
            .leases
            .get(&ObjectRef::new(&nodes::lease_name(node)).within(&self.config.lease_namespace));
        nodes::agent_lease(lease.as_deref(), now, self.lease_watch.since())
    }

    /// Forgets when `node` was first seen without a Lease (it has one now).
    pub fn lease_found(&self, node: &str) {
        self.lease_missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
    }

    /// Forgets nodes that are gone.
    pub fn forget_missing_leases_except(&self, nodes: &std::collections::HashSet<String>) {
        self.lease_missing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|n, _| nodes.contains(n));
    }

    /// Publishes an events.k8s.io/v1 Event about `reference`. Events are
    /// best-effort: a failure is logged and never fails a reconcile.
    pub async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}

#[cfg(test)]
mod synced_tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use super::{Synced, mark_synced};

    #[tokio::test]
    async fn every_waiter_is_woken_when_the_caches_fill() {
        let (nodes, nodes_rx) = watch::channel(false);
        let (leases, leases_rx) = watch::channel(false);
        let (vms, vms_rx) = watch::channel(false);
        let (namespaces, namespaces_rx) = watch::channel(false);
        let synced = Synced {
            nodes: nodes_rx,
            leases: leases_rx,
            microvms: vms_rx,
            namespaces: namespaces_rx,
        };
        // Several tasks wait at once, as the monitor and every reconcile do.
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let synced = synced.clone();
                tokio::spawn(async move { synced.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(synced.waiting(), ["Node", "Lease", "MicroVM", "Namespace"]);
        let mut mark_nodes = mark_synced::<()>(nodes);
        mark_nodes(&Ok(kube::runtime::watcher::Event::InitApply(())));
        assert_eq!(
            synced.waiting(),
            ["Node", "Lease", "MicroVM", "Namespace"],
            "not before InitDone"
        );
        mark_nodes(&Ok(kube::runtime::watcher::Event::InitDone));
        mark_synced::<()>(leases)(&Ok(kube::runtime::watcher::Event::InitDone));
        mark_synced::<()>(vms)(&Ok(kube::runtime::watcher::Event::InitDone));
        assert_eq!(synced.waiting(), ["Namespace"]);
        mark_synced::<()>(namespaces)(&Ok(kube::runtime::watcher::Event::InitDone));
        assert!(synced.waiting().is_empty());
        for waiter in waiters {
            let woken = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(
                matches!(woken, Ok(Ok(true))),
                "a waiter was not woken: {woken:?}"
            );
        }
    }
}
