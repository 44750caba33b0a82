//! The relays page against a real PostgreSQL: instances with their sessions and open
//! claims, the partition grid, the keys waiting out a backoff and "retry now" (audited,
//! refused when read-only, without a CSRF token, or when a relay holds the row); and the
//! overview's bounded counts and WAL slots.

use axum::http::StatusCode;
use sqlx::{Connection, PgPool};

mod common;

use common::*;

async fn enqueue(pool: &PgPool, keys: std::ops::Range<u32>) {
    let outbox = outbox::Outbox::new("svc").expect("outbox");
    let mut conn = pool.acquire().await.expect("acquire");
    for n in keys {
        outbox
            .enqueue(&mut conn, &Ping { n })
            .await
            .expect("enqueue");
    }
}

async fn partition_of(pool: &PgPool, key: &str) -> i16 {
    sqlx::query_scalar("SELECT (hashtextextended($1, 0) & 255)::smallint")
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("partition")
}

/// Makes `key`'s row have failed twice, with `error`, and wait an hour for its retry.
async fn back_off(pool: &PgPool, key: &str, error: &str) {
    sqlx::query(
        "UPDATE outbox_message SET attempts = 2, last_error = $2,
                available_at = now() + interval '1 hour'
         WHERE partition_key = $1",
    )
    .bind(key)
    .bind(error)
    .execute(pool)
    .await
    .expect("back off");
}

