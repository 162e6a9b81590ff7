//! Command line: parse (flags and `DYN_*` variables), validate (every problem at
//! once), and describe where each setting came from.
//!
//! The pipeline is raw → validated: [`parse`] turns argv plus an injected
//! environment into a [`Parsed`] command with a source per argument;
//! [`Parsed::resolve`] checks every rule and returns the runtime settings
//! (`KvRouterConfig`, busy thresholds, …) or all the [`Problem`]s, each naming
//! its flags. Nothing is started before both succeed.

pub mod args;
pub mod env;
pub mod plan;
mod resolve;
pub mod runtime;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::bench::BenchCommand;
use args::{
    BusyArgs, EngineArgs, EngineSetArgs, HttpArgs, KvArgs, ModelArgs, QueueArgs, RoutingArgs,
    RuntimeArgs,
};
use env::{EnvKind, EnvSource};

/// kvrouter: KV-cache-aware request routing for distributed LLM inference.
///
/// Every flag can also be set by the environment variable shown in `--help`
/// (precedence: command line > environment > default).
#[derive(Debug, Parser)]
#[command(
    name = "kvrouter",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// OpenAI-compatible HTTP frontend with KV-aware routing.
    Frontend(FrontendArgs),
    /// Standalone KV router serving `generate` and `best_worker_id` for a worker endpoint.
    Router(RouterArgs),
    /// Global router: picks a prefill/decode pool by request size and latency targets.
    GlobalRouter(GlobalRouterArgs),
    /// Simulated inference engine(s) publishing real KV events.
    Mocker(MockerArgs),
    /// Everything in one process: frontend, KV router and mock workers.
    ///
    /// Routes by KV cache by default (`--router-mode kv`); `frontend` keeps the
    /// reference default, round-robin.
    #[command(mut_arg("router_mode", |a| a.default_value("kv")))]
    Serve(ServeArgs),
    /// Register an external engine (vLLM, SGLang, …) in discovery and republish its KV events.
    Engine(EngineCmdArgs),
    /// Offline simulator: replay a trace through N mock engines under each routing mode.
    Sim(SimArgs),
    /// Write a synthetic Mooncake-style trace with a chosen prefix-sharing shape.
    SynthTrace(SynthTraceArgs),
    /// Send one request to any endpoint and print the streamed responses as JSON lines.
    Call(CallArgs),
    /// Benchmarks (release builds; results are JSON lines on stdout).
    #[command(subcommand)]
    Bench(BenchCommand),
}

impl Command {
    /// The runtime flags of a service subcommand (`None` for the tools:
    /// `sim`, `synth-trace`, `bench`).
    pub fn runtime(&self) -> Option<&RuntimeArgs> {
        match self {
            Command::Frontend(a) => Some(&a.runtime),
            Command::Router(a) => Some(&a.runtime),
            Command::GlobalRouter(a) => Some(&a.runtime),
            Command::Mocker(a) => Some(&a.runtime),
            Command::Serve(a) => Some(&a.frontend.runtime),
            Command::Call(a) => Some(&a.runtime),
            Command::Engine(a) => Some(&a.runtime),
            Command::Sim(_) | Command::SynthTrace(_) | Command::Bench(_) => None,
        }
    }

    fn runtime_mut(&mut self) -> Option<&mut RuntimeArgs> {
        match self {
            Command::Frontend(a) => Some(&mut a.runtime),
            Command::Router(a) => Some(&mut a.runtime),
            Command::GlobalRouter(a) => Some(&mut a.runtime),
            Command::Mocker(a) => Some(&mut a.runtime),
            Command::Serve(a) => Some(&mut a.frontend.runtime),
            Command::Call(a) => Some(&mut a.runtime),
            Command::Engine(a) => Some(&mut a.runtime),
            Command::Sim(_) | Command::SynthTrace(_) | Command::Bench(_) => None,
        }
    }
}

/// `kvrouter call`: an operator's request to any endpoint over the configured planes.
///
/// Exits 0 when the stream ends normally, 1 on an error response (printed as
/// `{"error": …}` on stdout), 2 on invalid arguments, 3 when no instance of the
/// endpoint appears within `--wait`.
#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// The endpoint: `namespace.component.endpoint` (`dyn://` optional).
    #[arg(value_name = "ENDPOINT", index = 1)]
    pub endpoint: String,
    /// The request body as JSON, or `-` to read it from stdin [default: `{}`].
    #[arg(value_name = "JSON|-", index = 2)]
    pub body: Option<String>,
    /// Call this instance (default: the first one discovered).
    #[arg(long, value_name = "ID")]
    pub instance: Option<u64>,
    /// Seconds to wait for an instance to appear.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub wait: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

