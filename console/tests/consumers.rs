//! The consumers page against a real PostgreSQL and nats-server: a durable's pending,
//! ack-pending and redelivered counts beside its inbox, durables of no database apart, the
//! streams' duplicate window (which the overview's flag then uses), the redelivery horizon
//! against the inbox retention, and a broker that does not answer.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use axum::http::StatusCode;
use futures::StreamExt as _;
use testkit::NatsServer;

mod common;

use common::*;

async fn durable(js: &jetstream::Context, name: &str) -> consumer::PullConsumer {
    js.get_stream("ORDERS")
        .await
        .expect("stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_wait: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("durable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durables_stand_beside_their_inboxes() {
    let db = db().await;
    let nats = NatsServer::start().await.expect("nats-server");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "ORDERS".to_owned(),
        subjects: vec!["orders.>".to_owned()],
        duplicate_window: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .expect("stream");
    let email = durable(&js, "email").await;
    durable(&js, "stranger").await;
    for n in 0..5 {
        js.publish(format!("orders.{n}"), "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // Two delivered and not acknowledged: ack pending 2, pending 3.
    let mut batch = email
        .fetch()
        .max_messages(2)
        .messages()
        .await
        .expect("fetch");
    let mut taken = 0;
    while let Some(m) = batch.next().await {
        m.expect("message");
        taken += 1;
    }
    assert_eq!(taken, 2);
    sqlx::raw_sql(
        "INSERT INTO inbox_message (consumer, message_id, subject) VALUES
             ('email', 'm-1', 'orders.1'), ('email', 'm-2', 'orders.2');",
    )
    .execute(&db.pool)
    .await
    .expect("inbox rows");

    // A backlog older than the stream's 30 s window, though the console was told 120 s.
    sqlx::raw_sql(
        "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at,
                                     headers, payload, created_at)
         VALUES (gen_random_uuid(), 'orders.created', 'order.created.v1', 'svc', 'k', now(),
                 '{}', '\\x7b7d', now() - interval '1 minute')",
    )
    .execute(&db.pool)
    .await
    .expect("old row");

    let app = app(console::Config {
        broker: Some(client.clone()),
        ..config(&db.pool)
    });
    let (status, page) = get(&app, "/db/orders/consumers").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ours = page
        .find(r#"<tr data-durable="email">"#)
        .expect("email's row");
    let others = page
        .find("Other durables on the broker")
        .expect("the others' section");
    let stranger = page
        .find(r#"<tr data-durable="stranger">"#)
        .expect("stranger's row");
    assert!(ours < others && others < stranger, "{page}");
    let row = &page[ours..ours + page[ours..].find("</tr>").expect("row end")];
    assert!(row.contains(r#"data-field="pending">3<"#), "{row}");
    assert!(row.contains(r#"data-field="ack-pending">2<"#), "{row}");
    assert!(row.contains(r#"data-field="redelivered">0<"#), "{row}");
    assert!(
        page.contains(r#"<tr data-inbox="email"><td>email</td><td class="num" data-field="last-minute">2</td>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<td class="num" data-field="duplicate-window">30s</td>"#),
        "{page}"
    );
    assert!(!page.contains("may still be delivered"), "{page}");

    // The overview flags the backlog against the stream's window, and lists the durable.
    let (_, overview) = get(&app, "/").await;
    assert!(
        overview.contains("past the stream&#39;s duplicate window (30s)")
            || overview.contains("past the stream's duplicate window (30s)"),
        "{overview}"
    );
    assert!(
        overview.contains(r#"<tr data-durable="email">"#),
        "{overview}"
    );

    // An inbox retention shorter than the age of the oldest message email may still be
    // delivered (any age is longer than none).
    let short = self::app(console::Config {
        broker: Some(client.clone()),
        inbox_retention: Duration::ZERO,
        ..config(&db.pool)
    });
    let (_, page) = get(&short, "/db/orders/consumers").await;
    assert!(
        page.contains("consumer email: it may still be delivered a message stored"),
        "{page}"
    );

    // A broker that is gone: the page says so, within its deadline, and still shows the
    // inboxes.
    drop(nats);
    let gone = self::app(console::Config {
        broker: Some(client),
        broker_timeout: Duration::from_millis(500),
        ..config(&db.pool)
    });
    let started = std::time::Instant::now();
    let (status, page) = get(&gone, "/db/orders/consumers").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        page.contains("the broker did not answer") || page.contains("listing streams"),
        "{page}"
    );
    assert!(page.contains(r#"<tr data-inbox="email">"#), "{page}");
}
