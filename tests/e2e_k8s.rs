//! End to end in Kubernetes mode, every part real: a private REAL kube-apiserver (etcd included), a
//! `meshward ca run --k8s` process using the least-privilege `meshward-ca` kubeconfig, and
//! `meshward agent run --k8s` processes that attest with pod-bound TokenRequest tokens. Workloads are
//! processes placed into kubelet-shaped cgroups of pods (no kubelet: pod status is set through the
//! status subresource) that fetch their SVID over the Workload API with `meshward svid fetch`.
//!
//! Needs root (cgroups) and the cached kube-apiserver binary; skips with a printed reason otherwise.
//! The scenarios share one cluster, CA and agent, and run in order; each names itself on failure.

// Indexing a `serde_json::Value` never panics: a missing key is `Null`.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use meshward_identity::bundle::BundleSet;
use meshward_identity::proto::ca as pb;
use meshward_identity::verify::{PeerRole, PeerVerifier, peer_spiffe_id};
use meshward_identity::x509::{SvidKey, certs_from_pem};
use meshward_kube_fake::fixture::{
    create_pod, create_service_account, delete_pod_now, ensure_node, request_pod_token,
    set_pod_phase,
};
use meshward_kube_fake::real::{self, RealApiServer};
use meshward_tests::{CaOptions, CaProcess, TRUST_DOMAIN, trust_domain, workload_request};
use rustls_pki_types::UnixTime;

