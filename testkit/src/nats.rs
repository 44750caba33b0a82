//! A real `nats-server -js` per test, with its JetStream store in a temp dir.

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::postgres::is_executable;
use crate::server_process::{ServerProcess, Spec};
use crate::{Backend, Error, Result, free_port, sys};

const SERVER: &str = "nats-server";
const ENV_URL: &str = "NATS_URL";
const ENV_BIN: &str = "NATS_SERVER_BIN";
const MIN_VERSION: (u32, u32) = (2, 10);
const READY_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts with new ports when a chosen one was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// Options for a server started by [`NatsServer::start_with`]; the default is a plain
/// `nats-server -js`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsServerConfig {
    /// Largest payload in bytes the server accepts (written as `max_payload` to a config file;
    /// there is no flag for it). Defaults to `None`: the server's own 1 MiB.
    pub max_payload: Option<u32>,
    /// Extra `nats-server` command-line flags, appended after testkit's. Defaults to none.
    pub extra_args: Vec<String>,
    /// Run the server as a process or a container; `None` (the default) leaves it to
    /// `TESTKIT_BACKEND` (see [`Backend`]).
    pub backend: Option<Backend>,
}

/// A `nats-server` with JetStream for one test: a child process on free ports, or the external
/// server named by `NATS_URL`.
///
/// Dropping it (also during a panic) SIGKILLs the process and deletes its store. The process
/// also dies if the test process is killed (`PR_SET_PDEATHSIG`).
pub struct NatsServer {
    kind: Kind,
}

enum Kind {
    External {
        url: String,
        addr: SocketAddr,
    },
    Managed(Box<Managed>),
    #[cfg(feature = "containers")]
    Container(Box<crate::containers::NatsContainer>),
}

struct Managed {
    /// Declared before `_dir`: the server is gone before its store is deleted.
    process: ServerProcess,
    url: String,
    addr: SocketAddr,
    monitor_port: u16,
    store_dir: PathBuf,
    _dir: TempDir,
}

impl NatsServer {
    /// [`start_with`](Self::start_with) the default [`NatsServerConfig`].
    pub async fn start() -> Result<NatsServer> {
        Self::start_with(NatsServerConfig::default()).await
    }

    /// Starts `nats-server -js -a 127.0.0.1 -p <port> -m <monitor port> -sd <temp>/js` and
    /// waits until `GET /healthz` answers 200, or — when `NATS_URL` is set and not empty —
    /// checks that a TCP connection to it succeeds and uses it instead (no process control;
    /// a non-default `config` then fails with [`Error::ExternalServer`]).
    ///
    /// Binary: see [`find_nats_server`]. Fails with the log tail if not ready within 30 s.
    pub async fn start_with(config: NatsServerConfig) -> Result<NatsServer> {
        match std::env::var(ENV_URL) {
            Ok(url) if !url.trim().is_empty() => {
                let settings = NatsServerConfig {
                    backend: None,
                    ..config
                };
                if settings != NatsServerConfig::default() {
                    return Err(Error::ExternalServer {
                        server: SERVER,
                        env: ENV_URL,
                    });
                }
                Self::external(url).await
            }
            _ => match Backend::resolve(config.backend)? {
                Backend::Process => Self::start_managed(config).await,
                #[cfg(feature = "containers")]
                Backend::Containers => Ok(NatsServer {
                    kind: Kind::Container(Box::new(
                        crate::containers::NatsContainer::start(&config).await?,
                    )),
                }),
                #[cfg(not(feature = "containers"))]
                Backend::Containers => unreachable!("Backend::resolve refuses containers"),
            },
        }
    }

