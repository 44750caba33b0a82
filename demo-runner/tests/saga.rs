//! The saga end to end over HTTP: real PostgreSQL, nats-server, the three service processes
//! and their relay sidecars.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use demo_runner::client;
use demo_runner::stack::{SEED_PRODUCTS, Stack};
use demo_services::events;
use demo_services::order::PaymentSimulation;
use serde_json::{Value, json};

async fn stock(stack: &Stack, product: &str) -> (i64, i64) {
    let p = client::get(&format!("{}/inventory/{product}", stack.urls.inventory))
        .await
        .expect("GET inventory")
        .json;
    (
        p["available"].as_i64().expect("available"),
        p["reserved"].as_i64().expect("reserved"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_insufficient_stock_and_payment_failure_with_compensation() {
    // Seed 3: with a 50% success rate the 1st payment succeeds and the 2nd is declined.
    let payment = PaymentSimulation {
        success_rate: 0.5,
        seed: 3,
    };
    assert!(
        payment.succeeds(1) && !payment.succeeds(2),
        "seed assumption"
    );
    let (stack, _dir) = common::start(payment, None).await;
    stack.seed().await.expect("seed");

    let paid = stack
        .place_order("u-paid", &[("prod-001", 2), ("prod-002", 1)])
        .await
        .expect("order");
    let declined = stack
        .place_order("u-declined", &[("prod-001", 3)])
        .await
        .expect("order");
    let too_many = stack
        .place_order("u-greedy", &[("prod-001", 11)])
        .await
        .expect("order");
    let ids = [paid.clone(), declined.clone(), too_many.clone()];
    let orders = stack
        .wait_terminal(&ids, Duration::from_secs(60))
        .await
        .expect("final");

    assert_eq!(orders[0]["status"], "CONFIRMED", "{}", orders[0]);
    assert_eq!(orders[0]["total"], json!(2029.97));
    assert_eq!(orders[1]["status"], "CANCELLED");
    assert!(
        orders[1]["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("payment failed"),
        "{}",
        orders[1]
    );
    assert_eq!(orders[2]["status"], "CANCELLED");
    let reason = orders[2]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("insufficient stock for prod-001: requested 11"),
        "{reason}"
    );

    let initial = [("prod-001", 10), ("prod-002", 50)];
    let invariants = stack
        .check_invariants(&orders, &initial)
        .await
        .expect("invariants");
    assert_eq!(invariants.emails_sent, 3);
    // The declined order's 3 laptops came back; only the paid order's are sold.
    assert_eq!(stock(&stack, "prod-001").await, (8, 0));
    assert_eq!(stock(&stack, "prod-002").await, (49, 0));

    assert_eq!(
        stack.history(&paid).await.expect("history"),
        [
            "published order.created.v1",
            "received inventory.reserved.v1",
            "published payment.processed.v1",
            "received payment.processed.v1",
            "published order.confirmed.v1",
        ]
    );
    let declined_history = stack.history(&declined).await.expect("history");
    testkit::wait_until(
        Duration::from_secs(30),
        "the release to reach the order's history",
        || async {
            stack
                .history(&declined)
                .await
                .expect("history")
                .contains(&"received inventory.released.v1".to_owned())
        },
    )
    .await
    .expect("released");
    assert!(declined_history.starts_with(&[
        "published order.created.v1".to_owned(),
        "received inventory.reserved.v1".to_owned(),
        "published payment.failed.v1".to_owned(),
        "received payment.failed.v1".to_owned(),
        "published order.cancelled.v1".to_owned(),
    ]));
    assert_eq!(
        stack.history(&too_many).await.expect("history"),
        [
            "published order.created.v1",
            "received inventory.reservation_failed.v1",
            "published order.cancelled.v1",
        ]
    );

    // Metrics count what happened (and exist at zero before anything happens).
    let metrics = client::get(&format!("{}/metrics", stack.urls.order))
        .await
        .expect("metrics")
        .text;
    for (name, value) in [
        ("orders_created_total", 3),
        ("orders_confirmed_total", 1),
        ("orders_cancelled_total", 2),
        ("payments_processed_total", 2),
        ("payments_success_total", 1),
        ("payments_failed_total", 1),
    ] {
        assert!(
            metrics.lines().any(|l| l == format!("{name} {value}")),
            "{name} {value} in\n{metrics}"
        );
    }
    let metrics = client::get(&format!("{}/metrics", stack.urls.inventory))
        .await
        .expect("metrics")
        .text;
    assert!(
        metrics.contains("inventory_reservations_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("inventory_failures_total 1"), "{metrics}");

    // A user's orders, oldest first.
    let mine = client::get(&format!("{}/orders/user/u-paid", stack.urls.order))
        .await
        .expect("GET");
    assert_eq!(mine.json["orders"].as_array().map(Vec::len), Some(1));
    assert_eq!(mine.json["orders"][0]["orderId"], paid.as_str());
    stack.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_endpoint_releases_stock_and_refuses_final_orders() {
    let (stack, _dir) = common::start(common::always_pay(), None).await;
    stack.seed().await.expect("seed");
    let confirmed = stack
        .place_order("u1", &[("prod-002", 1)])
        .await
        .expect("order");
    stack
        .wait_terminal(std::slice::from_ref(&confirmed), Duration::from_secs(60))
        .await
        .expect("final");

    // Hold order-service's relay so the next order stays PENDING until we cancel it.
    stack.order_relay.pause().expect("pause relay");
    let cancelled = stack
        .place_order("u1", &[("prod-001", 4)])
        .await
        .expect("order");
    let r = client::post_json(
        &format!("{}/orders/{cancelled}/cancel", stack.urls.order),
        &json!({}),
    )
    .await
    .expect("cancel");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "CANCELLED");
    assert_eq!(r.json["reason"], "cancelled by the customer");
    stack.order_relay.resume().expect("resume relay");

    // Inventory sees order.created (reserves) then order.cancelled (releases), in that order.
    testkit::wait_until(
        Duration::from_secs(30),
        "the release to reach the order's history",
        || async {
            stack
                .history(&cancelled)
                .await
                .expect("history")
                .contains(&"received inventory.released.v1".to_owned())
        },
    )
    .await
    .expect("released");
    let orders = vec![
        stack.order(&confirmed).await.expect("o"),
        stack.order(&cancelled).await.expect("o"),
    ];
    stack
        .check_invariants(&orders, &[("prod-001", 10), ("prod-002", 50)])
        .await
        .expect("invariants");
    assert_eq!(stock(&stack, "prod-001").await, (10, 0));

    for (id, expected) in [(&cancelled, 409), (&confirmed, 409)] {
        let r = client::post_json(
            &format!("{}/orders/{id}/cancel", stack.urls.order),
            &json!({}),
        )
        .await
        .expect("cancel");
        assert_eq!(r.status, expected, "{}", r.text);
        assert!(
            r.json["error"]
                .as_str()
                .unwrap_or_default()
                .contains("already"),
            "{}",
            r.text
        );
    }
    let unknown = uuid::Uuid::now_v7();
    let r = client::post_json(
        &format!("{}/orders/{unknown}/cancel", stack.urls.order),
        &json!({}),
    )
    .await
    .expect("cancel");
    assert_eq!(r.status, 404, "{}", r.text);
    stack.stop().await.expect("clean stop");
}

/// What the saga has done, as seen through the APIs and the email table.
async fn snapshot(stack: &Stack, ids: &[String]) -> Value {
    let mut orders = Vec::new();
    for id in ids {
        let mut order = stack.order(id).await.expect("order");
        order["history"] = json!(stack.history(id).await.expect("history"));
        orders.push(order);
    }
    let mut products = Vec::new();
    for (id, ..) in SEED_PRODUCTS {
        products.push(
            client::get(&format!("{}/inventory/{id}", stack.urls.inventory))
                .await
                .expect("GET")
                .json,
        );
    }
    let emails =
        demo_services::email::store::counts(&mut stack.db.email.acquire().await.expect("conn"))
            .await
            .expect("counts");
    let catalogue = client::get(&format!("{}/products", stack.urls.order))
        .await
        .expect("GET")
        .json;
    json!({ "orders": orders, "products": products, "emails": [emails.0, emails.1], "catalogue": catalogue })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_delivered_twice_takes_effect_once() {
    let payment = PaymentSimulation {
        success_rate: 0.5,
        seed: 3,
    };
    let (stack, _dir) = common::start(payment, None).await;
    stack.seed().await.expect("seed");
    let ids = vec![
        stack
            .place_order("u1", &[("prod-001", 1)])
            .await
            .expect("paid"),
        stack
            .place_order("u2", &[("prod-001", 1)])
            .await
            .expect("declined"),
        stack
            .place_order("u3", &[("prod-001", 50)])
            .await
            .expect("too many"),
    ];
    let orders = stack
        .wait_terminal(&ids, Duration::from_secs(60))
        .await
        .expect("final");
    stack
        .check_invariants(&orders, &[("prod-001", 10), ("prod-002", 50)])
        .await
        .expect("invariants");
    let before = snapshot(&stack, &ids).await;

    // Deliver every message of the stream again: same ce-id (the inbox's key), a new
    // Nats-Msg-Id so that the broker's dedup does not drop the copy.
    let js = common::jetstream(&stack).await;
    let mut stream = js.get_stream(events::STREAM).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut subjects = BTreeSet::new();
    let mut copies: Vec<String> = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.expect("message");
        let mut headers = message.headers.clone();
        headers.insert("Nats-Msg-Id", format!("again-{seq}").as_str());
        js.publish_with_headers(
            message.subject.to_string(),
            headers,
            message.payload.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
        subjects.insert(message.subject.to_string());
        copies.push(message.subject.to_string());
    }
    let expected: BTreeSet<String> = [
        "inventory.product_updated.v1",
        "order.created.v1",
        "inventory.reserved.v1",
        "inventory.reservation_failed.v1",
        "payment.processed.v1",
        "payment.failed.v1",
        "order.confirmed.v1",
        "order.cancelled.v1",
        "inventory.released.v1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(subjects, expected, "every event type was redelivered");

    // Wait until each consumer has been handed and has acknowledged every copy.
    let end = stream.info().await.expect("info").state.last_sequence;
    assert_eq!(end, 2 * last);
    for consumer in ["order-service", "inventory-service", "email-service"] {
        // Every copy is published (acked) already, so nothing pending means delivered.
        common::wait_consumed(&js, consumer).await;
    }
    // Each service saw its copies and skipped them as duplicates.
    for (url, prefixes) in [
        (&stack.urls.order, &["inventory.", "payment."][..]),
        (
            &stack.urls.inventory,
            &["order.created", "order.confirmed", "order.cancelled"][..],
        ),
        (
            &stack.urls.email,
            &["order.confirmed", "order.cancelled"][..],
        ),
    ] {
        let expected = copies
            .iter()
            .filter(|s| prefixes.iter().any(|p| s.starts_with(p)))
            .count();
        let metrics = client::get(&format!("{url}/metrics"))
            .await
            .expect("metrics")
            .text;
        let skipped: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("inbox_duplicates_skipped_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(expected > 0);
        assert_eq!(skipped as usize, expected, "duplicates skipped by {url}");
    }
    let after = snapshot(&stack, &ids).await;
    assert_eq!(before, after, "a second delivery changed something");
    stack
        .check_invariants(&orders, &[("prod-001", 10), ("prod-002", 50)])
        .await
        .expect("invariants after redelivery");
    stack.stop().await.expect("clean stop");
}

/// (what, URL, content type, body, expected status).
type Case<'a> = (&'a str, String, Option<&'a str>, Vec<u8>, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx_and_writes_nothing() {
    let (stack, _dir) = common::start(common::always_pay(), None).await;
    stack.seed().await.expect("seed");
    let order_url = format!("{}/orders", stack.urls.order);
    let item = |quantity: Value, price: Value, product: &str| json!({ "userId": "u", "items": [{ "productId": product, "productName": "Laptop", "quantity": quantity, "price": price }] });
    let huge = "x".repeat(100 * 1024);
    let json_ct = Some("application/json");
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            order_url.clone(),
            json_ct,
            b"{\"userId\": ".to_vec(),
            400,
        ),
        (
            "not JSON at all",
            order_url.clone(),
            json_ct,
            b"hello".to_vec(),
            400,
        ),
        (
            "no content type",
            order_url.clone(),
            None,
            item(json!(1), json!(1.0), "prod-001")
                .to_string()
                .into_bytes(),
            415,
        ),
        (
            "missing userId",
            order_url.clone(),
            json_ct,
            json!({ "items": [] }).to_string().into_bytes(),
            422,
        ),
        (
            "missing items",
            order_url.clone(),
            json_ct,
            json!({ "userId": "u" }).to_string().into_bytes(),
            422,
        ),
        (
            "quantity as string",
            order_url.clone(),
            json_ct,
            item(json!("two"), json!(1.0), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "price as string",
            order_url.clone(),
            json_ct,
            item(json!(1), json!("cheap"), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "zero quantity",
            order_url.clone(),
            json_ct,
            item(json!(0), json!(1.0), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "negative quantity",
            order_url.clone(),
            json_ct,
            item(json!(-3), json!(1.0), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "fractional quantity",
            order_url.clone(),
            json_ct,
            item(json!(1.5), json!(1.0), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "negative price",
            order_url.clone(),
            json_ct,
            item(json!(1), json!(-5.0), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "price with 3 decimals",
            order_url.clone(),
            json_ct,
            item(json!(1), json!(1.001), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "unknown product",
            order_url.clone(),
            json_ct,
            item(json!(1), json!(1.0), "prod-999")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "not the catalogue's price",
            order_url.clone(),
            json_ct,
            item(json!(1), json!(0.01), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "price over a million",
            order_url.clone(),
            json_ct,
            item(json!(1), json!(340375221.15), "prod-001")
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "empty items",
            order_url.clone(),
            json_ct,
            json!({ "userId": "u", "items": [] })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "blank userId",
            order_url.clone(),
            json_ct,
            json!({ "userId": " ", "items": [] })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "oversized body",
            order_url.clone(),
            json_ct,
            json!({ "userId": huge, "items": [] })
                .to_string()
                .into_bytes(),
            413,
        ),
        (
            "body is an array",
            order_url.clone(),
            json_ct,
            b"[]".to_vec(),
            422,
        ),
        (
            "inventory: negative quantity",
            format!("{}/inventory", stack.urls.inventory),
            json_ct,
            json!({ "product_id": "p-x", "name": "X", "quantity": -1, "price": 1.0 })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "inventory: bad product id",
            format!("{}/inventory", stack.urls.inventory),
            json_ct,
            json!({ "product_id": "a b/c", "name": "X", "quantity": 1, "price": 1.0 })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "inventory: zero price",
            format!("{}/inventory", stack.urls.inventory),
            json_ct,
            json!({ "product_id": "p-x", "name": "X", "quantity": 1, "price": 0 })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "inventory: missing name",
            format!("{}/inventory", stack.urls.inventory),
            json_ct,
            json!({ "product_id": "p-x", "quantity": 1, "price": 1.0 })
                .to_string()
                .into_bytes(),
            422,
        ),
        (
            "inventory: duplicate product",
            format!("{}/inventory", stack.urls.inventory),
            json_ct,
            json!({ "product_id": "prod-001", "name": "Laptop", "quantity": 1, "price": 1.0 })
                .to_string()
                .into_bytes(),
            409,
        ),
        (
            "restock: zero",
            format!("{}/inventory/prod-001/restock", stack.urls.inventory),
            json_ct,
            json!({ "quantity": 0 }).to_string().into_bytes(),
            422,
        ),
        (
            "restock: negative",
            format!("{}/inventory/prod-001/restock", stack.urls.inventory),
            json_ct,
            json!({ "quantity": -4 }).to_string().into_bytes(),
            422,
        ),
        (
            "restock: unknown product",
            format!("{}/inventory/prod-999/restock", stack.urls.inventory),
            json_ct,
            json!({ "quantity": 4 }).to_string().into_bytes(),
            404,
        ),
    ];
    let before_stock = (
        stock(&stack, "prod-001").await,
        stock(&stack, "prod-002").await,
    );
    for (what, url, content_type, body, status) in cases {
        let r = client::send("POST", &url, content_type, body)
            .await
            .expect(what);
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert!(
            r.json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: expected a JSON reason, got {:?} {}",
            r.content_type,
            r.text
        );
    }
    for (what, url) in [
        (
            "unknown order",
            format!("{}/orders/{}", stack.urls.order, uuid::Uuid::now_v7()),
        ),
        (
            "malformed order id",
            format!("{}/orders/not-a-uuid", stack.urls.order),
        ),
        (
            "events of unknown order",
            format!(
                "{}/orders/{}/events",
                stack.urls.order,
                uuid::Uuid::now_v7()
            ),
        ),
        (
            "unknown product",
            format!("{}/inventory/prod-999", stack.urls.inventory),
        ),
        ("unknown route", format!("{}/nope", stack.urls.order)),
        (
            "NUL in a product id",
            format!("{}/inventory/a%00b", stack.urls.inventory),
        ),
    ] {
        let r = client::get(&url).await.expect(what);
        assert_eq!(r.status, 404, "{what}: {}", r.text);
        assert!(r.json["error"].is_string(), "{what}: {}", r.text);
    }
    let r = client::get(&format!("{}/orders/user/a%00b", stack.urls.order))
        .await
        .expect("GET");
    assert_eq!(r.status, 422, "NUL in a user id: {}", r.text);
    let r = client::send(
        "DELETE",
        &format!("{}/orders", stack.urls.order),
        None,
        Vec::new(),
    )
    .await
    .expect("DELETE");
    assert_eq!(r.status, 405, "{}", r.text);
    assert!(r.json["error"].is_string(), "{}", r.text);

    // Nothing was written: no order, no outbox message, stock unchanged, nothing counted.
    let metrics = client::get(&format!("{}/metrics", stack.urls.order))
        .await
        .expect("metrics")
        .text;
    assert!(
        metrics.lines().any(|l| l == "orders_created_total 0"),
        "{metrics}"
    );
    let mut conn = stack.db.orders.acquire().await.expect("conn");
    assert_eq!(
        demo_services::order::store::count_orders(&mut conn)
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        outbox::store::backlog(&mut conn)
            .await
            .expect("backlog")
            .unpublished,
        0
    );
    drop(conn);
    assert_eq!(
        before_stock,
        (
            stock(&stack, "prod-001").await,
            stock(&stack, "prod-002").await
        )
    );
    let r = client::get(&format!("{}/inventory/p-x", stack.urls.inventory))
        .await
        .expect("GET");
    assert_eq!(r.status, 404, "the refused product p-x must not exist");
    stack.stop().await.expect("clean stop");
}
