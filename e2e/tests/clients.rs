//! Conformance through kube-rs and kube-runtime as runv's components use
//! them: CEL refusals as 422 Invalid with the rule's message and field, a
//! watch resumed from a resourceVersion read to its end, and
//! `wait::await_condition` on a status condition and a CRD.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{Env, bounded, code, create_microvm, microvm, rv};
use futures::TryStreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

/// The cause list of a 422 from kube-rs, as (field, reason, message).
fn invalid_causes(err: &kube::Error) -> Result<Vec<(String, String, String)>> {
    let kube::Error::Api(status) = err else {
        bail!("not an API error: {err}");
    };
    ensure!(
        status.code == 422 && status.reason == "Invalid",
        "want 422 Invalid, got {status:?}"
    );
    let details = status.details.as_ref().context("422 without details")?;
    Ok(details
        .causes
        .iter()
        .map(|c| (c.field.clone(), c.reason.clone(), c.message.clone()))
        .collect())
}

/// The message of an API error.
fn message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Creates `obj` and returns its refusal's causes as (field, reason, message).
async fn refusal(api: &Api<DynamicObject>, obj: Value) -> Result<Vec<(String, String, String)>> {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let err = api
        .create(&PostParams::default(), &serde_json::from_value(obj)?)
        .await
        .err()
        .with_context(|| format!("{name} was accepted"))?;
    ensure!(api.get_opt(&name).await?.is_none(), "{name} was stored");
    invalid_causes(&err)
}

/// One cause, owned.
fn cause(field: &str, reason: &str, message: String) -> (String, String, String) {
    (field.to_string(), reason.to_string(), message)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cel_violation_is_422_invalid_with_the_rule_message_and_field() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        // Every mismatch is collected, so one run reports them all.
        let mut wrong = Vec::new();
        let mut check = |got: Vec<(String, String, String)>, want: (String, String, String)| {
            if got != [want.clone()] {
                wrong.push(format!("want [{want:?}]\n got {got:?}"));
            }
        };
        // kube-apiserver words a failed rule as `<field>: Invalid value: "<type of
        // the schema node declaring the rule>": <message>`; the cause's field
        // is that node's path, extended by the rule's fieldPath.
        let kernel = common::rule_message("MicroVM", &["spec", "boot", "kernel"], "startsWith")?;
        let mut bad = microvm("bad");
        bad["spec"]["boot"]["kernel"] = json!("guests/vmlinux");
        let err = api
            .create(&PostParams::default(), &serde_json::from_value(bad)?)
            .await
            .expect_err("a relative kernel path was accepted");
        let causes = invalid_causes(&err)?;
        let want = format!("Invalid value: \"string\": {kernel}");
        check(
            causes,
            cause("spec.boot.kernel", "FieldValueInvalid", want.clone()),
        );
        let msg = message(&err);
        ensure!(
            msg == format!("MicroVM.runv.dev \"bad\" is invalid: spec.boot.kernel: {want}"),
            "{msg}"
        );
        if let kube::Error::Api(s) = &err {
            let d = s.details.as_ref().context("details")?;
            ensure!(
                d.name == "bad" && d.group == "runv.dev" && d.kind == "MicroVM",
                "{d:?}"
            );
        }
        ensure!(api.get_opt("bad").await?.is_none(), "bad was stored");

        // A rule on a list item, without and with a fieldPath.
        let disk = ["spec", "disks", "[]"];
        let one_source = common::rule_message("MicroVM", &disk, "has(self.file)")?;
        let mut bad = microvm("nodisk");
        bad["spec"]["disks"] = json!([{"name": "scratch"}]);
        let causes = refusal(&api, bad).await?;
        check(
            causes,
            cause(
                "spec.disks[0]",
                "FieldValueInvalid",
                format!("Invalid value: \"object\": {one_source}"),
            ),
        );
        let read_only = common::rule_message("MicroVM", &disk, "self.readOnly")?;
        let mut bad = microvm("disk");
        bad["spec"]["disks"] =
            json!([{"name": "scratch", "empty": {"size": "1Gi"}, "readOnly": true}]);
        let causes = refusal(&api, bad).await?;
        check(
            causes,
            cause(
                "spec.disks[0].readOnly",
                "FieldValueInvalid",
                format!("Invalid value: \"object\": {read_only}"),
            ),
        );
        // A rule's reason picks the error type: Required and Forbidden carry no value.
        let iface = ["spec", "interfaces", "[]"];
        let required = common::rule_message("MicroVM", &iface, "self.type != 'Tap'")?;
        let mut bad = microvm("tap");
        bad["spec"]["interfaces"] = json!([{"name": "eth0", "type": "Tap"}]);
        let causes = refusal(&api, bad).await?;
        check(
            causes,
            cause(
                "spec.interfaces[0].tapDevice",
                "FieldValueRequired",
                format!("Required value: {required}"),
            ),
        );
        let forbidden = common::rule_message("MicroVM", &iface, "self.type == 'Tap'")?;
        let mut bad = microvm("nat");
        bad["spec"]["interfaces"] = json!([{"name": "eth0", "type": "Nat", "tapDevice": "tap0"}]);
        let causes = refusal(&api, bad).await?;
        check(
            causes,
            cause(
                "spec.interfaces[0].tapDevice",
                "FieldValueForbidden",
                format!("Forbidden: {forbidden}"),
            ),
        );

        // A transition rule on update, declared on spec with a fieldPath, through a patch.
        let immutable = common::rule_message("MicroVM", &["spec"], "oldSelf.nodeName")?;
        create_microvm(&api, "placed").await?;
        let pm = PatchParams::default();
        api.patch(
            "placed",
            &pm,
            &Patch::Merge(&json!({"spec": {"nodeName": "n1"}})),
        )
        .await?;
        let err = api
            .patch(
                "placed",
                &pm,
                &Patch::Merge(&json!({"spec": {"nodeName": "n2"}})),
            )
            .await
            .expect_err("nodeName changed");
        let causes = invalid_causes(&err)?;
        check(
            causes,
            cause(
                "spec.nodeName",
                "FieldValueInvalid",
                format!("Invalid value: \"object\": {immutable}"),
            ),
        );
        ensure!(
            api.get("placed").await?.data["spec"]["nodeName"] == "n1",
            "the refused patch was stored"
        );
        ensure!(wrong.is_empty(), "causes differ:\n{}", wrong.join("\n"));
        Ok(())
    })
    .await
}