const BIN: &str = env!("CARGO_BIN_EXE_meshward");
const CLUSTER: &str = "e2e";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const AGENT_NS: &str = "meshward";
const AGENT_SA: &str = "meshward-agent";
const AUDIENCE: &str = "meshward-ca";
/// A bound on every wait (a loaded two-core machine, debug builds); never asserted as a duration.
const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn k8s_agent_through_a_real_ca() {
    if let Some(reason) = skip_reason() {
        println!("{reason}");
        return;
    }
    let Some(cgroups) = cgroup_root() else {
        println!("skipping: no writable cgroup hierarchy mounted");
        return;
    };
    let Some(server) = RealApiServer::start_private().expect("start a private kube-apiserver")
    else {
        println!("{}", real::SKIP_MESSAGE);
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = Cluster::new(&rt, &server, cgroups);

    let agent = cluster.start_agent("a", NODE_A, AUDIENCE);
    agent.wait_ready(&cluster);
    let agent_id = format!("spiffe://{TRUST_DOMAIN}/meshward/agent/k8s_psat/{CLUSTER}/{NODE_A}");
    let chain =
        certs_from_pem(&std::fs::read_to_string(agent.data.join("agent.pem")).unwrap()).unwrap();
    assert_eq!(
        peer_spiffe_id(&chain).unwrap().as_str(),
        agent_id,
        "the agent's own svid; log:\n{}",
        agent.log()
    );

    let catalog_uid = a_pod_on_this_node_gets_exactly_its_identity(&cluster, &agent);
    a_pod_on_another_node_gets_nothing(&cluster, &agent);
    a_deleted_pod_is_no_longer_issued_by_the_ca(&cluster, &agent, &catalog_uid);
    a_token_for_the_wrong_audience_is_refused(&cluster);
}

/// (1) `shop/catalog` running on node-a: a process in its cgroup gets exactly
/// `spiffe://TD/ns/shop/sa/catalog`, chaining to the CA's bundle.
fn a_pod_on_this_node_gets_exactly_its_identity(cluster: &Cluster, agent: &Agent) -> String {
    let uid = cluster.running_pod("shop", "catalog-0", "catalog", NODE_A);
    let dir = cluster.temp.path().join("catalog-svid");
    let want = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/catalog");
    let mut last = String::new();
    let out = eventually("the catalog pod's svid", || {
        let out = cluster.fetch_in_pod(&uid, agent, Some(&dir));
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "no svid for the catalog pod (last: {last}); agent log:\n{}\nca log:\n{}",
            agent.log(),
            cluster.ca.log()
        )
    });
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("svid fetch --json");
    let ids: Vec<&str> = json["svids"]
        .as_array()
        .expect("svids")
        .iter()
        .filter_map(|s| s["spiffe_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![want.as_str()],
        "exactly the pod's identity: {json}"
    );

    let chain = certs_from_pem(&std::fs::read_to_string(dir.join("svid.pem")).unwrap()).unwrap();
    let (leaf, intermediates) = chain.split_first().expect("a chain");
    let mut bundles = BundleSet::new();
    bundles.insert(cluster.ca.bundle());
    let verified = PeerVerifier::new(Arc::new(bundles), [trust_domain()])
        .verify(leaf, intermediates, PeerRole::Client, UnixTime::now())
        .expect("the svid chains to the ca's bundle");
    assert_eq!(verified.as_str(), want);
    cluster
        .ca
        .wait_audit("the catalog svid", |a| a.issued(&want) > 0);
    uid
}

/// (2) `shop/payments` running on node-b: a process in its cgroup gets no SVID from node-a's agent,
/// and the CA never issued that identity.
fn a_pod_on_another_node_gets_nothing(cluster: &Cluster, agent: &Agent) {
    let uid = cluster.running_pod("shop", "payments-0", "payments", NODE_B);
    let out = cluster.fetch_in_pod(&uid, agent, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a process of a node-b pod got an svid from node-a's agent: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("no identity for this process: workload attestation failed (`k8s`)"),
        "the refusal says the k8s attestation failed: {stderr}"
    );
    let reason = format!("pod `{uid}` is not on this node `{NODE_A}`");
    assert!(
        agent.log().contains(&reason),
        "the agent logs why (`{reason}`); log:\n{}",
        agent.log()
    );
    assert!(out.stdout.is_empty(), "nothing printed: {:?}", out.stdout);
    std::thread::sleep(meshward_tests::AUDIT_SETTLE);
    let payments = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/payments");
    assert_eq!(
        cluster.ca.audit().issued(&payments),
        0,
        "the ca issued `{payments}`"
    );
}

/// (3) delete `shop/catalog`: the CA refuses that identity to node-a's agent (asked directly with
/// the agent's own SVID, so the refusal is the CA's, not the agent's choice to stop asking). The
/// same request before the delete is the control: it is issued.
fn a_deleted_pod_is_no_longer_issued_by_the_ca(cluster: &Cluster, agent: &Agent, uid: &str) {
    let catalog = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/catalog");
    let mint = || -> pb::svid_result::Result {
        let chain = certs_from_pem(&std::fs::read_to_string(agent.data.join("agent.pem")).unwrap())
            .unwrap();
        let key = SvidKey::from_pkcs8_pem(
            &std::fs::read_to_string(agent.data.join("agent.key")).unwrap(),
        )
        .unwrap();
        cluster.rt.block_on(async {
            let mut client = cluster.ca.with_client_cert(chain, &key).await.unwrap();
            let mut request = workload_request(&catalog);
            request.pod_uid = uid.to_owned();
            let response = client
                .mint_x509_svids(pb::MintX509SvidsRequest {
                    requests: vec![request],
                })
                .await
                .expect("the ca answers the agent")
                .into_inner();
            let [result] = <[pb::SvidResult; 1]>::try_from(response.results).unwrap();
            result.result.unwrap()
        })
    };
    assert!(
        matches!(mint(), pb::svid_result::Result::Svid(ref s) if s.spiffe_id == catalog),
        "the control: the running pod's identity is issued to its node's agent"
    );
    cluster.rt.block_on(async {
        delete_pod_now(&cluster.admin, "shop", "catalog-0")
            .await
            .unwrap();
    });
    let refusal = eventually(
        "the ca to refuse the deleted pod's identity",
        || match mint() {
            pb::svid_result::Result::Error(e) => Some(e),
            pb::svid_result::Result::Svid(_) => None,
        },
    )
    .expect("the ca to refuse the deleted pod's identity");
    assert_eq!(refusal.code, "not_entitled", "{refusal:?}");
    cluster
        .ca
        .wait_audit("the refusal of the deleted pod's identity", |a| {
            a.refused(&catalog, "not_entitled") > 0
        });
    // From then on the CA issues it to no one: neither to this direct request nor to the agent's
    // own renewals (several sync intervals pass).
    let issued = cluster.ca.audit().issued(&catalog);
    let journal = cluster.ca.journal_count();
    std::thread::sleep(Duration::from_secs(3));
    assert!(matches!(mint(), pb::svid_result::Result::Error(ref e) if e.code == "not_entitled"));
    std::thread::sleep(meshward_tests::AUDIT_SETTLE);
    let audit = cluster.ca.audit();
    assert_eq!(
        audit.issued(&catalog),
        issued,
        "`{catalog}` was issued after its pod was deleted:\n{}",
        audit.dump()
    );
    assert_eq!(cluster.ca.journal_count(), journal, "the journal grew");
}

/// (4) an agent whose token was requested for another audience: node attestation is refused with a
/// clear error, the agent exits non-zero, and the CA issued it nothing.
fn a_token_for_the_wrong_audience_is_refused(cluster: &Cluster) {
    let journal = cluster.ca.journal_count();
    let mut agent = cluster.start_agent("b", NODE_B, "not-meshward");
    let status = agent
        .wait_exit(PATIENCE)
        .unwrap_or_else(|| panic!("the agent kept running; log:\n{}", agent.log()));
    assert!(
        !status.success(),
        "refused attestation exits non-zero: {status}"
    );
    let log = agent.log();
    assert!(
        log.contains("node attestation failed")
            && log.contains("PermissionDenied: kubernetes attestation refused: bad_psat"),
        "the agent says its token was refused: {log}"
    );
    let ca_log = cluster.ca.log();
    assert!(
        ca_log.contains("token refused by the apiserver"),
        "the ca logs the apiserver's verdict; log:\n{ca_log}"
    );
    let agent_b = format!("spiffe://{TRUST_DOMAIN}/meshward/agent/k8s_psat/{CLUSTER}/{NODE_B}");
    cluster.ca.assert_nothing_issued(&agent_b, journal);
}

/// The cluster, the CA and what the agents need.
struct Cluster<'a> {
    rt: &'a tokio::runtime::Runtime,
    server: &'a RealApiServer,
    admin: kube::Client,
    ca: CaProcess,
    cgroups: PathBuf,
    bundle: PathBuf,
    temp: tempfile::TempDir,
}

