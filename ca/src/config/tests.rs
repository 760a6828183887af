use super::*;

fn settings() -> CaSettings {
    CaSettings {
        data_dir: Some("/var/lib/meshward-ca".into()),
        listen: Some("127.0.0.1:8081".into()),
        trust_domain: Some("example.org".into()),
        ..CaSettings::default()
    }
}

fn invalid_setting(err: ConfigError) -> &'static str {
    match err {
        ConfigError::Invalid { setting, .. } => setting,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn defaults_fill_the_gaps() {
    let config = settings().into_config().unwrap();
    assert_eq!(config.svid_ttl, DEFAULT_SVID_TTL);
    assert_eq!(config.jwt_ttl, DEFAULT_JWT_TTL);
    assert_eq!(config.max_batch, DEFAULT_MAX_BATCH);
    assert_eq!(
        config.admin_socket,
        PathBuf::from("/var/lib/meshward-ca/admin.sock")
    );
    assert_eq!(
        config.audit_path(),
        PathBuf::from("/var/lib/meshward-ca/audit.jsonl")
    );
    assert_eq!(config.trust_domain.as_str(), "example.org");
    assert_eq!(config.admin_listen, None);
}

#[test]
fn flags_win_over_the_file() {
    let file = CaSettings::from_toml(
        "trust_domain = \"file.example\"\nsvid_ttl = \"10m\"\nadmin_listen = \"127.0.0.1:9090\"\nmax_batch = 50\n",
        Path::new("ca.toml"),
    )
    .unwrap();
    let flags = CaSettings {
        svid_ttl: Some("2h".into()),
        ..settings()
    };
    let config = flags.or(file).into_config().unwrap();
    assert_eq!(config.trust_domain.as_str(), "example.org");
    assert_eq!(config.svid_ttl, Duration::from_secs(7200));
    assert_eq!(config.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(config.max_batch, 50);
}

#[test]
fn unknown_keys_in_the_file_are_refused() {
    let err = CaSettings::from_toml("svid_tll = \"1h\"\n", Path::new("ca.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::ParseFile { .. }), "{err:?}");
    assert!(err.to_string().contains("svid_tll"), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
}

#[test]
fn missing_required_settings_name_the_flag_and_env() {
    let err = CaSettings {
        trust_domain: None,
        ..settings()
    }
    .into_config()
    .unwrap_err();
    assert!(matches!(
        err,
        ConfigError::Missing {
            setting: "trust_domain",
            ..
        }
    ));
    let text = err.to_string();
    assert!(
        text.contains("--trust-domain") && text.contains("MESHWARD_CA_TRUST_DOMAIN"),
        "{text}"
    );
    for (setting, s) in [
        (
            "data_dir",
            CaSettings {
                data_dir: None,
                ..settings()
            },
        ),
        (
            "listen",
            CaSettings {
                listen: None,
                ..settings()
            },
        ),
    ] {
        assert!(
            matches!(s.into_config(), Err(ConfigError::Missing { setting: got, .. }) if got == setting)
        );
    }
}

#[test]
fn bad_values_name_the_setting() {
    let cases = [
        (
            "listen",
            CaSettings {
                listen: Some("localhost".into()),
                ..settings()
            },
        ),
        (
            "trust_domain",
            CaSettings {
                trust_domain: Some("Bad_TD!".into()),
                ..settings()
            },
        ),
        (
            "svid_ttl",
            CaSettings {
                svid_ttl: Some("10s".into()),
                ..settings()
            },
        ),
        (
            "svid_ttl",
            CaSettings {
                svid_ttl: Some("25h".into()),
                ..settings()
            },
        ),
        (
            "svid_ttl",
            CaSettings {
                svid_ttl: Some("1".into()),
                ..settings()
            },
        ),
        (
            "jwt_ttl",
            CaSettings {
                jwt_ttl: Some("2d".into()),
                ..settings()
            },
        ),
        (
            "agent_svid_ttl",
            CaSettings {
                agent_svid_ttl: Some("29s".into()),
                ..settings()
            },
        ),
        (
            "root_ttl",
            CaSettings {
                root_ttl: Some("1h".into()),
                ..settings()
            },
        ),
        (
            "root_ttl",
            CaSettings {
                root_ttl: Some("8000d".into()),
                ..settings()
            },
        ),
        (
            "max_batch",
            CaSettings {
                max_batch: Some(0),
                ..settings()
            },
        ),
        (
            "max_batch",
            CaSettings {
                max_batch: Some(MAX_MAX_BATCH + 1),
                ..settings()
            },
        ),
        (
            "admin_listen",
            CaSettings {
                admin_listen: Some(":9090".into()),
                ..settings()
            },
        ),
        (
            "handshake_timeout",
            CaSettings {
                handshake_timeout: Some("0s".into()),
                ..settings()
            },
        ),
        (
            "upstream_ca",
            CaSettings {
                upstream_ca: Some("/nonexistent/cacerts".into()),
                ..settings()
            },
        ),
    ];
    for (setting, s) in cases {
        let err = s.into_config().unwrap_err();
        let message = err.to_string();
        assert_eq!(invalid_setting(err), setting, "{message}");
    }
}

#[test]
fn bad_value_message_is_one_line_with_the_value() {
    let err = CaSettings {
        svid_ttl: Some("10s".into()),
        ..settings()
    }
    .into_config()
    .unwrap_err();
    assert_eq!(err.to_string(), "invalid `svid_ttl` `10s`: use 30s to 24h");
}
