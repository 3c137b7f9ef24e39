//! A real Prometheus round trip (issue 12). The fake GitHub and a gateway run in this process;
//! Debian's `prometheus` scrapes the gateway's admin listener every second with the scrape job
//! of deploy/prometheus/prometheus.yml (its targets replaced by the test gateway) and loads the
//! rule files there. The real legacy client (demo.js) and a few direct calls make traffic; then:
//!
//! 1. the deprecated-call counters read back through Prometheus' HTTP API equal, per operation
//!    and per operation and action, the calls this test made (counted from what it saw);
//! 2. every counter and histogram series Prometheus holds equals the gateway's own `/metrics`,
//!    which `promtool check metrics` finds nothing to lint in;
//! 3. every PromQL query the docs show runs without error: each ```promql block of README.md and
//!    docs/**/*.md (one query per line; an indented line, or one inside open brackets, continues
//!    it), each `expr` of the rule files in deploy/prometheus and of the dashboards in
//!    deploy/grafana (template variables substituted). A docs block can say what it returns for
//!    this traffic with an HTML comment right above its fence, one word for the whole block or
//!    one per query, comma-separated:
//!    `<!-- promql-check: counters -->` the answer equals the same aggregation of the raw series
//!    (`increase(x[w])` read as `x`, `rate(x[w])` as `x / w`: true when the series was at 0
//!    before the traffic and `w` covers the run), `empty`, `nonempty`, or `runs` (the default);
//! 4. every alerting and recording rule evaluates after the traffic without an error.
//!
//! Nothing here re-implements the gateway's rules: expectations come from the traffic sent, the
//! statuses it got, and the gateway's own counters.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::Mode;
use serde_json::{Map, Value, json};
use support::legacy_client::{AUTH_STYLES, Demo, operation_label};
use support::prometheus::{Prometheus, Sample, lint_metrics, samples};
use support::tools::{PROMETHEUS_INSTALL, require};
use support::{CLIENT_ID, CLIENT_SECRET, basic, call, get, http1_client};

/// The scrape job's name when deploy/prometheus/prometheus.yml does not give one; the docs'
/// queries select `job="oauth-apps-gateway"`.
const DEFAULT_JOB: &str = "oauth-apps-gateway";
/// Prefix of the gateway's own metric names.
const PREFIX: &str = "oauth_apps_gateway_";
/// Prometheus' scrape and rule-evaluation interval in this test.
const INTERVAL: &str = "1s";
/// Bound on each wait for Prometheus (a scrape, a rule evaluation).
const PROMETHEUS_WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
#[ignore = "needs prometheus and promtool (apt-get install prometheus) and node with the legacy client (bash tests/legacy-client/install.sh)"]
async fn prometheus_reads_back_the_traffic_and_runs_every_documented_query() {
    let run_start = unix_now();
    let prometheus_bin = require("prometheus", PROMETHEUS_INSTALL);
    let promtool = require("promtool", PROMETHEUS_INSTALL);
    let demo = Demo::require().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // Everything to run, gathered first: a docs layout this test cannot read fails at once.
    let docs = documented_queries(root).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !docs.is_empty(),
        "no ```promql block in README.md or docs/**/*.md: did the docs move?"
    );
    let setup = ScrapeSetup::read(root);
    let mut queries = docs;
    queries.extend(setup.rule_exprs.iter().cloned());
    queries.extend(grafana_exprs(root));

    // The gateway: defaults, with revoke_grant switched off so that a rejected action is counted.
    let (gh, gw) = support::setup_with(|c| c.migration.modes.revoke_grant = Mode::Reject).await;
    let prom = Prometheus::start(&prometheus_bin, &setup.config_for(gw.admin_addr)).await;
    let job = setup.job_name.as_str();

    // Traffic only once Prometheus holds the gateway's series at 0: then increase() and rate()
    // see every call.
    prom.wait_for(
        "first scrape of the gateway",
        &format!("count({PREFIX}deprecated_calls_total{{job=\"{job}\"}})"),
        PROMETHEUS_WAIT,
        |n| n > 0.0,
    )
    .await;

    let sent = send_traffic(&demo, &gh, &gw).await;
    // The gateway's own counters have every call before the clock is read: a scrape that
    // starts after `traffic_done` sees them all.
    let gateway_counts = wait_for_gateway_counts(&gw, &sent).await;
    let traffic_done = unix_now();
    let t = prom
        .wait_for(
            "a scrape after the traffic",
            &format!("timestamp(up{{job=\"{job}\"}})"),
            PROMETHEUS_WAIT,
            |ts| ts > traffic_done,
        )
        .await;
    // Every query below is evaluated at that scrape's timestamp: no extrapolation to "now".
    let run_secs = t - run_start;

    let mut failures = Vec::new();
    let mut report = Vec::new();

    // 1: the deprecated-call counters, per operation and per operation and action: the
    // gateway's own, then read through Prometheus.
    if gateway_counts != sent.by_operation_action {
        failures.push(format!(
            "the gateway's own deprecated-call counters {gateway_counts:?}, sent {:?}",
            sent.by_operation_action
        ));
    }
    for (what, query) in [
        (
            "counter",
            format!("sum by (operation) ({PREFIX}deprecated_calls_total{{job=\"{job}\"}})"),
        ),
        (
            "increase over 1h",
            format!(
                "sum by (operation) (increase({PREFIX}deprecated_calls_total{{job=\"{job}\"}}[1h]))"
            ),
        ),
    ] {
        // Operations this traffic did not make stay at 0, and are left out.
        let mut got = by_label(&prom.vector(&query, Some(t)).await, "operation");
        got.retain(|_, n| *n != 0.0);
        if got != sent.by_operation() {
            failures.push(format!(
                "deprecated calls per operation ({what}) read through Prometheus: {got:?}, sent {:?} ({query})",
                sent.by_operation()
            ));
        }
    }
    let query =
        format!("sum by (operation, action) ({PREFIX}deprecated_calls_total{{job=\"{job}\"}})");
    let got: BTreeMap<(String, String), f64> = prom
        .vector(&query, Some(t))
        .await
        .into_iter()
        .filter(|s| s.value != 0.0)
        .map(|s| {
            (
                (s.labels["operation"].clone(), s.labels["action"].clone()),
                s.value,
            )
        })
        .collect();
    if got != sent.by_operation_action {
        failures.push(format!(
            "deprecated calls per operation and action read through Prometheus: {got:?}, sent {:?} ({query})",
            sent.by_operation_action
        ));
    }
    report.push(format!(
        "deprecated calls sent and read back per operation: {:?}; per operation and action: {:?}",
        sent.by_operation(),
        sent.by_operation_action
    ));

    // 2: Prometheus' copy equals the gateway's own /metrics, which promtool finds clean.
    let scrape = get(&format!("{}/metrics", gw.admin_url())).await;
    assert_eq!(scrape.status, 200);
    let lint = lint_metrics(&promtool, &scrape.body);
    let lint_summary = if lint.is_ok() {
        "nothing to lint"
    } else {
        "see the failures"
    };
    if let Err(e) = lint {
        failures.push(e);
    }
    let own = parse_exposition(std::str::from_utf8(&scrape.body).expect("UTF-8 scrape"));
    let stored = prom
        .vector(
            &format!("{{__name__=~\"{PREFIX}.+\",job=\"{job}\"}}"),
            Some(t),
        )
        .await;
    let compared = compare_with_exposition(&own, &stored, &mut failures);
    report.push(format!(
        "{compared} counter and histogram series in Prometheus equal the gateway's /metrics; promtool check metrics: {lint_summary}"
    ));

    // 3: every documented query.
    let mut per_source: BTreeMap<&str, usize> = BTreeMap::new();
    for q in &queries {
        *per_source.entry(q.kind).or_default() += 1;
        match run_documented(&prom, q, t, run_secs).await {
            Ok(summary) => report.push(format!(
                "ok   {} [{}] {}: {summary}",
                q.source, q.expect, q.query
            )),
            Err(e) => failures.push(format!("{} [{}] {}: {e}", q.source, q.expect, q.query)),
        }
    }
    report.push(format!(
        "queries run, by where they come from: {per_source:?}"
    ));

    // 4: the rules Prometheus loaded evaluate after the traffic without an error.
    let loaded = rules_after(&prom, traffic_done, &mut failures).await;
    if loaded != setup.rule_exprs.len() {
        failures.push(format!(
            "Prometheus loaded {loaded} rules from deploy/prometheus, the files hold {}",
            setup.rule_exprs.len()
        ));
    }
    report.push(format!("{loaded} rules evaluated after the traffic"));

    let report = report.join("\n");
    eprintln!("{report}");
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}\n\nscrape config: {}\n\nwhat passed:\n{report}\n\nprometheus log:\n{}",
        failures.len(),
        failures.join("\n"),
        setup.from,
        prom.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Traffic

