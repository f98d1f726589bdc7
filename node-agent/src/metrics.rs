//! `/metrics` of the agent: one sample set per VM in the Prometheus text
//! format, named `runv_vm_*` after KubeVirt's `kubevirt_vmi_*`, labelled
//! `namespace`, `name` and `node`. Rendering is pure: the caller gathers
//! [`VmSample`]s (process usage, VMM counters, status) and this module formats.
//! The controller's failed reconciles are counted in [`ReconcileErrors`] and
//! exported as `runv_agent_reconcile_errors_total`, by reason.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};

/// Failed reconciles of the agent's MicroVM controller, by a short, bounded reason.
#[derive(Debug, Default)]
pub struct ReconcileErrors(Mutex<BTreeMap<&'static str, u64>>);

impl ReconcileErrors {
    /// Counts one failure.
    pub fn inc(&self, reason: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(reason).or_insert(0) += 1;
    }

    /// The counter family in the Prometheus text format, labelled `node`
    /// and `reason`.
    pub fn render(&self, node: &str) -> String {
        let name = "runv_agent_reconcile_errors_total";
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP {name} Failed reconciles of MicroVMs on the node, by reason."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (reason, n) in counts.iter() {
            let _ = writeln!(
                out,
                "{name}{{node=\"{}\",reason=\"{}\"}} {n}",
                escape(node),
                escape(reason)
            );
        }
        out
    }
}

/// What is known of one VM at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmSample {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// CPU seconds of its VMM process.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its VMM process.
    pub rss_bytes: Option<u64>,
    /// Last boot's duration.
    pub boot_seconds: Option<f64>,
    /// Restarts so far.
    pub restarts: u64,
    /// 1 while a VMM runs for it.
    pub running: bool,
    /// The VMM's own counters (`block0_read_bytes_total`, `net0_rx_bytes_total`, ...).
    pub counters: BTreeMap<String, u64>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

