//! The last stage of configuration: a parsed subcommand and its resolution
//! become one typed [`Plan`] — each service with exactly the values it runs
//! with — so `main` only matches and calls.

use kvrouter_core::KvRouterConfig;
use kvrouter_core::busy::LoadThresholds;

use super::resolve::Resolved;
use super::{
    CallArgs, Command, EngineCmdArgs, FrontendArgs, GlobalRouterArgs, MockerArgs, Parsed,
    RouterArgs, ServeArgs, SimArgs, SynthTraceArgs,
};
use crate::bench::BenchCommand;

/// What to run.
#[derive(Debug)]
pub enum Plan {
    /// `serve`: everything in one process.
    Serve(ServeArgs, KvRouterConfig, LoadThresholds),
    /// `frontend`.
    Frontend(FrontendArgs, KvRouterConfig, LoadThresholds),
    /// `router`.
    Router(RouterArgs, KvRouterConfig),
    /// `sim`.
    Sim(SimArgs, KvRouterConfig),
    /// `mocker`.
    Mocker(MockerArgs),
    /// `engine`.
    Engine(EngineCmdArgs),
    /// `global-router`.
    GlobalRouter(GlobalRouterArgs),
    /// `call`.
    Call(CallArgs),
    /// `synth-trace`.
    SynthTrace(SynthTraceArgs),
    /// `bench`.
    Bench(BenchCommand),
}

impl Parsed {
    /// Pairs the subcommand with what [`Parsed::resolve`] computed for it.
    pub fn into_plan(self, r: Resolved) -> Plan {
        let (kv, th) = r.into_router_settings();
        match (self.command, kv, th) {
            (Command::Serve(a), Some(kv), Some(th)) => Plan::Serve(a, kv, th),
            (Command::Frontend(a), Some(kv), Some(th)) => Plan::Frontend(a, kv, th),
            (Command::Router(a), Some(kv), None) => Plan::Router(a, kv),
            (Command::Sim(a), Some(kv), None) => Plan::Sim(a, kv),
            (Command::Mocker(a), None, None) => Plan::Mocker(a),
            (Command::Engine(a), None, None) => Plan::Engine(a),
            (Command::GlobalRouter(a), None, None) => Plan::GlobalRouter(a),
            (Command::Call(a), None, None) => Plan::Call(a),
            (Command::SynthTrace(a), None, None) => Plan::SynthTrace(a),
            (Command::Bench(a), None, None) => Plan::Bench(a),
            (c, kv, th) => unreachable!(
                "resolve() gives a router configuration to serve, frontend, router and sim, \
                 and thresholds to serve and frontend only (got {c:?} with {} and {})",
                if kv.is_some() { "one" } else { "none" },
                if th.is_some() {
                    "thresholds"
                } else {
                    "no thresholds"
                },
            ),
        }
    }
}
