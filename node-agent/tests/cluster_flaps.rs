//! e2e: no MicroVM condition flaps. The real operator and `runv-agent run`
//! drive one VM through a normal start, a VMM crash and restart, a stop and a
//! start, and a node loss (the agent killed until its Lease expires) and
//! return, while a watch records every version of the object. A condition may
//! change only monotonically between causes: a cause is a new generation (the
//! user changed the spec), a recorded exit or restart, or the node being lost
//! or found again. `Ready` going True → False → True inside one such span is a
//! flap, as is any condition returning to a status it left without a cause. A
//! condition written for an older generation than the object's is not counted.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use common::cluster::{Cluster, manifest, wait_until};
use common::{KillVmmOnDrop, recorded_pid};
use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher;
use runv_crds::conditions as cond;
use runv_crds::microvm::Phase;
use runv_crds::{MicroVM, MicroVMStatus};
use runv_node_agent::testing::{Need, require};

/// One version of the VM, as a watch delivered it.
#[derive(Clone, Debug)]
struct Seen {
    generation: i64,
    status: MicroVMStatus,
}

impl Seen {
    /// What marks a cause: a spec change, an exit, a restart, node loss.
    fn cause(&self) -> (i64, Option<String>, i32, bool) {
        (
            self.generation,
            self.status
                .last_exit
                .as_ref()
                .map(|e| format!("{:?}", e.time)),
            self.status.restart_count,
            self.status.phase == Some(Phase::Unknown),
        )
    }

    /// The condition's status, unless it describes an older generation (a
    /// spec change has not been acted on yet: the old value says nothing).
    fn condition(&self, type_: &str) -> Option<String> {
        cond::find(&self.status.conditions, type_)
            .filter(|c| c.observed_generation.is_none_or(|g| g >= self.generation))
            .map(|c| c.status.clone())
    }
}

/// The flaps in a recorded history: a condition that, between two causes,
/// comes back to a status it had left.
fn flaps(history: &[Seen]) -> Vec<String> {
    let mut out = Vec::new();
    for type_ in cond::MICROVM_CONDITIONS {
        let mut span_cause = None;
        let mut left: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for (i, seen) in history.iter().enumerate() {
            if span_cause.as_ref() != Some(&seen.cause()) {
                span_cause = Some(seen.cause());
                left.clear();
                current = seen.condition(type_);
                continue;
            }
            let now = seen.condition(type_);
            if now != current {
                if let Some(prev) = current.take() {
                    left.push(prev);
                }
                if now.as_ref().is_some_and(|n| left.contains(n)) {
                    out.push(format!(
                        "{type_} returned to {now:?} at version {i} without a cause (left {left:?})"
                    ));
                }
                current = now;
            }
        }
    }
    out
}

fn seen(generation: i64, restarts: i32, ready: &str) -> Seen {
    let mut status = MicroVMStatus {
        restart_count: restarts,
        ..MicroVMStatus::default()
    };
    let row = cond::Update {
        type_: cond::READY,
        status: match ready {
            "True" => cond::Status::True,
            _ => cond::Status::False,
        },
        reason: "R",
        message: "",
        observed_generation: None,
    };
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    );
    cond::set_condition(&mut status.conditions, row, now);
    Seen { generation, status }
}

#[test]
fn the_checker_finds_a_flap_and_accepts_a_caused_change() {
    let flap = [
        seen(1, 0, "False"),
        seen(1, 0, "True"),
        seen(1, 0, "False"),
        seen(1, 0, "True"),
    ];
    assert_eq!(flaps(&flap).len(), 2, "{:?}", flaps(&flap));
    let caused = [
        seen(1, 0, "True"),
        seen(1, 1, "False"),
        seen(1, 1, "True"),
        seen(2, 1, "False"),
        seen(2, 1, "True"),
    ];
    assert!(flaps(&caused).is_empty(), "{:?}", flaps(&caused));
}

