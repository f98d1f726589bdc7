//! Conformance through the real `kubectl` binary: discovery, apply, get
//! (Table, wide, yaml, chunked, field selectors), describe, wait, scale,
//! patch, server-side apply conflicts, delete with finalizers and cascading,
//! deletecollection, server dry runs, raw watches resumed from a
//! resourceVersion, validation messages, and the `runv-testserver` binary
//! keeping its state across a SIGTERM.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{Env, Out, bounded, create_microvm, eventually, microvm, run_kubectl, rv};
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

const MICROVM: &str = "apiVersion: runv.dev/v1alpha1
kind: MicroVM
metadata:
  name: hello
spec:
  resources:
    vcpus: 2
    memory: 64Mi
  boot:
    kernel: /var/lib/runv/guests/runv-test-guest
";

/// The error of the memory range rule in the MicroVM CRD, as kube-apiserver words it.
fn memory_rule() -> Result<String> {
    let message = common::rule_message("MicroVM", &["spec", "resources", "memory"], "16Mi")?;
    Ok(format!(
        "spec.resources.memory: Invalid value: \"string\": {message}"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_lists_builtins_and_crds_created_by_kubectl() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let crd = common::repo().join("crds/yaml/microvms.runv.dev.yaml");
        let out = env
            .kubectl(&["apply", "-f", &crd.display().to_string()])
            .await?
            .ok()?;
        ensure!(
            out.contains("customresourcedefinition.apiextensions.k8s.io/microvms.runv.dev created"),
            "{out}"
        );
        let out = env.kubectl(&["api-resources"]).await?.ok()?;
        for needle in [
            "microvms",
            "mvm",
            "runv.dev/v1alpha1",
            "configmaps",
            "namespaces",
            "leases",
            "customresourcedefinitions",
        ] {
            ensure!(out.contains(needle), "api-resources lacks {needle}: {out}");
        }
        let out = env
            .kubectl(&[
                "get",
                "crd",
                "microvms.runv.dev",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ])
            .await?
            .ok()?;
        ensure!(out == "True", "CRD not established: {out}");
        let out = env.kubectl(&["get", "namespaces"]).await?.ok()?;
        ensure!(out.contains("default") && out.contains("Active"), "{out}");
        let out = env.kubectl(&["version", "-o", "json"]).await?.ok()?;
        ensure!(out.contains("serverVersion"), "{out}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_twice_leaves_the_object_unchanged() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let out = env
            .kubectl_in(&["apply", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        ensure!(out.trim() == "microvm.runv.dev/hello created", "{out}");
        let rv1 = env
            .kubectl(&[
                "get",
                "mvm",
                "hello",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ])
            .await?
            .ok()?;
        let out = env
            .kubectl_in(&["apply", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        ensure!(out.trim() == "microvm.runv.dev/hello unchanged", "{out}");
        let rv2 = env
            .kubectl(&[
                "get",
                "mvm",
                "hello",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ])
            .await?
            .ok()?;
        ensure!(rv1 == rv2, "second apply wrote the object: {rv1} -> {rv2}");
        // A change is applied and bumps the generation.
        let changed = MICROVM.replace("vcpus: 2", "vcpus: 3");
        let out = env
            .kubectl_in(&["apply", "-f", "-"], Some(&changed))
            .await?
            .ok()?;
        ensure!(out.trim() == "microvm.runv.dev/hello configured", "{out}");
        let out = env
            .kubectl(&[
                "get",
                "mvm",
                "hello",
                "-o",
                "jsonpath={.spec.resources.vcpus} {.metadata.generation}",
            ])
            .await?
            .ok()?;
        ensure!(out == "3 2", "{out}");
        // Built-ins go through strategic merge patch.
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        env.kubectl_in(&["apply", "-f", "-"], Some(cm))
            .await?
            .ok()?;
        let out = env
            .kubectl_in(&["apply", "-f", "-"], Some(cm))
            .await?
            .ok()?;
        ensure!(out.trim() == "configmap/c unchanged", "{out}");
        let out = env
            .kubectl_in(&["apply", "-f", "-"], Some(&cm.replace("\"1\"", "\"2\"")))
            .await?
            .ok()?;
        ensure!(out.trim() == "configmap/c configured", "{out}");
        let out = env.kubectl(&["get", "cm", "c"]).await?.ok()?;
        ensure!(
            out.contains("DATA")
                && out
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l.split_whitespace().nth(1) == Some("1")),
            "{out}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_reads_the_crd_schemas() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let out = env
            .kubectl(&["explain", "mvm.spec.resources"])
            .await?
            .ok()?;
        ensure!(
            out.contains("KIND:       MicroVM")
                && out.contains("vcpus\t<integer>")
                && out.contains("memory\t<string>")
                && out.contains("from 16Mi to 64Gi"),
            "{out}"
        );
        let out = env
            .kubectl(&["explain", "swl", "--recursive"])
            .await?
            .ok()?;
        ensure!(
            out.contains("KIND:       SecureWorkload")
                && out.contains("metadata\t<Object>")
                && out.contains("maxUnavailable"),
            "{out}"
        );
        let err = env.kubectl(&["explain", "mvm.spec.nosuchfield"]).await?;
        ensure!(err.code != 0, "{err:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn get_wide_prints_the_printer_columns() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        env.kubectl_in(&["apply", "-f", "-"], Some(MICROVM)).await?.ok()?;
        let api = env.microvms();
        let status = json!({"status": {"phase": "Running", "nodeName": "n1", "bootDurationMillis": 42,
            "interfaces": [{"name": "eth0", "ip": "10.0.0.2"}]}});
        api.patch_status("hello", &PatchParams::default(), &Patch::Merge(&status)).await?;
        let out = env.kubectl(&["get", "mvm"]).await?.ok()?;
        let header: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
        ensure!(header == ["NAME", "PHASE", "READY", "NODE", "IP", "AGE"], "{out}");
        ensure!(out.contains("Running") && out.contains("n1"), "{out}");
        let out = env.kubectl(&["get", "mvm", "-o", "wide"]).await?.ok()?;
        let header: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
        ensure!(header == ["NAME", "PHASE", "READY", "NODE", "IP", "AGE", "VCPUS", "MEMORY", "BOOT", "MS"], "{out}");
        let row: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
        ensure!(row.first() == Some(&"hello") && row.ends_with(&["2", "64Mi", "42"]), "{out}");
        let out = env.kubectl(&["get", "mvm", "hello", "-o", "yaml"]).await?.ok()?;
        ensure!(out.contains("kind: MicroVM") && out.contains("memory: 64Mi") && out.contains("phase: Running"), "{out}");
        let out = env.kubectl(&["describe", "mvm", "hello"]).await?.ok()?;
        ensure!(out.contains("Name:") && out.contains("hello"), "{out}");
        let out = env.kubectl(&["get", "runv"]).await?.ok()?;
        ensure!(out.contains("microvm.runv.dev/hello"), "category lookup: {out}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_returns_when_a_status_patch_sets_ready() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        env.kubectl_in(&["apply", "-f", "-"], Some(MICROVM)).await?.ok()?;
        let api = env.microvms();
        let setter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Booted",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
            api.patch_status("hello", &PatchParams::default(), &Patch::Merge(&status)).await
        });
        let out = env.kubectl(&["wait", "--for=condition=Ready", "mvm/hello", "--timeout=30s"]).await?;
        setter.await??;
        let out = out.ok()?;
        ensure!(out.contains("condition met"), "{out}");
        // And a wait that cannot be met times out with an error.
        let out = env.kubectl(&["wait", "--for=condition=Stalled", "mvm/hello", "--timeout=1s"]).await?;
        ensure!(out.code != 0, "wait for an absent condition succeeded: {out:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_with_a_finalizer_waits_for_its_removal() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let mut vm = microvm("held");
        vm["metadata"]["finalizers"] = json!(["runv.dev/test"]);
        env.kubectl_in(&["apply", "-f", "-"], Some(&vm.to_string()))
            .await?
            .ok()?;
        let out = env
            .kubectl(&["delete", "mvm", "held", "--wait=false"])
            .await?
            .ok()?;
        ensure!(out.contains("deleted"), "{out}");
        let out = env
            .kubectl(&[
                "get",
                "mvm",
                "held",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ])
            .await?
            .ok()?;
        ensure!(!out.is_empty(), "no deletionTimestamp");
        // No new finalizers on a deleting object.
        let out = env
            .kubectl(&[
                "patch",
                "mvm",
                "held",
                "--type=json",
                "-p",
                r#"[{"op":"add","path":"/metadata/finalizers/-","value":"x.dev/y"}]"#,
            ])
            .await?;
        ensure!(
            out.code != 0 && out.stderr.contains("no new finalizers"),
            "{out:?}"
        );
        env.kubectl(&[
            "patch",
            "mvm",
            "held",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ])
        .await?
        .ok()?;
        let out = env.kubectl(&["get", "mvm", "held"]).await?;
        ensure!(
            out.code != 0 && (out.stderr.contains("NotFound") || out.stderr.contains("not found")),
            "{out:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_uses_the_scale_subresource() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let swl = std::fs::read_to_string(common::repo().join("examples/secureworkload.yaml"))?;
        env.kubectl_in(&["apply", "-f", "-"], Some(&swl))
            .await?
            .ok()?;
        let name = env
            .kubectl(&["get", "swl", "-o", "jsonpath={.items[0].metadata.name}"])
            .await?
            .ok()?;
        let out = env
            .kubectl(&["scale", "swl", &name, "--replicas=5"])
            .await?
            .ok()?;
        ensure!(out.contains("scaled"), "{out}");
        let out = env
            .kubectl(&[
                "get",
                "swl",
                &name,
                "-o",
                "jsonpath={.spec.replicas} {.metadata.generation}",
            ])
            .await?
            .ok()?;
        ensure!(out == "5 2", "{out}");
        let out = env
            .kubectl(&[
                "get",
                "--raw",
                &format!("/apis/runv.dev/v1alpha1/namespaces/default/secureworkloads/{name}/scale"),
            ])
            .await?
            .ok()?;
        let scale: Value = serde_json::from_str(&out)?;
        ensure!(
            scale["kind"] == "Scale" && scale["spec"]["replicas"] == 5,
            "{out}"
        );
        let out = env
            .kubectl(&["scale", "swl", &name, "--replicas=-1"])
            .await?;
        ensure!(out.code != 0, "negative replicas accepted");
        // MicroVMs have no scale subresource.
        env.kubectl_in(&["apply", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        let out = env
            .kubectl(&["scale", "mvm", "hello", "--replicas=2"])
            .await?;
        ensure!(
            out.code != 0,
            "scaled a kind without the scale subresource: {out:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_breaking_a_cel_rule_is_refused_with_its_message() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let bad = MICROVM.replace("memory: 64Mi", "memory: \"0\"");
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(&bad)).await?;
        ensure!(out.code != 0, "accepted: {out:?}");
        ensure!(out.stderr.contains(&memory_rule()?), "{}", out.stderr);
        // Schema violations get the structural message; unknown fields are refused under kubectl's strict validation.
        let bad = MICROVM.replace("vcpus: 2", "vcpus: 99");
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(&bad)).await?;
        ensure!(
            out.code != 0 && out.stderr.contains("spec.resources.vcpus"),
            "{out:?}"
        );
        let bad = MICROVM.replace("  resources:", "  bogus: 1\n  resources:");
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(&bad)).await?;
        ensure!(
            out.code != 0 && out.stderr.contains("unknown field \"spec.bogus\""),
            "{out:?}"
        );
        let out = env
            .kubectl_in(&["apply", "--validate=false", "-f", "-"], Some(&bad))
            .await?
            .ok()?;
        ensure!(out.contains("created"), "{out}");
        let out = env
            .kubectl(&["get", "mvm", "hello", "-o", "jsonpath={.spec}"])
            .await?
            .ok()?;
        ensure!(
            !out.contains("bogus") && out.contains("64Mi"),
            "unknown field not pruned: {out}"
        );
        // Built-ins refuse unknown top-level fields too.
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndatta:\n  a: \"1\"\n";
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(cm)).await?;
        ensure!(
            out.code != 0 && out.stderr.contains("unknown field \"datta\""),
            "{out:?}"
        );
        // Transition rules see oldSelf.
        let api = env.microvms();
        api.patch(
            "hello",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"nodeName": "n1"}})),
        )
        .await?;
        let out = env
            .kubectl(&[
                "patch",
                "mvm",
                "hello",
                "--type=merge",
                "-p",
                r#"{"spec":{"nodeName":"n2"}}"#,
            ])
            .await?;
        // (The exact `Invalid value` type is checked in clients.rs.)
        let immutable = common::rule_message("MicroVM", &["spec"], "oldSelf.nodeName")?;
        refused(&out, "spec.nodeName: Invalid value: ")?;
        refused(&out, &format!("\": {immutable}"))?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_types_and_delete_through_kubectl() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        // kubectl's generators send protobuf for these kinds.
        env.kubectl(&["create", "namespace", "gen"]).await?.ok()?;
        env.kubectl(&[
            "create",
            "configmap",
            "p",
            "-n",
            "gen",
            "--from-literal=a=1",
        ])
        .await?
        .ok()?;
        env.kubectl(&[
            "create",
            "secret",
            "generic",
            "s",
            "-n",
            "gen",
            "--from-literal=k=hello",
        ])
        .await?
        .ok()?;
        let out = env
            .kubectl(&[
                "get",
                "cm,secret",
                "-n",
                "gen",
                "-o",
                "jsonpath={.items[*].data}",
            ])
            .await?
            .ok()?;
        ensure!(out == r#"{"a":"1"} {"k":"aGVsbG8="}"#, "{out}");
        let out = env
            .kubectl(&[
                "get",
                "ns",
                "gen",
                "-o",
                "jsonpath={.metadata.generateName}{.status.phase}",
            ])
            .await?
            .ok()?;
        ensure!(out == "Active", "{out}");
        // Other protobuf bodies are refused with 415.
        let out = env
            .kubectl(&["create", "deployment", "d", "--image=x"])
            .await?;
        ensure!(out.code != 0, "{out:?}");
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: \"1\"\n";
        env.kubectl_in(&["create", "-f", "-"], Some(cm))
            .await?
            .ok()?;
        env.kubectl(&["patch", "cm", "c", "-p", r#"{"data":{"b":"2"}}"#])
            .await?
            .ok()?;
        env.kubectl(&[
            "patch",
            "cm",
            "c",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/a"}]"#,
        ])
        .await?
        .ok()?;
        env.kubectl(&["label", "cm", "c", "app=web"]).await?.ok()?;
        env.kubectl(&["annotate", "cm", "c", "note=x"])
            .await?
            .ok()?;
        let out = env
            .kubectl(&[
                "get",
                "cm",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].data}",
            ])
            .await?
            .ok()?;
        ensure!(out == r#"{"b":"2"}"#, "{out}");
        env.kubectl(&[
            "patch",
            "cm",
            "c",
            "--type=json",
            "-p",
            r#"[{"op":"test","path":"/data/b","value":"9"}]"#,
        ])
        .await?
        .code
        .ne(&0)
        .then_some(())
        .ok_or_else(|| anyhow::anyhow!("failed JSON patch test passed"))?;
        let out = env
            .kubectl_in(&["apply", "--server-side", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        ensure!(out.contains("serverside-applied"), "{out}");
        let out = env
            .kubectl_in(
                &["apply", "--server-side", "-f", "-"],
                Some(&MICROVM.replace("vcpus: 2", "vcpus: 4")),
            )
            .await?
            .ok()?;
        ensure!(out.contains("serverside-applied"), "{out}");
        let out = env
            .kubectl(&[
                "get",
                "mvm",
                "hello",
                "-o",
                "jsonpath={.spec.resources.vcpus}",
            ])
            .await?
            .ok()?;
        ensure!(out == "4", "{out}");
        let out = env.kubectl(&["delete", "mvm", "hello"]).await?.ok()?;
        ensure!(out.contains("deleted"), "{out}");
        let out = env.kubectl(&["delete", "cm", "--all"]).await?.ok()?;
        ensure!(out.contains("configmap \"c\" deleted"), "{out}");
        let out = env.kubectl(&["get", "cm"]).await?;
        ensure!(out.stderr.contains("No resources found"), "{out:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn get_watch_prints_table_rows_as_objects_change() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        env.kubectl_in(&["apply", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        let api = env.microvms();
        let setter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let status = json!({"status": {"phase": "Running"}});
            api.patch_status("hello", &PatchParams::default(), &Patch::Merge(&status))
                .await
        });
        // The request timeout becomes the watch's timeoutSeconds, so kubectl exits on its own.
        let out = env
            .kubectl(&["get", "mvm", "-w", "--request-timeout=3s"])
            .await?;
        setter.await??;
        let out = out.ok()?;
        let lines: Vec<&str> = out.lines().collect();
        ensure!(lines.len() == 3, "{out}");
        ensure!(
            lines[0].split_whitespace().collect::<Vec<_>>()
                == ["NAME", "PHASE", "READY", "NODE", "IP", "AGE"],
            "{out}"
        );
        ensure!(
            lines[2].split_whitespace().take(2).collect::<Vec<_>>() == ["hello", "Running"],
            "{out}"
        );
        Ok(())
    })
    .await
}

/// `kubectl get -o jsonpath=...` of one object.
async fn jsonpath(env: &Env, what: &[&str], path: &str) -> Result<String> {
    let template = format!("jsonpath={path}");
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", &template]);
    env.kubectl(&args).await?.ok()
}

/// The names `kubectl get ... -o name` prints, without the kind prefix.
async fn names(env: &Env, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "name"]);
    let out = env.kubectl(&all).await?.ok()?;
    Ok(out
        .lines()
        .map(|l| l.rsplit('/').next().unwrap_or_default().to_string())
        .collect())
}

/// Fails unless kubectl failed with `needle` in its error output.
fn refused(out: &Out, needle: &str) -> Result<()> {
    ensure!(
        out.code != 0 && out.stderr.contains(needle),
        "want a failure mentioning {needle:?}: {out:?}"
    );
    Ok(())
}

/// The resourceVersion of a list of ConfigMaps: the latest write.
async fn latest_version(env: &Env) -> Result<String> {
    let out = env
        .kubectl(&["get", "--raw", "/api/v1/namespaces/default/configmaps"])
        .await?
        .ok()?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// (type, name, resourceVersion) of every event in a raw watch body.
fn raw_events(body: &str) -> Result<Vec<(String, String, String)>> {
    serde_json::Deserializer::from_str(body)
        .into_iter::<Value>()
        .map(|ev| {
            let ev = ev.context("a watch event that is not JSON")?;
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            Ok((
                s(&ev["type"]),
                s(&ev["object"]["metadata"]["name"]),
                s(&ev["object"]["metadata"]["resourceVersion"]),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_watch_from_a_resource_version_replays_exactly_the_later_events() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let first = create_microvm(&api, "w0").await?;
        let ev = |t: &str, n: &str, v: String| (t.to_string(), n.to_string(), v);
        let mut expected = Vec::new();
        for i in 1..5 {
            let o = create_microvm(&api, &format!("w{i}")).await?;
            expected.push(ev("ADDED", &format!("w{i}"), rv(&o)));
        }
        let pm = PatchParams::default();
        let o = api
            .patch(
                "w1",
                &pm,
                &Patch::Merge(&json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await?;
        expected.push(ev("MODIFIED", "w1", rv(&o)));
        let o = api
            .patch_status(
                "w0",
                &pm,
                &Patch::Merge(&json!({"status": {"phase": "Running"}})),
            )
            .await?;
        expected.push(ev("MODIFIED", "w0", rv(&o)));
        env.kubectl(&["delete", "mvm", "w2"]).await?.ok()?;
        let after = create_microvm(&api, "w5").await?;

        let path = "/apis/runv.dev/v1alpha1/namespaces/default/microvms";
        let watch = |from: String, secs: u32| {
            let env = &env;
            async move {
                let url = format!("{path}?watch=1&resourceVersion={from}&timeoutSeconds={secs}");
                let started = std::time::Instant::now();
                let body = env.kubectl(&["get", "--raw", &url]).await?.ok()?;
                ensure!(
                    started.elapsed() >= Duration::from_secs(u64::from(secs)),
                    "the watch ended before its timeoutSeconds"
                );
                raw_events(&body)
            }
        };
        // The whole stream, to the end timeoutSeconds gives it.
        let seen = watch(rv(&first), 2).await?;
        ensure!(seen.len() == expected.len() + 2, "{seen:?}");
        ensure!(seen[..expected.len()] == expected[..], "{seen:?}");
        let deleted = &seen[expected.len()];
        ensure!(deleted.0 == "DELETED" && deleted.1 == "w2", "{seen:?}");
        ensure!(
            seen[expected.len() + 1] == ev("ADDED", "w5", rv(&after)),
            "{seen:?}"
        );
        let versions = seen
            .iter()
            .map(|e| e.2.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()?;
        ensure!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "out of order or repeated: {versions:?}"
        );
        // Resuming from a middle event, the deletion and the last event.
        for i in [3, expected.len(), seen.len() - 1] {
            let rest = watch(seen[i].2.clone(), 1).await?;
            ensure!(
                rest[..] == seen[i + 1..],
                "resumed from {}: {rest:?}",
                seen[i].2
            );
        }
        // A version older than the event history is 410 Gone, sent as an ERROR event.
        let short = Env::with(
            runv_e2e::Options {
                history: 2,
                ..Default::default()
            },
            true,
        )
        .await?;
        let old = create_microvm(&short.microvms(), "a").await?;
        for n in ["b", "c", "d"] {
            create_microvm(&short.microvms(), n).await?;
        }
        let url = format!(
            "{path}?watch=1&resourceVersion={}&timeoutSeconds=1",
            rv(&old)
        );
        // The watch itself is 200; the error is its one event.
        let body = short.kubectl(&["get", "--raw", &url]).await?.ok()?;
        let events: Vec<Value> = serde_json::Deserializer::from_str(&body)
            .into_iter()
            .collect::<Result<_, _>>()?;
        ensure!(
            events.len() == 1
                && events[0]["type"] == "ERROR"
                && events[0]["object"]["code"] == 410
                && events[0]["object"]["reason"] == "Expired",
            "{body}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_conflicts_between_field_managers() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let apply = |manager: &str, extra: &[&str], body: String| {
            let env = &env;
            let mut args = vec![
                "apply".to_string(),
                "--server-side".to_string(),
                format!("--field-manager={manager}"),
                "-f".to_string(),
                "-".to_string(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                env.kubectl_in(&args, Some(&body)).await
            }
        };
        let out = apply("alice", &[], MICROVM.to_string()).await?.ok()?;
        ensure!(out.trim() == "microvm.runv.dev/hello serverside-applied", "{out}");
        // Another manager changing alice's field is refused, naming her and the field.
        let three = MICROVM.replace("vcpus: 2", "vcpus: 3");
        let out = apply("bob", &[], three.clone()).await?;
        refused(
            &out,
            "Apply failed with 1 conflict: conflict with \"alice\" using runv.dev/v1alpha1: .spec.resources.vcpus",
        )?;
        ensure!(jsonpath(&env, &["mvm", "hello"], "{.spec.resources.vcpus}").await? == "2");
        // Applying the same value is no conflict: bob co-owns the fields.
        apply("bob", &[], MICROVM.to_string()).await?.ok()?;
        // Forcing takes the field.
        let out = apply("bob", &["--force-conflicts"], three).await?.ok()?;
        ensure!(out.contains("serverside-applied"), "{out}");
        ensure!(jsonpath(&env, &["mvm", "hello"], "{.spec.resources.vcpus}").await? == "3");
        let out = env
            .kubectl(&["get", "mvm", "hello", "-o", "json", "--show-managed-fields"])
            .await?
            .ok()?;
        let obj: Value = serde_json::from_str(&out)?;
        let fields = |manager: &str| {
            obj["metadata"]["managedFields"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["manager"] == manager)
                .map(|e| (e["operation"].clone(), e["fieldsV1"]["f:spec"]["f:resources"].clone()))
        };
        let (op, bob) = fields("bob").context("no managedFields entry for bob")?;
        ensure!(op == "Apply" && bob.get("f:vcpus").is_some(), "{out}");
        let (_, alice) = fields("alice").context("alice lost all her fields")?;
        ensure!(
            alice.get("f:vcpus").is_none() && alice.get("f:memory").is_some(),
            "alice still owns vcpus or lost memory: {out}"
        );
        // Now alice is the one in conflict, with bob.
        let out = apply("alice", &[], MICROVM.to_string()).await?;
        refused(&out, "conflict with \"bob\"")?;
        // A client-side update takes fields without a conflict, under its own manager.
        env.kubectl(&[
            "patch", "mvm", "hello", "--type=merge", "--field-manager=carol",
            "-p", r#"{"spec":{"resources":{"vcpus":4}}}"#,
        ])
        .await?
        .ok()?;
        let out = apply("bob", &[], MICROVM.replace("vcpus: 2", "vcpus: 3")).await?;
        refused(&out, "conflict with \"carol\"")?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_cascade_foreground_and_orphan_through_kubectl() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let owned = |mut obj: Value, owner: &str, uid: &str, block: bool| {
            obj["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
                "name": owner, "uid": uid, "blockOwnerDeletion": block}]);
            obj.to_string()
        };
        let cm = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});

        // Foreground: the owner stays, marked, while a blocking dependent remains.
        env.kubectl(&["create", "configmap", "fg"]).await?.ok()?;
        let uid = jsonpath(&env, &["cm", "fg"], "{.metadata.uid}").await?;
        let mut held = microvm("held");
        held["metadata"]["finalizers"] = json!(["runv.dev/hold"]);
        env.kubectl_in(&["apply", "-f", "-"], Some(&owned(held, "fg", &uid, true)))
            .await?
            .ok()?;
        env.kubectl_in(&["apply", "-f", "-"], Some(&owned(cm("loose"), "fg", &uid, false)))
            .await?
            .ok()?;
        let out = env
            .kubectl(&["delete", "cm", "fg", "--cascade=foreground", "--wait=false"])
            .await?
            .ok()?;
        ensure!(out.contains("configmap \"fg\" deleted"), "{out}");
        eventually("the blocking dependent marked for deletion", || async {
            Ok(!jsonpath(&env, &["mvm", "held"], "{.metadata.deletionTimestamp}").await?.is_empty())
        })
        .await?;
        eventually("the non-blocking dependent deleted", || async {
            Ok(names(&env, &["cm"]).await?.iter().all(|n| n != "loose"))
        })
        .await?;
        let out = jsonpath(&env, &["cm", "fg"], "{.metadata.deletionTimestamp} {.metadata.finalizers}").await?;
        let (ts, fin) = out.split_once(' ').unwrap_or_default();
        ensure!(!ts.is_empty() && fin.contains("foregroundDeletion"), "owner not held: {out}");
        // Releasing the dependent lets the owner go.
        env.kubectl(&["patch", "mvm", "held", "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#])
            .await?
            .ok()?;
        env.kubectl(&["wait", "--for=delete", "cm/fg", "mvm/held", "--timeout=10s"])
            .await?
            .ok()?;

        // Orphan: the owner goes, its dependents stay without the reference.
        env.kubectl(&["create", "configmap", "or"]).await?.ok()?;
        let uid = jsonpath(&env, &["cm", "or"], "{.metadata.uid}").await?;
        env.kubectl_in(&["apply", "-f", "-"], Some(&owned(cm("kept"), "or", &uid, true)))
            .await?
            .ok()?;
        env.kubectl_in(&["apply", "-f", "-"], Some(&owned(microvm("vm"), "or", &uid, false)))
            .await?
            .ok()?;
        let out = env.kubectl(&["delete", "cm", "or", "--cascade=orphan"]).await?.ok()?;
        ensure!(out.contains("configmap \"or\" deleted"), "{out}");
        refused(&env.kubectl(&["get", "cm", "or"]).await?, "NotFound")?;
        ensure!(jsonpath(&env, &["cm", "kept"], "{.metadata.ownerReferences}").await?.is_empty());
        ensure!(jsonpath(&env, &["mvm", "vm"], "{.metadata.ownerReferences}").await?.is_empty());

        // Background (kubectl's default): the owner goes at once, dependents after.
        env.kubectl(&["create", "configmap", "bg"]).await?.ok()?;
        let uid = jsonpath(&env, &["cm", "bg"], "{.metadata.uid}").await?;
        env.kubectl_in(&["apply", "-f", "-"], Some(&owned(microvm("gone"), "bg", &uid, true)))
            .await?
            .ok()?;
        env.kubectl(&["delete", "cm", "bg"]).await?.ok()?;
        env.kubectl(&["wait", "--for=delete", "mvm/gone", "--timeout=10s"]).await?.ok()?;
        ensure!(names(&env, &["mvm"]).await? == ["vm"]);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn get_in_chunks_and_with_field_selectors() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let all: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        let docs: Vec<String> = all.iter().map(|n| microvm(n).to_string()).collect();
        let list = json!({"apiVersion": "v1", "kind": "List",
            "items": docs.iter().map(|d| serde_json::from_str::<Value>(d)).collect::<Result<Vec<_>, _>>()?});
        env.kubectl_in(&["apply", "-f", "-"], Some(&list.to_string())).await?.ok()?;

        // Pages of 3: three requests, every object once, in order.
        let out = env.kubectl(&["get", "mvm", "--chunk-size=3", "-v=6"]).await?;
        let requests: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("GET ") && l.contains("/microvms?") && l.contains("limit=3"))
            .collect();
        ensure!(requests.len() == 3, "{}", out.stderr);
        ensure!(
            requests.iter().skip(1).all(|l| l.contains("continue=")),
            "{}",
            out.stderr
        );
        let out = out.ok()?;
        let rows: Vec<&str> = out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        ensure!(rows == all, "{out}");
        ensure!(out.lines().filter(|l| l.starts_with("NAME")).count() == 1, "{out}");
        ensure!(names(&env, &["mvm", "--chunk-size=1"]).await? == all);
        ensure!(names(&env, &["mvm", "--chunk-size=8"]).await? == all);

        // selectableFields of MicroVM: .status.phase and .status.nodeName.
        let api = env.microvms();
        for (name, phase, node) in [("p1", "Running", "n1"), ("p2", "Running", "n2"), ("p5", "Pending", "n2")] {
            api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"phase": phase, "nodeName": node}})),
            )
            .await?;
        }
        let sel = |s: &str| format!("--field-selector={s}");
        ensure!(names(&env, &["mvm", &sel("status.phase=Running")]).await? == ["p1", "p2"]);
        ensure!(names(&env, &["mvm", &sel("status.nodeName=n2")]).await? == ["p2", "p5"]);
        ensure!(names(&env, &["mvm", &sel("status.phase=Running,status.nodeName=n2")]).await? == ["p2"]);
        ensure!(names(&env, &["mvm", &sel("status.phase!=Running")]).await?.len() == 6);
        ensure!(names(&env, &["mvm", &sel("status.phase=Running"), "--chunk-size=1"]).await? == ["p1", "p2"]);
        ensure!(names(&env, &["mvm", &sel("metadata.name=p3")]).await? == ["p3"]);
        ensure!(names(&env, &["mvm", &sel("metadata.name!=p3")]).await?.len() == 7);
        ensure!(names(&env, &["mvm", &sel("metadata.namespace=default")]).await? == all);
        let out = env.kubectl(&["get", "mvm", &sel("status.phase=Stopped")]).await?;
        ensure!(out.code == 0 && out.stderr.contains("No resources found"), "{out:?}");
        // A field the CRD does not declare selectable is refused.
        refused(
            &env.kubectl(&["get", "mvm", &sel("spec.nodeName=n1")]).await?,
            "field label not supported: spec.nodeName",
        )?;
        // Field selectors with a label selector and the Table output.
        env.kubectl(&["label", "mvm", "p2", "tier=a"]).await?.ok()?;
        let out = env
            .kubectl(&["get", "mvm", "-l", "tier=a", &sel("status.phase=Running")])
            .await?
            .ok()?;
        let rows: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
        ensure!(rows.len() == 1 && rows[0][..2] == ["p2", "Running"], "{out}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn server_dry_runs_store_nothing_and_deletecollection() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let before = latest_version(&env).await?;
        // Creating in a dry run: reported, validated, not stored.
        for args in [
            &["apply", "--dry-run=server", "-f", "-"][..],
            &["create", "--dry-run=server", "-f", "-"][..],
            &["apply", "--server-side", "--dry-run=server", "-f", "-"][..],
        ] {
            let out = env.kubectl_in(args, Some(MICROVM)).await?.ok()?;
            ensure!(
                out.contains("microvm.runv.dev/hello") && out.contains("(server dry run)"),
                "{args:?}: {out}"
            );
            refused(&env.kubectl(&["get", "mvm", "hello"]).await?, "NotFound")?;
        }
        let out = env
            .kubectl_in(
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&MICROVM.replace("memory: 64Mi", "memory: \"0\"")),
            )
            .await?;
        refused(&out, &memory_rule()?)?;
        env.kubectl(&[
            "create",
            "configmap",
            "dry",
            "--from-literal=a=1",
            "--dry-run=server",
        ])
        .await?
        .ok()?;
        refused(&env.kubectl(&["get", "cm", "dry"]).await?, "NotFound")?;
        ensure!(
            latest_version(&env).await? == before,
            "a dry run advanced the resourceVersion"
        );

        // Changing and deleting in a dry run leave the stored object as it was.
        env.kubectl_in(&["apply", "-f", "-"], Some(MICROVM))
            .await?
            .ok()?;
        let stored = jsonpath(
            &env,
            &["mvm", "hello"],
            "{.metadata.resourceVersion} {.spec.resources.vcpus}",
        )
        .await?;
        let out = env
            .kubectl_in(
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&MICROVM.replace("vcpus: 2", "vcpus: 5")),
            )
            .await?
            .ok()?;
        ensure!(out.contains("configured (server dry run)"), "{out}");
        env.kubectl(&["label", "mvm", "hello", "x=y", "--dry-run=server"])
            .await?
            .ok()?;
        env.kubectl(&[
            "patch",
            "mvm",
            "hello",
            "--dry-run=server",
            "--type=merge",
            "-p",
            r#"{"spec":{"resources":{"vcpus":6}}}"#,
        ])
        .await?
        .ok()?;
        let out = env
            .kubectl(&["delete", "mvm", "hello", "--dry-run=server"])
            .await?
            .ok()?;
        ensure!(out.contains("deleted (server dry run)"), "{out}");
        ensure!(
            jsonpath(
                &env,
                &["mvm", "hello"],
                "{.metadata.resourceVersion} {.spec.resources.vcpus}"
            )
            .await?
                == stored
        );
        ensure!(
            jsonpath(&env, &["mvm", "hello"], "{.metadata.labels}")
                .await?
                .is_empty()
        );

        // deletecollection (kubectl delete --all lists and deletes one by one,
        // so the collection is deleted through `delete --raw`).
        for (name, app) in [("a1", "gone"), ("a2", "gone"), ("b1", "kept")] {
            env.kubectl(&["create", "configmap", name]).await?.ok()?;
            env.kubectl(&["label", "cm", name, &format!("app={app}")])
                .await?
                .ok()?;
        }
        let collection = "/api/v1/namespaces/default/configmaps";
        let out = env
            .kubectl(&[
                "delete",
                "--raw",
                &format!("{collection}?labelSelector=app%3Dgone&dryRun=All"),
            ])
            .await?
            .ok()?;
        ensure!(out.contains("\"a1\"") && out.contains("\"a2\""), "{out}");
        ensure!(
            names(&env, &["cm", "-l", "app"]).await? == ["a1", "a2", "b1"],
            "dry-run deletecollection deleted"
        );
        let out = env
            .kubectl(&[
                "delete",
                "--raw",
                &format!("{collection}?labelSelector=app%3Dgone"),
            ])
            .await?
            .ok()?;
        let deleted: Value = serde_json::from_str(&out)?;
        ensure!(deleted["kind"] == "ConfigMapList", "{out}");
        ensure!(names(&env, &["cm", "-l", "app"]).await? == ["b1"]);
        // On custom resources too, and with a field selector.
        for n in ["m1", "m2"] {
            create_microvm(&env.microvms(), n).await?;
        }
        env.kubectl(&[
            "delete",
            "--raw",
            "/apis/runv.dev/v1alpha1/namespaces/default/microvms?fieldSelector=metadata.name%3Dm1",
        ])
        .await?
        .ok()?;
        ensure!(names(&env, &["mvm"]).await? == ["hello", "m2"]);
        let out = env.kubectl(&["delete", "mvm", "--all"]).await?.ok()?;
        ensure!(
            out.contains("\"hello\" deleted") && out.contains("\"m2\" deleted"),
            "{out}"
        );
        ensure!(names(&env, &["mvm"]).await?.is_empty());
        // A collection delete waits for no finalizer: held objects are only marked.
        let mut held = microvm("held");
        held["metadata"]["finalizers"] = json!(["runv.dev/hold"]);
        env.kubectl_in(&["apply", "-f", "-"], Some(&held.to_string()))
            .await?
            .ok()?;
        env.kubectl(&[
            "delete",
            "--raw",
            "/apis/runv.dev/v1alpha1/namespaces/default/microvms",
        ])
        .await?
        .ok()?;
        ensure!(
            !jsonpath(&env, &["mvm", "held"], "{.metadata.deletionTimestamp}")
                .await?
                .is_empty()
        );
        env.microvms()
            .patch(
                "held",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
            )
            .await?;
        ensure!(env.microvms().get_opt("held").await?.is_none());
        Ok(())
    })
    .await
}