impl<'a> Cluster<'a> {
    fn new(rt: &'a tokio::runtime::Runtime, server: &'a RealApiServer, cgroups: PathBuf) -> Self {
        let admin = rt.block_on(async {
            let admin = server.client().await.unwrap();
            for ns in [AGENT_NS, "shop"] {
                let namespaces: Api<Namespace> = Api::all(admin.clone());
                let namespace: Namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
                namespaces
                    .create(&PostParams::default(), &namespace)
                    .await
                    .unwrap();
            }
            create_service_account(&admin, AGENT_NS, AGENT_SA)
                .await
                .unwrap();
            for sa in ["catalog", "payments"] {
                create_service_account(&admin, "shop", sa).await.unwrap();
            }
            for node in [NODE_A, NODE_B] {
                ensure_node(&admin, node).await.unwrap();
            }
            admin
        });
        let kubeconfig = server.kubeconfig_ca_path();
        let ca = CaProcess::start(
            CaOptions::new(BIN)
                .flag("--k8s")
                .arg("--kubeconfig", &kubeconfig.display().to_string())
                .arg("--namespace", AGENT_NS)
                .arg("--cluster", CLUSTER)
                .arg("--agent-sa", &format!("{AGENT_NS}:{AGENT_SA}"))
                .arg("--svid-ttl", "30s"),
        );
        let temp = tempfile::Builder::new()
            .prefix("mw-e2e-k8s")
            .tempdir_in("/tmp")
            .unwrap();
        let bundle = temp.path().join("bundle.pem");
        std::fs::write(&bundle, ca.cli_ok(&["bundle", "show"])).unwrap();
        Self {
            rt,
            server,
            admin,
            ca,
            cgroups,
            bundle,
            temp,
        }
    }

    /// A pod created and set `Running` through the status subresource; its UID.
    fn running_pod(&self, ns: &str, name: &str, sa: &str, node: &str) -> String {
        self.rt.block_on(async {
            create_pod(&self.admin, ns, name, sa, node, &[])
                .await
                .unwrap();
            set_pod_phase(&self.admin, ns, name, "Running")
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap()
        })
    }

