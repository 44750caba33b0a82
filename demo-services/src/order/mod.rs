//! order-service (port 3001): places orders, runs the order's state machine from the saga's
//! events, and simulates the payment.
//!
//! - `store`: all SQL on its tables.
//! - `saga`: the event handlers (state machine, payment simulation).
//!
//! HTTP API: `POST /orders`, `GET /orders/{orderId}`, `GET /orders/user/{userId}`,
//! `POST /orders/{orderId}/cancel`, `GET /orders/{orderId}/events`, `GET /products` (the
//! catalogue it learned from inventory), plus `/health`, `/health/ready`, `/metrics`.

pub mod saga;
pub mod store;

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::Outbox;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub use saga::PaymentSimulation;

use crate::events::{OrderCreated, OrderLine};
use crate::platform::{
    ApiError, ApiJson, Runtime, ServiceConfig, ServiceHandle, money, price_to_cents, text_field,
};

/// The documented port.
pub const DEFAULT_PORT: u16 = 3001;
/// Consumer, outbox source and NATS connection name.
pub const NAME: &str = "order-service";

/// order-service's configuration.
#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// Database, broker, HTTP address.
    pub service: ServiceConfig,
    /// `PAYMENT_SUCCESS_RATE` and `PAYMENT_SEED`.
    pub payment: PaymentSimulation,
}

impl OrderConfig {
    /// Reads the environment (see [`ServiceConfig::from_env`], plus `PAYMENT_SUCCESS_RATE`
    /// and `PAYMENT_SEED`).
    pub fn from_env() -> anyhow::Result<OrderConfig> {
        let mut payment = PaymentSimulation::default();
        if let Ok(rate) = std::env::var("PAYMENT_SUCCESS_RATE") {
            payment.success_rate = rate
                .parse()
                .ok()
                .filter(|r: &f64| (0.0..=1.0).contains(r))
                .with_context(|| {
                    format!("PAYMENT_SUCCESS_RATE {rate:?} must be a number from 0 to 1")
                })?;
        }
        if let Ok(seed) = std::env::var("PAYMENT_SEED") {
            payment.seed = seed
                .parse()
                .with_context(|| format!("PAYMENT_SEED {seed:?} must be a whole number"))?;
        }
        Ok(OrderConfig {
            service: ServiceConfig::from_env(DEFAULT_PORT)?,
            payment,
        })
    }
}

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    outbox: Outbox,
}

/// Starts order-service: schema, consumer, HTTP API.
pub async fn start(config: OrderConfig) -> anyhow::Result<ServiceHandle> {
    let counters = [
        "orders_created_total",
        "orders_confirmed_total",
        "orders_cancelled_total",
        "payments_processed_total",
        "payments_success_total",
        "payments_failed_total",
    ];
    let mut runtime = Runtime::connect(NAME, config.service, store::SCHEMA, &counters).await?;
    let outbox = runtime.config.outbox(NAME)?;
    runtime.consume(saga::router(outbox.clone(), config.payment));
    let api = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/orders/user/{user_id}", get(orders_of_user))
        .route("/orders/{order_id}/cancel", post(cancel_order))
        .route("/orders/{order_id}/events", get(order_events))
        .route("/products", get(products))
        .with_state(AppState {
            pool: runtime.pool.clone(),
            outbox,
        });
    runtime.serve(api, true).await
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateOrder {
    user_id: String,
    items: Vec<CreateOrderItem>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateOrderItem {
    product_id: String,
    product_name: String,
    quantity: i64,
    price: f64,
}

/// Most lines per order and units per line.
const MAX_LINES: usize = 100;
const MAX_QUANTITY: i64 = 10_000;

fn validate(request: CreateOrder) -> Result<(String, Vec<OrderLine>, i64), ApiError> {
    text_field("userId", &request.user_id, 100)?;
    if request.items.is_empty() {
        return Err(ApiError::invalid("items must not be empty"));
    }
    if request.items.len() > MAX_LINES {
        return Err(ApiError::invalid(format!(
            "at most {MAX_LINES} items per order"
        )));
    }
    let mut lines = Vec::with_capacity(request.items.len());
    let mut total: i64 = 0;
    for (i, item) in request.items.into_iter().enumerate() {
        text_field(&format!("items[{i}].productId"), &item.product_id, 64)?;
        text_field(&format!("items[{i}].productName"), &item.product_name, 200)?;
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(ApiError::invalid(format!(
                "items[{i}].quantity must be 1 to {MAX_QUANTITY}, got {}",
                item.quantity
            )));
        }
        if lines
            .iter()
            .any(|l: &OrderLine| l.product_id == item.product_id)
        {
            return Err(ApiError::invalid(format!(
                "items[{i}].productId {} appears twice",
                item.product_id
            )));
        }
        let price_cents = price_to_cents(&format!("items[{i}].price"), item.price)?;
        total = total
            .checked_add(price_cents.saturating_mul(item.quantity))
            .filter(|t| *t <= 1_000_000_000_000)
            .ok_or_else(|| ApiError::invalid("order total is too large"))?;
        lines.push(OrderLine {
            product_id: item.product_id,
            product_name: item.product_name,
            quantity: item.quantity as i32,
            price_cents,
        });
    }
    Ok((request.user_id, lines, total))
}

fn order_json(order: &store::OrderRow) -> Value {
    let items: Vec<Value> = order
        .items
        .0
        .iter()
        .map(|l| {
            json!({
                "productId": l.product_id,
                "productName": l.product_name,
                "quantity": l.quantity,
                "price": money(l.price_cents),
            })
        })
        .collect();
    json!({
        "orderId": order.order_id,
        "userId": order.user_id,
        "status": order.status,
        "reason": order.reason,
        "total": money(order.total_cents),
        "items": items,
        "createdAt": rfc3339(order.created_at),
        "updatedAt": rfc3339(order.updated_at),
    })
}

pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("order {raw} not found")))
}

