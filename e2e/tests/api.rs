//! Conformance through kube-rs: CRUD with resourceVersion conflicts, status
//! subresource isolation, generation, watch semantics, selectors,
//! pagination, server-side apply, defaulting and pruning.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Env, bounded, code, create_microvm, rv};
use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::watcher;
use runv_e2e::Options;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn crud_with_resource_versions_and_conflicts() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let created = create_microvm(&api, "a").await?;
        ensure!(created.metadata.uid.is_some() && created.metadata.generation == Some(1));
        ensure!(created.metadata.creation_timestamp.is_some());
        let err = create_microvm(&api, "a")
            .await
            .expect_err("duplicate create");
        ensure!(
            err.downcast_ref::<kube::Error>().and_then(code) == Some(409),
            "{err}"
        );
        let got = api.get("a").await?;
        ensure!(rv(&got) == rv(&created));
        let mut changed = got.clone();
        changed.data["spec"]["resources"]["vcpus"] = json!(2);
        let updated = api.replace("a", &PostParams::default(), &changed).await?;
        ensure!(rv(&updated).parse::<u64>()? > rv(&got).parse::<u64>()?);
        ensure!(updated.metadata.generation == Some(2));
        // The stale version is refused.
        let err = api
            .replace("a", &PostParams::default(), &changed)
            .await
            .expect_err("stale update");
        ensure!(code(&err) == Some(409), "{err}");
        // Custom resources need a resourceVersion on update.
        let mut unversioned = updated.clone();
        unversioned.metadata.resource_version = None;
        let err = api
            .replace("a", &PostParams::default(), &unversioned)
            .await
            .expect_err("unversioned update");
        ensure!(code(&err) == Some(422), "{err}");
        let list = api.list(&ListParams::default()).await?;
        ensure!(list.items.len() == 1 && list.metadata.resource_version.is_some());
        let err = api.get("missing").await.expect_err("missing");
        ensure!(code(&err) == Some(404), "{err}");
        let deleted = api.delete("a", &DeleteParams::default()).await?;
        ensure!(deleted.is_right(), "immediate delete returns a Status");
        ensure!(code(&api.get("a").await.expect_err("gone")) == Some(404));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn status_subresource_is_isolated_both_ways() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let mut obj: DynamicObject = serde_json::from_value(common::microvm("s"))?;
        obj.data["status"] = json!({"phase": "Running"});
        let created = api.create(&PostParams::default(), &obj).await?;
        ensure!(
            created.data.get("status").is_none(),
            "create kept status: {:?}",
            created.data
        );
        let after = api
            .patch_status(
                "s",
                &PatchParams::default(),
                &Patch::Merge(&json!({
            "spec": {"resources": {"vcpus": 9}}, "status": {"phase": "Running"}})),
            )
            .await?;
        ensure!(after.data["status"]["phase"] == "Running");
        ensure!(
            after.data["spec"]["resources"]["vcpus"] == 1,
            "status write changed spec"
        );
        ensure!(
            after.metadata.generation == Some(1),
            "status write bumped generation"
        );
        let after = api
            .patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(&json!({
            "spec": {"resources": {"vcpus": 2}}, "status": {"phase": "Failed"}})),
            )
            .await?;
        ensure!(
            after.data["status"]["phase"] == "Running",
            "main write changed status"
        );
        ensure!(after.metadata.generation == Some(2));
        // Metadata-only changes keep the generation.
        let after = api
            .patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await?;
        ensure!(after.metadata.generation == Some(2));
        let status = api.get_status("s").await?;
        ensure!(status.data["status"]["phase"] == "Running");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_gone_bookmarks_timeout_and_initial_state() -> Result<()> {
    bounded(async {
        let opts = Options {
            history: 5,
            bookmark_interval: Duration::from_millis(200),
            ..Options::default()
        };
        let env = Env::with(opts, true).await?;
        let api = env.microvms();
        let first = create_microvm(&api, "g0").await?;
        for i in 1..10 {
            create_microvm(&api, &format!("g{i}")).await?;
        }
        // Compacted: one ERROR event with 410 Expired.
        let mut stream = api
            .watch(&WatchParams::default().timeout(5), &rv(&first))
            .await?
            .boxed();
        match stream.try_next().await? {
            Some(WatchEvent::Error(e)) => ensure!(e.code == 410 && e.reason == "Expired", "{e:?}"),
            other => anyhow::bail!("expected 410, got {other:?}"),
        }
        // No version: the current objects as ADDED first.
        let mut stream = api
            .watch(&WatchParams::default().timeout(2), "0")
            .await?
            .boxed();
        let mut added = 0;
        while let Some(WatchEvent::Added(_)) = stream.try_next().await? {
            added += 1;
            if added == 10 {
                break;
            }
        }
        ensure!(added == 10);
        // Bookmarks arrive, and the stream ends at timeoutSeconds.
        let list = api.list(&ListParams::default()).await?;
        let latest = list.metadata.resource_version.unwrap_or_default();
        let start = std::time::Instant::now();
        let events: Vec<_> = api
            .watch(&WatchParams::default().timeout(1), &latest)
            .await?
            .try_collect()
            .await?;
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "timeoutSeconds ignored"
        );
        ensure!(
            events.iter().any(|e| matches!(e, WatchEvent::Bookmark(_))),
            "{events:?}"
        );
        // kube-runtime's watcher (list + watch) sees later changes.
        let w = watcher(api.clone(), watcher::Config::default().labels("pick=me"));
        let api2 = api.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            api2.patch(
                "g7",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"pick": "me"}}})),
            )
            .await
        });
        let mut w = w.boxed();
        let name = loop {
            match w.try_next().await? {
                Some(watcher::Event::Apply(o)) | Some(watcher::Event::InitApply(o)) => {
                    break o.metadata.name.unwrap_or_default();
                }
                Some(_) => continue,
                None => anyhow::bail!("watcher ended"),
            }
        };
        writer.await??;
        ensure!(name == "g7");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn selectors_and_pagination() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        for i in 0..7 {
            let mut vm = common::microvm(&format!("p{i}"));
            vm["metadata"]["labels"] = json!({"parity": if i % 2 == 0 { "even" } else { "odd" }});
            api.create(&PostParams::default(), &serde_json::from_value(vm)?)
                .await?;
        }
        api.patch_status(
            "p3",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"nodeName": "n1"}})),
        )
        .await?;
        let names = |l: kube::core::ObjectList<DynamicObject>| {
            l.items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect::<Vec<_>>()
        };
        ensure!(
            names(
                api.list(&ListParams::default().labels("parity=odd"))
                    .await?
            ) == ["p1", "p3", "p5"]
        );
        ensure!(
            names(
                api.list(&ListParams::default().labels("parity in (even),parity!=odd"))
                    .await?
            )
            .len()
                == 4
        );
        ensure!(
            names(
                api.list(&ListParams::default().fields("metadata.name=p2"))
                    .await?
            ) == ["p2"]
        );
        ensure!(
            names(
                api.list(&ListParams::default().fields("status.nodeName=n1"))
                    .await?
            ) == ["p3"]
        );
        let err = api
            .list(&ListParams::default().fields("spec.powerState=Running"))
            .await
            .expect_err("unselectable field");
        ensure!(code(&err) == Some(400), "{err}");
        // Pages of 3 cover all 7 once, at one resourceVersion.
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        let mut versions = Vec::new();
        for _ in 0..5 {
            let mut lp = ListParams::default().limit(3);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = api.list(&lp).await?;
            versions.push(page.metadata.resource_version.clone());
            token = page.metadata.continue_.clone().filter(|t| !t.is_empty());
            all.extend(names(page));
            if token.is_none() {
                break;
            }
            // A write between pages does not show in the snapshot.
            create_microvm(&api, &format!("late{}", all.len())).await?;
        }
        ensure!(all == ["p0", "p1", "p2", "p3", "p4", "p5", "p6"], "{all:?}");
        ensure!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
        let err = api
            .list(&ListParams::default().limit(1).continue_token("999:1"))
            .await
            .expect_err("bad token");
        ensure!(code(&err) == Some(410), "{err}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_with_managed_fields_conflicts_and_force() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let cfg = common::microvm("ssa");
        let a = api.patch("ssa", &PatchParams::apply("alice"), &Patch::Apply(&cfg)).await?;
        let managers: Vec<_> = a.metadata.managed_fields.iter().flatten().map(|m| (m.manager.clone(), m.operation.clone())).collect();
        ensure!(managers == [(Some("alice".into()), Some("Apply".into()))], "{managers:?}");
        let again = api.patch("ssa", &PatchParams::apply("alice"), &Patch::Apply(&cfg)).await?;
        ensure!(rv(&again) == rv(&a), "identical apply wrote");
        let mut bob = json!({"apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM", "metadata": {"name": "ssa"},
            "spec": {"resources": {"vcpus": 4}}});
        let err = api.patch("ssa", &PatchParams::apply("bob"), &Patch::Apply(&bob)).await.expect_err("conflict");
        ensure!(code(&err) == Some(409), "{err}");
        ensure!(err.to_string().contains("alice") && err.to_string().contains(".spec.resources.vcpus"), "{err}");
        let forced = api.patch("ssa", &PatchParams::apply("bob").force(), &Patch::Apply(&bob)).await?;
        ensure!(forced.data["spec"]["resources"]["vcpus"] == 4);
        ensure!(forced.data["spec"]["resources"]["memory"] == "64Mi", "alice's field lost");
        // Bob stops applying a field he owns alone: it goes (and the default comes back).
        bob["spec"] = json!({"runPolicy": "Always"});
        let dropped = api.patch("ssa", &PatchParams::apply("bob"), &Patch::Apply(&bob)).await?;
        ensure!(dropped.data["spec"]["resources"]["vcpus"] == 1, "{:?}", dropped.data["spec"]);
        // Controllers write status with apply on the status subresource.
        let status = json!({"apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM", "metadata": {"name": "ssa"},
            "status": {"phase": "Running", "observedGeneration": 1}});
        let s = api.patch_status("ssa", &PatchParams::apply("runv-operator").force(), &Patch::Apply(&status)).await?;
        ensure!(s.data["status"]["phase"] == "Running");
        let entry = s.metadata.managed_fields.iter().flatten().find(|m| m.manager.as_deref() == Some("runv-operator")).context("operator entry")?;
        ensure!(entry.subresource.as_deref() == Some("status"));
        // Apply creates, and needs a field manager.
        let err = api.patch("new", &PatchParams::default(), &Patch::Apply(&common::microvm("new"))).await.expect_err("no manager");
        ensure!(code(&err) == Some(422), "{err}");
        api.patch("new", &PatchParams::apply("alice"), &Patch::Apply(&common::microvm("new"))).await?;
        // JSON patch and a failing test operation.
        let p: json_patch::Patch = serde_json::from_value(json!([{"op": "replace", "path": "/spec/runPolicy", "value": "Manual"}]))?;
        let j = api.patch("new", &PatchParams::default(), &Patch::<()>::Json(p)).await?;
        ensure!(j.data["spec"]["runPolicy"] == "Manual");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn defaults_and_pruning_of_custom_resources() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let mut vm = common::microvm("d");
        vm["spec"]["unknownField"] = json!(true);
        vm["spec"]["resources"] = json!({"vcpus": 2});
        let o = api
            .create(&PostParams::default(), &serde_json::from_value(vm)?)
            .await?;
        ensure!(o.data["spec"].get("unknownField").is_none(), "not pruned");
        ensure!(
            o.data["spec"]["resources"]["memory"] == "128Mi",
            "not defaulted: {:?}",
            o.data["spec"]
        );
        ensure!(o.data["spec"]["powerState"] == "Running");
        let err = api
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"apiVersion": "runv.dev/v1alpha1", "kind": "MicroVM",
                "metadata": {"name": "nokernel"}, "spec": {"boot": {}}}),
                )?,
            )
            .await
            .expect_err("missing required field");
        ensure!(
            code(&err) == Some(422) && err.to_string().contains("spec.boot.kernel"),
            "{err}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_status_errors() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let http = |method: &str, path: &str, ct: &str, accept: &str, body: &str| {
            http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", ct)
                .header("accept", accept)
                .body(body.as_bytes().to_vec())
        };
        let client = env.client();
        for (method, path, ct, accept, want) in [
            (
                "GET",
                "/apis/nope.dev/v1/things",
                "application/json",
                "application/json",
                404,
            ),
            ("GET", "/api/v1/namespaces/default/configmaps/x?watch=true", "application/json", "application/json", 501),
            ("GET", "/api/v1/watch/namespaces/default/configmaps", "application/json", "application/json", 404),
            (
                "POST",
                "/api/v1/namespaces/default/configmaps/x",
                "application/json",
                "application/json",
                405,
            ),
            (
                "GET",
                "/api/v1/namespaces/default/configmaps",
                "application/json",
                "application/vnd.kubernetes.protobuf",
                406,
            ),
            (
                "POST",
                "/api/v1/namespaces/default/configmaps",
                "application/vnd.kubernetes.protobuf",
                "application/json",
                415,
            ),
            (
                "GET",
                "/api/v1/namespaces/default/configmaps?fieldSelector=data.x%3D1",
                "application/json",
                "application/json",
                400,
            ),
        ] {
            let req = http(method, path, ct, accept, "{}")?;
            let res = client.send(req.map(Into::into)).await?;
            ensure!(
                res.status().as_u16() == want,
                "{method} {path}: {}",
                res.status()
            );
            let body =
                axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 20).await?;
            let status: serde_json::Value = serde_json::from_slice(&body)?;
            ensure!(
                status["kind"] == "Status" && status["code"] == want,
                "{status}"
            );
        }
        // Malformed objects are refused with 4xx, and the server keeps serving.
        for (method, path, ct, body) in [
            ("POST", "/api/v1/namespaces", "application/json", r#"{"metadata":{"name":"x","labels":"oops"}}"#),
            ("POST", "/api/v1/namespaces", "application/json", r#"{"metadata":{"name":"y"},"spec":7}"#),
            ("POST", "/api/v1/namespaces/default/secrets", "application/json", r#"{"metadata":{"name":"s"},"data":"x","stringData":{"a":"b"}}"#),
            ("POST", "/api/v1/namespaces/default/configmaps", "application/json", r#"{"metadata":"x"}"#),
            ("POST", "/api/v1/namespaces/default/configmaps", "application/json", r#"[1,2]"#),
            ("POST", "/api/v1/namespaces/default/configmaps", "application/vnd.kubernetes.protobuf", "k8s\u{0}\u{a}\u{ff}"),
            ("PATCH", "/api/v1/namespaces/default", "application/json-patch+json", r#"[{"op":"replace","path":"/metadata","value":3}]"#),
            ("PATCH", "/api/v1/namespaces/default", "application/apply-patch+yaml", "{{{"),
            ("PATCH", "/apis/runv.dev/v1alpha1/namespaces/default/microvms/none", "application/merge-patch+json", "{}"),
            ("POST", "/apis/runv.dev/v1alpha1/namespaces/default/microvms", "application/json", r#"{"apiVersion":"runv.dev/v1alpha1","kind":"MicroVM","metadata":{"name":"m"},"spec":"x"}"#),
        ] {
            let req = http(method, path, ct, "application/json", body)?;
            let res = client.send(req.map(Into::into)).await?;
            let c = res.status().as_u16();
            ensure!((400..500).contains(&c), "{method} {path} {body}: {c}");
        }
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let err = nss
            .patch_status("default", &PatchParams::default(), &Patch::Merge(&json!({"status": "weird"})))
            .await
            .expect_err("status must be an object");
        ensure!(code(&err) == Some(400), "{err}");
        ensure!(nss.list(&ListParams::default()).await?.items.len() == 4);
        // Creating in a missing namespace.
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "nowhere");
        let err = cms
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await
            .expect_err("no namespace");
        ensure!(
            code(&err) == Some(404) && err.to_string().contains("namespaces \"nowhere\" not found"),
            "{err}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_in_both_forms() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        // kube-rs walks the per group-version lists.
        let discovery = kube::discovery::Discovery::new(env.client()).run().await?;
        let group = discovery.get("runv.dev").context("runv.dev not discovered")?;
        let (swl, caps) = group
            .recommended_resources()
            .into_iter()
            .find(|(r, _)| r.kind == "SecureWorkload")
            .context("no SecureWorkload")?;
        ensure!(swl.plural == "secureworkloads" && caps.scope == kube::discovery::Scope::Namespaced);
        ensure!(caps.subresources.iter().any(|(s, _)| s.plural == "scale" && s.kind == "Scale"), "{caps:?}");
        ensure!(discovery.get("coordination.k8s.io").is_some() && discovery.get("events.k8s.io").is_some());
        // Binaries find the server through the kubeconfig, as with KUBECONFIG.
        let kc = kube::config::Kubeconfig::read_from(env.server.kubeconfig_path())?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        ensure!(config.default_namespace == "default");
        let via_file = kube::Client::try_from(config)?;
        let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(via_file);
        ensure!(nss.list(&ListParams::default()).await?.items.len() == 4);
        // kubectl asks for aggregated discovery first.
        let req = http::Request::builder()
            .uri("/apis")
            .header("accept", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json")
            .body(Vec::new())?;
        let res = env.client().send(req.map(Into::into)).await?;
        let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        ensure!(ct.contains("as=APIGroupDiscoveryList"), "{ct}");
        let body = axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 20).await?;
        let list: serde_json::Value = serde_json::from_slice(&body)?;
        let runv = list["items"].as_array().into_iter().flatten().find(|g| g["metadata"]["name"] == "runv.dev").context("runv.dev group")?;
        let mvm = &runv["versions"][0]["resources"].as_array().into_iter().flatten().find(|r| r["resource"] == "microvms").cloned().context("microvms")?;
        ensure!(mvm["shortNames"] == json!(["mvm"]) && mvm["subresources"][0]["subresource"] == "status", "{mvm}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_and_status_replace_through_kube() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let swl_yaml =
            std::fs::read_to_string(common::repo().join("examples/secureworkload.yaml"))?;
        let doc: serde_json::Value = serde_yaml_ng::from_str(&swl_yaml)?;
        let name = doc["metadata"]["name"]
            .as_str()
            .context("example name")?
            .to_string();
        let api = env.workloads();
        api.create(&PostParams::default(), &serde_json::from_value(doc)?)
            .await?;
        let scale = api.get_scale(&name).await?;
        let before = scale
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .context("spec.replicas")?;
        let scale = api
            .patch_scale(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": before + 2}})),
            )
            .await?;
        ensure!(scale.spec.and_then(|s| s.replicas) == Some(before + 2));
        let mut s = api.get_scale(&name).await?;
        s.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(1) });
        api.replace_scale(&name, &PostParams::default(), &s).await?;
        // A stale Scale is refused like any stale write.
        let err = api
            .replace_scale(&name, &PostParams::default(), &s)
            .await
            .expect_err("stale scale");
        ensure!(code(&err) == Some(409), "{err}");
        let obj = api.get(&name).await?;
        ensure!(
            obj.data["spec"]["replicas"] == 1 && obj.metadata.generation == Some(3),
            "{:?}",
            obj.metadata.generation
        );
        // PUT /status replaces only status.
        let mut st = obj.clone();
        st.data["status"] = json!({"replicas": 1, "readyReplicas": 1, "observedGeneration": 3});
        st.data["spec"]["replicas"] = json!(7);
        let after = api
            .replace_status(&name, &PostParams::default(), &st)
            .await?;
        ensure!(
            after.data["status"]["readyReplicas"] == 1 && after.data["spec"]["replicas"] == 1,
            "{:?}",
            after.data
        );
        ensure!(api.get_scale(&name).await?.status.map(|s| s.replicas) == Some(1));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_selectors_and_streaming_lists() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        create_microvm(&api, "x").await?;
        create_microvm(&api, "y").await?;
        let list = api.list(&ListParams::default()).await?;
        let from = list.metadata.resource_version.unwrap_or_default();
        // An object entering and leaving the selection shows as ADDED then DELETED.
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"sel": "on"}}})),
        )
        .await?;
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"sel": "off"}}})),
        )
        .await?;
        api.patch(
            "y",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"other": "1"}}})),
        )
        .await?;
        let stream = api
            .watch(&WatchParams::default().labels("sel=on").timeout(1), &from)
            .await?;
        let events: Vec<_> = stream.try_collect().await?;
        let kinds: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Added(o) if o.metadata.name.as_deref() == Some("x") => Some("ADDED"),
                WatchEvent::Deleted(o) if o.metadata.name.as_deref() == Some("x") => {
                    Some("DELETED")
                }
                WatchEvent::Bookmark(_) => None,
                _ => Some("other"),
            })
            .collect();
        ensure!(kinds == ["ADDED", "DELETED"], "{events:?}");
        // Streaming lists: the current objects, then the initial-events-end bookmark.
        let stream = api
            .watch(&WatchParams::streaming_lists().timeout(2), "")
            .await?;
        let events: Vec<_> = stream.take(3).try_collect().await?;
        ensure!(
            matches!(&events[0], WatchEvent::Added(_))
                && matches!(&events[1], WatchEvent::Added(_)),
            "{events:?}"
        );
        match &events[2] {
            WatchEvent::Bookmark(b) => ensure!(
                b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str)
                    == Some("true"),
                "{:?}",
                b.metadata.annotations
            ),
            other => anyhow::bail!("expected the initial-events-end bookmark, got {other:?}"),
        }
        Ok(())
    })
    .await
}

