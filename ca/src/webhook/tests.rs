use super::*;

fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key, made.cert.der().to_vec())
}

fn serving(certs: &ReloadingCert) -> Vec<u8> {
    certs.current.read().unwrap().key.cert[0].to_vec()
}

/// Moves a file's modification time, as a Secret update would.
fn touch(path: &Path, secs: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(secs))
        .unwrap();
}

fn setting(err: ConfigError) -> (&'static str, String) {
    match err {
        ConfigError::Invalid {
            setting, reason, ..
        } => (setting, reason),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn no_listen_address_means_no_webhook_and_no_stray_settings() {
    assert_eq!(
        webhook_config(None, None, None, None, None, None, None).unwrap(),
        None
    );
    let err = webhook_config(None, None, None, Some("x:1".into()), None, None, None).unwrap_err();
    let (name, reason) = setting(err);
    assert_eq!(name, "inject_image");
    assert!(reason.contains("--webhook-listen"), "{reason}");
    let err = webhook_config(None, Some("c.pem".into()), None, None, None, None, None).unwrap_err();
    assert_eq!(setting(err).0, "webhook_cert");
}

#[test]
fn the_webhook_needs_an_address_a_cert_and_a_key() {
    let some = |s: &str| Some(s.to_owned());
    let err = webhook_config(
        some("0.0.0.0:8443"),
        Some("c.pem".into()),
        None,
        None,
        None,
        None,
        None,
    )
    .unwrap_err();
    let (name, reason) = setting(err);
    assert_eq!(name, "webhook_listen");
    assert!(reason.contains("--webhook-key"), "{reason}");
    let err = webhook_config(
        some("localhost:8443"),
        Some("c.pem".into()),
        Some("k.pem".into()),
        None,
        None,
        None,
        None,
    )
    .unwrap_err();
    assert_eq!(setting(err).0, "webhook_listen");

    let config = webhook_config(
        some("0.0.0.0:8443"),
        Some("c.pem".into()),
        Some("k.pem".into()),
        None,
        None,
        None,
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(config.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(config.inject, InjectOptions::default());
}

#[test]
fn inject_settings_are_checked_and_applied() {
    let some = |s: &str| Some(s.to_owned());
    let with = |image, configmap, dir| {
        webhook_config(
            some("127.0.0.1:0"),
            Some("c.pem".into()),
            Some("k.pem".into()),
            image,
            configmap,
            dir,
            Some(true),
        )
    };
    assert_eq!(
        setting(with(some("a b"), None, None).unwrap_err()).0,
        "inject_image"
    );
    assert_eq!(
        setting(with(None, some("Policies"), None).unwrap_err()).0,
        "inject_policies_configmap"
    );
    assert_eq!(
        setting(with(None, None, some("relative")).unwrap_err()).0,
        "inject_socket_dir"
    );
    let config = with(
        some("reg/meshward:1"),
        some("shop-policies"),
        some("/var/run/mw/"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        config.inject,
        InjectOptions {
            image: "reg/meshward:1".to_owned(),
            policies_config_map: "shop-policies".to_owned(),
            socket_dir: "/var/run/mw".to_owned(),
            allow_host_network: true,
        }
    );
}

#[test]
fn bad_certificate_files_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = pair(dir.path(), "a");
    let (_, other_key, _) = pair(dir.path(), "b");
    let missing = dir.path().join("missing.pem");

    let err = load_pair(&missing, &key).unwrap_err();
    assert!(
        matches!(
            &err,
            WebhookError::Read {
                what: "certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = load_pair(&cert, &missing).unwrap_err();
    assert!(
        matches!(&err, WebhookError::Read { what: "key", .. }),
        "{err}"
    );
    // Key and certificate swapped: neither file holds what it should.
    assert!(matches!(
        load_pair(&key, &key).unwrap_err(),
        WebhookError::NoCertificate(_)
    ));
    assert!(matches!(
        load_pair(&cert, &cert).unwrap_err(),
        WebhookError::NoKey(_)
    ));
    let err = load_pair(&cert, &other_key).unwrap_err();
    assert!(matches!(&err, WebhookError::Pair { .. }), "{err}");
    assert!(load_pair(&cert, &key).is_ok());
}

#[test]
fn a_changed_pair_is_served_from_then_on_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = pair(dir.path(), "live");
    let certs = ReloadingCert::load(&cert, &key).unwrap();
    assert_eq!(serving(&certs), first);
    assert!(!certs.reload_if_changed());

    // A renewed Secret: both files rewritten.
    let (_, _, second) = pair(dir.path(), "live");
    touch(&cert, 5);
    touch(&key, 5);
    assert!(certs.reload_if_changed());
    assert_eq!(serving(&certs), second);

    // Half-written: the previous pair stays, and the next check tries again.
    std::fs::write(&key, "not a key").unwrap();
    touch(&key, 10);
    assert!(!certs.reload_if_changed());
    assert_eq!(serving(&certs), second);
    assert!(!certs.reload_if_changed());
}

#[test]
fn the_config_file_and_flags_reach_the_webhook() {
    let file = crate::config::CaSettings::from_toml(
        r#"
data_dir = "/var/lib/meshward-ca"
listen = "127.0.0.1:8081"
trust_domain = "example.org"
webhook_listen = "0.0.0.0:8443"
webhook_cert = "/etc/meshward/webhook/tls.crt"
webhook_key = "/etc/meshward/webhook/tls.key"
inject_socket_dir = "/var/run/mw"
"#,
        Path::new("ca.toml"),
    )
    .unwrap();
    let flags = crate::config::CaSettings {
        inject_image: Some("reg/meshward:2".to_owned()),
        ..crate::config::CaSettings::default()
    };
    let config = flags.or(file).into_config().unwrap();
    let webhook = config.webhook.unwrap();
    assert_eq!(webhook.listen, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(webhook.cert, Path::new("/etc/meshward/webhook/tls.crt"));
    assert_eq!(webhook.inject.image, "reg/meshward:2");
    assert_eq!(webhook.inject.socket_dir, "/var/run/mw");
    assert_eq!(webhook.inject.policies_config_map, "meshward-policies");
}
