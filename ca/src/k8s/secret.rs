//! The CA's key material in a Secret of its namespace (`meshward-ca-keys`), shared by replicas.
//!
//! First start: read it; if absent, create it from freshly generated material; if the create loses
//! a race (409 AlreadyExists), adopt what the winner wrote — so replicas starting together end with
//! ONE key. Updates carry the resourceVersion read; a 409 Conflict means another replica wrote first:
//! re-read, re-apply the change to what is there now, retry.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use super::{Cluster, K8sError};

/// The Secret holding the CA's keys.
pub const KEYS_SECRET: &str = "meshward-ca-keys";

/// Most attempts of a read-modify-write before giving up (each lost race means progress elsewhere).
const MAX_ATTEMPTS: usize = 8;

/// The Secret's data: file name -> bytes.
pub type KeyFiles = BTreeMap<String, Vec<u8>>;

/// The keys Secret as last read.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKeys {
    /// Its data.
    pub files: KeyFiles,
    /// The resourceVersion it was read at (what an update must name).
    pub resource_version: String,
    /// Whether this replica created it (false: adopted another replica's).
    pub created: bool,
}

impl std::fmt::Debug for StoredKeys {
    // Never log key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKeys")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("resource_version", &self.resource_version)
            .field("created", &self.created)
            .finish()
    }
}

impl Cluster {
    /// Reads the keys Secret in `namespace`, creating it from `generate()` if absent; a lost create
    /// race adopts the winner's keys (`generate`'s material is then dropped, never used).
    pub async fn load_or_create_keys<E: From<K8sError>>(
        &self,
        namespace: &str,
        generate: impl FnOnce() -> Result<KeyFiles, E>,
    ) -> Result<StoredKeys, E> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        if let Some(found) = read(&api).await? {
            return Ok(found);
        }
        let files = generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(KEYS_SECRET.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "meshward-ca".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(to_data(files)),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                let mut stored = from_secret(created)?;
                stored.created = true;
                tracing::info!(namespace, secret = KEYS_SECRET, "ca keys created");
                Ok(stored)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::info!(
                    namespace,
                    secret = KEYS_SECRET,
                    "another replica created the ca keys first; adopting them"
                );
                Ok(read(&api).await?.ok_or_else(|| K8sError::Api {
                    doing: "read the ca keys secret after losing the create race",
                    reason: "it was deleted again".to_owned(),
                })?)
            }
            Err(e) => Err(K8sError::api("create the ca keys secret", e).into()),
        }
    }

    /// Read-modify-write of the keys Secret: `change` maps the current files to the new ones; a
    /// conflicting write by another replica makes it re-read and re-apply `change`.
    ///
    /// `change` may refuse with its own error `E` (a rotation step out of order); nothing is written
    /// then.
    pub async fn update_keys<E: From<K8sError>>(
        &self,
        namespace: &str,
        mut change: impl FnMut(&KeyFiles) -> Result<KeyFiles, E>,
    ) -> Result<StoredKeys, E> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        for _ in 0..MAX_ATTEMPTS {
            let current = read(&api).await?.ok_or_else(|| K8sError::Api {
                doing: "update the ca keys secret",
                reason: format!("secret `{namespace}/{KEYS_SECRET}` does not exist"),
            })?;
            let files = change(&current.files)?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(KEYS_SECRET.to_owned()),
                    resource_version: Some(current.resource_version.clone()),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(to_data(files)),
                ..Secret::default()
            };
            match api
                .replace(KEYS_SECRET, &PostParams::default(), &secret)
                .await
            {
                Ok(written) => return Ok(from_secret(written)?),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::debug!(namespace, "ca keys secret changed under us; retrying");
                }
                Err(e) => return Err(K8sError::api("update the ca keys secret", e).into()),
            }
        }
        Err(K8sError::Api {
            doing: "update the ca keys secret",
            reason: format!("still conflicting after `{MAX_ATTEMPTS}` attempts"),
        }
        .into())
    }

    /// Reads the keys Secret in `namespace` as it is now (`None`: it does not exist).
    pub async fn read_keys(&self, namespace: &str) -> Result<Option<StoredKeys>, K8sError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        read(&api).await
    }
}

async fn read(api: &Api<Secret>) -> Result<Option<StoredKeys>, K8sError> {
    api.get_opt(KEYS_SECRET)
        .await
        .map_err(|e| K8sError::api("read the ca keys secret", e))?
        .map(from_secret)
        .transpose()
}

fn from_secret(secret: Secret) -> Result<StoredKeys, K8sError> {
    let resource_version = secret
        .metadata
        .resource_version
        .ok_or_else(|| K8sError::Api {
            doing: "read the ca keys secret",
            reason: "the apiserver returned it without a resourceVersion".to_owned(),
        })?;
    let files = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(name, bytes)| (name, bytes.0))
        .collect();
    Ok(StoredKeys {
        files,
        resource_version,
        created: false,
    })
}

fn to_data(files: KeyFiles) -> BTreeMap<String, ByteString> {
    files
        .into_iter()
        .map(|(name, bytes)| (name, ByteString(bytes)))
        .collect()
}
