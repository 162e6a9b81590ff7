//! Test support: real servers (nats-server) on free loopback ports, in temp dirs.
//!
//! Nothing here sleeps to wait: a server counts as ready when its port accepts
//! a connection, polled with a deadline.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A free loopback port (bound once and released; the OS does not hand it out again at once).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `127.0.0.1:port` until it accepts or `deadline` passes.
pub fn wait_for_port(port: u16, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A server process on a loopback port: started, restarted, killed on drop.
struct Supervised {
    child: Option<Child>,
    port: u16,
    name: &'static str,
    command: Box<dyn Fn() -> Command + Send>,
}

impl Supervised {
    fn start(
        name: &'static str,
        port: u16,
        command: Box<dyn Fn() -> Command + Send>,
    ) -> std::io::Result<Self> {
        let mut s = Self {
            child: None,
            port,
            name,
            command,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = (self.command)()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting {} (install it: `make deps`): {e}", self.name),
                )
            })?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(15)) {
            self.stop();
            return Err(std::io::Error::other(format!(
                "{} did not become ready within 15 s",
                self.name
            )));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `nats-server -js` on a free port; killed on drop.
pub struct NatsServer {
    proc: Supervised,
    /// Client port.
    pub port: u16,
    _dir: Arc<tempfile_dir::TempDir>,
}

impl NatsServer {
    /// Starts one (the binary must be on PATH: `make test` installs it).
    pub fn start() -> std::io::Result<Self> {
        let dir = Arc::new(tempfile_dir::TempDir::new("kvrouter-nats")?);
        let port = free_port();
        let d = dir.clone();
        let proc = Supervised::start(
            "nats-server",
            port,
            Box::new(move || {
                let mut c = Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                    .arg(d.path());
                c
            }),
        )?;
        Ok(Self {
            proc,
            port,
            _dir: dir,
        })
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.proc.stop();
        self.proc.spawn()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A single-node `etcd` on free ports with fast elections; killed on drop.
pub struct EtcdServer {
    proc: Supervised,
    /// Client port.
    pub port: u16,
    _dir: Arc<tempfile_dir::TempDir>,
}

impl EtcdServer {
    /// Starts one (the binary must be on PATH: `make test` installs it).
    pub fn start() -> std::io::Result<Self> {
        let dir = Arc::new(tempfile_dir::TempDir::new("kvrouter-etcd")?);
        let (port, peer_port) = (free_port(), free_port());
        let d = dir.clone();
        let proc = Supervised::start(
            "etcd",
            port,
            Box::new(move || {
                let client = format!("http://127.0.0.1:{port}");
                let peer = format!("http://127.0.0.1:{peer_port}");
                let mut c = Command::new("etcd");
                c.args(["--name", "t", "--data-dir"])
                    .arg(d.path())
                    .args([
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                    ])
                    .args([
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                    ])
                    .args(["--initial-cluster", &format!("t={peer}")])
                    .args([
                        "--heartbeat-interval",
                        "10",
                        "--election-timeout",
                        "100",
                        "--log-level",
                        "error",
                    ]);
                c
            }),
        )?;
        Ok(Self {
            proc,
            port,
            _dir: dir,
        })
    }

    /// Kills the server (its data stays, for [`Self::restart`]).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.proc.stop();
        self.proc.spawn()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A temporary directory removed on drop (std only).
mod tempfile_dir {
    use super::PathBuf;

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