    /// Starts a JetStream cluster of `nodes` servers on loopback (routes between all of them,
    /// cluster name `testkit`), all at once since none is healthy before a quorum exists.
    /// Each node can be killed, paused and restarted like a single server; it rejoins on
    /// restart. Not available with `NATS_URL` set. Always processes, whatever
    /// `TESTKIT_BACKEND` says: the nodes route to each other on loopback ports.
    pub async fn start_cluster(nodes: usize) -> Result<Vec<NatsServer>> {
        if std::env::var(ENV_URL).is_ok_and(|u| !u.trim().is_empty()) {
            return Err(Error::ExternalServer {
                server: SERVER,
                env: ENV_URL,
            });
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start_cluster(nodes).await {
                Ok(cluster) => return Ok(cluster),
                // Another process took one of the ports: try again with fresh ones.
                Err(e) if e.is_port_conflict() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(Error::NotRunning { server: SERVER }))
    }

    async fn try_start_cluster(nodes: usize) -> Result<Vec<NatsServer>> {
        let mut cluster_ports = Vec::with_capacity(nodes);
        while cluster_ports.len() < nodes {
            let port = free_port()?;
            if !cluster_ports.contains(&port) {
                cluster_ports.push(port);
            }
        }
        let starts = cluster_ports.iter().map(|own| {
            let routes: Vec<String> = cluster_ports
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            let mut extra_args = vec![
                "--cluster_name".into(),
                "testkit".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{own}"),
            ];
            if !routes.is_empty() {
                extra_args.extend(["--routes".into(), routes.join(",")]);
            }
            Self::start_managed(NatsServerConfig {
                extra_args,
                ..NatsServerConfig::default()
            })
        });
        // If one node fails, the started ones are dropped, which kills them.
        futures::future::join_all(starts)
            .await
            .into_iter()
            .collect()
    }

    /// The server's name (`testkit-<port>`, or `testkit-<uuid>` in a container), as JetStream reports stream leaders and
    /// replicas; `None` for an external server.
    pub fn server_name(&self) -> Option<String> {
        match &self.kind {
            Kind::Managed(m) => Some(format!("testkit-{}", m.addr.port())),
            #[cfg(feature = "containers")]
            Kind::Container(c) => Some(c.name().to_owned()),
            Kind::External { .. } => None,
        }
    }

    async fn external(url: String) -> Result<NatsServer> {
        let (host, port) = host_port(&url);
        let addr = (host, port)
            .to_socket_addrs()
            .and_then(|mut addrs| addrs.next().ok_or_else(|| io::Error::other("no address")))
            .map_err(Error::io(format!("resolving {host}:{port} from NATS_URL")))?;
        TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connecting to NATS_URL ({addr})")))?;
        Ok(NatsServer {
            kind: Kind::External { url, addr },
        })
    }

    async fn start_managed(config: NatsServerConfig) -> Result<NatsServer> {
        let bin =
            tokio::task::spawn_blocking(|| find_nats_server(std::env::var_os(ENV_BIN).as_deref()))
                .await
                .map_err(|e| Error::io("looking for nats-server")(io::Error::other(e)))??;
        let dir = tempfile::Builder::new()
            .prefix("testkit-nats-")
            .tempdir()
            .map_err(Error::io("creating a temp dir for nats-server"))?;
        let store_dir = dir.path().join("js");
        let mut config_args: Vec<OsString> = Vec::new();
        if let Some(max_payload) = config.max_payload {
            let file = dir.path().join("nats.conf");
            std::fs::write(&file, format!("max_payload: {max_payload}\n"))
                .map_err(Error::io(format!("writing {}", file.display())))?;
            config_args.extend(["-c".into(), file.into()]);
        }
        config_args.extend(config.extra_args.iter().map(OsString::from));
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let mut monitor_port = free_port()?;
            while monitor_port == port {
                monitor_port = free_port()?;
            }
            let mut args: Vec<OsString> = [
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
                "--server_name",
                &format!("testkit-{port}"),
                "-sd",
            ]
            .into_iter()
            .map(OsString::from)
            .collect();
            args.push(store_dir.clone().into());
            args.extend(config_args.iter().cloned());
            let mut process = ServerProcess::spawn(Spec {
                server: SERVER,
                program: bin.clone(),
                args,
                cwd: dir.path().to_owned(),
                log: dir.path().join("nats-server.log"),
                run_as: None,
                env: Vec::new(),
                drop_signal: sys::SIGKILL,
            })?;
            match wait_healthy(&mut process, monitor_port).await {
                Ok(()) => {
                    let managed = Managed {
                        process,
                        url: format!("nats://127.0.0.1:{port}"),
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        monitor_port,
                        store_dir,
                        _dir: dir,
                    };
                    return Ok(NatsServer {
                        kind: Kind::Managed(Box::new(managed)),
                    });
                }
                Err(e) if e.is_port_conflict() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(Error::NotRunning { server: SERVER }))
    }

    /// The client URL: `nats://127.0.0.1:<port>` (or `NATS_URL`).
    pub fn url(&self) -> &str {
        match &self.kind {
            Kind::External { url, .. } => url,
            Kind::Managed(m) => &m.url,
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.url(),
        }
    }

    /// The client listener's address; e.g. the upstream of a [`TcpProxy`](crate::TcpProxy).
    /// Stable across [`restart`](Self::restart), for a process and a container alike.
    pub fn addr(&self) -> SocketAddr {
        match &self.kind {
            Kind::External { addr, .. } => *addr,
            Kind::Managed(m) => m.addr,
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.addr(),
        }
    }

    /// The client listener's port.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// The JetStream store directory (`-sd`), kept across restarts (a container's is mounted
    /// from the host); `None` when external.
    pub fn store_dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::External { .. } => None,
            Kind::Managed(m) => Some(&m.store_dir),
            #[cfg(feature = "containers")]
            Kind::Container(c) => Some(c.store_dir()),
        }
    }

    /// SIGKILLs the server; returns once it is gone. Clients see the connection drop.
    pub fn kill(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.process.kill(),
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.kill(),
        }
    }

    /// Graceful stop (SIGTERM); returns once the process has exited (SIGKILLs it after 30 s
    /// and fails).
    pub async fn stop(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.process.stop(sys::SIGTERM, STOP_DEADLINE).await,
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.stop(STOP_DEADLINE).await,
        }
    }

    /// Starts the server again with the same ports, flags and store directory (a running one
    /// is stopped first) and waits until `/healthz` answers 200 (30 s deadline). Clients with
    /// reconnect enabled (async-nats' default) reconnect by themselves. A container is started
    /// again with its store on the same host ports.
    pub async fn restart(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.restart().await,
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.restart(STOP_DEADLINE).await,
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered until
    /// [`resume`](Self::resume).
    pub fn pause(&self) -> Result<()> {
        match &self.kind {
            Kind::Managed(m) => m.process.pause(),
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.pause(),
            Kind::External { .. } => Err(external()),
        }
    }

    /// Continues a paused server (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        match &self.kind {
            Kind::Managed(m) => m.process.resume(),
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.resume(),
            Kind::External { .. } => Err(external()),
        }
    }

    fn controlled(&mut self) -> Result<Controlled<'_>> {
        match &mut self.kind {
            Kind::Managed(m) => Ok(Controlled::Process(m)),
            #[cfg(feature = "containers")]
            Kind::Container(c) => Ok(Controlled::Container(c)),
            Kind::External { .. } => Err(external()),
        }
    }
}

