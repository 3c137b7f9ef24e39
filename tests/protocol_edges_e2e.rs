//! Protocol edges the gateway answers itself (issue 10, point 4): an unsolicited 101 from the
//! upstream, HTTP/1.1 without Host, the asterisk form (`OPTIONS *`, `PRI *`). Raw sockets on
//! 127.0.0.1 only.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{Gateway, config_for, get, setup};

/// Sends `raw` on a new connection to `addr` and reads until the peer closes (the requests here
/// all say `connection: close`), at most 5 s.
async fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// An upstream that answers every request `101 Switching Protocols`, counting requests.
async fn upstream_switching() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if let Ok(n) = s.read(&mut buf).await
                    && n > 0
                {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nraw bytes after the switch",
                        )
                        .await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn an_unsolicited_101_from_the_upstream_is_answered_502() {
    let (url, seen) = upstream_switching().await;
    let gw = Gateway::start(config_for(&url)).await;
    let a = get(&format!("{}/user", gw.url())).await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert!(a.json()["message"].as_str().unwrap().contains("protocol"));
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http11_without_host_is_400_with_a_github_shaped_body() {
    let (gh, gw) = setup().await;
    let before = gh.request_count();
    let answer = exchange(gw.addr, "GET /user HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"documentation_url\""), "{answer}");
    assert!(answer.contains("needs a Host"), "{answer}");
    let two = "GET /user HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n";
    assert!(exchange(gw.addr, two).await.starts_with("HTTP/1.1 400"));
    // HTTP/1.0 may leave it out.
    let old = exchange(gw.addr, "GET /headers HTTP/1.0\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200"), "{old}");
    assert_eq!(
        gh.request_count(),
        before + 1,
        "only the HTTP/1.0 call went upstream"
    );
}

#[tokio::test]
async fn the_asterisk_form_is_answered_by_the_gateway_never_forwarded() {
    let (gh, gw) = setup().await;
    let before = gh.request_count();
    let options = exchange(
        gw.addr,
        "OPTIONS * HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(options.starts_with("HTTP/1.1 204"), "{options}");
    assert!(
        options.to_lowercase().contains("allow: get, head"),
        "{options}"
    );
    let pri = exchange(
        gw.addr,
        "PRI * HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(pri.starts_with("HTTP/1.1 400"), "{pri}");
    assert_eq!(gh.request_count(), before, "nothing was forwarded");
}
