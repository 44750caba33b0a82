//! inventory-service (port 3003): stock levels, all-or-nothing reservations for new orders,
//! and the compensation that releases a cancelled order's stock.
//!
//! - `store`: all SQL on its tables.
//!
//! HTTP API: `POST /inventory`, `GET /inventory/{productId}`,
//! `POST /inventory/{productId}/restock`, plus `/health`, `/health/ready`, `/metrics`.
//! Events handled: `order.created.v1` (reserve), `order.confirmed.v1` (the reserved units
//! are sold), `order.cancelled.v1` (release, publishing `inventory.released.v1`).

pub mod store;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use inbox::{Delivery, Handler, HandlerError};
use outbox::Outbox;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use self::store::{ProductRow, ReservationOutcome};
use crate::events::{
    InventoryReleased, InventoryReservationFailed, InventoryReserved, OrderCancelled,
    OrderConfirmed, OrderCreated, ProductUpdated, StockLine,
};
use crate::platform::{
    self, ApiError, ApiJson, Runtime, ServiceConfig, ServiceHandle, money, price_to_cents,
    text_field,
};

/// The documented port.
pub const DEFAULT_PORT: u16 = 3003;
/// Consumer, outbox source and NATS connection name.
pub const NAME: &str = "inventory-service";

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    outbox: Outbox,
}

/// Starts inventory-service: schema, consumer, HTTP API.
pub async fn start(config: ServiceConfig) -> anyhow::Result<ServiceHandle> {
    let counters = ["inventory_reservations_total", "inventory_failures_total"];
    let mut runtime = Runtime::connect(NAME, config, store::SCHEMA, &counters).await?;
    let outbox = runtime.config.outbox(NAME)?;
    let stock = Stock {
        outbox: outbox.clone(),
    };
    runtime.consume(
        inbox::Router::new()
            .route::<OrderCreated, _>(stock.clone())
            .route::<OrderConfirmed, _>(stock.clone())
            .route::<OrderCancelled, _>(stock),
    );
    let api = Router::new()
        .route("/inventory", post(create_product))
        .route("/inventory/{product_id}", get(get_product))
        .route("/inventory/{product_id}/restock", post(restock))
        .with_state(AppState {
            pool: runtime.pool.clone(),
            outbox,
        });
    runtime.serve(api, true).await
}

fn product_json(p: &ProductRow) -> Value {
    json!({
        "product_id": p.product_id,
        "name": p.name,
        "price": money(p.price_cents),
        "available": p.available,
        "reserved": p.reserved,
        "sold": p.sold,
    })
}

#[derive(Debug, Deserialize)]
struct CreateProduct {
    product_id: String,
    name: String,
    quantity: i64,
    price: f64,
}

#[derive(Debug, Deserialize)]
struct Restock {
    quantity: i64,
}

const MAX_STOCK: i64 = 1_000_000;

fn valid_product_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::invalid(
            "product_id must be 1-64 characters of A-Z a-z 0-9 - _",
        ));
    }
    Ok(())
}

/// 404 for a path id that no product can have (before any SQL: PostgreSQL refuses NUL).
fn known_id_shape(product_id: &str) -> Result<(), ApiError> {
    valid_product_id(product_id)
        .map_err(|_| ApiError::not_found(format!("product {product_id:?} not found")))
}

async fn create_product(
    State(app): State<AppState>,
    ApiJson(request): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    valid_product_id(&request.product_id)?;
    text_field("name", &request.name, 200)?;
    if !(0..=MAX_STOCK).contains(&request.quantity) {
        return Err(ApiError::invalid(format!(
            "quantity must be 0 to {MAX_STOCK}, got {}",
            request.quantity
        )));
    }
    let price_cents = price_to_cents("price", request.price)?;
    let mut tx = app.pool.begin().await?;
    let Some(product) = store::create_product(
        &mut tx,
        &request.product_id,
        &request.name,
        price_cents,
        request.quantity as i32,
    )
    .await?
    else {
        return Err(ApiError::conflict(format!(
            "product {} already exists; restock it instead",
            request.product_id
        )));
    };
    let event = ProductUpdated {
        product_id: product.product_id.clone(),
        name: product.name.clone(),
        price_cents,
    };
    app.outbox.enqueue(&mut tx, &event).await?;
    tx.commit().await?;
    tracing::info!(product_id = %product.product_id, "product created");
    Ok((StatusCode::CREATED, Json(product_json(&product))))
}

