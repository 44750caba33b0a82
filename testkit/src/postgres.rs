//! A real PostgreSQL server per test, started from a cached `initdb` template.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::server_process::{RunAs, ServerProcess, Spec};
use crate::{Backend, Error, Result, free_port, sys};

const SERVER: &str = "postgres";
const ENV_URL: &str = "DATABASE_URL";
const READY_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts with a new port when the chosen one was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// Part of the template cache key: bump when the initdb options below change.
const TEMPLATE_REV: u32 = 1;
const INITDB_ARGS: [&str; 5] = [
    "--auth=trust",
    "--username=postgres",
    "--encoding=UTF8",
    "--locale=C",
    "--no-sync",
];

/// Options for a server started by [`Postgres::start_with`]; the default is the kit's fast
/// server (`fsync=off`, `full_page_writes=off`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Keep PostgreSQL's durable defaults (`fsync=on`, `full_page_writes=on`) instead of
    /// turning them off for speed: for benchmarks whose numbers must include flushing the WAL
    /// at commit. An external server (`DATABASE_URL`) keeps its own settings whatever this
    /// says. Defaults to false.
    pub durable: bool,
    /// `shared_buffers` in megabytes; `None` keeps the kit's 32 MB (small, because tests
    /// start many servers at once). Benchmarks give it a production-like size.
    pub shared_buffers_mb: Option<u32>,
    /// Start with `wal_level=logical` (and room for replication slots and WAL senders), so
    /// that logical decoding works: replication slots, `pg_logical_emit_message`, a relay
    /// that reads the write-ahead log. An external server (`DATABASE_URL`) keeps its own
    /// settings. Defaults to false (`wal_level=replica`, PostgreSQL's default).
    pub logical_decoding: bool,
    /// Run the server as a process or a container; `None` (the default) leaves it to
    /// `TESTKIT_BACKEND` (see [`Backend`]).
    pub backend: Option<Backend>,
}

/// A PostgreSQL server for one test: a child process on a free port, or the external server
/// named by `DATABASE_URL`.
///
/// A started server has a trust-authenticated superuser `postgres`. It runs with `fsync=off`
/// (unless started [`durable`](PostgresConfig::durable)), which loses nothing when processes
/// are killed (committed data is in the OS page cache) but would on an OS crash, which this
/// kit does not simulate. Dropping it (also during a panic)
/// stops the server (SIGQUIT), SIGKILLs whatever is left of its processes, and deletes its
/// directory. The process also dies if the test process is killed (`PR_SET_PDEATHSIG`).
pub struct Postgres {
    kind: Kind,
}

enum Kind {
    External {
        url: String,
        addr: SocketAddr,
    },
    Managed(Box<Managed>),
    #[cfg(feature = "containers")]
    Container(Box<crate::containers::PgContainer>),
}

struct Managed {
    /// Declared before `_dir`: the server is gone before its directory is deleted.
    process: ServerProcess,
    url: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    _dir: TempDir,
}

impl Postgres {
    /// Starts a server and waits until it answers `SELECT 1`, or — when `DATABASE_URL` is set
    /// and not empty — checks that server answers and uses it instead (no process control).
    ///
    /// The data directory is a copy of a template made once by `initdb` and cached in the temp
    /// dir (`testkit-pg-template-*`, keyed by server version and owner). When run as root the
    /// server runs as the `postgres` user (else `nobody`). Binaries: see
    /// [`find_postgres_bin_dir`]. Fails with the log tail if not ready within 30 s.
    pub async fn start() -> Result<Postgres> {
        Self::start_with(PostgresConfig::default()).await
    }

    /// [`start`](Self::start) with options: `config.durable` keeps `fsync` and
    /// `full_page_writes` on. With `DATABASE_URL` set, that server is used as it is configured.
    pub async fn start_with(config: PostgresConfig) -> Result<Postgres> {
        match std::env::var(ENV_URL) {
            Ok(url) if !url.trim().is_empty() => Self::external(url).await,
            _ => match Backend::resolve(config.backend)? {
                Backend::Process => Self::start_managed(config).await,
                #[cfg(feature = "containers")]
                Backend::Containers => Ok(Postgres {
                    kind: Kind::Container(Box::new(
                        crate::containers::PgContainer::start(&config).await?,
                    )),
                }),
                #[cfg(not(feature = "containers"))]
                Backend::Containers => unreachable!("Backend::resolve refuses containers"),
            },
        }
    }

