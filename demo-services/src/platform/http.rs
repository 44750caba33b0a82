//! HTTP helpers the APIs share: JSON errors ([`ApiError`]), a JSON extractor whose
//! rejections are JSON too ([`ApiJson`]), request validation and money, and what every router
//! gets (body limit, JSON 404/405, request spans).

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Largest accepted request body; larger ones get 413 with a JSON reason.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Adds what every API shares: the body limit, JSON 404/405 for unknown routes and methods.
pub(super) fn finish_routes(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(super::telemetry::traced))
}

// Request validation and money, shared by the APIs.

/// Parses a price in currency units into cents: positive, at most 2 decimals, at most 1e6.
pub fn price_to_cents(field: &str, price: f64) -> Result<i64, ApiError> {
    // Up to one million: far below the 2^53 cents where doubles stop holding every cent.
    if !price.is_finite() || price <= 0.0 || price > 1e6 {
        return Err(ApiError::invalid(format!(
            "{field} must be a positive amount up to 1000000, got {price}"
        )));
    }
    let cents = (price * 100.0).round();
    if (cents - price * 100.0).abs() > 1e-6 {
        return Err(ApiError::invalid(format!(
            "{field} must have at most 2 decimals, got {price}"
        )));
    }
    Ok(cents as i64)
}

/// Cents as a currency amount for JSON.
pub fn money(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// Validates a request's text field: not blank, at most `max` characters, no control characters.
pub fn text_field(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// An HTTP error with a JSON body `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    /// The status (4xx for the client's mistakes, 5xx for ours).
    pub status: StatusCode,
    /// Readable reason.
    pub reason: String,
}

impl ApiError {
    /// An error with this status and reason.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    /// 422: the request is well-formed JSON but not acceptable.
    pub fn invalid(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason)
    }

    /// 404.
    pub fn not_found(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, reason)
    }

    /// 409.
    pub fn conflict(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, reason)
    }

    /// 500, logging the cause (the client gets no internals).
    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %error, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<outbox::Error> for ApiError {
    fn from(e: outbox::Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.reason }))).into_response()
    }
}

/// `Json<T>` whose rejections (malformed JSON, wrong or missing fields, wrong content type,
/// oversized body) are [`ApiError`]s with a JSON reason and the same 4xx status.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}
