//! Built-in kinds (Node, Lease, both Event APIs, Secret, Namespace),
//! ownerReferences garbage collection and persistence across restarts.

mod common;

use anyhow::{Result, ensure};
use common::{Env, bounded, code, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Node, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use runv_e2e::{Options, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn nodes_leases_secrets_and_both_event_apis() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let client = env.client();
        let nodes: Api<Node> = Api::all(client.clone());
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {"runv.dev/kvm": "true"}},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}}))?;
        nodes.create(&PostParams::default(), &n).await?;
        let st = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}});
        nodes.patch_status("n1", &PatchParams::default(), &Patch::Strategic(&st)).await?;
        let out = env.kubectl(&["get", "nodes", "-o", "wide"]).await?.ok()?;
        ensure!(out.contains("n1") && out.contains("True") && out.contains("10.0.0.1"), "{out}");
        ensure!(nodes.list(&ListParams::default().labels("runv.dev/kvm=true")).await?.items.len() == 1);

        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "n1"},
            "spec": {"holderIdentity": "agent-n1", "leaseDurationSeconds": 40, "renewTime": "2026-01-01T00:00:00.000000Z"}});
        leases.patch("n1", &PatchParams::apply("runv-node-agent"), &Patch::Apply(&lease)).await?;
        let got = leases.get("n1").await?;
        ensure!(got.spec.and_then(|s| s.holder_identity).as_deref() == Some("agent-n1"));
        let bad = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "bad"}, "spec": {"leaseDurationSeconds": 0}});
        let err = leases.create(&PostParams::default(), &serde_json::from_value(bad)?).await.expect_err("zero duration");
        ensure!(code(&err) == Some(422), "{err}");

        // events.k8s.io/v1 and core/v1 are two views of one store.
        let events: Api<Event> = Api::namespaced(client.clone(), "default");
        let e: Event = serde_json::from_value(json!({"metadata": {"name": "e1"}, "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "runv.dev/operator", "reportingInstance": "op-1", "action": "Boot", "reason": "Booted",
            "type": "Normal", "note": "guest booted", "regarding": {"kind": "MicroVM", "name": "hello", "namespace": "default"}}))?;
        events.create(&PostParams::default(), &e).await?;
        let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
        let c = core.get("e1").await?;
        ensure!(c.message.as_deref() == Some("guest booted") && c.involved_object.name.as_deref() == Some("hello"), "{c:?}");
        let sel = core.list(&ListParams::default().fields("involvedObject.name=hello,involvedObject.kind=MicroVM")).await?;
        ensure!(sel.items.len() == 1);
        ensure!(events.get("e1").await?.note.as_deref() == Some("guest booted"));

        let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"k": "hello"}}))?;
        let s = secrets.create(&PostParams::default(), &s).await?;
        ensure!(s.type_.as_deref() == Some("Opaque"));
        ensure!(s.data.and_then(|d| d.get("k").map(|v| v.0.clone())) == Some(b"hello".to_vec()));
        let out = env.kubectl(&["get", "secret", "s"]).await?.ok()?;
        ensure!(out.contains("Opaque"), "{out}");
        Ok(())
    })
    .await
}

fn owned_cm(name: &str, owner: &ConfigMap, block: bool) -> Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name, "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid,
        "blockOwnerDeletion": block}]}}),
    )?)
}

