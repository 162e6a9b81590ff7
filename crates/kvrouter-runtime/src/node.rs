//! One process's view of the runtime: its discovery store, its event plane and
//! its request plane, bundled so services can serve an endpoint and call
//! instances without caring which transports were configured.
//!
//! Serving binds the plane's listener (a TCP port, an HTTP port, or a NATS
//! subject), registers the instance with its address, and keeps both alive as
//! long as the returned [`Served`] lives. Calling looks at the address scheme
//! (`tcp://`, `http://`, `nats://`) and reuses one connection per instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::discovery::{Discovery, DiscoveryError, Registration};
use crate::endpoint::{EndpointId, Instance, InstanceId};
use crate::events::EventPlane;
use crate::request::{
    Handler, HttpRequester, HttpResponseStream, MAX_FRAME_DEFAULT, NatsRequester,
    NatsResponseStream, RequestError, ResponseStream, TcpClient, advertise_address, http_router,
    serve, serve_nats_then,
};

/// Which request transport an instance is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Multiplexed TCP.
    Tcp,
    /// NATS subjects (needs a NATS client).
    Nats,
    /// HTTP POST with a streamed body.
    Http,
}

/// Lease of registrations; a dead process disappears after this long.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How long a call waits for an instance to accept before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why serving an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Registration failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// NATS was chosen but no client is configured, or subscribing failed.
    #[error("nats request plane: {0}")]
    Nats(String),
}

/// The transports of one process.
#[derive(Clone)]
pub struct Node {
    /// Where instances register.
    pub discovery: Arc<dyn Discovery>,
    /// KV events and load.
    pub events: Arc<dyn EventPlane>,
    /// How this process serves its endpoints.
    pub plane: Plane,
    /// NATS connection, when a NATS plane is used.
    pub nats: Option<async_nats::Client>,
    /// Address listeners bind (`0.0.0.0` in a fleet, `127.0.0.1` for one host).
    pub bind_host: String,
    /// Host advertised in discovery (`DYN_TCP_ADVERTISE_HOST`), if set.
    pub advertise_host: Option<String>,
    clients: Arc<Mutex<HashMap<String, Client>>>,
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A fresh instance id: random high bits (unique across processes) and a
/// per-process counter (unique within one).
pub fn new_instance_id() -> InstanceId {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    // Keep ids below 2^53 so JSON clients that parse numbers as doubles round-trip them.
    ((mixed & 0x1F_FFFF_FFFF) << 16 | (NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed) & 0xFFFF))
        & ((1 << 53) - 1)
}

/// A served endpoint instance; dropping it deregisters and stops serving.
pub struct Served {
    /// The registered instance.
    pub instance: Instance,
    registration: Option<Registration>,
    shutdown: CancellationToken,
}

impl Served {
    /// Leaves discovery and waits until the store has it, while requests in
    /// flight (and any that were already on their way) are still served;
    /// dropping the value afterwards stops serving.
    pub async fn deregister(&mut self) {
        if let Some(r) = self.registration.take() {
            r.close().await;
        }
    }

