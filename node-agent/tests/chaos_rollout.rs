//! Chaos: the operator is killed with SIGKILL while it rolls a SecureWorkload
//! out, on the real test server, operator, `runv-agent run` and `runv-vmm` on
//! /dev/kvm. Ten replicas (maxSurge 1, maxUnavailable 1) boot the test guest
//! asleep in `hlt`, with their container image (pulled from a `docker-registry`
//! on loopback) as their first disk; a new image (a new template hash) starts
//! the rollout, and the operator is killed three times, each soon after it is
//! seen to create or delete a replica, staying down 1.5 s each time.
//!
//! What it proves: the rollout still finishes (every replica on the new
//! template hash and Ready, and the status says so for the current
//! generation), and at every state the API went through, as a watch on the
//! workload's MicroVMs saw it, the bounds held as the operator counts them
//! (as a Deployment does, replicas being deleted not counted):
//!
//! - replicas not being deleted ≤ `replicas` + `maxSurge`;
//! - once all were available, available replicas (Ready, phase Running, not
//!   being deleted) ≥ `replicas` − `maxUnavailable`.
//!
//! And from the host: no VM ever ran in two `runv-vmm` processes at once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::cluster::{Cluster, run_scenario, wait_until};
use common::images::Registry;
use common::{Agent, KillVmmOnDrop, push_test_image, vmm_cmdlines};
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use runv_crds::conditions;
use runv_crds::microvm::Phase;
use runv_crds::{MicroVM, SecureWorkload};

const NAME: &str = "rollout";
const REPLICAS: u32 = 10;
const MAX_SURGE: u32 = 1;
const MAX_UNAVAILABLE: u32 = 1;
/// How long after it is seen to create or delete a replica the operator is
/// killed, once per kill: at once (likely between that create and the delete
/// the same reconcile makes), and later, inside a following reconcile.
const KILL_DELAYS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
];
/// How long it stays down after each kill.
const DOWN: Duration = Duration::from_millis(1500);
const HASH_LABEL: &str = "runv.dev/template-hash";

fn workload(kernel: &str, image: &str) -> String {
    format!(
        "apiVersion: runv.dev/v1alpha1\nkind: SecureWorkload\nmetadata:\n  name: {NAME}\n  namespace: default\nspec:\n  replicas: {REPLICAS}\n  selector: {{ matchLabels: {{ app: {NAME} }} }}\n  template:\n    metadata: {{ labels: {{ app: {NAME} }} }}\n    spec:\n      resources: {{ vcpus: 1, memory: 64Mi }}\n      boot:\n        kernel: {kernel}\n        cmdline: \"test=container run=forever\"\n      runPolicy: Always\n      terminationGracePeriodSeconds: 2\n  container: {{ image: \"{image}\" }}\n  strategy:\n    type: RollingUpdate\n    rollingUpdate: {{ maxSurge: {MAX_SURGE}, maxUnavailable: {MAX_UNAVAILABLE} }}\n"
    )
}

/// One replica as the bounds see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    hash: String,
    terminating: bool,
    ready: bool,
    available: bool,
}

fn seen(vm: &MicroVM) -> Seen {
    let status = vm.status.as_ref();
    let ready = status.is_some_and(|s| conditions::is_true(&s.conditions, conditions::READY));
    Seen {
        hash: vm.labels().get(HASH_LABEL).cloned().unwrap_or_default(),
        terminating: vm.metadata.deletion_timestamp.is_some(),
        ready,
        available: ready && status.and_then(|s| s.phase) == Some(Phase::Running),
    }
}

/// What the watch saw.
#[derive(Debug, Default)]
struct Tally {
    /// States checked (one per watch event).
    states: usize,
    /// Lists after the first: each may hide states in between.
    relists: usize,
    /// The most replicas not being deleted at once.
    max_total: usize,
    /// The most replicas at once, those being deleted included.
    max_with_terminating: usize,
    /// The fewest available once all had been; None before.
    min_available: Option<usize>,
    /// Each state that broke a bound.
    violations: Vec<String>,
    /// Every replica name ever seen.
    names: BTreeSet<String>,
    /// Creates and deletes seen: a new name, or one newly being deleted.
    moves: usize,
    /// The latest state, by name.
    now: BTreeMap<String, Seen>,
}

