//! What the process-level tests share: a fleet of real servers and kvrouter
//! processes, and a reader of the address a service prints when it starts.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use kvrouter_runtime::testing::{EtcdServer, NatsServer};
use serde_json::Value;

/// Real etcd and NATS, and the kvrouter processes started over them
/// (killed when the fleet is dropped).
pub struct Fleet {
    _nats: NatsServer,
    /// The etcd server (faults replace it).
    #[allow(dead_code)] // only the fault suite touches it
    pub etcd: EtcdServer,
    nats_url: String,
    etcd_url: String,
    /// The processes started.
    pub children: Vec<Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Fleet {
    /// Starts etcd and NATS.
    pub fn start() -> Self {
        let nats = NatsServer::start().expect("nats-server (make test installs it)");
        let etcd = EtcdServer::start().expect("etcd (make test installs it)");
        Self {
            nats_url: nats.url(),
            etcd_url: etcd.endpoint(),
            _nats: nats,
            etcd,
            children: Vec::new(),
        }
    }

    /// `kvrouter ARGS` with this fleet's servers in its environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvrouter"));
        for (k, _) in std::env::vars() {
            if k.starts_with("DYN_") {
                c.env_remove(k);
            }
        }
        c.args(args)
            .env("NATS_SERVER", &self.nats_url)
            .env("ETCD_ENDPOINTS", &self.etcd_url)
            .env("RUST_LOG", "warn");
        c
    }

    /// Starts `kvrouter ARGS`, its output discarded.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs `kvrouter call`; returns (exit code, JSON lines).
    #[allow(dead_code)] // not every test binary calls endpoints
    pub fn call(&self, endpoint: &str, body: &Value) -> (i32, Vec<Value>) {
        let out = self
            .cmd(&["call", endpoint, &body.to_string(), "--wait", "20"])
            .output()
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        (out.status.code().unwrap_or(-1), lines)
    }
}

/// The first `http://…` address `child` prints on stdout (services print where they listen).
#[allow(dead_code)] // not every test binary starts an HTTP service
pub fn printed_url(child: &mut Child) -> String {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line.split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}
