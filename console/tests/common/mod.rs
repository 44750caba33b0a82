//! What the console's tests share: a migrated database, the router, requests as the
//! console's own pages send them.
#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use console::{Config, Database};
use sqlx::PgPool;
use testkit::Postgres;
use tower::ServiceExt;

pub(crate) const HOST: &str = "127.0.0.1:3000";

pub(crate) struct Db {
    _pg: Postgres,
    pub(crate) pool: PgPool,
    pub(crate) url: String,
}

pub(crate) async fn db() -> Db {
    db_on(Postgres::start().await.expect("PostgreSQL")).await
}

/// A database on a server with `wal_level = logical` (WAL slots).
pub(crate) async fn logical_db() -> Db {
    let config = testkit::PostgresConfig {
        logical_decoding: true,
        ..testkit::PostgresConfig::default()
    };
    db_on(Postgres::start_with(config).await.expect("PostgreSQL")).await
}

async fn db_on(pg: Postgres) -> Db {
    let url = pg.fresh_database().await.expect("db");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .connect(&url)
        .await
        .expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    Db { _pg: pg, pool, url }
}

pub(crate) fn config(pool: &PgPool) -> Config {
    Config {
        allow_actions: true,
        show_payloads: true,
        csrf_secret: Some(b"test secret".to_vec()),
        ..Config::new(vec![Database::new("orders", pool.clone())])
    }
}

pub(crate) fn app(config: Config) -> Router {
    console::router(config).expect("valid config")
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Ping {
    pub(crate) n: u32,
}

impl envelope::Event for Ping {
    const NAME: &'static str = "test.ping";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        format!("k-{}", self.n)
    }
}

pub(crate) async fn get(app: &Router, path: &str) -> (StatusCode, String) {
    send(
        app,
        Request::get(path)
            .header(header::HOST, HOST)
            .body(Body::empty())
            .expect("request"),
    )
    .await
}

pub(crate) async fn send(app: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 4 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A POST as the console's own form sends it.
pub(crate) fn form(path: &str, fields: &[(&str, &str)]) -> Request<Body> {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    Request::post(path)
        .header(header::HOST, HOST)
        .header(header::ORIGIN, format!("http://{HOST}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .expect("request")
}

/// The CSRF token the page at `path` carries.
pub(crate) async fn token(app: &Router, path: &str) -> String {
    let (status, page) = get(app, path).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    hidden_value(&page, "csrf")
}

/// The value of the first form field `name` on `page`.
pub(crate) fn hidden_value(page: &str, name: &str) -> String {
    let field = format!(r#"name="{name}" value=""#);
    let at = page
        .find(&field)
        .unwrap_or_else(|| panic!("no {name} field in {page}"))
        + field.len();
    page[at..at + page[at..].find('"').expect("end")].to_owned()
}

pub(crate) async fn audit_rows(pool: &PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT actor, action, affected FROM console_audit ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("audit")
}