impl Tally {
    fn check(&mut self, vms: &BTreeMap<String, Seen>) {
        self.states += 1;
        for (name, vm) in vms {
            let before = self.now.get(name);
            if before.is_none_or(|b| vm.terminating && !b.terminating) {
                self.moves += 1;
            }
        }
        self.names.extend(vms.keys().cloned());
        let active: Vec<&Seen> = vms.values().filter(|v| !v.terminating).collect();
        let total = active.len();
        let available = active.iter().filter(|v| v.available).count();
        self.max_total = self.max_total.max(total);
        self.max_with_terminating = self.max_with_terminating.max(vms.len());
        if total > (REPLICAS + MAX_SURGE) as usize {
            self.violations
                .push(format!("{total} replicas not being deleted: {vms:?}"));
        }
        if available >= REPLICAS as usize || self.min_available.is_some() {
            let min = self.min_available.map_or(available, |m| m.min(available));
            self.min_available = Some(min);
            if available < (REPLICAS - MAX_UNAVAILABLE) as usize {
                self.violations
                    .push(format!("{available} replicas available: {vms:?}"));
            }
        }
        self.now = vms.clone();
    }
}

/// Follows the workload's MicroVMs by watch and checks the bounds at each
/// state, until aborted.
async fn observe(api: Api<MicroVM>, tally: Arc<Mutex<Tally>>) {
    let config = watcher::Config::default().labels(&format!("runv.dev/secureworkload={NAME}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut vms: BTreeMap<String, Seen> = BTreeMap::new();
    let mut listing: BTreeMap<String, Seen> = BTreeMap::new();
    let mut lists = 0;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(vm)) => {
                vms.insert(vm.name_any(), seen(&vm));
            }
            Ok(Event::Delete(vm)) => {
                vms.remove(&vm.name_any());
            }
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(vm)) => {
                listing.insert(vm.name_any(), seen(&vm));
                continue;
            }
            Ok(Event::InitDone) => {
                lists += 1;
                vms = std::mem::take(&mut listing);
                tally.lock().unwrap().relists = lists - 1;
            }
            Err(_) => continue,
        }
        tally.lock().unwrap().check(&vms);
    }
}

/// What the host showed of the replicas' VMMs.
#[derive(Debug, Default)]
struct Vmms {
    /// VMs seen with a VMM at some sample.
    running: BTreeSet<String>,
    /// VMs seen with more than one at once.
    twice: BTreeSet<String>,
}

