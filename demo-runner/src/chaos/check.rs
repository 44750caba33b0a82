//! After the load and the faults: waiting for quiescence, then the saga check (every
//! acknowledged order exists and is final, each order's history has each effect once and
//! matches its state, the invariants hold).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use super::Report;
use crate::client;
use crate::stack::Stack;

/// Every process is up again (a restarted service answers `/health`).
pub(super) async fn wait_all_up(stack: &Stack) -> anyhow::Result<()> {
    for url in [
        &stack.urls.order,
        &stack.urls.inventory,
        &stack.urls.email,
        &stack.urls.order_relay,
        &stack.urls.inventory_relay,
    ] {
        let health = format!("{url}/health");
        testkit::wait_until(
            Duration::from_secs(60),
            &format!("{url} to answer"),
            || async { client::get(&health).await.is_ok_and(|r| r.status == 200) },
        )
        .await?;
    }
    Ok(())
}

/// The saga check; records what it finds in `report`, fails with the first violation.
pub(super) async fn check(
    stack: &Stack,
    placed: &[(String, anyhow::Result<String>)],
    initial: &[(&str, i64)],
    report: &mut Report,
    started: Instant,
) -> anyhow::Result<()> {
    let mut acknowledged = Vec::new();
    for (user, result) in placed {
        match result {
            Ok(id) => acknowledged.push((user.clone(), id.clone())),
            Err(e) => bail!("load: {e:#}"),
        }
    }
    report.orders = acknowledged.len();
    // Every order in the database: the acknowledged ones, and any committed whose response a
    // fault swallowed (the client retried, so a user may have two).
    let mut orders: BTreeMap<String, Value> = BTreeMap::new();
    // Wait while orders keep reaching a final state; give up after a minute without progress
    // (no fixed deadline, so not a `testkit::wait_for`).
    let stall_limit = Duration::from_secs(60);
    let mut last_progress = (0, Instant::now());
    loop {
        orders.clear();
        for (user, _) in &acknowledged {
            let r = client::get(&format!("{}/orders/user/{user}", stack.urls.order)).await?;
            for order in r.json["orders"].as_array().into_iter().flatten() {
                orders.insert(
                    order["orderId"].as_str().unwrap_or_default().to_owned(),
                    order.clone(),
                );
            }
        }
        let terminal = orders
            .values()
            .filter(|o| o["status"] == "CONFIRMED" || o["status"] == "CANCELLED")
            .count();
        report.terminal = terminal;
        if terminal == orders.len() {
            break;
        }
        if terminal > last_progress.0 {
            last_progress = (terminal, Instant::now());
        } else if last_progress.1.elapsed() > stall_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "chaos: t={:>5.1}s {} of {} orders final",
        started.elapsed().as_secs_f64(),
        report.terminal,
        orders.len()
    );
    let missing: Vec<&String> = acknowledged
        .iter()
        .map(|(_, id)| id)
        .filter(|id| !orders.contains_key(*id))
        .collect();
    let stuck: Vec<&Value> = orders
        .values()
        .filter(|o| o["status"] != "CONFIRMED" && o["status"] != "CANCELLED")
        .collect();
    report.lost = missing.len() + stuck.len();
    if let Some(id) = missing.first() {
        bail!("lost: order {id} was acknowledged with 201 but does not exist");
    }
    if let Some(o) = stuck.first() {
        bail!(
            "lost: {} orders not final ({stall_limit:?} without progress), e.g. {} is {} (its history: {:?})",
            stuck.len(),
            o["orderId"],
            o["status"],
            stack
                .history(o["orderId"].as_str().unwrap_or_default())
                .await
                .unwrap_or_default()
        );
    }

    // Each order's history: one creation, one outcome matching its state, no event twice.
    let mut first_problem = None;
    for (id, order) in &orders {
        let history = stack.history(id).await?;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in &history {
            *counts.entry(entry.as_str()).or_default() += 1;
        }
        let twice = counts.values().filter(|c| **c > 1).count();
        report.duplicate_effects += twice;
        let count = |e: &str| counts.get(e).copied().unwrap_or(0);
        let consistent = count("published order.created.v1") == 1
            && match order["status"].as_str() {
                Some("CONFIRMED") => {
                    count("published order.confirmed.v1") == 1
                        && count("published order.cancelled.v1") == 0
                        && count("received payment.processed.v1") == 1
                }
                Some("CANCELLED") => {
                    count("published order.cancelled.v1") == 1
                        && count("published order.confirmed.v1") == 0
                }
                _ => false,
            };
        if (twice > 0 || !consistent) && first_problem.is_none() {
            first_problem = Some(format!(
                "order {id} is {} but its history is {history:?}",
                order["status"]
            ));
        }
    }
    if let Some(problem) = first_problem {
        bail!("{problem}");
    }
    let orders: Vec<Value> = orders.into_values().collect();
    let invariants = stack.check_invariants(&orders, initial).await?;
    report.emails = invariants.emails_sent;
    if invariants.mail_files.len() != orders.len() {
        bail!(
            "emails: {} .eml files for {} orders",
            invariants.mail_files.len(),
            orders.len()
        );
    }
    Ok(())
}
