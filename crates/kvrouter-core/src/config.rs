//! `KvRouterConfig`: every knob of the KV router, its defaults and its validation.
//!
//! Field names and defaults are the reference's classic `KvRouterConfig`, so a
//! configuration dumped by kvrouter reads like Dynamo's. [`KvRouterConfig::validate`]
//! reports every problem at once (never the first only), each naming the field;
//! the CLI maps fields back to flag names. [`RouterConfigOverride`] carries the
//! per-request overrides a request may send.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::index::PruneConfig;

/// Configuration of the KV router (classic reference fields and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvRouterConfig {
    /// Weight of prefill blocks in the cost (≥ 0). 0 disables the index: pure load balancing.
    pub overlap_score_weight: f64,
    /// Softmax temperature over costs (≥ 0); 0 picks a lowest-cost worker.
    pub router_temperature: f64,
    /// Follow the workers' KV events; false uses the approximate (TTL) index.
    pub use_kv_events: bool,
    /// Consume KV events from a durable JetStream stream (needs `use_kv_events`).
    pub durable_kv_events: bool,
    /// Share active sequences with the other router replicas.
    pub router_replica_sync: bool,
    /// Track decode load (active blocks) per worker.
    pub router_track_active_blocks: bool,
    /// Count generated output blocks too (needs `router_track_active_blocks`).
    pub router_track_output_blocks: bool,
    /// Assume identical prefixes share KV blocks on a worker when counting load.
    pub router_assume_kv_reuse: bool,
    /// Stream messages that trigger an index snapshot (durable mode; ≥ 1).
    pub router_snapshot_threshold: Option<u32>,
    /// Purge the durable stream and snapshot at start-up.
    pub router_reset_states: bool,
    /// Approximate mode: seconds a routed block is assumed cached (≥ 0).
    pub router_ttl_secs: f64,
    /// Approximate mode: blocks held before pruning (≥ 1).
    pub router_max_tree_size: usize,
    /// Approximate mode: fraction of the cap to prune down to (in [0, 1]).
    pub router_prune_target_ratio: f64,
    /// Defer routing while every worker is busier than this × max_num_batched_tokens (≥ 0).
    pub router_queue_threshold: Option<f64>,
    /// Release order of the router queue.
    pub router_queue_policy: crate::queue::QueuePolicy,
    /// Threads applying KV events (≥ 1; > 1 needs `use_kv_events`).
    pub router_event_threads: u32,
    /// `kv-sticky`: how far above the mean cost a rank may run and still keep
    /// its prefix families (≥ 0; a fraction).
    pub router_sticky_spill: f64,
    /// `kv-sticky`: extra bound for a rank caching the whole prompt (≥ 0).
    pub router_sticky_stake: f64,
}

impl Default for KvRouterConfig {
    fn default() -> Self {
        Self {
            overlap_score_weight: 1.0,
            router_temperature: 0.0,
            use_kv_events: true,
            durable_kv_events: false,
            router_replica_sync: false,
            router_track_active_blocks: true,
            router_track_output_blocks: false,
            router_assume_kv_reuse: true,
            router_snapshot_threshold: Some(1_000_000),
            router_reset_states: false,
            router_ttl_secs: 120.0,
            router_max_tree_size: 1 << 20,
            router_prune_target_ratio: 0.8,
            router_queue_threshold: None,
            router_queue_policy: crate::queue::QueuePolicy::Fcfs,
            router_event_threads: 1,
            router_sticky_spill: crate::sticky::DEFAULT_SPILL,
            router_sticky_stake: crate::sticky::DEFAULT_STAKE,
        }
    }
}

/// One configuration problem: the fields involved and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `KvRouterConfig` field names involved.
    pub fields: Vec<&'static str>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.fields.join(" + "), self.message)
    }
}

impl KvRouterConfig {
    /// Every problem with this configuration (empty when valid).
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = |fields: &[&'static str], message: String| {
            errs.push(ConfigError {
                fields: fields.to_vec(),
                message,
            })
        };
        let non_negative = [
            ("overlap_score_weight", self.overlap_score_weight),
            ("router_temperature", self.router_temperature),
            ("router_ttl_secs", self.router_ttl_secs),
            ("router_sticky_spill", self.router_sticky_spill),
            ("router_sticky_stake", self.router_sticky_stake),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                err(&[name], format!("must be a finite number ≥ 0, got {v}"));
            }
        }
        if let Some(t) = self.router_queue_threshold
            && !(t.is_finite() && t >= 0.0)
        {
            err(
                &["router_queue_threshold"],
                format!("must be a finite number ≥ 0, got {t}"),
            );
        }
        if !(0.0..=1.0).contains(&self.router_prune_target_ratio) {
            err(
                &["router_prune_target_ratio"],
                format!("must be in [0, 1], got {}", self.router_prune_target_ratio),
            );
        }
        if self.router_max_tree_size < 1 {
            err(&["router_max_tree_size"], "must be at least 1".into());
        }
        if self.router_event_threads < 1 {
            err(&["router_event_threads"], "must be at least 1".into());
        }
        if self.router_snapshot_threshold == Some(0) {
            err(&["router_snapshot_threshold"], "must be at least 1".into());
        }
        if self.durable_kv_events && !self.use_kv_events {
            err(
                &["durable_kv_events", "use_kv_events"],
                "durable KV events need KV events enabled".into(),
            );
        }
        if self.router_event_threads > 1 && !self.use_kv_events {
            err(
                &["router_event_threads", "use_kv_events"],
                "more than one event thread needs KV events enabled (approximate mode is single-threaded)"
                    .into(),
            );
        }
        if self.router_track_output_blocks && !self.router_track_active_blocks {
            err(
                &["router_track_output_blocks", "router_track_active_blocks"],
                "output-block tracking needs active-block tracking".into(),
            );
        }
        errs
    }

    /// Whether the router subscribes to KV events at all.
    pub fn should_subscribe_to_kv_events(&self) -> bool {
        self.use_kv_events && self.overlap_score_weight > 0.0
    }

    /// The approximate index's settings.
    pub fn prune_config(&self) -> PruneConfig {
        PruneConfig {
            ttl: Duration::from_secs_f64(self.router_ttl_secs.max(0.0)),
            max_tree_size: self.router_max_tree_size,
            prune_target_ratio: self.router_prune_target_ratio,
        }
    }
}

