//! The load of a chaos run: orders placed at a steady rate through the API, and the probe
//! workload written straight into two outboxes. Both retry through the faults.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ChaosOptions, Rng};
use crate::client;
use crate::stack::{SEED_PRODUCTS, Source, Stack, Urls};

/// The items of the `n`-th order: mostly mice, some laptops.
fn order_items(rng: &mut Rng) -> Vec<(&'static str, i64)> {
    if rng.below(10) < 3 {
        let mut items = vec![("prod-001", 1)];
        if rng.below(2) == 0 {
            items.push(("prod-002", 1));
        }
        items
    } else {
        vec![("prod-002", 1 + rng.below(3) as i64)]
    }
}

/// One order placement: retried through faults (a 5xx or a dropped connection) until it
/// gets its 201 or `deadline` passes. A 4xx is a bug in the run, reported as such.
async fn place(
    urls: &Urls,
    user: String,
    items: Vec<(&'static str, i64)>,
    deadline: Instant,
) -> anyhow::Result<String> {
    let body = json!({
        "userId": user,
        "items": items.iter().map(|(product, quantity)| {
            let (_, name, _, price) = SEED_PRODUCTS.iter().find(|p| p.0 == *product).copied().unwrap_or_default();
            json!({ "productId": product, "productName": name, "quantity": quantity, "price": price })
        }).collect::<Vec<_>>(),
    });
    let url = format!("{}/orders", urls.order);
    let remaining = deadline.saturating_duration_since(Instant::now());
    testkit::wait_for_every(
        remaining,
        Duration::from_millis(250),
        &format!("the order of {user} to be accepted"),
        || async {
            match client::post_json(&url, &body).await {
                Ok(r) if r.status == 201 => Ok(Some(
                    r.json["orderId"]
                        .as_str()
                        .map(str::to_owned)
                        .context("201 without orderId"),
                )),
                Ok(r) if (400..500).contains(&r.status) => Ok(Some(Err(anyhow!(
                    "order of {user} refused: {} {}",
                    r.status,
                    r.text
                )))),
                Ok(r) => Err(anyhow!("{} {}", r.status, r.text)),
                Err(e) => Err(e),
            }
        },
    )
    .await
    .with_context(|| format!("order of {user} not accepted before the deadline"))?
}

/// Places `options.orders` orders at `options.rate` per second, each retried through faults
/// (see [`place`]); returns each user with the id of their order or why it failed.
pub(super) async fn load(
    urls: Urls,
    options: ChaosOptions,
) -> Vec<(String, anyhow::Result<String>)> {
    let mut rng = Rng::new(options.seed);
    let start = tokio::time::Instant::now();
    let deadline = Instant::now()
        + Duration::from_secs_f64(options.orders as f64 / options.rate)
        + Duration::from_secs(120);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.orders {
        let at = start + Duration::from_secs_f64(i as f64 / options.rate);
        tokio::time::sleep_until(at).await;
        let user = format!("chaos-{}-{i}", options.seed);
        let items = order_items(&mut rng);
        let urls = urls.clone();
        tasks.spawn(async move {
            let placed = place(&urls, user.clone(), items, deadline).await;
            (user, placed)
        });
    }
    let mut placed = Vec::with_capacity(options.orders);
    while let Some(done) = tasks.join_next().await {
        if let Ok(result) = done {
            placed.push(result);
        }
    }
    placed
}

/// The event type of the probe workload's rows.
pub const PROBE_TYPE: &str = "chaos.probe.v1";

/// An outbox the probe workload writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTarget {
    /// order-service's (published by the order relay, the one behind the faulty link).
    Orders,
    /// inventory-service's.
    Inventory,
}

impl ProbeTarget {
    /// Both, in the order they are reported.
    pub const ALL: [ProbeTarget; 2] = [ProbeTarget::Orders, ProbeTarget::Inventory];

    /// Short name, used in keys and reports.
    pub fn name(self) -> &'static str {
        match self {
            ProbeTarget::Orders => "orders",
            ProbeTarget::Inventory => "inventory",
        }
    }

    /// The subject of its probe rows: captured by the saga's stream (`order.>`,
    /// `inventory.>`), filtered out by every consumer (they subscribe to exact subjects).
    pub fn subject(self) -> &'static str {
        match self {
            ProbeTarget::Orders => "order.chaos_probe.v1",
            ProbeTarget::Inventory => "inventory.chaos_probe.v1",
        }
    }

    /// Its hot key.
    pub fn hot_key(self) -> String {
        format!("probe-{}-hot", self.name())
    }

    pub(super) fn pool(self, stack: &Stack) -> PgPool {
        match self {
            ProbeTarget::Orders => stack.db.orders.clone(),
            ProbeTarget::Inventory => stack.db.inventory.clone(),
        }
    }
}