/// (type, name, resourceVersion) of a watch event; fails on errors and bookmarks.
fn summary(ev: &WatchEvent<DynamicObject>) -> Result<(&'static str, String, String)> {
    let (kind, o) = match ev {
        WatchEvent::Added(o) => ("ADDED", o),
        WatchEvent::Modified(o) => ("MODIFIED", o),
        WatchEvent::Deleted(o) => ("DELETED", o),
        other => bail!("unexpected event {other:?}"),
    };
    Ok((kind, o.metadata.name.clone().unwrap_or_default(), rv(o)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_resumed_from_a_resource_version_has_no_gaps_or_duplicates() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let first = create_microvm(&api, "w0").await?;
        let pm = PatchParams::default();
        let mut expected: Vec<(&'static str, String, String)> = Vec::new();
        for i in 1..8 {
            let o = create_microvm(&api, &format!("w{i}")).await?;
            expected.push(("ADDED", format!("w{i}"), rv(&o)));
        }
        let o = api
            .patch(
                "w2",
                &pm,
                &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await?;
        expected.push(("MODIFIED", "w2".into(), rv(&o)));
        let o = api
            .patch_status(
                "w0",
                &pm,
                &Patch::Merge(&json!({"status": {"phase": "Running"}})),
            )
            .await?;
        expected.push(("MODIFIED", "w0".into(), rv(&o)));
        // A write that changes nothing stores nothing and sends no event.
        api.patch(
            "w2",
            &pm,
            &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await?;
        api.delete("w3", &DeleteParams::default()).await?;
        // The deletion's version is the one the next write follows.
        let after_delete = create_microvm(&api, "w8").await?;
        let o = api
            .patch(
                "w8",
                &pm,
                &Patch::Merge(&json!({"spec": {"resources": {"vcpus": 2}}})),
            )
            .await?;

        // From the first object's version: everything after it, read to the stream's end.
        let events: Vec<_> = api
            .watch(&WatchParams::default().timeout(2), &rv(&first))
            .await?
            .try_collect()
            .await?;
        let seen = events.iter().map(summary).collect::<Result<Vec<_>>>()?;
        ensure!(seen.len() == expected.len() + 3, "{seen:?}");
        ensure!(seen[..expected.len()] == expected[..], "{seen:?}");
        let (kind, name, delete_rv) = seen[expected.len()].clone();
        ensure!(kind == "DELETED" && name == "w3", "{seen:?}");
        let last_rv = expected.last().map(|e| e.2.clone()).unwrap_or_default();
        ensure!(
            delete_rv.parse::<u64>()? > last_rv.parse::<u64>()?
                && delete_rv.parse::<u64>()? < rv(&after_delete).parse::<u64>()?,
            "the DELETED event's version {delete_rv} is not between {last_rv} and {}",
            rv(&after_delete)
        );
        ensure!(
            seen[expected.len() + 1..]
                == [
                    ("ADDED", "w8".to_string(), rv(&after_delete)),
                    ("MODIFIED", "w8".to_string(), rv(&o)),
                ],
            "{seen:?}"
        );
        // Versions strictly increase: no duplicates.
        let versions = seen
            .iter()
            .map(|e| e.2.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()?;
        ensure!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

        // Resuming from each event's version gives exactly the rest, as a
        // client that reconnects after any event sees; from the last, nothing.
        let resumes = seen.iter().map(|(_, _, from)| {
            let api = api.clone();
            async move {
                let rest: Vec<_> = api
                    .watch(&WatchParams::default().timeout(1), from)
                    .await?
                    .try_collect()
                    .await?;
                rest.iter().map(summary).collect::<Result<Vec<_>>>()
            }
        });
        let rests = futures::future::try_join_all(resumes).await?;
        for (i, rest) in rests.iter().enumerate() {
            ensure!(
                rest[..] == seen[i + 1..],
                "resumed from {}: {rest:?}",
                seen[i].2
            );
        }
        Ok(())
    })
    .await
}

fn ready_status(status: &str) -> Value {
    json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": "Test",
        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

fn is_ready(obj: Option<&DynamicObject>) -> bool {
    obj.and_then(|o| o.data["status"]["conditions"].as_array())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn await_condition_returns_when_a_status_patch_sets_ready() -> Result<()> {
    bounded(async {
        let env = Env::start(true).await?;
        let api = env.microvms();
        let created = create_microvm(&api, "r").await?;
        let setter = {
            let api = api.clone();
            tokio::spawn(async move {
                let pm = PatchParams::default();
                tokio::time::sleep(Duration::from_millis(300)).await;
                api.patch_status("r", &pm, &Patch::Merge(&ready_status("False")))
                    .await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let o = api
                    .patch_status("r", &pm, &Patch::Merge(&ready_status("True")))
                    .await?;
                Ok::<_, kube::Error>(o)
            })
        };
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            await_condition(api.clone(), "r", is_ready),
        )
        .await
        .context("await_condition did not return within 20 s")??
        .context("await_condition returned no object")?;
        let set = setter.await??;
        ensure!(is_ready(Some(&got)), "{got:?}");
        ensure!(
            rv(&got) == rv(&set),
            "returned {} not {}",
            rv(&got),
            rv(&set)
        );

        // is_deleted returns once a finalizer holding the deletion is removed.
        let uid = created.metadata.uid.clone().unwrap_or_default();
        api.patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"finalizers": ["runv.dev/hold"]}})),
        )
        .await?;
        api.delete("r", &DeleteParams::default()).await?;
        let releaser = {
            let api = api.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                api.patch(
                    "r",
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
                )
                .await
            })
        };
        tokio::time::timeout(
            Duration::from_secs(20),
            await_condition(api.clone(), "r", conditions::is_deleted(&uid)),
        )
        .await
        .context("is_deleted did not return within 20 s")??;
        releaser.await??;
        ensure!(api.get_opt("r").await?.is_none());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn await_condition_sees_a_crd_established() -> Result<()> {
    bounded(async {
        let env = Env::start(false).await?;
        let crds: Api<CustomResourceDefinition> = Api::all(env.client());
        let yaml =
            std::fs::read_to_string(common::repo().join("crds/yaml/microvms.runv.dev.yaml"))?;
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&yaml)?;
        crds.create(&PostParams::default(), &crd).await?;
        tokio::time::timeout(
            Duration::from_secs(20),
            await_condition(crds, "microvms.runv.dev", conditions::is_crd_established()),
        )
        .await
        .context("the CRD was not established within 20 s")??;
        // Its resource is served at once.
        create_microvm(&env.microvms(), "first").await?;
        let err = env
            .microvms()
            .create(
                &PostParams::default(),
                &serde_json::from_value(microvm("first"))?,
            )
            .await
            .expect_err("created twice");
        ensure!(code(&err) == Some(409), "{err}");
        Ok(())
    })
    .await
}
