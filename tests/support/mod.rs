//! Shared integration-test support: the in-process fake GitHub, test certificates, a gateway
//! spawner on 127.0.0.1:0 and small HTTP clients; for the tests that need an outside program
//! (`tools`), the real legacy client on node and a Prometheus server. Nothing here reaches
//! beyond 127.0.0.1.
#![allow(dead_code)]

pub mod binary;
pub mod fake_github;
pub mod faulty_relay;
pub mod h2raw;
pub mod legacy_client;
pub mod logs;
pub mod prometheus;
pub mod redis;
pub mod tls;
pub mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oauth_apps_gateway::app::{self, Listeners};
use oauth_apps_gateway::config::Config;
use oauth_apps_gateway::limiter::LimiterClock;
use oauth_apps_gateway::server::DrainOutcome;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use fake_github::FakeGithub;

/// An app registered on the fake upstream by [`setup`].
pub const CLIENT_ID: &str = "Iv1.8a61f9b3a7aba766";
/// Its client secret.
pub const CLIENT_SECRET: &str = "s3cr3t-0b1d1a7e5e2c";

/// `Authorization: Basic base64(CLIENT_ID:CLIENT_SECRET)`.
pub fn basic_auth() -> String {
    use base64::Engine as _;
    let raw = format!("{CLIENT_ID}:{CLIENT_SECRET}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A config that forwards to `upstream_url`, with defaults otherwise.
pub fn config_for(upstream_url: &str) -> Config {
    Config::from_toml_str(&format!("[upstream]\nurl = {upstream_url:?}\n")).expect("test config")
}

/// A gateway running in this process on 127.0.0.1:0.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainOutcome>>,
}

impl Gateway {
    /// Starts a gateway with `config` (its `server.listen` is ignored).
    pub async fn start(config: Config) -> Gateway {
        Self::start_with_clock(config, LimiterClock::monotonic()).await
    }

    /// Starts a gateway with the config file at `path` (its listen addresses are ignored:
    /// 127.0.0.1:0), reloadable with `POST /reload` on its admin listener.
    pub async fn start_from_file(path: &std::path::Path) -> Gateway {
        let config = Config::load(path).expect("test config file");
        let options = app::RunOptions {
            config_path: Some(path.to_owned()),
            ..app::RunOptions::default()
        };
        Self::start_with_options(config, options).await
    }

    /// As [`Gateway::start`], with the failed-check limiter on `clock`.
    pub async fn start_with_clock(config: Config, clock: LimiterClock) -> Gateway {
        let options = app::RunOptions {
            clock,
            ..app::RunOptions::default()
        };
        Self::start_with_options(config, options).await
    }

    /// As [`Gateway::start`], with `options`.
    pub async fn start_with_options(config: Config, options: app::RunOptions) -> Gateway {
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = proxy.local_addr().expect("addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            app::run_with(config, Listeners { proxy, admin }, shutdown, options)
                .await
                .expect("gateway run")
        });
        Gateway {
            addr,
            admin_addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:ADMIN_PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Starts the drain and waits for it to end.
    pub async fn shutdown(mut self) -> DrainOutcome {
        let task = self.begin_shutdown().expect("gateway task");
        task.await.expect("join")
    }

    /// Signals shutdown without waiting; returns the handle to await the outcome.
    pub fn begin_shutdown(&mut self) -> Option<JoinHandle<DrainOutcome>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A fake GitHub with one registered app, and a gateway in front of it.
pub async fn setup() -> (FakeGithub, Gateway) {
    setup_with(|_| {}).await
}

/// As [`setup`], letting the test adjust the gateway's config first.
pub async fn setup_with(adjust: impl FnOnce(&mut Config)) -> (FakeGithub, Gateway) {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let mut config = config_for(&gh.url());
    adjust(&mut config);
    let gw = Gateway::start(config).await;
    (gh, gw)
}

/// An HTTP/1.1 client (no pooling surprises: a fresh client per call site is fine).
pub fn http1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/1.1 client whose connections come from `local` (another loopback address, such as
/// 127.0.0.2: Linux answers all of 127/8), to play a second caller.
pub fn http1_client_from(local: &str) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(local.parse().expect("local address")));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `Authorization: Basic base64(client_id:secret)`.
pub fn basic(client_id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
    )
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Answer {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `method url` with `headers` and `body` and reads the whole answer (10 s limit).
pub async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let fut = async {
        let resp = client.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("answer within 10 s")
}

/// A plain HTTP/1.1 GET of `url`, read in full.
pub async fn get(url: &str) -> Answer {
    call(&http1_client(), Method::GET, url, &[], Bytes::new()).await
}

/// Sends a call with the app's Basic credentials over HTTP/1.1.
pub async fn call_as_app(method: Method, url: &str) -> Answer {
    let auth = basic_auth();
    call(
        &http1_client(),
        method,
        url,
        &[
            ("authorization", auth.as_str()),
            ("accept", "application/vnd.github.v3+json"),
        ],
        Bytes::new(),
    )
    .await
}

/// GETs `url` and returns as soon as the response head arrives, body still streaming.
pub async fn open_stream(url: &str) -> Response<Incoming> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    tokio::time::timeout(Duration::from_secs(10), http1_client().request(req))
        .await
        .expect("response head within 10 s")
        .expect("response")
}

/// The gateway's `/metrics` as `series -> value`, each series written as in the exposition
/// format (`name{label="value",...}`).
pub async fn scrape(gw: &Gateway) -> HashMap<String, f64> {
    let a = get(&format!("{}/metrics", gw.admin_url())).await;
    assert_eq!(a.status, 200);
    std::str::from_utf8(&a.body)
        .expect("UTF-8 scrape")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A one-route upstream on 127.0.0.1:0 answering every request with `status` and a GitHub
/// validation-error body, after `delay`. Returns its URL.
pub async fn upstream_answering(status: u16, delay: Duration) -> String {
    upstream_counting(status, delay).await.0
}

/// As [`upstream_answering`], also counting the requests it received (counted on arrival).
pub async fn upstream_counting(
    status: u16,
    delay: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        tokio::time::sleep(delay).await;
                        let body = r#"{"message":"Validation Failed","errors":[{"resource":"OauthAccess","code":"invalid"}],"documentation_url":"https://docs.github.com/rest"}"#;
                        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *r.status_mut() = StatusCode::from_u16(status).expect("status");
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, count)
}
