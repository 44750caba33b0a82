//! The operator console: each service database's outbox, relays and dead letters in a
//! browser, with retry and purge that go through the same code as the `dlq` CLI.
//!
//! Serve it with the `console` binary, or mount [`router`] in your own axum app:
//!
//! ```no_run
//! # async fn mount(pool: sqlx::PgPool) {
//! let config = console::Config {
//!     base_path: "/console".to_owned(),
//!     ..console::Config::new(vec![console::Database::new("orders", pool)])
//! };
//! let app = axum::Router::new().nest("/console", console::router(config).expect("valid"));
//! # let _ = app;
//! # }
//! ```
//!
//! # Guarantees
//! - Read-only unless [`Config::allow_actions`]: every POST is refused (403) and no action
//!   form is shown.
//! - Every POST carries a CSRF token bound to the user and an `Origin` (or `Referer`) of
//!   the console's own host; anything else is refused (403) and changes nothing.
//! - Every action is written to `console_audit` (who, what, how many) in the action's own
//!   transaction: no action without its audit row.
//! - "All matching" actions (and every purge) re-run the filter and show the count before
//!   acting; an action confirmed for a count that has changed since is shown again, not
//!   taken, and a confirmed one takes only the letters counted (none parked after). At most
//!   10 000 letters per action.
//! - A console without basic auth answers only to loopback host names (or to
//!   [`Config::allowed_hosts`]): no other site reaches it by DNS rebinding.
//! - Every query runs under [`Config::statement_timeout`].
//! - Dead-letter content (subjects, headers, payloads, errors) is HTML-escaped and its
//!   control and invisible characters shown as escapes; payloads are hidden unless
//!   [`Config::show_payloads`].
//! - Errors are JSON: `{"error": "..."}` with a 4xx or 5xx status.
//!
//! # Layout
//! - [`Config`], [`Database`], [`Access`] (`config`): what the console reads and who may use
//!   it.
//! - `security` (private): authentication, CSRF tokens, the Origin check.
//! - `broker` (private): what JetStream shows (streams, durable consumers), within a
//!   deadline.
//! - `rates` (private): the publish rate of the last hour, settled minutes kept in memory.
//! - `store` (private): the console's own SQL (the audit trail, statement timeouts).
//! - `pages` (private): the layout and the overview, relays, consumers, dead-letter and
//!   action pages.
//! - `error` (private): the JSON error responses.

mod broker;
mod config;
mod error;
mod pages;
mod rates;
mod security;
mod store;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use config::{Access, Config, Database};

/// The console's routes, relative to where they are mounted: `/` (overview),
/// `/db/{database}/dead-letters` (list and filters), `/db/{database}/dead-letters/{id}`
/// (detail), `POST /db/{database}/dead-letters/retry` and `.../purge` (actions),
/// `/db/{database}/relays` (instances, partitions, keys waiting out a backoff) and
/// `POST /db/{database}/relays/retry-now`, `/db/{database}/consumers` (durables and
/// inboxes), `/db/{database}/audit` (the actions taken). Refuses a configuration that
/// [`Config::validate`] refuses.
pub fn router(config: Config) -> Result<Router, String> {
    config.validate()?;
    let state = Arc::new(security::State::new(config));
    Ok(Router::new()
        .route("/", get(pages::overview::page))
        .route(
            "/db/{database}/dead-letters",
            get(pages::dead_letters::list),
        )
        .route(
            "/db/{database}/dead-letters/{id}",
            get(pages::dead_letters::detail),
        )
        .route(
            "/db/{database}/dead-letters/retry",
            post(pages::actions::retry),
        )
        .route(
            "/db/{database}/dead-letters/purge",
            post(pages::actions::purge),
        )
        .route("/db/{database}/relays", get(pages::relays::page))
        .route(
            "/db/{database}/relays/retry-now",
            post(pages::relays::retry_now),
        )
        .route("/db/{database}/consumers", get(pages::consumers::page))
        .route("/db/{database}/audit", get(pages::overview::audit))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/static/htmx.min.js", get(pages::htmx))
        .route("/static/console.js", get(pages::script))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ))
        .with_state(state))
}
