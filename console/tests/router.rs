//! The console's router against a real PostgreSQL: each page's content for seeded data,
//! filters and keyset pagination, retry and purge of a selection and of all matching,
//! read-only mode, CSRF, Origin and authentication refusals, the audit rows, hostile
//! content made inert, and the statement timeout.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use console::{Access, Config, Database};
use dlq::{DeadLetter, Source};
use envelope::{Envelope, HeaderText};
use sqlx::PgPool;
use tower::ServiceExt;

mod common;

use common::*;

fn letter(source: Source, consumer: &str, reason: &str, n: u32, payload: &[u8]) -> DeadLetter {
    let env = Envelope::from_event(HeaderText::new("s", "svc").expect("valid"), &Ping { n })
        .expect("valid");
    let headers = envelope::nats::to_headers(&env)
        .expect("headers")
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v[0].as_str().to_owned()),
            )
        })
        .collect();
    DeadLetter {
        source,
        consumer: consumer.into(),
        message_id: env.id.to_string(),
        subject: env.subject.as_str().to_owned(),
        partition_key: Some(format!("k-{n}")),
        headers,
        payload: payload.to_vec(),
        reason: reason.into(),
        error_chain: vec![format!("handler failed for {n}"), "inner cause".into()],
        attempts: 3,
        stream: None,
        stream_seq: None,
    }
}

async fn record(pool: &PgPool, letter: &DeadLetter) -> i64 {
    let mut conn = pool.acquire().await.expect("acquire");
    dlq::store::record(&mut conn, letter).await.expect("record")
}

