//! The last stage of configuration: [`Parsed::resolve`](super::Parsed::resolve)
//! validates a subcommand and builds one typed [`Plan`] — each service with
//! exactly the values it runs with, nothing optional read back later — so
//! `main` only matches and calls.

use kvrouter_core::KvRouterConfig;
use kvrouter_core::busy::LoadThresholds;

use super::{
    CallArgs, EngineCmdArgs, FrontendArgs, GlobalRouterArgs, MockerArgs, RouterArgs, ServeArgs,
    SimArgs, SynthTraceArgs,
};
use crate::bench::BenchCommand;

/// What to run.
#[derive(Debug, Clone)]
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

impl Plan {
    /// The KV router configuration the plan runs with, for validation and the
    /// configuration dump.
    pub fn router_config(&self) -> Option<&KvRouterConfig> {
        match self {
            Plan::Serve(_, kv, _)
            | Plan::Frontend(_, kv, _)
            | Plan::Router(_, kv)
            | Plan::Sim(_, kv) => Some(kv),
            _ => None,
        }
    }

    /// The busy thresholds the plan runs with (the HTTP frontends).
    pub fn thresholds(&self) -> Option<&LoadThresholds> {
        match self {
            Plan::Serve(_, _, th) | Plan::Frontend(_, _, th) => Some(th),
            _ => None,
        }
    }
}
