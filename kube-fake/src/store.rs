//! The object store: one global resourceVersion counter (etcd's revision), the objects, an event history
//! that WATCH replays from, and the open watches.
//!
//! Semantics copied from the real server's watch cache: LIST answers at the current revision; WATCH from
//! revision `n` replays every later matching event; a `n` older than the compacted revision is answered
//! with one in-stream `ERROR` (410 `Expired`) and EOF; a watch with a selector turns "stopped matching"
//! into `DELETED` and "started matching" into `ADDED`.

use std::collections::{BTreeMap, VecDeque};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::kind::{self, Kind};
use crate::object::{
    fold_string_data, merge_patch, metadata_mut, new_uid, now_rfc3339, random_suffix, rfc3339,
    set_pointer, stamp_type,
};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;

/// The oldest events are forgotten past this many (like the watch cache's bounded window).
const HISTORY_LIMIT: usize = 10_000;

/// `(resource, namespace or "", name)`.
type Key = (&'static str, String, String);

/// What changed, as the watch protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static Kind,
    namespace: String,
    change: Change,
    old: Option<Value>,
    new: Value,
}

/// Which objects one watch (or list) wants.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    fn matches(&self, kind: &Kind, namespace: &str, object: &Value) -> bool {
        std::ptr::eq(self.kind, kind)
            && self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

struct Watcher {
    id: u64,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<String>,
}

/// How a PATCH body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchMode {
    /// `application/merge-patch+json` (RFC 7386), and strategic merge treated the same way (lists replace).
    Merge,
    /// `application/apply-patch+yaml` with a JSON body: create if absent, else merge (no field ownership).
    Apply,
}

/// DELETE options from the query string and the `DeleteOptions` body.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// One page of a LIST.
#[derive(Debug)]
pub(crate) struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
}

/// The store; always used under one mutex, never across an await.
pub(crate) struct Store {
    rv: u64,
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    watchers: Vec<Watcher>,
    next_watcher: u64,
}

