//! Chaos: the real test server, operator, `runv-agent run` and `runv-vmm` on
//! /dev/kvm, under failures, with Lease timings shortened by flags. Each
//! scenario is bounded in time and prints what it counted: VMs lost,
//! duplicates, unexpected restarts, and seconds for status to catch up.
//!
//! Agent kill loop: the agent is killed three times, and VMs are created
//! and deleted while it is down; nothing is lost, run twice or left behind.
//!
//! Corrupt state: a VM's `vm.json` is truncated while it runs; it keeps
//! running, no second VMM starts, and a condition says what is wrong.
//!
//! API outage: the API server is stopped for at least five Lease durations
//! (as long as the killed VMM takes to be restarted), and one VMM is killed
//! inside the outage. No VM may be stopped by the outage, the
//! killed one is restarted locally by its run policy while the API is still
//! down, and once the API is back its status shows the restart.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::cluster::{Cluster, run_scenario, wait_until};
use common::vmm_processes;
use common::{KillVmmOnDrop, alive, recorded_pid};

const LEASE: Duration = Duration::from_secs(3);
const VMS: usize = 3;

fn restart_count(cluster: &Cluster, name: &str) -> Result<String> {
    let out = cluster.kubectl(&["get", "mvm", name, "-o", "jsonpath={.status.restartCount}"])?;
    Ok(out.trim().to_owned())
}

fn outage(cluster: &Cluster) -> Result<()> {
    let lease = format!("{}s", LEASE.as_secs());
    let agent = cluster.start_agent_with(&[
        "--lease-duration",
        &lease,
        "--lease-renew-interval",
        "1s",
        "--restart-backoff",
        "1s",
    ]);
    let names: Vec<String> = (0..VMS).map(|i| format!("outage-{i}")).collect();
    let guards: Vec<_> = names
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    cluster.apply_looping(&names)?;
    cluster.wait_all_ready().with_context(|| agent.output())?;
    let pids: Vec<u32> = guards
        .iter()
        .map(|g| recorded_pid(&g.0).context("recorded VMM"))
        .collect::<Result<_>>()?;

    cluster.stop_api()?;
    let down = Instant::now();
    std::thread::sleep(LEASE);
    // SAFETY: kill(2) on the pid our VM recorded.
    unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
    // The agent looks at a running VM every 30 s (sooner on any event).
    wait_until(
        "a local restart while the API is down",
        Duration::from_secs(45),
        || Ok(recorded_pid(&guards[0].0).is_some_and(|p| p != pids[0] && alive(p))),
    )
    .with_context(|| agent.output())?;
    // At least five Lease durations, and a few seconds after the restart.
    std::thread::sleep(Duration::from_secs(3));
    std::thread::sleep((5 * LEASE).saturating_sub(down.elapsed()));
    let lost = pids[1..].iter().filter(|p| !alive(**p)).count();
    let unexpected = guards[1..]
        .iter()
        .zip(&pids[1..])
        .filter(|(g, p)| recorded_pid(&g.0) != Some(**p))
        .count();
    let duplicates = guards.iter().filter(|g| vmm_processes(&g.0) > 1).count();
    let down_for = down.elapsed();

    cluster.start_api()?;
    let back = Instant::now();
    wait_until("restartCount 1 in the API", Duration::from_secs(60), || {
        Ok(restart_count(cluster, &names[0]).is_ok_and(|c| c == "1"))
    })
    .with_context(|| agent.output())?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "mvm",
        "--all",
        "--timeout=60s",
    ])?;
    let caught_up = back.elapsed();
    println!(
        "api outage: {:.1}s down ({} Lease durations), {VMS} VMs, 1 VMM killed inside: \
         {lost} lost, {duplicates} duplicated, {unexpected} unexpected restarts, \
         status caught up {:.1}s after the API returned",
        down_for.as_secs_f64(),
        down_for.as_secs() / LEASE.as_secs(),
        caught_up.as_secs_f64()
    );
    ensure!(
        lost == 0,
        "{lost} VMs stopped by the outage\n{}",
        agent.output()
    );
    ensure!(unexpected == 0, "{unexpected} VMs restarted by the outage");
    ensure!(duplicates == 0, "{duplicates} VMs run twice");
    for g in &guards[1..] {
        ensure!(
            vmm_processes(&g.0) == 1,
            "{} has no single VMM",
            g.0.display()
        );
    }
    drop(agent);
    drop(guards);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_run_through_an_api_outage_and_status_catches_up() -> Result<()> {
    run_scenario(
        "vms_run_through_an_api_outage_and_status_catches_up",
        outage,
    )
    .await
}

/// Whether MicroVM `name` is gone from the API.
fn gone(cluster: &Cluster, name: &str) -> Result<bool> {
    let out = cluster.kubectl(&["get", "mvm", name, "--ignore-not-found", "-o", "name"])?;
    Ok(out.trim().is_empty())
}

