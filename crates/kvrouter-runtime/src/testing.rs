//! Test support: real servers (nats-server) on free loopback ports, in temp dirs.
//!
//! Nothing here sleeps to wait: a server counts as ready when its port accepts
//! a connection, polled with a deadline.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// A `nats-server -js` on a free port; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    dir: tempfile_dir::TempDir,
}

impl NatsServer {
    /// Starts one (the binary must be on PATH: `make test` installs it).
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile_dir::TempDir::new("kvrouter-nats")?;
        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting nats-server (install it: `make deps`): {e}"),
                )
            })?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(10)) {
            self.stop();
            return Err(std::io::Error::other(
                "nats-server did not become ready within 10 s",
            ));
        }
        Ok(())
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A single-node `etcd` on free ports with fast elections; killed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    peer_port: u16,
    dir: tempfile_dir::TempDir,
}

impl EtcdServer {
    /// Starts one (the binary must be on PATH: `make test` installs it).
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile_dir::TempDir::new("kvrouter-etcd")?;
        let mut server = Self {
            child: None,
            port: free_port(),
            peer_port: free_port(),
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path())
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
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting etcd (install it: `make deps`): {e}"),
                )
            })?;
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(15)) {
            self.stop();
            return Err(std::io::Error::other(
                "etcd did not become ready within 15 s",
            ));
        }
        Ok(())
    }

    /// Kills the server (its data stays, for [`Self::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
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