impl Store {
    /// A store with the namespaces every cluster has.
    pub fn new() -> Self {
        let mut store = Self {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: Vec::new(),
            next_watcher: 0,
        };
        if let Some(namespaces) = kind::core("namespaces") {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                // The seed objects are well formed; an error here would only mean a bug in `create`.
                let _ = store.create(namespaces, None, json!({"metadata": {"name": ns}}));
            }
        }
        store
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates an object (POST).
    pub fn create(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        mut body: Value,
    ) -> Result<Value, ApiError> {
        let ns = self.namespace_for_write(kind, namespace, &body)?;
        let meta = metadata_mut(&mut body);
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        kind.resource,
                        "",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            kind.kind
                        ),
                    ));
                }
            },
        };
        if !ns.is_empty() && kind.resource != "namespaces" {
            self.require_active_namespace(&ns)?;
        }
        let key = (kind.resource, ns.clone(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind.resource, &name));
        }
        meta.insert("name".into(), name.clone().into());
        if kind.namespaced {
            meta.insert("namespace".into(), ns.clone().into());
        }
        meta.insert("uid".into(), new_uid().into());
        meta.insert("creationTimestamp".into(), now_rfc3339().into());
        for server_owned in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(server_owned);
        }
        self.admit_create(kind, &ns, &name, &mut body)?;
        stamp_type(kind, &mut body);
        (kind.validate)(&body)
            .map_err(|e| ApiError::bad_request(format!("decoding {} `{name}`: {e}", kind.kind)))?;
        Ok(self.commit(kind, key, None, Some(body)))
    }

    /// Reads one object (GET).
    pub fn get(
        &self,
        kind: &'static Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.objects
            .get(&(
                kind.resource,
                namespace.unwrap_or_default().to_owned(),
                name.to_owned(),
            ))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind.resource, name))
    }

    /// Whether an object exists and has this UID.
    pub fn uid_of(&self, kind: &'static Kind, namespace: &str, name: &str) -> Option<String> {
        self.objects
            .get(&(kind.resource, namespace.to_owned(), name.to_owned()))
            .and_then(|o| o.pointer("/metadata/uid"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Lists matching objects at the current revision, `limit` at a time.
    pub fn list(
        &self,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let after = match continue_token {
            Some(token) => Some(self.decode_continue(token)?),
            None => None,
        };
        let mut items = Vec::new();
        let mut next = None;
        for ((resource, ns, name), object) in &self.objects {
            if *resource != filter.kind.resource || !filter.matches(filter.kind, ns, object) {
                continue;
            }
            if after
                .as_ref()
                .is_some_and(|(a_ns, a_name)| (ns, name) <= (a_ns, a_name))
            {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() >= l) {
                next = Some(encode_continue(self.rv, ns, name));
                break;
            }
            items.push(object.clone());
        }
        // `next` points past the last returned item, not the first one left out.
        let continue_token = next.and_then(|_| {
            items.last().map(|last| {
                encode_continue(
                    self.rv,
                    last.pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                    last.pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                )
            })
        });
        Ok(ListPage {
            items,
            resource_version: self.rv,
            continue_token,
        })
    }

    /// Replaces an object (PUT), with optimistic concurrency on `metadata.resourceVersion`.
    pub fn update(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        name: &str,
        mut body: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let ns = self.namespace_for_write(kind, namespace, &body)?;
        let body_name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = (kind.resource, ns.clone(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            if kind.create_on_update && !status_only {
                return self.create(kind, namespace, body);
            }
            return Err(ApiError::not_found(kind.resource, name));
        };
        if let Some(rv) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv)
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(ApiError::conflict(kind.resource, name));
        }
        let new = self.merge_update(kind, &ns, name, &old, &mut body, status_only)?;
        Ok(self.commit(kind, key, Some(old), Some(new)))
    }

    /// Patches an object (PATCH); a `metadata.resourceVersion` in the patch is a precondition.
    pub fn patch(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
        mode: PatchMode,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let ns = namespace.unwrap_or_default().to_owned();
        let key = (kind.resource, ns.clone(), name.to_owned());
        let Some(old) = self.objects.get(&key).cloned() else {
            if mode == PatchMode::Apply && !status_only {
                let mut body = patch;
                metadata_mut(&mut body).insert("name".into(), name.into());
                return self.create(kind, namespace, body);
            }
            return Err(ApiError::not_found(kind.resource, name));
        };
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(ApiError::conflict(kind.resource, name));
        }
        let mut body = old.clone();
        merge_patch(&mut body, &patch);
        let new = self.merge_update(kind, &ns, name, &old, &mut body, status_only)?;
        Ok(self.commit(kind, key, Some(old), Some(new)))
    }

    /// Deletes an object (DELETE). Pods on a node with a grace period, and namespaces, are only marked
    /// (no kubelet or namespace controller ever finishes them), as on a bare API server.
    pub fn delete(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let key = (
            kind.resource,
            namespace.unwrap_or_default().to_owned(),
            name.to_owned(),
        );
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind.resource, name))?;
        let uid = old
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if options
            .precondition_uid
            .as_deref()
            .is_some_and(|want| want != uid)
        {
            return Err(ApiError::conflict_msg(
                kind.resource,
                name,
                format!(
                    "Precondition failed: UID in precondition: {}, UID in object meta: {uid}",
                    options.precondition_uid.as_deref().unwrap_or_default()
                ),
            ));
        }
        let rv = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if options
            .precondition_rv
            .as_deref()
            .is_some_and(|want| want != rv)
        {
            return Err(ApiError::conflict(kind.resource, name));
        }
        match kind.resource {
            "namespaces" => {
                if old.pointer("/metadata/deletionTimestamp").is_some() {
                    return Ok(old);
                }
                let mut new = old.clone();
                metadata_mut(&mut new).insert("deletionTimestamp".into(), now_rfc3339().into());
                set_pointer(&mut new, "status", json!({"phase": "Terminating"}));
                Ok(self.commit(kind, key, Some(old), Some(new)))
            }
            "pods" => {
                // The real server marks the pod first (MODIFIED with deletionTimestamp and the grace
                // period), then removes it at once only when the grace period is 0.
                let grace = pod_grace(&old, options.grace_period_seconds);
                if grace > 0 && old.pointer("/metadata/deletionTimestamp").is_some() {
                    return Ok(old);
                }
                let mut marked = old.clone();
                let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(grace);
                let meta = metadata_mut(&mut marked);
                meta.insert("deletionTimestamp".into(), rfc3339(at).into());
                meta.insert("deletionGracePeriodSeconds".into(), grace.into());
                let marked = self.commit(kind, key.clone(), Some(old), Some(marked));
                if grace > 0 {
                    return Ok(marked);
                }
                Ok(self.commit(kind, key, Some(marked), None))
            }
            _ => Ok(self.commit(kind, key, Some(old), None)),
        }
    }

    /// Opens a watch. `from` is the `resourceVersion` query value: `None`/`0` starts with synthetic
    /// `ADDED` events for every current match; `n` replays later events, or answers 410 in-stream when
    /// `n` is older than the compacted revision.
    pub fn watch(
        &mut self,
        filter: Filter,
        from: Option<u64>,
        bookmarks: bool,
    ) -> (u64, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watcher;
        self.next_watcher += 1;
        match from {
            None | Some(0) => {
                for ((resource, ns, _), object) in &self.objects {
                    if *resource == filter.kind.resource && filter.matches(filter.kind, ns, object)
                    {
                        let _ = tx.send(event_line("ADDED", object));
                    }
                }
            }
            Some(n) if n < self.compacted => {
                let status = ApiError::expired(format!(
                    "too old resource version: {n} ({})",
                    self.compacted
                ))
                .body();
                let _ = tx.send(event_line("ERROR", &status));
                // The sender is dropped here: the stream ends after the error, as on the real server.
                return (id, rx);
            }
            Some(n) => {
                for event in self.history.iter().filter(|e| e.rv > n) {
                    if let Some(line) = render(&filter, event) {
                        let _ = tx.send(line);
                    }
                }
            }
        }
        self.watchers.push(Watcher {
            id,
            filter,
            bookmarks,
            tx,
        });
        (id, rx)
    }

    /// Ends one watch (its timeout passed or its client went away).
    pub fn end_watch(&mut self, id: u64) {
        self.watchers.retain(|w| w.id != id);
    }

    /// Forgets all history up to now: a WATCH from any earlier revision gets the in-stream 410.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// Ends every open watch stream cleanly (EOF); clients re-watch from their last revision.
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    /// Sends a `BOOKMARK` at the current revision to every watch that allowed bookmarks.
    pub fn bookmark_now(&mut self) {
        let rv = self.rv.to_string();
        self.watchers.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({
                "kind": w.filter.kind.kind,
                "apiVersion": w.filter.kind.api_version,
                "metadata": {"resourceVersion": rv},
            });
            w.tx.send(event_line("BOOKMARK", &object)).is_ok()
        });
    }

    /// How many watches are open.
    pub fn watch_count(&self) -> usize {
        self.watchers.len()
    }

    fn commit(
        &mut self,
        kind: &'static Kind,
        key: Key,
        old: Option<Value>,
        new: Option<Value>,
    ) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let (change, mut object) = match (&old, new) {
            (None, Some(new)) => (Change::Added, new),
            (Some(_), Some(new)) => (Change::Modified, new),
            (Some(old), None) => (Change::Deleted, old.clone()),
            (None, None) => return Value::Null,
        };
        metadata_mut(&mut object).insert("resourceVersion".into(), rv.to_string().into());
        if change == Change::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let event = Event {
            rv,
            kind,
            namespace: key.1,
            change,
            old,
            new: object.clone(),
        };
        self.watchers.retain(|w| match render(&w.filter, &event) {
            Some(line) => w.tx.send(line).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push_back(event);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        object
    }

    fn namespace_for_write(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        body: &Value,
    ) -> Result<String, ApiError> {
        let in_body = body
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !kind.namespaced {
            return Ok(String::new());
        }
        let ns = namespace.unwrap_or_default();
        if !in_body.is_empty() && in_body != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(ns.to_owned())
    }

    fn require_active_namespace(&self, ns: &str) -> Result<(), ApiError> {
        let namespace = self
            .objects
            .get(&("namespaces", String::new(), ns.to_owned()))
            .ok_or_else(|| ApiError::not_found("namespaces", ns))?;
        if namespace.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
        Ok(())
    }

    // What the real server's strategies and admission plugins do on create.
    fn admit_create(
        &self,
        kind: &Kind,
        ns: &str,
        name: &str,
        body: &mut Value,
    ) -> Result<(), ApiError> {
        match kind.resource {
            "namespaces" => {
                set_pointer(body, "spec", json!({"finalizers": ["kubernetes"]}));
                set_pointer(body, "status", json!({"phase": "Active"}));
            }
            "pods" => {
                // ServiceAccount admission: default the account, and refuse a pod whose account is missing.
                let spec = body.get_mut("spec").and_then(Value::as_object_mut);
                let sa = match spec {
                    Some(spec) => {
                        let sa = spec
                            .get("serviceAccountName")
                            .and_then(Value::as_str)
                            .filter(|s| !s.is_empty())
                            .unwrap_or("default")
                            .to_owned();
                        spec.insert("serviceAccountName".into(), sa.clone().into());
                        spec.insert("serviceAccount".into(), sa.clone().into());
                        sa
                    }
                    None => "default".to_owned(),
                };
                if !self
                    .objects
                    .contains_key(&("serviceaccounts", ns.to_owned(), sa.clone()))
                {
                    return Err(ApiError::forbidden(format!(
                        "pods \"{name}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
                    )));
                }
                set_pointer(body, "status", json!({"phase": "Pending"}));
            }
            "secrets" => fold_string_data(body),
            _ => {}
        }
        Ok(())
    }

    // The body of a PUT/PATCH as stored: identity fields kept, status or spec kept per subresource.
    fn merge_update(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        old: &Value,
        body: &mut Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let mut new = if status_only {
            let mut new = old.clone();
            set_pointer(
                &mut new,
                "status",
                body.get("status").cloned().unwrap_or(Value::Null),
            );
            new
        } else {
            let mut new = body.take();
            if kind.status_subresource {
                set_pointer(
                    &mut new,
                    "status",
                    old.get("status").cloned().unwrap_or(Value::Null),
                );
            }
            new
        };
        let old_meta = old
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let meta = metadata_mut(&mut new);
        for kept in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old_meta.get(kept) {
                Some(v) => meta.insert(kept.into(), v.clone()),
                None => meta.remove(kept),
            };
        }
        meta.insert("name".into(), name.into());
        if kind.namespaced {
            meta.insert("namespace".into(), ns.into());
        }
        if kind.resource == "secrets" {
            fold_string_data(&mut new);
        }
        stamp_type(kind, &mut new);
        if let Some(obj) = new.as_object_mut() {
            obj.retain(|_, v| !v.is_null());
        }
        (kind.validate)(&new)
            .map_err(|e| ApiError::bad_request(format!("decoding {} `{name}`: {e}", kind.kind)))?;
        Ok(new)
    }

    fn decode_continue(&self, token: &str) -> Result<(String, String), ApiError> {
        let bad = || ApiError::bad_request(format!("continue key is not valid: `{token}`"));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        let value: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
        let rv = value.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
        if rv < self.compacted {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        let ns = value
            .get("ns")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = value
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(bad)?
            .to_owned();
        Ok((ns, name))
    }
}

/// A watch line for one event as seen through a filter, or `None` if the filter does not see it.
fn render(filter: &Filter, event: &Event) -> Option<String> {
    let sees = |object: &Value| filter.matches(event.kind, &event.namespace, object);
    let kind = match event.change {
        Change::Added => sees(&event.new).then_some("ADDED"),
        Change::Deleted => sees(&event.new).then_some("DELETED"),
        Change::Modified => {
            let before = event.old.as_ref().is_some_and(sees);
            match (before, sees(&event.new)) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            }
        }
    }?;
    Some(event_line(kind, &event.new))
}

fn event_line(kind: &str, object: &Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"rv": rv, "ns": ns, "name": name}).to_string())
}

// The grace period a pod delete gets: 0 for pods no kubelet holds (unscheduled or finished), else the
// requested one, else the pod's own, else 30 s. A bare server never finishes a graceful delete.
fn pod_grace(pod: &Value, requested: Option<i64>) -> i64 {
    let on_node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let terminal = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if !on_node || terminal {
        return 0;
    }
    requested
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30)
        .max(0)
}

#[cfg(test)]
mod tests;