/// Records every version of every MicroVM in `default` until aborted.
fn record(client: kube::Client, into: Arc<Mutex<Vec<Seen>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<MicroVM> = Api::namespaced(client, "default");
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = events.next().await {
            if let Ok(watcher::Event::Apply(vm) | watcher::Event::InitApply(vm)) = ev {
                into.lock().unwrap().push(Seen {
                    generation: vm.metadata.generation.unwrap_or(0),
                    status: vm.status.clone().unwrap_or_default(),
                });
            }
        }
    })
}

fn ready_is(cluster: &Cluster, status: &str, reason: &str, timeout: Duration) -> Result<()> {
    let path = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}/{.status.conditions[?(@.type==\"Ready\")].reason}";
    let want = format!("{status}/{reason}");
    wait_until(&format!("Ready {want}"), timeout, || {
        Ok(cluster.kubectl(&["get", "mvm", "flap", "-o", path])?.trim() == want)
    })
}

fn power(cluster: &Cluster, state: &str) -> Result<()> {
    let patch = format!("{{\"spec\":{{\"powerState\":\"{state}\"}}}}");
    cluster.kubectl(&["patch", "mvm", "flap", "--type=merge", "-p", &patch])?;
    Ok(())
}

/// The scenario: start, crash and restart, stop and start, node loss and return.
fn drive(cluster: &Cluster) -> Result<()> {
    let mut agent = cluster.start_agent();
    let guard = KillVmmOnDrop(cluster.vm_dir("flap"));
    let file = cluster.tmp.path().join("flap.yaml");
    std::fs::write(&file, manifest("flap", &common::test_guest(), "test=loop"))?;
    cluster.kubectl(&["apply", "-f", &file.display().to_string()])?;
    let long = Duration::from_secs(180);
    ready_is(cluster, "True", "Running", long).with_context(|| agent.output())?;

    let pid = recorded_pid(&guard.0).context("recorded VMM")?;
    // SAFETY: kill(2) on the pid our VM recorded.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    wait_until("the restart", long, || {
        Ok(recorded_pid(&guard.0).is_some_and(|p| p != pid))
    })?;
    ready_is(cluster, "True", "Running", long).with_context(|| agent.output())?;

    power(cluster, "Stopped")?;
    ready_is(cluster, "True", "Stopped", long)?;
    power(cluster, "Running")?;
    ready_is(cluster, "True", "Running", long)?;

    // Node loss: the agent is gone until its Lease expires; the VM keeps running.
    agent.signal(libc::SIGKILL);
    agent.wait(Duration::from_secs(10));
    ready_is(cluster, "Unknown", "NodeLost", long)?;
    let agent = cluster.start_agent();
    ready_is(cluster, "True", "Running", long).with_context(|| agent.output())?;
    drop(agent);
    drop(guard);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_condition_flaps_through_start_restart_stop_and_node_loss() -> Result<()> {
    if !require(
        "no_condition_flaps_through_start_restart_stop_and_node_loss",
        &[Need::Kvm],
    ) {
        return Ok(());
    }
    let cluster = Arc::new(Cluster::start().await?);
    let history = Arc::new(Mutex::new(Vec::new()));
    let recorder = record(cluster.client()?, history.clone());
    let c = cluster.clone();
    let result = tokio::task::spawn_blocking(move || drive(&c)).await?;
    // Let the last writes arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    recorder.abort();
    let cluster = Arc::into_inner(cluster).context("the cluster is still shared")?;
    cluster.shutdown().await?;
    result?;
    let history = history.lock().unwrap().clone();
    let readies: Vec<_> = history.iter().map(|s| s.condition(cond::READY)).collect();
    println!("{} versions recorded; Ready: {readies:?}", history.len());
    // Each step of the scenario shows up: boot, a restart, a stop, node loss.
    assert!(history.iter().any(|s| s.status.restart_count == 1));
    assert!(
        history
            .iter()
            .any(|s| s.status.phase == Some(Phase::Stopped))
    );
    assert!(
        history
            .iter()
            .any(|s| s.status.phase == Some(Phase::Unknown))
    );
    let found = flaps(&history);
    assert!(found.is_empty(), "{found:#?}");
    Ok(())
}
