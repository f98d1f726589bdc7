//! runv's Kubernetes API test server: an in-process server that speaks the
//! Kubernetes REST protocol well enough for the real `kubectl` and kube-rs
//! `Client`, for end-to-end tests of the operator and the node agent.
//!
//! It is test infrastructure, never a control plane. What it implements and
//! where it differs from kube-apiserver is listed in `docs/testing.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), runv_e2e::ServerError> {
//! let server = runv_e2e::TestServer::start(runv_e2e::Options::default()).await?;
//! let client = server.client()?;
//! println!("kubectl --kubeconfig {}", server.kubeconfig_path().display());
//! # drop(client);
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod admission;
pub mod discovery;
pub mod gc;
pub mod jsonpath;
pub mod kinds;
pub mod managed;
pub mod objects;
pub mod patch;
pub mod persist;
pub mod proto;
pub mod registry;
pub mod selectors;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::objects::State;
use crate::server::Shared;

/// Why the server could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or serving failed.
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The state file could not be used.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// A client could not be built.
    #[error("kube client: {0}")]
    Client(String),
}

/// How to start a server.
#[derive(Clone, Debug)]
pub struct Options {
    /// The address to listen on: 127.0.0.1 unless a test needs the server
    /// reachable from a network namespace (a veth address of its own).
    pub address: std::net::IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// Where to write the kubeconfig; None writes it into a private temporary directory.
    pub kubeconfig: Option<PathBuf>,
    /// Keep the objects in this file across restarts.
    pub state_file: Option<PathBuf>,
    /// Watch events kept before compaction (older versions get 410 Gone).
    pub history: usize,
    /// Period of watch bookmarks.
    pub bookmark_interval: Duration,
    /// Objects to create before serving (e.g. the runv CRDs), as JSON.
    pub preload: Vec<serde_json::Value>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            kubeconfig: None,
            state_file: None,
            history: 100_000,
            bookmark_interval: Duration::from_secs(5),
            preload: Vec::new(),
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    kubeconfig: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    state: Arc<Mutex<State>>,
    stop: tokio::sync::watch::Sender<bool>,
    serve: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    state_file: Option<PathBuf>,
}

/// A kubeconfig for a server at `url`, with namespace `default` and no credentials.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: runv-test\n  cluster:\n    server: {url}\ncontexts:\n- name: runv-test\n  context:\n    cluster: runv-test\n    user: runv-test\n    namespace: default\ncurrent-context: runv-test\nusers:\n- name: runv-test\n  user: {{}}\npreferences: {{}}\n"
    )
}

impl TestServer {
    /// Binds, loads the state file if any, writes the kubeconfig and starts serving.
    pub async fn start(opts: Options) -> Result<Self, ServerError> {
        let listener = tokio::net::TcpListener::bind((opts.address, opts.port)).await?;
        let addr = listener.local_addr()?;
        let mut state = State::new(opts.history);
        if let Some(path) = &opts.state_file {
            persist::load(&mut state, path)?;
        }
        for obj in &opts.preload {
            preload(&mut state, obj);
        }
        let state = Arc::new(Mutex::new(state));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            state: state.clone(),
            addr: addr.to_string(),
            bookmark_every: opts.bookmark_interval,
            stop: stop_rx.clone(),
        });
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let shared = shared.clone();
            async move { server::handle(shared, req).await }
        });
        let mut graceful = stop_rx.clone();
        let serve = tokio::spawn(async move {
            let shutdown = async move {
                let _ = graceful.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!("test server stopped: {e}");
            }
        });
        let mut tasks = vec![tokio::spawn(gc::run(state.clone(), stop_rx.clone()))];
        if let Some(path) = opts.state_file.clone() {
            tasks.push(tokio::spawn(save_loop(state.clone(), path, stop_rx)));
        }
        let url = format!("http://{addr}");
        let (kubeconfig_path, tmp) = match &opts.kubeconfig {
            Some(p) => (p.clone(), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("runv-testserver")
                    .tempdir()?;
                (dir.path().join("kubeconfig"), Some(dir))
            }
        };
        std::fs::write(&kubeconfig_path, kubeconfig(&url))?;
        Ok(Self {
            addr,
            kubeconfig: kubeconfig_path,
            _tmp: tmp,
            state,
            stop,
            serve,
            tasks,
            state_file: opts.state_file,
        })
    }

    /// `http://ADDRESS:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig file for kubectl and kube-rs.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube-rs client for this server, default namespace `default`.
    pub fn client(&self) -> Result<kube::Client, ServerError> {
        let uri = self
            .url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| ServerError::Client(e.to_string()))?;
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).map_err(|e| ServerError::Client(e.to_string()))
    }

    /// Number of stored objects per resource (`group/plural`).
    pub fn object_counts(&self) -> Result<std::collections::BTreeMap<String, usize>, ServerError> {
        Ok(lock(&self.state).counts())
    }

    /// Stops serving, ends open watches and writes the state file.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.serve).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Some(path) = &self.state_file {
            let st = lock(&self.state);
            persist::save(&st, path)?;
        }
        Ok(())
    }
}

/// Locks the state. Writes replace whole objects, so a panic elsewhere cannot
/// leave one half-written and the lock stays usable.
pub(crate) fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn preload(state: &mut State, obj: &serde_json::Value) {
    let av = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let Some(rt) = state.registry.find_kind(av, kind) else {
        tracing::warn!("preload: {av} {kind} is not served");
        return;
    };
    let ns = if rt.namespaced {
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    let opts = objects::WriteOpts {
        dry_run: false,
        manager: "runv-testserver".into(),
        validation: admission::FieldValidation::Strict,
        force: false,
    };
    if let Err(e) = state.create(&rt, &ns, obj.clone(), &opts) {
        tracing::warn!("preload of {kind} failed: {e}");
    }
}

async fn save_loop(
    state: Arc<Mutex<State>>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut saved = u64::MAX;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
        let snap = {
            let st = lock(&state);
            (st.store.rv() != saved).then(|| persist::snapshot(&st))
        };
        if let Some(snap) = snap {
            match persist::save_snapshot(&snap, &path) {
                Ok(()) => saved = snap.0,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}
