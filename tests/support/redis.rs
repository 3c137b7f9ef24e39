//! A real Redis (Debian's `redis-server`) on 127.0.0.1, for the shared-store tests: no
//! persistence, its own temporary directory, killed when dropped. Every wait is bounded.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process listening on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
}

/// How to install redis-server and redis-cli.
const REDIS_INSTALL: &str = "apt-get install redis-server (Debian's package has redis-server and redis-cli; .ci/run installs it)";

impl RedisServer {
    /// Starts one on a free port of 127.0.0.1.
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    /// Starts one on `port` of 127.0.0.1 (to come back where a killed one was).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    /// A handle on a server another `RedisServer` runs on `port`, for `cli` and `info` from
    /// another thread; it stops nothing.
    pub fn observer(port: u16) -> RedisServer {
        RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn spawn(&mut self) {
        let child = Command::new(super::tools::require("redis-server", REDIS_INSTALL))
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server answers within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli` against it and returns its output, trimmed (10 s at most).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut child = Command::new(super::tools::require("redis-cli", REDIS_INSTALL))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("redis-cli {args:?} did not finish within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().expect("redis-cli output");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// One field of `INFO`, e.g. `used_memory`.
    pub fn info(&self, field: &str) -> u64 {
        let info = self.cli(&["INFO"]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO has no numeric {field}"))
    }

    /// Every key and its value (strings, hashes, sets, sorted sets) as one text, for looking for
    /// what must never be stored.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for key in self.cli(&["--scan"]).lines() {
            out.push_str(key);
            out.push('\n');
            let value = match self.cli(&["TYPE", key]).as_str() {
                "string" => self.cli(&["GET", key]),
                "hash" => self.cli(&["HGETALL", key]),
                "set" => self.cli(&["SMEMBERS", key]),
                "zset" => self.cli(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
                other => format!("({other})"),
            };
            out.push_str(&value);
            out.push('\n');
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
