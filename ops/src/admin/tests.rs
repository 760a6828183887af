use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

fn endpoint(ready: &Readiness) -> AdminEndpoint {
    AdminEndpoint::new(Arc::new(|| "# EOF\n".to_owned()), ready.check())
}

async fn body(response: Response<Full<Bytes>>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// One request over a real connection; the whole response as text.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn ready_follows_the_check() {
    let ready = Readiness::new();
    let admin = endpoint(&ready);
    let response = admin.respond(&Method::GET, "/ready");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body(response).await, "not ready\n");
    ready.set(true);
    let response = admin.respond(&Method::GET, "/ready");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body(response).await, "ready\n");
    ready.set(false);
    assert_eq!(
        admin.respond(&Method::HEAD, "/ready").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn the_not_ready_reason_is_in_the_body() {
    let admin = endpoint(&Readiness::new()).not_ready_reason("no svid yet, or shutting down");
    let response = admin.respond(&Method::GET, "/ready");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body(response).await,
        "not ready: no svid yet, or shutting down\n"
    );
}

#[tokio::test]
async fn live_answers_even_when_not_ready() {
    let admin = endpoint(&Readiness::new());
    let response = admin.respond(&Method::GET, "/live");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body(response).await, "live\n");
}

#[tokio::test]
async fn unknown_paths_are_not_found() {
    let ready = Readiness::new();
    ready.set(true);
    let admin = endpoint(&ready);
    for path in [
        "/",
        "/x",
        "/nope",
        "/metrics/",
        "/ready/",
        "/READY",
        "/live?x",
        "//live",
    ] {
        let response = admin.respond(&Method::GET, path);
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            body(response).await,
            "not found: try /metrics, /ready or /live\n"
        );
    }
}

#[tokio::test]
async fn only_get_and_head_are_allowed() {
    let ready = Readiness::new();
    ready.set(true);
    let admin = endpoint(&ready);
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        for path in ["/metrics", "/ready", "/live", "/x"] {
            let response = admin.respond(&method, path);
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(body(response).await, "only GET and HEAD are allowed\n");
        }
    }
    assert_eq!(
        admin.respond(&Method::HEAD, "/live").status(),
        StatusCode::OK
    );
}

#[test]
fn metrics_are_rendered_at_each_scrape() {
    let scrapes = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&scrapes);
    let admin = AdminEndpoint::new(
        Arc::new(move || format!("scrapes {}\n", counter.fetch_add(1, Ordering::AcqRel) + 1)),
        Readiness::new().check(),
    );
    for _ in 0..2 {
        let response = admin.respond(&Method::GET, "/metrics");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            METRICS_CONTENT_TYPE
        );
    }
    assert_eq!(scrapes.load(Ordering::Acquire), 2);
    // Nothing else renders the metrics: a refused request costs no scrape.
    admin.respond(&Method::POST, "/metrics");
    admin.respond(&Method::GET, "/ready");
    assert_eq!(scrapes.load(Ordering::Acquire), 2);
}

#[test]
fn readiness_starts_false_and_is_shared_by_its_clones() {
    let ready = Readiness::new();
    let check = ready.check();
    assert!(!ready.is_ready());
    assert!(!check());
    ready.clone().set(true);
    assert!(ready.is_ready());
    assert!(check());
}

#[tokio::test]
async fn serves_over_real_http_and_stops_on_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = AdminEndpoint::new(
        Arc::new(|| "meshward_test_total 3\n# EOF\n".to_owned()),
        Readiness::new().check(),
    );
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(admin.serve(listener, shutdown.clone()));

    let response = exchange(
        addr,
        "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
        "{response}"
    );
    assert!(
        response.ends_with("meshward_test_total 3\n# EOF\n"),
        "{response}"
    );

    let response = exchange(
        addr,
        "GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");

    let response = exchange(
        addr,
        "DELETE /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");

    // Not HTTP at all: hyper answers 400 and closes; the server goes on.
    let response = exchange(addr, "\x16\x03\x01 not http\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let response = exchange(
        addr,
        "GET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}
