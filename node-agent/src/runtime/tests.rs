//! The runtime against the fake host: preparing and starting a VM, booting,
//! re-adoption by a second runtime (an agent restart), restarts with backoff,
//! pause, a missing kernel and cleanup. State directories are real temp dirs.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions as cond;
use runv_crds::microvm::{Phase, PowerState, RunPolicy};
use runv_crds::{MicroVMSpec, MicroVMStatus};
use runv_vmm_api::{Request, VmConfig};

use std::path::Path;

use runv_crds::microvm::{Toggle, VmmLimits};

use super::*;
use crate::host::fake::{FakeHost, taps};
use crate::host::hostfile::AllowedDirs;
use crate::{jail, vmconfig};

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
    runtime_with(root, host, |_| {})
}

/// A runtime whose settings `change` alters first.
fn runtime_with(
    root: &Path,
    host: &Arc<FakeHost>,
    change: impl FnOnce(&mut RuntimeConfig),
) -> Runtime {
    let mut cfg = RuntimeConfig::new(root.to_owned(), "/bin/runv-vmm".into());
    cfg.allowed = AllowedDirs {
        kernels: vec!["/k".into()],
        images: vec!["/img".into()],
    };
    cfg.allowed_taps = vec!["tenant-a-*".into(), "shared0".into()];
    change(&mut cfg);
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

fn limited(policy: RunPolicy, cpu: &str, memory: &str) -> MicroVMSpec {
    let mut s = spec(policy);
    s.isolation.limits = Some(VmmLimits {
        cpu: Some(cpu.into()),
        memory: Some(memory.into()),
    });
    s
}

fn cgroup_of(host: &FakeHost) -> (String, crate::host::fake::FakeCgroup) {
    let st = host.state();
    assert_eq!(st.cgroups.len(), 1, "{:?}", st.cgroups);
    let (n, c) = st.cgroups.iter().next().unwrap();
    (n.clone(), c.clone())
}

#[test]
fn limits_put_the_vmm_in_a_cgroup_of_its_own_that_deletion_removes() {
    let e = env();
    let s = limited(RunPolicy::Always, "500m", "128Mi");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    let pid = e.host.running()[0];
    let (name, cg) = cgroup_of(&e.host);
    assert_eq!(name, "default_web");
    assert_eq!(cg.limits.cpu_quota_us, Some(50_000));
    assert_eq!(cg.limits.memory_bytes, Some(128 << 20));
    assert_eq!(cg.pids.iter().copied().collect::<Vec<_>>(), [pid]);
    // The VMM joined it as it was spawned, not afterwards.
    let req = e.host.state().spawned[0].clone();
    assert_eq!(
        req.cgroup,
        [Path::new(crate::host::fake::FAKE_CGROUPS).join("default_web/cgroup.procs")]
    );
    // A cgroup with a process in it cannot go; cleanup kills the VMM first.
    assert!(e.host.cgroups().remove("default_web").is_err());
    e.rt.cleanup(&vm()).unwrap();
    assert!(e.host.state().cgroups.is_empty());
    assert!(e.host.running().is_empty());
}

#[test]
fn a_restarted_agent_keeps_the_vms_cgroup() {
    let e = env();
    let s = limited(RunPolicy::Always, "250m", "96Mi");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let pid = e.host.running()[0];
    e.host.boot(&e.rt.dir(&vm()).control_socket());
    let again = runtime(&e.rt.config().root, &e.host);
    let d2 = again.reconcile(&vm(), &s, 1, &d.status, at(5));
    assert_eq!(d2.status.phase, Some(Phase::Running));
    assert_eq!(e.host.state().spawned.len(), 1, "no second VMM");
    let (name, cg) = cgroup_of(&e.host);
    assert_eq!(name, "default_web");
    assert_eq!(cg.pids.iter().copied().collect::<Vec<_>>(), [pid]);
    assert_eq!(cg.limits.cpu_quota_us, Some(25_000));
    // A restart after an exit reuses it too.
    e.host.exit(pid);
    let d3 = again.reconcile(&vm(), &s, 1, &d2.status, at(6));
    let d4 = again.reconcile(&vm(), &s, 1, &d3.status, at(60));
    assert_eq!(d4.status.restart_count, 1);
    let new_pid = e.host.running()[0];
    assert_ne!(new_pid, pid);
    let (_, cg) = cgroup_of(&e.host);
    assert_eq!(cg.pids.iter().copied().collect::<Vec<_>>(), [new_pid]);
}

#[test]
fn a_change_of_limits_restarts_the_vm_with_the_new_ones() {
    let e = env();
    let s = limited(RunPolicy::Always, "500m", "128Mi");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    e.host.boot(&e.rt.dir(&vm()).control_socket());
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(1));
    assert_eq!(d.status.phase, Some(Phase::Running));
    // Unchanged limits: nothing happens.
    e.rt.reconcile(&vm(), &s, 1, &d.status, at(2));
    assert_eq!(e.host.state().spawned.len(), 1);
    let s2 = limited(RunPolicy::Always, "1", "128Mi");
    e.rt.reconcile(&vm(), &s2, 2, &d.status, at(3));
    assert_eq!(e.host.state().spawned.len(), 2, "restarted to apply");
    let (_, cg) = cgroup_of(&e.host);
    assert_eq!(cg.limits.cpu_quota_us, Some(100_000));
    assert_eq!(cg.pids.len(), 1);
    // Limits dropped: an unlimited cgroup, again by a restart.
    let mut s3 = s2.clone();
    s3.isolation.limits = None;
    e.rt.reconcile(&vm(), &s3, 3, &d.status, at(4));
    assert_eq!(e.host.state().spawned.len(), 3);
    let (_, cg) = cgroup_of(&e.host);
    assert_eq!(cg.limits, Default::default());
}