impl Managed {
    /// [`NatsServer::restart`] for a process: stop (or clean up after a kill), respawn, wait
    /// for `/healthz`.
    async fn restart(&mut self) -> Result<()> {
        if self.process.is_running() {
            self.process.stop(sys::SIGTERM, STOP_DEADLINE).await?;
        } else {
            let _ = self.process.kill();
        }
        self.process.respawn()?;
        wait_healthy(&mut self.process, self.monitor_port).await
    }
}

/// A server this kit started, with the controls of its backend.
enum Controlled<'a> {
    Process(&'a mut Managed),
    #[cfg(feature = "containers")]
    Container(&'a mut crate::containers::NatsContainer),
}

fn external() -> Error {
    Error::ExternalServer {
        server: SERVER,
        env: ENV_URL,
    }
}

/// The `nats-server` binary to run, checked to be version 2.10 or newer.
///
/// Lookup order: `nats_server_bin` (the value of `NATS_SERVER_BIN`, passed in so it can be
/// tested without touching the environment; when set it must be right, there is no fallback),
/// then `<workspace>/.tools/bin/nats-server` (what `make tools` installs), then `PATH`.
/// Fails with the one-line [`Error::NatsServerNotFound`] or [`Error::NatsServerTooOld`].
pub fn find_nats_server(nats_server_bin: Option<&OsStr>) -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = manifest_dir
        .parent()
        .unwrap_or(manifest_dir)
        .join(".tools/bin/nats-server");
    let path = if let Some(bin) = nats_server_bin.filter(|bin| !bin.is_empty()) {
        let bin = PathBuf::from(bin);
        if !is_executable(&bin) {
            return Err(Error::NatsServerNotFound {
                tried: format!("NATS_SERVER_BIN={}", bin.display()),
            });
        }
        bin
    } else if is_executable(&tools) {
        tools
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|bin| is_executable(bin))
            .ok_or_else(|| Error::NatsServerNotFound {
                tried: format!("NATS_SERVER_BIN, {}, PATH", tools.display()),
            })?
    };
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(Error::io(format!("running {} --version", path.display())))?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match parse_version(&printed) {
        Some((major, minor, _)) if (major, minor) >= MIN_VERSION => Ok(path),
        _ => Err(Error::NatsServerTooOld {
            path,
            version: printed.trim().to_owned(),
        }),
    }
}

