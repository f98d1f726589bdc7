//! A container VM's process, through its guest's `runv-init`: the config
//! the guest is sent, the link that records what it reports (kept while
//! the VMM runs, see [`crate::host::guest`]), the records and logs of the
//! current and previous run, and `status.container` made from them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use runv_crds::MicroVMSpec;
use runv_crds::microvm::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, InterfaceType,
};
use runv_vmm_api::guest::{
    CONFIG_VERSION, ContainerConfig, Exited, GuestConfig, GuestNetwork, RootFs,
};

use super::{Runtime, VmRef};
use crate::host::guest::{LinkSpec, RunRecord};
use crate::host::logs;
use crate::reconcile::Observed;

/// Seconds the guest waits for the agent to record its exit before it
/// powers off anyway.
const EXIT_REPORT_TIMEOUT_SECONDS: u32 = 60;
/// kubelet's exit code for a container whose end nobody saw.
const UNKNOWN_EXIT_CODE: i32 = 137;

fn ms(v: Option<i64>) -> Option<Time> {
    Some(Time(Timestamp::from_millisecond(v?).ok()?))
}

/// `Completed`, `Error`, `OOMKilled` or `StartError`, as kubelet says;
/// times are when the agent heard of the start and the end (the node's
/// clock, as kubelet's are), `at` when it knows no better.
pub fn terminated(e: &Exited, run: &RunRecord, at: Timestamp) -> ContainerStateTerminated {
    let code = e.exit_code();
    let reason = if e.start_error.is_some() {
        "StartError"
    } else if e.oom_killed {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    ContainerStateTerminated {
        exit_code: code,
        signal: e.signal,
        reason: reason.into(),
        message: e.start_error.clone(),
        started_at: ms(run.started_at_ms),
        finished_at: ms(run.exited_at_ms).unwrap_or(Time(at)),
    }
}

/// The state a run record tells, with the VMM `running` or not, `at` when
/// it ended if it did.
pub fn state_of(run: &RunRecord, running: bool, at: Timestamp) -> ContainerState {
    let mut s = ContainerState::default();
    match (&run.exited, &run.started) {
        (Some(e), _) => s.terminated = Some(terminated(e, run, at)),
        (None, Some(_)) if running => {
            s.running = Some(ContainerStateRunning {
                started_at: ms(run.started_at_ms).unwrap_or(Time(at)),
            });
        }
        (None, _) if !running => {
            s.terminated = Some(ContainerStateTerminated {
                exit_code: UNKNOWN_EXIT_CODE,
                signal: None,
                reason: "ContainerStatusUnknown".into(),
                message: Some(
                    "the VM ended without its guest reporting how the container ended".into(),
                ),
                started_at: ms(run.started_at_ms),
                finished_at: Time(at),
            });
        }
        (None, _) => {
            s.waiting = Some(ContainerStateWaiting {
                reason: "ContainerCreating".into(),
                message: Some(if run.booted_at_ms.is_some() {
                    "the guest is up and starts the container".into()
                } else {
                    "the guest boots".into()
                }),
            });
        }
    }
    s
}

impl Runtime {
    /// The container's exit code as the guest reported it for the last run.
    pub(super) fn container_exit_code(&self, vm: &VmRef) -> Option<i32> {
        RunRecord::read(&self.dir(vm).container_run())?
            .exited
            .map(|e| e.exit_code())
    }

    /// Moves the last run's record and log aside, for a new run.
    pub(super) fn begin_container_run(&self, vm: &VmRef) -> Result<(), crate::host::HostError> {
        let dir = self.dir(vm);
        crate::host::files::create_dir(&dir.path().join("container"))?;
        if dir.container_run().is_file() {
            crate::host::files::rotate(&dir.container_run(), &dir.container_run_previous())?;
        }
        let kept = logs::DEFAULT_MAX_FILES;
        for old in logs::files(&dir.container_log_previous(), kept) {
            crate::host::files::remove_file(&old)?;
        }
        for (k, from) in logs::files(&dir.container_log(), kept)
            .iter()
            .rev()
            .enumerate()
        {
            let to = match k {
                0 => dir.container_log_previous(),
                k => logs::numbered(&dir.container_log_previous(), k as u32),
            };
            crate::host::files::rotate(from, &to)?;
        }
        Ok(())
    }

    /// What the guest is sent: the merged container config, the VM's name
    /// as hostname, its first disk as root filesystem, its first `Nat`
    /// interface's address.
    fn guest_config(&self, vm: &VmRef, spec: &MicroVMSpec) -> Option<GuestConfig> {
        let dir = self.dir(vm);
        let container: ContainerConfig =
            serde_json::from_slice(&std::fs::read(dir.container_config()).ok()?).ok()?;
        let (ifaces, _) = self.addresses(vm, spec);
        let network = spec
            .interfaces
            .iter()
            .zip(&ifaces)
            .find(|(i, _)| i.kind == InterfaceType::Nat)
            .and_then(|(_, s)| s.ip.clone())
            .map(|ip| {
                let gw = self.config.bridge.gateway.to_string();
                GuestNetwork {
                    interface: "eth0".into(),
                    address: format!("{ip}/{}", self.config.bridge.prefix),
                    gateway: Some(gw.clone()),
                    nameservers: vec![gw],
                    search: vec![],
                }
            });
        Some(GuestConfig {
            version: CONFIG_VERSION,
            container,
            hostname: vm.name.chars().take(63).collect(),
            rootfs: RootFs {
                source: "/dev/vda".into(),
                fstype: "erofs".into(),
            },
            network,
            termination_grace_period_seconds: u32::try_from(spec.termination_grace_period_seconds)
                .unwrap_or(u32::MAX),
            exit_report_timeout_seconds: EXIT_REPORT_TIMEOUT_SECONDS,
        })
    }

    /// Keeps the link to a running container VM's guest, and ends it once
    /// the VMM is gone.
    pub(super) fn keep_link(&self, vm: &VmRef, spec: &MicroVMSpec, obs: &Observed) {
        let Some(links) = &self.links else { return };
        let dir = self.dir(vm);
        let key = vm.to_string();
        let running = matches!(obs, Observed::Running { .. });
        let boot = self.record(vm).and_then(|r| r.vmm);
        match (running, spec.container.is_some(), boot) {
            (true, true, Some(id)) => {
                let Some(config) = self.guest_config(vm, spec) else {
                    tracing::warn!(vm = %vm, "no container config on the node: the guest gets none");
                    return;
                };
                links.ensure(LinkSpec {
                    key,
                    boot: format!("{}-{}", id.pid, id.start_ticks),
                    socket: dir.vsock(),
                    config,
                    record: dir.container_run(),
                    log: dir.container_log(),
                    log_max_bytes: logs::DEFAULT_MAX_BYTES,
                    log_max_files: logs::DEFAULT_MAX_FILES,
                });
            }
            _ => links.forget(&key),
        }
    }

    /// Asks a container VM's guest to stop its container (SIGTERM, then
    /// SIGKILL after the grace period); false when there is no link.
    pub(super) fn stop_container(&self, vm: &VmRef, grace_seconds: u32) -> bool {
        self.links
            .as_ref()
            .is_some_and(|l| l.request_stop(&vm.to_string(), grace_seconds))
    }

    /// `status.container`: the image the VM runs and its process's state.
    pub(super) fn container_status(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        obs: &Observed,
        restart_count: i32,
        now: Timestamp,
    ) -> Option<ContainerStatus> {
        spec.container.as_ref()?;
        let dir = self.dir(vm);
        let image = dir.read_image_record()?;
        let running = matches!(obs, Observed::Running { .. });
        let at = match obs {
            Observed::NotRunning { exit: Some(e), .. } => e.at,
            _ => now,
        };
        let current = RunRecord::read(&dir.container_run());
        let state = current.as_ref().map(|r| state_of(r, running, at));
        let last_state =
            RunRecord::read(&dir.container_run_previous()).map(|r| state_of(&r, false, at));
        Some(ContainerStatus {
            image: image.image,
            image_id: image.image_id,
            ready: state.as_ref().is_some_and(|s| s.running.is_some()),
            state,
            last_state,
            restart_count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_vmm_api::guest::Started;

    fn exited(code: Option<i32>, signal: Option<i32>, oom: bool, err: Option<&str>) -> Exited {
        Exited {
            code,
            signal,
            oom_killed: oom,
            start_error: err.map(Into::into),
            started_at_nanos: 1_000_000_000,
            finished_at_nanos: 2_000_000_000,
        }
    }

    #[test]
    fn exits_read_as_kubelets_reasons_at_the_nodes_times() {
        let at = Timestamp::from_second(9).unwrap();
        let run = RunRecord {
            started_at_ms: Some(1_000),
            exited_at_ms: Some(2_000),
            ..RunRecord::default()
        };
        let t = |e: Exited| terminated(&e, &run, at);
        let c = t(exited(Some(0), None, false, None));
        assert_eq!((c.exit_code, c.reason.as_str()), (0, "Completed"));
        let c = t(exited(Some(3), None, false, None));
        assert_eq!((c.exit_code, c.reason.as_str()), (3, "Error"));
        let c = t(exited(None, Some(9), true, None));
        assert_eq!(
            (c.exit_code, c.reason.as_str(), c.signal),
            (137, "OOMKilled", Some(9))
        );
        let c = t(exited(None, None, false, Some("no such file")));
        assert_eq!((c.exit_code, c.reason.as_str()), (128, "StartError"));
        assert_eq!(c.message.as_deref(), Some("no such file"));
        // The node's clock, not the guest's (which said 1 s and 2 s, in ns).
        assert_eq!(c.started_at.unwrap().0.as_millisecond(), 1_000);
        assert_eq!(c.finished_at.0.as_millisecond(), 2_000);
        let unheard = terminated(
            &exited(Some(0), None, false, None),
            &RunRecord::default(),
            at,
        );
        assert_eq!((unheard.started_at, unheard.finished_at), (None, Time(at)));
    }

    #[test]
    fn a_run_record_tells_waiting_running_or_terminated() {
        let at = Timestamp::from_second(5).unwrap();
        let mut r = RunRecord::default();
        let w = state_of(&r, true, at).waiting.unwrap();
        assert_eq!(w.reason, "ContainerCreating");
        r.booted_at_ms = Some(1);
        r.started = Some(Started {
            pid: 2,
            started_at_nanos: 0,
        });
        r.started_at_ms = Some(3_000);
        let s = state_of(&r, true, at);
        assert_eq!(s.running.unwrap().started_at.0.as_second(), 3);
        let gone = state_of(&r, false, at).terminated.unwrap();
        assert_eq!(
            (gone.exit_code, gone.reason.as_str()),
            (137, "ContainerStatusUnknown")
        );
        assert_eq!(gone.finished_at.0, at);
        r.exited = Some(exited(Some(0), None, false, None));
        assert_eq!(
            state_of(&r, true, at).terminated.unwrap().reason,
            "Completed"
        );
    }
}
