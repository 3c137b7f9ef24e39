//! End to end: how the gateway forwards and fails. Streamed bodies both ways, the request size
//! limit, upstream down (502), upstream silent (504), an upstream over TLS with a private CA,
//! and graceful shutdown finishing an in-flight request.

mod support;

use std::time::Duration;

use http::Method;
use http_body_util::BodyExt;
use oauth_apps_gateway::server::DrainOutcome;
use support::tls::TestPki;
use support::{
    CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, call, call_as_app, config_for, get,
    http1_client, open_stream, setup, setup_with,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deterministic test bytes: not all the same, not a short repeating pattern.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes a raw HTTP/1.1 request to the gateway and reads until the peer closes or 10 s pass.
async fn raw_exchange(gw: &Gateway, head: &str, chunks: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for c in chunks {
        // The gateway may answer and close before every chunk is written.
        if s.write_all(c).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

#[tokio::test]
async fn large_request_body_arrives_byte_for_byte() {
    let (gh, gw) = setup().await;
    let body = payload(6 * 1024 * 1024 + 17);
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/echo", gw.url()),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), body.len());
    assert!(a.body == body, "echoed body differs");
    let r = &gh.requests()[0];
    assert!(r.body == body, "upstream received a different body");
    assert_eq!(r.headers["content-length"], body.len().to_string());
}

#[tokio::test]
async fn chunked_request_body_is_streamed_through() {
    let (gh, gw) = setup().await;
    let data = payload(300_000);
    let mut wire = Vec::new();
    for part in data.chunks(70_001) {
        wire.extend(chunk(part));
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /echo HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let resp = raw_exchange(&gw, head, &[&wire]).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert!(
        gh.requests()[0].body == data,
        "upstream received a different body"
    );
}

#[tokio::test]
async fn response_body_is_streamed_not_buffered() {
    // /slow-body sends its head and one chunk, then stalls: a buffering proxy would never
    // deliver that chunk.
    let (_gh, gw) = setup().await;
    let resp = open_stream(&format!("{}/slow-body", gw.url())).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk delivered while the upstream body is still open")
        .unwrap()
        .unwrap();
    assert!(!first.into_data().unwrap().is_empty());
}

#[tokio::test]
async fn streamed_response_arrives_whole() {
    let (_gh, gw) = setup().await;
    let a = get(&format!(
        "{}/stream?chunks=40&size=8192&delay_ms=1",
        gw.url()
    ))
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 40 * 8192);
    assert!(
        a.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8)
    );
}

#[tokio::test]
async fn body_over_the_limit_gets_413_before_anything_is_forwarded() {
    let (gh, gw) = setup_with(|c| c.server.max_request_body_bytes = 1024).await;
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/echo", gw.url()),
        &[],
        payload(1025),
    )
    .await;
    assert_eq!(a.status, 413);
    assert!(a.json()["message"].as_str().unwrap().contains("1024 bytes"));
    assert_eq!(gh.request_count(), 0);

    // Exactly at the limit is fine.
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/echo", gw.url()),
        &[],
        payload(1024),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn chunked_body_growing_over_the_limit_gets_413() {
    let (_gh, gw) = setup_with(|c| c.server.max_request_body_bytes = 1000).await;
    let head = "POST /echo HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    let c1 = chunk(&payload(600));
    let c2 = chunk(&payload(600));
    let resp = raw_exchange(&gw, head, &[&c1, &c2, b"0\r\n\r\n"]).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

#[tokio::test]
async fn upstream_down_gives_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let gw = Gateway::start(config_for(&dead)).await;
    let a = call_as_app(
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/gho_x", gw.url()),
    )
    .await;
    assert_eq!(a.status, 502);
    let body = a.json();
    assert!(
        body["message"].as_str().unwrap().contains("connect"),
        "{body}"
    );
    assert!(body["documentation_url"].is_string());
}

#[tokio::test]
async fn upstream_that_never_answers_gives_504() {
    let (gh, gw) = setup_with(|c| c.server.request_timeout = Duration::from_millis(300)).await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let a = call_as_app(Method::GET, &format!("{}/slow", gw.url())).await;
    assert_eq!(a.status, 504);
    assert!(a.json()["message"].as_str().unwrap().contains("timeout"));
    // A legacy call hitting the deadline is answered 504 too, and not retried.
    drop(token);
}

#[tokio::test]
async fn response_body_outliving_the_deadline_is_cut() {
    let (_gh, gw) = setup_with(|c| c.server.request_timeout = Duration::from_millis(300)).await;
    let resp = open_stream(&format!("{}/slow-body", gw.url())).await;
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("body ends once the deadline passes");
    assert!(collected.is_err(), "a cut body must not look complete");
}

#[tokio::test]
async fn upstream_over_tls_with_private_ca() {
    let pki = TestPki::new(&[b"h2", b"http/1.1"]);
    let gh = FakeGithub::start_tls(pki.server_config.clone()).await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&format!("https://localhost:{}", gh.addr().port()));
    config.upstream.ca_file = Some(pki.write_ca(dir.path()));
    let gw = Gateway::start(config).await;

    let a = call_as_app(
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let r = &gh.requests()[0];
    assert_eq!(r.method, Method::POST);
    // ALPN picked HTTP/2 with the upstream.
    assert_eq!(r.version, http::Version::HTTP_2);
}

#[tokio::test]
async fn upstream_certificate_from_unknown_ca_gives_502() {
    let pki = TestPki::new(&[b"http/1.1"]);
    let gh = FakeGithub::start_tls(pki.server_config.clone()).await;
    let gw = Gateway::start(config_for(&format!(
        "https://localhost:{}",
        gh.addr().port()
    )))
    .await;
    let a = call_as_app(Method::GET, &format!("{}/user", gw.url())).await;
    assert_eq!(a.status, 502);
    assert!(a.json()["message"].as_str().unwrap().contains("tls"));
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_in_flight_request() {
    let (_gh, mut gw) = setup_with(|c| c.server.shutdown_grace = Duration::from_secs(20)).await;
    let resp = open_stream(&format!(
        "{}/stream?chunks=6&size=1000&delay_ms=150",
        gw.url()
    ))
    .await;
    assert_eq!(resp.status(), 200);
    // The response is under way: stop the gateway now.
    let addr = gw.addr;
    let outcome = gw.begin_shutdown().unwrap();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("in-flight body completes")
        .to_bytes();
    assert_eq!(body.len(), 6000);
    assert_eq!(outcome.await.unwrap(), DrainOutcome::Completed);
}

#[tokio::test]
async fn a_drain_waits_for_the_requests_of_every_worker() {
    let (_gh, mut gw) = setup_with(|c| {
        c.server.worker_threads = Some(3);
        c.server.shutdown_grace = Duration::from_secs(20);
    })
    .await;
    // Six streams on six connections: two on each worker (the least-loaded one gets the next).
    let mut streams = Vec::new();
    for _ in 0..6 {
        let url = format!("{}/stream?chunks=4&size=1000&delay_ms=150", gw.url());
        streams.push(open_stream(&url).await);
    }
    let outcome = gw.begin_shutdown().unwrap();
    for resp in streams {
        assert_eq!(resp.status(), 200);
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("in-flight body completes");
        assert_eq!(body.to_bytes().len(), 4000);
    }
    assert_eq!(outcome.await.unwrap(), DrainOutcome::Completed);
}

#[tokio::test]
async fn drain_reports_a_grace_period_that_ran_out() {
    let (_gh, mut gw) = setup_with(|c| c.server.shutdown_grace = Duration::from_millis(200)).await;
    let resp = open_stream(&format!("{}/slow-body", gw.url())).await;
    assert_eq!(resp.status(), 200);
    let outcome = gw.begin_shutdown().unwrap();
    assert_eq!(outcome.await.unwrap(), DrainOutcome::TimedOut);
    drop(resp);
}

#[tokio::test]
async fn upstream_connect_timeout_gives_504() {
    // A loopback listener that never accepts, with its accept queue filled: Linux drops
    // further SYNs, so the gateway's connect hangs until connect_timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    let mut config = config_for(&format!("http://{addr}"));
    config.upstream.connect_timeout = Duration::from_millis(300);
    let gw = Gateway::start(config).await;
    let a = call_as_app(Method::GET, &format!("{}/user", gw.url())).await;
    assert_eq!(a.status, 504, "{:?}", a.body);
    drop((listener, fillers));
}

#[tokio::test]
async fn slow_request_head_is_cut_by_the_header_read_timeout() {
    let (gh, gw) = setup_with(|c| c.server.header_read_timeout = Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /user HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    // The head never completes: the gateway must close the connection on its own.
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "connection still open long after header_read_timeout"
    );
    assert_eq!(gh.request_count(), 0);
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_header_read_timeout() {
    let (_gh, gw) = setup_with(|c| c.server.header_read_timeout = Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    // Not a single byte sent: the gateway must still hang up.
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "silent connection held open");
}

/// An upstream that answers its first request on a connection, then reads the second one and
/// hangs up without answering. Returns its address and a counter of request heads received.
async fn upstream_dropping_second_request()
-> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                let mut tmp = [0u8; 4096];
                while let Ok(n) = s.read(&mut tmp).await {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    // Count complete request heads; bodies here are small JSON with length.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        buf.drain(..end + 4 + len);
                        counter.fetch_add(1, Ordering::SeqCst);
                        if answered == 0 {
                            answered += 1;
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                                .await;
                        } else {
                            return; // read the request, hang up without an answer
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_reset_that_was_sent_is_never_retried() {
    use std::sync::atomic::Ordering;
    let (url, seen) = upstream_dropping_second_request().await;
    let mut config = config_for(&url);
    // One worker, one upstream pool: the second call must find the first one's connection.
    config.server.worker_threads = Some(1);
    let gw = Gateway::start(config).await;
    let base = format!("{}/applications/{CLIENT_ID}/tokens", gw.url());
    // The first call leaves a pooled keep-alive connection; the reset goes out on it and the
    // upstream hangs up after reading it.
    let a = call_as_app(Method::GET, &format!("{base}/gho_first")).await;
    assert_eq!(a.status, 200);
    let a = call_as_app(Method::POST, &format!("{base}/gho_second")).await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the reset was sent more than once"
    );
}

#[tokio::test]
async fn a_get_the_upstream_closed_on_unanswered_is_retried_once() {
    use std::sync::atomic::Ordering;
    let (url, seen) = upstream_dropping_second_request().await;
    let mut config = config_for(&url);
    config.server.worker_threads = Some(1);
    let gw = Gateway::start(config).await;
    let first = call_as_app(Method::GET, &format!("{}/user", gw.url())).await;
    assert_eq!(first.status, 200);
    // The pooled connection hangs up on the next request: the GET goes again, on a new one.
    let second = call_as_app(Method::GET, &format!("{}/user", gw.url())).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "sent, dropped, sent again");
}

#[tokio::test]
async fn absolute_form_targets_never_leave_the_configured_upstream() {
    let (gh, gw) = setup().await;
    let head = "GET http://evil.example:8080/user?x=1 HTTP/1.1\r\nhost: evil.example:8080\r\nconnection: close\r\n\r\n";
    let resp = raw_exchange(&gw, head, &[]).await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let r = &gh.requests()[0];
    assert_eq!(r.path_and_query, "/user?x=1");
    assert_eq!(r.headers["host"], gh.addr().to_string().as_str());
}

#[tokio::test]
async fn connect_is_refused_without_contacting_the_upstream() {
    let (gh, gw) = setup().await;
    let head =
        "CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\nconnection: close\r\n\r\n";
    let resp = raw_exchange(&gw, head, &[]).await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    assert!(resp.contains("\"documentation_url\""), "{resp}");
    assert_eq!(gh.request_count(), 0);
}

#[tokio::test]
async fn shutdown_delay_serves_new_connections_while_not_ready_then_drains() {
    let (_gh, mut gw) = setup_with(|c| c.server.shutdown_delay = Duration::from_millis(1200)).await;
    let readyz = format!("{}/readyz", gw.admin_url());
    let task = gw.begin_shutdown().expect("gateway task");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(&readyz).await.status, 503, "not ready at once");
    // Still accepting and serving: a new connection, a pass-through call.
    let a = get(&format!("{}/headers", gw.url())).await;
    assert_eq!(a.status, 200, "served during shutdown_delay");
    assert!(!task.is_finished());
    // Then the drain: done within the delay plus a little, and the listener gone.
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("drained after the delay")
        .expect("join");
    assert_eq!(outcome, DrainOutcome::Completed);
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}
