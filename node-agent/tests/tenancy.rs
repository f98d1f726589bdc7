//! e2e, the tenant boundary's identity and placement: the real `runv-operator`
//! and `runv-agent run` against the Kubernetes API test server, with real
//! microVMs on /dev/kvm.
//!
//! - A VM's tenant is its namespace's: a `spec.tenant.name` of another tenant
//!   is refused (`TenantNotAllowed`).
//! - `spec.nodeName` and `nodeIsolation: Exclusive` only where the
//!   namespace's administrator labels allow them (`NodeNameNotAllowed`,
//!   `ExclusiveNotAllowed`); a label added later places the VM.
//! - The agent refuses to start a pinned VM over its capacity
//!   (`OutOfCapacity`), beside another tenant's Exclusive VM, or an Exclusive
//!   one beside another tenant's (`IsolationConflict`), whatever the operator
//!   bound to it.
//! - Succeeded and Failed VMs keep their place: switched back to `Always`
//!   they restart where they were, and nothing else took their room.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::cluster::{Cluster, run_scenario, wait_until};
use common::{KillVmmOnDrop, alive, recorded_pid};

/// A MicroVM `ns/name` booting the test guest with `cmdline`, with `extra`
/// lines in its spec.
fn vm(name: &str, ns: &str, vcpus: u32, policy: &str, extra: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  resources: {{ vcpus: {vcpus}, memory: 64Mi }}\n  boot:\n    kernel: {}\n    cmdline: \"test=loop\"\n  runPolicy: {policy}\n  terminationGracePeriodSeconds: 2\n{extra}",
        common::test_guest()
    )
}

fn apply(cluster: &Cluster, file: &str, yaml: &str) -> Result<()> {
    let path = cluster.tmp.path().join(file);
    std::fs::write(&path, yaml)?;
    cluster.kubectl(&["apply", "-f", &path.display().to_string()])?;
    Ok(())
}

/// Creates namespace `ns` with `labels` (`key=value`), as an administrator.
fn namespace(cluster: &Cluster, ns: &str, labels: &[&str]) -> Result<()> {
    cluster.kubectl(&["create", "namespace", ns])?;
    if !labels.is_empty() {
        let mut args = vec!["label", "namespace", ns];
        args.extend_from_slice(labels);
        cluster.kubectl(&args)?;
    }
    Ok(())
}

fn get(cluster: &Cluster, ns: &str, name: &str, path: &str) -> Result<String> {
    let out = cluster.kubectl(&[
        "get",
        "-n",
        ns,
        "mvm",
        name,
        "-o",
        &format!("jsonpath={{{path}}}"),
    ])?;
    Ok(out.trim().to_owned())
}

fn condition(cluster: &Cluster, ns: &str, name: &str, type_: &str, field: &str) -> Result<String> {
    get(
        cluster,
        ns,
        name,
        &format!(".status.conditions[?(@.type==\"{type_}\")].{field}"),
    )
}

/// Waits (at most `secs`) until condition `type_` of `ns/name` has `reason`.
fn wait_reason(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    type_: &str,
    reason: &str,
    secs: u64,
) -> Result<()> {
    cluster.kubectl(&[
        "wait",
        "-n",
        ns,
        &format!("--for=jsonpath={{.status.conditions[?(@.type==\"{type_}\")].reason}}={reason}"),
        &format!("mvm/{name}"),
        &format!("--timeout={secs}s"),
    ])?;
    Ok(())
}

fn wait_ready(cluster: &Cluster, ns: &str, name: &str) -> Result<()> {
    cluster.kubectl(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        &format!("mvm/{name}"),
        "--timeout=120s",
    ])?;
    Ok(())
}

/// The reasons of the Events about objects in `ns`.
fn event_reasons(cluster: &Cluster, ns: &str) -> Result<String> {
    cluster.kubectl(&[
        "get",
        "-n",
        ns,
        "events.events.k8s.io",
        "-o",
        "jsonpath={.items[*].reason}",
    ])
}

