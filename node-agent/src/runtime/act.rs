//! Act: carry out one [`Action`] of a decision — spawn a prepared VMM, or
//! pause, resume, shut down or kill a running one through its control
//! socket (SIGKILL as the last resort) — and stop a VM on request.
//!
//! Every message goes to the VMM recorded in `vm.json`, and only when its
//! control socket is that VMM's. A VM is ended by its cgroup as well as by
//! its VMM's pid: whatever the VMM may have started ends with it, and a
//! new VMM joins an empty cgroup. Must not decide what to do (that is
//! [`crate::reconcile`]'s) and must not release anything the VM holds on
//! the host (that is `cleanup.rs`).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::MicroVMSpec;
use runv_vmm_api::Request;

use super::{Runtime, RuntimeError, VmRef, control_target, ms};
use crate::host::{HostError, SpawnRequest, VmmIdentity};
use crate::reconcile::Action;
use crate::state::{VmDir, VmRecord};
use crate::vmconfig;

impl Runtime {
    /// Carries out `action` for the VM.
    pub(super) fn act(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: &str,
        generation: i64,
        action: &Action,
        now: Timestamp,
    ) -> Result<(), RuntimeError> {
        match action {
            Action::Start { .. } => self.start(vm, spec, tenant, generation, now),
            Action::Kill => Ok(self.kill(vm)?),
            Action::Shutdown => {
                let dir = self.dir(vm);
                if let Some(mut record) = self.record(vm) {
                    record.stop_requested = true;
                    record.shutdown_at_ms = Some(ms(now));
                    dir.write_record(&record)?;
                }
                // The VMM ends the VM itself if the guest ignores the button.
                let secs = u64::try_from(spec.termination_grace_period_seconds).unwrap_or(0);
                if spec.container.is_some()
                    && self.stop_container(vm, u32::try_from(secs).unwrap_or(u32::MAX))
                {
                    // runv-init stops the container (SIGTERM, SIGKILL after
                    // the grace period) and powers off; the VMM's own
                    // deadline is the backstop, a little later.
                    let backstop = Duration::from_secs(secs.saturating_add(10));
                    return Ok(self.send(vm, Request::shutdown_within(backstop))?);
                }
                Ok(self.send(vm, Request::shutdown_within(Duration::from_secs(secs)))?)
            }
            Action::Pause => Ok(self.send(vm, Request::Pause)?),
            Action::Resume => Ok(self.send(vm, Request::Resume)?),
        }
    }

