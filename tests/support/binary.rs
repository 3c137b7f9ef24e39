//! The real `oauth-apps-gateway` binary as a child process, started with a config file in a
//! temp dir on 127.0.0.1 ports the OS chose, for tests that need the process itself (exit
//! codes, signals, its log, its memory).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary under test, as cargo built it for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_oauth-apps-gateway");

/// A free port on 127.0.0.1 (bound and released: the binary binds it next).
pub async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The binary running with a config file in a temp dir.
pub struct Running {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, the proxy listener.
    pub url: String,
    /// The proxy listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// Holds the config file (and whatever else the caller put there) until dropped.
    pub dir: tempfile::TempDir,
}

impl Running {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Still running when the test ends (or panics): not left behind. A child already
        // waited for makes both calls no-ops.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary forwarding to `upstream` and waits (5 s at most) until it listens. The
/// config file holds `[server]` with `listen` followed by `server_lines`, `[admin]` with its
/// `listen`, `[upstream]` with `url`, then `tail` (further sections, e.g. `[log]`). The child's
/// stdout and stderr go where `stdout` and `stderr` say. The ports are chosen free just before
/// the child binds them; if another process took one meanwhile, the child exits and the start
/// is retried on new ports (three tries).
pub async fn start(
    upstream: &str,
    server_lines: &str,
    tail: &str,
    stdout: Stdio,
    stderr: Stdio,
) -> Running {
    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    for _ in 0..3 {
        let port = free_port().await;
        let admin_port = free_port().await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n{server_lines}[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[upstream]\nurl = {upstream:?}\n{tail}",
            ),
        )
        .unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            // A retry gets the null device: the caller's pipes or files went to the first child.
            .stdout(stdout.take().unwrap_or_else(Stdio::null))
            .stderr(stderr.take().unwrap_or_else(Stdio::null))
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut running = Running {
            child,
            url: format!("http://{addr}"),
            addr,
            admin_addr: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            dir,
        };
        for _ in 0..100 {
            if running.child.try_wait().unwrap().is_some() {
                break; // it could not bind: try other ports
            }
            if listens_on(running.pid(), port) && listens_on(running.pid(), admin_port) {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("gateway binary did not start listening");
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (Linux: the LISTEN
/// entries of /proc/net/tcp, matched by inode to the process's descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}