async fn get_product(
    State(app): State<AppState>,
    Path(product_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known_id_shape(&product_id)?;
    let mut conn = app.pool.acquire().await?;
    match store::get_product(&mut conn, &product_id).await? {
        Some(p) => Ok(Json(product_json(&p))),
        None => Err(ApiError::not_found(format!(
            "product {product_id} not found"
        ))),
    }
}

async fn restock(
    State(app): State<AppState>,
    Path(product_id): Path<String>,
    ApiJson(request): ApiJson<Restock>,
) -> Result<Json<Value>, ApiError> {
    known_id_shape(&product_id)?;
    if !(1..=MAX_STOCK).contains(&request.quantity) {
        return Err(ApiError::invalid(format!(
            "quantity must be 1 to {MAX_STOCK}, got {}",
            request.quantity
        )));
    }
    let mut tx = app.pool.begin().await?;
    let Some(product) = store::restock(&mut tx, &product_id, request.quantity as i32).await? else {
        return Err(ApiError::not_found(format!(
            "product {product_id} not found"
        )));
    };
    if i64::from(product.received) > MAX_STOCK * 10 {
        return Err(ApiError::invalid("stock would exceed the limit"));
    }
    tx.commit().await?;
    tracing::info!(%product_id, quantity = request.quantity, "restocked");
    Ok(Json(product_json(&product)))
}

/// The event handlers.
#[derive(Debug, Clone)]
struct Stock {
    outbox: Outbox,
}

/// Why `lines` cannot all be reserved from `products` (locked), if they cannot.
fn shortage(lines: &[StockLine], products: &[ProductRow]) -> Option<String> {
    lines.iter().find_map(
        |line| match products.iter().find(|p| p.product_id == line.product_id) {
            None => Some(format!("unknown product {}", line.product_id)),
            Some(p) if p.available < line.quantity => Some(format!(
                "insufficient stock for {}: requested {}, available {}",
                line.product_id, line.quantity, p.available
            )),
            Some(_) => None,
        },
    )
}

impl Handler<OrderCreated> for Stock {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderCreated,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let lines: Vec<StockLine> = event
            .items
            .iter()
            .map(|l| StockLine {
                product_id: l.product_id.clone(),
                quantity: l.quantity,
            })
            .collect();
        let ids: Vec<String> = lines.iter().map(|l| l.product_id.clone()).collect();
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        if lines.is_empty() || distinct.len() != ids.len() || lines.iter().any(|l| l.quantity <= 0)
        {
            return Err(HandlerError::permanent_because(
                "invalid_order",
                format!(
                    "order {} has no lines, a repeated product or a quantity below 1",
                    event.order_id
                ),
            ));
        }
        if store::is_closed(conn, event.order_id)
            .await
            .map_err(HandlerError::retry)?
        {
            // Cancelled before we saw it (a redelivery or a `dlq retry` overtook it):
            // reserving now would hold stock for an order that is already over.
            tracing::info!(order_id = %event.order_id, "order already cancelled; nothing reserved");
            return Ok(());
        }
        let products = store::lock_products(conn, &ids)
            .await
            .map_err(HandlerError::retry)?;
        match shortage(&lines, &products) {
            None => {
                store::reserve(conn, event.order_id, &lines)
                    .await
                    .map_err(HandlerError::retry)?;
                let reserved = InventoryReserved {
                    order_id: event.order_id,
                    items: lines,
                };
                self.outbox
                    .enqueue(conn, &reserved)
                    .await
                    .map_err(platform::enqueue_failure)?;
                metrics::counter!("inventory_reservations_total").increment(1);
                tracing::info!(order_id = %event.order_id, "stock reserved");
            }
            Some(reason) => {
                store::record_failure(conn, event.order_id, &reason)
                    .await
                    .map_err(HandlerError::retry)?;
                let failed = InventoryReservationFailed {
                    order_id: event.order_id,
                    reason: reason.clone(),
                };
                self.outbox
                    .enqueue(conn, &failed)
                    .await
                    .map_err(platform::enqueue_failure)?;
                metrics::counter!("inventory_failures_total").increment(1);
                tracing::info!(order_id = %event.order_id, %reason, "reservation failed");
            }
        }
        Ok(())
    }
}

impl Handler<OrderConfirmed> for Stock {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderConfirmed,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let sold = store::end_reservations(conn, event.order_id, ReservationOutcome::Committed)
            .await
            .map_err(HandlerError::retry)?;
        tracing::info!(order_id = %event.order_id, lines = sold.len(), "reservation committed");
        Ok(())
    }
}

impl Handler<OrderCancelled> for Stock {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderCancelled,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let released = store::end_reservations(conn, event.order_id, ReservationOutcome::Released)
            .await
            .map_err(HandlerError::retry)?;
        if released.is_empty() {
            // Nothing was reserved (the reservation failed, or order.created has not been
            // handled yet): remember the order is over so that a late order.created does
            // not reserve for it.
            store::close(conn, event.order_id, &event.reason)
                .await
                .map_err(HandlerError::retry)?;
            return Ok(());
        }
        let event = InventoryReleased {
            order_id: event.order_id,
            items: released,
        };
        self.outbox
            .enqueue(conn, &event)
            .await
            .map_err(platform::enqueue_failure)?;
        tracing::info!(order_id = %event.order_id, "reserved stock released");
        Ok(())
    }
}
