//! `runv-agent`: the runv node agent.
//!
//! - `runv-agent standalone FILE|DIR`: realize MicroVM manifests on this host
//!   with no cluster; prints status transitions and serial output; Ctrl-C stops
//!   the VMs cleanly.
//! - `runv-agent run --node NAME`: the node agent of a cluster.
//! - `runv-agent console NAME`: print a VM's kept serial output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use runv_image::PullConfig;
use runv_image::images::Images;
use runv_image::rootfs::Format;
use runv_image::unpack::Limits;
use runv_node_agent::cluster::node::Capacity;
use runv_node_agent::cluster::secrets::ApiSecrets;
use runv_node_agent::cluster::{self, ClusterConfig};
use runv_node_agent::host::cgroup::CgroupConfig;
use runv_node_agent::host::egress::{Cidr, EgressError};
use runv_node_agent::host::guest::GuestLinks;
use runv_node_agent::host::{Host, LinuxHost};
use runv_node_agent::images::{DockerConfigFile, NodeImages, PullSecrets};
use runv_node_agent::reconcile::SandboxPolicy;
use runv_node_agent::reconcile::admit::Allocatable;
use runv_node_agent::runtime::{GuestKitConfig, Runtime, RuntimeConfig};
use runv_node_agent::state::VmDir;
use runv_node_agent::{standalone, state};