/// `kvrouter frontend`.
#[derive(Debug, Clone, Args)]
pub struct FrontendArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kv: KvArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub queue: QueueArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub busy: BusyArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engines: EngineSetArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

/// `kvrouter router`.
#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    /// Worker endpoint to route for: `namespace.component.endpoint` (`dyn://` optional).
    #[arg(long)]
    pub endpoint: String,
    /// KV block size of the workers, in tokens.
    #[arg(
        long = "block-size",
        id = "router_block_size",
        value_name = "TOKENS",
        visible_alias = "router-block-size",
        default_value_t = 128
    )]
    pub router_block_size: u32,
    /// On SIGTERM or SIGINT the router leaves discovery at once; requests in
    /// flight through it may then run this long before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = args::parse_secs)]
    pub graceful_shutdown_timeout: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kv: KvArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

/// `kvrouter global-router`.
#[derive(Debug, Clone, Args)]
pub struct GlobalRouterArgs {
    /// Pool configuration (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Model name to register.
    #[arg(long)]
    pub model_name: String,
    /// Component name to register under.
    #[arg(long, default_value = "global_router")]
    pub component_name: String,
    /// TTFT target (ms) for requests that carry none.
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub default_ttft_target: Option<f64>,
    /// ITL target (ms) for requests that carry none.
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub default_itl_target: Option<f64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

/// `kvrouter mocker`.
#[derive(Debug, Clone, Args)]
pub struct MockerArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
    /// Endpoint the engines serve.
    #[arg(long, default_value = "dynamo.backend.generate")]
    pub endpoint: String,
    /// Engines in this process.
    #[arg(long, default_value_t = 1)]
    pub num_workers: u32,
    /// Publish KV events to a JetStream stream (routers must use it too).
    #[arg(long, visible_alias = "router-durable-kv-events")]
    pub durable_kv_events: bool,
    /// The workers' part in disaggregated serving.
    #[arg(long, value_enum, default_value_t = args::DisaggregationMode::Agg)]
    pub disaggregation_mode: args::DisaggregationMode,
    /// On SIGTERM or SIGINT the workers leave discovery at once; requests in
    /// flight may then run this long before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = args::parse_secs)]
    pub graceful_shutdown_timeout: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub standin: args::StandInArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

/// `kvrouter engine`: a sidecar beside one external engine, for the distributed
/// deployment (etcd + NATS). It registers the engine under a lease, serves its
/// endpoint by forwarding tokenized requests to the engine's `/v1/completions`
/// (token-id prompts), and republishes its ZeroMQ KV events and load on the
/// event plane, so every frontend, standalone router and router replica follows it.
#[derive(Debug, Clone, Args)]
pub struct EngineCmdArgs {
    /// The engine's OpenAI server (`http://host:port`).
    #[arg(long = "url", id = "engine_url", value_name = "URL")]
    pub engine_url: String,
    /// Rank 0's ZeroMQ KV-event PUB (`tcp://host:port`; rank r at port + r) [default: asked of the engine].
    #[arg(long = "kv-events", id = "engine_kv_events", value_name = "ENDPOINT")]
    pub engine_kv_events: Option<String>,
    /// Rank 0's replay ROUTER (`tcp://host:port`).
    #[arg(long = "replay", id = "engine_replay", value_name = "ENDPOINT")]
    pub engine_replay: Option<String>,
    /// The engine's data-parallel ranks.
    #[arg(long = "dp-size", id = "engine_dp_size", default_value_t = 1)]
    pub engine_dp_size: u32,
    /// Tokens per KV block [default: the engine's (/metrics), else 16].
    #[arg(long = "block-size", id = "engine_block_size", value_name = "TOKENS")]
    pub engine_block_size: Option<u32>,
    /// Endpoint the engine serves: `namespace.component.endpoint`.
    #[arg(long, default_value = "dynamo.backend.generate")]
    pub endpoint: String,
    /// Model name [default: the engine's, from /v1/models].
    #[arg(long)]
    pub model_name: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub runtime: RuntimeArgs,
}

impl EngineCmdArgs {
    /// The engine, in `--engine` form (one parser and one set of checks).
    pub fn spec(&self) -> Result<kvrouter_engines::EngineSpec, String> {
        let mut s = self.engine_url.clone();
        if let Some(k) = &self.engine_kv_events {
            s.push_str(&format!(",kv-events={k}"));
        }
        if let Some(r) = &self.engine_replay {
            s.push_str(&format!(",replay={r}"));
        }
        s.push_str(&format!(",dp-size={}", self.engine_dp_size));
        s.parse()
    }
}

/// `kvrouter serve`: the frontend's flags, plus the mock workers'.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Mock workers to start.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub frontend: FrontendArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
}

