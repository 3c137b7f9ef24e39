//! The real binary as an operator runs it: start with a config file, serve a rewritten call,
//! stop on SIGTERM after draining, exit 0, and say in its log that the drain completed.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::Method;
use support::{CLIENT_ID, CLIENT_SECRET, FakeGithub, call_as_app};

const BIN: &str = env!("CARGO_BIN_EXE_oauth-apps-gateway");

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn binary_serves_and_drains_on_sigterm() {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let port = free_port().await;
    let admin_port = free_port().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[upstream]\nurl = {:?}\n[log]\nformat = \"json\"\n",
            gh.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Wait until it listens.
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        let _ = child.kill();
        panic!("gateway binary did not start listening");
    }
    let a = call_as_app(
        Method::GET,
        &format!("{url}/applications/{CLIENT_ID}/tokens/{token}"),
    )
    .await;
    assert_eq!(a.status, 200);

    // SIGHUP does not stop it (reload is not implemented; the default action would kill it).
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
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

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let exit = child.wait().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (exit, out)
    });
    let (exit, out) = tokio::time::timeout(Duration::from_secs(10), exit)
        .await
        .expect("binary exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit {exit:?}\n{out}");
    assert!(out.contains("SIGTERM received"), "{out}");
    assert!(out.contains("drain completed"), "{out}");
    // One JSON access event for the call, without the token.
    let access: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "oauth_apps_gateway::access")
        .collect();
    assert_eq!(access.len(), 2, "{out}");
    assert!(out.contains("SIGHUP received"), "{out}");
    assert_eq!(access[0]["operation"], "check");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["client_id"], CLIENT_ID);
    assert!(access[0]["duration_seconds"].as_f64().unwrap() >= 0.0);
    assert!(!out.contains(&token));
}