    /// Prepares the host (for a VM of `tenant`) and spawns the VMM,
    /// recording it in `vm.json`.
    fn start(
        &self,
        vm: &VmRef,
        spec: &MicroVMSpec,
        tenant: &str,
        generation: i64,
        now: Timestamp,
    ) -> Result<(), RuntimeError> {
        self.prepare(vm, spec, tenant)?;
        let config = self.prepare_config(vm, spec)?;
        let cgroup = self.prepare_cgroup(vm, spec)?;
        // No VMM runs for the VM now: anything in its cgroup is left over
        // from an earlier run.
        self.end_cgroup(vm, None)?;
        // The OOM killer's count before this run, to tell an OOM kill later.
        let oom_kills_at_start = if cgroup.is_empty() {
            None
        } else {
            self.host.cgroups().oom_kills(&self.cgroup_name(vm))
        };
        let dir = self.dir(vm);
        // Opened now, beneath the allowed directories, and inherited: the VMM
        // reads what was checked, whatever the paths name by then.
        let mut files = vmconfig::passed_files(spec)
            .iter()
            .map(|(field, path)| self.open_host_file(field, path).map(|f| f.file))
            .collect::<Result<Vec<_>, _>>()?;
        if spec.container.is_some() {
            self.begin_container_run(vm)?;
            // Recorded by `prepare_image` in this reconcile; the config
            // could not be written without it.
            if let Some(record) = self.current_image(vm, spec) {
                files.push(self.open_rootfs(&record)?.file);
            }
        }
        let request = SpawnRequest {
            vmm: self.config.vmm.clone(),
            config,
            log: dir.vmm_log(),
            cgroup,
        };
        let id = self.host.processes().spawn(&request, files)?;
        let recorded = dir.write_record(&VmRecord {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            uid: vm.uid.clone(),
            vmm: Some(id),
            started_at_ms: ms(now),
            generation,
            booted_at_ms: None,
            shutdown_at_ms: None,
            stop_requested: false,
            exit_seen_ms: None,
            oom_kills_at_start,
            oom_killed: false,
        });
        if let Err(e) = recorded {
            // A VMM the agent has no record of would be started a second
            // time: end it, and report why the VM cannot start.
            if let Err(k) = self.end_vmm(vm, id) {
                tracing::error!(vm = %vm, error = %runv_crds::retry::Chain(&k), "cannot end a VMM whose record could not be written");
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Ends the VMM now: through its control socket, else (no answer, or the
    /// socket is not the VMM's) by force, with everything in its cgroup (see
    /// [`Self::end_vmm`]). Waits (bounded) until they are gone.
    pub(super) fn kill(&self, vm: &VmRef) -> Result<(), HostError> {
        let dir = self.dir(vm);
        let Some(mut record) = self.record(vm) else {
            return Ok(());
        };
        let Some(id) = record.vmm else {
            return Ok(());
        };
        record.stop_requested = true;
        dir.write_record(&record)?;
        let procs = self.host.processes();
        if procs.is_alive(id) && self.send_to(vm, &dir, id, Request::Kill).is_ok() {
            for _ in 0..200 {
                if !procs.is_alive(id) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.end_vmm(vm, id)
    }

    /// SIGKILL to every process in the VM's cgroup, when its VMM was started
    /// in one, then to the VMM `id` itself if it still runs (checked to be
    /// that process, not a reused pid): where there is no cgroup, the pid is
    /// all there is.
    fn end_vmm(&self, vm: &VmRef, id: VmmIdentity) -> Result<(), HostError> {
        let swept = self.end_cgroup(vm, Some(id));
        self.host.processes().kill(id)?;
        swept
    }

    /// Kills whatever runs in the VM's cgroup (`cgroup.json` names it; none
    /// recorded: nothing to do), and logs each process found there other
    /// than the VMM `vmm`: a VMM starts no processes, so one that did is
    /// worth a look.
    fn end_cgroup(&self, vm: &VmRef, vmm: Option<VmmIdentity>) -> Result<(), HostError> {
        let Some(record) = self.dir(vm).read_cgroup_record() else {
            return Ok(());
        };
        let cgroups = self.host.cgroups();
        let others: Vec<u32> = cgroups
            .procs(&record.name)
            .into_iter()
            .filter(|p| vmm.is_none_or(|id| id.pid != *p))
            .collect();
        if !others.is_empty() {
            tracing::warn!(vm = %vm, cgroup = %record.name, pids = ?others, "killing processes other than the VMM in the VM's cgroup");
        }
        cgroups.kill_all(&record.name)
    }

    /// Stops the VM: the power button, up to `grace`, then kill. Ends
    /// whatever is left in its cgroup either way. Keeps its state.
    pub fn stop(&self, vm: &VmRef, grace: Duration) -> Result<(), RuntimeError> {
        let dir = self.dir(vm);
        let Some(mut record) = self.record(vm) else {
            return Ok(());
        };
        let Some(id) = record.vmm else {
            return Ok(());
        };
        if !self.host.processes().is_alive(id) {
            self.end_cgroup(vm, None)?;
            return Ok(());
        }
        record.stop_requested = true;
        dir.write_record(&record)?;
        if self
            .send_to(vm, &dir, id, Request::shutdown_within(grace))
            .is_ok()
        {
            let start = std::time::Instant::now();
            while start.elapsed() < grace {
                if !self.host.processes().is_alive(id) {
                    self.end_cgroup(vm, None)?;
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill(vm)?;
        Ok(())
    }

    /// Logs `e` when it says the VM's control socket is not its VMM's.
    fn log_control_mismatch(vm: &VmRef, e: &HostError) {
        if let HostError::ControlSocketMismatch {
            expected_pid,
            found_pid,
            ..
        } = e
        {
            tracing::error!(
                vm = %vm,
                expected_pid,
                found_pid,
                error = %e,
                "the control socket is not the VMM's: nothing is sent to it"
            );
        }
    }

    /// Sends `request` to the VM's recorded VMM; refuses (and logs) when
    /// something else serves its control socket.
    fn send(&self, vm: &VmRef, request: Request) -> Result<(), HostError> {
        let dir = self.dir(vm);
        let id = self.record(vm).and_then(|r| r.vmm).ok_or_else(|| {
            HostError::io(
                "control socket",
                dir.control_socket(),
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        self.send_to(vm, &dir, id, request)
    }

    fn send_to(
        &self,
        vm: &VmRef,
        dir: &VmDir,
        id: VmmIdentity,
        request: Request,
    ) -> Result<(), HostError> {
        let result = self.host.control().send(&control_target(dir, id), request);
        if let Err(e) = &result {
            Self::log_control_mismatch(vm, e);
        }
        result
    }
}