/// `(major, minor, patch)` from `nats-server --version` output such as `nats-server: v2.15.1`.
fn parse_version(printed: &str) -> Option<(u32, u32, u32)> {
    printed.split_whitespace().find_map(|word| {
        let mut parts = word.strip_prefix('v').unwrap_or(word).split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next()?;
        let digits = patch
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(patch.len());
        Some((major, minor, patch[..digits].parse().ok()?))
    })
}

/// Host and port of the first server in a NATS URL (`nats://user:pass@host:port,...`).
fn host_port(url: &str) -> (&str, u16) {
    let first = url.split(',').next().unwrap_or(url).trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match host_port
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse().ok()?)))
    {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => (host_port, 4222),
    }
}

/// Polls `GET /healthz` on the monitor port until 200; fails early if the server exits.
async fn wait_healthy(process: &mut ServerProcess, monitor_port: u16) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(error) = process.exited_error() {
            return Err(error);
        }
        if healthz(monitor_port).await {
            return Ok(());
        }
        if start.elapsed() > READY_DEADLINE {
            return Err(process.not_ready_error(READY_DEADLINE));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One raw HTTP/1.0 `GET /healthz`; true on status 200.
pub(crate) async fn healthz(monitor_port: u16) -> bool {
    let request = async {
        let mut stream = TcpStream::connect(("127.0.0.1", monitor_port)).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, io::Error>(response)
    };
    match tokio::time::timeout(Duration::from_secs(2), request).await {
        Ok(Ok(response)) => is_status_200(&response),
        _ => false,
    }
}

fn is_status_200(response: &[u8]) -> bool {
    let status_line = response.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut words = status_line.split(|b| *b == b' ');
    words.next().is_some_and(|w| w.starts_with(b"HTTP/")) && words.next() == Some(b"200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.2"), Some((2, 11, 0)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn parses_nats_urls() {
        assert_eq!(host_port("nats://127.0.0.1:4333"), ("127.0.0.1", 4333));
        assert_eq!(
            host_port("nats://u:p@example.com:1,nats://b:2"),
            ("example.com", 1)
        );
        assert_eq!(host_port("localhost"), ("localhost", 4222));
        assert_eq!(host_port("tls://host/"), ("host", 4222));
    }

    #[test]
    fn recognises_status_200() {
        assert!(is_status_200(b"HTTP/1.0 200 OK\r\n\r\n{\"status\":\"ok\"}"));
        assert!(!is_status_200(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"));
        assert!(!is_status_200(b""));
    }
}
