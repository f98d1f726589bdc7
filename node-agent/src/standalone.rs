//! Standalone mode: realize MicroVM manifests on this host with no cluster,
//! as kubelet does static pods. Manifests are validated first with the same
//! schema and CEL rules an API server would apply; then every VM is reconciled
//! in a loop, its status transitions and serial output printed, until every VM
//! has settled (Succeeded, Failed, Stopped or Stalled) or the caller asks to
//! stop, when the VMs get their power button, a grace period, then a kill.
//!
//! Owns the manifest loading and the loop; the decisions are [`crate::reconcile`]'s.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use runv_crds::conditions as cond;
use runv_crds::microvm::Phase;
use runv_crds::validate::Validator;
use runv_crds::{MicroVM, MicroVMStatus};

use crate::runtime::{Runtime, VmRef};

/// Longest a VM gets to power off when standalone mode stops it.
const MAX_STOP_GRACE: Duration = Duration::from_secs(10);

/// Why standalone mode could not run.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// A manifest file or directory cannot be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A manifest is refused, with the API server's message.
    #[error("{}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: runv_crds::validate::ValidateError,
    },
    /// A manifest is valid but not something standalone mode runs.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What.
        what: String,
    },
    /// A valid manifest that still does not decode as a MicroVM.
    #[error("{}: decoding the MicroVM", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// No MicroVM in the given manifests.
    #[error("no MicroVM manifests found in {}", .0.display())]
    Empty(PathBuf),
    /// A VM's last run could not be forgotten before this one.
    #[error("clearing the last run of {vm}")]
    Forget {
        /// The VM.
        vm: VmRef,
        /// Why.
        source: Box<crate::runtime::RuntimeError>,
    },
    /// Writing the output failed.
    #[error("writing output")]
    Output(#[from] std::io::Error),
}

fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, StandaloneError> {
    let read_err = |source| StandaloneError::Read {
        path: path.to_owned(),
        source,
    };
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads and validates the MicroVMs in a file or directory.
pub fn load(path: &Path) -> Result<Vec<MicroVM>, StandaloneError> {
    let validator = Validator::new();
    let mut vms = Vec::new();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| StandaloneError::Read {
            path: file.clone(),
            source,
        })?;
        let docs = validator
            .validate_yaml(&text)
            .map_err(|source| StandaloneError::Invalid {
                path: file.clone(),
                source,
            })?;
        for doc in docs {
            if doc["kind"] != "MicroVM" {
                return Err(StandaloneError::Unsupported {
                    path: file.clone(),
                    what: format!(
                        "standalone mode runs MicroVMs; {} needs the operator",
                        doc["kind"].as_str().unwrap_or("this kind")
                    ),
                });
            }
            let vm: MicroVM =
                serde_json::from_value(doc).map_err(|source| StandaloneError::Decode {
                    path: file.clone(),
                    source,
                })?;
            vms.push(vm);
        }
    }
    if vms.is_empty() {
        return Err(StandaloneError::Empty(path.to_owned()));
    }
    Ok(vms)
}

/// The reference of a manifest's VM (namespace `default` when it has none).
pub fn vm_ref(vm: &MicroVM) -> VmRef {
    VmRef {
        namespace: vm
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: vm.metadata.name.clone().unwrap_or_default(),
        uid: String::new(),
    }
}

/// Whether a VM will not change any more without someone acting, and no VMM
/// runs for it (a stalled VM whose VMM still runs, such as one whose control
/// socket is not its VMM's, is watched until it is stopped).
pub fn settled(status: &MicroVMStatus) -> bool {
    matches!(
        status.phase,
        Some(Phase::Succeeded | Phase::Failed | Phase::Stopped)
    ) || (cond::is_true(&status.conditions, cond::STALLED)
        && !cond::is_true(&status.conditions, cond::VMM_STARTED))
}

