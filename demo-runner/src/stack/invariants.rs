//! The saga's invariants on a started [`Stack`], once every order is final.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use super::Stack;
use crate::client;

impl Stack {
    /// Checks the saga's invariants for `orders` (all final) and `initial` stock, waiting
    /// (up to 60 s) for the tail of the saga (stock commits, emails, outboxes) to settle.
    /// If they do not all hold by then, the error names the last violation seen.
    pub async fn check_invariants(
        &self,
        orders: &[Value],
        initial: &[(&str, i64)],
    ) -> anyhow::Result<Invariants> {
        let confirmed: Vec<&Value> = orders
            .iter()
            .filter(|o| o["status"] == "CONFIRMED")
            .collect();
        let mut sold: BTreeMap<String, i64> = BTreeMap::new();
        for order in &confirmed {
            for item in order["items"].as_array().into_iter().flatten() {
                *sold
                    .entry(item["productId"].as_str().unwrap_or_default().to_owned())
                    .or_default() += item["quantity"].as_i64().unwrap_or_default();
            }
        }
        let expected_emails = orders.len() as i64;
        let invariants = testkit::wait_for(
            Duration::from_secs(60),
            "the saga to settle with every invariant holding",
            || async {
                self.settled(initial, &sold, expected_emails)
                    .await
                    .map(Some)
            },
        )
        .await?;
        Ok(invariants)
    }

    /// The invariants as they hold now; the first violation as the error.
    async fn settled(
        &self,
        initial: &[(&str, i64)],
        sold: &BTreeMap<String, i64>,
        expected_emails: i64,
    ) -> anyhow::Result<Invariants> {
        let mut stock = Vec::new();
        for (product, start) in initial {
            let p = client::get(&format!("{}/inventory/{product}", self.urls.inventory))
                .await?
                .json;
            let available = p["available"].as_i64().unwrap_or(-1);
            let reserved = p["reserved"].as_i64().unwrap_or(-1);
            let expected = start - sold.get(*product).copied().unwrap_or(0);
            if reserved != 0 {
                bail!("stock: {product} still has {reserved} reserved after every order is final");
            }
            if available != expected {
                bail!(
                    "stock: {product} has {available} available, expected {start} - {} confirmed = {expected}",
                    sold.get(*product).copied().unwrap_or(0)
                );
            }
            stock.push((
                product.to_string(),
                p["name"].as_str().unwrap_or_default().to_owned(),
                *start,
                available,
            ));
        }
        let (sent, unsent) =
            demo_services::email::store::counts(&mut *self.db.email.acquire().await?).await?;
        if sent + unsent != expected_emails {
            bail!(
                "emails: {} recorded for {expected_emails} final orders",
                sent + unsent
            );
        }
        if unsent > 0 {
            bail!("emails: {unsent} not sent yet");
        }
        let mut mail_files = BTreeSet::new();
        if self.mail_dir.exists() {
            for entry in std::fs::read_dir(&self.mail_dir)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".eml") {
                    mail_files.insert(id.to_owned());
                }
            }
        }
        for (name, pool) in [
            ("orders", &self.db.orders),
            ("inventory", &self.db.inventory),
        ] {
            let backlog = outbox::store::backlog(&mut *pool.acquire().await?).await?;
            if backlog.unpublished > 0 {
                let oldest = crate::store::oldest_unpublished(&mut *pool.acquire().await?, 3)
                    .await?
                    .iter()
                    .map(|(id, seq, key, age)| {
                        format!("{id} (seq {seq}, key {key}, {age:.1}s old)")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                bail!(
                    "outbox of {name}: {} rows not published, oldest: {oldest}",
                    backlog.unpublished
                );
            }
        }
        let mut dead = 0;
        for pool in [&self.db.orders, &self.db.inventory, &self.db.email] {
            dead += dlq::store::count(&mut *pool.acquire().await?, &dlq::store::Filter::default())
                .await?;
        }
        if dead > 0 {
            bail!("dead letters: {dead} messages were dead-lettered (see `dlq list`)");
        }
        Ok(Invariants {
            stock,
            emails_sent: sent,
            mail_files,
        })
    }
}

/// What [`Stack::check_invariants`] found, for the summary.
#[derive(Debug, Clone)]
pub struct Invariants {
    /// (id, name, initial, available now) per product.
    pub stock: Vec<(String, String, i64, i64)>,
    /// Emails sent.
    pub emails_sent: i64,
    /// Order ids with an `.eml` file (directory mode).
    pub mail_files: BTreeSet<String>,
}