/// Sends one raw request, without kube-rs's retries of 429/503/504; returns
/// the status code and the JSON body (or the first line of a watch stream),
/// `null` when it is not JSON.
async fn raw(
    env: &Env,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
) -> Result<(u16, serde_json::Value)> {
    let mut config = kube::Config::new(env.server.url().parse()?);
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .header("accept", "application/json")
        .body(body.as_bytes().to_vec())?;
    let res = client.send(req.map(Into::into)).await?;
    let code = res.status().as_u16();
    let bytes = axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 22).await?;
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    Ok((code, serde_json::from_slice(first).unwrap_or_default()))
}

async fn get(env: &Env, path: &str) -> Result<(u16, serde_json::Value)> {
    raw(env, "GET", path, "application/json", "").await
}

fn message(v: &serde_json::Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

const VMS: &str = "/apis/runv.dev/v1alpha1/namespaces/default/microvms";

#[tokio::test(flavor = "multi_thread")]
async fn all_namespaces_path_serves_only_list_and_watch() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        create_microvm(&api, "keep").await?;
        for method in ["DELETE", "POST"] {
            let body = serde_json::to_string(&common::microvm("other"))?;
            let (c, s) = raw(
                &env,
                method,
                "/apis/runv.dev/v1alpha1/microvms",
                "application/json",
                &body,
            )
            .await?;
            ensure!(
                c == 405 && s["kind"] == "Status" && s["reason"] == "MethodNotAllowed",
                "{method}: {c} {s}"
            );
        }
        ensure!(api.list(&ListParams::default()).await?.items.len() == 1);
        let (c, s) = get(&env, "/apis/runv.dev/v1alpha1/microvms").await?;
        ensure!(
            c == 200 && s["items"].as_array().map(Vec::len) == Some(1),
            "{c} {s}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_options_are_validated_like_the_api_server() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        create_microvm(&api, "d").await?;
        let path = format!("{VMS}/d");
        let (c, s) = raw(
            &env,
            "DELETE",
            &path,
            "application/json",
            r#"{"propagationPolicy":"Orphan","orphanDependents":true}"#,
        )
        .await?;
        ensure!(
            c == 422
                && s["details"]["kind"] == "DeleteOptions"
                && s["details"]["group"] == "meta.k8s.io",
            "{c} {s}"
        );
        ensure!(
            message(&s).contains("orphanDependents and deletionPropagation cannot be both set"),
            "{s}"
        );
        let (c, s) = raw(
            &env,
            "DELETE",
            &path,
            "application/json",
            r#"{"propagationPolicy":"Sometimes"}"#,
        )
        .await?;
        ensure!(
            c == 422 && message(&s).contains("Unsupported value: \"Sometimes\""),
            "{c} {s}"
        );
        let (c, s) = raw(
            &env,
            "DELETE",
            &path,
            "application/json",
            r#"{"gracePeriodSeconds":"soon"}"#,
        )
        .await?;
        ensure!(
            c == 400 && message(&s).contains("gracePeriodSeconds"),
            "{c} {s}"
        );
        let (c, s) = raw(
            &env,
            "DELETE",
            &format!("{path}?gracePeriodSeconds=x"),
            "application/json",
            "",
        )
        .await?;
        ensure!(c == 400, "{c} {s}");
        api.get("d")
            .await
            .context("refused deletes keep the object")?;
        // Any integer grace period is accepted (a negative one counts as 1 upstream);
        // it has no effect on these kinds.
        let (c, s) = raw(
            &env,
            "DELETE",
            &path,
            "application/json",
            r#"{"gracePeriodSeconds":-5}"#,
        )
        .await?;
        ensure!(c == 200 && s["status"] == "Success", "{c} {s}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn list_options_and_resource_versions_are_validated() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        create_microvm(&api, "r").await?;
        for (query, want, text) in [
            ("resourceVersionMatch=Exact", 422, "resourceVersionMatch is forbidden unless resourceVersion is provided"),
            ("resourceVersionMatch=NotOlderThan", 422, "resourceVersionMatch is forbidden unless resourceVersion is provided"),
            ("resourceVersionMatch=Sometimes&resourceVersion=1", 422, "Unsupported value: \"Sometimes\""),
            ("resourceVersionMatch=Exact&resourceVersion=0", 422, "forbidden for resourceVersion \"0\""),
            ("resourceVersionMatch=Exact&resourceVersion=abc", 400, "invalid resource version"),
            ("resourceVersion=abc", 400, "invalid resource version"),
            ("sendInitialEvents=true", 422, "sendInitialEvents is forbidden for list"),
            ("watch=true&resourceVersionMatch=NotOlderThan", 422, "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"),
            ("watch=true&sendInitialEvents=true", 422, "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"),
            ("watch=true&resourceVersion=abc", 400, "invalid resource version"),
            ("limit=1&continue=1:1:1&resourceVersion=5", 400, "specifying resource version is not allowed when using continue"),
            ("timeoutSeconds=x&watch=true", 400, "timeoutSeconds"),
        ] {
            let (c, s) = get(&env, &format!("{VMS}?{query}")).await?;
            ensure!(c == want && s["kind"] == "Status" && message(&s).contains(text), "{query}: {c} {s}");
            if want == 422 {
                ensure!(s["details"]["kind"] == "ListOptions" && s["details"]["group"] == "meta.k8s.io", "{s}");
            }
        }
        // A version the store has not reached: a short wait, then 504.
        let (_, list) = get(&env, VMS).await?;
        let current: u64 = list["metadata"]["resourceVersion"].as_str().unwrap_or_default().parse()?;
        let started = std::time::Instant::now();
        let (c, s) = get(&env, &format!("{VMS}?resourceVersion={}&resourceVersionMatch=NotOlderThan", current + 1000)).await?;
        ensure!(started.elapsed() >= Duration::from_millis(2500), "answered too early");
        ensure!(c == 504 && s["reason"] == "Timeout", "{c} {s}");
        ensure!(s["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge", "{s}");
        ensure!(message(&s).starts_with("Timeout: Too large resource version"), "{s}");
        // The same list succeeds when a write reaches the version meanwhile.
        let writer = {
            let api = api.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                create_microvm(&api, "r2").await
            })
        };
        let (c, s) = get(&env, &format!("{VMS}?resourceVersion={}", current + 1)).await?;
        writer.await??;
        ensure!(c == 200 && s["items"].as_array().map(Vec::len) == Some(2), "{c} {s}");
        // A streaming list that asks for a future version ends with one ERROR event.
        let (c, s) = get(
            &env,
            &format!("{VMS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion={}", current + 1000),
        )
        .await?;
        ensure!(c == 200 && s["type"] == "ERROR" && s["object"]["code"] == 504, "{c} {s}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_timeout_zero_means_the_server_default() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let req = http::Request::builder()
            .uri(format!("{VMS}?watch=true&timeoutSeconds=0"))
            .body(Vec::new())?;
        let res = env.client().send(req.map(Into::into)).await?;
        ensure!(res.status().as_u16() == 200);
        let mut stream = axum::body::Body::new(res.into_body()).into_data_stream();
        tokio::time::sleep(Duration::from_millis(300)).await;
        create_microvm(&api, "w").await?;
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("the watch stayed open but sent nothing")?
            .context("the watch ended at once")??;
        let text = String::from_utf8_lossy(&chunk);
        ensure!(
            text.contains("\"ADDED\"") && text.contains("\"w\""),
            "{text}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn continue_tokens_can_be_retried_and_take_the_request_selectors() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        for i in 0..6 {
            let mut vm = common::microvm(&format!("c{i}"));
            vm["metadata"]["labels"] = json!({"n": i.to_string()});
            api.create(&PostParams::default(), &serde_json::from_value(vm)?)
                .await?;
        }
        let names = |l: kube::core::ObjectList<DynamicObject>| {
            l.items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect::<Vec<_>>()
        };
        let first = api.list(&ListParams::default().limit(2)).await?;
        ensure!(
            first.metadata.remaining_item_count == Some(4),
            "{:?}",
            first.metadata
        );
        let token = first.metadata.continue_.clone().context("a token")?;
        let again = names(
            api.list(&ListParams::default().limit(2).continue_token(&token))
                .await?,
        );
        let retried = names(
            api.list(&ListParams::default().limit(2).continue_token(&token))
                .await?,
        );
        ensure!(
            again == ["c2", "c3"] && again == retried,
            "{again:?} {retried:?}"
        );
        // The selector of the continuing request applies, as upstream.
        let odd = api
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(&token)
                    .labels("n in (1,3,5)"),
            )
            .await?;
        ensure!(odd.metadata.remaining_item_count.is_none());
        ensure!(names(odd) == ["c3", "c5"]);
        // A token from another resource's list is refused.
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(env.client(), "default");
        let err = cms
            .list(&ListParams::default().continue_token(&token))
            .await
            .expect_err("foreign token");
        ensure!(code(&err) == Some(400), "{err}");
        // A negative limit is no limit, as upstream.
        let (c, s) = get(&env, &format!("{VMS}?limit=-1")).await?;
        ensure!(
            c == 200
                && s["items"].as_array().map(Vec::len) == Some(6)
                && s["metadata"]["continue"].is_null(),
            "{s}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn label_selectors_follow_the_upstream_grammar() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        for (name, n) in [("g1", "1"), ("g5", "5"), ("gx", "x")] {
            let mut vm = common::microvm(name);
            vm["metadata"]["labels"] = json!({"n": n, "example.com/t": "v"});
            api.create(&PostParams::default(), &serde_json::from_value(vm)?)
                .await?;
        }
        let names = |l: kube::core::ObjectList<DynamicObject>| {
            l.items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect::<Vec<_>>()
        };
        ensure!(names(api.list(&ListParams::default().labels("n>2")).await?) == ["g5"]);
        ensure!(
            names(
                api.list(&ListParams::default().labels("n<2,example.com/t==v"))
                    .await?
            ) == ["g1"]
        );
        ensure!(
            names(
                api.list(&ListParams::default().labels("n notin (1,5), !missing"))
                    .await?
            ) == ["gx"]
        );
        for (sel, text) in [
            ("a=b=c", "found '=', expected: ',' or 'end of string'"),
            ("a b", "found 'b', expected: in, notin, =, ==, !=, gt, lt"),
            ("-a=b", "name part must consist of alphanumeric characters"),
            (
                "Example.com/a=b",
                "prefix part a lowercase RFC 1123 subdomain",
            ),
            ("a=-b", "a valid label must be an empty string"),
            (
                "n>x",
                "for 'Gt', 'Lt' operators, the value must be an integer",
            ),
            ("!a=b", "found '=', expected: ',' or 'end of string'"),
            ("a in ()", ""),
            ("a,", "found '', expected: identifier after ','"),
            ("a in (b", "found '', expected: ',' or ')'"),
        ] {
            let (c, s) = get(
                &env,
                &format!(
                    "{VMS}?labelSelector={}",
                    sel.replace(' ', "%20")
                        .replace('>', "%3E")
                        .replace('=', "%3D")
                ),
            )
            .await?;
            if sel == "a in ()" {
                // An empty set holds the empty value upstream: valid, matches nothing.
                ensure!(
                    c == 200 && s["items"].as_array().map(Vec::len) == Some(0),
                    "{sel}: {c} {s}"
                );
                continue;
            }
            ensure!(
                c == 400 && s["reason"] == "BadRequest" && message(&s).contains(text),
                "{sel}: {c} {s}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn put_refuses_a_body_in_another_namespace() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let vm = create_microvm(&api, "ns").await?;
        let mut body = serde_json::to_value(&vm)?;
        body["metadata"]["namespace"] = json!("kube-system");
        let (c, s) = raw(&env, "PUT", &format!("{VMS}/ns"), "application/json", &body.to_string()).await?;
        ensure!(
            c == 400 && message(&s) == "the namespace of the provided object does not match the namespace sent on the request",
            "{c} {s}"
        );
        body["metadata"]["namespace"] = json!("default");
        body["metadata"]["name"] = json!("other");
        let (c, s) = raw(&env, "PUT", &format!("{VMS}/ns"), "application/json", &body.to_string()).await?;
        ensure!(c == 400 && message(&s).contains("does not match the name on the URL"), "{c} {s}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn crds_with_bad_cel_or_untyped_schemas_are_refused() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let crd = |schema: serde_json::Value| {
            json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "widgets.example.com"},
                "spec": {"group": "example.com", "scope": "Namespaced",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                    "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": schema}}]},
            })
        };
        let path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        let bad_cel = crd(json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "self.size >"}],
            "properties": {"size": {"type": "integer"}}}}}));
        let (c, s) = raw(&env, "POST", path, "application/json", &bad_cel.to_string()).await?;
        ensure!(c == 422, "{c} {s}");
        ensure!(
            s["details"]["causes"][0]["field"] == "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
                && message(&s).contains("compilation failed"),
            "{s}"
        );
        let untyped = crd(json!({"type": "object", "properties": {"spec": {"properties": {"size": {"type": "integer"}}}}}));
        let (c, s) = raw(&env, "POST", path, "application/json", &untyped.to_string()).await?;
        ensure!(c == 422 && message(&s).contains("spec.versions[0].schema.openAPIV3Schema.properties[spec].type: Required value: must not be empty for specified object fields"), "{c} {s}");
        let ok = crd(json!({"type": "object", "properties": {"spec": {"type": "object",
            "x-kubernetes-validations": [{"rule": "self.size > 0", "message": "positive"}],
            "properties": {"size": {"type": "integer"}, "any": {"x-kubernetes-int-or-string": true}}}}}));
        let (c, s) = raw(&env, "POST", path, "application/json", &ok.to_string()).await?;
        ensure!(c == 201, "{c} {s}");
        // A second CRD of the group claiming `widget` as a short name is stored, but
        // its names are refused and it is not served, as by the naming controller.
        let mut clash = ok.clone();
        clash["metadata"]["name"] = json!("gadgets.example.com");
        clash["spec"]["names"] = json!({"plural": "gadgets", "singular": "gadget",
            "kind": "Gadget", "listKind": "GadgetList", "shortNames": ["widget"]});
        let (c, s) = raw(&env, "POST", path, "application/json", &clash.to_string()).await?;
        ensure!(c == 201, "{c} {s}");
        let (c, s) = get(&env, &format!("{path}/gadgets.example.com")).await?;
        let conditions = s["status"]["conditions"].as_array().cloned().unwrap_or_default();
        ensure!(
            c == 200
                && conditions.iter().any(|c| c["type"] == "NamesAccepted"
                    && c["status"] == "False"
                    && c["reason"] == "NameConflict"
                    && c["message"] == "\"widget\" is already in use")
                && conditions.iter().any(|c| c["type"] == "Established" && c["status"] == "False"),
            "{s}"
        );
        let (c, s) = get(&env, "/apis/example.com/v1/namespaces/default/gadgets").await?;
        ensure!(c == 404, "a CRD whose names were refused is served: {c} {s}");
        // Fixing the names accepts and serves it.
        let (c, s) = raw(
            &env,
            "PATCH",
            &format!("{path}/gadgets.example.com"),
            "application/merge-patch+json",
            r#"{"spec":{"names":{"shortNames":["gd"]}}}"#,
        )
        .await?;
        ensure!(c == 200, "{c} {s}");
        let (c, s) = get(&env, "/apis/example.com/v1/namespaces/default/gadgets").await?;
        ensure!(c == 200, "fixed names are not served: {c} {s}");
        Ok(())
    })
    .await
}