/// The runv node agent.
#[derive(Debug, Parser)]
#[command(name = "runv-agent", version)]
struct Cli {
    /// The agent's state directory (VM directories, IPAM).
    #[arg(
        long,
        global = true,
        env = "RUNV_AGENT_ROOT",
        default_value = "/var/lib/runv/agent"
    )]
    root: PathBuf,
    /// Parent cgroup of the VMs' cgroups: absolute from the cgroup root
    /// (`/runv`), or relative to the agent's own cgroup (`runv-test`).
    /// Default: `/runv` for `run` (a node service, as kubelet's `/kubepods`);
    /// `runv` under the caller's own cgroup for `standalone`, so VMs started
    /// from a shell stay within that shell's accounting.
    #[arg(long, global = true, env = "RUNV_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// First restart delay of a VM that exited (doubled per restart): `10s`, `500ms`.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: std::time::Duration,
    /// Longest restart delay.
    #[arg(long, global = true, default_value = "300s", value_parser = parse_duration)]
    restart_backoff_max: std::time::Duration,
    /// A directory kernels and initrds (`spec.boot.kernel`, `spec.boot.initrd`)
    /// may come from, absolute; repeat it, or separate with commas. Default:
    /// /var/lib/runv/kernels and /var/lib/runv/guests.
    #[arg(long = "allowed-kernel-dir", global = true, env = "RUNV_ALLOWED_KERNEL_DIRS",
          value_delimiter = ',', value_parser = absolute_dir)]
    allowed_kernel_dirs: Vec<PathBuf>,
    /// A directory disk images (`spec.disks[].file.path`) may come from,
    /// absolute; repeat it, or separate with commas. Default:
    /// /var/lib/runv/images.
    #[arg(long = "allowed-image-dir", global = true, env = "RUNV_ALLOWED_IMAGE_DIRS",
          value_delimiter = ',', value_parser = absolute_dir)]
    allowed_image_dirs: Vec<PathBuf>,
    /// A tap device a `type: Tap` interface may name: an exact name, or a
    /// prefix ending in `*`; repeat it, or separate with commas. Default:
    /// none (Tap interfaces are refused). The agent's own names (its bridge,
    /// `rv...`) are never allowed.
    #[arg(
        long = "allowed-tap-device",
        global = true,
        env = "RUNV_ALLOWED_TAP_DEVICES",
        value_delimiter = ','
    )]
    allowed_tap_devices: Vec<String>,
    /// Let MicroVMs with `spec.isolation.jail: Disabled` run on this node: their
    /// VMM then runs as root, unconfined, beside the agent. Without it such a
    /// VM does not start (reason SandboxNotAllowed).
    #[arg(long, global = true, env = "RUNV_ALLOW_JAIL_DISABLED")]
    allow_jail_disabled: bool,
    /// Let MicroVMs with `spec.isolation.seccomp: Disabled` run on this node:
    /// their VMM threads may then make any syscall. Without it such a VM does
    /// not start (reason SandboxNotAllowed).
    #[arg(long, global = true, env = "RUNV_ALLOW_SECCOMP_DISABLED")]
    allow_seccomp_disabled: bool,
    /// Largest disk a VM may have on this node: an empty disk's size, or a
    /// writable disk's base image. A quantity: `256Gi`, `10G`.
    #[arg(long, global = true, env = "RUNV_MAX_DISK_SIZE", default_value = "256Gi",
          value_parser = parse_size)]
    max_disk_size: u64,
    /// What every VM's disks on this node together may grow to (the lengths
    /// of their files; sparse disks never outgrow them). A quantity; default:
    /// 90% of the filesystem holding --root. A start whose new disks would
    /// pass it fails, naming it.
    #[arg(long, global = true, env = "RUNV_EPHEMERAL_STORAGE", value_parser = parse_size)]
    ephemeral_storage: Option<u64>,
    /// The guest kit container VMs without spec.boot.kernel boot: Debian's
    /// kernel and its modules, as vmm/scripts/guest-kit.sh installs them
    /// (must lie beneath an allowed kernel directory).
    #[arg(
        long,
        global = true,
        env = "RUNV_GUEST_KIT_DIR",
        default_value = "/var/lib/runv/guests/kit"
    )]
    guest_kit_dir: PathBuf,
    /// The static runv-init put into the kit's initramfs. Default:
    /// runv-init beside this binary, else /usr/lib/runv/runv-init.
    #[arg(long, global = true, env = "RUNV_GUEST_INIT")]
    guest_init: Option<PathBuf>,
    /// Where container images are kept (blobs, root filesystem images).
    /// Default: `images` under --root.
    #[arg(long, global = true, env = "RUNV_IMAGE_STORE")]
    image_store: Option<PathBuf>,
    /// A registry (`host[:port]`) reached over plain HTTP; repeat it, or
    /// separate with commas. Registries on a loopback address always may be.
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "RUNV_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// A PEM file of CA certificates registries are verified against, besides
    /// the system's roots; repeat it, or separate with commas.
    #[arg(
        long = "registry-ca",
        global = true,
        env = "RUNV_REGISTRY_CAS",
        value_delimiter = ','
    )]
    registry_cas: Vec<PathBuf>,
    /// Longest a writable disk's copy from its base may take before the start
    /// is given up (the partial copy is removed): `10m`, `90s`.
    #[arg(long, global = true, env = "RUNV_DISK_COPY_TIMEOUT", default_value = "10m",
          value_parser = parse_duration)]
    disk_copy_timeout: std::time::Duration,
    /// A destination `Nat` VMs may not reach, as an IPv4 CIDR; repeat it, or
    /// separate with commas. Replaces the default list: 169.254.0.0/16,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, 127.0.0.0/8,
    /// 224.0.0.0/4 (where node, pod and service networks and cloud metadata
    /// live). Link-local 169.254.0.0/16 stays denied whatever is given.
    #[arg(long = "egress-deny-cidr", global = true, env = "RUNV_EGRESS_DENY_CIDRS",
          value_delimiter = ',', value_parser = parse_cidr)]
    egress_deny_cidrs: Vec<Cidr>,
    /// An exception to the denied destinations, as an IPv4 CIDR (a cluster
    /// service VMs must reach, say); repeat it, or separate with commas.
    /// Default: none.
    #[arg(long = "egress-allow-cidr", global = true, env = "RUNV_EGRESS_ALLOW_CIDRS",
          value_delimiter = ',', value_parser = parse_cidr)]
    egress_allow_cidrs: Vec<Cidr>,
    #[command(subcommand)]
    command: Command,
}

/// An IPv4 CIDR for the egress lists.
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse().map_err(|e: EgressError| e.to_string())
}

/// An absolute directory path for an allowlist.
fn absolute_dir(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("{s:?} is not an absolute path"))
    }
}

/// A size as a Kubernetes quantity, in bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    runv_crds::quantity::bytes("a size", s).map_err(|e| e.to_string())
}

/// `500ms`, `10s`, `5m`, `1h` (a number alone is seconds).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .and_then(|v| std::time::Duration::try_from_secs_f64(v * scale).ok())
        .ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 10s or 5m"))
}

