//! The servers a scenario runs against, a fresh migrated database, the durability report,
//! JetStream streams, and the relay run in-process.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use relay::RelayConfig;
use relay::publisher::jetstream::{JetStreamPublisher, NatsConfig, StreamSpec, ensure_stream};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use testkit::{NatsServer, Postgres, PostgresConfig};
use tokio_util::sync::CancellationToken;

/// The relay's stream: captures every subject the scenarios enqueue on.
pub const STREAM: &str = "BENCH";
/// Subject filter of [`STREAM`].
pub const STREAM_SUBJECTS: &str = "bench.>";
/// The subject of every outbox row the scenarios write.
pub const SUBJECT: &str = "bench.event";
/// The raw baseline's stream, identical to [`STREAM`] but on other subjects.
pub const RAW_STREAM: &str = "BENCH_RAW";
/// Subject filter of [`RAW_STREAM`].
pub const RAW_STREAM_SUBJECTS: &str = "raw.>";
/// The subject the raw baseline publishes on.
pub const RAW_SUBJECT: &str = "raw.event";
/// The duplicate window of both streams (the server default).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Connections of the relay's pool, as the `relay` binary opens.
/// `shared_buffers` of the PostgreSQL the benchmarks start: 2 GB, a production-like size on
/// this 24 GB machine (PostgreSQL's own default is 128 MB, the test kit's 32 MB), so that the
/// 1.3 GB outbox of `relay-backlog` is not read back from the OS on every pass.
pub const SHARED_BUFFERS_MB: u32 = 2048;

/// A PostgreSQL and a `nats-server -js`, alive as long as this value.
pub struct Servers {
    pg: Postgres,
    nats: NatsServer,
    durable: bool,
}

/// A fresh database with the toolkit's schema, and a small pool on it for setup and polling.
pub struct Database {
    /// Its URL.
    pub url: String,
    /// A pool of a few connections for setup and polling (not the relay's or producers').
    pub pool: PgPool,
}

impl Servers {
    /// Starts both servers (or uses `DATABASE_URL` / `NATS_URL`). PostgreSQL keeps `fsync` on
    /// unless `fast_unsafe_db`, with [`SHARED_BUFFERS_MB`] of shared buffers.
    pub async fn start(fast_unsafe_db: bool) -> anyhow::Result<Servers> {
        Servers::start_with(fast_unsafe_db, false).await
    }

    /// As [`Servers::start`], with `wal_level=logical` when `logical_decoding` (replication
    /// slots and WAL senders for a logical replication reader).
    pub async fn start_with(
        fast_unsafe_db: bool,
        logical_decoding: bool,
    ) -> anyhow::Result<Servers> {
        let durable = !fast_unsafe_db;
        let (pg, nats) = tokio::join!(
            Postgres::start_with(PostgresConfig {
                durable,
                shared_buffers_mb: Some(SHARED_BUFFERS_MB),
                logical_decoding,
                ..PostgresConfig::default()
            }),
            NatsServer::start()
        );
        Ok(Servers {
            pg: pg.context("starting PostgreSQL")?,
            nats: nats.context("starting nats-server")?,
            durable,
        })
    }

    /// A new database with the toolkit's migrations applied.
    pub async fn database(&self) -> anyhow::Result<Database> {
        let url = self
            .pg
            .fresh_database()
            .await
            .context("creating a database")?;
        let pool = pool(&url, 3).await?;
        let mut conn = pool.acquire().await.context("connecting to PostgreSQL")?;
        migrations::migrate(&mut conn)
            .await
            .context("applying migrations")?;
        drop(conn);
        Ok(Database { url, pool })
    }

    /// The NATS settings the relay would use, with a connection name.
    pub fn nats_config(&self, name: &str) -> NatsConfig {
        NatsConfig {
            url: self.nats.url().to_owned(),
            name: Some(name.to_owned()),
            ..NatsConfig::default()
        }
    }

    /// The NATS server's URL.
    pub fn nats_url(&self) -> &str {
        self.nats.url()
    }

    /// A connected NATS client named `name`.
    pub async fn nats_client(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        self.nats_config(name)
            .connect()
            .await
            .context("connecting to NATS")
    }

    /// Creates (or verifies) a file-storage stream named `name` capturing `subjects`, with the
    /// settings `relay stream ensure` uses.
    pub async fn ensure_stream(
        &self,
        js: &jetstream::Context,
        name: &str,
        subjects: &str,
    ) -> anyhow::Result<()> {
        ensure_stream(
            js,
            &StreamSpec {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                duplicate_window: DUPLICATE_WINDOW,
                replicas: 1,
            },
        )
        .await
        .with_context(|| format!("creating stream {name}"))?;
        Ok(())
    }