#[test]
fn a_vm_without_limits_runs_where_the_node_has_no_cgroups() {
    let e = env();
    let s = spec(RunPolicy::Always);
    e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    // Where cgroups work, it gets one with no limits.
    let (_, cg) = cgroup_of(&e.host);
    assert_eq!(cg.limits, Default::default());
    assert_eq!(cg.pids.len(), 1);

    let e = env();
    e.host.state().no_cgroups = Some("no cgroup v2 with cpu and memory".into());
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert!(e.host.state().spawned[0].cgroup.is_empty());
    e.rt.cleanup(&vm()).unwrap();
}

#[test]
fn limits_the_node_cannot_enforce_keep_the_vm_down_with_a_reason() {
    // No usable cgroups at all.
    let e = env();
    e.host.state().no_cgroups =
        Some("cgroup v2 at /sys/fs/cgroup lacks the controllers cpu".into());
    let s = limited(RunPolicy::Always, "500m", "128Mi");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(e.host.state().spawned.is_empty(), "never runs unlimited");
    let c = cond::find(&d.status.conditions, cond::READY).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "LimitsNotEnforceable")
    );
    assert!(c.message.contains("spec.isolation.limits"), "{}", c.message);
    assert!(
        c.message.contains("lacks the controllers cpu"),
        "{}",
        c.message
    );
    assert!(cond::is_true(&d.status.conditions, cond::STALLED));
    let events = crate::reconcile::transitions(&MicroVMStatus::default(), &d.status);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "LimitsNotEnforceable"),
        "{events:?}"
    );

    // cgroups exist but the agent may not create one (no permission).
    let e = env();
    e.host.state().fail_cgroups = Some(std::io::ErrorKind::PermissionDenied);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(e.host.state().spawned.is_empty());
    let c = cond::find(&d.status.conditions, cond::READY).unwrap();
    assert_eq!(c.reason, "LimitsNotEnforceable");
    assert!(
        c.message.to_lowercase().contains("permission denied"),
        "{}",
        c.message
    );
    assert_eq!(d.requeue, Some(Duration::from_secs(10)));
    // Once the node can, the next look starts it.
    e.host.state().fail_cgroups = None;
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(10));
    assert_eq!(e.host.state().spawned.len(), 1);
    assert_eq!(d.status.phase, Some(Phase::Starting));
}

fn config_of(e: &Env) -> VmConfig {
    let text = std::fs::read_to_string(e.rt.dir(&vm()).config()).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_jailed_vm_gets_its_own_stable_ids_and_only_run_is_given_to_them() {
    let e = env();
    let s = spec(RunPolicy::Always);
    assert_eq!(s.isolation.jail, Toggle::Enabled, "the default");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let dir = e.rt.dir(&vm());
    let ids = jail::read(&dir).expect("jail.json");
    assert!((jail::JAIL_ID_BASE..jail::JAIL_ID_BASE + jail::JAIL_ID_COUNT).contains(&ids.uid));
    assert_eq!(
        e.host.state().owners.clone(),
        [(dir.run_dir(), (ids.uid, ids.gid))].into()
    );
    let cfg = config_of(&e);
    let jail = cfg.jail.clone().expect("jailed config");
    assert_eq!(
        (jail.root.as_path(), jail.uid, jail.gid),
        (dir.path(), ids.uid, ids.gid)
    );
    cfg.validate().unwrap();

    // An agent restart keeps the ids and adopts the VMM without a restart.
    let again = runtime(e._root.path(), &e.host);
    e.host.boot(&dir.control_socket());
    let d = again.reconcile(&vm(), &s, 1, &d.status, at(1));
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(e.host.state().spawned.len(), 1);
    assert_eq!(jail::read(&dir), Some(ids));

    // Another VM gets other ids; an unjailed one gets none and keeps root's run/.
    let other = VmRef {
        name: "db".into(),
        ..vm()
    };
    e.rt.reconcile(&other, &s, 1, &MicroVMStatus::default(), at(2));
    let other_ids = jail::read(&e.rt.dir(&other)).unwrap();
    assert_ne!(other_ids.uid, ids.uid);
    let plain = VmRef {
        name: "plain".into(),
        ..vm()
    };
    let mut unjailed = spec(RunPolicy::Always);
    unjailed.isolation.jail = Toggle::Disabled;
    let allowing = runtime_with(e._root.path(), &e.host, |c| {
        c.sandbox.allow_jail_disabled = true;
    });
    allowing.reconcile(&plain, &unjailed, 1, &MicroVMStatus::default(), at(3));
    let pdir = e.rt.dir(&plain);
    assert!(jail::read(&pdir).is_none());
    assert!(!e.host.state().owners.contains_key(&pdir.run_dir()));
    let text = std::fs::read_to_string(pdir.config()).unwrap();
    assert!(!text.contains("\"jail\""), "{text}");
}

#[test]
fn a_sandbox_switched_off_runs_only_where_the_node_allows_it() {
    for (field, change) in [
        (
            "spec.isolation.jail",
            (|s: &mut MicroVMSpec| s.isolation.jail = Toggle::Disabled) as fn(&mut MicroVMSpec),
        ),
        ("spec.isolation.seccomp", |s: &mut MicroVMSpec| {
            s.isolation.seccomp = Toggle::Disabled;
        }),
    ] {
        let e = env();
        let mut s = spec(RunPolicy::Always);
        change(&mut s);
        // The default node: nothing runs, not even sandboxed after all.
        let d =
            e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
        assert!(e.host.state().spawned.is_empty(), "{field}: started");
        assert!(!e.rt.dir(&vm()).config().exists(), "{field}: no config");
        let c = cond::find(&d.status.conditions, cond::READY).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "SandboxNotAllowed"),
            "{field}"
        );
        assert!(c.message.contains(field), "{}", c.message);
        assert!(c.message.contains("--allow-"), "{}", c.message);
        assert!(cond::is_true(&d.status.conditions, cond::STALLED));
        let events = crate::reconcile::transitions(&MicroVMStatus::default(), &d.status);
        assert!(
            events
                .iter()
                .any(|t| t.warning && t.reason == "SandboxNotAllowed"),
            "{events:?}"
        );

        // A node whose administrator allows both runs it as asked.
        let allowing = runtime_with(e._root.path(), &e.host, |c| {
            c.sandbox.allow_jail_disabled = true;
            c.sandbox.allow_seccomp_disabled = true;
        });
        let d = allowing.reconcile(&vm(), &s, 1, &d.status, at(10));
        assert_eq!(d.status.phase, Some(Phase::Starting), "{field}");
        assert_eq!(e.host.state().spawned.len(), 1);
        let cfg = config_of(&e);
        assert_eq!(cfg.jail.is_none(), s.isolation.jail == Toggle::Disabled);
        assert_eq!(cfg.seccomp, s.isolation.seccomp == Toggle::Enabled);
    }
}

