//! The whole demo topology as separate OS processes: starting and stopping it.
//!
//! [`Stack::start`] starts (or reuses, when `DATABASE_URL` / `NATS_URL` are set) PostgreSQL
//! and nats-server, recreates the three databases `demo_orders`, `demo_inventory`,
//! `demo_email`, then starts order-service, inventory-service and email-service and a `relay`
//! sidecar for each service that publishes, waiting until each reports ready. Every process
//! logs to `<dir>/logs/<name>.log`; emails land in `<dir>/mail` unless SMTP is configured.
//!
//! Layout:
//! - this module: [`StackOptions`], [`Stack`], [`Stack::start`], [`Stack::stop`]
//! - `ready` (private): waiting until a process is ready on a port of its own
//! - `api` (private): the services' HTTP APIs as typed calls ([`Stack::seed`],
//!   [`Stack::place_order`], [`Stack::wait_terminal`], ...) and [`SEED_PRODUCTS`]
//! - `invariants` (private): [`Stack::check_invariants`] and [`Invariants`]

mod api;
mod invariants;
mod ready;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use demo_services::events;
use demo_services::order::PaymentSimulation;
use sqlx::PgPool;
use testkit::{NatsServer, Postgres, Process, ProcessSpec, TcpProxy};

pub use self::api::SEED_PRODUCTS;
pub use self::invariants::Invariants;
use self::ready::ready_on_own_port;

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Run directory: `logs/` and `mail/` go here (emptied first).
    pub dir: PathBuf,
    /// Where the `order-service`, `inventory-service` and `email-service` binaries are.
    pub bin_dir: PathBuf,
    /// The `relay` binary.
    pub relay_bin: PathBuf,
    /// HTTP ports of order-, email- and inventory-service; `None` picks free ports.
    pub ports: Option<[u16; 3]>,
    /// The payment simulation order-service runs with.
    pub payment: PaymentSimulation,
    /// `SMTP_URL` for email-service; `None` writes `.eml` files to `<dir>/mail`.
    pub smtp_url: Option<String>,
    /// Connect order-service's relay to the broker through a [`TcpProxy`] (for fault
    /// injection: latency, cuts); see [`Stack::order_relay_proxy`].
    pub proxy_order_relay: bool,
    /// Run a 3-node JetStream cluster on loopback with an R3 stream instead of one server.
    pub cluster: bool,
    /// Where the services' outboxes write and where the relays read them.
    pub source: Source,
    /// The saga stream's duplicate window (the services create the stream with it).
    pub duplicate_window: Duration,
}

/// Where the services' outboxes write and where the relays read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Rows of `outbox_message`, polled by `relay run` (the default).
    #[default]
    Table,
    /// The write-ahead log: services on log storage (`OUTBOX_STORAGE=log`), PostgreSQL with
    /// `wal_level=logical`, a slot per relay made by `relay slot create` before the relays
    /// start, and the relays streaming it (`relay run --source wal`).
    Wal,
}

impl Source {
    /// `table` or `wal`, as the relay's `--source` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Table => "table",
            Source::Wal => "wal",
        }
    }
}

/// The replication slot (and publication) of order-service's relay with [`Source::Wal`].
pub const ORDER_SLOT: &str = "order_relay";
/// The replication slot of inventory-service's relay with [`Source::Wal`].
pub const INVENTORY_SLOT: &str = "inventory_relay";

/// Base URLs of the running processes.
#[derive(Debug, Clone)]
pub struct Urls {
    /// order-service, e.g. `http://127.0.0.1:3001`.
    pub order: String,
    /// email-service.
    pub email: String,
    /// inventory-service.
    pub inventory: String,
    /// order-service's relay (health and metrics).
    pub order_relay: String,
    /// inventory-service's relay.
    pub inventory_relay: String,
}

/// Connections to the three databases (for checks; the services own them).
#[derive(Debug, Clone)]
pub struct Databases {
    /// order-service's.
    pub orders: PgPool,
    /// inventory-service's.
    pub inventory: PgPool,
    /// email-service's.
    pub email: PgPool,
}

