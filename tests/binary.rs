//! The real binary as an operator runs it: start with a config file, serve a rewritten call,
//! stop on SIGTERM after draining, exit 0, and say in its log that the drain completed; a call
//! still open when the grace period ends is answered 503 and logged before the process exits 1.

mod support;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use http::Method;
use support::{CLIENT_ID, CLIENT_SECRET, FakeGithub, call_as_app};

use support::binary::Running;

/// Starts the binary forwarding to `upstream` with JSON logs and `shutdown_grace`, and waits
/// until it listens.
async fn start(upstream: &str, shutdown_grace: &str) -> Running {
    support::binary::start(
        upstream,
        &format!("shutdown_grace = {shutdown_grace:?}\n"),
        "[log]\nformat = \"json\"\n",
        Stdio::piped(),
        Stdio::piped(),
    )
    .await
}

/// Sends SIGTERM and returns the exit status and everything written to stdout.
async fn terminate(running: Running) -> (ExitStatus, String) {
    let status = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    exit_of(running).await
}

/// Waits (10 s at most) for the binary to exit; its exit status and everything written to
/// stdout.
async fn exit_of(mut running: Running) -> (ExitStatus, String) {
    let exit = tokio::task::spawn_blocking(move || {
        let exit = running.child.wait().unwrap();
        let mut out = String::new();
        running
            .child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (exit, out)
    });
    tokio::time::timeout(Duration::from_secs(10), exit)
        .await
        .expect("binary exits after SIGTERM")
        .unwrap()
}

/// The JSON access events in `out`.
fn access_events(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "oauth_apps_gateway::access")
        .collect()
}

#[tokio::test]
async fn binary_serves_and_drains_on_sigterm() {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let running = start(&gh.url(), "5s").await;
    let url = running.url.clone();
    let a = call_as_app(
        Method::GET,
        &format!("{url}/applications/{CLIENT_ID}/tokens/{token}"),
    )
    .await;
    assert_eq!(a.status, 200);

    // SIGHUP does not stop it (it reloads the config; the default action would kill it).
    let hup = Command::new("kill")
        .args(["-HUP", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = call_as_app(
        Method::GET,
        &format!("{url}/applications/{CLIENT_ID}/tokens/{token}"),
    )
    .await;
    assert_eq!(a.status, 200, "gateway stopped serving after SIGHUP");

    let (exit, out) = terminate(running).await;
    assert!(exit.success(), "exit {exit:?}\n{out}");
    assert!(out.contains("SIGTERM received"), "{out}");
    assert!(out.contains("drain completed"), "{out}");
    // One JSON access event per call, without the token.
    let access = access_events(&out);
    assert_eq!(access.len(), 2, "{out}");
    assert!(out.contains("SIGHUP received"), "{out}");
    assert_eq!(access[0]["operation"], "check");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["outcome"], "answered");
    assert_eq!(access[0]["client_id"], CLIENT_ID);
    let duration = access[0]["duration_seconds"].as_str().unwrap();
    assert!(duration.parse::<f64>().unwrap() >= 0.0, "{duration}");
    assert!(!out.contains(&token));
}

#[tokio::test]
async fn a_call_still_open_when_the_grace_period_ends_is_answered_503_and_logged() {
    let (upstream, reached) = support::upstream_counting(200, Duration::from_secs(30)).await;
    let running = start(&upstream, "300ms").await;
    let url = format!("{}/applications/{CLIENT_ID}/token", running.url);
    let pending = tokio::spawn(async move {
        let auth = support::basic_auth();
        support::call(
            &support::http1_client(),
            Method::PATCH,
            &url,
            &[("authorization", auth.as_str())],
            r#"{"access_token":"gho_t"}"#,
        )
        .await
    });
    // SIGTERM once the call has reached the upstream (5 s at most).
    for _ in 0..500 {
        if reached.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (exit, out) = terminate(running).await;
    assert_eq!(exit.code(), Some(1), "a timed-out drain exits 1\n{out}");
    let a = pending.await.unwrap();
    assert_eq!(a.status, 503, "the cut-off answer reached the client");
    let access = access_events(&out);
    assert_eq!(access.len(), 1, "{out}");
    assert_eq!(access[0]["outcome"], "shutdown");
    assert_eq!(access[0]["status"], 503);
}

/// `server.shutdown_delay`: after SIGTERM `/readyz` answers 503 at once while calls are still
/// served on new connections; a second SIGTERM ends the delay, and the process drains and exits.
#[tokio::test]
async fn shutdown_delay_keeps_serving_while_not_ready_and_a_second_sigterm_ends_it() {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let running = support::binary::start(
        &gh.url(),
        "shutdown_delay = \"60s\"\nshutdown_grace = \"5s\"\n",
        "[log]\nformat = \"json\"\n",
        Stdio::piped(),
        Stdio::piped(),
    )
    .await;
    let url = running.url.clone();
    let readyz = format!("http://{}/readyz", running.admin_addr);
    assert_eq!(support::get(&readyz).await.status, 200);
    let pid = running.child.id().to_string();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    kill("-TERM");
    // Not ready at once ...
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while support::get(&readyz).await.status != 503 {
        assert!(tokio::time::Instant::now() < until, "/readyz still 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... while a legacy call on a new connection is still served, a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = call_as_app(
        Method::GET,
        &format!("{url}/applications/{CLIENT_ID}/tokens/{token}"),
    )
    .await;
    assert_eq!(a.status, 200, "served during shutdown_delay");
    // A second SIGTERM ends the 60 s delay: the process drains and exits within seconds.
    kill("-TERM");
    let (status, out) = exit_of(running).await;
    assert!(status.success(), "{status:?}");
    assert!(out.contains("shutdown_delay cut short"), "{out}");
    assert!(out.contains("shutdown: drain completed"), "{out}");
}

/// SIGHUP reloads the config file (issue 11): a changed operation mode applies to the next
/// call on a running process; a file that does not validate leaves it serving as before, and
/// says why in its log; neither ends the process (SIGHUP's default action).
#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_file_changes_nothing() {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let running = start(&gh.url(), "5s").await;
    let path = running.dir.path().join("config.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let check = format!("{}/applications/{CLIENT_ID}/tokens/{token}", running.url);
    assert_eq!(call_as_app(Method::GET, &check).await.status, 200);
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &running.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let status_within_5s = |want: u16| {
        let check = check.clone();
        async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = call_as_app(Method::GET, &check).await.status;
                if got == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "still {got}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    std::fs::write(
        &path,
        format!("{original}[migration.operations]\ncheck = \"reject\"\n"),
    )
    .unwrap();
    hup();
    status_within_5s(410).await;

    std::fs::write(
        &path,
        format!("{original}[migration.operations]\ncheck = \"sometimes\"\n"),
    )
    .unwrap();
    hup();
    let metrics = format!("http://{}/metrics", running.admin_addr);
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while !std::str::from_utf8(&support::get(&metrics).await.body)
        .unwrap()
        .contains("oauth_apps_gateway_config_reloads_total{result=\"error\"} 1")
    {
        assert!(
            tokio::time::Instant::now() < until,
            "no failed reload counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call_as_app(Method::GET, &check).await.status, 410);

    let (status, out) = terminate(running).await;
    assert!(status.success(), "{status:?}");
    assert!(out.contains("configuration reloaded"), "{out}");
    let failed = out
        .lines()
        .find(|l| l.contains("configuration reload failed"))
        .unwrap_or_else(|| panic!("no failed reload logged: {out}"));
    assert!(
        failed.contains("migration.operations.check") && failed.contains("sometimes"),
        "{failed}"
    );
}