/// What the test sent: legacy calls by (operation, action), each action read from the status
/// the call got and the configured mode.
#[derive(Default)]
struct Sent {
    by_operation_action: BTreeMap<(String, String), f64>,
}

impl Sent {
    fn add(&mut self, operation: &str, action: &str) {
        *self
            .by_operation_action
            .entry((operation.to_owned(), action.to_owned()))
            .or_default() += 1.0;
    }

    fn by_operation(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((op, _), n) in &self.by_operation_action {
            *out.entry(op.clone()).or_default() += n;
        }
        out
    }
}

/// A forwarded legacy call's action: `limited` when answered 429, `rewritten` otherwise.
fn forwarded(status: u16) -> &'static str {
    if status == 429 {
        "limited"
    } else {
        "rewritten"
    }
}

async fn send_traffic(demo: &Demo, gh: &support::FakeGithub, gw: &support::Gateway) -> Sent {
    let mut sent = Sent::default();
    // The real client, all eight of its legacy methods in both auth styles. revoke_grant is
    // switched off (410); the reset replaces the token, so later calls get 404.
    for auth in AUTH_STYLES {
        let token = gh.issue_token(CLIENT_ID, "octocat");
        for line in demo.run(&gw.url(), &token, auth, None).await {
            let name = line["operation"].as_str().unwrap_or_default();
            let op = operation_label(name);
            let status = line["status"]
                .as_u64()
                .unwrap_or_else(|| panic!("demo.js got no answer: {line}"));
            if op == "revoke_grant" {
                assert_eq!(status, 410, "{auth}: switched off: {line}");
                sent.add(op, "rejected");
            } else {
                sent.add(op, forwarded(status as u16));
            }
        }
    }
    let base = format!("{}/applications/{CLIENT_ID}", gw.url());
    let app = basic(CLIENT_ID, CLIENT_SECRET);
    let client = http1_client();
    // A legacy call without a token: malformed.
    let a = call(
        &client,
        Method::GET,
        &format!("{base}/tokens/"),
        &[("authorization", app.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 400, "legacy check without a token");
    sent.add("check", "malformed");
    // The replacement endpoint, and a pass-through call with a query credential.
    let token = gh.issue_token(CLIENT_ID, "hubot");
    let a = call(
        &client,
        Method::POST,
        &format!("{base}/token"),
        &[
            ("authorization", app.as_str()),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"access_token":"{token}"}}"#),
    )
    .await;
    assert_eq!(a.status, 200, "replacement check");
    get(&format!("{}/user?access_token=gho_passthrough", gw.url())).await;
    // Guesses at the client secret: the failed-check limiter's counters move, and the calls
    // it answers 429 are counted as limited.
    let guess = basic(CLIENT_ID, "wrong-secret");
    for i in 0..12 {
        let a = call(
            &client,
            Method::GET,
            &format!("{base}/tokens/gho_guess{i}"),
            &[("authorization", guess.as_str())],
            Bytes::new(),
        )
        .await;
        assert!(
            a.status == 401 || a.status == 429,
            "a wrong client secret: {}",
            a.status
        );
        sent.add("check", forwarded(a.status.as_u16()));
    }
    sent
}

/// Waits (5 s at most) until the gateway's own deprecated-call counters hold every call sent
/// (a call is counted when its answer has been written); returns them, non-zero ones only.
async fn wait_for_gateway_counts(
    gw: &support::Gateway,
    sent: &Sent,
) -> BTreeMap<(String, String), f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = get(&format!("{}/metrics", gw.admin_url())).await;
        let own = parse_exposition(std::str::from_utf8(&text.body).expect("UTF-8"));
        let counts: BTreeMap<(String, String), f64> = own
            .iter()
            .filter(|((name, _), v)| {
                name == &format!("{PREFIX}deprecated_calls_total") && **v != 0.0
            })
            .map(|((_, labels), v)| {
                let l: BTreeMap<_, _> = labels.iter().cloned().collect();
                ((l["operation"].clone(), l["action"].clone()), *v)
            })
            .collect();
        if counts == sent.by_operation_action || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The scrape config

/// The Prometheus config this test runs: deploy/prometheus/prometheus.yml's job for the gateway
/// (or a default one), pointed at the test gateway, and deploy/prometheus's rule files.
struct ScrapeSetup {
    /// The job, without targets or intervals.
    job: Map<String, Value>,
    job_name: String,
    rule_files: Vec<PathBuf>,
    rule_exprs: Vec<Documented>,
    /// Where the job came from, for messages.
    from: String,
}

/// Settings of a scrape job kept from the deployed config: everything about what is scraped
/// and how it is labelled, not where (service discovery, TLS, auth) or how often.
const KEPT_JOB_KEYS: [&str; 11] = [
    "job_name",
    "metrics_path",
    "params",
    "honor_labels",
    "honor_timestamps",
    "metric_relabel_configs",
    "sample_limit",
    "label_limit",
    "label_name_length_limit",
    "label_value_length_limit",
    "body_size_limit",
];

impl ScrapeSetup {
    fn read(root: &Path) -> ScrapeSetup {
        let dir = root.join("deploy/prometheus");
        let deployed = dir.join("prometheus.yml");
        let (job, from) = if deployed.is_file() {
            let config = read_yaml(&deployed);
            let jobs = config["scrape_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let names: Vec<&str> = jobs.iter().filter_map(|j| j["job_name"].as_str()).collect();
            let chosen = jobs
                .iter()
                .find(|j| j["job_name"] == DEFAULT_JOB)
                .or(if jobs.len() == 1 { jobs.first() } else { None })
                .unwrap_or_else(|| {
                    panic!(
                        "{}: no scrape job named {DEFAULT_JOB:?} (jobs: {names:?})",
                        deployed.display()
                    )
                });
            let job = chosen
                .as_object()
                .expect("a scrape job is a mapping")
                .iter()
                .filter(|(k, _)| KEPT_JOB_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (
                job,
                format!("job {} of {}", chosen["job_name"], deployed.display()),
            )
        } else {
            let mut job = Map::new();
            job.insert("job_name".into(), json!(DEFAULT_JOB));
            (
                job,
                format!(
                    "the test's own job {DEFAULT_JOB:?} ({} does not exist)",
                    deployed.display()
                ),
            )
        };
        let job_name = job["job_name"].as_str().expect("job_name").to_owned();

        let mut rule_files = Vec::new();
        let mut rule_exprs = Vec::new();
        for path in files_in(&dir, &["yml", "yaml"]) {
            let doc = read_yaml(&path);
            let Some(groups) = doc.get("groups").and_then(Value::as_array) else {
                continue; // the scrape config, or promtool's rule tests
            };
            for group in groups {
                for rule in group["rules"].as_array().into_iter().flatten() {
                    let name = rule["alert"]
                        .as_str()
                        .or(rule["record"].as_str())
                        .unwrap_or("?");
                    let expr = match &rule["expr"] {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    rule_exprs.push(Documented {
                        kind: "deploy/prometheus rules",
                        source: format!("{} {name}", relative(root, &path)),
                        query: expr.trim().to_owned(),
                        expect: Expect::Runs,
                    });
                }
            }
            rule_files.push(path);
        }
        ScrapeSetup {
            job,
            job_name,
            rule_files,
            rule_exprs,
            from,
        }
    }

    /// The whole config, scraping `admin` every second.
    fn config_for(&self, admin: SocketAddr) -> Value {
        let mut job = self.job.clone();
        job.insert(
            "static_configs".into(),
            json!([{ "targets": [admin.to_string()] }]),
        );
        json!({
            "global": {
                "scrape_interval": INTERVAL,
                "scrape_timeout": INTERVAL,
                "evaluation_interval": INTERVAL,
            },
            "rule_files": self.rule_files,
            "scrape_configs": [job],
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The documented queries

/// What a documented query must return for this test's traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Runs,
    Empty,
    NonEmpty,
    Counters,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expect::Runs => "runs",
            Expect::Empty => "empty",
            Expect::NonEmpty => "nonempty",
            Expect::Counters => "counters",
        })
    }
}

impl std::str::FromStr for Expect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "runs" => Ok(Expect::Runs),
            "empty" => Ok(Expect::Empty),
            "nonempty" => Ok(Expect::NonEmpty),
            "counters" => Ok(Expect::Counters),
            other => Err(format!(
                "unknown promql-check {other:?} (runs, empty, nonempty, counters)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
struct Documented {
    /// Where it comes from: docs, rules, dashboards.
    kind: &'static str,
    /// File and line (or rule name, panel title).
    source: String,
    query: String,
    expect: Expect,
}

/// Every query in the ```promql blocks of README.md and docs/**/*.md.
fn documented_queries(root: &Path) -> Result<Vec<Documented>, String> {
    let mut files = Vec::new();
    if root.join("README.md").is_file() {
        files.push(root.join("README.md"));
    }
    files.extend(files_under(&root.join("docs"), "md"));
    let mut out = Vec::new();
    for path in files {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.extend(promql_in_markdown(&relative(root, &path), &text)?);
    }
    Ok(out)
}

/// The queries of `text`'s ```promql blocks, with what the `<!-- promql-check: … -->` comment
/// right above a block says they return.
fn promql_in_markdown(file: &str, text: &str) -> Result<Vec<Documented>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut pending: Option<(usize, Vec<Expect>)> = None;
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let indent = lines[i].len() - trimmed.len();
        if let Some(words) = trimmed
            .strip_prefix("<!--")
            .and_then(|r| r.trim_start().strip_prefix("promql-check:"))
        {
            let words = words.trim_end().strip_suffix("-->").ok_or_else(|| {
                format!(
                    "{file}:{}: a promql-check comment on one line, ending in -->",
                    i + 1
                )
            })?;
            let expects = words
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<Expect>, _>>()
                .map_err(|e| format!("{file}:{}: {e}", i + 1))?;
            if pending.replace((i + 1, expects)).is_some() {
                return Err(format!(
                    "{file}:{}: two promql-check comments for one block",
                    i + 1
                ));
            }
            i += 1;
            continue;
        }
        let fence: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        if fence.len() >= 3 && fence.chars().all(|c| c == fence.as_bytes()[0] as char) {
            let lang = trimmed[fence.len()..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            let mut body = Vec::new();
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim().starts_with(fence.as_str()) {
                let line = lines[j];
                let cut = line.len() - line.trim_start().len();
                body.push((j + 1, &line[cut.min(indent)..]));
                j += 1;
            }
            if lang == "promql" {
                let queries = split_queries(&body);
                let expects = match pending.take() {
                    None => vec![Expect::Runs; queries.len()],
                    Some((_, e)) if e.len() == 1 => vec![e[0]; queries.len()],
                    Some((_, e)) if e.len() == queries.len() => e,
                    Some((at, e)) => {
                        return Err(format!(
                            "{file}:{at}: {} promql-check words for a block of {} queries",
                            e.len(),
                            queries.len()
                        ));
                    }
                };
                for ((line, query), expect) in queries.into_iter().zip(expects) {
                    out.push(Documented {
                        kind: "docs",
                        source: format!("{file}:{line}"),
                        query,
                        expect,
                    });
                }
            } else if let Some((at, _)) = pending {
                return Err(format!("{file}:{at}: promql-check above a ```{lang} block"));
            }
            i = j + 1;
            continue;
        }
        if let (Some((at, _)), false) = (&pending, trimmed.is_empty()) {
            return Err(format!(
                "{file}:{at}: promql-check not right above a ```promql block"
            ));
        }
        i += 1;
    }
    match pending {
        Some((at, _)) => Err(format!("{file}:{at}: promql-check at the end of the file")),
        None => Ok(out),
    }
}

/// One query per line; an indented line, a line inside open brackets, or one that starts with
/// a binary operator or a grouping clause continues the query above. Comment lines are dropped.
fn split_queries(body: &[(usize, &str)]) -> Vec<(usize, String)> {
    const CONTINUATIONS: [&str; 24] = [
        "or ",
        "and ",
        "unless ",
        "+",
        "-",
        "*",
        "/",
        "%",
        "^",
        "==",
        "!=",
        ">",
        "<",
        "by ",
        "by(",
        "without",
        "on(",
        "on ",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        ")",
    ];
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut depth = 0i32;
    for &(line_no, line) in body {
        let code = strip_comment(line);
        let t = code.trim();
        if t.is_empty() {
            continue;
        }
        let continues = !out.is_empty()
            && (depth > 0
                || line.starts_with(char::is_whitespace)
                || CONTINUATIONS.iter().any(|c| t.starts_with(c)));
        match out.last_mut() {
            Some((_, q)) if continues => {
                q.push(' ');
                q.push_str(t);
            }
            _ => out.push((line_no, t.to_owned())),
        }
        depth += bracket_depth(t);
    }
    out
}

/// `line` without a `#` comment (outside string literals).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '#') => return &line[..i],
            (None, _) => {}
        }
    }
    line
}

/// Open minus closed brackets of `text`, outside string literals.
fn bracket_depth(text: &str) -> i32 {
    let mut depth = 0;
    scan(text, |_, c, _| {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
        false
    });
    depth
}

/// Calls `f(index, char, depth)` for each character outside string literals, with the bracket
/// depth before it, until `f` returns true; returns that index.
fn scan(text: &str, mut f: impl FnMut(usize, char, i32) -> bool) -> Option<usize> {
    let mut quote = None;
    let mut escaped = false;
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if matches!(c, '"' | '\'' | '`') {
            quote = Some(c);
            continue;
        }
        if f(i, c, depth) {
            return Some(i);
        }
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Every `expr` in deploy/grafana/*.json, template variables substituted.
fn grafana_exprs(root: &Path) -> Vec<Documented> {
    let mut out = Vec::new();
    for path in files_in(&root.join("deploy/grafana"), &["json"]) {
        let text = std::fs::read_to_string(&path).expect("read a dashboard");
        let dashboard: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        let variables = dashboard_variables(&dashboard);
        let mut found = Vec::new();
        collect_exprs(&dashboard, "", &mut found);
        for (title, expr) in found {
            out.push(Documented {
                kind: "deploy/grafana dashboards",
                source: format!("{} panel {title:?}", relative(root, &path)),
                query: substitute(&expr, &variables),
                expect: Expect::Runs,
            });
        }
    }
    out
}

/// (panel title, expr) of every `expr` string anywhere in `v`.
fn collect_exprs(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("expr", Value::String(e)) if !e.trim().is_empty() => {
                        out.push((title.to_owned(), e.clone()));
                    }
                    _ => collect_exprs(child, title, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|c| collect_exprs(c, title, out)),
        _ => {}
    }
}

/// A dashboard's template variables: name -> the value a query gets. Its current value when it
/// has one; otherwise (or "All") a regex that matches anything.
fn dashboard_variables(dashboard: &Value) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("__rate_interval", "1m"),
        ("__interval", "1m"),
        ("__interval_ms", "60000"),
        ("__range", "1h"),
        ("__range_s", "3600"),
        ("__range_ms", "3600000"),
        ("__auto", "1m"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(name) = var["name"].as_str() else {
            continue;
        };
        let current = &var["current"]["value"];
        let values: Vec<&str> = match current {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let value = if values.is_empty() || values.iter().any(|v| *v == "$__all" || *v == "All") {
            ".*".to_owned()
        } else {
            values.join("|")
        };
        vars.insert(name.to_owned(), value);
    }
    vars
}

/// `expr` with `$name`, `${name}`, `${name:format}` and `[[name]]` replaced; unknown names get
/// `.*`. `$1` (a label_replace group) and a `$` ending a regex stay.
fn substitute(expr: &str, vars: &HashMap<String, String>) -> String {
    let value = |name: &str| vars.get(name).cloned().unwrap_or_else(|| ".*".to_owned());
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("${")
            && let Some(end) = inner.find('}')
        {
            let name = inner[..end].split(':').next().unwrap_or("");
            out.push_str(&value(name));
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[")
            && let Some(end) = inner.find("]]")
        {
            out.push_str(&value(inner[..end].split(':').next().unwrap_or("")));
            rest = &inner[end + 2..];
        } else if let Some(inner) = tail.strip_prefix('$')
            && inner.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        {
            let end = inner
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(inner.len());
            out.push_str(&value(&inner[..end]));
            rest = &inner[end..];
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Running and checking a query

/// Runs `q` at `t`; checks what it must return. `Ok` with a short account of the answer.
async fn run_documented(
    prom: &Prometheus,
    q: &Documented,
    t: f64,
    run_secs: f64,
) -> Result<String, String> {
    let data = prom.query(&q.query, Some(t)).await?;
    let result_type = data["resultType"].as_str().unwrap_or("?").to_owned();
    let got = samples(&data);
    let n = match &got {
        Ok(s) => s.len(),
        Err(_) => data["result"].as_array().map_or(1, Vec::len),
    };
    let summary = format!("{result_type}, {n} series");
    match q.expect {
        Expect::Runs => {}
        Expect::Empty if n == 0 => {}
        Expect::NonEmpty if n > 0 => {}
        Expect::Empty | Expect::NonEmpty => {
            return Err(format!(
                "expected {}, got {summary}: {}",
                q.expect, data["result"]
            ));
        }
        Expect::Counters => {
            let got = got?;
            let shape = Shape::parse(&q.query).ok_or_else(|| {
                "`counters` needs the form [sort_desc(] [sum [by|without (labels)]] \
                 ([increase|rate](selector[window]) | selector) [)] [comparison number]"
                    .to_owned()
            })?;
            let want = shape.expected(prom, t, run_secs).await?;
            let (got_map, want_map) = (without_name(&got), without_name(&want));
            let same = got_map.len() == want_map.len()
                && got_map.iter().all(|(k, v)| {
                    want_map.get(k).is_some_and(|w| {
                        (v.is_nan() && w.is_nan()) || (v - w).abs() <= 1e-9 * w.abs().max(1.0)
                    })
                });
            if !same {
                return Err(format!(
                    "answer {got_map:?}, the raw series give {want_map:?}"
                ));
            }
            if shape.sort == Some(true) && got.windows(2).any(|w| w[0].value < w[1].value) {
                return Err(format!("not sorted high to low: {got_map:?}"));
            }
            return Ok(format!("{summary}, equal to the raw series"));
        }
    }
    Ok(summary)
}

/// Labels without `__name__` -> value.
fn without_name(samples: &[Sample]) -> BTreeMap<Vec<(String, String)>, f64> {
    samples
        .iter()
        .map(|s| {
            let labels = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "__name__")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (labels, s.value)
        })
        .collect()
}

/// A query of the form `counters` can check, taken apart.
#[derive(Debug)]
struct Shape {
    /// `Some(true)` for sort_desc, `Some(false)` for sort.
    sort: Option<bool>,
    /// `Some(None)`: `sum` of everything; `Some(Some((without, labels)))`: `sum by|without`.
    sum: Option<Option<(bool, Vec<String>)>>,
    /// `increase` or `rate`, and the window in seconds.
    func: Option<(String, f64)>,
    selector: String,
    /// A comparison with a number that filters the answer.
    cmp: Option<(String, f64)>,
}

impl Shape {
    fn parse(query: &str) -> Option<Shape> {
        let mut s = query.trim();
        let mut cmp = trailing_comparison(s).map(|(rest, c)| {
            s = rest;
            c
        });
        let mut sort = None;
        for (name, desc) in [("sort_desc", true), ("sort", false)] {
            if let Some(inner) = call_of(s, name) {
                sort = Some(desc);
                s = inner;
                break;
            }
        }
        if cmp.is_none() {
            cmp = trailing_comparison(s).map(|(rest, c)| {
                s = rest;
                c
            });
        }
        let sum = sum_of(s).map(|(grouping, inner)| {
            s = inner;
            grouping
        });
        let mut func = None;
        for name in ["increase", "rate"] {
            if let Some(inner) = call_of(s, name) {
                let open = scan(inner, |_, c, depth| c == '[' && depth == 0)?;
                let window = parse_duration(inner[open + 1..].strip_suffix(']')?)?;
                func = Some((name.to_owned(), window));
                s = inner[..open].trim();
                break;
            }
        }
        let name_end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(s.len());
        let labels = s[name_end..].trim();
        let selector_ok = (name_end > 0 || labels.starts_with('{'))
            && (labels.is_empty()
                || (labels.starts_with('{')
                    && scan(labels, |_, c, depth| c == '}' && depth == 1)
                        == Some(labels.len() - 1)));
        selector_ok.then(|| Shape {
            sort,
            sum,
            func,
            selector: s.to_owned(),
            cmp,
        })
    }

    /// What the query must answer, computed from the raw series at `t`.
    async fn expected(
        &self,
        prom: &Prometheus,
        t: f64,
        run_secs: f64,
    ) -> Result<Vec<Sample>, String> {
        if let Some((name, window)) = &self.func
            && *window < run_secs
        {
            return Err(format!(
                "{name}() over {window} s does not cover the run ({run_secs:.0} s): not comparable"
            ));
        }
        let raw = prom.vector(&self.selector, Some(t)).await;
        let series: Vec<Sample> = raw
            .into_iter()
            .map(|mut s| {
                match &self.func {
                    None => {}
                    Some((name, window)) => {
                        s.labels.remove("__name__");
                        if name == "rate" {
                            s.value /= window;
                        }
                    }
                }
                s
            })
            .collect();
        let mut out = match &self.sum {
            None => series,
            Some(grouping) => {
                let mut groups: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
                for s in series {
                    let key = s
                        .labels
                        .into_iter()
                        .filter(|(k, v)| {
                            !v.is_empty()
                                && k != "__name__"
                                && match grouping {
                                    None => false,
                                    Some((false, by)) => by.contains(k),
                                    Some((true, without)) => !without.contains(k),
                                }
                        })
                        .collect();
                    *groups.entry(key).or_default() += s.value;
                }
                groups
                    .into_iter()
                    .map(|(labels, value)| Sample { labels, value })
                    .collect()
            }
        };
        if let Some((op, n)) = &self.cmp {
            out.retain(|s| match op.as_str() {
                "==" => s.value == *n,
                "!=" => s.value != *n,
                ">" => s.value > *n,
                "<" => s.value < *n,
                ">=" => s.value >= *n,
                "<=" => s.value <= *n,
                _ => unreachable!("only these are parsed"),
            });
        }
        Ok(out)
    }
}

/// `s` as `name( inner )`: the inner text.
fn call_of<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(name)?.trim_start();
    rest.starts_with('(').then_some(())?;
    let close = scan(rest, |_, c, depth| c == ')' && depth == 1)?;
    (close == rest.len() - 1).then(|| rest[1..close].trim())
}

/// `(labels)` at the start of `s`: the names and the rest.
fn label_list(s: &str) -> Option<(Vec<String>, &str)> {
    let s = s.trim_start().strip_prefix('(')?;
    let close = s.find(')')?;
    let labels = s[..close]
        .split(',')
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    Some((labels, &s[close + 1..]))
}

/// `sum [by|without (l)] (inner) [by|without (l)]`: the grouping and the inner text.
#[allow(clippy::type_complexity)]
fn sum_of(s: &str) -> Option<(Option<(bool, Vec<String>)>, &str)> {
    let mut rest = s.strip_prefix("sum")?.trim_start();
    let grouping_at = |r: &str| -> Option<(bool, Vec<String>, usize)> {
        for (word, without) in [("by", false), ("without", true)] {
            if let Some(after) = r.strip_prefix(word)
                && after.trim_start().starts_with('(')
            {
                let (labels, tail) = label_list(after)?;
                return Some((without, labels, r.len() - tail.len()));
            }
        }
        None
    };
    let mut grouping = grouping_at(rest).map(|(w, l, used)| {
        rest = rest[used..].trim_start();
        (w, l)
    });
    rest.starts_with('(').then_some(())?;
    let close = scan(rest, |_, c, depth| c == ')' && depth == 1)?;
    let inner = rest[1..close].trim();
    let tail = rest[close + 1..].trim();
    if !tail.is_empty() {
        let (w, l, used) = grouping_at(tail)?;
        (grouping.is_none() && used == tail.len()).then_some(())?;
        grouping = Some((w, l));
    }
    Some((grouping, inner))
}

/// `rest OP number` at the end of `s`, outside brackets: the rest and the comparison.
fn trailing_comparison(s: &str) -> Option<(&str, (String, f64))> {
    let bytes = s.as_bytes();
    let mut last = None;
    // The second character of a two-character operator is not an operator of its own.
    let mut skip = None;
    scan(s, |i, c, depth| {
        if depth != 0 || skip == Some(i) {
            return false;
        }
        let op = match (c, bytes.get(i + 1).copied()) {
            ('=', Some(b'=')) => "==",
            ('!', Some(b'=')) => "!=",
            ('>', Some(b'=')) => ">=",
            ('<', Some(b'=')) => "<=",
            ('>', _) => ">",
            ('<', _) => "<",
            _ => return false,
        };
        if op.len() == 2 {
            skip = Some(i + 1);
        }
        last = Some((i, op));
        false
    });
    let (i, op) = last?;
    let number: f64 = s[i + op.len()..].trim().parse().ok()?;
    Some((s[..i].trim(), (op.to_owned(), number)))
}

/// A PromQL duration (`5m`, `1h30m`, `7d`) in seconds.
fn parse_duration(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 604_800.0,
            "y" => 31_536_000.0,
            _ => return None,
        };
        total += n * unit;
        rest = &rest[unit_len..];
    }
    Some(total)
}

// ---------------------------------------------------------------------------------------------
// Prometheus' copy against the gateway's own /metrics, and the rules

/// A series of the exposition format: name and labels (in order).
type Series = (String, Vec<(String, String)>);

/// `name{label="value",...} value` lines of an exposition.
fn parse_exposition(text: &str) -> BTreeMap<Series, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name and value");
            let value: f64 = value
                .trim_start_matches('+')
                .parse()
                .unwrap_or_else(|e| panic!("value of {l:?}: {e}"));
            (parse_series(series), value)
        })
        .collect()
}

fn parse_series(series: &str) -> Series {
    let Some((name, labels)) = series.split_once('{') else {
        return (series.to_owned(), Vec::new());
    };
    let mut out = Vec::new();
    let mut rest = labels.strip_suffix('}').expect("labels end in }");
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.push((key.trim_start_matches(',').to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    out.sort();
    (name.to_owned(), out)
}

/// Every counter and histogram series of the gateway (name ends in `_total`, `_bucket`,
/// `_count` or `_sum`) is in Prometheus with the same value, and the other way round. Returns
/// how many were compared.
fn compare_with_exposition(
    own: &BTreeMap<Series, f64>,
    stored: &[Sample],
    failures: &mut Vec<String>,
) -> usize {
    let counted = |name: &str| {
        name.starts_with(PREFIX)
            && ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .any(|s| name.ends_with(s))
    };
    let own: BTreeMap<&Series, f64> = own
        .iter()
        .filter(|((name, _), _)| counted(name))
        .map(|(k, v)| (k, *v))
        .collect();
    let stored: BTreeMap<Series, f64> = stored
        .iter()
        .filter(|s| counted(&s.labels["__name__"]))
        .map(|s| {
            let labels = s
                .labels
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "job" | "instance"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            ((s.labels["__name__"].clone(), labels), s.value)
        })
        .collect();
    for (series, value) in &own {
        match stored.get(*series) {
            Some(v) if v == value => {}
            other => failures.push(format!(
                "/metrics has {series:?} = {value}, Prometheus holds {other:?}"
            )),
        }
    }
    for series in stored.keys() {
        if !own.contains_key(series) {
            failures.push(format!("Prometheus holds {series:?}, /metrics does not"));
        }
    }
    own.len()
}

/// Waits until every rule group was evaluated after `after` (Unix seconds); each rule must be
/// healthy. Returns how many rules Prometheus has loaded.
async fn rules_after(prom: &Prometheus, after: f64, failures: &mut Vec<String>) -> usize {
    let deadline = Instant::now() + PROMETHEUS_WAIT;
    loop {
        let data = prom
            .api("rules", &[])
            .await
            .unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        let evaluated = groups.iter().all(|g| {
            g["lastEvaluation"]
                .as_str()
                .and_then(unix_seconds)
                .is_some_and(|ts| ts > after)
        });
        if evaluated || Instant::now() > deadline {
            if !evaluated {
                failures.push(format!(
                    "rule groups not evaluated within {PROMETHEUS_WAIT:?} after the traffic"
                ));
            }
            let rules: Vec<&Value> = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            for rule in &rules {
                if rule["health"] != "ok" {
                    failures.push(format!(
                        "rule {} ({}): health {}, error {}",
                        rule["name"], rule["query"], rule["health"], rule["lastError"]
                    ));
                }
            }
            return rules.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// `samples` as label value -> value.
fn by_label(samples: &[Sample], label: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|s| (s.labels.get(label).cloned().unwrap_or_default(), s.value))
        .collect()
}

/// An RFC 3339 time as Prometheus writes it (`Z` or a `+hh:mm` offset) in Unix seconds.
fn unix_seconds(text: &str) -> Option<f64> {
    let (local, offset) = match text.len().checked_sub(6).map(|i| text.split_at(i)) {
        Some((local, off)) if off.starts_with(['+', '-']) && off.as_bytes()[3] == b':' => {
            let sign = if off.starts_with('-') { -1.0 } else { 1.0 };
            let h: f64 = off[1..3].parse().ok()?;
            let m: f64 = off[4..].parse().ok()?;
            (format!("{local}Z"), sign * (h * 3600.0 + m * 60.0))
        }
        _ => (text.to_owned(), 0.0),
    };
    let utc = humantime::parse_rfc3339_weak(&local).ok()?;
    Some(utc.duration_since(UNIX_EPOCH).ok()?.as_secs_f64() - offset)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Files directly in `dir` with one of `extensions`, sorted; none when `dir` does not exist.
fn files_in(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    out.sort();
    out
}

/// Files under `dir`, at any depth, ending in `.extension`, sorted.
fn files_under(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut out = files_in(dir, &[extension]);
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        out.extend(files_under(&sub, extension));
    }
    out
}

/// A YAML file as JSON values (one document).
fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    docs.first().map(yaml_to_json).unwrap_or(Value::Null)
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(s) => s.parse::<f64>().map_or_else(|_| json!(s), |f| json!(f)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) | Yaml::Real(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

// ---------------------------------------------------------------------------------------------
// The parsers above, without Prometheus

#[test]
fn markdown_blocks_annotations_and_continued_lines() {
    let text = "intro\n\n<!-- promql-check: counters, empty -->\n```promql\n# a comment\nsum by (a) (x)\nx >= 9\n```\n\n```promql\nsum(\n  x\n)\nrate(y[5m])\n  / 2\n```\n\n```toml\nnot = 1\n```\n";
    let got = promql_in_markdown("doc.md", text).unwrap();
    let got: Vec<(String, String, Expect)> = got
        .into_iter()
        .map(|d| (d.source, d.query, d.expect))
        .collect();
    assert_eq!(
        got,
        vec![
            ("doc.md:6".into(), "sum by (a) (x)".into(), Expect::Counters),
            ("doc.md:7".into(), "x >= 9".into(), Expect::Empty),
            ("doc.md:11".into(), "sum( x )".into(), Expect::Runs),
            ("doc.md:14".into(), "rate(y[5m]) / 2".into(), Expect::Runs),
        ]
    );
    for bad in [
        "<!-- promql-check: counters -->\n```toml\n```\n",
        "<!-- promql-check: nope -->\n```promql\nx\n```\n",
        "<!-- promql-check: empty, empty -->\n```promql\nx\n```\n",
        "<!-- promql-check: empty -->\ntext\n```promql\nx\n```\n",
    ] {
        assert!(promql_in_markdown("d.md", bad).is_err(), "{bad}");
    }
}

#[test]
fn shapes_counters_can_check() {
    let s = Shape::parse(
        r#"sort_desc(sum by (client_id) (increase(m_total{a="x>1",b=~"y"}[1h]))) > 0"#,
    )
    .unwrap();
    assert_eq!(s.sort, Some(true));
    assert_eq!(s.sum, Some(Some((false, vec!["client_id".to_owned()]))));
    assert_eq!(s.func, Some(("increase".to_owned(), 3600.0)));
    assert_eq!(s.selector, r#"m_total{a="x>1",b=~"y"}"#);
    assert_eq!(s.cmp, Some((">".to_owned(), 0.0)));
    let s = Shape::parse("sum(rate(m[5m])) == 0").unwrap();
    assert_eq!((s.sum, s.cmp), (Some(None), Some(("==".to_owned(), 0.0))));
    let s = Shape::parse("sum (m) without (le)").unwrap();
    assert_eq!(s.sum, Some(Some((true, vec!["le".to_owned()]))));
    assert_eq!(
        Shape::parse("m >= 90000").unwrap().cmp,
        Some((">=".to_owned(), 90000.0))
    );
    for other in [
        "histogram_quantile(0.95, sum by (le) (rate(m[5m])))",
        "(sum(rate(a[5m])) or vector(0)) / sum(rate(b[5m]))",
        "rate(m[5m:1m])",
        "m offset 5m",
    ] {
        assert!(Shape::parse(other).is_none(), "{other}");
    }
    assert_eq!(parse_duration("1h30m"), Some(5400.0));
    assert_eq!(parse_duration("7d"), Some(604_800.0));
}

#[test]
fn grafana_variables_are_substituted() {
    let dashboard = json!({"templating": {"list": [
        {"name": "job", "current": {"value": "oauth-apps-gateway"}},
        {"name": "client", "current": {"value": ["$__all"]}},
    ]}});
    let vars = dashboard_variables(&dashboard);
    assert_eq!(
        substitute(
            r#"sum by (x) (rate(m{job="$job",c=~"${client:regex}",s=~"5..$"}[$__rate_interval])) / [[job]] $1"#,
            &vars
        ),
        r#"sum by (x) (rate(m{job="oauth-apps-gateway",c=~".*",s=~"5..$"}[1m])) / oauth-apps-gateway $1"#
    );
}

#[test]
fn rfc3339_times_with_offsets() {
    assert_eq!(unix_seconds("1970-01-01T01:00:00Z"), Some(3600.0));
    assert_eq!(unix_seconds("1970-01-01T03:00:00.5+02:00"), Some(3600.5));
    assert_eq!(unix_seconds("1970-01-01T00:00:00-01:00"), Some(3600.0));
}

#[test]
fn exposition_lines_parse() {
    let own = parse_exposition(
        "# HELP x y\nm_total{b=\"2\",a=\"q\\\"uote\"} 3\nm_bucket{le=\"+Inf\"} 1\nplain 4.5\n",
    );
    assert_eq!(
        own[&(
            "m_total".to_owned(),
            vec![("a".into(), "q\"uote".into()), ("b".into(), "2".into())]
        )],
        3.0
    );
    assert_eq!(own[&("plain".to_owned(), vec![])], 4.5);
    assert_eq!(own.len(), 3);
}