/// `kvrouter sim`.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Mooncake-style JSONL trace (timestamp ms, input_length, output_length, hash_ids).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Mock engines.
    #[arg(
        long = "workers",
        id = "sim_workers",
        value_name = "N",
        default_value_t = 8
    )]
    pub sim_workers: u32,
    /// Routing modes to compare (comma-separated): round-robin, random, kv, kv-approx, kv-sticky, sglang-cache-aware, prefix-hash, llm-d, oracle.
    #[arg(long = "router-mode", id = "sim_router_mode", value_delimiter = ',', num_args = 1.., value_parser = parse_sim_mode, default_value = "round-robin,random,kv,kv-approx,kv-sticky,sglang-cache-aware,prefix-hash,llm-d,oracle")]
    pub sim_router_mode: Vec<kvrouter_mocker::sim::SimMode>,
    /// Arrival-rate multiplier (2 = requests arrive twice as fast as recorded).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub speedup: f64,
    /// Replay only the first N requests.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Write the per-mode results as a JSON array.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw TTFT CDFs and hit rates as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Seed of random choices (random mode, tie-breaks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub kv: KvArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub queue: QueueArgs,
}

/// `kvrouter synth-trace`: a seeded synthetic trace for `kvrouter sim --trace`.
#[derive(Debug, Clone, Args)]
pub struct SynthTraceArgs {
    /// Sharing structure: small-families, large-families or sessions.
    #[arg(long, value_parser = parse_shape)]
    pub shape: kvrouter_mocker::synth::Shape,
    /// Requests to write.
    #[arg(long, value_name = "N", default_value_t = 8000)]
    pub requests: usize,
    /// Mean arrivals per second.
    #[arg(
        long,
        value_name = "PER_S",
        default_value_t = 10.0,
        allow_negative_numbers = true
    )]
    pub rate: f64,
    /// Seed: a shape, a size, a rate and a seed name one trace.
    #[arg(long = "seed", id = "synth_seed", default_value_t = 0)]
    pub synth_seed: u64,
    /// Where to write the JSONL trace.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

fn parse_shape(s: &str) -> Result<kvrouter_mocker::synth::Shape, String> {
    s.parse()
}

fn parse_sim_mode(s: &str) -> Result<kvrouter_mocker::sim::SimMode, String> {
    s.parse()
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The command line.
    Cli,
    /// An environment variable.
    Env(&'static str),
    /// The built-in default.
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Cli => f.write_str("cli"),
            Source::Env(name) => write!(f, "env:{name}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A parsed command line, with the source of every argument of the subcommand.
#[derive(Debug)]
pub struct Parsed {
    /// The command.
    pub command: Command,
    /// Argument id → where its value came from.
    pub sources: BTreeMap<String, Source>,
}

/// A command line that could not be parsed; `code` is the exit code (2, or 0 for help).
#[derive(Debug)]
pub struct ParseError {
    /// Process exit code.
    pub code: u8,
    /// The text to print (clap's, formatted).
    pub message: String,
    /// Whether it goes to stdout (help, version) rather than stderr.
    pub to_stdout: bool,
}

/// The clap command, with each flag's environment variables appended to its help.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(&name, |mut sub| {
            let ids: Vec<String> = sub
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .collect();
            for id in ids {
                if let Some(var) = env::lookup(&id) {
                    sub = sub.mut_arg(&id, |a| {
                        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                        a.help(format!("{help} [env: {}]", var.names.join(", ")))
                    });
                }
            }
            sub
        });
    }
    cmd
}

