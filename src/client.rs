//! `client`: speaks the daemon's API with the same certificates or token,
//! so an operator needs no curl recipe.

use std::process::ExitCode;

use crate::cli::Client;

// TODO: filled in by the client subcommand work.
pub fn run(_client: Client) -> ExitCode {
    ExitCode::from(2)
}
