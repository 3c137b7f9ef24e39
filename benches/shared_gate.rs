//! `cargo bench --bench shared_gate`: what `[shared]` adds to the failed-check gate, with a real
//! Redis on loopback (Debian's redis-server, started here on a free port of 127.0.0.1 and
//! stopped at the end; the bench fails, naming the package, without it). Prints, in
//! microseconds, p50, p99 and the mean of:
//! - a call through the gate and settled (admit script, then the settle script in a task of its
//!   own), per replica (no Redis) and shared;
//! - a call on a spent key: per replica, shared answered from the local cache, and shared
//!   asking Redis every time (the cache off).
//!
//! Latency is wall time on this machine (2 cores, the bench and Redis on them); bounded: a fixed
//! number of calls per case, every wait with a deadline.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use oauth_apps_gateway::config::Config;
use oauth_apps_gateway::limiter::{
    Admission, FailedChecks, FailureClass, LimiterClock, Settle, SharedQuotas,
};
use oauth_apps_gateway::metrics::{Metrics, Registry};
use oauth_apps_gateway::shared::Store;

const CALLS: usize = 20_000;
const WARMUP: usize = 1_000;

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (Redis, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server listens within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (Redis(child), port)
}

fn config(redis_port: Option<u16>) -> Config {
    let shared = redis_port.map_or(String::new(), |p| {
        format!("[shared]\nredis_url = \"redis://127.0.0.1:{p}/0\"\ntimeout = \"1s\"\n")
    });
    Config::from_toml_str(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[failed_checks]\ntoken_burst = 1000000000\n\
         credential_burst = 1\ncredential_replenish = \"1h\"\n{shared}"
    ))
    .expect("bench config")
}

async fn limiter(redis_port: Option<u16>, cache: usize) -> Arc<FailedChecks> {
    let cfg = config(redis_port);
    let mut fc = FailedChecks::new(&cfg.failed_checks, LimiterClock::monotonic()).expect("limiter");
    if let Some(shared) = &cfg.shared {
        let metrics = Metrics::new(Registry::new(), 10).expect("metrics");
        let store = Arc::new(Store::new(shared, metrics.shared_store()).expect("store"));
        let quotas = SharedQuotas::new(store, cache);
        quotas.maintain(true).await;
        assert!(quotas.store().is_up(), "Redis answers");
        fc = fc.with_shared_opt(Some(quotas));
    }
    Arc::new(fc)
}

fn basic(secret: &str) -> HeaderValue {
    use base64::Engine as _;
    let raw = format!("Iv1.bench00000000000:{secret}");
    let enc = base64::engine::general_purpose::STANDARD.encode(raw);
    HeaderValue::try_from(format!("Basic {enc}")).expect("header")
}

/// Percentiles of `samples` (sorted here), in microseconds: p50, p99, mean.
fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(samples[((samples.len() - 1) as f64 * q) as usize]);
    let mean = us(samples.iter().sum::<Duration>()) / samples.len() as f64;
    (at(0.50), at(0.99), mean)
}

/// One token check through the gate from `last_octet` (127.0.0.x), timed: a pass is settled as
/// accepted (`settle`: the credential is the app's), a refusal must be a 429 (`!settle`).
async fn gate(l: &Arc<FailedChecks>, auth: &HeaderValue, last_octet: u8, settle: bool) -> Duration {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet));
    let start = Instant::now();
    let keys = l.keys(Some(auth), "Iv1.bench00000000000", ip);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    match (l.admit(keys, true, deadline).await, settle) {
        (Admission::Pass(p), true) => {
            p.settle(Settle::Accepted);
        }
        (Admission::Limited(..), false) => {}
        (other, _) => panic!("unexpected at the gate: {other:?}"),
    }
    start.elapsed()
}

async fn spend(l: &Arc<FailedChecks>, auth: &HeaderValue) {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let keys = l.keys(Some(auth), "Iv1.bench00000000000", ip);
    if let Admission::Pass(p) = l
        .admit(
            keys,
            true,
            tokio::time::Instant::now() + Duration::from_secs(5),
        )
        .await
    {
        p.settle(Settle::Failure(FailureClass::Credential));
    }
    // The charge is written by a task of its own.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn measure<F, Fut>(name: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    for _ in 0..WARMUP {
        f().await;
    }
    let mut samples = Vec::with_capacity(CALLS);
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..CALLS {
        samples.push(f().await);
        assert!(Instant::now() < deadline, "{name}: over 120 s");
    }
    let (p50, p99, mean) = summary(samples);
    println!("{name:<48} p50 {p50:>8.1} us   p99 {p99:>8.1} us   mean {mean:>8.1} us");
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this with no argument: skip the
    // measurement there (it needs redis-server and takes a minute).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (_redis, port) = start_redis();
        println!("{CALLS} calls per case, after {WARMUP} warm-up calls; Redis on 127.0.0.1:{port}");
        let good = basic("right-secret");
        let bad = basic("wrong-secret");

        let local = limiter(None, 0).await;
        let shared = limiter(Some(port), 100_000).await;
        let uncached = limiter(Some(port), 0).await;
        measure("gate + settle, per replica", || {
            gate(&local, &good, 1, true)
        })
        .await;
        measure("gate + settle, shared (Redis)", || {
            gate(&shared, &good, 1, true)
        })
        .await;

        spend(&local, &bad).await;
        spend(&shared, &bad).await;
        measure("spent key, per replica", || gate(&local, &bad, 2, false)).await;
        measure("spent key, shared, local cache", || {
            gate(&shared, &bad, 2, false)
        })
        .await;
        measure("spent key, shared, Redis every time (no cache)", || {
            gate(&uncached, &bad, 2, false)
        })
        .await;
    });
}
