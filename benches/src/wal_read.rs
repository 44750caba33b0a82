//! `wal-read`: what a logical replication reader can reach on this machine, before a WAL relay
//! is built on it (issue 14's "measure first").
//!
//! One PostgreSQL with `wal_level=logical`, one `nats-server -js`, in one run:
//! 1. **raw**: `events` messages published straight to JetStream, `window` acks in flight (the
//!    `relay-drain` baseline), the rate a WAL relay would have to approach.
//! 2. **emit**: `events` `pg_logical_emit_message(true, 'outbox', <payload>)` records, committed
//!    `per_txn` to a transaction (not timed), then streamed from a `pgoutput` slot
//!    (`messages 'true'`) by `pgwire-replication`: the time from connecting until the last
//!    message arrived.
//! 3. **insert**: the same with `events` table INSERTs of the same payload, streamed as
//!    `pgoutput` Insert messages of a publication on that table.
//! 4. **live**: a reader kept streaming while a producer commits one emitted message per
//!    transaction at `rate`/s for `seconds`: commit-to-receive latency (from `COMMIT`
//!    returning to the reader holding the message, per message).
//!
//! For 2 and 3 it reads the walsender's CPU time (`/proc/<pid>/stat`, the pid from
//! `pg_stat_replication`) and this process's, and prints each per message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use outbox::{Message, Outbox};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use sqlx::PgPool;
use tokio::time::MissedTickBehavior;
use tokio_util::task::TaskTracker;

use crate::env;
use crate::stats;

/// What `wal-read` measures.
#[derive(Debug, Clone)]
pub struct WalReadConfig {
    /// Messages of the raw, emit and insert phases. Defaults to 100 000.
    pub events: usize,
    /// Payload bytes per message. Defaults to 1024.
    pub payload: usize,
    /// Messages per transaction in the emit and insert fills. Defaults to 1.
    pub per_txn: usize,
    /// PubAcks in flight in the raw baseline. Defaults to 1024.
    pub window: usize,
    /// Offered transactions per second of the live phase. Defaults to 1000.
    pub rate: u32,
    /// How long the live phase's producer runs. Defaults to 10 s.
    pub seconds: u64,
}

impl Default for WalReadConfig {
    fn default() -> Self {
        WalReadConfig {
            events: 100_000,
            payload: 1024,
            per_txn: 1,
            window: 1024,
            rate: 1000,
            seconds: 10,
        }
    }
}

/// The logical message prefix the scenario emits under.
const PREFIX: &str = "outbox";
/// Connections filling the slots.
const FILL_CONNECTIONS: usize = 4;