fn vm_dir(cluster: &Cluster, ns: &str, name: &str) -> PathBuf {
    cluster.root.join("vms").join(format!("{ns}_{name}"))
}

/// Asserts `ns/name` is refused placement with `reason`, its message naming
/// every part of `names`, with a Warning Event, and is bound to no node.
fn assert_refused(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    reason: &str,
    names: &[&str],
) -> Result<()> {
    wait_reason(cluster, ns, name, "Scheduled", reason, 60)?;
    let message = condition(cluster, ns, name, "Scheduled", "message")?;
    for part in names {
        ensure!(message.contains(part), "{part} not in {message:?}");
    }
    ensure!(get(cluster, ns, name, ".status.nodeName")?.is_empty());
    wait_until("the Warning Event", Duration::from_secs(30), || {
        Ok(event_reasons(cluster, ns)?.contains(reason))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_refuses_what_the_namespace_does_not_allow() -> Result<()> {
    run_scenario(
        "the_operator_refuses_what_the_namespace_does_not_allow",
        refusals,
    )
    .await
}

fn refusals(cluster: &Cluster) -> Result<()> {
    let _agent = cluster.start_agent();
    // Another tenant's name in the spec.
    namespace(cluster, "mallory", &[])?;
    let spoof = "  tenant: { name: victim }\n";
    apply(
        cluster,
        "spoof.yaml",
        &vm("spoof", "mallory", 1, "Always", spoof),
    )?;
    assert_refused(
        cluster,
        "mallory",
        "spoof",
        "TenantNotAllowed",
        &[
            "spec.tenant.name",
            "\"victim\"",
            "namespace mallory",
            "runv.dev/tenant",
        ],
    )?;
    // A pin where the administrator allows none, until they do.
    namespace(cluster, "pins", &[])?;
    let _pinned = KillVmmOnDrop(vm_dir(cluster, "pins", "pinned"));
    let pin = "  nodeName: n1\n";
    apply(cluster, "pin.yaml", &vm("pinned", "pins", 1, "Always", pin))?;
    assert_refused(
        cluster,
        "pins",
        "pinned",
        "NodeNameNotAllowed",
        &[
            "spec.nodeName",
            "n1",
            "namespace pins",
            "runv.dev/allow-node-name=true",
        ],
    )?;
    cluster.kubectl(&[
        "label",
        "namespace",
        "pins",
        "runv.dev/allow-node-name=true",
    ])?;
    wait_ready(cluster, "pins", "pinned")?;
    ensure!(get(cluster, "pins", "pinned", ".status.nodeName")? == "n1");
    ensure!(get(cluster, "pins", "pinned", ".status.tenant.name")? == "pins");
    // Nodes of its own, where the administrator allows none.
    namespace(cluster, "acme", &["runv.dev/tenant=acme"])?;
    let exclusive = "  tenant: { name: acme, nodeIsolation: Exclusive }\n";
    apply(
        cluster,
        "excl.yaml",
        &vm("excl", "acme", 1, "Always", exclusive),
    )?;
    assert_refused(
        cluster,
        "acme",
        "excl",
        "ExclusiveNotAllowed",
        &[
            "spec.tenant.nodeIsolation",
            "namespace acme",
            "runv.dev/allow-exclusive=true",
        ],
    )?;
    // Nothing refused ever reached the node.
    for (ns, name) in [("mallory", "spoof"), ("acme", "excl")] {
        ensure!(
            !vm_dir(cluster, ns, name).exists(),
            "{ns}/{name} has state on the node"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_pinned_vm_over_its_capacity() -> Result<()> {
    run_scenario("the_agent_refuses_a_pinned_vm_over_its_capacity", capacity).await
}

fn capacity(cluster: &Cluster) -> Result<()> {
    let mut agent = cluster.start_agent_with(&["--vcpus", "2", "--memory", "1Gi"]);
    let _guards = [
        KillVmmOnDrop(cluster.vm_dir("cap-big")),
        KillVmmOnDrop(cluster.vm_dir("cap-small")),
    ];
    // `default` allows pinning (the harness labels it): the operator binds
    // both to n1 without weighing their room.
    let pin = "  nodeName: n1\n";
    apply(
        cluster,
        "big.yaml",
        &vm("cap-big", "default", 2, "Always", pin),
    )?;
    wait_ready(cluster, "default", "cap-big").with_context(|| agent.output())?;
    apply(
        cluster,
        "small.yaml",
        &vm("cap-small", "default", 1, "Always", pin),
    )?;
    wait_reason(
        cluster,
        "default",
        "cap-small",
        "Ready",
        "OutOfCapacity",
        60,
    )
    .with_context(|| agent.output())?;
    ensure!(get(cluster, "default", "cap-small", ".status.nodeName")? == "n1");
    let message = condition(cluster, "default", "cap-small", "Ready", "message")?;
    ensure!(message.contains("allocates 2 vCPUs"), "{message}");
    ensure!(
        recorded_pid(&cluster.vm_dir("cap-small")).is_none(),
        "a VMM was started"
    );
    ensure!(event_reasons(cluster, "default")?.contains("OutOfCapacity"));
    // Its room once the other is gone: started at the next retry.
    cluster.kubectl(&["delete", "mvm", "cap-big", "--timeout=60s"])?;
    wait_ready(cluster, "default", "cap-small").with_context(|| agent.output())?;
    agent.signal(libc::SIGTERM);
    agent.wait(Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_vm_beside_another_tenants_exclusive_one() -> Result<()> {
    run_scenario(
        "the_agent_refuses_a_vm_beside_another_tenants_exclusive_one",
        isolation,
    )
    .await
}

fn isolation(cluster: &Cluster) -> Result<()> {
    // Dropped after the agent, so that it restarts none of the VMMs they end.
    let _guards = [
        KillVmmOnDrop(vm_dir(cluster, "iso-acme", "iso-x")),
        KillVmmOnDrop(vm_dir(cluster, "iso-mallory", "iso-m")),
        KillVmmOnDrop(vm_dir(cluster, "iso-mallory", "iso-u")),
    ];
    let agent = cluster.start_agent();
    namespace(
        cluster,
        "iso-acme",
        &[
            "runv.dev/tenant=acme",
            "runv.dev/allow-exclusive=true",
            "runv.dev/allow-node-name=true",
        ],
    )?;
    let exclusive = "  nodeName: n1\n  tenant: { name: acme, nodeIsolation: Exclusive }\n";
    apply(
        cluster,
        "x.yaml",
        &vm("iso-x", "iso-acme", 1, "Always", exclusive),
    )?;
    wait_ready(cluster, "iso-acme", "iso-x").with_context(|| agent.output())?;
    ensure!(get(cluster, "iso-acme", "iso-x", ".status.tenant.nodeIsolation")? == "Exclusive");
    // Another tenant pins a VM beside it: the operator binds it (a pin
    // bypasses placement), the agent does not start it.
    namespace(cluster, "iso-mallory", &["runv.dev/allow-node-name=true"])?;
    let pin = "  nodeName: n1\n";
    apply(
        cluster,
        "m.yaml",
        &vm("iso-m", "iso-mallory", 1, "Always", pin),
    )?;
    wait_reason(
        cluster,
        "iso-mallory",
        "iso-m",
        "Ready",
        "IsolationConflict",
        60,
    )
    .with_context(|| agent.output())?;
    let message = condition(cluster, "iso-mallory", "iso-m", "Ready", "message")?;
    ensure!(
        message.contains("iso-acme/iso-x (tenant acme)"),
        "{message}"
    );
    ensure!(recorded_pid(&vm_dir(cluster, "iso-mallory", "iso-m")).is_none());
    // Without a pin, the operator does not place it there at all.
    apply(
        cluster,
        "u.yaml",
        &vm("iso-u", "iso-mallory", 1, "Always", ""),
    )?;
    wait_reason(
        cluster,
        "iso-mallory",
        "iso-u",
        "Scheduled",
        "Unschedulable",
        60,
    )?;
    let message = condition(cluster, "iso-mallory", "iso-u", "Scheduled", "message")?;
    ensure!(
        message.contains("another tenant that cannot share"),
        "{message}"
    );
    // Once the Exclusive VM is gone, the other tenant's pinned VM starts; then
    // a new Exclusive VM pinned beside it is the one refused.
    cluster.kubectl(&["delete", "-n", "iso-acme", "mvm", "iso-x", "--timeout=60s"])?;
    wait_ready(cluster, "iso-mallory", "iso-m").with_context(|| agent.output())?;
    let _late = KillVmmOnDrop(vm_dir(cluster, "iso-acme", "iso-y"));
    apply(
        cluster,
        "y.yaml",
        &vm("iso-y", "iso-acme", 1, "Always", exclusive),
    )?;
    wait_reason(
        cluster,
        "iso-acme",
        "iso-y",
        "Ready",
        "IsolationConflict",
        60,
    )
    .with_context(|| agent.output())?;
    let message = condition(cluster, "iso-acme", "iso-y", "Ready", "message")?;
    ensure!(
        message.contains("iso-mallory/iso-m (tenant iso-mallory)"),
        "{message}"
    );
    ensure!(recorded_pid(&vm_dir(cluster, "iso-acme", "iso-y")).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_vms_switched_back_to_always_never_overcommit() -> Result<()> {
    run_scenario(
        "terminal_vms_switched_back_to_always_never_overcommit",
        terminal,
    )
    .await
}

fn terminal(cluster: &Cluster) -> Result<()> {
    let agent = cluster.start_agent_with(&["--vcpus", "2", "--memory", "1Gi"]);
    let names = ["term-0", "term-1", "term-late", "term-pin"];
    let _guards: Vec<_> = names
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    for n in &names[..2] {
        apply(
            cluster,
            &format!("{n}.yaml"),
            &vm(n, "default", 1, "Once", ""),
        )?;
        wait_ready(cluster, "default", n).with_context(|| agent.output())?;
    }
    // Both end (killed: Failed, runPolicy Once does not restart them).
    for n in &names[..2] {
        let pid = recorded_pid(&cluster.vm_dir(n)).context("recorded VMM")?;
        // SAFETY: kill(2) on the pid this test's VM recorded.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        cluster.kubectl(&[
            "wait",
            "--for=jsonpath={.status.phase}=Failed",
            &format!("mvm/{n}"),
            "--timeout=60s",
        ])?;
    }
    // They keep their place: placement has no room, and a pin bypassing it
    // is not started by the agent.
    apply(
        cluster,
        "late.yaml",
        &vm("term-late", "default", 1, "Always", ""),
    )?;
    wait_reason(
        cluster,
        "default",
        "term-late",
        "Scheduled",
        "Unschedulable",
        60,
    )?;
    apply(
        cluster,
        "pin.yaml",
        &vm("term-pin", "default", 1, "Always", "  nodeName: n1\n"),
    )?;
    wait_reason(cluster, "default", "term-pin", "Ready", "OutOfCapacity", 60)
        .with_context(|| agent.output())?;
    // Switched back to Always, both restart where they were.
    for n in &names[..2] {
        cluster.kubectl(&[
            "patch",
            "mvm",
            n,
            "--type=merge",
            "-p",
            r#"{"spec":{"runPolicy":"Always"}}"#,
        ])?;
    }
    for n in &names[..2] {
        wait_until("the restart", Duration::from_secs(120), || {
            Ok(get(cluster, "default", n, ".status.restartCount")? == "1"
                && condition(cluster, "default", n, "Ready", "status")? == "True")
        })
        .with_context(|| agent.output())?;
    }
    // Never more than the node's two vCPUs run.
    let running: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| recorded_pid(&cluster.vm_dir(n)).is_some_and(alive))
        .collect();
    ensure!(running == names[..2], "running: {running:?}");
    ensure!(condition(cluster, "default", "term-pin", "Ready", "reason")? == "OutOfCapacity");
    ensure!(get(cluster, "default", "term-late", ".status.nodeName")?.is_empty());
    Ok(())
}
