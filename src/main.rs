//! libvirt-volume-provisioner: fills libvirt/KVM VM disks from cached base
//! images over an HTTPS API. `main` parses the command line, starts
//! logging, checks the configuration and runs the daemon; it is the only
//! place that prints a fatal error and picks the exit status.

mod api;
mod auth;
mod cache;
mod check;
mod cli;
mod client;
mod cmd;
mod config;
mod daemon;
mod error;
mod fetch;
mod frontdoor;
mod http;
mod inspect;
mod jobs;
mod libvirt;
mod logging;
mod metrics;
#[cfg(test)]
mod proptests;
mod qcow2;
mod tokens;
mod volume;
mod write;

use std::path::Path;
use std::process::ExitCode;

use cli::{Cli, Command, TokenCommand};

/// Exit statuses, listed in the man page under EXIT STATUS.
const EXIT_CONFIG: u8 = 2;
const EXIT_RUNTIME: u8 = 3;

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    match cli.command {
        Command::Serve(serve) => {
            let level = match config::log_level(&serve.log_level) {
                Ok(level) => level,
                Err(e) => {
                    eprintln!("libvirt-volume-provisioner: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            logging::init(level);
            let config = match config::Config::from_cli(&serve) {
                Ok(c) => c,
                Err(problems) => {
                    for p in &problems {
                        eprintln!("libvirt-volume-provisioner: {p}");
                    }
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match daemon::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("libvirt-volume-provisioner: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Check(check) => check::run(&check.serve_args),
        Command::Client(client) => client::run(client),
        Command::Token(token) => match token.command {
            TokenCommand::New(new) => match tokens::mint(Path::new(&new.tokens), &new.name) {
                Ok(token) => {
                    println!("{token}");
                    eprintln!(
                        "token {:?} added to {}; this is the only time it is shown",
                        new.name, new.tokens
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("libvirt-volume-provisioner: {}", error::chain(&e));
                    ExitCode::from(EXIT_CONFIG)
                }
            },
        },
    }
}
