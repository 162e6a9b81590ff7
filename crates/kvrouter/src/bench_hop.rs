//! `kvrouter bench kv-hop`: how long an engine's KV event takes to reach a
//! router, subscribed to the engine's ZeroMQ directly (`serve --engine`)
//! against republished on NATS by a `kvrouter engine` sidecar.
//!
//! One vLLM-style publisher sends `--events` single-block stores at `--rate`
//! per second. Two sources follow it at once: one hands events straight to a
//! sink; the other goes through the sidecar's republisher to a real NATS
//! server and back through a subscriber that decodes the `RouterEvent`. Each
//! event's engine hash is its index, so both sides time the same events from
//! the same send instants. One JSON line: latency percentiles per path.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kvrouter_core::protocols::KvCacheEventData;
use kvrouter_core::{RouterEvent, WorkerKey};
use kvrouter_engines::metrics::EngineMetrics;
use kvrouter_engines::publisher::{EventFormat, ZmqKvPublisher};
use kvrouter_engines::source::{KvEventSink, KvEventSource, ZmqSourceConfig};
use kvrouter_engines::wire::{BlockStored, EngineEvent};
use kvrouter_router::sidecar::PlaneSink;
use kvrouter_runtime::events::{EventPlane, NatsEvents};
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// `kvrouter bench kv-hop` flags.
#[derive(Debug, Clone, Args)]
pub struct HopArgs {
    /// Events to time.
    #[arg(long, default_value_t = 5000)]
    pub events: usize,
    /// Events per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// NATS server to republish through [default: start a nats-server on a free loopback port].
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
}

/// First event index timed; lower ones warm the subscriptions up.
const WARM: u64 = 1 << 40;

/// Send instants by index, and the latencies seen by one path.
struct Timer {
    sent: Arc<Mutex<Vec<Option<Instant>>>>,
    hist: Mutex<Histogram<u64>>,
    seen: std::sync::atomic::AtomicUsize,
}

impl Timer {
    fn record(&self, ev: &RouterEvent) {
        let KvCacheEventData::Stored(s) = &ev.event.data else {
            return;
        };
        let Some(b) = s.blocks.first() else { return };
        // Warm-up events (below WARM) only open the path.
        let Some(i) = b.block_hash.0.checked_sub(WARM) else {
            return;
        };
        if let Some(Some(t)) = self.sent.lock().get(i as usize) {
            let _ = self.hist.lock().record(t.elapsed().as_micros() as u64);
            self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl KvEventSink for Timer {
    fn apply_event(&self, ev: RouterEvent) {
        self.record(&ev);
    }
    fn reset_rank(&self, _: WorkerKey) {}
}

fn store(hash: u64) -> EngineEvent {
    EngineEvent::Stored(BlockStored {
        block_hashes: vec![hash],
        token_ids: (0..16).map(|t| (hash as u32).wrapping_add(t)).collect(),
        block_size: 16,
        ..Default::default()
    })
}

fn timer(sent: &Arc<Mutex<Vec<Option<Instant>>>>) -> Arc<Timer> {
    Arc::new(Timer {
        sent: sent.clone(),
        hist: Mutex::new(Histogram::new(3).expect("valid histogram")),
        seen: Default::default(),
    })
}

fn source(addr: &str, sink: Arc<dyn KvEventSink>, cancel: &CancellationToken) -> KvEventSource {
    KvEventSource::spawn_zmq(
        ZmqSourceConfig {
            key: WorkerKey::new(1, 0),
            endpoint: addr.to_string(),
            replay_endpoint: None,
            topic: String::new(),
            block_size: 16,
            replay_timeout: Duration::from_secs(1),
        },
        sink,
        EngineMetrics::unregistered(),
        cancel.child_token(),
    )
}

/// Runs the comparison and prints one JSON line.
pub fn run(args: HopArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let _own_nats;
        let url = match args.nats {
            Some(u) => u,
            None => {
                let s = kvrouter_runtime::testing::NatsServer::start()
                    .context("starting nats-server (install it, or pass --nats)")?;
                let u = s.url();
                _own_nats = s;
                u
            }
        };
        let nats: Arc<dyn EventPlane> = Arc::new(NatsEvents::connect(&url).await?);
        let mut publisher =
            ZmqKvPublisher::bind("tcp://127.0.0.1:0", None, 0, EventFormat::Map).await?;
        let sent = Arc::new(Mutex::new(vec![None; args.events]));
        let cancel = CancellationToken::new();
        let direct = timer(&sent);
        let via = timer(&sent);
        let subject = "bench.kv-hop.kv-events".to_string();
        let mut sub = nats.subscribe(&subject).await?;
        let v = via.clone();
        let reader = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(ev) = serde_json::from_slice::<RouterEvent>(&msg) {
                    v.record(&ev);
                }
            }
        });
        let (plane_sink, _task) = PlaneSink::spawn(nats.clone(), subject, cancel.clone());
        let _a = source(publisher.address(), direct.clone(), &cancel);
        let _b = source(publisher.address(), plane_sink, &cancel);
        // Warm up until both paths deliver (ZeroMQ subscriptions take a moment).
        let warm_until = Instant::now() + Duration::from_secs(2);
        let mut k = 0u64;
        while Instant::now() < warm_until {
            publisher.publish(&[store(k)]).await?;
            k += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let every = Duration::from_secs_f64(1.0 / args.rate);
        let begun = Instant::now();
        for i in 0..args.events {
            tokio::time::sleep_until(tokio::time::Instant::from_std(begun + every * i as u32)).await;
            sent.lock()[i] = Some(Instant::now());
            publisher.publish(&[store(WARM + i as u64)]).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let done = |t: &Timer| t.seen.load(std::sync::atomic::Ordering::Relaxed) >= args.events;
        while !(done(&direct) && done(&via)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        reader.abort();
        let q = |t: &Timer| {
            let h = t.hist.lock();
            json!({
                "received": h.len(), "p50_us": h.value_at_quantile(0.5),
                "p99_us": h.value_at_quantile(0.99), "max_us": h.max(),
            })
        };
        println!(
            "{}",
            json!({"events": args.events, "rate": args.rate, "direct_zmq": q(&direct), "sidecar_nats": q(&via)})
        );
        Ok(ExitCode::SUCCESS)
    })
}
