//! The `kvrouter` binary: parse, validate, run. Every subcommand lives in its own module.

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kvrouter: KV-cache-aware request routing for distributed LLM inference.
#[derive(Debug, Parser)]
#[command(name = "kvrouter", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks (release builds; results are JSON lines on stdout).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvrouter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