    async fn external(url: String) -> Result<Postgres> {
        let options: PgConnectOptions = url.parse().map_err(Error::sql("parsing DATABASE_URL"))?;
        let (host, port) = (options.get_host(), options.get_port());
        let addr = (host, port)
            .to_socket_addrs()
            .and_then(|mut addrs| addrs.next().ok_or_else(|| io::Error::other("no address")))
            .map_err(Error::io(format!(
                "resolving {host}:{port} from DATABASE_URL"
            )))?;
        let mut conn = PgConnection::connect(&url)
            .await
            .map_err(Error::sql("connecting to DATABASE_URL"))?;
        sqlx::query("SELECT 1")
            .execute(&mut conn)
            .await
            .map_err(Error::sql("SELECT 1 on DATABASE_URL"))?;
        let _ = conn.close().await;
        Ok(Postgres {
            kind: Kind::External { url, addr },
        })
    }

    async fn start_managed(config: PostgresConfig) -> Result<Postgres> {
        let run_as = RunAs::unprivileged();
        let dir = tempfile::Builder::new()
            .prefix("testkit-pg-")
            .tempdir()
            .map_err(Error::io("creating a temp dir for PostgreSQL"))?;
        let root = dir.path().to_owned();
        let bin_dir = tokio::task::spawn_blocking(move || prepare(run_as, &root))
            .await
            .map_err(|e| {
                Error::io("preparing a PostgreSQL data directory")(io::Error::other(e))
            })??;
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let mut process = ServerProcess::spawn(Spec {
                server: SERVER,
                program: bin_dir.join("postgres"),
                args: server_args(&data_dir, &socket_dir, port, &config),
                cwd: dir.path().to_owned(),
                log: dir.path().join("postgres.log"),
                run_as,
                env: Vec::new(),
                drop_signal: sys::SIGQUIT,
            })?;
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            match wait_ready(&mut process, &url).await {
                Ok(()) => {
                    let addr = SocketAddr::from(([127, 0, 0, 1], port));
                    let managed = Managed {
                        process,
                        url,
                        addr,
                        data_dir,
                        socket_dir,
                        _dir: dir,
                    };
                    return Ok(Postgres {
                        kind: Kind::Managed(Box::new(managed)),
                    });
                }
                Err(e) if e.is_port_conflict() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(Error::NotRunning { server: SERVER }))
    }

    /// The admin URL: `postgres://postgres@127.0.0.1:<port>/postgres` (or `DATABASE_URL`).
    pub fn url(&self) -> &str {
        match &self.kind {
            Kind::External { url, .. } => url,
            Kind::Managed(m) => &m.url,
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.url(),
        }
    }

    /// The server's TCP address; e.g. the upstream of a [`TcpProxy`](crate::TcpProxy).
    /// Stable across [`restart`](Self::restart), for a process and a container alike.
    pub fn addr(&self) -> SocketAddr {
        match &self.kind {
            Kind::External { addr, .. } => *addr,
            Kind::Managed(m) => m.addr,
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.addr(),
        }
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Creates a new, empty database `test_<uuid>` and returns its URL (the admin URL with the
    /// database replaced). Each call gives a different database. On an external server the
    /// databases are left behind; their `test_` prefix makes them easy to drop.
    pub async fn fresh_database(&self) -> Result<String> {
        let name = format!("test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(self.url())
            .await
            .map_err(Error::sql("connecting to create a test database"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .map_err(Error::sql(format!("CREATE DATABASE {name}")))?;
        let _ = conn.close().await;
        Ok(url_with_database(self.url(), &name))
    }

    /// SIGKILLs the postmaster and every backend at once, like a crash of the machine's
    /// PostgreSQL: open connections break and new ones are refused. Returns when
    /// all its processes are gone. Committed data survives ([`restart`](Self::restart)).
    pub fn kill(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.process.kill(),
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.kill(),
        }
    }

    /// Fast shutdown (SIGINT: backends are terminated, a checkpoint is written); returns when
    /// all processes have exited (SIGKILLs them after 30 s and fails).
    pub async fn stop(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.process.stop(sys::SIGINT, STOP_DEADLINE).await,
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.stop("SIGINT", STOP_DEADLINE).await,
        }
    }

    /// Immediate shutdown (SIGQUIT: no checkpoint, crash recovery on restart); returns when all
    /// processes have exited.
    pub async fn stop_immediate(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.process.stop(sys::SIGQUIT, STOP_DEADLINE).await,
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.stop("SIGQUIT", STOP_DEADLINE).await,
        }
    }

    /// Starts the server again on the same data directory and port, and waits until it
    /// answers `SELECT 1` (30 s deadline). A running server is first stopped fast; after
    /// [`kill`](Self::kill) the stale lock files are removed (all old processes are gone by
    /// then) so that PostgreSQL cannot mistake a reused pid for a live postmaster. A container
    /// is started again with its file system on the same host port.
    pub async fn restart(&mut self) -> Result<()> {
        match self.controlled()? {
            Controlled::Process(m) => m.restart().await,
            #[cfg(feature = "containers")]
            Controlled::Container(c) => c.restart(STOP_DEADLINE).await,
        }
    }

    /// Freezes the postmaster and all backends (SIGSTOP, postmaster first): connections
    /// stay open, queries and new connections hang until [`resume`](Self::resume).
    pub fn pause(&self) -> Result<()> {
        match &self.kind {
            Kind::Managed(m) => m.process.pause(),
            #[cfg(feature = "containers")]
            Kind::Container(c) => c.pause(),
            Kind::External { .. } => Err(external()),
        }
    }

    /// Continues a paused server (SIGCONT to the backends and the postmaster).
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
    /// [`Postgres::restart`] for a process: stop (or clean up after a kill), remove stale
    /// lock files, respawn, wait for `SELECT 1`.
    async fn restart(&mut self) -> Result<()> {
        if self.process.is_running() {
            self.process.stop(sys::SIGINT, STOP_DEADLINE).await?;
        } else {
            // Exited by itself: make sure nothing of the old server is left.
            let _ = self.process.kill();
        }
        let port = self.addr.port();
        for stale in [
            self.data_dir.join("postmaster.pid"),
            self.socket_dir.join(format!(".s.PGSQL.{port}.lock")),
            self.socket_dir.join(format!(".s.PGSQL.{port}")),
        ] {
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("removing {}", stale.display()))(e));
                }
                _ => {}
            }
        }
        self.process.respawn()?;
        wait_ready(&mut self.process, &self.url).await
    }
}

