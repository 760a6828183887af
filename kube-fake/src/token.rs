//! Service-account tokens: TokenRequest (`serviceaccounts/<sa>/token`) issues pod-bound JWTs and
//! TokenReview checks them the way the real server does.
//!
//! The JWTs are HS256 under a per-server random key (the real server uses RS256; nothing outside the
//! fake verifies them), with the real claim layout: `iss`, `sub`, `aud`, `exp`, `iat`, `nbf`, `jti` and
//! `kubernetes.io: {namespace, serviceaccount, pod, node?}`. A review is always HTTP 201; a bad token
//! gets `status.error` and no `authenticated`. Positive reviews are cached for a TTL (10 s by default,
//! like the real server), so a deleted pod's token keeps reviewing valid that long.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenReview, TokenReviewStatus, UserInfo,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::kind;
use crate::object;
use crate::status::ApiError;
use crate::store::Store;

/// The audiences the fake API server accepts by default, as `scripts/kube-apiserver` configures the
/// real one (`--api-audiences`).
pub const API_AUDIENCES: [&str; 2] = ["meshward-ca", "https://kubernetes.default.svc"];

/// The `iss` claim.
const ISSUER: &str = "https://kubernetes.default.svc";

/// Extra keys in a positive review.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The bound pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// The bound pod's node name (newer servers only; see `with_node_extras`).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The bound pod's node UID (newer servers only).
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
/// `JTI=<jti>` (newer servers only).
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// Token issuing and review state.
pub(crate) struct Tokens {
    key: ring::hmac::Key,
    cache: HashMap<(String, Vec<String>), (TokenReviewStatus, Instant)>,
    /// How long positive reviews are cached; zero disables the cache.
    pub cache_ttl: Duration,
    /// Whether tokens carry the node and reviews answer the node-name/node-uid/credential-id extras.
    pub node_extras: bool,
}

