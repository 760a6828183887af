//! A sidecar pair over real sockets: the app's outbound proxy, mTLS, the callee's inbound proxy;
//! and plain TCP listeners both ways.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use meshward_proxy::config::{InboundListener, Limits, OutboundListener, Protocol};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn outbound(
    upstream: std::net::SocketAddr,
    expected: &str,
    protocol: Protocol,
) -> OutboundListener {
    OutboundListener {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: upstream.to_string(),
        expected: expected.parse().unwrap(),
        protocol,
    }
}

#[tokio::test]
async fn a_call_through_a_sidecar_pair_is_decided_and_a_wrong_upstream_identity_is_refused() {
    let server = Harness::http().await;
    let upstream = server.inbound();
    let client = Harness::with_identity(Arc::clone(&server.pki), WEB, |config, _| {
        config.inbound.clear();
        config
            .outbound
            .push(outbound(upstream, API, Protocol::Http));
        config.outbound.push(outbound(
            upstream,
            "spiffe://a.org/ns/shop/sa/other",
            Protocol::Http,
        ));
    })
    .await;

    for path in ["/api/one", "/api/two"] {
        let response = plain_get(client.outbound(0), path).await;
        assert_eq!(status(&response), 200, "{response}");
        assert!(response.ends_with(&format!("app saw {path}")), "{response}");
    }
    let denied = plain_get(client.outbound(0), "/admin").await;
    assert_eq!(status(&denied), 403, "{denied}");
    let seen = server.app.seen();
    assert_eq!(seen.len(), 2);
    let xfcc = seen[0].headers["x-forwarded-client-cert"].to_str().unwrap();
    assert!(xfcc.ends_with(&format!("URI={WEB}")), "{xfcc}");
    // The upstream connection negotiated h2 over ALPN and was reused.
    let records = server.audit(3).await;
    assert!(
        records.iter().all(|r| r["context"]["tls"]["alpn"] == "h2"),
        "{records:#?}"
    );

    let refused = plain_get(client.outbound(1), "/api/three").await;
    assert_eq!(status(&refused), 502, "{refused}");
    assert!(
        refused.contains(&format!(
            "peer `{API}` is not the expected `spiffe://a.org/ns/shop/sa/other`"
        )),
        "{refused}"
    );
    assert_eq!(
        server.app.seen().len(),
        2,
        "nothing reached the app through the refused upstream"
    );
    assert!(
        client
            .metrics()
            .contains(r#"meshward_proxy_tls_failures_total{reason="wrong_peer"} 1"#)
    );
}

/// A TCP relay to `to` that counts the connections it accepts.
async fn counting_relay(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut upstream = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
            });
        }
    });
    (addr, accepted)
}

/// A TCP relay to `to` that accepts nothing until `open` fires, like an upstream that stalled:
/// connections made meanwhile wait in the kernel's accept queue. Returns its address, how many
/// connections waited there when it opened, and how many it accepted in all.
async fn stalled_relay(
    to: std::net::SocketAddr,
    open: tokio::sync::oneshot::Receiver<()>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (waited, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (waited_count, accepted_count) = (Arc::clone(&waited), Arc::clone(&accepted));
    tokio::spawn(async move {
        let _ = open.await;
        let mut queued = Vec::new();
        while let Ok(Ok((tcp, _))) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        {
            queued.push(tcp);
        }
        waited_count.store(queued.len(), Ordering::SeqCst);
        let forward = |mut inbound: tokio::net::TcpStream| {
            accepted_count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut upstream = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
            });
        };
        queued.into_iter().for_each(forward);
        while let Ok((tcp, _)) = listener.accept().await {
            forward(tcp);
        }
    });
    (addr, waited, accepted)
}

