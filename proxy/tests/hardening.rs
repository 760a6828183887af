//! Abusive peers over real sockets: oversized headers, slow clients, smuggling shapes, h2 floods.

// A test crate: its helpers are not `#[test]` functions, so clippy's in-test allowances miss them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test]
async fn oversized_headers_get_431_and_never_reach_the_app() {
    let h = Harness::http().await;
    let big = "x".repeat(20 * 1024);
    let response = h
        .client(WEB)
        .raw(
            h.inbound(),
            format!("GET /api/x HTTP/1.1\r\nhost: api.shop\r\nx-big: {big}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status(&response), 431, "{response}");
    assert!(h.app.seen().is_empty());
    // Headers under the limit are fine.
    let small = "x".repeat(4 * 1024);
    let ok = h
        .client(WEB)
        .raw(
            h.inbound(),
            format!("GET /api/x HTTP/1.1\r\nhost: api.shop\r\nx-big: {small}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(status(&ok), 200, "{ok}");
}

#[tokio::test]
async fn a_slow_client_is_cut_off() {
    let h = Harness::with(|config, _| {
        config.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tls = h.client(WEB).connect(h.inbound()).await.unwrap();
    tls.write_all(b"GET /api/x HTTP/1.1\r\nhost: api.shop\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the proxy kept a slow client's connection open"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!String::from_utf8_lossy(&out).contains("200"), "{out:?}");
    assert!(h.app.seen().is_empty());
}

#[tokio::test]
async fn a_peer_that_never_finishes_the_handshake_is_cut_off() {
    let h = Harness::with(|config, _| {
        config.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(h.inbound()).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    eventually(Duration::from_secs(5), "handshake timeout counted", || {
        h.metrics()
            .contains(r#"meshward_proxy_tls_failures_total{reason="handshake_timeout"} 1"#)
    })
    .await;
    // The listener is still up.
    assert_eq!(
        status(&h.client(WEB).get(h.inbound(), "/api/x").await.unwrap()),
        200
    );
}

#[tokio::test]
async fn a_content_length_plus_transfer_encoding_smuggle_never_reaches_the_app() {
    let h = Harness::http().await;
    let web = h.client(WEB);
    // CL.TE: a front end trusting Content-Length would see one request; one trusting
    // Transfer-Encoding sees a second, smuggled `GET /admin`.
    let smuggled = "0\r\n\r\nGET /admin HTTP/1.1\r\nhost: api.shop\r\n\r\n";
    let request = format!(
        "POST /api/upload HTTP/1.1\r\nhost: api.shop\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let response = web.raw(h.inbound(), request.as_bytes()).await.unwrap();
    // Exactly one response, and the connection is closed after it: the smuggled request is
    // never parsed as a request, let alone forwarded.
    assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    let paths = h.app.paths();
    assert_eq!(paths, ["/api/upload"], "{paths:?}");
    assert!(
        h.app.seen()[0].body.is_empty(),
        "the chunked body ends at `0`"
    );
    for seen in h.app.seen() {
        // What reaches the app has one framing only.
        assert!(
            !(seen.headers.contains_key("content-length")
                && seen.headers.contains_key("transfer-encoding")),
            "{seen:?}"
        );
    }
    // TE.CL with an obfuscated encoding is a 400.
    let obfuscated = web
        .raw(
            h.inbound(),
            b"POST /api/upload HTTP/1.1\r\nhost: api.shop\r\ncontent-length: 4\r\ntransfer-encoding: xchunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(status(&obfuscated), 400, "{obfuscated}");
    // Two different Content-Lengths: 400.
    let double = web
        .raw(
            h.inbound(),
            b"POST /api/upload HTTP/1.1\r\nhost: api.shop\r\ncontent-length: 4\r\ncontent-length: 40\r\n\r\nabcd",
        )
        .await
        .unwrap();
    assert_eq!(status(&double), 400, "{double}");
    assert!(h.app.paths().iter().all(|p| !p.contains("admin")));
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HEADERS for `GET https://api.shop<path>`, HPACK without Huffman or indexing.
fn get_headers(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x87]; // :method GET, :scheme https
    block.push(0x04); // :path, literal without indexing
    block.push(path.len() as u8);
    block.extend_from_slice(path.as_bytes());
    block.push(0x01); // :authority
    block.push(8);
    block.extend_from_slice(b"api.shop");
    block
}

#[tokio::test]
async fn an_h2_stream_flood_is_bounded_and_others_are_still_served() {
    const LIMIT: u32 = 8;
    let h = Harness::with(|config, _| {
        config.limits.h2_max_concurrent_streams = LIMIT;
    })
    .await;
    let (svid, key) = h.pki.svid(WEB);
    let flooder = Client::new(&h.pki, svid.into_chain(), key, &[b"h2"]);
    let tls = flooder.connect(h.inbound()).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    // Keep reading whatever the proxy answers (SETTINGS, RST_STREAM, GOAWAY).
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // our SETTINGS
    bytes.extend(frame(0x4, 0x1, 0, &[])); // ACK of the proxy's SETTINGS
    writer.write_all(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 100 concurrent requests on one connection, ignoring the advertised limit: the excess is
    // refused (RST_STREAM REFUSED_STREAM); far more would get the connection closed outright
    // (GOAWAY ENHANCE_YOUR_CALM, the rapid-reset defence).
    let mut flood = Vec::new();
    for i in 0..100u32 {
        flood.extend(frame(0x1, 0x5, 2 * i + 1, &get_headers("/api/slow")));
    }
    let _ = writer.write_all(&flood).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let max = h.app.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max >= 1,
        "the flood never reached the app; the test proves nothing"
    );
    assert!(
        max <= LIMIT as usize,
        "{max} requests in flight at the app, limit {LIMIT}"
    );
    // Another client is served meanwhile.
    let response = h.client(WEB).get(h.inbound(), "/api/fast").await.unwrap();
    assert_eq!(status(&response), 200, "{response}");
    h.app.gate.add_permits(1_000);
}
