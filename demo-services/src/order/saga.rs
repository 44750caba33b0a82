//! order-service's event handlers: the order's state machine and the simulated payment.
//!
//! ```text
//! PENDING --inventory.reserved--> INVENTORY_RESERVED --payment.processed--> CONFIRMED
//!    |                                   |
//!    | inventory.reservation_failed      | payment.failed
//!    v                                   v
//! CANCELLED <----------------------------+        (and POST /orders/:id/cancel from either)
//! ```
//! Every transition and the events it publishes commit in the inbox transaction. An event
//! that arrives for an order no longer in the state it applies to (e.g. a reservation for an
//! order the customer already cancelled) is recorded in the history and otherwise ignored;
//! the cancellation that got there first already asked inventory to release.

use inbox::{Delivery, Handler, HandlerError, Router};
use outbox::{Event, Outbox};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::store::{self, OrderRow};
use crate::events::{
    InventoryReleased, InventoryReservationFailed, InventoryReserved, OrderCancelled,
    OrderConfirmed, PaymentFailed, PaymentProcessed, ProductUpdated,
};

/// The simulated payment provider: declines a share of payments, decided by the order's
/// placement number and a seed, so a run placing the same orders in the same sequence
/// gets the same outcomes whatever the timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaymentSimulation {
    /// Share of payments that succeed, 0.0 to 1.0 (`PAYMENT_SUCCESS_RATE`, default 0.9).
    pub success_rate: f64,
    /// Seed (`PAYMENT_SEED`, default 42).
    pub seed: u64,
}

impl Default for PaymentSimulation {
    fn default() -> Self {
        PaymentSimulation {
            success_rate: 0.9,
            seed: 42,
        }
    }
}

impl PaymentSimulation {
    /// Whether the payment of the `order_no`-th order succeeds.
    pub fn succeeds(&self, order_no: i64) -> bool {
        // splitmix64 of seed and order number, as a fraction in [0, 1).
        let mut z = self
            .seed
            .wrapping_add((order_no as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let fraction = (z >> 11) as f64 / (1u64 << 53) as f64;
        fraction < self.success_rate
    }
}

/// Enqueues `event` and records it in its order's history, in the caller's transaction.
pub(crate) async fn publish<E: Event + Serialize>(
    outbox: &Outbox,
    conn: &mut PgConnection,
    order_id: Uuid,
    event: &E,
) -> Result<(), PublishError> {
    let id = outbox.enqueue(conn, event).await?;
    let event_type = E::event_type().map_err(outbox::Error::from)?.to_string();
    let data = serde_json::to_value(event).unwrap_or_default();
    store::record_event(
        conn,
        order_id,
        id.as_uuid(),
        &event_type,
        "published",
        &data,
    )
    .await?;
    Ok(())
}

/// Why [`publish`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<PublishError> for HandlerError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Outbox(e) => crate::platform::enqueue_failure(e),
            PublishError::Database(e) => HandlerError::retry(e),
        }
    }
}

impl From<PublishError> for crate::platform::ApiError {
    fn from(e: PublishError) -> Self {
        crate::platform::ApiError::internal(e)
    }
}

/// The handlers, sharing the outbox and the payment simulation.
#[derive(Debug, Clone)]
struct Saga {
    outbox: Outbox,
    payment: PaymentSimulation,
}

/// order-service's consumer: which event types it handles and how.
pub fn router(outbox: Outbox, payment: PaymentSimulation) -> Router {
    let saga = Saga { outbox, payment };
    Router::new()
        .route::<ProductUpdated, _>(saga.clone())
        .route::<InventoryReserved, _>(saga.clone())
        .route::<InventoryReservationFailed, _>(saga.clone())
        .route::<InventoryReleased, _>(saga.clone())
        .route::<PaymentProcessed, _>(saga.clone())
        .route::<PaymentFailed, _>(saga)
}

/// Locks the order and records the delivery in its history; `None` (the event is ignored)
/// for an order this service does not know, which cannot happen in the saga.
async fn receive<E: Serialize>(
    conn: &mut PgConnection,
    order_id: Uuid,
    event: &E,
    delivery: &Delivery,
) -> Result<Option<OrderRow>, HandlerError> {
    let Some(order) = store::lock_order(conn, order_id)
        .await
        .map_err(HandlerError::retry)?
    else {
        tracing::warn!(%order_id, "event for an unknown order ignored");
        return Ok(None);
    };
    let data = serde_json::to_value(event).unwrap_or_default();
    store::record_event(
        conn,
        order_id,
        delivery.envelope.id.as_uuid(),
        &delivery.envelope.event_type.to_string(),
        "received",
        &data,
    )
    .await
    .map_err(HandlerError::retry)?;
    Ok(Some(order))
}

impl Saga {
    async fn cancel(
        &self,
        conn: &mut PgConnection,
        order: &OrderRow,
        reason: &str,
    ) -> Result<(), HandlerError> {
        cancel_order(&self.outbox, conn, order, reason).await?;
        Ok(())
    }
}

