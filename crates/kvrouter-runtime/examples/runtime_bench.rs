//! Runtime benchmarks (release builds; one JSON line per run on stdout).
//!
//! `cargo run --release -p kvrouter-runtime --example runtime_bench -- request --plane tcp --payload 64`
//! measures sequential round trips (request → its single response → end) on
//! loopback: p50 / p99 / max and requests per second.
//! `… -- events --plane nats --events 200000` measures publish → receive
//! throughput of ~330-byte KV-event-sized messages into one subscriber.
//! NATS runs start their own `nats-server` on a free port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use futures::stream::BoxStream;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use kvrouter_runtime::events::{EventPlane, InProcEvents, NatsEvents, ZmqPublisher, ZmqSubscriber};
use kvrouter_runtime::request::{self, Handler, MAX_FRAME_DEFAULT, NatsRequester, TcpClient};
use kvrouter_runtime::testing::NatsServer;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Request-plane round trips.
    Request {
        #[arg(long, value_enum)]
        plane: ReqPlane,
        /// Request body size in bytes.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
    },
    /// Event-plane throughput into one subscriber.
    Events {
        #[arg(long, value_enum)]
        plane: EvPlane,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 330)]
        size: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReqPlane {
    Tcp,
    Nats,
}

#[derive(Clone, Copy, ValueEnum)]
enum EvPlane {
    Inproc,
    Nats,
    Zmq,
}

/// Answers every request with one small response.
struct Ack;

impl Handler for Ack {
    fn handle(
        &self,
        request: Bytes,
        _: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        futures::stream::once(async move { Ok(Bytes::from(request.len().to_string())) }).boxed()
    }
}

fn bar(n: u64) -> ProgressBar {
    ProgressBar::new(n)
}