/// Samples `runv-vmm` processes every 50 ms until `stop`, for the VMs `tally`
/// has seen.
fn sample_vmms(cluster: &Cluster, tally: &Mutex<Tally>, stop: &AtomicBool) -> Vmms {
    let mut out = Vmms::default();
    while !stop.load(Ordering::Relaxed) {
        let names = tally.lock().unwrap().names.clone();
        let cmdlines = vmm_cmdlines();
        for name in names {
            // Each VMM is given `<its state directory>/config.json`.
            let needle = format!("{}/", cluster.vm_dir(&name).display());
            match cmdlines.iter().filter(|c| c.contains(&needle)).count() {
                0 => {}
                1 => {
                    out.running.insert(name);
                }
                _ => {
                    out.twice.insert(name.clone());
                    out.running.insert(name);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// Whether the latest state has every replica on `hash`, Ready and not
/// being deleted, and nothing else.
fn settled(tally: &Mutex<Tally>, hash: &str) -> bool {
    let t = tally.lock().unwrap();
    t.now.len() == REPLICAS as usize
        && t.now
            .values()
            .all(|v| v.hash == hash && v.ready && v.available && !v.terminating)
}

/// The workload's status says the rollout of its current generation is complete.
fn status_complete(swl: &SecureWorkload) -> bool {
    let Some(s) = swl.status.as_ref() else {
        return false;
    };
    let n = REPLICAS as i32;
    s.observed_generation == swl.metadata.generation
        && (
            s.replicas,
            s.ready_replicas,
            s.available_replicas,
            s.updated_replicas,
        ) == (n, n, n, n)
        && conditions::find(&s.conditions, conditions::PROGRESSING)
            .is_some_and(|c| c.reason == "RolloutComplete")
        && conditions::is_true(&s.conditions, conditions::AVAILABLE)
}

/// The current template hash, as the replicas carry it once one of them does.
fn hashes(tally: &Mutex<Tally>) -> BTreeSet<String> {
    let t = tally.lock().unwrap();
    t.now.values().map(|v| v.hash.clone()).collect()
}

/// What the kill loop and the rollout came to.
struct Outcome {
    kills: usize,
    /// Kills that landed before the rollout was complete.
    kills_mid_rollout: usize,
    rollout: Duration,
    /// From every replica being replaced (as the watch saw it) until the
    /// status said the rollout was complete.
    status_lag: Duration,
}

/// Rolls the workload out to a new image and, up to [`KILL_DELAYS`] times,
/// kills the operator soon after it is seen to create or delete a replica
/// (after that round's delay), starting it again after [`DOWN`]; waits for
/// the rollout to finish. The restarted operators are pushed to `operators`.
fn kill_loop(
    cluster: &Cluster,
    registry: &Registry,
    swls: &Api<SecureWorkload>,
    tally: &Mutex<Tally>,
    old: &str,
    operators: &mut Vec<Agent>,
) -> Result<Outcome> {
    let rt = tokio::runtime::Handle::current();
    let moves = || tally.lock().unwrap().moves;
    let done = || {
        let new = hashes(tally).into_iter().find(|h| h != old);
        new.is_some_and(|h| settled(tally, &h))
    };
    let mut known = moves();
    let started = Instant::now();
    let image = format!("{}/app:2", registry.addr);
    let patch = serde_json::json!({ "spec": { "container": { "image": image } } });
    rt.block_on(swls.patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)))?;
    let (mut kills, mut kills_mid_rollout) = (0, 0);
    for delay in KILL_DELAYS {
        wait_until("the operator to act", Duration::from_secs(30), || {
            Ok(moves() > known || done())
        })?;
        if done() {
            break;
        }
        std::thread::sleep(delay);
        kills_mid_rollout += usize::from(!done());
        match operators.last() {
            Some(op) => cluster.kill_operator(op)?,
            None => cluster.kill_operator(&cluster.operator)?,
        }
        kills += 1;
        std::thread::sleep(DOWN);
        known = moves();
        operators.push(cluster.start_operator());
    }
    let mut replaced = None;
    wait_until("the rollout to finish", Duration::from_secs(120), || {
        if !done() {
            return Ok(false);
        }
        replaced.get_or_insert_with(Instant::now);
        Ok(status_complete(&rt.block_on(swls.get(NAME))?))
    })?;
    Ok(Outcome {
        kills,
        kills_mid_rollout,
        rollout: started.elapsed(),
        status_lag: replaced.map_or(Duration::ZERO, |at| at.elapsed()),
    })
}

fn operator_logs(cluster: &Cluster, operators: &[Agent]) -> String {
    std::iter::once(&cluster.operator)
        .chain(operators)
        .map(Agent::output)
        .collect::<Vec<_>>()
        .join("\n--- restarted operator ---\n")
}

/// The scenario, with what it started: the agent, the restarted operators,
/// and (through `tally`) every replica whose VMM must go at the end.
fn rollout_under_kills(
    cluster: &Cluster,
    tally: &Arc<Mutex<Tally>>,
    operators: &mut Vec<Agent>,
    agent: &Agent,
) -> Result<()> {
    let rt = tokio::runtime::Handle::current();
    let client = cluster.client()?;
    let swls: Api<SecureWorkload> = Api::namespaced(client.clone(), "default");
    let watch = rt.spawn(observe(Api::namespaced(client, "default"), tally.clone()));
    // Two images in a registry on loopback: the replicas pull them.
    let registry = Registry::start(None);
    push_test_image(&registry, cluster.tmp.path(), "1", &[]);
    push_test_image(&registry, cluster.tmp.path(), "2", &[]);
    let file = cluster.tmp.path().join("workload.yaml");
    let image = format!("{}/app:1", registry.addr);
    std::fs::write(&file, workload(&common::test_guest(), &image))?;
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    wait_until("every replica Ready", Duration::from_secs(120), || {
        let hashes = hashes(tally);
        Ok(hashes.len() == 1 && settled(tally, hashes.first().unwrap()))
    })
    .with_context(|| agent.output())?;
    let old = hashes(tally).pop_first().context("a template hash")?;

    let stop = AtomicBool::new(false);
    let (outcome, vmms) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_vmms(cluster, tally, &stop));
        let outcome = kill_loop(cluster, &registry, &swls, tally, &old, operators);
        stop.store(true, Ordering::Relaxed);
        (outcome, sampler.join().expect("the VMM sampler"))
    });
    watch.abort();
    let outcome = outcome.with_context(|| {
        format!(
            "{:?}\n{}\n--- agent ---\n{}",
            tally.lock().unwrap().now,
            operator_logs(cluster, operators),
            agent.output()
        )
    })?;
    let t = tally.lock().unwrap();
    println!(
        "operator kill loop during a rollout: {} kills ({} mid-rollout), {REPLICAS} replicas \
         (maxSurge {MAX_SURGE}, maxUnavailable {MAX_UNAVAILABLE}), rollout took {:.1}s \
         (status complete {:.1}s after the last replica was replaced): \
         {} states watched ({} relists), max total {} (bound {}; {} with those being deleted), \
         min available {} (bound {}), {} violations; VMMs seen for {} VMs, {} VMs run twice",
        outcome.kills,
        outcome.kills_mid_rollout,
        outcome.rollout.as_secs_f64(),
        outcome.status_lag.as_secs_f64(),
        t.states,
        t.relists,
        t.max_total,
        REPLICAS + MAX_SURGE,
        t.max_with_terminating,
        t.min_available.unwrap_or_default(),
        REPLICAS - MAX_UNAVAILABLE,
        t.violations.len(),
        vmms.running.len(),
        vmms.twice.len()
    );
    ensure!(
        t.relists == 0,
        "the watch listed again: states may be missed"
    );
    ensure!(
        t.violations.is_empty(),
        "bounds broken:\n{}",
        t.violations.join("\n")
    );
    ensure!(vmms.twice.is_empty(), "VMs run twice: {:?}", vmms.twice);
    // The sampler saw the VMMs: those of the new replicas, and of the old
    // ones until they were stopped.
    ensure!(
        vmms.running.len() >= 2 * REPLICAS as usize,
        "VMMs seen for {:?} only",
        vmms.running
    );
    Ok(())
}

fn operator_kill_loop(cluster: &Cluster) -> Result<()> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut operators = Vec::new();
    let agent = cluster.start_agent();
    let result = rollout_under_kills(cluster, &tally, &mut operators, &agent);
    // The agent first, so that it restarts none of the VMMs the guards stop.
    drop(agent);
    let names = tally.lock().unwrap().names.clone();
    drop(
        names
            .iter()
            .map(|n| KillVmmOnDrop(cluster.vm_dir(n)))
            .collect::<Vec<_>>(),
    );
    drop(operators);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_kills_during_a_rollout_keep_its_bounds_and_it_finishes() -> Result<()> {
    let test = "operator_kills_during_a_rollout_keep_its_bounds_and_it_finishes";
    // The replicas pull their images from a registry the test starts.
    if !common::images::require_tools(test, &["docker-registry", "skopeo", "mkfs.erofs"]) {
        return Ok(());
    }
    run_scenario(test, operator_kill_loop).await
}