    /// Prints the durability settings in force to stderr: PostgreSQL's `fsync`,
    /// `synchronous_commit` and friends, and the JetStream stream's storage.
    pub async fn report_durability(
        &self,
        db: &Database,
        js: &jetstream::Context,
    ) -> anyhow::Result<()> {
        let origin = if std::env::var("DATABASE_URL").is_ok_and(|u| !u.trim().is_empty()) {
            "external server from DATABASE_URL"
        } else if self.durable {
            "testkit server started durable (fsync and full_page_writes at their defaults)"
        } else {
            "testkit server started with --fast-unsafe-db (fsync=off, full_page_writes=off)"
        };
        let mut settings = Vec::new();
        for name in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_sync_method",
            "shared_buffers",
        ] {
            let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                .fetch_one(&db.pool)
                .await
                .with_context(|| format!("SHOW {name}"))?;
            settings.push(format!("{name}={value}"));
        }
        eprintln!("durability: PostgreSQL {} ({origin})", settings.join(" "));
        let mut stream = js
            .get_stream(STREAM)
            .await
            .with_context(|| format!("looking up stream {STREAM}"))?;
        let config = stream
            .info()
            .await
            .context("reading stream info")?
            .config
            .clone();
        eprintln!(
            "durability: JetStream stream {STREAM} storage={:?} replicas={} duplicate_window={:?}; \
             nats-server sync_interval at its default (2m: acked messages are written to the OS \
             at once and fsynced periodically, not per message)",
            config.storage, config.num_replicas, config.duplicate_window
        );
        Ok(())
    }
}

impl Database {
    /// Another pool on this database with `connections` connections.
    pub async fn pool(&self, connections: u32) -> anyhow::Result<PgPool> {
        pool(&self.url, connections).await
    }

    /// Creates the WAL relay's publication and slot (`relay slot create`).
    pub async fn create_slot(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("connecting")?;
        let slot = relay::wal::SlotName::new(relay::wal::SlotName::DEFAULT)?;
        relay::wal::store::create_slot(&mut conn, &slot)
            .await
            .context("creating the replication slot")?;
        Ok(())
    }

    /// Drops the replication slot and its publication (slot names are per server: the next
    /// database's slot needs the name).
    /// Waits (up to 30 s) for the stopped relay's walsender to let go of the slot first.
    pub async fn drop_slot(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("connecting")?;
        let slot = relay::wal::SlotName::new(relay::wal::SlotName::DEFAULT)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while relay::wal::store::status(&mut conn, &slot)
            .await?
            .is_some_and(|s| s.active)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        relay::wal::store::drop_slot(&mut conn, &slot)
            .await
            .context("dropping the replication slot")?;
        Ok(())
    }

    /// Rows not yet published (the WAL relay deletes the rows it relayed, so none is left).
    pub async fn unpublished(&self) -> anyhow::Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM outbox_message WHERE status <> 'published'")
            .fetch_one(&self.pool)
            .await
            .context("counting unpublished rows")
    }

    /// Unpublished rows, for a failure message: `pending=.. retrying=..` and the latest
    /// recorded publish error, if any.
    pub async fn backlog_summary(&self) -> anyhow::Result<String> {
        let (pending, retrying, error): (i64, i64, Option<String>) = sqlx::query_as(
            "SELECT count(*),
                        count(*) FILTER (WHERE attempts > 0),
                        max(last_error)
                 FROM outbox_message WHERE status <> 'published'",
        )
        .fetch_one(&self.pool)
        .await
        .context("summarising the backlog")?;
        let error = error.map_or_else(String::new, |e| format!(", last error: {e}"));
        Ok(format!("pending={pending} retrying={retrying}{error}"))
    }

    /// `VACUUM ANALYZE outbox_message`: the table statistics and visibility map autovacuum
    /// would give a table after a bulk insert, so the relay's first claims are planned as in
    /// steady state. Returns how long it took.
    pub async fn vacuum_analyze(&self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        sqlx::query("VACUUM ANALYZE outbox_message")
            .execute(&self.pool)
            .await
            .context("VACUUM ANALYZE outbox_message")?;
        Ok(start.elapsed())
    }
}

async fn pool(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .context("connecting to PostgreSQL")
}

