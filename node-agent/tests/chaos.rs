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
//! VMM kill loop: one VM's VMM is killed again and again; each exit is seen
//! at once, the VM is restarted after the documented backoff and shows
//! `CrashLoopBackOff` while it waits, `restartCount` counts every restart,
//! and its neighbour is untouched.
//!
//! Disk full: the agent's state directory is a small tmpfs, filled up. Running
//! VMs keep running; a VM created then, and one whose VMM is killed then,
//! get no VMM the agent could not record, and say why; once there is room
//! again, both run, each once.
//!
//! Partition of one node of two, then fencing: node n2's agent runs in a
//! network namespace; its traffic to the API is dropped for five Lease
//! durations. Its VMs keep running, nothing starts them elsewhere, and their
//! status catches up when the partition heals. Then n2 is tainted
//! `runv.dev/fenced`: its agent stops its VMs and says so, and only then are
//! they started on n1. A sampler counts each VM's VMMs on both nodes every
//! 50 ms throughout: never more than one.
//!
//! API outage: the API server is stopped for at least five Lease durations
//! (as long as the killed VMM takes to be restarted), and one VMM is killed
//! inside the outage. No VM may be stopped by the outage, the
//! killed one is restarted locally by its run policy while the API is still
//! down, and once the API is back its status shows the restart and the
//! Events of the exit and the restart are delivered.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::cluster::{Cluster, run_scenario, run_scenario_needing, wait_until};
use common::vmm_processes;
use common::{KillVmmOnDrop, alive, recorded_pid};

const LEASE: Duration = Duration::from_secs(3);
const VMS: usize = 3;

/// The reasons of the Events about MicroVM `name`.
fn event_reasons(cluster: &Cluster, name: &str) -> Result<Vec<String>> {
    let columns = "custom-columns=O:.involvedObject.name,R:.reason";
    let out = cluster.kubectl(&["get", "events", "--no-headers", "-o", columns])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(o, _)| *o == name)
        .map(|(_, r)| r.trim().to_owned())
        .collect())
}

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
    // The agent sees the exit at once (it waits on each VMM's pidfd), and
    // restarts after the 1 s backoff, from its cache, with the API down.
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
    // The Events of the exit and the restart, published when the API was
    // down, are delivered once it is back.
    let wanted = ["Exited", "Restarted"];
    wait_until("the outage's Events", Duration::from_secs(30), || {
        let reasons = event_reasons(cluster, &names[0])?;
        Ok(wanted.iter().all(|w| reasons.iter().any(|r| r == w)))
    })
    .with_context(|| agent.output())?;
    let events_in = back.elapsed();
    println!(
        "api outage: {:.1}s down ({} Lease durations), {VMS} VMs, 1 VMM killed inside: \
         {lost} lost, {duplicates} duplicated, {unexpected} unexpected restarts, \
         status caught up {:.1}s after the API returned, its Events {wanted:?} {:.1}s after",
        down_for.as_secs_f64(),
        down_for.as_secs() / LEASE.as_secs(),
        caught_up.as_secs_f64(),
        events_in.as_secs_f64()
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

fn ready_reason(cluster: &Cluster, name: &str) -> Result<String> {
    let reason = "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}";
    Ok(cluster
        .kubectl(&["get", "mvm", name, "-o", reason])?
        .trim()
        .to_owned())
}

/// VMM kill loop: `crash`'s VMM is killed four times, with the restart backoff
/// shortened by flags to 1 s doubling to at most 4 s. Each restart comes no
/// sooner than its delay (1, 2, 4, 4 s), `CrashLoopBackOff` is shown while it
/// waits, `restartCount` counts each one, and `calm`, beside it, keeps its VMM.
fn vmm_kill_loop(cluster: &Cluster) -> Result<()> {
    const KILLS: u32 = 4;
    let agent =
        cluster.start_agent_with(&["--restart-backoff", "1s", "--restart-backoff-max", "4s"]);
    let names = ["crash".to_owned(), "calm".to_owned()];
    let guards: Vec<_> = names
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    cluster.apply_looping(&names)?;
    cluster.wait_all_ready().with_context(|| agent.output())?;
    let calm = recorded_pid(&guards[1].0).context("recorded VMM")?;
    let mut delays = Vec::new();
    let mut shown = 0;
    let started = Instant::now();
    for k in 0..KILLS {
        let pid = recorded_pid(&guards[0].0).context("recorded VMM")?;
        // SAFETY: kill(2) on the pid our VM recorded.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let killed = Instant::now();
        let mut backoff_seen = false;
        wait_until("the restart", Duration::from_secs(30), || {
            backoff_seen |= ready_reason(cluster, &names[0])? == "CrashLoopBackOff";
            Ok(recorded_pid(&guards[0].0).is_some_and(|p| p != pid && alive(p)))
        })
        .with_context(|| agent.output())?;
        delays.push(killed.elapsed());
        shown += u32::from(backoff_seen);
        let want = (k + 1).to_string();
        wait_until("restartCount in the API", Duration::from_secs(30), || {
            Ok(restart_count(cluster, &names[0])? == want)
        })
        .with_context(|| agent.output())?;
        cluster.wait_all_ready()?;
    }
    let expected: Vec<Duration> = (0..KILLS)
        .map(|k| Duration::from_secs(1 << k.min(2)))
        .collect();
    let duplicates = guards.iter().filter(|g| vmm_processes(&g.0) > 1).count();
    let calm_kept = recorded_pid(&guards[1].0) == Some(calm) && alive(calm);
    println!(
        "vmm kill loop: {KILLS} kills in {:.1}s, restarted after {:?} (backoff {:?}), \
         CrashLoopBackOff seen in {shown} of {KILLS} waits, restartCount {}, \
         {duplicates} duplicated, neighbour {}",
        started.elapsed().as_secs_f64(),
        delays
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|d| format!("{}s", d.as_secs()))
            .collect::<Vec<_>>(),
        restart_count(cluster, &names[0])?,
        if calm_kept { "kept" } else { "restarted" },
    );
    for (k, (got, want)) in delays.iter().zip(&expected).enumerate() {
        ensure!(
            got >= want,
            "restart {} came after {got:?}, before its backoff {want:?}",
            k + 1
        );
    }
    // Each wait is at least 1 s long and the status is written when the exit
    // is seen; the longer ones (2 s and more) are always long enough to see.
    ensure!(
        shown >= KILLS - 1,
        "CrashLoopBackOff shown in only {shown} of {KILLS} waits"
    );
    ensure!(duplicates == 0, "{duplicates} VMs run twice");
    ensure!(calm_kept, "the neighbour's VMM was restarted");
    drop(agent);
    drop(guards);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_kill_loop_backs_off_and_shows_crash_loop_back_off() -> Result<()> {
    run_scenario(
        "a_vmm_kill_loop_backs_off_and_shows_crash_loop_back_off",
        vmm_kill_loop,
    )
    .await
}

/// A tmpfs mounted on a directory for a test; lazily unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "runv-chaos",
            ])
            .arg(dir)
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mount -t tmpfs on {} failed",
            dir.display()
        );
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes to `file` until the filesystem is full; the bytes written.
fn fill(file: &std::path::Path) -> Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(file)?;
    let chunk = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    // Bounded: the tmpfs is a few MiB.
    for _ in 0..16_384 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

