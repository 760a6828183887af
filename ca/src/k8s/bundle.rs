//! The trust bundle published to a ConfigMap of the CA's namespace (`meshward-bundle`: `bundle.pem`,
//! `jwks.json`) on every change, for workloads and tools that read trust from the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Cluster, K8sError};
use crate::keystore::SigningState;

/// The ConfigMap holding the published trust bundle.
pub const BUNDLE_CONFIGMAP: &str = "meshward-bundle";
/// Its key with the X.509 roots, PEM.
pub const BUNDLE_PEM_KEY: &str = "bundle.pem";
/// Its key with the JWT keys, JWKS.
pub const JWKS_KEY: &str = "jwks.json";

/// How long to wait before publishing again after a failure.
const RETRY: Duration = Duration::from_secs(5);

/// Most attempts of one publication (each 409 means another replica wrote in between).
const MAX_ATTEMPTS: usize = 8;

impl Cluster {
    /// Writes `state`'s bundle to the ConfigMap in `namespace` (creating it; a no-op when it already
    /// says the same). Replicas publishing at once: a 409 re-reads and tries again.
    pub async fn publish_bundle(
        &self,
        namespace: &str,
        state: &SigningState,
    ) -> Result<(), K8sError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let jwks =
            String::from_utf8(state.jwt_bundle.to_jwks_json()).map_err(|e| K8sError::Api {
                doing: "encode the jwks",
                reason: e.to_string(),
            })?;
        let data = BTreeMap::from([
            (BUNDLE_PEM_KEY.to_owned(), state.bundle.to_pem()),
            (JWKS_KEY.to_owned(), jwks),
        ]);
        for _ in 0..MAX_ATTEMPTS {
            let current = api
                .get_opt(BUNDLE_CONFIGMAP)
                .await
                .map_err(|e| K8sError::api("read the bundle configmap", e))?;
            let written = match current {
                Some(current) if current.data.as_ref() == Some(&data) => return Ok(()),
                Some(current) => {
                    let map = config_map(data.clone(), current.metadata.resource_version);
                    api.replace(BUNDLE_CONFIGMAP, &PostParams::default(), &map)
                        .await
                }
                None => {
                    api.create(&PostParams::default(), &config_map(data.clone(), None))
                        .await
                }
            };
            match written {
                Ok(_) => {
                    tracing::info!(
                        namespace,
                        sequence = state.sequence,
                        "trust bundle published"
                    );
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(K8sError::api("write the bundle configmap", e)),
            }
        }
        Err(K8sError::Api {
            doing: "write the bundle configmap",
            reason: format!("still conflicting after `{MAX_ATTEMPTS}` attempts"),
        })
    }

    /// Publishes the current bundle, then every change `states` brings, until `shutdown`; a failed
    /// publication is retried every few seconds until it lands or a newer bundle replaces it.
    pub async fn publish_bundles(
        self,
        namespace: String,
        mut states: watch::Receiver<Arc<SigningState>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let state = Arc::clone(&states.borrow_and_update());
            let wait = match self.publish_bundle(&namespace, &state).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "could not publish the trust bundle; retrying");
                    Some(RETRY)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = states.changed() => if changed.is_err() { return },
                () = sleep_or_forever(wait) => {}
            }
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn config_map(data: BTreeMap<String, String>, resource_version: Option<String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(BUNDLE_CONFIGMAP.to_owned()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "meshward-ca".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}