    /// Stops renewing the lease and serving without deregistering (a crash).
    pub fn abandon(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.registration.take() {
            r.abandon();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Node {
    /// A node over the given planes.
    pub fn new(
        discovery: Arc<dyn Discovery>,
        events: Arc<dyn EventPlane>,
        plane: Plane,
        nats: Option<async_nats::Client>,
        bind_host: impl Into<String>,
    ) -> Self {
        Self {
            discovery,
            events,
            plane,
            nats,
            bind_host: bind_host.into(),
            advertise_host: None,
            clients: Arc::default(),
        }
    }

    /// Everything in one process: in-memory discovery and events, requests
    /// over loopback TCP (`kvrouter serve`, tests, benchmarks).
    pub fn in_process() -> Self {
        Self::new(
            Arc::new(crate::discovery::MemDiscovery::new()),
            Arc::new(crate::events::InProcEvents::new()),
            Plane::Tcp,
            None,
            "127.0.0.1",
        )
    }

    /// Serves `handler` as instance `id` of `endpoint` and registers it.
    pub async fn serve(
        &self,
        endpoint: &EndpointId,
        id: InstanceId,
        handler: Arc<dyn Handler>,
        metadata: serde_json::Value,
    ) -> Result<Served, ServeError> {
        let shutdown = CancellationToken::new();
        let address = match self.plane {
            Plane::Tcp | Plane::Http => {
                let bind = format!("{}:0", self.bind_host);
                let listener = TcpListener::bind(&bind)
                    .await
                    .map_err(|source| ServeError::Bind { addr: bind, source })?;
                let local = listener.local_addr().map_err(|source| ServeError::Bind {
                    addr: self.bind_host.clone(),
                    source,
                })?;
                let tcp = advertise_address(local, self.advertise_host.as_deref());
                if self.plane == Plane::Tcp {
                    tokio::spawn(serve(
                        listener,
                        handler,
                        shutdown.clone(),
                        MAX_FRAME_DEFAULT,
                    ));
                    tcp
                } else {
                    use axum::serve::ListenerExt;
                    let app = http_router(handler);
                    let token = shutdown.clone();
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, app)
                            .with_graceful_shutdown(token.cancelled_owned())
                            .await;
                    });
                    tcp.replacen("tcp://", "http://", 1)
                }
            }
            Plane::Nats => {
                let client = self
                    .nats
                    .clone()
                    .ok_or_else(|| ServeError::Nats("no NATS connection configured".into()))?;
                let subject = format!("{}.instance-{id:x}", endpoint.subject(&endpoint.endpoint));
                let token = shutdown.clone();
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let s = subject.clone();
                tokio::spawn(async move {
                    let ready = move || {
                        let _ = ready_tx.send(());
                    };
                    if let Err(e) = serve_nats_then(client, s, handler, token, ready).await {
                        tracing::error!(error = %e, "NATS request plane stopped");
                    }
                });
                ready_rx
                    .await
                    .map_err(|_| ServeError::Nats("subscription failed".into()))?;
                format!("nats://{subject}")
            }
        };
        let instance = Instance {
            id,
            endpoint: endpoint.clone(),
            address,
            metadata,
        };
        let registration = self.discovery.register(instance.clone(), LEASE_TTL).await?;
        Ok(Served {
            instance,
            registration: Some(registration),
            shutdown,
        })
    }

    /// Sends `body` to the instance at `address` (connections are reused).
    pub async fn call(&self, address: &str, body: Bytes) -> Result<Responses, RequestError> {
        let client = self.client(address).await?;
        let result = match &client {
            Client::Tcp(c) => c.request(body).await.map(Responses::Tcp),
            Client::Nats(c) => c.request(body).await.map(Responses::Nats),
            Client::Http(c) => c.request(body).await.map(Responses::Http),
        };
        if matches!(result, Err(RequestError::ConnectionLost)) {
            // A broken connection is not reused; the next call reconnects.
            self.forget(address);
        }
        result
    }

    /// Drops the cached connection to `address` (the instance went away).
    pub fn forget(&self, address: &str) {
        self.clients.lock().expect("client cache").remove(address);
    }

    async fn client(&self, address: &str) -> Result<Client, RequestError> {
        if let Some(c) = self.clients.lock().expect("client cache").get(address) {
            return Ok(c.clone());
        }
        let client = if let Some(subject) = address.strip_prefix("nats://") {
            let nats = self
                .nats
                .clone()
                .ok_or_else(|| RequestError::Unreachable(format!("{address} (no NATS client)")))?;
            Client::Nats(NatsRequester::new(nats, subject.into(), CONNECT_TIMEOUT))
        } else if address.starts_with("http://") {
            Client::Http(HttpRequester::new(address, CONNECT_TIMEOUT))
        } else {
            Client::Tcp(TcpClient::connect(address, CONNECT_TIMEOUT).await?)
        };
        self.clients
            .lock()
            .expect("client cache")
            .insert(address.to_string(), client.clone());
        Ok(client)
    }
}

#[derive(Clone)]
enum Client {
    Tcp(TcpClient),
    Nats(NatsRequester),
    Http(HttpRequester),
}

/// Responses of one call, whatever the plane.
pub enum Responses {
    /// Over TCP.
    Tcp(ResponseStream),
    /// Over NATS.
    Nats(NatsResponseStream),
    /// Over HTTP.
    Http(HttpResponseStream),
}

impl Responses {
    /// The next response; `None` at the end. Dropping the value cancels the call.
    pub async fn next(&mut self) -> Option<Result<Bytes, RequestError>> {
        match self {
            Responses::Tcp(s) => s.next().await,
            Responses::Nats(s) => s.next().await,
            Responses::Http(s) => s.next().await,
        }
    }
}
