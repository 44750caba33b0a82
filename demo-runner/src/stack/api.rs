//! The services' HTTP APIs as typed calls on a started [`Stack`], and the demo catalogue.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use super::Stack;
use crate::client;

/// The demo's products: (id, name, quantity, price).
pub const SEED_PRODUCTS: [(&str, &str, i64, f64); 2] = [
    ("prod-001", "Laptop", 10, 999.99),
    ("prod-002", "Mouse", 50, 29.99),
];

impl Stack {
    /// Creates the two demo products (an existing one is left as it is) and waits until
    /// order-service's catalogue knows them.
    pub async fn seed(&self) -> anyhow::Result<()> {
        self.seed_with(&SEED_PRODUCTS).await
    }

    /// Like [`Stack::seed`] with other quantities: (id, name, quantity, price); ids and
    /// names should be those of [`SEED_PRODUCTS`], which [`Stack::place_order`] uses.
    pub async fn seed_with(&self, products: &[(&str, &str, i64, f64)]) -> anyhow::Result<()> {
        for (id, name, quantity, price) in products {
            let r = client::post_json(
                &format!("{}/inventory", self.urls.inventory),
                &json!({ "product_id": id, "name": name, "quantity": quantity, "price": price }),
            )
            .await?;
            if r.status != 201 && r.status != 409 {
                bail!("creating {id}: {} {}", r.status, r.text);
            }
        }
        let catalogue = format!("{}/products", self.urls.order);
        testkit::wait_for(
            Duration::from_secs(30),
            "order-service to learn the catalogue",
            || async {
                let r = client::get(&catalogue).await?;
                let known = r.json["products"].as_array().map_or(0, Vec::len);
                anyhow::Ok((known >= products.len()).then_some(()))
            },
        )
        .await?;
        Ok(())
    }

    /// Places an order; returns its id (the response must be 201 PENDING).
    pub async fn place_order(&self, user: &str, items: &[(&str, i64)]) -> anyhow::Result<String> {
        let items: Vec<Value> = items
            .iter()
            .map(|(product, quantity)| {
                let (_, name, _, price) = SEED_PRODUCTS
                    .iter()
                    .find(|p| p.0 == *product)
                    .copied()
                    .unwrap_or((product, "Unknown", 0, 1.0));
                json!({ "productId": product, "productName": name, "quantity": quantity, "price": price })
            })
            .collect();
        let r = client::post_json(
            &format!("{}/orders", self.urls.order),
            &json!({ "userId": user, "items": items }),
        )
        .await?;
        if r.status != 201 || r.json["status"] != "PENDING" {
            bail!("placing {user}'s order: {} {}", r.status, r.text);
        }
        r.json["orderId"]
            .as_str()
            .map(str::to_owned)
            .context("no orderId in the response")
    }

    /// The order's history as `"<direction> <type>"` entries (`GET /orders/{id}/events`).
    pub async fn history(&self, order_id: &str) -> anyhow::Result<Vec<String>> {
        let r = client::get(&format!("{}/orders/{order_id}/events", self.urls.order)).await?;
        if r.status != 200 {
            bail!("GET events of {order_id}: {} {}", r.status, r.text);
        }
        Ok(r.json["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} {}",
                    e["direction"].as_str().unwrap_or_default(),
                    e["type"].as_str().unwrap_or_default()
                )
            })
            .collect())
    }

    /// `GET /orders/{id}`.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<Value> {
        let r = client::get(&format!("{}/orders/{order_id}", self.urls.order)).await?;
        if r.status != 200 {
            bail!("GET order {order_id}: {} {}", r.status, r.text);
        }
        Ok(r.json)
    }

    /// Waits until every order is CONFIRMED or CANCELLED; returns them.
    pub async fn wait_terminal(
        &self,
        order_ids: &[String],
        deadline: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let orders = testkit::wait_for(deadline, "every order to be final", || async {
            let mut orders = Vec::with_capacity(order_ids.len());
            for id in order_ids {
                match self.order(id).await {
                    Ok(order) => orders.push(order),
                    // Not a reason to wait: the API answers, or the stack is broken.
                    Err(e) => return Ok(Some(Err(e))),
                }
            }
            let pending: Vec<&Value> = orders
                .iter()
                .filter(|o| o["status"] != "CONFIRMED" && o["status"] != "CANCELLED")
                .collect();
            match pending.first() {
                None => Ok(Some(Ok(orders))),
                Some(first) => Err(anyhow!(
                    "{} of {} orders not final, e.g. {} is {}",
                    pending.len(),
                    orders.len(),
                    first["orderId"],
                    first["status"]
                )),
            }
        })
        .await??;
        Ok(orders)
    }
}
