//! What the console reads and who may use it.

use std::time::Duration;

use sqlx::PgPool;

/// One service database: its outbox, relays and dead letters.
#[derive(Debug, Clone)]
pub struct Database {
    /// The name shown and used in URLs (`[a-z0-9_-]`, checked by [`Config::validate`]).
    pub name: String,
    /// Its connections.
    pub pool: PgPool,
}

impl Database {
    /// The database `name` at `pool`.
    pub fn new(name: impl Into<String>, pool: PgPool) -> Self {
        Database {
            name: name.into(),
            pool,
        }
    }
}

/// Who may use the console.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// Anyone who can reach it, recorded as `anonymous`: only behind a network boundary you
    /// trust (the binary binds to 127.0.0.1 by default).
    Open,
    /// HTTP basic authentication with this user and password.
    Basic {
        /// The user name (recorded in the audit trail).
        user: String,
        /// The password.
        password: String,
    },
    /// A proxy in front authenticates and names the user in this header; a request without
    /// it is refused. Only when nothing but the proxy can reach the console.
    TrustedHeader(String),
}

/// The console's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The databases, in the order shown.
    pub databases: Vec<Database>,
    /// Who may use it.
    pub access: Access,
    /// Retry and purge are allowed (else every POST is refused).
    pub allow_actions: bool,
    /// Dead-letter payloads are shown (else only their size).
    pub show_payloads: bool,
    /// The longest any query may run.
    pub statement_timeout: Duration,
    /// The relays' lease (`--lease-ttl`, 5 s by default): a heartbeat older than this is
    /// flagged.
    pub lease_ttl: Duration,
    /// The stream's duplicate window (2 min by default): an unpublished row older than this
    /// is flagged (a publish retried after it is not deduplicated). With a [`Config::broker`],
    /// the smallest window of its streams is used instead.
    pub duplicate_window: Duration,
    /// Dead letters per page.
    pub page_size: i64,
    /// The host names the console answers to (the `Host` header, port aside). Empty: with
    /// [`Access::Open`] or [`Access::TrustedHeader`], loopback names only (`localhost`,
    /// `127.0.0.1`, `[::1]`), so that a page on another site cannot reach it through DNS
    /// rebinding (and set the trusted header itself); with basic auth, any.
    pub allowed_hosts: Vec<String>,
    /// Where the router is mounted (`/console` for `Router::nest("/console", ..)`), for the
    /// links it renders; empty at the root.
    pub base_path: String,
    /// The secret that CSRF tokens are derived from (random when `None`: tokens then last
    /// as long as the process).
    pub csrf_secret: Option<Vec<u8>>,
    /// The NATS connection to read JetStream from (streams, durable consumers); without
    /// it the consumers page says so, and `duplicate_window` is taken as given.
    pub broker: Option<async_nats::Client>,
    /// The longest the broker may take to answer a page's questions.
    pub broker_timeout: Duration,
    /// How long the consumers keep inbox rows (their `inbox_retention`, 7 days by
    /// default): a durable that may still be delivered a message older than this is flagged
    /// (a handled message delivered again after its row is gone would run again).
    pub inbox_retention: Duration,
}

impl Config {
    /// Read-only, open access, payloads hidden, 5 s statement timeout, 50 letters a page.
    pub fn new(databases: Vec<Database>) -> Self {
        Config {
            databases,
            access: Access::Open,
            allow_actions: false,
            show_payloads: false,
            statement_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            page_size: 50,
            allowed_hosts: Vec::new(),
            base_path: String::new(),
            csrf_secret: None,
            broker: None,
            broker_timeout: Duration::from_secs(3),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// Checks the settings: at least one database, names unique and URL-safe, a page size
    /// of 1 to 1000, a non-zero statement timeout.
    pub fn validate(&self) -> Result<(), String> {
        if self.databases.is_empty() {
            return Err("no database: name at least one (--database name=url)".to_owned());
        }
        for (i, db) in self.databases.iter().enumerate() {
            let valid = !db.name.is_empty()
                && db.name.len() <= 63
                && db.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid {
                return Err(format!(
                    "database name {:?}: use 1 to 63 of a-z, 0-9, _ and -",
                    db.name
                ));
            }
            if self.databases[..i].iter().any(|d| d.name == db.name) {
                return Err(format!("database name {:?} is given twice", db.name));
            }
        }
        if !(1..=1000).contains(&self.page_size) {
            return Err(format!("page size {}: use 1 to 1000", self.page_size));
        }
        if !self.base_path.is_empty()
            && (!self.base_path.starts_with('/')
                || self.base_path.ends_with('/')
                || !self
                    .base_path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b)))
        {
            return Err(format!(
                "base path {:?}: empty, or like /console (no trailing slash)",
                self.base_path
            ));
        }
        if self.statement_timeout.is_zero() {
            return Err("the statement timeout must be above zero".to_owned());
        }
        Ok(())
    }
}
