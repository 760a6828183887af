//! SDS over the agent's real unix socket (no Workload API header), and the xDS ACK/NACK rules.

use std::time::Duration;

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc;
use meshward_identity::proto::ca as ca_pb;
use meshward_identity::x509::{SvidKey, X509Svid};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use super::*;
use crate::ca_client::leaf_matches_key;
use crate::test_ca::{TD, TestCa};
use crate::workload_api::tests::{Agent, HOUR, PATIENCE, entry_order, id, me};

type Client = SecretDiscoveryServiceClient<Channel>;

async fn next(
    stream: &mut tonic::Streaming<DiscoveryResponse>,
    within: Duration,
) -> Option<DiscoveryResponse> {
    tokio::time::timeout(within, stream.message())
        .await
        .ok()
        .map(|m| m.unwrap().unwrap())
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: secret_type_url(),
        ..Default::default()
    }
}

async fn fetch(client: &mut Client, names: &[&str]) -> Result<Vec<Secret>, Status> {
    let response = client.fetch_secrets(request(names)).await?.into_inner();
    assert_eq!(response.type_url, secret_type_url());
    assert!(!response.version_info.is_empty());
    Ok(decode(&response))
}

fn decode(response: &DiscoveryResponse) -> Vec<Secret> {
    response
        .resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, secret_type_url());
            Secret::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

fn bytes(source: Option<&DataSource>) -> String {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The chain and key of a `tls_certificate` secret, checked to belong together.
fn certificate(secret: &Secret) -> X509Svid {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("`{}` is not a tls certificate: {secret:?}", secret.name)
    };
    let svid = X509Svid::from_pem(&bytes(tls.certificate_chain.as_ref())).unwrap();
    let key_pem = bytes(tls.private_key.as_ref());
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "pkcs#8 pem"
    );
    let key = SvidKey::from_pkcs8_pem(&key_pem).unwrap();
    assert!(leaf_matches_key(&svid, &key));
    svid
}

fn trusted_ca(secret: &Secret) -> TrustBundle {
    let Some(secret::Type::ValidationContext(context)) = &secret.r#type else {
        panic!("`{}` is not a validation context: {secret:?}", secret.name)
    };
    TrustBundle::from_pem(TD.parse().unwrap(), &bytes(context.trusted_ca.as_ref())).unwrap()
}