/// Runs the scenario; returns `wal-read raw_eps=.. emit_eps=.. insert_eps=.. ...`.
pub async fn run(config: &WalReadConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if config.events == 0 || config.per_txn == 0 || config.window < 256 {
        bail!("wal-read needs --events >= 1, --per-txn >= 1 and --window >= 256");
    }
    if config.rate == 0 || config.seconds == 0 || config.payload < 8 {
        bail!("wal-read needs --rate and --seconds above 0 and --payload >= 8");
    }
    let (servers, db, _js) = env::start_with_both_streams(fast_unsafe_db, true).await?;
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&db.pool)
        .await
        .context("reading wal_level")?;
    if wal_level != "logical" {
        bail!("wal-read needs wal_level=logical, the server has {wal_level}");
    }
    setup(&db.pool).await?;
    eprintln!(
        "wal-read: {} messages, {} B payload, {} per transaction, raw window {}; live {} tx/s for {} s",
        config.events, config.payload, config.per_txn, config.window, config.rate, config.seconds
    );

    // 1. Raw JetStream.
    let outbox = Outbox::new(crate::SOURCE).context("outbox")?;
    let payload = Bytes::from(vec![b'x'; config.payload]);
    let envelopes = (0..config.events)
        .map(|i| {
            outbox.prepare(Message::raw(
                env::RAW_SUBJECT,
                crate::EVENT_TYPE,
                format!("key-{}", i % 1000),
                payload.clone(),
            ))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("preparing the raw baseline's messages")?;
    let raw_client = servers.nats_client("bench-raw").await?;
    let raw_elapsed = crate::drain::publish_raw(raw_client, &envelopes, config.window).await?;
    drop(envelopes);
    let raw_eps = stats::per_second(config.events as u64, raw_elapsed);
    eprintln!("wal-read: raw publish took {raw_elapsed:.2?} ({raw_eps:.0}/s)");

    // 2. Emitted messages.
    let emit = measure_phase(&db, config, Phase::Emit).await?;
    let emit_c = measure_phase(&db, config, Phase::EmitRecvlogical).await?;
    // 3. Table INSERTs.
    let insert = measure_phase(&db, config, Phase::Insert).await?;
    // 4. Live latency.
    let (p50, p99, max) = live_latency(&db, config).await?;

    Ok(format!(
        "wal-read raw_eps={raw_eps:.0} emit_eps={:.0} insert_eps={:.0} emit_ratio={:.2} insert_ratio={:.2} walsender_us_per_emit={} walsender_us_per_insert={} reader_us_per_emit={:.1} recvlogical_eps={:.0} recvlogical_us_per_emit={:.1} live_p50_ms={} live_p99_ms={} live_max_ms={}",
        emit.eps,
        insert.eps,
        stats::ratio(emit.eps, raw_eps),
        stats::ratio(insert.eps, raw_eps),
        emit.walsender_us
            .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1}")),
        insert
            .walsender_us
            .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1}")),
        emit.reader_us,
        emit_c.eps,
        emit_c.reader_us,
        stats::ms(p50),
        stats::ms(p99),
        stats::ms(max),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Emit,
    /// As `Emit`, streamed by PostgreSQL's own `pg_recvlogical` (C, libpq) to `/dev/null`: the
    /// reference for the Rust reader's CPU.
    EmitRecvlogical,
    Insert,
}

impl Phase {
    fn slot(self) -> &'static str {
        match self {
            Phase::Emit => "wal_read_emit",
            Phase::EmitRecvlogical => "wal_read_emit_c",
            Phase::Insert => "wal_read_insert",
        }
    }

    /// The emit phase reads an empty publication (messages only); the insert phase the
    /// table's.
    fn publication(self) -> &'static str {
        match self {
            Phase::Emit | Phase::EmitRecvlogical => "wal_read_messages",
            Phase::Insert => "wal_read_rows",
        }
    }
}

struct PhaseResult {
    eps: f64,
    walsender_us: Option<f64>,
    reader_us: f64,
}

async fn setup(pool: &PgPool) -> anyhow::Result<()> {
    for sql in [
        "CREATE TABLE wal_read_row (id bigserial PRIMARY KEY, payload bytea NOT NULL)",
        "CREATE PUBLICATION wal_read_messages",
        "CREATE PUBLICATION wal_read_rows FOR TABLE wal_read_row",
        "SELECT pg_create_logical_replication_slot('wal_read_emit', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('wal_read_insert', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('wal_read_emit_c', 'pgoutput')",
    ] {
        sqlx::query(sql)
            .execute(pool)
            .await
            .with_context(|| format!("setup: {sql}"))?;
    }
    Ok(())
}

