//! The `kvrouter` binary: parse, validate, run — one subcommand per service.

mod bench;
mod bench_chat;
mod bench_hop;
mod bench_router;
mod cli;
mod loadgen;
mod services;
mod sim;

use std::process::ExitCode;

use cli::{Command, Parsed};

/// Exit code for invalid flags, variables or combinations.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let parsed = match cli::parse(std::env::args_os(), &cli::env::ProcessEnv) {
        Ok(p) => p,
        Err(e) => {
            // `--help | head` closes the pipe early: that is not an error.
            use std::io::Write;
            let _ = if e.to_stdout {
                std::io::stdout().write_all(e.message.as_bytes())
            } else {
                std::io::stderr().write_all(e.message.as_bytes())
            };
            return ExitCode::from(e.code);
        }
    };
    run(parsed)
}

fn run(parsed: Parsed) -> ExitCode {
    let resolved = match parsed.resolve() {
        Ok(r) => r,
        Err(problems) => {
            eprintln!("kvrouter: invalid configuration:");
            for p in &problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = parsed.command.runtime();
    let check_only = runtime.is_some_and(|r| r.check_config);
    let dump_to = runtime.and_then(|r| r.dump_config_to.clone());
    if let Some(path) = dump_to {
        let doc = parsed.dump(&resolved);
        let text = serde_json::to_string_pretty(&doc).expect("JSON values serialize");
        if let Err(e) = std::fs::write(&path, text + "\n") {
            eprintln!("kvrouter: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!(
            "kvrouter: resolved configuration written to {}",
            path.display()
        );
    }
    if check_only {
        eprintln!(
            "kvrouter {}: the configuration is valid",
            resolved.subcommand
        );
        return ExitCode::SUCCESS;
    }
    let result = match parsed.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => {
            let config = resolved
                .kv_router_config
                .clone()
                .expect("sim resolves a router config");
            sim::run(&args, config)
        }
        Command::SynthTrace(args) => sim::synth_trace(&args),
        Command::Serve(args) => services::serve(
            &args,
            resolved
                .kv_router_config
                .clone()
                .expect("serve resolves a router config"),
            resolved.thresholds.expect("serve resolves thresholds"),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Frontend(args) => services::frontend(
            &args,
            resolved
                .kv_router_config
                .clone()
                .expect("frontend resolves a router config"),
            resolved.thresholds.expect("frontend resolves thresholds"),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Mocker(args) => services::mocker(&args).map(|()| ExitCode::SUCCESS),
        Command::Router(args) => services::router(
            &args,
            resolved
                .kv_router_config
                .clone()
                .expect("router resolves a router config"),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Call(args) => services::call(&args),
        Command::Engine(args) => services::engine(&args).map(|()| ExitCode::SUCCESS),
        Command::GlobalRouter(args) => services::global_router(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvrouter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