async fn waits(pool: &PgPool, key: &str) -> bool {
    sqlx::query_scalar("SELECT available_at > now() FROM outbox_message WHERE partition_key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_page_shows_instances_partitions_and_waiting_keys_and_retries_one() {
    let db = db().await;
    enqueue(&db.pool, 0..20).await;
    back_off(
        &db.pool,
        "k-3",
        "<script>alert(1)</script> stream\u{1b}[31m gone",
    )
    .await;
    // relay-a holds the partitions below 128; nobody holds the rest.
    sqlx::raw_sql(
        "INSERT INTO relay_instance (instance_id) VALUES ('relay-a');
         UPDATE relay_partition_lease SET owner = 'relay-a', lease_until = now() + interval '1 hour'
          WHERE partition_id < 128;",
    )
    .execute(&db.pool)
    .await
    .expect("relay rows");
    // One of relay-a's sessions inside a transaction: an open claim.
    let url = db.url.clone();
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("url");
    let mut claim = sqlx::PgConnection::connect_with(
        &options.application_name(&relay::store::application_name("relay-a")),
    )
    .await
    .expect("connect as relay-a");
    sqlx::raw_sql("BEGIN; SELECT 1")
        .execute(&mut claim)
        .await
        .expect("open a transaction");

    let app = app(config(&db.pool));
    let (status, page) = get(&app, "/db/orders/relays").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"<tr data-instance="relay-a">"#), "{page}");
    assert!(
        page.contains(r#"<td class="num" data-field="partitions">128</td>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<td class="num" data-field="sessions">1</td>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<td class="num" data-field="open-claims">1</td>"#),
        "{page}"
    );
    assert!(page.contains("128 unowned."), "{page}");
    assert!(
        page.contains("Every unpublished row is counted (20)"),
        "{page}"
    );
    // Every partition has a cell; an owned one with rows shows its count, an unowned one
    // is flagged.
    assert_eq!(page.matches("data-partition=").count(), 256, "{page}");
    for n in 0..20 {
        let key = format!("k-{n}");
        let p = partition_of(&db.pool, &key).await;
        let class = if p < 128 { "busy" } else { "orphan" };
        assert!(
            page.contains(&format!(r#"<td class="{class}" data-partition="{p}""#)),
            "partition {p} of {key} is {class}: {page}"
        );
    }
    // The waiting key, its error inert, with its button.
    assert!(page.contains(r#"<tr data-key="k-3">"#), "{page}");
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains('\u{1b}'), "{page}");
    assert_eq!(page.matches("Retry now</button>").count(), 1, "{page}");

    // A relay holding the row (its claim locks it): nothing changes, at once.
    let mut holder = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM outbox_message WHERE partition_key = 'k-3' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .expect("lock");
    let csrf = token(&app, "/db/orders/relays").await;
    let (status, body) = send(
        &app,
        form(
            "/db/orders/relays/retry-now",
            &[("csrf", &csrf), ("key", "k-3")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("a relay is trying it"), "{body}");
    holder.rollback().await.expect("release");
    assert!(waits(&db.pool, "k-3").await);

    // Refusals: no token, no key.
    let (status, _) = send(&app, form("/db/orders/relays/retry-now", &[("key", "k-3")])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = send(
        &app,
        form("/db/orders/relays/retry-now", &[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(waits(&db.pool, "k-3").await);
    assert!(audit_rows(&db.pool).await.is_empty());

    // Retry now: the row may be claimed at once, its attempts kept; audited.
    let (status, body) = send(
        &app,
        form(
            "/db/orders/relays/retry-now",
            &[("csrf", &csrf), ("key", "k-3")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(r#"data-field="outcome""#), "{body}");
    assert!(!waits(&db.pool, "k-3").await);
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM outbox_message WHERE partition_key = 'k-3'")
            .fetch_one(&db.pool)
            .await
            .expect("attempts");
    assert_eq!(attempts, 2);
    assert_eq!(
        audit_rows(&db.pool).await,
        [("anonymous".to_owned(), "retry_now".to_owned(), 1)]
    );
    let (_, page) = get(&app, "/db/orders/relays").await;
    assert!(!page.contains(r#"data-key="k-3""#), "{page}");
    assert!(page.contains("None: no key"), "{page}");

    // Again: it no longer waits, nothing is done or audited.
    let (status, body) = send(
        &app,
        form(
            "/db/orders/relays/retry-now",
            &[("csrf", &csrf), ("key", "k-3")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(audit_rows(&db.pool).await.len(), 1);

    // Read-only: no button, and the POST is refused.
    back_off(&db.pool, "k-4", "timeout").await;
    let read_only = self::app(console::Config {
        allow_actions: false,
        ..config(&db.pool)
    });
    let (_, page) = get(&read_only, "/db/orders/relays").await;
    assert!(page.contains(r#"<tr data-key="k-4">"#), "{page}");
    assert!(!page.contains("Retry now</button>"), "{page}");
    let (status, _) = send(
        &read_only,
        form(
            "/db/orders/relays/retry-now",
            &[("csrf", &csrf), ("key", "k-4")],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(waits(&db.pool, "k-4").await);
    drop(claim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_counts_stop_at_their_cap_and_wal_slots_are_shown() {
    let db = logical_db().await;
    enqueue(&db.pool, 0..25).await;
    back_off(&db.pool, "k-0", "timeout").await;
    let mut conn = db.pool.acquire().await.expect("acquire");
    let glance = outbox::store::inspect::glance(&mut conn, 10)
        .await
        .expect("glance");
    assert_eq!(glance.unpublished, 10);
    assert!(glance.unpublished_capped);
    assert_eq!(glance.retrying, 1);
    // The oldest row waits out its backoff: the oldest due one is younger.
    assert!(
        glance.oldest_due_age_seconds < glance.oldest_age_seconds,
        "{glance:?}"
    );
    let exact = outbox::store::inspect::glance(&mut conn, 25)
        .await
        .expect("glance");
    assert_eq!((exact.unpublished, exact.unpublished_capped), (25, false));
    let heads = outbox::store::inspect::partitions_at_head(&mut conn, 5)
        .await
        .expect("heads");
    assert_eq!(heads.iter().map(|h| h.rows).sum::<i64>(), 5);

    // A slot nobody streams is flagged with the WAL it keeps.
    let slot = relay::wal::store::SlotName::new("orders_relay").expect("name");
    relay::wal::store::create_slot(&mut conn, &slot)
        .await
        .expect("slot");
    drop(conn);
    let app = app(config(&db.pool));
    let (status, page) = get(&app, "/").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<dd data-field="backlog">25</dd>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<dd data-field="retrying">1</dd>"#),
        "{page}"
    );
    assert!(page.contains(r#"<tr data-slot="orders_relay">"#), "{page}");
    assert!(
        page.contains("WAL slot orders_relay is not streamed by any relay"),
        "{page}"
    );
    // The publish rate of the last hour: two rows five minutes ago, one now.
    sqlx::raw_sql(
        "UPDATE outbox_message SET status = 'published', published_at = now() - interval '5 minutes'
          WHERE partition_key IN ('k-1', 'k-2');
         UPDATE outbox_message SET status = 'published', published_at = now()
          WHERE partition_key = 'k-3';",
    )
    .execute(&db.pool)
    .await
    .expect("publish");
    // A console started now (one that had looked before counts a settled minute once: it
    // would not see rows dated back into it).
    let app = self::app(config(&db.pool));
    let (_, page) = get(&app, "/").await;
    assert!(page.contains("3 published in the last hour"), "{page}");
    assert_eq!(
        page.matches("<rect ").count(),
        2,
        "two minutes with rows: {page}"
    );
    // A settled minute is counted once: the cleaner deleting its rows does not erase it.
    sqlx::query("DELETE FROM outbox_message WHERE partition_key IN ('k-1', 'k-2')")
        .execute(&db.pool)
        .await
        .expect("clean");
    let (_, page) = get(&app, "/").await;
    assert!(page.contains("3 published in the last hour"), "{page}");

    // The page refreshes itself with the vendored htmx, served by the console.
    assert!(page.contains(r#"hx-get="/""#), "{page}");
    let (status, script) = get(&app, "/static/htmx.min.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains("htmx"), "not htmx");
}
