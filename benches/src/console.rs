//! `console`: how long the operator console's pages take on a big database.
//!
//! One database gets `letters` dead letters (5 consumers, 4 reasons, failures spread over
//! 30 days, one letter in 10 000 on a rare subject) and an outbox backlog of `backlog`
//! pending rows (`keys` keys), a relay instance holding every partition and 1 key in 1000
//! waiting out a backoff; then `VACUUM ANALYZE`. The console's router runs in-process (no
//! HTTP socket: the time is the page's, from request to the last byte of its body), and
//! each page is requested `requests` times one after another after a warm-up:
//! - `overview` (`/`): backlog, relays, slots and dead letters by reason;
//! - `dead_letters`: the first page, newest failures first;
//! - `filtered`: a consumer and a reason;
//! - `deep`: a page a million letters down (keyset cursor: no OFFSET);
//! - `rare`: a subject one letter in 10 000 has;
//! - `error_text`: a text in many letters' errors; `error_absent`: a text in none (a scan of
//!   every letter), then again with the optional trigram index of docs/operations.md
//!   (`error_absent_trgm`);
//! - `detail`: one letter;
//! - `relays`: instances, the partition grid, the waiting keys.
//!
//! The baseline is the dead-letter page's own keyset query sent by a plain client
//! (`raw_page`), in the same run. The final line prints each page's p99 in milliseconds, the
//! worst with the trigram index in place (`max_p99_ms`: every page but the unindexed
//! `error_absent`), and the target (100 ms).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt as _;

use crate::env::Servers;
use crate::stats;

/// What `console` measures.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Dead letters. Defaults to 1 000 000.
    pub letters: usize,
    /// Pending outbox rows. Defaults to 1 000 000.
    pub backlog: usize,
    /// Distinct partition keys of the backlog. Defaults to 10 000.
    pub keys: usize,
    /// Requests per page (after 5 of warm-up). Defaults to 100.
    pub requests: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            letters: 1_000_000,
            backlog: 1_000_000,
            keys: 10_000,
            requests: 100,
        }
    }
}

/// The p99 every page should stay under.
const TARGET_MS: f64 = 100.0;
const CHUNK: usize = 100_000;
const WARM_UP: usize = 5;
const HOST: &str = "127.0.0.1:3000";

const FILL_LETTERS: &str = "INSERT INTO dead_letter
        (source, consumer, message_id, subject, partition_key, headers, payload, reason,
         error_chain, attempts, first_failed_at, last_failed_at, history)
    SELECT 'consumer', (ARRAY['email','inventory','billing','shipping','search'])[1 + g % 5],
           'm-' || g,
           CASE WHEN g % 10000 = 7 THEN 'rare.subject' ELSE 'orders.' || (g % 50) END,
           'key-' || (g % 10000),
           jsonb_build_object('Nats-Msg-Id', 'm-' || g, 'ce-type', 'order.created.v1'),
           convert_to('{\"order_id\": \"o-' || g || '\", \"amount\": 42}', 'UTF8'),
           (ARRAY['attempts_exhausted','decode','handler','no_stream'])[1 + g % 4],
           jsonb_build_array('handler failed for o-' || g, 'connection reset by peer'),
           3, ts, ts, '[]'::jsonb
    FROM (SELECT g, now() - (g % 2592000) * interval '1 second' AS ts
          FROM generate_series($1::bigint, $2::bigint) AS g) s";

const FILL_BACKLOG: &str = "INSERT INTO outbox_message
        (id, subject, event_type, source, partition_key, occurred_at, headers, payload,
         attempts, available_at, last_error)
    SELECT gen_random_uuid(), 'orders.created', 'order.created.v1', 'bench', 'key-' || (g % $3),
           now(), '{}'::jsonb, '\\x7b7d'::bytea,
           CASE WHEN g % 1000 = 0 THEN 1 ELSE 0 END,
           CASE WHEN g % 1000 = 0 THEN now() + interval '1 hour' ELSE now() END,
           CASE WHEN g % 1000 = 0 THEN 'no stream answered' END
    FROM generate_series($1::bigint, $2::bigint) AS g";