/// The causes of a 422 as `field: message` lines.
fn causes(body: &serde_json::Value) -> Vec<String> {
    body["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}: {}",
                c["field"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn list_map_keys_and_blocking_errors_decide_which_checks_run() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let post = |vm: serde_json::Value| {
            let env = &env;
            async move { raw(env, "POST", VMS, "application/json", &vm.to_string()).await }
        };
        // A list keyed by name: the server's own duplicate check names the second
        // item, and the CEL rule on the list says why.
        let mut vm = common::microvm("dup");
        vm["spec"]["disks"] = json!([
            {"name": "root", "empty": {"size": "1Gi"}},
            {"name": "root", "empty": {"size": "2Gi"}},
        ]);
        let (status, body) = post(vm).await?;
        let got = causes(&body);
        ensure!(status == 422, "{status} {body}");
        ensure!(
            got.contains(&r#"spec.disks[1]: Duplicate value: map[string]interface {}{"name":"root"}"#.to_owned())
                && got.contains(&r#"spec.disks: Invalid value: "array": names must be unique within the MicroVM"#.to_owned()),
            "{got:#?}"
        );
        // A pattern error is not blocking: the rules still run and report too.
        let mut vm = common::microvm("pattern");
        vm["spec"]["interfaces"] = json!([{"name": "eth0", "type": "Nat", "mac": "zz"}]);
        vm["spec"]["boot"]["initrd"] = json!("relative.img");
        let (status, body) = post(vm).await?;
        let got = causes(&body);
        ensure!(status == 422, "{status} {body}");
        ensure!(
            got.iter().any(|c| c.starts_with(r#"spec.interfaces[0].mac: Invalid value: "zz": spec.interfaces[0].mac in body should match '^"#))
                && got.contains(&r#"spec.boot.initrd: Invalid value: "string": must be an absolute path on the node"#.to_owned()),
            "{got:#?}"
        );
        // A wrong type is blocking: the rules are skipped, and the server says so.
        let mut vm = common::microvm("blocking");
        vm["spec"]["resources"]["vcpus"] = json!("two");
        vm["spec"]["boot"]["initrd"] = json!("relative.img");
        let (status, body) = post(vm).await?;
        let got = causes(&body);
        ensure!(status == 422, "{status} {body}");
        ensure!(
            got.contains(&r#"spec.resources.vcpus: Invalid value: "string": spec.resources.vcpus in body must be of type integer: "string""#.to_owned())
                && got.iter().any(|c| c.contains("some validation rules were not checked"))
                && !got.iter().any(|c| c.starts_with("spec.boot.initrd")),
            "{got:#?}"
        );
        Ok(())
    })
    .await
}