/// The running topology. Dropping it kills every process (the services and relays before
/// the servers they use); [`Stack::stop`] stops them gracefully first.
pub struct Stack {
    /// order-service.
    pub order: Process,
    /// inventory-service.
    pub inventory: Process,
    /// email-service.
    pub email: Process,
    /// order-service's relay sidecar.
    pub order_relay: Process,
    /// inventory-service's relay sidecar.
    pub inventory_relay: Process,
    /// PostgreSQL (started here, or the external `DATABASE_URL` server).
    pub postgres: Postgres,
    /// nats-server (started here, or the external `NATS_URL` server); with `cluster`, the
    /// first node.
    pub nats: NatsServer,
    /// The other nodes of the cluster (empty without `cluster`).
    pub nats_peers: Vec<NatsServer>,
    /// The broker URL(s) the services and relays use (comma-separated for a cluster).
    pub nats_url: String,
    /// The proxy between order-service's relay and the broker, when asked for.
    pub order_relay_proxy: Option<TcpProxy>,
    /// Where everything listens.
    pub urls: Urls,
    /// The databases.
    pub db: Databases,
    /// Logs directory.
    pub log_dir: PathBuf,
    /// Mail directory (when not using SMTP).
    pub mail_dir: PathBuf,
    /// Where the outboxes write and the relays read.
    pub source: Source,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// `url` with its database name replaced by `name` (the query string, if any, is kept).
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("database URL without scheme")? + 3;
    let rest = &url[scheme_end..];
    let query_at = rest.find('?').unwrap_or(rest.len());
    let authority_end = rest[..query_at].find('/').unwrap_or(query_at);
    Ok(format!(
        "{}{}/{name}{}",
        &url[..scheme_end],
        &rest[..authority_end],
        &rest[query_at..]
    ))
}

/// How long deleting a stream left by a previous run may take (the broker may still be
/// starting).
const RESET_DEADLINE: Duration = Duration::from_secs(30);

/// Deletes the saga's stream (and with it the durable consumers) if a previous run left it
/// on the broker: each run starts from empty databases, so it must start from an empty
/// stream too.
async fn reset_stream(nats_url: &str) -> anyhow::Result<()> {
    let client = demo_services::platform::NatsConfig {
        url: nats_url.to_owned(),
        ..demo_services::platform::NatsConfig::default()
    }
    .connect()
    .await
    .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    testkit::wait_for(
        RESET_DEADLINE,
        &format!("the stream {} to be deleted", events::STREAM),
        || async {
            match js.delete_stream(events::STREAM).await {
                Ok(_) => Ok(Some(())),
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                            if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                    ) =>
                {
                    Ok(Some(()))
                }
                Err(e) => Err(e),
            }
        },
    )
    .await
    .with_context(|| format!("deleting the stream {}", events::STREAM))
}

