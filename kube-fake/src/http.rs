//! The HTTP side: authentication, fault injection, URL routing and the wire encoding of answers
//! (objects, lists, `Status` errors, chunked watch streams of newline-delimited events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::kind::{self, Kind};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{DeleteOptions, Filter, PatchMode};
use crate::{RequestRecord, Shared};

/// The response body type: whole JSON documents or an endless watch stream.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// The real server's request body limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Answers one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    if matches!(path.as_str(), "/readyz" | "/healthz" | "/livez") {
        return Ok(text(StatusCode::OK, "ok"));
    }
    let (fault, delay) = {
        let mut state = shared.lock();
        state.log.push(RequestRecord {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
        });
        (state.faults.take(&path), state.faults.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = fault {
        return Ok(error(&ApiError::injected(code)));
    }
    if !authenticated(&shared, req.headers()) {
        return Ok(error(&ApiError::unauthorized()));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            ))));
        }
    };
    let params = Params::parse(&query);
    match route(&shared, &method, &path, &params, &content_type, &body) {
        Ok(Answer::Json(code, value)) => Ok(json_response(code, &value)),
        Ok(Answer::Watch(filter, from, bookmarks)) => {
            Ok(watch(&shared, filter, from, bookmarks, &params))
        }
        Err(e) => Ok(error(&e)),
    }
}

enum Answer {
    Json(StatusCode, Value),
    Watch(Filter, Option<u64>, bool),
}

/// The query string, percent-decoded (kube sends `?&a=b`; empty pairs are skipped).
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Self {
        Self(
            form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Where a URL points, after the group/version prefix.
enum Target<'a> {
    /// `/<resource>`: a cluster-scoped collection, or a namespaced kind across all namespaces.
    Collection {
        kind: &'static Kind,
        namespace: Option<&'a str>,
    },
    /// `/<resource>/<name>[/<sub>]` or `/namespaces/<ns>/<resource>/<name>[/<sub>]`.
    Item {
        kind: &'static Kind,
        namespace: Option<&'a str>,
        name: &'a str,
        sub: Option<&'a str>,
    },
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    TokenReviews,
}

fn parse_target<'a>(path: &'a str) -> Result<Target<'a>, ApiError> {
    let not_found = || {
        ApiError::not_found("", path).with_message(format!(
            "the server could not find the requested resource (`{path}`)"
        ))
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest): (String, &[&str]) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(not_found()),
    };
    let find = |resource: &str| kind::lookup(&group_version, resource).ok_or_else(not_found);
    match rest {
        ["tokenreviews"] if group_version == "authentication.k8s.io/v1" => Ok(Target::TokenReviews),
        ["namespaces", ns, resource] => {
            let kind = find(resource)?;
            Ok(Target::Collection {
                kind,
                namespace: Some(ns),
            })
        }
        ["namespaces", ns, resource, name, sub @ ..] if sub.len() <= 1 => {
            let kind = find(resource)?;
            Ok(Target::Item {
                kind,
                namespace: Some(ns),
                name,
                sub: sub.first().copied(),
            })
        }
        [resource] => Ok(Target::Collection {
            kind: find(resource)?,
            namespace: None,
        }),
        [resource, name, sub @ ..] if sub.len() <= 1 => {
            let kind = find(resource)?;
            if kind.namespaced {
                return Err(not_found());
            }
            Ok(Target::Item {
                kind,
                namespace: None,
                name,
                sub: sub.first().copied(),
            })
        }
        _ => Err(not_found()),
    }
}

fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    params: &Params,
    content_type: &str,
    body: &[u8],
) -> Result<Answer, ApiError> {
    if params.get("dryRun").is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the fake api server (use the real one)",
        ));
    }
    match parse_target(path)? {
        Target::TokenReviews => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = parse_json(body)?;
            let mut state = shared.lock();
            let state = &mut *state;
            let answer = state.tokens.review(&state.store, &body)?;
            Ok(Answer::Json(StatusCode::CREATED, answer))
        }
        Target::Collection { kind, namespace } => match *method {
            Method::GET => {
                let filter = Filter {
                    kind,
                    namespace: namespace.map(str::to_owned),
                    labels: LabelSelector::parse(params.get("labelSelector").unwrap_or_default())
                        .map_err(|e| ApiError::bad_request(e.to_string()))?,
                    fields: FieldSelector::parse(
                        params.get("fieldSelector").unwrap_or_default(),
                        kind.field_labels,
                    )
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                };
                if params.flag("watch") {
                    let from = match params.get("resourceVersion").unwrap_or_default() {
                        "" => None,
                        rv => Some(rv.parse::<u64>().map_err(|_| {
                            ApiError::bad_request(format!("invalid resource version: `{rv}`"))
                        })?),
                    };
                    return Ok(Answer::Watch(
                        filter,
                        from,
                        params.flag("allowWatchBookmarks"),
                    ));
                }
                let limit = params.get("limit").and_then(|l| l.parse::<usize>().ok());
                let page = shared.lock().store.list(
                    &filter,
                    limit,
                    params.get("continue").filter(|c| !c.is_empty()),
                )?;
                let items: Vec<Value> = page.items.into_iter().map(strip_type).collect();
                let metadata = match page.continue_token {
                    Some(token) => {
                        json!({"resourceVersion": page.resource_version.to_string(), "continue": token})
                    }
                    None => json!({"resourceVersion": page.resource_version.to_string()}),
                };
                Ok(Answer::Json(
                    StatusCode::OK,
                    json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version, "metadata": metadata, "items": items}),
                ))
            }
            Method::POST => {
                if kind.namespaced && namespace.is_none() {
                    return Err(ApiError::method_not_allowed());
                }
                let body = parse_json(body)?;
                let created = shared.lock().store.create(kind, namespace, body)?;
                Ok(Answer::Json(StatusCode::CREATED, created))
            }
            _ => Err(ApiError::method_not_allowed()),
        },
        Target::Item {
            kind,
            namespace,
            name,
            sub,
        } => item(
            shared,
            method,
            kind,
            namespace,
            name,
            sub,
            params,
            content_type,
            body,
        ),
    }
}

#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename the same fields.
fn item(
    shared: &Shared,
    method: &Method,
    kind: &'static Kind,
    namespace: Option<&str>,
    name: &str,
    sub: Option<&str>,
    params: &Params,
    content_type: &str,
    body: &[u8],
) -> Result<Answer, ApiError> {
    let status_only = match sub {
        None => false,
        Some("status") if kind.status_subresource => true,
        Some("token") if kind.resource == "serviceaccounts" => {
            if method != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let body = parse_json(body)?;
            let state = shared.lock();
            let answer =
                state
                    .tokens
                    .request(&state.store, namespace.unwrap_or_default(), name, &body)?;
            return Ok(Answer::Json(StatusCode::CREATED, answer));
        }
        Some(other) => {
            return Err(ApiError::not_found(
                &format!("{}/{other}", kind.resource),
                name,
            ));
        }
    };
    let mut state = shared.lock();
    let store = &mut state.store;
    let ok = |v| Ok(Answer::Json(StatusCode::OK, v));
    match *method {
        Method::GET => ok(store.get(kind, namespace, name)?),
        Method::PUT => {
            let existed = store.get(kind, namespace, name).is_ok();
            let updated = store.update(kind, namespace, name, parse_json(body)?, status_only)?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(Answer::Json(code, updated))
        }
        Method::PATCH => {
            let mode = match content_type.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    PatchMode::Merge
                }
                "application/apply-patch+yaml" => PatchMode::Apply,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let patch = parse_json(body)?;
            ok(store.patch(kind, namespace, name, patch, mode, status_only)?)
        }
        Method::DELETE if !status_only => {
            let mut options = DeleteOptions {
                grace_period_seconds: params
                    .get("gracePeriodSeconds")
                    .and_then(|g| g.parse().ok()),
                ..DeleteOptions::default()
            };
            if !body.is_empty() {
                let opts = parse_json(body)?;
                if let Some(g) = opts.get("gracePeriodSeconds").and_then(Value::as_i64) {
                    options.grace_period_seconds = Some(g);
                }
                options.precondition_uid = opts
                    .pointer("/preconditions/uid")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                options.precondition_rv = opts
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            ok(store.delete(kind, namespace, name, &options)?)
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// A chunked stream of watch events; it ends on `drop_watches`, on `timeoutSeconds`, or after the
/// in-stream 410.
fn watch(
    shared: &Arc<Shared>,
    filter: Filter,
    from: Option<u64>,
    bookmarks: bool,
    params: &Params,
) -> Response<Body> {
    let (id, rx) = shared.lock().store.watch(filter, from, bookmarks);
    if let Some(secs) = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
    {
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            shared.lock().store.end_watch(id);
        });
    }
    let stream = UnboundedReceiverStream::new(rx)
        .map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(line))));
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn authenticated(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return false;
    };
    if shared.static_tokens.iter().any(|t| t == token) {
        return true;
    }
    let state = shared.lock();
    state.tokens.authenticates(&state.store, token)
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not json: {e}")))
}

// Items of a list carry no `kind`/`apiVersion` on the real server's JSON.
fn strip_type(mut item: Value) -> Value {
    if let Some(obj) = item.as_object_mut() {
        obj.remove("kind");
        obj.remove("apiVersion");
    }
    item
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.body(),
    )
}

fn text(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = code;
    response
}
