//! Inbound TLS (issue 11, point 2): the proxy listener serves HTTPS with a certificate from PEM
//! files (ALPN h2 and http/1.1); a certificate rotated by a symlink swap, as a Kubernetes
//! secret update does it, is served within 2 s while connections set up on the old one keep
//! working; a half-written file keeps the old certificate and is counted as an error; a
//! client that does not finish its handshake is cut off.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::tls::TestPki;
use support::{CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic_auth, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request sender on one TLS connection to `gw`, trusting `pki`'s CA only, offering `alpn`.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(gw: &Gateway, pki: &TestPki, alpn: &[&[u8]]) -> Result<Sender, std::io::Error> {
    let mut config = pki.client_config();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    Ok(if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        Sender::H2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Sender::H1(send)
    })
}

/// Sends a GET of `path` with the app's credentials: status and version.
async fn send(sender: &mut Sender, path: &str) -> (StatusCode, Version) {
    let req = Request::get(format!("https://localhost{path}"))
        .header("authorization", basic_auth())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = match sender {
        Sender::H1(s) => {
            let mut req = req;
            *req.uri_mut() = path.parse().unwrap();
            req.headers_mut()
                .insert("host", http::HeaderValue::from_static("localhost"));
            s.send_request(req).await
        }
        Sender::H2(s) => s.send_request(req).await,
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = resp.expect("response");
        let (parts, body) = resp.into_parts();
        body.collect().await.expect("body");
        parts
    })
    .await
    .expect("answer within 10 s");
    (resp.status, resp.version)
}

/// Writes a config forwarding to `upstream` that serves TLS from `cert` and `key` (as written:
/// relative paths are the config file's directory's).
fn write_config(path: &Path, upstream: &str, cert: &str, key: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n{extra}[upstream]\nurl = {upstream:?}\n"
        ),
    )
    .unwrap();
}

async fn upstream() -> (FakeGithub, String) {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    (gh, token)
}