/// A server this kit started, with the controls of its backend.
enum Controlled<'a> {
    Process(&'a mut Managed),
    #[cfg(feature = "containers")]
    Container(&'a mut crate::containers::PgContainer),
}

fn external() -> Error {
    Error::ExternalServer {
        server: SERVER,
        env: ENV_URL,
    }
}

/// The directory holding the `postgres` and `initdb` binaries.
///
/// Lookup order: `pg_bin` (the value of `PG_BIN`, passed in so it can be tested without
/// touching the environment; when set it must be right, there is no fallback), then the
/// highest `/usr/lib/postgresql/<version>/bin`, then `pg_config --bindir`, then `PATH`.
/// Fails with the one-line [`Error::PostgresNotFound`].
pub fn find_postgres_bin_dir(pg_bin: Option<&OsStr>) -> Result<PathBuf> {
    if let Some(dir) = pg_bin.filter(|dir| !dir.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        return Err(Error::PostgresNotFound {
            tried: format!("PG_BIN={}", dir.display()),
        });
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions
        .into_iter()
        .rev()
        .find(|(_, dir)| has_server_binaries(dir))
    {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|dir| has_server_binaries(dir)) {
        return Ok(dir);
    }
    Err(Error::PostgresNotFound {
        tried: "PG_BIN, /usr/lib/postgresql/*/bin, pg_config --bindir, PATH".into(),
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["postgres", "initdb"]
        .iter()
        .all(|name| is_executable(&dir.join(name)))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn server_args(
    data_dir: &Path,
    socket_dir: &Path,
    port: u16,
    config: &PostgresConfig,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "-D".into(),
        data_dir.into(),
        "-p".into(),
        port.to_string().into(),
        "-h".into(),
        "127.0.0.1".into(),
        "-k".into(),
        socket_dir.into(),
    ];
    // Never synchronous_commit=off: a killed server would lose acknowledged commits.
    let fast: &[&str] = if config.durable {
        &[]
    } else {
        &["fsync=off", "full_page_writes=off"]
    };
    for setting in fast {
        args.extend(["-c".into(), (*setting).into()]);
    }
    let buffers = config.shared_buffers_mb.unwrap_or(32);
    args.extend(["-c".into(), format!("shared_buffers={buffers}MB").into()]);
    for setting in logical_decoding_settings(config) {
        args.extend(["-c".into(), setting.into()]);
    }
    args
}

/// The settings [`PostgresConfig::logical_decoding`] adds (none when it is off).
pub(crate) fn logical_decoding_settings(config: &PostgresConfig) -> &'static [&'static str] {
    if config.logical_decoding {
        &[
            "wal_level=logical",
            "max_replication_slots=16",
            "max_wal_senders=16",
        ]
    } else {
        &[]
    }
}

/// Polls until the server answers `SELECT 1`; fails early if it exits.
async fn wait_ready(process: &mut ServerProcess, url: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(error) = process.exited_error() {
            return Err(error);
        }
        if select_one(url).await {
            return Ok(());
        }
        if start.elapsed() > READY_DEADLINE {
            return Err(process.not_ready_error(READY_DEADLINE));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(crate) async fn select_one(url: &str) -> bool {
    let attempt = async {
        let mut conn = PgConnection::connect(url).await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        conn.close().await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(()))
    )
}

/// Blocking: finds the binaries and fills `root` with `data/` (a template copy) and `sock/`,
/// owned by `run_as`. Returns the binary directory.
fn prepare(run_as: Option<RunAs>, root: &Path) -> Result<PathBuf> {
    let bin_dir = find_postgres_bin_dir(std::env::var_os("PG_BIN").as_deref())?;
    let template = template(&bin_dir, run_as)?;
    let data_dir = root.join("data");
    copy_tree(&template, &data_dir, run_as).map_err(Error::io(format!(
        "copying {} to {}",
        template.display(),
        data_dir.display()
    )))?;
    let socket_dir = root.join("sock");
    fs::create_dir(&socket_dir).map_err(Error::io(format!("creating {}", socket_dir.display())))?;
    if let Some(user) = run_as {
        user.chown(root)?;
        user.chown(&socket_dir)?;
    }
    Ok(bin_dir)
}

/// Serialises template creation within the process; across processes the rename decides.
static TEMPLATE_LOCK: Mutex<()> = Mutex::new(());

/// A pristine `initdb` data directory, cached in the temp dir and keyed by template revision,
/// server version and owner. Built at most once: in a staging dir, then renamed into place
/// atomically (a concurrent builder's rename fails and its copy is discarded).
fn template(bin_dir: &Path, run_as: Option<RunAs>) -> Result<PathBuf> {
    let out = Command::new(bin_dir.join("postgres"))
        .arg("--version")
        .output()
        .map_err(Error::io("running postgres --version"))?;
    let version: String = String::from_utf8_lossy(&out.stdout)
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let owner = run_as.map_or_else(sys::euid, |user| user.uid);
    let tmp = std::env::temp_dir();
    let path = tmp.join(format!(
        "testkit-pg-template-r{TEMPLATE_REV}-{version}-uid{owner}"
    ));
    let ready = |path: &Path| path.join("PG_VERSION").is_file();
    if ready(&path) {
        return Ok(path);
    }
    let _guard = TEMPLATE_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if ready(&path) {
        return Ok(path);
    }
    let staging = tempfile::Builder::new()
        .prefix("testkit-pg-initdb-")
        .tempdir_in(&tmp)
        .map_err(Error::io("creating a staging dir for initdb"))?;
    if let Some(user) = run_as {
        user.chown(staging.path())?;
    }
    let data = staging.path().join("data");
    let mut initdb = Command::new(bin_dir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(INITDB_ARGS)
        .current_dir(staging.path());
    if let Some(user) = run_as {
        initdb.uid(user.uid).gid(user.gid);
    }
    let out = initdb.output().map_err(Error::io("running initdb"))?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            what: format!("initdb -D {}", data.display()),
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    match fs::rename(&data, &path) {
        Ok(()) => Ok(path),
        Err(_) if ready(&path) => Ok(path),
        Err(e) => Err(Error::io(format!(
            "renaming {} to {}",
            data.display(),
            path.display()
        ))(e)),
    }
}

/// Copies a directory tree (regular files and directories, with their permission bits),
/// giving every copy to `owner` when set.
fn copy_tree(src: &Path, dst: &Path, owner: Option<RunAs>) -> io::Result<()> {
    fs::create_dir(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &to, owner)?;
        } else {
            fs::copy(entry.path(), &to)?;
            if let Some(user) = owner {
                std::os::unix::fs::chown(&to, Some(user.uid), Some(user.gid))?;
            }
        }
    }
    fs::set_permissions(dst, fs::metadata(src)?.permissions())?;
    if let Some(user) = owner {
        std::os::unix::fs::chown(dst, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// `url` with its database (path) replaced by `database`, query string kept.
fn url_with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_of_a_url() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/db",
            ),
            (
                "postgres://u:p@host/x?sslmode=disable",
                "postgres://u:p@host/db?sslmode=disable",
            ),
            ("postgres://u@host:1", "postgres://u@host:1/db"),
            (
                "postgresql://host?application_name=a",
                "postgresql://host/db?application_name=a",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(url_with_database(url, "db"), expected, "{url}");
        }
    }
}
