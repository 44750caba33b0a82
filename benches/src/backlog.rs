//! `relay-backlog`: does the relay slow down when the backlog is large?
//!
//! Two phases, each on a fresh database and an emptied stream, with the relay in-process at
//! its default configuration:
//! - small: `small_events` rows; the rate is over the whole backlog (first row claimed to the
//!   stream holding all of them).
//! - large: `events` rows; the rate is over the first `measure` rows published, while the
//!   rest of the backlog is still waiting behind them. Draining all of it would mix in the
//!   rates of an ever smaller backlog, and take minutes; the first rows show the per-claim
//!   cost with the full backlog in the table.
//!
//! Both rates count messages stored in the stream (PubAcks) per second from the relay's start.
//! A phase's window is capped at `max_seconds`: a relay that cannot reach the target count in
//! time is measured over what it published, and the run says so on stderr.
//! Backlogs are written by `INSERT ... SELECT generate_series` in chunks (timed as the fill),
//! then `VACUUM ANALYZE` (as autovacuum would after a bulk load) and a `CHECKPOINT` (so that
//! the checkpoint the fill's WAL triggers does not land in the measurement), with random (v4)
//! ids: the relay does not order by id.
//!
//! With `--source wal` the phase's database gets the replication slot first, the backlog is
//! log messages (`SELECT outbox_emit(...) FROM generate_series`, same chunks, one transaction
//! each), and the relay is the WAL relay: the backlog is WAL the slot retains, not rows. The
//! slot is dropped after the phase (slot names are per server).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;

use crate::env::{self, Database, RunningRelay, Servers};
use crate::stats;

/// What `relay-backlog` measures.
#[derive(Debug, Clone)]
pub struct BacklogConfig {
    /// Rows of the large backlog. Defaults to 1 000 000.
    pub events: usize,
    /// Rows of the small backlog. Defaults to 10 000.
    pub small_events: usize,
    /// Rows of the large backlog the rate is measured over. Defaults to 100 000.
    pub measure: usize,
    /// Payload bytes per row. Defaults to 1024.
    pub payload: usize,
    /// Distinct partition keys, assigned round-robin. Defaults to 1000.
    pub keys: usize,
    /// Longest measurement window per phase: when it ends before the target count, the rate
    /// is over the rows published so far (and the run says so). Defaults to 120 s.
    pub max_seconds: u64,
    /// The relay's source. Defaults to the table.
    pub source: env::Source,
}

impl Default for BacklogConfig {
    fn default() -> Self {
        BacklogConfig {
            events: 1_000_000,
            small_events: 10_000,
            measure: 100_000,
            payload: 1024,
            keys: 1000,
            max_seconds: 120,
            source: env::Source::Table,
        }
    }
}

/// Rows per fill statement (each its own transaction).
const FILL_CHUNK: usize = 100_000;

const FILL: &str = "INSERT INTO outbox_message
        (id, subject, event_type, source, partition_key, occurred_at, headers, payload)
    SELECT gen_random_uuid(), $1, $2, $3, 'key-' || (g % $4), now(), '{}'::jsonb, $5
    FROM generate_series($6::bigint, $7::bigint) AS g";

const EMIT: &str = "SELECT count(outbox_emit($1, $2, $3, 'key-' || (g % $4), $5))
    FROM generate_series($6::bigint, $7::bigint) AS g";

/// Runs the scenario; returns `relay-backlog small_eps=<n> large_eps=<n> ratio=<r>
/// source=<table|wal>`.
pub async fn run(config: &BacklogConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if [
        config.events,
        config.small_events,
        config.measure,
        config.keys,
    ]
    .contains(&0)
        || config.max_seconds == 0
    {
        bail!(
            "relay-backlog needs --events, --small-events, --measure, --keys and --max-seconds above 0"
        );
    }
    let measure = config.measure.min(config.events);
    let servers = Servers::start_with(fast_unsafe_db, config.source == env::Source::Wal).await?;
    let js = jetstream::new(servers.nats_client("bench-admin").await?);
    servers
        .ensure_stream(&js, env::STREAM, env::STREAM_SUBJECTS)
        .await?;
    eprintln!(
        "relay-backlog: small {} rows (all measured), large {} rows (first {measure} measured), {} B payload, {} keys, source {}",
        config.small_events,
        config.events,
        config.payload,
        config.keys,
        config.source.as_str()
    );

    let small = phase(&servers, &js, config, "small", config.small_events, None).await?;
    let large = phase(&servers, &js, config, "large", config.events, Some(measure)).await?;
    Ok(format!(
        "relay-backlog small_eps={small:.0} large_eps={large:.0} ratio={:.2} source={}",
        stats::ratio(large, small),
        config.source.as_str()
    ))
}

