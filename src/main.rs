//! The `mxpace` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
    /// Classify SMTP replies (class, provider, blamed identity, rule).
    Classify(mxpace::classify::cli::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Classify(args) => mxpace::classify::cli::run(args),
    }
}