/// Parses argv with environment variables from `env` (see [`env`]).
pub fn parse<I, T>(argv: I, env: &dyn EnvSource) -> Result<Parsed, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = command();
    // Find the subcommand and inject the environment right after it.
    let sub_at = argv
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| {
            let a = a.to_string_lossy();
            cmd.get_subcommands().any(|s| s.get_name() == a)
        })
        .map(|(i, _)| i);
    let (injected, from_env) = match sub_at {
        Some(i) => {
            let sub = cmd
                .find_subcommand(argv[i].to_string_lossy().as_ref())
                .expect("found above");
            env_flags(sub, env)?
        }
        None => (Vec::new(), Vec::new()),
    };
    let full: Vec<OsString> = match sub_at {
        Some(i) => argv[..=i]
            .iter()
            .cloned()
            .chain(injected)
            .chain(argv[i + 1..].iter().cloned())
            .collect(),
        None => argv.clone(),
    };
    let matches = cmd.try_get_matches_from(full).map_err(|e| {
        let mut message = e.render().to_string();
        if !from_env.is_empty() && e.use_stderr() {
            let vars: Vec<_> = from_env.iter().map(|(_, n)| *n).collect();
            message.push_str(&format!(
                "\n(values were also taken from: {})\n",
                vars.join(", ")
            ));
        }
        ParseError {
            code: if e.use_stderr() { 2 } else { 0 },
            message,
            to_stdout: !e.use_stderr(),
        }
    })?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| ParseError {
        code: 2,
        message: e.to_string(),
        to_stdout: false,
    })?;
    let mut sources = BTreeMap::new();
    if let (Some(i), Some((name, sub))) = (sub_at, matches.subcommand()) {
        let def = cmd_for_sources(name);
        sources = arg_sources(sub, &def, &argv[i + 1..], &from_env);
    }
    let mut command = cli.command;
    if let Some(r) = command.runtime_mut() {
        r.env = runtime::RuntimeEnv::from_source(env);
    }
    Ok(Parsed { command, sources })
}

/// Flags standing for the set environment variables of `sub`'s arguments.
type EnvFlags = (Vec<OsString>, Vec<(String, &'static str)>);

fn env_flags(sub: &clap::Command, env: &dyn EnvSource) -> Result<EnvFlags, ParseError> {
    let mut flags = Vec::new();
    let mut used = Vec::new();
    let mut bad = Vec::new();
    for arg in sub.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(var) = env::lookup(id) else { continue };
        let Some((name, value)) = var.names.iter().find_map(|n| env.get(n).map(|v| (*n, v))) else {
            continue;
        };
        let long = |id: &str| {
            sub.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_long())
                .map(|l| format!("--{l}"))
        };
        match var.kind {
            EnvKind::Value => {
                let Some(flag) = long(id) else { continue };
                flags.push(OsString::from(format!("{flag}={value}")));
                used.push((id.to_string(), name));
            }
            EnvKind::Bool { negative } => match env::truthy(&value) {
                Some(true) => {
                    flags.extend(long(id).map(OsString::from));
                    used.push((id.to_string(), name));
                }
                Some(false) => {
                    if let Some(neg) = negative.and_then(long) {
                        flags.push(OsString::from(neg));
                        used.push((negative.expect("checked").to_string(), name));
                    }
                }
                None => bad.push(format!(
                    "{name}={value:?} is not a boolean (use true/false, 1/0, yes/no, on/off)"
                )),
            },
        }
    }
    if !bad.is_empty() {
        return Err(ParseError {
            code: 2,
            message: format!("error: invalid environment:\n  {}\n", bad.join("\n  ")),
            to_stdout: false,
        });
    }
    Ok((flags, used))
}

fn cmd_for_sources(name: &str) -> clap::Command {
    command()
        .find_subcommand(name)
        .cloned()
        .expect("matched subcommand exists")
}

/// Source of every argument: CLI when the user's own tokens name it, else the
/// environment variable injected for it, else the default.
fn arg_sources(
    sub: &ArgMatches,
    def: &clap::Command,
    user_tokens: &[OsString],
    from_env: &[(String, &'static str)],
) -> BTreeMap<String, Source> {
    let mut out = BTreeMap::new();
    for id in sub.ids() {
        let id = id.as_str();
        let src = match sub.value_source(id) {
            Some(ValueSource::CommandLine) => {
                let names: Vec<String> = def
                    .get_arguments()
                    .find(|a| a.get_id() == id)
                    .map(|a| {
                        a.get_long_and_visible_aliases()
                            .unwrap_or_default()
                            .into_iter()
                            .map(|l| format!("--{l}"))
                            .collect()
                    })
                    .unwrap_or_default();
                let on_cli = user_tokens.iter().any(|t| {
                    let t = t.to_string_lossy();
                    names.iter().any(|n| {
                        *t == **n
                            || t.strip_prefix(n.as_str())
                                .is_some_and(|r| r.starts_with('='))
                    })
                });
                match from_env.iter().find(|(a, _)| a == id) {
                    Some((_, env_name)) if !on_cli => Source::Env(env_name),
                    _ => Source::Cli,
                }
            }
            _ => Source::Default,
        };
        out.insert(id.to_string(), src);
    }
    out
}

#[cfg(test)]
mod tests;
