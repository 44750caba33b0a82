//! Hostile messages on the wire: not JSON, the wrong schema, no CloudEvents headers, huge
//! headers, an event type nobody handles. Each is dead-lettered by the consumer with a
//! reason and its raw bytes, nothing else changes, and the saga keeps working.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use demo_services::events::{OrderCreated, OrderLine};

use envelope::{Envelope, HeaderText};
use uuid::Uuid;

fn valid_headers(event: &OrderCreated) -> HeaderMap {
    let source = HeaderText::new("source", "hostile-test").expect("source");
    let envelope = Envelope::from_event(source, event).expect("envelope");
    envelope::nats::to_headers(&envelope).expect("headers")
}

fn order_created() -> OrderCreated {
    OrderCreated {
        order_id: Uuid::now_v7(),
        user_id: "mallory".into(),
        items: vec![OrderLine {
            product_id: "prod-001".into(),
            product_name: "Laptop".into(),
            quantity: 1,
            price_cents: 99_999,
        }],
        total_cents: 99_999,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_with_a_reason_and_change_nothing() {
    let (stack, _dir) = common::start(common::always_pay(), None).await;
    stack.seed().await.expect("seed");
    let js = common::jetstream(&stack).await;
    let subject = "order.created.v1";

    let mut cases: Vec<(&str, HeaderMap, Bytes, &str)> = Vec::new();
    let event = order_created();
    cases.push((
        "not JSON",
        valid_headers(&event),
        Bytes::from_static(b"\x00\xffnot json"),
        "decode",
    ));
    let event = order_created();
    cases.push((
        "wrong schema",
        valid_headers(&event),
        Bytes::from_static(br#"{"orderId": 42, "what": "ever"}"#),
        "decode",
    ));
    let event = order_created();
    let mut no_ce = HeaderMap::new();
    no_ce.insert("Nats-Msg-Id", Uuid::now_v7().to_string().as_str());
    cases.push((
        "no CloudEvents headers",
        no_ce,
        Bytes::from(serde_json::to_vec(&event).expect("json")),
        "decode",
    ));
    let event = order_created();
    let mut huge = valid_headers(&event);
    // Under JetStream's 64 KiB header limit, far over the envelope's 4 KiB per value.
    huge.insert("x-huge", "h".repeat(60_000).as_str());
    cases.push((
        "huge header",
        huge,
        Bytes::from(serde_json::to_vec(&event).expect("json")),
        "decode",
    ));
    let event = order_created();
    let mut v2 = valid_headers(&event);
    v2.insert("ce-type", "order.created.v2");
    cases.push((
        "event type nobody handles",
        v2,
        Bytes::from(serde_json::to_vec(&event).expect("json")),
        "unrouted",
    ));
    let mut expected: BTreeMap<String, &str> = BTreeMap::new();
    for (what, headers, payload, reason) in cases {
        js.publish_with_headers(subject, headers, payload.clone())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        expected.insert(String::from_utf8_lossy(&payload).into_owned(), reason);
    }

    let pool = stack.db.inventory.clone();
    let filter = dlq::store::Filter {
        consumer: Some("inventory-service".into()),
        ..dlq::store::Filter::default()
    };
    testkit::wait_for(Duration::from_secs(60), "five dead letters", || async {
        let dead = dlq::store::count(&mut *pool.acquire().await?, &filter).await?;
        anyhow::Ok((dead == 5).then_some(()))
    })
    .await
    .expect("dead-lettered");
    let letters = dlq::store::list(&mut pool.acquire().await.expect("conn"), &filter, 10)
        .await
        .expect("list");
    for letter in &letters {
        let payload = String::from_utf8_lossy(&letter.payload).into_owned();
        let reason = expected
            .get(&payload)
            .unwrap_or_else(|| panic!("unexpected dead letter {payload}"));
        assert_eq!(
            letter.reason, *reason,
            "{payload}: {:?}",
            letter.error_chain
        );
        assert_eq!(letter.subject, subject);
        assert_eq!(letter.attempts, 1, "parked at once, not retried");
    }

    // Nothing changed: no reservation was made, and the saga still works.
    let stock = demo_runner::client::get(&format!("{}/inventory/prod-001", stack.urls.inventory))
        .await
        .expect("GET")
        .json;
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64()),
        (Some(10), Some(0))
    );
    let id = stack
        .place_order("honest", &[("prod-001", 1)])
        .await
        .expect("order");
    let orders = stack
        .wait_terminal(&[id], Duration::from_secs(60))
        .await
        .expect("final");
    assert_eq!(orders[0]["status"], "CONFIRMED");
    stack.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_that_overtakes_its_creation_leaves_no_stock_reserved() {
    let (stack, _dir) = common::start(common::always_pay(), None).await;
    stack.seed().await.expect("seed");
    let js = common::jetstream(&stack).await;
    // What a redelivery or a `dlq retry` of order.created after the customer cancelled
    // looks like to inventory: the cancellation first, then the creation.
    let created = order_created();
    let cancelled = demo_services::events::OrderCancelled {
        order_id: created.order_id,
        user_id: created.user_id.clone(),
        items: created.items.clone(),
        total_cents: created.total_cents,
        reason: "cancelled by the customer".into(),
    };
    let source = HeaderText::new("source", "hostile-test").expect("source");
    for envelope in [
        Envelope::from_event(source.clone(), &cancelled).expect("envelope"),
        Envelope::from_event(source, &created).expect("envelope"),
    ] {
        js.publish_with_headers(
            envelope.subject.to_string(),
            envelope::nats::to_headers(&envelope).expect("headers"),
            envelope.payload.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    common::wait_consumed(&js, "inventory-service").await;
    let stock = demo_runner::client::get(&format!("{}/inventory/prod-001", stack.urls.inventory))
        .await
        .expect("GET")
        .json;
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64()),
        (Some(10), Some(0)),
        "nothing reserved for an order that was already cancelled"
    );
    stack.stop().await.expect("clean stop");
}
