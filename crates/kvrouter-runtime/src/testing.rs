//! Test support: real servers (nats-server, etcd, a 3-member etcd cluster) on
//! free loopback ports, in temp dirs.
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
        // Its stderr goes to a file so a start that fails can say why.
        let log_path =
            std::env::temp_dir().join(format!("kvrouter-{}-{}.log", self.name, self.port));
        let log = std::fs::File::create(&log_path)?;
        let child = (self.command)()
            .stdout(Stdio::null())
            .stderr(log)
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
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: String = said
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(std::io::Error::other(format!(
                "{} did not become ready on port {} within 15 s; it said: {tail}",
                self.name, self.port
            )));
        }
        let _ = std::fs::remove_file(&log_path);
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

/// The arguments of one etcd member with fast elections.
fn etcd_command(name: &str, dir: &std::path::Path, port: u16, peer: &str) -> Command {
    let client = format!("http://127.0.0.1:{port}");
    let mut c = Command::new("etcd");
    c.args(["--name", name, "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args([
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "100",
            "--log-level",
            "error",
        ]);
    c
}

/// Empties a data directory, as a member replaced by a new machine would start.
fn wipe(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(dir)?;
    std::fs::create_dir_all(dir)
}

/// A single-node `etcd` on free ports with fast elections; killed on drop.
pub struct EtcdServer {
    proc: Supervised,
    /// Client port.
    pub port: u16,
    dir: Arc<tempfile_dir::TempDir>,
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
                let peer = format!("http://127.0.0.1:{peer_port}");
                let mut c = etcd_command("t", d.path(), port, &peer);
                c.args(["--initial-cluster", &format!("t={peer}")]);
                c
            }),
        )?;
        Ok(Self { proc, port, dir })
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

    /// Starts a new, empty server on the same ports: every key and lease is gone.
    pub fn replace(&mut self) -> std::io::Result<()> {
        self.proc.stop();
        wipe(self.dir.path())?;
        self.proc.spawn()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    proc: Supervised,
    /// Client port.
    pub port: u16,
    /// Peer URL.
    pub peer: String,
    dir: Arc<tempfile_dir::TempDir>,
    /// Set once the member must join an existing cluster (after a replacement).
    existing: Arc<std::sync::atomic::AtomicBool>,
}

/// A cluster of etcd members on loopback; killed on drop.
pub struct EtcdCluster {
    /// The members, in start order (`m0`, `m1`, …).
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, &(port, peer_port)) in ports.iter().enumerate() {
            let dir = Arc::new(tempfile_dir::TempDir::new(&format!("kvrouter-etcd-m{i}"))?);
            let existing = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let peer = format!("http://127.0.0.1:{peer_port}");
            let (d, e, p, init) = (dir.clone(), existing.clone(), peer.clone(), initial.clone());
            let proc = Supervised::start(
                "etcd",
                port,
                Box::new(move || {
                    let mut c = etcd_command(&format!("m{i}"), d.path(), port, &p);
                    let state = if e.load(std::sync::atomic::Ordering::Relaxed) {
                        "existing"
                    } else {
                        "new"
                    };
                    c.args(["--initial-cluster", &init])
                        .args(["--initial-cluster-state", state])
                        .args(["--initial-cluster-token", "kvrouter-test"]);
                    c
                }),
            )?;
            members.push(EtcdMember {
                proc,
                port,
                peer,
                dir,
                existing,
            });
        }
        Ok(Self { members })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.port))
            .collect()
    }

    /// Kills member `i` (its data stays).
    pub fn kill(&mut self, i: usize) {
        self.members[i].proc.stop();
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.members[i].proc.stop();
        self.members[i].proc.spawn()
    }

    /// Starts member `i` with an empty data directory, joining the running
    /// cluster; the caller must have removed it and added it again as a
    /// member first (etcd's procedure for replacing a member).
    pub fn start_replacement(&mut self, i: usize) -> std::io::Result<()> {
        let m = &mut self.members[i];
        m.proc.stop();
        wipe(m.dir.path())?;
        m.existing.store(true, std::sync::atomic::Ordering::Relaxed);
        m.proc.spawn()
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