/// Starts the servers ([`Servers::start_with`]), a fresh database, the relay's stream
/// [`STREAM`] and the raw baseline's [`RAW_STREAM`], and reports the durability settings:
/// the setup of the scenarios that compare the relay with raw publishing.
pub async fn start_with_both_streams(
    fast_unsafe_db: bool,
    logical_decoding: bool,
) -> anyhow::Result<(Servers, Database, jetstream::Context)> {
    let servers = Servers::start_with(fast_unsafe_db, logical_decoding).await?;
    let db = servers.database().await?;
    let js = jetstream::new(servers.nats_client("bench-admin").await?);
    servers.ensure_stream(&js, STREAM, STREAM_SUBJECTS).await?;
    servers
        .ensure_stream(&js, RAW_STREAM, RAW_STREAM_SUBJECTS)
        .await?;
    servers.report_durability(&db, &js).await?;
    Ok((servers, db, js))
}

/// The number of messages the stream `name` holds now (one `STREAM.INFO` request).
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> anyhow::Result<u64> {
    let stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("reading the info of stream {name}"))?;
    Ok(stream.cached_info().state.messages)
}

/// Empties a stream (between phases of one scenario).
pub async fn purge_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    js.get_stream(name)
        .await
        .with_context(|| format!("looking up stream {name}"))?
        .purge()
        .await
        .with_context(|| format!("purging stream {name}"))?;
    Ok(())
}

