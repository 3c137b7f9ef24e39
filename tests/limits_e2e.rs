//! Connection and request-head limits of the proxy listener (issue 10): connections in all and
//! per address, idle HTTP/2 connections closed, oversized heads refused before anything goes
//! upstream. Hostile clients bind 127.0.0.2 and up; everything stays on 127.0.0.0/8.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::{get, http1_client_from, scrape, setup_with};

/// A raw TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

/// An HTTP/2 prior-knowledge connection to `addr`: its request sender and its connection task
/// (not yet spawned).
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    hyper::client::conn::http2::Connection<TokioIo<TcpStream>, Full<Bytes>, TokioExecutor>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake")
}

/// Whether the gateway closed `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Reads one whole HTTP/1.1 response head from `stream`, as text.
async fn response_head(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn one_address_over_its_cap_is_refused_while_others_are_served() {
    let (_gh, gw) = setup_with(|c| c.server.max_connections_per_ip = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", gw.addr).await;
        // A partial head keeps each connection open and counted.
        s.write_all(b"GET /headers HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = connect_from("127.0.0.2", gw.addr).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a third connection from the same address is closed at once"
    );
    // Another caller is not affected.
    let other = http1_client_from("127.0.0.3");
    let resp = other
        .get(format!("{}/headers", gw.url()).parse().unwrap())
        .await
        .expect("served");
    assert_eq!(resp.status(), 200);
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_connections_refused_total{reason=\"max_connections_per_ip\"}"],
        1.0
    );
    // Once one closes, the address may connect again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = connect_from("127.0.0.2", gw.addr).await;
    again
        .write_all(b"GET /headers HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(response_head(&mut again).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn the_total_cap_refuses_new_connections_and_never_starves_the_admin_listener() {
    let (_gh, gw) = setup_with(|c| {
        c.server.max_connections = 3;
        c.server.max_connections_per_ip = 3;
    })
    .await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let mut s = connect_from(from, gw.addr).await;
        s.write_all(b"GET /headers HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = connect_from("127.0.0.5", gw.addr).await;
    assert!(closed_within(&mut fourth, Duration::from_secs(2)).await);
    // The admin listener has its own limits: a scrape still works.
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_connections_refused_total{reason=\"max_connections\"}"],
        1.0
    );
    assert_eq!(m["oauth_apps_gateway_open_connections"], 3.0);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&format!("{}/headers", gw.url())).await.status, 200);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    let (_gh, gw) = setup_with(|c| c.server.idle_timeout = Duration::from_millis(300)).await;
    let (mut sender, conn) = h2_connect(gw.addr).await;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("{}/headers", gw.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    drop(resp);
    // Nothing more is sent: the gateway ends the connection (GOAWAY, then close).
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(
        ended.is_ok(),
        "the idle h2 connection was still open after 3 s"
    );
}

#[tokio::test]
async fn a_busy_http2_connection_is_not_closed_as_idle() {
    let (_gh, gw) = setup_with(|c| c.server.idle_timeout = Duration::from_millis(300)).await;
    let (mut sender, conn) = h2_connect(gw.addr).await;
    let conn = tokio::spawn(conn);
    // A call every 100 ms for 1.2 s: never idle for 300 ms.
    for _ in 0..12 {
        let req = Request::builder()
            .uri(format!("{}/headers", gw.url()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.expect("still open");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!conn.is_finished());
}

#[tokio::test]
async fn an_oversized_request_head_is_answered_431_and_never_forwarded() {
    let (gh, gw) = setup_with(|c| {
        c.server.max_request_head_bytes = 8192;
        c.server.max_request_headers = 20;
    })
    .await;
    let before = gh.requests().len();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let big = "a".repeat(10_000);
    let head = format!("GET /headers HTTP/1.1\r\nhost: gw\r\nx-big: {big}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(response_head(&mut s).await.starts_with("HTTP/1.1 431"));
    // Too many fields (the limit is set below hyper's own default of 100).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut head = String::from("GET /headers HTTP/1.1\r\nhost: gw\r\n");
    for i in 0..30 {
        head.push_str(&format!("x-f{i}: 1\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(response_head(&mut s).await.starts_with("HTTP/1.1 431"));
    assert_eq!(gh.requests().len(), before, "nothing reached the upstream");
    // A head under the limit still passes.
    let gw_url = gw.url();
    assert_eq!(get(&format!("{gw_url}/headers")).await.status, 200);
}

#[tokio::test]
async fn a_slow_request_body_is_answered_408_and_never_reaches_the_upstream() {
    let (gh, gw) = setup_with(|c| c.server.body_read_timeout = Duration::from_millis(300)).await;
    let before = gh.request_count();
    for framing in ["content-length: 40", "transfer-encoding: chunked"] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /applications/Iv1.x/token HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let first = match framing {
            "transfer-encoding: chunked" => "5\r\n{\"acc\r\n",
            _ => "{\"acc",
        };
        s.write_all(first.as_bytes()).await.unwrap();
        // ... and nothing more.
        let head = response_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 408"), "{framing}: {head}");
    }
    assert_eq!(
        gh.request_count(),
        before,
        "no slow body reached the upstream"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_responses_total{route=\"token_api\",status=\"408\"}"],
        2.0
    );
    assert!(
        !m.keys()
            .any(|k| k.starts_with("oauth_apps_gateway_upstream_failures_total") && m[k] > 0.0),
        "a slow client is not an upstream failure"
    );
}

#[tokio::test]
async fn a_body_longer_than_the_buffer_is_streamed_whole() {
    let (gh, gw) = setup_with(|_| {}).await;
    let body = vec![b'x'; 200 * 1024];
    let client = support::http1_client();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/echo-body", gw.url()))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = client.request(req).await.expect("answered");
    let _ = resp.status();
    let got = gh.requests().last().map(|r| r.body.len());
    assert_eq!(got, Some(body.len()), "the upstream got every byte");
}

/// An upstream that answers every request with a 64 MiB body, written as fast as the gateway
/// takes it; `released` turns true when the gateway closes the connection mid-body.
async fn upstream_endless() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let released = std::sync::Arc::new(AtomicBool::new(false));
    let flag = released.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let flag = flag.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let total: usize = 64 << 20;
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..total / chunk.len() {
                    if s.write_all(&chunk).await.is_err() {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    (url, released)
}

async fn await_flag(flag: &std::sync::atomic::AtomicBool, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A gateway in front of [`upstream_endless`] with `request_timeout` and `send_timeout`, and
/// the upstream's `released` flag.
async fn endless_gateway(
    request_timeout: Duration,
    send_timeout: Duration,
) -> (
    support::Gateway,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let (url, released) = upstream_endless().await;
    let mut config = support::config_for(&url);
    config.server.request_timeout = request_timeout;
    config.server.send_timeout = send_timeout;
    (support::Gateway::start(config).await, released)
}

/// An HTTP/1.1 `GET /big` to `addr` from a socket with a `recv_buffer`-byte receive buffer.
async fn h1_get_big(addr: std::net::SocketAddr, recv_buffer: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(recv_buffer).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    s
}

/// An HTTP/2 `GET /big` to `gw` whose body is never read (the stream's window stays closed);
/// the response is kept open until dropped.
async fn h2_get_big_unread(gw: &support::Gateway) -> hyper::Response<hyper::body::Incoming> {
    let (mut sender, conn) = h2_connect(gw.addr).await;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("{}/big", gw.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_at_the_deadline_and_the_upstream_released() {
    let (gw, released) = endless_gateway(Duration::from_millis(800), Duration::from_secs(10)).await;
    // HTTP/1.1: the client sends its request and never reads.
    let mut s = h1_get_big(gw.addr, 4096).await;
    assert!(
        await_flag(&released, Duration::from_secs(5)).await,
        "the upstream connection was still held 5 s after the deadline (HTTP/1.1)"
    );
    // The client is cut off: reading now ends (EOF or reset) well short of 64 MiB.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 64 << 20, "{got} bytes");
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_is_cut_off_at_the_deadline() {
    let (gw, released) = endless_gateway(Duration::from_millis(800), Duration::from_secs(10)).await;
    let resp = h2_get_big_unread(&gw).await;
    assert!(
        await_flag(&released, Duration::from_secs(5)).await,
        "the upstream connection was still held 5 s after the deadline (HTTP/2)"
    );
    drop(resp);
}

#[tokio::test]
async fn a_connection_still_sending_a_response_is_not_idle() {
    let (_gh, gw) = setup_with(|c| c.server.idle_timeout = Duration::from_millis(300)).await;
    let (mut sender, conn) = h2_connect(gw.addr).await;
    let conn = tokio::spawn(conn);
    // A response whose body takes ~900 ms, three idle timeouts.
    let req = Request::builder()
        .uri(format!(
            "{}/stream?chunks=7&size=100&delay_ms=150",
            gw.url()
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    use http_body_util::BodyExt as _;
    let body = resp.into_body().collect().await.expect("whole body");
    assert_eq!(body.to_bytes().len(), 700);
    // Had the connection been taken for idle mid-body, it would have sent GOAWAY: a new call on
    // it now would fail.
    let req = Request::builder()
        .uri(format!("{}/headers", gw.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let again = sender
        .send_request(req)
        .await
        .expect("the connection is still open");
    assert_eq!(again.status(), 200);
    assert!(!conn.is_finished());
}

#[tokio::test]
async fn a_client_that_reads_nothing_for_send_timeout_is_cut_off_long_before_the_deadline() {
    // The whole-exchange deadline is far away; only send_timeout can end these.
    let (gw, released) = endless_gateway(Duration::from_secs(60), Duration::from_millis(500)).await;
    // HTTP/1.1: reads the head and a little of the body, then stops.
    let mut s = h1_get_big(gw.addr, 4096).await;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > 0);
    assert!(
        await_flag(&released, Duration::from_secs(5)).await,
        "the upstream connection was still held 5 s into a 500 ms send_timeout (HTTP/1.1)"
    );
    // HTTP/2: the stream's window stays closed.
    let (gw, released) = endless_gateway(Duration::from_secs(60), Duration::from_millis(500)).await;
    let resp = h2_get_big_unread(&gw).await;
    assert!(
        await_flag(&released, Duration::from_secs(5)).await,
        "the upstream connection was still held 5 s into a 500 ms send_timeout (HTTP/2)"
    );
    drop(resp);
}

#[tokio::test]
async fn a_client_that_keeps_reading_is_not_cut_by_send_timeout() {
    let (gw, released) =
        endless_gateway(Duration::from_secs(60), Duration::from_millis(1500)).await;
    let mut s = h1_get_big(gw.addr, 64 * 1024).await;
    // Reads 64 KiB every 20 ms for 3 s (two send timeouts), pausing between reads. The gateway
    // sees the client's progress only when its socket's send buffer has room again (Linux:
    // half of it free), so the pace is one that shows progress well within send_timeout.
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("a read within 2 s")
            .expect("the connection is still open");
        assert!(n > 0, "cut off after {got} bytes while reading steadily");
        got += n;
    }
    assert!(
        !released.load(std::sync::atomic::Ordering::SeqCst),
        "the upstream connection was released while the client was still reading ({got} bytes)"
    );
}

#[tokio::test]
async fn bodies_held_past_an_address_share_are_refused_429_while_other_addresses_are_served() {
    let (url, count) = support::upstream_counting(201, Duration::ZERO).await;
    let mut config = support::config_for(&url);
    // One address may hold 128 KiB (the least allowed) of bodies being read; the gateway 1 MiB.
    config.server.max_buffered_body_bytes_per_ip = 128 * 1024;
    config.server.max_buffered_body_bytes = 1 << 20;
    let gw = support::Gateway::start(config).await;
    let head = "POST /gists HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n";
    // 127.0.0.2 starts two 60,000-byte bodies, sends 50,000 bytes of each, and stalls.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", gw.addr).await;
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b' '; 50_000]).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third body from the same address goes past its 128 KiB share: 429 at once.
    let mut third = connect_from("127.0.0.2", gw.addr).await;
    third.write_all(head.as_bytes()).await.unwrap();
    third.write_all(&[b' '; 50_000]).await.unwrap();
    let refused = response_head(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // Another address is served meanwhile, its body read whole and forwarded.
    let mut other = connect_from("127.0.0.3", gw.addr).await;
    other
        .write_all(b"POST /gists HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let served = response_head(&mut other).await;
    assert!(served.starts_with("HTTP/1.1 201"), "{served}");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Once a stalled body goes away, its part of the share is free again.
    drop(stalled.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.2", gw.addr).await;
    again.write_all(head.as_bytes()).await.unwrap();
    again.write_all(&[b' '; 60_000]).await.unwrap();
    let served = response_head(&mut again).await;
    assert!(served.starts_with("HTTP/1.1 201"), "{served}");
    let m = scrape(&gw).await;
    assert_eq!(
        m.get(r#"oauth_apps_gateway_responses_total{route="pass_through",status="429"}"#),
        Some(&1.0),
        "{m:?}"
    );
}

#[tokio::test]
async fn one_http2_connection_cannot_park_a_body_in_every_stream() {
    let (url, count) = support::upstream_counting(201, Duration::ZERO).await;
    let mut config = support::config_for(&url);
    config.server.max_buffered_body_bytes_per_ip = 256 * 1024;
    let gw = support::Gateway::start(config).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut sender = sender.ready().await.expect("ready");
    // 20 streams, each declaring 60,000 bytes and sending 30,000 of them, then nothing more.
    let mut answers = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/gists", gw.url()))
            .header("content-length", "60000")
            .body(())
            .unwrap();
        let (answer, mut body) = sender.send_request(req, false).expect("stream");
        body.send_data(Bytes::from(vec![b' '; 30_000]), false)
            .expect("data");
        answers.push(answer);
        bodies.push(body);
        sender = sender.ready().await.expect("ready");
    }
    // Every answer waited for at once, for 2 s (body_read_timeout is 10 s).
    let waits: Vec<_> = answers
        .into_iter()
        .map(|answer| {
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(2), answer).await {
                    Ok(Ok(resp)) => resp.status().as_u16(),
                    Ok(Err(_)) => 1,
                    Err(_) => 0, // still being read: held against the budget
                }
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for w in waits {
        statuses.push(w.await.expect("wait"));
    }
    // 256 KiB hold 8 bodies of 30,000 bytes; the others are refused at once.
    let held = statuses.iter().filter(|s| **s == 0).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(held <= 8 && refused >= 12, "statuses: {statuses:?}");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(bodies);
}