    /// An agent pod `agent-<name>` on `node`, its TokenRequest token for `audience` in a file, and
    /// `meshward agent run --k8s` with it.
    fn start_agent(&self, name: &str, node: &str, audience: &str) -> Agent {
        let pod_name = format!("agent-{name}");
        let token = self.rt.block_on(async {
            let pod: Pod = create_pod(&self.admin, AGENT_NS, &pod_name, AGENT_SA, node, &[])
                .await
                .unwrap();
            request_pod_token(&self.admin, &pod, AGENT_SA, &[audience], 600)
                .await
                .unwrap()
        });
        let dir = self.temp.path().join(format!("agent-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).unwrap();
        let data = dir.join("data");
        let socket = dir.join("agent.sock");
        let admin = free_port();
        let log = dir.join("agent.log");
        let mut command = meshward();
        command
            .args(["--log", "info", "--log-format", "json", "agent", "run"])
            .arg("--ca")
            .arg(self.ca.addr().to_string())
            .arg("--trust-bundle")
            .arg(&self.bundle)
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data)
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--sync-interval", "1s", "--identity-wait", "5s"])
            .args(["--k8s", "--node-name", node])
            .arg("--psat-token-file")
            .arg(&token_file)
            .arg("--kubeconfig")
            .arg(self.server.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Agent {
            child: Some(command.spawn().expect("spawn meshward agent run")),
            data,
            socket,
            admin,
            log,
        }
    }

    /// `meshward svid fetch --json` run by a process that first moves itself into a kubelet-shaped
    /// cgroup of pod `uid` (then `exec`s, so the fetching process is the one in the cgroup).
    fn fetch_in_pod(&self, uid: &str, agent: &Agent, write: Option<&Path>) -> Output {
        let container = uid.replace('-', "").repeat(2);
        let cgroup = self
            .cgroups
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{uid}"))
            .join(container);
        std::fs::create_dir_all(&cgroup).unwrap();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(cgroup.join("cgroup.procs"))
            .arg(BIN)
            .args(["svid", "fetch", "--json", "--socket"])
            .arg(&agent.socket);
        if let Some(dir) = write {
            command.arg("--write").arg(dir);
        }
        let out = command
            .output()
            .expect("run svid fetch in the pod's cgroup");
        // The process has exited, so the cgroups are empty; parents may be shared, keep them.
        let _ = std::fs::remove_dir(&cgroup);
        let _ = std::fs::remove_dir(cgroup.parent().unwrap());
        out
    }
}

/// One `meshward agent run --k8s` process; SIGKILLed on drop.
struct Agent {
    child: Option<Child>,
    data: PathBuf,
    socket: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/ready` to answer 200; panics with the agent's and the CA's logs otherwise.
    fn wait_ready(&self, cluster: &Cluster) {
        let deadline = Instant::now() + PATIENCE;
        while !http_ok(self.admin, "/ready") {
            assert!(
                Instant::now() < deadline,
                "the agent is not ready; agent log:\n{}\nca log:\n{}",
                self.log(),
                cluster.ca.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `Some(reason)` when this test cannot run here.
fn skip_reason() -> Option<String> {
    // `geteuid` is not in std; `/proc/self` is owned by the effective uid.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        return Some("skipping: placing processes into pod cgroups needs root".to_owned());
    }
    if RealApiServer::binary().is_none() {
        return Some(real::SKIP_MESSAGE.to_owned());
    }
    None
}

/// The pids v1 hierarchy when mounted, else the v2 one.
fn cgroup_root() -> Option<PathBuf> {
    [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.join("cgroup.procs").exists())
}

/// The `meshward` binary with no `MESHWARD_*` variables from the test's environment.
fn meshward() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHWARD_") {
            command.env_remove(name);
        }
    }
    command
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Whether `GET path` on `addr` answers 200.
fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// Polls `attempt` until it gives `Some`; `None` after [`PATIENCE`] (the caller says what failed).
fn eventually<T>(what: &str, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = attempt() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            println!("gave up waiting for {what}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
