//! `producer-overhead`: what an outbox enqueue adds to a business transaction.
//!
//! `concurrency` workers, each on its own connection, run back-to-back transactions:
//! `BEGIN; INSERT INTO orders ...; COMMIT` (plain), or the same with one `Outbox::enqueue` of
//! a typed event before `COMMIT` (outbox). After a one-second warm-up of each mode, each mode
//! runs for `seconds` in one-second slices interleaved plain, outbox, outbox, plain, ... so
//! that both see the same disk and checkpoint conditions (the WAL flush latency of a virtual
//! disk drifts by several times over tens of seconds). No relay runs: this is the producer's
//! cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use outbox::{Event, Outbox};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::env::Servers;
use crate::stats;

/// What `producer-overhead` measures.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Measured seconds per mode. Defaults to 10.
    pub seconds: u64,
    /// Concurrent workers (and connections) in both modes. Defaults to 8.
    pub concurrency: usize,
    /// Where the outbox writes: table rows, or the write-ahead log (log storage; the
    /// server then runs with `wal_level=logical` and a slot, and no relay reads it).
    /// Defaults to the table.
    pub storage: outbox::Storage,
    /// Enqueue with its own statement (`Outbox::enqueue`) or riding with `COMMIT`
    /// (`OutboxTransaction`). Defaults to its own statement.
    pub with_commit: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            seconds: 10,
            concurrency: 8,
            storage: outbox::Storage::Table,
            with_commit: false,
        }
    }
}

/// The business table of the scenario.
const CREATE_ORDERS: &str = "CREATE TABLE orders (
    id          uuid        PRIMARY KEY,
    customer    text        NOT NULL,
    total_cents bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now())";

const WARM_UP: Duration = Duration::from_secs(1);
const SLICE: Duration = Duration::from_secs(1);

/// The event the outbox mode enqueues (`order.placed.v1`).
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub customer: String,
    /// Its total.
    pub total_cents: i64,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "order.placed";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.order_id.to_string()
    }
}

/// Runs the scenario; returns `producer-overhead plain_tps=<n> outbox_tps=<n> ratio=<r>`.
pub async fn run(config: &ProducerConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if config.seconds == 0 || config.concurrency == 0 {
        bail!("producer-overhead needs --seconds and --concurrency above 0");
    }
    let log = config.storage == outbox::Storage::Log;
    let servers = Servers::start_with(fast_unsafe_db, log).await?;
    let db = servers.database().await?;
    if log {
        db.create_slot().await?;
    }
    let js = jetstream::new(servers.nats_client("bench-admin").await?);
    servers
        .ensure_stream(&js, crate::env::STREAM, crate::env::STREAM_SUBJECTS)
        .await?;
    servers.report_durability(&db, &js).await?;
    sqlx::query(CREATE_ORDERS)
        .execute(&db.pool)
        .await
        .context("creating the orders table")?;
    let connections = u32::try_from(config.concurrency).context("--concurrency is too large")?;
    // Every transaction takes its connection from the pool and gives it back, in both
    // modes (an `OutboxTransaction` owns its connection); no ping on taking one.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .test_before_acquire(false)
        .connect(&db.url)
        .await
        .context("connecting the workers' pool")?;
    let outbox = Outbox::with_config(outbox::OutboxConfig {
        storage: config.storage,
        ..outbox::OutboxConfig::for_source("order-service")
    })
    .context("outbox")?;
    let storage = if log { "wal" } else { "table" };
    let enqueue = if config.with_commit {
        "with-commit"
    } else {
        "statement"
    };
    eprintln!(
        "producer-overhead: {} workers, {} s per mode in interleaved {SLICE:?} slices after a {WARM_UP:?} warm-up, storage {storage}, enqueue {enqueue}, no relay running",
        config.concurrency, config.seconds
    );

    // Interleaved one-second slices (plain, outbox, outbox, plain, ...): both modes see the
    // same disk, checkpoint and table-size conditions; WAL flush latency drifts a lot here.
    let mut done = [0u64; 2];
    let mut elapsed = [Duration::ZERO; 2];
    let mut slice_tps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for with_outbox in [false, true] {
        let mode = Mode::of(with_outbox, config.with_commit);
        drive(&pool, &outbox, config.concurrency, mode, WARM_UP).await?;
    }
    for round in 0..config.seconds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_outbox in order {
            let slot = usize::from(with_outbox);
            let mode = Mode::of(with_outbox, config.with_commit);
            let (n, took) = drive(&pool, &outbox, config.concurrency, mode, SLICE).await?;
            done[slot] += n;
            elapsed[slot] += took;
            slice_tps[slot].push(stats::per_second(n, took));
        }
    }
    let mut tps = [0.0; 2];
    for (slot, mode) in ["plain", "outbox"].into_iter().enumerate() {
        tps[slot] = stats::per_second(done[slot], elapsed[slot]);
        let (lo, hi) = slice_tps[slot]
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
        eprintln!(
            "producer-overhead: {mode}: {} transactions in {:.2?} ({:.0}/s; one-second slices {lo:.0} to {hi:.0}/s)",
            done[slot], elapsed[slot], tps[slot]
        );
    }
    pool.close().await;
    db.pool.close().await;
    let [plain, with_outbox] = tps;
    Ok(format!(
        "producer-overhead plain_tps={plain:.0} outbox_tps={with_outbox:.0} ratio={:.2} storage={storage} enqueue={enqueue}",
        stats::ratio(with_outbox, plain)
    ))
}

/// What one business transaction does besides its INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    /// `Outbox::enqueue` before `COMMIT`: a statement of its own.
    Statement,
    /// `OutboxTransaction::enqueue`: sent with `COMMIT`.
    WithCommit,
}

impl Mode {
    fn of(with_outbox: bool, with_commit: bool) -> Mode {
        match (with_outbox, with_commit) {
            (false, _) => Mode::Plain,
            (true, false) => Mode::Statement,
            (true, true) => Mode::WithCommit,
        }
    }
}

/// Runs `workers` loops of business transactions until `duration` has passed; returns how
/// many committed and the time from start until the last worker stopped.
async fn drive(
    pool: &PgPool,
    outbox: &Outbox,
    workers: usize,
    mode: Mode,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::with_capacity(workers);
    for worker in 0..workers {
        let (pool, outbox, done) = (pool.clone(), outbox.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let customer = format!("customer-{worker}");
            while Instant::now() < deadline {
                let order = OrderPlaced {
                    order_id: Uuid::now_v7(),
                    customer: customer.clone(),
                    total_cents: 4_999,
                };
                let mut conn = pool.acquire().await?;
                if mode == Mode::WithCommit {
                    let mut tx = outbox.begin_on(conn).await?;
                    insert_order(&mut tx, &order).await?;
                    tx.enqueue(&order)?;
                    tx.commit().await?;
                } else {
                    let mut tx = conn.begin().await?;
                    insert_order(&mut tx, &order).await?;
                    if mode == Mode::Statement {
                        outbox.enqueue(&mut tx, &order).await?;
                    }
                    tx.commit().await?;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for handle in handles {
        handle
            .await
            .context("a worker panicked")?
            .context("a business transaction failed")?;
    }
    Ok((done.load(Ordering::Relaxed), start.elapsed()))
}

/// The business statement of every mode.
async fn insert_order(conn: &mut sqlx::PgConnection, order: &OrderPlaced) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)")
        .bind(order.order_id)
        .bind(&order.customer)
        .bind(order.total_cents)
        .execute(conn)
        .await?;
    Ok(())
}
