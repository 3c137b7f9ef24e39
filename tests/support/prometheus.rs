//! A real Prometheus server (Debian's `prometheus` binary) as a child process on a free
//! 127.0.0.1 port, with its own temp TSDB, and `promtool check metrics`. Every wait is bounded;
//! the server is killed when its handle drops, on a panic too. Nothing here knows the gateway's
//! rules: it starts, queries and lints.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use super::{Answer, binary::free_port, call, http1_client};

/// How long the server may take to report ready (TSDB opened, rules loaded).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    dir: tempfile::TempDir,
}

/// One sample of an instant vector: its labels (`__name__` included when Prometheus kept it)
/// and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts `bin` with `config` (written as JSON, which YAML reads as is) and waits until
    /// `/-/ready` answers 200. A port taken meanwhile by another process is retried (three
    /// tries); any other early exit panics with the server's log.
    pub async fn start(bin: &Path, config: &Value) -> Prometheus {
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let config_file = dir.path().join("prometheus.yml");
            std::fs::write(
                &config_file,
                serde_json::to_vec_pretty(config).expect("JSON"),
            )
            .expect("write the Prometheus config");
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
            let port = free_port().await;
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut server = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                dir,
            };
            let deadline = Instant::now() + READY_WITHIN;
            let mut exited = None;
            while Instant::now() < deadline {
                exited = server.child.try_wait().expect("poll prometheus");
                if exited.is_some() {
                    break;
                }
                if try_get(&format!("{}/-/ready", server.url))
                    .await
                    .is_some_and(|a| a.status == 200)
                {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last_log = server.log();
            match exited {
                Some(_) if last_log.contains("address already in use") => continue,
                Some(status) => panic!("prometheus exited ({status}); its log:\n{last_log}"),
                None => panic!(
                    "prometheus did not become ready within {READY_WITHIN:?}; its log:\n{last_log}"
                ),
            }
        }
        panic!("prometheus could not bind a port in three tries; its log:\n{last_log}");
    }

    /// What the server logged so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The config file the server runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.yml")
    }

    /// `GET /api/v1/PATH?PARAMS` answered `"status": "success"`: its `data`. Otherwise the
    /// error Prometheus gave (a query that does not parse, or fails to run).
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let a = call(
            &http1_client(),
            Method::GET,
            &format!("{}/api/v1/{path}?{query}", self.url),
            &[],
            Bytes::new(),
        )
        .await;
        let body: Value = serde_json::from_slice(&a.body).map_err(|e| {
            format!(
                "HTTP {}, not JSON ({e}): {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            )
        })?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "HTTP {}: {}: {}",
                a.status, body["errorType"], body["error"]
            ))
        }
    }

    /// Evaluates `query` at `time` (Unix seconds; now when `None`): the answer's `data`
    /// (`resultType` and `result`), or the error.
    pub async fn query(&self, query: &str, time: Option<f64>) -> Result<Value, String> {
        let time = time.map(|t| format!("{t:.3}"));
        let mut params = vec![("query", query)];
        if let Some(t) = &time {
            params.push(("time", t));
        }
        self.api("query", &params).await
    }

    /// As [`Prometheus::query`], for a query whose answer is an instant vector; panics on an
    /// error or another result type.
    pub async fn vector(&self, query: &str, time: Option<f64>) -> Vec<Sample> {
        let data = self
            .query(query, time)
            .await
            .unwrap_or_else(|e| panic!("query {query:?}: {e}"));
        samples(&data).unwrap_or_else(|e| panic!("query {query:?}: {e}"))
    }

    /// Waits (`within` at most) until `query` at the current time gives a non-empty vector
    /// whose first value satisfies `ok`; returns that value.
    pub async fn wait_for(
        &self,
        what: &str,
        query: &str,
        within: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.vector(query, None).await.first()
                && ok(s.value)
            {
                return s.value;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {what}: not within {within:?} ({query}); its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Kill rather than drain: the TSDB is thrown away with the temp dir.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The samples of a query answer's `data` when it is an instant vector (or a scalar, as one
/// sample without labels).
pub fn samples(data: &Value) -> Result<Vec<Sample>, String> {
    let value = |v: &Value| -> Result<f64, String> {
        let text = v[1].as_str().ok_or_else(|| format!("no value in {v}"))?;
        // Prometheus writes NaN and the infinities as "NaN", "+Inf", "-Inf".
        text.trim_start_matches('+')
            .parse()
            .map_err(|e| format!("value {text:?}: {e}"))
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .ok_or("no result array")?
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .ok_or("no metric object")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Ok(Sample {
                    labels,
                    value: value(&s["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value(&data["result"])?,
        }]),
        other => Err(format!("result type {other:?}, not an instant vector")),
    }
}

/// `promtool check metrics` on `exposition` (a scrape's body): `Ok` when it exits 0 and reports
/// nothing, else what it reported. Killed after 30 s.
pub fn lint_metrics(promtool: &Path, exposition: &[u8]) -> Result<(), String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", promtool.display()));
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let written = child.stdin.take().expect("piped").write_all(exposition);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait().expect("poll promtool") {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("promtool check metrics did not exit within 30 s".to_owned());
            }
        }
    };
    let report = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    written.map_err(|e| format!("writing to promtool: {e}"))?;
    if status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({status}):\n{report}"))
    }
}

/// A GET that gives `None` instead of panicking when nothing answers (yet).
async fn try_get(url: &str) -> Option<Answer> {
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), http1_client().request(req))
        .await
        .ok()?
        .ok()?;
    let (parts, body) = resp.into_parts();
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(2), body.collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        version: parts.version,
    })
}
