//! The operator console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), over a running demo stack: open the overview, filter the dead
//! letters, retry one, see it leave the list, and the consumer process it once.
//!
//! Run by `make test-browser` (which installs the browser when missing): `cargo test -p
//! demo-runner --features browser --test browser`. Screenshots of each page go to
//! `target/browser-shots/`.

mod common;
#[path = "browser/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use demo_services::events::{OrderCreated, OrderLine};
use dlq::{DeadLetter, Source};
use envelope::{Envelope, HeaderText};
use uuid::Uuid;

/// A consumer's dead letter of inventory-service holding `event` as published, as the
/// consumer would have parked it during an outage.
fn parked(event: &OrderCreated, reason: &str) -> DeadLetter {
    let source = HeaderText::new("source", "order-service").expect("source");
    let envelope = Envelope::from_event(source, event).expect("envelope");
    let headers = dlq::headers_to_json(&envelope::nats::to_headers(&envelope).expect("headers"));
    DeadLetter {
        source: Source::Consumer,
        consumer: demo_services::inventory::NAME.to_owned(),
        message_id: envelope.id.to_string(),
        subject: envelope.subject.as_str().to_owned(),
        partition_key: Some(envelope.partition_key.as_str().to_owned()),
        headers,
        payload: envelope.payload.to_vec(),
        reason: reason.to_owned(),
        error_chain: vec!["the database was unreachable".to_owned()],
        attempts: 5,
        stream: None,
        stream_seq: None,
    }
}

fn order(product: &str, quantity: i32) -> OrderCreated {
    OrderCreated {
        order_id: Uuid::now_v7(),
        user_id: "u-browser".into(),
        items: vec![OrderLine {
            product_id: product.into(),
            product_name: "Laptop".into(),
            quantity,
            price_cents: 99_999,
        }],
        total_cents: 99_999 * i64::from(quantity),
    }
}