/// docs/operations.md's optional index for the error-text filter.
const TRIGRAM_INDEX: &str = "CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX dead_letter_error_trgm_idx ON dead_letter
        USING gin (lower(error_chain::text) gin_trgm_ops);
    ANALYZE dead_letter";

const RAW_PAGE: &str = "SELECT id, source, consumer, message_id, subject, partition_key, reason,
        attempts, last_failed_at, status, octet_length(payload)
    FROM dead_letter ORDER BY last_failed_at DESC, id DESC LIMIT 50";

/// Runs the scenario; returns `console letters=<n> backlog=<n> overview_p99_ms=<ms> ...
/// max_p99_ms=<ms> target_ms=100`.
pub async fn run(config: &ConsoleConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if config.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let servers = Servers::start(fast_unsafe_db).await?;
    let db = servers.database().await?;
    eprintln!(
        "  PostgreSQL {} (the page times read, they write nothing)",
        if fast_unsafe_db {
            "with fsync=off"
        } else {
            "durable"
        }
    );
    fill(&db.pool, FILL_LETTERS, config.letters, None, "dead letters").await?;
    let keys = i64::try_from(config.keys.max(1)).context("--keys is too large")?;
    fill(
        &db.pool,
        FILL_BACKLOG,
        config.backlog,
        Some(keys),
        "outbox rows",
    )
    .await?;
    sqlx::raw_sql(
        "INSERT INTO relay_instance (instance_id) VALUES ('bench-relay');
         UPDATE relay_partition_lease SET owner = 'bench-relay',
                lease_until = now() + interval '1 day';",
    )
    .execute(&db.pool)
    .await
    .context("registering a relay")?;
    let vacuum = db.vacuum_analyze().await?;
    sqlx::query("VACUUM ANALYZE dead_letter")
        .execute(&db.pool)
        .await
        .context("VACUUM ANALYZE dead_letter")?;
    eprintln!("  vacuum analyze took {vacuum:.1?} (outbox_message)");

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .context("connecting the console")?;
    let app = console::router(console::Config {
        allow_actions: true,
        show_payloads: true,
        ..console::Config::new(vec![console::Database::new("bench", pool)])
    })
    .map_err(|e| anyhow::anyhow!("console configuration: {e}"))?;

    let (deep_cursor, detail_id): (String, i64) = sqlx::query_as(
        "SELECT to_char(last_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || ',' || id, id
         FROM dead_letter ORDER BY last_failed_at DESC, id DESC
         OFFSET $1 LIMIT 1",
    )
    .bind(i64::try_from(config.letters.saturating_sub(100)).context("--letters")?)
    .fetch_optional(&db.pool)
    .await
    .context("finding a deep cursor")?
    .unwrap_or_else(|| (String::new(), 1));
    let pages = [
        ("overview", "/".to_owned()),
        ("dead_letters", "/db/bench/dead-letters".to_owned()),
        (
            "filtered",
            "/db/bench/dead-letters?consumer=email&reason=attempts_exhausted".to_owned(),
        ),
        (
            "deep",
            format!(
                "/db/bench/dead-letters?after={}",
                url::form_urlencoded::byte_serialize(deep_cursor.as_bytes()).collect::<String>()
            ),
        ),
        (
            "rare",
            "/db/bench/dead-letters?subject=rare.subject".to_owned(),
        ),
        (
            "error_text",
            "/db/bench/dead-letters?error=handler+failed+for+o-77".to_owned(),
        ),
        (
            "error_absent",
            "/db/bench/dead-letters?error=no+letter+has+this".to_owned(),
        ),
        ("detail", format!("/db/bench/dead-letters/{detail_id}")),
        ("relays", "/db/bench/relays".to_owned()),
    ];
    let mut fields = Vec::new();
    let mut worst = 0.0f64;
    for (name, path) in &pages {
        let p99 = time_and_report(&app, name, path, config.requests).await?;
        if *name != "error_absent" {
            worst = worst.max(p99.as_secs_f64() * 1000.0);
        }
        fields.push(format!("{name}_p99_ms={}", stats::ms(p99)));
    }
    // The optional trigram index (docs/operations.md) turns the error-text scan into an
    // index search.
    sqlx::raw_sql(TRIGRAM_INDEX)
        .execute(&db.pool)
        .await
        .context("creating the optional trigram index (needs pg_trgm)")?;
    let p99 = time_and_report(
        &app,
        "error_absent (trigram index)",
        "/db/bench/dead-letters?error=no+letter+has+this",
        config.requests,
    )
    .await?;
    worst = worst.max(p99.as_secs_f64() * 1000.0);
    fields.push(format!("error_absent_trgm_p99_ms={}", stats::ms(p99)));
    let raw = time_raw_page(&db.pool, config.requests).await?;
    let raw_p99 = stats::percentile(&raw, 99.0).unwrap_or_default();
    eprintln!("  raw keyset query p99 {} ms", stats::ms(raw_p99));
    Ok(format!(
        "console letters={} backlog={} {} raw_page_p99_ms={} max_p99_ms={worst:.1} target_ms={TARGET_MS:.0}",
        config.letters,
        config.backlog,
        fields.join(" "),
        stats::ms(raw_p99),
    ))
}

