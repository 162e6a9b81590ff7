//! Runtime planes against real sockets and a real nats-server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use kvrouter_runtime::discovery::{
    Discovery, DiscoveryEvent, EtcdDiscovery, FileDiscovery, MemDiscovery,
};
use kvrouter_runtime::endpoint::{EndpointId, Instance};
use kvrouter_runtime::events::{
    DurableEvents, EventPlane, InProcEvents, NatsEvents, ZmqPublisher, ZmqSubscriber,
};
use kvrouter_runtime::request::{
    self, Handler, HttpRequester, MAX_FRAME_DEFAULT, NatsRequester, RequestError, TcpClient,
};
use kvrouter_runtime::testing::{EtcdServer, NatsServer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Streams `n` numbered responses for a request whose body is `n`; body
/// "forever" streams until cancelled, flagging `cancelled` when it is.
struct Counter {
    cancelled: Arc<AtomicBool>,
}

impl Handler for Counter {
    fn handle(
        &self,
        request: Bytes,
        cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Bytes, String>> {
        let body = String::from_utf8_lossy(&request).to_string();
        if body == "forever" {
            // The worker's side of cancellation: whatever it runs watches the token.
            let flag = self.cancelled.clone();
            let watched = cancel.clone();
            tokio::spawn(async move {
                watched.cancelled().await;
                flag.store(true, Ordering::SeqCst);
            });
            return futures::stream::unfold(0u64, move |i| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Some((Ok(Bytes::from(i.to_string())), i + 1))
            })
            .boxed();
        }
        if body == "fail" {
            return futures::stream::iter([
                Ok(Bytes::from_static(b"partial")),
                Err("boom".to_string()),
            ])
            .boxed();
        }
        let n: u64 = body.parse().unwrap_or(0);
        futures::stream::iter((0..n).map(|i| Ok(Bytes::from(i.to_string())))).boxed()
    }
}

/// Waits (polling, with a deadline) until the handler has seen its cancellation.
async fn wait_cancelled(flag: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !flag.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "cancellation never reached the handler"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn server() -> (String, Arc<AtomicBool>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let cancelled = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let handler = Arc::new(Counter {
        cancelled: cancelled.clone(),
    });
    tokio::spawn(request::serve(
        listener,
        handler,
        shutdown.clone(),
        MAX_FRAME_DEFAULT,
    ));
    (addr, cancelled, shutdown)
}

#[tokio::test]
async fn tcp_streams_ten_thousand_responses_in_order_and_multiplexes() {
    let (addr, _, _shutdown) = server().await;
    let client = TcpClient::connect(&addr, Duration::from_secs(1))
        .await
        .unwrap();
    let (mut a, mut b) = (
        client.request(Bytes::from_static(b"10000")).await.unwrap(),
        client.request(Bytes::from_static(b"3")).await.unwrap(),
    );
    let mut got = 0u64;
    while let Some(item) = a.next().await {
        assert_eq!(item.unwrap(), Bytes::from(got.to_string()));
        got += 1;
    }
    assert_eq!(got, 10_000);
    let mut small = Vec::new();
    while let Some(item) = b.next().await {
        small.push(item.unwrap());
    }
    assert_eq!(small.len(), 3);
    let mut f = client.request(Bytes::from_static(b"fail")).await.unwrap();
    assert_eq!(f.next().await, Some(Ok(Bytes::from_static(b"partial"))));
    assert_eq!(
        f.next().await,
        Some(Err(RequestError::Remote("boom".into())))
    );
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_handler() {
    let (addr, cancelled, _shutdown) = server().await;
    let client = TcpClient::connect(&addr, Duration::from_secs(1))
        .await
        .unwrap();
    let mut s = client
        .request(Bytes::from_static(b"forever"))
        .await
        .unwrap();
    for _ in 0..5 {
        s.next().await.unwrap().unwrap();
    }
    drop(s);
    wait_cancelled(&cancelled).await;
}

#[tokio::test]
async fn dead_instance_fails_fast_with_a_retryable_error() {
    let port = kvrouter_runtime::testing::free_port();
    let t0 = Instant::now();
    let err = TcpClient::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(2))
        .await
        .err()
        .expect("nothing listens there");
    assert!(err.retryable(), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    // A server that dies mid-stream: the open stream ends with ConnectionLost.
    let (addr, _, shutdown) = server().await;
    let client = TcpClient::connect(&addr, Duration::from_secs(1))
        .await
        .unwrap();
    let mut s = client
        .request(Bytes::from_static(b"forever"))
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    shutdown.cancel();
    let mut last = None;
    while let Some(item) = s.next().await {
        last = Some(item);
        if matches!(last, Some(Err(_))) {
            break;
        }
    }
    assert_eq!(last, Some(Err(RequestError::ConnectionLost)), "{last:?}");
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_their_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sock = listener.local_addr().unwrap();
    let handler = Arc::new(Counter {
        cancelled: Arc::default(),
    });
    tokio::spawn(request::serve(
        listener,
        handler,
        CancellationToken::new(),
        MAX_FRAME_DEFAULT,
    ));
    let client = TcpClient::connect(&sock.to_string(), Duration::from_secs(1))
        .await
        .unwrap();
    for junk in [
        &b"\x00\x00\x00\x09\x63\x00\x00\x00\x00\x00\x00\x00\x01"[..], // unknown kind
        &b"\x7f\xff\xff\xff\x01"[..],                                 // 2 GiB frame
        &b"\x00\x00\x00\x02\x01\x00"[..],                             // shorter than its header
    ] {
        let mut raw = request::send_raw(sock, junk).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the server closes a connection that sent {junk:?}");
        // The well-behaved client is unaffected.
        let mut s = client.request(Bytes::from_static(b"2")).await.unwrap();
        assert!(s.next().await.unwrap().is_ok());
    }
    let too_big = Bytes::from(vec![0u8; MAX_FRAME_DEFAULT]);
    assert!(matches!(
        client.request(too_big).await,
        Err(RequestError::TooLarge(_))
    ));
}

fn instance(id: u64, ep: &EndpointId) -> Instance {
    Instance {
        id,
        endpoint: ep.clone(),
        address: format!("tcp://127.0.0.1:{}", 1000 + id),
        metadata: serde_json::json!({"block_size": 64}),
    }
}

async fn register_watch_expire(store: &dyn Discovery, crash_expires: bool) {
    let ep: EndpointId = "ns.backend.generate".parse().unwrap();
    let other: EndpointId = "ns.router.generate".parse().unwrap();
    let r1 = store
        .register(instance(1, &ep), Duration::from_millis(600))
        .await
        .unwrap();
    let mut watch = store.watch(&ep).await.unwrap();
    assert_eq!(
        watch.next().await,
        Some(DiscoveryEvent::Added(instance(1, &ep)))
    );
    let _r_other = store
        .register(instance(9, &other), Duration::from_secs(5))
        .await
        .unwrap();
    let r2 = store
        .register(instance(2, &ep), Duration::from_millis(600))
        .await
        .unwrap();
    assert_eq!(
        watch.next().await,
        Some(DiscoveryEvent::Added(instance(2, &ep)))
    );
    let mut ids: Vec<u64> = store
        .list(&ep)
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    drop(r1);
    assert_eq!(watch.next().await, Some(DiscoveryEvent::Removed(1)));
    if crash_expires {
        // The process "dies": no more heartbeats, no clean deregistration.
        let t0 = Instant::now();
        r2.abandon();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .unwrap(),
            Some(DiscoveryEvent::Removed(2))
        );
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "gone within its TTL (+ a poll)"
        );
    } else {
        drop(r2);
        assert_eq!(watch.next().await, Some(DiscoveryEvent::Removed(2)));
    }
    assert!(store.list(&ep).await.unwrap().is_empty());
}

#[tokio::test]
async fn mem_discovery_register_watch_remove() {
    register_watch_expire(&MemDiscovery::new(), false).await;
}

#[tokio::test]
async fn file_discovery_register_watch_and_lease_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileDiscovery::new(dir.path(), Duration::from_millis(50));
    register_watch_expire(&store, true).await;
    // Heartbeats keep a live instance past its TTL.
    let ep: EndpointId = "ns.w.generate".parse().unwrap();
    let _live = store
        .register(instance(5, &ep), Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(store.list(&ep).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_discovery_leases_watch_and_expiry_against_a_real_server() {
    let server = EtcdServer::start().expect("etcd (make deps installs it)");
    let store = EtcdDiscovery::connect(&[server.endpoint()]).await.unwrap();
    register_watch_expire(&store, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resyncs_after_a_server_restart() {
    let mut server = EtcdServer::start().expect("etcd (make deps installs it)");
    let store = EtcdDiscovery::connect(&[server.endpoint()]).await.unwrap();
    let ep: EndpointId = "ns.backend.generate".parse().unwrap();
    let keep = store
        .register(instance(1, &ep), Duration::from_secs(30))
        .await
        .unwrap();
    let mut watch = store.watch(&ep).await.unwrap();
    assert_eq!(
        watch.next().await,
        Some(DiscoveryEvent::Added(instance(1, &ep)))
    );
    server.restart().expect("etcd restarts on the same data");
    // A change made after the restart still reaches the old watch.
    let other = EtcdDiscovery::connect(&[server.endpoint()]).await.unwrap();
    let _r2 = other
        .register(instance(2, &ep), Duration::from_secs(30))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("resynced");
    assert_eq!(ev, Some(DiscoveryEvent::Added(instance(2, &ep))));
    drop(keep);
}

async fn hundred_thousand_in_order(bus: &dyn EventPlane, flush: impl AsyncFnOnce()) {
    let mut sub = bus
        .subscribe("namespace.ns.component.backend.kv-events")
        .await
        .unwrap();
    let n = 100_000u32;
    let publisher = async {
        for i in 0..n {
            bus.publish(
                "namespace.ns.component.backend.kv-events",
                Bytes::from(i.to_be_bytes().to_vec()),
            )
            .await
            .unwrap();
        }
        flush().await;
    };
    let consumer = async {
        for i in 0..n {
            let msg = tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(u32::from_be_bytes(msg[..4].try_into().unwrap()), i);
        }
    };
    tokio::join!(publisher, consumer);
}

#[tokio::test]
async fn inproc_events_deliver_100k_in_order() {
    let bus = InProcEvents::new();
    hundred_thousand_in_order(&bus, async || {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_deliver_100k_in_order_against_a_real_server() {
    let server = NatsServer::start().expect("nats-server (make deps installs it)");
    let bus = NatsEvents::connect(&server.url()).await.unwrap();
    let b2 = bus.clone();
    hundred_thousand_in_order(&bus, async move || b2.flush().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_durable_consumers_purge_and_snapshots() {
    let server = NatsServer::start().expect("nats-server (make deps installs it)");
    let nats = NatsEvents::connect(&server.url()).await.unwrap();
    let stream = DurableEvents::open(
        nats.client(),
        "kv-events-test",
        "ns.kv-events",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    for i in 0..100u32 {
        assert_eq!(
            stream
                .publish(Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
            i as u64 + 1
        );
    }
    assert_eq!(stream.message_count().await.unwrap(), 100);
    // Router A consumes 60, then "restarts": it resumes at 61.
    {
        let mut a = stream
            .consumer("router-a", Duration::from_millis(300))
            .await
            .unwrap();
        for expect in 1..=60u64 {
            let d = a.next().await.unwrap().unwrap();
            assert_eq!(d.sequence, expect);
            d.ack().await.unwrap();
        }
    }
    let mut a = stream
        .consumer("router-a", Duration::from_millis(300))
        .await
        .unwrap();
    let d = a.next().await.unwrap().unwrap();
    assert_eq!(
        d.sequence, 61,
        "a durable consumer resumes after its acknowledgements"
    );
    d.ack().await.unwrap();
    // Router B acknowledged only 10: purging keeps what B still needs.
    let mut b = stream
        .consumer("router-b", Duration::from_millis(300))
        .await
        .unwrap();
    for _ in 0..10 {
        b.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    // Acks are asynchronous on the server: poll until the floor shows.
    let deadline = Instant::now() + Duration::from_secs(5);
    let purged = loop {
        let p = stream.purge_acknowledged().await.unwrap();
        if p == 10 || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(purged, 10);
    assert_eq!(stream.message_count().await.unwrap(), 90);
    let d = b.next().await.unwrap().unwrap();
    assert_eq!(d.sequence, 11, "nothing B had not acknowledged was purged");
    // Snapshots: an 8 MiB object round trip, overwrite, delete.
    let snaps = stream.snapshots("radix-bucket-test").await.unwrap();
    let blob: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    snaps.put("radix-state", &blob).await.unwrap();
    assert_eq!(
        snaps.get("radix-state").await.unwrap().as_deref(),
        Some(&blob[..])
    );
    snaps.put("radix-state", b"v2").await.unwrap();
    assert_eq!(
        snaps.get("radix-state").await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    snaps.delete("radix-state").await.unwrap();
    assert_eq!(snaps.get("radix-state").await.unwrap(), None);
    stream.purge_all().await.unwrap();
    assert_eq!(stream.message_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_delivers_100k_in_order_with_sequence_numbers() {
    let mut publisher = ZmqPublisher::bind("tcp://127.0.0.1:0").await.unwrap();
    let mut sub = ZmqSubscriber::connect(publisher.address(), "kv")
        .await
        .unwrap();
    // Slow joiner: PUB drops until the subscription has arrived, so probe first.
    let probe = async {
        loop {
            publisher
                .publish("kv-probe", Bytes::from_static(b"p"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let first = tokio::select! { m = sub.next() => m.unwrap(), _ = probe => unreachable!() };
    assert_eq!(&first.topic[..], b"kv-probe");
    let start = publisher
        .publish("kv-events", Bytes::from_static(b"start"))
        .await
        .unwrap();
    let n = 100_000u64;
    let consumer = async {
        // Skip probes still in flight, then expect every event in order.
        let mut m = sub.next().await.unwrap();
        while m.seq < start {
            m = sub.next().await.unwrap();
        }
        assert_eq!(m.payload, Bytes::from_static(b"start"));
        for i in 0..n {
            let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.seq, start + 1 + i);
            assert_eq!(m.gap, 0);
            assert_eq!(u64::from_be_bytes(m.payload[..8].try_into().unwrap()), i);
        }
    };
    let producer = async {
        for i in 0..n {
            publisher
                .publish("kv-events", Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap();
        }
    };
    tokio::join!(producer, consumer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_request_plane_streams_cancels_and_detects_absent_instances() {
    let server = NatsServer::start().expect("nats-server (make deps installs it)");
    let nats = NatsEvents::connect(&server.url()).await.unwrap();
    let cancelled = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let handler = Arc::new(Counter {
        cancelled: cancelled.clone(),
    });
    let subject = "ns.backend.generate.7".to_string();
    tokio::spawn(request::serve_nats(
        nats.client(),
        subject.clone(),
        handler,
        shutdown.clone(),
    ));
    let caller = NatsRequester::new(nats.client(), subject, Duration::from_secs(2));
    // The server subscribes asynchronously: retry the first call until it answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match caller.request(Bytes::from_static(b"10000")).await {
            Ok(s) => break s,
            Err(e) if e.retryable() && Instant::now() < deadline => continue,
            Err(e) => panic!("{e}"),
        }
    };
    let mut got = 0u64;
    while let Some(item) = s.next().await {
        assert_eq!(item.unwrap(), Bytes::from(got.to_string()));
        got += 1;
    }
    assert_eq!(got, 10_000);
    let mut f = caller
        .request(Bytes::from_static(b"forever"))
        .await
        .unwrap();
    f.next().await.unwrap().unwrap();
    drop(f);
    wait_cancelled(&cancelled).await;
    let nobody = NatsRequester::new(
        nats.client(),
        "ns.backend.generate.404".into(),
        Duration::from_millis(300),
    );
    let t0 = Instant::now();
    let err = nobody
        .request(Bytes::from_static(b"1"))
        .await
        .err()
        .expect("no instance");
    assert!(err.retryable());
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subscriptions_survive_a_server_restart() {
    let mut server = NatsServer::start().expect("nats-server (make deps installs it)");
    let bus = NatsEvents::connect(&server.url()).await.unwrap();
    let mut sub = bus.subscribe("ns.kv-events").await.unwrap();
    bus.publish("ns.kv-events", Bytes::from_static(b"before"))
        .await
        .unwrap();
    assert_eq!(sub.next().await.unwrap(), Bytes::from_static(b"before"));
    server
        .restart()
        .expect("nats-server restarts on the same port");
    // The client reconnects and re-subscribes by itself: publish until a message gets through.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no delivery after the restart");
        let _ = bus
            .publish("ns.kv-events", Bytes::from_static(b"after"))
            .await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            assert_eq!(m, Bytes::from_static(b"after"));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_plane_streams_cancels_and_fails_fast() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let cancelled = Arc::new(AtomicBool::new(false));
    let app = request::http_router(Arc::new(Counter {
        cancelled: cancelled.clone(),
    }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let caller = HttpRequester::new(&base, Duration::from_secs(1));
    let mut s = caller.request(Bytes::from_static(b"10000")).await.unwrap();
    let mut got = 0u64;
    while let Some(item) = s.next().await {
        assert_eq!(item.unwrap(), Bytes::from(got.to_string()));
        got += 1;
    }
    assert_eq!(got, 10_000);
    let mut f = caller.request(Bytes::from_static(b"fail")).await.unwrap();
    assert_eq!(f.next().await, Some(Ok(Bytes::from_static(b"partial"))));
    assert_eq!(
        f.next().await,
        Some(Err(RequestError::Remote("boom".into())))
    );
    let mut forever = caller
        .request(Bytes::from_static(b"forever"))
        .await
        .unwrap();
    forever.next().await.unwrap().unwrap();
    drop(forever);
    wait_cancelled(&cancelled).await;
    let port = kvrouter_runtime::testing::free_port();
    let dead = HttpRequester::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(1));
    let t0 = Instant::now();
    let err = dead
        .request(Bytes::from_static(b"1"))
        .await
        .err()
        .expect("nothing listens");
    assert!(err.retryable(), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(1));
}

/// A request made on a connection whose peer already closed it (a worker
/// killed a moment earlier) must fail at once, retryably, not wait forever
/// for a response that cannot come.
#[tokio::test]
async fn request_on_a_connection_closed_by_the_peer_fails_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accept = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        drop(s);
    });
    let client = TcpClient::connect(&addr, Duration::from_secs(1))
        .await
        .unwrap();
    accept.await.unwrap();
    // Let the client's reader see the close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let outcome = tokio::time::timeout(Duration::from_secs(2), async {
            match client.request(Bytes::from_static(b"hello")).await {
                Err(e) => Err(e),
                Ok(mut s) => match s.next().await {
                    Some(Err(e)) => Err(e),
                    other => Ok(other.map(|r| r.is_ok())),
                },
            }
        })
        .await
        .expect("a request on a closed connection hung");
        assert_eq!(outcome, Err(RequestError::ConnectionLost));
    }
}
