use meshward_identity::{SpiffeId, TrustDomain};

use super::*;

fn td() -> TrustDomain {
    "example.org".parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn pod(ns: &str, sa: &str, uid: &str) -> RunningPod {
    RunningPod {
        namespace: ns.into(),
        name: format!("{sa}-pod"),
        uid: uid.into(),
        service_account: sa.into(),
    }
}

#[test]
fn service_account_refs_parse_and_name_their_user() {
    let sa: ServiceAccountRef = "meshward:meshward-agent".parse().unwrap();
    assert_eq!(
        sa.username(),
        "system:serviceaccount:meshward:meshward-agent"
    );
    assert_eq!(sa.to_string(), "meshward:meshward-agent");
    for bad in [
        "meshward",
        ":agent",
        "ns:",
        "Ns:agent",
        "ns:a b",
        "a.b:agent",
    ] {
        assert!(
            matches!(bad.parse::<ServiceAccountRef>(), Err(K8sError::BadServiceAccount(s)) if s == bad),
            "{bad}"
        );
    }
}

#[test]
fn agent_ids_name_cluster_and_node() {
    let agent = agent_id(&td(), "prod", "node-a.zone1").unwrap();
    assert_eq!(
        agent.as_str(),
        "spiffe://example.org/meshward/agent/k8s_psat/prod/node-a.zone1"
    );
    assert!(is_k8s_agent(&agent));
    assert!(!is_k8s_agent(&id(
        "spiffe://example.org/meshward/agent/join/node-a"
    )));
    assert!(matches!(
        agent_id(&td(), "Prod", "node-a"),
        Err(K8sError::BadName(name, _)) if name == "Prod"
    ));
    assert!(matches!(
        agent_id(&td(), "prod", "a/b"),
        Err(K8sError::BadName(name, _)) if name == "a/b"
    ));
}

#[test]
fn node_pods_entitle_only_ns_sa_ids_of_running_pods() {
    let pods = NodePods::new("node-a", vec![pod("shop", "cart", "uid-1")]);
    assert_eq!(pods.node(), "node-a");
    assert!(pods.entitles(&id("spiffe://example.org/ns/shop/sa/cart"), None));
    assert!(pods.entitles(&id("spiffe://example.org/ns/shop/sa/cart"), Some("uid-1")));
    // Another pod of the same service account is not this one.
    assert!(!pods.entitles(&id("spiffe://example.org/ns/shop/sa/cart"), Some("uid-2")));
    assert!(!pods.entitles(&id("spiffe://example.org/ns/shop/sa/web"), None));
    assert!(!pods.entitles(&id("spiffe://example.org/ns/other/sa/cart"), None));
    assert!(!pods.entitles(&id("spiffe://example.org/ns/shop/sa/cart/extra"), None));
    assert!(!pods.entitles(&id("spiffe://example.org/shop/cart"), None));
    assert!(!NodePods::default().entitles(&id("spiffe://example.org/ns/shop/sa/cart"), None));
}

#[test]
fn error_codes_separate_refusals_from_failures() {
    let api = K8sError::Api {
        doing: "x",
        reason: "500".into(),
    };
    assert_eq!(api.code(), "k8s_api");
    assert!(!api.is_refusal());
    assert!(K8sError::NotAuthenticated.is_refusal());
    assert_eq!(K8sError::MissingExtra("pod-uid").code(), "not_pod_bound");
}

mod settings {
    use crate::config::{CaSettings, ConfigError};

    use super::*;

    fn base() -> CaSettings {
        CaSettings {
            data_dir: Some("/var/lib/meshward-ca".into()),
            listen: Some("127.0.0.1:8081".into()),
            trust_domain: Some("example.org".into()),
            ..CaSettings::default()
        }
    }

    fn invalid(settings: CaSettings) -> (&'static str, String) {
        match settings.into_config() {
            Err(ConfigError::Invalid { setting, value, .. }) => (setting, value),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn k8s_mode_is_off_unless_asked_for() {
        assert_eq!(base().into_config().unwrap().k8s, None);
    }

    #[test]
    fn k8s_mode_has_defaults_and_takes_every_setting() {
        let config = CaSettings {
            k8s: Some(true),
            ..base()
        }
        .into_config()
        .unwrap();
        assert_eq!(config.k8s, Some(K8sConfig::new(None).unwrap()));
        let config = CaSettings {
            k8s: Some(true),
            kubeconfig: Some("/etc/kube.yaml".into()),
            namespace: Some("mesh".into()),
            cluster: Some("prod-eu".into()),
            agent_sa: Some("mesh:agent".into()),
            ..base()
        }
        .into_config()
        .unwrap();
        let k8s = config.k8s.unwrap();
        assert_eq!(
            k8s.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/kube.yaml"))
        );
        assert_eq!(k8s.namespace, "mesh");
        assert_eq!(k8s.cluster, "prod-eu");
        assert_eq!(k8s.agent_sa.username(), "system:serviceaccount:mesh:agent");
    }

    #[test]
    fn bad_k8s_settings_are_named() {
        let on = || CaSettings {
            k8s: Some(true),
            ..base()
        };
        assert_eq!(
            invalid(CaSettings {
                agent_sa: Some("agent".into()),
                ..on()
            }),
            ("agent_sa", "agent".to_owned())
        );
        assert_eq!(
            invalid(CaSettings {
                cluster: Some("Prod".into()),
                ..on()
            }),
            ("cluster", "Prod".to_owned())
        );
        assert_eq!(
            invalid(CaSettings {
                namespace: Some("a.b".into()),
                ..on()
            }),
            ("namespace", "a.b".to_owned())
        );
        // A k8s setting without `--k8s` is a mistake, not silently ignored.
        assert_eq!(
            invalid(CaSettings {
                cluster: Some("prod".into()),
                ..base()
            }),
            ("cluster", "prod".to_owned())
        );
    }
}
