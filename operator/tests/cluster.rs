//! The real runv-operator binary against the Kubernetes API test server, with
//! simulated node agents.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Cluster, eventually, microvm, usage};
use kube::api::{ListParams, PostParams};
use runv_crds::conditions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_microvms_over_ten_nodes_never_overcommit() -> Result<()> {
    // 10 nodes x (160 vCPUs, 32Gi): room for every vCPU asked, not for all memory.
    let names: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
    let nodes: Vec<(&str, u32, &str)> = names.iter().map(|n| (n.as_str(), 160, "32Gi")).collect();
    let cluster = Cluster::start(&nodes, &["--leader-elect=true"]).await?;
    let api = cluster.microvms();
    for i in 0..1000u32 {
        let memory = format!("{}Mi", 256 + (i % 3) * 128);
        api.create(
            &PostParams::default(),
            &microvm(&format!("vm-{i:04}"), 1 + i % 2, &memory, "Once"),
        )
        .await?;
    }
    // Settled: every VM either bound or reported unschedulable.
    let vms = eventually(
        Duration::from_secs(180),
        "every MicroVM to be decided",
        || async {
            let list = api.list(&ListParams::default()).await?.items;
            let decided = list.iter().all(|vm| {
                let s = vm.status.as_ref();
                s.and_then(|s| s.node_name.as_ref()).is_some()
                    || s.and_then(|s| conditions::find(&s.conditions, conditions::SCHEDULED))
                        .is_some_and(|c| c.reason == "Unschedulable")
            });
            Ok(decided.then_some(list))
        },
    )
    .await?;
    assert_eq!(vms.len(), 1000);
    let used = usage(&vms);
    let placed = common::bound_count(&vms);
    for (node, (cpu, mem)) in &used {
        assert!(*cpu <= 160, "{node} over-committed: {cpu} vCPUs");
        assert!(*mem <= 32 << 30, "{node} over-committed: {mem} bytes");
    }
    // No VM was ever placed twice (each placement publishes a Scheduled Event).
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::all(cluster.client.clone());
    let mut placements = std::collections::BTreeMap::<String, Vec<String>>::new();
    for e in events.list(&ListParams::default()).await? {
        if e.reason.as_deref() == Some("Scheduled") {
            let name = e.regarding.and_then(|r| r.name).unwrap_or_default();
            placements
                .entry(name)
                .or_default()
                .push(e.note.unwrap_or_default());
        }
    }
    let twice: Vec<_> = placements
        .iter()
        .filter(|(_, notes)| notes.len() > 1)
        .collect();
    assert!(twice.is_empty(), "placed more than once: {twice:?}");
    assert_eq!(placements.len(), placed);
    // Demand is 375Gi for 320Gi: most are placed, the rest wait with a reason.
    assert!(placed > 800 && placed < 1000, "placed {placed}");
    assert_eq!(used.len(), 10, "every node used: {used:?}");
    let waiting = vms
        .iter()
        .find(|v| {
            v.status
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_none()
        })
        .unwrap();
    let sched = conditions::find(
        &waiting.status.as_ref().unwrap().conditions,
        conditions::SCHEDULED,
    )
    .unwrap();
    assert!(
        sched.message.contains("have too little free memory"),
        "{}",
        sched.message
    );
    let metrics = cluster.metrics().await?;
    assert!(
        metrics.contains("runv_operator_placements_total{outcome=\"placed\"}"),
        "{metrics}"
    );
    Ok(())
}

fn workload(replicas: i32, image: &str) -> runv_crds::SecureWorkload {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "SecureWorkload",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "resources": { "vcpus": 1, "memory": "128Mi" }, "boot": { "kernel": "/k" }, "runPolicy": "Always" }
            },
            "container": { "image": image },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": 2, "maxUnavailable": 1 } }
        }
    }))
    .expect("a valid SecureWorkload")
}