/// `relay slot create --slot <slot>` on the database `database_url`.
async fn create_slot(
    relay_bin: &std::path::Path,
    database_url: &str,
    slot: &str,
) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(relay_bin)
        .args(["slot", "create", "--slot", slot])
        .env("DATABASE_URL", database_url)
        .env_remove("RELAY_SLOT")
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", relay_bin.display()))?;
    if !output.status.success() {
        bail!(
            "relay slot create exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn port_or_free(ports: Option<[u16; 3]>, i: usize) -> anyhow::Result<u16> {
    match ports {
        Some(p) => Ok(p[i]),
        None => Ok(testkit::free_port()?),
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

impl Stack {
    /// Starts everything and waits until each service and relay is ready.
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        for name in ["logs", "mail"] {
            let dir = options.dir.join(name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("emptying {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log_dir = options.dir.join("logs");
        let mail_dir = options.dir.join("mail");
        for bin in ["order-service", "inventory-service", "email-service"] {
            let path = options.bin_dir.join(bin);
            if !path.exists() {
                bail!(
                    "{} is missing: run `cargo build -p demo-services`",
                    path.display()
                );
            }
        }
        if !options.relay_bin.exists() {
            bail!(
                "{} is missing: run `cargo build -p outbox-toolkit-relay`",
                options.relay_bin.display()
            );
        }

        let brokers = async {
            if options.cluster {
                NatsServer::start_cluster(3).await
            } else {
                NatsServer::start().await.map(|n| vec![n])
            }
        };
        let postgres_config = testkit::PostgresConfig {
            logical_decoding: options.source == Source::Wal,
            ..testkit::PostgresConfig::default()
        };
        let (postgres, brokers) = tokio::join!(Postgres::start_with(postgres_config), brokers);
        let postgres = postgres.context("starting PostgreSQL")?;
        let mut brokers = brokers.context("starting nats-server")?;
        let nats_url = brokers
            .iter()
            .map(|b| b.url().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        let nats = brokers.remove(0);
        let nats_peers = brokers;
        reset_stream(&nats_url).await?;
        let replicas = if options.cluster { "3" } else { "1" };
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(postgres.url())
            .await
            .context("connecting to PostgreSQL")?;
        let mut urls_db = BTreeMap::new();
        for name in ["demo_orders", "demo_inventory", "demo_email"] {
            crate::store::recreate_database(&mut admin, name)
                .await
                .with_context(|| format!("creating database {name}"))?;
            urls_db.insert(name, with_database(postgres.url(), name)?);
        }
        drop(admin);

        let mut ports = [
            port_or_free(options.ports, 0)?,
            port_or_free(options.ports, 1)?,
            port_or_free(options.ports, 2)?,
        ];
        let fixed_ports = options.ports.is_some();
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let spawn = |name: &'static str,
                     program: PathBuf,
                     args: &[&str],
                     vars: Vec<(OsString, OsString)>| {
            Process::spawn(ProcessSpec {
                name,
                program,
                args: args.iter().map(OsString::from).collect(),
                env: vars,
                cwd: options.dir.clone(),
                log: log_dir.join(format!("{name}.log")),
            })
            .with_context(|| format!("starting {name}"))
        };
        let window = options.duplicate_window.as_secs().max(1).to_string();
        let storage = match options.source {
            Source::Table => "table",
            Source::Wal => "log",
        };
        let common = |db: &str, port: u16| {
            env(&[
                ("DATABASE_URL", db),
                ("NATS_URL", &nats_url),
                ("STREAM_REPLICAS", replicas),
                ("STREAM_DUPLICATE_WINDOW_SECS", &window),
                ("OUTBOX_STORAGE", storage),
                ("HTTP_ADDR", &format!("127.0.0.1:{port}")),
                ("RUST_LOG", "info,sqlx=warn,async_nats=warn"),
            ])
        };
        let spawn_order = |port: u16| {
            let mut vars = common(&urls_db["demo_orders"], port);
            vars.extend(env(&[
                ("PAYMENT_SEED", &options.payment.seed.to_string()),
                (
                    "PAYMENT_SUCCESS_RATE",
                    &options.payment.success_rate.to_string(),
                ),
            ]));
            spawn(
                "order-service",
                options.bin_dir.join("order-service"),
                &[],
                vars,
            )
        };
        let spawn_email = |port: u16| {
            let mut vars = common(&urls_db["demo_email"], port);
            match &options.smtp_url {
                Some(smtp) => vars.extend(env(&[("SMTP_URL", smtp)])),
                None => vars.extend(env(&[("MAIL_DIR", &mail_dir.to_string_lossy())])),
            }
            spawn(
                "email-service",
                options.bin_dir.join("email-service"),
                &[],
                vars,
            )
        };
        let spawn_inventory = |port: u16| {
            spawn(
                "inventory-service",
                options.bin_dir.join("inventory-service"),
                &[],
                common(&urls_db["demo_inventory"], port),
            )
        };
        // Started together, then each waited for (and moved if its port was taken).
        let mut order = spawn_order(ports[0])?;
        let mut email = spawn_email(ports[1])?;
        let mut inventory = spawn_inventory(ports[2])?;
        let fixed = fixed_ports;
        ready_on_own_port(
            "order-service",
            &mut order,
            &mut ports[0],
            fixed,
            spawn_order,
        )
        .await?;
        ready_on_own_port(
            "email-service",
            &mut email,
            &mut ports[1],
            fixed,
            spawn_email,
        )
        .await?;
        ready_on_own_port(
            "inventory-service",
            &mut inventory,
            &mut ports[2],
            fixed,
            spawn_inventory,
        )
        .await?;

        // The services applied the schema; the slots come before anything is written to the
        // log (log storage refuses to write while no slot exists).
        if options.source == Source::Wal {
            for (db, slot) in [
                ("demo_orders", ORDER_SLOT),
                ("demo_inventory", INVENTORY_SLOT),
            ] {
                create_slot(&options.relay_bin, &urls_db[db], slot)
                    .await
                    .with_context(|| format!("creating the slot {slot} in {db}"))?;
            }
        }

        let order_relay_proxy = if options.proxy_order_relay {
            Some(
                TcpProxy::start(nats.addr())
                    .await
                    .context("starting the relay proxy")?,
            )
        } else {
            None
        };
        let order_relay_nats = match &order_relay_proxy {
            Some(proxy) => format!("nats://{}", proxy.addr()),
            None => nats_url.clone(),
        };
        let mut relay_ports = [testkit::free_port()?, testkit::free_port()?];
        let subjects = events::STREAM_SUBJECTS.join(",");
        let relay_env = |db: &str, nats: &str, port: u16, id: &str, slot: &str| {
            env(&[
                ("RELAY_SOURCE", options.source.name()),
                ("RELAY_SLOT", slot),
                ("DATABASE_URL", db),
                ("NATS_URL", nats),
                ("RELAY_STREAM", events::STREAM),
                ("RELAY_STREAM_SUBJECTS", &subjects),
                ("RELAY_HTTP_ADDR", &format!("127.0.0.1:{port}")),
                ("RELAY_INSTANCE_ID", id),
                ("RELAY_LOG_FORMAT", "json"),
                // Published rows are kept an hour (the relay's default, pinned): the chaos
                // run's stream check reads them (`id`, `seq`, `stream`, `stream_seq`).
                ("RELAY_RETENTION", "1h"),
                // WAL runs use a 20 s duplicate window: a retry chain backing off to the
                // default 30 s during a broker pause would outlast it and store a legitimate
                // retry twice. Keep each pause well inside the window.
                (
                    "RELAY_RETRY_MAX_DELAY",
                    match options.source {
                        Source::Wal => "2s",
                        Source::Table => "30s",
                    },
                ),
                ("RUST_LOG", "info"),
            ])
        };
        let spawn_order_relay = |port: u16| {
            spawn(
                "order-relay",
                options.relay_bin.clone(),
                &["run"],
                relay_env(
                    &urls_db["demo_orders"],
                    &order_relay_nats,
                    port,
                    "order-relay",
                    ORDER_SLOT,
                ),
            )
        };
        let spawn_inventory_relay = |port: u16| {
            spawn(
                "inventory-relay",
                options.relay_bin.clone(),
                &["run"],
                relay_env(
                    &urls_db["demo_inventory"],
                    &nats_url,
                    port,
                    "inventory-relay",
                    INVENTORY_SLOT,
                ),
            )
        };
        let mut order_relay = spawn_order_relay(relay_ports[0])?;
        let mut inventory_relay = spawn_inventory_relay(relay_ports[1])?;
        ready_on_own_port(
            "order-relay",
            &mut order_relay,
            &mut relay_ports[0],
            false,
            spawn_order_relay,
        )
        .await?;
        ready_on_own_port(
            "inventory-relay",
            &mut inventory_relay,
            &mut relay_ports[1],
            false,
            spawn_inventory_relay,
        )
        .await?;

        let pool = |db: String| async move {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&db)
                .await
                .context("connecting to a demo database")
        };
        let db = Databases {
            orders: pool(urls_db["demo_orders"].clone()).await?,
            inventory: pool(urls_db["demo_inventory"].clone()).await?,
            email: pool(urls_db["demo_email"].clone()).await?,
        };
        Ok(Stack {
            postgres,
            nats,
            nats_peers,
            nats_url,
            order,
            inventory,
            email,
            order_relay,
            inventory_relay,
            order_relay_proxy,
            urls: Urls {
                order: url(ports[0]),
                email: url(ports[1]),
                inventory: url(ports[2]),
                order_relay: url(relay_ports[0]),
                inventory_relay: url(relay_ports[1]),
            },
            db,
            log_dir,
            mail_dir,
            source: options.source,
        })
    }

    /// SIGTERMs the relays and services (each finishes what it started), then stops the
    /// servers it started.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let deadline = Duration::from_secs(20);
        let mut problems = Vec::new();
        for (name, process) in [
            ("order-service", &mut self.order),
            ("inventory-service", &mut self.inventory),
            ("email-service", &mut self.email),
            ("order-relay", &mut self.order_relay),
            ("inventory-relay", &mut self.inventory_relay),
        ] {
            if process.is_running()
                && let Err(e) = process.terminate(deadline).await
            {
                problems.push(format!("{name}: {e}"));
            }
        }
        self.db.orders.close().await;
        self.db.inventory.close().await;
        self.db.email.close().await;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "not everything stopped cleanly: {}",
                problems.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        let cases = [
            ("postgres://u@h:5432/postgres", "postgres://u@h:5432/demo_x"),
            (
                "postgres://u@h:5432/postgres?sslmode=require",
                "postgres://u@h:5432/demo_x?sslmode=require",
            ),
            ("postgres://u@h:5432", "postgres://u@h:5432/demo_x"),
            (
                "postgres://u@h:5432?sslmode=disable",
                "postgres://u@h:5432/demo_x?sslmode=disable",
            ),
            (
                "postgres://?host=/run/pg",
                "postgres:///demo_x?host=/run/pg",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "demo_x").expect(url), expected);
        }
        assert!(with_database("no-scheme", "x").is_err());
    }
}
