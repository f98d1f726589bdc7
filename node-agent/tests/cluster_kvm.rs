//! e2e: the Kubernetes API test server, the real `runv-operator`, the real
//! `runv-agent run`, the real `kubectl` and real microVMs on /dev/kvm.
//! `kubectl apply` of 20 VMs → `kubectl wait --for=condition=Ready`; `kill -9`
//! of the agent while they run loses none and starts no duplicate; `kubectl delete` removes the VMM and its
//! state; a missing kernel shows `Ready=False` naming the file.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::cluster::{Cluster, manifest, run_scenario, wait_until};
use common::{KillVmmOnDrop, alive, recorded_pid};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_microvms_through_operator_and_agent() -> Result<()> {
    run_scenario("kubectl_drives_microvms_through_operator_and_agent", drive).await
}

fn drive(cluster: &Cluster) -> Result<()> {
    let guest = common::test_guest();
    let tmp = &cluster.tmp;
    let mut agent = cluster.start_agent();
    let file = tmp.path().join("vms.yaml");
    let names: Vec<String> = (0..20).map(|i| format!("loop-{i}")).collect();
    let text: Vec<String> = names
        .iter()
        .map(|n| manifest(n, &guest, "test=loop"))
        .collect();
    std::fs::write(&file, text.join("---\n"))?;
    let guards: Vec<KillVmmOnDrop> = names
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "mvm",
            "--all",
            "--timeout=240s",
        ])
        .with_context(|| agent.output())?;
    let pids: Vec<u32> = guards
        .iter()
        .map(|g| recorded_pid(&g.0).context("recorded VMM"))
        .collect::<Result<_>>()?;

    // kill -9 the agent while the VMs run: none is lost; a new agent adopts them.
    agent.signal(libc::SIGKILL);
    agent.wait(Duration::from_secs(10));
    assert!(pids.iter().all(|p| alive(*p)), "a VMM died with the agent");
    let mut agent = cluster.start_agent();
    std::thread::sleep(Duration::from_secs(2));
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "mvm",
        "--all",
        "--timeout=240s",
    ])?;
    for (g, p) in guards.iter().zip(&pids) {
        assert_eq!(recorded_pid(&g.0), Some(*p), "a second VMM was started");
    }

    // Kill a VMM: restarted per runPolicy Always after backoff, counted.
    // SAFETY: kill(2) on the pid our VM recorded.
    unsafe {
        libc::kill(pids[0] as libc::pid_t, libc::SIGKILL);
    }
    wait_until("the restart", Duration::from_secs(180), || {
        let count = cluster.kubectl(&[
            "get",
            "mvm",
            "loop-0",
            "-o",
            "jsonpath={.status.restartCount}",
        ])?;
        Ok(count.trim() == "1")
    })
    .with_context(|| agent.output())?;
    let last = cluster.kubectl(&[
        "get",
        "mvm",
        "loop-0",
        "-o",
        "jsonpath={.status.lastExit.reason}",
    ])?;
    assert_eq!(last, "Killed");
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "mvm/loop-0",
        "--timeout=180s",
    ])?;
    let new_pid = recorded_pid(&guards[0].0).context("new VMM")?;
    assert_ne!(new_pid, pids[0]);

    // A kernel that does not exist.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        manifest("nokernel", "/var/lib/runv/kernels/nonexistent-vmlinux", ""),
    )?;
    cluster.kubectl(&["apply", "-f", &bad.display().to_string()])?;
    cluster.kubectl(&[
        "wait",
        "--for=jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}=KernelNotFound",
        "mvm/nokernel",
        "--timeout=180s",
    ])?;
    let msg = cluster.kubectl(&[
        "get",
        "mvm",
        "nokernel",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
    ])?;
    assert!(
        msg.contains("/var/lib/runv/kernels/nonexistent-vmlinux"),
        "{msg}"
    );

    // Delete: VMM and state gone, then the object.
    cluster.kubectl(&["delete", "mvm", "loop-0", "--timeout=180s"])?;
    assert!(!alive(new_pid), "the VMM outlived its MicroVM");
    assert!(!guards[0].0.exists(), "the state directory is left");
    // SIGTERM, as the kubelet stops a DaemonSet pod: the agent exits 0 (not
    // killed by the signal) and its VMs keep running.
    agent.signal(libc::SIGTERM);
    assert_eq!(
        agent.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.output()
    );
    assert!(
        pids[1..].iter().all(|p| alive(*p)),
        "a VMM ended with the agent's SIGTERM"
    );
    drop(agent);
    drop(guards);
    Ok(())
}
