//! Command-line interface of the binary (clap definitions only).

use std::path::PathBuf;

use clap::Parser;

/// A reverse proxy that rewrites GitHub's deprecated token-in-path OAuth Applications API calls
/// into the token-in-body form and forwards everything to one upstream.
#[derive(Debug, Parser)]
#[command(name = "oauth-apps-gateway", version, about)]
pub struct Cli {
    /// Path of the TOML configuration file.
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        default_value = "./config.toml"
    )]
    pub config: PathBuf,

    /// Validate the configuration (and the files it names), print the result, and exit:
    /// 0 when valid, non-zero otherwise.
    #[arg(long)]
    pub check_config: bool,
}