async fn status_of(pool: &PgPool, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM dead_letter WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_backlog_relays_dead_letters_and_red_flags() {
    let db = db().await;
    let outbox = outbox::Outbox::new("svc").expect("outbox");
    let mut conn = db.pool.acquire().await.expect("acquire");
    for n in 0..3 {
        outbox
            .enqueue(&mut conn, &Ping { n })
            .await
            .expect("enqueue");
    }
    // A relay holding 200 of 256 partitions, its heartbeat a minute old.
    sqlx::raw_sql(
        "INSERT INTO relay_instance (instance_id, heartbeat_at) VALUES ('relay-a', now() - interval '60 seconds');
         UPDATE relay_partition_lease SET owner = 'relay-a', lease_until = now() + interval '1 hour'
          WHERE partition_id < 200;",
    )
    .execute(&mut *conn)
    .await
    .expect("relay rows");
    drop(conn);
    record(
        &db.pool,
        &letter(Source::Consumer, "email", "attempts_exhausted", 1, b"{}"),
    )
    .await;
    record(
        &db.pool,
        &letter(Source::Consumer, "email", "attempts_exhausted", 2, b"{}"),
    )
    .await;
    record(
        &db.pool,
        &letter(Source::Relay, "relay", "decode", 3, b"{}"),
    )
    .await;

    let app = app(config(&db.pool));
    let (status, page) = get(&app, "/").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<dd data-field="backlog">3</dd>"#),
        "{page}"
    );
    assert!(page.contains("relay-a"), "{page}");
    assert!(
        page.contains("56 of 256 partitions have no owner"),
        "{page}"
    );
    assert!(page.contains("relay relay-a: last heartbeat"), "{page}");
    assert!(page.contains("3 dead letters wait"), "{page}");
    assert!(page.contains(">attempts_exhausted</a>"), "{page}");
    // Dead letters by reason, largest first: 2 (email) before 1 (relay).
    let email = page.find(">attempts_exhausted<").expect("email row");
    let relay = page.find(">decode<").expect("relay row");
    assert!(email < relay, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_filter_and_page_by_keyset_and_show_their_detail() {
    let db = db().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            record(
                &db.pool,
                &letter(
                    Source::Consumer,
                    "email",
                    "handler",
                    n,
                    br#"{"n":1,"deep":{"x":[1,2]}}"#,
                ),
            )
            .await,
        );
    }
    let relay = record(
        &db.pool,
        &letter(Source::Relay, "relay", "decode", 9, b"\xff\x00raw"),
    )
    .await;
    let app = app(Config {
        page_size: 2,
        ..config(&db.pool)
    });

    // Newest failure first, two a page; "next" walks on without repeats or gaps.
    let mut seen = Vec::new();
    let mut path = "/db/orders/dead-letters?source=consumer".to_owned();
    loop {
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for part in page.split(r#"<tr data-id=""#).skip(1) {
            seen.push(
                part[..part.find('"').expect("id")]
                    .parse::<i64>()
                    .expect("id"),
            );
        }
        let Some(at) = page.find(r#"rel="next""#) else {
            break;
        };
        let href = &page[..at];
        let start = href.rfind(r#"href=""#).expect("href") + 6;
        path = href[start..href[start..].find('"').expect("end") + start].replace("&amp;", "&");
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every consumer letter once, newest first");

    // Filters: reason, key, error text, a time range that holds nothing.
    let (_, page) = get(&app, "/db/orders/dead-letters?reason=decode").await;
    assert!(
        page.contains(&format!(r#"<tr data-id="{relay}""#))
            && !page.contains(&format!(r#"<tr data-id="{}""#, ids[0])),
        "{page}"
    );
    let (_, page) = get(&app, "/db/orders/dead-letters?key=k-3").await;
    assert_eq!(page.matches("<tr data-id=").count(), 1, "{page}");
    let (_, page) = get(&app, "/db/orders/dead-letters?error=FAILED%20FOR%204").await;
    assert!(
        page.contains(&format!(r#"<tr data-id="{}""#, ids[4])),
        "{page}"
    );
    assert_eq!(page.matches("<tr data-id=").count(), 1, "{page}");
    // The error text is plain text: % and _ match only themselves.
    for pattern in ["handler%25for", "handler_failed", "for%20_"] {
        let (_, page) = get(&app, &format!("/db/orders/dead-letters?error={pattern}")).await;
        assert!(page.contains("No dead letters match"), "{pattern}: {page}");
    }
    let (_, page) = get(&app, "/db/orders/dead-letters?until=2000-01-01T00:00").await;
    assert!(page.contains("No dead letters match"), "{page}");
    let (status, body) = get(&app, "/db/orders/dead-letters?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains(r#""error""#) && body.contains("since"),
        "{body}"
    );
    let (status, _) = get(&app, "/db/nowhere/dead-letters").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Detail: fields, headers, pretty JSON; a binary payload as hex.
    let (status, page) = get(&app, &format!("/db/orders/dead-letters/{}", ids[0])).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Nats-Msg-Id") || page.contains("nats-msg-id"),
        "{page}"
    );
    assert!(page.contains("handler failed for 0"), "{page}");
    assert!(page.contains("&quot;deep&quot;: {"), "pretty JSON: {page}");
    let (_, page) = get(&app, &format!("/db/orders/dead-letters/{relay}")).await;
    assert!(page.contains("ff00726177"), "{page}");
    let (status, _) = get(&app, "/db/orders/dead-letters/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Payloads hidden unless allowed.
    let hidden = self::app(Config {
        show_payloads: false,
        ..config(&db.pool)
    });
    let (_, page) = get(&hidden, &format!("/db/orders/dead-letters/{}", ids[0])).await;
    assert!(
        page.contains("--show-payloads") && !page.contains("deep"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_content_is_rendered_inert() {
    let db = db().await;
    let mut hostile = letter(
        Source::Consumer,
        "<b>email</b>",
        "<script>alert(1)</script>",
        1,
        b"<img src=x onerror=alert(2)>\x1b[31m",
    );
    hostile.subject = "orders.\x1b[2J\u{202e}evil".to_owned();
    hostile.error_chain = vec!["</pre><script>alert(3)</script>".to_owned()];
    hostile.headers.insert(
        "x-evil".to_owned(),
        serde_json::Value::String("\"><script>alert(4)</script>".to_owned()),
    );
    let id = record(&db.pool, &hostile).await;
    let app = app(config(&db.pool));
    for path in [
        "/".to_owned(),
        "/db/orders/dead-letters".to_owned(),
        format!("/db/orders/dead-letters/{id}"),
    ] {
        let (status, page) = get(&app, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        // The console's own scripts, and nothing else.
        let page = page
            .replacen(
                r#"<script src="/static/htmx.min.js" defer></script>"#,
                "",
                1,
            )
            .replacen(r#"<script src="/static/console.js" defer></script>"#, "", 1);
        assert!(!page.contains("<script"), "{path}: {page}");
        assert!(!page.contains("<img"), "{path}: {page}");
        assert!(!page.contains("<b>email"), "{path}: {page}");
        assert!(
            !page.contains('\x1b') && !page.contains('\u{202e}'),
            "{path}: raw escape in {page}"
        );
    }
    let (_, page) = get(&app, &format!("/db/orders/dead-letters/{id}")).await;
    assert!(page.contains("&lt;script&gt;alert(3)"), "{page}");
    assert!(page.contains(r"orders.\x1b[2J\u{202e}evil"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_purge_go_through_the_dlq_code_and_are_audited() {
    let db = db().await;
    let consumer = record(
        &db.pool,
        &letter(Source::Consumer, "email", "handler", 1, b"{}"),
    )
    .await;
    let relay_letter = letter(Source::Relay, "relay", "publish", 2, br#"{"n":2}"#);
    let relay_id = relay_letter.message_id.clone();
    let relay = record(&db.pool, &relay_letter).await;
    let app = app(Config {
        access: Access::Basic {
            user: "ops".into(),
            password: "pw".into(),
        },
        ..config(&db.pool)
    });
    let auth = |mut r: Request<Body>| {
        r.headers_mut().insert(
            header::AUTHORIZATION,
            "Basic b3BzOnB3".parse().expect("value"),
        );
        r
    };
    let token = {
        let (status, page) = send(
            &app,
            auth(
                Request::get("/db/orders/dead-letters")
                    .header(header::HOST, HOST)
                    .body(Body::empty())
                    .expect("request"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        hidden_value(&page, "csrf")
    };

    // A selection: the consumer's letter is re-run by its consumer, the relay's returns to
    // the outbox with its id.
    let (status, page) = send(
        &app,
        auth(form(
            "/db/orders/dead-letters/retry",
            &[
                ("csrf", &token),
                ("scope", "selected"),
                ("id", &consumer.to_string()),
                ("id", &relay.to_string()),
            ],
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Retried 2 dead letters: 1 re-run by their consumers, 1 back to the outbox"),
        "{page}"
    );
    assert_eq!(
        status_of(&db.pool, consumer).await.as_deref(),
        Some("retry_requested")
    );
    assert_eq!(status_of(&db.pool, relay).await.as_deref(), Some("retried"));
    let in_outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_message WHERE id::text = $1")
            .bind(&relay_id)
            .fetch_one(&db.pool)
            .await
            .expect("outbox");
    assert_eq!(in_outbox, 1);
    assert_eq!(
        audit_rows(&db.pool).await,
        [("ops".to_owned(), "retry".to_owned(), 2)]
    );

    // Retrying them again: not dead any more, refused, nothing changes.
    let (status, body) = send(
        &app,
        auth(form(
            "/db/orders/dead-letters/retry",
            &[
                ("csrf", &token),
                ("scope", "selected"),
                ("id", &consumer.to_string()),
            ],
        )),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains(r#""error""#), "{body}");

    // All matching a filter: counted and confirmed first; a count that changed meanwhile is
    // asked again; then purged, and audited.
    for n in 10..14 {
        record(
            &db.pool,
            &letter(Source::Consumer, "billing", "decode", n, b"{}"),
        )
        .await;
    }
    let purge_all = |confirm: Option<(&str, &str, &str, &str)>| {
        let mut fields = vec![
            ("csrf", token.as_str()),
            ("scope", "all"),
            ("reason", "decode"),
        ];
        if let Some((count, max_id, counted_at, fingerprint)) = confirm {
            fields.push(("confirm", count));
            fields.push(("max_id", max_id));
            fields.push(("counted_at", counted_at));
            fields.push(("fingerprint", fingerprint));
        }
        auth(form("/db/orders/dead-letters/purge", &fields))
    };
    let decode_left = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letter WHERE reason = 'decode'")
            .fetch_one(&db.pool)
            .await
            .expect("count")
    };
    let (status, page) = send(&app, purge_all(None)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Purge <strong>4</strong> dead letters matching reason = decode"),
        "{page}"
    );
    let shown = hidden_value(&page, "max_id");
    let shown_at = hidden_value(&page, "counted_at");
    let shown_print = hidden_value(&page, "fingerprint");
    // Meanwhile one of those is purged elsewhere and two new ones arrive: the count of what
    // was shown changed, so nothing is done and the new count is asked for.
    sqlx::query("DELETE FROM dead_letter WHERE id = (SELECT min(id) FROM dead_letter WHERE reason = 'decode')")
        .execute(&db.pool)
        .await
        .expect("purged elsewhere");
    for n in [20, 21] {
        record(
            &db.pool,
            &letter(Source::Consumer, "billing", "decode", n, b"{}"),
        )
        .await;
    }
    let (_, page) = send(
        &app,
        purge_all(Some(("4", &shown, &shown_at, &shown_print))),
    )
    .await;
    assert!(
        page.contains("The letters changed since you confirmed 4")
            && page.contains("<strong>5</strong>"),
        "{page}"
    );
    assert_eq!(decode_left().await, 5, "nothing purged on a changed count");
    // Then a letter arrives after the count, and one of those counted fails once more.
    let shown = hidden_value(&page, "max_id");
    let shown_at = hidden_value(&page, "counted_at");
    let shown_print = hidden_value(&page, "fingerprint");
    record(
        &db.pool,
        &letter(Source::Consumer, "billing", "decode", 22, b"{}"),
    )
    .await;
    // The same number of letters in another state is not what was confirmed.
    sqlx::query("UPDATE dead_letter SET attempts = attempts + 1 WHERE id = (SELECT min(id) FROM dead_letter WHERE reason = 'decode')")
        .execute(&db.pool)
        .await
        .expect("failed once more");
    let (_, page) = send(
        &app,
        purge_all(Some(("5", &shown, &shown_at, &shown_print))),
    )
    .await;
    assert!(
        page.contains("The letters changed since you confirmed 5"),
        "{page}"
    );
    assert_eq!(decode_left().await, 6, "nothing purged");
    let shown = hidden_value(&page, "max_id");
    let shown_at = hidden_value(&page, "counted_at");
    let shown_print = hidden_value(&page, "fingerprint");
    // A letter that arrives after this count is not taken by its confirmation.
    record(
        &db.pool,
        &letter(Source::Consumer, "billing", "decode", 23, b"{}"),
    )
    .await;
    let (_, page) = send(
        &app,
        purge_all(Some(("6", &shown, &shown_at, &shown_print))),
    )
    .await;
    assert!(page.contains("Purged 6 dead letters."), "{page}");
    assert_eq!(decode_left().await, 1, "the letter that came later stays");
    // Nor is a letter that fails again after the count (it keeps its id, below the highest
    // counted), even when the count happens to hold.
    let (_, page) = send(&app, purge_all(None)).await;
    assert!(page.contains("Purge <strong>1</strong>"), "{page}");
    let (shown, shown_at) = (
        hidden_value(&page, "max_id"),
        hidden_value(&page, "counted_at"),
    );
    sqlx::query("DELETE FROM dead_letter WHERE reason = 'decode'")
        .execute(&db.pool)
        .await
        .expect("purged elsewhere");
    let (consumer, message_id): (String, String) = sqlx::query_as(
        "SELECT consumer, message_id FROM dead_letter WHERE reason <> 'decode' ORDER BY id LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("an older letter");
    let mut again = letter(Source::Consumer, &consumer, "decode", 40, b"{}");
    again.message_id = message_id;
    let reparked = record(&db.pool, &again).await;
    assert!(
        reparked <= shown.parse::<i64>().expect("id"),
        "premise: an older id"
    );
    let (status, body) = send(
        &app,
        purge_all(Some(("1", &shown, &shown_at, &shown_print))),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(decode_left().await, 1, "the letter that failed again stays");
    // Retrying "all" with a status other than dead is refused.
    let (status, body) = send(
        &app,
        auth(form(
            "/db/orders/dead-letters/retry",
            &[("csrf", &token), ("scope", "all"), ("status", "retried")],
        )),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        audit_rows(&db.pool).await,
        [
            ("ops".to_owned(), "retry".to_owned(), 2),
            ("ops".to_owned(), "purge".to_owned(), 6)
        ]
    );
    let (status, page) = send(
        &app,
        auth(
            Request::get("/db/orders/audit")
                .header(header::HOST, HOST)
                .body(Body::empty())
                .expect("request"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("purge") && page.contains("&quot;reason&quot;:&quot;decode&quot;"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_change_nothing() {
    let db = db().await;
    let id = record(
        &db.pool,
        &letter(Source::Consumer, "email", "handler", 1, b"{}"),
    )
    .await;
    let id = id.to_string();
    let retry = |token: &str| {
        form(
            "/db/orders/dead-letters/retry",
            &[("csrf", token), ("scope", "selected"), ("id", &id)],
        )
    };

    // Read-only: every POST refused, no action form shown.
    let read_only = app(Config {
        allow_actions: false,
        ..config(&db.pool)
    });
    let (_, page) = get(&read_only, "/db/orders/dead-letters").await;
    assert!(
        !page.contains("Retry selected") && page.contains("Read-only"),
        "{page}"
    );
    let (status, body) = send(&read_only, retry("anything")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("read-only"), "{body}");

    let app = app(config(&db.pool));
    let token = token(&app, "/db/orders/dead-letters").await;
    // No token, a wrong one, another site's Origin, no Origin at all.
    for (request, why) in [
        (
            form(
                "/db/orders/dead-letters/retry",
                &[("scope", "selected"), ("id", &id)],
            ),
            "CSRF",
        ),
        (retry("0000"), "CSRF"),
        (
            {
                let mut r = retry(&token);
                r.headers_mut().insert(
                    header::ORIGIN,
                    "http://evil.example".parse().expect("value"),
                );
                r
            },
            "not this console",
        ),
        (
            {
                let mut r = retry(&token);
                r.headers_mut().remove(header::ORIGIN);
                r
            },
            "without Origin",
        ),
    ] {
        let (status, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{why}: {body}");
        assert!(body.contains(why), "{why}: {body}");
    }
    assert_eq!(
        status_of(&db.pool, id.parse().expect("id"))
            .await
            .as_deref(),
        Some("dead")
    );
    assert!(audit_rows(&db.pool).await.is_empty());

    // Authentication: basic, and a trusted proxy's header.
    let basic = self::app(Config {
        access: Access::Basic {
            user: "ops".into(),
            password: "pw".into(),
        },
        ..config(&db.pool)
    });
    let (status, _) = get(&basic, "/").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let wrong = Request::get("/")
        .header(header::HOST, HOST)
        .header(header::AUTHORIZATION, "Basic b3BzOm5v")
        .body(Body::empty())
        .expect("request");
    let response = basic.clone().oneshot(wrong).await.expect("response");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    let proxied = self::app(Config {
        access: Access::TrustedHeader("x-forwarded-user".into()),
        ..config(&db.pool)
    });
    let (status, _) = get(&proxied, "/").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(
        &proxied,
        Request::get("/")
            .header(header::HOST, HOST)
            .header("x-forwarded-user", "ann")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A token is the user's: ann's page's token does not let bob act.
    let ann_page = Request::get("/db/orders/dead-letters")
        .header(header::HOST, HOST)
        .header("x-forwarded-user", "ann")
        .body(Body::empty())
        .expect("request");
    let (_, page) = send(&proxied, ann_page).await;
    let ann_token = hidden_value(&page, "csrf");
    let mut as_bob = retry(&ann_token);
    as_bob
        .headers_mut()
        .insert("x-forwarded-user", "bob".parse().expect("value"));
    let (status, _) = send(&proxied, as_bob).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        status_of(&db.pool, id.parse().expect("id"))
            .await
            .as_deref(),
        Some("dead")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_the_statement_timeout_is_a_clear_error() {
    let db = db().await;
    record(
        &db.pool,
        &letter(Source::Consumer, "email", "handler", 1, b"{}"),
    )
    .await;
    let app = app(Config {
        statement_timeout: Duration::from_millis(300),
        ..config(&db.pool)
    });
    // Another session holds the table: the page's query waits, and is cut off.
    let mut blocker = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE dead_letter IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let (status, body) = get(&app, "/db/orders/dead-letters").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("statement timeout"), "{body}");
    blocker.rollback().await.expect("release");
    let (status, _) = get(&app, "/db/orders/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_bad_configuration_is_refused() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .expect("lazy pool");
    let refused = |config: Config| console::router(config).err().unwrap_or_default();
    assert!(refused(Config::new(Vec::new())).contains("no database"));
    assert!(refused(Config::new(vec![Database::new("Bad Name", pool.clone())])).contains("a-z"));
    assert!(
        refused(Config::new(vec![
            Database::new("a", pool.clone()),
            Database::new("a", pool.clone())
        ]))
        .contains("twice")
    );
    assert!(
        refused(Config {
            base_path: "console/".into(),
            ..Config::new(vec![Database::new("a", pool)])
        })
        .contains("base path")
    );
}

/// DNS rebinding: a page of another site whose name resolves to the console's address sends
/// its own name as `Host`. An open console answers only to loopback names (or to the hosts
/// it is told to), so such a page reads nothing and gets no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_name_as_host_is_refused() {
    let db = db().await;
    let app = app(config(&db.pool));
    let rebound = |path: &str| {
        Request::get(path)
            .header(header::HOST, "rebind.attacker.example:3000")
            .body(Body::empty())
            .expect("request")
    };
    for path in ["/", "/db/orders/dead-letters"] {
        let (status, body) = send(&app, rebound(path)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(
            !body.contains("csrf") && body.contains("--public-host"),
            "{body}"
        );
    }
    let (status, _) = send(
        &app,
        Request::get("/")
            .header(header::HOST, "localhost:3000")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let public = self::app(Config {
        allowed_hosts: vec!["console.example".into()],
        ..config(&db.pool)
    });
    let (status, _) = send(
        &public,
        Request::get("/")
            .header(header::HOST, "console.example")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&public, rebound("/")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
