//! The one error type of the crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Result alias used by every fallible function of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while starting or controlling a test server.
///
/// `Debug` prints the same text as `Display`, so that `.expect("...")` in a test shows the
/// readable message (including server log tails) instead of an escaped struct dump.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable `nats-server` binary was found; the message is one line naming the fix.
    #[error(
        "nats-server 2.15.1 not found (tried {tried}): run `make tools` (installs it into .tools/bin)"
    )]
    NatsServerNotFound {
        /// Where the lookup looked, in order.
        tried: String,
    },
    /// The `nats-server` found is older than 2.10 (JetStream API this workspace relies on).
    #[error(
        "nats-server at {} is too old ({version:?}, need 2.10 or newer): run `make tools` (installs nats-server 2.15.1 into .tools/bin)",
        path.display()
    )]
    NatsServerTooOld {
        /// The binary that was rejected.
        path: PathBuf,
        /// What `nats-server --version` printed.
        version: String,
    },
    /// No directory holding both `postgres` and `initdb` was found; the message is one line.
    #[error(
        "PostgreSQL server binaries not found (tried {tried}): run `apt-get install postgresql` (make test does this when root)"
    )]
    PostgresNotFound {
        /// Where the lookup looked, in order.
        tried: String,
    },
    /// A process control (kill, stop, restart, pause, ...) or a custom configuration was
    /// requested for a server that testkit did not start (`DATABASE_URL` / `NATS_URL` is set).
    #[error(
        "{server} is an external server ({env} is set): this needs a server started by testkit, so unset {env}"
    )]
    ExternalServer {
        /// `"postgres"` or `"nats-server"`.
        server: &'static str,
        /// The environment variable that selected the external server.
        env: &'static str,
    },
    /// A control that needs a running process was called after `kill()`/`stop()`.
    #[error("{server} is not running (it was killed or stopped): call restart() first")]
    NotRunning {
        /// `"postgres"` or `"nats-server"`.
        server: &'static str,
    },
    /// The server process exited while testkit waited for it to become ready.
    #[error("{server} exited during startup ({status}); log tail:\n{log_tail}")]
    Exited {
        /// `"postgres"` or `"nats-server"`.
        server: &'static str,
        /// The exit status as printed by std.
        status: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The server did not become ready before the deadline.
    #[error("{server} not ready after {waited:?}; log tail:\n{log_tail}")]
    NotReady {
        /// `"postgres"` or `"nats-server"`.
        server: &'static str,
        /// How long testkit waited.
        waited: Duration,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A condition polled by [`wait_until`](crate::wait_until) or [`wait_for`](crate::wait_for)
    /// (or a shutdown) did not hold in time.
    #[error(
        "timed out after {waited:?} waiting for {what}{}",
        .last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Timeout {
        /// What was awaited, as given by the caller.
        what: String,
        /// The deadline that passed.
        waited: Duration,
        /// The error of the last evaluation of a [`wait_for`](crate::wait_for) condition that
        /// failed, if any did (`None` for every other wait).
        last_error: Option<String>,
    },
    /// A helper command (such as `initdb`) exited unsuccessfully.
    #[error("{what} failed ({status}):\n{output}")]
    CommandFailed {
        /// The command, e.g. `"initdb"`.
        what: String,
        /// The exit status as printed by std.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// The backend asked for cannot be used: an unknown `TESTKIT_BACKEND`, or containers
    /// without the `containers` feature.
    #[error("{reason}")]
    Backend {
        /// One line naming the fix.
        reason: String,
    },
    /// A Docker command of the container backend failed (no daemon, an image that cannot be
    /// found or pulled, a container that exited).
    #[error("{what}: {detail}")]
    Container {
        /// What testkit was doing, e.g. `"docker run outbox-toolkit/postgres:15-bookworm"`.
        what: String,
        /// What Docker said (its stderr), or the container's log tail.
        detail: String,
    },
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What testkit was doing.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A database operation failed.
    #[error("{what}: {source}")]
    Sql {
        /// What testkit was doing.
        what: String,
        /// The underlying error.
        source: sqlx::Error,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// Wraps an I/O error with what testkit was doing.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Wraps a database error with what testkit was doing.
    pub(crate) fn sql(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
        let what = what.into();
        move |source| Error::Sql { what, source }
    }

    /// True when a server exited at startup because its port was taken (worth a retry).
    pub(crate) fn is_port_conflict(&self) -> bool {
        matches!(self, Error::Exited { log_tail, .. }
            if log_tail.to_ascii_lowercase().contains("address already in use"))
    }
}