#[test]
fn a_running_vm_whose_spec_switches_its_jail_off_is_ended_not_restarted() {
    let e = env();
    let s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let vmm = e.host.running()[0];
    let mut unjailed = s.clone();
    unjailed.isolation.jail = Toggle::Disabled;
    let d = e.rt.reconcile(&vm(), &unjailed, 2, &d.status, at(1));
    assert!(
        e.host.running().is_empty(),
        "the jailed VMM {vmm} still runs"
    );
    assert_eq!(e.host.state().spawned.len(), 1, "an unjailed VMM started");
    assert_eq!(
        ready(&d.status),
        ("False".into(), "SandboxNotAllowed".into())
    );
}

#[test]
fn a_vm_asked_paused_starts_paused_and_resumes_without_a_restart() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    s.power_state = PowerState::Paused;
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(config_of(&e).start_paused);
    assert_eq!(d.status.phase, Some(Phase::Paused));
    // Never ran, so never needed a pause request.
    assert!(e.host.state().requests.is_empty());
    s.power_state = PowerState::Running;
    e.rt.reconcile(&vm(), &s, 2, &d.status, at(1));
    let reqs: Vec<_> = e
        .host
        .state()
        .requests
        .iter()
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(reqs, [Request::Resume]);
    assert_eq!(
        e.host.state().spawned.len(),
        1,
        "startPaused is not compared"
    );
}

#[test]
fn a_stop_gives_the_vmm_the_grace_period_too() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    s.termination_grace_period_seconds = 45;
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    s.power_state = PowerState::Stopped;
    e.rt.reconcile(&vm(), &s, 2, &d.status, at(1));
    let reqs: Vec<_> = e
        .host
        .state()
        .requests
        .iter()
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(
        reqs,
        [Request::Shutdown {
            grace_seconds: Some(45)
        }]
    );
}

#[test]
fn an_oom_killed_vmm_is_reported_so_and_restarted_after_backoff() {
    let e = env();
    let s = limited(RunPolicy::Always, "1", "64Mi");
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let dir = e.rt.dir(&vm());
    assert_eq!(dir.read_record().unwrap().oom_kills_at_start, Some(0));
    let pid = e.host.running()[0];
    e.host.oom_kill(pid);
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(3));
    let last = d.status.last_exit.clone().unwrap();
    assert_eq!((last.reason.as_str(), last.code), ("OOMKilled", None));
    assert_eq!(
        ready(&d.status),
        ("False".into(), "CrashLoopBackOff".into())
    );
    let events = crate::reconcile::transitions(&MicroVMStatus::default(), &d.status);
    assert!(
        events
            .iter()
            .any(|t| t.warning && t.reason == "Exited" && t.note.contains("OOMKilled")),
        "{events:?}"
    );
    // An agent restart sees the same exit (kept in vm.json).
    let again = runtime(&e.rt.config().root, &e.host);
    let d = again.reconcile(&vm(), &s, 1, &d.status, at(5));
    assert_eq!(d.status.last_exit.as_ref().unwrap().reason, "OOMKilled");
    assert_eq!(e.host.state().spawned.len(), 1);
    // After the backoff it restarts, counting from the cgroup's count now.
    let d = again.reconcile(&vm(), &s, 1, &d.status, at(13));
    assert_eq!(e.host.state().spawned.len(), 2);
    assert_eq!(d.status.restart_count, 1);
    assert_eq!(dir.read_record().unwrap().oom_kills_at_start, Some(1));
    // This run is killed otherwise: plain Killed, the earlier OOM kill is not its own.
    let pid = e.host.running()[0];
    e.host.exit(pid);
    let d = again.reconcile(&vm(), &s, 1, &d.status, at(20));
    assert_eq!(d.status.last_exit.as_ref().unwrap().reason, "Killed");
}

