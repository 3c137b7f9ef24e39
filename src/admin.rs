//! The admin listener's service: `GET /metrics` (Prometheus text format 0.0.4), `GET /livez`,
//! `GET /readyz` (503 once draining starts) and `GET /legacy-clients` (the client_ids still
//! making deprecated calls, which library they use and what to upgrade; JSON, or an aligned
//! table with `?format=text`), and `POST /reload` (from a loopback address: reload the
//! configuration file). Served only on `[admin] listen`, never on the proxy listener, and never
//! forwards anything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};
use crate::reload::Reloader;
use crate::shared::Store;

/// Whether the gateway takes new traffic: true while serving, false once draining starts.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts ready.
    pub fn new() -> Self {
        Readiness(Arc::new(AtomicBool::new(true)))
    }

    /// Marks the gateway as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::Release);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// The admin endpoints.
#[derive(Debug, Clone)]
pub struct Admin {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    reloader: Option<Arc<Reloader>>,
    shared: Option<Arc<Store>>,
}

impl Admin {
    /// Endpoints reporting `metrics` and `readiness`.
    pub fn new(metrics: Arc<Metrics>, readiness: Readiness) -> Self {
        Admin {
            metrics,
            readiness,
            reloader: None,
            shared: None,
        }
    }

    /// The same endpoints, with `/legacy-clients` showing the fleet's report from `store`
    /// (`[shared]`); while the store is unavailable, this replica's, which says so
    /// (`"scope": "replica"`).
    pub fn with_shared_store(mut self, store: Option<Arc<Store>>) -> Self {
        self.shared = store;
        self
    }

    /// The same endpoints, with `POST /reload` reloading through `reloader` (without one,
    /// `/reload` is 404).
    pub fn with_reloader(mut self, reloader: Option<Arc<Reloader>>) -> Self {
        self.reloader = reloader;
        self
    }