/// The partition keys of `target`'s probe rows in write order, for `seed`: `keys` distinct
/// keys twice each and the hot key `hot` times, shuffled.
pub fn probe_plan(seed: u64, target: ProbeTarget, keys: usize, hot: usize) -> Vec<String> {
    let salt = match target {
        ProbeTarget::Orders => 0x0050_2be0,
        ProbeTarget::Inventory => 0x0050_2be1,
    };
    let mut rng = Rng::new(seed ^ salt);
    let mut plan: Vec<String> = (0..keys)
        .flat_map(|k| {
            let key = format!("probe-{}-{k:05}", target.name());
            [key.clone(), key]
        })
        .chain(std::iter::repeat_n(target.hot_key(), hot))
        .collect();
    for i in (1..plan.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        plan.swap(i, j);
    }
    plan
}

/// One probe row in its own transaction, as a producer writes one.
async fn write_probe(
    pool: &PgPool,
    outbox: &outbox::Outbox,
    target: ProbeTarget,
    key: &str,
    n: usize,
) -> Result<Uuid, outbox::Error> {
    let message = outbox::Message::json(
        target.subject(),
        PROBE_TYPE,
        key,
        &json!({ "key": key, "n": n }),
    )?;
    let mut tx = pool.begin().await.map_err(outbox::Error::Database)?;
    let id = outbox.enqueue_message(&mut tx, message).await?;
    tx.commit().await.map_err(outbox::Error::Database)?;
    Ok(id.into())
}

/// Writes `plan` into `target`'s outbox, evenly spread over `over`, one row per transaction
/// and one transaction at a time (so one key's rows commit in `seq` order, as the aggregate's
/// row lock makes a service's do), retrying through faults until `deadline`. Returns the ids
/// whose commit succeeded (a commit cut by a fault may or may not have happened; it is
/// retried as a new row). With the WAL source, even-numbered probes go to the log and odd
/// ones to `outbox_message` rows, so one key's messages mix both storages.
async fn write_probes(
    pool: PgPool,
    target: ProbeTarget,
    plan: Vec<String>,
    over: Duration,
    deadline: Instant,
    source: Source,
) -> anyhow::Result<Vec<Uuid>> {
    let table = outbox::Outbox::new("chaos-probe")?;
    let log = outbox::Outbox::with_config(outbox::OutboxConfig {
        storage: outbox::Storage::Log,
        ..outbox::OutboxConfig::for_source("chaos-probe")
    })?;
    let start = tokio::time::Instant::now();
    let total = plan.len().max(1);
    let mut committed = Vec::with_capacity(plan.len());
    for (n, key) in plan.iter().enumerate() {
        tokio::time::sleep_until(start + over.mul_f64(n as f64 / total as f64)).await;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outbox = match source {
            Source::Wal if n % 2 == 0 => &log,
            _ => &table,
        };
        let id = testkit::wait_for(remaining, &format!("probe {n} to commit"), || async {
            match write_probe(&pool, outbox, target, key, n).await {
                Ok(id) => Ok(Some(Ok(id))),
                Err(e) if e.kind() == outbox::ErrorKind::InvalidInput => Ok(Some(Err(anyhow!(
                    "probe {n} ({key}) refused by the outbox: {e}"
                )))),
                Err(e) => Err(e),
            }
        })
        .await
        .with_context(|| {
            format!(
                "probe {n} ({key}) of the {} outbox not committed before the deadline",
                target.name()
            )
        })??;
        committed.push(id);
    }
    Ok(committed)
}

/// The probe workload on both outboxes at once.
pub(super) async fn probes(
    pools: Vec<(ProbeTarget, PgPool)>,
    options: ChaosOptions,
    over: Duration,
) -> anyhow::Result<Vec<Uuid>> {
    let deadline = Instant::now() + over + Duration::from_secs(120);
    let mut tasks = tokio::task::JoinSet::new();
    for (target, pool) in pools {
        let plan = probe_plan(options.seed, target, options.keys, options.hot);
        tasks.spawn(write_probes(
            pool,
            target,
            plan,
            over,
            deadline,
            options.source,
        ));
    }
    let mut committed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        committed.extend(done.context("a probe writer panicked")??);
    }
    Ok(committed)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_probe_plan_has_distinct_keys_twice_and_a_hot_key_and_follows_the_seed() {
        let plan = probe_plan(3, ProbeTarget::Orders, 1500, 1500);
        assert_eq!(plan.len(), 4500);
        assert_eq!(plan, probe_plan(3, ProbeTarget::Orders, 1500, 1500));
        assert_ne!(plan, probe_plan(4, ProbeTarget::Orders, 1500, 1500));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for key in &plan {
            *counts.entry(key).or_default() += 1;
        }
        assert_eq!(counts.len(), 1501, "1500 distinct keys and the hot one");
        assert_eq!(counts["probe-orders-hot"], 1500);
        assert!(
            counts
                .iter()
                .all(|(k, n)| *n == 2 || *k == "probe-orders-hot")
        );
        let hot_first_half = plan[..2250].iter().filter(|k| k.ends_with("-hot")).count();
        assert!(
            (500..1000).contains(&hot_first_half),
            "the hot key is spread out"
        );
        let other = probe_plan(3, ProbeTarget::Inventory, 10, 0);
        assert!(other.iter().all(|k| k.starts_with("probe-inventory-")));
    }
}
