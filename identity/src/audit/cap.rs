//! Size caps: every record stays bounded whatever a caller puts in it, so no caller can write an
//! unbounded header dump. A capped string ends in [`TRUNCATION_MARKER`]; the record's `truncated`
//! names every capped field.

use serde::Serialize;
use serde_json::{Map, Value};

use super::record::AuditEvent;

/// Longest line the writer can produce and the reader accepts, in bytes.
///
/// The caps below bound a record to about 26 KiB of raw field bytes; JSON escaping of control
/// characters (`\u0001`) can grow a string at most six-fold, which still fits.
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// Longest `principal`, `resource`, `spiffe_id` or `agent`: the longest SPIFFE ID (SPIFFE-ID §2.3).
pub const MAX_ID_BYTES: usize = 2048;

/// Longest `action`, `serial`, `pod` or `node`.
pub const MAX_SHORT_BYTES: usize = 256;

/// Most policy ids kept in `policies`.
pub const MAX_POLICIES: usize = 32;

/// Longest policy id kept in `policies`.
pub const MAX_POLICY_ID_BYTES: usize = 256;

/// Most messages kept in `errors`.
pub const MAX_ERRORS: usize = 8;

/// Longest message kept in `errors`.
pub const MAX_ERROR_BYTES: usize = 512;

/// Largest `context`, as serialized JSON.
pub const MAX_CONTEXT_BYTES: usize = 4096;

/// Longest string (key or value) kept anywhere inside `context`.
pub const MAX_CONTEXT_STRING_BYTES: usize = 512;

/// Deepest nesting kept inside `context`; deeper values become the truncation marker. Well under
/// serde_json's parse limit of 128, so every record the writer makes can be read back.
pub const MAX_CONTEXT_DEPTH: usize = 8;

/// What a capped string ends with.
pub const TRUNCATION_MARKER: &str = "...[truncated]";

/// The member of a capped `context` that counts the members dropped from it.
pub const CONTEXT_DROPPED_KEY: &str = "_truncated";

/// Caps every field of `event` and returns the names of the fields it changed.
pub(crate) fn cap_event(event: &mut AuditEvent) -> Vec<&'static str> {
    let mut truncated = Vec::new();
    let mut note = |capped: bool, name: &'static str| {
        if capped {
            truncated.push(name);
        }
    };
    note(cap_string(&mut event.principal, MAX_ID_BYTES), "principal");
    note(cap_string(&mut event.action, MAX_SHORT_BYTES), "action");
    note(cap_string(&mut event.resource, MAX_ID_BYTES), "resource");
    note(cap_context(&mut event.context), "context");
    note(
        cap_list(&mut event.policies, MAX_POLICIES, MAX_POLICY_ID_BYTES),
        "policies",
    );
    note(
        cap_list(&mut event.errors, MAX_ERRORS, MAX_ERROR_BYTES),
        "errors",
    );
    note(cap_opt(&mut event.spiffe_id, MAX_ID_BYTES), "spiffe_id");
    note(cap_opt(&mut event.serial, MAX_SHORT_BYTES), "serial");
    note(cap_opt(&mut event.agent, MAX_ID_BYTES), "agent");
    note(cap_opt(&mut event.pod, MAX_SHORT_BYTES), "pod");
    truncated
}

/// Cuts `s` to at most `max` bytes, on a character boundary, ending with [`TRUNCATION_MARKER`].
/// Returns whether it cut.
pub(crate) fn cap_string(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut keep = max.saturating_sub(TRUNCATION_MARKER.len());
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    s.truncate(keep);
    s.push_str(TRUNCATION_MARKER);
    true
}

fn cap_opt(s: &mut Option<String>, max: usize) -> bool {
    s.as_mut().is_some_and(|s| cap_string(s, max))
}

fn cap_list(list: &mut Vec<String>, max_len: usize, max_bytes: usize) -> bool {
    let mut capped = list.len() > max_len;
    list.truncate(max_len);
    for item in list.iter_mut() {
        capped |= cap_string(item, max_bytes);
    }
    capped
}

/// Most elements kept in one array or object inside `context`: more could never fit in it anyway.
const MAX_CONTEXT_ITEMS: usize = MAX_CONTEXT_BYTES / 2;

/// Leaves `context` alone if it fits; otherwise caps strings, nesting and container sizes inside it,
/// then keeps members in order while the object fits [`MAX_CONTEXT_BYTES`], counting the dropped
/// ones under [`CONTEXT_DROPPED_KEY`]. Work is bounded by the caps, not by what the caller passed.
fn cap_context(context: &mut Map<String, Value>) -> bool {
    let nesting_ok = context
        .values()
        .all(|v| depth_within(v, MAX_CONTEXT_DEPTH - 1));
    if nesting_ok && json_len_within(context, MAX_CONTEXT_BYTES).is_some() {
        return false;
    }
    // Room for the braces and `,"_truncated":<count>`.
    let budget = MAX_CONTEXT_BYTES - CONTEXT_DROPPED_KEY.len() - 32;
    let mut kept = Map::new();
    let mut used = 2;
    let mut dropped = 0u64;
    for (mut key, mut value) in std::mem::take(context) {
        // The smallest member, `"":0,`, is 5 bytes.
        if used + 5 > budget {
            dropped += 1;
            continue;
        }
        cap_string(&mut key, MAX_CONTEXT_STRING_BYTES);
        cap_value(&mut value, 1);
        let room = budget - used;
        let size = json_len_within(&key, room)
            .and_then(|k| json_len_within(&value, room).map(|v| k + v + 2));
        match size {
            Some(size) if used + size <= budget && !kept.contains_key(&key) => {
                used += size;
                kept.insert(key, value);
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        kept.insert(CONTEXT_DROPPED_KEY.to_owned(), Value::from(dropped));
    }
    *context = kept;
    true
}

/// Caps the strings in `value`, the size of its containers, and its nesting below `depth`.
fn cap_value(value: &mut Value, depth: usize) {
    match value {
        Value::String(s) => {
            cap_string(s, MAX_CONTEXT_STRING_BYTES);
        }
        Value::Array(items) if depth < MAX_CONTEXT_DEPTH => {
            items.truncate(MAX_CONTEXT_ITEMS);
            items.iter_mut().for_each(|v| cap_value(v, depth + 1));
        }
        Value::Object(map) if depth < MAX_CONTEXT_DEPTH => {
            let capped: Map<String, Value> = std::mem::take(map)
                .into_iter()
                .take(MAX_CONTEXT_ITEMS)
                .map(|(mut k, mut v)| {
                    cap_string(&mut k, MAX_CONTEXT_STRING_BYTES);
                    cap_value(&mut v, depth + 1);
                    (k, v)
                })
                .collect();
            *map = capped;
        }
        Value::Array(_) | Value::Object(_) => *value = Value::String(TRUNCATION_MARKER.to_owned()),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Whether `value` nests containers at most `levels` deep (looking no deeper than that).
fn depth_within(value: &Value, levels: usize) -> bool {
    match value {
        Value::Array(items) => levels > 0 && items.iter().all(|v| depth_within(v, levels - 1)),
        Value::Object(map) => levels > 0 && map.values().all(|v| depth_within(v, levels - 1)),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => true,
    }
}

/// The length of `value` as JSON, if it is at most `limit`; serializing stops once past it.
fn json_len_within<T: Serialize + ?Sized>(value: &T, limit: usize) -> Option<usize> {
    struct Counter {
        len: usize,
        limit: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.len += buf.len();
            if self.len > self.limit {
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter { len: 0, limit };
    serde_json::to_writer(&mut counter, value)
        .ok()
        .map(|()| counter.len)
}