/// Polls `condition` every `every` until it returns `Some`, printing `progress` to stderr
/// about once a second; returns the value and the instant the condition was first seen
/// true. Fails after `deadline`, naming `what`.
pub async fn poll<T, F, Fut>(
    what: &str,
    every: Duration,
    deadline: Duration,
    mut condition: F,
) -> anyhow::Result<(T, Instant)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    let start = Instant::now();
    let mut last_report = start;
    loop {
        match condition().await? {
            Poll::Done(value) => return Ok((value, Instant::now())),
            Poll::Waiting(progress) => {
                if last_report.elapsed() >= Duration::from_secs(1) {
                    eprintln!("  {what}: {progress} after {:.1?}", start.elapsed());
                    last_report = Instant::now();
                }
            }
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// One evaluation of a [`poll`] condition.
pub enum Poll<T> {
    /// The condition holds.
    Done(T),
    /// Not yet; the text says how far along it is.
    Waiting(String),
}

/// The relay library running in this process, as `relay run` runs it.
pub struct RunningRelay {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), relay::Error>>,
    health: relay::Health,
}

impl RunningRelay {
    /// Builds the relay with `config` (its own pool and NATS connection, sized as the binary
    /// opens them) and starts it.
    pub async fn start(
        servers: &Servers,
        db: &Database,
        config: RelayConfig,
    ) -> anyhow::Result<RunningRelay> {
        RunningRelay::start_at(Source::Table, servers.nats.url(), &db.url, config).await
    }

    /// Starts the WAL relay (`--source wal`) in this process on the slot `relay::wal::SlotName::DEFAULT`
    /// of `db` (create it first with [`Database::create_slot`]).
    pub async fn start_wal(
        servers: &Servers,
        db: &Database,
        config: RelayConfig,
    ) -> anyhow::Result<RunningRelay> {
        RunningRelay::start_at(Source::Wal, servers.nats.url(), &db.url, config).await
    }

    /// Starts a relay reading `source` of the database at `database_url` and publishing to
    /// the NATS server at `nats_url`: what [`RunningRelay::start`] and
    /// [`RunningRelay::start_wal`] do, for a process that has only the two URLs
    /// ([`crate::relay_process`]).
    pub async fn start_at(
        source: Source,
        nats_url: &str,
        database_url: &str,
        config: RelayConfig,
    ) -> anyhow::Result<RunningRelay> {
        let nats = NatsConfig {
            url: nats_url.to_owned(),
            name: Some(config.instance_id.clone()),
            ..NatsConfig::default()
        };
        let client = nats
            .connect()
            .await
            .context("connecting the relay to NATS")?;
        let publisher =
            JetStreamPublisher::new(client, config.publish_timeout, config.max_in_flight);
        match source {
            Source::Table => {
                let pool = pool(database_url, config.min_connections() + 2).await?;
                let relay =
                    relay::Relay::new(config, pool, publisher).context("building the relay")?;
                Ok(RunningRelay::spawn(relay.health(), |stop| {
                    relay.run(async move { stop.cancelled().await })
                }))
            }
            Source::Wal => {
                let pool = pool(database_url, 4).await?;
                let settings = relay::wal::WalSettings {
                    slot: relay::wal::SlotName::new(relay::wal::SlotName::DEFAULT)?,
                    database_url: database_url.to_owned(),
                };
                let relay = relay::wal::WalRelay::new(config, settings, pool, publisher)
                    .context("building the WAL relay")?;
                Ok(RunningRelay::spawn(relay.health(), |stop| {
                    relay.run(async move { stop.cancelled().await })
                }))
            }
        }
    }

    /// Spawns `run` of a built relay, stopped by [`RunningRelay::stop`].
    fn spawn<F>(health: relay::Health, run: impl FnOnce(CancellationToken) -> F) -> RunningRelay
    where
        F: Future<Output = Result<(), relay::Error>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        RunningRelay { stop, task, health }
    }

    /// Waits until the relay owns all 256 partitions (it is alone) and is ready.
    pub async fn wait_ready(&self, deadline: Duration) -> anyhow::Result<()> {
        let health = self.health.clone();
        let all = usize::try_from(relay::store::PARTITIONS).unwrap_or(usize::MAX);
        poll(
            "the relay to own every partition",
            Duration::from_millis(5),
            deadline,
            || {
                let report = health.report();
                async move {
                    Ok(if report.ready && report.partitions_owned == all {
                        Poll::Done(())
                    } else {
                        Poll::Waiting(format!("{} partitions", report.partitions_owned))
                    })
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Waits until a WAL relay streams its slot.
    pub async fn wait_streaming(&self, deadline: Duration) -> anyhow::Result<()> {
        let health = self.health.clone();
        poll(
            "the WAL relay to stream its slot",
            Duration::from_millis(5),
            deadline,
            || {
                let report = health.report();
                async move {
                    Ok(if report.ready && report.streaming {
                        Poll::Done(())
                    } else {
                        Poll::Waiting("not streaming yet".to_owned())
                    })
                }
            },
        )
        .await?;
        Ok(())
    }

    /// The relay's health right now.
    pub fn health(&self) -> relay::HealthReport {
        self.health.report()
    }

    /// Runs until `shutdown` completes, then stops as [`RunningRelay::stop`] does; fails at
    /// once if the relay ends on its own before.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        tokio::select! {
            joined = &mut self.task => {
                joined
                    .context("the relay task panicked")?
                    .context("the relay failed")?;
                bail!("the relay stopped before it was told to")
            }
            () = shutdown => self.stop(deadline).await,
        }
    }

    /// Stops the relay and waits (up to `deadline`) for it to finish; past the deadline the
    /// task is aborted and this fails.
    pub async fn stop(mut self, deadline: Duration) -> anyhow::Result<()> {
        self.stop.cancel();
        match tokio::time::timeout(deadline, &mut self.task).await {
            Ok(joined) => {
                joined
                    .context("the relay task panicked")?
                    .context("the relay failed")?;
                Ok(())
            }
            Err(_) => {
                self.task.abort();
                bail!("the relay did not stop within {deadline:?}; aborted it")
            }
        }
    }
}

/// A relay configuration: the defaults with a readable instance id. `BENCH_BATCH_SIZE`,
/// `BENCH_MAX_IN_FLIGHT`, `BENCH_MAX_OPEN_CLAIMS`, `BENCH_RETENTION_SECS` and
/// `BENCH_VACUUM_MS` override the batch size, the PubAck window, the open claims, the
/// retention of published rows and the vacuum interval for tuning runs.
pub fn relay_config(instance_id: &str) -> RelayConfig {
    let defaults = RelayConfig::default();
    let from_env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    RelayConfig {
        instance_id: instance_id.to_owned(),
        batch_size: from_env("BENCH_BATCH_SIZE", defaults.batch_size),
        max_in_flight: from_env("BENCH_MAX_IN_FLIGHT", defaults.max_in_flight),
        max_open_claims: from_env("BENCH_MAX_OPEN_CLAIMS", defaults.max_open_claims),
        vacuum_interval: std::time::Duration::from_millis(from_env(
            "BENCH_VACUUM_MS",
            defaults.vacuum_interval.as_millis() as usize,
        ) as u64),
        retention: std::time::Duration::from_secs(from_env(
            "BENCH_RETENTION_SECS",
            defaults.retention.as_secs() as usize,
        ) as u64),
        ..defaults
    }
}

/// Where the relay under test reads the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The polling relay over `outbox_message`.
    Table,
    /// `relay run --source wal`, producers on log storage.
    Wal,
}

impl Source {
    /// `table` or `wal`, as the flag is written.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Table => "table",
            Source::Wal => "wal",
        }
    }
}

/// The largest resident set process `pid` has had so far, in MB (`VmHWM` in
/// `/proc/<pid>/status`), if readable.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// The resident set of process `pid` now, in MB (`VmRSS`), if readable.
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