impl Tokens {
    pub fn new(cache_ttl: Duration, node_extras: bool) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &object::random_bytes::<32>()),
            cache: HashMap::new(),
            cache_ttl,
            node_extras,
        }
    }

    /// POST `serviceaccounts/<sa>/token`: the `TokenRequest` answer (201) with `status.token`.
    pub fn request(
        &self,
        store: &Store,
        namespace: &str,
        sa: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let request: TokenRequest = serde_json::from_value(body.clone())
            .map_err(|e| ApiError::bad_request(format!("decoding TokenRequest: {e}")))?;
        let sa_kind = kind::core("serviceaccounts")
            .ok_or_else(|| ApiError::not_found("serviceaccounts", sa))?;
        let pods = kind::core("pods").ok_or_else(|| ApiError::not_found("pods", sa))?;
        let nodes = kind::core("nodes").ok_or_else(|| ApiError::not_found("nodes", sa))?;
        let sa_uid = store
            .uid_of(sa_kind, namespace, sa)
            .ok_or_else(|| ApiError::not_found("serviceaccounts", sa))?;
        let expiration = request.spec.expiration_seconds.unwrap_or(3600);
        if expiration < 600 {
            return Err(ApiError::invalid(
                "tokenrequests",
                sa,
                format!(
                    "spec.expirationSeconds: Invalid value: {expiration}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        if expiration > 1 << 32 {
            return Err(ApiError::invalid(
                "tokenrequests",
                sa,
                format!(
                    "spec.expirationSeconds: Invalid value: {expiration}: may not specify a duration larger than 2^32 seconds"
                ),
            ));
        }
        let audiences = if request.spec.audiences.is_empty() {
            API_AUDIENCES.iter().map(|a| (*a).to_owned()).collect()
        } else {
            request.spec.audiences.clone()
        };
        let mut k8s = serde_json::Map::new();
        k8s.insert("namespace".into(), namespace.into());
        k8s.insert("serviceaccount".into(), json!({"name": sa, "uid": sa_uid}));
        if let Some(bound) = &request.spec.bound_object_ref {
            let bound_kind = bound.kind.as_deref().unwrap_or_default();
            let name = bound.name.as_deref().unwrap_or_default();
            if bound_kind != "Pod" {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of type `{bound_kind}`: the fake binds tokens to pods only"
                )));
            }
            let pod = store.get(pods, Some(namespace), name)?;
            let pod_uid = pod
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(want) = bound.uid.as_deref().filter(|u| !u.is_empty())
                && want != pod_uid
            {
                return Err(ApiError::conflict_msg(
                    "pods",
                    name,
                    format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                ));
            }
            let pod_sa = pod
                .pointer("/spec/serviceAccountName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if pod_sa != sa {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token for serviceaccount \"{sa}\" to pod running with different serviceaccount name."
                )));
            }
            k8s.insert("pod".into(), json!({"name": name, "uid": pod_uid}));
            let node = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if self.node_extras && !node.is_empty() {
                let node_uid = store.uid_of(nodes, "", node).unwrap_or_default();
                k8s.insert("node".into(), json!({"name": node, "uid": node_uid}));
            }
        }
        let now = unix_now();
        let claims = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "aud": &audiences,
            "exp": now + expiration,
            "iat": now,
            "nbf": now,
            "jti": object::new_uid(),
            "kubernetes.io": Value::Object(k8s),
        });
        let token = self.sign(&claims);
        let expires = time::OffsetDateTime::from_unix_timestamp(now + expiration)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": sa, "namespace": namespace, "creationTimestamp": object::now_rfc3339()},
            "spec": {
                "audiences": audiences,
                "boundObjectRef": request.spec.bound_object_ref,
                "expirationSeconds": expiration,
            },
            "status": {"token": token, "expirationTimestamp": object::rfc3339(expires)},
        }))
    }

    /// POST `tokenreviews`: the `TokenReview` answer (always 201 for a well-formed body).
    pub fn review(&mut self, store: &Store, body: &Value) -> Result<Value, ApiError> {
        let review: TokenReview = serde_json::from_value(body.clone())
            .map_err(|e| ApiError::bad_request(format!("decoding TokenReview: {e}")))?;
        let token = review.spec.token.clone().unwrap_or_default();
        let mut audiences = review.spec.audiences.clone().unwrap_or_default();
        if audiences.is_empty() {
            audiences = API_AUDIENCES.iter().map(|a| (*a).to_owned()).collect();
        }
        let key = (token.clone(), sorted(&audiences));
        let cached = self
            .cache
            .get(&key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(status, _)| status.clone());
        let status = match cached {
            Some(status) => status,
            None => match self.validate(store, &token, &audiences) {
                Ok(status) => {
                    if !self.cache_ttl.is_zero() {
                        self.cache
                            .insert(key, (status.clone(), Instant::now() + self.cache_ttl));
                    }
                    status
                }
                Err(reason) => TokenReviewStatus {
                    error: Some(format!("[invalid bearer token, {reason}]")),
                    // The real server sends `"user": {}` and omits `authenticated` (false).
                    user: Some(UserInfo::default()),
                    ..TokenReviewStatus::default()
                },
            },
        };
        Ok(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": null},
            "spec": review.spec,
            "status": status,
        }))
    }

    /// Whether `token` is a valid service-account token for the API audiences (used as a bearer token).
    pub fn authenticates(&self, store: &Store, token: &str) -> bool {
        let audiences: Vec<String> = API_AUDIENCES.iter().map(|a| (*a).to_owned()).collect();
        self.validate(store, token, &audiences).is_ok()
    }

    /// Forgets cached reviews.
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    fn sign(&self, claims: &Value) -> String {
        let header = URL_SAFE_NO_PAD
            .encode(json!({"alg": "HS256", "kid": "meshward-kube-fake", "typ": "JWT"}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let tag = ring::hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    // The failure reason is what the real server puts after "invalid bearer token, ".
    fn validate(
        &self,
        store: &Store,
        token: &str,
        audiences: &[String],
    ) -> Result<TokenReviewStatus, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("compact JWS format must have three parts".into());
        };
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| "illegal base64 data in signature".to_owned())?;
        ring::hmac::verify(&self.key, format!("{header}.{payload}").as_bytes(), &sig)
            .map_err(|_| "square/go-jose: error in cryptographic primitive".to_owned())?;
        let claims: Value = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or_else(|| "malformed claims".to_owned())?;
        let now = unix_now();
        if claims
            .get("exp")
            .and_then(Value::as_i64)
            .is_none_or(|exp| exp <= now)
        {
            return Err("Token has expired.".into());
        }
        if claims
            .get("nbf")
            .and_then(Value::as_i64)
            .is_some_and(|nbf| nbf > now + 60)
        {
            return Err("Token used before issued".into());
        }
        let token_aud: Vec<String> = claims
            .get("aud")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let granted: Vec<String> = audiences
            .iter()
            .filter(|a| token_aud.contains(a))
            .cloned()
            .collect();
        if granted.is_empty() {
            return Err(format!(
                "token audiences {token_aud:?} is invalid for the target audiences {audiences:?}"
            ));
        }
        let claim = |pointer: &str| claims.pointer(&format!("/kubernetes.io{pointer}"));
        let ns = claim("/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let sa = claim("/serviceaccount/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let sa_uid = claim("/serviceaccount/uid").and_then(Value::as_str);
        let sa_kind = kind::core("serviceaccounts").ok_or("no serviceaccounts kind")?;
        match store.uid_of(sa_kind, ns, sa) {
            Some(uid) if Some(uid.as_str()) == sa_uid => {}
            Some(uid) => return Err(format!("service account UID ({uid}) does not match claim")),
            None => return Err(format!("serviceaccounts \"{sa}\" not found")),
        }
        let mut extra = BTreeMap::new();
        if let Some(pod) = claim("/pod").and_then(Value::as_object) {
            let name = pod.get("name").and_then(Value::as_str).unwrap_or_default();
            let claimed = pod.get("uid").and_then(Value::as_str).unwrap_or_default();
            let pods = kind::core("pods").ok_or("no pods kind")?;
            match store.uid_of(pods, ns, name) {
                Some(uid) if uid == claimed => {}
                Some(uid) => {
                    return Err(format!("pod UID ({uid}) does not match claim ({claimed})"));
                }
                None => return Err(format!("pods \"{name}\" not found")),
            }
            extra.insert(EXTRA_POD_NAME.to_owned(), vec![name.to_owned()]);
            extra.insert(EXTRA_POD_UID.to_owned(), vec![claimed.to_owned()]);
        }
        if self.node_extras {
            if let Some(node) = claim("/node").and_then(Value::as_object) {
                let name = node.get("name").and_then(Value::as_str).unwrap_or_default();
                extra.insert(EXTRA_NODE_NAME.to_owned(), vec![name.to_owned()]);
                if let Some(uid) = node
                    .get("uid")
                    .and_then(Value::as_str)
                    .filter(|u| !u.is_empty())
                {
                    extra.insert(EXTRA_NODE_UID.to_owned(), vec![uid.to_owned()]);
                }
            }
            if let Some(jti) = claims.get("jti").and_then(Value::as_str) {
                extra.insert(EXTRA_CREDENTIAL_ID.to_owned(), vec![format!("JTI={jti}")]);
            }
        }
        Ok(TokenReviewStatus {
            audiences: Some(granted),
            authenticated: Some(true),
            error: None,
            user: Some(UserInfo {
                username: Some(format!("system:serviceaccount:{ns}:{sa}")),
                uid: sa_uid.map(str::to_owned),
                groups: Some(vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".to_owned(),
                ]),
                extra: (!extra.is_empty()).then_some(extra),
            }),
        })
    }
}

fn sorted(audiences: &[String]) -> Vec<String> {
    let mut v = audiences.to_vec();
    v.sort();
    v
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
