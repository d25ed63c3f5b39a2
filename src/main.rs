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
mod policy;
#[cfg(test)]
mod proptests;
mod qcow2;
mod s3;
mod tokens;
mod volume;
mod write;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use argh::FromArgs;

use cli::{Cli, Command, TokenCommand};

/// Exit statuses, listed in the man page under EXIT STATUS. A command line
/// that cannot be parsed is a usage error, like bad configuration, so it
/// shares status 2 (rather than argh's 1, which `check` and `client` use
/// for "a problem was found" and "the job failed").
const EXIT_CONFIG: u8 = 2;
const EXIT_RUNTIME: u8 = 3;

/// Parses the command line; on `--help` prints it and exits 0, on an error
/// prints what argh found (with a hint where a common slip caused it) and
/// exits 2.
fn parse_args() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (program, rest) =
        strs.split_first().map_or(("libvirt-volume-provisioner", &[][..]), |(p, r)| (*p, r));
    let program = Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program);
    match Cli::from_args(&[program], rest) {
        Ok(cli) => Ok(cli),
        Err(early) if early.status.is_ok() => {
            // `--help | head` closes the pipe early; that is no failure.
            let _ = writeln!(std::io::stdout(), "{}", early.output);
            Err(ExitCode::SUCCESS)
        }
        Err(early) => {
            eprintln!("{}", early.output.trim_end());
            if rest.first() == Some(&"check") && !rest.contains(&"--") {
                eprintln!(
                    "hint: put `--` before the serve flags: {program} check -- --backend dir ..."
                );
            }
            for hint in cli::usage_hints(program, rest, &early.output) {
                eprintln!("{hint}");
            }
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.version {
        println!("libvirt-volume-provisioner {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        eprintln!(
            "libvirt-volume-provisioner: a command is needed: serve, token, check or client \
             (see --help)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    match command {
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