#[test]
fn a_control_socket_another_process_serves_is_sent_nothing() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let dir = e.rt.dir(&vm());
    e.host.boot(&dir.control_socket());
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(1));
    assert_eq!(d.status.phase, Some(Phase::Running));
    // Every look checks the VMM the agent recorded, with its jail's uid.
    let vmm = dir.read_record().unwrap().vmm.unwrap();
    let jail_uid = jail::read(&dir).unwrap().uid;
    let target = e.host.state().targets.last().cloned().unwrap();
    assert_eq!(
        target,
        ControlTarget {
            socket: dir.control_socket(),
            vmm,
            jail_uid: Some(jail_uid),
        }
    );

    // The VMM replaces its socket with a link to another VM's (pid 4242).
    e.host.hijack(&dir.control_socket(), 4242);
    s.power_state = PowerState::Paused;
    let d = e.rt.reconcile(&vm(), &s, 2, &d.status, at(2));
    assert_eq!(
        ready(&d.status),
        ("False".into(), "ControlSocketMismatch".into())
    );
    let msg = &cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message;
    assert!(
        msg.contains("pid 4242") && msg.contains(&format!("pid {}", vmm.pid)),
        "{msg}"
    );
    assert!(cond::is_true(&d.status.conditions, cond::STALLED));
    assert!(e.host.state().requests.is_empty(), "no pause was sent");
    assert_eq!(e.host.running(), [vmm.pid], "nothing was killed");

    // Deleting it kills the recorded VMM by its cgroup, never through the socket.
    e.rt.cleanup(&vm()).unwrap();
    let st = e.host.state();
    assert!(st.requests.is_empty(), "{:?}", st.requests);
    assert_eq!(st.cgroup_kills, [(e.rt.cgroup_name(&vm()), vec![vmm.pid])]);
    assert!(st.running.is_empty());
}

#[test]
fn stopping_a_vm_ends_everything_in_its_cgroup() {
    let e = env();
    let s = spec(RunPolicy::Always);
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let name = e.rt.cgroup_name(&vm());
    let vmm = e.rt.dir(&vm()).read_record().unwrap().vmm.unwrap();
    // The VMM starts a process in its cgroup; the pid alone would miss it.
    let stray = e.host.stray(&name);
    e.host.boot(&e.rt.dir(&vm()).control_socket());
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(1));
    assert_eq!(d.status.phase, Some(Phase::Running));

    // Stopped: the guest ignores the button, the grace ends, the VMM is
    // killed (through its socket) and then its cgroup.
    e.rt.stop(&vm(), Duration::ZERO).unwrap();
    {
        let st = e.host.state();
        assert!(!st.running.contains_key(&vmm.pid));
        assert!(st.cgroups[&name].pids.is_empty(), "{:?}", st.cgroups[&name]);
        assert_eq!(st.cgroup_kills, [(name.clone(), vec![stray])]);
    }

    // A VMM that ends on its own may leave a process behind: the next start
    // clears the cgroup before its new VMM joins it.
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(2));
    let pid = e.host.running()[0];
    let stray = e.host.stray(&name);
    e.host.exit(pid);
    let d = e.rt.reconcile(&vm(), &s, 1, &d.status, at(100));
    assert!(e.host.running().is_empty(), "backing off");
    assert_eq!(e.host.state().cgroups[&name].pids, [stray].into());
    e.rt.reconcile(&vm(), &s, 1, &d.status, at(200));
    let st = e.host.state();
    let new = *st.running.keys().next().expect("restarted");
    assert_eq!(st.cgroups[&name].pids, [new].into(), "only the new VMM");
    assert_eq!(st.cgroup_kills.last(), Some(&(name.clone(), vec![stray])));
    drop(st);

    // Deleted: a stray left at the end is ended too, and the cgroup goes.
    let stray = e.host.stray(&name);
    e.rt.cleanup(&vm()).unwrap();
    let st = e.host.state();
    assert!(st.running.is_empty());
    assert!(!st.cgroups.contains_key(&name));
    assert_eq!(st.cgroup_kills.last(), Some(&(name, vec![stray])));
}

#[test]
fn without_a_cgroup_a_vm_is_stopped_by_its_pid() {
    let e = env();
    e.host.state().no_cgroups = Some("no cgroup v2 with cpu and memory".into());
    let s = spec(RunPolicy::Always);
    e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let vmm = e.rt.dir(&vm()).read_record().unwrap().vmm.unwrap();
    // Its control socket does not answer: the pid gets SIGKILL.
    e.host.hijack(&e.rt.dir(&vm()).control_socket(), 4242);
    e.rt.stop(&vm(), Duration::ZERO).unwrap();
    let st = e.host.state();
    assert_eq!(st.killed, [vmm.pid]);
    assert!(st.cgroup_kills.is_empty());
}

fn limits(cpu: Option<&str>, memory: Option<&str>) -> VmmLimits {
    VmmLimits {
        cpu: cpu.map(str::to_owned),
        memory: memory.map(str::to_owned),
    }
}

