//! `check`: validates a `serve` configuration and this host without
//! starting the daemon, and prints every problem, one line each.

use std::process::ExitCode;

// TODO: filled in by the check subcommand work.
pub fn run(_serve_args: &[String]) -> ExitCode {
    ExitCode::from(2)
}