/// Owned replicas: (name, template hash, deleting).
async fn replicas(api: &kube::Api<runv_crds::MicroVM>) -> Result<Vec<(String, String, bool)>> {
    let list = api
        .list(&ListParams::default().labels("runv.dev/secureworkload=web"))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|vm| {
            let hash = vm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("runv.dev/template-hash").cloned())
                .unwrap_or_default();
            (
                vm.metadata.name.unwrap_or_default(),
                hash,
                vm.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secureworkload_scales_rolls_and_cascades() -> Result<()> {
    let nodes = [("a", 64, "16Gi"), ("b", 64, "16Gi"), ("c", 64, "16Gi")];
    let cluster = Cluster::start(&nodes, &["--leader-elect=false"]).await?;
    let swls: kube::Api<runv_crds::SecureWorkload> =
        kube::Api::namespaced(cluster.client.clone(), "default");
    let vms = cluster.microvms();
    swls.create(&PostParams::default(), &workload(0, "web:1"))
        .await?;
    let long = Duration::from_secs(90);

    // 0: a status with the selector, no replicas.
    eventually(long, "status of an empty workload", || async {
        let s = swls.get("web").await?.status;
        Ok(s.filter(|s| s.selector.as_deref() == Some("app=web") && s.replicas == 0))
    })
    .await?;

    // 0 -> 50 through the scale subresource, as `kubectl scale` does.
    let scale = serde_json::json!({ "spec": { "replicas": 50 } });
    swls.patch_scale(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&scale),
    )
    .await?;
    eventually(long, "50 available replicas", || async {
        let s = swls.get("web").await?.status.unwrap_or_default();
        Ok((s.available_replicas == 50 && s.replicas == 50).then_some(()))
    })
    .await?;
    let placed = vms.list(&ListParams::default()).await?.items;
    let per_node = usage(&placed);
    assert_eq!(
        per_node.len(),
        3,
        "replicas spread over every node: {per_node:?}"
    );
    for (cpu, _) in per_node.values() {
        assert!((16..=18).contains(cpu), "uneven spread: {per_node:?}");
    }

    // 50 -> 10.
    swls.patch_scale(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&serde_json::json!({ "spec": { "replicas": 10 } })),
    )
    .await?;
    eventually(long, "10 replicas", || async {
        let live: Vec<_> = replicas(&vms).await?.into_iter().filter(|r| !r.2).collect();
        Ok((live.len() == 10).then_some(()))
    })
    .await?;

    // Rolling update to a new image: availability never below 10 - maxUnavailable.
    let old_hash = replicas(&vms).await?[0].1.clone();
    let patch = serde_json::json!({ "spec": { "container": { "image": "web:2" } } });
    swls.patch(
        "web",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    let min_available = std::sync::atomic::AtomicI32::new(i32::MAX);
    eventually(
        Duration::from_secs(120),
        "the rollout to complete",
        || async {
            let swl = swls.get("web").await?;
            let s = swl.status.unwrap_or_default();
            min_available.fetch_min(s.available_replicas, std::sync::atomic::Ordering::Relaxed);
            let reps = replicas(&vms).await?;
            let done = s.observed_generation == swl.metadata.generation
                && s.updated_replicas == 10
                && s.available_replicas == 10
                && reps.iter().all(|r| r.1 != old_hash)
                && conditions::find(&s.conditions, conditions::PROGRESSING)
                    .is_some_and(|c| c.reason == "RolloutComplete");
            Ok(done.then_some(()))
        },
    )
    .await?;
    let min_available = min_available.into_inner();
    assert!(
        min_available >= 9,
        "availability dropped to {min_available} during the rollout"
    );

    // Deleting the workload deletes its replicas.
    swls.delete("web", &kube::api::DeleteParams::background())
        .await?;
    eventually(long, "replicas to be garbage-collected", || async {
        Ok(replicas(&vms).await?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

/// Whether `vm` has `uid` as its controller (with blockOwnerDeletion).
fn controlled_by(vm: &runv_crds::MicroVM, uid: &str) -> bool {
    vm.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true) && o.block_owner_deletion == Some(true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secureworkload_adopts_matching_orphans_and_releases_relabelled_replicas() -> Result<()> {
    use runv_operator::workload::replica::{HASH_LABEL, template_hash};
    let cluster = Cluster::start(&[("a", 32, "8Gi")], &["--leader-elect=false"]).await?;
    let swls: kube::Api<runv_crds::SecureWorkload> =
        kube::Api::namespaced(cluster.client.clone(), "default");
    let vms = cluster.microvms();
    let limit = Duration::from_secs(60);
    let swl = workload(3, "web:1");
    let hash = template_hash(&swl);

    // Two orphans the selector selects, on the current template. Once placed,
    // the operator's MicroVM cache holds them.
    let orphans = ["stray-0", "stray-1"];
    for name in orphans {
        let mut vm = microvm(name, 1, "128Mi", "Always");
        vm.metadata.labels = Some(
            [
                ("app".to_owned(), "web".to_owned()),
                (HASH_LABEL.to_owned(), hash.clone()),
            ]
            .into(),
        );
        vms.create(&PostParams::default(), &vm).await?;
    }
    common::wait_bound(&vms, 2, limit).await?;

    // A workload of 3 adopts both and creates one: never more than 3 MicroVMs.
    let uid = swls
        .create(&PostParams::default(), &swl)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    let most = std::sync::atomic::AtomicUsize::new(0);
    eventually(
        limit,
        "3 owned replicas, the orphans among them",
        || async {
            let list = vms.list(&ListParams::default()).await?.items;
            most.fetch_max(list.len(), std::sync::atomic::Ordering::Relaxed);
            let owned = list.iter().filter(|vm| controlled_by(vm, &uid)).count();
            let status = swls.get("web").await?.status.unwrap_or_default();
            Ok((list.len() == 3 && owned == 3 && status.replicas == 3).then_some(()))
        },
    )
    .await?;
    assert_eq!(most.into_inner(), 3, "a replica was created for an orphan");
    for name in orphans {
        assert!(
            controlled_by(&vms.get(name).await?, &uid),
            "{name} not adopted"
        );
    }

    // A created replica relabelled out of the selector is released, not
    // deleted, and replaced.
    let created = vms
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|vm| vm.metadata.name.unwrap_or_default())
        .find(|n| !orphans.contains(&n.as_str()))
        .expect("a created replica");
    vms.patch(
        &created,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            &serde_json::json!({ "metadata": { "labels": { "app": "debug" } } }),
        ),
    )
    .await?;
    eventually(
        limit,
        "the relabelled replica released and replaced",
        || async {
            let list = vms.list(&ListParams::default()).await?.items;
            let released = list
                .iter()
                .find(|vm| vm.metadata.name.as_deref() == Some(&created));
            let free = released.is_some_and(|vm| {
                vm.metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(Vec::is_empty)
                    && vm.metadata.deletion_timestamp.is_none()
            });
            let owned = list
                .iter()
                .filter(|vm| controlled_by(vm, &uid) && vm.metadata.deletion_timestamp.is_none())
                .count();
            let status = swls.get("web").await?.status.unwrap_or_default();
            Ok((free && owned == 3 && list.len() == 4 && status.replicas == 3).then_some(()))
        },
    )
    .await?;

    // An orphan created while the workload is settled is claimed at once (the
    // workload's own requeue is minutes away): adopted as a fourth replica, one
    // of the four is then scaled away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut late = microvm("stray-late", 1, "128Mi", "Always");
    late.metadata.labels = Some(
        [
            ("app".to_owned(), "web".to_owned()),
            (HASH_LABEL.to_owned(), hash.clone()),
        ]
        .into(),
    );
    vms.create(&PostParams::default(), &late).await?;
    eventually(
        Duration::from_secs(8),
        "the late orphan adopted or scaled away",
        || async {
            let list = vms.list(&ListParams::default()).await?.items;
            let late = list
                .iter()
                .find(|vm| vm.metadata.name.as_deref() == Some("stray-late"));
            let claimed = late.is_none_or(|vm| controlled_by(vm, &uid));
            let owned = list
                .iter()
                .filter(|vm| controlled_by(vm, &uid) && vm.metadata.deletion_timestamp.is_none())
                .count();
            Ok((claimed && owned == 3).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_marks_vms_unknown_then_fences_and_moves_always_vms() -> Result<()> {
    let cluster = Cluster::start(
        &[("n1", 8, "4Gi"), ("n2", 8, "4Gi")],
        // Auto-fencing on: n2's agent stays alive, so the peers agree n1 is lost.
        &[
            "--leader-elect=false",
            "--fence-after-seconds=4",
            "--auto-fence=true",
        ],
    )
    .await?;
    let api = cluster.microvms();
    // Fill n1 first by pinning nothing: place two VMs, note where each went.
    api.create(
        &PostParams::default(),
        &microvm("always", 1, "1Gi", "Always"),
    )
    .await?;
    api.create(&PostParams::default(), &microvm("once", 1, "1Gi", "Once"))
        .await?;
    let long = Duration::from_secs(60);
    let bound = |name: &'static str| {
        let api = api.clone();
        async move {
            eventually(long, "placement", || async {
                let vm = api.get(name).await?;
                Ok(vm.status.and_then(|s| s.node_name))
            })
            .await
        }
    };
    let always_node = bound("always").await?;
    let once_node = bound("once").await?;
    // The agent of the node running "always" dies.
    cluster.kill_agent(&always_node);
    eventually(long, "the VM to turn Unknown", || async {
        let vm = api.get("always").await?;
        let s = vm.status.unwrap_or_default();
        let ready = conditions::find(&s.conditions, conditions::READY);
        Ok(ready
            .filter(|c| c.status == "Unknown" && c.reason == "NodeLost")
            .map(|_| ()))
    })
    .await?;
    // After the fencing grace the node is tainted and the Always VM moves.
    let moved_to = eventually(long, "the Always VM to move", || async {
        let vm = api.get("always").await?;
        Ok(vm
            .status
            .and_then(|s| s.node_name)
            .filter(|n| *n != always_node))
    })
    .await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cluster.client.clone());
    let fenced = nodes.get(&always_node).await?;
    assert!(
        fenced
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "runv.dev/fenced"),
        "node {always_node} is fenced"
    );
    assert_ne!(moved_to, always_node);
    // A Once VM on the lost node stays there, Unknown.
    if once_node == always_node {
        let vm = api.get("once").await?;
        assert_eq!(
            vm.status.and_then(|s| s.node_name).as_deref(),
            Some(always_node.as_str())
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_node_with_a_live_agent_keeps_its_vm_until_the_agent_stops_it() -> Result<()> {
    use kube::api::{Patch, PatchParams};
    let cluster = Cluster::start(
        &[("n1", 8, "4Gi"), ("n2", 8, "4Gi")],
        &["--leader-elect=false"],
    )
    .await?;
    let api = cluster.microvms();
    api.create(
        &PostParams::default(),
        &microvm("always", 1, "1Gi", "Always"),
    )
    .await?;
    let long = Duration::from_secs(60);
    let node_of = || async { Ok(api.get("always").await?.status.and_then(|s| s.node_name)) };
    let first = eventually(long, "placement", node_of).await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(cluster.client.clone());
    let taint = serde_json::json!({ "spec": { "taints": [
        { "key": "runv.dev/fenced", "effect": "NoExecute" }
    ] } });
    nodes
        .patch(&first, &PatchParams::default(), &Patch::Merge(taint))
        .await?;
    // Its agent is alive and has not said the VM stopped: the VM may still
    // run there, so it stays (the operator is given time to act wrongly).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        node_of().await?,
        Some(first.clone()),
        "moved before the agent stopped it"
    );
    // The agent reports it stopped for the fence, as runv-agent does.
    let stopped = serde_json::json!({
        "apiVersion": "runv.dev/v1alpha1",
        "kind": "MicroVM",
        "status": {
            "phase": "Stopped",
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "NodeFenced",
                "message": "node carries the taint runv.dev/fenced",
                "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]
        }
    });
    api.patch_status(
        "always",
        &PatchParams::apply(runv_crds::contract::AGENT_MANAGER).force(),
        &Patch::Apply(stopped),
    )
    .await?;
    let moved_to = eventually(long, "the VM to move", || async {
        Ok(node_of().await?.filter(|n| *n != first))
    })
    .await?;
    assert_ne!(moved_to, first);
    Ok(())
}

/// Every MicroVM in `default`: name → (node, resourceVersion).
async fn snapshot(
    api: &kube::Api<runv_crds::MicroVM>,
) -> Result<std::collections::BTreeMap<String, (Option<String>, Option<String>)>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|vm| {
            (
                vm.metadata.name.clone().unwrap_or_default(),
                (
                    vm.status.and_then(|s| s.node_name),
                    vm.metadata.resource_version,
                ),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_acts_only_once_all_its_caches_are_filled() -> Result<()> {
    let nodes = [("a", 16, "8Gi"), ("b", 16, "8Gi")];
    let mut cluster = Cluster::start(&nodes, &["--leader-elect=false"]).await?;
    let swls: kube::Api<runv_crds::SecureWorkload> =
        kube::Api::namespaced(cluster.client.clone(), "default");
    let vms = cluster.microvms();
    swls.create(&PostParams::default(), &workload(3, "web:1"))
        .await?;
    vms.create(
        &PostParams::default(),
        &microvm("solo", 1, "256Mi", "Always"),
    )
    .await?;
    let long = Duration::from_secs(90);
    let settled = eventually(long, "the workload and the solo VM to run", || async {
        let s = swls.get("web").await?.status.unwrap_or_default();
        let complete = s.available_replicas == 3
            && conditions::find(&s.conditions, conditions::PROGRESSING)
                .is_some_and(|c| c.reason == "RolloutComplete");
        let solo = vms.get("solo").await?.status.unwrap_or_default();
        let running = solo.phase == Some(runv_crds::microvm::Phase::Running);
        Ok((complete && running).then_some(()))
    })
    .await;
    if let Err(e) = settled {
        let status = swls.get("web").await?.status;
        let states: Vec<_> = vms
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|vm| (vm.metadata.name, vm.status.and_then(|s| s.phase)))
            .collect();
        anyhow::bail!("{e}: workload status {status:?}; MicroVMs {states:?}");
    }
    // Let the last writes land, then take the operator down and note the state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop_operator();
    let before = snapshot(&vms).await?;
    assert_eq!(before.len(), 4, "{before:?}");
    assert!(
        before.values().all(|(node, _)| node.is_some()),
        "{before:?}"
    );
    let workload_rv = swls.get("web").await?.metadata.resource_version;

    // The new operator gets its SecureWorkloads at once, its MicroVMs next and
    // its Nodes and Leases last: a controller that acted on the caches it has
    // would see bound VMs on missing nodes (and move the Always ones) and a
    // workload with no replicas (and rewrite its status).
    let lists = ["/microvms", "/nodes", "/leases"];
    let proxy = common::GatedProxy::start(cluster.server.addr(), lists.to_vec()).await?;
    cluster.start_operator(&["--leader-elect=false"], &proxy.kubeconfig)?;
    let all_asked = || async {
        let asked = proxy.asked();
        Ok(lists.iter().all(|l| asked.contains(l)).then_some(()))
    };
    eventually(Duration::from_secs(30), "the operator to list", all_asked).await?;
    let answering = || async { Ok(cluster.readyz().await.ok()) };
    let code = eventually(Duration::from_secs(30), "/readyz to answer", answering).await?;
    assert_ne!(code, 200, "ready with none of its lists served");
    proxy.release("/microvms");
    let microvms_served = || async { Ok(proxy.served().contains(&"/microvms").then_some(())) };
    eventually(Duration::from_secs(30), "the MicroVM list", microvms_served).await?;
    // Give it time to act on the MicroVMs alone, as a broken operator would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        cluster.readyz().await?,
        200,
        "ready without Nodes and Leases"
    );
    assert_eq!(snapshot(&vms).await?, before, "acted on MicroVMs alone");
    proxy.release("/nodes");
    proxy.release("/leases");
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let served = proxy.served();
    assert!(lists.iter().all(|l| served.contains(l)), "{served:?}");
    // Give it time to act on anything it would act on.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = snapshot(&vms).await?;
    assert_eq!(before, after, "no MicroVM may be created, moved or written");
    assert_eq!(
        swls.get("web").await?.metadata.resource_version,
        workload_rv,
        "the workload's status is unchanged"
    );
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::all(cluster.client.clone());
    let moved: Vec<_> = events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Rescheduling"))
        .collect();
    assert!(moved.is_empty(), "{moved:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leader_releases_its_lease() -> Result<()> {
    let mut cluster = Cluster::start(&[("n1", 4, "4Gi")], &["--leader-elect=true"]).await?;
    let pid = cluster.operator_pid();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(cluster.client.clone(), common::NS);
    let holder = || async {
        Ok(leases
            .get_opt("runv-operator")
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    };
    let identity = eventually(Duration::from_secs(30), "a leader", holder).await?;
    // Without POD_NAME: the host name and a random suffix, not the process id
    // (which is 1 in every container).
    assert_ne!(identity, format!("runv-operator-{pid}"));
    assert!(identity.len() > 9, "{identity}");
    cluster.wait_ready(Duration::from_secs(30)).await?;
    let exit = cluster.terminate_operator(Duration::from_secs(20)).await?;
    assert!(exit.success(), "{exit}");
    // Released at once, not left to expire after its 15 s.
    assert_eq!(holder().await?, None);
    Ok(())
}
