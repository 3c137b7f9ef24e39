//! Runs the test suite's fake GitHub OAuth Applications API as a standalone server, seeded with
//! one app and one token, for trying the gateway by hand. Not a product: no TLS, no persistence.
//!
//!     cargo run --example fake-github -- --listen 127.0.0.1:9000
#![forbid(unsafe_code)]

#[path = "../tests/support/fake_github.rs"]
mod fake_github;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

/// Fake GitHub upstream (new OAuth Applications API only; legacy paths answer 404).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on [env: FAKE_GITHUB_LISTEN] [default: 127.0.0.1:9000]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// OAuth app client ID to register [env: FAKE_GITHUB_CLIENT_ID] [default: Iv1.demo0000000000]
    #[arg(long)]
    client_id: Option<String>,
    /// Its client secret [env: FAKE_GITHUB_CLIENT_SECRET] [default: demo-secret]
    #[arg(long)]
    client_secret: Option<String>,
    /// An access token valid for that app [env: FAKE_GITHUB_TOKEN]
    /// [default: gho_demo00000000000000000000000000000000]
    #[arg(long)]
    token: Option<String>,
    /// Login of the token's user [env: FAKE_GITHUB_USER] [default: octocat]
    #[arg(long)]
    user: Option<String>,
}

/// Flag, then environment variable, then default (clap's `env` feature is not enabled).
fn pick(flag: Option<String>, env: &str, default: &str) -> String {
    flag.or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listen = match args.listen {
        Some(addr) => addr,
        None => {
            let raw = pick(None, "FAKE_GITHUB_LISTEN", "127.0.0.1:9000");
            match raw.parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("error: FAKE_GITHUB_LISTEN={raw:?} is not an address: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let client_id = pick(
        args.client_id,
        "FAKE_GITHUB_CLIENT_ID",
        "Iv1.demo0000000000",
    );
    let client_secret = pick(
        args.client_secret,
        "FAKE_GITHUB_CLIENT_SECRET",
        "demo-secret",
    );
    let token = pick(
        args.token,
        "FAKE_GITHUB_TOKEN",
        "gho_demo00000000000000000000000000000000",
    );
    let user = pick(args.user, "FAKE_GITHUB_USER", "octocat");

    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fake = fake_github::FakeGithub::serve(listener, None);
    fake.add_app(&client_id, &client_secret);
    fake.add_token(&client_id, &user, &token);

    println!("fake GitHub listening on {}", fake.url());
    println!("  client_id:     {client_id}");
    println!("  client_secret: {client_secret}");
    println!("  token:         {token} (user {user})");
    println!(
        "  try: curl -u '{client_id}:{client_secret}' -H 'Content-Type: application/json' \
         -d '{{\"access_token\":\"{token}\"}}' {}/applications/{client_id}/token",
        fake.url()
    );

    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("error: waiting for Ctrl-C: {e}");
    }
    println!(
        "received {} request(s); shutting down",
        fake.request_count()
    );
    fake.shutdown().await;
    ExitCode::SUCCESS
}
