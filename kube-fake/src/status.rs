//! API errors and their wire form: a `meta/v1` `Status` body with the real server's codes, reasons and
//! message shapes (`pods "x" not found`, `Operation cannot be fulfilled on ...`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, Status, StatusDetails};
use serde_json::Value;
use thiserror::Error;

/// An API request that failed; rendered as a `Status` body with `code` as the HTTP status.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason` (`NotFound`, `Conflict`, `Expired`, ...).
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details` (`name`, `kind`) when the error is about one object.
    pub details: Option<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn about(mut self, resource: &str, name: &str) -> Self {
        self.details = Some((name.to_owned(), resource.to_owned()));
        self
    }

    /// The same error with another message.
    pub fn with_message(mut self, message: String) -> Self {
        self.message = message;
        self
    }

    /// 404 `<resource> "<name>" not found`.
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found")).about(resource, name)
    }

    /// 409 `<resource> "<name>" already exists`.
    pub fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
        .about(resource, name)
    }

    /// 409 Conflict for a stale `resourceVersion` (optimistic concurrency).
    pub fn conflict(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        )
        .about(resource, name)
    }

    /// 409 Conflict with a custom message (precondition failures, UID mismatches).
    pub fn conflict_msg(resource: &str, name: &str, message: String) -> Self {
        Self::new(409, "Conflict", message).about(resource, name)
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    /// 422 Invalid.
    pub fn invalid(resource: &str, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message.into()).about(resource, name)
    }

    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message.into())
    }

    /// 401 Unauthorized.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into())
    }

    /// 410 Expired (too old resource version, expired continue token).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message.into())
    }

    /// 405 Method Not Allowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
        )
    }

    /// 415 Unsupported Media Type.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got `{content_type}`)"
            ),
        )
    }

    /// An injected failure (`fail_next`) with the reason the real server uses for that code.
    pub fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(code, reason, format!("injected failure ({code})"))
    }

    /// The `Status` object.
    pub fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code)),
            details: self.details.as_ref().map(|(name, kind)| StatusDetails {
                name: Some(name.clone()),
                kind: Some(kind.clone()),
                ..StatusDetails::default()
            }),
            message: Some(self.message.clone()),
            metadata: ListMeta::default(),
            reason: Some(self.reason.to_owned()),
            status: Some("Failure".to_owned()),
        }
    }

    /// The JSON body, with `kind: Status` and `apiVersion: v1` as the real server sends it.
    pub fn body(&self) -> Value {
        let mut body = serde_json::to_value(self.status()).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut body {
            map.insert("kind".into(), "Status".into());
            map.insert("apiVersion".into(), "v1".into());
        }
        body
    }
}