    /// Answers one admin request from `peer`: `POST /reload` (loopback callers only: 403 from
    /// any other address) reloads the configuration file and answers 200 with what changed and
    /// what needs a restart, or 422 with why the file was refused (the running configuration
    /// stays); everything else as [`Admin::handle`].
    pub async fn serve<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if let Some(store) = &self.shared
            && req.uri().path() == "/legacy-clients"
            && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            let text = wants_text(req.uri().query());
            if let Some(body) = self.metrics.fleet_report(store, text).await {
                let ct = match text {
                    true => "text/plain; charset=utf-8",
                    false => "application/json",
                };
                return with_type(StatusCode::OK, body.into(), ct);
            }
        }
        if req.uri().path() != "/reload" {
            return self.handle(&req);
        }
        let Some(reloader) = &self.reloader else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        if req.method() != Method::POST {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        if !peer.ip().to_canonical().is_loopback() {
            tracing::warn!(peer = %peer.ip(), "POST /reload refused: not from a loopback address");
            return text(
                StatusCode::FORBIDDEN,
                "reload is accepted from a loopback address only\n",
            );
        }
        let (status, body) = match reloader.reload("admin").await {
            Ok(report) => (
                StatusCode::OK,
                serde_json::json!({
                    "status": "reloaded",
                    "file": reloader.path().display().to_string(),
                    "sha256": report.sha256,
                    "changed": report.changed,
                    "needs_restart": report.needs_restart,
                }),
            ),
            Err(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({
                    "status": "error",
                    "message": e.to_string(),
                }),
            ),
        };
        let mut body = serde_json::to_vec_pretty(&body).unwrap_or_default();
        body.push(b'\n');
        with_type(status, body.into(), "application/json")
    }

    /// Answers one admin request. `GET` and `HEAD` only; anything else is 404.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        match req.uri().path() {
            "/metrics" => match self.metrics.encode() {
                Ok(body) => with_type(StatusCode::OK, body.into(), TEXT_CONTENT_TYPE),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode metrics");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n")
                }
            },
            "/livez" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.readiness.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            "/legacy-clients" if wants_text(req.uri().query()) => with_type(
                StatusCode::OK,
                self.metrics.legacy_clients_text().into(),
                "text/plain; charset=utf-8",
            ),
            "/legacy-clients" => with_type(
                StatusCode::OK,
                self.metrics.legacy_clients_json().into(),
                "application/json",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Whether the query asks for the report as an aligned text table (`format=text`).
fn wants_text(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|p| p == "format=text"))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn admin() -> Admin {
        let metrics = Metrics::new(crate::metrics::Registry::new(), 10).unwrap();
        Admin::new(Arc::new(metrics), Readiness::new())
    }

    async fn get(a: &Admin, method: Method, path: &str) -> (StatusCode, String, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let resp = a.handle(&req);
        let ct = resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn routes() {
        let a = admin();
        let (s, ct, body) = get(&a, Method::GET, "/metrics").await;
        assert_eq!(s, 200);
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
        assert!(body.contains("oauth_apps_gateway_build_info"));
        assert_eq!(get(&a, Method::GET, "/livez").await.0, 200);
        assert_eq!(get(&a, Method::GET, "/readyz").await.0, 200);
        let (s, ct, body) = get(&a, Method::GET, "/legacy-clients").await;
        assert_eq!((s.as_u16(), ct.as_str()), (200, "application/json"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["clients"],
            serde_json::json!([])
        );
        a.metrics.deprecated_call(
            crate::classify::Operation::Check,
            crate::metrics::LegacyAction::Rewritten,
            Some("Iv1.a"),
            Some("octokit.js/16.43.2 Node.js/20.20.2 (Linux 6.18; x64)"),
            crate::metrics::CallOutcome::TokenFailure,
        );
        let (s, ct, body) = get(&a, Method::GET, "/legacy-clients").await;
        assert_eq!((s.as_u16(), ct.as_str()), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let c = &v["clients"][0];
        assert_eq!(c["outcomes"]["check"]["token_failure"], 1);
        assert_eq!(
            c["user_agents"][0],
            "octokit.js/16.43.2 Node.js/20.20.2 (Linux 6.18; x64)"
        );
        assert_eq!(
            c["advice"][0]["advice"],
            "upgrade @octokit/rest (npm) 16.43.2 to 17.0.0 or later"
        );
        assert!(
            c["advice"][0]["source"]
                .as_str()
                .unwrap()
                .contains("npm view")
        );
        let (s, ct, body) = get(&a, Method::GET, "/legacy-clients?format=text").await;
        assert_eq!(
            (s.as_u16(), ct.as_str()),
            (200, "text/plain; charset=utf-8")
        );
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 2, "{body}");
        assert!(
            lines[0].starts_with("client_id  calls  check  reset"),
            "{body}"
        );
        assert!(lines[1].starts_with("Iv1.a      1      1      0"), "{body}");
        assert!(lines[1].ends_with("upgrade @octokit/rest (npm) 16.43.2 to 17.0.0 or later"));
        assert_eq!(get(&a, Method::GET, "/").await.0, 404);
        assert_eq!(
            get(&a, Method::GET, "/applications/x/tokens/y").await.0,
            404
        );
        assert_eq!(get(&a, Method::POST, "/metrics").await.0, 404);
        a.readiness.set_draining();
        assert_eq!(get(&a, Method::GET, "/readyz").await.0, 503);
        assert_eq!(get(&a, Method::GET, "/livez").await.0, 200);
    }

    #[tokio::test]
    async fn reload_is_refused_to_a_caller_from_outside_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[log]\nlevel = \"debug\"\n").unwrap();
        let metrics = Arc::new(Metrics::new(crate::metrics::Registry::new(), 10).unwrap());
        let config = crate::config::Config::default();
        let parts = crate::reload::Parts {
            proxies: Arc::from(Vec::new()),
            serve_options: tokio::sync::watch::channel(crate::app::serve_options(&config.server)).0,
            log_level: None,
            metrics: metrics.clone(),
            clock: crate::limiter::LimiterClock::manual(),
            limiter: None,
            shared: None,
            tls: None,
        };
        let reloader = Arc::new(Reloader::new(path, config, parts));
        let admin = Admin::new(metrics.clone(), Readiness::new()).with_reloader(Some(reloader));
        let post = || Request::post("/reload").body(()).unwrap();
        for outside in [
            "192.0.2.1:40000",
            "[2001:db8::1]:40000",
            "[::ffff:192.0.2.1]:1",
        ] {
            let resp = admin.serve(post(), outside.parse().unwrap()).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{outside}");
        }
        let scrape = metrics.encode().unwrap();
        assert!(
            !scrape.contains("config_reloads_total{result=\"success\"} 1"),
            "{scrape}"
        );
        for local in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:1"] {
            let resp = admin.serve(post(), local.parse().unwrap()).await;
            assert_eq!(resp.status(), StatusCode::OK, "{local}");
        }
        let scrape = metrics.encode().unwrap();
        assert!(
            scrape.contains("config_reloads_total{result=\"success\"} 3"),
            "{scrape}"
        );
    }
}