/// Whether a settled VM ended badly.
pub fn failed(status: &MicroVMStatus) -> bool {
    status.phase == Some(Phase::Failed) || cond::is_true(&status.conditions, cond::STALLED)
}

/// One line describing a status: phase, Ready and its reason and message.
pub fn summary(status: &MicroVMStatus) -> String {
    let ready = cond::find(&status.conditions, cond::READY);
    let mut s = format!(
        "phase={:?} ready={}",
        status.phase.unwrap_or(Phase::Pending),
        ready.map_or("Unknown", |c| c.status.as_str())
    );
    if let Some(c) = ready {
        s.push_str(&format!(" reason={}", c.reason));
        if !c.message.is_empty() {
            s.push_str(&format!(" message={:?}", c.message));
        }
    }
    if let Some(ms) = status.boot_duration_millis {
        s.push_str(&format!(" bootMs={ms}"));
    }
    if let Some(ip) = status.interfaces.first().and_then(|i| i.ip.as_deref()) {
        s.push_str(&format!(" ip={ip}"));
    }
    s
}

/// Follows one VM's serial log from where it was last read.
#[derive(Debug, Default)]
struct SerialTail {
    offset: u64,
    partial: Vec<u8>,
}

/// A line of the serial console, as it is.
fn console_line(line: &[u8]) -> Option<Vec<u8>> {
    Some(line.to_vec())
}

/// A line of a container's CRI log: its text, without time and stream.
fn container_line(line: &[u8]) -> Option<Vec<u8>> {
    let entry = crate::host::logs::read_entries(line).pop()?;
    Some(
        entry
            .text
            .strip_suffix(b"\n")
            .unwrap_or(&entry.text)
            .to_vec(),
    )
}

impl SerialTail {
    fn poll(&mut self, path: &Path, prefix: &str, out: &mut dyn Write) -> std::io::Result<()> {
        self.poll_with(path, prefix, console_line, out)
    }

    fn poll_with(
        &mut self,
        path: &Path,
        prefix: &str,
        text: fn(&[u8]) -> Option<Vec<u8>>,
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        let Ok(mut f) = std::fs::File::open(path) else {
            return Ok(());
        };
        let len = f.metadata()?.len();
        if len < self.offset {
            self.offset = 0; // rotated
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.take(1 << 20).read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(line) = text(line) {
                writeln!(out, "{prefix} | {}", crate::console::sanitize(&line))?;
            }
        }
        if self.partial.len() > 4096 {
            writeln!(
                out,
                "{prefix} | {}",
                crate::console::sanitize(&self.partial)
            )?;
            self.partial.clear();
        }
        Ok(())
    }
}

