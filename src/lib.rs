//! oauth-apps-gateway: a reverse proxy that puts GitHub's deprecated token-in-path OAuth
//! Applications calls (`/applications/{client_id}/tokens/{access_token}`, `.../grants/...`) into
//! their replacement form (token in a JSON body) and forwards them, and every other call,
//! to one configured upstream.
//!
//! # Layout
//! - [`app`]: composition root; builds the parts from a [`config::Config`], binds, runs, drains.
//! - [`config`]: the TOML file, loaded and validated into typed values.
//! - [`classify`]: pure; method and path -> legacy operation, token API or pass-through.
//! - [`rewrite`]: pure; legacy call -> replacement path and JSON body; query credentials ->
//!   `Authorization`.
//! - [`headers`]: pure; hop-by-hop removal and `Accept` media-type merging.
//! - [`access`]: the access event's request facts: request id, user agent as logged, protocol,
//!   fixed-decimal seconds.
//! - [`proxy`]: the request path as named stages: plan, gate, exchange, observe, error.
//! - [`limiter`]: GCRA quotas on failed calls, keyed to the caller (the only governor and ring
//!   user).
//! - [`upstream`]: the pooled HTTPS client to the upstream and its failure kinds.
//! - [`body`]: response body types (deadline-bounded upstream body).
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2, graceful drain.
//! - [`tls`]: inbound TLS on the proxy listener, certificate rotation (the only tokio-rustls
//!   user; the server side of rustls, whose client side is in [`upstream`]).
//! - [`workers`]: one single-threaded runtime per worker thread; connections handed out.
//! - [`admin`]: the admin listener's endpoints (metrics, health, legacy-client report, reload).
//! - [`reload`]: live reload of the configuration file (SIGHUP, `POST /reload`) into the
//!   running parts. [`proxy`] swaps its parts whole per reload (the only arc-swap user).
//! - [`metrics`]: Prometheus metrics and the legacy-client report (the only prometheus user).
//! - [`report`]: pure; which known library a user agent names and which release stops the
//!   legacy calls.
//! - [`logging`]: tracing subscriber set-up.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod app;
pub mod body;
pub mod classify;
pub mod config;
pub mod headers;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod report;
pub mod rewrite;
pub mod server;
pub mod shared;
pub mod tls;
pub mod upstream;
pub mod workers;