async fn create_order(
    State(app): State<AppState>,
    ApiJson(request): ApiJson<CreateOrder>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (user_id, lines, total_cents) = validate(request)?;
    let mut tx = app.pool.begin().await?;
    let ids: Vec<String> = lines.iter().map(|l| l.product_id.clone()).collect();
    let known = store::known_products(&mut tx, &ids).await?;
    for line in &lines {
        match known.iter().find(|(id, _)| *id == line.product_id) {
            None => {
                return Err(ApiError::invalid(format!(
                    "unknown product {}",
                    line.product_id
                )));
            }
            Some((id, price)) if *price != line.price_cents => {
                return Err(ApiError::invalid(format!(
                    "the price of {id} is {:.2}, not {:.2}",
                    money(*price),
                    money(line.price_cents)
                )));
            }
            Some(_) => {}
        }
    }
    let order_id = Uuid::now_v7();
    let order = store::insert_order(&mut tx, order_id, &user_id, &lines, total_cents).await?;
    let created = OrderCreated {
        order_id,
        user_id,
        items: lines,
        total_cents,
    };
    saga::publish(&app.outbox, &mut tx, order_id, &created).await?;
    tx.commit().await?;
    metrics::counter!("orders_created_total").increment(1);
    tracing::info!(%order_id, total_cents, "order created");
    Ok((StatusCode::CREATED, Json(order_json(&order))))
}

async fn get_order(
    State(app): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_order_id(&order_id)?;
    let mut conn = app.pool.acquire().await?;
    match store::get_order(&mut conn, id).await? {
        Some(order) => Ok(Json(order_json(&order))),
        None => Err(ApiError::not_found(format!("order {order_id} not found"))),
    }
}

async fn orders_of_user(
    State(app): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    text_field("userId", &user_id, 100)?;
    let mut conn = app.pool.acquire().await?;
    let orders = store::orders_of_user(&mut conn, &user_id).await?;
    Ok(Json(json!({
        "userId": user_id,
        "orders": orders.iter().map(order_json).collect::<Vec<_>>(),
    })))
}

async fn cancel_order(
    State(app): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_order_id(&order_id)?;
    let mut tx = app.pool.begin().await?;
    let Some(order) = store::lock_order(&mut tx, id).await? else {
        return Err(ApiError::not_found(format!("order {order_id} not found")));
    };
    if order.status == "CONFIRMED" || order.status == "CANCELLED" {
        return Err(ApiError::conflict(format!(
            "order {order_id} is already {}",
            order.status
        )));
    }
    if order.status != "PENDING" {
        // INVENTORY_RESERVED: the payment was taken in the same step; it can no longer be
        // cancelled without a refund, which the demo does not model.
        return Err(ApiError::conflict(format!(
            "order {order_id} is {}: the payment is under way, it can no longer be cancelled",
            order.status
        )));
    }
    saga::cancel_order(&app.outbox, &mut tx, &order, "cancelled by the customer").await?;
    let order = store::get_order(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::internal("cancelled order vanished"))?;
    tx.commit().await?;
    Ok(Json(order_json(&order)))
}

async fn order_events(
    State(app): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_order_id(&order_id)?;
    let mut conn = app.pool.acquire().await?;
    if store::get_order(&mut conn, id).await?.is_none() {
        return Err(ApiError::not_found(format!("order {order_id} not found")));
    }
    let events = store::events_of_order(&mut conn, id).await?;
    Ok(Json(json!({
        "orderId": id,
        "events": events.iter().map(|e| json!({
            "type": e.event_type,
            "direction": e.direction,
            "messageId": e.message_id,
            "recordedAt": rfc3339(e.recorded_at),
            "data": e.data,
        })).collect::<Vec<_>>(),
    })))
}

async fn products(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let products = store::catalogue(&mut conn).await?;
    Ok(Json(json!({
        "products": products.iter().map(|(id, name, price)| json!({
            "productId": id, "name": name, "price": money(*price),
        })).collect::<Vec<_>>(),
    })))
}
