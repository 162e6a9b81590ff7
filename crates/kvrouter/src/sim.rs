//! `kvrouter sim`: load a trace, replay it once per routing mode, report; and
//! `kvrouter synth-trace`, which writes the synthetic traces it replays.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kvrouter_core::KvRouterConfig;
use kvrouter_mocker::report::{self, ModeReport};
use kvrouter_mocker::sim::{self, SimConfig};
use kvrouter_mocker::trace;

use crate::cli::{SimArgs, SynthTraceArgs};

/// Runs the comparison and prints the table (and JSON / SVG when asked).
pub fn run(args: &SimArgs, router: KvRouterConfig) -> anyhow::Result<ExitCode> {
    let e = &args.engine;
    let engine = e.engine_config();
    let cfg = SimConfig {
        workers: args.sim_workers as usize,
        data_parallel_size: e.data_parallel_size as usize,
        engine,
        router,
        arrival_speedup: args.speedup,
        seed: args.seed,
    };
    let requests = trace::load(&args.trace, args.limit).context("loading the trace")?;
    anyhow::ensure!(!requests.is_empty(), "the trace has no requests");
    let prepared = sim::prepare(&requests, engine.block_size, args.speedup);
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new((prepared.len() * args.sim_router_mode.len()) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "sim [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({msg})",
            )
            .expect("static template"),
        );
        bar
    };
    let mut reports: Vec<ModeReport> = Vec::new();
    for mode in &args.sim_router_mode {
        bar.set_message(mode.to_string());
        reports.push(sim::run(*mode, &cfg, &prepared, &bar));
    }
    bar.finish_and_clear();
    print!("{}", report::table(&reports));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&reports)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "{} requests, {} workers × {} blocks, arrivals ×{}",
            prepared.len(),
            cfg.workers,
            engine.num_gpu_blocks,
            args.speedup
        );
        let svg = kvrouter_mocker::plot::svg(&reports, &title)
            .map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the synthetic trace `args` names, one JSON object per line.
pub fn synth_trace(args: &SynthTraceArgs) -> anyhow::Result<ExitCode> {
    let trace =
        kvrouter_mocker::synth::generate(args.shape, args.requests, args.rate, args.synth_seed);
    let mut text = String::new();
    for r in &trace {
        text += &serde_json::to_string(r)?;
        text.push('\n');
    }
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    let span = trace.last().map_or(0, |r| r.timestamp) as f64 / 1000.0;
    eprintln!(
        "kvrouter synth-trace: {} {} requests over {span:.0} s written to {}",
        trace.len(),
        args.shape,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
