//! Wire-shape tests: the Workload API must match the SPIFFE standard byte for byte, or standard clients
//! (go-spiffe, py-spiffe, the Rust `spiffe` crate) silently read empty fields.

use prost::Message;

use super::{ca, workload};

/// Encodes `msg` and returns its bytes.
fn bytes<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_to_vec()
}

/// A protobuf key byte: field number and wire type 2 (length-delimited).
fn len_key(field: u8) -> u8 {
    (field << 3) | 2
}

#[test]
#[rustfmt::skip]
fn x509_svid_field_numbers_match_the_standard() {
    let svid = workload::X509svid {
        spiffe_id: "s".into(),
        x509_svid: vec![1],
        x509_svid_key: vec![2],
        bundle: vec![3],
        hint: "h".into(),
    };
    assert_eq!(
        bytes(&svid),
        vec![
            len_key(1), 1, b's',
            len_key(2), 1, 1,
            len_key(3), 1, 2,
            len_key(4), 1, 3,
            len_key(5), 1, b'h',
        ]
    );
}

#[test]
fn x509_svid_response_field_numbers_match_the_standard() {
    let resp = workload::X509svidResponse {
        svids: vec![workload::X509svid::default()],
        crl: vec![vec![9]],
        federated_bundles: [("spiffe://b".to_string(), vec![7])].into(),
    };
    let encoded = bytes(&resp);
    // svids = 1 (empty message), crl = 2, federated_bundles = 3 (map entry: key = 1, value = 2).
    let mut expected = vec![
        len_key(1),
        0,
        len_key(2),
        1,
        9,
        len_key(3),
        15,
        len_key(1),
        10,
    ];
    expected.extend_from_slice(b"spiffe://b");
    expected.extend_from_slice(&[len_key(2), 1, 7]);
    assert_eq!(encoded, expected);
}

#[test]
fn jwt_messages_field_numbers_match_the_standard() {
    let req = workload::JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: "s".into(),
    };
    assert_eq!(bytes(&req), vec![len_key(1), 1, b'a', len_key(2), 1, b's']);

    let svid = workload::Jwtsvid {
        spiffe_id: "s".into(),
        svid: "t".into(),
        hint: "h".into(),
    };
    assert_eq!(
        bytes(&svid),
        vec![
            len_key(1),
            1,
            b's',
            len_key(2),
            1,
            b't',
            len_key(3),
            1,
            b'h'
        ]
    );

    let validate = workload::ValidateJwtsvidRequest {
        audience: "a".into(),
        svid: "t".into(),
    };
    assert_eq!(
        bytes(&validate),
        vec![len_key(1), 1, b'a', len_key(2), 1, b't']
    );
}

#[test]
fn x509_bundles_response_field_numbers_match_the_standard() {
    let resp = workload::X509BundlesResponse {
        crl: vec![vec![9]],
        bundles: [("spiffe://a".to_string(), vec![7])].into(),
    };
    let mut expected = vec![len_key(1), 1, 9, len_key(2), 15, len_key(1), 10];
    expected.extend_from_slice(b"spiffe://a");
    expected.extend_from_slice(&[len_key(2), 1, 7]);
    assert_eq!(bytes(&resp), expected);
}

#[test]
fn workload_api_service_paths_have_no_package() {
    // Standard clients call `/SpiffeWorkloadAPI/<Method>`; a proto package would change every path.
    assert_eq!(
        workload::spiffe_workload_api_server::SERVICE_NAME,
        "SpiffeWorkloadAPI"
    );
    assert_eq!(ca::ca_server::SERVICE_NAME, "meshward.ca.v1.Ca");
    assert_eq!(ca::admin_server::SERVICE_NAME, "meshward.ca.v1.Admin");
}

#[test]
fn garbage_bytes_do_not_decode_as_a_request() {
    // A truncated length-delimited field must be an error, not a silently empty request.
    let garbage = [len_key(1), 200, b'x'];
    assert!(workload::JwtsvidRequest::decode(&garbage[..]).is_err());
    assert!(ca::MintX509SvidsRequest::decode(&garbage[..]).is_err());
}

/// The agent sends a Workload API update only when its encoding differs from the last one sent,
/// so equal maps must encode to equal bytes whatever order their entries were added in.
#[test]
fn maps_encode_in_key_order() {
    let domains = ["spiffe://c", "spiffe://a", "spiffe://b"];
    let response = |order: &[&str]| workload::X509BundlesResponse {
        crl: Vec::new(),
        bundles: order
            .iter()
            .map(|td| ((*td).to_string(), td.as_bytes().to_vec()))
            .collect(),
    };
    let forward = bytes(&response(&domains));
    let mut reversed = domains;
    reversed.reverse();
    assert_eq!(forward, bytes(&response(&reversed)));
    let first_key = forward
        .windows(b"spiffe://".len() + 1)
        .find(|w| w.starts_with(b"spiffe://"))
        .unwrap();
    assert_eq!(first_key, b"spiffe://a");
}