/// Agent kill -9 loop under churn: each round kills the agent, creates two
/// VMs and deletes one while it is down, and starts it again. Every VM that
/// should run runs once, every deleted one is cleaned up before its object
/// goes (the finalizer), and no VM that was left alone is restarted.
fn agent_kill_loop(cluster: &Cluster) -> Result<()> {
    const ROUNDS: usize = 3;
    let mut live: Vec<String> = vec!["churn-0".into(), "churn-1".into()];
    let mut deleted: Vec<String> = Vec::new();
    let mut guards: Vec<KillVmmOnDrop> = live
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    let mut agent = cluster.start_agent();
    cluster.apply_looping(&live)?;
    cluster.wait_all_ready()?;
    let started = Instant::now();
    let mut unexpected = 0;
    for round in 0..ROUNDS {
        let before: Vec<(String, u32)> = live
            .iter()
            .map(|n| {
                Ok((
                    n.clone(),
                    recorded_pid(&cluster.vm_dir(n)).context("recorded VMM")?,
                ))
            })
            .collect::<Result<_>>()?;
        agent.signal(libc::SIGKILL);
        agent.wait(Duration::from_secs(10));
        let new: Vec<String> = (0..2).map(|i| format!("churn-r{round}-{i}")).collect();
        cluster.apply_looping(&new)?;
        let victim = live.remove(0);
        cluster.kubectl(&["delete", "mvm", &victim, "--wait=false"])?;
        guards.extend(new.iter().map(|n| KillVmmOnDrop(cluster.vm_dir(n))));
        agent = cluster.start_agent();
        live.extend(new);
        wait_until("the deleted VM to go", Duration::from_secs(120), || {
            gone(cluster, &victim)
        })
        .with_context(|| agent.output())?;
        ensure!(
            !cluster.vm_dir(&victim).exists(),
            "{victim}'s state outlived its MicroVM"
        );
        for (name, pid) in &before {
            if *name == victim {
                ensure!(!alive(*pid), "{victim}'s VMM outlived its MicroVM");
            } else if recorded_pid(&cluster.vm_dir(name)) != Some(*pid) {
                unexpected += 1;
            }
        }
        deleted.push(victim);
        cluster.wait_all_ready().with_context(|| agent.output())?;
    }
    let lost = live
        .iter()
        .filter(|n| !recorded_pid(&cluster.vm_dir(n)).is_some_and(alive))
        .count();
    let duplicates = live
        .iter()
        .filter(|n| vmm_processes(&cluster.vm_dir(n)) > 1)
        .count();
    let leftovers = deleted
        .iter()
        .filter(|n| vmm_processes(&cluster.vm_dir(n)) != 0)
        .count();
    println!(
        "agent kill loop: {ROUNDS} kills, {} created and {} deleted while the agent was down, \
         {:.1}s: {lost} lost, {duplicates} duplicated, {leftovers} deleted VMs still running, \
         {unexpected} unexpected restarts",
        2 * ROUNDS,
        deleted.len(),
        started.elapsed().as_secs_f64()
    );
    ensure!(lost == 0, "{lost} VMs that should run do not");
    ensure!(duplicates == 0, "{duplicates} VMs run twice");
    ensure!(
        unexpected == 0,
        "{unexpected} VMs restarted by the agent's kills"
    );
    ensure!(leftovers == 0, "{leftovers} deleted VMs still run");
    drop(agent);
    drop(guards);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_loop_under_churn_loses_and_duplicates_nothing() -> Result<()> {
    run_scenario(
        "agent_kill_loop_under_churn_loses_and_duplicates_nothing",
        agent_kill_loop,
    )
    .await
}

/// A corrupted `vm.json`: the VM keeps running, no second VMM is started for
/// it, and its status says what is wrong (`Ready=False`, `StateUnreadable`).
fn corrupt_record(cluster: &Cluster) -> Result<()> {
    let agent = cluster.start_agent();
    let guard = KillVmmOnDrop(cluster.vm_dir("corrupt"));
    cluster.apply_looping(&["corrupt".to_owned()])?;
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "mvm/corrupt",
            "--timeout=180s",
        ])
        .with_context(|| agent.output())?;
    let pid = recorded_pid(&guard.0).context("recorded VMM")?;
    let record = guard.0.join("vm.json");
    let text = std::fs::read(&record)?;
    std::fs::write(&record, &text[..text.len() / 2])?;
    // The agent looks again within 30 s (sooner on any event): touch the spec's
    // labels to make it look now.
    cluster.kubectl(&["label", "mvm", "corrupt", "chaos=corrupt"])?;
    let reason = "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}";
    wait_until("StateUnreadable", Duration::from_secs(60), || {
        Ok(cluster
            .kubectl(&["get", "mvm", "corrupt", "-o", reason])?
            .trim()
            == "StateUnreadable")
    })
    .with_context(|| agent.output())?;
    let lost = usize::from(!alive(pid));
    let duplicates = usize::from(vmm_processes(&guard.0) > 1);
    println!(
        "corrupt vm.json: {lost} lost, {duplicates} duplicated, condition StateUnreadable shown"
    );
    ensure!(lost == 0, "the VM's VMM was stopped");
    ensure!(duplicates == 0, "a second VMM was started");
    drop(agent);
    drop(guard);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_loses_and_duplicates_nothing_and_says_so() -> Result<()> {
    run_scenario(
        "a_corrupt_record_loses_and_duplicates_nothing_and_says_so",
        corrupt_record,
    )
    .await
}