impl Cli {
    /// The runtime settings the global flags give.
    fn runtime_config(&self, vmm: PathBuf) -> RuntimeConfig {
        let mut config = RuntimeConfig::new(self.root.clone(), vmm);
        config.backoff.initial = self.restart_backoff;
        config.backoff.max = self.restart_backoff_max.max(self.restart_backoff);
        if !self.allowed_kernel_dirs.is_empty() {
            config.allowed.kernels = self.allowed_kernel_dirs.clone();
        }
        if !self.allowed_image_dirs.is_empty() {
            config.allowed.images = self.allowed_image_dirs.clone();
        }
        config.allowed_taps = self.allowed_tap_devices.clone();
        config.guest_kit = Some(GuestKitConfig {
            dir: self.guest_kit_dir.clone(),
            init: self.guest_init.clone().unwrap_or_else(default_guest_init),
        });
        config.max_disk_bytes = self.max_disk_size;
        config.disk_copy_timeout = self.disk_copy_timeout;
        config.ephemeral_storage = self.ephemeral_storage.unwrap_or_else(|| {
            runv_node_agent::host::disk::filesystem_size(&self.root)
                .map_or(u64::MAX, |s| s / 10 * 9)
        });
        if !self.egress_deny_cidrs.is_empty() {
            config.egress.deny = self.egress_deny_cidrs.clone();
        }
        config.egress.allow = self.egress_allow_cidrs.clone();
        config.sandbox = SandboxPolicy {
            allow_jail_disabled: self.allow_jail_disabled,
            allow_seccomp_disabled: self.allow_seccomp_disabled,
        };
        if self.allow_jail_disabled || self.allow_seccomp_disabled {
            tracing::warn!(
                allow_jail_disabled = self.allow_jail_disabled,
                allow_seccomp_disabled = self.allow_seccomp_disabled,
                "MicroVMs may switch off part of the VMM's sandbox on this node"
            );
        }
        config
    }

    /// The node's image service, pulling on `runtime` with credentials from
    /// `secrets`.
    fn images(
        &self,
        runtime: tokio::runtime::Handle,
        secrets: Box<dyn PullSecrets>,
    ) -> anyhow::Result<Arc<NodeImages>> {
        let root = self
            .image_store
            .clone()
            .unwrap_or_else(|| self.root.join("images"));
        let mut extra_ca_pem = Vec::new();
        for ca in &self.registry_cas {
            extra_ca_pem.push(
                std::fs::read(ca)
                    .with_context(|| format!("reading --registry-ca {}", ca.display()))?,
            );
        }
        let pull = PullConfig {
            insecure_registries: self.insecure_registries.clone(),
            extra_ca_pem,
            ..PullConfig::default()
        };
        let images = Images::open(&root, pull, Limits::default(), Format::default())
            .with_context(|| format!("opening the image store {}", root.display()))?;
        Ok(Arc::new(NodeImages::new(images, &root, runtime, secrets)))
    }

