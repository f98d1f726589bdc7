//! DELETE and deletecollection: preconditions, propagation policies,
//! finalizers and deletionTimestamp, namespace termination.

use serde_json::{Value, json};

use super::*;

impl State {
    /// Deletes an object; returns the HTTP code and body.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(u16, Value), ApiError> {
        let old = self.get(rt, ns, name)?;
        if let Some(uid) = &opts.uid
            && old["metadata"]["uid"].as_str() != Some(uid)
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                detail: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            });
        }
        if let Some(rv) = &opts.resource_version
            && old["metadata"]["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::Conflict {
                resource: rt.qualified(),
                name: name.into(),
                detail: format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    old["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                ),
            });
        }
        if rt.builtin == Builtin::Namespace
            && ["default", "kube-system", "kube-public"].contains(&name)
        {
            return Err(ApiError::Forbidden(format!(
                "namespaces {name:?} is forbidden: this namespace may not be deleted"
            )));
        }
        let mut obj = present(rt, &old);
        let mut fins = finalizers(&obj);
        match opts.propagation.as_deref() {
            None | Some("Background") => {}
            Some("Foreground") => {
                if !fins.iter().any(|f| f == "foregroundDeletion") {
                    fins.push("foregroundDeletion".into());
                }
            }
            Some("Orphan") => {
                if !fins.iter().any(|f| f == "orphan") {
                    fins.push("orphan".into());
                }
            }
            Some(other) => {
                return Err(ApiError::Invalid {
                    kind: "DeleteOptions".into(),
                    group: String::new(),
                    name: String::new(),
                    causes: vec![Cause {
                        reason: "FieldValueNotSupported".into(),
                        field: "propagationPolicy".into(),
                        message: format!(
                            "Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                        ),
                    }],
                });
            }
        }
        if rt.builtin == Builtin::Namespace {
            // The namespace lifecycle controller (gc) empties it and then removes it.
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                obj["status"] = json!({ "phase": "Terminating" });
                if !fins.is_empty() {
                    obj["metadata"]["finalizers"] = json!(fins);
                }
                if opts.dry_run {
                    return Ok((200, obj));
                }
                let stored = self
                    .store
                    .put(&kinds::store_key(rt), kinds::convert_in(rt, &obj));
                return Ok((200, present(rt, &stored)));
            }
            return Ok((200, obj));
        }
        if !fins.is_empty() {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
                obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                if rt.has_generation() {
                    let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                    obj["metadata"]["generation"] = json!(g + 1);
                }
            }
            obj["metadata"]["finalizers"] = json!(fins);
            if opts.dry_run || without_volatile(&obj) == without_volatile(&present(rt, &old)) {
                return Ok((200, obj));
            }
            let stored = self
                .store
                .put(&kinds::store_key(rt), kinds::convert_in(rt, &obj));
            return Ok((200, present(rt, &stored)));
        }
        if opts.dry_run {
            return Ok((
                200,
                status::success(
                    &rt.qualified(),
                    name,
                    old["metadata"]["uid"].as_str().unwrap_or_default(),
                ),
            ));
        }
        let gone = self
            .store
            .remove(&kinds::store_key(rt), ns, name)
            .ok_or_else(|| not_found(rt, name))?;
        kinds::after_delete(self, rt, &gone);
        Ok((
            200,
            status::success(
                &rt.qualified(),
                name,
                gone["metadata"]["uid"].as_str().unwrap_or_default(),
            ),
        ))
    }

    /// Deletes every object a list query selects; returns them as a list.
    pub fn delete_collection(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        q: &ListQuery,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let q = ListQuery {
            limit: 0,
            continue_token: None,
            ..q.clone()
        };
        let (items, _) = self.list(rt, ns, &q)?;
        let mut deleted = Vec::new();
        for item in items {
            let (n, name) = crate::store::key_of(&item);
            match self.delete(rt, &n, &name, opts) {
                Ok(_) | Err(ApiError::NotFound { .. }) => deleted.push(present(rt, &item)),
                Err(e) => return Err(e),
            }
        }
        Ok(json!({
            "kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
            "metadata": { "resourceVersion": self.store.rv().to_string() },
            "items": deleted,
        }))
    }

    /// Removes a finalizer from a stored object, deleting it when it was the last one on a deleting object.
    pub fn remove_finalizer(&mut self, rt: &ResourceType, obj: &Value, finalizer: &str) {
        let mut new = present(rt, obj);
        let fins: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        new["metadata"]["finalizers"] = json!(fins);
        if fins.is_empty()
            && let Some(m) = new["metadata"].as_object_mut()
        {
            m.remove("finalizers");
        }
        let opts = WriteOpts {
            dry_run: false,
            manager: "runv-testserver-gc".into(),
            validation: FieldValidation::Ignore,
            force: false,
        };
        let old = present(rt, obj);
        let _ = self.write_update(rt, &old, new, Sub::Main, &opts, false);
    }
}