/// A `runv-testserver` child process.
struct Binary {
    child: tokio::process::Child,
}

impl Binary {
    /// Starts the binary and waits for its "serving" line.
    async fn start(args: &[&std::ffi::OsStr]) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_runv-testserver"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting runv-testserver")?;
        let stdout = child.stdout.take().context("runv-testserver stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("runv-testserver did not start within 30 s")??
            .context("runv-testserver exited before serving")?;
        ensure!(line.starts_with("serving http://127.0.0.1:"), "{line}");
        Ok(Self { child })
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn terminate(mut self) -> Result<()> {
        let pid = self.child.id().context("runv-testserver already exited")?;
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("runv-testserver did not exit within 30 s of SIGTERM")??;
        if !exit.success() {
            bail!("runv-testserver exited with {exit} on SIGTERM");
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_keeps_its_state_file_across_sigterm() -> Result<()> {
    bounded(async {
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let state = dir.path().join("state.json");
        let home = dir.path().join("home");
        std::fs::create_dir(&home)?;
        let args = |crds: bool| {
            let mut a: Vec<&std::ffi::OsStr> = vec![
                "--port".as_ref(),
                "0".as_ref(),
                "--kubeconfig".as_ref(),
                kubeconfig.as_os_str(),
                "--state-file".as_ref(),
                state.as_os_str(),
                "--history".as_ref(),
                "50".as_ref(),
            ];
            if crds {
                a.push("--runv-crds".as_ref());
            }
            a
        };
        let kubectl = |args: &'static [&'static str], stdin: Option<String>| {
            let (kubeconfig, home) = (kubeconfig.clone(), home.clone());
            async move { run_kubectl(&kubeconfig, &home, args, stdin.as_deref()).await }
        };
        const SHOW: &[&str] = &[
            "get", "mvm,cm", "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.uid} {.metadata.resourceVersion} {.metadata.labels}{\"\\n\"}{end}",
        ];

        let server = Binary::start(&args(true)).await?;
        kubectl(&["apply", "-f", "-"], Some(MICROVM.to_string())).await?.ok()?;
        kubectl(&["create", "configmap", "cfg", "--from-literal=k=v"], None).await?.ok()?;
        kubectl(&["label", "mvm", "hello", "kept=yes"], None).await?.ok()?;
        let before = kubectl(SHOW, None).await?.ok()?;
        ensure!(before.lines().count() == 2 && before.contains("MicroVM/hello") && before.contains("ConfigMap/cfg"), "{before}");
        server.terminate().await?;
        ensure!(state.is_file(), "SIGTERM did not write the state file");

        // Restarted without --runv-crds: the CRD comes back from the state file too.
        let server = Binary::start(&args(false)).await?;
        let after = kubectl(SHOW, None).await?.ok()?;
        ensure!(after == before, "before:\n{before}\nafter:\n{after}");
        let out = kubectl(&["get", "cm", "cfg", "-o", "jsonpath={.data.k}"], None).await?.ok()?;
        ensure!(out == "v", "{out}");
        // The version counter continues past the stored objects.
        kubectl(&["label", "mvm", "hello", "again=yes"], None).await?.ok()?;
        let out = kubectl(&["get", "mvm", "hello", "-o", "jsonpath={.metadata.resourceVersion}"], None)
            .await?
            .ok()?;
        let old_max = before
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .max()
            .unwrap_or_default();
        ensure!(out.parse::<u64>()? > old_max, "resourceVersion went back: {out} after {old_max}");
        server.terminate().await?;
        Ok(())
    })
    .await
}
