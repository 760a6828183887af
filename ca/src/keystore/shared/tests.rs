use std::time::{Duration, SystemTime};

use meshward_identity::TrustDomain;
use meshward_identity::jwt::JwtSigningKey;
use meshward_identity::x509::Authority;

use super::*;

fn td() -> TrustDomain {
    "example.org".parse().unwrap()
}

fn entry(state: AuthorityState) -> Entry {
    let now = SystemTime::now();
    let root = Authority::new_root(&td(), Duration::from_secs(3600), now).unwrap();
    let jwt = JwtSigningKey::generate().unwrap();
    Entry::new(&root, &jwt, state, now).unwrap()
}

fn model() -> Model {
    Model {
        entries: vec![entry(AuthorityState::Active)],
    }
}

#[test]
fn encode_then_decode_gives_the_same_authorities() {
    let mut m = model();
    m.prepare(entry(AuthorityState::Prepared)).unwrap();
    let files = m.encode().unwrap();
    let back = Model::decode(&files, &td()).unwrap();
    assert_eq!(back.encode().unwrap(), files);
    assert_eq!(back.entries.len(), 2);
}

#[test]
fn a_bad_secret_says_what_is_wrong() {
    let files = model().encode().unwrap();
    let id = model_id(&files);

    let mut missing = files.clone();
    missing.remove(&format!("{id}.jwt.key"));
    let err = Model::decode(&missing, &td()).unwrap_err();
    assert!(err.contains(&format!("`{id}.jwt.key` is missing")), "{err}");

    let mut other_td = files.clone();
    other_td.insert(
        INDEX_KEY.to_owned(),
        b"{\"version\": 2, \"authorities\": []}".to_vec(),
    );
    let err = Model::decode(&other_td, &td()).unwrap_err();
    assert!(err.contains("layout version `2`"), "{err}");

    let err = Model::decode(&files, &"other.org".parse().unwrap()).unwrap_err();
    assert!(err.contains("trust domain `example.org`"), "{err}");

    let mut swapped = files.clone();
    swapped.insert(
        format!("{id}.key"),
        SvidKey::generate().unwrap().to_pkcs8_pem().into_bytes(),
    );
    let err = Model::decode(&swapped, &td()).unwrap_err();
    assert!(err.contains(&format!("`{id}.key`")), "{err}");

    let mut none_active = model();
    none_active.entries[0].state = AuthorityState::Old;
    let err = Model::decode(&none_active.encode().unwrap(), &td()).unwrap_err();
    assert!(err.contains("`0` authorities are active"), "{err}");
}

#[test]
fn rotation_steps_refuse_out_of_order() {
    let mut m = model();
    let none = BTreeMap::new();
    assert!(matches!(
        m.activate(SystemTime::now(), &none),
        Err(AuthorityError::NoPrepared)
    ));
    assert!(matches!(
        m.retire(SystemTime::now(), false, &none),
        Err(AuthorityError::NoOld)
    ));
    let prepared = m.prepare(entry(AuthorityState::Prepared)).unwrap();
    assert!(matches!(
        m.prepare(entry(AuthorityState::Prepared)),
        Err(AuthorityError::AlreadyPrepared { id }) if id == prepared
    ));
    let first = m.entries[0].id.clone();
    let now = SystemTime::now();
    // This replica signed with the first root until an hour from now: recorded at activation.
    let local = BTreeMap::from([(first.clone(), unix(now) + 3600)]);
    assert_eq!(m.activate(now, &local).unwrap(), prepared);
    assert_eq!(m.entries[0].state, AuthorityState::Old);
    assert_eq!(m.entries[0].signed_until, unix(now) + 3600);
    assert!(matches!(
        m.retire(now, false, &none),
        Err(AuthorityError::StillSigning { id, .. }) if id == first
    ));
    assert_eq!(
        m.entries[0].state,
        AuthorityState::Old,
        "a refused retire changes nothing"
    );
    assert_eq!(m.retire(now, true, &none).unwrap(), first);
    assert!(m.entries[0].x509_key.is_none() && m.entries[0].jwt_key.is_none());
    let files = m.encode().unwrap();
    assert!(!files.contains_key(&format!("{first}.key")));
    assert!(files.contains_key(&format!("{first}.crt")));
    Model::decode(&files, &td()).unwrap();
}

#[test]
fn only_a_higher_signed_until_of_an_old_root_is_recorded() {
    let mut m = model();
    let id = m.entries[0].id.clone();
    let later = BTreeMap::from([(id.clone(), 100)]);
    assert!(
        !m.record_old_signed_until(&later),
        "the active root's is not recorded"
    );
    m.entries[0].state = AuthorityState::Old;
    assert!(m.record_old_signed_until(&later));
    assert!(!m.record_old_signed_until(&BTreeMap::from([(id, 50)])));
    assert_eq!(m.entries[0].signed_until, 100);
}

fn model_id(files: &KeyFiles) -> String {
    let index: serde_json::Value = serde_json::from_slice(&files[INDEX_KEY]).unwrap();
    index["authorities"][0]["id"].as_str().unwrap().to_owned()
}
