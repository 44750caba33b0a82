//! All SQL on order-service's tables: `orders`, `order_event` (each order's history) and
//! `catalog_product` (products known from `inventory.product_updated.v1`).

use serde_json::Value;
use sqlx::PgConnection;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::{OrderLine, ProductUpdated};

/// order-service's schema (idempotent).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS orders (
    order_id    uuid PRIMARY KEY,
    order_no    bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    user_id     text NOT NULL,
    status      text NOT NULL CONSTRAINT orders_status_check
                CHECK (status IN ('PENDING', 'INVENTORY_RESERVED', 'CONFIRMED', 'CANCELLED')),
    reason      text,
    total_cents bigint NOT NULL CHECK (total_cents > 0),
    items       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_user_idx ON orders (user_id, order_no);
CREATE TABLE IF NOT EXISTS order_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id    uuid NOT NULL,
    message_id  uuid NOT NULL,
    event_type  text NOT NULL,
    direction   text NOT NULL CHECK (direction IN ('published', 'received')),
    data        jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (message_id, direction)
);
CREATE INDEX IF NOT EXISTS order_event_order_idx ON order_event (order_id, id);
CREATE TABLE IF NOT EXISTS catalog_product (
    product_id  text PRIMARY KEY,
    name        text NOT NULL,
    price_cents bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"#;

/// One order as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRow {
    /// Id.
    pub order_id: Uuid,
    /// Placement number (1, 2, ...): what the seeded payment simulation keys on.
    pub order_no: i64,
    /// Customer.
    pub user_id: String,
    /// `PENDING`, `INVENTORY_RESERVED`, `CONFIRMED` or `CANCELLED`.
    pub status: String,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// Total in cents.
    pub total_cents: i64,
    /// Lines.
    pub items: Json<Vec<OrderLine>>,
    /// Placed at.
    pub created_at: OffsetDateTime,
    /// Last status change.
    pub updated_at: OffsetDateTime,
}

/// One entry of an order's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// The message id.
    pub message_id: Uuid,
    /// e.g. `order.created.v1`.
    pub event_type: String,
    /// `published` or `received`.
    pub direction: String,
    /// The payload.
    pub data: Value,
    /// When recorded.
    pub recorded_at: OffsetDateTime,
}

const ORDER_COLUMNS: &str =
    "order_id, order_no, user_id, status, reason, total_cents, items, created_at, updated_at";

/// Inserts a `PENDING` order and returns it.
pub async fn insert_order(
    conn: &mut PgConnection,
    order_id: Uuid,
    user_id: &str,
    items: &[OrderLine],
    total_cents: i64,
) -> Result<OrderRow, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO orders (order_id, user_id, status, total_cents, items)
         VALUES ($1, $2, 'PENDING', $3, $4) RETURNING {ORDER_COLUMNS}"
    )))
    .bind(order_id)
    .bind(user_id)
    .bind(total_cents)
    .bind(Json(items))
    .fetch_one(conn)
    .await
}

/// The order, if it exists.
pub async fn get_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"
    )))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// The order, locked for update until the transaction ends.
pub async fn lock_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1 FOR UPDATE"
    )))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// A user's orders, oldest first (at most 1000).
pub async fn orders_of_user(
    conn: &mut PgConnection,
    user_id: &str,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 ORDER BY order_no LIMIT 1000"
    )))
    .bind(user_id)
    .fetch_all(conn)
    .await
}

/// Sets the status (and reason).
pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: &str,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE orders SET status = $2, reason = coalesce($3, reason), updated_at = now()
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(status)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends to an order's history.
pub async fn record_event(
    conn: &mut PgConnection,
    order_id: Uuid,
    message_id: Uuid,
    event_type: &str,
    direction: &str,
    data: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO order_event (order_id, message_id, event_type, direction, data)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(order_id)
    .bind(message_id)
    .bind(event_type)
    .bind(direction)
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

/// An order's history, in the order it was recorded.
pub async fn events_of_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT message_id, event_type, direction, data, recorded_at
         FROM order_event WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await
}

/// Creates or updates a catalogue entry.
pub async fn upsert_product(
    conn: &mut PgConnection,
    product: &ProductUpdated,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO catalog_product (product_id, name, price_cents) VALUES ($1, $2, $3)
         ON CONFLICT (product_id) DO UPDATE
         SET name = excluded.name, price_cents = excluded.price_cents, updated_at = now()",
    )
    .bind(&product.product_id)
    .bind(&product.name)
    .bind(product.price_cents)
    .execute(conn)
    .await?;
    Ok(())
}

/// Which of `product_ids` the catalogue knows, with their prices in cents.
pub async fn known_products(
    conn: &mut PgConnection,
    product_ids: &[String],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT product_id, price_cents FROM catalog_product WHERE product_id = ANY($1)")
        .bind(product_ids)
        .fetch_all(conn)
        .await
}

/// The whole catalogue: (id, name, price in cents), by id.
pub async fn catalogue(conn: &mut PgConnection) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT product_id, name, price_cents FROM catalog_product ORDER BY product_id")
        .fetch_all(conn)
        .await
}

/// How many orders exist.
pub async fn count_orders(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(conn)
        .await
}
