//! Test support: fixture builders and a mocked Kubernetes API (kube `Client`
//! over tower-test) that records every request and answers it.

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use runv_crds::microvm::{Phase, RunPolicy};
use runv_crds::{MicroVM, MicroVMStatus, SecureWorkload};
use serde_json::{Value, json};
use tokio::sync::Mutex as AsyncMutex;

use crate::context::{Assumed, Config, Context};
use crate::metrics::Metrics;
use crate::nodes;

/// One request the mocked API received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string.
    pub query: String,
    /// JSON body, or Null.
    pub body: Value,
}

impl Recorded {
    /// Whether this is an Event being published.
    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

/// How the mock answers a request: status and JSON body. The default echoes the
/// request body (or `{}`) with 200.
pub type Responder = Arc<dyn Fn(&Recorded) -> (StatusCode, Value) + Send + Sync>;

/// A mocked API server: the client to use and what it received.
#[derive(Clone)]
pub struct MockApi {
    /// Client whose requests the mock answers.
    pub client: Client,
    /// Every request so far.
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl std::fmt::Debug for MockApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockApi")
            .field("requests", &self.requests)
            .finish()
    }
}

impl MockApi {
    /// A mock that knows `objects` (any kinds): a request on an object's path
    /// (or its `/status`) returns the object, a create echoes its body, an Event is
    /// accepted, and anything else is a 404 Status.
    pub fn new(objects: Vec<Value>) -> Self {
        Self::with(Arc::new(move |r: &Recorded| {
            if r.is_event() || r.method == "POST" {
                let body = if r.body.is_null() {
                    json!({})
                } else {
                    r.body.clone()
                };
                return (StatusCode::CREATED, body);
            }
            let path = r.path.trim_end_matches("/status");
            let name = path.rsplit('/').next().unwrap_or_default();
            objects
                .iter()
                .find(|o| o["metadata"]["name"] == name)
                .map(|o| (StatusCode::OK, o.clone()))
                .unwrap_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": format!("{name} not found"), "reason": "NotFound", "code": 404
                        }),
                    )
                })
        }))
    }

    /// A mock that answers with `respond`.
    pub fn with(respond: Responder) -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (status, reply) = respond(&recorded);
                log.lock().unwrap().push(recorded);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        Self {
            client: Client::new(service, "default"),
            requests,
        }
    }

    /// Requests other than Event publications.
    pub fn calls(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| !r.is_event())
            .cloned()
            .collect()
    }

    /// Reasons of the Events published.
    pub fn event_reasons(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.is_event())
            .filter_map(|r| r.body["reason"].as_str().map(str::to_owned))
            .collect()
    }
}

/// A store holding `objs`.
pub fn store<K>(objs: impl IntoIterator<Item = K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    // A full initial list, so the store is ready as a synced cache is.
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// A mock API knowing these MicroVMs, and a context over it with these caches.
pub fn context(nodes: Vec<Node>, leases: Vec<Lease>, vms: Vec<MicroVM>) -> (MockApi, Arc<Context>) {
    let api = MockApi::new(
        vms.iter()
            .map(|v| serde_json::to_value(v).unwrap())
            .collect(),
    );
    let ctx = context_on(&api, nodes, leases, vms);
    (api, ctx)
}

/// A context over `api` with these caches, and the Namespace `default`
/// without labels.
pub fn context_on(
    api: &MockApi,
    nodes: Vec<Node>,
    leases: Vec<Lease>,
    vms: Vec<MicroVM>,
) -> Arc<Context> {
    context_in(api, nodes, leases, vms, vec![namespace("default", &[])])
}

/// A context over `api` with these caches, Namespaces included.
pub fn context_in(
    api: &MockApi,
    nodes: Vec<Node>,
    leases: Vec<Lease>,
    vms: Vec<MicroVM>,
    namespaces: Vec<Namespace>,
) -> Arc<Context> {
    Arc::new(Context {
        client: api.client.clone(),
        nodes: store(nodes),
        leases: store(leases),
        microvms: store(vms),
        namespaces: store(namespaces),
        placer: AsyncMutex::new(Assumed::default()),
        recorder: Recorder::new(
            api.client.clone(),
            Reporter {
                controller: "runv.dev/operator".into(),
                instance: None,
            },
        ),
        metrics: Metrics::new(),
        config: Config::default(),
        synced: crate::context::Synced::already(),
        // Leases watched since long before any test's renewals.
        lease_watch: Arc::new(crate::context::LeaseWatch::since_at(Timestamp::UNIX_EPOCH)),
        lease_missing: Mutex::default(),
        microvm_retry: Default::default(),
        workload_retry: Default::default(),
    })
}

/// Builds a MicroVM fixture: `vm("a").memory("1Gi").bound("n1")`.
#[derive(Clone, Debug)]
pub struct VmBuilder(pub MicroVM);

/// A MicroVM named `name` in `default` with 1 vCPU and 128Mi.
pub fn vm(name: &str) -> VmBuilder {
    let mut vm: MicroVM = serde_json::from_value(json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "MicroVM",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1 },
        "spec": { "boot": { "kernel": "/k" } }
    }))
    .unwrap();
    vm.metadata.resource_version = Some("1".into());
    VmBuilder(vm)
}

