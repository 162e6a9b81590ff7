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

use cli::Parsed;
use cli::plan::Plan;

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
    let result = match resolved.plan {
        Plan::Bench(cmd) => bench::run(cmd),
        Plan::Sim(args, kv) => sim::run(&args, kv),
        Plan::SynthTrace(args) => sim::synth_trace(&args),
        Plan::Serve(args, kv, th) => services::serve(&args, kv, th).map(|()| ExitCode::SUCCESS),
        Plan::Frontend(args, kv, th) => {
            services::frontend(&args, kv, th).map(|()| ExitCode::SUCCESS)
        }
        Plan::Mocker(args) => services::mocker(&args).map(|()| ExitCode::SUCCESS),
        Plan::Router(args, kv) => services::router(&args, kv).map(|()| ExitCode::SUCCESS),
        Plan::Call(args) => services::call(&args),
        Plan::Engine(args) => services::engine(&args).map(|()| ExitCode::SUCCESS),
        Plan::GlobalRouter(args) => services::global_router(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvrouter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
