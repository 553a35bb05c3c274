//! `wslb` binary: flags in, exit code out. Everything else lives in the library.

use std::process::ExitCode;

use wslb::config::{parse_args, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "agent") {
        return wslb::agent_cli::main(&args[1..]);
    }
    match parse_args(&args) {
        Ok(Command::Help(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("wslb {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(mut cfg)) => {
            if cfg.token.is_none() {
                cfg.token = std::env::var("WSLB_TOKEN").ok().filter(|t| !t.is_empty());
            }
            if cfg.sticky_secret.is_none() {
                cfg.sticky_secret = std::env::var("WSLB_STICKY_SECRET")
                    .ok()
                    .filter(|t| !t.is_empty());
            }
            if cfg.dispatch_secret.is_none() {
                cfg.dispatch_secret = std::env::var("WSLB_DISPATCH_SECRET")
                    .ok()
                    .filter(|t| t.len() >= 16);
            }
            if cfg.check {
                return check(&cfg);
            }
            run(*cfg)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// `--check`: the same validation `run` does before listening, and nothing else.
fn check(cfg: &wslb::Config) -> ExitCode {
    match wslb::Server::check(cfg) {
        Ok(()) => {
            println!("wslb: configuration OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wslb: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cfg: wslb::Config) -> ExitCode {
    match wslb::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (wslb::Error::Tls(_) | wslb::Error::Config(_))) => {
            eprintln!("wslb: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("wslb: {e}");
            ExitCode::FAILURE
        }
    }
}
