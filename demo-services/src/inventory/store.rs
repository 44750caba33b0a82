//! All SQL on inventory-service's tables: `product` (stock levels) and `reservation` (what
//! each order holds), plus `reservation_failure` (orders that could not be reserved) and
//! `closed_order` (orders cancelled before anything was reserved for them).
//!
//! Stock invariant, at any commit: `available + reserved + sold = received` per product,
//! where `received` counts the initial quantity and every restock.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::events::StockLine;

/// inventory-service's schema (idempotent).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS product (
    product_id  text PRIMARY KEY,
    name        text NOT NULL,
    price_cents bigint NOT NULL CHECK (price_cents > 0),
    available   integer NOT NULL CHECK (available >= 0),
    reserved    integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold        integer NOT NULL DEFAULT 0 CHECK (sold >= 0),
    received    integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT product_stock_balances CHECK (available + reserved + sold = received)
);
CREATE TABLE IF NOT EXISTS reservation (
    order_id    uuid NOT NULL,
    product_id  text NOT NULL REFERENCES product,
    quantity    integer NOT NULL CHECK (quantity > 0),
    status      text NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, product_id)
);
CREATE TABLE IF NOT EXISTS closed_order (
    order_id    uuid PRIMARY KEY,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS reservation_failure (
    order_id    uuid PRIMARY KEY,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"#;

/// One product and its stock.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProductRow {
    /// Id, e.g. `prod-001`.
    pub product_id: String,
    /// Name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Units free to reserve.
    pub available: i32,
    /// Units held by orders in progress.
    pub reserved: i32,
    /// Units of confirmed orders.
    pub sold: i32,
    /// Units ever received (initial quantity plus restocks).
    pub received: i32,
}

const PRODUCT_COLUMNS: &str = "product_id, name, price_cents, available, reserved, sold, received";

/// Creates a product; `None` if the id exists.
pub async fn create_product(
    conn: &mut PgConnection,
    product_id: &str,
    name: &str,
    price_cents: i64,
    quantity: i32,
) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO product (product_id, name, price_cents, available, received)
         VALUES ($1, $2, $3, $4, $4) ON CONFLICT (product_id) DO NOTHING
         RETURNING {PRODUCT_COLUMNS}"
    )))
    .bind(product_id)
    .bind(name)
    .bind(price_cents)
    .bind(quantity)
    .fetch_optional(conn)
    .await
}

/// The product, if it exists.
pub async fn get_product(
    conn: &mut PgConnection,
    product_id: &str,
) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM product WHERE product_id = $1"
    )))
    .bind(product_id)
    .fetch_optional(conn)
    .await
}

/// Every product, by id.
pub async fn all_products(conn: &mut PgConnection) -> Result<Vec<ProductRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM product ORDER BY product_id"
    )))
    .fetch_all(conn)
    .await
}

/// Adds `quantity` units; `None` for an unknown product.
pub async fn restock(
    conn: &mut PgConnection,
    product_id: &str,
    quantity: i32,
) -> Result<Option<ProductRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE product SET available = available + $2, received = received + $2,
                updated_at = now()
         WHERE product_id = $1 RETURNING {PRODUCT_COLUMNS}"
    )))
    .bind(product_id)
    .bind(quantity)
    .fetch_optional(conn)
    .await
}

/// Locks the listed products (in id order, so concurrent orders cannot deadlock).
pub async fn lock_products(
    conn: &mut PgConnection,
    product_ids: &[String],
) -> Result<Vec<ProductRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRODUCT_COLUMNS} FROM product WHERE product_id = ANY($1)
         ORDER BY product_id FOR UPDATE"
    )))
    .bind(product_ids)
    .fetch_all(conn)
    .await
}

/// Moves `lines` from available to reserved for `order_id` (the products must be locked and
/// have enough stock).
pub async fn reserve(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[StockLine],
) -> Result<(), sqlx::Error> {
    for line in lines {
        sqlx::query(
            "UPDATE product SET available = available - $2, reserved = reserved + $2,
                    updated_at = now() WHERE product_id = $1",
        )
        .bind(&line.product_id)
        .bind(line.quantity)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO reservation (order_id, product_id, quantity, status)
             VALUES ($1, $2, $3, 'reserved')",
        )
        .bind(order_id)
        .bind(&line.product_id)
        .bind(line.quantity)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Records why an order could not be reserved.
pub async fn record_failure(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO reservation_failure (order_id, reason) VALUES ($1, $2)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends the order's open reservations: `committed` moves the units to sold, `released`
/// back to available. Returns the lines it ended (none if nothing was reserved).
pub async fn end_reservations(
    conn: &mut PgConnection,
    order_id: Uuid,
    outcome: ReservationOutcome,
) -> Result<Vec<StockLine>, sqlx::Error> {
    let (status, product_update) = match outcome {
        ReservationOutcome::Committed => (
            "committed",
            "UPDATE product p SET reserved = p.reserved - e.quantity, sold = p.sold + e.quantity,
                    updated_at = now() FROM ended e WHERE p.product_id = e.product_id",
        ),
        ReservationOutcome::Released => (
            "released",
            "UPDATE product p SET reserved = p.reserved - e.quantity,
                    available = p.available + e.quantity,
                    updated_at = now() FROM ended e WHERE p.product_id = e.product_id",
        ),
    };
    // Lock the products in id order first, as reservations do, so that two orders ending
    // and starting at once cannot deadlock.
    sqlx::query(
        "SELECT 1 FROM product WHERE product_id IN
             (SELECT product_id FROM reservation WHERE order_id = $1 AND status = 'reserved')
         ORDER BY product_id FOR UPDATE",
    )
    .bind(order_id)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH ended AS (
             UPDATE reservation SET status = $2, updated_at = now()
             WHERE order_id = $1 AND status = 'reserved'
             RETURNING product_id, quantity
         ), moved AS ({product_update})
         SELECT product_id, quantity FROM ended ORDER BY product_id"
    )))
    .bind(order_id)
    .bind(status)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(product_id, quantity)| StockLine {
            product_id,
            quantity,
        })
        .collect())
}

/// Records that `order_id` was cancelled with nothing reserved.
pub async fn close(
    conn: &mut PgConnection,
    order_id: Uuid,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO closed_order (order_id, reason) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether `order_id` was cancelled before anything was reserved for it.
pub async fn is_closed(conn: &mut PgConnection, order_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM closed_order WHERE order_id = $1)")
        .bind(order_id)
        .fetch_one(conn)
        .await
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationOutcome {
    /// The order was confirmed: the units are sold.
    Committed,
    /// The order was cancelled: the units are available again.
    Released,
}

/// Units still reserved, over all products (0 once every order is final).
pub async fn open_reservations(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(quantity), 0)::bigint FROM reservation WHERE status = 'reserved'",
    )
    .fetch_one(conn)
    .await
}
