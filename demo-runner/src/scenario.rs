//! The demo scenario behind `make demo`: seed the catalogue, place [`DEMO_ORDERS`], wait
//! until each is final, check the saga's invariants, and the printable summary; and the curl
//! commands `make up` prints.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::bail;

use crate::logs::{count_lines, trace_id_of};
use crate::stack::{SEED_PRODUCTS, Stack, Urls};

/// The demo's orders: (user, items). The third asks for more laptops than exist.
pub const DEMO_ORDERS: [(&str, &[(&str, i64)]); 12] = [
    ("alice", &[("prod-001", 1), ("prod-002", 1)]),
    ("bob", &[("prod-002", 2)]),
    ("carol", &[("prod-001", 20)]),
    ("dave", &[("prod-001", 1)]),
    ("erin", &[("prod-002", 3)]),
    ("frank", &[("prod-001", 2), ("prod-002", 2)]),
    ("grace", &[("prod-001", 1)]),
    ("heidi", &[("prod-002", 1)]),
    ("ivan", &[("prod-001", 1), ("prod-002", 1)]),
    ("judy", &[("prod-002", 5)]),
    ("mallory", &[("prod-001", 2)]),
    ("oscar", &[("prod-002", 1)]),
];

/// Runs the demo on a started stack: seeds, places [`DEMO_ORDERS`], waits until every order
/// is final, checks the invariants and returns the printable summary.
pub async fn run_demo(stack: &Stack) -> anyhow::Result<String> {
    let mut out = String::new();
    stack.seed().await?;
    let mut ids = Vec::new();
    for (user, items) in DEMO_ORDERS {
        ids.push(stack.place_order(user, items).await?);
    }
    let orders = stack.wait_terminal(&ids, Duration::from_secs(120)).await?;
    let initial: Vec<(&str, i64)> = SEED_PRODUCTS.iter().map(|p| (p.0, p.2)).collect();
    let invariants = stack.check_invariants(&orders, &initial).await?;

    let _ = writeln!(out, "Orders ({}):", orders.len());
    for o in &orders {
        let _ = writeln!(
            out,
            "  {:<8} {}  {:<9} {:>9.2}  {}",
            o["userId"].as_str().unwrap_or_default(),
            o["orderId"].as_str().unwrap_or_default(),
            o["status"].as_str().unwrap_or_default(),
            o["total"].as_f64().unwrap_or_default(),
            o["reason"].as_str().unwrap_or(""),
        );
    }
    let _ = writeln!(out, "Stock:");
    for (id, name, initial, available) in &invariants.stock {
        let _ = writeln!(
            out,
            "  {id} {name:<7} started {initial:>3}, available {available:>3}, sold {:>3}, reserved 0",
            initial - available
        );
    }
    let confirmed = orders.iter().filter(|o| o["status"] == "CONFIRMED").count();
    let cancelled = orders.len() - confirmed;
    let _ = writeln!(
        out,
        "Emails: {} sent ({confirmed} confirmations, {cancelled} cancellations){}",
        invariants.emails_sent,
        if invariants.mail_files.is_empty() {
            String::new()
        } else {
            format!(", files in {}", stack.mail_dir.display())
        }
    );

    // Checks specific to the demo's orders.
    let carol = &orders[2];
    if carol["status"] != "CANCELLED"
        || !carol["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("insufficient stock")
    {
        bail!(
            "carol's order of 20 laptops should be CANCELLED for insufficient stock, got {carol}"
        );
    }
    let payment_failures = orders
        .iter()
        .filter(|o| {
            o["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("payment failed")
        })
        .count();
    if !invariants.mail_files.is_empty() {
        let expected: BTreeSet<String> = ids.iter().cloned().collect();
        if invariants.mail_files != expected {
            bail!(
                "mail directory: expected one .eml per order, found {:?}",
                invariants.mail_files
            );
        }
    }
    let _ = writeln!(
        out,
        "Events of alice's order: {}",
        stack.history(&ids[0]).await?.join(" -> ")
    );
    // A declined payment's compensation: inventory releases the stock, order-service
    // records the release.
    if let Some(declined) = orders.iter().find(|o| {
        o["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("payment failed")
    }) {
        let id = declined["orderId"].as_str().unwrap_or_default();
        let released = "received inventory.released.v1".to_owned();
        testkit::wait_for(
            Duration::from_secs(30),
            "the release to reach the order's history",
            || async { anyhow::Ok(stack.history(id).await?.contains(&released).then_some(())) },
        )
        .await?;
        let _ = writeln!(
            out,
            "Events of {}'s order (payment declined): {}",
            declined["userId"].as_str().unwrap_or_default(),
            stack.history(id).await?.join(" -> ")
        );
    }

    match trace_id_of(
        &stack.log_dir.join("order-service.log"),
        "order created",
        &ids[0],
    ) {
        Some(trace) => {
            let counts: Vec<String> = ["order-service", "inventory-service", "email-service"]
                .iter()
                .map(|s| {
                    format!(
                        "{s} {}",
                        count_lines(&stack.log_dir.join(format!("{s}.log")), &trace)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "Trace {trace} (alice's order), log lines: {}",
                counts.join(", ")
            );
            if counts.iter().any(|c| c.ends_with(" 0")) {
                bail!(
                    "trace {trace} does not reach every service's log: {}",
                    counts.join(", ")
                );
            }
        }
        None => bail!(
            "no trace id on order-service's 'order created' log line for {}",
            ids[0]
        ),
    }
    let _ = writeln!(
        out,
        "Invariants: every order final; {payment_failures} payment failures compensated; stock balances, nothing left reserved; one email per order; outboxes drained; no dead letters."
    );
    let _ = writeln!(out, "Logs: {}", stack.log_dir.display());
    Ok(out)
}

/// The payment seed `make demo` uses: with the default 90% success rate it declines two of
/// the demo's eleven payments, so the summary shows compensation.
pub const DEMO_PAYMENT_SEED: u64 = 14;

/// The curl commands `make up` prints.
pub fn curl_examples(urls: &Urls) -> String {
    format!(
        r#"Try:
  curl -s -X POST {order}/orders -H 'content-type: application/json' \
       -d '{{"userId":"u1","items":[{{"productId":"prod-002","productName":"Mouse","quantity":2,"price":29.99}}]}}'
  curl -s {order}/orders/<orderId>
  curl -s {order}/orders/<orderId>/events
  curl -s {order}/orders/user/u1
  curl -s -X POST {order}/orders/<orderId>/cancel
  curl -s {inventory}/inventory/prod-002
  curl -s -X POST {inventory}/inventory/prod-002/restock -H 'content-type: application/json' -d '{{"quantity":5}}'
  curl -s {order}/health/ready; curl -s {order}/metrics | grep orders_"#,
        order = urls.order,
        inventory = urls.inventory
    )
}