#[test]
fn spec_limits_become_kernel_units() {
    let l = limits_from_spec(&limits(Some("500m"), Some("128Mi"))).unwrap();
    assert_eq!(l.cpu_quota_us, Some(50_000));
    assert_eq!(l.memory_bytes, Some(128 << 20));
    let l = limits_from_spec(&limits(Some("2"), None)).unwrap();
    assert_eq!((l.cpu_quota_us, l.memory_bytes), (Some(200_000), None));
    // Below 1 ms per period the kernel refuses the quota: 1 ms it is.
    let l = limits_from_spec(&limits(Some("1m"), Some("1000"))).unwrap();
    assert_eq!((l.cpu_quota_us, l.memory_bytes), (Some(1_000), Some(4096)));
    assert!(!limits_from_spec(&limits(None, None)).unwrap().is_limited());
    let e = limits_from_spec(&limits(Some("lots"), None)).unwrap_err();
    assert!(e.to_string().contains("spec.isolation.limits.cpu"), "{e}");
}

#[test]
fn a_host_file_outside_the_allowed_directories_starts_nothing_and_says_why() {
    let e = env();
    for (field, path) in [
        ("spec.boot.kernel", "/etc/shadow"),
        ("spec.boot.kernel", "/k/../etc/shadow"),
        ("spec.boot.initrd", "/proc/kcore"),
        ("spec.disks[root].file.path", "/k/vmlinux"),
    ] {
        e.host.add_file(path, 1 << 20);
        let mut s = spec(RunPolicy::Always);
        match field {
            "spec.boot.kernel" => s.boot.kernel = path.into(),
            "spec.boot.initrd" => s.boot.initrd = Some(path.into()),
            _ => s.disks[0].file.as_mut().unwrap().path = path.into(),
        }
        let d =
            e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
        assert!(e.host.state().spawned.is_empty(), "{path}: spawned");
        let c = cond::find(&d.status.conditions, cond::READY).unwrap();
        assert_eq!(c.reason, "HostPathNotAllowed", "{path}: {}", c.message);
        assert!(c.message.starts_with(field), "{}", c.message);
        assert!(c.message.contains(path), "{}", c.message);
    }
}

#[test]
fn another_vms_directory_is_never_taken_for_this_ones() {
    let e = env();
    let s = spec(RunPolicy::Always);
    e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let running = e.host.running();
    assert_eq!(running.len(), 1);
    // The same name, another uid (re-created while the old one's state is
    // still here, or a directory name shared through its hash).
    let other = VmRef {
        uid: "uid-2".into(),
        ..vm()
    };
    let d =
        e.rt.reconcile(&other, &s, 1, &MicroVMStatus::default(), at(1));
    assert_eq!(ready(&d.status).1, "StateUnreadable");
    let msg = &cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message;
    assert!(msg.contains("holds the record of default/web"), "{msg}");
    assert!(d.actions.is_empty(), "{:?}", d.actions);
    assert_eq!(e.host.state().spawned.len(), 1, "nothing started");
    assert_eq!(e.host.running(), running, "the other VM's VMM runs on");
    // Deleting the newcomer gives back nothing of the first VM.
    e.rt.cleanup(&other).unwrap();
    assert_eq!(e.host.running(), running);
    assert!(e.rt.dir(&vm()).path().exists());
    assert!(e.rt.record(&vm()).is_some());
}

#[test]
fn a_vm_takes_and_deletes_only_taps_it_created() {
    let e = env();
    let s = spec(RunPolicy::Always);
    // Another VM's device already has this VM's tap name (names are hashes).
    let tap = vmconfig::tap_name("default", "web", 0);
    e.host
        .state()
        .links
        .insert(tap.clone(), Some("elsewhere".into()));
    let d =
        e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(e.host.state().spawned.is_empty());
    let msg = &cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message;
    assert!(msg.contains("was not created for this VM"), "{msg}");
    // Deleting this VM leaves the other's device alone.
    e.rt.cleanup(&vm()).unwrap();
    assert_eq!(
        e.host.state().links.get(&tap),
        Some(&Some("elsewhere".into()))
    );
    // Without it, the VM creates its tap, records it, and deletes it at the end.
    e.host.state().links.remove(&tap);
    e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(1));
    assert_eq!(e.host.state().spawned.len(), 1);
    assert_eq!(e.rt.dir(&vm()).read_taps(), Some(vec![tap.clone()]));
    e.rt.cleanup(&vm()).unwrap();
    assert!(!e.host.state().links.contains_key(&tap));
}

#[test]
fn a_tap_interface_needs_a_device_the_node_allows() {
    let e = env();
    let mut s = spec(RunPolicy::Always);
    s.interfaces[0].kind = runv_crds::microvm::InterfaceType::Tap;
    for tap in ["tenant0", "runvbr0", "rv0123456789-0"] {
        s.interfaces[0].tap_device = Some(tap.into());
        let d =
            e.rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
        assert_eq!(ready(&d.status).1, "DeviceNotAllowed", "{tap}");
        let msg = &cond::find(&d.status.conditions, cond::READY)
            .unwrap()
            .message;
        assert!(msg.starts_with("spec.interfaces[0].tapDevice: "), "{msg}");
        assert!(msg.contains(tap), "{msg}");
        assert!(e.host.state().spawned.is_empty(), "{tap}");
    }
    for tap in ["tenant-a-1", "shared0"] {
        assert_eq!(e.rt.tap_refusal("f", tap), None, "{tap}");
    }
    assert!(e.rt.tap_refusal("f", "shared01").is_some());
}