/// Fills the phase's slot (not timed), then streams it to the end.
async fn measure_phase(
    db: &env::Database,
    config: &WalReadConfig,
    phase: Phase,
) -> anyhow::Result<PhaseResult> {
    let fill = Instant::now();
    let pool = db.pool(FILL_CONNECTIONS as u32).await?;
    let payload = vec![b'x'; config.payload];
    let transactions = config.events.div_ceil(config.per_txn);
    let mut workers = Vec::new();
    for worker in 0..FILL_CONNECTIONS {
        let pool = pool.clone();
        let payload = payload.clone();
        let per_txn = config.per_txn;
        let events = config.events;
        workers.push(tokio::spawn(async move {
            let mut t = worker;
            while t < transactions {
                let n = per_txn.min(events - t * per_txn);
                let batch = vec![payload.clone(); n];
                let sql = match phase {
                    Phase::Emit | Phase::EmitRecvlogical => {
                        "SELECT count(pg_logical_emit_message(true, 'outbox', p)) FROM unnest($1::bytea[]) p"
                    }
                    Phase::Insert => {
                        "INSERT INTO wal_read_row (payload) SELECT unnest($1::bytea[])"
                    }
                };
                sqlx::query(sql).bind(batch).execute(&pool).await?;
                t += FILL_CONNECTIONS;
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await.context("fill task")??;
    }
    pool.close().await;
    let end_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .context("reading the WAL position")?;
    eprintln!(
        "wal-read: {:?}: wrote {} messages in {transactions} transactions in {:.2?} (WAL end {end_lsn})",
        phase,
        config.events,
        fill.elapsed()
    );

    if phase == Phase::EmitRecvlogical {
        return recvlogical(db, config, &end_lsn).await;
    }
    let name = format!("bench-{}", phase.slot());
    let start = Instant::now();
    let self_cpu_start = cpu_ticks("self");
    let mut client = ReplicationClient::connect(
        replication_config(&db.url, phase.slot(), phase.publication())?
            .with_application_name(name.clone())
            // Column values in their binary send format: a bytea travels as its bytes, not hex.
            .with_binary(phase == Phase::Insert),
    )
    .await
    .context("connecting the replication reader")?;
    client
        .wait_started()
        .await
        .context("starting replication")?;
    let walsender: Option<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_replication WHERE application_name = $1")
            .bind(&name)
            .fetch_optional(&db.pool)
            .await
            .context("finding the walsender")?;
    let mut seen = 0usize;
    let mut bytes = 0usize;
    while seen < config.events {
        let event = tokio::time::timeout(Duration::from_secs(60), client.recv())
            .await
            .with_context(|| format!("{phase:?}: nothing for 60 s after {seen} messages"))?
            .context("replication stream")?;
        match event {
            Some(ReplicationEvent::Message {
                prefix, content, ..
            }) if phase == Phase::Emit && prefix == PREFIX => {
                seen += 1;
                bytes += content.len();
            }
            Some(ReplicationEvent::XLogData { data, .. })
                if phase == Phase::Insert && data.first() == Some(&b'I') =>
            {
                seen += 1;
                bytes += data.len();
            }
            Some(ReplicationEvent::Commit { end_lsn, .. }) => client.update_applied_lsn(end_lsn),
            Some(_) => {}
            None => bail!("{phase:?}: the stream ended after {seen} messages"),
        }
    }
    let elapsed = start.elapsed();
    let ticks = ticks_per_second();
    let walsender_us = walsender
        .and_then(|pid| cpu_ticks(&pid.to_string()))
        .map(|t| t as f64 * 1e6 / ticks / config.events as f64);
    let reader_us = match (self_cpu_start, cpu_ticks("self")) {
        (Some(a), Some(b)) => (b - a) as f64 * 1e6 / ticks / config.events as f64,
        _ => f64::NAN,
    };
    client.shutdown().await.ok();
    let eps = stats::per_second(config.events as u64, elapsed);
    eprintln!(
        "wal-read: {phase:?}: streamed {seen} messages ({} MB) in {elapsed:.2?} ({eps:.0}/s); walsender CPU {} us/message, reader CPU {reader_us:.1} us/message",
        bytes / 1_000_000,
        walsender_us.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1}"))
    );
    Ok(PhaseResult {
        eps,
        walsender_us,
        reader_us,
    })
}

/// Streams the slot with `pg_recvlogical` up to `end_lsn`; its CPU is read from the shell's
/// children times (`cutime`, `cstime` of `/proc/<shell>/stat` once it has waited).
async fn recvlogical(
    db: &env::Database,
    config: &WalReadConfig,
    end_lsn: &str,
) -> anyhow::Result<PhaseResult> {
    let bin_dir = testkit::find_postgres_bin_dir(None).context("finding pg_recvlogical")?;
    let program = bin_dir.join("pg_recvlogical");
    let script = r#""$@" && cat /proc/$$/stat"#;
    let start = Instant::now();
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&program)
        .args(["--dbname", &db.url, "--slot", Phase::EmitRecvlogical.slot()])
        .args([
            "--start",
            "--no-loop",
            "--file",
            "/dev/null",
            "--endpos",
            end_lsn,
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=wal_read_messages",
        ])
        .args(["-o", "messages=true"])
        .output()
        .await
        .context("running pg_recvlogical")?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stat = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // cutime and cstime are fields 16 and 17.
    let children: u64 = [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    let reader_us = children as f64 * 1e6 / ticks_per_second() / config.events as f64;
    let eps = stats::per_second(config.events as u64, elapsed);
    eprintln!(
        "wal-read: EmitRecvlogical: streamed to {end_lsn} in {elapsed:.2?} ({eps:.0}/s, process start included); pg_recvlogical CPU {reader_us:.1} us/message"
    );
    Ok(PhaseResult {
        eps,
        walsender_us: None,
        reader_us,
    })
}

type Instants = Arc<Mutex<HashMap<u64, Instant>>>;

/// Streams `wal_read_live` while a producer commits at `rate`; returns p50, p99 and max of
/// commit-to-receive.
async fn live_latency(
    db: &env::Database,
    config: &WalReadConfig,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    let total = u64::from(config.rate) * config.seconds;
    // Created now, so that it holds only the live phase's messages.
    sqlx::query("SELECT pg_create_logical_replication_slot('wal_read_live', 'pgoutput')")
        .execute(&db.pool)
        .await
        .context("creating the live slot")?;
    let mut client = ReplicationClient::connect(
        replication_config(&db.url, "wal_read_live", "wal_read_messages")?
            .with_application_name("bench-wal-read-live"),
    )
    .await
    .context("connecting the live reader")?;
    client
        .wait_started()
        .await
        .context("starting live replication")?;
    let received: Instants = Arc::default();
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while n < total {
                match client.recv().await? {
                    Some(ReplicationEvent::Message { content, .. }) if content.len() >= 8 => {
                        let at = Instant::now();
                        let mut id = [0u8; 8];
                        id.copy_from_slice(&content[..8]);
                        received
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(u64::from_be_bytes(id), at);
                        n += 1;
                    }
                    Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                        client.update_applied_lsn(end_lsn);
                    }
                    Some(_) => {}
                    None => bail!("the live stream ended after {n} messages"),
                }
            }
            client.shutdown().await.ok();
            anyhow::Ok(())
        })
    };

    let producers = db.pool(8).await?;
    let committed: Instants = Arc::default();
    let tasks = TaskTracker::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / config.rate);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    for id in 0..total {
        ticker.tick().await;
        let producers = producers.clone();
        let committed = committed.clone();
        let failures = failures.clone();
        let mut payload = vec![b'x'; config.payload];
        payload[..8].copy_from_slice(&id.to_be_bytes());
        tasks.spawn(async move {
            let result = sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1)")
                .bind(payload)
                .execute(&producers)
                .await;
            let at = Instant::now();
            match result {
                Ok(_) => {
                    committed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, at);
                }
                Err(e) => failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(e.to_string()),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    if let Some(e) = failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .first()
    {
        bail!("a live producer transaction failed: {e}");
    }
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .context("the live reader did not receive every message within 60 s")?
        .context("live reader task")??;
    producers.close().await;
    let committed = committed.lock().unwrap_or_else(PoisonError::into_inner);
    let received = received.lock().unwrap_or_else(PoisonError::into_inner);
    let (latencies, _) = stats::latencies(&committed, &received);
    if latencies.len() as u64 != total {
        bail!("{} of {total} live messages were received", latencies.len());
    }
    let pick = |q| stats::percentile(&latencies, q).unwrap_or_default();
    let (p50, p99, max) = (pick(50.0), pick(99.0), pick(100.0));
    eprintln!(
        "wal-read: live {total} messages at {}/s: commit-to-receive p50 {} ms p99 {} ms max {} ms",
        config.rate,
        stats::ms(p50),
        stats::ms(p99),
        stats::ms(max)
    );
    Ok((p50, p99, max))
}

/// A `pgoutput` replication session on `slot` from the slot's confirmed position, for the
/// PostgreSQL at `database_url`.
fn replication_config(
    database_url: &str,
    slot: &str,
    publication: &str,
) -> anyhow::Result<ReplicationConfig> {
    let url = url::Url::parse(database_url).context("parsing the database URL")?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let user = url.username().to_owned();
    let password = url.password().unwrap_or_default().to_owned();
    let database = url.path().trim_start_matches('/').to_owned();
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(url.port().unwrap_or(5432))
            .with_start_lsn(Lsn::ZERO)
            .with_status_interval(Duration::from_secs(1)),
    )
}

/// utime + stime of `/proc/<pid>/stat` in clock ticks, or `None` when it cannot be read (a
/// server on another host).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, 100 when it cannot be asked.
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
