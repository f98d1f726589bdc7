//! A VM's `imagePullSecrets`, read through the API from its namespace, as
//! kubelet reads a Pod's: `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`)
//! and the legacy `kubernetes.io/dockercfg` (`.dockercfg`). A Secret that is
//! missing or of another type is skipped with a warning, and the pull goes on
//! with the others (or anonymously), as kubelet's does.

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use crate::images::PullSecrets;

/// Pull secrets from the API, fetched on `runtime` from blocking threads.
#[derive(Clone)]
pub struct ApiSecrets {
    client: Client,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for ApiSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiSecrets")
    }
}

impl ApiSecrets {
    /// Secrets through `client`, on `runtime`.
    pub fn new(client: Client, runtime: tokio::runtime::Handle) -> Self {
        Self { client, runtime }
    }
}

/// The docker config in `secret`, if it holds one.
fn docker_config(secret: &Secret) -> Option<Vec<u8>> {
    let key = match secret.type_.as_deref() {
        Some("kubernetes.io/dockerconfigjson") => ".dockerconfigjson",
        Some("kubernetes.io/dockercfg") => ".dockercfg",
        _ => return None,
    };
    secret.data.as_ref()?.get(key).map(|b| b.0.clone())
}

impl PullSecrets for ApiSecrets {
    fn docker_configs(&self, namespace: &str, names: &[String]) -> Result<Vec<Vec<u8>>, String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut out = Vec::new();
        for name in names {
            match self.runtime.block_on(api.get_opt(name)) {
                Ok(Some(secret)) => match docker_config(&secret) {
                    Some(doc) => out.push(doc),
                    None => tracing::warn!(
                        secret = %format!("{namespace}/{name}"),
                        "an imagePullSecret is not of type kubernetes.io/dockerconfigjson; skipped"
                    ),
                },
                Ok(None) => tracing::warn!(
                    secret = %format!("{namespace}/{name}"),
                    "an imagePullSecret does not exist; pulling without it"
                ),
                Err(e) => {
                    return Err(format!(
                        "reading imagePullSecret {namespace}/{name}: {}",
                        runv_crds::retry::Chain(&e)
                    ));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, key: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(key.to_owned(), ByteString(b"{}".to_vec()))].into()),
            ..Secret::default()
        }
    }

    #[test]
    fn only_docker_config_secrets_are_read() {
        let json = secret("kubernetes.io/dockerconfigjson", ".dockerconfigjson");
        assert_eq!(docker_config(&json).as_deref(), Some(&b"{}"[..]));
        let legacy = secret("kubernetes.io/dockercfg", ".dockercfg");
        assert_eq!(docker_config(&legacy).as_deref(), Some(&b"{}"[..]));
        assert_eq!(docker_config(&secret("Opaque", ".dockerconfigjson")), None);
        assert_eq!(
            docker_config(&secret("kubernetes.io/dockerconfigjson", "other")),
            None
        );
    }
}