fn named(name: &str) -> VmRef {
    VmRef {
        namespace: "default".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// A status the operator bound with `tenant` (its `status.tenant`).
fn placed_as(tenant: &str, isolation: runv_crds::microvm::NodeIsolation) -> MicroVMStatus {
    MicroVMStatus {
        tenant: Some(runv_crds::microvm::Tenant {
            name: tenant.into(),
            node_isolation: isolation,
        }),
        ..MicroVMStatus::default()
    }
}

/// A runtime for a node advertising 2 vCPUs and 1 GiB.
fn small_node(e: &Env) -> Runtime {
    runtime_with(e._root.path(), &e.host, |c| {
        c.allocatable = Some(Allocatable {
            vcpus: 2,
            memory: 1 << 30,
        })
    })
}

#[test]
fn a_start_over_the_nodes_capacity_is_refused_and_retried() {
    let e = env();
    let rt = small_node(&e);
    let mut big = spec(RunPolicy::Always);
    big.resources.vcpus = 2;
    let shared = placed_as("default", runv_crds::microvm::NodeIsolation::Shared);
    let started = rt.reconcile(&named("big"), &big, 1, &shared, at(0));
    assert_eq!(started.status.phase, Some(Phase::Starting));
    let small = spec(RunPolicy::Always);
    let d = rt.reconcile(&named("small"), &small, 1, &shared, at(1));
    assert_eq!(ready(&d.status), ("False".into(), "OutOfCapacity".into()));
    let msg = &cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message;
    assert!(msg.contains("needs 1 vCPUs and 64 MiB"), "{msg}");
    assert_eq!(d.requeue, Some(Duration::from_secs(10)));
    assert_eq!(e.host.state().spawned.len(), 1, "nothing more started");
    assert!(rt.dir(&named("small")).read_claim().is_none());
    // A VM that ended keeps its place: still refused once `big` has exited.
    let pid = e.host.running()[0];
    e.host.exit(pid);
    let mut once = big.clone();
    once.run_policy = RunPolicy::Once;
    let d = rt.reconcile(&named("big"), &once, 1, &started.status, at(2));
    assert_eq!(d.status.phase, Some(Phase::Failed));
    let d = rt.reconcile(&named("small"), &small, 1, &shared, at(3));
    assert_eq!(ready(&d.status).1, "OutOfCapacity");
    // Once it is removed from the node, its place is free.
    rt.cleanup(&named("big")).unwrap();
    let d = rt.reconcile(&named("small"), &small, 1, &shared, at(4));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert!(rt.dir(&named("small")).read_claim().is_some());
}

#[test]
fn a_start_beside_another_tenants_exclusive_vm_is_refused() {
    use runv_crds::microvm::NodeIsolation::{Exclusive, Shared};
    let e = env();
    let rt = small_node(&e);
    let s = spec(RunPolicy::Always);
    let d = rt.reconcile(&named("acme"), &s, 1, &placed_as("acme", Exclusive), at(0));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    let d = rt.reconcile(
        &named("mallory"),
        &s,
        1,
        &placed_as("mallory", Shared),
        at(1),
    );
    assert_eq!(ready(&d.status).1, "IsolationConflict");
    // Its own tenant's VMs may join it.
    let d = rt.reconcile(&named("acme-2"), &s, 1, &placed_as("acme", Shared), at(2));
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert_eq!(e.host.state().spawned.len(), 2);
}

#[test]
fn an_exclusive_vm_does_not_start_beside_another_tenants() {
    use runv_crds::microvm::NodeIsolation::{Exclusive, Shared};
    let e = env();
    let rt = small_node(&e);
    let s = spec(RunPolicy::Always);
    rt.reconcile(&named("blue"), &s, 1, &placed_as("blue", Shared), at(0));
    let d = rt.reconcile(&named("acme"), &s, 1, &placed_as("acme", Exclusive), at(1));
    assert_eq!(ready(&d.status).1, "IsolationConflict");
    let msg = &cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message;
    assert!(msg.contains("default/blue (tenant blue)"), "{msg}");
}

#[test]
fn a_refused_restart_is_not_counted_as_one() {
    let e = env();
    let rt = small_node(&e);
    let shared = placed_as("default", runv_crds::microvm::NodeIsolation::Shared);
    let s = spec(RunPolicy::Always);
    let d = rt.reconcile(&named("a"), &s, 1, &shared, at(0));
    // Another VM's place appears meanwhile (an agent from before claims
    // started it, say): the restart no longer fits.
    let other = rt.dir(&named("b"));
    other.create().unwrap();
    other
        .write_claim(&crate::reconcile::admit::Claim {
            namespace: "default".into(),
            name: "b".into(),
            uid: "uid-b".into(),
            vcpus: 2,
            memory: 64 << 20,
            tenant: shared.tenant.clone(),
        })
        .unwrap();
    let pid = e.host.running()[0];
    e.host.exit(pid);
    let d = rt.reconcile(&named("a"), &s, 1, &d.status, at(3));
    assert_eq!(ready(&d.status).1, "CrashLoopBackOff");
    // Its back-off over, the restart is decided, and refused.
    let d = rt.reconcile(&named("a"), &s, 1, &d.status, at(13));
    assert_eq!(ready(&d.status).1, "OutOfCapacity");
    assert_eq!(e.host.state().spawned.len(), 1);
    assert_eq!(d.status.restart_count, 0);
    // The place without a record is known, so it is collected as an orphan.
    assert!(rt.known().contains(&named("b")));
}

#[test]
fn standalone_mode_admits_without_claims() {
    let e = env();
    let d = e.rt.reconcile(
        &vm(),
        &spec(RunPolicy::Always),
        1,
        &MicroVMStatus::default(),
        at(0),
    );
    assert_eq!(d.status.phase, Some(Phase::Starting));
    assert!(e.rt.dir(&vm()).read_claim().is_none());
}

#[test]
fn two_vms_started_at_once_are_never_both_admitted_into_one_room() {
    let e = env();
    let rt = Arc::new(runtime_with(e._root.path(), &e.host, |c| {
        c.allocatable = Some(Allocatable {
            vcpus: 1,
            memory: 1 << 30,
        })
    }));
    let shared = placed_as("default", runv_crds::microvm::NodeIsolation::Shared);
    let gate = Arc::new(std::sync::Barrier::new(2));
    let runs: Vec<_> = ["race-a", "race-b"]
        .into_iter()
        .map(|name| {
            let (rt, gate, shared) = (rt.clone(), gate.clone(), shared.clone());
            std::thread::spawn(move || {
                gate.wait();
                let d = rt.reconcile(&named(name), &spec(RunPolicy::Always), 1, &shared, at(0));
                ready(&d.status).1
            })
        })
        .collect();
    let mut reasons: Vec<String> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    reasons.sort();
    assert_eq!(reasons, ["Booting", "OutOfCapacity"]);
    assert_eq!(e.host.state().spawned.len(), 1);
}

/// An image source that hands out one image per reference (or fails as
/// told), and remembers what it was asked to keep when collecting.
#[derive(Default)]
struct FakeImages {
    fail: std::sync::Mutex<Option<crate::images::ImageFailure>>,
    kept: std::sync::Mutex<Vec<Vec<String>>>,
}

impl crate::images::ImageSource for FakeImages {
    fn prepare(
        &self,
        _key: &str,
        _namespace: &str,
        container: &runv_crds::secureworkload::Container,
        _secrets: &[String],
    ) -> Result<crate::images::Prepared, crate::images::ImageFailure> {
        if let Some(f) = self.fail.lock().unwrap().clone() {
            return Err(f);
        }
        let hex = if container.image.ends_with(":2") {
            "b2"
        } else {
            "b1"
        };
        let config = serde_json::from_value(serde_json::json!({
            "version": 1, "imageID": format!("reg/app@sha256:{hex}"),
            "manifestDigest": format!("sha256:{hex}"), "argv": ["/app"],
            "env": [], "workingDir": "/", "user": "",
        }))
        .unwrap();
        Ok(crate::images::Prepared {
            record: crate::images::ImageRecord {
                image: container.image.clone(),
                image_id: format!("reg/app@sha256:{hex}"),
                manifest_digest: format!("sha256:{hex}"),
                rootfs: format!("/store/rootfs/{hex}.img").into(),
                container: serde_json::to_string(container).unwrap(),
            },
            config,
            pulled: true,
            took: Duration::from_millis(5),
        })
    }

    fn rootfs_dir(&self) -> PathBuf {
        "/store/rootfs".into()
    }

    fn collect(&self, in_use: &[String]) -> Result<String, String> {
        self.kept.lock().unwrap().push(in_use.to_vec());
        Ok(String::new())
    }
}

fn container_spec(image: &str) -> MicroVMSpec {
    let mut s = spec(RunPolicy::Always);
    s.container = Some(serde_json::from_value(serde_json::json!({ "image": image })).unwrap());
    s
}

#[test]
fn a_container_vm_gets_its_image_first_read_only_and_reports_it() {
    let Env { _root, host, rt } = env();
    host.add_file("/store/rootfs/b1.img", 8 << 20);
    host.add_file("/store/rootfs/b2.img", 8 << 20);
    let images = Arc::new(FakeImages::default());
    let rt = rt.with_images(images.clone());
    let s = container_spec("reg/app:1");
    let d = rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    let reasons: Vec<&str> = d.events.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["Pulling", "Pulled"]);
    let status = d.status.container.clone().expect("status.container");
    assert_eq!(status.image_id, "reg/app@sha256:b1");
    let dir = rt.dir(&vm());
    let config = VmConfig::from_file(&dir.config()).unwrap();
    // The kernel is descriptor 3; the root filesystem the next one, first.
    assert_eq!(config.disks[0].path, Path::new("/proc/self/fd/4"));
    assert!(config.disks[0].read_only);
    assert_eq!(config.disks.len(), 3);
    assert!(dir.container_config().is_file());

    // Running: nothing pulled again, nothing restarted.
    host.boot(&dir.control_socket());
    let d2 = rt.reconcile(&vm(), &s, 1, &d.status, at(2));
    assert!(d2.events.is_empty());
    assert_eq!(host.state().spawned.len(), 1);

    // Another image: the VM restarts with it.
    let s2 = container_spec("reg/app:2");
    let d3 = rt.reconcile(&vm(), &s2, 2, &d2.status, at(3));
    assert_eq!(host.state().spawned.len(), 2, "{:?}", d3.status.conditions);
    assert_eq!(d3.status.container.unwrap().image_id, "reg/app@sha256:b2");

    // Collection keeps what the VM's directory records.
    assert_eq!(rt.collect_images(), Some(Ok(String::new())));
    assert_eq!(images.kept.lock().unwrap()[0], ["sha256:b2"]);
}

#[test]
fn an_image_that_is_not_ready_starts_nothing_and_says_why() {
    let Env { _root, host, rt } = env();
    let images = Arc::new(FakeImages::default());
    let rt = rt.with_images(images.clone());
    let s = container_spec("reg/app:1");
    *images.fail.lock().unwrap() = Some(crate::images::ImageFailure {
        reason: runv_crds::contract::Reason::ErrImagePull,
        message: "pulling \"reg/app:1\": 401".into(),
        retry: Some(Duration::from_secs(10)),
    });
    let d = rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(host.state().spawned.is_empty());
    assert_eq!(ready(&d.status), ("False".into(), "ErrImagePull".into()));
    let stalled = cond::find(&d.status.conditions, cond::STALLED).unwrap();
    assert_eq!(stalled.status, "False", "the next try may work");
    assert_eq!(d.requeue, Some(Duration::from_secs(10)));
    // A reference nothing but a spec change mends: stalled.
    *images.fail.lock().unwrap() = Some(crate::images::ImageFailure {
        reason: runv_crds::contract::Reason::InvalidImageName,
        message: "spec.container.image: invalid".into(),
        retry: None,
    });
    let d = rt.reconcile(&vm(), &s, 1, &d.status, at(11));
    assert!(host.state().spawned.is_empty());
    assert_eq!(
        ready(&d.status),
        ("False".into(), "InvalidImageName".into())
    );
    let stalled = cond::find(&d.status.conditions, cond::STALLED).unwrap();
    assert_eq!(stalled.status, "True");
}

/// A guest kit in `dir` (kernel, the wanted modules, version) and a static
/// runv-init stand-in (an ELF header naming no loader).
fn guest_kit(dir: &Path) -> GuestKitConfig {
    let kit = dir.join("kit");
    let mods = kit.join("modules");
    std::fs::create_dir_all(&mods).unwrap();
    let mut dep = String::new();
    for name in crate::host::initramfs::WANTED {
        std::fs::write(mods.join(format!("{name}.ko")), name).unwrap();
        dep.push_str(&format!("{name}.ko:\n"));
    }
    std::fs::write(mods.join("modules.dep"), dep).unwrap();
    std::fs::write(mods.join("modules.builtin"), "").unwrap();
    std::fs::write(kit.join("vmlinux"), "kernel").unwrap();
    std::fs::write(kit.join("version"), "6.1.0-test\n").unwrap();
    let mut init = vec![0u8; 64];
    init[..5].copy_from_slice(b"\x7fELF\x02");
    std::fs::write(dir.join("runv-init"), init).unwrap();
    GuestKitConfig {
        dir: kit,
        init: dir.join("runv-init"),
    }
}

#[test]
fn a_container_vm_without_a_kernel_boots_the_guest_kit() {
    let tmp = tempfile::tempdir().unwrap();
    let kit = guest_kit(tmp.path());
    let Env {
        _root: root, host, ..
    } = env();
    host.add_file("/store/rootfs/b1.img", 8 << 20);
    let mut s = container_spec("reg/app:1");
    s.boot = Default::default();

    // No kit on this node: the VM says so and starts nothing.
    let rt = runtime(root.path(), &host).with_images(Arc::new(FakeImages::default()));
    let d = rt.reconcile(&vm(), &s, 1, &MicroVMStatus::default(), at(0));
    assert!(host.state().spawned.is_empty());
    assert_eq!(ready(&d.status), ("False".into(), "KernelNotFound".into()));
    let msg = cond::find(&d.status.conditions, cond::READY)
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("no guest kit configured"), "{msg}");

    // With the kit: its kernel and initramfs, runv-init's channel on the
    // command line, and a vsock device for it.
    let initrd = crate::host::guestkit::initramfs(&kit.dir, &kit.init, &kit.cache()).unwrap();
    host.add_file(kit.dir.join("vmlinux"), 6);
    host.add_file(&initrd, 1 << 20);
    let kit_dir = kit.dir.clone();
    let rt = runtime_with(root.path(), &host, |c| {
        c.allowed.kernels.push(kit_dir);
        c.guest_kit = Some(kit);
    })
    .with_images(Arc::new(FakeImages::default()));
    let d = rt.reconcile(&vm(), &s, 1, &d.status, at(1));
    assert_eq!(host.state().spawned.len(), 1, "{:?}", d.status.conditions);
    let config = VmConfig::from_file(&rt.dir(&vm()).config()).unwrap();
    assert!(
        config.cmdline.starts_with(KIT_CMDLINE),
        "{}",
        config.cmdline
    );
    assert_eq!(config.kernel, Path::new("/proc/self/fd/3"));
    assert_eq!(config.initrd.as_deref(), Some(Path::new("/proc/self/fd/4")));
    assert_eq!(
        config.disks[0].path,
        Path::new("/proc/self/fd/5"),
        "the root filesystem"
    );
    assert!(config.vsock.is_some());
}
