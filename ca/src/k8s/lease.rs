//! The root-rotation Lease (`meshward-ca-rotation`, coordination.k8s.io/v1): only the replica that
//! holds it performs prepare/activate/retire; the others reload what it wrote.
//!
//! Acquire = create the Lease, or take it over when its holder stopped renewing for longer than the
//! lease duration, or renew it when already ours — always naming the resourceVersion read, so two
//! replicas racing for it cannot both win (the loser gets 409 and is told "not yours").

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use super::{Cluster, K8sError};

/// The Lease coordinating root rotation.
pub const ROTATION_LEASE: &str = "meshward-ca-rotation";

impl Cluster {
    /// Tries to hold the rotation Lease in `namespace` as `holder` for `duration` from `now`; `true`
    /// when this replica holds it now (newly or renewed), `false` when another live replica does.
    pub async fn acquire_rotation_lease(
        &self,
        namespace: &str,
        holder: &str,
        duration: Duration,
        now: SystemTime,
    ) -> Result<bool, K8sError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let now_ts = Timestamp::try_from(now).map_err(|e| K8sError::Api {
            doing: "read the clock",
            reason: e.to_string(),
        })?;
        let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let current = api
            .get_opt(ROTATION_LEASE)
            .await
            .map_err(|e| K8sError::api("read the rotation lease", e))?;
        let written = match current {
            None => {
                let lease = lease(holder, seconds, now_ts, now_ts, 0, None);
                api.create(&PostParams::default(), &lease).await
            }
            Some(current) => {
                let spec = current.spec.unwrap_or_default();
                let ours = spec.holder_identity.as_deref() == Some(holder);
                let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
                let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
                    let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(0));
                    renewed.0.as_second().saturating_add(lasts) <= now_ts.as_second()
                });
                if !(ours || free || expired) {
                    return Ok(false);
                }
                let transitions = spec.lease_transitions.unwrap_or(0);
                let (acquired, transitions) = match (ours, spec.acquire_time) {
                    (true, Some(acquired)) => (acquired.0, transitions),
                    _ => (now_ts, transitions.saturating_add(1)),
                };
                let lease = lease(
                    holder,
                    seconds,
                    acquired,
                    now_ts,
                    transitions,
                    current.metadata.resource_version,
                );
                api.replace(ROTATION_LEASE, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            // Another replica created or updated it between our read and write: it won.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(K8sError::api("write the rotation lease", e)),
        }
    }

    /// Who holds the rotation Lease in `namespace` now (`None`: nobody, or it does not exist).
    pub async fn rotation_lease_holder(&self, namespace: &str) -> Result<Option<String>, K8sError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let lease = api
            .get_opt(ROTATION_LEASE)
            .await
            .map_err(|e| K8sError::api("read the rotation lease", e))?;
        Ok(lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    }

    /// Gives the rotation Lease up if `holder` holds it (so another replica need not wait it out).
    pub async fn release_rotation_lease(
        &self,
        namespace: &str,
        holder: &str,
    ) -> Result<(), K8sError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let Some(mut current) = api
            .get_opt(ROTATION_LEASE)
            .await
            .map_err(|e| K8sError::api("read the rotation lease", e))?
        else {
            return Ok(());
        };
        let spec = current.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(holder) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match api
            .replace(ROTATION_LEASE, &PostParams::default(), &current)
            .await
        {
            // 409: someone else took it meanwhile, which is what releasing is for.
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(K8sError::api("release the rotation lease", e)),
        }
    }
}

fn lease(
    holder: &str,
    seconds: i32,
    acquired: Timestamp,
    renewed: Timestamp,
    transitions: i32,
    resource_version: Option<String>,
) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(ROTATION_LEASE.to_owned()),
            resource_version,
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}