impl VmBuilder {
    /// Sets vCPUs and memory.
    pub fn size(mut self, vcpus: u32, memory: &str) -> Self {
        self.0.spec.resources.vcpus = vcpus;
        self.0.spec.resources.memory = memory.into();
        self
    }
    /// Binds it to `node` with `phase`.
    pub fn bound(mut self, node: &str, phase: Phase) -> Self {
        let status = self.0.status.get_or_insert_with(MicroVMStatus::default);
        status.node_name = Some(node.into());
        status.phase = Some(phase);
        self
    }
    /// Pins it with spec.nodeName.
    pub fn pinned(mut self, node: &str) -> Self {
        self.0.spec.node_name = Some(node.into());
        self
    }
    /// Moves it to namespace `ns`.
    pub fn in_namespace(mut self, ns: &str) -> Self {
        self.0.metadata.namespace = Some(ns.into());
        self
    }
    /// Sets spec.tenant.
    pub fn tenant(mut self, name: &str, isolation: runv_crds::microvm::NodeIsolation) -> Self {
        self.0.spec.tenant = Some(runv_crds::microvm::Tenant {
            name: name.into(),
            node_isolation: isolation,
        });
        self
    }
    /// Sets status.tenant, as the operator resolved it at its placement.
    pub fn placed_as(mut self, name: &str, isolation: runv_crds::microvm::NodeIsolation) -> Self {
        self.0
            .status
            .get_or_insert_with(MicroVMStatus::default)
            .tenant = Some(runv_crds::microvm::Tenant {
            name: name.into(),
            node_isolation: isolation,
        });
        self
    }
    /// Sets the run policy.
    pub fn policy(mut self, p: RunPolicy) -> Self {
        self.0.spec.run_policy = p;
        self
    }
    /// Marks it as being deleted.
    pub fn deleting(mut self) -> Self {
        self.0.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        self
    }
    /// Makes `owner` its controller.
    pub fn owned_by(mut self, owner: &SecureWorkload) -> Self {
        self.0.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "runv.dev/v1alpha1".into(),
            kind: "SecureWorkload".into(),
            name: owner.metadata.name.clone().unwrap_or_default(),
            uid: owner.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        self
    }
    /// Sets a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(k.into(), v.into());
        self
    }
    /// Sets the Ready condition True (with phase Running).
    pub fn ready(mut self) -> Self {
        let status = self.0.status.get_or_insert_with(MicroVMStatus::default);
        status.phase = Some(Phase::Running);
        runv_crds::conditions::set_condition(
            &mut status.conditions,
            runv_crds::conditions::Update {
                type_: runv_crds::conditions::READY,
                status: runv_crds::conditions::Status::True,
                reason: "Running",
                message: "",
                observed_generation: Some(1),
            },
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        self
    }
    /// The MicroVM.
    pub fn build(self) -> MicroVM {
        self.0
    }
}

/// A Namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// A runv node advertising `vcpus` and `memory`.
pub fn node(name: &str, vcpus: u32, memory: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some([(nodes::AGENT_LABEL.to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            allocatable: Some(
                [
                    (
                        nodes::RESOURCE_VCPUS.to_owned(),
                        Quantity(vcpus.to_string()),
                    ),
                    (nodes::RESOURCE_MEMORY.to_owned(), Quantity(memory.into())),
                ]
                .into(),
            ),
            ..NodeStatus::default()
        }),
    }
}

/// The node with the fencing taint.
pub fn fenced(mut n: Node) -> Node {
    n.spec.get_or_insert_with(NodeSpec::default).taints = Some(vec![Taint {
        key: nodes::FENCED_TAINT.into(),
        effect: "NoExecute".into(),
        ..Taint::default()
    }]);
    n
}

/// An agent Lease for `node` renewed `ago` seconds before now, valid 40 s.
pub fn lease(node: &str, ago: i64) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(nodes::lease_name(node)),
            namespace: Some("runv-system".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(ago))),
            lease_duration_seconds: Some(40),
            ..LeaseSpec::default()
        }),
    }
}