#[tokio::test]
async fn a_legacy_call_over_https_is_rewritten_on_http2_and_http1() {
    let (gh, token) = upstream().await;
    let pki = TestPki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    pki.write_leaf(dir.path());
    let config = dir.path().join("config.toml");
    // Relative paths: next to the config file, whatever the working directory.
    write_config(&config, &gh.url(), "cert.pem", "key.pem", "");
    let gw = Gateway::start_from_file(&config).await;
    let check = format!("/applications/{CLIENT_ID}/tokens/{token}");

    let mut h2 = connect(&gw, &pki, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(
        send(&mut h2, &check).await,
        (StatusCode::OK, Version::HTTP_2)
    );
    let mut h1 = connect(&gw, &pki, &[b"http/1.1"]).await.unwrap();
    assert_eq!(
        send(&mut h1, &check).await,
        (StatusCode::OK, Version::HTTP_11)
    );
    let mut no_alpn = connect(&gw, &pki, &[]).await.unwrap();
    assert_eq!(send(&mut no_alpn, &check).await.0, StatusCode::OK);
    let rewritten = gh
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.ends_with("/token"))
        .count();
    assert_eq!(
        rewritten, 3,
        "each call reached the upstream in its new form"
    );

    // Plain HTTP on the TLS listener gets no answer in clear.
    let mut plain = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(format!("GET {check} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "answered in clear"
    );
}

/// The Kubernetes secret layout: `cert.pem -> ..data/cert.pem`, `..data -> v1`; an update
/// writes `v2` and swaps `..data` in one rename.
#[cfg(unix)]
#[tokio::test]
async fn a_certificate_rotated_by_symlink_swap_is_served_within_2_s_and_old_sessions_go_on() {
    use std::os::unix::fs::symlink;
    let (gh, token) = upstream().await;
    let (old, new) = (TestPki::new(&[]), TestPki::new(&[]));
    let dir = tempfile::tempdir().unwrap();
    for (pki, version) in [(&old, "v1"), (&new, "v2")] {
        std::fs::create_dir(dir.path().join(version)).unwrap();
        pki.write_leaf(&dir.path().join(version));
    }
    symlink("v1", dir.path().join("..data")).unwrap();
    symlink("..data/cert.pem", dir.path().join("cert.pem")).unwrap();
    symlink("..data/key.pem", dir.path().join("key.pem")).unwrap();
    let config = dir.path().join("config.toml");
    write_config(&config, &gh.url(), "cert.pem", "key.pem", "");
    let gw = Gateway::start_from_file(&config).await;
    let check = format!("/applications/{CLIENT_ID}/tokens/{token}");
    let mut on_old = connect(&gw, &old, &[b"h2"]).await.unwrap();
    assert_eq!(send(&mut on_old, &check).await.0, StatusCode::OK);
    assert!(
        connect(&gw, &new, &[b"h2"]).await.is_err(),
        "new CA trusted too soon"
    );

    symlink("v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    let swapped = tokio::time::Instant::now();
    let mut on_new = loop {
        match connect(&gw, &new, &[b"h2"]).await {
            Ok(s) => break s,
            Err(_) => {
                assert!(
                    swapped.elapsed() < Duration::from_secs(2),
                    "new certificate not served within 2 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(send(&mut on_new, &check).await.0, StatusCode::OK);
    // The connection set up with the old certificate goes on.
    assert_eq!(send(&mut on_old, &check).await.0, StatusCode::OK);
    assert!(
        connect(&gw, &old, &[b"h2"]).await.is_err(),
        "old certificate still served"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m[r#"oauth_apps_gateway_tls_certificate_reloads_total{result="success"}"#],
        1.0
    );
}

/// A certificate file caught half written (or replaced by something that is not one) keeps the
/// certificate in service, and is counted as an error; the complete file is then taken.
#[tokio::test]
async fn a_half_written_certificate_keeps_the_old_one_in_service() {
    let (gh, token) = upstream().await;
    let (old, new) = (TestPki::new(&[]), TestPki::new(&[]));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = old.write_leaf(dir.path());
    let config = dir.path().join("config.toml");
    write_config(&config, &gh.url(), "cert.pem", "key.pem", "");
    let gw = Gateway::start_from_file(&config).await;
    let check = format!("/applications/{CLIENT_ID}/tokens/{token}");
    let mut before = connect(&gw, &old, &[b"http/1.1"]).await.expect("serving");
    assert_eq!(send(&mut before, &check).await.0, StatusCode::OK);

    // Half of the new certificate, the new key: does not load.
    let half = &new.cert_pem[..new.cert_pem.len() / 2];
    std::fs::write(&cert, half).unwrap();
    std::fs::write(&key, &new.key_pem).unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let m = scrape(&gw).await;
        if m.get(r#"oauth_apps_gateway_tls_certificate_reloads_total{result="error"}"#)
            >= Some(&1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the broken file was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut still_old = connect(&gw, &old, &[b"http/1.1"])
        .await
        .expect("old certificate served");
    assert_eq!(send(&mut still_old, &check).await.0, StatusCode::OK);

    std::fs::write(&cert, &new.cert_pem).unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while connect(&gw, &new, &[b"http/1.1"]).await.is_err() {
        assert!(
            tokio::time::Instant::now() < until,
            "the complete file was not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that opens a TLS connection and never finishes the handshake is closed after
/// `server.tls_handshake_timeout`.
#[tokio::test]
async fn a_stalled_handshake_is_cut_off() {
    let (gh, _token) = upstream().await;
    let pki = TestPki::new(&[]);
    let dir = tempfile::tempdir().unwrap();
    pki.write_leaf(dir.path());
    let config = dir.path().join("config.toml");
    write_config(
        &config,
        &gh.url(),
        "cert.pem",
        "key.pem",
        "tls_handshake_timeout = \"300ms\"\n",
    );
    let gw = Gateway::start_from_file(&config).await;
    let mut stalled = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // The first bytes of a ClientHello record, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "not closed: {read:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
}

/// A key file that is not a key, or not the certificate's, is a clear startup error naming the
/// file and the key: from `--check-config` and from a start, exit code 2.
#[tokio::test]
async fn a_broken_key_file_is_a_startup_error_naming_the_file() {
    let (pki, other) = (TestPki::new(&[]), TestPki::new(&[]));
    let dir = tempfile::tempdir().unwrap();
    let (_cert, key) = pki.write_leaf(dir.path());
    let config = dir.path().join("config.toml");
    write_config(
        &config,
        "http://127.0.0.1:9",
        "cert.pem",
        "key.pem",
        "listen = \"127.0.0.1:0\"\n",
    );
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap() + "[admin]\nlisten = \"127.0.0.2:0\"\n",
    )
    .unwrap();
    let run = |check: bool| {
        let mut cmd = std::process::Command::new(support::binary::BIN);
        if check {
            cmd.arg("--check-config");
        }
        let out = cmd
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (content, says) in [
        ("not a key\n".to_owned(), "no PEM private key found"),
        (
            pki.key_pem[..pki.key_pem.len() / 2].to_owned(),
            "no PEM private key found",
        ),
        (other.key_pem.clone(), "does not match the certificate"),
    ] {
        std::fs::write(&key, &content).unwrap();
        for check in [true, false] {
            let (code, stderr) = run(check);
            assert_eq!(code, Some(2), "check={check}: {stderr}");
            assert!(stderr.contains("server.tls_key_file"), "{stderr}");
            assert!(stderr.contains(&key.display().to_string()), "{stderr}");
            assert!(
                stderr.contains(&config.display().to_string()),
                "names the config: {stderr}"
            );
            assert!(stderr.contains(says), "{stderr}");
        }
    }
}

/// A reload that names other certificate files serves them to the next handshake at once, and
/// the file watcher then looks at the new files (not the old ones).
#[tokio::test]
async fn a_reload_naming_other_certificate_files_serves_them_at_once() {
    let (gh, token) = upstream().await;
    let (old, new, newer) = (TestPki::new(&[]), TestPki::new(&[]), TestPki::new(&[]));
    let dir = tempfile::tempdir().unwrap();
    for (pki, version) in [(&old, "v1"), (&new, "v2")] {
        std::fs::create_dir(dir.path().join(version)).unwrap();
        pki.write_leaf(&dir.path().join(version));
    }
    let config = dir.path().join("config.toml");
    write_config(&config, &gh.url(), "v1/cert.pem", "v1/key.pem", "");
    let gw = Gateway::start_from_file(&config).await;
    let check = format!("/applications/{CLIENT_ID}/tokens/{token}");
    let mut on_old = connect(&gw, &old, &[b"h2"]).await.expect("serving v1");
    assert_eq!(send(&mut on_old, &check).await.0, StatusCode::OK);

    write_config(&config, &gh.url(), "v2/cert.pem", "v2/key.pem", "");
    let a = support::call(
        &support::http1_client(),
        http::Method::POST,
        &format!("{}/reload", gw.admin_url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut on_new = connect(&gw, &new, &[b"h2"])
        .await
        .expect("v2 served after the reload");
    assert_eq!(send(&mut on_new, &check).await.0, StatusCode::OK);
    assert_eq!(
        send(&mut on_old, &check).await.0,
        StatusCode::OK,
        "old session goes on"
    );

    // The watcher follows the new files: v2 rewritten is taken within 2 s; v1 is not looked at.
    newer.write_leaf(&dir.path().join("v2"));
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while connect(&gw, &newer, &[b"h2"]).await.is_err() {
        assert!(
            tokio::time::Instant::now() < until,
            "the rewritten v2 files were not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