async fn reserved(stack: &demo_runner::stack::Stack, product: &str) -> i64 {
    demo_runner::client::get(&format!("{}/inventory/{product}", stack.urls.inventory))
        .await
        .expect("GET stock")
        .json["reserved"]
        .as_i64()
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_filters_dead_letters_retries_one_and_the_consumer_processes_it_once() {
    let (stack, _dir) = common::start(common::always_pay(), None).await;
    stack.seed().await.expect("seed");
    let console = demo_runner::console::serve(&stack, 0)
        .await
        .expect("console");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../browser-shots");
    std::fs::create_dir_all(&shots).expect("shots dir");

    let mut conn = stack.db.inventory.acquire().await.expect("conn");
    let retried = dlq::store::record(&mut conn, &parked(&order("prod-001", 2), "handler"))
        .await
        .expect("park");
    let kept = dlq::store::record(&mut conn, &parked(&order("prod-001", 1), "decode"))
        .await
        .expect("park");
    drop(conn);
    assert_eq!(
        reserved(&stack, "prod-001").await,
        0,
        "premise: nothing reserved"
    );

    let browser = webdriver::start().await.expect("browser");
    browser
        .goto(&format!("{}/", console.url()))
        .await
        .expect("overview");
    let card = browser
        .text("section[aria-labelledby='db-inventory']")
        .await
        .expect("card");
    assert!(card.contains("2 dead letters wait"), "{card}");
    browser
        .screenshot(&shots.join("overview.png"))
        .await
        .expect("shot");
    // The vendored htmx runs under the console's CSP and refreshes the overview in place:
    // the marked region is replaced by a fresh one.
    assert_eq!(
        browser.execute("return typeof htmx").await.expect("script"),
        "object"
    );
    browser
        .execute("document.getElementById('live').dataset.marked = 'yes'")
        .await
        .expect("mark");
    testkit::wait_until(
        Duration::from_secs(20),
        "the overview refreshed itself",
        || async {
            browser
                .execute("return document.getElementById('live').dataset.marked || 'fresh'")
                .await
                .is_ok_and(|v| v == "fresh")
        },
    )
    .await
    .expect("live refresh");

    browser
        .goto(&format!("{}/db/orders/relays", console.url()))
        .await
        .expect("relays");
    assert_eq!(
        browser.count("td[data-partition]").await.expect("grid"),
        256
    );
    assert!(browser.count("tr[data-instance]").await.expect("instances") >= 1);
    browser
        .screenshot(&shots.join("relays.png"))
        .await
        .expect("shot");
    browser
        .goto(&format!("{}/db/inventory/consumers", console.url()))
        .await
        .expect("consumers");
    assert!(
        browser.count("tr[data-durable]").await.expect("durables") >= 1,
        "the inventory consumer's durable is listed"
    );
    browser
        .screenshot(&shots.join("consumers.png"))
        .await
        .expect("shot");
    browser
        .goto(&format!("{}/", console.url()))
        .await
        .expect("overview");

    browser
        .click("a[href='/db/inventory/dead-letters']")
        .await
        .expect("open the dead letters");
    assert_eq!(browser.count("tr[data-id]").await.expect("rows"), 2);
    browser
        .type_into("input[name='reason']", "handler")
        .await
        .expect("type");
    browser
        .click("form.filters button[type='submit']")
        .await
        .expect("filter");
    // The click starts the form's navigation; the filtered page may not be there yet.
    testkit::wait_until(
        Duration::from_secs(20),
        "the filtered dead-letter page",
        || async {
            browser
                .url()
                .await
                .is_ok_and(|url| url.contains("reason=handler"))
                && browser.count("tr[data-id]").await.is_ok_and(|n| n == 1)
        },
    )
    .await
    .expect("filtered");
    assert_eq!(
        browser
            .count(&format!("tr[data-id='{retried}']"))
            .await
            .expect("row"),
        1
    );
    browser
        .screenshot(&shots.join("dead-letters.png"))
        .await
        .expect("shot");

    browser
        .click(&format!("input[name='id'][value='{retried}']"))
        .await
        .expect("select");
    browser
        .click("#selection button[type='submit']:not(.danger)")
        .await
        .expect("retry selected");
    let outcome = browser
        .text("[data-field='outcome']")
        .await
        .expect("outcome");
    assert!(
        outcome.contains("Retried 1 dead letter: 1 re-run by their consumers"),
        "{outcome}"
    );
    browser
        .screenshot(&shots.join("retried.png"))
        .await
        .expect("shot");

    // It leaves the dead letters; the other one stays.
    browser
        .goto(&format!(
            "{}/db/inventory/dead-letters?status=dead",
            console.url()
        ))
        .await
        .expect("dead ones");
    assert_eq!(
        browser
            .count(&format!("tr[data-id='{retried}']"))
            .await
            .expect("row"),
        0
    );
    assert_eq!(
        browser
            .count(&format!("tr[data-id='{kept}']"))
            .await
            .expect("row"),
        1
    );

    // The consumer re-runs it, once: two units reserved, and the letter marked retried.
    let pool = stack.db.inventory.clone();
    testkit::wait_for(
        Duration::from_secs(60),
        "the retried letter re-run",
        || async {
            let letter = dlq::store::get(&mut *pool.acquire().await?, retried).await?;
            anyhow::Ok(letter.filter(|l| l.status == "retried").map(|_| ()))
        },
    )
    .await
    .expect("re-run by inventory-service");
    assert_eq!(
        reserved(&stack, "prod-001").await,
        2,
        "processed exactly once"
    );
    browser
        .goto(&format!(
            "{}/db/inventory/dead-letters/{retried}",
            console.url()
        ))
        .await
        .expect("detail");
    assert_eq!(
        browser.text("[data-field='status']").await.expect("status"),
        "retried"
    );
    browser
        .screenshot(&shots.join("detail.png"))
        .await
        .expect("shot");
    browser.quit().await;
    stack.stop().await.expect("stop");
}
