//! Conformance through the real `kubectl` binary: discovery, apply, get
//! (Table, wide, yaml), describe, wait, scale, patch, delete with finalizers,
//! and validation messages.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{Env, bounded, microvm};
use kube::api::{Patch, PatchParams};
use serde_json::json;

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
            out.code != 0 && out.stderr.contains("NotFound") || out.stderr.contains("not found"),
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
        let scale: serde_json::Value = serde_json::from_str(&out)?;
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
        ensure!(
            out.stderr.contains("spec.resources.memory: Invalid value: \"string\": spec.resources.memory must be between 16Mi and 64Gi"),
            "{}",
            out.stderr
        );
        // Schema violations get the structural message; unknown fields are refused under kubectl's strict validation.
        let bad = MICROVM.replace("vcpus: 2", "vcpus: 99");
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(&bad)).await?;
        ensure!(out.code != 0 && out.stderr.contains("spec.resources.vcpus"), "{out:?}");
        let bad = MICROVM.replace("  resources:", "  bogus: 1\n  resources:");
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(&bad)).await?;
        ensure!(out.code != 0 && out.stderr.contains("unknown field \"spec.bogus\""), "{out:?}");
        let out = env.kubectl_in(&["apply", "--validate=false", "-f", "-"], Some(&bad)).await?.ok()?;
        ensure!(out.contains("created"), "{out}");
        let out = env.kubectl(&["get", "mvm", "hello", "-o", "jsonpath={.spec}"]).await?.ok()?;
        ensure!(!out.contains("bogus") && out.contains("64Mi"), "unknown field not pruned: {out}");
        // Built-ins refuse unknown top-level fields too.
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndatta:\n  a: \"1\"\n";
        let out = env.kubectl_in(&["apply", "-f", "-"], Some(cm)).await?;
        ensure!(out.code != 0 && out.stderr.contains("unknown field \"datta\""), "{out:?}");
        // Transition rules see oldSelf.
        let api = env.microvms();
        api.patch("hello", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"nodeName": "n1"}}))).await?;
        let out = env.kubectl(&["patch", "mvm", "hello", "--type=merge", "-p", r#"{"spec":{"nodeName":"n2"}}"#]).await?;
        ensure!(out.code != 0 && out.stderr.contains("spec.nodeName is immutable"), "{out:?}");
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
