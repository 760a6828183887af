//! Helpers over objects in their JSON form, shaped the way the API server writes them: `metadata`,
//! RFC 7386 merge patches, UIDs, generated-name suffixes and timestamps.

use base64::Engine;
use serde_json::{Map, Value};

use crate::kind::Kind;

// `stringData` is write-only: the server folds it into base64 `data`.
pub(crate) fn fold_string_data(body: &mut Value) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = obj.remove("stringData") else {
        return;
    };
    let data = obj
        .entry("data")
        .or_insert_with(|| Value::Object(Map::new()));
    if !data.is_object() {
        *data = Value::Object(Map::new());
    }
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k,
                base64::engine::general_purpose::STANDARD
                    .encode(text)
                    .into(),
            );
        }
    }
}

pub(crate) fn stamp_type(kind: &Kind, body: &mut Value) {
    if let Some(obj) = body.as_object_mut() {
        obj.insert("kind".into(), kind.kind.into());
        obj.insert("apiVersion".into(), kind.api_version.into());
    }
}

pub(crate) fn set_pointer(body: &mut Value, field: &str, value: Value) {
    if let Some(obj) = body.as_object_mut() {
        if value.is_null() {
            obj.remove(field);
        } else {
            obj.insert(field.into(), value);
        }
    }
}

/// `metadata` as a mutable map, created (and the body made an object) if missing.
pub(crate) fn metadata_mut(body: &mut Value) -> &mut Map<String, Value> {
    if !body.is_object() {
        *body = Value::Object(Map::new());
    }
    // INVARIANT: both matches below see the objects made just before them.
    let Value::Object(obj) = body else {
        unreachable!("body was just made an object")
    };
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(meta) => meta,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A random RFC 4122 version-4 UUID, the shape of `metadata.uid`.
pub(crate) fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    if let Some(v) = b.get_mut(6) {
        *v = (*v & 0x0f) | 0x40;
    }
    if let Some(v) = b.get_mut(8) {
        *v = (*v & 0x3f) | 0x80;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..32).unwrap_or_default()
    )
}

pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| {
            char::from(
                ALPHABET
                    .get(usize::from(*b) % ALPHABET.len())
                    .copied()
                    .unwrap_or(b'x'),
            )
        })
        .collect()
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The system RNG does not fail on Linux; zeroes would still be unique enough per store for a fake.
    let _ = ring::rand::SystemRandom::new().fill(&mut out);
    out
}

/// Now as the API server writes timestamps: RFC 3339, whole seconds, UTC.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