/// Times `path`, prints its p50 and p99; returns the p99.
async fn time_and_report(
    app: &axum::Router,
    name: &str,
    path: &str,
    requests: usize,
) -> anyhow::Result<Duration> {
    let times = time_page(app, path, requests).await?;
    let p50 = stats::percentile(&times, 50.0).unwrap_or_default();
    let p99 = stats::percentile(&times, 99.0).unwrap_or_default();
    eprintln!(
        "  {name:<13} p50 {} ms  p99 {} ms  ({path})",
        stats::ms(p50),
        stats::ms(p99)
    );
    Ok(p99)
}

async fn fill(
    pool: &sqlx::PgPool,
    statement: &'static str,
    rows: usize,
    keys: Option<i64>,
    what: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut done = 0usize;
    while done < rows {
        let end = rows.min(done + CHUNK);
        let mut query = sqlx::query(statement)
            .bind(i64::try_from(done).context("row count")?)
            .bind(i64::try_from(end - 1).context("row count")?);
        if let Some(keys) = keys {
            query = query.bind(keys);
        }
        query
            .execute(pool)
            .await
            .with_context(|| format!("filling {what}"))?;
        done = end;
        eprintln!("  {what}: {done}/{rows} after {:.1?}", start.elapsed());
    }
    Ok(())
}

/// Each request's time, sorted, after the warm-up; a page that does not answer 200 fails
/// the run.
async fn time_page(
    app: &axum::Router,
    path: &str,
    requests: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(requests);
    for i in 0..WARM_UP + requests {
        let request = Request::get(path)
            .header(header::HOST, HOST)
            .body(Body::empty())
            .context("request")?;
        let start = Instant::now();
        let response = app.clone().oneshot(request).await.context("router")?;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .context("body")?;
        let elapsed = start.elapsed();
        if status != StatusCode::OK {
            bail!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        if i >= WARM_UP {
            times.push(elapsed);
        }
    }
    times.sort_unstable();
    Ok(times)
}

async fn time_raw_page(pool: &sqlx::PgPool, requests: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(requests);
    for i in 0..WARM_UP + requests {
        let start = Instant::now();
        let rows = sqlx::query(RAW_PAGE)
            .fetch_all(pool)
            .await
            .context("raw keyset query")?;
        let elapsed = start.elapsed();
        if rows.is_empty() {
            bail!("the raw keyset query found no dead letter");
        }
        if i >= WARM_UP {
            times.push(elapsed);
        }
    }
    times.sort_unstable();
    Ok(times)
}