fn ready_message(cluster: &Cluster, name: &str) -> Result<String> {
    let message = "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}";
    Ok(cluster
        .kubectl(&["get", "mvm", name, "-o", message])?
        .trim()
        .to_owned())
}

/// Disk full: `full-0` and `full-1` run when the agent's state directory (a
/// 16 MiB tmpfs) is filled up; then `full-new` is created and `full-1`'s VMM
/// is killed. `full-0` keeps its VMM; neither of the others gets one, and
/// both say why (reason and "No space left on device"); once the filler is
/// removed, both run, each with one VMM.
fn disk_full(cluster: &Cluster) -> Result<()> {
    let mount = Tmpfs::mount(&cluster.root, "16m")?;
    let agent =
        cluster.start_agent_with(&["--restart-backoff", "1s", "--restart-backoff-max", "2s"]);
    let names: Vec<String> = ["full-0", "full-1", "full-new"].map(String::from).into();
    let guards: Vec<_> = names
        .iter()
        .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
        .collect();
    cluster.apply_looping(&names[..2])?;
    cluster.wait_all_ready().with_context(|| agent.output())?;
    let pids: Vec<u32> = guards[..2]
        .iter()
        .map(|g| recorded_pid(&g.0).context("recorded VMM"))
        .collect::<Result<_>>()?;
    let filler = cluster.root.join("filler");
    let filled = fill(&filler)?;
    cluster.apply_looping(&names[2..])?;
    // SAFETY: kill(2) on the pid our VM recorded.
    unsafe { libc::kill(pids[1] as libc::pid_t, libc::SIGKILL) };
    let mut said = Vec::new();
    for name in &names[1..] {
        wait_until(
            "a condition naming the full disk",
            Duration::from_secs(60),
            || Ok(ready_message(cluster, name)?.contains("No space left on device")),
        )
        .with_context(|| {
            let status = cluster.kubectl(&["get", "mvm", name, "-o", "jsonpath={.status}"]);
            format!("{name}: {status:?}")
        })?;
        said.push(format!("{name}: {}", ready_reason(cluster, name)?));
    }
    // A few more restart attempts on the full disk.
    std::thread::sleep(Duration::from_secs(3));
    let lost = usize::from(!alive(pids[0]) || recorded_pid(&guards[0].0) != Some(pids[0]));
    let unrecorded = guards[1..]
        .iter()
        .filter(|g| vmm_processes(&g.0) != 0)
        .count();
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    cluster.wait_all_ready().with_context(|| agent.output())?;
    let recovered = freed.elapsed();
    let duplicates = guards.iter().filter(|g| vmm_processes(&g.0) != 1).count();
    println!(
        "disk full: {} MiB filled, {said:?}: {lost} lost, {unrecorded} VMMs run unrecorded, \
         {duplicates} VMs without exactly one VMM after, all Ready {:.1}s after space was freed",
        filled >> 20,
        recovered.as_secs_f64()
    );
    ensure!(lost == 0, "full-0's VMM was stopped or replaced");
    ensure!(
        unrecorded == 0,
        "a VMM runs that the agent could not record"
    );
    ensure!(duplicates == 0, "{duplicates} VMs do not run exactly once");
    drop(agent);
    drop(guards);
    drop(mount);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_loses_nothing_and_says_so() -> Result<()> {
    use runv_node_agent::testing::Need;
    run_scenario_needing(
        "a_full_state_disk_loses_nothing_and_says_so",
        &[Need::Root],
        disk_full,
    )
    .await
}

/// A network namespace joined to this one by a veth pair, 10.251.N.1 here
/// and 10.251.N.2 inside; deleted (with the pair) on drop.
struct Netns {
    name: String,
    host: std::net::Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Netns {
    fn create() -> Result<Self> {
        let n = std::process::id() % 250;
        let name = format!("runv-chaos-{n}");
        let (outer, inner) = (format!("rvc{n}h"), format!("rvc{n}n"));
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            host: std::net::Ipv4Addr::new(10, 251, n as u8, 1),
        };
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns.name,
        ])?;
        ip(&["addr", "add", &format!("10.251.{n}.1/30"), "dev", &outer])?;
        ip(&["link", "set", &outer, "up"])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.251.{n}.2/30"),
            "dev",
            &inner,
        ])?;
        ip(&["-n", &ns.name, "link", "set", &inner, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Drops (`-I`) or lets through again (`-D`) everything the namespace
    /// sends to the host side.
    fn drop_to_host(&self, op: &str) -> Result<()> {
        let host = self.host.to_string();
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &self.name, "iptables", op, "OUTPUT", "-d", &host, "-j", "DROP",
            ])
            .output()
            .context("running iptables")?;
        ensure!(
            out.status.success(),
            "iptables {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Counts, every 50 ms until dropped, the VMMs of each named VM across
/// state roots, keeping the most seen at once per VM.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<usize>>>,
}

impl Sampler {
    fn start(roots: Vec<std::path::PathBuf>, names: Vec<String>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = vec![0; names.len()];
            // Bounded: at most 10 minutes of samples.
            for _ in 0..12_000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                for (m, name) in most.iter_mut().zip(&names) {
                    let n: usize = roots
                        .iter()
                        .map(|r| vmm_processes(&r.join("vms").join(format!("default_{name}"))))
                        .sum();
                    *m = (*m).max(n);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            most
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The most VMMs seen at once, per VM.
    fn finish(mut self) -> Vec<usize> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

fn field(cluster: &Cluster, name: &str, path: &str) -> Result<String> {
    let out = cluster.kubectl(&["get", "mvm", name, "-o", &format!("jsonpath={{{path}}}")])?;
    Ok(out.trim().to_owned())
}

/// Partition of n2, then n2 fenced; see the module doc.
fn partition_then_fence(cluster: &Cluster, ns: &Netns) -> Result<()> {
    let lease = format!("{}s", LEASE.as_secs());
    let timings = ["--lease-duration", &lease, "--lease-renew-interval", "1s"];
    let root2 = cluster.tmp.path().join("agent-n2");
    let n2 = cluster.start_agent_as("n2", &root2, Some(&ns.name), &timings);
    let names: Vec<String> = (0..2).map(|i| format!("part-{i}")).collect();
    let mut guards: Vec<_> = names
        .iter()
        .map(|n| KillVmmOnDrop(root2.join("vms").join(format!("default_{n}"))))
        .collect();
    guards.extend(names.iter().map(|n| KillVmmOnDrop(cluster.vm_dir(n))));
    // Not pinned, so that they may move; n2 is the only node yet.
    let text: Vec<String> = names
        .iter()
        .map(|n| {
            common::cluster::manifest(n, &common::test_guest(), "test=loop")
                .replace("  nodeName: n1\n", "")
        })
        .collect();
    let file = cluster.tmp.path().join("part.yaml");
    std::fs::write(&file, text.join("---\n"))?;
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    cluster.wait_all_ready().with_context(|| n2.output())?;
    let pids: Vec<u32> = guards[..2]
        .iter()
        .map(|g| recorded_pid(&g.0).context("recorded VMM"))
        .collect::<Result<_>>()?;
    let n1 = cluster.start_agent_with(&timings);
    wait_until("node n1", Duration::from_secs(30), || {
        Ok(cluster
            .kubectl(&[
                "get",
                "lease",
                "-n",
                "runv-system",
                "runv-agent-n1",
                "-o",
                "name",
            ])
            .is_ok())
    })?;
    let sampler = Sampler::start(vec![root2.clone(), cluster.root.clone()], names.clone());

    ns.drop_to_host("-I")?;
    let cut = Instant::now();
    wait_until("NodeLost", Duration::from_secs(30), || {
        Ok(field(cluster, &names[0], ".status.phase")? == "Unknown")
    })?;
    std::thread::sleep((5 * LEASE).saturating_sub(cut.elapsed()));
    let cut_for = cut.elapsed();
    let lost = pids.iter().filter(|p| !alive(**p)).count();
    let moved = names
        .iter()
        .filter(|n| vmm_processes(&cluster.vm_dir(n)) != 0)
        .count();
    ns.drop_to_host("-D")?;
    let healed = Instant::now();
    for n in &names {
        wait_until("Running again", Duration::from_secs(60), || {
            Ok(field(cluster, n, ".status.phase")? == "Running")
        })
        .with_context(|| n2.output())?;
    }
    let caught_up = healed.elapsed();
    let unexpected = guards[..2]
        .iter()
        .zip(&pids)
        .filter(|(g, p)| recorded_pid(&g.0) != Some(**p))
        .count();

    cluster.kubectl(&["taint", "node", "n2", "runv.dev/fenced=:NoExecute"])?;
    let fenced = Instant::now();
    for n in &names {
        wait_until("moved to n1", Duration::from_secs(60), || {
            Ok(field(cluster, n, ".status.nodeName")? == "n1"
                && field(cluster, n, ".status.phase")? == "Running")
        })
        .with_context(|| format!("{}\n{}", n2.output(), n1.output()))?;
    }
    let moved_in = fenced.elapsed();
    let most = sampler.finish();
    let twice = most.iter().filter(|m| **m > 1).count();
    let left_on_n2 = guards[..2]
        .iter()
        .filter(|g| vmm_processes(&g.0) != 0)
        .count();
    println!(
        "partition of n2 of 2: {:.1}s cut ({} Lease durations), {} VMs: {lost} lost, {moved} started \
         elsewhere, {unexpected} unexpected restarts, status caught up {:.1}s after healing; \
         fenced: moved to n1 in {:.1}s, {left_on_n2} left running on n2; most VMMs per VM at once {most:?}: \
         {twice} run twice",
        cut_for.as_secs_f64(),
        cut_for.as_secs() / LEASE.as_secs(),
        names.len(),
        caught_up.as_secs_f64(),
        moved_in.as_secs_f64()
    );
    ensure!(lost == 0, "{lost} VMs stopped by the partition");
    ensure!(moved == 0, "{moved} VMs started on n1 during the partition");
    ensure!(
        unexpected == 0,
        "{unexpected} VMs restarted by the partition"
    );
    ensure!(twice == 0, "{twice} VMs ran twice at once");
    ensure!(
        left_on_n2 == 0,
        "{left_on_n2} VMs still run on the fenced node"
    );
    drop((n1, n2, guards));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_keeps_its_vms_and_fencing_moves_them_once() -> Result<()> {
    use runv_node_agent::testing::{Need, require};
    let test = "a_partitioned_node_keeps_its_vms_and_fencing_moves_them_once";
    if !require(test, &[Need::Kvm, Need::Root, Need::Iptables]) {
        return Ok(());
    }
    let ns = Netns::create()?;
    let cluster = std::sync::Arc::new(Cluster::start_at(ns.host.into(), &[]).await?);
    let c = cluster.clone();
    let result = tokio::task::spawn_blocking(move || partition_then_fence(&c, &ns)).await?;
    let cluster = std::sync::Arc::into_inner(cluster).context("the cluster is still shared")?;
    cluster.shutdown().await?;
    result
}