#[tokio::main]
async fn main() {
    match Args::parse().what {
        What::Request {
            plane,
            payload,
            requests,
        } => {
            let body = Bytes::from(vec![7u8; payload]);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
            let pb = bar(requests);
            let _nats;
            let t0;
            match plane {
                ReqPlane::Tcp => {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap().to_string();
                    tokio::spawn(request::serve(
                        listener,
                        Arc::new(Ack),
                        CancellationToken::new(),
                        MAX_FRAME_DEFAULT,
                    ));
                    let client = TcpClient::connect(&addr, Duration::from_secs(1))
                        .await
                        .unwrap();
                    for _ in 0..1000 {
                        let mut s = client.request(body.clone()).await.unwrap();
                        while s.next().await.is_some() {}
                    }
                    t0 = Instant::now();
                    for i in 0..requests {
                        let q = Instant::now();
                        let mut s = client.request(body.clone()).await.unwrap();
                        while let Some(r) = s.next().await {
                            r.unwrap();
                        }
                        hist.record(q.elapsed().as_nanos() as u64).unwrap();
                        if i % 1024 == 0 {
                            pb.set_position(i);
                        }
                    }
                }
                ReqPlane::Nats => {
                    let server = NatsServer::start().unwrap();
                    let nats = NatsEvents::connect(&server.url()).await.unwrap();
                    tokio::spawn(request::serve_nats(
                        nats.client(),
                        "bench.rpc".into(),
                        Arc::new(Ack),
                        CancellationToken::new(),
                    ));
                    let caller = NatsRequester::new(
                        nats.client(),
                        "bench.rpc".into(),
                        Duration::from_secs(2),
                    );
                    let mut warm = 0;
                    while warm < 1000 {
                        if let Ok(mut s) = caller.request(body.clone()).await {
                            while s.next().await.is_some() {}
                            warm += 1;
                        }
                    }
                    t0 = Instant::now();
                    for i in 0..requests {
                        let q = Instant::now();
                        let mut s = caller.request(body.clone()).await.unwrap();
                        while let Some(r) = s.next().await {
                            r.unwrap();
                        }
                        hist.record(q.elapsed().as_nanos() as u64).unwrap();
                        if i % 1024 == 0 {
                            pb.set_position(i);
                        }
                    }
                    _nats = server;
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            pb.finish_and_clear();
            let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "{}",
                serde_json::json!({
                    "bench": "request", "plane": match plane { ReqPlane::Tcp => "tcp", ReqPlane::Nats => "nats" },
                    "payload_bytes": payload, "requests": requests, "requests_per_sec": requests as f64 / secs,
                    "rtt_p50_us": us(0.5), "rtt_p99_us": us(0.99), "rtt_max_us": hist.max() as f64 / 1000.0,
                })
            );
        }
        What::Events {
            plane,
            events,
            size,
        } => {
            let payload = Bytes::from(vec![3u8; size]);
            let pb = bar(events);
            let (secs, name) = match plane {
                EvPlane::Inproc => {
                    let bus = InProcEvents::new();
                    (
                        run_bus(&bus, events, payload, &pb, async || {}).await,
                        "inproc",
                    )
                }
                EvPlane::Nats => {
                    let server = NatsServer::start().unwrap();
                    let bus = NatsEvents::connect(&server.url()).await.unwrap();
                    let b2 = bus.clone();
                    let s = run_bus(&bus, events, payload, &pb, async move || {
                        b2.flush().await.unwrap()
                    })
                    .await;
                    drop(server);
                    (s, "nats")
                }
                EvPlane::Zmq => {
                    let mut publisher = ZmqPublisher::bind("tcp://127.0.0.1:0").await.unwrap();
                    let mut sub = ZmqSubscriber::connect(publisher.address(), "")
                        .await
                        .unwrap();
                    loop {
                        publisher.publish("probe", Bytes::new()).await.unwrap();
                        if tokio::time::timeout(Duration::from_millis(20), sub.next())
                            .await
                            .is_ok()
                        {
                            break;
                        }
                    }
                    let start = publisher.publish("kv", Bytes::new()).await.unwrap();
                    while sub.next().await.unwrap().seq < start {}
                    let t0 = Instant::now();
                    let last = start + events;
                    let producer = async {
                        for _ in 0..events {
                            publisher.publish("kv", payload.clone()).await.unwrap();
                        }
                    };
                    // PUB drops for a subscriber that falls behind: count what arrives
                    // and what the sequence numbers say went missing.
                    let (mut received, mut lost) = (0u64, 0u64);
                    let mut last_at = t0;
                    let consumer = async {
                        loop {
                            let m = match tokio::time::timeout(Duration::from_secs(2), sub.next())
                                .await
                            {
                                Ok(m) => m.unwrap(),
                                Err(_) => break, // the tail was dropped
                            };
                            received += 1;
                            lost += m.gap;
                            last_at = Instant::now();
                            if received % 4096 == 0 {
                                pb.set_position(received);
                            }
                            if m.seq >= last {
                                break;
                            }
                        }
                    };
                    tokio::join!(producer, consumer);
                    eprintln!("zmq: received {received}, lost {lost} (sequence gaps)");
                    (
                        (last_at - t0).as_secs_f64() * events as f64 / received.max(1) as f64,
                        "zmq",
                    )
                }
            };
            pb.finish_and_clear();
            println!(
                "{}",
                serde_json::json!({"bench": "events", "plane": name, "events": events, "size": size,
                    "events_per_sec": events as f64 / secs, "seconds": secs})
            );
        }
    }
}

async fn run_bus(
    bus: &dyn EventPlane,
    n: u64,
    payload: Bytes,
    pb: &ProgressBar,
    flush: impl AsyncFnOnce(),
) -> f64 {
    let mut sub = bus.subscribe("bench.kv-events").await.unwrap();
    let t0 = Instant::now();
    let producer = async {
        for _ in 0..n {
            bus.publish("bench.kv-events", payload.clone())
                .await
                .unwrap();
        }
        flush().await;
    };
    let consumer = async {
        for i in 0..n {
            sub.next().await.unwrap();
            if i % 4096 == 0 {
                pb.set_position(i);
            }
        }
    };
    tokio::join!(producer, consumer);
    t0.elapsed().as_secs_f64()
}