/// Per-request overrides of the router configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfigOverride {
    /// Overrides `overlap_score_weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_score_weight: Option<f64>,
    /// Overrides `router_temperature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_temperature: Option<f64>,
    /// Overrides `router_assume_kv_reuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_kv_reuse: Option<bool>,
}

impl RouterConfigOverride {
    /// Problems with the override's values.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        for (name, v) in [
            ("overlap_score_weight", self.overlap_score_weight),
            ("router_temperature", self.router_temperature),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                errs.push(ConfigError {
                    fields: vec![name],
                    message: format!("must be a finite number ≥ 0, got {v}"),
                });
            }
        }
        errs
    }

    /// The weight to use for this request.
    pub fn weight(&self, config: &KvRouterConfig) -> f64 {
        self.overlap_score_weight
            .unwrap_or(config.overlap_score_weight)
    }

    /// The temperature to use for this request.
    pub fn temperature(&self, config: &KvRouterConfig) -> f64 {
        self.router_temperature.unwrap_or(config.router_temperature)
    }

    /// Whether this request assumes KV reuse.
    pub fn assume_kv_reuse(&self, config: &KvRouterConfig) -> bool {
        self.assume_kv_reuse
            .unwrap_or(config.router_assume_kv_reuse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_ones() {
        let c = KvRouterConfig::default();
        assert_eq!(c.overlap_score_weight, 1.0);
        assert_eq!(c.router_temperature, 0.0);
        assert!(c.use_kv_events && !c.durable_kv_events && !c.router_replica_sync);
        assert!(c.router_track_active_blocks && !c.router_track_output_blocks);
        assert!(c.router_assume_kv_reuse && !c.router_reset_states);
        assert_eq!(c.router_snapshot_threshold, Some(1_000_000));
        assert_eq!(c.router_ttl_secs, 120.0);
        assert_eq!(c.router_max_tree_size, 1_048_576);
        assert_eq!(c.router_prune_target_ratio, 0.8);
        assert_eq!(c.router_queue_threshold, None);
        assert_eq!(c.router_event_threads, 1);
        assert!(c.validate().is_empty());
        assert!(c.should_subscribe_to_kv_events());
    }

    #[test]
    fn every_rule_is_reported_at_once() {
        let c = KvRouterConfig {
            overlap_score_weight: -1.0,
            router_temperature: f64::NAN,
            use_kv_events: false,
            durable_kv_events: true,
            router_track_active_blocks: false,
            router_track_output_blocks: true,
            router_snapshot_threshold: Some(0),
            router_ttl_secs: -3.0,
            router_max_tree_size: 0,
            router_prune_target_ratio: 1.5,
            router_queue_threshold: Some(-0.5),
            router_event_threads: 4,
            ..KvRouterConfig::default()
        };
        let errs = c.validate();
        let fields: Vec<_> = errs.iter().map(|e| e.fields[0]).collect();
        for f in [
            "overlap_score_weight",
            "router_temperature",
            "router_ttl_secs",
            "router_queue_threshold",
            "router_prune_target_ratio",
            "router_max_tree_size",
            "router_snapshot_threshold",
            "durable_kv_events",
            "router_event_threads",
            "router_track_output_blocks",
        ] {
            assert!(fields.contains(&f), "{f} not reported in {errs:?}");
        }
        assert_eq!(errs.len(), 10);
        assert_eq!(
            KvRouterConfig {
                router_event_threads: 0,
                ..KvRouterConfig::default()
            }
            .validate()[0]
                .fields,
            vec!["router_event_threads"]
        );
    }

    #[test]
    fn weight_zero_means_no_events() {
        let c = KvRouterConfig {
            overlap_score_weight: 0.0,
            ..KvRouterConfig::default()
        };
        assert!(!c.should_subscribe_to_kv_events());
    }

    #[test]
    fn overrides_take_precedence_and_are_validated() {
        let c = KvRouterConfig::default();
        let o: RouterConfigOverride =
            serde_json::from_str(r#"{"overlap_score_weight":0,"router_temperature":0.5}"#).unwrap();
        assert_eq!(o.weight(&c), 0.0);
        assert_eq!(o.temperature(&c), 0.5);
        assert!(o.assume_kv_reuse(&c));
        assert!(o.validate().is_empty());
        let bad = RouterConfigOverride {
            router_temperature: Some(-1.0),
            ..Default::default()
        };
        assert_eq!(bad.validate().len(), 1);
        assert!(serde_json::from_str::<RouterConfigOverride>(r#"{"typo":1}"#).is_err());
    }
}
