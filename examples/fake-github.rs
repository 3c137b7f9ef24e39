//! Runs the test suite's fake GitHub OAuth Applications API as a standalone server, seeded with
//! one app, a token to check and one token for each legacy operation that uses its token up
//! (reset, revoke_token, revoke_grant), so every operation can be tried by hand without a
//! restart. Not a product: no TLS, no persistence.
//!
//!     cargo build --bin oauth-apps-gateway --example fake-github   # one build with the gateway
//!     target/debug/examples/fake-github --listen 127.0.0.1:9000
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
    /// An access token valid for that app, the one to check [env: FAKE_GITHUB_TOKEN]
    /// [default: gho_demo00000000000000000000000000000000]. The tokens for reset, revoke_token
    /// and revoke_grant are fixed and printed at start.
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
    fake.seed_demo(&client_id, &client_secret, &token, &user);

    println!("fake GitHub listening on {}", fake.url());
    println!("  client_id:     {client_id}");
    println!("  client_secret: {client_secret}");
    println!("  token:         {token} (user {user}; for check)");
    for (operation, op_token, op_user) in fake_github::DEMO_OPERATION_TOKENS {
        println!(
            "  {:<14} {op_token} (user {op_user}; for {operation})",
            "token:"
        );
    }
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