#[tokio::test]
async fn secrets_by_every_spire_name_without_any_workload_api_header() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("envoy", "node-sds", &[&me()]).await;
    ca.entry("envoy-alt", "node-sds", &[&me()]).await;
    ca.entry("someone-else", "node-sds", &["unix:uid:4242"])
        .await;
    let agent = Agent::start(&ca, "node-sds", Duration::from_secs(10)).await;
    let mut client = Client::new(agent.channel().await);
    let bundle = agent
        .running
        .as_ref()
        .unwrap()
        .cache
        .current()
        .bundle
        .clone();

    let secrets = fetch(&mut client, &["default"]).await.unwrap();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].name, "default");
    // The default is the first entry in entry order (same-second entries: by entry ID).
    let order = entry_order(&agent);
    assert_eq!(certificate(&secrets[0]).spiffe_id().to_string(), order[0]);

    let alt = id("envoy-alt").to_string();
    let secrets = fetch(&mut client, &[&alt, "ROOTCA"]).await.unwrap();
    assert_eq!(secrets[0].name, alt);
    assert_eq!(*certificate(&secrets[0]).spiffe_id(), id("envoy-alt"));
    assert_eq!(secrets[1].name, "ROOTCA");
    assert_eq!(trusted_ca(&secrets[1]).authorities(), bundle.authorities());

    let td = format!("spiffe://{TD}");
    let secrets = fetch(&mut client, &[&td]).await.unwrap();
    assert_eq!(secrets[0].name, td);
    assert_eq!(trusted_ca(&secrets[0]).authorities(), bundle.authorities());

    let secrets = fetch(&mut client, &["ALL"]).await.unwrap();
    assert_eq!(secrets[0].name, "ALL");
    let Some(secret::Type::ValidationContext(context)) = &secrets[0].r#type else {
        panic!("ALL is a validation context")
    };
    let validator = context.custom_validator_config.as_ref().unwrap();
    assert_eq!(validator.name, SPIFFE_VALIDATOR);
    let any = validator.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, SpiffeCertValidatorConfig::type_url());
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    assert_eq!(config.trust_domains.len(), 1);
    assert_eq!(config.trust_domains[0].name, TD);
    let pem = bytes(config.trust_domains[0].trust_bundle.as_ref());
    assert_eq!(
        TrustBundle::from_pem(TD.parse().unwrap(), &pem)
            .unwrap()
            .authorities(),
        bundle.authorities()
    );

    // No names: every identity by SPIFFE ID, and the trust domain's roots.
    let secrets = fetch(&mut client, &[]).await.unwrap();
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [order[0].as_str(), order[1].as_str(), td.as_str()]);

    // Refusals.
    let err = fetch(&mut client, &["bogus"]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = fetch(&mut client, &[id("someone-else").as_str()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = fetch(&mut client, &["spiffe://elsewhere.test"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec!["default".into()],
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let (_tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    agent.stop().await;
}

#[tokio::test]
async fn an_unregistered_caller_gets_bundles_but_no_certificate() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("someone-else", "node-sds-deny", &["unix:uid:4242"])
        .await;
    let wait = Duration::from_millis(500);
    let agent = Agent::start(&ca, "node-sds-deny", wait).await;
    let mut client = Client::new(agent.channel().await);
    let started = std::time::Instant::now();
    let err = fetch(&mut client, &["default"]).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(started.elapsed() < wait + Duration::from_secs(3));
    // Trust bundles are not secret: a validating-only Envoy may have them.
    let secrets = fetch(&mut client, &["ROOTCA"]).await.unwrap();
    assert_eq!(secrets[0].name, "ROOTCA");

    // On a stream, the refusal ends the stream with the status.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(request(&["default"])).await.unwrap();
    let err = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    agent.stop().await;
}

#[tokio::test]
async fn streams_follow_xds_acks_nacks_and_push_new_versions() {
    let ca = TestCa::start(HOUR, HOUR).await;
    ca.entry("envoy", "node-xds", &[&me()]).await;
    let agent = Agent::start(&ca, "node-xds", Duration::from_secs(10)).await;
    let mut client = Client::new(agent.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let quiet = Duration::from_millis(700);

    tx.send(request(&["default"])).await.unwrap();
    let first = next(&mut stream, PATIENCE).await.unwrap();
    assert!(!first.nonce.is_empty() && !first.version_info.is_empty());
    assert_eq!(decode(&first).len(), 1);

    // ACK: nothing comes back.
    let ack = |names: &[&str], response: &DiscoveryResponse| DiscoveryRequest {
        version_info: response.version_info.clone(),
        response_nonce: response.nonce.clone(),
        ..request(names)
    };
    tx.send(ack(&["default"], &first)).await.unwrap();
    assert!(
        next(&mut stream, quiet).await.is_none(),
        "an ack is not answered"
    );

    // NACK: logged and counted; the rejected version is not sent again.
    tx.send(DiscoveryRequest {
        version_info: String::new(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "failed to load certificate".into(),
            details: Vec::new(),
        }),
        ..ack(&["default"], &first)
    })
    .await
    .unwrap();
    assert!(
        next(&mut stream, quiet).await.is_none(),
        "a nack is not answered with the same version"
    );
    let metrics = agent.metrics().await;
    assert!(
        metrics.contains("meshward_agent_sds_nacks_total 1"),
        "{metrics}"
    );

    // A stale nonce (an answer to an older response) is ignored.
    tx.send(DiscoveryRequest {
        response_nonce: "stale".into(),
        ..request(&["default", "ROOTCA"])
    })
    .await
    .unwrap();
    assert!(
        next(&mut stream, quiet).await.is_none(),
        "a stale request is ignored"
    );

    // A new subscription with the current nonce gets a new response.
    tx.send(ack(&["default", "ROOTCA"], &first)).await.unwrap();
    let second = next(&mut stream, PATIENCE).await.unwrap();
    assert_ne!(second.nonce, first.nonce);
    assert_ne!(second.version_info, first.version_info);
    let secrets = decode(&second);
    assert_eq!(secrets.len(), 2);
    assert_eq!(trusted_ca(&secrets[1]).len(), 1);
    tx.send(ack(&["default", "ROOTCA"], &second)).await.unwrap();

    // A prepared root is pushed as a new version, unasked.
    ca.admin()
        .await
        .prepare_root(ca_pb::RotateRequest {
            danger_force: false,
        })
        .await
        .unwrap();
    let third = next(&mut stream, PATIENCE).await.unwrap();
    assert_ne!(third.version_info, second.version_info);
    assert_ne!(third.nonce, second.nonce);
    let secrets = decode(&third);
    assert_eq!(trusted_ca(&secrets[1]).len(), 2);
    assert_eq!(
        certificate(&secrets[0]).serial(),
        certificate(&decode(&second)[0]).serial(),
        "the certificate did not change"
    );
    tx.send(ack(&["default", "ROOTCA"], &third)).await.unwrap();
    assert!(next(&mut stream, quiet).await.is_none());

    // Shutdown ends the stream.
    agent.stop().await;
    let ended = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .unwrap();
    assert!(ended.map(|m| m.is_none()).unwrap_or(true));
}

#[test]
fn names_parse_as_spire_names_them() {
    assert_eq!(SecretName::parse("default").unwrap(), SecretName::Default);
    assert_eq!(SecretName::parse("ROOTCA").unwrap(), SecretName::RootCa);
    assert_eq!(SecretName::parse("ALL").unwrap(), SecretName::All);
    assert_eq!(
        SecretName::parse("spiffe://agent.test").unwrap(),
        SecretName::Bundle(TD.parse().unwrap())
    );
    assert_eq!(
        SecretName::parse("spiffe://agent.test/web").unwrap(),
        SecretName::Identity(id("web"))
    );
    for bad in [
        "",
        "Default",
        "rootca",
        "spiffe://",
        "spiffe://UPPER.test/x",
        "web",
    ] {
        assert!(
            matches!(SecretName::parse(bad), Err(SdsError::UnknownName(n)) if n == bad),
            "{bad}"
        );
    }
    for name in [
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://agent.test",
        "spiffe://agent.test/web",
    ] {
        assert_eq!(SecretName::parse(name).unwrap().to_string(), name);
    }
}

#[test]
fn the_xds_state_machine_acks_nacks_and_ignores_stale_nonces() {
    let mut state = StreamState::default();
    // Initial request: answer.
    assert_eq!(
        state.on_request(&request(&["default"])).unwrap(),
        Reply::Send
    );
    let first = state.response(Vec::new());
    // ACK: nothing.
    let ack = DiscoveryRequest {
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..request(&["default"])
    };
    assert_eq!(state.on_request(&ack).unwrap(), Reply::Ack);
    // NACK with the same names: nothing; with new names: the new subscription.
    let nack = DiscoveryRequest {
        error_detail: Some(rpc::Status {
            code: 13,
            message: "bad".into(),
            details: Vec::new(),
        }),
        ..ack.clone()
    };
    assert_eq!(
        state.on_request(&nack).unwrap(),
        Reply::Nack { resend: false }
    );
    let nack_new_names = DiscoveryRequest {
        resource_names: vec!["ROOTCA".into()],
        ..nack
    };
    assert_eq!(
        state.on_request(&nack_new_names).unwrap(),
        Reply::Nack { resend: true }
    );
    assert_eq!(state.names, ["ROOTCA"]);
    // Stale nonce: nothing, and the subscription is unchanged.
    let stale = DiscoveryRequest {
        response_nonce: "0".into(),
        ..request(&["default"])
    };
    assert_eq!(state.on_request(&stale).unwrap(), Reply::Stale);
    assert_eq!(state.names, ["ROOTCA"]);
    // Bad names and types fail the stream.
    assert!(matches!(
        state.on_request(&request(&["nope"])),
        Err(SdsError::UnknownName(_))
    ));
    assert!(matches!(
        state.on_request(&DiscoveryRequest {
            type_url: "type.googleapis.com/other".into(),
            ..request(&["default"])
        }),
        Err(SdsError::WrongType(_))
    ));
    // Nonces are fresh; versions name the content.
    let second = state.response(Vec::new());
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(second.version_info, first.version_info);
    let third = state.response(vec![pack_any(Secret::default())]);
    assert_ne!(third.version_info, first.version_info);
}
