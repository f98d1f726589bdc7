//! The runtime against the fake host: preparing and starting a VM, booting,
//! re-adoption by a second runtime (an agent restart), restarts with backoff,
//! pause, a missing kernel and cleanup. State directories are real temp dirs.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions as cond;
use runv_crds::microvm::{Phase, PowerState, RunPolicy};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{Request, VmConfig};

use super::*;
use crate::host::fake::{FakeHost, taps};

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn spec(policy: RunPolicy) -> MicroVMSpec {
    let mut s: MicroVMSpec = serde_json::from_str(
        r#"{"boot":{"kernel":"/k/vmlinux","cmdline":"console=ttyS0"},
            "resources":{"vcpus":1,"memory":"64Mi"},
            "disks":[{"name":"root","file":{"path":"/img/root.img"}},{"name":"scratch","empty":{"size":"16Mi"}}],
            "interfaces":[{"name":"eth0","type":"Nat"}],
            "vsock":{"enabled":true}}"#,
    )
    .unwrap();
    s.run_policy = policy;
    s
}

fn vm() -> VmRef {
    VmRef {
        namespace: "default".into(),
        name: "web".into(),
        uid: "uid-1".into(),
    }
}

struct Env {
    _root: tempfile::TempDir,
    host: Arc<FakeHost>,
    rt: Runtime,
}

fn env() -> Env {
    let root = tempfile::tempdir().unwrap();
    let host = Arc::new(FakeHost::new());
    host.add_file("/k/vmlinux", 1 << 20);
    host.add_file("/img/root.img", 64 << 20);
    let rt = runtime(root.path(), &host);
    Env {
        _root: root,
        host,
        rt,
    }
}

fn runtime(root: &Path, host: &Arc<FakeHost>) -> Runtime {
    let cfg = RuntimeConfig::new(root.to_owned(), "/bin/runv-vmm".into());
    Runtime::new(cfg, host.clone() as Arc<dyn Host>).unwrap()
}

fn ready(s: &MicroVMStatus) -> (String, String) {
    let c = cond::find(&s.conditions, cond::READY).unwrap();
    (c.status.clone(), c.reason.clone())
}

#[test]
fn starts_boots_and_reports_addresses() {
    let e = env();
    let s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert_eq!(
        cond::find(&d.status.conditions, cond::VMM_STARTED)
            .unwrap()
            .status,
        "True"
    );
    let st = e.host.state();
    assert_eq!(st.spawned.len(), 1);
    assert_eq!(st.bridges.len(), 1);
    let dir = e.rt.dir(&vm());
    assert!(st.files.contains_key(&dir.disk("root")), "root disk copied");
    assert_eq!(st.files.get(&dir.disk("scratch")), Some(&(16 << 20)));
    drop(st);
    let tap = vmconfig::tap_name("default", "web", 0);
    assert!(taps(&e.host).contains(&tap));
    let ip =
        e.rt.ipam()
            .lookup("default/web/eth0")
            .expect("address allocated");
    let iface = &d.status.interfaces[0];
    assert_eq!(iface.ip.as_deref(), Some(ip.to_string().as_str()));
    assert_eq!(iface.host_interface.as_deref(), Some(tap.as_str()));
    assert!(d.status.vsock_cid.is_some());
    let config = VmConfig::from_file(&dir.config()).unwrap();
    assert_eq!(config.net[0].tap, tap);
    assert!(
        config
            .cmdline
            .contains(&format!("ip={ip}::10.213.0.1:255.255.0.0::eth0:off")),
        "{}",
        config.cmdline
    );

    // The guest writes to its console: booted, Ready.
    e.host.boot(&dir.control_socket());
    let d2 = e.rt.reconcile(&vm(), &s, 1, &d.status, at(2));
    assert_eq!(d2.status.phase, Some(Phase::Running));
    assert_eq!(ready(&d2.status), ("True".into(), "Running".into()));
    assert_eq!(d2.status.boot_duration_millis, Some(2000));
}