#[tokio::test(flavor = "multi_thread")]
async fn owner_references_cascade_in_background_foreground_and_orphan() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let cms: Api<ConfigMap> = Api::namespaced(env.client(), "default");
        let pp = PostParams::default();
        let exists = |name: &'static str| {
            let cms = cms.clone();
            async move { Ok::<_, anyhow::Error>(cms.get_opt(name).await?.is_some()) }
        };

        // Background: the owner goes at once, its dependent after.
        let owner = cms
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "bg"}}))?,
            )
            .await?;
        cms.create(&pp, &owned_cm("bg-dep", &owner, false)?).await?;
        cms.delete("bg", &DeleteParams::background()).await?;
        eventually("background deletion of the dependent", || async {
            Ok(!exists("bg-dep").await?)
        })
        .await?;

        // Foreground: the owner waits, with a deletionTimestamp, until blocking dependents are gone.
        let owner = cms
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "fg"}}))?,
            )
            .await?;
        let mut dep = owned_cm("fg-dep", &owner, true)?;
        dep.metadata.finalizers = Some(vec!["runv.dev/hold".into()]);
        cms.create(&pp, &dep).await?;
        let res = cms.delete("fg", &DeleteParams::foreground()).await?;
        ensure!(res.is_left(), "foreground delete returned a Status");
        eventually("dependent marked for deletion", || async {
            Ok(cms
                .get("fg-dep")
                .await?
                .metadata
                .deletion_timestamp
                .is_some())
        })
        .await?;
        let o = cms.get("fg").await?;
        ensure!(
            o.metadata.deletion_timestamp.is_some()
                && o.metadata
                    .finalizers
                    .iter()
                    .flatten()
                    .any(|f| f == "foregroundDeletion")
        );
        cms.patch(
            "fg-dep",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
        )
        .await?;
        eventually("owner deleted after its dependent", || async {
            Ok(!exists("fg").await? && !exists("fg-dep").await?)
        })
        .await?;

        // Orphan: the dependent stays, without the reference.
        let owner = cms
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "or"}}))?,
            )
            .await?;
        cms.create(&pp, &owned_cm("or-dep", &owner, false)?).await?;
        cms.delete("or", &DeleteParams::orphan()).await?;
        eventually("owner deleted", || async { Ok(!exists("or").await?) }).await?;
        let d = cms.get("or-dep").await?;
        ensure!(d.metadata.owner_references.unwrap_or_default().is_empty());

        // A namespace is emptied, then removed.
        let nss: Api<Namespace> = Api::all(env.client());
        nss.create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "tmp"}}))?,
        )
        .await?;
        let in_tmp: Api<ConfigMap> = Api::namespaced(env.client(), "tmp");
        in_tmp
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await?;
        let err = nss
            .delete("default", &DeleteParams::default())
            .await
            .expect_err("default is protected");
        ensure!(code(&err) == Some(403), "{err}");
        nss.delete("tmp", &DeleteParams::default()).await?;
        eventually("namespace removed", || async {
            Ok(nss.get_opt("tmp").await?.is_none())
        })
        .await?;
        ensure!(in_tmp.get_opt("x").await?.is_none());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_a_restart() -> Result<()> {
    bounded(async {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("state.json");
        let opts = || Options {
            state_file: Some(file.clone()),
            ..Options::default()
        };
        let mut first = opts();
        for crd in runv_crds::generate::crds() {
            first.preload.push(serde_json::to_value(crd)?);
        }
        let server = TestServer::start(first).await?;
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(server.client()?, "default", &common::microvm_resource());
        let created = common::create_microvm(&api, "keep").await?;
        server.shutdown().await?;

        let server = TestServer::start(opts()).await?;
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(server.client()?, "default", &common::microvm_resource());
        let got = api.get("keep").await?;
        ensure!(
            got.metadata.uid == created.metadata.uid && common::rv(&got) == common::rv(&created)
        );
        let next = common::create_microvm(&api, "next").await?;
        ensure!(
            common::rv(&next).parse::<u64>()? > common::rv(&got).parse::<u64>()?,
            "resourceVersion went back"
        );
        server.shutdown().await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn field_selectors_read_fields_as_the_kinds_field_sets_do() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let client = env.client();
        let nodes: Api<Node> = Api::all(client.clone());
        for (name, spec) in [("plain", json!({})), ("cordoned", json!({"unschedulable": true}))] {
            let n: Node = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
            nodes.create(&PostParams::default(), &n).await?;
        }
        let names = |l: kube::core::ObjectList<Node>| l.items.into_iter().filter_map(|o| o.metadata.name).collect::<Vec<_>>();
        // An absent spec.unschedulable reads as "false", as upstream's node field set.
        ensure!(names(nodes.list(&ListParams::default().fields("spec.unschedulable=false")).await?) == ["plain"]);
        ensure!(names(nodes.list(&ListParams::default().fields("spec.unschedulable!=false")).await?) == ["cordoned"]);

        // A core Event's `source` is source.component, else reportingComponent.
        let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
        for (name, extra) in [
            ("by-source", json!({"source": {"component": "kubelet", "host": "n1"}})),
            ("by-reporter", json!({"reportingComponent": "runv.dev/operator", "reportingInstance": "op-1"})),
        ] {
            let mut ev = json!({"metadata": {"name": name}, "involvedObject": {"kind": "Node", "name": "n1"},
                "reason": "R", "message": "m", "type": "Normal"});
            for (k, v) in extra.as_object().into_iter().flatten() {
                ev[k] = v.clone();
            }
            core.create(&PostParams::default(), &serde_json::from_value(ev)?).await?;
        }
        let evnames = |l: kube::core::ObjectList<CoreEvent>| l.items.into_iter().filter_map(|o| o.metadata.name).collect::<Vec<_>>();
        ensure!(evnames(core.list(&ListParams::default().fields("source=kubelet")).await?) == ["by-source"]);
        ensure!(evnames(core.list(&ListParams::default().fields("source=runv.dev/operator")).await?) == ["by-reporter"]);
        // Unsupported fields and unescaped separators are refused.
        let err = nodes.list(&ListParams::default().fields("spec.podCIDR=x")).await.expect_err("unsupported");
        ensure!(code(&err) == Some(400) && err.to_string().contains("field label not supported: spec.podCIDR"), "{err}");
        let err = nodes.list(&ListParams::default().fields("metadata.name")).await.expect_err("no operator");
        ensure!(code(&err) == Some(400) && err.to_string().contains("can't understand 'metadata.name'"), "{err}");
        Ok(())
    })
    .await
}
