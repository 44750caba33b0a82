//! The saga's events: one Rust type per versioned event type, all JSON (camelCase) on
//! subjects equal to their type (`order.created.v1`, ...). Amounts are integer cents.
//! Every event of an order uses the order id as its partition key, so the relays publish
//! one order's events in commit order.

use outbox::Event;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The stream that captures every subject of the saga.
pub const STREAM: &str = "DEMO";
/// The subjects [`STREAM`] captures.
pub const STREAM_SUBJECTS: [&str; 3] = ["order.>", "inventory.>", "payment.>"];

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderLine {
    /// Product id, e.g. `prod-001`.
    pub product_id: String,
    /// Product name as ordered.
    pub product_name: String,
    /// Units, at least 1.
    pub quantity: i32,
    /// Unit price in cents.
    pub price_cents: i64,
}

/// A product line of a reservation or release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StockLine {
    /// Product id.
    pub product_id: String,
    /// Units.
    pub quantity: i32,
}

macro_rules! order_event {
    ($ty:ident, $name:literal) => {
        impl Event for $ty {
            const NAME: &'static str = $name;
            const VERSION: u32 = 1;
            fn partition_key(&self) -> String {
                self.order_id.to_string()
            }
        }
    };
}

/// An order was placed (order-service); inventory reserves its stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub user_id: String,
    /// What was ordered.
    pub items: Vec<OrderLine>,
    /// Sum of quantity x price, in cents.
    pub total_cents: i64,
}
order_event!(OrderCreated, "order.created");

/// Every item of the order is reserved (inventory-service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReserved {
    /// The order.
    pub order_id: Uuid,
    /// What was reserved.
    pub items: Vec<StockLine>,
}
order_event!(InventoryReserved, "inventory.reserved");

/// Nothing was reserved because some item could not be (inventory-service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReservationFailed {
    /// The order.
    pub order_id: Uuid,
    /// Why, readable: `insufficient stock for prod-001: requested 20, available 10`.
    pub reason: String,
}
order_event!(InventoryReservationFailed, "inventory.reservation_failed");

/// A cancelled order's reserved stock is available again (inventory-service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReleased {
    /// The order.
    pub order_id: Uuid,
    /// What was released.
    pub items: Vec<StockLine>,
}
order_event!(InventoryReleased, "inventory.released");

/// The simulated payment went through (order-service's payment step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentProcessed {
    /// The order.
    pub order_id: Uuid,
    /// The payment's id.
    pub payment_id: Uuid,
    /// Amount charged, in cents.
    pub amount_cents: i64,
}
order_event!(PaymentProcessed, "payment.processed");

/// The simulated payment was declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentFailed {
    /// The order.
    pub order_id: Uuid,
    /// Amount that was declined, in cents.
    pub amount_cents: i64,
    /// Why.
    pub reason: String,
}
order_event!(PaymentFailed, "payment.failed");

/// The order is paid and final (order-service); inventory commits the reservation, email
/// sends the confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub user_id: String,
    /// What was ordered.
    pub items: Vec<OrderLine>,
    /// Total in cents.
    pub total_cents: i64,
}
order_event!(OrderConfirmed, "order.confirmed");

/// The order is cancelled (reservation failed, payment failed, or the customer cancelled);
/// inventory releases what it reserved, email sends the cancellation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub user_id: String,
    /// What was ordered.
    pub items: Vec<OrderLine>,
    /// Total in cents.
    pub total_cents: i64,
    /// Why, readable.
    pub reason: String,
}
order_event!(OrderCancelled, "order.cancelled");

/// A product was created or its name or price changed (inventory-service); order-service
/// keeps a catalogue from these to refuse orders for unknown products.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductUpdated {
    /// Product id.
    pub product_id: String,
    /// Name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
}

impl Event for ProductUpdated {
    const NAME: &'static str = "inventory.product_updated";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.product_id.clone()
    }
}
