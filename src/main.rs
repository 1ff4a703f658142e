//! The `mxpace` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// sysexits.h EX_CONFIG: the configuration is unusable.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "mxpace",
    version,
    about = "Adaptive delivery pacing sidecar for MTAs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (the embedded default config when no --config is given).
    Serve(ServeArgs),
    /// Classify SMTP replies (class, provider, blamed identity, rule).
    Classify(mxpace::classify::cli::Args),
    /// Validate a config file without starting: exit 0, or 64 with the problems.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Print the main.cf and master.cf lines that wire Postfix to mxpace.
    PostfixConfig(mxpace::cli::PostfixConfigArgs),
    /// Operator commands against a running daemon.
    Ctl(mxpace::cli::CtlArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Config file (TOML); the embedded default when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address, `127.0.0.1:PORT` (0 = any free port) or `unix:/path`; repeatable;
    /// replaces the configured listeners.
    #[arg(long)]
    listen: Vec<String>,
    /// Prometheus endpoint address (empty string disables it).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Admin interface address for `mxpace ctl` (loopback or unix:/path).
    #[arg(long)]
    admin_listen: Option<String>,
    /// State file of the embedded store (overrides `[state] path`).
    #[arg(long)]
    state: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// If the state file is unreadable, move it aside (FILE.bad-TIMESTAMP) and start fresh.
    #[arg(long)]
    quarantine_bad_state: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Classify(args) => mxpace::classify::cli::run(args),
        Command::CheckConfig { file } => mxpace::cli::check_config(&file),
        Command::PostfixConfig(args) => mxpace::cli::postfix_config(args),
        Command::Ctl(args) => mxpace::cli::ctl(args),
        Command::Serve(a) => {
            let opts = mxpace::daemon::ServeOptions {
                config: a.config,
                listen: a.listen,
                metrics_listen: a.metrics_listen,
                admin_listen: a.admin_listen,
                state: a.state,
                log_json: a.log_json,
                quarantine_bad_state: a.quarantine_bad_state,
            };
            // Config problems are reported before any logging setup can hide them.
            let config = match mxpace::daemon::load_config(&opts) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mxpace: {e:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            mxpace::telemetry::init(
                &config.log.level,
                opts.log_json || config.log.format == "json",
            );
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mxpace: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(mxpace::daemon::serve(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "mxpace stopped on an error");
                    eprintln!("mxpace: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}