#[test]
fn a_second_agent_readopts_and_never_starts_a_duplicate() {
    let e = env();
    let s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    e.host.boot(&e.rt.dir(&vm()).control_socket());
    // The agent restarts: a new runtime over the same state directory.
    let again = runtime(&e.rt.config().root, &e.host);
    assert_eq!(again.known(), vec![vm()]);
    let d2 = again.reconcile(&vm(), &s, 1, &d.status, at(5));
    assert_eq!(e.host.state().spawned.len(), 1, "no second VMM");
    assert_eq!(d2.status.phase, Some(Phase::Running));
    assert_eq!(
        again.ipam().lookup("default/web/eth0"),
        e.rt.ipam().lookup("default/web/eth0")
    );
    // Even with no previous status at all (a lost status write), it adopts.
    let d3 = again.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(6));
    assert_eq!(e.host.state().spawned.len(), 1);
    assert_eq!(d3.status.phase, Some(Phase::Running));
}

#[test]
fn an_exited_vmm_is_restarted_after_backoff() {
    let e = env();
    let s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let pid = e.host.running()[0];
    e.host.exit(pid); // killed: no exit record
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(3));
    assert_eq!(
        ready(&d.status),
        ("False".into(), "CrashLoopBackOff".into())
    );
    assert_eq!(d.status.last_exit.as_ref().unwrap().reason, "Killed");
    assert_eq!(e.host.state().spawned.len(), 1);
    // 10 s after the exit it is noticed (the time is kept in vm.json): restart.
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(13));
    assert_eq!(e.host.state().spawned.len(), 2);
    assert_eq!(d.status.restart_count, 1);
    assert_eq!(
        cond::find(&d.status.conditions, cond::VMM_STARTED)
            .unwrap()
            .status,
        "True"
    );
}

#[test]
fn pause_goes_through_the_control_socket() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    s.power_state = PowerState::Paused;
    let d = e.rt.reconcile(&vm(), &s, 2, &d.status, at(1));
    assert_eq!(d.status.phase, Some(Phase::Paused));
    assert_eq!(ready(&d.status), ("True".into(), "Paused".into()));
    let reqs: Vec<_> = e
        .host
        .state()
        .requests
        .iter()
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(reqs, [Request::Pause]);
    assert_eq!(e.host.state().spawned.len(), 1, "pausing is not a restart");
}

#[test]
fn a_missing_kernel_starts_nothing() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    s.boot.kernel = "/k/missing".into();
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert_eq!(ready(&d.status).1, "KernelNotFound");
    assert!(
        cond::find(&d.status.conditions, cond::READY)
            .unwrap()
            .message
            .contains("/k/missing")
    );
    assert!(e.host.state().spawned.is_empty());
}

#[test]
fn a_failed_start_is_reported() {
    let e = env();
    e.host.state().fail_spawn = Some("exec format error".into());
    let d = e.rt.reconcile(
        &vm(),
        &spec(RunPolicy::Once),
        1,
        &MicroVMStatus::default(),
        at(0),
    );
    let c = cond::find(&d.status.conditions, cond::READY).unwrap();
    assert_eq!(c.reason, "StartFailed");
    assert!(c.message.contains("exec format error"), "{}", c.message);
}

#[test]
fn cleanup_removes_vmm_tap_address_and_state() {
    let e = env();
    e.rt.reconcile(
        &vm(),
        &spec(RunPolicy::Always),
        1,
        &MicroVMStatus::default(),
        at(0),
    );
    let dir = e.rt.dir(&vm());
    assert!(dir.path().exists());
    e.rt.cleanup(&vm()).unwrap();
    assert!(e.host.running().is_empty());
    assert!(taps(&e.host).is_empty());
    assert!(e.rt.ipam().is_empty());
    assert!(!dir.path().exists());
    assert!(e.rt.known().is_empty());
    e.rt.cleanup(&vm()).unwrap(); // idempotent
}