const FAMILIES: [Family; 9] = [
    Family {
        name: "runv_vm_running",
        kind: "gauge",
        help: "1 while a VMM process runs for the VM.",
    },
    Family {
        name: "runv_vm_cpu_usage_seconds_total",
        kind: "counter",
        help: "CPU time (user and system) of the VM's VMM process.",
    },
    Family {
        name: "runv_vm_memory_resident_bytes",
        kind: "gauge",
        help: "Resident memory of the VM's VMM process, guest memory included.",
    },
    Family {
        name: "runv_vm_boot_duration_seconds",
        kind: "gauge",
        help: "VMM start to the guest-booted signal, last boot.",
    },
    Family {
        name: "runv_vm_restarts_total",
        kind: "counter",
        help: "Restarts of the VM by its runPolicy.",
    },
    Family {
        name: "runv_vm_storage_read_bytes_total",
        kind: "counter",
        help: "Bytes read by the guest from a disk.",
    },
    Family {
        name: "runv_vm_storage_write_bytes_total",
        kind: "counter",
        help: "Bytes written by the guest to a disk.",
    },
    Family {
        name: "runv_vm_network_receive_bytes_total",
        kind: "counter",
        help: "Bytes received by the guest on an interface.",
    },
    Family {
        name: "runv_vm_network_transmit_bytes_total",
        kind: "counter",
        help: "Bytes sent by the guest on an interface.",
    },
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The VMM counter behind a per-device family: (prefix, suffix, label name).
fn device_counter(family: &str) -> Option<(&'static str, &'static str, &'static str)> {
    match family {
        "runv_vm_storage_read_bytes_total" => Some(("block", "_read_bytes_total", "drive")),
        "runv_vm_storage_write_bytes_total" => Some(("block", "_write_bytes_total", "drive")),
        "runv_vm_network_receive_bytes_total" => Some(("net", "_rx_bytes_total", "interface")),
        "runv_vm_network_transmit_bytes_total" => Some(("net", "_tx_bytes_total", "interface")),
        _ => None,
    }
}

/// Renders every sample.
pub fn render(node: &str, samples: &[VmSample]) -> String {
    let mut out = String::new();
    for f in &FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for s in samples {
            let labels = format!(
                "namespace=\"{}\",name=\"{}\",node=\"{}\"",
                escape(&s.namespace),
                escape(&s.name),
                escape(node)
            );
            let value: Option<f64> = match f.name {
                "runv_vm_running" => Some(if s.running { 1.0 } else { 0.0 }),
                "runv_vm_cpu_usage_seconds_total" => s.cpu_seconds,
                "runv_vm_memory_resident_bytes" => s.rss_bytes.map(|b| b as f64),
                "runv_vm_boot_duration_seconds" => s.boot_seconds,
                "runv_vm_restarts_total" => Some(s.restarts as f64),
                _ => None,
            };
            if let Some(v) = value {
                let _ = writeln!(out, "{}{{{labels}}} {v}", f.name);
            }
            if let Some((prefix, suffix, label)) = device_counter(f.name) {
                for (key, v) in &s.counters {
                    if let Some(index) = key
                        .strip_prefix(prefix)
                        .and_then(|k| k.strip_suffix(suffix))
                        .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    {
                        let _ = writeln!(out, "{}{{{labels},{label}=\"{index}\"}} {v}", f.name);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_per_vm_and_device() {
        let s = VmSample {
            namespace: "default".into(),
            name: "web".into(),
            cpu_seconds: Some(1.5),
            rss_bytes: Some(70 << 20),
            boot_seconds: Some(0.012),
            restarts: 2,
            running: true,
            counters: [
                ("block0_read_bytes_total".to_owned(), 512),
                ("block1_write_bytes_total".to_owned(), 4096),
                ("net0_rx_bytes_total".to_owned(), 99),
                ("serial_tx_bytes_total".to_owned(), 7),
            ]
            .into(),
        };
        let text = render("n1", &[s]);
        let l = "namespace=\"default\",name=\"web\",node=\"n1\"";
        for line in [
            format!("runv_vm_running{{{l}}} 1"),
            format!("runv_vm_cpu_usage_seconds_total{{{l}}} 1.5"),
            format!("runv_vm_memory_resident_bytes{{{l}}} 73400320"),
            format!("runv_vm_boot_duration_seconds{{{l}}} 0.012"),
            format!("runv_vm_restarts_total{{{l}}} 2"),
            format!("runv_vm_storage_read_bytes_total{{{l},drive=\"0\"}} 512"),
            format!("runv_vm_storage_write_bytes_total{{{l},drive=\"1\"}} 4096"),
            format!("runv_vm_network_receive_bytes_total{{{l},interface=\"0\"}} 99"),
            "# TYPE runv_vm_restarts_total counter".to_owned(),
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("serial"), "only the named families");
        // A VM that is not running has no process samples.
        let idle = render(
            "n1",
            &[VmSample {
                name: "a\"b".into(),
                ..VmSample::default()
            }],
        );
        assert!(idle.contains("name=\"a\\\"b\""));
        assert!(!idle.contains("runv_vm_cpu_usage_seconds_total{"));
    }

    #[test]
    fn reconcile_errors_are_counted_by_reason() {
        let errors = ReconcileErrors::default();
        let empty = errors.render("n1");
        assert!(empty.contains("# TYPE runv_agent_reconcile_errors_total counter"));
        assert!(!empty.contains("runv_agent_reconcile_errors_total{"));
        errors.inc("Api");
        errors.inc("Api");
        errors.inc("Cleanup");
        let text = errors.render("n1");
        for line in [
            "runv_agent_reconcile_errors_total{node=\"n1\",reason=\"Api\"} 2",
            "runv_agent_reconcile_errors_total{node=\"n1\",reason=\"Cleanup\"} 1",
        ] {
            assert!(
                text.lines().any(|x| x == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
