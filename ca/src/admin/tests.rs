use super::*;

#[tokio::test]
async fn socket_is_private_and_stale_sockets_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    // A stale socket: bound, then its listener dropped, so nothing answers.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (listener, guard) = bind_admin_socket(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No scratch directory is left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // A live socket is never taken over.
    let err = bind_admin_socket(&path).unwrap_err();
    assert!(matches!(err, AdminSocketError::InUse(_)), "{err}");
    drop(listener);
    drop(guard);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_regular_file_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    fs::write(&path, b"precious").unwrap();
    let err = bind_admin_socket(&path).unwrap_err();
    assert!(matches!(err, AdminSocketError::NotASocket(_)), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"precious");
}

#[test]
fn entries_outside_the_trust_domain_are_refused() {
    let td: TrustDomain = "example.org".parse().unwrap();
    let request = |id: &str| pb::CreateEntryRequest {
        spiffe_id: id.to_owned(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        node: "n1".into(),
        ..Default::default()
    };
    let err = new_entry(request("spiffe://other.org/web"), &td).unwrap_err();
    assert!(matches!(err, AdminError::BadRequest(_)), "{err}");
    assert_eq!(admin_status(err).code(), tonic::Code::InvalidArgument);
    let err = new_entry(request("not a uri"), &td).unwrap_err();
    assert!(matches!(err, AdminError::BadRequest(_)), "{err}");
    let ok = new_entry(request("spiffe://example.org/web"), &td).unwrap();
    assert_eq!(ok.scope, NodeScope::Node("n1".into()));
}

#[test]
fn datastore_errors_map_to_specific_codes() {
    let dup = AdminError::Datastore(DatastoreError::DuplicateEntry {
        spiffe_id: "spiffe://td/a".into(),
        existing: "ab".into(),
    });
    assert_eq!(admin_status(dup).code(), tonic::Code::AlreadyExists);
    let unknown = AdminError::Datastore(DatastoreError::UnknownEntry { id: "x".into() });
    assert_eq!(admin_status(unknown).code(), tonic::Code::NotFound);
    let agent = AdminError::Agent(AgentError::Unknown {
        spiffe_id: "spiffe://td/meshward/agent/join/n".into(),
    });
    assert_eq!(admin_status(agent).code(), tonic::Code::NotFound);
    let selector = AdminError::Datastore(DatastoreError::BadSelector {
        selector: "x".into(),
        reason: "bad",
    });
    let status = admin_status(selector);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("`x`"));
}