/// Runs `vms` until they settle or `stop` is set; returns whether all went well.
pub fn run(
    rt: &Runtime,
    vms: &[MicroVM],
    stop: &AtomicBool,
    out: &mut dyn Write,
    max_wait: Option<Duration>,
) -> Result<bool, StandaloneError> {
    let mut statuses: BTreeMap<VmRef, MicroVMStatus> = BTreeMap::new();
    let mut tails: BTreeMap<VmRef, SerialTail> = BTreeMap::new();
    // A container VM's container output, printed as its console is.
    let mut container_tails: BTreeMap<VmRef, SerialTail> = BTreeMap::new();
    let started = std::time::Instant::now();
    // A new standalone run runs its VMs again; a VMM still running from an
    // earlier agent (killed, say) is adopted instead.
    for vm in vms {
        let r = vm_ref(vm);
        rt.forget_finished_run(&r)
            .map_err(|e| StandaloneError::Forget {
                vm: r,
                source: Box::new(e),
            })?;
    }
    let ok = loop {
        let mut all_settled = true;
        let mut next = Duration::from_millis(200);
        for vm in vms {
            let r = vm_ref(vm);
            let previous = statuses.get(&r).cloned().unwrap_or_default();
            let generation = vm.metadata.generation.unwrap_or(1);
            let d = rt.reconcile(&r, &vm.spec, generation, &previous, Timestamp::now());
            tails
                .entry(r.clone())
                .or_default()
                .poll(&rt.dir(&r).serial_log(), &r.name, out)?;
            if vm.spec.container.is_some() {
                container_tails.entry(r.clone()).or_default().poll_with(
                    &rt.dir(&r).container_log(),
                    &r.name,
                    container_line,
                    out,
                )?;
            }
            let events = d.events.iter().cloned();
            for t in events.chain(crate::reconcile::transitions(&previous, &d.status)) {
                writeln!(
                    out,
                    "{} {} {}: {}",
                    r.name,
                    if t.warning { "Warning" } else { "Normal" },
                    t.reason,
                    t.note
                )?;
            }
            if summary(&previous) != summary(&d.status) {
                writeln!(out, "{} status {}", r.name, summary(&d.status))?;
            }
            all_settled &= settled(&d.status);
            if let Some(q) = d.requeue {
                next = next.min(q);
            }
            statuses.insert(r, d.status);
        }
        if all_settled {
            break statuses.values().all(|s| !failed(s));
        }
        if stop.load(Ordering::Relaxed) || max_wait.is_some_and(|m| started.elapsed() > m) {
            writeln!(out, "stopping {} VM(s)", vms.len())?;
            for vm in vms {
                let r = vm_ref(vm);
                let grace = Duration::from_secs(
                    u64::try_from(vm.spec.termination_grace_period_seconds).unwrap_or(0),
                )
                .min(MAX_STOP_GRACE);
                if let Err(e) = rt.stop(&r, grace) {
                    writeln!(out, "{} stopping: {}", r.name, runv_crds::retry::Chain(&e))?;
                }
                let _ = tails.entry(r.clone()).or_default().poll(
                    &rt.dir(&r).serial_log(),
                    &r.name,
                    out,
                );
                writeln!(out, "{} stopped", r.name)?;
            }
            break true;
        }
        std::thread::sleep(next.max(Duration::from_millis(20)));
    };
    for vm in vms {
        let r = vm_ref(vm);
        if let Err(e) = rt.release_network(&r) {
            writeln!(
                out,
                "{} releasing its network: {}",
                r.name,
                runv_crds::retry::Chain(&e)
            )?;
        }
        if let Err(e) = rt.release_cgroup(&r) {
            writeln!(
                out,
                "{} removing its cgroup: {}",
                r.name,
                runv_crds::retry::Chain(&e)
            )?;
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use runv_crds::MicroVMSpec;

    use super::*;
    use crate::reconcile::{Backoff, Facts, Observed, decide};

    #[test]
    fn a_stalled_vm_is_settled_only_when_no_vmm_runs() {
        let spec: MicroVMSpec = serde_json::from_str(
            r#"{"boot":{"kernel":"/k"},"resources":{"vcpus":1,"memory":"64Mi"}}"#,
        )
        .unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let status = |obs: &Observed, facts: &Facts| {
            decide(
                &spec,
                1,
                &MicroVMStatus::default(),
                obs,
                facts,
                &Backoff::default(),
                now,
            )
            .status
        };
        let missing = Facts {
            missing_files: vec![("spec.boot.kernel".into(), "/k".into())],
            ..Facts::default()
        };
        let never = Observed::NotRunning {
            exit: None,
            last_generation: None,
        };
        let blocked = status(&never, &missing);
        assert!(settled(&blocked) && failed(&blocked));
        let hijacked = Observed::Running {
            started_at: now,
            paused: false,
            booted_at: Some(now),
            config_current: true,
            shutdown_since: None,
            control_mismatch: Some("it is a symbolic link".into()),
        };
        let running = status(&hijacked, &Facts::default());
        assert!(cond::is_true(&running.conditions, cond::STALLED));
        assert!(!settled(&running), "its VMM still runs");
    }
}
