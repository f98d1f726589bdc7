//! PATCH of every type, including server-side apply, on top of the update
//! path of the parent module.

use serde_json::{Value, json};

use super::*;

impl State {
    /// Applies a PATCH of any type.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        ty: PatchType,
        body: &[u8],
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<(Value, Vec<String>), ApiError> {
        if ty == PatchType::Apply {
            return self.apply(rt, ns, name, body, sub, opts);
        }
        let old = self.get(rt, ns, name)?;
        let old_shown = present(rt, &old);
        let mut target = if sub == Sub::Scale {
            self.scale_of(rt, &old_shown)?
        } else {
            old_shown.clone()
        };
        let result = match ty {
            PatchType::Merge => patch::merge(&mut target, body),
            PatchType::Json => patch::json(&mut target, body),
            PatchType::Strategic => {
                if rt.builtin == Builtin::Custom || sub == Sub::Scale {
                    return Err(ApiError::UnsupportedMediaType(
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
                    ));
                }
                patch::strategic(rt, &mut target, body)
            }
            PatchType::Apply => Ok(()),
        };
        result.map_err(|e| match e {
            patch::PatchError::Decode(_) => ApiError::BadRequest(e.to_string()),
            patch::PatchError::Apply(_) => ApiError::Invalid {
                kind: rt.kind.clone(),
                group: rt.group.clone(),
                name: name.into(),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    field: String::new(),
                    message: e.to_string(),
                }],
            },
        })?;
        let mut new = if sub == Sub::Scale {
            self.scale_to_object(rt, &old_shown, &target)?
        } else {
            target
        };
        Self::check_type(rt, &mut new)?;
        if new["metadata"]["resourceVersion"] != old_shown["metadata"]["resourceVersion"]
            && new["metadata"]["resourceVersion"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        {
            return Err(conflict(rt, name));
        }
        new["metadata"]["resourceVersion"] = old_shown["metadata"]["resourceVersion"].clone();
        if new["metadata"]["uid"] != old_shown["metadata"]["uid"]
            && !new["metadata"]["uid"].is_null()
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                detail: "Precondition failed: UID in precondition does not match".into(),
            });
        }
        self.write_update(rt, &old_shown, new, sub, opts, false)
    }

    pub(super) fn apply(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: &[u8],
        sub: Sub,
        opts: &WriteOpts,
    ) -> Result<(Value, Vec<String>), ApiError> {
        if opts.manager.is_empty() || opts.manager == "__default" {
            return Err(ApiError::Invalid {
                kind: rt.kind.clone(),
                group: rt.group.clone(),
                name: name.into(),
                causes: vec![Cause {
                    reason: "FieldValueRequired".into(),
                    field: "fieldManager".into(),
                    message: "Required value: is required for apply patch".into(),
                }],
            });
        }
        let text = std::str::from_utf8(body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut cfg: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?;
        if sub == Sub::Scale {
            return Err(ApiError::UnsupportedMediaType(
                "application/json-patch+json, application/merge-patch+json".into(),
            ));
        }
        if cfg["apiVersion"].as_str().unwrap_or_default().is_empty()
            || cfg["kind"].as_str().unwrap_or_default().is_empty()
        {
            return Err(ApiError::BadRequest(
                "invalid object type: apiVersion and kind must be set".into(),
            ));
        }
        Self::check_type(rt, &mut cfg)?;
        if cfg["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                cfg["metadata"]["name"].as_str().unwrap_or_default()
            )));
        }
        cfg["metadata"]["name"] = json!(name);
        let existing = self.store.get(&kinds::store_key(rt), ns, name);
        let Some(old) = existing else {
            if sub != Sub::Main {
                return Err(not_found(rt, name));
            }
            let merged = managed::apply(rt, None, &cfg, &opts.manager, "", opts.force, &now())?;
            let mut create_opts = opts.clone();
            create_opts.manager = "__apply".into();
            return self.create(rt, ns, merged, &create_opts);
        };
        let old_shown = present(rt, &old);
        if let Some(rv) = cfg["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old_shown["metadata"]["resourceVersion"].as_str()
        {
            return Err(conflict(rt, name));
        }
        let mut merged = managed::apply(
            rt,
            Some(&old_shown),
            &cfg,
            &opts.manager,
            sub.name(),
            opts.force,
            &now(),
        )?;
        merged["metadata"]["resourceVersion"] = old_shown["metadata"]["resourceVersion"].clone();
        self.write_update(rt, &old_shown, merged, sub, opts, true)
    }
}