/// hyper's pool starts a connection for every request that finds no idle one, and finishes it even
/// when another request's connection serves it first: after a stall, a handshake per queued
/// request, on the CPUs that must catch up. meshward's pool makes at most `MAX_CONNECTING`
/// attempts at once, and only while the requests in flight outnumber the connections.
#[tokio::test]
async fn requests_queued_behind_a_stalled_upstream_do_not_each_start_a_handshake() {
    const REQUESTS: usize = 30;
    let server = Harness::http().await;
    let (open, opened) = tokio::sync::oneshot::channel();
    let (relay, waited, accepted) = stalled_relay(server.inbound(), opened).await;
    let client = Harness::with_identity(Arc::clone(&server.pki), WEB, |config, _| {
        config.inbound.clear();
        config.upstream_http2 = false;
        config.outbound.push(outbound(relay, API, Protocol::Http));
    })
    .await;
    let calls: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let addr = client.outbound(0);
            tokio::spawn(async move { plain_get(addr, &format!("/api/{i}")).await })
        })
        .collect();
    // Every request reaches the client sidecar and waits for a connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    open.send(()).unwrap();
    for call in calls {
        let response = call.await.unwrap();
        assert_eq!(status(&response), 200, "{response}");
    }
    assert_eq!(
        waited.load(Ordering::SeqCst),
        meshward_proxy::outbound::MAX_CONNECTING,
        "connections attempted while the upstream stalled"
    );
    assert_eq!(server.app.seen().len(), REQUESTS);

    // The attempts nobody needed any more end without connecting; later calls reuse the pool.
    let made = accepted.load(Ordering::SeqCst);
    assert!((1..=REQUESTS).contains(&made), "{made} connections");
    for i in 0..5 {
        let response = plain_get(client.outbound(0), &format!("/api/after/{i}")).await;
        assert_eq!(status(&response), 200, "{response}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), made);
}

#[tokio::test]
async fn idle_http1_upstream_connections_are_dropped_before_the_callee_closes_them() {
    // The callee closes an idle HTTP/1.1 keep-alive connection after its header read timeout; the
    // caller's pool must stop reusing it before then, or a request can race the close and fail.
    let idle_close = Duration::from_secs(2);
    let server = Harness::with(|config, _| config.limits.header_read_timeout = idle_close).await;
    let (relay, accepted) = counting_relay(server.inbound()).await;
    let client = Harness::with_identity(Arc::clone(&server.pki), WEB, |config, _| {
        config.inbound.clear();
        config.upstream_http2 = false;
        config.limits.header_read_timeout = idle_close;
        config.outbound.push(outbound(relay, API, Protocol::Http));
    })
    .await;
    assert_eq!(
        meshward_proxy::outbound::upstream_pool_idle(&Limits {
            header_read_timeout: idle_close,
            ..Limits::default()
        }),
        Duration::from_secs(1)
    );

    for path in ["/api/one", "/api/two"] {
        let response = plain_get(client.outbound(0), path).await;
        assert_eq!(status(&response), 200, "{response}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "back-to-back calls share a connection"
    );

    // Idle past the pool's limit (1 s) but not the callee's close (2 s): a new connection.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    let response = plain_get(client.outbound(0), "/api/three").await;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the idle connection was reused"
    );

    // Idle past the callee's close too: still no failed call.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let response = plain_get(client.outbound(0), "/api/four").await;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);

    let records = server.audit(4).await;
    assert!(
        records
            .iter()
            .all(|r| r["context"]["tls"]["alpn"] == "http/1.1" && r["decision"] == "allow"),
        "{records:#?}"
    );
    assert_eq!(server.app.seen().len(), 4);
}

#[tokio::test]
async fn idle_connections_to_the_app_are_dropped_after_app_idle_timeout() {
    // App servers close idle keep-alive connections on their own clock (Node.js and uvicorn 5 s,
    // gunicorn's async workers 2 s); the inbound pool must let go first, after app_idle_timeout.
    let app = App::start().await;
    let (relay, accepted) = counting_relay(app.addr).await;
    let server = Harness::with(|config, _| {
        config.limits.app_idle_timeout = Duration::from_secs(1);
        config.inbound[0].app = relay;
    })
    .await;
    let web = server.client(WEB);
    let get = |path: &'static str| {
        let web = web.clone();
        let inbound = server.inbound();
        async move {
            let response = web.get(inbound, path).await.unwrap();
            assert_eq!(status(&response), 200, "{response}");
        }
    };

    get("/api/one").await;
    get("/api/two").await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "back-to-back calls share a connection"
    );
    // Idle for less than the timeout: still reused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    get("/api/three").await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a briefly idle connection is reused"
    );
    // Idle past it: a new connection.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    get("/api/four").await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a connection idle past app_idle_timeout was reused"
    );
    assert_eq!(app.seen().len(), 4);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_with_the_reason() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let client = Harness::with(|config, _| {
        config.inbound.clear();
        config.outbound.push(outbound(addr, API, Protocol::Http));
    })
    .await;
    let response = plain_get(client.outbound(0), "/api/x").await;
    assert_eq!(status(&response), 502, "{response}");
    assert!(
        response.contains("cannot connect to upstream"),
        "{response}"
    );
}

#[tokio::test]
async fn tcp_listeners_relay_allowed_connections_and_close_denied_ones_before_any_byte() {
    let echo = EchoApp::start().await;
    let echo_addr = echo.addr;
    let server = Harness::with(|config, _| {
        config.inbound = vec![InboundListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            app: echo_addr,
            protocol: Protocol::Tcp,
        }];
    })
    .await;

    // Allowed: bytes go both ways.
    let (svid, key) = server.pki.svid(WEB);
    let web = Client::new(&server.pki, svid.into_chain(), key, &[]);
    let mut tls = web.connect(server.inbound()).await.unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    drop(tls);

    // Denied: the connection is closed and the app never sees it.
    let before = echo.connections.load(Ordering::SeqCst);
    let bytes_before = echo.bytes.load(Ordering::SeqCst);
    let intruder = server.client(INTRUDER);
    let mut tls = intruder.connect(server.inbound()).await.unwrap();
    let _ = tls.write_all(b"secret").await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "a denied connection must be closed");
    assert!(out.is_empty(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(echo.connections.load(Ordering::SeqCst), before);
    assert_eq!(echo.bytes.load(Ordering::SeqCst), bytes_before);

    let records = server.audit(2).await;
    assert_eq!(records[0]["action"], "connect");
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[0]["context"]["host"], "api.shop");
    assert_eq!(records[1]["decision"], "deny");
    assert_eq!(records[1]["principal"], INTRUDER);

    // And through an outbound TCP listener of a client sidecar.
    let upstream = server.inbound();
    let client = Harness::with_identity(Arc::clone(&server.pki), WEB, |config, _| {
        config.inbound.clear();
        config.outbound.push(outbound(upstream, API, Protocol::Tcp));
    })
    .await;
    let mut plain = tokio::net::TcpStream::connect(client.outbound(0))
        .await
        .unwrap();
    plain.write_all(b"through the mesh").await.unwrap();
    let mut buf = [0u8; 16];
    plain.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"through the mesh");
}
