//! The `scale` subresource: the autoscaling/v1 Scale view of an object with
//! a scale subresource, and writing a Scale back through the spec path.

use serde_json::{Value, json};

use super::*;

impl State {
    /// The Scale view of an object.
    pub fn scale_of(&self, rt: &ResourceType, obj: &Value) -> Result<Value, ApiError> {
        let spec = rt.scale.as_ref().ok_or(ApiError::NoRoute)?;
        let m = &obj["metadata"];
        let mut scale = json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": { "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"] },
            "spec": { "replicas": jsonpath::find(obj, &spec.spec_replicas).cloned().unwrap_or(json!(0)) },
            "status": { "replicas": jsonpath::find(obj, &spec.status_replicas).cloned().unwrap_or(json!(0)) },
        });
        if let Some(sel) = spec
            .label_selector
            .as_ref()
            .and_then(|p| jsonpath::find(obj, p))
        {
            scale["status"]["selector"] = sel.clone();
        }
        Ok(scale)
    }

    pub(super) fn scale_to_object(
        &self,
        rt: &ResourceType,
        old: &Value,
        scale: &Value,
    ) -> Result<Value, ApiError> {
        let spec = rt.scale.as_ref().ok_or(ApiError::NoRoute)?;
        let replicas = scale["spec"]["replicas"]
            .as_i64()
            .ok_or_else(|| ApiError::Invalid {
                kind: "Scale".into(),
                group: "autoscaling".into(),
                name: old["metadata"]["name"].as_str().unwrap_or_default().into(),
                causes: vec![Cause::invalid(
                    "spec.replicas",
                    &scale["spec"]["replicas"],
                    "must be an integer",
                )],
            })?;
        if replicas < 0 {
            return Err(ApiError::Invalid {
                kind: "Scale".into(),
                group: "autoscaling".into(),
                name: old["metadata"]["name"].as_str().unwrap_or_default().into(),
                causes: vec![Cause::invalid(
                    "spec.replicas",
                    &json!(replicas),
                    "must be greater than or equal to 0",
                )],
            });
        }
        let mut obj = old.clone();
        jsonpath::set(&mut obj, &spec.spec_replicas, json!(replicas));
        obj["metadata"]["resourceVersion"] = match scale["metadata"]["resourceVersion"].as_str() {
            Some(rv) if !rv.is_empty() => json!(rv),
            _ => old["metadata"]["resourceVersion"].clone(),
        };
        Ok(obj)
    }
}
