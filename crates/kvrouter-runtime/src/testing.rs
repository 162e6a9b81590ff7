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
    child: Child,
    /// Client port.
    pub port: u16,
    _dir: tempfile_dir::TempDir,
}

impl NatsServer {
    /// Starts one (the binary must be on PATH: `make test` installs it).
    pub fn start() -> std::io::Result<Self> {
        let dir = tempfile_dir::TempDir::new("kvrouter-nats")?;
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting nats-server (install it: `make deps`): {e}"),
                )
            })?;
        let mut server = Self {
            child,
            port,
            _dir: dir,
        };
        if !wait_for_port(port, Duration::from_secs(10)) {
            let _ = server.child.kill();
            return Err(std::io::Error::other(
                "nats-server did not become ready within 10 s",
            ));
        }
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