/// Moves `order` to CANCELLED with `reason` and publishes `order.cancelled.v1` (which makes
/// inventory release any reservation and email send the cancellation).
pub(crate) async fn cancel_order(
    outbox: &Outbox,
    conn: &mut PgConnection,
    order: &OrderRow,
    reason: &str,
) -> Result<(), PublishError> {
    store::set_status(conn, order.order_id, "CANCELLED", Some(reason)).await?;
    let event = OrderCancelled {
        order_id: order.order_id,
        user_id: order.user_id.clone(),
        items: order.items.0.clone(),
        total_cents: order.total_cents,
        reason: reason.to_owned(),
    };
    publish(outbox, conn, order.order_id, &event).await?;
    metrics::counter!("orders_cancelled_total").increment(1);
    tracing::info!(order_id = %order.order_id, reason, "order cancelled");
    Ok(())
}

impl Handler<ProductUpdated> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: ProductUpdated,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        store::upsert_product(conn, &event)
            .await
            .map_err(HandlerError::retry)
    }
}

impl Handler<InventoryReserved> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: InventoryReserved,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let Some(order) = receive(conn, event.order_id, &event, delivery).await? else {
            return Ok(());
        };
        if order.status != "PENDING" {
            tracing::info!(order_id = %order.order_id, status = %order.status, "reservation for an order no longer pending ignored");
            return Ok(());
        }
        store::set_status(conn, order.order_id, "INVENTORY_RESERVED", None)
            .await
            .map_err(HandlerError::retry)?;
        // The payment step: simulated, decided by the order's placement number.
        metrics::counter!("payments_processed_total").increment(1);
        if self.payment.succeeds(order.order_no) {
            metrics::counter!("payments_success_total").increment(1);
            let paid = PaymentProcessed {
                order_id: order.order_id,
                payment_id: Uuid::now_v7(),
                amount_cents: order.total_cents,
            };
            publish(&self.outbox, conn, order.order_id, &paid).await?;
            tracing::info!(order_id = %order.order_id, "payment processed");
        } else {
            metrics::counter!("payments_failed_total").increment(1);
            let declined = PaymentFailed {
                order_id: order.order_id,
                amount_cents: order.total_cents,
                reason: "card declined (simulated)".into(),
            };
            publish(&self.outbox, conn, order.order_id, &declined).await?;
            tracing::info!(order_id = %order.order_id, "payment failed");
        }
        Ok(())
    }
}

impl Handler<InventoryReservationFailed> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: InventoryReservationFailed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let Some(order) = receive(conn, event.order_id, &event, delivery).await? else {
            return Ok(());
        };
        if order.status != "PENDING" {
            return Ok(());
        }
        self.cancel(conn, &order, &event.reason).await
    }
}

impl Handler<PaymentProcessed> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: PaymentProcessed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let Some(order) = receive(conn, event.order_id, &event, delivery).await? else {
            return Ok(());
        };
        if order.status != "INVENTORY_RESERVED" {
            tracing::warn!(order_id = %order.order_id, status = %order.status, "payment for an order not awaiting it ignored");
            return Ok(());
        }
        store::set_status(conn, order.order_id, "CONFIRMED", None)
            .await
            .map_err(HandlerError::retry)?;
        let confirmed = OrderConfirmed {
            order_id: order.order_id,
            user_id: order.user_id.clone(),
            items: order.items.0.clone(),
            total_cents: order.total_cents,
        };
        publish(&self.outbox, conn, order.order_id, &confirmed).await?;
        metrics::counter!("orders_confirmed_total").increment(1);
        tracing::info!(order_id = %order.order_id, "order confirmed");
        Ok(())
    }
}

impl Handler<PaymentFailed> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: PaymentFailed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let Some(order) = receive(conn, event.order_id, &event, delivery).await? else {
            return Ok(());
        };
        if order.status != "INVENTORY_RESERVED" {
            return Ok(());
        }
        self.cancel(conn, &order, &format!("payment failed: {}", event.reason))
            .await
    }
}

impl Handler<InventoryReleased> for Saga {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: InventoryReleased,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        // History only: the release is inventory's compensation, the order is already final.
        receive(conn, event.order_id, &event, delivery).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::PaymentSimulation;

    #[test]
    fn payment_outcomes_follow_the_rate_and_the_seed() {
        let sim = PaymentSimulation::default();
        let successes = (1..=10_000).filter(|n| sim.succeeds(*n)).count();
        assert!((8_800..=9_200).contains(&successes), "{successes} of 10000");
        let other = PaymentSimulation { seed: 7, ..sim };
        let differ = (1..=100)
            .filter(|n| sim.succeeds(*n) != other.succeeds(*n))
            .count();
        assert!(differ > 0, "a different seed gives different outcomes");
        assert!((1..=100).all(|n| sim.succeeds(n) == sim.succeeds(n)));
        let never = PaymentSimulation {
            success_rate: 0.0,
            ..sim
        };
        assert!((1..=100).all(|n| !never.succeeds(n)));
    }
}