    /// The real host, with the VMs' cgroups where `--cgroup-parent` says, else
    /// under `default_parent`.
    fn host(&self, default_parent: &str) -> LinuxHost {
        let parent = self.cgroup_parent.as_deref().unwrap_or(default_parent);
        let host = LinuxHost::new(None).with_cgroups(&CgroupConfig {
            parent: parent.to_owned(),
            ..CgroupConfig::default()
        });
        let cgroups = host.describe_cgroups();
        if host.cgroups().available().is_ok() {
            tracing::info!("{cgroups}");
        } else {
            tracing::warn!(
                "{cgroups}; VMMs run in the agent's cgroup and VMs with spec.isolation.limits do not start"
            );
        }
        host
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Realize MicroVM manifests on this host, without a cluster.
    Standalone {
        /// A manifest file or a directory of them.
        path: PathBuf,
        /// The runv-vmm binary (default: next to runv-agent, then PATH).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Stop the VMs after this many seconds if they have not settled.
        #[arg(long)]
        timeout: Option<u64>,
        /// A docker config file (`~/.docker/config.json`) with registry
        /// credentials for every VM's image (standalone mode has no Secrets).
        #[arg(long, env = "RUNV_DOCKER_CONFIG")]
        docker_config: Option<PathBuf>,
    },
    /// Run as the node agent of a cluster.
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Namespace of the agent Leases.
        #[arg(long, env = "RUNV_NAMESPACE", default_value = "runv-system")]
        namespace: String,
        /// Address of /metrics and /healthz.
        #[arg(long, default_value = "0.0.0.0:9090")]
        http_addr: std::net::SocketAddr,
        /// The runv-vmm binary (default: next to runv-agent, then PATH).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// vCPUs offered to microVMs (default: the host's CPUs).
        #[arg(long)]
        vcpus: Option<u64>,
        /// Memory offered to microVMs, a quantity (default: the host's, less --reserved-memory).
        #[arg(long)]
        memory: Option<String>,
        /// Memory kept for the host when --memory is not given.
        #[arg(long, default_value = "1Gi")]
        reserved_memory: String,
        /// The agent Lease's duration: the operator takes the node's agent as
        /// lost when the Lease is this old. Losing the API never stops a VM.
        #[arg(long, default_value = "40s", value_parser = parse_duration)]
        lease_duration: std::time::Duration,
        /// How often the Lease is renewed and the Node read for fencing taints.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        lease_renew_interval: std::time::Duration,
    },
    /// Print a container VM's container output (stdout and stderr, as
    /// kept on this node: 5 files of 10 MiB per run).
    Logs {
        /// The MicroVM's name.
        name: String,
        /// Its namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Keep printing what the container writes, until it ends.
        #[arg(short, long)]
        follow: bool,
        /// The run before the current one (after a restart).
        #[arg(short, long)]
        previous: bool,
    },
    /// Print a VM's kept serial console output.
    Console {
        /// The MicroVM's name.
        name: String,
        /// Its namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); the
        // sigaction struct is zeroed and then given the handler.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}

/// `--vmm`, else `runv-vmm` next to this executable, else on PATH.
fn find_vmm(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("runv-vmm")))
        .filter(|p| p.is_file())
    {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("runv-vmm"))
            .find(|p| p.is_file())
    }) {
        return Ok(p);
    }
    // Under `cargo run` in a source checkout: build it (debug builds only).
    #[cfg(debug_assertions)]
    if let Some(p) = runv_node_agent::dev::build_vmm_from_source()? {
        return Ok(p);
    }
    bail!(
        "runv-vmm not found next to runv-agent or on PATH (build it with `cargo build -p runv-vmm`, or pass --vmm)"
    )
}

fn standalone_cmd(
    cli: &Cli,
    path: &Path,
    vmm: Option<PathBuf>,
    timeout: Option<u64>,
    docker_config: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let mut out = std::io::stdout();
    let vms = standalone::load(path)?;
    // Find (or, under `cargo run`, build) the VMM first: its build also builds the
    // test guest that provide_test_guest installs (debug builds only).
    let vmm = find_vmm(vmm)?;
    #[cfg(debug_assertions)]
    runv_node_agent::dev::provide_test_guest(&vms, &mut out)
        .context("installing the test guest")?;
    install_signal_handlers()?;
    // Pulls run on a runtime of their own; the standalone loop blocks on them.
    let pulls = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the image pull runtime")?;
    let images = cli.images(
        pulls.handle().clone(),
        Box::new(DockerConfigFile(docker_config)),
    )?;
    // The standalone loop reconciles every 200 ms: it needs no news.
    let links = GuestLinks::new(pulls.handle().clone(), Arc::new(|_: &str| {}));
    let rt = Runtime::new(cli.runtime_config(vmm), Arc::new(cli.host("runv")))?
        .with_images(images)
        .with_guest_links(Arc::new(links));
    let ok = standalone::run(
        &rt,
        &vms,
        &STOP,
        &mut out,
        timeout.map(std::time::Duration::from_secs),
    )?;
    Ok(ok)
}

/// `runv-init` beside this binary (a release's layout), else where
/// packages put it.
fn default_guest_init() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("runv-init")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/lib/runv/runv-init"))
}

fn logs_cmd(
    root: &Path,
    namespace: &str,
    name: &str,
    follow: bool,
    previous: bool,
) -> anyhow::Result<()> {
    let dir = known_vm(root, namespace, name)?;
    let (log, record) = if previous {
        (dir.container_log_previous(), dir.container_run_previous())
    } else {
        (dir.container_log(), dir.container_run())
    };
    if !record.is_file() {
        bail!(
            "{namespace}/{name} has {} container run on this node{}",
            if previous { "no previous" } else { "no" },
            if previous {
                " (it was not restarted)"
            } else {
                " (no spec.container, or it has not started)"
            }
        );
    }
    install_signal_handlers()?;
    let mut out = std::io::stdout().lock();
    runv_node_agent::console::print_logs(&log, &record, follow && !previous, &mut out, &STOP)?;
    Ok(())
}