/// Fills a fresh database with `rows`, runs the relay until `measure` (default: all) rows are
/// in the stream; returns that rate.
async fn phase(
    servers: &Servers,
    js: &jetstream::Context,
    config: &BacklogConfig,
    name: &str,
    rows: usize,
    measure: Option<usize>,
) -> anyhow::Result<f64> {
    let db = servers.database().await?;
    let wal = config.source == env::Source::Wal;
    if wal {
        db.create_slot().await?;
    }
    if name == "small" {
        servers.report_durability(&db, js).await?;
    }
    let fill = fill(&db, config, rows).await?;
    let vacuum = db.vacuum_analyze().await?;
    // The fill wrote up to a few GB of WAL; without a checkpoint here, the one it triggers
    // would run during the measurement and charge the fill's writes to the relay.
    let checkpoint = Instant::now();
    let checkpointed = sqlx::query("CHECKPOINT").execute(&db.pool).await;
    eprintln!(
        "relay-backlog: {name}: filled {rows} rows in {fill:.2?} ({:.0} rows/s), VACUUM ANALYZE {vacuum:.2?}, CHECKPOINT {}",
        stats::per_second(rows as u64, fill),
        match checkpointed {
            Ok(_) => format!("{:.2?}", checkpoint.elapsed()),
            Err(e) => format!("not run ({e})"),
        }
    );
    env::purge_stream(js, env::STREAM).await?;
    let target = measure.unwrap_or(rows) as u64;

    let window = Duration::from_secs(config.max_seconds);
    let start = Instant::now();
    let relay_config = env::relay_config(&format!("bench-relay-backlog-{name}"));
    let relay = if wal {
        RunningRelay::start_wal(servers, &db, relay_config).await?
    } else {
        RunningRelay::start(servers, &db, relay_config).await?
    };
    let mut last_report = start;
    let (published, end) = loop {
        let n = env::stream_messages(js, env::STREAM).await?;
        let now = Instant::now();
        if n >= target || now - start >= window {
            break (n.min(target), now);
        }
        if now - last_report >= Duration::from_secs(1) {
            eprintln!(
                "  {name} backlog publishing: {n}/{target} in the stream after {:.1?}",
                now - start
            );
            last_report = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = end - start;
    let eps = stats::per_second(published, elapsed);
    if published < target {
        eprintln!(
            "relay-backlog: {name}: window cut at {window:?}: only {published} of the first {target} rows were published; the rate is over those"
        );
    }
    let stop_start = Instant::now();
    if let Err(e) = relay.stop(Duration::from_secs(30)).await {
        // A claim still scanning the backlog; the database is discarded anyway.
        eprintln!("relay-backlog: {name}: {e:#}");
    }
    eprintln!(
        "relay-backlog: {name}: {published} of {rows} published in {elapsed:.2?} ({eps:.0}/s); relay stopped in {:.2?}",
        stop_start.elapsed()
    );
    if wal {
        db.drop_slot().await?;
    }
    db.pool.close().await;
    Ok(eps)
}

/// Inserts `rows` valid outbox rows in chunks; returns how long it took.
async fn fill(db: &Database, config: &BacklogConfig, rows: usize) -> anyhow::Result<Duration> {
    let payload = vec![b'x'; config.payload];
    let keys = i64::try_from(config.keys).context("--keys is too large")?;
    let start = Instant::now();
    let mut done = 0usize;
    while done < rows {
        let end = rows.min(done + FILL_CHUNK);
        let statement = match config.source {
            env::Source::Table => FILL,
            env::Source::Wal => EMIT,
        };
        sqlx::query(statement)
            .bind(env::SUBJECT)
            .bind(crate::EVENT_TYPE)
            .bind(crate::SOURCE)
            .bind(keys)
            .bind(&payload)
            .bind(i64::try_from(done).context("row count")?)
            .bind(i64::try_from(end - 1).context("row count")?)
            .execute(&db.pool)
            .await
            .context("filling the outbox")?;
        done = end;
        if rows > FILL_CHUNK {
            eprintln!("  filled {done}/{rows} after {:.1?}", start.elapsed());
        }
    }
    Ok(start.elapsed())
}