fn console_cmd(root: &Path, namespace: &str, name: &str) -> anyhow::Result<()> {
    let dir = known_vm(root, namespace, name)?;
    use std::io::Write;
    // The guest wrote every byte: escape sequences are shown, not obeyed.
    let text = runv_node_agent::console::sanitize(&dir.read_serial());
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// The VM's directory, when the agent knows the VM.
fn known_vm(root: &Path, namespace: &str, name: &str) -> anyhow::Result<VmDir> {
    let dir = VmDir::new(root, namespace, name);
    if dir.read_record().is_none() {
        let known: Vec<String> = state::list(root)
            .into_iter()
            .map(|(_, r)| format!("{}/{}", r.namespace, r.name))
            .collect();
        bail!(
            "no VM {namespace}/{name} under {} (known: {})",
            root.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(dir)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("runv-agent: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Standalone {
            ref path,
            ref vmm,
            timeout,
            ref docker_config,
        } => {
            if !standalone_cmd(&cli, path, vmm.clone(), timeout, docker_config.clone())? {
                std::process::exit(1);
            }
        }
        Command::Console {
            ref name,
            ref namespace,
        } => console_cmd(&cli.root, namespace, name)?,
        Command::Logs {
            ref name,
            ref namespace,
            follow,
            previous,
        } => logs_cmd(&cli.root, namespace, name, follow, previous)?,
        Command::Run {
            ref node,
            ref namespace,
            http_addr,
            ref vmm,
            vcpus,
            ref memory,
            ref reserved_memory,
            lease_duration,
            lease_renew_interval,
        } => {
            let reserved = runv_crds::quantity::bytes("--reserved-memory", reserved_memory)?;
            let mut capacity = Capacity::of_host(reserved);
            if let Some(v) = vcpus {
                capacity.vcpus = v;
            }
            if let Some(m) = memory {
                capacity.memory = runv_crds::quantity::bytes("--memory", m)?;
            }
            let config = ClusterConfig {
                holder: std::env::var("POD_NAME").unwrap_or_else(|_| format!("runv-agent-{node}")),
                node: node.clone(),
                namespace: namespace.clone(),
                capacity,
                http_addr,
                lease_duration,
                renew_every: lease_renew_interval,
            };
            let mut runtime_config = cli.runtime_config(find_vmm(vmm.clone())?);
            // No VM starts beyond what the Node advertises, nor against
            // tenant isolation, whatever placement bound here.
            runtime_config.allocatable = Some(Allocatable {
                vcpus: capacity.vcpus,
                memory: capacity.memory,
            });
            let rt = tokio::runtime::Runtime::new()?;
            let client = rt
                .block_on(kube::Client::try_default())
                .context("cannot reach the Kubernetes API (kubeconfig or in-cluster config)")?;
            let secrets = ApiSecrets::new(client.clone(), rt.handle().clone());
            let images = cli.images(rt.handle().clone(), Box::new(secrets))?;
            // cluster::run sends the links' news to the controller.
            let links = GuestLinks::new(rt.handle().clone(), Arc::new(|_: &str| {}));
            let runtime = Runtime::new(runtime_config, Arc::new(cli.host("/runv")))?
                .with_images(images)
                .with_guest_links(Arc::new(links));
            rt.block_on(async move {
                // SIGTERM (what the kubelet sends a DaemonSet pod) or Ctrl-C:
                // stop reconciling and return; the VMMs keep running.
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .context("installing the SIGTERM handler")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    tracing::info!("shutting down; the VMs keep running");
                };
                cluster::run(client, config, Arc::new(runtime), shutdown).await?;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::{Cli, parse_duration};
    use runv_node_agent::reconcile::SandboxPolicy;

    #[test]
    fn the_sandbox_stays_on_unless_a_flag_allows_switching_it_off() {
        let policy = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            cli.runtime_config("/bin/runv-vmm".into()).sandbox
        };
        let base = ["runv-agent", "standalone", "vm.yaml"];
        assert_eq!(policy(&base), SandboxPolicy::default());
        assert_eq!(
            policy(&[
                "runv-agent",
                "standalone",
                "vm.yaml",
                "--allow-jail-disabled"
            ]),
            SandboxPolicy {
                allow_jail_disabled: true,
                allow_seccomp_disabled: false,
            }
        );
        assert_eq!(
            policy(&[
                "runv-agent",
                "--allow-seccomp-disabled",
                "run",
                "--node",
                "n1"
            ]),
            SandboxPolicy {
                allow_jail_disabled: false,
                allow_seccomp_disabled: true,
            }
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "-1s", "ten", "5x"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
